"""Batched vs sequential window of preferences: time of one PaLoRA training step on CPU.

PaLoRA evaluates each batch under a window of ``m`` preferences per step. The batched path runs ONE forward over
the batch repeated ``m`` times with a per-sample preference; the sequential path runs ``m`` forwards. Both give
the same losses and gradients (tests/test_training.py); this script measures how much faster the batched one is.
The two paths are timed alternately in the same process (interleaved repeats, median), so machine load affects
both alike, and the ratio is printed side by side.

    python benchmarks/bench_window.py                 # m = 4, batches of 8, 16 and 32, a small ViT
    python benchmarks/bench_window.py --window 8 --batch-sizes 16 --threads 2

The gain is the per-call overhead the batched path saves, so it is largest for small batches and small models
and shrinks as the batch grows (compute-bound). Measured on 2 shared CPU cores, 1 thread, m = 4: 1.9x at batch 8,
1.5x at batch 16, 1.2x at batch 32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import ViTConfig, ViTModel

import peft_palora
from peft_palora.preferences import AnnealedGridSampler
from peft_palora.training.multitask import MultiTaskModel, linear_heads
from peft_palora.training.window import window_task_losses

TASKS = ["left", "right"]


def build_model(hidden_size: int, num_layers: int) -> MultiTaskModel:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    palora = peft_palora.PaLoRAConfig(
        task_names=TASKS,
        r=4,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
        train_base_weights=True,
    )
    backbone = get_peft_model(ViTModel(config), palora)
    return MultiTaskModel(backbone, linear_heads(hidden_size, {task: 10 for task in TASKS}))


def time_step(model, inputs, labels, preferences, mode: str) -> float:
    loss_fns = {task: F.cross_entropy for task in TASKS}
    start = time.perf_counter()
    losses = window_task_losses(model, inputs, labels, preferences, loss_fns, TASKS, mode=mode)
    (preferences * losses).sum(dim=1).mean().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=4, help="preferences per step (m)")
    parser.add_argument("--batch-sizes", default="8,16,32", help="comma-separated batch sizes to measure")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default because on a shared machine multi-threaded timings of small ops are "
        "dominated by thread contention",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args.hidden_size, args.num_layers)
    preferences = AnnealedGridSampler(len(TASKS), args.window).sample(0.5)
    print(
        f"window m={args.window}, ViT hidden {args.hidden_size} x {args.num_layers} layers, {torch.get_num_threads()} "
        f"thread(s); one training step (forward + backward), median of {args.repeats} interleaved repeats"
    )
    print(f"{'batch':>6} {'batched ms':>11} {'sequential ms':>14} {'speed-up':>9}")
    for batch_size in (int(value) for value in args.batch_sizes.split(",")):
        generator = torch.Generator().manual_seed(0)
        inputs = {"pixel_values": torch.rand(batch_size, 1, 28, 28, generator=generator)}
        labels = {task: torch.randint(0, 10, (batch_size,), generator=generator) for task in TASKS}
        timings = {"batched": [], "sequential": []}
        for _ in range(3):  # warm-up
            for mode in timings:
                time_step(model, inputs, labels, preferences, mode)
        for _ in range(args.repeats):
            for mode in timings:
                timings[mode].append(time_step(model, inputs, labels, preferences, mode))
        batched = statistics.median(timings["batched"])
        sequential = statistics.median(timings["sequential"])
        print(f"{batch_size:>6} {batched * 1e3:>11.2f} {sequential * 1e3:>14.2f} {sequential / batched:>8.2f}x")


if __name__ == "__main__":
    main()
