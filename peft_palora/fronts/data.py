"""A local data file (csv, tsv, json, jsonl, parquet) as the evaluation set of a multi-task model.

:func:`load_front_data` turns the user's file into batches a ``MultiTaskModel`` evaluates on: the model inputs
(tokenized text, or ``pixel_values`` from images, image paths or numeric arrays) and one ``labels_<task>`` column of
integer class ids per task. The model is read only through the attributes it is duck-typed by (``task_names``,
``heads``, ``label_columns``, ``get_base_model().config``), so this layer needs nothing from the training layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

DATA_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class FrontData(NamedTuple):
    """What :func:`load_front_data` returns.

    Attributes:
        dataset: a ``datasets.Dataset`` formatted as torch: the model inputs and one ``labels_<task>`` column per task.
        collate_fn: the ``DataLoader`` collate function (padding, for text; ``None``: torch's default).
        label_columns: ``{task: "labels_<task>"}``, to give the model as its ``label_columns``.
    """

    dataset: Any
    collate_fn: Callable | None
    label_columns: dict[str, str]


def read_data_file(data_file: str, data_format: str | None = None) -> Any:
    """``data_file`` as a ``datasets.Dataset``, read with ``datasets.load_dataset(<format>, data_files=...)``.

    The format is ``data_format`` (``csv``, ``json`` or ``parquet``), else told by the extension (``.tsv`` is csv
    with tabs, ``.jsonl`` is json). Nothing is downloaded.
    """
    import datasets

    if not isinstance(data_file, (str, os.PathLike)) or not os.path.isfile(data_file):
        raise ValueError(f"`data_file` {data_file!r} is not a file.")
    extension = os.path.splitext(data_file)[1].lower()
    builder = data_format or DATA_FORMATS.get(extension)
    formats = sorted(set(DATA_FORMATS.values()))
    if builder not in formats:
        raise ValueError(
            f"`data_file` {data_file!r}: cannot tell the format from {extension or 'no extension'!r}; pass "
            f"`data_format` (one of {', '.join(formats)})."
        )
    options = {"delimiter": "\t"} if builder == "csv" and extension == ".tsv" else {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files={"eval": str(data_file)}, split="eval", **options)
    except Exception as error:  # datasets raises many kinds (DatasetGenerationError, ArrowInvalid, ...)
        message = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"`data_file` {data_file!r} could not be read as {builder} ({message[:400]})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()


def parse_label_columns(text: str) -> dict[str, str] | list[str]:
    """Label columns typed as text: ``"left=digit_l,right=digit_r"`` (by task) or ``"digit_l,digit_r"`` (task order).

    Only the syntax is checked here; :func:`load_front_data` checks the tasks and the columns.
    """
    pairs = [tuple(part.strip() for part in item.partition("=")) for item in text.split(",")]
    if not all(task and (column or not separator) for task, separator, column in pairs):
        raise ValueError(f"`label_columns` {text!r} has an empty entry; use task=column,task=column.")
    if not any(separator for _, separator, _ in pairs):
        return [column for column, _, _ in pairs]
    if not all(separator for _, separator, _ in pairs):
        raise ValueError(f"`label_columns` {text!r} mixes task=column entries with bare columns.")
    mapping = {task: column for task, _, column in pairs}
    if len(mapping) != len(pairs):
        raise ValueError(f"`label_columns` {text!r} names a task twice.")
    return mapping


def _label_columns(
    label_columns: str | Mapping[str, str] | Sequence[str] | None, task_names: list[str], saved: Mapping[str, str],
    columns: list[str], data_file: str,
) -> dict[str, str]:
    """``{task: column}`` from the argument, else the model's own label columns, else columns named like the tasks."""
    if isinstance(label_columns, str):
        label_columns = parse_label_columns(label_columns)
    if label_columns is None:
        found = {task: column for task, column in saved.items() if column in columns}
        mapping = found if len(found) == len(task_names) else {t: t for t in task_names if t in columns}
        if len(mapping) != len(task_names):
            raise ValueError(
                f"`data_file` {data_file!r}: say which columns hold the labels with `label_columns` (e.g. "
                f"{','.join(f'{task}=COLUMN' for task in task_names)}); its columns are {columns}."
            )
        return mapping
    if isinstance(label_columns, Mapping):
        unknown = [task for task in label_columns if task not in task_names]
        if unknown:
            raise ValueError(f"`label_columns` names task {unknown[0]!r}; the model's tasks are {task_names}.")
        mapping = dict(label_columns)
    elif isinstance(label_columns, Sequence):
        if len(label_columns) != len(task_names):
            raise ValueError(
                f"`label_columns` gives {len(label_columns)} columns for the tasks {task_names}: one per task, in "
                "that order, or a {task: column} mapping."
            )
        mapping = dict(zip(task_names, label_columns))
    else:
        raise TypeError(f"`label_columns` must map tasks to columns or list them in task order, got {label_columns!r}.")
    missing = [task for task in task_names if task not in mapping]
    if missing:
        raise ValueError(f"`label_columns` gives no column for the tasks {missing}.")
    for column in mapping.values():
        if column not in columns:
            raise ValueError(f"`label_columns`: {data_file!r} has no column {column!r}; its columns are {columns}.")
    return mapping


def _head_classes(model: Any) -> dict[str, int]:
    """``{task: classes}`` read off each head's last layer with ``out_features``."""
    classes = {}
    for task, head in (getattr(model, "heads", None) or {}).items():
        linears = [m for m in head.modules() if isinstance(getattr(m, "out_features", None), int)]
        if linears:
            classes[task] = linears[-1].out_features
    return classes


def _class_ids(values: list, task: str, column: str, classes: int | None) -> list[int]:
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        bad = next(v for v in values if not isinstance(v, (int, np.integer)) or isinstance(v, bool))
        raise ValueError(f"`label_columns` {task}={column}: labels must be integer class ids, got e.g. {bad!r}.")
    outside = [v for v in values if v < 0 or (classes is not None and v >= classes)]
    if outside:
        limit = f"0..{classes - 1} (the head's classes)" if classes is not None else "the class ids (negative)"
        raise ValueError(f"`label_columns` {task}={column}: label {outside[0]} is outside {limit}.")
    return [int(v) for v in values]


def _image(value: Any, column: str, index: int, data_file: str, channels: int, size: int) -> np.ndarray:
    """An image or image path (relative to the data file) as float32 ``(C, size, size)`` in [0, 1]."""
    from PIL import Image

    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(data_file)), value)
        try:
            with Image.open(path) as image:
                value = image.copy()
        except OSError as error:
            raise ValueError(f"`input_column` {column!r}, row {index}: cannot open image {value!r} ({error}).") from None
    pixels = np.asarray(value.convert("L" if channels == 1 else "RGB").resize((size, size)), np.float32) / 255
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _array(value: Any, column: str, index: int) -> np.ndarray:
    try:
        pixels = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(
            f"`input_column` {column!r}, row {index}: expected an image, an image path or a numeric array."
        ) from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels
    if pixels.ndim != 3 or not np.isfinite(pixels).all():
        raise ValueError(
            f"`input_column` {column!r}, row {index}: arrays must be finite (H, W) or (C, H, W), got shape "
            f"{pixels.shape}."
        )
    return pixels


