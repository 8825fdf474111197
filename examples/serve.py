"""Serve a PaLoRA model over HTTP, one trade-off per request, many requests per forward pass.

What it shows: a PaLoRA model holds a whole Pareto front, and a per-sample preference of shape ``(batch, T)``
gives every row of a batch its own trade-off (``model(**inputs, preference=...)``, see API.md). So requests from
users with *different* preferences can still share one forward pass. This server collects the requests that arrive
within ``max_wait_ms`` of each other (at most ``max_batch_size``), runs them as ONE forward with the stacked
preferences and sends every client its own row of the result:

    python examples/serve.py --bundle outputs/train_mtl              # the main job's MultiMNIST model
    python examples/serve.py --bundle my_text_bundle --base minilm     # a bundle trained on all-MiniLM-L6-v2

    curl -s localhost:8000/predict -d '{"inputs": "a short sentence", "preference": {"education": 0.7, "marital": 0.3}}'
    curl -s localhost:8000/stats

Protocol (JSON in, JSON out):

* ``POST /predict`` with ``{"inputs": ..., "preference": ...}``. ``inputs`` is one sample: a string for a text
  model, else ``{"pixel_values": [[...]]}`` (or the model's other input names) as nested lists. ``preference`` is a
  list of T weights or a ``{task: weight}`` dict, checked by ``peft_palora.preferences.validate_preference``
  (finite, non-negative, sum 1; never renormalised). The answer is ``{"outputs": ..., "batch_size": n}``: the
  model's outputs for this sample (for a ``MultiTaskModel``, ``{task: logits}``) and the size of the forward it
  shared. A malformed request gets HTTP 400 with a message naming the problem; the server keeps serving.
* ``GET /stats``: request counts and the histogram of batch sizes. ``GET /health``: ``{"status": "ok"}``.

Design:

* Standard library only (``http.server.ThreadingHTTPServer``, ``queue``, ``threading``): the example must run
  wherever ``peft_palora`` runs, and what it demonstrates, the batching, is about thirty lines that a web
  framework would not make shorter. Handler threads parse and validate; ONE worker thread owns the model and runs
  every forward, so the model never needs to be thread-safe and the preference tensor is per call, never set on
  the model. For production put it behind a real front end (TLS, authentication): it binds 127.0.0.1 by default.
* Batching window: the worker takes the oldest queued request and waits until ``max_wait_ms`` after *that
  request's arrival* for more (requests that queued while the previous forward ran join without waiting). One
  client alone therefore pays up to ``max_wait_ms`` per request; ``--max_batch_size 1`` turns batching off.
* Isolation: if a batch fails (one request's inputs cannot be collated, or the forward raises), the requests are
  checked one by one, the faulty ones are answered with their own error and the others are still served.
* Batch statistics: a model whose batch norms normalise with the statistics of the batch (the main job's
  MultiMNIST ResNet, see ``peft_palora.training.multitask.use_batch_statistics``) would let requests change each other's
  answers. :func:`per_sample_batch_norm` replaces those layers by the same normalisation computed per sample,
  which is exactly what each request would get alone, so such models are batched too.

Use it from Python with any model and collate function (the tests do that with a tiny model)::

    batcher = PreferenceBatcher(model, collate_fn, num_tasks=2, task_names=["a", "b"], max_batch_size=16)
    with BatchingServer(batcher, host="127.0.0.1", port=0) as server:
        print(server.url)   # http://127.0.0.1:<port>
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import HfArgumentParser

from peft_palora.preferences import validate_preference

logger = logging.getLogger("palora.serve")


# ---------------------------------------------------------------------------------------------------------------------
# Errors that become HTTP statuses
# ---------------------------------------------------------------------------------------------------------------------
class RequestError(Exception):
    """An error answered to one client; ``status`` is the HTTP status."""

    status = 500


class BadRequest(RequestError, ValueError):
    status = 400


class PayloadTooLarge(BadRequest):
    status = 413


class ServiceUnavailable(RequestError):
    status = 503


# ---------------------------------------------------------------------------------------------------------------------
# Collate functions: the JSON inputs of several requests -> the model's keyword arguments
# ---------------------------------------------------------------------------------------------------------------------
def _integer_input(name: str) -> bool:
    return name.endswith("_ids") or name.endswith("mask") or name == "labels"


class TensorCollator:
    """Stack inputs given as nested lists: each request's ``inputs`` is ``{name: nested list}`` (one sample).

    Names ending in ``_ids`` or ``mask`` become int64 tensors, others float32. Every sample must have the same names
    (one of ``allowed_keys`` when given) and, per name, the same shape; a float input must be finite.
    """

    def __init__(self, allowed_keys: Sequence[str] | None = None):
        self.allowed_keys = tuple(allowed_keys) if allowed_keys else None

    def _tensor(self, name: str, value: Any) -> torch.Tensor:
        dtype = torch.int64 if _integer_input(name) else torch.float32
        if isinstance(value, (str, bytes, bool)) or not isinstance(value, (list, int, float)):
            raise ValueError(
                f"inputs[{name!r}] must be a number or nested lists of numbers, got {type(value).__name__}."
            )
        try:
            tensor = torch.tensor(value, dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"inputs[{name!r}] must be nested lists of numbers with a regular shape ({error})."
            ) from None
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"inputs[{name!r}] must be finite (no NaN or infinity).")
        return tensor

    def __call__(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        columns: dict[str, list[torch.Tensor]] = {}
        for index, sample in enumerate(samples):
            if not isinstance(sample, Mapping) or not sample:
                raise ValueError(
                    f"inputs must be a non-empty object {{name: nested list}}, got {type(sample).__name__}."
                )
            if self.allowed_keys is not None:
                unknown = sorted(set(sample) - set(self.allowed_keys))
                if unknown:
                    raise ValueError(
                        f"inputs has unknown name(s) {unknown}; this model takes {list(self.allowed_keys)}."
                    )
            if index and set(sample) != set(columns):
                raise ValueError(f"inputs names {sorted(sample)} differ from the batch's {sorted(columns)}.")
            for name, value in sample.items():
                columns.setdefault(name, []).append(self._tensor(name, value))
        batch = {}
        for name, tensors in columns.items():
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) > 1:
                raise ValueError(f"inputs[{name!r}] has different shapes across the batch: {sorted(shapes)}.")
            batch[name] = torch.stack(tensors)
        return batch


class TextCollator:
    """Tokenize one string per request (``inputs`` is the text) and pad the batch."""

    def __init__(self, tokenizer: Any, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        for sample in samples:
            if not isinstance(sample, str) or not sample.strip():
                raise ValueError(f"inputs must be a non-empty string for this text model, got {sample!r:.80}.")
        return dict(
            self.tokenizer(
                list(samples), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: one row per request, as JSON values
# ---------------------------------------------------------------------------------------------------------------------
def split_rows(outputs: Any, batch_size: int) -> list[Any]:
    """Cut a model's outputs (tensor, dict or ``ModelOutput``, tuple) into ``batch_size`` JSON-ready rows."""
    if isinstance(outputs, torch.Tensor):
        if outputs.dim() == 0 or outputs.shape[0] != batch_size:
            raise RuntimeError(
                f"the model returned a tensor of shape {tuple(outputs.shape)} for {batch_size} samples."
            )
        rows = outputs.detach().cpu()
        return (rows.float() if rows.dtype.is_floating_point else rows).tolist()
    if isinstance(outputs, Mapping):  # a dict, or a transformers ModelOutput
        parts = {key: split_rows(value, batch_size) for key, value in outputs.items() if value is not None}
        return [{key: rows[i] for key, rows in parts.items()} for i in range(batch_size)]
    if isinstance(outputs, (tuple, list)):
        parts = [split_rows(value, batch_size) for value in outputs]
        return [[rows[i] for rows in parts] for i in range(batch_size)]
    raise RuntimeError(f"cannot split a model output of type {type(outputs).__name__} per request.")


