# Copyright 2025 The peft_palora developers. Licensed under the Apache License, Version 2.0.
"""Preference vectors on the probability simplex: validation, evaluation grids and training samplers.

A PaLoRA model is conditioned on a preference ``λ`` with ``λ_t >= 0`` and ``Σ_t λ_t = 1``. This module holds
everything that produces or checks such vectors, so that the tuner, the trainer and the evaluation code agree on
one definition:

* :func:`validate_preference` turns user input (list, numpy array, tensor, ``{task: weight}`` dict) into a float32
  tensor, or raises a ``ValueError``/``TypeError`` that says what is wrong. It never renormalises silently.
* :func:`simplex_grid` enumerates the regular grid used to trace a Pareto front at evaluation time.
* The samplers produce the preferences used during training. Every sampler is a *pure function* of
  ``(progress, step, seed)``: no RNG state is kept between calls, so a resumed run, or every rank of a
  multi-process run, draws exactly the same preferences at the same step.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence

import numpy as np
import torch

from peft_palora.tuner.preference import _nested_to_floats, validate_preference
from peft_palora.utils.checks import check_int, check_positive, check_real

__all__ = [
    "AnnealedDirichletSampler",
    "AnnealedGridSampler",
    "DirichletSampler",
    "FixedSampler",
    "PreferenceSampler",
    "simplex_grid",
    "validate_preference",
]



# ----------------------------------------------------------------------------------------------------------------------
# Argument checks shared by this module
# ----------------------------------------------------------------------------------------------------------------------


def _unwrap_scalar(value):
    """A one-element real tensor as its Python number (what a scheduler may hand over); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return value.item()
    return value


def _check_real(value, name: str) -> float:
    """A real number; the caller checks its range (NaN fails every range written as ``lo <= value <= hi``)."""
    return check_real(_unwrap_scalar(value), name, finite=False, expected="a real number")


def _check_progress(progress) -> float:
    progress = _check_real(progress, "progress")
    # Written so that NaN fails too (every comparison with NaN is False).
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (the fraction of training done), got {progress}.")
    return progress


def _check_step(step) -> int | None:
    if step is None:
        return None
    return check_int(step, "step", minimum=0)


# ----------------------------------------------------------------------------------------------------------------------
# Validation of user preferences
# ----------------------------------------------------------------------------------------------------------------------






























# ----------------------------------------------------------------------------------------------------------------------
# Simplex lattices
# ----------------------------------------------------------------------------------------------------------------------


def _simplex_lattice_counts(num_tasks: int, resolution: int) -> np.ndarray:
    """All vectors of ``num_tasks`` non-negative ints summing to ``resolution``, in ascending lexicographic order.

    Stars and bars: the ``T - 1`` bar positions among ``resolution + T - 1`` slots determine the counts, and
    ``itertools.combinations`` yields the bar positions in lexicographic order, which is also the lexicographic
    order of the counts (the first count is the first bar position, and so on).
    """
    slots = resolution + num_tasks - 1
    bars = np.array(list(itertools.combinations(range(slots), num_tasks - 1)), dtype=np.int64)
    bars = bars.reshape(-1, num_tasks - 1)
    edges = np.concatenate(
        [np.full((bars.shape[0], 1), -1, dtype=np.int64), bars, np.full((bars.shape[0], 1), slots, dtype=np.int64)],
        axis=1,
    )
    return np.diff(edges, axis=1) - 1


def simplex_grid(num_tasks: int, points_per_side: int) -> torch.Tensor:
    """Every preference whose entries are multiples of ``1 / (points_per_side - 1)``.

    This is the regular grid used to trace a Pareto front at evaluation time; ``simplex_grid(2, 11)`` is the
    11-point grid of the paper (``[0, 1], [0.1, 0.9], ..., [1, 0]``). There are
    ``C(points_per_side + num_tasks - 2, num_tasks - 1)`` points.

    Order: ascending lexicographic (sorted by the first entry, then by the second, and so on), so for ``T = 2``
    the rows are ``[p, 1 - p]`` with ``p`` running from 0 to 1, and for ``T = 3`` they start
    ``[0, 0, 1], [0, 1/h, 1 - 1/h], ...``. The order is part of the contract: results indexed by grid row stay
    comparable between runs and versions.

    Returns:
        float32 tensor of shape ``(N, num_tasks)``.
    """
    num_tasks = check_int(num_tasks, "num_tasks", minimum=2)
    points_per_side = check_int(points_per_side, "points_per_side", minimum=2)
    resolution = points_per_side - 1
    counts = _simplex_lattice_counts(num_tasks, resolution)
    return torch.from_numpy(counts / resolution).to(torch.float32)


