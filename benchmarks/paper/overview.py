"""One table across the paper benchmarks: every method on every dataset and input scale, side by side.

``multimnist.py`` writes one aggregated table per setting (``results/<stem>.json``). This script reads those, and
writes ``results/overview.md`` and ``results/overview.json``:

* the loss hypervolume of each method in each setting (mean ± sample std over its seeds, and how many);
* the paired per-seed differences the paper's claims rest on, with their mean, 95% Student-t interval and how many
  seeds the first method wins: PaLoRA - PaMaL (both convolution layouts) and the paper's layout - PEFT's layout.

Nothing is trained or re-evaluated; run it after ``multimnist.py`` (or ``--aggregate_only``)::

    python benchmarks/paper/overview.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "examples")]

import paper_training as pt  # noqa: E402
from multimnist import LABELS, METHODS, RESULTS_DIR  # noqa: E402

#: The settings, in the order of the table: (stem of the aggregated file, column title).
SETTINGS = (
    ("multimnist", "MultiMNIST"),
    ("multimnist_scale255", "MultiMNIST, inputs x 255"),
    ("multifashion", "MultiFashion"),
    ("fashion_mnist", "Fashion+MNIST"),
)
#: (first, second) method pairs whose per-seed difference first - second is reported.
PAIRS = (("palora", "pamal"), ("palora_paper_conv", "pamal"), ("palora_paper_conv", "palora"))


def load_settings(results_dir: Path) -> dict[str, dict]:
    """The aggregated tables that exist, by stem."""
    found = {}
    for stem, _ in SETTINGS:
        path = results_dir / f"{stem}.json"
        if path.exists():
            found[stem] = json.loads(path.read_text())
    return found


def _hypervolumes_by_seed(table: dict, method: str) -> dict[int, float]:
    entry = table["summary"].get(method)
    return {} if entry is None else dict(zip(entry["seeds"], entry["hypervolume"]))


def paired(table: dict, first: str, second: str) -> dict | None:
    """``first - second`` on the seeds that ran both, or ``None`` when none did."""
    a, b = _hypervolumes_by_seed(table, first), _hypervolumes_by_seed(table, second)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    stats = pt.paired_difference([a[s] for s in seeds], [b[s] for s in seeds])
    wins = sum(d > 0 for d in stats["differences"])
    return {"first": first, "second": second, "seeds": seeds, "wins": wins} | stats


def build(results_dir: Path) -> dict:
    tables = load_settings(results_dir)
    if not tables:
        raise FileNotFoundError(
            f"no aggregated table ({', '.join(stem + '.json' for stem, _ in SETTINGS)}) in {results_dir}: run "
            "benchmarks/paper/multimnist.py first"
        )
    hypervolume = {
        stem: {
            method: {"seeds": entry["seeds"], "mean_std": entry["hypervolume_mean_std"]}
            for method, entry in table["summary"].items()
        }
        for stem, table in tables.items()
    }
    differences = {
        stem: [row for row in (paired(table, a, b) for a, b in PAIRS) if row is not None]
        for stem, table in tables.items()
    }
    return {"settings": list(tables), "hypervolume": hypervolume, "paired_differences": differences}


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    mean, std = entry["mean_std"]
    return f"{mean:.4f} ± {std:.4f} ({len(entry['seeds'])})" if len(entry["seeds"]) > 1 else f"{mean:.4f} (1)"


def to_markdown(overview: dict) -> str:
    titles = dict(SETTINGS)
    stems = overview["settings"]
    lines = [
        "# The paper benchmarks side by side",
        "",
        "Test loss hypervolume, reference (1, 1), mean ± sample std (number of seeds). Built by "
        "`benchmarks/paper/overview.py` from the aggregated tables of `multimnist.py`.",
        "",
        "| method | " + " | ".join(titles[s] for s in stems) + " |",
        "| --- |" + " ---: |" * len(stems),
    ]
    for method in METHODS:
        cells = [_cell(overview["hypervolume"][s].get(method)) for s in stems]
        if any(c != "-" for c in cells):
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired per-seed differences",
        "",
        "Same seed: same initialisation seed, data and data order. 95% interval: Student t on the per-seed "
        "differences, n - 1 degrees of freedom (none for one seed).",
        "",
        "| setting | difference | seeds | per-seed differences | wins | mean | 95% interval |",
        "| --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for stem in stems:
        for row in overview["paired_differences"][stem]:
            interval = "-" if row["interval"] is None else "[{:+.4f}, {:+.4f}]".format(*row["interval"])
            per_seed = ", ".join(f"{d:+.4f}" for d in row["differences"])
            lines.append(
                f"| {titles[stem]} | {LABELS[row['first']]} - {LABELS[row['second']]} | "
                f"{', '.join(map(str, row['seeds']))} | {per_seed} | {row['wins']}/{len(row['seeds'])} | "
                f"{row['mean']:+.4f} | {interval} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", default=str(RESULTS_DIR), help="Where multimnist.py wrote its tables.")
    parser.add_argument("--output_dir", default=None, help="Where to write overview.md/.json (default: results_dir).")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    output_dir = Path(args.output_dir) if args.output_dir else results_dir
    overview = build(results_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pt.atomic_write_json(output_dir / "overview.json", overview)
    pt.atomic_write_text(output_dir / "overview.md", to_markdown(overview))
    print(f"wrote {output_dir / 'overview.md'} ({', '.join(overview['settings'])})")
    return overview


if __name__ == "__main__":
    main()
