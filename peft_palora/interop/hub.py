"""Publish PaLoRA bundles on the Hugging Face Hub with a model card that describes them.

`PeftModel.push_to_hub` comes from `transformers.utils.PushToHubMixin`. It saves the model into a temporary folder --
`PeftModel.save_pretrained` writes PEFT's own `README.md` there (`library_name: peft`) -- and then *overwrites* that
README with the card returned by `transformers.utils.hub.create_and_tag_model_card`: the repository's existing card,
or a generic one with `library_name: transformers`. A PaLoRA bundle pushed that way is advertised as a transformers
model, with nothing about its tasks or how to choose a preference.

This module replaces that path for PaLoRA models:

* `build_model_card` writes a card for a PaLoRA adapter: `library_name: peft`, tags `peft` and `palora`, the base
  model, the pipeline tag when the PEFT task type tells it, the task names, what a preference means, a usage snippet,
  the adapter configuration and, when a Pareto front was evaluated, its table, hypervolume and plot.
* `write_model_card` writes that card (and the plot) into a local bundle folder as its `README.md`.
* `push_palora_to_hub` saves the adapter, writes that card (and the plot) next to it and publishes everything in a
  single commit, so a reader of the repository never sees new weights with an old card or the reverse.

Whatever the user chose (task names, base model id, module names, front table headers) is escaped before it reaches
the card: it reads as plain text and cannot add headings, code spans, links or HTML. The metadata block is written
by a YAML serialiser (strings with line breaks or HTML characters double-quoted, with escapes), never by formatting
strings, so it parses back to exactly the values given.
* `model.push_to_hub(...)` on a PaLoRA model calls `push_palora_to_hub` (PaLoRA models are instances of
  `peft_palora.tuner.peft_model`'s PeftModel subclasses); every other PEFT model keeps PEFT's method.

Distributed training: only the main process pushes. `push_palora_to_hub` asks
`accelerate.PartialState().is_main_process` (or takes `is_main_process=`); on every other process it returns `None`
without saving or contacting the Hub. It does not wait for the main process: call `wait_for_everyone()` yourself if
other ranks must read the published repository afterwards.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard

    from peft_palora.tuner.config import PaLoRAConfig

PLOT_STEM = "front"
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
DEFAULT_COMMIT_MESSAGE = "Upload PaLoRA adapter"
PAPER_URL = "https://arxiv.org/abs/2407.08056"

# PEFT task types whose Hub pipeline tag and transformers auto classes are unambiguous.
_PIPELINE_TAGS = {
    "SEQ_CLS": "text-classification",
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_AUTO_MODEL_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_AUTO_PEFT_CLASSES = {
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}

_INTRO = (
    "PaLoRA ([Pareto Low-Rank Adapters]({paper}), Dimitriadis, Frossard and Fleuret, ICLR 2025) lets one network "
    "cover a whole range of multi-task trade-offs. Every adapted layer keeps its shared weight and gains one low-rank "
    "adapter per task; a *preference* decides how much each task's adapter contributes. Training draws preferences "
    "from a fixed, annealed schedule and minimises the preference-weighted sum of the task losses, so after training "
    "a single set of weights can be steered, at inference time and without retraining, from one task's specialist to "
    "another's and through the compromises in between."
)


# ---------------------------------------------------------------------------------------------------- inspection
def _palora_type_name(config: Any) -> str | None:
    peft_type = getattr(config, "peft_type", None)
    return None if peft_type is None else str(getattr(peft_type, "value", peft_type))


def is_palora_model(model: Any) -> bool:
    """True for a PEFT model whose adapters are PaLoRA adapters (the models `push_palora_to_hub` publishes)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return False
    return any(_palora_type_name(config) == "PALORA" for config in configs.values())