def _spread_subset(counts: np.ndarray, num_points: int) -> np.ndarray:
    """Pick ``num_points`` well-spread rows of an integer lattice, deterministically.

    Greedy farthest-point selection: start from the vertices (task 1 first), then repeatedly add the lattice point
    farthest from everything chosen so far. Distances are squared integer distances, so ties are exact and are
    broken by lattice order; the result is identical on every platform. Returns the sorted row indices.
    """
    is_vertex = counts.max(axis=1) == counts.sum(axis=1)
    vertex_rows = np.flatnonzero(is_vertex)
    # Lexicographic order puts e_T first; start from e_1 so that a budget smaller than T favours the first tasks.
    vertex_rows = vertex_rows[np.argsort(counts[vertex_rows].argmax(axis=1), kind="stable")]
    chosen = list(vertex_rows[:num_points])
    nearest = np.min(((counts[:, None, :] - counts[chosen][None, :, :]) ** 2).sum(axis=2), axis=1)
    while len(chosen) < num_points:
        index = int(np.argmax(nearest))
        chosen.append(index)
        nearest = np.minimum(nearest, ((counts - counts[index]) ** 2).sum(axis=1))
    return np.sort(np.array(chosen, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------------


class PreferenceSampler:
    """Base class of the training-time preference samplers.

    ``sample(progress, step)`` returns ``num_rays`` preferences, a float32 tensor of shape ``(num_rays, num_tasks)``
    whose rows lie on the simplex. ``progress`` is the fraction of training done, in ``[0, 1]``; ``step`` is the
    optimisation step. A sampler keeps no state that changes between calls: the output depends only on
    ``(progress, step)`` and the constructor arguments (including a seed for random samplers). This is what makes
    resumed and multi-process runs draw the very same preferences.
    """

    def __init__(self, num_tasks: int, num_rays: int):
        self.num_tasks = check_int(num_tasks, "num_tasks", minimum=2)
        self.num_rays = check_int(num_rays, "num_rays", minimum=1)

    def sample(self, progress: float, step: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self.num_tasks}, num_rays={self.num_rays})"


class AnnealedGridSampler(PreferenceSampler):
    """The paper's deterministic annealed schedule, for any number of tasks.

    Fixed base rays ``x`` (evenly spaced on the simplex, every entry in ``[epsilon, 1 - epsilon]``) are sharpened
    as training progresses: ``ray ∝ x ** (mul * progress)`` entry-wise, rows renormalised to sum 1. At
    ``progress = 0`` every ray is uniform, so early training fits the average of the tasks; as ``progress`` grows
    the rays spread towards the single-task vertices (the larger ``mul``, the closer they get). The schedule has no
    randomness at all; ``step`` is accepted for interface compatibility and ignored.

    Base rays:

    * ``T = 2``: ``[p, 1 - p]`` for ``p`` in ``linspace(epsilon, 1 - epsilon, num_rays)``, computed exactly as in
      the authors' code (float32 ``torch.linspace`` paired with its reverse).
    * ``T >= 3``: the simplex lattice of the smallest resolution ``h`` with at least ``num_rays`` points (all
      vectors with entries in ``{0, 1/h, ..., 1}``), mapped affinely into the box by
      ``x -> epsilon + (1 - T * epsilon) * x``. This map keeps rows on the simplex, keeps every entry in
      ``[epsilon, 1 - (T - 1) * epsilon]``, and for ``T = 2`` is exactly the linspace above, so the two cases are
      one construction. A lattice, rather than a low-discrepancy point set, is used because it contains the
      vertices and the edges: those rays become the near-single-task preferences that make the ends of the front
      trained at all. If the lattice has more than ``num_rays`` points (e.g. ``T = 3`` and ``num_rays`` not a
      triangular number), a well-spread subset is kept by greedy farthest-point selection starting from the
      vertices (exact integer distances, ties broken in lattice order), so the result is deterministic and
      identical on every platform. Rows are returned in ascending lexicographic order of the lattice.
      The authors' code supports only ``T = 3`` there (without ``epsilon``, rounding ``num_rays`` down to a
      triangular number); this construction returns exactly ``num_rays`` rays.
    * ``num_rays = 1``: the single ray is the uniform preference (the centre of the simplex).

    Args:
        num_tasks: ``T >= 2``.
        num_rays: number of rays per call, ``>= 1``.
        mul: the exponent at ``progress = 1``; ``>= 0``. The paper uses 5.
        epsilon: margin keeping the base rays off the simplex boundary; ``0 <= epsilon < 1 / T`` (for ``T = 2``
            this is ``[0, 0.5)``; in general all ``T`` entries must fit ``>= epsilon`` while summing to 1).
    """

    def __init__(self, num_tasks: int, num_rays: int, mul: float = 5.0, epsilon: float = 0.01):
        super().__init__(num_tasks, num_rays)
        self.mul = check_real(_unwrap_scalar(mul), "mul", minimum=0, expected="a real number")
        self.epsilon = _check_real(epsilon, "epsilon")
        if not 0.0 <= self.epsilon < 1.0 / self.num_tasks:
            raise ValueError(
                f"epsilon must be in [0, 1/num_tasks) = [0, {1.0 / self.num_tasks:.4g}) so that {self.num_tasks} "
                f"entries >= epsilon can sum to 1, got {self.epsilon}."
            )
        self.base_rays = self._make_base_rays()

    def _make_base_rays(self) -> torch.Tensor:
        num_tasks, num_rays, epsilon = self.num_tasks, self.num_rays, self.epsilon
        if num_rays == 1:
            return torch.full((1, num_tasks), 1.0 / num_tasks, dtype=torch.float32)
        if num_tasks == 2:
            points = torch.linspace(epsilon, 1 - epsilon, num_rays, dtype=torch.float32)
            return torch.stack([points, points.flip(0)], dim=1)
        resolution = 1
        while math.comb(resolution + num_tasks - 1, num_tasks - 1) < num_rays:
            resolution += 1
        counts = _simplex_lattice_counts(num_tasks, resolution)
        if counts.shape[0] > num_rays:
            counts = counts[_spread_subset(counts, num_rays)]
        lattice = counts / resolution
        return torch.from_numpy(epsilon + (1 - num_tasks * epsilon) * lattice).to(torch.float32)

    def sample(self, progress: float, step: int | None = None) -> torch.Tensor:
        progress = _check_progress(progress)
        _check_step(step)
        rays = self.base_rays ** (self.mul * progress)
        return rays / rays.sum(dim=1, keepdim=True)

    def __repr__(self) -> str:
        return (
            f"AnnealedGridSampler(num_tasks={self.num_tasks}, num_rays={self.num_rays}, mul={self.mul}, "
            f"epsilon={self.epsilon})"
        )


def _generator_for(seed: int, progress: float, step: int | None) -> np.random.Generator:
    """A fresh numpy generator determined by ``(seed, step)``, or by ``(seed, progress)`` when no step is given.

    numpy is used rather than ``torch.Generator`` because torch's Dirichlet/Gamma samplers cannot take a generator
    (they draw from the global RNG, which would make the sampler impure), and because numpy's Dirichlet stays
    well-defined for very small concentrations. The two keys live in different ``spawn_key`` namespaces, so
    ``step=0`` and ``progress=0.0`` never collide.
    """
    if step is not None:
        key = (0, step)
    else:
        key = (1, struct.unpack("<Q", struct.pack("<d", progress))[0])
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _dirichlet(seed: int, progress: float, step: int | None, num_rays: int, concentration: np.ndarray) -> torch.Tensor:
    samples = _generator_for(seed, progress, step).dirichlet(concentration, size=num_rays)
    rays = torch.from_numpy(samples).to(torch.float32)
    # Re-summing in float32 removes the rounding of the float64 -> float32 cast.
    return rays / rays.sum(dim=1, keepdim=True)


def _check_concentration(value, name: str) -> float:
    return check_positive(_unwrap_scalar(value), name, expected="a real number")


def _check_seed(seed) -> int:
    return check_int(seed, "seed", minimum=0)


class DirichletSampler(PreferenceSampler):
    """Independent draws from a symmetric Dirichlet distribution.

    ``concentration = 1`` is uniform over the simplex; larger values concentrate around the uniform preference,
    smaller ones towards the vertices. The draw is a pure function of ``(seed, step)``: pass ``step`` (the
    optimisation step) to get a new draw every step. Without ``step`` the draw is keyed on ``progress`` instead,
    so two calls with the same progress return the same preferences.
    """

    def __init__(self, num_tasks: int, num_rays: int, concentration: float = 1.0, seed: int = 0):
        super().__init__(num_tasks, num_rays)
        self.concentration = _check_concentration(concentration, "concentration")
        self.seed = _check_seed(seed)

    def sample(self, progress: float, step: int | None = None) -> torch.Tensor:
        progress = _check_progress(progress)
        step = _check_step(step)
        alpha = np.full(self.num_tasks, self.concentration)
        return _dirichlet(self.seed, progress, step, self.num_rays, alpha)

    def __repr__(self) -> str:
        return (
            f"DirichletSampler(num_tasks={self.num_tasks}, num_rays={self.num_rays}, "
            f"concentration={self.concentration}, seed={self.seed})"
        )


class AnnealedDirichletSampler(PreferenceSampler):
    """Dirichlet draws whose concentration falls linearly with training progress.

    ``concentration(progress) = start_concentration + (end_concentration - start_concentration) * progress``.
    A high start keeps early preferences spread over the middle of the simplex; a low end pushes late preferences
    towards the single-task vertices. The defaults reproduce the authors' annealed Dirichlet schedule,
    ``p * (1 - progress) + 0.001`` with ``p = 1``. Pass e.g. ``start_concentration=10`` to begin closer to the
    uniform preference. Draws are keyed on ``(seed, step)`` exactly as in :class:`DirichletSampler`.
    """

    def __init__(
        self,
        num_tasks: int,
        num_rays: int,
        start_concentration: float = 1.001,
        end_concentration: float = 0.001,
        seed: int = 0,
    ):
        super().__init__(num_tasks, num_rays)
        self.start_concentration = _check_concentration(start_concentration, "start_concentration")
        self.end_concentration = _check_concentration(end_concentration, "end_concentration")
        self.seed = _check_seed(seed)

    def concentration_at(self, progress: float) -> float:
        """The Dirichlet concentration used at ``progress``."""
        progress = _check_progress(progress)
        return self.start_concentration + (self.end_concentration - self.start_concentration) * progress

    def sample(self, progress: float, step: int | None = None) -> torch.Tensor:
        progress = _check_progress(progress)
        step = _check_step(step)
        alpha = np.full(self.num_tasks, self.concentration_at(progress))
        return _dirichlet(self.seed, progress, step, self.num_rays, alpha)

    def __repr__(self) -> str:
        return (
            f"AnnealedDirichletSampler(num_tasks={self.num_tasks}, num_rays={self.num_rays}, "
            f"start_concentration={self.start_concentration}, end_concentration={self.end_concentration}, "
            f"seed={self.seed})"
        )


class FixedSampler(PreferenceSampler):
    """Always returns the same preferences: e.g. a fixed set of trade-offs, or one preference for fine-tuning.

    Args:
        preferences: a ``(T,)`` or ``(m, T)`` sequence, array or tensor on the simplex (checked by
            :func:`validate_preference`); a ``(T,)`` preference counts as ``m = 1``.
    """

    def __init__(self, preferences):
        if isinstance(preferences, (torch.Tensor, np.ndarray)):
            shape = tuple(preferences.shape)
        elif isinstance(preferences, Sequence) and not isinstance(preferences, (str, bytes)):
            try:
                shape = np.asarray(_nested_to_floats(preferences, "preferences"), dtype=np.float64).shape
            except ValueError:
                raise ValueError("preferences must have shape (T,) or (m, T); got ragged nested sequences.") from None
        else:
            raise TypeError(
                f"preferences must be a (T,) or (m, T) sequence, array or tensor, got {type(preferences).__name__}."
            )
        if len(shape) not in (1, 2) or shape[-1] < 2:
            raise ValueError(f"preferences must have shape (T,) or (m, T) with T >= 2 tasks, got shape {shape}.")
        values = validate_preference(preferences, num_tasks=shape[-1], name="preferences")
        values = values.detach().to("cpu").reshape(-1, shape[-1])
        super().__init__(values.shape[1], values.shape[0])
        self.preferences = values

    def sample(self, progress: float, step: int | None = None) -> torch.Tensor:
        _check_progress(progress)
        _check_step(step)
        return self.preferences.clone()

    def __repr__(self) -> str:
        return f"FixedSampler(preferences={self.preferences.tolist()})"
