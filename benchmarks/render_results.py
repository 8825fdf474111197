"""Render the results tables of the documentation from the benchmarks' JSON result files.

The numbers flow one way: a benchmark writes its JSON file (``benchmarks/results/*.json``,
``benchmarks/paper/results/*.json``), this script turns those files into Markdown tables, and the tables are written
into the regions of ``docs/results.md`` and ``benchmarks/paper/README.md`` marked

    <!-- BEGIN rendered: NAME (python benchmarks/render_results.py) -->
    ...
    <!-- END rendered: NAME -->

Everything outside the markers (the prose, and the older figures that have no result file) is left as it is.
``tests/test_docs.py`` checks that the committed files equal what this script renders, so a table cannot drift from
its result file: after re-running a benchmark, run

    python benchmarks/render_results.py          # rewrite the rendered regions
    python benchmarks/render_results.py --check  # exit 1 and name the regions that are out of date

The script reads JSON only (``json.loads``), never a pickle, and needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("benchmarks/results")
PAPER_RESULTS = Path("benchmarks/paper/results")
TARGETS = (Path("docs/results.md"), Path("benchmarks/paper/README.md"))

_REGION = re.compile(
    r"(?P<begin><!-- BEGIN rendered: (?P<name>[\w-]+) \(python benchmarks/render_results\.py\) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- END rendered: (?P=name) -->)",
    re.DOTALL,
)
_ANY_MARKER = re.compile(r"<!-- (?:BEGIN|END) rendered: ([^ ]+)")

# How the tables name the paper benchmarks' methods (keys of the result files).
METHOD_LABELS = {
    "palora": "PaLoRA (PEFT's layout, rank 5 on the convolutions)",
    "palora_conv_r1": "PaLoRA, PEFT's layout, rank 1 everywhere",
    "palora_paper_conv": 'PaLoRA, the paper\'s convolution layout (`conv_layout="paper"`, r = 1)',
    "pamal": "PaMaL (Dirichlet(1) rays)",
    "pamal_annealed": "PaMaL (annealed schedule)",
    "ls": "LS (equal weights)",
    "stl": "STL (two models)",
}
SHORT_LABELS = {
    "palora": "PaLoRA, PEFT's layout",
    "palora_conv_r1": "PaLoRA, PEFT's layout, rank 1",
    "palora_paper_conv": "PaLoRA, paper's layout",
    "pamal": "PaMaL",
    "pamal_annealed": "PaMaL, annealed",
    "ls": "LS",
    "stl": "single-task models",
}
SETTING_LABELS = {
    "multimnist": "MultiMNIST",
    "multimnist_scale255": "MultiMNIST, inputs x 255",
    "multifashion": "MultiFashion",
    "fashion_mnist": "Fashion+MNIST",
}
MODEL_LABELS = {"multilenet": "MultiLeNet", "segnet_cityscapes": "SegNet, CityScapes", "segnet_nyuv2": "SegNet, NYUv2"}
SCHEDULE_LABELS = {
    "annealed": "deterministic annealed (paper)",
    "dirichlet": "Dirichlet(1)",
    "annealed_dirichlet": "annealed Dirichlet",
}
GIB, MIB = 2**30, 2**20


# ---- reading --------------------------------------------------------------------------------------------------------


def load(root: Path, relative: Path) -> dict:
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"result file {relative} is missing: run the benchmark that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


def seed_files(root: Path, setting: str) -> list[dict]:
    """The per-seed result files of a paper setting (``multimnist``, ``multimnist_scale255``, ...), by seed."""
    pattern = re.compile(rf"^{re.escape(setting)}_seed(\d+)\.json$")
    found = sorted(
        (int(match.group(1)), path)
        for path in (root / PAPER_RESULTS).iterdir()
        if (match := pattern.match(path.name))
    )
    return [json.loads(path.read_text(encoding="utf-8")) for _, path in found]


# ---- formatting -----------------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has one character per column, ``l`` or ``r``."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: list[float], digits: int, scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def signed(value: float, digits: int = 4) -> str:
    return f"{value:+.{digits}f}"


def seeds_range(seeds: list[int]) -> str:
    seeds = sorted(seeds)
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def bold_best(cells: list[str], values: list[float | None]) -> list[str]:
    """``cells`` with the one holding the largest of ``values`` in bold."""
    present = [v for v in values if v is not None]
    if not present:
        return cells
    best = max(present)
    return [f"**{cell}**" if value == best else cell for cell, value in zip(cells, values)]


def end_accuracies(run: dict) -> tuple[float, float]:
    """(left accuracy at [1, 0], right accuracy at [0, 1]) of one method's run; its only point for LS and STL."""
    if run.get("preferences") is None:
        left, right = run["accuracy"][0]
        return left, right
    at = {tuple(round(p, 6) for p in preference): acc for preference, acc in zip(run["preferences"], run["accuracy"])}
    return at[(1.0, 0.0)][0], at[(0.0, 1.0)][1]