def _resolve_config(peft_model_or_config: Any, adapter_name: str | None) -> tuple[PaLoRAConfig, Any]:
    """(config, model or None) from a PaLoRA `PeftModel` or a `PaLoRAConfig`."""
    if _palora_type_name(peft_model_or_config) == "PALORA" and not hasattr(peft_model_or_config, "get_base_model"):
        if adapter_name is not None:
            raise ValueError("`adapter_name` only applies when a model is given, not a config.")
        return peft_model_or_config, None
    if not is_palora_model(peft_model_or_config):
        raise TypeError(
            "`peft_model_or_config` must be a PEFT model with PaLoRA adapters or a `PaLoRAConfig`, "
            f"got {type(peft_model_or_config).__name__}."
        )
    configs = peft_model_or_config.peft_config
    if adapter_name is None:
        adapter_name = getattr(peft_model_or_config, "active_adapter", None)
        if not isinstance(adapter_name, str) or adapter_name not in configs:
            adapter_name = next(iter(configs))
    if adapter_name not in configs:
        raise ValueError(f"`adapter_name` {adapter_name!r} is not an adapter of this model; it has {list(configs)}.")
    config = configs[adapter_name]
    if _palora_type_name(config) != "PALORA":
        raise ValueError(f"Adapter {adapter_name!r} is a {_palora_type_name(config)} adapter, not a PaLoRA adapter.")
    return config, peft_model_or_config


def _task_type_name(config: Any) -> str | None:
    task_type = getattr(config, "task_type", None)
    return None if task_type is None else str(getattr(task_type, "value", task_type))


def _task_names(config: Any) -> list[str]:
    names = getattr(config, "task_names", None)
    if names:
        return [str(name) for name in names]
    return [f"task_{index}" for index in range(int(config.num_tasks))]


# ---------------------------------------------------------------------------------------------------- escaping
# Everything a user chose (task names, the base model id, module names, table headers and cells, the repo id) is
# escaped before it reaches the card, so that it reads as the text it is: never a heading, a code span, emphasis,
# a link, an autolink or raw HTML. Line breaks (any Unicode line break and the other control characters) become
# spaces, since a line break is what would start a heading, a list or a table row; HTML's special characters become
# entities; the characters Markdown (CommonMark and GitHub's extensions) gives a meaning inside a line are escaped
# with a backslash where they could take it. Plain names (`query`, `lambda_0`, `conv[13]d`) come out unchanged.
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_ALWAYS_ESCAPED = frozenset("\\`*~|$#@")
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _one_line(text: Any) -> str:
    return _BREAKS.sub(" ", str(text))


def _escape_markdown(text: Any) -> str:
    """`text` as inert Markdown: it renders as itself, on one line, and adds no structure to the card."""
    text = _one_line(text)
    out = []
    last = len(text) - 1
    for index, char in enumerate(text):
        before = text[index - 1] if index > 0 else ""
        after = text[index + 1] if index < last else ""
        if char in _HTML_ENTITIES:
            out.append(_HTML_ENTITIES[char])
        elif char in _ALWAYS_ESCAPED:
            out.append("\\" + char)
        elif char == "_" and not (before.isalnum() and after.isalnum()):
            out.append("\\_")  # an underscore between letters or digits (`task_0`) cannot emphasise
        elif char == "]" and (after in "([:" or index == last):
            out.append("\\]")  # `](`, `][` or `]:` would make a link or a reference
        elif char == "!" and after == "[":
            out.append("\\!")  # an image
        elif char == ":" and after == "/":
            out.append("\\:")  # `scheme://`: an autolink
        elif char == "." and before.isalnum() and after.isascii() and after.isalpha():
            out.append("\\.")  # `www.example.org`, `example.org`: linkified domain names
        else:
            out.append(char)
    return "".join(out)


def _inline_code(text: Any) -> str:
    """`text` in a code span when it can be one safely (no backtick, line break or HTML character), else escaped."""
    text = str(text)
    if text.strip() and not _BREAKS.search(text) and not set(text) & {"`", "<", ">", "&"}:
        return f"`{text}`"
    return _escape_markdown(text)


def _python_literal(text: Any) -> str:
    """A double-quoted Python string literal equal to `text`, printable on one line of a fenced code block.

    Quotes, backslashes, control characters, line breaks, backticks and HTML's special characters are written as
    escapes, so the snippet stays valid Python (`ast.literal_eval` gives `text` back) and adds nothing to the card.
    """
    out = ['"']
    for char in str(text):
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif char in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char])
        elif char in "`<>&" or code < 0x20 or not char.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


