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
re-run sees the snapshot of the forward it re-runs. A user's own ``torch.utils.checkpoint.checkpoint`` (reentrant or
not) is handled by the layers themselves (:func:`checkpoint_preferences`).

``preference_context`` blocks are scoped to the frames that run inside them (:class:`ScopedPreferences`), so a
generator paused inside one does not leak it. Merged weights are rewritten under :class:`MergeLock`.

Under ``torch.compile`` none of that machinery can be traced (``ContextVar.get``, ``sys._getframe``, locks). A call
traced by dynamo therefore hands its preferences to the layers through the model's :class:`PreferenceState` objects
(``state.call``, set and restored inside the traced call, see ``PaLoRAModel._enable_peft_forward_hooks``): dynamo
tracks that write as a side effect, so the layers read the preference as a tensor of the graph (an input, never a
constant), and nothing is written while the compiled graph runs. Code that runs eagerly keeps the context variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint
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
    """The preferences in force here: the running model call's snapshot, else the innermost
    :class:`ScopedPreferences` block on this call stack, else None (the defaults apply)."""
    snapshot = _CURRENT.get()
    if snapshot is not None or not _SCOPES:
        return snapshot
    return _scoped()


def compiling() -> bool:
    """Whether dynamo is tracing the running code (then the traceable path is taken: see the module docstring)."""
    return torch.compiler.is_compiling()


@torch.compiler.disable
def current_outside_graph() -> CallPreferences | None:
    """:func:`current`, for traced code: run eagerly (a graph break), so the values it returns are graph inputs."""
    return current()


def enclosing_for_graph() -> CallPreferences | None:
    """For a traced model call: the enclosing ``preference_context`` block's preferences, if a block is open.

    Only the emptiness of the block registry is read while tracing (dynamo guards on it); when a block is open, the
    lookup runs eagerly (one graph break; the call then recompiles once for the open-block case).
    """
    if not _SCOPES:
        return None
    return current_outside_graph()


class Validated(dict):
    """Preferences already validated per adapter name (``{adapter: tensor}``), as a traced call passes them on."""


@contextmanager
def call_preferences(snapshot: CallPreferences | None) -> Iterator[None]:
    """Make ``snapshot`` the preferences of the layers run inside the block (in this thread/context only)."""
    with contextvar_scope(_CURRENT, snapshot):
        yield


def _restore(token: contextvars.Token) -> None:
    """Reset the context variable; a block closed from another context (a generator finalised in another thread)
    cannot reach the context it was entered in, and must not raise there."""
    try:
        _CURRENT.reset(token)
    except ValueError:
        pass


# ---- preference_context: scoped to the frames that run inside the block ---------------------------------------------
#
# A `with model.preference_context(p):` block is registered on the frame that runs it, and the preference is found by
# walking the running call stack. So it holds exactly while that frame is on the stack: a generator paused inside the
# block (`with ...: yield model(x)`) does not leak its preference into its caller, two interleaved generators each see
# their own, other threads never see it, and closing the generator from another thread just unregisters the block.
# (A context variable, set on entry and reset on exit, would stay set in the caller's context while the generator is
# paused, and resetting it from another thread raises.)

_SCOPES: dict[int, tuple[Any, list[CallPreferences]]] = {}  # id(frame) -> (frame, its open blocks, innermost last)
_SCOPES_LOCK = threading.Lock()


def _scoped() -> CallPreferences | None:
    frame = sys._getframe(1)
    while frame is not None:
        entry = _SCOPES.get(id(frame))
        if entry is not None and entry[0] is frame and entry[1]:
            return entry[1][-1]
        frame = frame.f_back
    return None


_CONTEXTLIB_FILE = contextlib.__file__
_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _block_frame(frame: Any) -> Any:
    """The frame whose code runs inside the block entered from ``frame``: ``frame`` itself, unless it is contextlib's
    (``ExitStack.enter_context``) or a ``@contextmanager`` generator that contextlib drives, whose block is its
    caller's ``with`` body."""
    while frame is not None:
        if frame.f_code.co_filename == _CONTEXTLIB_FILE:
            frame = frame.f_back
        elif (frame.f_code.co_flags & _GENERATOR_FLAGS and frame.f_back is not None
              and frame.f_back.f_code.co_filename == _CONTEXTLIB_FILE):
            frame = frame.f_back
        else:
            return frame
    return sys._getframe(2)


class ScopedPreferences:
    """The context manager `preference_context` returns (see the comment above for its scope).

    Inside a running model call (e.g. in a module's own `forward`), the block instead overrides that call's snapshot
    for the code it runs, as a context variable.
    """

    __slots__ = ("snapshot", "_frame", "_token")

    def __init__(self, snapshot: CallPreferences) -> None:
        self.snapshot = snapshot
        self._frame = None
        self._token = None

    def __enter__(self) -> None:
        if _CURRENT.get() is not None:  # inside a model call: innermost wins over the call's snapshot
            self._token = _CURRENT.set(self.snapshot)
            return None
        frame = _block_frame(sys._getframe(1))
        with _SCOPES_LOCK:
            entry = _SCOPES.get(id(frame))
            if entry is None or entry[0] is not frame:
                entry = _SCOPES[id(frame)] = (frame, [])
            entry[1].append(self.snapshot)
        self._frame = frame
        return None

    def __exit__(self, *exc_info: Any) -> None:
        if self._token is not None:
            token, self._token = self._token, None
            _restore(token)
            return None
        frame, self._frame = self._frame, None
        if frame is None or _SCOPES_LOCK is None:  # (None: a generator finalised at interpreter exit)
            return None
        with _SCOPES_LOCK:
            entry = _SCOPES.get(id(frame))
            if entry is not None and entry[0] is frame:
                blocks = entry[1]
                for i in range(len(blocks) - 1, -1, -1):  # its own block, even when closed out of order
                    if blocks[i] is self.snapshot:
                        del blocks[i]
                        break
                if not blocks:
                    del _SCOPES[id(frame)]
        return None


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


