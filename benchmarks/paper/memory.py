"""Parameter overhead and peak training memory of PaLoRA against PaMaL (and the plain network), on CPU.

Configurations (the paper's, github.com/nik-dim/palora): MultiLeNet on MultiMNIST (T=2, r=1, batch 256, 1x28x28),
SegNet on CityScapes (T=2, r=4, batch 8, 3x128x256) and on NYUv2 (T=3, r=4, batch 2, 3x288x384). PaLoRA adapts every
convolution and linear layer with ``train_base_weights=True`` (batch norm trains too, as in the paper); PaMaL keeps T
copies of every parameter. Weights are random: memory does not depend on them, so no data is needed.

Parameters: the overhead over the plain network is PaLoRA's adapters and PaMaL's (T - 1) extra copies. The adapter
count is given for this library's layout and for the layout of the paper's code (see
``paper_models.paper_conv_adapter_parameters``); the paper's 23.8-31.7x claim is a ratio of such overheads.

Peak training memory, measured in a fresh subprocess per configuration (so that nothing of one configuration --
allocator caches, profiler buffers -- leaks into another), around full training steps (forward over the window,
backward, Adam step) on random inputs:

* ``tensor peak`` (primary): the peak of the bytes held by live CPU tensors during one training step (after one
  warm-up step, so gradients and Adam's state exist), from ``torch.profiler`` with ``profile_memory=True`` and its
  memory timeline, which also attributes the bytes at the peak to parameters, gradients, optimizer state, activations
  and temporaries. ``tracemalloc`` cannot be used: it only sees Python's allocator, not torch's.
* ``RSS peak``: the rise of the process's peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the model is built) over the RSS at that moment, across two unprofiled
  training steps. It includes allocator caching and fragmentation, so it is noisier; it is a cross-check that needs
  no private torch API.

The *overhead* of a method is its peak minus the plain network's peak (the network trained once, with one forward
per step). Run: ``python benchmarks/paper/memory.py`` (about 10-15 minutes on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# This folder (shared modules) and the repository root (peft_palora, for a checkout that is not pip-installed).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "examples")]

import numpy as np  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = {
    # name: (tasks, rank, batch, input shape, paper's window for PaLoRA, paper's window for PaMaL)
    "multilenet": {"num_tasks": 2, "rank": 1, "batch": 256, "input": (1, 28, 28), "windows": (4, 4)},
    "segnet_cityscapes": {"num_tasks": 2, "rank": 4, "batch": 8, "input": (3, 128, 256), "windows": (1, 3)},
    "segnet_nyuv2": {"num_tasks": 3, "rank": 4, "batch": 2, "input": (3, 288, 384), "windows": (6, 3)},
}
METHODS = ("plain", "palora", "pamal")
LABELS = {
    "multilenet": "MultiLeNet (MultiMNIST)",
    "segnet_cityscapes": "SegNet (CityScapes)",
    "segnet_nyuv2": "SegNet (NYUv2)",
}


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def build(model_name: str, method: str):
    """The model of ``method`` ("plain", "palora" or "pamal"), its optimizer param groups and ``forward(x, pref)``."""
    from paper_models import SEGNET_TASKS, MultiLeNet, PaMaL, SegNet, conv_and_linear_names, xavier_init
    from peft import get_peft_model
    from torch import nn

    import peft_palora

    spec = MODELS[model_name]
    if model_name == "multilenet":
        make, init = MultiLeNet, None
    else:
        tasks = SEGNET_TASKS[model_name.split("_")[1]]
        make, init = (lambda: SegNet(tasks)), xavier_init
    lr = 1e-3
    if method == "plain":
        model = make()
        return model, [{"params": list(model.parameters())}], (lambda x, pref: model(x))
    if method == "palora":
        base = make()
        config = peft_palora.PaLoRAConfig(
            num_tasks=spec["num_tasks"],
            r=spec["rank"],
            palora_alpha=1.0,
            target_modules=conv_and_linear_names(base),
            train_base_weights=True,
        )
        model = get_peft_model(base, config)
        for module in model.modules():  # the paper trains every base weight; PEFT freezes the untargeted norms
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(True)
        groups = peft_palora.adapter_param_groups(model, lr=lr)
        return model, groups, (lambda x, pref: model(x=x, preference=pref))
    if method == "pamal":
        model = PaMaL(make(), spec["num_tasks"], init=init)
        return model, [{"params": model.trainable_parameters()}], (lambda x, pref: model(x, pref))
    raise ValueError(f"unknown method {method!r}")


def task_loss(outputs, generator):
    """A realistic loss per task on random targets: cross-entropy for classification/segmentation, L1 otherwise."""
    import torch
    import torch.nn.functional as F

    losses = []
    for out in outputs.values():
        if out.dim() == 2 or out.shape[1] > 3:  # logits: (B, C) or (B, C, H, W) with C classes
            target = torch.randint(0, out.shape[1], (out.shape[0], *out.shape[2:]), generator=generator)
            losses.append(F.cross_entropy(out, target))
        else:
            losses.append((out - torch.rand(out.shape, generator=generator)).abs().mean())
    return torch.stack(losses)


def worker(config: dict) -> dict:
    import torch

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    # Everything is imported before the baseline RSS is taken, so the imports do not count as training memory.
    import paper_models  # noqa: F401
    import peft  # noqa: F401
    from torch.profiler import ProfilerActivity, profile

    import peft_palora  # noqa: F401

    spec = MODELS[config["model"]]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((spec["batch"], *spec["input"]), generator=generator)
    window = config["window"]
    num_tasks = spec["num_tasks"]
    prefs = torch.distributions.Dirichlet(torch.ones(num_tasks)).sample((window,))

    rss_before = _rss_kib("VmRSS")
    reset_ok = _reset_peak_rss()
    model, groups, forward = build(config["model"], config["method"])
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = 0
        for pref in prefs:
            losses = task_loss(forward(x, pref), generator)
            total = total + (pref * losses).sum()
        total.backward()
        optimizer.step()

    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rss_peak = _rss_kib("VmHWM") if reset_ok else None

    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "rss_peak_delta_mib": (rss_peak - rss_before) / 1024 if rss_peak is not None else None,
        "step_seconds": min(times),
    }
    if config.get("profile", True):
        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            step()
        result |= tensor_peak(prof)
    return result


def tensor_peak(prof) -> dict:
    """Peak bytes of live CPU tensors over the profiled step, and their categories at the peak."""
    try:
        from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

        timeline = MemoryProfileTimeline(prof._memory_profile())
        _, sizes = timeline._coalesce_timeline("cpu")
        sizes = np.asarray(sizes, dtype=np.float64)[:, 1:]  # column 0 is unused padding
        totals = sizes.sum(axis=1)
        at_peak = sizes[int(totals.argmax())]
        names = {
            index: (category.name.lower() if category is not None else "unknown")
            for category, index in _CATEGORY_TO_INDEX.items()
        }
        breakdown = {names[i]: at_peak[i] / 2**20 for i in range(len(at_peak))}
        return {"tensor_peak_mib": float(totals.max()) / 2**20, "tensor_peak_breakdown_mib": breakdown}
    except Exception as error:  # a private API: report instead of failing the whole benchmark
        return {"tensor_peak_mib": None, "tensor_peak_error": f"{type(error).__name__}: {error}"}


# ---------------------------------------------------------------------------------------------------------------------
# Parent: spawn the workers, tabulate
# ---------------------------------------------------------------------------------------------------------------------
def parameter_table(model_name: str) -> dict:
    """Parameter counts without running anything (built on the meta device: no memory, no time)."""
    import torch
    from paper_models import paper_conv_adapter_parameters

    import peft_palora  # noqa: F401

    spec = MODELS[model_name]
    with torch.device("meta"):
        plain, _, _ = build(model_name, "plain")
        palora, _, _ = build(model_name, "palora")
    base = sum(p.numel() for p in plain.parameters())
    adapters = sum(p.numel() for n, p in palora.named_parameters() if "palora_" in n)
    paper_adapters = paper_conv_adapter_parameters(plain, spec["num_tasks"], spec["rank"])
    pamal_extra = (spec["num_tasks"] - 1) * base
    return {
        "base": base,
        "palora_adapters": adapters,
        "palora_adapters_paper_layout": paper_adapters,
        "pamal_extra": pamal_extra,
        "ratio": pamal_extra / adapters,
        "ratio_paper_layout": pamal_extra / paper_adapters,
    }


def run_worker(config: dict, timeout: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def fmt_mib(value) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def write_markdown(payload: dict, path: Path) -> None:
    import paper_training as pt

    lines = [
        "# Memory: PaLoRA against PaMaL",
        "",
        "## Parameter overhead over the plain network",
        "",
        "| model | T | r | base parameters | PaLoRA adapters (this library) | PaLoRA adapters (paper's layout) "
        "| PaMaL extra copies | PaMaL / PaLoRA (library) | PaMaL / PaLoRA (paper's layout) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, params in payload["parameters"].items():
        spec = MODELS[name]
        lines.append(
            f"| {LABELS[name]} | {spec['num_tasks']} | {spec['rank']} | {params['base']:,} | "
            f"{params['palora_adapters']:,} | {params['palora_adapters_paper_layout']:,} | {params['pamal_extra']:,} "
            f"| {params['ratio']:.1f}x | {params['ratio_paper_layout']:.1f}x |"
        )
    lines += [
        "",
        "The paper's code shapes a k x k convolution adapter as B (out*k, r*k) @ A (r*k, in*k); this library uses a "
        "k x k convolution to r channels and a 1x1 convolution back, r*(in*k*k + out) parameters per task, i.e. about "
        "k times fewer for 3x3 kernels. The paper's 23.8-31.7x is reproduced with the paper's layout.",
        "",
        "## Peak training memory (CPU, one training step: window forwards, backward, Adam)",
        "",
        "Tensor peak: live CPU tensor bytes at the peak of a profiled step (torch.profiler memory timeline). "
        "RSS peak: "
        "rise of the peak resident set size over two unprofiled steps. Overhead: minus the plain network's peak. "
        "MiB. (memory.json also holds the profiler's attribution of the tensor peak to categories; its heuristics "
        "count some tensors twice, e.g. parameters before and after the optimizer step, so only totals are shown.)",
        "",
        "| model | method | window | batch | parameters | tensor peak | overhead | RSS peak | overhead | step s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in payload["runs"]:
        plain = next(r for r in payload["runs"] if r["model"] == row["model"] and r["method"] == "plain")

        lines.append(
            f"| {LABELS[row['model']]} | {row['method']} | {row['window']} | {MODELS[row['model']]['batch']} "
            f"| {row['parameters']:,} | {fmt_mib(row.get('tensor_peak_mib'))} "
            f"| {overhead(row, plain, 'tensor_peak_mib')} "
            f"| {fmt_mib(row.get('rss_peak_delta_mib'))} | {overhead(row, plain, 'rss_peak_delta_mib')} "
            f"| {row['step_seconds']:.2f} |"
        )
    ratios = payload.get("overhead_ratios", {})
    if ratios:
        lines += [
            "",
            "Measured peak-memory overhead ratio PaMaL / PaLoRA (tensor peak, then RSS peak): "
            + "; ".join(f"{LABELS[k]} {fmt_ratio(v['tensor'])} / {fmt_ratio(v['rss'])}" for k, v in ratios.items())
            + f". n/a: an overhead below {MEASURABLE_OVERHEAD_MIB:g} MiB (within measurement noise), so no "
            "ratio is meaningful.",
        ]
    lines += ["", f"Setting: {payload['setting']}"]
    pt.atomic_write_text(path, "\n".join(lines) + "\n")


def overhead(row: dict, plain: dict, key: str) -> str:
    if row is plain:
        return "-"
    if row.get(key) is None or plain.get(key) is None:
        return "n/a"
    return f"{row[key] - plain[key]:+,.1f}"


#: Below this rise over the plain network (MiB) an overhead is within measurement noise, and a ratio would be noise.
MEASURABLE_OVERHEAD_MIB = 1.0


def overhead_ratios(rows: list[dict]) -> dict[str, float | None]:
    """PaMaL's peak-memory overhead over PaLoRA's, for the tensor and RSS peaks; None where not measurable."""
    rows = {r["method"]: r for r in rows}
    ratio = {}
    for key, label in (("tensor_peak_mib", "tensor"), ("rss_peak_delta_mib", "rss")):
        try:
            palora = rows["palora"][key] - rows["plain"][key]
            pamal = rows["pamal"][key] - rows["plain"][key]
        except (KeyError, TypeError):
            ratio[label] = None
            continue
        ratio[label] = pamal / palora if min(palora, pamal) >= MEASURABLE_OVERHEAD_MIB else None
    return ratio


def fmt_ratio(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1f}x"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import paper_training as pt

    names = list(payload["parameters"])
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    index = np.arange(len(names))
    palora = [payload["parameters"][n]["palora_adapters"] / 1e6 for n in names]
    paper = [payload["parameters"][n]["palora_adapters_paper_layout"] / 1e6 for n in names]
    pamal = [payload["parameters"][n]["pamal_extra"] / 1e6 for n in names]
    axes[0].bar(index - 0.27, palora, 0.27, label="PaLoRA adapters (library)", color="tab:red")
    axes[0].bar(index, paper, 0.27, label="PaLoRA adapters (paper's layout)", color="salmon")
    axes[0].bar(index + 0.27, pamal, 0.27, label="PaMaL extra copies", color="tab:blue")
    ticks = [LABELS[n].replace(" (", "\n(") for n in names]
    axes[0].set(
        xticks=index, xticklabels=ticks, ylabel="extra parameters (M)", yscale="log", title="Parameter overhead"
    )
    axes[0].legend(fontsize=8)
    for offset, method, color in ((-0.2, "palora", "tab:red"), (0.2, "pamal", "tab:blue")):
        values = []
        for name in names:
            rows = {r["method"]: r for r in payload["runs"] if r["model"] == name}
            if method in rows and rows[method].get("tensor_peak_mib") is not None:
                values.append(max(rows[method]["tensor_peak_mib"] - rows["plain"]["tensor_peak_mib"], 1e-3))
            else:
                values.append(np.nan)
        axes[1].bar(index + offset, values, 0.4, label=method, color=color)
    axes[1].set(
        xticks=index,
        xticklabels=ticks,
        ylabel="MiB over the plain network",
        yscale="log",
        title="Peak training memory overhead (tensor peak)",
    )
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    pt.atomic_save_figure(figure, path)
    plt.close(figure)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--paper_windows",
        action="store_true",
        help="Measure PaLoRA and PaMaL at the windows of the paper's configs instead of one "
        "forward per step; written to memory_paper_windows.{md,json,png}.",
    )
    parser.add_argument("--no_profile", action="store_true", help="Only the RSS measurement (faster).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200, help="Seconds per configuration.")
    parser.add_argument("--output_dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="Smoke tests only: measure in this process instead of a fresh one per configuration "
        "(the numbers are then not comparable between configurations).",
    )
    parser.add_argument("--tabulate_only", action="store_true", help="Rebuild the .md and .png from the .json.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return None
    import paper_training as pt

    with pt.restored_global_state():  # an in-process worker sets the thread count and seeds torch
        return _measure_and_tabulate(args, pt)


def _measure_and_tabulate(args: argparse.Namespace, pt) -> dict:
    out = Path(args.output_dir)
    stem = "memory_paper_windows" if args.paper_windows else "memory"
    if args.tabulate_only:
        payload = json.loads((out / f"{stem}.json").read_text())
        models = {run["model"] for run in payload["runs"]}
        payload["overhead_ratios"] = {
            name: overhead_ratios([r for r in payload["runs"] if r["model"] == name])
            for name in MODELS
            if name in models
        }
        pt.atomic_write_json(out / f"{stem}.json", payload)
        write_markdown(payload, out / f"{stem}.md")
        plot(payload, out / f"{stem}.png")
        return payload
    configs = []
    for name in args.models:
        configs.append({"model": name, "method": "plain", "window": 1})
        for method, paper_window in zip(("palora", "pamal"), MODELS[name]["windows"]):
            configs.append({"model": name, "method": method, "window": paper_window if args.paper_windows else 1})
    runs = []
    for config in configs:
        config |= {"threads": args.threads, "profile": not args.no_profile}
        start = time.perf_counter()
        result = worker(config) if args.in_process else run_worker(config, args.timeout)
        runs.append({k: v for k, v in config.items() if k not in ("threads", "profile")} | result)
        print(
            f"{config['model']} {config['method']} window {config['window']}: tensor peak "
            f"{fmt_mib(result.get('tensor_peak_mib'))} MiB, RSS peak {fmt_mib(result.get('rss_peak_delta_mib'))} "
            f"MiB ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    ratios = {name: overhead_ratios([r for r in runs if r["model"] == name]) for name in args.models}
    where = "IN-PROCESS (smoke test)" if args.in_process else "fresh process per configuration"
    payload = {
        "setting": f"threads {args.threads}; {where}; inputs random; Adam; batch and input per model as in the "
        "paper's configs; PaLoRA palora_alpha 1 with every conv/linear targeted and base weights + batch norm "
        "trained; PaMaL with T independently initialised copies of every parameter.",
        "parameters": {name: parameter_table(name) for name in args.models},
        "runs": runs,
        "overhead_ratios": ratios,
    }
    pt.atomic_write_json(out / f"{stem}.json", payload)
    write_markdown(payload, out / f"{stem}.md")
    plot(payload, out / f"{stem}.png")
    return payload


if __name__ == "__main__":
    main()