def method_accuracies(root: Path, setting: str, method: str) -> tuple[list[float], list[float]]:
    lefts, rights = [], []
    for seed in seed_files(root, setting):
        run = seed["methods"].get(method)
        if run is not None:
            left, right = end_accuracies(run)
            lefts.append(left)
            rights.append(right)
    return lefts, rights


def paired_rows(paired: list[dict], labels: dict[str, str], keys: tuple[str, str] = ("palora", "pamal")) -> list[list]:
    rows = []
    for entry in paired:
        first, second = entry[keys[0]], entry[keys[1]]
        low, high = entry["interval"]
        significant = low > 0 or high < 0
        mean = signed(entry["mean"])
        interval = f"[{signed(low)}, {signed(high)}]"
        rows.append(
            [
                f"{labels[first]} - {labels[second]}",
                seeds_range(entry["seeds"]),
                ", ".join(signed(d) for d in entry["differences"]),
                f"**{mean}**" if significant else mean,
                f"**{interval}**" if significant else interval,
            ]
        )
    return rows


# ---- the renderers: one per marked region ---------------------------------------------------------------------------


def render_llm_scale(root: Path) -> str:
    pair = load(root, RESULTS / "bench_scale_pair.json")
    full = load(root, RESULTS / "bench_scale.json")
    model, setup = pair["model"], pair["setup"]
    palora, lora = pair["candidates"]["palora"], pair["candidates"]["lora_r24"]
    ratios, merge, export = pair["ratios"], pair["merge_and_unload"], pair["export_lora"]
    full_ft = full["candidates"]["full_ft"]
    computed = full["computed"]
    target = pair["targets"]["step_palora_over_lora_r24"]["target"]
    rows = [
        [
            f"training step, PaLoRA / PEFT LoRA rank {setup['lora_rank']}",
            f"{ratios['step_palora_over_lora_r24']:.3f} ({palora['step_seconds_median']:.2f} s vs "
            f"{lora['step_seconds_median']:.2f} s; back-to-back pairs {ratios['step_palora_over_lora_r24_paired']:.3f})",
            target,
            "`bench_scale_pair.json`",
        ],
        [
            f"peak memory, PaLoRA / LoRA rank {setup['lora_rank']}",
            f"{ratios['peak_palora_over_lora_r24']:.3f} ({palora['peak_bytes'] / GIB:.2f} vs "
            f"{lora['peak_bytes'] / GIB:.2f} GiB)",
            "",
            "`bench_scale_pair.json`",
        ],
        [
            "peak memory, PaLoRA (frozen base) / full fine-tuning",
            f"{full['ratios']['peak_palora_over_full_ft']:.2f} ({full['candidates']['palora']['peak_bytes'] / GIB:.1f} "
            f"vs {full_ft['peak_bytes'] / GIB:.1f} GiB)",
            "",
            "`bench_scale.json`",
        ],
        [
            "memory overhead over full fine-tuning, PaMaL (T copies) / PaLoRA (base trained), both computed",
            f"{ratios['memory_overhead_pamal_over_palora']:.0f}x ({computed['pamal_overhead_bytes'] / GIB:.1f} GiB vs "
            f"{computed['palora_base_overhead_bytes'] / MIB:.0f} MiB; PaMaL's peak would be "
            f"{computed['pamal_peak_bytes'] / GIB:.1f} GiB)",
            pair["targets"]["memory_overhead_pamal_over_palora"]["target"],
            "`bench_scale.json`",
        ],
        [
            "parameter overhead, PaMaL / PaLoRA",
            f"{ratios['parameter_overhead_pamal_over_palora']:.0f}x",
            "",
            "`bench_scale_pair.json`",
        ],
        [
            "`merge_and_unload`",
            f"{merge['seconds']:.1f} s, +{merge['extra_peak'] / MIB:.1f} MiB, max logit difference "
            f"{merge['max_logit_difference']:.1e}",
            "",
            "`bench_scale_pair.json`",
        ],
        [
            "`export_lora`",
            f"{export['seconds']:.2f} s, +{export['extra_peak'] / MIB:.0f} MiB, a {export['bundle_bytes'] / MIB:.0f} MiB "
            f"rank-{export['lora_rank']} LoRA bundle",
            "",
            "`bench_scale_pair.json`",
        ],
    ]
    intro = (
        f"A {model['family']} model of {model['parameters'] / 1e6:.0f}M parameters built from its config "
        f"({model['layers']} layers, hidden {model['hidden']}; {model['weights']}), PaLoRA T={setup['num_tasks']}, "
        f"r={setup['r']} on {', '.join(setup['targets'])} ({setup['adapter_parameters'] / 1e6:.1f}M adapter "
        f"parameters), batch {setup['batch_size']} x {setup['seq_len']} tokens, {setup['optimizer']}; each candidate "
        f"in its own process, peak resident memory per process. Commands: `{pair['command']}` "
        f"(`bench_scale_pair.json`, {palora['threads']} thread) and `{full['command']}` (`bench_scale.json`, "
        f"{full['candidates']['palora']['threads']} threads, load average {full['machine']['load_average_at_end'][0]:.1f} "
        f"at the end: its step ratio, {full['ratios']['step_palora_over_lora_r24']:.3f}, is load noise)."
    )
    return intro + "\n\n" + table(["figure", "measured", "target", "file"], rows)