def _pixel_values(data: Any, column: str, model: Any, data_file: str, image_size: int | None) -> np.ndarray:
    """``(N, C, H, W)`` float32: images resized for the model, or numeric arrays as they are."""
    import datasets

    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    config = getattr(base, "config", None)
    channels = int(getattr(config, "num_channels", 1) or 1)
    size = image_size or getattr(config, "image_size", None) or 28
    size = int(size[0]) if isinstance(size, (list, tuple)) else int(size)
    feature = data.features[column]
    if isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in ("string", "large_string"):
        rows = list(data[column])
        arrays = [
            _image(v, column, i, data_file, channels, size) if isinstance(v, str) or hasattr(v, "convert")
            else _array(v, column, i) for i, v in enumerate(rows)
        ]
    else:
        block = data.with_format("numpy", columns=[column])[:][column]
        if isinstance(block, np.ndarray) and block.dtype != object and block.ndim in (3, 4):
            block = block.astype(np.float32)[:, None] if block.ndim == 3 else block.astype(np.float32)
            if not np.isfinite(block).all():
                raise ValueError(f"`input_column` {column!r}: arrays must be finite.")
            return block
        arrays = [_array(value, column, index) for index, value in enumerate(block)]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"`input_column` {column!r}: all arrays must have one shape, got {shapes[:3]}.")
    return np.stack(arrays)


