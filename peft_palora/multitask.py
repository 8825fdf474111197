"""A multi-task model: a PaLoRA backbone shared by all tasks plus one small head per task.

PEFT wraps the backbone; the task heads are ordinary modules outside it (PEFT's bundle knows nothing of them), so
:class:`MultiTaskModel` saves them next to the adapter bundle in ``task_heads.safetensors`` and loads them back.
The preference reaches only the backbone: it mixes the task adapters, and every head reads the features of that
mixture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ._atomic import atomic_save_safetensors, atomic_write_text

TASK_HEADS_FILENAME = "task_heads.safetensors"
POOLING_CHOICES = ("auto", "pooler", "cls", "mean")


def linear_heads(in_features: int, num_classes: Mapping[str, int]) -> nn.ModuleDict:
    """One ``nn.Linear(in_features, num_classes[task])`` per task, in the order of ``num_classes``."""
    if not num_classes:
        raise ValueError("`num_classes` must name at least one task.")
    for task, classes in num_classes.items():
        if not isinstance(classes, int) or classes < 1:
            raise ValueError(f"`num_classes[{task!r}]` must be a positive int, got {classes!r}.")
    return nn.ModuleDict({task: nn.Linear(in_features, classes) for task, classes in num_classes.items()})


def linear_heads_like_saved(save_directory: str) -> nn.ModuleDict:
    """Linear heads with the shapes stored in ``save_directory/task_heads.safetensors`` (weights not loaded)."""
    from safetensors import safe_open

    path = os.path.join(save_directory, TASK_HEADS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {TASK_HEADS_FILENAME} in {save_directory!r}; was it saved by MultiTaskModel?")
    with safe_open(path, framework="pt") as handle:
        task_names = json.loads((handle.metadata() or {}).get("task_names", "[]"))
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    heads = {}
    for task in task_names:
        weight = shapes.get(f"{task}.weight")
        if weight is None or len(weight) != 2 or set(shapes) - {f"{t}.{p}" for t in task_names for p in ("weight", "bias")}:
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
    path = os.path.join(save_directory, TASK_HEADS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {TASK_HEADS_FILENAME} in {save_directory!r}; was it saved by MultiTaskModel?")
    state = load_file(path)
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the heads: missing {missing}, unexpected {unexpected}.")
    for key, value in sorted(state.items()):
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: `{key}` has shape {tuple(value.shape)}, the head {tuple(expected[key].shape)}.")
    heads.load_state_dict(state, strict=True)
    return heads


class MultiTaskModel(nn.Module):
    """A PaLoRA ``PeftModel`` backbone and one head per task: ``model(**inputs, preference=p) -> {task: logits}``.

    Args:
        backbone: the PEFT model (``get_peft_model(base, PaLoRAConfig(...))``) whose output carries the features.
        heads: ``{task_name: module}`` mapping features ``(batch, hidden)`` to that task's logits. Their order is the
            task order of the preferences; when the PaLoRA config has ``task_names`` they must be the same.
        label_columns: ``{task_name: column}`` naming each task's labels in a batch. Those columns are dropped from the
            inputs before the backbone sees them, so a whole batch can be passed to ``forward``.
        pooling: how features are read from the backbone's output: ``"pooler"`` (``pooler_output``, flattened, as for
            ViT or ResNet), ``"cls"`` (first token of ``last_hidden_state``), ``"mean"`` (mean of
            ``last_hidden_state`` over the ``attention_mask``, as sentence encoders such as MiniLM are trained), or
            ``"auto"`` (``pooler_output`` when the model has one, else ``"cls"``).
    """

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
        self.pooling = pooling

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

    def get_base_model(self) -> nn.Module:
        """The transformers model under the PEFT wrapper (what the adapter bundle was made for)."""
        return self.backbone.get_base_model()

    def set_preference(self, preference: Any) -> None:
        """Set the backbone's preference (see ``PaLoRAModel.set_preference``)."""
        self.backbone.set_preference(preference)

    def get_preference(self) -> torch.Tensor:
        return self.backbone.get_preference()

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

    def features(self, outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Pool the backbone's output into ``(batch, hidden)`` features."""
        pooler = getattr(outputs, "pooler_output", None)
        if self.pooling == "pooler" or (self.pooling == "auto" and pooler is not None):
            if pooler is None:
                raise ValueError('pooling="pooler" but the backbone returned no `pooler_output`.')
            return pooler.flatten(1)
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            raise ValueError(f"pooling={self.pooling!r} needs `last_hidden_state` in the backbone's output.")
        if self.pooling == "mean":
            mask = inputs.get("attention_mask")
            if mask is None:
                return hidden.mean(dim=1)
            mask = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return hidden[:, 0]

    def forward(self, preference: Any = None, **batch: Any) -> dict[str, torch.Tensor]:
        """Run the backbone at ``preference`` (``(T,)``, ``(batch, T)`` or ``None`` for the one in force) and every
        head on its features; label columns in ``batch`` are ignored."""
        inputs = self.model_inputs(batch)
        outputs = self.backbone(**inputs) if preference is None else self.backbone(**inputs, preference=preference)
        features = self.features(outputs, inputs)
        return {task: head(features) for task, head in self.heads.items()}

    # ---- saving and loading -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save the adapter bundle (``backbone.save_pretrained``) and the heads (``task_heads.safetensors``)."""
        os.makedirs(save_directory, exist_ok=True)
        self.backbone.save_pretrained(save_directory, **kwargs)
        save_task_heads(self.heads, save_directory)
        metadata = {
            "task_names": self.task_names,
            "label_columns": self.label_columns,
            "pooling": self.pooling,
            "batch_statistics": uses_batch_statistics(self.get_base_model()),
        }
        atomic_write_text(os.path.join(save_directory, "multitask_config.json"), json.dumps(metadata, indent=2))

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

        import peft_palora  # noqa: F401  (registers the PALORA type)

        metadata_path = os.path.join(pretrained_path, "multitask_config.json")
        metadata: dict[str, Any] = {}
        if os.path.isfile(metadata_path):
            with open(metadata_path, encoding="utf-8") as handle:
                metadata = json.load(handle)
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
