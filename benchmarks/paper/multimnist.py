"""Reproduce the PaLoRA paper's MultiMNIST experiment (and MultiFashion, Fashion+MNIST) against PaMaL, LS and STL.

Setting (the paper's code, github.com/nik-dim/palora, configs/experiment/multimnist): MultiLeNet (shared LeNet encoder,
one 2-layer head per task), real MNIST digits composed into MultiMNIST (``recipes.multimnist``), Adam with
lr 1e-3, batch 256, 10 epochs. PaLoRA: r = 1 on every convolution and linear layer (heads included), base weights
trained, adapters at lr x T; the two 5x5 convolutions get rank 5 (``rank_pattern``), the inner dimension r x k of the
matrix product ``B (out*k, r*k) @ A (r*k, in*k)`` behind the paper code's r = 1 convolution adapters (the kernel delta
that product is reshaped into is full rank; PEFT's layout at rank 5 gives one of rank at most 5).
``palora_conv_r1`` keeps rank 1 there, for comparison, and ``palora_paper_conv`` uses
``PaLoRAConfig(conv_layout="paper")`` with r = 1 everywhere, where the installed library has that option. The
deterministic annealed schedule (``AnnealedGridSampler``, mul 5, epsilon 0.01) with a window of ``--window``
preferences per step whose scalarised losses are summed. Baselines on the same data and budget: PaMaL (T full weight
copies mixed by the preference, window 4 as in the paper code's PaMaL config) sampled as in its own paper (``pamal``:
Dirichlet(1) rays, p = 1 in that config) and with PaLoRA's annealed schedule (``pamal_annealed``), linear
scalarisation at equal weights, and one single-task model per task.

``--dataset multifashion`` (two Fashion-MNIST items) and ``--dataset fashion_mnist`` (a digit top-left, an item
bottom-right) are built the same way (``paper_datasets.py``, Fashion-MNIST from Debian's ``dataset-fashion-mnist``).
``--input_scale 255`` multiplies the [0, 1] pixels by 255 (the official generator's commented-out resize path gives
0-255 inputs).

Evaluation on the 10k test images at the 11 preferences ``[p, 1 - p]``, p = 0, 0.1, ..., 1 (p weighs the left
task): per-task accuracy and loss, and the hypervolume of the (loss_left, loss_right) points with reference (1, 1),
the protocol of the paper code's results file ``src/callbacks/utils/results/multimnist.json``. The aggregated tables
add the paired per-seed difference PaLoRA - PaMaL with its mean and 95% Student-t interval, and list missing runs.

Each seed is written to ``<output_dir>/<stem>_seed<N>.json`` as soon as a method is done; the tables
(``<stem>.md``/``.json``) and the plot (``<stem>_front.png``) aggregate every seed file of the same setting, so seeds
and methods may be run by separate invocations. ``<stem>`` is the dataset, plus ``_scale<S>`` for another input scale
and ``_paperconv`` for ``--conv_layout paper`` (e.g. ``multimnist``, ``multimnist_scale255``, ``multifashion``):

    python benchmarks/paper/multimnist.py --seeds 0 --methods palora pamal
    python benchmarks/paper/multimnist.py --seeds 0 --methods pamal_annealed ls stl --input_scale 255
    python benchmarks/paper/multimnist.py --seeds 0 --dataset multifashion
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

# This folder (shared modules) and the repository root (peft_palora, for a checkout that is not pip-installed).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "examples")]

import numpy as np  # noqa: E402
import paper_training as pt  # noqa: E402
from paper_datasets import DATASET_LABELS, DATASETS  # noqa: E402
from paper_models import MULTIMNIST_TASKS  # noqa: E402

from peft_palora.preferences import AnnealedGridSampler, DirichletSampler  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("palora", "palora_conv_r1", "palora_paper_conv", "pamal", "pamal_annealed", "ls", "stl")
#: What runs without --methods. ``palora_paper_conv`` needs ``PaLoRAConfig(conv_layout="paper")``; name it to run it.
DEFAULT_METHODS = ("palora", "palora_conv_r1", "pamal", "pamal_annealed", "ls", "stl")
FRONT_METHODS = ("palora", "palora_conv_r1", "palora_paper_conv", "pamal", "pamal_annealed")
PALORA_METHODS = ("palora", "palora_conv_r1", "palora_paper_conv")
PAMAL_METHODS = ("pamal", "pamal_annealed")
#: Settings added after the first seed files were written, at the value those runs had.
SETTING_DEFAULTS = {"dataset": "multimnist", "input_scale": 1.0, "conv_layout": "peft"}
# The paper code's r=1 adapter on a 5x5 convolution is B (out*5, 5) @ A (5, in*5): r * k = 5 inner directions of
# the matrix product. Reshaped into the kernel, that product is a full-rank delta; PEFT's layout at rank 5 is rank <= 5.
PAPER_CONV_RANKS = ("conv1=5", "conv2=5")
# The paper code's public results file (same protocol): mean test loss-hypervolume over 3 seeds.
PAPER_REFERENCE = {"multimnist": {"PaMaL": 0.752, "NashMTL": 0.729, "LS": 0.717}}
LABELS = {
    "palora": "PaLoRA",
    "palora_conv_r1": "PaLoRA, rank-1 conv adapters",
    "palora_paper_conv": "PaLoRA, paper's conv layout (r=1)",
    "pamal": "PaMaL (Dirichlet(1) rays)",
    "pamal_annealed": "PaMaL (annealed schedule)",
    "ls": "LS (equal weights)",
    "stl": "STL (one model per task)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pt.add_run_arguments(parser, epochs=10, methods=METHODS, default_methods=DEFAULT_METHODS, results_dir=RESULTS_DIR)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=1.0, help="PaLoRA's palora_alpha (adapter scale alpha / r).")
    parser.add_argument(
        "--rank_pattern",
        nargs="*",
        default=None,
        metavar="LAYER=RANK",
        help="Per-layer PaLoRA ranks (PaLoRAConfig.rank_pattern). Default with --conv_layout peft: rank 5 = r x "
        "kernel size on the two 5x5 convolutions, the inner dimension of the matrix product B (out*k, r*k) @ "
        "A (r*k, in*k) of the paper code's r=1 convolution adapters (not the rank of its kernel delta, which is full); "
        "the linear layers keep r. Those layers keep the scale alpha / r of the others (their palora_alpha is "
        "RANK * alpha / rank). Default with --conv_layout paper: none (r everywhere). The methods palora_conv_r1 "
        "and palora_paper_conv ignore this flag and use rank r everywhere.",
    )
    parser.add_argument(
        "--dataset",
        default="multimnist",
        choices=tuple(DATASETS),
        help="multimnist (two digits), multifashion (two Fashion-MNIST items) or fashion_mnist (a digit top-left, a "
        "Fashion-MNIST item bottom-right); see paper_datasets.py.",
    )
    parser.add_argument(
        "--input_scale",
        type=_positive_float,
        default=1.0,
        help="Multiply the [0, 1] pixels by this (255: the 0-255 inputs of the official generator's commented-out "
        "resize path). Results of another scale go to files with a _scale<S> suffix.",
    )
    parser.add_argument(
        "--conv_layout",
        default="peft",
        choices=("peft", "paper"),
        help="Convolution adapter layout of the palora and palora_conv_r1 methods, passed to "
        "PaLoRAConfig(conv_layout=...); 'paper' needs a library whose PaLoRAConfig has that field. Results with "
        "'paper' go to files with a _paperconv suffix. (The method palora_paper_conv always uses 'paper'.)",
    )
    parser.add_argument(
        "--window_mode",
        default="sequential",
        choices=("sequential", "batched"),
        help="PaLoRA's window as one forward per preference (as the paper's code; faster on CPU here) or one forward "
        "over the repeated batch with per-sample preferences. Both give the same losses.",
    )
    parser.add_argument("--mul", type=float, default=5.0)
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument(
        "--eval_split",
        default="test",
        choices=("test", "validation"),
        help="Where the fronts are evaluated: the 10k test images, or MNIST's 10k validation digits (for tuning "
        "the settings the paper leaves open without looking at the test set).",
    )
    parser.add_argument(
        "--log_every_epoch",
        action="store_true",
        help="Evaluate PaLoRA and PaMaL on the evaluation split after every epoch and store the loss hypervolumes in "
        "the result (`epoch_hypervolumes`), for the convergence curves of convergence.py. Training is unchanged.",
    )
    args = parser.parse_args(argv)
    needs_layout = args.conv_layout == "paper" or "palora_paper_conv" in args.methods
    if needs_layout and not args.aggregate_only and not pt.config_supports_conv_layout():
        parser.error(
            "--conv_layout paper and the method palora_paper_conv need PaLoRAConfig(conv_layout='paper'), but the "
            "installed peft_palora.PaLoRAConfig has no `conv_layout` field."
        )
    return args


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def prefix(args: argparse.Namespace) -> str:
    """Stem of the result files: the dataset, then ``_scale<S>`` and ``_paperconv`` for non-default settings."""
    stem = args.dataset
    if args.input_scale != 1:
        stem += f"_scale{args.input_scale:g}"
    if args.conv_layout != "peft":
        stem += f"_{args.conv_layout}conv"
    return stem


def setting(args: argparse.Namespace) -> dict:
    """What must match for seed files to be aggregated together."""
    keys = ("epochs", "batch_size", "lr", "rank", "alpha", "window", "mul", "epsilon", "num_train", "num_test")
    keys += ("max_steps", "eval_split", "dataset", "input_scale", "conv_layout")
    return {key: getattr(args, key) for key in keys} | {"rank_pattern": rank_pattern(args)}


def rank_pattern(args: argparse.Namespace) -> dict[str, int]:
    items = args.rank_pattern
    if items is None:
        items = PAPER_CONV_RANKS if args.conv_layout == "peft" else ()
    pattern = {}
    for item in items:
        layer, _, rank = item.partition("=")
        if not layer or not rank.isdigit() or int(rank) < 1:
            raise SystemExit(f"--rank_pattern: expected LAYER=RANK with RANK >= 1, got {item!r}")
        pattern[layer] = int(rank)
    return pattern


# ---------------------------------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------------------------------
def run_palora(args, seed, train_data, test_data, conv_r1: bool = False, paper_conv: bool = False) -> dict:
    pattern = {} if conv_r1 or paper_conv else rank_pattern(args)
    layout = "paper" if paper_conv or args.conv_layout == "paper" else None  # None: the config's default (PEFT's)
    model = pt.build_palora(seed, rank=args.rank, alpha=args.alpha, rank_pattern=pattern, conv_layout=layout)
    sampler = AnnealedGridSampler(len(MULTIMNIST_TASKS), args.window, mul=args.mul, epsilon=args.epsilon)
    return pt.train_front(
        "palora",
        model,
        sampler,
        args,
        seed,
        train_data,
        test_data,
        name=f"palora seed {seed}",
        epoch_prefs=pt.EVAL_PREFERENCES if args.log_every_epoch else None,
        store_curve=args.log_every_epoch,
        window_mode=args.window_mode,
    )


def run_pamal(args, seed, train_data, test_data, annealed: bool = False) -> dict:
    """PaMaL with its own paper's sampling, a fresh window of Dirichlet(1) preferences every step (the paper code's
    PaMaL config sets the Dirichlet concentration p = 1), or with PaLoRA's deterministic annealed schedule."""
    num_tasks = len(MULTIMNIST_TASKS)
    if annealed:
        sampler = AnnealedGridSampler(num_tasks, args.window, mul=args.mul, epsilon=args.epsilon)
    else:
        sampler = DirichletSampler(num_tasks, args.window, concentration=1.0, seed=seed)
    return pt.train_front(
        "pamal",
        pt.build_pamal(seed),
        sampler,
        args,
        seed,
        train_data,
        test_data,
        name=f"pamal{'_annealed' if annealed else ''} seed {seed}",
        epoch_prefs=pt.EVAL_PREFERENCES if args.log_every_epoch else None,
        store_curve=args.log_every_epoch,
    )