# ---------------------------------------------------------------------------------------------------------------------
# The batcher: a queue and one worker thread that owns the model
# ---------------------------------------------------------------------------------------------------------------------
class _Request:
    __slots__ = ("inputs", "preference", "arrived", "done", "result", "error", "batch_size", "abandoned")

    def __init__(self, inputs: Any, preference: torch.Tensor):
        self.inputs = inputs
        self.preference = preference
        self.arrived = time.monotonic()
        self.done = threading.Event()
        self.result: Any = None
        self.error: RequestError | None = None
        self.batch_size = 0
        self.abandoned = False  # its client stopped waiting: not worth a forward any more

    def answer(self, result: Any, batch_size: int) -> None:
        self.result, self.batch_size = result, batch_size
        self.done.set()

    def fail(self, error: RequestError) -> None:
        self.error = error
        self.done.set()


class PreferenceBatcher:
    """Group concurrent requests, each with its own preference, into single forwards of ``model``.

    Args:
        model: called as ``model(**collate_fn(inputs_list), preference=<(batch, T) float32 tensor>)`` under
            ``torch.inference_mode()``, only ever from the worker thread. Its output (tensor, dict, ``ModelOutput``
            or tuple) must have the batch as first dimension. For a torch module, the tensors of the inputs and the
            preference are moved to the device of its first parameter.
        collate_fn: turns a list of request ``inputs`` (decoded JSON) into the model's keyword arguments. A
            ``ValueError``/``TypeError``/``KeyError`` it raises is answered as HTTP 400.
        num_tasks, task_names: how preferences are validated (``task_names`` enables the ``{task: weight}`` form).
        max_batch_size: the most requests in one forward (1: no batching).
        max_wait_ms: how long after the oldest queued request's arrival the worker waits for more.
        max_queue_size: requests waiting beyond this are refused (HTTP 503) instead of piling up.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        collate_fn: Callable[[list[Any]], Mapping[str, Any]],
        num_tasks: int,
        task_names: Sequence[str] | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue_size: int = 1024,
    ):
        if not callable(model) or not callable(collate_fn):
            raise TypeError("`model` and `collate_fn` must be callables.")
        for name, value in (
            ("num_tasks", num_tasks),
            ("max_batch_size", max_batch_size),
            ("max_queue_size", max_queue_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if (
            isinstance(max_wait_ms, bool)
            or not isinstance(max_wait_ms, (int, float))
            or not 0 <= max_wait_ms < math.inf
        ):
            raise ValueError(f"`max_wait_ms` must be a finite number >= 0, got {max_wait_ms!r}.")
        if task_names is not None and len(task_names) != num_tasks:
            raise ValueError(f"`task_names` has {len(task_names)} names for num_tasks={num_tasks}.")
        self.model = model
        self.collate_fn = collate_fn
        self.num_tasks = num_tasks
        self.task_names = list(task_names) if task_names is not None else None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        # inputs and preference go where the model's weights are (collate functions build CPU tensors)
        first_parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        self.device = first_parameter.device if first_parameter is not None else None
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queue_size)
        self._stopping = threading.Event()
        self._submit_lock = threading.Lock()  # no request enters the queue once closing has begun
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batch_sizes: Counter[int] = Counter()
        self._counts = Counter({"requests": 0, "answered": 0, "bad_requests": 0, "errors": 0, "refused": 0})

    # ---- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> PreferenceBatcher:
        if self._worker is not None:
            raise RuntimeError("this batcher was already started.")
        self._worker = threading.Thread(target=self._run, name="palora-batcher", daemon=True)
        self._worker.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new requests, answer the queued ones, stop the worker (waits at most ``timeout`` seconds)."""
        with self._submit_lock:
            self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                logger.warning("the batching worker did not stop within %.1f s (a forward is still running).", timeout)
        while True:  # whatever is left (worker never started, or timed out) gets an answer
            try:
                self._queue.get_nowait().fail(ServiceUnavailable("the server is shutting down."))
            except queue.Empty:
                break

    def __enter__(self) -> PreferenceBatcher:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive() and not self._stopping.is_set()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            sizes = dict(sorted(self._batch_sizes.items()))
            counts = dict(self._counts)
        forwards = sum(sizes.values())
        return {
            **counts,
            "forwards": forwards,
            "batch_sizes": {str(size): n for size, n in sizes.items()},
            "max_batch_size_seen": max(sizes, default=0),
            "mean_batch_size": (sum(size * n for size, n in sizes.items()) / forwards) if forwards else 0.0,
            "queued": self._queue.qsize(),
        }

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    # ---- the client side (any thread) ----------------------------------------------------------------------------
    def check_preference(self, preference: Any) -> torch.Tensor:
        """The request's preference as a ``(T,)`` float32 tensor, or :class:`BadRequest` saying what is wrong."""
        if preference is None:
            raise BadRequest("the request needs a `preference` (a list of T weights or a {task: weight} object).")
        try:
            value = validate_preference(preference, self.num_tasks, task_names=self.task_names, name="preference")
        except (ValueError, TypeError, OverflowError) as error:
            raise BadRequest(str(error)) from None
        if value.dim() != 1:
            raise BadRequest(
                f"preference must be one vector of {self.num_tasks} weights (a request is one sample), "
                f"got shape {tuple(value.shape)}."
            )
        return value

    def submit(self, inputs: Any, preference: Any, timeout: float = 30.0) -> tuple[Any, int]:
        """Queue one sample and wait for its answer: ``(outputs, size of the forward it shared)``.

        Raises :class:`BadRequest` (invalid preference or inputs), :class:`ServiceUnavailable` (queue full, closing,
        or no answer within ``timeout`` seconds) or :class:`RequestError` (the model failed on this request).
        """
        self._count("requests")
        try:
            request = _Request(inputs, self.check_preference(preference))
            with self._submit_lock:
                if not self.running:
                    raise ServiceUnavailable("the server is not running (closed or not started).")
                try:
                    self._queue.put_nowait(request)
                except queue.Full:
                    raise ServiceUnavailable(
                        f"too many queued requests ({self._queue.maxsize}); retry later."
                    ) from None
            if not request.done.wait(timeout):
                request.abandoned = True  # the worker skips it if it has not started on it yet
                raise ServiceUnavailable(f"no answer within {timeout:g} s.")
            if request.error is not None:
                raise request.error
            return request.result, request.batch_size
        except BadRequest:
            self._count("bad_requests")
            raise
        except ServiceUnavailable:
            self._count("refused")
            raise
        except RequestError:
            self._count("errors")
            raise

    # ---- the worker thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            batch = [first]
            deadline = first.arrived + self.max_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:  # past the deadline, still take what is already queued
                    batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [request for request in batch if not request.abandoned]
            if not batch:
                continue
            try:
                self._serve(batch)
            except BaseException as error:  # never leave a client waiting, never let the worker die silently
                logger.exception("unexpected failure in the batching worker")
                for request in batch:
                    if not request.done.is_set():
                        request.fail(RequestError(f"internal error: {type(error).__name__}: {error}"))
                if not isinstance(error, Exception):
                    raise

    def _collate(self, batch: list[_Request]) -> Mapping[str, Any]:
        try:
            inputs = self.collate_fn([request.inputs for request in batch])
        except (ValueError, TypeError, KeyError) as error:
            raise BadRequest(f"invalid inputs: {error}") from None
        if not isinstance(inputs, Mapping):
            raise RequestError(f"collate_fn must return a mapping of model inputs, got {type(inputs).__name__}.")
        return inputs

    def _serve(self, batch: list[_Request]) -> None:
        try:
            inputs = self._collate(batch)
            preference = torch.stack([request.preference for request in batch])
            if self.device is not None:
                preference = preference.to(self.device)
                inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.inference_mode():
                outputs = self.model(**inputs, preference=preference)
            rows = split_rows(outputs, len(batch))
        except Exception as error:
            if len(batch) > 1:
                return self._isolate(batch)
            if not isinstance(error, RequestError):
                logger.warning("the model failed on one request: %s: %s", type(error).__name__, error)
                error = RequestError(f"the model failed on this request: {type(error).__name__}: {error}")
            batch[0].fail(error)
            return None
        with self._lock:
            self._batch_sizes[len(batch)] += 1
            self._counts["answered"] += len(batch)
        for request, row in zip(batch, rows):
            request.answer(row, len(batch))
        return None

    def _isolate(self, batch: list[_Request]) -> None:
        """A batch failed: answer the requests whose inputs do not collate alone, retry the others together once,
        and if that fails too (the forward itself raised), one by one."""
        valid = []
        for request in batch:
            try:
                self._collate([request])
                valid.append(request)
            except RequestError as error:
                request.fail(error)
        if 0 < len(valid) < len(batch):
            self._serve(valid)
        else:
            for request in valid:
                self._serve([request])


