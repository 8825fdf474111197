"""Property-based tests (hypothesis) of preference handling and merging.

(a) Every point of the simplex (vertices, edges, entries as small as 1e-8, as a list, tensor, per-sample batch or
    dict) is accepted and comes back from ``get_preference`` exactly as given; every vector with a negative entry, or
    whose sum is off by more than 1e-3, is refused and leaves the preference in force as it was. In bfloat16/float16,
    for any T up to 64, every rounded simplex point is accepted and every sum off by more than the dtype's eps refused.
(b) For random small Linear / Conv models, ranks, task counts, scalings and preferences, the merged model computes the
    unmerged model's outputs, a preference change while merged re-merges correctly, and ``unmerge_adapter`` restores
    the base weights bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

from peft_palora import PaLoRAConfig, palora_layers

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TASK_NAMES = ["t0", "t1", "t2", "t3", "t4"]


# ---------------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------------
@st.composite
def simplex_points(draw, num_tasks: int) -> list[float]:
    """A point of the simplex, as float32-representable Python floats that sum to 1 within float32 rounding."""
    kind = draw(st.sampled_from(["vertex", "tiny", "edge", "interior"]))
    if kind == "vertex":
        point = np.zeros(num_tasks)
        point[draw(st.integers(0, num_tasks - 1))] = 1.0
    elif kind == "tiny":
        # some entries of order 1e-8 (below float32's resolution of 1), the rest spread over the remainder
        tiny = draw(st.lists(st.sampled_from([1e-8, 3e-8, 1e-7, 0.0]), min_size=num_tasks - 1, max_size=num_tasks - 1))
        point = np.array([*tiny, 0.0])
        point[-1] = 1.0 - point.sum()
        point = point[np.argsort(draw(st.permutations(range(num_tasks))))]
    else:
        weights = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=num_tasks, max_size=num_tasks)))
        if kind == "edge":
            weights[draw(st.integers(0, num_tasks - 1))] = 0.0
        if weights.sum() < 1e-3:
            weights[0] = 1.0
        point = weights / weights.sum()
    return point.astype(np.float32).astype(np.float64).tolist()


@st.composite
def tasks_and_point(draw):
    num_tasks = draw(st.integers(2, 5))
    return num_tasks, draw(simplex_points(num_tasks))


@functools.cache
def model_for(num_tasks: int) -> nn.Module:
    """One small PaLoRA model per task count, shared by the examples (each example restores what it changes)."""
    torch.manual_seed(num_tasks)
    base = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    config = PaLoRAConfig(task_names=TASK_NAMES[:num_tasks], r=2, target_modules=["0", "2"], init_weights=False)
    return get_peft_model(base, config).eval()


# ---------------------------------------------------------------------------------------------------------------------
# (a) preference handling
# ---------------------------------------------------------------------------------------------------------------------
@SETTINGS
@given(tasks_and_point(), st.sampled_from(["list", "tensor", "float64", "numpy", "dict", "batch"]))
def test_every_simplex_point_is_accepted_and_round_trips(case, form):
    num_tasks, point = case
    model = model_for(num_tasks)
    expected = torch.tensor(point, dtype=torch.float32)
    given_as = {
        "list": point,
        "tensor": expected.clone(),
        "float64": torch.tensor(point, dtype=torch.float64),
        "numpy": np.array(point, dtype=np.float32),
        "dict": dict(zip(TASK_NAMES, point)),
        "batch": torch.stack([expected, expected.flip(0)]),
    }[form]
    model.set_preference(given_as)
    got = model.get_preference()
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.stack([expected, expected.flip(0)]) if form == "batch" else expected)
    # and it is in force: the output is that of the same preference given per call
    x = torch.randn(2, 5)
    with torch.no_grad():
        assert torch.equal(model(x), model(x, preference=given_as))
    model.set_preference([1.0 / num_tasks] * num_tasks)


@st.composite
def negative_vectors(draw):
    """A simplex point with one entry pushed below zero and the mass moved to another entry (the sum stays 1)."""
    num_tasks, point = draw(tasks_and_point())
    point = np.array(point)
    i, j = draw(st.lists(st.integers(0, num_tasks - 1), min_size=2, max_size=2, unique=True))
    below = draw(st.one_of(st.floats(1e-30, 1e-6), st.floats(1e-6, 2.0)))
    point[j] += point[i] + below
    point[i] = -below
    return num_tasks, point.tolist()


@st.composite
def off_sum_vectors(draw):
    """A non-negative vector whose sum is 1 + e with |e| > 1e-3."""
    num_tasks, point = draw(tasks_and_point())
    error = draw(st.one_of(st.floats(1.001e-3, 3.0), st.floats(-0.999, -1.001e-3)))
    return num_tasks, (np.array(point) * (1.0 + error)).tolist()


@SETTINGS
@given(
    st.one_of(negative_vectors().map(lambda c: ("non-negative", c)), off_sum_vectors().map(lambda c: ("sum to 1", c)))
)
def test_negative_or_unnormalised_vectors_are_refused(labelled):
    message, (num_tasks, vector) = labelled
    model = model_for(num_tasks)
    in_force = torch.tensor([1.0 / num_tasks] * num_tasks)
    model.set_preference(in_force)
    with pytest.raises(ValueError, match=message):
        model.set_preference(vector)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 5), preference=vector)
    with pytest.raises(ValueError, match=message):
        model.set_preference(torch.tensor([vector, [1.0 / num_tasks] * num_tasks]))  # one bad row is enough
    assert torch.equal(model.get_preference(), in_force)


@st.composite
def half_precision_cases(draw):
    """(T, dtype, eps, exact simplex point rounded to dtype, the same point with its sum pushed off by > eps)."""
    num_tasks = draw(st.integers(2, 64))
    dtype, eps = draw(st.sampled_from([(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)]))
    weights = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=num_tasks, max_size=num_tasks)))
    weights[draw(st.integers(0, num_tasks - 1))] += 1e-3  # never all zero
    exact = torch.from_numpy(weights / weights.sum())
    scale = 1.0 + draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(3 * eps, 0.5))
    return num_tasks, dtype, eps, exact.to(dtype), (exact * scale).to(dtype)


@SETTINGS
@given(half_precision_cases())
def test_half_precision_preferences_are_held_to_their_rounding_whatever_the_number_of_tasks(case):
    from peft_palora.preferences import validate_preference

    num_tasks, dtype, eps, valid, scaled = case
    # the rounding of a valid preference moves its sum by at most eps / 2 (plus subnormal rounding): accepted
    assert abs(valid.double().sum().item() - 1) <= eps / 2 + num_tasks * 2.0**-25
    torch.testing.assert_close(validate_preference(valid, num_tasks), valid.float(), rtol=0, atol=0)
    off_by = abs(scaled.double().sum().item() - 1)  # checked in float64, from the values as stored
    if off_by > eps:
        with pytest.raises(ValueError, match=rf"must sum to 1 \(tolerance {eps:g}\)"):
            validate_preference(scaled, num_tasks)
    else:  # rounding brought it back within eps (possible only for a scale just above 3 eps)
        validate_preference(scaled, num_tasks)


# ---------------------------------------------------------------------------------------------------------------------
# (b) merging
# ---------------------------------------------------------------------------------------------------------------------
class LinearNet(nn.Module):
    def __init__(self, width: int, bias: bool) -> None:
        super().__init__()
        self.first = nn.Linear(4, width, bias=bias)
        self.second = nn.Linear(width, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


class ConvNet(nn.Module):
    def __init__(self, width: int, groups: int, kernel: int, stride: int, spatial: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[spatial]
        self.first = conv(2 * groups, width * groups, kernel, stride=stride, padding=kernel // 2, groups=groups)
        self.second = conv(width * groups, 3, 1)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


@st.composite
def merge_cases(draw):
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    width = draw(st.integers(1, 6))
    if kind == "linear":
        bias = draw(st.booleans())
        make, shape = (lambda: LinearNet(width, bias)), (3, 4)
    else:
        spatial = 1 if kind == "conv1d" else 2
        groups, kernel, stride = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 2))
        make, shape = (lambda: ConvNet(width, groups, kernel, stride, spatial)), (2, 2 * groups) + (6,) * spatial
    num_tasks = draw(st.integers(2, 4))
    return dict(
        make=make,
        shape=shape,
        num_tasks=num_tasks,
        r=draw(st.integers(1, 3)),
        alpha=draw(st.floats(0.5, 16.0)),
        preference=draw(simplex_points(num_tasks)),
        next_preference=draw(simplex_points(num_tasks)),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(merge_cases())
def test_merge_equals_unmerged_and_unmerge_restores_to_rounding(case):
    torch.manual_seed(case["seed"])
    config = PaLoRAConfig(num_tasks=case["num_tasks"], r=case["r"], palora_alpha=case["alpha"],
                          target_modules=["first", "second"], init_weights=False)  # fmt: skip
    model = get_peft_model(case["make"](), config).eval()
    with torch.no_grad():  # random B is small (std 0.1): make the deltas large enough to matter
        for layer in palora_layers(model):
            layer.palora_B["default"].mul_(5.0)
    x = torch.randn(case["shape"])
    weights = [layer.get_base_layer().weight.detach().clone() for layer in palora_layers(model)]

    with torch.no_grad():
        model.set_preference(case["preference"])
        unmerged = model(x)
        base = model.get_base_model()
        model.merge_adapter()
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
        assert not all(
            torch.equal(w, layer.get_base_layer().weight) for w, layer in zip(weights, palora_layers(model))
        )

        # a new preference while merged re-merges (subtract the old delta, add the new one); no weight copy is kept,
        # so unmerge restores to float32 rounding relative to the larger of the weight and its delta
        model.set_preference(case["next_preference"])
        remerged = model(x)
        deltas = [layer.get_base_layer().weight.detach().double() - w.double()
                  for w, layer in zip(weights, palora_layers(model))]  # fmt: skip
        model.unmerge_adapter()
        for original, delta, layer in zip(weights, deltas, palora_layers(model)):
            error = (layer.get_base_layer().weight.double() - original.double()).norm()
            assert error <= 1e-6 * max(float(original.double().norm()), float(delta.norm()), 1e-30)
        torch.testing.assert_close(remerged, model(x), rtol=1e-4, atol=1e-5)
        model.set_preference(case["preference"])
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    assert base is model.get_base_model()