def load_front_data(
    data_file: str,
    model: Any,
    tokenizer: Any = None,
    *,
    input_column: str | None = None,
    label_columns: str | Mapping[str, str] | Sequence[str] | None = None,
    data_format: str | None = None,
    max_samples: int | None = None,
    max_length: int = 128,
    image_size: int | None = None,
) -> FrontData:
    """The user's file ``data_file`` as evaluation batches for ``model`` (a ``MultiTaskModel``).

    Args:
        data_file: a ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.parquet`` file (see :func:`read_data_file`).
        model: read for its ``task_names``, the classes of its ``heads`` (labels outside them are refused), its own
            ``label_columns`` and, for images, ``get_base_model().config`` (``num_channels``, ``image_size``).
        tokenizer: for a text model: ``input_column`` holds strings, tokenized with truncation to ``max_length``.
            Without it, ``input_column`` holds images (a ``datasets.Image`` column or paths relative to the file;
            resized to ``image_size``, else the config's, else 28, and scaled to [0, 1]) or numeric arrays
            ``(H, W)``/``(C, H, W)``, used as ``pixel_values`` as they are.
        input_column: may be omitted when only one column is not a label column.
        label_columns: ``{task: column}`` or the columns in task order, each holding integer class ids; or either
            typed as text (:func:`parse_label_columns`). Default: the model's own ``label_columns`` when the file
            has them, else columns named like the tasks.
        max_samples: the first N rows only.
    """
    import datasets

    for name, value in (("max_samples", max_samples), ("max_length", max_length), ("image_size", image_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    task_names = list(model.task_names)
    data = read_data_file(data_file, data_format)
    columns = list(data.column_names)
    mapping = _label_columns(label_columns, task_names, getattr(model, "label_columns", None) or {}, columns,
                             data_file)
    if input_column is None:
        candidates = [c for c in columns if c not in mapping.values()]
        if len(candidates) != 1:
            raise ValueError(f"`data_file` {data_file!r}: pass `input_column`, one of {candidates}.")
        input_column = candidates[0]
    if input_column not in columns:
        raise ValueError(f"`input_column`: {data_file!r} has no column {input_column!r}; its columns are {columns}.")
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    if len(data) == 0:
        raise ValueError(f"`data_file` {data_file!r} holds no rows.")

    classes = _head_classes(model)
    labels = {
        f"labels_{task}": _class_ids(list(data[column]), task, column, classes.get(task))
        for task, column in mapping.items()
    }
    collate_fn = None
    if tokenizer is not None:
        texts = list(data[input_column])
        if not all(isinstance(text, str) for text in texts):
            raise ValueError(f"`input_column` {input_column!r}: a text model needs strings in that column.")
        from transformers import DataCollatorWithPadding

        inputs = dict(tokenizer(texts, truncation=True, max_length=max_length))
        collate_fn = DataCollatorWithPadding(tokenizer)
        dataset = datasets.Dataset.from_dict({**inputs, **labels})
    else:
        pixels = _pixel_values(data, input_column, model, data_file, image_size)
        features = datasets.Features(
            {"pixel_values": datasets.Array3D(pixels.shape[1:], "float32"),
             **{name: datasets.Value("int64") for name in labels}}
        )
        dataset = datasets.Dataset.from_dict({"pixel_values": pixels, **labels}, features=features)
    return FrontData(dataset.with_format("torch"), collate_fn, {task: f"labels_{task}" for task in task_names})


def read_prompts(
    prompts_file: str, column: str = "prompt", data_format: str | None = None, max_samples: int | None = None
) -> list[str]:
    """The prompts of ``prompts_file``: one per line of a ``.txt`` file (blank lines skipped), else the ``column`` of
    a table (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``, or ``data_format``) read by
    :func:`read_data_file`. ``max_samples`` keeps the first N prompts.

    Raises:
        ValueError / TypeError: naming the argument (not a file, unreadable text, no such column, a non-string
            prompt, no prompts at all, a ``max_samples`` that is not a positive integer).
    """
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"`max_samples` must be a positive integer, got {max_samples!r}.")
    if not isinstance(prompts_file, (str, os.PathLike)) or not os.path.isfile(prompts_file):
        raise ValueError(f"`prompts_file` {prompts_file!r} is not a file.")
    if data_format is None and os.path.splitext(prompts_file)[1].lower() == ".txt":
        try:
            with open(prompts_file, encoding="utf-8") as handle:
                prompts = [line.rstrip("\r\n") for line in handle if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            message = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"`prompts_file` {prompts_file!r} is not readable text ({message}).") from None
    else:
        table = read_data_file(prompts_file, data_format)
        if column not in table.column_names:
            raise ValueError(f"`column`: {prompts_file!r} has no column {column!r} (columns: {table.column_names}).")
        prompts = table[column]
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"`prompts_file` {prompts_file!r}: row {index} of column {column!r} is a "
                                f"{type(prompt).__name__}, not a string.")
    prompts = list(prompts[:max_samples] if max_samples else prompts)
    if not prompts:
        raise ValueError(f"`prompts_file` {prompts_file!r} holds no prompts.")
    return prompts