# ---------------------------------------------------------------------------------------------------------------------
# The HTTP front end
# ---------------------------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: BatchingServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers at shutdown
    timeout = 10.0  # socket timeout: a client that stops sending cannot hold a thread forever
    disable_nagle_algorithm = True  # headers and body are two writes; Nagle would hold the body ~40 ms

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def do_GET(self) -> None:
        if self.path == "/stats":
            self._send(200, self.server.batcher.stats())
        elif self.path == "/health":
            self._send(200, {"status": "ok" if self.server.batcher.running else "stopping"})
        else:
            self._error(404, f"unknown path {self.path!r}; use POST /predict, GET /stats or GET /health.")

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() then refuses
        if length is None or not (length.isascii() and length.isdigit()):
            raise BadRequest(
                "the request needs a Content-Length header with the size of its JSON body (ASCII digits), got "
                + ("none." if length is None else f"{length[:40]!r}.")
            )
        if int(length) > self.server.max_body_bytes:
            raise PayloadTooLarge(f"the body is {length} bytes; the limit is {self.server.max_body_bytes}.")
        body = self.rfile.read(int(length))
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError) as error:  # ValueError: also an integer of over 4300 digits
            raise BadRequest(f"the body is not valid JSON: {error}.") from None
        except RecursionError:
            raise BadRequest("the body is nested too deeply to decode.") from None

    def do_POST(self) -> None:
        if self.path != "/predict":
            self._error(404, f"unknown path {self.path!r}; send predictions to POST /predict.")
            return
        try:
            payload = self._read_json()
            if not isinstance(payload, dict):
                raise BadRequest(f"the body must be a JSON object, got {type(payload).__name__}.")
            unknown = sorted(set(payload) - {"inputs", "preference"})
            if unknown:
                raise BadRequest(f"unknown field(s) {unknown}; a request has `inputs` and `preference`.")
            if "inputs" not in payload:
                raise BadRequest("the request needs an `inputs` field (one sample).")
            outputs, batch_size = self.server.batcher.submit(
                payload["inputs"], payload.get("preference"), timeout=self.server.request_timeout_s
            )
            self._send(200, {"outputs": outputs, "batch_size": batch_size})
        except RequestError as error:
            self._error(error.status, str(error))
        except ValueError as error:  # e.g. NaN in the outputs, which JSON cannot carry
            self._error(500, f"could not encode the answer: {error}")


