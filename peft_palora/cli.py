"""The `palora` command line: inspect a PaLoRA bundle, evaluate its Pareto front, export one point of it as a LoRA.

```
palora info ADAPTER_DIR [--base BASE] [--json]
palora front ADAPTER_DIR_OR_HUB_ID --out DIR [--base BASE] [--points 11]
             [--dataset multimnist | --data FILE --input_column COLUMN [--label_columns task=column,...]]
palora export-lora ADAPTER_DIR --out DIR [--preference 0.7,0.3] [--base BASE]
```

`palora front` expects a bundle saved by `MultiTaskModel.save_pretrained` (as `examples/train_mtl.py` writes it):
the adapter bundle, `task_heads.safetensors` and, for a backbone trained from scratch, its `base_model/` folder.

Errors in what the user gave (a missing or broken bundle, an unreadable `config.json`, a bad `--points`, a data file
without the named columns, ...) end the command with one line `palora: error: ...` on stderr and exit status 2, as
argparse does for bad arguments; `--traceback` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

CONFIG_NAME = "adapter_config.json"  # peft.utils.CONFIG_NAME, without importing peft for `--help`
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
DATA_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_MAX_MESSAGE = 800  # characters of an error message shown


class CLIError(Exception):
    """A problem with what the user gave: shown as one line, exit status 2."""


# Errors that come from the user's input (files, arguments, models that do not fit the bundle). Anything else is
# reported as an internal error (status 1), still on one line unless `--traceback` is given.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError, ValueError, TypeError, OSError, RecursionError, ImportError, KeyError, RuntimeError,
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError  # a damaged weights file (task heads, adapter)
    except ImportError:  # pragma: no cover - safetensors comes with peft
        return _USER_ERRORS
    return (*_USER_ERRORS, SafetensorError)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, RecursionError):
        text = f"the input is nested too deeply to read ({text})"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


# ---------------------------------------------------------------------------------------------------- reading inputs
def _bundle_dir(adapter: str, revision: str | None = None) -> str:
    """A local folder holding the bundle: `adapter` itself, or a snapshot of the Hub repo `adapter`."""
    if os.path.isdir(adapter):
        return adapter
    if os.path.exists(adapter):
        raise CLIError(f"{adapter!r} is a file, not a bundle folder.")
    if adapter.startswith((".", "~", os.sep)) or adapter.count("/") > 1 or (os.altsep and os.altsep in adapter):
        raise CLIError(f"{adapter!r} is not a folder (and not a Hub repo id, which reads 'namespace/name').")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(adapter, revision=revision)
    except Exception as error:  # not a folder and not reachable on the Hub (offline, typo, private)
        raise CLIError(f"{adapter!r} is neither a folder nor a reachable Hub repo ({_one_line(error)})") from error


def _read_config(bundle: str) -> dict[str, Any]:
    from peft_palora.tuner.bundle import check_local_bundle

    config = check_local_bundle(bundle)
    if config is None:
        raise CLIError(f"{os.path.join(bundle, CONFIG_NAME)} is missing or not a PaLoRA config.")
    return config


def _check_model_source(source: str, option: str = "--base") -> None:
    """Read `<source>/config.json` of a local model folder first, so that a broken one gets a clear message."""
    if not os.path.isdir(source):
        if os.path.exists(source):
            raise CLIError(f"{option} {source!r} is a file; give a model folder or a Hub id.")
        return  # a Hub id: transformers resolves it (offline: from the local cache only)
    path = os.path.join(source, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise CLIError(f"{option} {source!r} has no config.json.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CLIError(f"{option} {source!r}: {path} is not readable JSON ({_one_line(error)}).") from None
    if not isinstance(config, dict):
        raise CLIError(f"{option} {source!r}: {path} must hold a JSON object, got {type(config).__name__}.")


@contextlib.contextmanager
def _quiet_transformers(progress: bool = False) -> Iterator[None]:
    """Silence transformers' warnings (its load report) and weight-loading bar; restore both afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_disabled:
            hf_logging.enable_progress_bar()