def data_front_report(
    model: Any, data: FrontData, output_dir: str | os.PathLike, points: int = 11, batch_size: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a multi-task model on ``data`` (what :func:`load_front_data` returns) at every preference of
    ``simplex_grid(T, points)``, and write the front to ``output_dir``.

    Sets ``model.label_columns`` to ``data.label_columns`` and evaluates with
    :func:`~peft_palora.fronts.evaluation.evaluate_multitask` (loss and accuracy per task) in batches of
    ``batch_size`` under ``torch.no_grad``; a progress bar over preferences x batches goes to stderr if
    ``progress``. Writes ``front.csv``, then :func:`~peft_palora.fronts.evaluation.write_front_report`'s
    ``front.json`` and ``front.png``, and ``accuracy_vs_preference.png``.

    Returns:
        the report of ``write_front_report`` plus ``metric`` (``"accuracy"``), ``table`` (the CSV's path) and
        ``plots`` (a list of paths).

    Raises:
        ValueError: ``points`` (< 2) or ``batch_size`` (< 1) not an integer in range.
    """
    import sys

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from peft_palora.fronts.evaluation import evaluate_front, evaluate_multitask, write_front_report
    from peft_palora.fronts.plotting import plot_metrics_vs_preference
    from peft_palora.preferences import simplex_grid
    from peft_palora.utils.atomic import atomic_write_text

    for name, value, least in (("points", points, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"`{name}` must be an integer >= {least}, got {value!r}.")
    task_names = list(model.task_names)
    model.label_columns = data.label_columns
    loader = DataLoader(data.dataset, batch_size=batch_size, collate_fn=data.collate_fn)
    grid = simplex_grid(len(task_names), points)
    with tqdm(
        total=len(grid) * len(loader), desc=f"front ({len(grid)} preferences)", unit="batch", file=sys.stderr,
        disable=not progress, leave=False,
    ) as bar:

        def batches() -> Any:
            for batch in loader:
                yield batch
                bar.update(1)

        with torch.no_grad():
            table = evaluate_front(model, grid, lambda m: evaluate_multitask(m, batches()), task_names=task_names)
    out = os.fspath(output_dir)
    os.makedirs(out, exist_ok=True)
    table_path = os.path.join(out, "front.csv")
    atomic_write_text(table_path, table.to_csv(index=False))
    report = write_front_report(table, out, task_names, metric="accuracy")
    plots = [report["plot"]] if report.get("plot") else []
    metrics = {task: [f"{task}_accuracy"] for task in task_names}
    plots.append(plot_metrics_vs_preference(table, path=os.path.join(out, "accuracy_vs_preference.png"),
                                            metrics=metrics))
    return {**report, "metric": "accuracy", "table": table_path, "plots": plots}
