"""Tests for peft_palora.preferences: grids, samplers and preference validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from peft_palora.preferences import (
    AnnealedDirichletSampler,
    AnnealedGridSampler,
    DirichletSampler,
    FixedSampler,
    PreferenceSampler,
    simplex_grid,
    validate_preference,
)


def assert_on_simplex(rays: torch.Tensor, atol: float = 1e-6) -> None:
    assert rays.dtype == torch.float32
    assert torch.isfinite(rays).all()
    assert (rays >= 0).all()
    torch.testing.assert_close(rays.sum(dim=1), torch.ones(rays.shape[0]), atol=atol, rtol=0)


def mean_distance_to_nearest_vertex(rays: torch.Tensor) -> float:
    vertices = torch.eye(rays.shape[1], dtype=torch.float64)
    distances = torch.cdist(rays.double(), vertices)
    return distances.min(dim=1).values.mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# simplex_grid
# ----------------------------------------------------------------------------------------------------------------------


def test_simplex_grid_two_tasks_is_the_papers_eleven_point_grid():
    grid = simplex_grid(2, 11)
    expected = torch.tensor([[i / 10, 1 - i / 10] for i in range(11)], dtype=torch.float32)
    assert grid.shape == (11, 2) and grid.dtype == torch.float32
    torch.testing.assert_close(grid, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("points_per_side", [2, 3, 4, 6])
def test_simplex_grid_matches_brute_force_enumeration(num_tasks, points_per_side):
    resolution = points_per_side - 1
    # Independent enumeration: every integer vector in [0, resolution]^T with the right sum, sorted.
    brute = sorted(c for c in itertools.product(range(resolution + 1), repeat=num_tasks) if sum(c) == resolution)
    grid = simplex_grid(num_tasks, points_per_side)
    assert grid.shape == (math.comb(points_per_side + num_tasks - 2, num_tasks - 1), num_tasks)
    assert len(brute) == grid.shape[0]
    counts = torch.round(grid.double() * resolution).long()
    torch.testing.assert_close(grid.double() * resolution, counts.double(), atol=1e-5, rtol=0)
    # Same set *and* the documented ascending lexicographic order.
    assert [tuple(row) for row in counts.tolist()] == brute
    assert_on_simplex(grid)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((1, 11), ValueError, "num_tasks"),
        ((2, 1), ValueError, "points_per_side"),
        ((2.0, 11), TypeError, "num_tasks"),
        ((2, 11.0), TypeError, "points_per_side"),
        ((True, 11), TypeError, "num_tasks"),
        (("3", 11), TypeError, "num_tasks"),
    ],
)
def test_simplex_grid_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        simplex_grid(*args)


# ----------------------------------------------------------------------------------------------------------------------
# AnnealedGridSampler
# ----------------------------------------------------------------------------------------------------------------------


def test_annealed_grid_two_tasks_matches_hand_computed_formula():
    sampler = AnnealedGridSampler(2, num_rays=5, mul=5.0, epsilon=0.01)
    progress = 0.4  # exponent mul * progress = 2
    expected = []
    for i in range(5):
        p = 0.01 + 0.98 * i / 4
        a, b = p**2, (1 - p) ** 2
        expected.append([a / (a + b), b / (a + b)])
    rays = sampler.sample(progress)
    assert rays.shape == (5, 2) and rays.dtype == torch.float32
    torch.testing.assert_close(rays.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    # Ray 0 leans towards task 2, the last ray towards task 1, the middle one is uniform.
    assert rays[0, 1] > 0.99 and rays[-1, 0] > 0.99
    torch.testing.assert_close(rays[2], torch.tensor([0.5, 0.5]), atol=1e-7, rtol=0)


def test_annealed_grid_two_tasks_uses_the_authors_float32_linspace():
    sampler = AnnealedGridSampler(2, num_rays=7, epsilon=0.05)
    points = torch.linspace(0.05, 0.95, 7, dtype=torch.float32)
    assert torch.equal(sampler.base_rays[:, 0], points)
    assert torch.equal(sampler.base_rays[:, 1], points.flip(0))


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("num_rays", [1, 2, 3, 7, 10, 25])
def test_annealed_grid_shapes_simplex_and_uniform_start(num_tasks, num_rays):
    epsilon = 0.02
    sampler = AnnealedGridSampler(num_tasks, num_rays, mul=5.0, epsilon=epsilon)
    assert (sampler.num_tasks, sampler.num_rays) == (num_tasks, num_rays)
    base = sampler.base_rays
    assert base.shape == (num_rays, num_tasks)
    assert (base >= epsilon - 1e-7).all() and (base <= 1 - epsilon + 1e-7).all()
    assert len({tuple(row) for row in base.tolist()}) == num_rays, "base rays must be distinct"
    for progress in [0.0, 0.1, 0.5, 1.0]:
        rays = sampler.sample(progress)
        assert rays.shape == (num_rays, num_tasks)
        assert_on_simplex(rays)
    uniform = torch.full((num_rays, num_tasks), 1 / num_tasks)
    torch.testing.assert_close(sampler.sample(0.0), uniform, atol=1e-7, rtol=0)


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 6])
def test_annealed_grid_spreads_towards_vertices_as_progress_grows(num_tasks):
    sampler = AnnealedGridSampler(num_tasks, num_rays=12)
    distances = [mean_distance_to_nearest_vertex(sampler.sample(p)) for p in np.linspace(0, 1, 11)]
    assert all(later < earlier for earlier, later in zip(distances, distances[1:])), distances
    # At the end of training every task has a ray that is essentially its own single-task preference.
    final = sampler.sample(1.0)
    assert (final.max(dim=0).values > 0.99).all(), final


def test_annealed_grid_three_tasks_triangular_count_is_the_full_lattice():
    epsilon = 0.01
    sampler = AnnealedGridSampler(3, num_rays=10, epsilon=epsilon)
    lattice = simplex_grid(3, 4).double()  # resolution 3: 10 points, like the authors' triangle mesh
    torch.testing.assert_close(sampler.base_rays.double(), epsilon + (1 - 3 * epsilon) * lattice, atol=1e-7, rtol=0)


def test_annealed_grid_subset_keeps_vertices_and_lies_on_the_lattice():
    epsilon = 0.01
    sampler = AnnealedGridSampler(3, num_rays=8, epsilon=epsilon)
    lattice = (sampler.base_rays.double() - epsilon) / (1 - 3 * epsilon)  # back to the unit lattice
    counts = lattice * 3
    torch.testing.assert_close(counts, counts.round(), atol=1e-5, rtol=0)
    for task in range(3):
        vertex = torch.zeros(3, dtype=torch.float64)
        vertex[task] = 1
        assert torch.isclose(lattice, vertex, atol=1e-5).all(dim=1).any(), f"vertex {task} missing"
    assert torch.equal(AnnealedGridSampler(3, num_rays=8, epsilon=epsilon).base_rays, sampler.base_rays)


def test_annealed_grid_is_pure_and_ignores_step():
    sampler = AnnealedGridSampler(4, num_rays=9)
    first = sampler.sample(0.37, step=5)
    assert torch.equal(sampler.sample(0.37, step=123), first)
    assert torch.equal(AnnealedGridSampler(4, num_rays=9).sample(0.37), first)
    first.add_(1.0)  # mutating a result must not affect later draws
    assert_on_simplex(sampler.sample(0.37))


def test_annealed_grid_single_ray_is_uniform():
    rays = AnnealedGridSampler(3, num_rays=1).sample(1.0)
    torch.testing.assert_close(rays, torch.full((1, 3), 1 / 3), atol=1e-7, rtol=0)


def test_annealed_grid_mul_zero_stays_uniform():
    rays = AnnealedGridSampler(3, num_rays=6, mul=0.0).sample(1.0)
    torch.testing.assert_close(rays, torch.full((6, 3), 1 / 3), atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_tasks": 2, "num_rays": 0}, ValueError, "num_rays"),
        ({"num_tasks": 1, "num_rays": 3}, ValueError, "num_tasks"),
        ({"num_tasks": 2, "num_rays": 3.0}, TypeError, "num_rays"),
        ({"num_tasks": 2, "num_rays": 3, "mul": -1.0}, ValueError, "mul"),
        ({"num_tasks": 2, "num_rays": 3, "mul": float("nan")}, ValueError, "mul"),
        ({"num_tasks": 2, "num_rays": 3, "mul": "5"}, TypeError, "mul"),
        ({"num_tasks": 2, "num_rays": 3, "epsilon": -0.01}, ValueError, "epsilon"),
        ({"num_tasks": 2, "num_rays": 3, "epsilon": 0.5}, ValueError, "epsilon"),
        ({"num_tasks": 3, "num_rays": 3, "epsilon": 0.34}, ValueError, "epsilon"),
    ],
)
def test_annealed_grid_rejects_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AnnealedGridSampler(**kwargs)


@pytest.mark.parametrize(
    "sampler",
    [
        AnnealedGridSampler(2, 3),
        DirichletSampler(2, 3),
        AnnealedDirichletSampler(2, 3),
        FixedSampler([0.5, 0.5]),
    ],
    ids=lambda s: type(s).__name__,
)
@pytest.mark.parametrize(
    ("progress", "step", "error", "match"),
    [
        (-0.01, None, ValueError, "progress"),
        (1.01, None, ValueError, "progress"),
        (float("nan"), None, ValueError, "progress"),
        ("0.5", None, TypeError, "progress"),
        (0.5, -1, ValueError, "step"),
        (0.5, 1.5, TypeError, "step"),
        (0.5, True, TypeError, "step"),
    ],
)
def test_samplers_reject_bad_progress_and_step(sampler, progress, step, error, match):
    with pytest.raises(error, match=match):
        sampler.sample(progress, step=step)


def test_base_sampler_is_abstract():
    with pytest.raises(NotImplementedError):
        PreferenceSampler(2, 1).sample(0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Dirichlet samplers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_dirichlet_is_a_pure_function_of_seed_and_step(num_tasks):
    first = DirichletSampler(num_tasks, num_rays=4, seed=7).sample(0.2, step=11)
    assert first.shape == (4, num_tasks)
    assert_on_simplex(first)
    # A fresh sampler (e.g. a resumed run or another rank) draws exactly the same preferences.
    assert torch.equal(DirichletSampler(num_tasks, num_rays=4, seed=7).sample(0.9, step=11), first)
    assert not torch.equal(DirichletSampler(num_tasks, num_rays=4, seed=7).sample(0.2, step=12), first)
    assert not torch.equal(DirichletSampler(num_tasks, num_rays=4, seed=8).sample(0.2, step=11), first)


def test_dirichlet_without_step_is_keyed_on_progress():
    sampler = DirichletSampler(3, num_rays=4, seed=0)
    assert torch.equal(sampler.sample(0.5), sampler.sample(0.5))
    assert not torch.equal(sampler.sample(0.5), sampler.sample(0.6))
    assert not torch.equal(sampler.sample(0.0), sampler.sample(0.0, step=0))


def test_dirichlet_leaves_global_rng_untouched():
    torch.manual_seed(123)
    np.random.seed(123)
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    DirichletSampler(3, num_rays=5).sample(0.1, step=3)
    AnnealedDirichletSampler(3, num_rays=5).sample(0.1, step=3)
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.rand(3), expected_numpy)


def test_dirichlet_moments_match_the_distribution():
    concentration = 2.0
    rays = DirichletSampler(3, num_rays=20000, concentration=concentration, seed=1).sample(0.0, step=0).double()
    alpha0 = 3 * concentration
    mean = concentration / alpha0
    variance = concentration * (alpha0 - concentration) / (alpha0**2 * (alpha0 + 1))
    torch.testing.assert_close(rays.mean(dim=0), torch.full((3,), mean, dtype=torch.float64), atol=5e-3, rtol=0)
    torch.testing.assert_close(rays.var(dim=0), torch.full((3,), variance, dtype=torch.float64), rtol=0.05, atol=0)


def test_annealed_dirichlet_concentration_schedule_matches_the_paper():
    sampler = AnnealedDirichletSampler(2, num_rays=3)
    for progress in [0.0, 0.25, 0.7, 1.0]:
        assert sampler.concentration_at(progress) == pytest.approx(1.0 * (1 - progress) + 0.001, abs=1e-12)
    custom = AnnealedDirichletSampler(2, num_rays=3, start_concentration=10.0, end_concentration=0.5)
    assert custom.concentration_at(0.5) == pytest.approx(5.25)


def test_annealed_dirichlet_draws_use_the_scheduled_concentration():
    annealed = AnnealedDirichletSampler(4, num_rays=6, start_concentration=3.0, end_concentration=0.2, seed=5)
    for progress in [0.0, 0.4, 1.0]:
        concentration = annealed.concentration_at(progress)
        plain = DirichletSampler(4, num_rays=6, concentration=concentration, seed=5)
        assert torch.equal(annealed.sample(progress, step=9), plain.sample(progress, step=9))


def test_annealed_dirichlet_moves_towards_vertices():
    sampler = AnnealedDirichletSampler(3, num_rays=2000, start_concentration=20.0, end_concentration=0.05, seed=0)
    early, late = sampler.sample(0.0, step=1), sampler.sample(1.0, step=1)
    assert_on_simplex(early)
    assert_on_simplex(late)
    assert mean_distance_to_nearest_vertex(late) < 0.2 < mean_distance_to_nearest_vertex(early)


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: DirichletSampler(3, 2, concentration=0.0), ValueError, "concentration"),
        (lambda: DirichletSampler(3, 2, concentration=-1.0), ValueError, "concentration"),
        (lambda: DirichletSampler(3, 2, concentration=float("inf")), ValueError, "concentration"),
        (lambda: DirichletSampler(3, 0), ValueError, "num_rays"),
        (lambda: DirichletSampler(3, 2, seed=-1), ValueError, "seed"),
        (lambda: DirichletSampler(3, 2, seed=1.0), TypeError, "seed"),
        (lambda: AnnealedDirichletSampler(3, 2, start_concentration=0.0), ValueError, "start_concentration"),
        (lambda: AnnealedDirichletSampler(3, 2, end_concentration=-0.1), ValueError, "end_concentration"),
    ],
)
def test_dirichlet_samplers_reject_bad_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


# ----------------------------------------------------------------------------------------------------------------------
# FixedSampler
# ----------------------------------------------------------------------------------------------------------------------


def test_fixed_sampler_returns_its_preferences():
    sampler = FixedSampler([[0.25, 0.75], [1, 0]])
    assert (sampler.num_tasks, sampler.num_rays) == (2, 2)
    expected = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    for progress, step in [(0.0, None), (0.5, 3), (1.0, 100)]:
        assert torch.equal(sampler.sample(progress, step), expected)
    sampler.sample(0.0).zero_()  # mutating a result must not change the sampler
    assert torch.equal(sampler.sample(0.0), expected)


def test_fixed_sampler_single_preference_is_one_ray():
    sampler = FixedSampler(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    assert (sampler.num_tasks, sampler.num_rays) == (3, 1)
    torch.testing.assert_close(sampler.sample(0.3), torch.tensor([[0.2, 0.3, 0.5]]))


@pytest.mark.parametrize(
    ("preferences", "error", "match"),
    [
        ([0.3, 0.3], ValueError, "preferences must sum to 1"),
        ([[0.5, 0.5], [-0.5, 1.5]], ValueError, "preferences must be non-negative"),
        ([1.0], ValueError, "T >= 2"),
        ([[[0.5, 0.5]]], ValueError, "shape"),
        ("ab", TypeError, "preferences"),
        ({"a": 1.0}, TypeError, "preferences"),
    ],
)
def test_fixed_sampler_validates(preferences, error, match):
    with pytest.raises(error, match=match):
        FixedSampler(preferences)


# ----------------------------------------------------------------------------------------------------------------------
# validate_preference
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pref",
    [
        [0.3, 0.7],
        (0.3, 0.7),
        np.array([0.3, 0.7]),
        np.array([0.3, 0.7], dtype=np.float32),
        torch.tensor([0.3, 0.7]),
        torch.tensor([0.3, 0.7], dtype=torch.float64),
        torch.tensor([0.3, 0.7], dtype=torch.float16),
        torch.tensor([0.3, 0.7], dtype=torch.bfloat16),
        [np.float64(0.3), torch.tensor(0.7)],
        {"b": 0.7, "a": 0.3},
        {"a": torch.tensor(0.3), "b": np.float32(0.7)},
    ],
    ids=lambda p: type(p).__name__ + (f"-{p.dtype}" if hasattr(p, "dtype") else ""),
)
def test_validate_preference_accepts_all_documented_forms(pref):
    out = validate_preference(pref, 2, task_names=["a", "b"])
    assert out.dtype == torch.float32 and out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.7]), atol=2e-3, rtol=0)


def test_validate_preference_integer_inputs_become_float():
    out = validate_preference(torch.tensor([0, 1, 0]), 3)
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(validate_preference(np.array([[1, 0], [0, 1]]), 2), torch.eye(2))


def test_validate_preference_float16_uses_dtype_tolerance():
    # In float16, 0.1 + 0.2 + 0.7 is off from 1 by more than 1e-4, but the user wrote a valid preference.
    pref = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float16)
    assert abs(pref.float().sum().item() - 1) > 1e-4
    torch.testing.assert_close(validate_preference(pref, 3), pref.float())


def test_validate_preference_batch_and_batch_size():
    pref = [[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]]
    out = validate_preference(pref, 2, batch_size=3)
    assert out.shape == (3, 2)
    torch.testing.assert_close(out, torch.tensor(pref))
    # A single (T,) preference is fine for any batch size.
    assert validate_preference([0.5, 0.5], 2, batch_size=8).shape == (2,)
    with pytest.raises(ValueError, match=r"preference has 3 rows but the batch has 4 samples"):
        validate_preference(pref, 2, batch_size=4)


def test_validate_preference_does_not_alias_or_detach_its_input():
    source = torch.tensor([0.25, 0.75], requires_grad=True)
    out = validate_preference(source, 2)
    assert out.data_ptr() != source.data_ptr()
    (out * torch.tensor([1.0, 2.0])).sum().backward()
    torch.testing.assert_close(source.grad, torch.tensor([1.0, 2.0]))
    plain = torch.tensor([0.25, 0.75])
    out = validate_preference(plain, 2)
    plain.fill_(0.5)
    assert torch.equal(out, torch.tensor([0.25, 0.75]))


def test_validate_preference_sum_tolerance_boundary():
    validate_preference([0.5, 0.50005], 2)  # within 1e-4
    with pytest.raises(ValueError, match=r"sum to 1 \(tolerance 0.0001\).*0.5002"):
        validate_preference([0.5, 0.5002], 2)


@pytest.mark.parametrize(
    ("pref", "error", "match"),
    [
        ("0.5,0.5", TypeError, "preference must be a sequence of 2 numbers, got the string"),
        (["0.5", "0.5"], TypeError, "preference must contain numbers, got the string '0.5'"),
        ([True, False], TypeError, "preference must contain numbers, got the bool"),
        (torch.tensor([True, False]), TypeError, "bool tensor"),
        (np.array([True, False]), TypeError, "bool array"),
        (torch.tensor([0.5, 0.5], dtype=torch.complex64), TypeError, "real numbers"),
        (None, TypeError, "got NoneType"),
        (0.5, TypeError, "got float"),
        ([None, 1.0], TypeError, "preference must contain numbers, got NoneType"),
        (torch.tensor(1.0), ValueError, r"shape \(T,\) or \(batch, T\).*shape \(\)"),
        ([[[0.5, 0.5]]], ValueError, r"shape \(1, 1, 2\)"),
        ([[0.5, 0.5], [1.0]], ValueError, "ragged"),
        ([0.2, 0.3, 0.5], ValueError, r"must have 2 entries \(one per task\), got 3: \[0.2, 0.3, 0.5\]"),
        ([1.0], ValueError, "must have 2 entries"),
        (torch.zeros(0, 2), ValueError, "cannot be empty"),
        ([float("nan"), 1.0], ValueError, r"preference must be finite, got \[\[nan, 1.0\]\]"),
        ([float("inf"), 0.0], ValueError, "preference must be finite"),
        ([-0.1, 1.1], ValueError, r"preference must be non-negative, got \[\[-0.1, 1.1\]\]"),
        ([0.3, 0.3], ValueError, r"preference must sum to 1.*\[0.6\].*not renormalised"),
        ([[0.5, 0.5], [0.9, 0.3]], ValueError, r"sum to 1.*\[\[0.9, 0.3\]\]"),
        ({"a": 0.5}, ValueError, r"missing \['b'\]"),
        ({"a": 0.5, "b": 0.25, "c": 0.25}, ValueError, r"unknown task name\(s\) \['c'\].*known task names are"),
        ({"a": 0.5, "b": True}, TypeError, r"preference\['b'\] must contain numbers, got the bool"),
    ],
)
def test_validate_preference_rejects_bad_input(pref, error, match):
    with pytest.raises(error, match=match):
        validate_preference(pref, 2, task_names=["a", "b"])


def test_validate_preference_dict_needs_task_names():
    with pytest.raises(ValueError, match="preference was given as a dict, which needs task names"):
        validate_preference({"a": 0.5, "b": 0.5}, 2)


def test_validate_preference_custom_argument_name():
    with pytest.raises(ValueError, match="^ray must be non-negative"):
        validate_preference([-1.0, 2.0], 2, name="ray")


# ----------------------------------------------------------------------------------------------------------------------
# validate_preference: the sum tolerance does not grow with T; gradients; numpy scalars (issue 14, item 9)
# ----------------------------------------------------------------------------------------------------------------------
HALF_PRECISION = [
    pytest.param(torch.bfloat16, 2.0**-7, id="bfloat16"),
    pytest.param(torch.float16, 2.0**-10, id="float16"),
]


def rounded_simplex_points(num_tasks: int, dtype: torch.dtype, count: int, seed: int) -> torch.Tensor:
    """Exact preferences (Dirichlet, some with tiny entries) rounded to ``dtype``: what a user writing a valid
    preference in that dtype gives."""
    rng = np.random.default_rng(seed)
    points = rng.dirichlet(np.full(num_tasks, 0.3), size=count)
    points[: count // 4, : num_tasks - 1] = 1e-6  # entries below float16's smallest normal number
    points /= points.sum(axis=1, keepdims=True)
    return torch.from_numpy(points).to(dtype)


@pytest.mark.parametrize("dtype, eps", HALF_PRECISION)
@pytest.mark.parametrize("num_tasks", [2, 5, 20, 100])
def test_half_precision_tolerance_does_not_grow_with_the_number_of_tasks(dtype, eps, num_tasks):
    # every valid preference rounded to the dtype is accepted, at any T ...
    for row in rounded_simplex_points(num_tasks, dtype, 64, seed=num_tasks):
        assert abs(row.double().sum().item() - 1) <= eps / 2 + num_tasks * 2.0**-25  # the bound the tolerance uses
        validate_preference(row, num_tasks)
    # ... and the same rows pushed off the simplex by 3 eps (computed in float64 from the stored values) are refused
    for row in rounded_simplex_points(num_tasks, dtype, 16, seed=1000 + num_tasks):
        top = int(row.argmax())
        off = row.clone()
        off[top] = (row[top].double() + 3 * eps).to(dtype)
        assert off.double().sum().item() - 1 > eps
        with pytest.raises(ValueError, match=rf"must sum to 1 \(tolerance {eps:g}\)"):
            validate_preference(off, num_tasks)


@pytest.mark.parametrize("num_tasks", [2, 20, 100])
def test_a_bfloat16_preference_summing_to_1_15_is_refused_at_any_number_of_tasks(num_tasks):
    pref = torch.full((num_tasks,), 1.15 / num_tasks, dtype=torch.bfloat16)
    assert abs(pref.double().sum().item() - 1.15) < 0.01
    with pytest.raises(ValueError, match=r"must sum to 1 \(tolerance 0.0078125\)"):
        validate_preference(pref, num_tasks)
    with pytest.raises(ValueError, match=r"tolerance 0.0078125"):
        validate_preference(pref.unsqueeze(0).expand(3, -1), num_tasks)  # per-sample rows too


def test_the_sum_is_checked_in_float64_from_the_values_as_given():
    # Both rows have the same float32 copy, so a check on the float32 result must get one of them wrong.
    inside = torch.tensor([0.5, 0.5 + 1e-4 - 1e-10], dtype=torch.float64)
    outside = torch.tensor([0.5, 0.5 + 1e-4 + 1e-10], dtype=torch.float64)
    assert torch.equal(inside.float(), outside.float())
    validate_preference(inside, 2)
    with pytest.raises(ValueError, match=r"tolerance 0.0001"):
        validate_preference(outside, 2)
    with pytest.raises(ValueError, match=r"tolerance 0.0001"):
        validate_preference(outside.tolist(), 2)  # the same as Python floats
    validate_preference(torch.full((1000,), 1e-3, dtype=torch.float64), 1000)  # many small entries: no drift


def test_float8_preferences_are_refused_as_too_coarse():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    pref = torch.tensor([0.5, 0.5]).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"preference has dtype torch.float8_e4m3fn, too coarse for a preference"):
        validate_preference(pref, 2)
    with pytest.raises(TypeError, match=r"too coarse"):
        validate_preference([pref[0], pref[1]], 2)  # inside a list too


NUMPY_SCALAR_FORMS = [
    pytest.param(lambda v: [np.float16(x) for x in v], id="list-of-np.float16"),
    pytest.param(lambda v: tuple(np.float16(x) for x in v), id="tuple-of-np.float16"),
    pytest.param(lambda v: [torch.tensor(x, dtype=torch.float16) for x in v], id="list-of-0d-float16-tensors"),
    pytest.param(lambda v: {name: np.float16(x) for name, x in zip("abc", v)}, id="dict-of-np.float16"),
    pytest.param(lambda v: {name: np.array(x, dtype=np.float16) for name, x in zip("abc", v)}, id="dict-of-0d-arrays"),
    pytest.param(lambda v: [[np.float16(x) for x in v]], id="batch-of-np.float16"),
]


@pytest.mark.parametrize("form", NUMPY_SCALAR_FORMS)
def test_numpy_scalars_are_checked_like_the_array_of_the_same_dtype(form):
    # In float16, 0.1 + 0.2 + 0.7 is off from 1 by more than 1e-4: valid as a float16 array, so valid in any form.
    values = [0.1, 0.2, 0.7]
    as_array = validate_preference(np.array(values, dtype=np.float16), 3)
    out = validate_preference(form(values), 3, task_names=["a", "b", "c"])
    assert torch.equal(out.reshape(-1), as_array)
    # and a float16 sum off by more than float16's rounding is refused in every form, as for the array
    bad = [0.1, 0.2, 0.71]
    with pytest.raises(ValueError, match=r"must sum to 1 \(tolerance 0.000976562\)"):
        validate_preference(np.array(bad, dtype=np.float16), 3)
    with pytest.raises(ValueError, match=r"must sum to 1 \(tolerance 0.000976562\)"):
        validate_preference(form(bad), 3, task_names=["a", "b", "c"])


@pytest.mark.parametrize(
    "pref, error, match",
    [
        pytest.param([np.complex64(0.5), 0.5], TypeError, r"must contain real numbers, got a numpy complex64",
                     id="np.complex-scalar"),
        pytest.param([np.bool_(True), 0.0], TypeError, r"got the bool", id="np.bool-scalar"),
        pytest.param([np.str_("0.5"), 0.5], TypeError, r"got the string", id="np.str-scalar"),
        pytest.param([np.datetime64(1, "D"), 0.5], TypeError, r"must contain real numbers, got a numpy datetime64",
                     id="np.datetime64-scalar"),
        pytest.param({"a": np.array([0.5]), "b": 0.5}, TypeError, r"preference\['a'\] must contain numbers, got ndarray",
                     id="dict-1d-array-weight"),
        pytest.param({"a": torch.tensor([0.5]), "b": 0.5}, TypeError, r"preference\['a'\] must contain numbers, got Tensor",
                     id="dict-1d-tensor-weight"),
        pytest.param({"a": torch.tensor(0.5, dtype=torch.complex64), "b": 0.5}, TypeError, r"real numbers",
                     id="dict-complex-tensor-weight"),
        pytest.param({"a": torch.tensor(0.5, device="meta"), "b": 0.5}, ValueError, r"preference\['a'\] is a meta tensor",
                     id="dict-meta-tensor-weight"),
        pytest.param([torch.tensor(0.5, device="meta"), 0.5], ValueError, r"meta tensor", id="list-of-meta-tensors"),
        pytest.param([np.float16(0.6), np.float16(0.6)], ValueError, r"must sum to 1 \(tolerance 0.000976562\)",
                     id="np.float16-list-off"),
        pytest.param([np.float16(np.inf), 0.0], ValueError, r"must be finite", id="np.float16-inf"),
        pytest.param([np.float16(-0.5), np.float16(1.5)], ValueError, r"non-negative", id="np.float16-negative"),
        pytest.param(torch.tensor([0.5, 0.5117], dtype=torch.bfloat16), ValueError, r"tolerance 0.0078125",
                     id="bfloat16-off-by-1.2e-2-at-T=2"),
        pytest.param(torch.tensor([1e300, 0.0], dtype=torch.float64), ValueError, r"finite|sum to 1",
                     id="float64-beyond-float32"),
    ],
)  # fmt: skip
def test_validate_preference_rejects_bad_scalars_and_dtypes(pref, error, match):
    with pytest.raises(error, match=match):
        validate_preference(pref, 2, task_names=["a", "b"])


# (the preference built from a float64 leaf, the same values built with plain torch operations)
GRADIENT_FORMS = [
    pytest.param(lambda leaf: leaf, lambda leaf: leaf, id="tensor"),
    pytest.param(lambda leaf: leaf.to(torch.bfloat16), lambda leaf: leaf.to(torch.bfloat16), id="bfloat16-tensor"),
    pytest.param(lambda leaf: leaf.unsqueeze(0).expand(3, -1), lambda leaf: leaf.repeat(3, 1), id="batch-tensor"),
    pytest.param(lambda leaf: [leaf[0], leaf[1]], lambda leaf: leaf, id="list-of-0d-tensors"),
    pytest.param(lambda leaf: [leaf[0], 1 - leaf[0]], lambda leaf: torch.stack([leaf[0], 1 - leaf[0]]),
                 id="list-tensor-and-expression"),
    pytest.param(lambda leaf: [[leaf[0], 0.75], leaf],
                 lambda leaf: torch.stack([torch.stack([leaf[0], torch.tensor(0.75, dtype=torch.float64)]), leaf]),
                 id="batch-mixing-numbers-and-tensors"),
    pytest.param(lambda leaf: {"b": leaf[1], "a": leaf[0]}, lambda leaf: leaf, id="dict-of-0d-tensors"),
]  # fmt: skip


@pytest.mark.parametrize("make, same_values", GRADIENT_FORMS)
def test_a_preference_that_requires_grad_stays_in_the_graph(make, same_values):
    leaf = torch.tensor([0.25, 0.75], dtype=torch.float64, requires_grad=True)
    out = validate_preference(make(leaf), 2, task_names=["a", "b"])
    assert out.dtype == torch.float32 and out.requires_grad and out.grad_fn is not None
    weights = torch.arange(1.0, out.numel() + 1).reshape(out.shape)
    (out * weights).sum().backward()
    # independent computation: the same values built with plain torch operations, differentiated by autograd
    reference_leaf = leaf.detach().clone().requires_grad_(True)
    reference = same_values(reference_leaf).to(torch.float32)
    torch.testing.assert_close(out.detach(), reference.detach(), rtol=0, atol=0)
    (reference * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad)
    assert leaf.grad.abs().sum() > 0


def test_a_preference_without_grad_has_no_graph_and_never_aliases():
    for pref in ([torch.tensor(0.25), torch.tensor(0.75)], {"a": torch.tensor(0.25), "b": torch.tensor(0.75)}):
        out = validate_preference(pref, 2, task_names=["a", "b"])
        assert not out.requires_grad and out.grad_fn is None
    leaf = torch.tensor([0.25, 0.75], requires_grad=True)
    with torch.no_grad():
        assert not validate_preference(leaf, 2).requires_grad
    out = validate_preference(leaf, 2)
    assert out.data_ptr() != leaf.data_ptr()
    with pytest.raises(ValueError, match="must sum to 1"):  # a graph is no excuse for an invalid preference
        validate_preference(leaf * 2, 2)
