"""Convergence of PaLoRA and PaMaL: test loss hypervolume after every epoch, and the epoch reaching 95% of the final.

The curves come from the seed files of the training scripts, which store ``epoch_hypervolumes`` (a list of
``{"epoch", "step", "hypervolume"}``) for PaLoRA and PaMaL when they log every epoch:

* MultiMNIST at input scale 1 and 255: ``multimnist.py --log_every_epoch --output_dir results/convergence``
  (the hypervolume of the 11-point front, reference (1, 1));
* MultiMNIST-3: ``multimnist3.py`` always logs (the 21 preferences of ``simplex_grid(3, 6)`` on the first
  ``epoch_num_test`` test images, reference (1, 1, 1); its final table uses the 66-point grid on every test image).

For each run, "epochs to 95%" is the first epoch whose hypervolume is at least 95% of that run's last logged
hypervolume (same grid, same test images), and "inside" the first epoch with a hypervolume above 0 (the front has
entered the reference box). ``summary`` gathers the seeds of each setting and method. Writes ``convergence.md``,
``convergence.json`` and ``convergence.png``:

    python benchmarks/paper/convergence.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "examples")]

import numpy as np  # noqa: E402
import paper_training as pt  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: (label, seed-file glob relative to the results folder) of each setting.
SOURCES = (
    ("MultiMNIST, input scale 1", "convergence/multimnist_seed*.json"),
    ("MultiMNIST, input scale 255", "convergence/multimnist_scale255_seed*.json"),
    ("MultiMNIST-3", "multimnist3_seed*.json"),
)
FRACTION = 0.95


def epochs_to_fraction(hypervolumes: Sequence[float], fraction: float = FRACTION) -> int | None:
    """The first epoch (1-based) whose hypervolume is at least ``fraction`` times the last one; ``None`` when the
    last one is 0 (the front never got inside the reference box: no epoch to report)."""
    values = np.asarray(hypervolumes, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"`hypervolumes` must be a non-empty 1-D sequence of finite numbers, got {hypervolumes!r}.")
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}.")
    if values[-1] <= 0:
        return None
    return int(np.argmax(values >= fraction * values[-1])) + 1


def first_inside(hypervolumes: Sequence[float]) -> int | None:
    """The first epoch (1-based) with a hypervolume above 0; ``None`` if there is none."""
    positive = np.flatnonzero(np.asarray(hypervolumes, dtype=np.float64) > 0)
    return int(positive[0]) + 1 if positive.size else None


def summarise(rows: list[dict]) -> list[dict]:
    """Per (setting, method): the seeds, the mean curve and last value, and each seed's epochs to 95% and inside."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["method"]), []).append(row)
    summary = []
    for (setting, method), group in groups.items():
        length = min(len(row["hypervolume"]) for row in group)
        curves = np.asarray([row["hypervolume"][:length] for row in group], dtype=np.float64)
        finals = np.asarray([row["final"] for row in group], dtype=np.float64)
        summary.append(
            {
                "setting": setting,
                "method": method,
                "seeds": [row["seed"] for row in group],
                "mean_curve": curves.mean(0).tolist(),
                "final_mean_std": [float(finals.mean()), float(finals.std(ddof=1)) if len(finals) > 1 else 0.0],
                "epochs_to_95": [row["epochs_to_95"] for row in group],
                "first_inside": [row["first_inside"] for row in group],
            }
        )
    return summary


def collect(results_dir: str | Path, sources: Sequence[tuple[str, str]] = SOURCES) -> list[dict]:
    """One row per (setting, method, seed) that logged every epoch."""
    rows = []
    for label, pattern in sources:
        for path in sorted(Path(results_dir).glob(pattern)):
            payload = json.loads(path.read_text())
            for method, result in payload.get("methods", {}).items():
                curve = result.get("epoch_hypervolumes")
                if not curve:
                    continue
                hv = [point["hypervolume"] for point in curve]
                rows.append(
                    {
                        "setting": label,
                        "file": str(path.relative_to(results_dir)),
                        "config": payload.get("config"),
                        "method": method,
                        "seed": payload["seed"],
                        "epochs": [point["epoch"] for point in curve],
                        "hypervolume": hv,
                        "final": hv[-1],
                        "final_full_grid": result.get("hypervolume"),
                        "epochs_to_95": epochs_to_fraction(hv),
                        "first_inside": first_inside(hv),
                    }
                )
    return rows