def _method_table(root: Path, setting: str, methods: list[str] | None = None, parameters: bool = True) -> str:
    data = load(root, PAPER_RESULTS / f"{setting}.json")
    summary = data["summary"]
    methods = [m for m in (methods or list(METHOD_LABELS)) if m in summary]
    means = {m: summary[m]["hypervolume_mean_std"][0] for m in methods}
    best_frontier = max(v for m, v in means.items() if m != "stl")
    rows = []
    for method in methods:
        entry = summary[method]
        lefts, rights = method_accuracies(root, setting, method)
        hv = mean_std(entry["hypervolume"], 4)
        at_ends = entry.get("loss_mean") is not None and len(entry["loss_mean"]) > 1
        row = [METHOD_LABELS[method], seeds_range(entry["seeds"])]
        if parameters:
            row.append(f"{entry['parameters']:,}")
        row += [
            f"**{hv}**" if means[method] == best_frontier else hv,
            mean_std(lefts, 2, 100) + (" (at [1, 0])" if at_ends else ""),
            mean_std(rights, 2, 100) + (" (at [0, 1])" if at_ends else ""),
        ]
        rows.append(row)
    header = ["method", "seeds", *(["parameters"] if parameters else []), "loss hypervolume", "acc left (%)",
              "acc right (%)"]
    return table(header, rows, "ll" + ("r" if parameters else "") + "rrr")


def render_paper_multimnist(root: Path) -> str:
    return _method_table(root, "multimnist")


def render_paper_multimnist_paired(root: Path) -> str:
    data = load(root, PAPER_RESULTS / "multimnist.json")
    rows = paired_rows(data["paired_differences"], SHORT_LABELS)
    return table(["difference", "seeds", "per-seed differences", "mean", "95% interval"], rows, "lllrl")


def render_paper_scale255(root: Path) -> str:
    scale1 = load(root, PAPER_RESULTS / "multimnist.json")["summary"]
    scale255 = load(root, PAPER_RESULTS / "multimnist_scale255.json")
    authors = {"pamal": "PaMaL", "ls": "LS"}
    reference = scale255["paper_reference_hypervolume"]
    methods = [m for m in METHOD_LABELS if m in scale255["summary"]]
    best = max(scale255["summary"][m]["hypervolume_mean_std"][0] for m in methods if m != "stl")
    rows = []
    for method in methods:
        at255 = mean_std(scale255["summary"][method]["hypervolume"], 4)
        if scale255["summary"][method]["hypervolume_mean_std"][0] == best:
            at255 = f"**{at255}**"
        rows.append(
            [
                METHOD_LABELS[method],
                mean_std(scale1[method]["hypervolume"], 4) if method in scale1 else "-",
                at255,
                str(reference[authors[method]]) if method in authors else "-",
            ]
        )
    header = ["method", "loss HV, inputs in [0, 1]", "loss HV, inputs in [0, 255]", "the authors' results file (3 seeds)"]
    return table(header, rows, "lrrr")


