"""Ablation of PaLoRA's preference schedule on MultiMNIST: deterministic annealed grid, Dirichlet, annealed Dirichlet.

PaLoRA (rank 1, base weights trained, adapters at lr x T, Adam lr 1e-3, batch 256) is trained with each schedule, a
window of ``--window`` preferences per step, everything else equal:

* ``annealed``: the paper's deterministic schedule, ``AnnealedGridSampler(mul=5, epsilon=0.01)``;
* ``dirichlet``: i.i.d. ``Dirichlet(1)`` draws (uniform on the simplex), new ones every step;
* ``annealed_dirichlet``: Dirichlet draws whose concentration falls from 1.001 to 0.001 over training (the paper
  code's annealed Dirichlet sampler), pushing the draws towards the single-task vertices.

After every epoch the model is evaluated at the 11 preferences ``[p, 1 - p]`` on the first ``--num_eval`` test images
(a subset keeps the per-epoch monitoring cheap; nothing is selected on it), giving the loss hypervolume (reference
(1, 1)) and the consistency of the preference-to-objective mapping: the Spearman correlation between ``lambda_t``
and task t's metric over the 11 points (``peft_palora.pareto.preference_consistency``; 1 = more weight always gives a
better metric), for the loss and for the accuracy. At the end of training the same is measured on the full test set.

Each (seed, schedule) is stored in ``<output_dir>/schedule_ablation_seed<N>.json`` as soon as it is done, and the
tables and plot aggregate all stored runs of the same setting, so schedules may be run by separate invocations:

    python benchmarks/paper/schedule_ablation.py --samplers annealed
    python benchmarks/paper/schedule_ablation.py --samplers dirichlet
    python benchmarks/paper/schedule_ablation.py --samplers annealed_dirichlet
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

# This folder (shared modules) and the repository root (peft_palora, for a checkout that is not pip-installed).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "examples")]

import numpy as np  # noqa: E402
import paper_training as pt  # noqa: E402
import torch  # noqa: E402
from paper_models import MULTIMNIST_TASKS  # noqa: E402

from peft_palora import adapter_param_groups  # noqa: E402
from peft_palora.preferences import AnnealedDirichletSampler, AnnealedGridSampler, DirichletSampler  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREFIX = "schedule_ablation"
SAMPLERS = ("annealed", "dirichlet", "annealed_dirichlet")
LABELS = {
    "annealed": "deterministic annealed (paper)",
    "dirichlet": "Dirichlet(1)",
    "annealed_dirichlet": "annealed Dirichlet",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_train", type=int, default=None, help="Training images (default: all 50k).")
    parser.add_argument("--num_test", type=int, default=None, help="Test images for the final front (default: 10k).")
    parser.add_argument("--num_eval", type=int, default=2000, help="Test images for the per-epoch monitoring.")
    parser.add_argument("--max_steps", type=int, default=None, help="Stop every run after this many steps.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", default=str(RESULTS_DIR))
    parser.add_argument("--aggregate_only", action="store_true")
    return parser.parse_args(argv)


def setting(args) -> dict:
    keys = ("epochs", "batch_size", "lr", "rank", "window", "num_train", "num_test", "num_eval", "max_steps")
    return {key: getattr(args, key) for key in keys}


def make_sampler(name: str, window: int, seed: int):
    num_tasks = len(MULTIMNIST_TASKS)
    if name == "annealed":
        return AnnealedGridSampler(num_tasks, window, mul=5.0, epsilon=0.01)
    if name == "dirichlet":
        return DirichletSampler(num_tasks, window, concentration=1.0, seed=seed)
    if name == "annealed_dirichlet":
        return AnnealedDirichletSampler(num_tasks, window, seed=seed)
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}.")


def front_record(front: dict) -> dict:
    return front | {"hypervolume": pt.loss_hypervolume(front["loss"])} | pt.consistency(front)


def run_one(args, seed: int, sampler_name: str, train_data, test_data, eval_data) -> dict:
    model = pt.build_palora(seed, rank=args.rank)
    optimizer = torch.optim.Adam(adapter_param_groups(model, lr=args.lr), lr=args.lr)
    sampler = make_sampler(sampler_name, args.window, seed)
    history = []

    def on_epoch_end(epoch, step):
        record = front_record(pt.evaluate_palora(model, *eval_data)) | {"epoch": epoch, "step": step}
        history.append(record)
        print(
            f"  [{sampler_name} seed {seed}] epoch {epoch}: hypervolume {record['hypervolume']:.4f}, "
            f"spearman loss {record['loss_mean_spearman']:.3f} acc {record['acc_mean_spearman']:.3f}",
            flush=True,
        )

    window_losses = functools.partial(pt.palora_window_losses, model)
    name = f"{sampler_name} seed {seed}"
    stats = pt.train_window(model, optimizer, sampler, window_losses, args, seed, train_data, on_epoch_end, name)
    final = front_record(pt.evaluate_palora(model, *test_data))
    return {"history": history, "final": final} | stats


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def write_markdown(seed_results, path) -> None:
    config = seed_results[0]["config"]
    samplers = [s for s in SAMPLERS if all(s in r["samplers"] for r in seed_results)]
    lines = [
        "# Preference schedule ablation on MultiMNIST (PaLoRA, rank 1)",
        "",
        f"Seeds {[r['seed'] for r in seed_results]}; {config['epochs']} epochs, batch {config['batch_size']}, Adam lr "
        f"{config['lr']}, window {config['window']}; train images: {config['num_train'] or 'all 50000'}; "
        "final front on "
        f"{config['num_test'] or 'all 10000'} test images, per-epoch monitoring on the first {config['num_eval']}; "
        f"max_steps {config['max_steps']}. Hypervolume of the (loss_left, loss_right) front, reference (1, 1). "
        "Consistency: Spearman correlation between lambda_t and task t's loss (sign flipped) or accuracy over the 11 "
        "preferences, mean of the two tasks (1 = perfectly consistent). Mean ± sample std over seeds.",
        "",
        "## Final front (test set)",
        "",
        "| schedule | loss hypervolume | consistency (loss) | consistency (accuracy) | acc left at [1,0] (%) "
        "| acc right at [0,1] (%) | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in samplers:
        finals = [r["samplers"][name]["final"] for r in seed_results]
        lines.append(
            f"| {LABELS[name]} | {pt.fmt([f['hypervolume'] for f in finals], digits=4)} "
            f"| {pt.fmt([f['loss_mean_spearman'] for f in finals])} "
            f"| {pt.fmt([f['acc_mean_spearman'] for f in finals])} "
            f"| {pt.fmt([f['accuracy'][-1][0] for f in finals], 100, 2)} "
            f"| {pt.fmt([f['accuracy'][0][1] for f in finals], 100, 2)} "
            f"| {np.mean([r['samplers'][name]['train_seconds'] for r in seed_results]):.0f} |"
        )
    lines += [
        "",
        f"## Along training (first {config['num_eval']} test images, after each epoch)",
        "",
        "| epoch | " + " | ".join(f"HV {LABELS[n]} | consistency {LABELS[n]}" for n in samplers) + " |",
        "| ---: | " + " | ".join("---: | ---:" for _ in samplers) + " |",
    ]
    epochs = len(seed_results[0]["samplers"][samplers[0]]["history"]) if samplers else 0
    for e in range(epochs):
        cells = []
        for name in samplers:
            records = [r["samplers"][name]["history"][e] for r in seed_results]
            cells.append(
                f"{pt.fmt([x['hypervolume'] for x in records], digits=4)} "
                f"| {pt.fmt([x['loss_mean_spearman'] for x in records])}"
            )
        lines.append(
            f"| {seed_results[0]['samplers'][samplers[0]]['history'][e]['epoch']} | " + " | ".join(cells) + " |"
        )
    pt.atomic_write_text(path, "\n".join(lines) + "\n")


def plot(seed_results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = [s for s in SAMPLERS if all(s in r["samplers"] for r in seed_results)]
    colors = {"annealed": "tab:red", "dirichlet": "tab:blue", "annealed_dirichlet": "tab:purple"}
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    for name in samplers:
        runs = [r["samplers"][name] for r in seed_results]
        epochs = [h["epoch"] for h in runs[0]["history"]]
        for ax, key in ((axes[0], "hypervolume"), (axes[1], "loss_mean_spearman"), (axes[2], "acc_mean_spearman")):
            values = np.array([[h[key] for h in run["history"]] for run in runs], dtype=np.float64)
            with warnings.catch_warnings():  # an all-nan column (constant metric, barely trained) plots as a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=0)
            ax.plot(epochs, mean, "o-", color=colors[name], label=LABELS[name])
        loss = np.mean([run["final"]["loss"] for run in runs], axis=0)
        axes[3].plot(loss[:, 0], loss[:, 1], "o-", color=colors[name], label=LABELS[name], markersize=4)
    axes[0].set(xlabel="epoch", ylabel="loss hypervolume", title="Hypervolume along training")
    axes[1].set(xlabel="epoch", ylabel="Spearman (loss)", title="Consistency (loss) along training")
    axes[2].set(xlabel="epoch", ylabel="Spearman (accuracy)", title="Consistency (accuracy) along training")
    axes[3].set(xlabel="test loss left", ylabel="test loss right", title="Final front (test)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    pt.atomic_save_figure(figure, path)
    plt.close(figure)


def aggregate(args) -> dict | None:
    seed_results = pt.load_seed_results(args.output_dir, PREFIX, setting(args))
    if not seed_results:
        print("No results for this setting yet.")
        return None
    out = Path(args.output_dir)
    summary = {}
    for name in SAMPLERS:
        runs = [r["samplers"][name] for r in seed_results if name in r["samplers"]]
        if runs:
            summary[name] = {
                key: [run["final"][key] for run in runs]
                for key in ("hypervolume", "loss_mean_spearman", "acc_mean_spearman")
            }
    pt.atomic_write_json(
        out / f"{PREFIX}.json",
        {"config": seed_results[0]["config"], "seeds": [r["seed"] for r in seed_results], "summary": summary},
    )
    write_markdown(seed_results, out / f"{PREFIX}.md")
    plot(seed_results, out / f"{PREFIX}.png")
    return {"summary": summary, "seeds": [r["seed"] for r in seed_results]}


def run_seed(args, seed, train_data, test_data, eval_data) -> dict:
    def report(name, result, seconds):
        final = result["final"]
        return (
            f"[{name} seed {seed}] final hypervolume {final['hypervolume']:.4f}, consistency loss "
            f"{final['loss_mean_spearman']:.3f} ({seconds:.0f}s)"
        )

    return pt.run_and_store(
        Path(args.output_dir) / f"{PREFIX}_seed{seed}.json",
        seed,
        setting(args),
        "samplers",
        args.samplers,
        lambda name: run_one(args, seed, name, train_data, test_data, eval_data),
        report,
    )


def main(argv=None) -> dict | None:
    args = parse_args(argv)

    def load_data():
        train_data, test_data = pt.load_split("train", args.num_train), pt.load_split("test", args.num_test)
        return train_data, test_data, tuple(t[: args.num_eval] for t in test_data)

    return pt.run_benchmark(args, load_data, run_seed, aggregate)


if __name__ == "__main__":
    main()
