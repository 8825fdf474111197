"""Numerics in low precision and at the edges of the simplex.

* ``torch.autocast`` (bf16, fp16) and base models stored in bf16/fp16: the adapters stay float32 (PEFT's
  ``autocast_adapter_dtype``), outputs and gradients are finite and match a float32 computation of the same weights
  within the precision of the dtype (checked against a tolerance much smaller than the adapters' contribution);
  merging a low-precision model still unmerges bit for bit.
* Preferences with entries of 1e-8 and one-hot preferences: finite outputs and gradients, and a tiny weight is not
  flushed to zero (the gradient of a task's ``B`` is exactly proportional to its weight).
* The trainer with ``mixed_precision="bf16"`` on the CPU really runs under autocast and keeps float32 adapters;
  ``"fp16"`` (which Accelerate cannot do on a CPU) says so instead of silently training in float32.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import get_peft_model
from tiny_models import CUSTOM_CASES, make_config
from transformers.pytorch_utils import Conv1D

from peft_palora import PaLoRAConfig, palora_layers

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
# worst relative error (to the output's largest magnitude) measured over the cases below: bf16 0.6%, fp16 0.07%
TOLERANCE = {"bf16": 3e-2, "fp16": 4e-3}
PREFERENCES = {
    "interior": [0.2, 0.3, 0.5],
    "tiny": [1e-8, 1e-8, 1.0 - 2e-8],  # one preference for the batch: folded into B
    "per-sample-edges": [[1e-8, 0.5, 0.5 - 1e-8], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]],  # scales the activations
}


def cpu_autocast_supported(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype
    except (RuntimeError, ValueError):
        return False


def skip_unless_autocast(name: str) -> None:
    if not cpu_autocast_supported(LOW_PRECISION[name]):
        pytest.skip(f"this torch build has no CPU autocast for {name}")


def build(case, dtype=torch.float32):
    torch.manual_seed(0)
    model = get_peft_model(case.make_model().to(dtype), make_config(case, num_tasks=3)).eval()
    with torch.no_grad():
        for layer in palora_layers(model):
            layer.palora_B["default"].mul_(5.0)  # adapters that matter: their contribution dwarfs the tolerance
    return model


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}


def adapter_grads(model) -> list[torch.Tensor]:
    return [p.grad for layer in palora_layers(model) for p in (layer.palora_A["default"], layer.palora_B["default"])]


def loss_and_grads(model, inputs: dict, preference) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, preference=preference)
    out.float().pow(2).mean().backward()
    return out, adapter_grads(model)


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    scale = expected.abs().max().item()
    assert (got.float() - expected).abs().max().item() <= tolerance * scale + 1e-12


def check_against_float32(low, reference, low_inputs, reference_inputs, preference, name, autocast):
    with torch.autocast("cpu", dtype=LOW_PRECISION[name], enabled=autocast):
        out, grads = loss_and_grads(low, low_inputs, preference)
    expected, expected_grads = loss_and_grads(reference, reference_inputs, preference)
    assert out.dtype == LOW_PRECISION[name]
    assert torch.isfinite(out).all()
    assert_close_to_scale(out, expected, TOLERANCE[name])
    with torch.no_grad(), reference.disable_adapter():
        without_adapters = reference(**reference_inputs)
    assert (without_adapters - expected).abs().max() > 10 * TOLERANCE[name] * expected.abs().max()
    assert all(layer.palora_A["default"].dtype == torch.float32 for layer in palora_layers(low))
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        assert_close_to_scale(grad, expected_grad, 5 * TOLERANCE[name])


@pytest.mark.parametrize("preference", PREFERENCES.values(), ids=PREFERENCES.keys())
@pytest.mark.parametrize("name", LOW_PRECISION)
@pytest.mark.parametrize("case", CUSTOM_CASES, ids=lambda c: c.name)
def test_autocast_keeps_float32_adapters_and_matches_float32(case, name, preference):
    skip_unless_autocast(name)
    model = build(case)
    inputs = case.make_inputs(3)
    check_against_float32(model, copy.deepcopy(model), inputs, inputs, preference, name, autocast=True)


@pytest.mark.slow
@pytest.mark.parametrize("preference", PREFERENCES.values(), ids=PREFERENCES.keys())
@pytest.mark.parametrize("name", LOW_PRECISION)
@pytest.mark.parametrize("case", CUSTOM_CASES, ids=lambda c: c.name)
def test_low_precision_base_keeps_float32_adapters_and_matches_float32(case, name, preference):
    low = build(case, LOW_PRECISION[name])
    reference = copy.deepcopy(low).float()  # the very same (rounded) base weights, computed in float32
    inputs = cast_inputs(case.make_inputs(3), LOW_PRECISION[name])
    check_against_float32(low, reference, inputs, cast_inputs(inputs, torch.float32), preference, name, autocast=False)


@pytest.mark.parametrize("name", LOW_PRECISION)
@pytest.mark.parametrize("case", CUSTOM_CASES, ids=lambda c: c.name)
def test_low_precision_merge_is_close_and_unmerge_restores(case, name):
    model = build(case, LOW_PRECISION[name])
    inputs = cast_inputs(case.make_inputs(3), LOW_PRECISION[name])
    weights = [layer.get_base_layer().weight.detach().clone() for layer in palora_layers(model)]
    with torch.no_grad():
        model.set_preference([0.2, 0.3, 0.5])
        unmerged = model(**inputs)
        model.merge_adapter()
        assert all(layer.get_base_layer().weight.dtype == LOW_PRECISION[name] for layer in palora_layers(model))
        merged = model(**inputs)
        # the merged weight is rounded to the low precision once more: allow twice the tolerance
        assert_close_to_scale(merged, unmerged.float(), 2 * TOLERANCE[name])
        model.unmerge_adapter()
        # No copy of the weights is kept, so unmerge subtracts the delta in the low precision: each weight comes back
        # to within a couple of that dtype's rounding steps of its value.
        eps = torch.finfo(LOW_PRECISION[name]).eps
        for layer, before in zip(palora_layers(model), weights):
            after = layer.get_base_layer().weight
            delta = max(float((after.float() - before.float()).abs().max()), 0.0)
            bound = 2 * eps * float(before.float().abs().max() + layer.get_delta_weight("default").float().abs().max())
            assert delta <= bound, (delta, bound)
        assert_close_to_scale(model(**inputs), unmerged.float(), 2 * TOLERANCE[name])


class SingleLayer(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


SINGLE_LAYERS = {
    "linear": (lambda: torch.nn.Linear(5, 4), lambda: torch.randn(3, 5)),
    "conv2d": (lambda: torch.nn.Conv2d(2, 4, 3, groups=2), lambda: torch.randn(3, 2, 5, 5)),
    "embedding": (lambda: torch.nn.Embedding(9, 4), lambda: torch.randint(0, 9, (3, 6))),
    "gpt2_conv1d": (lambda: Conv1D(4, 5), lambda: torch.randn(3, 5)),
}


@pytest.mark.parametrize("per_sample", [False, True], ids=["one-preference", "per-sample"])
@pytest.mark.parametrize("layer", SINGLE_LAYERS)
def test_tiny_preference_weights_are_not_flushed_to_zero(layer, per_sample):
    """One adapted layer and the loss sum(output): dL/dB_t = lambda_t * (alpha/r) * sum(A_t x), exactly linear in
    lambda_t. So the gradient at lambda_0 = 1e-8 is 1e-8 times the gradient at lambda_0 = 1, not zero."""
    make_layer, make_inputs = SINGLE_LAYERS[layer]
    torch.manual_seed(0)
    config = PaLoRAConfig(num_tasks=3, r=2, target_modules=["layer"], init_weights=False)
    model = get_peft_model(SingleLayer(make_layer()), config)
    x = make_inputs()

    def task0_b_grad(preference):
        preference = torch.tensor(preference)
        model.zero_grad(set_to_none=True)
        out = model(x=x, preference=preference.expand(3, 3) if per_sample else preference)
        assert torch.isfinite(out).all()
        out.sum().backward()
        grad = palora_layers(model)[0].palora_B["default"].grad
        assert torch.isfinite(grad).all()
        return grad[:, :2]  # task 0's r = 2 directions

    tiny, unit = task0_b_grad([1e-8, 0.5, 0.5 - 1e-8]), task0_b_grad([1.0, 0.0, 0.0])
    assert tiny.abs().max() > 0
    torch.testing.assert_close(tiny / 1e-8, unit, rtol=1e-5, atol=1e-6)
    assert torch.equal(task0_b_grad([0.0, 0.0, 1.0]), torch.zeros_like(unit))  # weight 0: no gradient at all


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------
def _reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def clean_accelerate_state():
    """Accelerate keeps its mixed-precision setting in a process-wide singleton: leave none behind for later tests."""
    _reset_accelerate_state()
    yield
    _reset_accelerate_state()


def _trainer(tmp_path, mixed_precision: str):
    from test_training import make_trainer, tiny_model

    _reset_accelerate_state()
    return make_trainer(tmp_path / mixed_precision, model=tiny_model(init_weights=False), max_steps=2,
                        mixed_precision=mixed_precision, eval_points_per_side=2)  # fmt: skip


def _train_recording_head_inputs(trainer) -> list[torch.dtype]:
    dtypes = []
    head = trainer.unwrapped_model.heads["left"]
    handle = head.register_forward_hook(lambda module, args, output: dtypes.append(args[0].dtype))
    try:
        trainer.train()
    finally:
        handle.remove()
    return dtypes


@pytest.mark.slow
def test_trainer_bf16_on_cpu_runs_under_autocast_with_float32_adapters(tmp_path, clean_accelerate_state):
    skip_unless_autocast("bf16")
    reference = _trainer(tmp_path, "no")
    reference_dtypes = _train_recording_head_inputs(reference)
    trainer = _trainer(tmp_path, "bf16")
    assert trainer.accelerator.mixed_precision == "bf16"
    dtypes = _train_recording_head_inputs(trainer)

    assert set(reference_dtypes) == {torch.float32}
    assert torch.bfloat16 in set(dtypes)  # the forward really ran under autocast
    model = trainer.unwrapped_model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # step 1 is logged before any update: same model, same batch, same preferences -> the same loss up to bf16
    bf16_log, fp32_log = trainer.log_history[0], reference.log_history[0]
    for key in ("train/loss", "train/loss_left", "train/loss_right"):
        assert bf16_log[key] == pytest.approx(fp32_log[key], rel=2e-2)
    assert trainer.log_history[-1]["train/loss"] != pytest.approx(fp32_log["train/loss"], rel=1e-9)


def test_trainer_fp16_on_cpu_warns_that_it_trains_in_float32(tmp_path, caplog, clean_accelerate_state):
    with caplog.at_level(logging.WARNING, logger="peft_palora.training"):
        trainer = _trainer(tmp_path, "fp16")
    assert "mixed_precision='fp16' has no effect on the CPU" in caplog.text
    assert set(_train_recording_head_inputs(trainer)) == {torch.float32}
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped_model.parameters())