def _auto_model_class(task_type: str | None) -> Any:
    import transformers

    names = {
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
    }
    return getattr(transformers, names.get(task_type or "", "AutoModel"))


# ---------------------------------------------------------------------------------------------------- palora info
def bundle_summary(bundle: str, base: str | None = None) -> dict[str, Any]:
    """Tasks, rank, targets, parameter counts (and overhead against the base model when it can be found).

    The base model is built on the meta device from its config (no weights are read or allocated), so measuring
    the overhead against a model of any size is instant. A `base` given explicitly must be readable; a base found
    otherwise (the bundle's `base_model/` folder or `base_model_name_or_path`) is skipped when it cannot be.
    """
    from safetensors import SafetensorError, safe_open

    config = _read_config(bundle)
    weights = os.path.join(bundle, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CLIError(f"{weights} is missing: the bundle has no adapter weights.")
    adapter_params, base_weight_params, tensors = 0, 0, 0
    layers = set()
    try:
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():
                numel = 1
                for size in handle.get_slice(key).get_shape():
                    numel *= size
                tensors += 1
                if ".palora_" in key:
                    adapter_params += numel
                    layers.add(key.split(".palora_")[0])
                else:
                    base_weight_params += numel
    except SafetensorError as error:
        raise CLIError(f"{weights} is not a readable safetensors file ({_one_line(error)}).") from None
    summary = {
        "bundle": os.path.abspath(bundle),
        "task_names": config.get("task_names") or [f"task_{t}" for t in range(config["num_tasks"])],
        "num_tasks": config["num_tasks"],
        "r": config["r"],
        "palora_alpha": config["palora_alpha"],
        "target_modules": config.get("target_modules"),
        "adapted_layers": len(layers),
        "train_base_weights": config.get("train_base_weights", False),
        "adapter_parameters": adapter_params,
        "stored_base_parameters": base_weight_params,
        "tensors": tensors,
        "bundle_bytes": os.path.getsize(weights),
        "base_model": base or _bundled_base(bundle) or config.get("base_model_name_or_path") or None,
    }
    base_params = _count_base_parameters(summary["base_model"], config.get("task_type"), explicit=base is not None)
    if base_params:
        summary["base_parameters"] = base_params
        summary["overhead_percent"] = 100.0 * adapter_params / base_params
    return summary


def _bundled_base(bundle: str) -> str | None:
    """The `base_model/` folder that `examples/train_mtl.py` saves next to a bundle trained from scratch."""
    path = os.path.join(bundle, "base_model")
    return path if os.path.isdir(path) else None


def _count_base_parameters(base: str | None, task_type: str | None = None, explicit: bool = False) -> int | None:
    """Parameters of the base model, built from its config on the meta device: nothing is read or allocated."""
    if not base:
        return None
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        _check_model_source(base)
    except CLIError:
        if explicit:
            raise
        return None
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(base)
            with torch.device("meta"):
                try:
                    model = _auto_model_class(task_type).from_config(config)
                except ValueError:  # the task's auto class does not know this architecture: count the backbone
                    model = AutoModel.from_config(config)
    except _USER_ERRORS as error:
        if explicit:
            raise CLIError(f"--base {base!r}: cannot build the model from its config ({_one_line(error)})") from None
        return None
    return sum(p.numel() for p in model.parameters())


def _format_info(summary: dict[str, Any]) -> str:
    lines = [
        f"PaLoRA bundle {summary['bundle']}",
        f"  tasks ({summary['num_tasks']}): {', '.join(summary['task_names'])}",
        f"  rank per task r={summary['r']}, palora_alpha={summary['palora_alpha']} "
        f"(scale {summary['palora_alpha'] / summary['r']:g})",
        f"  target modules: {summary['target_modules']} ({summary['adapted_layers']} layers adapted)",
        f"  adapter parameters: {summary['adapter_parameters']:,}",
        f"  base weights stored in the bundle: {summary['stored_base_parameters']:,}"
        f" (train_base_weights={summary['train_base_weights']})",
        f"  adapter_model.safetensors: {summary['bundle_bytes'] / 2**20:.2f} MiB",
        f"  base model: {summary['base_model'] or 'unknown (pass --base)'}",
    ]
    if "base_parameters" in summary:
        lines.append(
            f"  overhead: {summary['adapter_parameters']:,} / {summary['base_parameters']:,} base parameters = "
            f"{summary['overhead_percent']:.2f}%"
        )
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    summary = bundle_summary(_bundle_dir(args.adapter, args.revision), args.base)
    print(json.dumps(summary, indent=2) if args.json else _format_info(summary))
    return 0


# ---------------------------------------------------------------------------------------------------- palora front
def _load_base(bundle: str, base: str | None, batch_statistics: bool = False) -> tuple[Any, Any]:
    """The base model (and tokenizer, for text models): `--base`, else `<bundle>/base_model`, else the config's.

    transformers' load report is not printed: for a backbone saved while its batch norms used batch statistics it
    calls their (deliberately absent) running statistics "MISSING / newly initialized", which is wrong. Any other
    missing, unexpected or mismatched weight is reported as a warning of ours.
    """
    from transformers import AutoModel, AutoTokenizer

    source = base or _bundled_base(bundle) or _read_config(bundle).get("base_model_name_or_path")
    if not source:
        raise CLIError("the bundle names no base model and has no base_model/ folder; pass --base.")
    _check_model_source(source)
    with _quiet_transformers():
        try:
            model, info = AutoModel.from_pretrained(source, output_loading_info=True)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot load the base model {source!r} ({_one_line(error)})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError, KeyError):
            tokenizer = None
    problems = []
    missing = [key for key in info.get("missing_keys") or [] if not (batch_statistics and _is_norm_statistic(key))]
    for label, keys in (("missing (randomly initialised)", missing), ("unused", info.get("unexpected_keys") or [])):
        if keys:
            problems.append(f"{len(keys)} {label}: {', '.join(sorted(map(str, keys))[:5])}{' ...' * (len(keys) > 5)}")
    if info.get("mismatched_keys"):
        problems.append(f"{len(info['mismatched_keys'])} with mismatched shapes")
    if problems:
        print(f"palora: warning: base model {source}: weights " + "; ".join(problems), file=sys.stderr)
    return model, tokenizer


