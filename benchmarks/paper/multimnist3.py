"""MultiMNIST-3 (three digits per image, three classification tasks): PaLoRA against PaMaL, LS and STL.

Setting (the paper code's ``configs/experiment/multimnist3``, as described to us): MultiLeNet with three heads, Adam
with lr 1e-3, batch 256, 20 epochs, and the annealed Dirichlet preference sampler
(``peft_palora.preferences.AnnealedDirichletSampler``: concentration ``1.001 -> 0.001`` over training) for both
PaLoRA and PaMaL, with a window of ``--window`` preferences per step whose scalarised losses are summed. The images
are built by ``paper_datasets.make_multimnist3`` (three MNIST digits along the diagonal of a 42x42 canvas, resized to
28x28). Methods:

* ``palora``: PEFT's convolution layout, r = 1 on the linear layers and rank 5 on the two 5x5 convolutions (the
  MultiMNIST default of ``multimnist.py``), base weights trained, adapters at lr x T;
* ``palora_paper_conv``: ``PaLoRAConfig(conv_layout="paper")`` with r = 1 everywhere;
* ``pamal``: three full weight copies mixed by the preference;
* ``ls``: one model at equal weights ``[1/3, 1/3, 1/3]``;
* ``stl``: one model per task (a three-model reference point, not a front).

Evaluation: the test set at the 66 preferences of ``simplex_grid(3, 11)``; the loss hypervolume of the
(loss_left, loss_middle, loss_right) points with reference (1, 1, 1). PaLoRA and PaMaL are also evaluated after every
epoch at the 21 preferences of ``simplex_grid(3, --epoch_grid)`` (default 6) on the first ``--epoch_num_test`` test
images (default 2,000: evaluating every preference on all 10,000 after every epoch would cost more than the epoch's
training) and their hypervolumes stored as ``epoch_hypervolumes`` (for ``convergence.py``); training is unaffected.

Each seed goes to ``<output_dir>/multimnist3_seed<N>.json`` (merged with earlier methods of the same setting); the
tables ``multimnist3.md``/``.json`` and the figure ``multimnist3_front.png`` aggregate every seed file:

    python benchmarks/paper/multimnist3.py --seeds 0 --methods palora_paper_conv pamal ls
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "examples")]

import numpy as np  # noqa: E402
import paper_training as pt  # noqa: E402
import torch  # noqa: E402
from paper_datasets import MULTIMNIST3_TASKS, make_multimnist3  # noqa: E402

from peft_palora.preferences import AnnealedDirichletSampler, simplex_grid  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEM = "multimnist3"
TASKS = MULTIMNIST3_TASKS
REFERENCE = (1.0, 1.0, 1.0)
METHODS = ("palora", "palora_paper_conv", "pamal", "ls", "stl")
PALORA_METHODS = ("palora", "palora_paper_conv")
FRONT_METHODS = ("palora", "palora_paper_conv", "pamal")
PEFT_CONV_RANKS = {"conv1": 5, "conv2": 5}
LABELS = {
    "palora": "PaLoRA (PEFT conv layout, rank 5 convs)",
    "palora_paper_conv": "PaLoRA (paper's conv layout, r=1)",
    "pamal": "PaMaL",
    "ls": "LS (equal weights)",
    "stl": "STL (one model per task)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pt.add_run_arguments(parser, epochs=20, methods=METHODS, default_methods=METHODS, results_dir=RESULTS_DIR)
    parser.add_argument("--grid", type=int, default=11, help="Points per side of the evaluation simplex grid.")
    parser.add_argument(
        "--epoch_grid", type=int, default=6, help="Points per side of the per-epoch grid (0: no per-epoch logging)."
    )
    parser.add_argument(
        "--epoch_num_test", type=int, default=2000, help="Test images of the per-epoch evaluation (the first ones)."
    )
    parser.add_argument("--input_scale", type=float, default=1.0, help="Multiply the [0, 1] pixels by this.")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "window", "epoch_num_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.grid < 2 or args.epoch_grid < 0 or args.epoch_grid == 1:
        parser.error("--grid must be >= 2 and --epoch_grid 0 or >= 2")
    if not (np.isfinite(args.input_scale) and args.input_scale > 0):
        parser.error(f"--input_scale must be a positive number, got {args.input_scale}")
    if not args.aggregate_only and "palora_paper_conv" in args.methods and not pt.config_supports_conv_layout():
        parser.error("the method palora_paper_conv needs PaLoRAConfig(conv_layout='paper').")
    return args


def setting(args: argparse.Namespace) -> dict:
    keys = ("epochs", "batch_size", "lr", "window", "grid", "epoch_grid", "epoch_num_test", "input_scale", "num_train",
            "num_test")
    return {key: getattr(args, key) for key in keys + ("max_steps",)}


def load(split: str, num_samples: int | None, input_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = make_multimnist3(split, num_samples=num_samples, seed=0)
    return (images * float(input_scale) if input_scale != 1 else images).contiguous(), labels


# ---------------------------------------------------------------------------------------------------------------------
# One seed: multimnist.py's machinery (paper_training.py) on three tasks, the annealed Dirichlet sampler and a grid
# ---------------------------------------------------------------------------------------------------------------------
def run_front(kind, model, args, seed, train_data, test_data, name) -> dict:
    return pt.train_front(
        kind,
        model,
        AnnealedDirichletSampler(len(TASKS), args.window, seed=seed),
        args,
        seed,
        train_data,
        test_data,
        name=f"{name} seed {seed}",
        prefs=simplex_grid(len(TASKS), args.grid),
        epoch_prefs=simplex_grid(len(TASKS), args.epoch_grid) if args.epoch_grid else None,
        epoch_test_data=tuple(tensor[: args.epoch_num_test] for tensor in test_data),
        store_curve=True,
        reference=REFERENCE,
    )


def run_palora(args, seed, train_data, test_data, paper_conv: bool = False) -> dict:
    if paper_conv:
        model = pt.build_palora(seed, conv_layout="paper", task_names=TASKS)
    else:
        model = pt.build_palora(seed, rank_pattern=PEFT_CONV_RANKS, task_names=TASKS)
    return run_front(
        "palora", model, args, seed, train_data, test_data, "palora_paper_conv" if paper_conv else "palora"
    )


def run_seed(args, seed, train_data, test_data) -> dict:
    runners = {
        "palora": run_palora,
        "palora_paper_conv": lambda *a: run_palora(*a, paper_conv=True),
        "pamal": lambda *a: run_front("pamal", pt.build_pamal(seed, task_names=TASKS), *a, name="pamal"),
        "ls": lambda *a: pt.train_plain(*a, weights=pt.equal_weights(TASKS), task_names=TASKS),
        "stl": lambda *a: pt.train_stl(*a, task_names=TASKS),
    }
    return pt.run_methods(
        Path(args.output_dir) / f"{STEM}_seed{seed}.json",
        seed,
        setting(args),
        args.methods,
        lambda method: runners[method](args, seed, train_data, test_data),
        reference=REFERENCE,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def summarise(seed_results: list[dict]) -> dict:
    fields = {
        "hypervolume_mean_std": lambda runs: list(pt.mean_std([run["hypervolume"] for run in runs])),
        "preferences": lambda runs: runs[0]["preferences"],
        "parameters": lambda runs: runs[0]["parameters"],
        "train_seconds": lambda runs: float(np.mean([run["train_seconds"] for run in runs])),
    }
    return pt.summarise(seed_results, METHODS, fields)


def paired_differences(seed_results: list[dict]) -> dict:
    """PaLoRA - PaMaL hypervolume on the seeds that ran both (mean and 95% Student-t interval)."""
    out = {}
    for method in PALORA_METHODS:
        having = pt.having(seed_results, method, "pamal")
        if having:
            a = [r["methods"][method]["hypervolume"] for r in having]
            b = [r["methods"]["pamal"]["hypervolume"] for r in having]
            out[f"{method} - pamal"] = pt.paired_difference(a, b) | {
                "seeds": [r["seed"] for r in having],
                "wins": int(sum(x > y for x, y in zip(a, b))),
            }
    return out


def missing_runs(seed_results: list[dict]) -> dict:
    return {
        str(r["seed"]): [m for m in METHODS if m not in r["methods"]]
        for r in seed_results
        if any(m not in r["methods"] for m in METHODS)
    }


def _corner(prefs, t):
    """Index of the single-task preference of task t in the grid."""
    return int(np.argmax(np.asarray(prefs)[:, t]))


def write_markdown(seed_results, summary, paired, missing, path) -> None:
    config = seed_results[0]["config"]
    lines = [
        "# MultiMNIST-3: PaLoRA against PaMaL, LS and STL",
        "",
        f"Setting: {config}. Test loss hypervolume of the (loss_left, loss_middle, loss_right) points at the "
        f"{len(simplex_grid(3, config['grid']))} preferences of `simplex_grid(3, {config['grid']})`, reference "
        "(1, 1, 1). LS and STL are single points. Written by `benchmarks/paper/multimnist3.py`.",
        "",
        "| method | seeds | parameters | loss hypervolume | acc left (%) | acc middle (%) | acc right (%) | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, stats in summary.items():
        runs = [r["methods"][method] for r in pt.having(seed_results, method)]
        accs = []
        for t in range(len(TASKS)):
            index = 0 if runs[0]["preferences"] is None else _corner(runs[0]["preferences"], t)
            accs.append(pt.fmt([run["accuracy"][index][t] for run in runs], 100, 2))
        lines.append(
            f"| {LABELS[method]} | {stats['seeds']} | {stats['parameters']:,} "
            f"| {pt.fmt(stats['hypervolume'], digits=4)} | {' | '.join(accs)} | {stats['train_seconds']:.0f} |"
        )
    lines += ["", "Front accuracies are each task's accuracy at its own single-task preference (a corner)."]
    if paired:
        lines += ["", "## Paired differences (hypervolume, per seed)", ""]
        lines += [
            "| difference | seeds | per seed | mean | 95% interval | PaLoRA ahead |",
            "| --- | --- | --- | ---: | --- | ---: |",
        ]
        for name, row in paired.items():
            interval = (
                "n/a (one seed)"
                if row["interval"] is None
                else f"[{row['interval'][0]:+.4f}, {row['interval'][1]:+.4f}]"
            )
            lines.append(
                f"| {name} | {row['seeds']} | {[round(d, 4) for d in row['differences']]} | {row['mean']:+.4f} "
                f"| {interval} | {row['wins']} of {len(row['seeds'])} |"
            )
    if missing:
        lines += ["", "## Missing runs", ""] + [f"* seed {seed}: {methods}" for seed, methods in missing.items()]
    pt.atomic_write_text(path, "\n".join(lines) + "\n")


def plot(summary, path) -> None:
    """All methods' mean loss fronts in one 3-D figure (PaLoRA and PaMaL as fronts, LS and STL as points).

    ``peft_palora.fronts.plotting.plot_front_3d`` draws one front coloured by preference; comparing methods needs
    one colour per method, so the axes are drawn here.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"palora": ("tab:red", "o"), "palora_paper_conv": ("tab:purple", "P"), "pamal": ("tab:blue", "s")}
    styles |= {"ls": ("tab:green", "D"), "stl": ("black", "*")}
    figure = plt.figure(figsize=(8, 7))
    axes = figure.add_subplot(projection="3d")
    for method, stats in summary.items():
        color, marker = styles[method]
        points = np.asarray(stats["loss_mean"])
        label = f"{LABELS[method]}: HV {stats['hypervolume_mean_std'][0]:.4f} ({len(stats['seeds'])} seeds)"
        size = 120 if len(points) == 1 else 18
        axes.scatter(points[:, 0], points[:, 1], points[:, 2], c=color, marker=marker, s=size, label=label)
    axes.set(xlabel="loss, left", ylabel="loss, middle", zlabel="loss, right", title="MultiMNIST-3 test loss fronts")
    axes.legend(fontsize=8, loc="upper left")
    pt.atomic_save_figure(figure, path)
    plt.close(figure)


def aggregate(args) -> dict | None:
    seed_results = pt.load_seed_results(args.output_dir, STEM, setting(args))
    if not seed_results:
        print("No seed results for this setting yet.")
        return None
    summary = summarise(seed_results)
    paired = paired_differences(seed_results)
    missing = missing_runs(seed_results)
    out = Path(args.output_dir)
    payload = {
        "config": setting(args),
        "seeds": [r["seed"] for r in seed_results],
        "summary": summary,
        "paired_differences": paired,
        "missing_runs": missing,
    }
    pt.atomic_write_json(out / f"{STEM}.json", payload)
    write_markdown(seed_results, summary, paired, missing, out / f"{STEM}.md")
    plot(summary, out / f"{STEM}_front.png")
    return payload


def main(argv=None) -> dict | None:
    args = parse_args(argv)

    def load_data():
        label = f"MultiMNIST-3 x {args.input_scale:g}"
        scaled = functools.partial(load, input_scale=args.input_scale)
        return pt.load_train_eval(scaled, "test", args.num_train, args.num_test, label)

    return pt.run_benchmark(args, load_data, run_seed, aggregate)


if __name__ == "__main__":
    main()