class BatchingServer(ThreadingHTTPServer):
    """A threaded HTTP server in front of a :class:`PreferenceBatcher`.

    ``start()`` starts the batcher and serves in a background thread; ``close()`` stops accepting, answers what is
    queued, and joins every thread (handler threads are bounded by socket and request timeouts). Port 0 picks a
    free port (see ``url``).
    """

    daemon_threads = False  # joined by server_close(): a clean shutdown leaves no thread behind
    block_on_close = True
    request_queue_size = 256  # listen backlog; socketserver's 5 resets connections as soon as a few clients burst

    def __init__(
        self,
        batcher: PreferenceBatcher,
        host: str = "127.0.0.1",
        port: int = 8000,
        request_timeout_s: float = 30.0,
        max_body_bytes: int = 8 * 2**20,
    ):
        self.batcher = batcher
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> BatchingServer:
        if not self.batcher.running:
            self.batcher.start()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self.shutdown()  # serve_forever returns: no new connections
            self._thread.join(timeout)
        self.batcher.close(timeout)
        self.server_close()  # joins the handler threads

    def handle_error(self, request: Any, client_address: Any) -> None:
        # e.g. a client that hung up before its answer was written; the server goes on
        logger.warning("error while answering %s", client_address, exc_info=True)

    def __enter__(self) -> BatchingServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def post_json(url: str, payload: Any, timeout: float = 30.0) -> tuple[int, Any]:
    """A tiny client: POST ``payload`` to ``url`` (``http://host:port/path``), return ``(status, decoded JSON)``."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        connection.request("POST", parts.path or "/", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------------------------------
# Loading a saved bundle
# ---------------------------------------------------------------------------------------------------------------------
class PerSampleBatchNorm(nn.Module):
    """A batch-statistics batch norm applied to each sample on its own (its output for a sample is the output the
    batch norm gives for a batch of that one sample), so batching requests cannot mix their statistics."""

    def __init__(self, batch_norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight = batch_norm.weight
        self.bias = batch_norm.bias
        self.eps = batch_norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


def per_sample_batch_norm(model: nn.Module) -> int:
    """Replace every batch norm of ``model`` that normalises with batch statistics by :class:`PerSampleBatchNorm`;
    returns how many were replaced (norms with running statistics are per sample already and stay)."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, PerSampleBatchNorm(module))
            replaced += 1
    return replaced


