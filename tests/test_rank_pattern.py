"""``rank_pattern`` / ``alpha_pattern``: per-layer ranks and scales, matched the way ``peft.LoraConfig`` matches them."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import ConvModel
from torch import nn

import peft_palora
from peft_palora.tuner.model import palora_layers

TARGETS = ["conv2d", "grouped", "depthwise", "conv1d", "conv3d"]
PATTERNS = {"rank_pattern": {"grouped": 3, "conv[13]d": 5}, "alpha_pattern": {"conv1d": 10.0}}


def build(**overrides) -> nn.Module:
    torch.manual_seed(0)
    config = {"num_tasks": 2, "r": 1, "palora_alpha": 2.0, "target_modules": TARGETS, "init_weights": False}
    return get_peft_model(ConvModel(), peft_palora.PaLoRAConfig(**(config | PATTERNS | overrides)))


def layer_by_name(model) -> dict:
    return {name.rsplit(".", 1)[-1]: layer for name, layer in model.named_modules() if layer in palora_layers(model)}


def test_each_layer_gets_the_rank_and_scale_of_the_first_matching_key():
    layers = layer_by_name(build())
    # (rank, alpha): regex keys match the end of the module path; layers without a key keep r and palora_alpha
    expected = {"conv2d": (1, 2.0), "grouped": (3, 2.0), "depthwise": (1, 2.0), "conv1d": (5, 10.0), "conv3d": (5, 2.0)}
    for name, (rank, alpha) in expected.items():
        layer = layers[name]
        assert layer.r["default"] == rank
        assert layer.scaling["default"] == pytest.approx(alpha / rank)
        # T * rank directions in the stacked A and B
        assert layer.palora_A["default"].shape[0] == layer.get_base_layer().groups * 2 * rank
        assert layer.palora_B["default"].shape[1] == 2 * rank


def test_output_equals_an_independent_per_task_computation():
    model = build()
    preference = torch.tensor([0.3, 0.7])
    model.set_preference(preference)
    x = torch.randn(2, 4, 8, 8)
    conv1d = layer_by_name(model)["conv1d"]
    a, b = conv1d.palora_A["default"].detach(), conv1d.palora_B["default"].detach()  # (2*5, 12, 2), (6, 2*5, 1)
    delta = sum(
        preference[t] * torch.einsum("or,rik->oik", b[:, 5 * t : 5 * (t + 1), 0], a[5 * t : 5 * (t + 1)])
        for t in range(2)
    )
    with torch.no_grad():
        h = torch.randn(3, 12, 16)
        base = conv1d.get_base_layer()
        expected = nn.functional.conv1d(h, base.weight + (10.0 / 5) * delta, base.bias)
        torch.testing.assert_close(conv1d(h), expected, rtol=1e-5, atol=1e-5)
        # per-sample rows (the adapter branch) agree with the shared preference (the folded kernel)
        rows = torch.tensor([[0.3, 0.7], [1.0, 0.0]])
        batched = model(x=x, preference=rows)
        torch.testing.assert_close(batched[:1], model(x=x[:1], preference=rows[0]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[1:], model(x=x[1:], preference=rows[1]), rtol=1e-5, atol=1e-5)


def test_patterns_survive_save_and_load(tmp_path):
    model = build()
    model.set_preference([0.2, 0.8])
    x = torch.randn(2, 4, 8, 8)
    expected = model(x=x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == PATTERNS["rank_pattern"]
    assert saved["alpha_pattern"] == PATTERNS["alpha_pattern"]
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(ConvModel(), tmp_path)
    loaded.set_preference([0.2, 0.8])
    torch.testing.assert_close(loaded(x=x), expected)
    assert layer_by_name(loaded)["grouped"].r["default"] == 3


def test_a_bundle_saved_with_other_ranks_is_refused_before_loading(tmp_path):
    build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    base = ConvModel()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="rank_pattern|shape of"):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"rank_pattern": {"conv1d": 0}}, ValueError, r"rank_pattern\['conv1d'\]` must be >= 1"),
        ({"rank_pattern": {"conv1d": 2.0}}, TypeError, r"rank_pattern\['conv1d'\]` must be an int"),
        ({"rank_pattern": {"conv1d": True}}, TypeError, r"rank_pattern\['conv1d'\]` must be an int"),
        ({"rank_pattern": ["conv1d"]}, TypeError, "`rank_pattern` must be a dict"),
        ({"rank_pattern": {"": 2}}, TypeError, "`rank_pattern` must be a dict keyed by layer names"),
        ({"alpha_pattern": {"conv1d": "8"}}, TypeError, r"alpha_pattern\['conv1d'\]` must be a finite number"),
        ({"alpha_pattern": {"conv1d": float("nan")}}, TypeError, r"alpha_pattern\['conv1d'\]` must be a finite"),
    ],
)
def test_bad_patterns_are_refused_naming_the_entry(overrides, error, message):
    with pytest.raises(error, match=message):
        peft_palora.PaLoRAConfig(num_tasks=2, **overrides)


def test_model_card_shows_the_patterns():
    from peft_palora.interop.hub import build_model_card

    card = str(build_model_card(build().peft_config["default"]))
    assert "`rank_pattern` = {'grouped': 3, 'conv[13]d': 5}" in card
    assert "`alpha_pattern` = {'conv1d': 10.0}" in card
