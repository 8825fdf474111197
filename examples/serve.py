"""Serve a PaLoRA model over HTTP with LitServe: one trade-off per request, many requests per forward pass.

A PaLoRA model holds a whole Pareto front, and a per-sample preference of shape ``(batch, T)`` gives every row of a
batch its own trade-off (``model(**inputs, preference=...)``, see API.md). LitServe collects the requests that arrive
within ``--batch_timeout`` seconds (at most ``--max_batch_size``); :class:`PaLoRAAPI` runs them as ONE forward with
the stacked preferences and answers every client with its own row:

    pip install "peft_palora[serve]"
    python examples/serve.py --bundle outputs/train_mtl              # the main job's MultiMNIST model
    python examples/serve.py --bundle my_text_bundle --base minilm     # a bundle trained on all-MiniLM-L6-v2
    curl -s 127.0.0.1:8000/predict -d '{"inputs": "a short sentence", "preference": {"education": 0.7, "marital": 0.3}}'

``POST /predict`` takes ``{"inputs": ..., "preference": ...}``: one sample (a string for a text model, else
``{"pixel_values": [[...]]}`` as nested lists) and a list of T weights or a ``{task: weight}`` object, checked by
``validate_preference`` (finite, non-negative, sum 1; never renormalised). It answers ``{"outputs": ...,
"batch_size": n}`` (for a ``MultiTaskModel``, ``{task: logits}``; ``n`` requests shared the forward), or an HTTP
error ``{"detail": "..."}`` naming the problem: 400 for a bad request, 413 for a body over ``--max_body_bytes``,
500 when the model fails on it. One bad request never spoils the others of its batch (:class:`IsolatingLoop`).
LitServe gives ``GET /health``, ``GET /info``, worker processes and the batching window.

Models whose batch norms normalise with batch statistics (the main job's ResNet) would let requests change each
other's answers; :func:`per_sample_batch_norm` makes those layers normalise each sample on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
import torch
import torch.nn.functional as F
from fastapi import HTTPException
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException
from starlette.responses import JSONResponse
from torch import nn
from transformers import HfArgumentParser

from peft_palora.preferences import validate_preference


class JSONBodyGuard:
    """ASGI middleware: a POST body over ``max_body_bytes`` gets 413, one that is not a JSON object 400."""

    def __init__(self, app: Any, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left
            body, more = body + message.get("body", b""), message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                error = f"the body is too large; the limit is {self.max_body_bytes} bytes."
                return await JSONResponse({"detail": error}, 413)(scope, receive, send)
        try:
            payload, error = json.loads(body), None
        except (UnicodeDecodeError, ValueError) as exc:
            error = f"the body is not valid JSON: {exc}."
        except RecursionError:
            error = "the body is nested too deeply to decode."
        if error is None and not isinstance(payload, dict):
            error = f"the body must be a JSON object, got {type(payload).__name__}."
        if error is not None:
            return await JSONResponse({"detail": error}, 400)(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
            (b"content-type", b"application/json")
        ]
        return await self.app(dict(scope, headers=headers), replay, send)  # JSON whatever the client said (curl -d)


class IsolatingLoop(BatchedLoop):
    """LitServe's batched loop answers every request of a batch with the error of one: this one decodes each request
    on its own (a bad one gets its own 400 and leaves the batch) and sends an ``HTTPException`` that ``predict``
    returns for one sample as that request's error."""

    def get_batch_requests(self, lit_api, request_queue, transport):
        batch, timed_out = super().get_batch_requests(lit_api, request_queue, transport)
        good = []
        for queue_id, uid, payload in batch:
            try:
                good.append((queue_id, uid, lit_api.decode_request(payload)))
            except HTTPException as error:
                self.put_response(transport, queue_id, uid, error, LitAPIStatus.OK, LoopResponseType.REGULAR)
        return good, timed_out

    def put_response(self, transport, response_queue_id, uid, response_data, status, response_type):
        if isinstance(response_data, HTTPException):  # an error of this request only
            response_data, status = PickleableHTTPException.from_exception(response_data), LitAPIStatus.ERROR
        super().put_response(transport, response_queue_id, uid, response_data, status, response_type)


