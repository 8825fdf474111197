"""PaLoRA's model card: what `save_pretrained` writes as `README.md` and what `push_to_hub` publishes.

The card is a `huggingface_hub.ModelCard` rendered from `TEMPLATE`. Its metadata goes through `ModelCardData` (a
YAML serialiser, so any value parses back as given); user text in the Markdown body (task names, metric names, module
names, the base model) goes through `escape`, the one escaping function: it renders as itself, on one line, and adds
no heading, link, emphasis or HTML. Absolute or local paths of the training machine never reach the card: a local base
model shows by its folder name and is left out of the metadata.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from typing import Any

CARD_NAME = "README.md"
FRONT_REPORT_NAME = "front.json"
PLOT_STEM = "front"
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
PAPER_URL = "https://arxiv.org/abs/2407.08056"
# PEFT task type -> (Hub pipeline tag, transformers auto class, PEFT auto class)
_TASK_TYPES = {
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification"),
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification", "AutoPeftModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering", "AutoPeftModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel", "AutoPeftModelForFeatureExtraction"),
}
_NO_TASK_TYPE = (None, "AutoModel", "AutoPeftModel")

_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_MARKDOWN = re.compile(
    r"[\\`*~|#$@<>&]"  # code, emphasis, strike, table cells, headings/refs, maths, mentions, HTML
    r"|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])"  # underscores that could emphasise (not the one in `task_0`)
    r"|\](?=[(\[:]|$)|!(?=\[)"  # links, references, images
    r"|:(?=/)|(?<=[A-Za-z0-9])\.(?=[A-Za-z])"  # autolinks: `scheme://`, `www.example.org`
)
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def escape(text: Any) -> str:
    """`text` as inert Markdown: line breaks become spaces, HTML characters entities, Markdown's a backslash escape."""
    return _MARKDOWN.sub(lambda m: _ENTITIES.get(m[0], "\\" + m[0]), _BREAKS.sub(" ", str(text)))


def _code(name: Any) -> str:
    """A plain name (`query`, `conv[13]d`) as a code span; anything else escaped."""
    return f"`{name}`" if re.fullmatch(r"[\w.\-\[\]]+", str(name)) else escape(name)


def _literal(text: Any) -> str:
    """A Python string literal on one line, for the usage snippet (a code block shows it as written)."""
    return json.dumps(str(text), ensure_ascii=False)


TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "card_template.md")


# ---------------------------------------------------------------------------------------------------- pieces
def resolve_palora_config(source: Any, adapter_name: str | None) -> tuple[Any, Any]:
    """(PaLoRA config, model or None) from a model holding PaLoRA adapters or a `PaLoRAConfig`."""
    def kind(config: Any) -> str:
        return str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)))

    if kind(source) == "PALORA" and not hasattr(source, "peft_config"):
        if adapter_name is not None:
            raise ValueError("`adapter_name` only applies when a model is given, not a config.")
        return source, None
    configs = getattr(source, "peft_config", None)
    if not isinstance(configs, Mapping) or not any(kind(config) == "PALORA" for config in configs.values()):
        raise TypeError(f"expected a model with PaLoRA adapters or a `PaLoRAConfig`, got {type(source).__name__}.")
    if adapter_name is None:
        active = getattr(source, "active_adapter", None)
        adapter_name = active if isinstance(active, str) and active in configs else next(iter(configs))
    if adapter_name not in configs or kind(configs[adapter_name]) != "PALORA":
        raise ValueError(f"`adapter_name` {adapter_name!r} is not a PaLoRA adapter of this model; it has {list(configs)}.")
    return configs[adapter_name], source


def hub_id_or_folder_name(name_or_path: Any) -> tuple[str | None, str | None]:
    """(Hub id or None, name to show): a local or absolute path is never a Hub id and shows as its folder's name."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        return None, None
    if os.path.isabs(name_or_path) or "\\" in name_or_path or os.path.exists(name_or_path) or name_or_path[0] in ".~":
        folder = re.split(r"[\\/]", name_or_path.rstrip("\\/"))[-1]
        return None, folder if folder not in ("", ".", "..", "~") else None
    return name_or_path, name_or_path


def _cell(value: Any) -> str:
    """One table cell: numbers with 4 significant digits, sequences as tuples, missing values empty."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # tensors, numpy arrays and scalars
    if value is None or type(value).__name__ in ("NAType", "NaTType") or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_cell(item) for item in value) + ")"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return escape(value)
    return str(int(value)) if isinstance(value, numbers.Integral) else f"{float(value):.4g}"