def render_paper_scale255_paired(root: Path) -> str:
    paired = list(load(root, PAPER_RESULTS / "multimnist_scale255.json")["paired_differences"])
    # The two layouts against each other are computed by overview.py (same seeds, same statistic).
    for entry in load(root, PAPER_RESULTS / "overview.json")["paired_differences"]["multimnist_scale255"]:
        if entry["second"] != "pamal":
            paired.append({**entry, "palora": entry["first"], "pamal": entry["second"]})
    return table(
        ["difference", "seeds", "per-seed differences", "mean", "95% interval"],
        paired_rows(paired, SHORT_LABELS),
        "lllrl",
    )


def render_paper_fashion(root: Path) -> str:
    settings = ["multifashion", "fashion_mnist"]
    data = {s: load(root, PAPER_RESULTS / f"{s}.json") for s in settings}
    methods = [m for m in METHOD_LABELS if all(m in data[s]["summary"] for s in settings)]
    best = {s: max(data[s]["summary"][m]["hypervolume_mean_std"][0] for m in methods if m != "stl") for s in settings}
    rows = []
    for method in methods:
        row = [METHOD_LABELS[method]]
        for setting in settings:
            entry = data[setting]["summary"][method]
            hv = mean_std(entry["hypervolume"], 4)
            lefts, rights = method_accuracies(root, setting, method)
            row += [f"**{hv}**" if entry["hypervolume_mean_std"][0] == best[setting] else hv,
                    mean_std(lefts, 2, 100), mean_std(rights, 2, 100)]
        rows.append(row)
    header = ["method", "MultiFashion: loss HV", "acc left (%)", "acc right (%)", "Fashion+MNIST: loss HV",
              "acc left, digit (%)", "acc right, item (%)"]
    return table(header, rows, "lrrrrrr")


def render_paper_fashion_paired(root: Path) -> str:
    paired = []
    for setting in ("multifashion", "fashion_mnist"):
        differences = load(root, PAPER_RESULTS / f"{setting}.json")["paired_differences"]
        paired += [[SETTING_LABELS[setting], *row] for row in paired_rows(differences, SHORT_LABELS)]
    return table(["dataset", "difference", "seeds", "per-seed differences", "mean", "95% interval"], paired, "llllrl")


def render_paper_overview(root: Path) -> str:
    data = load(root, PAPER_RESULTS / "overview.json")
    settings = data["settings"]
    methods = [m for m in METHOD_LABELS if sum(m in data["hypervolume"][s] for s in settings) == len(settings)]
    best = {
        s: max(data["hypervolume"][s][m]["mean_std"][0] for m in methods if m != "stl") for s in settings
    }
    rows = []
    for method in methods:
        row = [SHORT_LABELS[method]]
        for setting in settings:
            mean, std = data["hypervolume"][setting][method]["mean_std"]
            cell = f"{mean:.3f} ± {std:.3f}"
            row.append(f"**{cell}**" if mean == best[setting] else cell)
        rows.append(row)
    seeds = {s: len(data["hypervolume"][s]["pamal"]["seeds"]) for s in settings}
    header = ["method", *(f"{SETTING_LABELS[s]} ({seeds[s]} seeds)" for s in settings)]
    paired = []
    for setting in settings:
        for entry in data["paired_differences"][setting]:
            low, high = entry["interval"]
            significant = low > 0 or high < 0
            interval = f"[{signed(low, 3)}, {signed(high, 3)}]"
            paired.append(
                [
                    SETTING_LABELS[setting],
                    f"{SHORT_LABELS[entry['first']]} - {SHORT_LABELS[entry['second']]}",
                    f"{entry['wins']} of {len(entry['seeds'])}",
                    signed(entry["mean"], 3),
                    f"**{interval}**" if significant else interval,
                ]
            )
    pairs = table(["setting", "difference", "ahead on", "mean", "95% interval"], paired, "lllrl")
    return (
        table(header, rows, "l" + "r" * len(settings))
        + "\n\nTest loss hypervolume, reference (1, 1), mean ± sample std over seeds; in bold the best method with one"
        " model (the single-task models are two). Paired per-seed differences:\n\n"
        + pairs
    )


