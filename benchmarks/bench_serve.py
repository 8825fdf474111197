"""Requests per second of examples/serve.py (LitServe): PaLoRA batching against one request at a time and T LoRAs.

Closed-loop clients (each sends its next request as soon as it has its answer), each with its own preference, post
one short sentence at a time over loopback HTTP to a server subprocess. Three servers, each at 1, 8 and 32 clients:

* ``one at a time``: examples/serve.py with ``--max_batch_size 1``;
* ``palora batched``: examples/serve.py with ``--max_batch_size 32 --batch_timeout 0.005``: one forward per batch,
  every row at its own ``(batch, T)`` preference;
* ``T LoRAs``: the same trade-offs served as T plain PEFT LoRA adapters (the bundle exported with
  ``export_task_loras_from_bundle``), the same LitServe batching; a request at preference lambda needs the mixed
  adapter ``add_weighted_adapter(tasks, weights=lambda, combination_type="cat")`` (built once per distinct
  preference and cached, exactly PaLoRA's model at lambda: the server checks it against the PaLoRA model at start,
  and the benchmark against the PaLoRA server's answer; every client's mix is built in the warm-up, the time to
  build one is reported apart as ``lora_mix_build_ms``), and a batch runs as ONE forward with PEFT's mixed-adapter inference ``adapter_names=[...]`` (a sub-batch per distinct adapter
  in every LoRA layer). Mixing the T adapters' *outputs* would not be the same model and is not measured.

Model: all-MiniLM-L6-v2 (offline) with PaLoRA on query/value (T=2, r=4, random adapters), mean pooling and two heads.
Clients and servers share the machine's cores; the numbers include JSON and HTTP on both sides. Servers run one
torch thread each by default (``--threads``): on a busy machine a 2-thread forward keeps waiting for its descheduled
thread (we saw a single request take 0.05 to 1 s that way, 10 to 50 ms with one thread).

    python benchmarks/bench_serve.py            # ~3 minutes, writes benchmarks/results/bench_serve.json
    python benchmarks/bench_serve.py --quick    # 1 and 4 clients, 1 s each, the servers started together (smoke test)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import litserve as ls
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "examples")]
TASKS = ["sentiment", "topic"]
WORDS = (
    "the a small model serves many users with their own trade off between two tasks every request "
    "carries a preference and the server groups them into one forward pass on the cpu quickly today"
).split()

from serve import JSONBodyGuard, PaLoRAAPI, split_rows  # noqa: E402  (examples/ is on the path from here)

PROBE_TEXTS = ["the small model serves many users", "every request carries a preference today"]
PROBE_PREFERENCES = [[0.3, 0.7], [0.85, 0.15]]


class TaskLorasAPI(PaLoRAAPI):
    """PaLoRAAPI's requests and answers, but the backbone is a plain PEFT model holding T LoRA adapters.

    Defined at module level: LitServe pickles the API into a worker process started with ``spawn``, which imports
    this file as ``__mp_main__`` and must find the class there (inside an ``if __name__ == "__main__"`` block it
    would not exist in the worker, the worker dies unpickling it and the server never becomes healthy).
    """

    def __init__(self, bundle, loras, threads, **batching):
        super().__init__(bundle, base="minilm", max_length=32, threads=threads, **batching)
        self.loras = loras

    def setup(self, device):
        from peft import PeftModel
        from recipes import minilm_path
        from transformers import AutoModel

        super().setup(device)  # the PaLoRA model: its heads, tokenizer and validation are reused
        lora = PeftModel.from_pretrained(
            AutoModel.from_pretrained(minilm_path()), f"{self.loras}/{TASKS[0]}", TASKS[0]
        )
        for task in TASKS[1:]:
            lora.load_adapter(f"{self.loras}/{task}", adapter_name=task)
        self.lora, self.mixed = lora.eval(), {}
        self.check_against_palora()

    def check_against_palora(self):
        """Once, at start: a mixed batch (two preferences) answered by the cat-mixed LoRAs equals PaLoRA's answer."""
        inputs = self.tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
        preference = torch.tensor(PROBE_PREFERENCES)
        with torch.inference_mode():
            expected = self.model(**inputs, preference=preference)
        got = self.forward(inputs, preference)
        difference = max((got[t] - expected[t]).abs().max().item() for t in TASKS)
        if not difference <= 1e-5:
            raise RuntimeError(f"the cat-mixed task LoRAs differ from PaLoRA at the same preference by {difference}")
        print(f"T LoRAs (cat mix) equal PaLoRA at {PROBE_PREFERENCES}: max |difference| {difference:.1e}", flush=True)

    def adapter(self, preference):
        key = tuple(preference.tolist())
        if key not in self.mixed:
            name = f"mix{len(self.mixed)}"
            self.lora.add_weighted_adapter(TASKS, list(key), adapter_name=name, combination_type="cat")
            self.mixed[key] = name
            self.lora.eval()
        return self.mixed[key]

    def forward(self, inputs, preference):
        from peft_palora.training.multitask import pool_features

        names = [self.adapter(row) for row in preference]
        with torch.inference_mode():
            features = pool_features(self.lora(**inputs, adapter_names=names), inputs, self.model.pooling)
            return {task: head(features) for task, head in self.model.heads.items()}

    def predict(self, batch):
        inputs, preference, samples = batch
        outputs = self.forward(inputs, preference)
        return [(row, len(samples)) for row in split_rows(outputs, len(samples))]