def _is_norm_statistic(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def _parse_label_columns(text: str | None, task_names: Sequence[str]) -> dict[str, str] | None:
    """`--label_columns task=column,...` (or `column,...` in task order) -> {task: column}."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise CLIError(f"--label_columns {text!r} has an empty entry; use task=column,task=column.")
    mapping: dict[str, str] = {}
    if all("=" in item for item in items):
        for item in items:
            task, _, column = (part.strip() for part in item.partition("="))
            if task not in task_names:
                raise CLIError(f"--label_columns names task {task!r}; the bundle's tasks are {list(task_names)}.")
            if not column or task in mapping:
                raise CLIError(f"--label_columns: {'empty column' if not column else 'task given twice'} in {item!r}.")
            mapping[task] = column
    elif not any("=" in item for item in items) and len(items) == len(task_names):
        mapping = dict(zip(task_names, items))
    else:
        raise CLIError(
            f"--label_columns {text!r}: give task=column for every task ({', '.join(task_names)}), or one column per "
            "task in that order."
        )
    missing = [task for task in task_names if task not in mapping]
    if missing:
        raise CLIError(f"--label_columns gives no column for the tasks {missing}.")
    return mapping


def load_front_data(
    data_file: str,
    model: Any,
    tokenizer: Any,
    input_column: str | None = None,
    label_columns: Mapping[str, str] | None = None,
    data_format: str | None = None,
    max_samples: int | None = None,
    max_length: int = 128,
    image_size: int | None = None,
) -> tuple[Any, Any]:
    """`(dataset, collate_fn)` for evaluating `model` (a `MultiTaskModel`) on a local csv/json/jsonl/parquet file.

    The file is read with `datasets.load_dataset(<builder>, data_files=...)` (offline). `input_column` holds the
    model input: text for a model with a tokenizer (tokenized with truncation to `max_length`), otherwise images
    (an `Image` feature, or paths relative to the file) resized to the model's size, or numeric arrays used as
    `pixel_values` as they are. `label_columns` maps every task to the column of its integer class labels
    (default: the bundle's own label columns, else columns named like the tasks). The returned dataset holds the
    model inputs and one `labels_<task>` column per task, and `model.label_columns` is pointed at them.
    """
    import datasets
    import numpy as np

    task_names = model.task_names
    if not os.path.isfile(data_file):
        raise CLIError(f"--data {data_file!r} is not a file.")
    extension = os.path.splitext(data_file)[1].lower()
    builder = data_format or DATA_BUILDERS.get(extension)
    if builder not in set(DATA_BUILDERS.values()):
        raise CLIError(
            f"--data {data_file!r}: cannot tell the format from {extension or 'no extension'!r}; pass --data_format "
            f"({', '.join(sorted(set(DATA_BUILDERS.values())))})."
        )
    options = {"delimiter": "\t"} if builder == "csv" and extension == ".tsv" else {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        data = datasets.load_dataset(builder, data_files={"eval": data_file}, split="eval", **options)
    except Exception as error:  # datasets raises many kinds (DatasetGenerationError, ArrowInvalid, ...)
        raise CLIError(f"--data {data_file!r} could not be read as {builder} ({_one_line(error)})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    columns = list(data.column_names)
    if label_columns is None:
        saved = {task: column for task, column in (model.label_columns or {}).items() if column in columns}
        label_columns = saved if len(saved) == len(task_names) else {t: t for t in task_names if t in columns}
        if len(label_columns) != len(task_names):
            raise CLIError(
                f"--data {data_file!r}: say which columns hold the labels, e.g. --label_columns "
                f"{','.join(f'{task}=COLUMN' for task in task_names)} (columns: {columns})."
            )
    for column in label_columns.values():
        if column not in columns:
            raise CLIError(f"--label_columns: {data_file!r} has no column {column!r}; its columns are {columns}.")
    if input_column is None:
        candidates = [c for c in columns if c not in label_columns.values()]
        if len(candidates) != 1:
            raise CLIError(f"--data {data_file!r}: pass --input_column, one of {candidates}.")
        input_column = candidates[0]
    if input_column not in columns:
        raise CLIError(f"--input_column: {data_file!r} has no column {input_column!r}; its columns are {columns}.")
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    if len(data) == 0:
        raise CLIError(f"--data {data_file!r} holds no rows.")

    num_classes = {task: head_classes for task, head_classes in _head_classes(model).items()}
    labels = {}
    for task, column in label_columns.items():
        values = list(data[column])
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise CLIError(f"--label_columns {task}={column}: labels must be integer class ids, got e.g. {values[0]!r}.")
        bad = [v for v in values if not 0 <= v < num_classes.get(task, float("inf"))]
        if bad:
            raise CLIError(
                f"--label_columns {task}={column}: label {bad[0]} is outside 0..{num_classes[task] - 1} (the head's "
                "classes)."
            )
        labels[f"labels_{task}"] = [int(v) for v in values]

    collate_fn = None
    if tokenizer is not None:
        texts = list(data[input_column])
        if not all(isinstance(text, str) for text in texts):
            raise CLIError(f"--input_column {input_column!r}: a text model needs strings in that column.")
        from transformers import DataCollatorWithPadding

        encoded = dict(tokenizer(texts, truncation=True, max_length=max_length))
        collate_fn = DataCollatorWithPadding(tokenizer)
    else:
        encoded = {"pixel_values": _pixel_values(data, input_column, model, data_file, image_size)}
    dataset = datasets.Dataset.from_dict({**encoded, **labels}).with_format("torch")
    model.label_columns = {task: f"labels_{task}" for task in task_names}
    return dataset, collate_fn


def _head_classes(model: Any) -> dict[str, int]:
    classes = {}
    for task, head in model.heads.items():
        out = getattr(head, "out_features", None)
        if out is None:
            linears = [m for m in head.modules() if hasattr(m, "out_features")]
            out = linears[-1].out_features if linears else None
        if out is not None:
            classes[task] = int(out)
    return classes


def _pixel_values(data: Any, column: str, model: Any, data_file: str, image_size: int | None) -> list:
    """Images (PIL, or paths relative to the data file) resized for the model, or numeric arrays as they are."""
    import numpy as np

    config = model.get_base_model().config
    channels = int(getattr(config, "num_channels", 1) or 1)
    size = image_size or getattr(config, "image_size", None) or 28
    size = size if isinstance(size, int) else int(size[0]) if isinstance(size, (list, tuple)) else 28
    arrays = []
    for index, value in enumerate(list(data[column])):
        if isinstance(value, str):
            from PIL import Image

            path = value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(data_file)), value)
            try:
                with Image.open(path) as image:
                    value = image.copy()
            except OSError as error:
                raise CLIError(f"--input_column {column!r}, row {index}: cannot open image {value!r} ({error}).") from None
        if hasattr(value, "convert") and hasattr(value, "resize"):  # a PIL image
            pixels = np.asarray(value.convert("L" if channels == 1 else "RGB").resize((size, size)), np.float32) / 255
            arrays.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            continue
        try:
            pixels = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise CLIError(
                f"--input_column {column!r}, row {index}: expected an image, an image path or a numeric array."
            ) from None
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.ndim != 3 or not np.isfinite(pixels).all():
            raise CLIError(
                f"--input_column {column!r}, row {index}: arrays must be finite (H, W) or (C, H, W), got shape "
                f"{pixels.shape}."
            )
        arrays.append(pixels)
    return arrays


class _Progress:
    """Iterates a loader and advances a shared progress bar by one batch per step."""

    def __init__(self, loader: Any, bar: Any):
        self.loader, self.bar = loader, bar

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.bar.update(1)

    def __len__(self) -> int:
        return len(self.loader)


def run_front(
    bundle: str,
    out: str,
    base: str | None = None,
    dataset: str = "multimnist",
    points: int = 11,
    max_samples: int | None = None,
    batch_size: int = 1000,
    data_seed: int = 0,
    data_file: str | None = None,
    input_column: str | None = None,
    label_columns: str | Mapping[str, str] | None = None,
    data_format: str | None = None,
    max_length: int = 128,
    image_size: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate a saved multi-task bundle at every point of `simplex_grid(T, points)`; write table, report, plots.

    The data is `dataset` (a recipe of `recipes.load_multitask_data`), or the user's own file
    `data_file` (see :func:`load_front_data`). A progress bar over preferences x batches goes to stderr unless
    `quiet`.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from peft_palora.fronts.evaluation import evaluate_front, evaluate_multitask, write_front_report
    from peft_palora.fronts.plotting import plot_metrics_vs_preference
    from peft_palora.preferences import simplex_grid
    from peft_palora.training.multitask import MultiTaskModel
    from peft_palora.utils.atomic import atomic_write_text

    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise CLIError(f"--points must be an integer >= 2 (points per simplex side), got {points!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CLIError(f"--batch_size must be a positive integer, got {batch_size!r}.")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise CLIError(f"--max_samples must be a positive integer, got {max_samples!r}.")
    metadata = _read_multitask_metadata(bundle)
    base_model, tokenizer = _load_base(bundle, base, batch_statistics=bool(metadata.get("batch_statistics")))
    with _quiet_transformers():
        model = MultiTaskModel.from_pretrained(base_model, bundle).eval()
    if data_file is not None:
        mapping = label_columns if isinstance(label_columns, Mapping) or label_columns is None else (
            _parse_label_columns(label_columns, model.task_names)
        )
        eval_data, collate_fn = load_front_data(
            data_file, model, tokenizer, input_column=input_column, label_columns=mapping, data_format=data_format,
            max_samples=max_samples, max_length=max_length, image_size=image_size,
        )
    else:
        from recipes import load_multitask_data  # TODO(cli): no recipes in the wheel

        data = load_multitask_data(
            dataset, tokenizer=tokenizer, max_eval_samples=max_samples, max_train_samples=1, seed=data_seed
        )
        if list(data.task_names) != model.task_names:
            raise CLIError(f"--dataset {dataset!r} has tasks {data.task_names}, the bundle {model.task_names}.")
        eval_data, collate_fn = data.eval, data.collate_fn
    loader = DataLoader(eval_data, batch_size=batch_size, collate_fn=collate_fn)
    grid = simplex_grid(model.num_tasks, points)
    with tqdm(
        total=len(grid) * len(loader), desc=f"front ({len(grid)} preferences)", unit="batch", file=sys.stderr,
        disable=quiet, leave=False,
    ) as bar:
        progress = _Progress(loader, bar)
        with torch.no_grad():
            table = evaluate_front(
                model, grid, lambda m: evaluate_multitask(m, progress), task_names=model.task_names
            )
    os.makedirs(out, exist_ok=True)
    table_path = os.path.join(out, "front.csv")
    atomic_write_text(table_path, table.to_csv(index=False))
    report = write_front_report(table, out, model.task_names, metric="accuracy")
    plots = [report["plot"]] if report.get("plot") else []
    metrics = {task: [f"{task}_accuracy"] for task in model.task_names}
    plots.append(plot_metrics_vs_preference(table, path=os.path.join(out, "accuracy_vs_preference.png"), metrics=metrics))
    return {**report, "metric": "accuracy", "table": table_path, "plots": plots}


def _read_multitask_metadata(bundle: str) -> dict[str, Any]:
    path = os.path.join(bundle, "multitask_config.json")
    if not os.path.isfile(os.path.join(bundle, "task_heads.safetensors")):
        raise CLIError(f"{bundle} has no task_heads.safetensors: `palora front` needs a MultiTaskModel bundle.")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CLIError(f"{path} is not readable JSON ({_one_line(error)}).") from None
    if not isinstance(metadata, dict):
        raise CLIError(f"{path} must hold a JSON object.")
    return metadata


def cmd_front(args: argparse.Namespace) -> int:
    if args.data is None and (args.input_column or args.label_columns or args.data_format):
        raise CLIError("--input_column, --label_columns and --data_format apply to --data FILE only.")
    report = run_front(
        bundle=_bundle_dir(args.adapter, args.revision),
        base=args.base,
        dataset=args.dataset,
        points=args.points,
        out=args.out,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        data_seed=args.data_seed,
        data_file=args.data,
        input_column=args.input_column,
        label_columns=args.label_columns,
        data_format=args.data_format,
        max_length=args.max_length,
        image_size=args.image_size,
        quiet=args.quiet,
    )
    print(f"hypervolume ({report['metric']}, reference {report['reference']}): {report['hypervolume']:.4f}")
    print(f"table: {report['table']}")
    print(f"report: {report['json']}")
    for plot in report["plots"]:
        print(f"plot: {plot}")
    return 0


# ---------------------------------------------------------------------------------------------------- export-lora
def _parse_preference(text: str | None) -> list[float] | None:
    """`--preference 0.7,0.3` -> [0.7, 0.3]; the simplex check itself is the library's."""
    if text is None:
        return None
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        raise CLIError(f"--preference {text!r} must be comma-separated numbers, e.g. 0.7,0.3.") from None
    return values


def cmd_export_lora(args: argparse.Namespace) -> int:
    bundle = _bundle_dir(args.adapter, args.revision)
    _read_config(bundle)
    preference = _parse_preference(args.preference)
    if args.base is not None:
        _check_model_source(args.base)
    if os.path.isfile(args.out):
        raise CLIError(f"--out {args.out!r} is a file; give a folder.")
    from peft_palora.interop.lora import export_lora_from_bundle

    with _quiet_transformers():
        path = export_lora_from_bundle(bundle, args.out, preference=preference, base=args.base)
    print(f"LoRA bundle: {path}")
    return 0


# ---------------------------------------------------------------------------------------------------- the parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _grid_points(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 points per simplex side, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palora", description="Inspect PaLoRA bundles, evaluate their fronts, export a point as a LoRA."
    )
    parser.add_argument("--traceback", action="store_true", help="on an error, show the Python traceback")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="tasks, rank, targets and parameter overhead of a bundle")
    info.add_argument("adapter", help="a bundle folder or a Hub repo id")
    info.add_argument("--base", help="base model (folder or Hub id) to measure the overhead against")
    info.add_argument("--revision", help="Hub revision of the bundle")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    front = commands.add_parser("front", help="evaluate a bundle over a preference grid: table, hypervolume, plots")
    front.add_argument("adapter", help="a bundle folder (with task_heads.safetensors) or a Hub repo id")
    front.add_argument("--base", help="base model folder or Hub id; default: the bundle's base_model/ or config")
    front.add_argument("--dataset", default="multimnist", help="multimnist, gss_wages, or a hub image dataset id")
    front.add_argument("--points", type=_grid_points, default=11, help="grid points per simplex side (11: steps of 0.1)")
    front.add_argument("--out", required=True, help="output folder for front.json, front.csv and the plots")
    front.add_argument("--max_samples", type=_positive_int, default=None, help="evaluate on the first N samples")
    front.add_argument("--batch_size", type=_positive_int, default=1000,
                       help="evaluation batch (batch-norm models that use batch statistics depend on it)")
    front.add_argument("--data_seed", type=int, default=0, help="seed that built the dataset (as in train_mtl.py)")
    front.add_argument("--revision", help="Hub revision of the bundle")
    front.add_argument("--quiet", action="store_true", help="no progress bar")
    own = front.add_argument_group("your own data (instead of --dataset)")
    own.add_argument("--data", metavar="FILE", help="a local .csv, .tsv, .json, .jsonl or .parquet file to evaluate on")
    own.add_argument("--data_format", choices=sorted(set(DATA_BUILDERS.values())),
                     help="the file's format when its extension does not tell")
    own.add_argument("--input_column", help="the column of model inputs: text, images (or image paths), or arrays")
    own.add_argument("--label_columns", metavar="TASK=COLUMN,...",
                     help="the integer class labels of each task, e.g. left=digit_left,right=digit_right")
    own.add_argument("--max_length", type=_positive_int, default=128, help="token limit for text inputs")
    own.add_argument("--image_size", type=_positive_int, default=None,
                     help="side images are resized to (default: the model config's image_size, else 28)")
    front.set_defaults(func=cmd_front)

    export = commands.add_parser("export-lora", help="write one point of the front as a standard PEFT LoRA bundle")
    export.add_argument("adapter", help="a PaLoRA bundle folder or a Hub repo id")
    export.add_argument("--preference", help="comma-separated weights summing to 1, in task order (default: uniform)")
    export.add_argument("--out", required=True, help="folder for the LoRA bundle")
    export.add_argument("--base", help="base model folder; default: the bundle's base_model/ or config")
    export.add_argument("--revision", help="Hub revision of the bundle")
    export.set_defaults(func=cmd_export_lora)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("palora: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback:
            raise
        if isinstance(error, _user_error_types()):
            print(f"palora: error: {_one_line(error)}", file=sys.stderr)
            return 2
        print(
            f"palora: error: internal error {type(error).__name__}: {_one_line(error)} "
            "(run again with --traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
