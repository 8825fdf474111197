"""A multi-task model: a PaLoRA backbone shared by all tasks plus one small head per task.

PEFT wraps the backbone; the task heads are ordinary modules outside it (PEFT's bundle knows nothing of them), so
:class:`MultiTaskModel` saves them next to the adapter bundle in ``task_heads.safetensors`` and loads them back.
The preference reaches only the backbone: it mixes the task adapters, and every head reads the features of that
mixture.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from peft_palora.utils.atomic import atomic_save_safetensors, atomic_write_text
from peft_palora.utils.checks import check_int
from peft_palora.utils.json_files import read_json

logger = logging.getLogger(__name__)

TASK_HEADS_FILENAME = "task_heads.safetensors"
MULTITASK_CONFIG_NAME = "multitask_config.json"
EXTRA_TRAINABLE_FILENAME = "trainable_extra.safetensors"
POOLING_CHOICES = ("auto", "pooler", "cls", "mean")


def linear_heads(in_features: int, num_classes: Mapping[str, int]) -> nn.ModuleDict:
    """One ``nn.Linear(in_features, num_classes[task])`` per task, in the order of ``num_classes``."""
    if not num_classes:
        raise ValueError("`num_classes` must name at least one task.")
    for task, classes in num_classes.items():
        check_int(classes, f"`num_classes[{task!r}]`", minimum=1)
    return nn.ModuleDict({task: nn.Linear(in_features, classes) for task, classes in num_classes.items()})


def linear_heads_like_saved(save_directory: str) -> nn.ModuleDict:
    """Linear heads with the shapes stored in ``save_directory/task_heads.safetensors`` (weights not loaded)."""
    from safetensors import safe_open

    path = _task_heads_path(save_directory)
    with safe_open(path, framework="pt") as handle:
        task_names = json.loads((handle.metadata() or {}).get("task_names", "[]"))
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    heads = {}
    for task in task_names:
        weight = shapes.get(f"{task}.weight")
        if (
            weight is None
            or len(weight) != 2
            or set(shapes) - {f"{t}.{p}" for t in task_names for p in ("weight", "bias")}
        ):
            raise ValueError(f"{path} does not hold plain linear heads; pass `heads` built like the saved ones.")
        heads[task] = nn.Linear(weight[1], weight[0], bias=f"{task}.bias" in shapes)
    if len(heads) < 2:
        raise ValueError(f"{path} names fewer than two tasks in its metadata; pass `heads`.")
    return nn.ModuleDict(heads)


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether some batch norm of ``model`` normalises with the current batch's statistics (see below)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in model.modules())


def use_batch_statistics(model: nn.Module) -> int:
    """Make every batch norm of ``model`` normalise with the statistics of the current batch, in eval mode too.

    Running averages pool the activations of every preference seen in training, but the activations of a PaLoRA
    model depend on the preference: at evaluation, a single-task preference would be normalised with the statistics
    of a mixture, which costs accuracy at the ends of the front. With batch statistics each forward (one preference
    per forward in the sequential window) normalises with its own. Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
            changed += 1
    return changed


