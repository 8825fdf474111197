"""Tests for peft_palora.pareto: every number is checked against an independent computation."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from peft_palora.fronts.evaluation import FRONT_QUALITY_METRIC_PATH, evaluate_front, evaluate_front_batched
from peft_palora.pareto import hypervolume, non_dominated, num_non_dominated, preference_consistency

# ---- independent references -----------------------------------------------------------------------------------------


def inclusion_exclusion_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Minimisation hypervolume as the inclusion-exclusion sum over every subset of boxes (small N only)."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(range(len(points)), size):
            corner = points[list(subset)].max(axis=0)
            total += (-1) ** (size + 1) * np.prod(np.clip(reference - corner, 0.0, None))
    return total


def grid_cell_hypervolume(points: np.ndarray, side: int) -> int:
    """Minimisation hypervolume for integer points in [0, side) and reference (side, ..., side): count unit cells.

    The cell with lower corner c is dominated exactly when some point p satisfies p <= c componentwise.
    """
    num_objectives = points.shape[1]
    cells = np.array(list(itertools.product(range(side), repeat=num_objectives)))
    covered = (points[None, :, :] <= cells[:, None, :]).all(axis=2).any(axis=1)
    return int(covered.sum())


def brute_force_non_dominated(points: np.ndarray, maximize: np.ndarray) -> np.ndarray:
    """O(N^2) dominance check written directly in the user's directions (no negation trick)."""
    mask = np.ones(len(points), dtype=bool)
    for i, candidate in enumerate(points):
        for other in points:
            at_least_as_good = np.where(maximize, other >= candidate, other <= candidate).all()
            strictly_better = np.where(maximize, other > candidate, other < candidate).any()
            if at_least_as_good and strictly_better:
                mask[i] = False
                break
    return mask


def spearman_without_ties(x: np.ndarray, y: np.ndarray) -> float:
    rank_x = np.argsort(np.argsort(x))
    rank_y = np.argsort(np.argsort(y))
    n = len(x)
    return 1.0 - 6.0 * float(((rank_x - rank_y) ** 2).sum()) / (n * (n * n - 1))


# ---- hypervolume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "reference", "maximize", "expected"),
    [
        # 2-D staircase: strips of area 3, 2 and 1.
        ([[1, 3], [2, 2], [3, 1]], [4, 4], False, 6.0),
        # Two accuracy boxes from the origin: 0.45 + 0.56 - overlap 0.35.
        ([[0.9, 0.5], [0.7, 0.8]], [0, 0], True, 0.66),
        # Mixed: maximise accuracy, minimise loss -> (0.9 - 0.5) * (1.0 - 0.2).
        ([[0.9, 0.2]], [0.5, 1.0], [True, False], 0.32),
        # 3-D: two 6-volume boxes overlapping in a 1 x 2 x 1 box.
        ([[1, 2, 3], [3, 2, 1]], [4, 4, 4], False, 10.0),
        ([[0, 0, 0]], [1, 2, 3], False, 6.0),
        # 1-D: the best point to the reference.
        ([[2], [3]], [5], False, 3.0),
        # A point on the reference boundary is accepted and adds nothing.
        ([[4, 1]], [4, 4], False, 0.0),
    ],
)
def test_hypervolume_hand_computed(points, reference, maximize, expected):
    assert hypervolume(points, reference, maximize=maximize) == pytest.approx(expected, abs=1e-12)


def test_hypervolume_accepts_numpy_and_tensors_and_returns_float():
    points = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]
    for value in (np.array(points), torch.tensor(points, dtype=torch.float64), torch.tensor(points).half()):
        result = hypervolume(value, torch.tensor([4.0, 4.0]))
        assert type(result) is float and result == pytest.approx(6.0)


def test_hypervolume_ignores_dominated_and_duplicate_points():
    front = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    padded = np.vstack([front, front[:1], [[2.5, 2.5], [3.0, 3.0]]])
    assert hypervolume(padded, [4, 4]) == pytest.approx(hypervolume(front, [4, 4]))


def test_hypervolume_of_no_points_is_zero():
    assert hypervolume([], [1.0, 2.0]) == 0.0
    assert hypervolume(np.zeros((0, 2)), [1.0, 2.0], maximize=[True, False]) == 0.0


