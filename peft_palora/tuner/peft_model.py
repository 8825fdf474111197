"""What a `PeftModel` does differently when it holds PaLoRA adapters.

PEFT picks the `PeftModel` class from the task type (`PeftModelForCausalLM`, ...), never from the PEFT method, so
a tuner cannot bring its own. PaLoRA's instances therefore get a PaLoRA subclass of the class PEFT chose, once, when
PEFT constructs them (see `_registration`): `isinstance` checks, `type(model).__name__` and every PEFT method keep
working, and `PeftModel` itself is left as PEFT wrote it, so LoRA models in the same process see PEFT unchanged.

The subclass adds, for PaLoRA bundles only:

* `save_pretrained`: safetensors only, and the bundle switches atomically as a whole (`_atomic.atomic_directory`);
  the first save writes PaLoRA's model card (tasks, preferences, usage) instead of PEFT's blank template;
* `load_adapter` (which `PeftModel.from_pretrained` calls): bundle files checked before PEFT reads them, clear
  errors naming the file and the tensors, and a refused load leaves the base model as it was;
* `push_to_hub`: PaLoRA's card, published in one commit (`push.push_palora_to_hub`);
* `generate`: marks the call, so a per-sample preference covers the beams and returned sequences of its sample.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub import ModelCard
from peft import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn

from peft_palora.tuner import state as _per_call
from peft_palora.tuner.bundle import (
    bundle_meaning_problem,
    bundle_metadata,
    check_existing_adapter_matches,
    check_local_bundle,
    check_modules_to_save_present,
    local_bundle_dir,
    missing_saved_adapters,
    pending_meaning_problem,
    restore_base_model,
)
from peft_palora.tuner.card import hub_id_or_folder_name, write_model_card
from peft_palora.tuner.push import push_palora_to_hub
from peft_palora.utils.atomic import atomic_directory, carry_into_staging

_README = "README.md"


class PaLoRAPeftModelMixin:
    """The PaLoRA behaviour of a `PeftModel` (mixed in front of the class PEFT chose for the task type)."""

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("safe_serialization", True) is False:
            raise ValueError("`safe_serialization=False` is not supported: PaLoRA bundles are safetensors only.")
        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(f"`save_directory` must be a path, got {type(save_directory).__name__}.")
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` {os.fspath(save_directory)!r} is a file; give a directory.")
        if not kwargs.get("is_main_process", True):
            return None
        with atomic_directory(os.fspath(save_directory)) as staging:
            carry_into_staging(os.fspath(save_directory), staging, _README)  # PEFT updates an existing card in place
            result = super().save_pretrained(staging, *args, **kwargs)
            self._record_bundle_meaning(staging)
            return result

    def _record_bundle_meaning(self, directory: str) -> None:
        """Write T, r, the task names and the conv layout of each saved PaLoRA adapter into its safetensors header,
        so that a load can check them against the config (`bundle.check_bundle_metadata`); refuse (nothing is
        written: the save is staged) a bundle that lacks some of its adapter tensors."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        for adapter_name, config in self.peft_config.items():
            if getattr(config, "peft_type", None) != "PALORA":
                continue
            folder = directory if adapter_name == "default" else os.path.join(directory, adapter_name)
            path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
            if not os.path.isfile(path):
                continue  # not among the selected adapters
            with safe_open(path, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            missing = missing_saved_adapters(self, adapter_name, set(tensors))
            if missing:
                shown = ", ".join(missing[:4]) + (f", ... ({len(missing)} in all)" if len(missing) > 4 else "")
                raise ValueError(
                    f"Not saved: the state dict of adapter '{adapter_name}' lacks its adapter tensors {shown}, so the "
                    "bundle could not be loaded back. Under FSDP1, gather the full state dict from the outermost "
                    "wrapper (`accelerator.get_state_dict(model)`, or `FullyShardedDataParallel.state_dict_type(..., "
                    "StateDictType.FULL_STATE_DICT)`) and pass it as `save_pretrained(..., state_dict=...)`; a "
                    "`state_dict=` you pass must hold every adapter tensor."
                )
            metadata.update(bundle_metadata(config))
            save_file(tensors, path, metadata=metadata)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """PaLoRA's own card for a new bundle; an existing card (perhaps edited by its owner) is updated as PEFT does,
        keeping its tags (PEFT replaces them) and naming no base model known only by a local path or by nothing."""
        path = os.path.join(output_dir, _README)
        if not os.path.isfile(path):
            write_model_card(self, output_dir)
            return
        tags_before = ModelCard.load(path, ignore_metadata_errors=True).data.tags or []
        super().create_or_update_model_card(output_dir)
        card = ModelCard.load(path)
        if card.data.get("base_model") is not None and hub_id_or_folder_name(card.data.base_model)[0] is None:
            card.data.base_model = None  # PEFT writes the base's `_name_or_path`: '' or a path of this machine
        card.data.tags = [  # PEFT's `base_model:adapter:<_name_or_path>` tag likewise
            tag for tag in dict.fromkeys([*tags_before, *(card.data.tags or [])])
            if not tag.startswith("base_model:") or hub_id_or_folder_name(tag.split(":", 2)[-1])[0] is not None
        ]
        card.save(path)

    def load_adapter(self, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
        directory = local_bundle_dir(model_id, kwargs.get("subfolder"))
        config = self.peft_config.get(adapter_name)
        # From `PeftModel.from_pretrained`: the layers were injected for a bundle whose weights are not loaded yet.
        fresh = config is not None and getattr(config, "_palora_weights_pending", False)
        existed = config is not None
        try:
            bundle_config = check_local_bundle(directory) if directory is not None else None
            meaning_problem = None
            if bundle_config is not None:
                meaning_problem = bundle_meaning_problem(os.path.join(directory, SAFETENSORS_WEIGHTS_NAME),
                                                         bundle_config)
                if existed and not fresh:  # PEFT would load the tensors into the existing adapter, under its config
                    check_existing_adapter_matches(config, bundle_config, directory, adapter_name)
                check_modules_to_save_present(self, directory, bundle_config)
            with pending_meaning_problem(meaning_problem):
                result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
        except BaseException:
            if fresh:
                restore_base_model(self.base_model.model, adapter_name)
            elif not existed and adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)
            raise
        if adapter_name in self.peft_config:
            self.peft_config[adapter_name]._palora_weights_pending = False
            # Where its tensors came from, so that `export_lora` refuses to write over that bundle.
            self.peft_config[adapter_name]._palora_loaded_from = (
                os.path.realpath(directory) if directory is not None else None
            )
        return result

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any):
        """Publish the bundle with PaLoRA's model card in one commit (`peft_palora.tuner.push.push_palora_to_hub`).

        transformers' own `push_to_hub` would replace the card with a generic `library_name: transformers` one.
        Accepts transformers' arguments (`commit_message`, `commit_description`, `private`, `token`, `revision`,
        `create_pr`, `tags`; `max_shard_size` is ignored, adapters are never sharded) and the card's (`front_table`,
        `hypervolume`, `hypervolume_reference`, `plot_path`, `base_model`, `pipeline_tag`, `license`).
        """
        if args:
            raise TypeError("push_to_hub() takes `repo_id` as its only positional argument on PaLoRA models.")
        kwargs.pop("max_shard_size", None)
        if kwargs.get("commit_message") is None:
            kwargs.pop("commit_message", None)
        return push_palora_to_hub(self, repo_id, **kwargs)

    def forward(self, *args: Any, **kwargs: Any):
        if _per_call.compiling():
            return self._traced_forward(args, kwargs)
        with _per_call.recording_batch(args, kwargs):
            return super().forward(*args, **kwargs)

    def _traced_forward(self, args: tuple, kwargs: dict[str, Any]):
        """`forward` as dynamo traces it: the batch goes to the tuner as a traced side effect (a context variable
        cannot be traced), and a preference that is not a tensor is validated before the graph (one graph break),
        so that its values are an input of the graph, not constants that recompile."""
        preference = kwargs.get("preference")
        if preference is not None and not isinstance(preference, (torch.Tensor, _per_call.Validated)):
            # the whole kwargs dict is handed over unread, so dynamo does not guard on (and recompile for) the values
            kwargs = self.base_model._validated_outside_graph(kwargs)
        tuner = self.base_model
        previous = tuner._traced_batch
        tuner._traced_batch = _per_call.batch_of(args, kwargs)
        try:
            return super().forward(*args, **kwargs)
        finally:
            tuner._traced_batch = previous

    def generate(self, *args: Any, **kwargs: Any):
        with _per_call.generation(), _per_call.recording_batch(args, kwargs):
            return super().generate(*args, **kwargs)