@dataclass
class Sample:
    """A decoded request: the model inputs of one sample (or its text) and its ``(T,)`` preference."""

    inputs: Any
    preference: torch.Tensor


def _tensor_inputs(inputs: Any, allowed: list[str]) -> dict[str, torch.Tensor]:
    if not isinstance(inputs, dict) or not inputs or set(inputs) - set(allowed):
        raise ValueError(
            f"inputs must be an object with the model input(s) {allowed} as nested lists, got {inputs!r:.80}"
        )
    out = {}
    for name, value in inputs.items():
        if isinstance(value, (str, bool)) or not isinstance(value, (list, int, float)):
            raise ValueError(f"inputs[{name!r}] must be nested lists of numbers, got {type(value).__name__}")
        try:
            out[name] = torch.tensor(value, dtype=torch.int64 if name.endswith(("_ids", "mask")) else torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise ValueError(
                f"inputs[{name!r}] must be nested lists of numbers with a regular shape ({error})"
            ) from None
        if out[name].is_floating_point() and not bool(out[name].isfinite().all()):
            raise ValueError(f"inputs[{name!r}] must be finite (no NaN or infinity)")
    return out


def split_rows(outputs: Any, n: int) -> list[Any]:
    """Cut a model's outputs (tensor, or dict / ``ModelOutput`` of tensors) into ``n`` JSON-ready rows."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float().cpu().tolist()
    parts = {key: split_rows(value, n) for key, value in outputs.items() if isinstance(value, torch.Tensor)}
    return [{key: rows[i] for key, rows in parts.items()} for i in range(n)]


class PerSampleBatchNorm(nn.Module):
    """A batch-statistics batch norm applied to each sample alone (what a batch of that one sample would get)."""

    def __init__(self, batch_norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = batch_norm.weight, batch_norm.bias, batch_norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


def per_sample_batch_norm(model: nn.Module) -> int:
    """Replace every batch norm of ``model`` without running statistics by :class:`PerSampleBatchNorm`; the count."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name, module in [(n, m) for n, m in found if m.running_mean is None]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PerSampleBatchNorm(module))
    return sum(m.running_mean is None for _, m in found)


class PaLoRAAPI(ls.LitAPI):
    """Serves a saved PaLoRA bundle (``MultiTaskModel`` or PaLoRA ``PeftModel``); see the module docstring."""

    def __init__(
        self, bundle: str, base: str | None = None, max_length: int = 128, threads: int | None = None, **batching: Any
    ):
        super().__init__(loop=IsolatingLoop(), **batching)
        self.bundle, self.base, self.max_length, self.threads = bundle, base, max_length, threads

    def setup(self, device: str) -> None:
        from peft import PeftModel
        from recipes import minilm_path
        from transformers import AutoModel, AutoTokenizer

        from peft_palora.training.multitask import TASK_HEADS_FILENAME, MultiTaskModel

        if self.threads:
            torch.set_num_threads(self.threads)
        with open(os.path.join(self.bundle, "adapter_config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        bundled = os.path.join(self.bundle, "base_model")
        source = minilm_path() if self.base == "minilm" else self.base
        source = source or (bundled if os.path.isdir(bundled) else config.get("base_model_name_or_path"))
        base = AutoModel.from_pretrained(source)
        self.input_names = [getattr(base, "main_input_name", "pixel_values")]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            self.tokenizer = None
        if os.path.isfile(os.path.join(self.bundle, TASK_HEADS_FILENAME)):
            self.model = MultiTaskModel.from_pretrained(base, self.bundle)
        else:
            self.model = PeftModel.from_pretrained(base, self.bundle)
        self.task_names, self.num_tasks = config.get("task_names"), int(config["num_tasks"])
        per_sample_batch_norm(self.model.eval())
        self.device = torch.device(device)
        self.model.to(self.device)

    def decode_request(self, request) -> Sample:  # no annotation: LitServe would read it as the body type
        if isinstance(request, Sample):  # IsolatingLoop decoded it already
            return request
        unknown = sorted(set(request) - {"inputs", "preference"})
        missing = [f"`{key}`" for key in ("inputs", "preference") if key not in request]
        if unknown or missing:
            raise HTTPException(400, f"a request has `inputs` and `preference`; missing {missing}, unknown {unknown}.")
        try:
            preference = validate_preference(request["preference"], self.num_tasks, self.task_names, name="preference")
            if preference.dim() != 1:
                raise ValueError(
                    f"preference must be one vector of {self.num_tasks} weights (a request is one sample)"
                )
            inputs = request["inputs"]
            if self.tokenizer is None:
                inputs = _tensor_inputs(inputs, self.input_names)
            elif not isinstance(inputs, str) or not inputs.strip():
                raise ValueError(f"inputs must be a non-empty string for this text model, got {inputs!r:.80}")
        except (ValueError, TypeError, OverflowError) as error:
            raise HTTPException(400, f"invalid request: {error}") from None
        return Sample(inputs, preference)

    def batch(self, samples: list[Sample]) -> tuple[dict | None, torch.Tensor, list[Sample]]:
        if self.tokenizer is not None:
            texts = [s.inputs for s in samples]
            inputs = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        elif all(s.inputs.keys() == samples[0].inputs.keys() for s in samples) and all(
            v.shape == samples[0].inputs[k].shape for s in samples for k, v in s.inputs.items()
        ):
            inputs = {k: torch.stack([s.inputs[k] for s in samples]) for k in samples[0].inputs}
        else:
            inputs = None  # inputs of different shapes: predict serves each on its own
        return inputs, torch.stack([s.preference for s in samples]), samples

    def predict(self, batch: tuple[dict | None, torch.Tensor, list[Sample]]) -> list[Any]:
        inputs, preference, samples = batch
        if inputs is not None:
            try:
                with torch.inference_mode():
                    outputs = self.model(
                        **{k: v.to(self.device) for k, v in inputs.items()}, preference=preference.to(self.device)
                    )
                return [(row, len(samples)) for row in split_rows(outputs, len(samples))]
            except Exception as error:  # noqa: BLE001  (answered to the client, never hidden)
                if len(samples) == 1:
                    return [HTTPException(500, f"the model failed on this request: {type(error).__name__}: {error}")]
        return [answer for sample in samples for answer in self.predict(self.batch([sample]))]

    def unbatch(self, answers: list[Any]) -> list[Any]:
        return answers

    def encode_response(self, answer: Any) -> Any:
        if isinstance(answer, HTTPException):
            return answer
        return {"outputs": answer[0], "batch_size": answer[1]}


@dataclass
class Arguments:
    bundle: str = field(default="outputs/train_mtl", metadata={"help": "A saved PaLoRA bundle."})
    base: str | None = field(
        default=None, metadata={"help": "Base model ('minilm': the offline one); default: the bundle's."}
    )
    max_length: int = field(default=128, metadata={"help": "Text models: truncate inputs to this many tokens."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; loopback unless behind a proxy."})
    port: int = field(default=8000, metadata={"help": "Port (1024 to 65535)."})
    max_batch_size: int = field(default=32, metadata={"help": "Most requests per forward (1 turns batching off)."})
    batch_timeout: float = field(default=0.005, metadata={"help": "Seconds a batch waits for more requests."})
    workers: int = field(default=1, metadata={"help": "Inference worker processes (each loads the model)."})
    timeout: float = field(default=30.0, metadata={"help": "Answer 504 to a request queued longer than this."})
    max_body_bytes: int = field(default=8 * 2**20, metadata={"help": "Answer 413 to a larger body."})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads per worker."})


def main() -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    if not os.path.isfile(os.path.join(args.bundle, "adapter_config.json")):
        raise SystemExit(f"--bundle {args.bundle!r} has no adapter_config.json; is it a saved PaLoRA bundle?")
    api = PaLoRAAPI(
        args.bundle,
        args.base,
        args.max_length,
        args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(
        api,
        accelerator="auto",
        workers_per_device=args.workers,
        timeout=args.timeout,
        middlewares=[(JSONBodyGuard, {"max_body_bytes": args.max_body_bytes})],
    )
    print(f"serving {args.bundle} on http://{args.host}:{args.port}/predict; Ctrl-C stops", flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)


if __name__ == "__main__":
    main()
