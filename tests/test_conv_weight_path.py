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
from peft_palora.tuner.layer import ConvNd

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
        layer._can_fold_into_weight = lambda names, x: False
    try:
        return model(x=x)
    finally:
        for layer, method in originals.items():
            layer._can_fold_into_weight = method


def count_branch_calls(model, x, **kwargs) -> int:
    calls = []
    for layer in conv_layers(model):
        original = layer._adapter_output
        layer._adapter_output = lambda name, inp, scale, _original=original: calls.append(name) or _original(
            name, inp, scale
        )
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
    config = peft_palora.PaLoRAConfig(
        num_tasks=2, target_modules=TARGETS, palora_dropout=0.5, init_weights=False, train_base_weights=True
    )
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


# ---- the summed kernel is rebuilt in backward, not kept -------------------------------------------------------------
GEOMETRIES = [
    pytest.param(nn.Conv1d, {"kernel_size": 3, "stride": 2, "padding": 1}, id="conv1d-stride"),
    pytest.param(nn.Conv2d, {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2}, id="conv2d-dilated-grouped"),
    pytest.param(nn.Conv2d, {"kernel_size": (2, 3), "padding": "same"}, id="conv2d-same-even-kernel"),
    pytest.param(nn.Conv2d, {"kernel_size": 3, "padding": "valid", "bias": False}, id="conv2d-valid-no-bias"),
    pytest.param(nn.Conv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, id="conv2d-reflect"),
    pytest.param(nn.Conv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "circular"}, id="conv2d-circular"),
    pytest.param(nn.Conv3d, {"kernel_size": 2, "padding": 1, "padding_mode": "replicate"}, id="conv3d-replicate"),
]


class OneConv(nn.Module):
    def __init__(self, conv_cls, kwargs):
        super().__init__()
        self.conv = conv_cls(4, 6, **kwargs)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.slow
@pytest.mark.parametrize("conv_cls, kwargs", GEOMETRIES)
@pytest.mark.parametrize("train_base_weights", [True, False])
def test_rebuilt_kernel_gives_autograds_gradients_for_every_geometry(conv_cls, kwargs, train_base_weights):
    torch.manual_seed(0)
    config = peft_palora.PaLoRAConfig(
        num_tasks=2, r=2, target_modules=["conv"], init_weights=False, train_base_weights=train_base_weights
    )
    model = get_peft_model(OneConv(conv_cls, kwargs), config)
    model.set_preference([0.3, 0.7])
    layer = conv_layers(model)[0]
    spatial = {nn.Conv1d: (9,), nn.Conv2d: (7, 8), nn.Conv3d: (5, 4, 6)}[conv_cls]
    x = torch.randn(2, 4, *spatial, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(reference: bool):
        x.grad = None
        for p in params:
            p.grad = None
        if reference:  # plain autograd through W + delta
            base = layer.get_base_layer()
            out = base._conv_forward(x, base.weight + layer.get_delta_weight("default"), base.bias)
        else:
            out = model(x=x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in params]

    out, grad_x, grads = run(reference=False)
    ref_out, ref_grad_x, ref_grads = run(reference=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-5)
    has_bias = layer.get_base_layer().bias is not None
    assert len(grads) == 2 + (1 + has_bias if train_base_weights else 0)  # A, B (+ W and bias when trained)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_forward_keeps_no_copy_of_the_kernel():
    torch.manual_seed(0)
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=1, target_modules=["conv"], train_base_weights=True)
    model = get_peft_model(OneConv(nn.Conv2d, {"kernel_size": 3, "padding": 1}), config)
    layer = conv_layers(model)[0]
    x = torch.randn(2, 4, 6, 6)
    base = layer.get_base_layer()
    inputs = (x, base.weight, base.bias, *layer.palora_A.values(), *layer.palora_B.values())
    allowed = {t.data_ptr() for t in inputs}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x=x)
    assert saved and {t.data_ptr() for t in saved} <= allowed
    out.sum().backward()
    assert layer.get_base_layer().weight.grad is not None and layer.palora_B["default"].grad.abs().sum() > 0


def test_a_gradient_penalty_differentiates_twice_like_autograd():
    """``create_graph=True`` (gradient penalties, meta-learning) must work through the rebuilt kernel too."""
    torch.manual_seed(0)
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["conv"], init_weights=False)
    model = get_peft_model(OneConv(nn.Conv2d, {"kernel_size": 3, "stride": 2, "padding": 1}), config)
    layer = conv_layers(model)[0]
    base = layer.get_base_layer()
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def penalty_grads(forward):
        for p in params:
            p.grad = None
        (grad_x,) = torch.autograd.grad(forward().pow(2).sum(), x, create_graph=True)
        grad_x.pow(2).sum().backward()
        return [p.grad.clone() for p in params]

    got = penalty_grads(lambda: model(x=x))
    expected = penalty_grads(lambda: base._conv_forward(x, base.weight + layer.get_delta_weight("default"), base.bias))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in got)


def test_a_batch_with_fewer_output_positions_than_channels_takes_the_cheaper_branch():
    """Building the delta costs about as much as the adapter branch over ``out_channels`` output positions."""
    torch.manual_seed(0)
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=1, target_modules=["conv"], init_weights=False, train_base_weights=True)
    model = get_peft_model(OneConv(nn.Conv2d, {"kernel_size": 3, "padding": 1}), config)  # 6 output channels
    assert count_branch_calls(model, torch.randn(1, 4, 2, 2)) == 1  # 4 output positions < 6 channels
    assert count_branch_calls(model, torch.randn(2, 4, 2, 2)) == 0  # 8 >= 6
    unbatched = torch.randn(4, 3, 3)  # nn.Conv2d also takes (C, H, W)
    torch.testing.assert_close(model(x=unbatched), branch_reference(model, unbatched))


def test_a_frozen_base_keeps_the_branch_in_training_and_folds_without_gradients():
    """With a frozen base the summed kernel's backward would add a whole weight-gradient convolution."""
    torch.manual_seed(0)
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=1, target_modules=TARGETS, init_weights=False)
    model = get_peft_model(ConvModel(), config)
    x = torch.randn(2, 4, 8, 8)
    assert count_branch_calls(model, x) == len(TARGETS)
    with torch.no_grad():
        assert count_branch_calls(model, x) == 0
        torch.testing.assert_close(model(x=x), branch_reference(model, x), rtol=1e-5, atol=1e-5)


def test_backward_uses_the_preference_of_its_forward_even_after_it_changed():
    """A window of preferences runs several forwards before one backward; each must rebuild its own kernel."""
    model = build()
    x = torch.randn(3, 4, 8, 8)
    prefs = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    params = [p for p in model.parameters() if p.requires_grad]

    def window_grads(forward):
        for p in params:
            p.grad = None
        sum((forward(pref) ** 2).mean() * (i + 1) for i, pref in enumerate(prefs)).backward()
        return [p.grad.clone() for p in params]

    got = window_grads(lambda pref: model(x=x, preference=pref))  # the preference is restored after each call
    expected = window_grads(lambda pref: branch_reference_at(model, x, pref))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def branch_reference_at(model, x, preference):
    with model.preference_context(preference):
        return branch_reference(model, x)