def save_task_heads(heads: nn.ModuleDict, save_directory: str) -> str:
    """Write the heads' weights to ``save_directory/task_heads.safetensors`` (atomically) and return the path."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in heads.state_dict().items()}
    path = os.path.join(save_directory, TASK_HEADS_FILENAME)
    atomic_save_safetensors(tensors, path, metadata={"format": "pt", "task_names": json.dumps(list(heads.keys()))})
    return path


def load_task_heads(heads: nn.ModuleDict, save_directory: str) -> nn.ModuleDict:
    """Load ``task_heads.safetensors`` into ``heads`` (same tasks, same shapes), in place; returns ``heads``.

    Everything is checked before anything is copied, so a mismatching file leaves ``heads`` untouched.
    """
    heads.load_state_dict(_read_task_heads(heads, save_directory), strict=True)
    return heads


def _task_heads_path(save_directory: str) -> str:
    path = os.path.join(save_directory, TASK_HEADS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {TASK_HEADS_FILENAME} in {save_directory!r}; was it saved by MultiTaskModel?")
    return path


def _read_task_heads(heads: nn.ModuleDict, save_directory: str) -> dict[str, torch.Tensor]:
    """The tensors of ``task_heads.safetensors``, checked to fit ``heads`` (same keys, same shapes)."""
    path = _task_heads_path(save_directory)
    state = load_file(path)
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the heads: missing {missing}, unexpected {unexpected}.")
    for key, value in sorted(state.items()):
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{path} does not match the heads: `{key}` has shape {tuple(value.shape)}, the head "
                f"{tuple(expected[key].shape)}."
            )
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------------
_SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_POOLING_CONFIG = os.path.join("1_Pooling", "config.json")


def _checkpoint_file(name_or_path: str, filename: str) -> str | None:
    """``filename`` of a local checkpoint folder, or of a Hub checkpoint already in the local cache (no network)."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, filename.replace(os.sep, "/"))
    except Exception:  # not a repo id, no cache, ...: nothing to detect
        return None
    return cached if isinstance(cached, str) and os.path.isfile(cached) else None