@pytest.mark.parametrize("num_objectives", [2, 3, 4, 5])
def test_hypervolume_matches_inclusion_exclusion_in_every_direction(num_objectives):
    rng = np.random.default_rng(num_objectives)
    for trial in range(12):
        num_points = int(rng.integers(1, 8))
        minimized = rng.random((num_points, num_objectives))
        reference = np.full(num_objectives, 1.1)
        expected = inclusion_exclusion_hypervolume(minimized, reference)
        # All minimised, all maximised, then a random mix; a maximised objective is the reflection 2 - value.
        for flags in (
            np.zeros(num_objectives, bool),
            np.ones(num_objectives, bool),
            rng.random(num_objectives) < 0.5,
        ):
            user_points = np.where(flags, 2.0 - minimized, minimized)
            user_reference = np.where(flags, 2.0 - reference, reference)
            result = hypervolume(user_points, user_reference, maximize=flags.tolist())
            assert result == pytest.approx(expected, rel=1e-9, abs=1e-12), (trial, flags)


@pytest.mark.parametrize(("num_objectives", "side"), [(2, 9), (3, 7), (4, 6)])
def test_hypervolume_matches_grid_cell_count_on_integer_points(num_objectives, side):
    rng = np.random.default_rng(100 + num_objectives)
    for _ in range(10):
        minimized = rng.integers(0, side, size=(int(rng.integers(1, 13)), num_objectives))
        expected = grid_cell_hypervolume(minimized, side)
        flags = rng.random(num_objectives) < 0.5
        user_points = np.where(flags, side - minimized, minimized)  # maximised: larger is better, reference 0
        user_reference = np.where(flags, 0, side)
        assert hypervolume(user_points, user_reference, maximize=flags.tolist()) == expected
        assert hypervolume(minimized, np.full(num_objectives, side)) == expected


def test_hypervolume_rejects_a_reference_that_does_not_bound_the_points():
    with pytest.raises(ValueError, match=r"does not bound.*point 1 objective 0 \(3 vs reference 2, minimized\)"):
        hypervolume([[1, 1], [3, 1]], [2, 2])
    # Maximising: a point below the reference is the offender.
    with pytest.raises(ValueError, match=r"point 0 objective 1 .*maximized"):
        hypervolume([[0.9, 0.1]], [0.5, 0.2], maximize=True)
    # Long lists are summarised.
    with pytest.raises(ValueError, match="and 15 more"):
        hypervolume(np.full((10, 2), 5.0), [1.0, 1.0])


@pytest.mark.parametrize(
    ("points", "reference", "maximize", "error", "message"),
    [
        ([[1.0, float("nan")]], [2.0, 2.0], False, ValueError, r"points.*NaN or infinite.*row\(s\) 0"),
        ([[1.0, 1.0], [float("inf"), 1.0]], [2.0, 2.0], False, ValueError, r"row\(s\) 1"),
        ([[1.0, 1.0]], [2.0, float("nan")], False, ValueError, "reference.*finite"),
        ([[1.0, 1.0, 1.0]], [2.0, 2.0], False, ValueError, "3 objectives but `reference` has 2"),
        (np.zeros((0, 3)), [2.0, 2.0], False, ValueError, "3 objectives but `reference` has 2"),
        ([1.0, 1.0], [2.0, 2.0], False, ValueError, "points.*2-D"),
        ([[1.0, 1.0]], [[2.0, 2.0]], False, ValueError, "reference.*1-D"),
        ([[1.0, 1.0]], [2.0, 2.0], [True], ValueError, "maximize.*1 entries.*2 objectives"),
        ([[1.0, 1.0]], [2.0, 2.0], [True, 1], TypeError, "maximize.*only bools"),
        ([[1.0, 1.0]], [2.0, 2.0], "yes", TypeError, "maximize"),
        ([["a", "b"]], [2.0, 2.0], False, TypeError, "points.*numeric"),
    ],
)
def test_hypervolume_input_errors(points, reference, maximize, error, message):
    with pytest.raises(error, match=message):
        hypervolume(points, reference, maximize=maximize)


# ---- dominance ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_objectives", [1, 2, 3, 4, 5])
def test_non_dominated_matches_brute_force(num_objectives):
    rng = np.random.default_rng(7 + num_objectives)
    for _ in range(15):
        # A small integer range forces duplicates and ties, the cases that are easy to get wrong.
        points = rng.integers(0, 4, size=(int(rng.integers(1, 25)), num_objectives)).astype(float)
        for flags in (np.zeros(num_objectives, bool), np.ones(num_objectives, bool), rng.random(num_objectives) < 0.5):
            expected = brute_force_non_dominated(points, flags)
            mask = non_dominated(points, maximize=flags.tolist())
            np.testing.assert_array_equal(mask, expected)
            distinct = {tuple(row) for row in points[expected]}
            assert num_non_dominated(points, maximize=flags.tolist()) == len(distinct)