# Metadata goes through YAML serialisation only (never string formatting). On top of what `yaml.dump` does, strings
# holding a line break, a control character or one of `<`, `>`, `&` are written double-quoted with those characters
# as escapes (`"\x3cscript\x3e"` is `<script>` to any YAML parser), so the front matter carries no raw HTML either.
_YAML_ESCAPES = {"<": "\\x3c", ">": "\\x3e", "&": "\\x26"}


def _yaml_dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # no `&id001` anchors: every value is written out
            return True

    def represent_str(dumper: Any, value: str) -> Any:
        quoted = _BREAKS.search(value) or set(value) & set(_YAML_ESCAPES)
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if quoted else None)

    Dumper.add_representer(str, represent_str)
    return Dumper


def _metadata_yaml(metadata: Mapping[str, Any], line_break: str | None = None) -> str:
    import yaml

    text = yaml.dump(
        dict(metadata), Dumper=_yaml_dumper(), sort_keys=False, allow_unicode=True, line_break=line_break
    ).strip()
    # Every `<`, `>` and `&` left is inside a double-quoted scalar (strings holding one are double-quoted, there are
    # no anchors and no folded scalars), where the escape means the same character.
    return re.sub("[<>&]", lambda match: _YAML_ESCAPES[match.group()], text)


def _card_classes() -> tuple[type, type]:
    """`ModelCardData` and `ModelCard` subclasses whose YAML is written by `_metadata_yaml`."""
    global _CARD_CLASSES
    if _CARD_CLASSES is None:
        from huggingface_hub import ModelCard, ModelCardData

        class PaLoRAModelCardData(ModelCardData):
            def to_yaml(self, line_break: str | None = None, original_order: list[str] | None = None) -> str:
                metadata = self.to_dict()
                if original_order:
                    order = [key for key in original_order if key in metadata]
                    metadata = {key: metadata[key] for key in order + [k for k in metadata if k not in order]}
                return _metadata_yaml(metadata, line_break=line_break)

        class PaLoRAModelCard(ModelCard):
            card_data_class = PaLoRAModelCardData

        _CARD_CLASSES = (PaLoRAModelCardData, PaLoRAModelCard)
    return _CARD_CLASSES


_CARD_CLASSES: tuple[type, type] | None = None


# ---------------------------------------------------------------------------------------------------- validation
def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"`{name}` must be a finite real number, got {value!r}.")
    return float(value)


def plot_filename_in_repo(plot_path: str | os.PathLike) -> str:
    """Name under which a front plot is published next to the adapter (`front.png` for a PNG)."""
    suffix = Path(plot_path).suffix.lower()
    if suffix not in PLOT_SUFFIXES:
        raise ValueError(f"`plot_path` must be an image ({', '.join(PLOT_SUFFIXES)}), got {str(plot_path)!r}.")
    return PLOT_STEM + suffix


def _check_plot_path(plot_path: str | os.PathLike | None) -> Path | None:
    if plot_path is None:
        return None
    if not isinstance(plot_path, (str, os.PathLike)):
        raise TypeError(f"`plot_path` must be a path, got {type(plot_path).__name__}.")
    plot_filename_in_repo(plot_path)
    path = Path(plot_path)
    if not path.is_file():
        raise ValueError(f"`plot_path` {str(path)!r} is not an existing file.")
    return path


def _is_missing(value: Any) -> bool:
    """None, NaN and pandas' NA/NaT: a cell nothing was measured for (pandas turns None into NaN)."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(value, float) and math.isnan(value)


def _format_cell(value: Any) -> str:
    """One Markdown table cell: numbers with 4 significant digits, sequences (preferences) as tuples."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # tensors, numpy arrays and numpy scalars
    if _is_missing(value):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_format_cell(item) for item in value) + ")"
    return _escape_markdown(value)