def front_table_markdown(table: Any) -> str:
    """A Markdown table of an evaluated front: a DataFrame, a mapping column -> values, or a sequence of row mappings."""
    if hasattr(table, "columns") and hasattr(table, "itertuples"):  # pandas, without importing it
        columns, rows = [str(c) for c in table.columns], [list(row) for row in table.itertuples(index=False)]
    elif isinstance(table, Mapping):
        columns, values = [str(c) for c in table], [list(v) for v in table.values()]
        if len({len(v) for v in values}) > 1:
            raise ValueError(f"`front_table` columns must have equal lengths, got {sorted({len(v) for v in values})}.")
        rows = [list(row) for row in zip(*values)]
    elif isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        if not all(isinstance(row, Mapping) for row in table):
            raise TypeError("`front_table` given as a sequence must hold one mapping (column -> value) per row.")
        columns = list(dict.fromkeys(str(key) for row in table for key in row))
        rows = [[{str(k): v for k, v in row.items()}.get(c) for c in columns] for row in table]
    else:
        raise TypeError(f"`front_table` must be a DataFrame, a mapping or a sequence of rows, got {type(table).__name__}.")
    if not columns or not rows:
        raise ValueError("`front_table` is empty: give at least one column and one row.")
    lines = [[_cell(c) for c in columns], ["---"] * len(columns), *[[_cell(v) for v in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def read_front_report(path: str | os.PathLike) -> dict[str, Any]:
    """`build_model_card` arguments from a `front.json` written by `write_front_report` (or the folder holding it).

    The table keeps the preference and per-task metric columns (`pref_<task>`, `<task>_<metric>`) when the report
    names them; a `front.<suffix>` plot next to the report is embedded.
    """
    path = os.fspath(path)
    folder, file = (path, os.path.join(path, FRONT_REPORT_NAME)) if os.path.isdir(path) else (os.path.dirname(path), path)
    try:
        with open(file, encoding="utf-8") as handle:
            report = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"`front` {file!r} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"`front` {file!r} is not a readable JSON front report ({type(error).__name__}).") from None
    rows = report.get("front") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f'`front` {file!r} holds no front report: expected an object with a "front" list of rows.')
    return {**front_report_arguments(report), "plot_path": next(
        (os.path.join(folder, PLOT_STEM + s) for s in PLOT_SUFFIXES if os.path.isfile(os.path.join(folder, PLOT_STEM + s))),
        None,
    )}


def front_report_arguments(report: Mapping[str, Any]) -> dict[str, Any]:
    """`build_model_card` arguments from a front report mapping (`{"front": rows, "hypervolume": ..., ...}`)."""
    rows, tasks, metric = list(report["front"]), report.get("task_names"), report.get("metric")
    if isinstance(tasks, list) and isinstance(metric, str):
        keep = [f"pref_{t}" for t in tasks] + [f"{t}_{metric}" for t in tasks]
        if rows and all(k in row for k in keep for row in rows):
            rows = [{k: row[k] for k in keep} for row in rows]
    arguments: dict[str, Any] = {"front_table": rows}
    if report.get("hypervolume") is not None:
        arguments["hypervolume"] = report["hypervolume"]
        if report.get("reference") is not None:
            arguments["hypervolume_reference"] = report["reference"]
    return arguments


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"`{name}` must be a finite real number, got {value!r}.")
    return float(value)


def plot_filename_in_repo(plot_path: str | os.PathLike) -> str:
    """Name under which a front plot sits next to the adapter (`front.png` for a PNG)."""
    suffix = os.path.splitext(os.fspath(plot_path))[1].lower()
    if suffix not in PLOT_SUFFIXES:
        raise ValueError(f"`plot_path` must be an image ({', '.join(PLOT_SUFFIXES)}), got {os.fspath(plot_path)!r}.")
    return PLOT_STEM + suffix


def _versions() -> list[str]:
    found = []
    for label, dist in (("peft_palora", "peft-palora"), ("PEFT", "peft"), ("Transformers", "transformers"),
                        ("PyTorch", "torch")):
        try:
            found.append(f"{label} {importlib_metadata.version(dist)}")
        except importlib_metadata.PackageNotFoundError:
            continue
    return found


# ---------------------------------------------------------------------------------------------------- the card
def build_model_card(
    peft_model_or_config: Any,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    adapter_name: str | None = None,
    front_table: Any = None,
    hypervolume: float | None = None,
    hypervolume_reference: Sequence[float] | None = None,
    plot_path: str | os.PathLike | None = None,
    tags: Sequence[str] | None = None,
    pipeline_tag: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's metadata key
) -> Any:
    """PaLoRA's model card for an adapter, as a `huggingface_hub.ModelCard` (`str(card)` is the README).

    Args:
        peft_model_or_config: a model with PaLoRA adapters (a `PeftModel`, or a wrapper with `peft_config` such as
            `MultiTaskModel`), or a `PaLoRAConfig`.
        repo_id: where the card is published (for the usage snippet).
        base_model: the base model's Hub id; default the config's `base_model_name_or_path`. A local path is shown
            by its folder name only and left out of the metadata.
        adapter_name: which adapter to describe; default the active one.
        front_table: the evaluated front, one row per preference (see `front_table_markdown`).
        hypervolume, hypervolume_reference: the front's hypervolume and the reference point it was computed against.
        plot_path: an image of the front; the card embeds it as `front.<suffix>`.
        tags, pipeline_tag, license: more metadata (`pipeline_tag` defaults to the one the PEFT task type implies).

    Raises `TypeError`/`ValueError` naming the argument for malformed input.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config, model = resolve_palora_config(peft_model_or_config, adapter_name)
    for name, value in (("repo_id", repo_id), ("base_model", base_model)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
    if tags is not None and (isinstance(tags, str) or not all(isinstance(tag, str) and tag for tag in tags)):
        raise TypeError(f"`tags` must be a list of non-empty strings, got {tags!r}.")
    for name, value in (("pipeline_tag", pipeline_tag), ("license", license)):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"`{name}` must be a non-empty string, got {value!r}.")
    if hypervolume is not None and _real("hypervolume", hypervolume) < 0:
        raise ValueError(f"`hypervolume` cannot be negative, got {hypervolume}.")
    if hypervolume_reference is not None:
        if isinstance(hypervolume_reference, (str, bytes)) or not isinstance(hypervolume_reference, Sequence):
            raise TypeError(f"`hypervolume_reference` must be a sequence of numbers, got {hypervolume_reference!r}.")
        hypervolume_reference = [_real("hypervolume_reference", value) for value in hypervolume_reference]
        if hypervolume is None:
            raise ValueError("`hypervolume_reference` was given without `hypervolume`.")
    plot = None if plot_path is None else plot_filename_in_repo(plot_path)
    front = None if front_table is None else front_table_markdown(front_table)

    hub_id, shown = hub_id_or_folder_name(base_model or getattr(config, "base_model_name_or_path", None))
    names = list(config.task_names or [f"task_{t}" for t in range(int(config.num_tasks))])
    task_type = getattr(config, "task_type", None)
    task_type = None if task_type is None else str(getattr(task_type, "value", task_type))
    pipeline, auto_model, auto_peft = _TASK_TYPES.get(task_type or "", _NO_TASK_TYPE)
    base = None if model is None else model.get_base_model()
    base_class = type(base).__name__ if base is not None and type(base).__module__.startswith("transformers.") else auto_model
    card_tags = ["peft", "palora", "multi-task-learning", *(getattr(base, "model_tags", None) or [])]
    card_tags += [f"base_model:adapter:{hub_id}"] if hub_id else []
    card_data = ModelCardData(
        library_name="peft", tags=list(dict.fromkeys([*card_tags, *(tags or [])])), base_model=hub_id,
        pipeline_tag=pipeline_tag or pipeline, license=license,
    )
    weights = [0.7, 0.3] + [0.0] * (len(names) - 2)
    targets = config.target_modules
    targets = ", ".join(map(_code, sorted(targets, key=str))) if isinstance(targets, (set, list, tuple)) else _code(targets)
    config_lines = [
        "PEFT type: `PALORA`" + ("" if task_type is None else f", task type {_code(task_type)}"),
        f"Tasks: T = {len(names)}",
        f"Rank per task adapter: r = {escape(config.r)}"
        + (f" (per layer: `rank_pattern` = {escape(config.rank_pattern)})" if config.rank_pattern else ""),
        f"`palora_alpha` = {escape(config.palora_alpha)} (each adapter is scaled by alpha / r = "
        f"{float(config.palora_alpha) / config.r:.4g})"
        + (f" (per layer: `alpha_pattern` = {escape(config.alpha_pattern)})" if config.alpha_pattern else ""),
        f"`palora_dropout` = {escape(config.palora_dropout)}",
        f"Target modules: {targets}",
        f"`train_base_weights` = {bool(config.train_base_weights)}",
    ]
    if config.modules_to_save:
        config_lines.append("Modules trained fully and saved: " + ", ".join(_code(m) for m in config.modules_to_save))
    batch_norms = [m for m in (base.modules() if base is not None else []) if hasattr(m, "track_running_stats")]
    with open(TEMPLATE_PATH, encoding="utf-8") as handle:
        template = handle.read()
    return ModelCard.from_template(
        card_data, template_str=template, paper=PAPER_URL,
        title=f"PaLoRA adapter for {escape(shown)}" if shown else "PaLoRA adapter",
        tasks=[escape(name) for name in names],
        one_hot="[" + ", ".join("1.0" if t == 0 else "0.0" for t in range(len(names))) + "]",
        preference="{" + ", ".join(f"{_literal(n)}: {w}" for n, w in zip(names, weights)) + "}",
        auto_peft=auto_peft, base_class=base_class, repo_ref=_literal(repo_id) if repo_id else '"path/to/this/folder"',
        base_ref=_literal(shown) if shown else '"BASE_MODEL"',
        base_comment="" if hub_id or not shown else "  # a local folder where this adapter was trained",
        heads=task_type is None, batch_statistics=any(not m.track_running_stats for m in batch_norms),
        config_lines=config_lines, train_base_weights=bool(config.train_base_weights), front=front,
        hypervolume=None if hypervolume is None else float(hypervolume),
        reference=None if hypervolume_reference is None else ", ".join(f"{v:.6g}" for v in hypervolume_reference),
        plot=plot, versions=_versions(),
    )


def write_model_card(
    peft_model: Any,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    front: Any = None,
    plot_path: str | os.PathLike | None = None,
    **card_kwargs: Any,
) -> str:
    """Write PaLoRA's card as `README.md` into a bundle folder (replacing one there); returns its path.

    `front` is a table (as `build_model_card`'s `front_table`), a front report mapping as `write_front_report` writes
    it, or the path of a `front.json` (or its folder); by default the folder's own `front.json`, if any. A plot is
    copied in as `front.<suffix>`. `card_kwargs` go to `build_model_card`. Bad input raises before anything is written.
    """
    import shutil

    from peft_palora.utils.atomic import atomic_write_text

    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"`save_directory` must be a path, got {type(save_directory).__name__}.")
    directory = os.fspath(save_directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"`save_directory` {directory!r} is a file; give a folder.")
    unknown = sorted(set(card_kwargs) - {"repo_id", "base_model", "tags", "pipeline_tag", "license", "hypervolume",
                                         "hypervolume_reference"})
    if unknown:
        raise TypeError(f"write_model_card() got unexpected keyword arguments: {unknown}.")
    if front is None and os.path.isfile(os.path.join(directory, FRONT_REPORT_NAME)):
        front = directory
    if isinstance(front, (str, os.PathLike)):
        arguments = read_front_report(front)
    elif isinstance(front, Mapping) and isinstance(front.get("front"), list):
        arguments = {**front_report_arguments(front), "plot_path": None}
    else:
        arguments = {"front_table": front, "plot_path": None}
    arguments = {**arguments, **card_kwargs, "plot_path": plot_path or arguments["plot_path"]}
    plot = arguments["plot_path"]
    if plot is not None and (not isinstance(plot, (str, os.PathLike)) or not os.path.isfile(plot)):
        raise (TypeError if not isinstance(plot, (str, os.PathLike)) else ValueError)(
            f"`plot_path` must be an existing image file, got {plot!r}."
        )
    card = build_model_card(peft_model, adapter_name=adapter_name, **arguments)
    os.makedirs(directory, exist_ok=True)
    if plot is not None:
        target = os.path.join(directory, plot_filename_in_repo(plot))
        if not (os.path.exists(target) and os.path.samefile(plot, target)):
            shutil.copyfile(plot, target)
    path = os.path.join(directory, CARD_NAME)
    atomic_write_text(path, str(card))
    return path