def render_paper_memory_parameters(root: Path) -> str:
    window1 = load(root, PAPER_RESULTS / "memory.json")
    parameter_rows = []
    for model, entry in window1["parameters"].items():
        parameter_rows.append(
            [
                MODEL_LABELS[model],
                f"{entry['base']:,}",
                f"{entry['palora_adapters']:,}",
                f"{entry['palora_adapters_paper_layout']:,}",
                f"{entry['pamal_extra']:,}",
                f"{entry['ratio']:.1f}x",
                f"{entry['ratio_paper_layout']:.1f}x",
            ]
        )
    return table(
        ["model", "base", "PaLoRA adapters (this library)", "PaLoRA adapters (paper's layout)", "PaMaL extra copies",
         "ratio (library)", "ratio (paper's layout)"],
        parameter_rows,
        "lrrrrrr",
    )


def render_paper_memory_peaks(root: Path) -> str:
    window1 = load(root, PAPER_RESULTS / "memory.json")
    paper = load(root, PAPER_RESULTS / "memory_paper_windows.json")

    def rows_of(result: dict, label: str, keep: Callable[[dict], bool]) -> list[list[str]]:
        plain = {r["model"]: r for r in result["runs"] if r["method"] == "plain"}
        rows = []
        for run in result["runs"]:
            if not keep(run):
                continue
            base = plain[run["model"]]
            tensor_over = run["tensor_peak_mib"] - base["tensor_peak_mib"]
            rss_over = run["rss_peak_delta_mib"] - base["rss_peak_delta_mib"]
            is_plain = run["method"] == "plain"
            rows.append(
                [
                    MODEL_LABELS[run["model"]],
                    {"plain": "plain", "palora": "PaLoRA", "pamal": "PaMaL"}[run["method"]],
                    f"{run['window']}{label}",
                    f"{run['tensor_peak_mib']:,.1f}",
                    "-" if is_plain else f"{tensor_over:+,.1f}",
                    f"{run['rss_peak_delta_mib']:,.1f}",
                    "-" if is_plain else f"{rss_over:+,.1f}",
                    f"{run['step_seconds']:.2f}",
                ]
            )
        return rows

    rows = rows_of(window1, "", lambda run: True)
    rows += rows_of(paper, " (paper)", lambda run: run["method"] != "plain" and run["window"] > 1)
    return table(
        ["model", "method", "window", "tensor peak (MiB)", "overhead", "RSS peak (MiB)", "overhead", "s / step"],
        rows,
        "llrrrrrr",
    )


def render_paper_schedule(root: Path) -> str:
    data = load(root, PAPER_RESULTS / "schedule_ablation.json")
    seeds = seed_files(root, "schedule_ablation")
    summary = data["summary"]
    best_hv = max(statistics.mean(entry["hypervolume"]) for entry in summary.values())
    rows = []
    for schedule, entry in summary.items():
        finals = [seed["samplers"][schedule]["final"] for seed in seeds if schedule in seed["samplers"]]
        lefts = [end_accuracies(final)[0] for final in finals]
        rights = [end_accuracies(final)[1] for final in finals]
        seconds = [seed["samplers"][schedule]["train_seconds"] for seed in seeds if schedule in seed["samplers"]]
        hv = mean_std(entry["hypervolume"], 4)
        rows.append(
            [
                SCHEDULE_LABELS[schedule],
                f"**{hv}**" if statistics.mean(entry["hypervolume"]) == best_hv else hv,
                mean_std(entry["loss_mean_spearman"], 3),
                mean_std(entry["acc_mean_spearman"], 3),
                mean_std(lefts, 2, 100),
                mean_std(rights, 2, 100),
                f"{statistics.mean(seconds):.0f}",
            ]
        )
    return table(
        ["schedule", "loss hypervolume", "consistency (loss)", "consistency (accuracy)", "acc left at [1,0] (%)",
         "acc right at [0,1] (%)", "train s"],
        rows,
        "lrrrrrr",
    )


