"""The preference of one call, handed to the layers as data.

A model call (``model(**inputs, preference=...)``, ``generate``) fixes, before its first layer runs, the preference
every PaLoRA adapter uses for that call: the per-call argument where one was given, else the model's default (the
value ``set_preference`` last stored, read once). That snapshot lives in a :class:`contextvars.ContextVar`, so

* two calls in two threads never see each other's preference, and neither writes any shared attribute;
* every layer of one forward sees the same value, even while another thread calls ``set_preference``;
* nothing outlives the call: the rank-expanded scale tensors the layers derive from it are cached inside the snapshot
  only, so no tensor made under ``torch.inference_mode`` (or holding a previous call's autograd graph) is reused by a
  later call.

Gradient checkpointing re-runs layers during backward, after the call has returned. transformers' checkpointed layers
call their module's ``_gradient_checkpointing_func``; :func:`preserve_in_checkpointing` wraps that function so the
re-run sees the snapshot of the forward it re-runs.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peft_palora.utils.context import contextvar_scope


class CallPreferences:
    """The preferences of one call, per adapter name: each (T,) or (rows, T), fixed for the call's duration.

    ``expansion`` is the number of rows ``generate`` makes of every sample (beams x returned sequences): a
    per-sample preference then covers ``rows * expansion`` layer rows, each sample's row repeated over its
    contiguous block.
    """

    __slots__ = ("values", "expansion", "_cache")

    def __init__(self, values: Mapping[str, torch.Tensor], expansion: int = 1) -> None:
        self.values = dict(values)
        self.expansion = expansion
        self._cache: dict[tuple, torch.Tensor] = {}

    def scale(self, adapter_name: str, r: int, scaling: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``scaling * lambda`` repeated ``r`` times per task on ``device``/``dtype``: (T*r,) or (rows, T*r).

        Computed once per call and layer geometry (layers with the same rank and alpha share it), so a call moves
        the preference to each device once rather than once per layer.
        """
        key = (adapter_name, r, scaling, device, dtype)
        scale = self._cache.get(key)
        if scale is None:
            scale = scale_vector(self.values[adapter_name], r, scaling, expansion=self.expansion)
            scale = scale.to(device=device, dtype=dtype)
            self._cache[key] = scale
        return scale


def scale_vector(preference: torch.Tensor, r: int, scaling: float, expansion: int = 1) -> torch.Tensor:
    """The one place a preference becomes per-direction scales: ``scaling * lambda_t`` for the r directions of task t."""
    scale = (preference * scaling).repeat_interleave(r, dim=-1)
    if scale.dim() == 2 and expansion > 1:
        scale = scale.repeat_interleave(expansion, dim=0)
    return scale


_CURRENT: contextvars.ContextVar[CallPreferences | None] = contextvars.ContextVar("palora_call", default=None)


def current() -> CallPreferences | None:
    """The snapshot of the call running in this context, or None outside a PaLoRA model call."""
    return _CURRENT.get()


@contextmanager
def call_preferences(snapshot: CallPreferences | None) -> Iterator[None]:
    """Make ``snapshot`` the preferences of the layers run inside the block (in this thread/context only)."""
    with contextvar_scope(_CURRENT, snapshot):
        yield


# Keyword arguments whose leading dimension is the batch, in the order a transformers model is most likely to get them.
_BATCH_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "x")


def batch_of(args: tuple, kwargs: Mapping[str, Any]) -> tuple[int, str, tuple[int, ...]] | None:
    """The number of samples of a call, with the argument it was read from: the first positional tensor, else the
    first of the usual transformers inputs (`input_ids`, `inputs_embeds`, `pixel_values`, ...), else None (the layers
    then check the rows against their own inputs)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return args[0].shape[0], "the first argument", tuple(args[0].shape)
    for name in _BATCH_INPUT_NAMES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0], name, tuple(value.shape)
    return None


_CALL_BATCH: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("palora_call_batch", default=None)


def call_batch() -> tuple[int, str, tuple[int, ...]] | None:
    """The batch of the `PeftModel` call running in this context (PEFT's task-typed models hand the tuner only the
    extra keyword arguments, so the PaLoRA `PeftModel` records the batch before)."""
    return _CALL_BATCH.get()


@contextmanager
def recording_batch(args: tuple, kwargs: Mapping[str, Any]) -> Iterator[None]:
    with contextvar_scope(_CALL_BATCH, batch_of(args, kwargs)):
        yield


_GENERATING: contextvars.ContextVar[bool] = contextvars.ContextVar("palora_generating", default=False)


def generating() -> bool:
    """Whether the call running in this context is a `generate` (which expands every sample into several rows)."""
    return _GENERATING.get()


@contextmanager
def generation() -> Iterator[None]:
    """Mark the block as a `generate` call."""
    with contextvar_scope(_GENERATING, True):
        yield


class _PreferencePreservingCheckpoint:
    """Wraps a transformers ``_gradient_checkpointing_func`` so that the recomputation in backward runs under the
    snapshot of the forward it recomputes (the call has returned by then, and its context variable was reset)."""

    def __init__(self, checkpoint_fn: Callable[..., Any]) -> None:
        self.checkpoint_fn = checkpoint_fn
        functools.update_wrapper(self, checkpoint_fn, updated=())

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        snapshot = _CURRENT.get()
        if snapshot is None:
            return self.checkpoint_fn(function, *args, **kwargs)

        def run_with_snapshot(*inner_args: Any, **inner_kwargs: Any) -> Any:
            with call_preferences(snapshot):
                return function(*inner_args, **inner_kwargs)

        return self.checkpoint_fn(run_with_snapshot, *args, **kwargs)


def preserve_in_checkpointing(model: nn.Module) -> None:
    """Wrap the checkpointing function of every checkpointed transformers layer of ``model`` (idempotent).

    The wrapper does not depend on any call: it only forwards the caller's snapshot, so installing it is safe while
    other threads run the model.
    """
    for module in model.modules():
        function = module.__dict__.get("_gradient_checkpointing_func")
        if getattr(module, "gradient_checkpointing", False) and function is not None:
            if not isinstance(function, _PreferencePreservingCheckpoint):
                module._gradient_checkpointing_func = _PreferencePreservingCheckpoint(function)
