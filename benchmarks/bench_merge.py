"""What merging costs: resident memory added by `merge_adapter`, and merged inference against the bare base model.

A model of square Linear layers with at least 100 MiB of targeted float32 weights gets PaLoRA (T=3, r=8) on every
layer. Measured side by side in one run:

* resident memory (RSS, from /proc/self/statm) right before and right after `merge_adapter()`, after a garbage
  collection. Merging adds `delta(lambda)` in place and keeps only lambda (T floats) per layer, so the growth should
  be noise (a delta is built, added and freed one layer at a time). Target: < 5% of the targeted weights.
* forward time of the merged PaLoRA model against the bare base model holding the same merged weights (interleaved,
  median of N). Target: <= 1.02.

Usage: `python benchmarks/bench_merge.py [--hidden 2048 --layers 8 --repeats 15 --quick]`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time

import torch
from peft import get_peft_model
from torch import nn

import peft_palora


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stack(nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def timed(fn, x) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.repeats = 64, 2, 3

    torch.manual_seed(0)
    base = Stack(args.hidden, args.layers).eval()
    targeted_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in base.layers)
    config = peft_palora.PaLoRAConfig(num_tasks=3, r=8, target_modules=[f"layers.{i}" for i in range(args.layers)],
                                      init_weights=False)
    model = get_peft_model(base, config).eval()
    model.set_preference([0.5, 0.3, 0.2])
    x = torch.randn(args.batch, args.hidden)

    gc.collect()
    before = rss_bytes()
    model.merge_adapter()
    gc.collect()
    after = rss_bytes()
    added = after - before

    # The bare base model with the merged weights: what merged inference should cost.
    bare = copy.deepcopy(model.get_base_model())
    for index in range(args.layers):
        layer = model.get_base_model().layers[index]
        bare.layers[index] = copy.deepcopy(layer.get_base_layer())
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare(x), atol=1e-5, rtol=1e-4)
    merged_times, base_times = [], []
    for _ in range(2):  # warm-up
        timed(model, x), timed(bare, x)
    for _ in range(args.repeats):
        merged_times.append(timed(model, x))
        base_times.append(timed(bare, x))
    result = {
        "targeted_weights_mib": targeted_bytes / 2**20,
        "rss_added_by_merge_mib": added / 2**20,
        "rss_added_fraction": added / targeted_bytes,
        "merged_forward_s": statistics.median(merged_times),
        "base_forward_s": statistics.median(base_times),
        "merged_over_base": statistics.median(merged_times) / statistics.median(base_times),
        "threads": torch.get_num_threads(),
    }
    print(f"targeted weights: {result['targeted_weights_mib']:.1f} MiB ({args.layers} x Linear({args.hidden}, "
          f"{args.hidden}), float32), PaLoRA T=3, r=8")
    print(f"resident memory added by merge_adapter: {result['rss_added_by_merge_mib']:+.1f} MiB "
          f"({100 * result['rss_added_fraction']:+.2f}% of the targeted weights; target < 5%)")
    print(f"merged inference / bare base: {result['merged_over_base']:.3f} "
          f"({1e3 * result['merged_forward_s']:.2f} ms vs {1e3 * result['base_forward_s']:.2f} ms, median of "
          f"{args.repeats}, batch {args.batch}; target <= 1.02)")
    print(f"RATIO merge_rss_added_over_targeted_weights={max(result['rss_added_fraction'], 1e-9):.4f}")
    print(f"RATIO merged_inference_over_base={result['merged_over_base']:.3f}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