def render_paper_schedule_epochs(root: Path) -> str:
    data = load(root, PAPER_RESULTS / "schedule_ablation.json")
    seeds = seed_files(root, "schedule_ablation")
    summary = data["summary"]
    epochs = len(seeds[0]["samplers"]["annealed"]["history"])
    along = []
    for key, what in (("hypervolume", "HV"), ("loss_mean_spearman", "consistency")):
        for schedule in summary:
            histories = [seed["samplers"][schedule]["history"] for seed in seeds if schedule in seed["samplers"]]
            cells = [f"{statistics.mean(h[e][key] for h in histories):.3f}" for e in range(epochs)]
            along.append([f"{what}, {SCHEDULE_LABELS[schedule]}", *cells])
    return table(["epoch", *(str(e + 1) for e in range(epochs))], along, "l" + "r" * epochs)

def render_compile(root: Path) -> str:
    data = load(root, RESULTS / "bench_compile.json")
    config, lora, palora = data["config"], data["lora"], data["palora"]
    rows = [
        [name, str(run["graphs"]), str(run["graph_breaks"]), str(run["recompiles"]), f"{run['eager_ms']:.0f}",
         f"{run['compiled_ms']:.0f}", f"{run['speedup']:.2f}x", f"{run['max_abs_diff_vs_eager']:.1e}"]
        for name, run in ((f"PEFT LoRA rank {config['tasks'] * config['r']}", lora),
                          (f"PaLoRA T={config['tasks']}, r={config['r']}, per-call preference", palora))
    ]
    intro = (
        f"A Llama of hidden {config['hidden']}, {config['layers']} layers, batch {config['batch']} x {config['seq']} tokens, "
        f"every linear layer targeted, `torch.compile` backend `{config['backend']}`, {config['threads']} threads, "
        f"torch {config['torch']}, the four runs timed in turn ({config['repeats']} repeats; "
        f"`python benchmarks/bench_compile.py`, `benchmarks/results/bench_compile.json`). Compiled PaLoRA / compiled LoRA: "
        f"{data['palora_over_lora_compiled']:.2f}; eager: {data['palora_over_lora_eager']:.2f}. Graphs, breaks and "
        "recompiles are counted over calls at three preference values."
    )
    return intro + "\n\n" + table(
        ["model", "graphs", "graph breaks", "recompiles", "eager ms", "compiled ms", "speed-up", "max diff vs eager"],
        rows, "lrrrrrrr",
    )


ALIGNMENT_LABELS = {
    "palora": "P: PaLoRA-DPO, one model",
    "fixed_share": "(a) fixed weights, 5 TRL LoRAs, 1/5 of the compute each",
    "soups": "(b) Rewarded Soups: 2 TRL LoRAs mixed (`from_lora_adapters`)",
    "soups_palora": "(c) Soups start, PaLoRA finish",
    "fixed_equal": "(a') fixed weights, 5 TRL LoRAs, full compute each (5x in all)",
}


def render_alignment(root: Path) -> str:
    data = load(root, Path("benchmarks") / "alignment" / "results" / "bench_alignment.json")
    setting, rows = data["setting"], []
    for key, label in ALIGNMENT_LABELS.items():
        method = data["methods"].get(key)
        if method is None:
            continue
        grid5, grid11 = method["grid5"], method.get("grid11")
        rows.append([
            label,
            f"{grid5['hypervolume_mean']:.3f} ± {grid5['hypervolume_std']:.3f}",
            "–" if grid11 is None else f"{grid11['hypervolume_mean']:.3f} ± {grid11['hypervolume_std']:.3f}",
            f"{grid5['mean_spearman_mean']:.3f}",
            f"{method['policy_tokens']:,}",
            f"{method['max_rss_mib']:.0f}",
            f"{method['adapter_bytes']:,}",
        ])
    intro = (
        f"DPO on two synthetic objectives (the red and the blue word share of a greedy {setting['max_new_tokens']}-token "
        f"completion; the ideal front is red + blue = 1), {setting['model']}; rank {setting['r']} on "
        f"{', '.join(setting['targets'])}; seeds {setting['seeds']}; hypervolume with the fixed reference "
        f"{tuple(setting['reference'])} over 5 and 11 preferences (5 models for the fixed-weight runs); compute "
        f"counted as {setting['compute']}; memory: {setting['memory']} (`python benchmarks/alignment/bench_alignment.py`, "
        "`benchmarks/alignment/results/bench_alignment.json`)."
    )
    return intro + "\n\n" + table(
        ["method", "HV, 5 points", "HV, 11 points", "Spearman, 5 points", "policy tokens", "peak RSS MiB",
         "adapter bytes"],
        rows, "lrrrrrr",
    )