def _table_rows(table: Any) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) from a DataFrame, a mapping column -> values, or a sequence of row mappings."""
    if hasattr(table, "columns") and hasattr(table, "itertuples"):  # pandas.DataFrame, without importing pandas
        return [str(column) for column in table.columns], [list(row) for row in table.itertuples(index=False)]
    if isinstance(table, Mapping):
        columns = [str(column) for column in table]
        values = [list(column_values) for column_values in table.values()]
        lengths = {len(column_values) for column_values in values}
        if len(lengths) > 1:
            raise ValueError(f"`front_table` columns must have equal lengths, got lengths {sorted(lengths)}.")
        return columns, [list(row) for row in zip(*values)]
    if isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        if not all(isinstance(row, Mapping) for row in table):
            raise TypeError("`front_table` given as a sequence must hold one mapping (column -> value) per row.")
        columns: list[str] = []
        for row in table:
            columns.extend(str(key) for key in row if str(key) not in columns)
        return columns, [[{str(k): v for k, v in row.items()}.get(column) for column in columns] for row in table]
    raise TypeError(
        "`front_table` must be a pandas DataFrame, a mapping column -> values or a sequence of row mappings, "
        f"got {type(table).__name__}."
    )


def front_table_markdown(table: Any) -> str:
    """Render an evaluated Pareto front as a Markdown table (no `tabulate` dependency).

    Numbers get 4 significant digits, sequences such as preferences become tuples, missing values (None, NaN) an
    empty cell; text is escaped (`|`, Markdown, HTML, line breaks) so that every row stays one row of plain text.
    """
    columns, rows = _table_rows(table)
    if not columns or not rows:
        raise ValueError("`front_table` is empty: give at least one column and one row.")
    header = "| " + " | ".join(_format_cell(column) for column in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_format_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join([header, rule, *body])


# ---------------------------------------------------------------------------------------------------- the card
def _versions() -> list[str]:
    lines = []
    for label, distribution in (
        ("peft_palora", "peft-palora"), ("PEFT", "peft"), ("Transformers", "transformers"), ("PyTorch", "torch")
    ):
        try:
            lines.append(f"- {label} {importlib_metadata.version(distribution)}")
        except importlib_metadata.PackageNotFoundError:
            continue
    return lines


def _example_preference(task_names: list[str]) -> tuple[str, str]:
    """(dict form, list form) of a preference that leans 70/30 towards the first two tasks -- exactly sums to 1."""
    weights = [0.7, 0.3] + [0.0] * (len(task_names) - 2)
    as_dict = "{" + ", ".join(f"{_python_literal(name)}: {weight}" for name, weight in zip(task_names, weights)) + "}"
    one_hot = "[" + ", ".join("1.0" if index == 0 else "0.0" for index in range(len(task_names))) + "]"
    return as_dict, one_hot


def _base_model_class_name(model: Any, task_type: str | None) -> tuple[str, str]:
    """(import line, class name) to load the base model in the usage snippet."""
    if model is not None:
        base_class = type(model.get_base_model())
        if base_class.__module__.split(".")[0] == "transformers":
            return f"from transformers import {base_class.__name__}", base_class.__name__
    auto_class = _AUTO_MODEL_CLASSES.get(task_type or "", "AutoModel")
    return f"from transformers import {auto_class}", auto_class


def _usage_snippet(config: Any, model: Any, repo_id: str, base_model: str | None) -> str:
    task_type = _task_type_name(config)
    import_line, base_class = _base_model_class_name(model, task_type)
    auto_peft = _AUTO_PEFT_CLASSES.get(task_type or "", "AutoPeftModel")
    as_dict, one_hot = _example_preference(_task_names(config))
    base_ref = _python_literal(base_model) if base_model else '"<base model id or path>"'
    revision = getattr(config, "revision", None)
    revision_arg = f", revision={_python_literal(revision)}" if revision else ""
    return "\n".join([
        "```python",
        "import peft_palora  # registers the PALORA adapter type with PEFT; import it before loading",
        f"from peft import {auto_peft}, PeftModel",
        import_line,
        "",
        f"base = {base_class}.from_pretrained({base_ref}{revision_arg})",
        f"model = PeftModel.from_pretrained(base, {_python_literal(repo_id)})",
        f"# or in one step, loading the base model named in adapter_config.json: "
        f"{auto_peft}.from_pretrained({_python_literal(repo_id)})",
        "",
        f"model.set_preference({as_dict})  # by task name; a list or tensor in task order works too",
        "outputs = model(**inputs)",
        f"outputs = model(**inputs, preference={one_hot})  # this call only: the first task's specialist",
        "```",
    ])


def _config_summary(config: Any) -> list[str]:
    target_modules = config.target_modules
    if isinstance(target_modules, (set, frozenset, list, tuple)):
        target_modules = ", ".join(_inline_code(name) for name in sorted(target_modules, key=str))
    elif target_modules is not None:
        target_modules = _inline_code(target_modules)
    task_type = _task_type_name(config)
    rank_pattern = getattr(config, "rank_pattern", None)
    alpha_pattern = getattr(config, "alpha_pattern", None)
    lines = [
        "- PEFT type: `PALORA`" + ("" if task_type is None else f", task type {_inline_code(task_type)}"),
        f"- Tasks: T = {int(config.num_tasks)}",
        f"- Rank per task adapter: r = {_escape_markdown(config.r)}"
        + (f" (per layer: `rank_pattern` = {_escape_markdown(rank_pattern)})" if rank_pattern else ""),
        f"- `palora_alpha` = {_escape_markdown(config.palora_alpha)} (each adapter is scaled by alpha / r = "
        f"{float(config.palora_alpha) / config.r:.4g})"
        + (f" (per layer: `alpha_pattern` = {_escape_markdown(alpha_pattern)})" if alpha_pattern else ""),
        f"- `palora_dropout` = {_escape_markdown(config.palora_dropout)}",
        f"- Target modules: {target_modules}",
        f"- `train_base_weights` = {bool(getattr(config, 'train_base_weights', False))}",
    ]
    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save:
        lines.append("- Modules trained fully and saved: " + ", ".join(_inline_code(name) for name in modules_to_save))
    if getattr(config, "train_base_weights", False):
        lines.append(
            "\nThe targeted base weights were trained together with the adapters (the paper's setting) and are part "
            "of this bundle: loading it replaces those weights of the base model."
        )
    return lines


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
) -> ModelCard:
    """Model card for a PaLoRA adapter, as a `huggingface_hub.ModelCard` (`str(card)` is the README text).

    Args:
        peft_model_or_config: a PEFT model with PaLoRA adapters, or a `PaLoRAConfig`.
        repo_id: the repository the card is published in; used in the usage snippet.
        base_model: Hub id of the base model; defaults to the config's `base_model_name_or_path`.
        adapter_name: which adapter of the model to describe; defaults to the active one.
        front_table: an evaluated Pareto front -- a pandas DataFrame, a mapping column -> values or a sequence of
            row mappings (typically one row per preference with the metrics it reached).
        hypervolume: the hypervolume of that front; `hypervolume_reference` is the reference point it was computed
            against (shown with it, because a hypervolume means nothing without its reference).
        plot_path: a plot of the front. The card embeds it as `front.<suffix>` (see `plot_filename_in_repo`);
            `push_palora_to_hub` uploads the file under that name.
        tags, pipeline_tag, license: extra card metadata. `pipeline_tag` defaults to the one the PEFT task type
            implies, if any.

    Raises `TypeError`/`ValueError` naming the argument for malformed input.
    """
    card_data_class, card_class = _card_classes()
    config, model = _resolve_config(peft_model_or_config, adapter_name)
    if repo_id is not None and (not isinstance(repo_id, str) or not repo_id.strip()):
        raise ValueError(f"`repo_id` must be a non-empty string, got {repo_id!r}.")
    if base_model is not None and (not isinstance(base_model, str) or not base_model.strip()):
        raise ValueError(f"`base_model` must be a non-empty string, got {base_model!r}.")
    if tags is not None and (isinstance(tags, str) or not all(isinstance(tag, str) and tag for tag in tags)):
        raise TypeError(f"`tags` must be a list of non-empty strings, got {tags!r}.")
    for name, value in (("pipeline_tag", pipeline_tag), ("license", license)):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"`{name}` must be a non-empty string, got {value!r}.")
    if hypervolume is not None:
        hypervolume = _check_real("hypervolume", hypervolume)
        if hypervolume < 0:
            raise ValueError(f"`hypervolume` cannot be negative, got {hypervolume}.")
    if hypervolume_reference is not None:
        if isinstance(hypervolume_reference, (str, bytes)) or not isinstance(hypervolume_reference, Sequence):
            raise TypeError(f"`hypervolume_reference` must be a sequence of numbers, got {hypervolume_reference!r}.")
        hypervolume_reference = [_check_real("hypervolume_reference", value) for value in hypervolume_reference]
        if hypervolume is None:
            raise ValueError("`hypervolume_reference` was given without `hypervolume`.")
    table_markdown = None if front_table is None else front_table_markdown(front_table)
    plot_name = None if plot_path is None else plot_filename_in_repo(plot_path)

    base_model = base_model or getattr(config, "base_model_name_or_path", None) or None
    repo_ref = repo_id or "<this repository>"
    task_names = _task_names(config)

    card_tags = ["peft", "palora", "multi-task-learning"]
    if model is not None:
        card_tags += list(getattr(model.get_base_model(), "model_tags", None) or [])
    if base_model:
        card_tags.append(f"base_model:adapter:{base_model}")
    card_tags += list(tags or [])
    card_data = card_data_class(
        library_name="peft",
        tags=list(dict.fromkeys(card_tags)),
        base_model=base_model,
        pipeline_tag=pipeline_tag or _PIPELINE_TAGS.get(_task_type_name(config) or ""),
        license=license,
    )

    title = f"PaLoRA adapter for {_escape_markdown(base_model)}" if base_model else "PaLoRA adapter"
    sections = [f"# {title}", "", _INTRO.format(paper=PAPER_URL), ""]
    sections += ["## Tasks", "", "| index | task |", "| --- | --- |"]
    sections += [f"| {index} | {_format_cell(name)} |" for index, name in enumerate(task_names)]
    sections += [
        "",
        "## What a preference means",
        "",
        f"A preference is a vector of {len(task_names)} non-negative weights that sum to 1, one per task in the "
        "order of the table above. Every adapted weight becomes",
        "",
        "    W(preference) = W + (palora_alpha / r) * sum_t preference[t] * B_t @ A_t",
        "",
        f"so `[1.0, 0.0{', 0.0' * (len(task_names) - 2)}]` uses only the adapter of {_inline_code(task_names[0])} and gives the "
        "model trained for that task, and mixtures move along the trade-off between the tasks. Set it with "
        "`model.set_preference(...)` (a list, an array, a tensor or a dict keyed by task name), or for one call with "
        "`model(**inputs, preference=...)`; a `(batch, T)` tensor gives every example its own preference. A "
        "preference that is negative, not finite or does not sum to 1 (tolerance 1e-4) is rejected, never "
        "silently renormalised.",
        "",
        "## Usage",
        "",
        _usage_snippet(config, model, repo_ref, base_model),
        "",
        "## Adapter configuration",
        "",
        *_config_summary(config),
        "",
    ]
    if table_markdown is not None or hypervolume is not None or plot_name is not None:
        sections += ["## Pareto front", ""]
        if table_markdown is not None:
            sections += ["The model evaluated at each preference:", "", table_markdown, ""]
        if hypervolume is not None:
            line = f"Hypervolume: **{hypervolume:.6g}**"
            if hypervolume_reference is not None:
                line += " (reference point (" + ", ".join(f"{value:.6g}" for value in hypervolume_reference) + "))"
            sections += [line, ""]
        if plot_name is not None:
            sections += [f"![Pareto front of this adapter]({plot_name})", ""]
    sections += [
        "## Citation",
        "",
        "```bibtex",
        "@inproceedings{dimitriadis2025palora,",
        "  title     = {Pareto Low-Rank Adapters: Efficient Multi-Task Learning with Preferences},",
        "  author    = {Dimitriadis, Nikolaos and Frossard, Pascal and Fleuret, Fran{\\c{c}}ois},",
        "  booktitle = {International Conference on Learning Representations (ICLR)},",
        "  year      = {2025},",
        "}",
        "```",
        "",
        "### Framework versions",
        "",
        *_versions(),
    ]
    # The metadata block is what the card's own serialiser writes; parsing it back gives `card.data`.
    return card_class(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections) + "\n")


# ---------------------------------------------------------------------------------------------------- local bundles
CARD_NAME = "README.md"
FRONT_REPORT_NAME = "front.json"


def _is_front_report(front: Any) -> bool:
    """A front report as `training.write_front_report` writes it (`front.json`): rows under "front", and more."""
    rows = front.get("front") if isinstance(front, Mapping) else None
    return (
        isinstance(rows, Sequence)
        and not isinstance(rows, (str, bytes))
        and all(isinstance(row, Mapping) for row in rows)
    )


def _read_front_report(path: Path) -> Mapping[str, Any]:
    if path.is_dir():
        path = path / FRONT_REPORT_NAME
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"`front` {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"`front` {str(path)!r} is not a readable JSON front report ({type(error).__name__}).") from None
    if not _is_front_report(report):
        raise ValueError(f"`front` {str(path)!r} holds no front report: expected an object with a \"front\" list of rows.")
    return report


def _front_card_arguments(front: Any, plot_path: str | os.PathLike | None) -> dict[str, Any]:
    """`build_model_card` arguments from `write_model_card`'s `front`: a table, a report mapping or a path to one."""
    if front is None:
        return {"plot_path": plot_path}
    if isinstance(front, (str, os.PathLike)):
        front = _read_front_report(Path(front))
    if not _is_front_report(front):
        return {"front_table": front, "plot_path": plot_path}
    arguments: dict[str, Any] = {"front_table": list(front["front"]), "plot_path": plot_path}
    if front.get("hypervolume") is not None:
        arguments["hypervolume"] = front["hypervolume"]
        reference = front.get("reference")
        if reference is not None:
            arguments["hypervolume_reference"] = list(reference) if isinstance(reference, Sequence) else reference
    report_plot = front.get("plot")
    if plot_path is None and isinstance(report_plot, (str, os.PathLike)) and os.path.isfile(report_plot):
        arguments["plot_path"] = report_plot  # `write_front_report`'s return value names the plot it drew
    return arguments