def load_bundle(bundle: str, base: str | None = None, max_length: int = 128):
    """``(model, collate_fn, task_names, num_tasks)`` for a saved PaLoRA bundle, ready for :class:`PreferenceBatcher`.

    A ``MultiTaskModel`` bundle (``task_heads.safetensors``, as ``examples/train_mtl.py`` saves it) answers
    ``{task: logits}``; a plain PaLoRA adapter bundle answers the base model's outputs. The base model is ``base``
    (``"minilm"`` for the offline all-MiniLM-L6-v2), else the bundle's ``base_model/`` folder, else the
    ``base_model_name_or_path`` of its adapter config.
    """
    from peft import PeftModel
    from recipes import minilm_path
    from transformers import AutoModel, AutoTokenizer

    import peft_palora  # noqa: F401  (registers the PALORA type)
    from peft_palora.training.multitask import TASK_HEADS_FILENAME, MultiTaskModel

    config_path = os.path.join(bundle, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--bundle {bundle!r} has no adapter_config.json; is it a saved PaLoRA bundle?")
    with open(config_path, encoding="utf-8") as handle:
        adapter_config = json.load(handle)
    if base == "minilm":
        base = minilm_path()
    bundled_base = os.path.join(bundle, "base_model")
    source = base or (bundled_base if os.path.isdir(bundled_base) else adapter_config.get("base_model_name_or_path"))
    if not source:
        raise ValueError(f"{bundle!r} names no base model and has no base_model/ folder; pass --base.")
    base_model = AutoModel.from_pretrained(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if os.path.isfile(os.path.join(bundle, TASK_HEADS_FILENAME)):
        model = MultiTaskModel.from_pretrained(base_model, bundle)
        task_names = model.task_names
    else:
        model = PeftModel.from_pretrained(base_model, bundle)
        task_names = adapter_config.get("task_names")
    model.eval()
    replaced = per_sample_batch_norm(model)
    if replaced:
        logger.info("%d batch-statistics batch norms now normalise each request on its own.", replaced)
    if tokenizer is not None:
        collate_fn: Callable = TextCollator(tokenizer, max_length=max_length)
    else:
        collate_fn = TensorCollator(allowed_keys=[getattr(base_model, "main_input_name", "pixel_values")])
    return model, collate_fn, task_names, int(adapter_config["num_tasks"])


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    bundle: str = field(
        default="outputs/train_mtl", metadata={"help": "A saved PaLoRA bundle (MultiTaskModel or adapter only)."}
    )
    base: str | None = field(
        default=None,
        metadata={"help": "Base model folder or hub id ('minilm' for the offline one); default: the bundle's."},
    )
    max_length: int = field(default=128, metadata={"help": "Text models: truncate inputs to this many tokens."})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's)."})


@dataclass
class ServerArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; loopback unless behind a proxy."})
    port: int = field(default=8000, metadata={"help": "Port (0: any free port)."})
    max_batch_size: int = field(default=32, metadata={"help": "Most requests per forward (1 turns batching off)."})
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "Wait this long after the oldest queued request for others to join it."}
    )
    max_queue_size: int = field(default=1024, metadata={"help": "Refuse requests (503) beyond this many queued."})
    request_timeout_s: float = field(default=30.0, metadata={"help": "Answer 503 after waiting this long."})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, ServerArguments))
    model_args, server_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if model_args.threads:
        torch.set_num_threads(model_args.threads)

    model, collate_fn, task_names, num_tasks = load_bundle(
        model_args.bundle, base=model_args.base, max_length=model_args.max_length
    )
    batcher = PreferenceBatcher(
        model,
        collate_fn,
        num_tasks=num_tasks,
        task_names=task_names,
        max_batch_size=server_args.max_batch_size,
        max_wait_ms=server_args.max_wait_ms,
        max_queue_size=server_args.max_queue_size,
    )
    server = BatchingServer(
        batcher, host=server_args.host, port=server_args.port, request_timeout_s=server_args.request_timeout_s
    )
    logger.info("serving %s (tasks %s) on %s/predict; Ctrl-C stops", model_args.bundle, task_names, server.url)
    batcher.start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        batcher.close()
        server.server_close()
        logger.info("stopped; %s", json.dumps(batcher.stats()))


if __name__ == "__main__":
    main()