def lora_server(bundle: str, loras: str, port: str, threads: str) -> None:
    """The T-LoRA server's process: LitServer as examples/serve.py builds it, with :class:`TaskLorasAPI`."""
    api = TaskLorasAPI(bundle, loras, int(threads), max_batch_size=32, batch_timeout=0.005)
    server = ls.LitServer(
        api, accelerator="cpu", timeout=30.0, middlewares=[(JSONBodyGuard, {"max_body_bytes": 8 * 2**20})]
    )
    server.run(host="127.0.0.1", port=int(port), generate_client_file=False, num_api_servers=1)


def sentences(count: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        length = int(torch.randint(5, 13, (1,), generator=generator))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)))
    return out


def post(port: int, payload: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/predict", json.dumps(payload), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def launch(command: list[str], log_path: str) -> subprocess.Popen:
    """Start a server in its own process group, its output in ``log_path``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "examples")]), HF_HUB_OFFLINE="1")
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_ready(process: subprocess.Popen, port: int, log_path: str, limit: float = 240.0) -> None:
    """Wait until the server answers ``/health`` with 200.

    LitServe keeps its HTTP side up when an inference worker dies (say, unpickling the API failed), so a worker's
    traceback in the log fails the start at once, with the log's tail, instead of waiting out ``limit``."""
    deadline, problem = time.monotonic() + limit, f"did not answer /health within {limit:.0f} s"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            problem = f"exited with status {process.returncode}"
            break
        with open(log_path, "rb") as log:
            if b"Traceback (most recent call last)" in log.read():
                problem = "raised in a worker"
                break
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    stop(process)
    with open(log_path, "rb") as log:
        tail = log.read()[-3000:].decode(errors="replace")
    raise RuntimeError(f"the server {process.args} {problem}; its output ends with:\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def run_clients(port: int, clients: int, duration: float, texts: list[str]) -> dict:
    counts, batches, errors = [0] * clients, [], []
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    preferences = client_preferences(clients)

    def client(index: int) -> None:
        preference = preferences[index]
        barrier.wait(60)
        n = index
        while time.perf_counter() < stop_at[0]:
            status, body = post(port, {"inputs": texts[n % len(texts)], "preference": preference})
            if status != 200:
                errors.append(body)
                return
            counts[index] += 1
            batches.append(body["batch_size"])
            n += clients

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + duration
    start_time = time.perf_counter()
    barrier.wait(60)
    for thread in threads:
        thread.join(duration + 120)
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    return {"rps": sum(counts) / (time.perf_counter() - start_time), "mean_batch": sum(batches) / max(len(batches), 1)}


def time_mixing(loras: str, threads: int, count: int = 5) -> float:
    """Milliseconds to build one cat-mixed adapter (``add_weighted_adapter``): the T-LoRA server's cost per new
    preference (PaLoRA's is nil: the preference is a forward argument). Median of ``count`` preferences."""
    from peft import PeftModel
    from recipes import minilm_path
    from transformers import AutoModel

    torch.set_num_threads(threads)
    lora = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path()), f"{loras}/{TASKS[0]}", TASKS[0])
    for task in TASKS[1:]:
        lora.load_adapter(f"{loras}/{task}", adapter_name=task)
    times = []
    for i in range(count):
        weight = (i + 1) / (count + 1)
        begin = time.perf_counter()
        lora.add_weighted_adapter(TASKS, [weight, 1 - weight], adapter_name=f"mix{i}", combination_type="cat")
        times.append(1000 * (time.perf_counter() - begin))
    return sorted(times)[count // 2]


def client_preferences(clients: int) -> list[dict]:
    """The preference of each of ``clients`` clients (all different, spread over the simplex)."""
    weights = [round((index + 0.5) / clients, 4) for index in range(clients)]
    return [{"sentiment": w, "topic": round(1 - w, 4)} for w in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of load per cell")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per server (on a busy machine a multi-threaded forward waits for its slowest thread)",
    )
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 1 s each (smoke test)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bench_serve.json"))
    args = parser.parse_args()
    if args.quick:
        args.clients, args.duration = "1,4", 1.0
    from peft import get_peft_model
    from recipes import minilm_path
    from transformers import AutoModel

    import peft_palora
    from peft_palora.interop.lora import export_task_loras_from_bundle
    from peft_palora.training.multitask import MultiTaskModel, linear_heads

    texts, client_counts = sentences(64), [int(c) for c in args.clients.split(",")]
    began, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        base = AutoModel.from_pretrained(minilm_path())
        config = peft_palora.PaLoRAConfig(task_names=TASKS, r=4, target_modules=["query", "value"], init_weights=False)
        heads = linear_heads(base.config.hidden_size, {"sentiment": 2, "topic": 4})
        MultiTaskModel(get_peft_model(base, config), heads, pooling="mean").save_pretrained(f"{tmp}/bundle")
        export_task_loras_from_bundle(f"{tmp}/bundle", f"{tmp}/loras", base=minilm_path())
        mix_ms = time_mixing(f"{tmp}/loras", args.threads, count=3 if args.quick else 5)
        print(f"building one cat-mixed adapter (add_weighted_adapter): {mix_ms:.1f} ms", flush=True)
        serve = [
            sys.executable,
            "examples/serve.py",
            "--bundle",
            f"{tmp}/bundle",
            "--base",
            "minilm",
            "--threads",
            str(args.threads),
        ]
        modes = {
            "one at a time": serve + ["--max_batch_size", "1"],
            "palora batched": serve + ["--max_batch_size", "32", "--batch_timeout", "0.005"],
            "T LoRAs": [sys.executable, __file__, "--lora_server", f"{tmp}/bundle", f"{tmp}/loras"],
        }
        results, probe = {}, {"inputs": texts[0], "preference": [0.3, 0.7]}
        servers = {}  # name: (process, port, log)

        def open_server(name: str) -> None:
            port, log = free_port(), f"{tmp}/{name.replace(' ', '_')}.log"
            flags = [str(port), str(args.threads)] if name == "T LoRAs" else ["--port", str(port)]
            servers[name] = (launch(modes[name] + flags, log), port, log)

        try:
            if args.quick:  # a smoke test: the three servers start together (its numbers are not comparable)
                for name in modes:
                    open_server(name)
            for name in modes:
                started = time.perf_counter()
                if name not in servers:  # the real run: one server on the machine at a time
                    open_server(name)
                process, port, log = servers[name]
                wait_ready(process, port, log)
                print(f"{name:>15}: serving after {time.perf_counter() - started:.1f} s", flush=True)
                status, body = post(port, probe)
                if status != 200:
                    raise RuntimeError(f"{name}: the probe request failed: {body}")
                results[name] = {"probe": body["outputs"]}
                for clients in client_counts:
                    for i, preference in enumerate(client_preferences(clients)):  # warm up, every client's mix
                        post(port, {"inputs": texts[i % len(texts)], "preference": preference})
                    cell = run_clients(port, clients, args.duration, texts)
                    cell["load_1min"] = os.getloadavg()[0]
                    results[name][clients] = cell
                    print(
                        f"{name:>15} clients={clients:>3}: {cell['rps']:7.1f} req/s, mean batch {cell['mean_batch']:.1f}, "
                        f"load {cell['load_1min']:.1f}",
                        flush=True,
                    )
                stop(process)
        finally:
            for process, _, _ in servers.values():
                stop(process)
    difference = max(
        (torch.tensor(results["T LoRAs"]["probe"][t]) - torch.tensor(results["palora batched"]["probe"][t]))
        .abs()
        .max()
        .item()
        for t in TASKS
    )
    print(f"T LoRAs (cat mix) vs PaLoRA answer over HTTP, max |difference| = {difference:.2e}")
    if not difference <= 1e-5:
        raise SystemExit(f"the T-LoRA server's answer differs from PaLoRA's at the same preference by {difference}")
    print(f"{'clients':>7} | {'one at a time':>14} | {'palora batched':>22} | {'T LoRAs':>22} | palora/LoRAs")
    summary = {"max_abs_difference_lora_vs_palora": difference, "lora_mix_build_ms": mix_ms, "cells": {}}
    for clients in client_counts:
        one, pal, lora = (results[m][clients] for m in modes)
        print(
            f"{clients:>7} | {one['rps']:>8.1f} req/s | {pal['rps']:>8.1f} req/s {pal['rps'] / one['rps']:>5.2f}x"
            f" | {lora['rps']:>8.1f} req/s {lora['rps'] / one['rps']:>5.2f}x | {pal['rps'] / lora['rps']:.2f}x"
        )
        print(f"RATIO palora_batched_over_one_at_a_time_clients_{clients}={pal['rps'] / one['rps']:.3f}")
        print(f"RATIO palora_batched_over_t_loras_clients_{clients}={pal['rps'] / lora['rps']:.3f}")
        summary["cells"][clients] = {m: results[m][clients] for m in modes}
    elapsed = time.perf_counter() - began
    print(f"total {elapsed:.0f} s", flush=True)
    if not args.quick:
        machine = {
            "cpu_count": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "nice": os.nice(0),
            "torch_threads_per_server": args.threads,
            "note": "shared machine: clients, servers and other users' jobs on the same cores",
        }
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(
                {"duration_s": args.duration, "total_s": elapsed, "machine": machine, **summary}, handle, indent=1
            )


if __name__ == "__main__":
    if "--lora_server" in sys.argv:
        lora_server(*sys.argv[sys.argv.index("--lora_server") + 1 :][:4])
    else:
        main()