# ---- a user's own torch.utils.checkpoint -----------------------------------------------------------------------------
#
# `torch.utils.checkpoint.checkpoint(block, x)` re-runs `block` during backward, after the call that ran it returned:
# the re-run would see no snapshot (the default preference) or another call's. Each checkpointed region is one object
# of torch's (the non-reentrant `_CheckpointFrame`, the reentrant `CheckpointFunction`'s ctx), found on the Python
# stack both when the region first runs and when backward re-runs it; the first PaLoRA layer that runs in the region
# stores the snapshot on it, and the re-run uses that snapshot.

_CHECKPOINT_FILE = torch.utils.checkpoint.__file__
_RECORD_ATTRIBUTE = "_palora_preferences"


def _checkpoint_region(frame: Any) -> Any:
    """The innermost checkpointed region the code at ``frame`` runs in (forward or recomputation), or None."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename == _CHECKPOINT_FILE:
            name = code.co_name
            if name in ("forward", "backward", "unpack_hook", "checkpoint"):
                local = frame.f_locals
                if name in ("forward", "backward") and local.get("ctx") is not None:
                    return local["ctx"]  # use_reentrant=True: CheckpointFunction's ctx
                if name == "unpack_hook" and local.get("frame") is not None:
                    return local["frame"]  # non-reentrant recomputation of this _CheckpointFrame
                generator = local.get("gen") if name == "checkpoint" else None
                if generator is not None and generator.gi_frame is not None:
                    return generator.gi_frame.f_locals.get("new_frame")  # non-reentrant forward
        frame = frame.f_back
    return None


def checkpoint_preferences(training: bool) -> CallPreferences | None:
    """For a layer's forward: the snapshot its checkpointed region ran under, when this forward re-runs it in
    backward (None otherwise). On the region's first run, records the snapshot in force on it.

    The stack is only walked where a checkpoint can be: in a backward, under saved-tensor hooks (non-reentrant), or
    without grad in training mode (the reentrant forward).
    """
    if torch._C._current_graph_task_id() != -1:  # running inside a backward: a recomputation?
        region = _checkpoint_region(sys._getframe(1))
        saved = getattr(region, _RECORD_ATTRIBUTE, None) if region is not None else None
        # a fresh cache: the scales of the first run were made without grad (reentrant) and hold no graph
        return None if saved is None else CallPreferences(saved.values, saved.expansion)
    if torch.is_grad_enabled():
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            return None
    elif not training:
        return None
    snapshot = current()
    if snapshot is None:
        return None
    region = _checkpoint_region(sys._getframe(1))
    if region is not None and getattr(region, _RECORD_ATTRIBUTE, None) is None:
        try:
            setattr(region, _RECORD_ATTRIBUTE, snapshot)
        except AttributeError:  # a torch version whose objects take no attributes: nothing to record on
            pass
    return None


class _PreferencePreservingCheckpoint:
    """Wraps a transformers ``_gradient_checkpointing_func`` so that the recomputation in backward runs under the
    snapshot of the forward it recomputes (the call has returned by then, and its context variable was reset)."""

    def __init__(self, checkpoint_fn: Callable[..., Any]) -> None:
        self.checkpoint_fn = checkpoint_fn
        functools.update_wrapper(self, checkpoint_fn, updated=())

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if compiling():  # a traced checkpoint recomputes from the graph's own inputs, preference included
            return self.checkpoint_fn(function, *args, **kwargs)
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


class MergeLock:
    """Readers (model calls) run together; a writer (merge, unmerge, a `set_preference` that re-merges) waits until
    no call runs and keeps new calls out while it rewrites the merged weights in place.

    Readers never wait for a waiting writer, only for one at work, so a call that makes nested calls cannot deadlock.
    A writer inside a call of the same thread (e.g. `set_preference` from a forward hook of a merged model) would wait
    for itself: it raises instead.
    """

    def __deepcopy__(self, memo: dict) -> MergeLock:  # a copied model gets its own lock (locks cannot be copied)
        return MergeLock()

    def __reduce__(self):
        return MergeLock, ()

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._local = threading.local()

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            while self._writing:
                self._condition.wait()
            self._readers += 1
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise RuntimeError(
                "Cannot re-merge the adapters (merge, unmerge, or set_preference on a merged model) from inside a call "
                "of the same model: the call uses the merged weights."
            )
        with self._condition:
            while self._writing or self._readers:
                self._condition.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()