def _table(header: str, rule: str, cells: list[list]) -> list[str]:
    return [header, rule] + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in cells]


def write_markdown(rows: list[dict], summary: list[dict], path: Path) -> None:
    def listed(values):
        return ", ".join("-" if value is None else str(value) for value in values)

    def curve(values, digits):
        return ", ".join(f"{v:.{digits}f}" for v in values)

    lines = [
        "# Convergence: test loss hypervolume after every epoch",
        "",
        'Written by `benchmarks/paper/convergence.py` from the seed files named below. "95% at epoch" is the first '
        "epoch whose hypervolume reaches 95% of that run's last logged one. MultiMNIST-3's per-epoch hypervolume "
        'is on `simplex_grid(3, 6)` (21 preferences); "final HV (table grid)" is the run\'s hypervolume on its '
        "table's grid (11 points for MultiMNIST, 66 for MultiMNIST-3). \"Inside\" is the first epoch with a "
        "hypervolume above 0.",
        "",
    ]
    lines += _table(
        "| setting | method | seeds | mean HV per epoch | last HV | 95% at epoch (per seed) | inside at epoch (per seed) |",
        "| --- | --- | --- | --- | ---: | --- | --- |",
        [[g["setting"], g["method"], listed(g["seeds"]), curve(g["mean_curve"], 3),
          "{:.3f} ± {:.3f}".format(*g["final_mean_std"]), listed(g["epochs_to_95"]), listed(g["first_inside"])]
         for g in summary],
    )
    lines += ["", "Every run:", ""] + _table(
        "| setting | method | seed | epochs | 95% at epoch | HV per epoch | final HV (table grid) | file |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
        [[r["setting"], r["method"], r["seed"], len(r["epochs"]),
          "n/a (HV 0)" if r["epochs_to_95"] is None else r["epochs_to_95"], curve(r["hypervolume"], 4),
          "" if r["final_full_grid"] is None else f"{r['final_full_grid']:.4f}", f"`{r['file']}`"] for r in rows],
    )
    configs = {}
    for row in rows:
        configs.setdefault(row["file"], row["config"])
    lines += ["", "Settings of the files:", ""] + [f"* `{file}`: {config}" for file, config in configs.items()]
    pt.atomic_write_text(path, "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(row["setting"] for row in rows))
    figure, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.2), squeeze=False)
    colors = {"palora": "tab:red", "palora_paper_conv": "tab:purple", "pamal": "tab:blue"}
    for ax, setting in zip(axes[0], settings):
        for row in (r for r in rows if r["setting"] == setting):
            color = colors.get(row["method"], "tab:gray")
            label = f"{row['method']} seed {row['seed']} (95% at epoch {row['epochs_to_95']})"
            ax.plot(row["epochs"], row["hypervolume"], "o-", color=color, label=label, markersize=3)
            if row["epochs_to_95"] is not None:
                ax.axvline(row["epochs_to_95"], color=color, alpha=0.3, linestyle=":")
        ax.set(title=setting, xlabel="epoch", ylabel="test loss hypervolume")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    pt.atomic_save_figure(figure, path)
    plt.close(figure)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results_dir", default=str(RESULTS_DIR), help="Where the seed files are looked up.")
    parser.add_argument("--output_dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    rows = collect(args.results_dir)
    if not rows:
        print("No run logged every epoch yet: run multimnist.py --log_every_epoch or multimnist3.py first.")
        return rows
    out = Path(args.output_dir)
    summary = summarise(rows)
    pt.atomic_write_json(out / "convergence.json", {"fraction": FRACTION, "summary": summary, "runs": rows})
    write_markdown(rows, summary, out / "convergence.md")
    plot(rows, out / "convergence.png")
    return rows


if __name__ == "__main__":
    main()