def render_serve(root: Path) -> str:
    data = load(root, RESULTS / "bench_serve.json")
    machine, rows = data["machine"], []
    for clients, cell in sorted(data["cells"].items(), key=lambda item: int(item[0])):
        one, batched, loras = cell["one at a time"]["rps"], cell["palora batched"]["rps"], cell["T LoRAs"]["rps"]
        rows.append([
            clients, f"{one:.1f}", f"{batched:.1f} ({batched / one:.2f}x)", f"{loras:.1f} ({loras / one:.2f}x)",
            f"{batched / loras:.2f}x", f"{cell['palora batched']['mean_batch']:.1f}",
        ])
    intro = (
        "`examples/serve.py` on LitServe, all-MiniLM-L6-v2 with PaLoRA on query/value (T=2, r=4), short sentences, "
        f"closed-loop clients each with its own preference, {machine['torch_threads_per_server']} torch thread per "
        f"server, `nice -n {machine['nice']}`; load average {machine['load_avg_before'][0]:.1f}-"
        f"{machine['load_avg_after'][0]:.1f} on {machine['cpu_count']} shared cores, so read the ratios as rough "
        "(`python benchmarks/bench_serve.py`, `benchmarks/results/bench_serve.json`). Requests per second. \"T LoRAs\" "
        "serves the same trade-offs with plain PEFT: the exported task LoRAs, one `add_weighted_adapter(..., "
        f"combination_type=\"cat\")` per distinct preference ({data['lora_mix_build_ms']:.0f} ms each, cached) and "
        f"PEFT's mixed-adapter batches; its answers equal PaLoRA's to {data['max_abs_difference_lora_vs_palora']:.1e}."
    )
    return intro + "\n\n" + table(
        ["clients", "one request at a time", "PaLoRA, batched", "T LoRAs, batched", "PaLoRA / T LoRAs",
         "mean PaLoRA batch"],
        rows, "rrrrrr",
    )

def paper_budget(config: dict, images: str = "50,000") -> str:
    """The training budget of a paper-benchmark setting, from its stored config."""
    data = f"all {images} training images" if config.get("num_train") is None else f"{config['num_train']:,} training images"
    test = "all 10,000 test images" if config.get("num_test") is None else f"{config['num_test']:,} test images"
    return f"{config['epochs']} epochs on {data}, tested on {test}"


def render_paper_multimnist3(root: Path) -> str:
    data = load(root, PAPER_RESULTS / "multimnist3.json")
    config, rows = data["config"], []
    for key, run in data["summary"].items():
        mean, std = run["hypervolume_mean_std"]
        rows.append([SHORT_LABELS.get(key, key), f"{mean:.3f} ± {std:.3f}", str(len(run["seeds"]))])
    for name, paired in data["paired_differences"].items():
        low, high = paired["interval"]
        rows.append([f"paired {name.replace('palora_paper_conv', 'PaLoRA, paper layout').replace('palora ', 'PaLoRA, PEFT layout ').replace('pamal', 'PaMaL')}",
                     f"{signed(paired['mean'], 3)} [{signed(low, 3)}, {signed(high, 3)}], {paired['wins']}/"
                     f"{len(paired['seeds'])} won", ""])
    full = config["num_train"] is None and config["num_test"] is None and config["epochs"] >= 20
    intro = (
        f"MultiMNIST-3 (`python benchmarks/paper/multimnist3.py`), test loss hypervolume over `simplex_grid(3, "
        f"{config['grid']})` with reference (1, 1, 1): {paper_budget(config)}"
        + (" (the authors' configuration)." if full else
           " (**reduced**; the authors' configuration is 20 epochs on all data), so read it as an under-trained regime.")
    )
    return intro + "\n\n" + table(["method", "loss hypervolume", "seeds"], rows, "lrr")