def run_seed(args, seed, train_data, test_data) -> dict:
    runners = {
        "palora": run_palora,
        "palora_conv_r1": lambda *a: run_palora(*a, conv_r1=True),
        "palora_paper_conv": lambda *a: run_palora(*a, paper_conv=True),
        "pamal": run_pamal,
        "pamal_annealed": lambda *a: run_pamal(*a, annealed=True),
        "ls": lambda *a: pt.train_plain(*a, weights=pt.equal_weights(MULTIMNIST_TASKS)),
        "stl": pt.train_stl,
    }
    return pt.run_methods(
        Path(args.output_dir) / f"{prefix(args)}_seed{seed}.json",
        seed,
        setting(args),
        args.methods,
        lambda method: runners[method](args, seed, train_data, test_data),
        defaults=SETTING_DEFAULTS,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def summarise(seed_results: list[dict]) -> dict:
    """Per method, over the seeds that ran it (``seeds``): hypervolumes, mean front, training time."""
    fields = {"train_seconds": lambda runs: [run["train_seconds"] for run in runs]}
    return pt.summarise(seed_results, METHODS, fields | {"parameters": lambda runs: runs[0]["parameters"]})


def paired_differences(seed_results: list[dict]) -> list[dict]:
    """PaLoRA - PaMaL loss hypervolume per seed (the seeds that ran both), its mean and 95% t-interval."""
    rows = []
    for palora in PALORA_METHODS:
        for pamal in PAMAL_METHODS:
            having = pt.having(seed_results, palora, pamal)
            if not having:
                continue
            stats = pt.paired_difference(
                [r["methods"][palora]["hypervolume"] for r in having],
                [r["methods"][pamal]["hypervolume"] for r in having],
            )
            rows.append({"palora": palora, "pamal": pamal, "seeds": [r["seed"] for r in having]} | stats)
    return rows


def missing_runs(seed_results: list[dict]) -> list[dict]:
    """(method, seed) pairs of the default methods (and any other method run on some seed) absent from a seed."""
    expected = [m for m in METHODS if m in DEFAULT_METHODS or pt.having(seed_results, m)]
    return [{"method": m, "seed": r["seed"]} for m in expected for r in seed_results if m not in r["methods"]]


def end_checks(seed_results: list[dict]) -> list[dict]:
    """PaLoRA at each end of the front against the best baseline for the task that end favours, on the seeds that
    ran PaLoRA, LS and STL (PaMaL variants count where they ran on all of those seeds).

    Row 0 of the grid is [0, 1] (all weight on the right digit), row 10 is [1, 0] (left digit).
    """
    seed_results = pt.having(seed_results, "palora", "ls", "stl")
    if not seed_results:
        return []
    rows = []
    for task_index, grid_row in ((0, -1), (1, 0)):
        palora = [r["methods"]["palora"]["accuracy"][grid_row][task_index] for r in seed_results]
        candidates = {
            f"{LABELS[m]} at the same end": [r["methods"][m]["accuracy"][grid_row][task_index] for r in seed_results]
            for m in PAMAL_METHODS
            if all(m in r["methods"] for r in seed_results)
        } | {
            "STL": [r["methods"]["stl"]["accuracy"][0][task_index] for r in seed_results],
            "LS": [r["methods"]["ls"]["accuracy"][0][task_index] for r in seed_results],
        }
        best_name = max(candidates, key=lambda name: np.mean(candidates[name]))
        gap = float(100 * (np.mean(palora) - np.mean(candidates[best_name])))
        rows.append(
            {
                "task": MULTIMNIST_TASKS[task_index],
                "seeds": [r["seed"] for r in seed_results],
                "preference": seed_results[0]["methods"]["palora"]["preferences"][grid_row],
                "palora": palora,
                "best_baseline": best_name,
                "best_baseline_accuracy": candidates[best_name],
                "gap_points": gap,
                "within_0.5": bool(gap >= -0.5),
            }
        )
    return rows


def _title(config: dict) -> str:
    title = DATASET_LABELS[config.get("dataset", "multimnist")]
    if config.get("input_scale", 1.0) != 1:
        title += f", inputs x {config['input_scale']:g}"
    if config.get("conv_layout", "peft") != "peft":
        title += f", {config['conv_layout']} conv layout"
    return title


def write_markdown(seed_results, summary, checks, paired, missing, path) -> None:
    seeds = [r["seed"] for r in seed_results]
    config = seed_results[0]["config"]
    dataset = config.get("dataset", "multimnist")
    lines = [
        f"# {_title(config)}: PaLoRA against PaMaL, LS and STL",
        "",
        f"Dataset {DATASET_LABELS[dataset]} ({dataset}), input scale {config.get('input_scale', 1.0):g} (pixels in "
        f"[0, {config.get('input_scale', 1.0):g}]); seeds {seeds}; {config['epochs']} epochs, batch "
        f"{config['batch_size']}, Adam lr {config['lr']}, window {config['window']} (PaLoRA and PaMaL), PaLoRA rank "
        f"{config['rank']} with rank_pattern {config['rank_pattern']}, conv layout "
        f"{config.get('conv_layout', 'peft')} and palora_alpha {config['alpha']} (the scale alpha / r is the same on "
        f"every layer; 'rank-1 conv adapters': rank {config['rank']} everywhere), schedule mul {config['mul']} "
        f"epsilon {config['epsilon']}; train images: {config['num_train'] or 'all 50000'}, "
        f"{config['eval_split']} images: {config['num_test'] or 'all 10000'}, max_steps: {config['max_steps']}. "
        "Values are mean ± sample std over the seeds that ran the method. Hypervolume: (loss_left, loss_right) points, "
        "reference (1, 1), larger is better.",
        "",
        "| method | seeds | parameters | loss hypervolume | acc left (%) | acc right (%) | train s / seed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, stats in summary.items():
        runs = [r["methods"][method] for r in pt.having(seed_results, method)]
        if runs[0]["preferences"] is None:
            acc_left = pt.fmt([run["accuracy"][0][0] for run in runs], 100, 2)
            acc_right = pt.fmt([run["accuracy"][0][1] for run in runs], 100, 2)
        else:  # the end of the front that favours each task
            acc_left = pt.fmt([run["accuracy"][-1][0] for run in runs], 100, 2) + " (at [1, 0])"
            acc_right = pt.fmt([run["accuracy"][0][1] for run in runs], 100, 2) + " (at [0, 1])"
        lines.append(
            f"| {LABELS[method]} | {', '.join(map(str, stats['seeds']))} | {stats['parameters']:,} "
            f"| {pt.fmt(stats['hypervolume'], digits=4)} | {acc_left} | {acc_right} "
            f"| {np.mean(stats['train_seconds']):.0f} |"
        )
    lines += [
        "",
        "Missing runs: "
        + (
            "none."
            if not missing
            else ", ".join(f"{LABELS[row['method']]} seed {row['seed']}" for row in missing) + "."
        ),
    ]
    if dataset in PAPER_REFERENCE:
        lines += [
            "",
            "Reference (the paper code's results file, its own MultiMNIST data, 3 seeds): "
            + ", ".join(f"{k} {v}" for k, v in PAPER_REFERENCE[dataset].items())
            + ".",
        ]
    if paired:
        lines += [
            "",
            "## Paired per-seed difference of loss hypervolume, PaLoRA - PaMaL",
            "",
            "Same seed = same initialisation seed, data order and data. 95% interval: Student t with n - 1 degrees of "
            "freedom on the per-seed differences (none for a single seed).",
            "",
            "| PaLoRA | PaMaL | seeds | per-seed differences | mean | 95% interval |",
            "| --- | --- | --- | --- | ---: | --- |",
        ]
        for row in paired:
            interval = "-" if row["interval"] is None else f"[{row['interval'][0]:+.4f}, {row['interval'][1]:+.4f}]"
            lines.append(
                f"| {LABELS[row['palora']]} | {LABELS[row['pamal']]} | {', '.join(map(str, row['seeds']))} "
                f"| {', '.join(f'{d:+.4f}' for d in row['differences'])} | {row['mean']:+.4f} | {interval} |"
            )
    for method in FRONT_METHODS:
        if method not in summary:
            continue
        runs = [r["methods"][method] for r in pt.having(seed_results, method)]
        lines += [
            "",
            f"## {LABELS[method]} at each preference [p, 1 - p] ({config['eval_split']} set)",
            "",
            "| p (left weight) | acc left (%) | acc right (%) | loss left | loss right |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for i, pref in enumerate(runs[0]["preferences"]):
            lines.append(
                f"| {pref[0]:.1f} | {pt.fmt([r['accuracy'][i][0] for r in runs], 100, 2)} "
                f"| {pt.fmt([r['accuracy'][i][1] for r in runs], 100, 2)} "
                f"| {pt.fmt([r['loss'][i][0] for r in runs], digits=4)} "
                f"| {pt.fmt([r['loss'][i][1] for r in runs], digits=4)} |"
            )
    if checks:
        lines += [
            "",
            f"## Ends of the PaLoRA front against the best baseline for that task (seeds {checks[0]['seeds']})",
            "",
            "| task | PaLoRA at | PaLoRA acc (%) | best baseline | its acc (%) | gap (points) | within 0.5 |",
            "| --- | --- | ---: | --- | ---: | ---: | --- |",
        ]
        for row in checks:
            lines.append(
                f"| {row['task']} | {row['preference']} | {pt.fmt(row['palora'], 100, 2)} | {row['best_baseline']} "
                f"| {pt.fmt(row['best_baseline_accuracy'], 100, 2)} | {row['gap_points']:+.2f} "
                f"| {'yes' if row['within_0.5'] else 'no'} |"
            )
    for other in PAMAL_METHODS:
        having = pt.having(seed_results, "palora", other)
        if having:
            gaps = 100 * np.mean(
                [
                    np.array(r["methods"]["palora"]["accuracy"]) - np.array(r["methods"][other]["accuracy"])
                    for r in having
                ],
                axis=0,
            )
            lines += [
                "",
                f"PaLoRA - {LABELS[other]} accuracy at the same preference (points, mean over seeds "
                f"{[r['seed'] for r in having]}), p = 0 ... 1: left {np.round(gaps[:, 0], 2).tolist()}, right "
                f"{np.round(gaps[:, 1], 2).tolist()}.",
            ]
    pt.atomic_write_text(path, "\n".join(lines) + "\n")


def plot(seed_results, summary, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = {
        "palora": ("tab:red", "o-"),
        "palora_conv_r1": ("tab:orange", "v--"),
        "palora_paper_conv": ("tab:purple", "P-"),
        "pamal": ("tab:blue", "s-"),
        "pamal_annealed": ("tab:cyan", "^-"),
        "ls": ("tab:green", "D"),
        "stl": ("black", "*"),
    }
    for method, stats in summary.items():
        color, style = styles[method]
        for ax, key, scale in ((axes[0], "loss_mean", 1.0), (axes[1], "accuracy_mean", 100.0)):
            points = np.array(stats[key]) * scale
            label = f"{LABELS[method]} (HV {stats['hypervolume_mean_std'][0]:.4f}, {len(stats['seeds'])} seeds)"
            ax.plot(
                points[:, 0], points[:, 1], style, color=color, label=label, markersize=9 if len(points) == 1 else 5
            )
            for run in pt.having(seed_results, method):  # each seed, faintly
                seed_points = np.array(run["methods"][method]["loss" if key == "loss_mean" else "accuracy"]) * scale
                ax.plot(seed_points[:, 0], seed_points[:, 1], style, color=color, alpha=0.2, markersize=3)
    axes[0].set(xlabel="loss, left task", ylabel="loss, right task", title="Loss front (lower is better)")
    axes[1].set(xlabel="accuracy left (%)", ylabel="accuracy right (%)", title="Accuracy front (higher is better)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    config = seed_results[0]["config"]
    figure.suptitle(
        f"{_title(config)}, {config['eval_split']} set, mean over seeds {[r['seed'] for r in seed_results]} "
        "(faint: single seeds)"
    )
    pt.atomic_save_figure(figure, path)
    plt.close(figure)


def aggregate(args) -> dict | None:
    stem = prefix(args)
    seed_results = pt.load_seed_results(args.output_dir, stem, setting(args), SETTING_DEFAULTS)
    if not seed_results:
        print("No seed results for this setting yet.")
        return None
    summary = summarise(seed_results)
    checks = end_checks(seed_results)
    paired = paired_differences(seed_results)
    missing = missing_runs(seed_results)
    out = Path(args.output_dir)
    pt.atomic_write_json(
        out / f"{stem}.json",
        {
            "config": setting(args),
            "seeds": [r["seed"] for r in seed_results],
            "summary": summary,
            "paired_differences": paired,
            "missing_runs": missing,
            "end_checks": checks,
            "paper_reference_hypervolume": PAPER_REFERENCE.get(args.dataset),
        },
    )
    write_markdown(seed_results, summary, checks, paired, missing, out / f"{stem}.md")
    plot(seed_results, summary, out / f"{stem}_front.png")
    return {
        "summary": summary,
        "end_checks": checks,
        "paired_differences": paired,
        "missing_runs": missing,
        "seeds": [r["seed"] for r in seed_results],
    }


def main(argv=None) -> dict | None:
    args = parse_args(argv)

    def load_data():
        load = functools.partial(pt.load_split, dataset=args.dataset, input_scale=args.input_scale)
        label = f"{args.dataset} x {args.input_scale:g}"
        return pt.load_train_eval(load, args.eval_split, args.num_train, args.num_test, label)

    return pt.run_benchmark(args, load_data, run_seed, aggregate)


if __name__ == "__main__":
    main()
