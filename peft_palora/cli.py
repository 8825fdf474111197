"""The `palora` command line: inspect a PaLoRA bundle, or evaluate its Pareto front over a preference grid.

```
palora info ADAPTER_DIR [--base BASE]
palora front ADAPTER_DIR_OR_HUB_ID --out DIR [--base BASE] [--dataset multimnist] [--points 11]
```

`palora front` expects a bundle saved by `MultiTaskModel.save_pretrained` (as `examples/train_mtl.py` writes it):
the adapter bundle, `task_heads.safetensors` and, for a backbone trained from scratch, its `base_model/` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME


def _bundle_dir(adapter: str, revision: str | None = None) -> str:
    """A local folder holding the bundle: `adapter` itself, or a snapshot of the Hub repo `adapter`."""
    if os.path.isdir(adapter):
        return adapter
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(adapter, revision=revision)
    except Exception as error:  # not a folder and not reachable on the Hub (offline, typo, private)
        raise SystemExit(f"palora: {adapter!r} is neither a folder nor a reachable Hub repo: {error}") from error


def _read_config(bundle: str) -> dict[str, Any]:
    from ._peft_hooks import check_local_bundle

    config = check_local_bundle(bundle)
    if config is None:
        raise SystemExit(f"palora: {os.path.join(bundle, CONFIG_NAME)} is missing or not a PaLoRA config.")
    return config


def bundle_summary(bundle: str, base: str | None = None) -> dict[str, Any]:
    """Tasks, rank, targets, parameter counts (and overhead against the base model when it can be found)."""
    from safetensors import safe_open

    config = _read_config(bundle)
    adapter_params, base_weight_params, tensors = 0, 0, 0
    layers = set()
    with safe_open(os.path.join(bundle, SAFETENSORS_WEIGHTS_NAME), framework="pt") as handle:
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
        "bundle_bytes": os.path.getsize(os.path.join(bundle, SAFETENSORS_WEIGHTS_NAME)),
        "base_model": base or _bundled_base(bundle) or config.get("base_model_name_or_path") or None,
    }
    base_params = _count_base_parameters(summary["base_model"])
    if base_params:
        summary["base_parameters"] = base_params
        summary["overhead_percent"] = 100.0 * adapter_params / base_params
    return summary


def _bundled_base(bundle: str) -> str | None:
    """The `base_model/` folder that `examples/train_mtl.py` saves next to a bundle trained from scratch."""
    path = os.path.join(bundle, "base_model")
    return path if os.path.isdir(path) else None


def _count_base_parameters(base: str | None) -> int | None:
    """Parameters of the base model, counted on the meta device (no weights are read)."""
    if not base:
        return None
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError):
        return None
    with init_empty_weights():
        model = AutoModel.from_config(config)
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


def _load_base(bundle: str, base: str | None) -> tuple[Any, Any]:
    """The base model (and tokenizer, for text models): `--base`, else `<bundle>/base_model`, else the config's."""
    from transformers import AutoModel, AutoTokenizer

    source = base or _bundled_base(bundle) or _read_config(bundle).get("base_model_name_or_path")
    if source is None:
        raise ValueError("the bundle names no base model and has no base_model/ folder; pass --base.")
    model = AutoModel.from_pretrained(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def run_front(
    bundle: str,
    out: str,
    base: str | None = None,
    dataset: str = "multimnist",
    points: int = 11,
    max_samples: int | None = None,
    batch_size: int = 1000,
    data_seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a saved multi-task bundle at every point of `simplex_grid(T, points)`; write table, report, plots."""
    import torch
    from torch.utils.data import DataLoader

    from ._atomic import atomic_write_text
    from .multitask import MultiTaskModel
    from .pareto import evaluate_front
    from .plotting import plot_metrics_vs_preference
    from .preferences import simplex_grid
    from .recipes import load_multitask_data
    from .training import evaluate_multitask, write_front_report

    base_model, tokenizer = _load_base(bundle, base)
    model = MultiTaskModel.from_pretrained(base_model, bundle).eval()
    data = load_multitask_data(
        dataset, tokenizer=tokenizer, max_eval_samples=max_samples, max_train_samples=1, seed=data_seed
    )
    if list(data.task_names) != model.task_names:
        raise ValueError(f"--dataset {dataset!r} has tasks {data.task_names}, the bundle {model.task_names}.")
    loader = DataLoader(data.eval, batch_size=batch_size, collate_fn=data.collate_fn)
    grid = simplex_grid(model.num_tasks, points)
    with torch.no_grad():
        table = evaluate_front(model, grid, lambda m: evaluate_multitask(m, loader), task_names=model.task_names)
    os.makedirs(out, exist_ok=True)
    table_path = os.path.join(out, "front.csv")
    atomic_write_text(table_path, table.to_csv(index=False))
    report = write_front_report(table, out, model.task_names, metric="accuracy")
    plots = [report["plot"]] if report.get("plot") else []
    metrics = {task: [f"{task}_accuracy"] for task in model.task_names}
    plots.append(plot_metrics_vs_preference(table, path=os.path.join(out, "accuracy_vs_preference.png"), metrics=metrics))
    return {**report, "metric": "accuracy", "table": table_path, "plots": plots}


def cmd_front(args: argparse.Namespace) -> int:
    report = run_front(
        bundle=_bundle_dir(args.adapter, args.revision),
        base=args.base,
        dataset=args.dataset,
        points=args.points,
        out=args.out,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        data_seed=args.data_seed,
    )
    print(f"hypervolume ({report['metric']}, reference {report['reference']}): {report['hypervolume']:.4f}")
    print(f"table: {report['table']}")
    print(f"report: {report['json']}")
    for plot in report["plots"]:
        print(f"plot: {plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palora", description="Inspect PaLoRA bundles and evaluate their fronts.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="tasks, rank, targets and parameter overhead of a bundle")
    info.add_argument("adapter", help="a bundle folder or a Hub repo id")
    info.add_argument("--base", help="base model (folder or Hub id) to measure the overhead against")
    info.add_argument("--revision", help="Hub revision of the bundle")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    front = commands.add_parser("front", help="evaluate a bundle over a preference grid: table, hypervolume, plots")
    front.add_argument("adapter", help="a bundle folder (with task_heads.safetensors) or a Hub repo id")
    front.add_argument("--base", help="base model folder or Hub id; default: the bundle's base_model_name_or_path")
    front.add_argument("--dataset", default="multimnist", help="multimnist, gss_wages, or a hub image dataset id")
    front.add_argument("--points", type=int, default=11, help="grid points per simplex side (11: steps of 0.1)")
    front.add_argument("--out", required=True, help="output folder for front.json, front.csv and the plots")
    front.add_argument("--max_samples", type=int, default=None, help="evaluate on the first N test samples")
    front.add_argument("--batch_size", type=int, default=1000,
                       help="evaluation batch (batch-norm models that use batch statistics depend on it)")
    front.add_argument("--data_seed", type=int, default=0, help="seed that built the dataset (as in train_mtl.py)")
    front.add_argument("--revision", help="Hub revision of the bundle")
    front.set_defaults(func=cmd_front)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"palora {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