def render_paper_convergence(root: Path) -> str:
    data = load(root, PAPER_RESULTS / "convergence.json")

    def listed(values):
        return ", ".join("–" if value is None else str(value) for value in values)

    rows = []
    for group in data["summary"]:
        mean, std = group["final_mean_std"]
        rows.append([group["setting"], SHORT_LABELS.get(group["method"], group["method"]), listed(group["seeds"]),
                     str(len(group["mean_curve"])), f"{mean:.3f} ± {std:.3f}" if len(group["seeds"]) > 1 else f"{mean:.3f}",
                     listed(group["epochs_to_95"]), listed(group["first_inside"])])
    budgets = {}
    for run in data["runs"]:
        if run["setting"] not in budgets and run.get("config"):
            config = run["config"]
            budget = paper_budget(config)
            if config.get("epoch_num_test") is not None:
                budget += f"; the per-epoch front on the first {config['epoch_num_test']:,} test images"
            budgets[run["setting"]] = budget
    return (
        "Test loss hypervolume after every epoch (`python benchmarks/paper/convergence.py`); the last per-epoch value "
        f"(mean ± std over seeds), the epoch at which each seed reaches {data['fraction']:.0%} of its last value, and "
        "the first epoch whose front is inside the reference box (hypervolume above 0). Budgets: "
        + "; ".join(f"{setting}: {budget}" for setting, budget in budgets.items()) + ".\n\n"
        + table(["setting", "method", "seeds", "epochs", "last HV", f"epoch to {data['fraction']:.0%}",
                 "first inside"], rows, "llrrrll")
    )


RENDERERS: dict[str, Callable[[Path], str]] = {
    "paper-multimnist3": render_paper_multimnist3,
    "paper-convergence": render_paper_convergence,
    "serve": render_serve,
    "compile": render_compile,
    "alignment": render_alignment,
    "llm-scale": render_llm_scale,
    "paper-overview": render_paper_overview,
    "paper-multimnist": render_paper_multimnist,
    "paper-multimnist-paired": render_paper_multimnist_paired,
    "paper-scale255": render_paper_scale255,
    "paper-scale255-paired": render_paper_scale255_paired,
    "paper-fashion": render_paper_fashion,
    "paper-fashion-paired": render_paper_fashion_paired,
    "paper-memory-parameters": render_paper_memory_parameters,
    "paper-memory-peaks": render_paper_memory_peaks,
    "paper-schedule": render_paper_schedule,
    "paper-schedule-epochs": render_paper_schedule_epochs,
}


# ---- writing into the marked regions --------------------------------------------------------------------------------


def render_text(text: str, root: Path, source: str = "<text>") -> str:
    """``text`` with every marked region's body replaced by its renderer's output."""
    names = [match.group(1) for match in _ANY_MARKER.finditer(text)]
    regions = [match.group("name") for match in _REGION.finditer(text)]
    if len(names) != 2 * len(regions):
        raise ValueError(f"{source}: unbalanced or malformed `rendered:` markers (found {names})")
    unknown = sorted(set(regions) - set(RENDERERS))
    if unknown:
        raise ValueError(f"{source}: no renderer named {unknown}; known: {sorted(RENDERERS)}")

    def replace(match: re.Match) -> str:
        body = RENDERERS[match.group("name")](root).strip("\n")
        return f"{match.group('begin')}{body}\n{match.group('end')}"

    return _REGION.sub(replace, text)


def render_all(root: Path = ROOT) -> dict[Path, str]:
    """``{target: rendered text}`` for every target file (relative paths)."""
    return {target: render_text((root / target).read_text(encoding="utf-8"), root, str(target)) for target in TARGETS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a rendered region is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's)")
    args = parser.parse_args(argv)
    stale = []
    for target, text in render_all(args.root).items():
        path = args.root / target
        if path.read_text(encoding="utf-8") == text:
            continue
        stale.append(str(target))
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"out of date (run python benchmarks/render_results.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(stale)) if stale else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