def write_model_card(
    peft_model: Any,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    front: Any = None,
    plot_path: str | os.PathLike | None = None,
    **card_kwargs: Any,
) -> str:
    """Write PaLoRA's model card as `README.md` into a local bundle folder; returns the card's path.

    The card is `build_model_card(peft_model, ...)`: tasks, what a preference means, usage, the adapter
    configuration and, when given, the Pareto front. An existing `README.md` is replaced (atomically).

    Args:
        peft_model: a PEFT model with PaLoRA adapters (or a `PaLoRAConfig`).
        save_directory: the bundle folder (created if needed).
        adapter_name: which adapter to describe; defaults to the active one.
        front: the evaluated front, optional: a table (as `build_model_card`'s `front_table`), a front report as
            `training.write_front_report` writes it (`{"front": rows, "hypervolume": ..., "reference": ...}`, whose
            hypervolume and reference are shown too), or the path of such a `front.json` (or of its folder).
        plot_path: an image of the front. It is copied into the folder as `front.<suffix>` (unless it is that file
            already) and embedded; by default the plot a report names, if it exists.
        card_kwargs: further `build_model_card` arguments (`repo_id`, `base_model`, `tags`, `pipeline_tag`,
            `license`, `hypervolume`, `hypervolume_reference`).

    Raises `TypeError`/`ValueError` naming the argument for malformed input, before anything is written.
    """
    from peft_palora.utils.atomic import atomic_write_text

    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"`save_directory` must be a path, got {type(save_directory).__name__}.")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"`save_directory` {str(directory)!r} is a file; give a folder.")
    allowed = {"repo_id", "base_model", "tags", "pipeline_tag", "license", "hypervolume", "hypervolume_reference"}
    unknown = sorted(set(card_kwargs) - allowed)
    if unknown:
        raise TypeError(f"write_model_card() got unexpected keyword arguments: {unknown}.")
    arguments = _front_card_arguments(front, plot_path)
    arguments.update(card_kwargs)
    plot = _check_plot_path(arguments.pop("plot_path"))
    card = build_model_card(peft_model, adapter_name=adapter_name, plot_path=plot, **arguments)

    directory.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        target = directory / plot_filename_in_repo(plot)
        if not (target.exists() and os.path.samefile(plot, target)):
            shutil.copyfile(plot, target)
    path = directory / CARD_NAME
    atomic_write_text(str(path), str(card))
    return str(path)