def test_non_dominated_keeps_every_copy_and_returns_the_input_kind():
    points = [[1.0, 1.0], [1.0, 1.0], [0.0, 2.0], [2.0, 2.0], [1.0, 2.0]]
    expected = np.array([True, True, True, False, False])
    as_numpy = non_dominated(points)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == bool
    np.testing.assert_array_equal(as_numpy, expected)
    as_tensor = non_dominated(torch.tensor(points))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.bool
    assert as_tensor.tolist() == expected.tolist()
    assert num_non_dominated(points) == 2  # the duplicate counts once
    # Maximising flips which points survive.
    np.testing.assert_array_equal(non_dominated(points, maximize=True), [False, False, False, True, False])
    assert non_dominated(np.zeros((0, 2))).shape == (0,)
    assert num_non_dominated([]) == 0


def test_non_dominated_input_errors():
    with pytest.raises(ValueError, match="NaN or infinite"):
        non_dominated([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="maximize.*3 entries.*2 objectives"):
        non_dominated([[1.0, 2.0]], maximize=[True, True, False])


# ---- preference consistency -----------------------------------------------------------------------------------------


def _two_task_grid(points: int = 11) -> np.ndarray:
    weights = np.linspace(0.0, 1.0, points)
    return np.stack([weights, 1.0 - weights], axis=1)


def test_consistency_of_a_monotone_front_is_one():
    grid = _two_task_grid()
    accuracies = np.stack([0.5 + 0.4 * grid[:, 0] ** 2, 0.6 + 0.3 * np.sqrt(grid[:, 1])], axis=1)
    result = preference_consistency(grid, accuracies, higher_is_better=True, task_names=["a", "b"])
    assert result == {"spearman_a": 1.0, "spearman_b": 1.0, "mean_spearman": 1.0}
    # The same front as losses: lower is better, so decreasing losses are consistent.
    assert preference_consistency(grid, -accuracies, higher_is_better=False)["mean_spearman"] == 1.0
    # Read with the wrong orientation it is perfectly inconsistent.
    assert preference_consistency(grid, -accuracies)["mean_spearman"] == -1.0
    # Per-task orientation: an accuracy and a loss.
    mixed = np.stack([accuracies[:, 0], -accuracies[:, 1]], axis=1)
    assert preference_consistency(grid, mixed, higher_is_better=[True, False])["mean_spearman"] == 1.0


def test_consistency_of_a_shuffled_front_matches_the_rank_formula():
    grid = _two_task_grid()
    rng = np.random.default_rng(3)
    metrics = np.stack([np.linspace(0.5, 0.9, 11), np.linspace(0.9, 0.6, 11)], axis=1)
    shuffled = metrics[rng.permutation(11)]
    result = preference_consistency(torch.tensor(grid), shuffled)
    expected = [spearman_without_ties(grid[:, t], shuffled[:, t]) for t in range(2)]
    assert result["spearman_0"] == pytest.approx(expected[0])
    assert result["spearman_1"] == pytest.approx(expected[1])
    assert result["mean_spearman"] == pytest.approx(np.mean(expected))
    assert result["mean_spearman"] < 0.9


def test_consistency_three_tasks_and_constant_metric():
    grid = np.array([[i, j, 4 - i - j] for i in range(5) for j in range(5 - i)], dtype=float) / 4
    # Each metric is a monotone function of its own weight only; the ties in lambda_t are matched by ties in
    # the metric, so the rank correlation is exactly 1.
    metrics = 0.3 + 0.5 * grid**2
    result = preference_consistency(grid, metrics)
    assert result == pytest.approx({"spearman_0": 1.0, "spearman_1": 1.0, "spearman_2": 1.0, "mean_spearman": 1.0})
    constant = metrics.copy()
    constant[:, 1] = 0.5
    result = preference_consistency(grid, constant)
    assert np.isnan(result["spearman_1"]) and np.isnan(result["mean_spearman"])
    assert result["spearman_0"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("preferences", "metrics", "kwargs", "message"),
    [
        (_two_task_grid(3), np.ones((3, 3)), {}, "same shape"),
        ([[0.5, 0.5]], [[1.0, 1.0]], {}, "at least 2"),
        (_two_task_grid(3), np.eye(3)[:, :2], {"higher_is_better": [True]}, "higher_is_better"),
        (_two_task_grid(3), np.eye(3)[:, :2], {"task_names": ["a"]}, "task_names.*1 names.*2 tasks"),
        (_two_task_grid(3), np.eye(3)[:, :2], {"task_names": ["a", "a"]}, "unique"),
        (_two_task_grid(3), [[0.1, float("nan")]] * 3, {}, "metrics.*NaN"),
    ],
)
def test_consistency_input_errors(preferences, metrics, kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_consistency(preferences, metrics, **kwargs)


# ---- evaluating a front ---------------------------------------------------------------------------------------------


class FakePreferenceModel(nn.Module):
    """A float64 linear map with weight ``W + sum_t lambda_t D_t`` and one output per task.

    It mimics the PaLoRA model's preference interface (set/get, per-call ``preference=`` of shape ``(T,)`` or
    ``(batch, T)``) without depending on the tuner.
    """

    def __init__(self, num_tasks: int = 2, in_features: int = 3, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.base = nn.Parameter(torch.randn(in_features, num_tasks, generator=generator, dtype=torch.float64))
        self.deltas = nn.Parameter(
            torch.randn(num_tasks, in_features, num_tasks, generator=generator, dtype=torch.float64)
        )
        self._preference = torch.full((num_tasks,), 1.0 / num_tasks)
        self.forward_calls = 0

    def set_preference(self, preference) -> None:
        self._preference = torch.as_tensor(preference, dtype=torch.float32).clone()

    def get_preference(self) -> torch.Tensor:
        return self._preference.clone()

    def forward(self, x: torch.Tensor, preference=None) -> torch.Tensor:
        self.forward_calls += 1
        preference = self._preference if preference is None else torch.as_tensor(preference)
        preference = preference.to(torch.float64)
        if preference.ndim == 1:
            preference = preference.expand(x.shape[0], -1)
        if preference.shape[0] != x.shape[0]:
            raise ValueError("one preference per sample expected")
        weight = self.base + torch.einsum("bt,tio->bio", preference, self.deltas)
        return torch.einsum("bi,bio->bo", x, weight)


def _batches(sizes=(4, 3, 5), num_tasks=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(size, 3, generator=generator, dtype=torch.float64),
            "target": torch.randn(size, num_tasks, generator=generator, dtype=torch.float64),
        }
        for size in sizes
    ]


def per_sample_metrics(outputs: torch.Tensor, batch) -> dict[str, torch.Tensor]:
    errors = (outputs - batch["target"]) ** 2
    signs_agree = ((outputs > 0) == (batch["target"] > 0)).double()
    return {"mse_a": errors[:, 0], "mse_b": errors[:, 1], "sign_acc_a": signs_agree[:, 0]}


def sequential_eval_fn(batches):
    """The slow path computed by hand: run each batch at the preference in force and average per sample."""

    @torch.no_grad()
    def eval_fn(model) -> dict[str, float]:
        totals: dict[str, float] = {}
        count = 0
        for batch in batches:
            values = per_sample_metrics(model(x=batch["x"]), batch)
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + float(value.sum())
            count += batch["x"].shape[0]
        return {key: total / count for key, total in totals.items()}

    return eval_fn


def test_evaluate_front_table_restores_preference_and_visits_each_preference():
    model = FakePreferenceModel().eval()
    model.set_preference([0.25, 0.75])
    grid = _two_task_grid(5)
    seen = []

    def eval_fn(m):
        seen.append(m.get_preference().tolist())
        return {"first": float(m.get_preference()[0]) * 10, "calls": torch.tensor(float(len(seen)))}

    table = evaluate_front(model, grid, eval_fn, task_names=["a", "b"])
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["pref_a", "pref_b", "first", "calls"]
    np.testing.assert_allclose(seen, grid, atol=1e-7)
    np.testing.assert_allclose(table[["pref_a", "pref_b"]].to_numpy(), grid)
    np.testing.assert_allclose(table["first"], 10 * grid[:, 0], atol=1e-6)
    assert table["calls"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert model.get_preference().tolist() == [0.25, 0.75]


def test_evaluate_front_restores_preference_when_eval_fn_fails():
    model = FakePreferenceModel().eval()
    model.set_preference([0.4, 0.6])
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return {"x": 1.0}

    with pytest.raises(RuntimeError, match="boom"):
        evaluate_front(model, _two_task_grid(5), failing)
    assert torch.allclose(model.get_preference(), torch.tensor([0.4, 0.6]))


def test_evaluate_front_names_columns_from_the_model_config_or_indices():
    model = FakePreferenceModel().eval()
    table = evaluate_front(model, _two_task_grid(3), lambda m: {"v": 1.0})
    assert list(table.columns) == ["pref_0", "pref_1", "v"]
    model.peft_config = {"default": SimpleNamespace(task_names=["sst2", "mnli"])}
    model.active_adapter = "default"
    table = evaluate_front(model, _two_task_grid(3), lambda m: {"v": 1.0})
    assert list(table.columns) == ["pref_sst2", "pref_mnli", "v"]


def test_evaluate_front_can_return_a_dataset():
    import datasets

    model = FakePreferenceModel().eval()
    table = evaluate_front(
        model, _two_task_grid(3), lambda m: {"v": float(m.get_preference()[1])}, return_dataset=True
    )
    assert isinstance(table, datasets.Dataset)
    assert table.column_names == ["pref_0", "pref_1", "v"]
    np.testing.assert_allclose(table["v"], [1.0, 0.5, 0.0], atol=1e-7)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_batched_front_equals_sequential_front(num_tasks):
    model = FakePreferenceModel(num_tasks=num_tasks).eval()
    model.set_preference(torch.full((num_tasks,), 1.0 / num_tasks))
    if num_tasks == 2:
        grid = _two_task_grid(11)
    else:
        grid = np.array([[i, j, 4 - i - j] for i in range(5) for j in range(5 - i)], dtype=float) / 4
    batches = _batches(num_tasks=num_tasks)
    sequential = evaluate_front(model, grid, sequential_eval_fn(batches))
    before = model.get_preference()
    model.forward_calls = 0
    batched = evaluate_front_batched(model, grid, batches, per_sample_metrics, label_names=["target"])
    assert model.forward_calls == len(batches)  # one pass per batch for all preferences
    assert torch.equal(model.get_preference(), before)
    assert list(batched.columns) == list(sequential.columns)
    np.testing.assert_allclose(batched.to_numpy(), sequential.to_numpy(), rtol=1e-12, atol=1e-12)
    # The front really depends on the preference, so the equality above is not between constants.
    assert batched["mse_a"].std() > 1e-3


def test_batched_front_passes_non_tensor_inputs_and_returns_a_dataset():
    import datasets

    received = []

    class Recorder(FakePreferenceModel):
        def forward(self, x, preference=None, flag=None):
            received.append((flag, x.shape[0], preference.shape))
            return super().forward(x, preference)

    model = Recorder().eval()
    batches = [{"x": torch.ones(2, 3, dtype=torch.float64), "target": torch.zeros(2, 2), "flag": "keep"}]
    seen_targets = []

    def metric_fn(outputs, batch):
        seen_targets.append(batch["target"].shape)
        return per_sample_metrics(outputs, batch)

    table = evaluate_front_batched(
        model, _two_task_grid(4), batches, metric_fn, label_names=["target"], return_dataset=True
    )
    assert received == [("keep", 8, torch.Size([8, 2]))]  # `target` withheld from the forward...
    assert seen_targets == [torch.Size([8, 2])]  # ...but repeated for the metric
    assert isinstance(table, datasets.Dataset) and table.num_rows == 4


def test_real_palora_model_batched_equals_sequential():
    """The same check on a real tiny PaLoRA model: per-sample preferences must match set_preference."""
    from peft import get_peft_model

    from peft_palora import PaLoRAConfig

    class TwoHeadMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0 = nn.Linear(3, 8)
            self.lin1 = nn.Linear(8, 2)

        def forward(self, x):
            return self.lin1(torch.tanh(self.lin0(x)))

    torch.manual_seed(0)
    config = PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0", "lin1"], task_names=["a", "b"], init_weights=False)
    model = get_peft_model(TwoHeadMLP(), config).eval()
    model.set_preference([0.5, 0.5])
    batches = [{key: value.float() for key, value in batch.items()} for batch in _batches()]
    grid = _two_task_grid(6)
    sequential = evaluate_front(model, grid, sequential_eval_fn(batches))
    batched = evaluate_front_batched(model, grid, batches, per_sample_metrics, label_names=["target"])
    assert list(batched.columns) == ["pref_a", "pref_b", "mse_a", "mse_b", "sign_acc_a"]
    np.testing.assert_allclose(batched.to_numpy(), sequential.to_numpy(), rtol=1e-5, atol=1e-6)
    assert batched["mse_a"].std() > 1e-4
    assert torch.allclose(model.get_preference(), torch.tensor([0.5, 0.5]))


def test_evaluate_front_warns_in_training_mode():
    model = FakePreferenceModel().train()
    with pytest.warns(UserWarning, match="training mode"):
        evaluate_front(model, _two_task_grid(2), lambda m: {"v": 1.0})
    with pytest.warns(UserWarning, match="training mode"):
        evaluate_front_batched(model, _two_task_grid(2), _batches(), per_sample_metrics, label_names=["target"])


@pytest.mark.parametrize(
    ("preferences", "message"),
    [
        ([[0.5, 0.6]], "sum to 1"),
        ([[1.5, -0.5]], "negative"),
        ([[float("nan"), 1.0]], "NaN"),
        ([0.5, 0.5], "2-D"),
        (np.zeros((0, 2)), "at least one row"),
    ],
)
def test_evaluate_front_rejects_bad_preferences_before_running(preferences, message):
    model = FakePreferenceModel().eval()
    calls = []
    with pytest.raises(ValueError, match=message):
        evaluate_front(model, preferences, lambda m: calls.append(1) or {"v": 1.0})
    with pytest.raises(ValueError, match=message):
        evaluate_front_batched(model, preferences, _batches(), per_sample_metrics, label_names=["target"])
    assert not calls and model.forward_calls == 0


def test_evaluate_front_rejects_bad_eval_fn_results():
    model = FakePreferenceModel().eval()
    grid = _two_task_grid(3)
    with pytest.raises(TypeError, match="eval_fn.*dict"):
        evaluate_front(model, grid, lambda m: 1.0)
    with pytest.raises(TypeError, match="non-numeric value for 'v'"):
        evaluate_front(model, grid, lambda m: {"v": "high"})
    with pytest.raises(ValueError, match="tensor with 2 elements"):
        evaluate_front(model, grid, lambda m: {"v": torch.ones(2)})
    keys = iter([{"v": 1.0}, {"w": 1.0}, {"v": 1.0}])
    with pytest.raises(ValueError, match="same metrics every time"):
        evaluate_front(model, grid, lambda m: next(keys))
    with pytest.raises(ValueError, match="clash with the preference columns"):
        evaluate_front(model, grid, lambda m: {"pref_0": 1.0})
    with pytest.raises(TypeError, match="eval_fn.*callable"):
        evaluate_front(model, grid, None)
    with pytest.raises(TypeError, match="set_preference"):
        evaluate_front(nn.Linear(2, 2), grid, lambda m: {"v": 1.0})
    with pytest.raises(ValueError, match="task_names.*3 names.*2 tasks"):
        evaluate_front(model, grid, lambda m: {"v": 1.0}, task_names=["a", "b", "c"])


def test_evaluate_front_batched_rejects_bad_batches_and_metrics():
    model = FakePreferenceModel().eval()
    grid = _two_task_grid(3)
    with pytest.raises(ValueError, match="share the batch dimension"):
        evaluate_front_batched(model, grid, [{"x": torch.ones(2, 3), "target": torch.ones(3, 2)}], per_sample_metrics)
    with pytest.raises(TypeError, match="mapping"):
        evaluate_front_batched(model, grid, [torch.ones(2, 3)], per_sample_metrics)
    with pytest.raises(ValueError, match="at least one tensor"):
        evaluate_front_batched(model, grid, [{"flag": 1}], per_sample_metrics)
    with pytest.raises(TypeError, match="label_names"):
        evaluate_front_batched(model, grid, _batches(), per_sample_metrics, label_names="target")
    with pytest.raises(ValueError, match="`batches` is empty"):
        evaluate_front_batched(model, grid, [], per_sample_metrics)
    with pytest.raises(ValueError, match="expected one per sample"):
        evaluate_front_batched(model, grid, _batches(), lambda out, batch: {"v": out[:2, 0]}, label_names=["target"])
    with pytest.raises(TypeError, match="metric_fn.*dict"):
        evaluate_front_batched(model, grid, _batches(), lambda out, batch: out, label_names=["target"])
    keys = iter(["v", "w", "v"])
    with pytest.raises(ValueError, match="returned keys"):
        evaluate_front_batched(
            model, grid, _batches(), lambda out, batch: {next(keys): out[:, 0]}, label_names=["target"]
        )


def test_front_quality_metric_path_is_shipped():
    import os

    assert os.path.isfile(FRONT_QUALITY_METRIC_PATH)
