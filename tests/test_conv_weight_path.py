"""The convolution layers' shared-preference fast path: one convolution with ``W + delta(lambda)``.

It must give the adapter branch's outputs and gradients, and step aside whenever it would change the result
(per-sample preferences, active dropout, adapters in another dtype than the weight, hooks on the base layer).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import ConvModel
from torch import nn

import peft_palora
from peft_palora.layer import ConvNd

TARGETS = ["conv2d", "grouped", "depthwise", "conv1d", "conv3d"]


def build() -> nn.Module:
    torch.manual_seed(0)
    config = {"num_tasks": 3, "r": 2, "target_modules": TARGETS, "init_weights": False, "train_base_weights": True}
    return get_peft_model(ConvModel(), peft_palora.PaLoRAConfig(**config))


def conv_layers(model) -> list[ConvNd]:
    return [m for m in model.modules() if isinstance(m, ConvNd)]


def branch_reference(model, x):
    """The adapter-branch forward of every layer (base output + adapter output), whatever path the layers take."""
    originals = {}
    for layer in conv_layers(model):
        originals[layer] = layer._can_fold_into_weight
        layer._can_fold_into_weight = lambda names: False
    try:
        return model(x=x)
    finally:
        for layer, method in originals.items():
            layer._can_fold_into_weight = method


def count_branch_calls(model, x, **kwargs) -> int:
    calls = []
    for layer in conv_layers(model):
        original = layer._adapter_output
        layer._adapter_output = lambda name, inp, _original=original: calls.append(name) or _original(name, inp)
    model(x=x, **kwargs)
    for layer in conv_layers(model):
        del layer._adapter_output
    return len(calls)


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_shared_preference_runs_one_convolution_and_matches_the_adapter_branch():
    model = build()
    model.set_preference([0.2, 0.3, 0.5])
    x = torch.randn(3, 4, 8, 8)

    assert count_branch_calls(model, x) == 0

    fast = model(x=x)
    (fast**2).sum().backward()
    fast_grads = grads(model)
    model.zero_grad()
    slow = branch_reference(model, x)
    (slow**2).sum().backward()
    slow_grads = grads(model)

    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert len(fast_grads) == len(slow_grads) > 2 * len(TARGETS)  # A, B and the trained base weights
    for got, expected in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_per_sample_preferences_keep_the_adapter_branch():
    model = build()
    x = torch.randn(2, 4, 8, 8)
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    assert count_branch_calls(model, x, preference=rows) == len(TARGETS)
    # and each row equals the shared-preference (fast path) output of its own sample
    per_sample = model(x=x, preference=rows)
    for i, row in enumerate(rows):
        torch.testing.assert_close(per_sample[i : i + 1], model(x=x[i : i + 1], preference=row), rtol=1e-5, atol=1e-5)


def test_active_dropout_keeps_the_adapter_branch_and_eval_mode_folds():
    torch.manual_seed(0)
    config = peft_palora.PaLoRAConfig(num_tasks=2, target_modules=TARGETS, palora_dropout=0.5, init_weights=False)
    model = get_peft_model(ConvModel(), config)
    x = torch.randn(2, 4, 8, 8)
    model.train()
    assert count_branch_calls(model, x) == len(TARGETS)
    model.eval()
    assert count_branch_calls(model, x) == 0


def test_adapters_in_another_dtype_than_the_weight_keep_the_adapter_branch():
    model = build()
    for layer in conv_layers(model):
        layer.get_base_layer().to(torch.bfloat16)
    assert count_branch_calls(model, torch.randn(2, 4, 8, 8).to(torch.bfloat16)) == len(TARGETS)


def test_a_hook_on_the_base_layer_still_runs():
    model = build()
    seen = []
    conv_layers(model)[0].get_base_layer().register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 4, 8, 8)
    assert count_branch_calls(model, x) == 1  # only the hooked layer takes the branch
    assert seen == [torch.Size([2, 8, 4, 4])]


@pytest.mark.parametrize("merged", [False, True])
def test_merge_and_disabled_adapters_are_unaffected(merged):
    model = build()
    model.set_preference([0.1, 0.6, 0.3])
    x = torch.randn(2, 4, 8, 8)
    expected = branch_reference(model, x)
    if merged:
        model.merge_adapter()
    torch.testing.assert_close(model(x=x), expected, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        base = model(x=x)
    model.unmerge_adapter()
    torch.manual_seed(0)
    torch.testing.assert_close(base, ConvModel()(x), rtol=1e-6, atol=1e-6)