# ---------------------------------------------------------------------------------------------------- pushing
def _main_process() -> bool:
    from accelerate import PartialState

    return bool(PartialState().is_main_process)


def _merge_previous_metadata(card: ModelCard, previous: ModelCard | None) -> None:
    """Keep metadata a user added on the Hub (license, datasets, language, ...) that the new card does not set."""
    if previous is None:
        return
    ours = card.data.to_dict()
    for key, value in previous.data.to_dict().items():
        if key == "tags":
            card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *(value or [])]))
        elif key not in ours and value is not None:
            card.data[key] = value


def _previous_card(api: Any, repo_id: str, revision: str | None, token: Any) -> ModelCard | None:
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return ModelCard.load(path, ignore_metadata_errors=True)


def push_palora_to_hub(
    model: Any,
    repo_id: str,
    *,
    front_table: Any = None,
    hypervolume: float | None = None,
    hypervolume_reference: Sequence[float] | None = None,
    plot_path: str | os.PathLike | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    tags: Sequence[str] | None = None,
    safe_serialization: bool = True,
    is_main_process: bool | None = None,
    **card_kwargs: Any,
) -> CommitInfo | None:
    """Publish a PaLoRA model to the Hub: adapter, config, our model card and the front plot, in one commit.

    The repository is created if needed. Files are written by `model.save_pretrained` into a temporary folder,
    `README.md` is replaced by `build_model_card(...)` (metadata a user added on the Hub, such as a license, is kept),
    the plot is copied in as `front.<suffix>` (a plot from an earlier push is deleted when it is not replaced), and
    everything is sent with one `HfApi.create_commit`. Not `HfApi.upload_folder`: with `hf_xet` installed it may
    split a folder over several commits.

    Only the main process pushes: with `is_main_process=None` that is `accelerate.PartialState().is_main_process`.
    Other processes return `None` at once.

    `front_table`, `hypervolume`, `hypervolume_reference`, `plot_path`, `tags` and `card_kwargs` (`base_model`,
    `pipeline_tag`, `license`, `adapter_name`) go to `build_model_card`. Returns the `CommitInfo` of the commit.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    if not is_palora_model(model) or not hasattr(model, "save_pretrained"):
        raise TypeError(f"`model` must be a PEFT model with PaLoRA adapters, got {type(model).__name__}.")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"`repo_id` must be a non-empty string, got {repo_id!r}.")
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError(f"`commit_message` must be a non-empty string, got {commit_message!r}.")
    unknown = set(card_kwargs) - {"base_model", "pipeline_tag", "license", "adapter_name"}
    if unknown:
        raise TypeError(f"push_palora_to_hub() got unexpected keyword arguments: {sorted(unknown)}.")
    plot = _check_plot_path(plot_path)
    card_arguments = dict(
        front_table=front_table, hypervolume=hypervolume, hypervolume_reference=hypervolume_reference,
        plot_path=plot, tags=tags, **card_kwargs,
    )
    build_model_card(model, repo_id=repo_id, **card_arguments)  # validate everything before touching the Hub

    if not (_main_process() if is_main_process is None else is_main_process):
        return None

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    card = build_model_card(model, repo_id=repo_id, **card_arguments)
    _merge_previous_metadata(card, _previous_card(api, repo_id, revision, token))
    # A plot left by an earlier push would sit next to weights it does not describe: remove it in the same commit.
    new_plot = None if plot is None else plot_filename_in_repo(plot)
    stale_plots = [
        CommitOperationDelete(path_in_repo=path)
        for path in api.list_repo_files(repo_id, revision=revision, token=token)
        if Path(path).stem == PLOT_STEM and "/" not in path and Path(path).suffix in PLOT_SUFFIXES and path != new_plot
    ]

    with tempfile.TemporaryDirectory(prefix="palora-push-") as staging:
        model.save_pretrained(staging, safe_serialization=safe_serialization, is_main_process=True)
        card.save(os.path.join(staging, "README.md"))
        if new_plot is not None:
            shutil.copyfile(plot, os.path.join(staging, new_plot))
        operations = stale_plots + [
            CommitOperationAdd(path_in_repo=path.relative_to(staging).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(staging).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )

