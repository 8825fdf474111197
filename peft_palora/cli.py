"""The `palora` command line: inspect a PaLoRA bundle, evaluate its Pareto front, export one point of it as a LoRA.

A thin shell over the library: `palora info` reads a bundle's config and tensor shapes, `palora front` loads a
`MultiTaskModel` bundle and measures its front on the user's data file (`peft_palora.fronts.data.load_front_data`
then `data_front_report`) -- or, given `--prompts` and one `--reward objective=module:function` per task, loads a
causal-LM bundle and measures its reward front with `peft_palora.fronts.data.read_prompts` and
`peft_palora.alignment.front`'s `load_reward_functions` and `reward_front_report` (imported only then) --
`palora export-lora` and `palora export-task-loras` call `peft_palora.interop.lora`'s
`export_lora_from_bundle` and `export_task_loras_from_bundle`. `examples/train_mtl.py` writes its test split next
to its bundle, so its front is measured again with

```
palora front outputs/train_mtl --data outputs/train_mtl/eval.parquet --out front/
```

Errors in what the user gave (a missing or broken bundle, an unreadable `config.json`, a bad `--points`, a data file
without the named columns, ...) end the command with one line `palora: error: ...` on stderr and exit status 2, as
argparse does for bad arguments; `--traceback` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

from peft_palora.fronts.data import DATA_FORMATS

_MAX_MESSAGE = 800  # characters of an error message shown


class CLIError(Exception):
    """A problem with what the user gave: shown as one line, exit status 2."""


# Errors that come from the user's input (files, arguments, models that do not fit the bundle). Anything else is
# reported as an internal error (status 1), still on one line unless `--traceback` is given.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError, ValueError, TypeError, OSError, RecursionError, ImportError, KeyError, RuntimeError, SafetensorError,
)


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


def _read_json_object(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CLIError(f"{what}{path} is not readable JSON ({_one_line(error)}).") from None
    if not isinstance(value, dict):
        raise CLIError(f"{what}{path} must hold a JSON object, got {type(value).__name__}.")
    return value


def _check_model_source(source: str) -> None:
    """Read `<source>/config.json` of a local model folder first, so that a broken one gets a clear message."""
    if not os.path.isdir(source):
        if os.path.exists(source):
            raise CLIError(f"--base {source!r} is a file; give a model folder or a Hub id.")
        return  # a Hub id: transformers resolves it (offline: from the local cache only)
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise CLIError(f"--base {source!r} has no config.json.")
    _read_json_object(os.path.join(source, "config.json"), f"--base {source!r}: ")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings (its load report) and weight-loading bar; restore both afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_disabled:
            hf_logging.enable_progress_bar()


_AUTO_CLASSES = {"SEQ_CLS": "ForSequenceClassification", "CAUSAL_LM": "ForCausalLM", "SEQ_2_SEQ_LM": "ForSeq2SeqLM",
                 "TOKEN_CLS": "ForTokenClassification", "QUESTION_ANS": "ForQuestionAnswering"}


# ---------------------------------------------------------------------------------------------------- palora info
def bundle_summary(bundle: str, base: str | None = None) -> dict[str, Any]:
    """Tasks, rank, targets, parameter counts (and overhead against the base model when it can be found).

    The base model is built on the meta device from its config (no weights are read or allocated), so measuring
    the overhead against a model of any size is instant. A `base` given explicitly must be readable; a base found
    otherwise (the bundle's `base_model/` folder or `base_model_name_or_path`) is skipped when it cannot be.
    """
    config = _read_config(bundle)
    weights = os.path.join(bundle, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CLIError(f"{weights} is missing: the bundle has no adapter weights.")
    adapter_params, base_weight_params, tensors = 0, 0, 0
    layers = set()
    try:
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():
                numel = math.prod(handle.get_slice(key).get_shape())
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
    import transformers

    try:
        _check_model_source(base)
    except CLIError:
        if explicit:
            raise
        return None
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(base)
            with torch.device("meta"):
                try:
                    model = getattr(transformers, "AutoModel" + _AUTO_CLASSES.get(task_type, "")).from_config(config)
                except ValueError:  # the task's auto class does not know this architecture: count the backbone
                    model = transformers.AutoModel.from_config(config)
    except _USER_ERRORS as error:
        if explicit:
            raise CLIError(f"--base {base!r}: cannot build the model from its config ({_one_line(error)})") from None
        return None
    return sum(p.numel() for p in model.parameters())


def _format_info(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"PaLoRA bundle {s['bundle']}",
        f"  tasks ({s['num_tasks']}): {', '.join(s['task_names'])}",
        f"  rank per task r={s['r']}, palora_alpha={s['palora_alpha']} (scale {s['palora_alpha'] / s['r']:g})",
        f"  target modules: {s['target_modules']} ({s['adapted_layers']} layers adapted)",
        f"  adapter parameters: {s['adapter_parameters']:,}",
        f"  base weights stored in the bundle: {s['stored_base_parameters']:,} (train_base_weights="
        f"{s['train_base_weights']})",
        f"  adapter_model.safetensors: {s['bundle_bytes'] / 2**20:.2f} MiB",
        f"  base model: {s['base_model'] or 'unknown (pass --base)'}",
    ]
    if "base_parameters" in s:
        overhead = f"{s['adapter_parameters']:,} / {s['base_parameters']:,} base parameters"
        lines.append(f"  overhead: {overhead} = {s['overhead_percent']:.2f}%")
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


def run_front(
    bundle: str, out: str, data_file: str, base: str | None = None, points: int = 11, batch_size: int = 1000,
    quiet: bool = False, **data_options: Any,
) -> dict[str, Any]:
    """Evaluate a saved multi-task bundle on `data_file` at every point of `simplex_grid(T, points)`.

    The file is read by :func:`peft_palora.fronts.data.load_front_data`, which gets `data_options` (`input_column`,
    `label_columns`, `max_samples`, ...). Writes `front.csv`, `front.json` and the plots to `out`. A progress bar
    over preferences x batches goes to stderr unless `quiet`.
    """
    from peft_palora.fronts.data import data_front_report, load_front_data
    from peft_palora.training.multitask import MultiTaskModel

    for name, value, least in (("--points", points, 2), ("--batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CLIError(f"{name} must be an integer >= {least}, got {value!r}.")
    metadata = _read_multitask_metadata(bundle)
    base_model, tokenizer = _load_base(bundle, base, batch_statistics=bool(metadata.get("batch_statistics")))
    with _quiet_transformers():
        model = MultiTaskModel.from_pretrained(base_model, bundle).eval()
    data = load_front_data(data_file, model, tokenizer, **data_options)
    return data_front_report(model, data, out, points, batch_size, progress=not quiet)


def _read_multitask_metadata(bundle: str) -> dict[str, Any]:
    if not os.path.isfile(os.path.join(bundle, "task_heads.safetensors")):
        raise CLIError(f"{bundle} has no task_heads.safetensors: `palora front` needs a MultiTaskModel bundle.")
    path = os.path.join(bundle, "multitask_config.json")
    return _read_json_object(path, "") if os.path.isfile(path) else {}


# ---------------------------------------------------------------------------------------------------- palora front (rewards)
def _parse_reference(text: str | None, num_tasks: int) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        values = []
    if len(values) != num_tasks or not all(math.isfinite(value) for value in values):
        raise CLIError(f"--reference {text!r} must be {num_tasks} comma-separated finite numbers, one per task.")
    return values


def _load_causal_lm(bundle: str, base: str | None) -> tuple[Any, Any]:
    """The PaLoRA causal LM of `bundle` on its base (`--base`, else `<bundle>/base_model`, else the config's) and
    the tokenizer (the bundle's own if it holds one, else the base's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # PeftModel knows the PALORA type: importing this module ran peft_palora/__init__, which registers it.
    source = base or _bundled_base(bundle) or _read_config(bundle).get("base_model_name_or_path")
    if not source:
        raise CLIError("the bundle names no base model and has no base_model/ folder; pass --base.")
    _check_model_source(source)
    with _quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot load the causal LM {source!r} ({_one_line(error)})") from None
        tokenizer = None
        for place in (bundle, source):
            if place == bundle and not os.path.isfile(os.path.join(bundle, "tokenizer_config.json")):
                continue
            try:
                tokenizer = AutoTokenizer.from_pretrained(place)
                break
            except (OSError, ValueError, TypeError, KeyError):
                continue
        if tokenizer is None:
            raise CLIError(f"no tokenizer found in the bundle or in {source!r}: save the tokenizer with the base.")
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # batched generation pads (on the left)
        model = PeftModel.from_pretrained(model, bundle).eval()
    return model, tokenizer


def run_reward_front(
    bundle: str, out: str, prompts_file: str, rewards: Sequence[str], base: str | None = None, points: int = 11,
    batch_size: int = 1000, max_new_tokens: int = 32, reference: str | None = None, prompt_column: str = "prompt",
    data_format: str | None = None, max_samples: int | None = None,
) -> dict[str, Any]:
    """The reward front of a causal-LM bundle: `peft_palora.alignment.front.reward_front_report` over
    `simplex_grid(T, points)` (greedy generation), scored by the user's reward functions (`rewards`, each
    `objective=module:function`, imported and run by `load_reward_functions`). Writes `front.csv`, `front.json`,
    `completions.jsonl` and the plots to `out`."""
    for name, value, least in (("--points", points, 2), ("--batch_size", batch_size, 1),
                               ("--max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CLIError(f"{name} must be an integer >= {least}, got {value!r}.")
    config = _read_config(bundle)
    if config.get("task_type") != "CAUSAL_LM":
        raise CLIError(f"--prompts measures a causal-LM bundle (task_type CAUSAL_LM); {bundle} has task_type "
                       f"{config.get('task_type')!r}. Use --data FILE for a MultiTaskModel bundle.")
    task_names = config.get("task_names") or [str(task) for task in range(config["num_tasks"])]
    reference_point = _parse_reference(reference, len(task_names))
    from peft_palora.alignment.front import load_reward_functions, reward_front_report
    from peft_palora.fronts.data import read_prompts

    prompts = read_prompts(prompts_file, prompt_column, data_format, max_samples)
    functions = load_reward_functions(rewards, task_names)
    model, tokenizer = _load_causal_lm(bundle, base)
    return reward_front_report(model, prompts, functions, points, out, processing_class=tokenizer,
                               reference=reference_point, batch_size=batch_size, max_new_tokens=max_new_tokens)


def cmd_front(args: argparse.Namespace) -> int:
    if args.prompts is not None or args.reward:
        return _cmd_reward_front(args)
    if args.max_new_tokens is not None or args.reference is not None or args.prompt_column is not None:
        raise CLIError("--max_new_tokens, --reference and --prompt_column apply to --prompts FILE only.")
    if args.data is None:
        if args.input_column or args.label_columns or args.data_format:
            raise CLIError("--input_column, --label_columns and --data_format apply to --data FILE only.")
        raise CLIError(
            "--data FILE is required: the data to evaluate on (examples/train_mtl.py writes its test split as "
            "eval.parquet next to the bundle)."
        )
    options = ("input_column", "label_columns", "data_format", "max_samples", "max_length", "image_size")
    report = run_front(
        _bundle_dir(args.adapter, args.revision), args.out, args.data, base=args.base, points=args.points,
        batch_size=args.batch_size, quiet=args.quiet, **{name: getattr(args, name) for name in options},
    )
    print(f"hypervolume ({report['metric']}, reference {report['reference']}): {report['hypervolume']:.4f}")
    print(f"table: {report['table']}")
    print(f"report: {report['json']}")
    for plot in report["plots"]:
        print(f"plot: {plot}")
    return 0


def _cmd_reward_front(args: argparse.Namespace) -> int:
    if args.data is not None:
        raise CLIError("give --data FILE (a MultiTaskModel bundle's labelled data) or --prompts FILE with --reward "
                       "(a causal-LM bundle's reward front), not both.")
    if args.prompts is None:
        raise CLIError("--reward needs --prompts FILE: the prompts to generate from.")
    if not args.reward:
        raise CLIError("--prompts needs one --reward OBJECTIVE=MODULE:FUNCTION per task of the bundle.")
    if args.input_column or args.label_columns or args.image_size is not None:
        raise CLIError("--input_column, --label_columns and --image_size apply to --data FILE only.")
    report = run_reward_front(
        _bundle_dir(args.adapter, args.revision), args.out, args.prompts, args.reward, base=args.base,
        points=args.points, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or 32,
        reference=args.reference, prompt_column=args.prompt_column or "prompt", data_format=args.data_format,
        max_samples=args.max_samples,
    )
    reference = ", ".join(f"{value:g}" for value in report["reference"])
    print(f"hypervolume (mean reward, reference [{reference}]): {report['hypervolume']:.4f}")
    consistency = report.get("mean_spearman")
    print(f"non-dominated points: {report['num_non_dominated']} of {len(report['front'])}; preference consistency "
          f"(mean Spearman): {'n/a' if consistency is None else format(consistency, '.3f')}")
    print(f"table: {report['table']}")
    print(f"report: {report['json']}")
    print(f"completions: {report['completions']}")
    for plot in report["plots"]:
        print(f"plot: {plot}")
    return 0


# ---------------------------------------------------------------------------------------------------- export-lora
def _parse_preference(text: str | None) -> list[float] | None:
    """`--preference 0.7,0.3` -> [0.7, 0.3]; the simplex check itself is the library's."""
    try:
        return None if text is None else [float(item) for item in text.split(",")]
    except ValueError:
        raise CLIError(f"--preference {text!r} must be comma-separated numbers, e.g. 0.7,0.3.") from None


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


def cmd_export_task_loras(args: argparse.Namespace) -> int:
    bundle = _bundle_dir(args.adapter, args.revision)
    _read_config(bundle)
    if args.base is not None:
        _check_model_source(args.base)
    if os.path.isfile(args.out):
        raise CLIError(f"--out {args.out!r} is a file; give a folder.")
    from peft_palora.interop.lora import export_task_loras_from_bundle

    with _quiet_transformers():
        path = export_task_loras_from_bundle(bundle, args.out, base=args.base)
    print(f"task LoRAs: {path} (mixing rule: {os.path.join(path, 'palora_tasks.json')})")
    return 0


# ---------------------------------------------------------------------------------------------------- the parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _grid_points(text: str) -> int:
    if _positive_int(text) < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 points per simplex side, got {text}")
    return int(text)


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

    front = commands.add_parser(
        "front", help="evaluate a bundle over a preference grid: table, hypervolume, plots",
        epilog="example (the bundle and test split examples/train_mtl.py writes): palora front outputs/train_mtl "
        "--data outputs/train_mtl/eval.parquet --out front/ . Reward front of a causal-LM bundle (imports and runs "
        "mypkg/rewards.py): palora front aligned/ --prompts prompts.txt --reward helpful=mypkg.rewards:helpful "
        "--reward brief=mypkg.rewards:brief --points 11 --out front/",
    )
    front.add_argument("adapter", help="a bundle folder (a MultiTaskModel bundle with task_heads.safetensors for "
                       "--data; a causal-LM PaLoRA bundle for --prompts) or a Hub repo id")
    front.add_argument("--base", help="base model folder or Hub id; default: the bundle's base_model/ or config")
    front.add_argument("--points", type=_grid_points, default=11, help="grid points per simplex side (11: steps of 0.1)")
    front.add_argument("--out", required=True, help="output folder for front.json, front.csv and the plots "
                       "(and completions.jsonl for --prompts)")
    front.add_argument("--max_samples", type=_positive_int, default=None, help="evaluate on the first N samples")
    front.add_argument("--batch_size", type=_positive_int, default=1000,
                       help="evaluation batch (batch-norm models that use batch statistics depend on it); rows "
                       "per generate call for --prompts")
    front.add_argument("--revision", help="Hub revision of the bundle")
    front.add_argument("--quiet", action="store_true", help="no progress bar")
    own = front.add_argument_group("the data")
    own.add_argument("--data", metavar="FILE", help="the local .csv, .tsv, .json, .jsonl or .parquet file to evaluate "
                     "on (required); examples/train_mtl.py writes its test split as OUTPUT_DIR/eval.parquet")
    own.add_argument("--data_format", choices=sorted(set(DATA_FORMATS.values())),
                     help="the --data (or table --prompts) file's format when its extension does not tell")
    own.add_argument("--input_column", help="the column of model inputs: text, images (or image paths), or arrays")
    own.add_argument("--label_columns", metavar="TASK=COLUMN,...",
                     help="the integer class labels of each task, e.g. left=digit_left,right=digit_right")
    own.add_argument("--max_length", type=_positive_int, default=128, help="token limit for text inputs")
    own.add_argument("--image_size", type=_positive_int, default=None,
                     help="side images are resized to (default: the model config's image_size, else 28)")
    lm = front.add_argument_group(
        "the reward front of a causal-LM bundle",
        "--prompts FILE and one --reward per task instead of --data: greedy generation at every preference, scored "
        "by your reward functions. The reward modules are YOUR code: they are imported and run (a dotted module "
        "name is searched in the current directory first, like `python -m`).",
    )
    lm.add_argument("--prompts", metavar="FILE", help="the prompts: one per line of a .txt file, or a column of a "
                    ".csv, .tsv, .json, .jsonl or .parquet file (--prompt_column)")
    lm.add_argument("--prompt_column", help="the prompts' column in a table file (default: prompt)")
    lm.add_argument("--reward", action="append", default=[], metavar="OBJECTIVE=MODULE:FUNCTION",
                    help="the reward function of one task, e.g. helpful=mypkg.rewards:helpful or "
                    "brief=rewards.py:brief; FUNCTION(prompts=[...], completions=[...]) returns one float per "
                    "completion (TRL's reward-function signature). Repeat once per task of the bundle")
    lm.add_argument("--max_new_tokens", type=_positive_int, default=None, help="tokens generated per completion "
                    "(default 32)")
    lm.add_argument("--reference", metavar="R1,R2,...", help="hypervolume reference, one reward per task (default: "
                    "the worst mean reward of each task minus 10%% of its range; fix it to compare bundles)")
    front.set_defaults(func=cmd_front)

    export = commands.add_parser("export-lora", help="write one point of the front as a standard PEFT LoRA bundle")
    export.add_argument("adapter", help="a PaLoRA bundle folder or a Hub repo id")
    export.add_argument("--preference", help="comma-separated weights summing to 1, in task order (default: uniform)")
    export.add_argument("--out", required=True, help="folder for the LoRA bundle")
    export.add_argument("--base", help="base model folder; default: the bundle's base_model/ or config")
    export.add_argument("--revision", help="Hub revision of the bundle")
    export.set_defaults(func=cmd_export_lora)

    tasks = commands.add_parser(
        "export-task-loras", help="write every task adapter as a standard PEFT LoRA bundle, plus palora_tasks.json"
    )
    tasks.add_argument("adapter", help="a PaLoRA bundle folder or a Hub repo id")
    tasks.add_argument("--out", required=True, help="folder for the task LoRAs (one subfolder per task)")
    tasks.add_argument("--base", help="base model folder; default: the bundle's base_model/ or config")
    tasks.add_argument("--revision", help="Hub revision of the bundle")
    tasks.set_defaults(func=cmd_export_task_loras)
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
        if isinstance(error, _USER_ERRORS):
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
