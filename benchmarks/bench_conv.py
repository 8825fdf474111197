"""Training cost of PaLoRA's convolution layers on CPU, measured side by side in one run.

With one preference for the batch and the base weights training (``train_base_weights=True``, the paper's mode), a
PaLoRA convolution runs ONE convolution with ``W + delta(lambda)`` and rebuilds that kernel in backward instead of
keeping it. This script compares, on a ResNet built from its transformers config (ResNet-18 layout, random weights:
speed and memory do not depend on the values) with every convolution targeted:

* ``paper_shared``: PaLoRA (T=3, r=4), base trained, one preference for the batch (the summed kernel);
* ``paper_per_sample``: the same model with per-sample preferences (every row the same preference), which runs the
  base convolution plus the adapter branch, the layout of PEFT's LoRA for convolutions;
* ``base``: the bare network, every weight trained (the cost PaLoRA adds to);
* ``frozen_shared``: PaLoRA with a frozen base (PEFT's default), which keeps the branch in training;
* ``lora``: PEFT LoRA of rank T*r = 12 on the same convolutions, frozen base.

For each: the median training step (forward + backward) and the bytes autograd keeps for the backward pass (counted
with ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded): the activation memory a
training step holds at its peak. Run: ``python benchmarks/bench_conv.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_tuner import time_interleaved
from peft import LoraConfig, get_peft_model
from transformers import ResNetConfig, ResNetModel

import peft_palora

PREFERENCE = [0.2, 0.3, 0.5]


def build_resnet() -> torch.nn.Module:
    config = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic")
    return ResNetModel(config)


def conv_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]


def saved_bytes(model, forward) -> int:
    """Bytes of the tensors autograd saves for backward during one forward, each storage once, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = build_resnet().train()
    targets = conv_names(base)
    num_tasks, r = len(PREFERENCE), 4
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    def palora_model(train_base_weights: bool):
        config = peft_palora.PaLoRAConfig(
            num_tasks=num_tasks, r=r, target_modules=targets, init_weights=False, train_base_weights=train_base_weights
        )
        model = get_peft_model(copy.deepcopy(base), config)
        model.set_preference(PREFERENCE)
        return model

    paper, frozen = palora_model(True), palora_model(False)
    rows = torch.tensor([PREFERENCE] * args.batch_size)
    lora_config = LoraConfig(r=num_tasks * r, lora_alpha=num_tasks * r, target_modules=targets)
    lora = get_peft_model(copy.deepcopy(base), lora_config)

    forwards = {
        "paper_shared": (paper, lambda: paper(pixel_values=x).pooler_output),
        "paper_per_sample": (paper, lambda: paper(pixel_values=x, preference=rows).pooler_output),
        "base": (base, lambda: base(pixel_values=x).pooler_output),
        "frozen_shared": (frozen, lambda: frozen(pixel_values=x).pooler_output),
        "lora": (lora, lambda: lora(pixel_values=x).pooler_output),
    }

    def step(model, forward):
        def run():
            model.zero_grad(set_to_none=True)
            forward().pow(2).mean().backward()

        return run

    times = time_interleaved({name: step(*pair) for name, pair in forwards.items()}, args.repeats)
    memory = {name: saved_bytes(*pair) for name, pair in forwards.items()}

    print(
        f"ResNet-18 layout, {len(targets)} convolutions targeted, batch {args.batch_size}x3x{args.image_size}x"
        f"{args.image_size}, {args.threads} threads, PaLoRA T={num_tasks} r={r}, LoRA r={num_tasks * r}"
    )
    for name in forwards:
        print(f"{name:16s} train step {times[name] * 1e3:8.1f} ms   saved for backward {memory[name] / 2**20:7.1f} MiB")
    print(f"RATIO train paper_shared / paper_per_sample = {times['paper_shared'] / times['paper_per_sample']:.3f}")
    print(f"RATIO train paper_shared / base             = {times['paper_shared'] / times['base']:.3f}")
    print(f"RATIO train frozen_shared / lora            = {times['frozen_shared'] / times['lora']:.3f}")
    print(f"RATIO saved paper_shared / base             = {memory['paper_shared'] / memory['base']:.3f}")
    print(f"RATIO saved paper_per_sample / base         = {memory['paper_per_sample'] / memory['base']:.3f}")
    print(f"RATIO saved frozen_shared / lora            = {memory['frozen_shared'] / memory['lora']:.3f}")

if __name__ == "__main__":
    main()