def detect_pooling(model: nn.Module) -> tuple[str, str]:
    """``(pooling, reason)`` for ``pooling="auto"``: what the checkpoint of ``model`` was trained to be read with.

    A sentence-transformers checkpoint (``1_Pooling/config.json``, ``modules.json`` or ``sentence_bert_config.json``
    in its folder or in the local Hub cache, or a ``sentence-transformers/`` repository name) is read the way its
    pooling module says: ``"mean"`` for ``pooling_mode_mean_tokens`` (all-MiniLM-L6-v2 and most others), ``"cls"``
    for ``pooling_mode_cls_token``. Otherwise ``"auto"``: ``pooler_output`` when the backbone returns one (ViT,
    ResNet, BERT's next-sentence pooler), else the first token.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = getattr(base, "config", None)
    name = getattr(base, "name_or_path", None) or getattr(config, "_name_or_path", None) or ""
    name = str(name)
    if name:
        pooling_config = _checkpoint_file(name, _POOLING_CONFIG)
        if pooling_config is not None:
            try:
                modes = read_json(pooling_config, what="sentence-transformers pooling config")
            except ValueError:  # a damaged pooling config is only a hint lost: fall back to mean pooling
                modes = {}
            where = f"sentence-transformers checkpoint {name!r}: its 1_Pooling/config.json uses"
            if modes.get("pooling_mode_cls_token") and not modes.get("pooling_mode_mean_tokens"):
                return "cls", f"{where} the CLS token"
            if modes.get("pooling_mode_mean_tokens"):
                return "mean", f"{where} mean pooling"
            return "mean", f"sentence-transformers checkpoint {name!r} (pooling config without mean/CLS; mean used)"
        for filename in _SENTENCE_TRANSFORMERS_FILES:
            if _checkpoint_file(name, filename) is not None:
                return "mean", f"sentence-transformers checkpoint {name!r} (it has {filename})"
        if name.startswith("sentence-transformers/"):
            return "mean", f"sentence-transformers checkpoint {name!r} (by its name)"
    return (
        "auto",
        "no sentence-transformers pooling found: pooler_output when the backbone returns one, else the first token",
    )


def pool_features(outputs: Any, inputs: Mapping[str, Any], pooling: str) -> torch.Tensor:
    """Pool a backbone's output into ``(batch, hidden)`` features (see :class:`MultiTaskModel`'s ``pooling``)."""
    pooler = getattr(outputs, "pooler_output", None)
    if pooling == "pooler" or (pooling == "auto" and pooler is not None):
        if pooler is None:
            raise ValueError('pooling="pooler" but the backbone returned no `pooler_output`.')
        return pooler.flatten(1)
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"pooling={pooling!r} needs `last_hidden_state` in the backbone's output.")
    if pooling == "mean":
        mask = inputs.get("attention_mask")
        if mask is None:
            return hidden.mean(dim=1)
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return hidden[:, 0]


def per_sample_task_metrics(
    outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any], label_columns: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """``{<task>_accuracy, <task>_loss}``, one value per sample, from the logits and the label columns.

    Integer labels: accuracy (arg-max equals the label) and cross-entropy. Floating labels (regression): the
    squared error, summed over the output dimensions, as ``<task>_loss`` only.
    """
    import torch.nn.functional as F

    values: dict[str, torch.Tensor] = {}
    for task, column in label_columns.items():
        logits, labels = outputs[task], batch[column]
        if labels.is_floating_point():
            error = (logits.float().reshape(labels.shape[0], -1) - labels.float().reshape(labels.shape[0], -1)) ** 2
            values[f"{task}_loss"] = error.sum(dim=1)
            continue
        values[f"{task}_accuracy"] = (logits.argmax(dim=-1) == labels).float()
        values[f"{task}_loss"] = F.cross_entropy(logits.float(), labels, reduction="none")
    return values


class MultiTaskModel(nn.Module):
    """A PaLoRA ``PeftModel`` backbone and one head per task: ``model(**inputs, preference=p) -> {task: logits}``.

    It behaves like the PEFT model it wraps: ``set_preference``/``get_preference``, ``print_trainable_parameters``,
    ``get_nb_trainable_parameters`` (heads included), ``merge_adapter``/``unmerge_adapter``, ``disable_adapter``,
    ``export_lora`` and ``merge_and_unload`` (which returns a self-contained :class:`MergedMultiTaskModel`).

    Args:
        backbone: the PEFT model (``get_peft_model(base, PaLoRAConfig(...))``) whose output carries the features.
        heads: ``{task_name: module}`` mapping features ``(batch, hidden)`` to that task's logits. Their order is the
            task order of the preferences; when the PaLoRA config has ``task_names`` they must be the same.
        label_columns: ``{task_name: column}`` naming each task's labels in a batch. Those columns are dropped from the
            inputs before the backbone sees them, so a whole batch can be passed to ``forward``.
        pooling: how features are read from the backbone's output: ``"pooler"`` (``pooler_output``, flattened, as for
            ViT or ResNet), ``"cls"`` (first token of ``last_hidden_state``), ``"mean"`` (mean of
            ``last_hidden_state`` over the ``attention_mask``, as sentence encoders such as MiniLM are trained), or
            ``"auto"``: what the checkpoint was trained with when it is a sentence-transformers one
            (:func:`detect_pooling`: ``"mean"`` for all-MiniLM-L6-v2), else ``pooler_output`` when the model returns
            one and the first token otherwise. The choice and its reason are logged and kept in ``pooling`` and
            ``pooling_reason``; set ``pooling`` explicitly to be sure.
    """

    # the forward takes no `num_items_in_batch`: transformers.Trainer must average over accumulation steps itself
    accepts_loss_kwargs = False

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        label_columns: Mapping[str, str] | None = None,
        pooling: str = "auto",
    ):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"`backbone` must be a PEFT model with a PaLoRA adapter, got {type(backbone).__name__}.")
        if not isinstance(heads, (Mapping, nn.ModuleDict)) or len(heads) < 2:
            raise ValueError("`heads` must map at least two task names to modules.")
        for task, head in heads.items():
            if not isinstance(head, nn.Module):
                raise TypeError(f"`heads[{task!r}]` must be a torch module, got {type(head).__name__}.")
        if pooling not in POOLING_CHOICES:
            raise ValueError(f"`pooling` must be one of {POOLING_CHOICES}, got {pooling!r}.")
        task_names = list(heads.keys())
        config = _palora_config(backbone)
        if config is None or not callable(getattr(backbone, "set_preference", None)):
            # without it the preference would reach nothing (and `set_preference` would fail much later)
            raise ValueError(
                f"`backbone` ({type(backbone).__name__}) is not a PEFT model with a PaLoRA adapter; pass "
                "get_peft_model(base_model, PaLoRAConfig(...))."
            )
        if config.num_tasks != len(task_names):
            raise ValueError(f"`heads` has {len(task_names)} tasks, the PaLoRA config {config.num_tasks}.")
        if config.task_names and list(config.task_names) != task_names:
            raise ValueError(f"`heads` tasks {task_names} differ from the config's task_names {config.task_names}.")
        if label_columns is not None and not isinstance(label_columns, Mapping):
            raise TypeError(
                f"`label_columns` must map task names to batch columns, got {type(label_columns).__name__}."
            )
        label_columns = dict(label_columns) if label_columns is not None else {}
        unknown = sorted(set(label_columns) - set(task_names))
        if unknown:
            raise ValueError(f"`label_columns` names tasks without a head: {unknown}.")
        self.backbone = backbone
        self.heads = heads if isinstance(heads, nn.ModuleDict) else nn.ModuleDict(dict(heads))
        self.label_columns = label_columns
        if pooling == "auto":
            pooling, reason = detect_pooling(backbone)
            logger.info("MultiTaskModel: pooling='auto' chose %r (%s).", pooling, reason)
        else:
            reason = "set explicitly"
        self.pooling = pooling
        self.pooling_reason = reason

    # ---- tasks and preferences ----------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    @property
    def peft_config(self) -> Any:
        """The backbone's PEFT configs (lets front evaluation read the task names)."""
        return getattr(self.backbone, "peft_config", None)

    @property
    def active_adapter(self) -> Any:
        return getattr(self.backbone, "active_adapter", None)

    def get_base_model(self) -> nn.Module:
        """The transformers model under the PEFT wrapper (what the adapter bundle was made for)."""
        return self.backbone.get_base_model()

    def set_preference(self, preference: Any) -> None:
        """Set the backbone's preference (see ``PaLoRAModel.set_preference``)."""
        self.backbone.set_preference(preference)

    def get_preference(self) -> torch.Tensor:
        """The backbone's preference in force."""
        return self.backbone.get_preference()

    # ---- what PEFT models offer ---------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts of the backbone (as PEFT counts them) plus the heads."""
        trainable, total = self.backbone.get_nb_trainable_parameters()
        for parameter in self.heads.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                trainable += parameter.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts, heads included (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Merge the adapters into the backbone's weights at the preference in force (``PeftModel.merge_adapter``)."""
        self.backbone.merge_adapter(*args, **kwargs)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`."""
        self.backbone.unmerge_adapter()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: the backbone runs its base weights alone (the heads stay)."""
        with self.backbone.disable_adapter():
            yield

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Recompute the backbone's activations in the backward pass (what ``TrainingArguments(
        gradient_checkpointing=True)`` calls). With a frozen base, the embedding outputs are made to require
        gradients, as PEFT does for LoRA, so that reentrant checkpointing still reaches the adapters."""
        base = self.get_base_model()
        enable = getattr(base, "activation_checkpointing_enable", None) or getattr(
            base, "gradient_checkpointing_enable", None
        )
        if not callable(enable):
            raise AttributeError(f"{type(base).__name__} does not support activation checkpointing.")
        if "activation_checkpointing_kwargs" not in kwargs and "gradient_checkpointing_kwargs" in kwargs:
            kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
        if (
            getattr(enable, "__name__", "") == "gradient_checkpointing_enable"
            and "activation_checkpointing_kwargs" in kwargs
        ):
            kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
        enable(*args, **kwargs)
        if callable(getattr(base, "enable_input_require_grads", None)):
            base.enable_input_require_grads()

    gradient_checkpointing_enable = activation_checkpointing_enable

    def activation_checkpointing_disable(self) -> None:
        """Undo :meth:`activation_checkpointing_enable`."""
        base = self.get_base_model()
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def export_lora(self, save_directory: str, preference: Any = None, **kwargs: Any) -> Any:
        """``backbone.export_lora`` (a plain PEFT LoRA bundle equal to the model at ``preference``) plus the heads
        (``task_heads.safetensors``) and ``multitask_config.json`` beside it."""
        from peft_palora.tuner.conversion import export_lora

        # Given this model (not its backbone), a refusal names what works for a MultiTaskModel.
        result = export_lora(self, save_directory, preference=preference, **kwargs)
        self._write_heads_and_config(save_directory)
        return result

    def export_task_loras(self, save_directory: str, **kwargs: Any) -> Any:
        """``backbone.export_task_loras`` (one plain PEFT LoRA per task and ``palora_tasks.json``) plus the heads
        (``task_heads.safetensors``) and ``multitask_config.json`` beside them."""
        from peft_palora.tuner.conversion import export_task_loras

        result = export_task_loras(self, save_directory, **kwargs)
        self._write_heads_and_config(save_directory)
        return result

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> MergedMultiTaskModel:
        """Merge the adapters at the preference in force and return a self-contained plain model.

        The result is a :class:`MergedMultiTaskModel`: the merged transformers backbone (no PEFT layers left), the
        same pooling and the same heads, with outputs equal to this model's at that preference. Like PEFT's, this
        consumes the wrapped model: use the returned one afterwards. A per-sample ``(batch, T)`` preference in force
        cannot be merged (set one shared preference first).
        """
        preference = self.get_preference()
        preference = preference.detach().clone() if isinstance(preference, torch.Tensor) else preference
        if isinstance(preference, torch.Tensor) and preference.dim() != 1:
            raise ValueError(
                f"merge_and_unload needs one preference for every sample, but a per-sample preference of shape "
                f"{tuple(preference.shape)} is in force; call set_preference with a (T,) preference first."
            )
        merged = self.backbone.merge_and_unload(*args, **kwargs)
        return MergedMultiTaskModel(
            merged,
            self.heads,
            label_columns=self.label_columns,
            pooling=self.pooling,
            preference=preference,
            task_names=self.task_names,
        )

    # ---- forward ------------------------------------------------------------------------------------------------
    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch`` without the label columns: what the backbone receives."""
        labels = set(self.label_columns.values())
        return {key: value for key, value in batch.items() if key not in labels}

    def labels(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{task: labels}`` read from ``batch`` through ``label_columns``."""
        missing = [column for column in self.label_columns.values() if column not in batch]
        if missing or len(self.label_columns) != self.num_tasks:
            raise ValueError(
                f"the batch lacks label columns {missing}" if missing else "`label_columns` must name every task."
            )
        return {task: batch[column] for task, column in self.label_columns.items()}

    def per_sample_metrics(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, Any]:
        """``{<task>_accuracy, <task>_loss}`` per sample from the label columns: the ``metric_fn`` of
        :func:`~peft_palora.pareto.evaluate_front_batched`, so a front needs no hand-written metric."""
        if len(self.label_columns) != self.num_tasks:
            raise ValueError("`label_columns` must name every task to compute the per-sample metrics.")
        return per_sample_task_metrics(outputs, batch, self.label_columns)

    def features(self, outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Pool the backbone's output into ``(batch, hidden)`` features."""
        return pool_features(outputs, inputs, self.pooling)

    def forward(self, preference: Any = None, **batch: Any) -> dict[str, torch.Tensor]:
        """Run the backbone at ``preference`` (``(T,)``, ``(batch, T)`` or ``None`` for the one in force) and every
        head on its features; label columns in ``batch`` are ignored."""
        inputs = self.model_inputs(batch)
        outputs = self.backbone(**inputs) if preference is None else self.backbone(**inputs, preference=preference)
        features = self.features(outputs, inputs)
        return {task: head(features) for task, head in self.heads.items()}

    # ---- saving and loading -------------------------------------------------------------------------------------
    def _write_heads_and_config(self, save_directory: str) -> None:
        save_task_heads(self.heads, save_directory)
        metadata = {
            "task_names": self.task_names,
            "label_columns": self.label_columns,
            "pooling": self.pooling,
            "batch_statistics": uses_batch_statistics(self.get_base_model()),
        }
        atomic_write_text(os.path.join(save_directory, MULTITASK_CONFIG_NAME), json.dumps(metadata, indent=2))

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save the adapter bundle (``backbone.save_pretrained``) and the heads (``task_heads.safetensors``).

        The folder switches as a whole: bundle, heads and multi-task config are staged together and swapped in at
        once, so a crash never leaves the heads of one save beside the adapters of another.
        """
        from peft_palora.utils.atomic import atomic_directory, carry_into_staging

        with atomic_directory(os.fspath(save_directory)) as staging:
            carry_into_staging(os.fspath(save_directory), staging, "README.md")  # PEFT updates the card in place
            self.backbone.save_pretrained(staging, **kwargs)  # writes straight into the enclosing staging folder
            self._write_heads_and_config(staging)

    def _extra_trainable(self) -> dict[str, torch.Tensor]:
        """Trainable backbone tensors that the PEFT bundle does not hold (e.g. base weights unfrozen by hand)."""
        from peft.utils import get_peft_model_state_dict

        bundle = get_peft_model_state_dict(self.backbone, adapter_name=self.backbone.active_adapter)
        covered = {tensor.data_ptr() for tensor in bundle.values() if isinstance(tensor, torch.Tensor)}
        return {
            name: parameter.detach().cpu().contiguous()
            for name, parameter in self.backbone.named_parameters()
            if parameter.requires_grad and parameter.data_ptr() not in covered
        }

    def save_trainable(self, save_directory: str) -> list[str]:
        """What training changes and nothing else (a trainer checkpoint): :meth:`save_pretrained`'s bundle and heads,
        plus ``trainable_extra.safetensors`` for trainable tensors outside them. Returns the files written."""
        self.save_pretrained(save_directory)
        written = sorted(os.listdir(save_directory))
        extra = self._extra_trainable()
        path = os.path.join(save_directory, EXTRA_TRAINABLE_FILENAME)
        if extra:
            atomic_save_safetensors(extra, path, metadata={"format": "pt"})
            written.append(EXTRA_TRAINABLE_FILENAME)
        elif os.path.exists(path):
            os.remove(path)
        return written

    def load_trainable(self, save_directory: str) -> None:
        """Load a :meth:`save_trainable` folder into this model, in place (adapters, heads, extra tensors).

        Every file is read and checked before anything is copied: a folder that does not match leaves the model as
        it was, with a ValueError naming the file and the tensors.
        """
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        if not os.path.isdir(save_directory):
            raise FileNotFoundError(f"{save_directory!r} is not a folder.")
        adapter = self.backbone.active_adapter
        weights = load_peft_weights(save_directory, device="cpu")
        heads_state = _read_task_heads(self.heads, save_directory)
        extra_path = os.path.join(save_directory, EXTRA_TRAINABLE_FILENAME)
        extra = load_file(extra_path) if os.path.isfile(extra_path) else {}
        parameters = dict(self.backbone.named_parameters())
        wrong = sorted(k for k, v in extra.items() if k not in parameters or parameters[k].shape != v.shape)
        if wrong:
            raise ValueError(f"{extra_path} holds tensors this model lacks or shapes it differs in: {wrong[:5]}.")
        result = set_peft_model_state_dict(self.backbone, weights, adapter_name=adapter)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"the adapter bundle in {save_directory!r} holds unexpected tensors: {unexpected[:5]}.")
        self.heads.load_state_dict(heads_state, strict=True)
        with torch.no_grad():
            for name, value in extra.items():
                parameters[name].copy_(value)

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        pretrained_path: str,
        heads: Mapping[str, nn.Module] | None = None,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> MultiTaskModel:
        """Rebuild a saved model: the bundle is loaded onto ``base_model`` and the weights into ``heads``.

        ``heads`` defaults to linear heads shaped like the saved ones (what :func:`linear_heads` builds).
        ``label_columns`` and ``pooling`` default to the saved ones; a base model saved while its batch norms used
        batch statistics (:func:`use_batch_statistics`) is switched the same way. ``kwargs`` go to
        ``PeftModel.from_pretrained``.
        """
        from peft import PeftModel

        metadata_path = os.path.join(pretrained_path, MULTITASK_CONFIG_NAME)
        metadata: dict[str, Any] = {}
        if os.path.isfile(metadata_path):
            metadata = read_json(metadata_path, what="multi-task config")
        label_columns = kwargs.pop("label_columns", metadata.get("label_columns"))
        pooling = kwargs.pop("pooling", metadata.get("pooling", "auto"))
        if heads is None:
            heads = linear_heads_like_saved(pretrained_path)
        heads = heads if isinstance(heads, nn.ModuleDict) else nn.ModuleDict(dict(heads))
        load_task_heads(heads, pretrained_path)
        if metadata.get("batch_statistics"):
            use_batch_statistics(base_model)
        backbone = PeftModel.from_pretrained(base_model, pretrained_path, is_trainable=is_trainable, **kwargs)
        return cls(backbone, heads, label_columns=label_columns, pooling=pooling)


class MergedMultiTaskModel(nn.Module):
    """What :meth:`MultiTaskModel.merge_and_unload` returns: a plain backbone with the adapters merged at one
    preference, its pooling and the task heads. ``model(**inputs) -> {task: logits}``; nothing of PEFT or PaLoRA is
    needed to run it.

    Attributes:
        backbone: the merged transformers model.
        heads: the task heads.
        preference: the ``(T,)`` preference the adapters were merged at (for reference; it cannot change).
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: nn.ModuleDict,
        label_columns: Mapping[str, str] | None = None,
        pooling: str = "auto",
        preference: Any = None,
        task_names: Sequence[str] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.label_columns = dict(label_columns or {})
        self.pooling = pooling
        self.preference = preference
        self._task_names = list(task_names) if task_names is not None else list(heads.keys())

    @property
    def task_names(self) -> list[str]:
        return list(self._task_names)

    model_inputs = MultiTaskModel.model_inputs

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        """Every head on the pooled features of the merged backbone; label columns in ``batch`` are ignored."""
        if "preference" in batch:
            raise TypeError(
                "this model was merged at one preference and cannot take `preference=`; keep the MultiTaskModel "
                "(not merged) to change the trade-off per call."
            )
        inputs = self.model_inputs(batch)
        features = pool_features(self.backbone(**inputs), inputs, self.pooling)
        return {task: head(features) for task, head in self.heads.items()}


def _palora_config(backbone: nn.Module) -> Any:
    configs = getattr(backbone, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return None
    active = getattr(backbone, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else next(iter(configs.values()))
    return config if hasattr(config, "num_tasks") else None


def repeat_batch(inputs: Mapping[str, Any], repeats: int) -> tuple[dict[str, Any], int]:
    """Stack ``repeats`` copies of every batched tensor of ``inputs`` (copy-major: row ``k * B + b`` is sample ``b``).

    Returns the repeated inputs and the original batch size ``B``. Tensors whose first dimension is not ``B``
    (and non-tensors) pass through unchanged.
    """
    batch_size = batch_size_of(inputs)
    repeated = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            repeated[key] = value.repeat(repeats, *([1] * (value.dim() - 1)))
        else:
            repeated[key] = value
    return repeated, batch_size


def batch_size_of(inputs: Mapping[str, Any] | Sequence[Any]) -> int:
    """The leading dimension of the first tensor in ``inputs``."""
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the inputs hold no tensor with a batch dimension.")