def _subclass(base: type) -> type:
    cls = type(base.__name__, (PaLoRAPeftModelMixin, base), {"__module__": __name__, "__doc__": base.__doc__})
    cls.__qualname__ = f"PaLoRA{base.__name__}"
    return cls


# Module-level names, so a pickled model (e.g. torch.save of a whole model) finds its class again.
PaLoRAPeftModel = _subclass(PeftModel)
PaLoRAPeftModelForCausalLM = _subclass(PeftModelForCausalLM)
PaLoRAPeftModelForSeq2SeqLM = _subclass(PeftModelForSeq2SeqLM)
PaLoRAPeftModelForSequenceClassification = _subclass(PeftModelForSequenceClassification)
PaLoRAPeftModelForTokenClassification = _subclass(PeftModelForTokenClassification)
PaLoRAPeftModelForQuestionAnswering = _subclass(PeftModelForQuestionAnswering)
PaLoRAPeftModelForFeatureExtraction = _subclass(PeftModelForFeatureExtraction)

_BY_BASE = {cls.__mro__[2]: cls for cls in (
    PaLoRAPeftModel, PaLoRAPeftModelForCausalLM, PaLoRAPeftModelForSeq2SeqLM,
    PaLoRAPeftModelForSequenceClassification, PaLoRAPeftModelForTokenClassification,
    PaLoRAPeftModelForQuestionAnswering, PaLoRAPeftModelForFeatureExtraction,
)}
_subclass_cache: dict[type, type] = {}


def palora_class_for(cls: type) -> type:
    """The PaLoRA subclass of a `PeftModel` class (one of PEFT's, or a user's subclass of one)."""
    if issubclass(cls, PaLoRAPeftModelMixin):
        return cls
    found = _BY_BASE.get(cls) or _subclass_cache.get(cls)
    if found is None:
        found = _subclass_cache[cls] = _subclass(cls)
    return found


def adopt(peft_model: nn.Module) -> None:
    """Give a `PeftModel` holding PaLoRA adapters its PaLoRA class (idempotent)."""
    peft_model.__class__ = palora_class_for(type(peft_model))
