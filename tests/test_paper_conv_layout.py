"""`PaLoRAConfig(conv_layout="paper")`: the paper's convolution adapter, against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_palora
from peft_palora import palora_layers
from peft_palora.tuner.layer import PaperConvNd


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 10, 5, padding=2)
        self.c2 = nn.Conv2d(10, 20, 3, stride=2, groups=2)
        self.c3 = nn.Conv1d(20, 6, 3)
        self.c4 = nn.Conv3d(1, 4, (2, 3, 3))

    def forward(self, x):
        h = self.c2(self.c1(x))  # (B, 20, 7, 7)
        h1 = self.c3(h.flatten(2))  # (B, 6, 47)
        h3 = self.c4(h1[:, :, :45].reshape(-1, 1, 6, 5, 9))
        return torch.cat([h1.flatten(1), h3.flatten(1)], 1)


TARGETS = ["c1", "c2", "c3", "c4"]


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = peft_palora.PaLoRAConfig(num_tasks=3, r=1, palora_alpha=2.0, target_modules=TARGETS, conv_layout="paper",
                                      init_weights=False, **kwargs)
    return get_peft_model(Net(), config).eval()


def reference_delta(layer: PaperConvNd, preference: torch.Tensor) -> torch.Tensor:
    """The paper's form written out in float64, task by task: sum_t lambda_t (alpha/r) (B_t @ A_t).view(kernel)."""
    a, b = layer.palora_A["default"].double(), layer.palora_B["default"].double()
    k1, r = layer.get_base_layer().kernel_size[0], layer.r["default"]
    d = r * k1
    total = torch.zeros(layer.get_base_layer().weight.shape, dtype=torch.float64)
    for t, weight in enumerate(preference.tolist()):
        total += weight * layer.scaling["default"] * (b[:, t * d : (t + 1) * d] @ a[t * d : (t + 1) * d]).reshape(
            total.shape)
    return total


def test_shapes_and_init_follow_the_paper():
    model = build()
    c1 = palora_layers(model)[0]
    assert isinstance(c1, PaperConvNd)
    # B (out*k, T*r*k), A (T*r*k, in*k) for the 5x5 conv with r=1, T=3
    assert tuple(c1.palora_B["default"].shape) == (10 * 5, 3 * 5)
    assert tuple(c1.palora_A["default"].shape) == (3 * 5, 3 * 5)
    assert c1.palora_A["default"].abs().max() <= 1 / math.sqrt(3 * 5) + 1e-6  # the paper's bound 1/sqrt(in*k)
    delta = c1.get_delta_weight("default", torch.tensor([1.0, 0.0, 0.0]))
    # at r = 1 the kernel delta of one task can be full rank (PEFT's layout: rank <= r)
    assert torch.linalg.matrix_rank(delta.reshape(10, -1).double()) == 10


def test_delta_forward_merge_and_per_sample_match_the_reference():
    model = build()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    prefs = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    for layer in palora_layers(model):
        torch.testing.assert_close(layer.get_delta_weight("default", prefs[0]).double(), reference_delta(layer, prefs[0]),
                                   atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        rows = torch.cat([model(x[i : i + 1], preference=prefs[i]) for i in range(2)])
        torch.testing.assert_close(model(x, preference=prefs), rows, atol=1e-5, rtol=1e-4)
        model.set_preference(prefs[0])
        shared = model(x)
        torch.testing.assert_close(shared[0], rows[0], atol=1e-5, rtol=1e-4)
        model.merge_adapter()
        torch.testing.assert_close(model(x), shared, atol=1e-5, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), shared, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("train_base_weights", [False, True])
def test_training_gradients_match_plain_autograd(train_base_weights):
    model = build(train_base_weights=train_base_weights)
    model.train()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16)
    preference = torch.tensor([0.5, 0.25, 0.25])
    model(x, preference=preference).square().mean().backward()
    # independent: the same network with explicit float64 kernels W + delta(lambda) and plain F.conv / autograd
    layers = palora_layers(model)
    leaves = [(layer.palora_A["default"].detach().double().requires_grad_(),
               layer.palora_B["default"].detach().double().requires_grad_()) for layer in layers]  # fmt: skip

    def conv(layer, a, b, h):
        base = layer.get_base_layer()
        d = layer.r["default"] * base.kernel_size[0]
        scale = (preference.double() * layer.scaling["default"]).repeat_interleave(d)
        kernel = base.weight.double() + ((b * scale) @ a).reshape(base.weight.shape)
        return base._conv_forward(h, kernel, None if base.bias is None else base.bias.double())

    (a1, b1), (a2, b2), (a3, b3), (a4, b4) = leaves
    h = conv(layers[1], a2, b2, conv(layers[0], a1, b1, x.double()))
    h1 = conv(layers[2], a3, b3, h.flatten(2))
    h3 = conv(layers[3], a4, b4, h1[:, :, :45].reshape(-1, 1, 6, 5, 9))
    torch.cat([h1.flatten(1), h3.flatten(1)], 1).square().mean().backward()
    for layer, (a, b) in zip(layers, leaves):
        torch.testing.assert_close(layer.palora_A["default"].grad.double(), a.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.palora_B["default"].grad.double(), b.grad, atol=1e-5, rtol=1e-4)
        assert (layer.get_base_layer().weight.grad is not None) == train_base_weights


def test_paper_layout_bundles_reload(tmp_path):
    model = build()
    model.set_preference([0.1, 0.6, 0.3])
    model.save_pretrained(tmp_path / "bundle")
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(Net(), tmp_path / "bundle").eval()
    assert reloaded.peft_config["default"].conv_layout == "paper"
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=0, rtol=0)


def test_unknown_conv_layout_is_refused():
    with pytest.raises(ValueError, match="`conv_layout` must be 'peft' or 'paper'"):
        peft_palora.PaLoRAConfig(num_tasks=2, conv_layout="loralib")
