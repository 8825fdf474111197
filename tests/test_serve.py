"""examples/serve.py: concurrent requests with their own preferences share forwards and get their own answers."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import BertConfig, BertModel

import peft_palora
from peft_palora.training.multitask import MultiTaskModel, linear_heads, use_batch_statistics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["a", "b"]
TIMEOUT = 20.0  # every wait in this file is bounded


def _load_example():
    spec = importlib.util.spec_from_file_location("palora_serve_example", os.path.join(REPO, "examples", "serve.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


serve = _load_example()


# ---- a tiny text model and its collate function ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    base = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    config = peft_palora.PaLoRAConfig(task_names=TASKS, r=2, target_modules=["query", "value"], init_weights=False)
    model = MultiTaskModel(get_peft_model(base, config), linear_heads(16, {"a": 3, "b": 2}), pooling="mean")
    return model.eval()


def pad_tokens(samples):
    """Requests carry lists of token ids of any length; pad them with 0 and mask the padding."""
    for tokens in samples:
        if not isinstance(tokens, list) or not tokens or not all(type(t) is int for t in tokens):
            raise ValueError(f"inputs must be a non-empty list of token ids, got {tokens!r}")
    length = max(len(tokens) for tokens in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, tokens in enumerate(samples):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def direct(model, tokens, preference):
    """The answer of ONE call of the model on this sample alone: what the server must reproduce."""
    with torch.no_grad():
        ids = torch.tensor([tokens])
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), preference=preference)
    return {task: logits[0] for task, logits in out.items()}


def make_requests(count):
    generator = torch.Generator().manual_seed(1)
    requests = []
    for i in range(count):
        length = 3 + i % 5
        tokens = torch.randint(1, 50, (length,), generator=generator).tolist()
        w = round(i / max(count - 1, 1), 4)
        preference = [w, 1 - w] if i % 2 else {"a": w, "b": 1 - w}  # both forms
        requests.append((tokens, preference))
    return requests


def concurrently(calls):
    """Run the zero-argument `calls` in threads released together; return their results in order."""
    results = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def worker(index):
        barrier.wait(TIMEOUT)
        results[index] = calls[index]()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"
    return results


@pytest.fixture
def no_thread_left():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        left = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and type(t).__name__ != "TMonitor"  # tqdm's, started by transformers
        ]
        if not left:
            return
        time.sleep(0.02)
    raise AssertionError(f"threads left running: {left}")


def assert_matches(outputs, expected):
    assert set(outputs) == set(expected)
    for task, row in expected.items():
        torch.testing.assert_close(torch.tensor(outputs[task]), row, atol=1e-5, rtol=1e-5)


# ---- the tests ------------------------------------------------------------------------------------------------------
def test_concurrent_requests_share_one_forward_and_get_their_own_answers(text_model, no_thread_left):
    requests = make_requests(12)
    # the worker waits (up to 5 s) until all 12 requests are there: one forward of 12, whatever the machine load
    batcher = serve.PreferenceBatcher(
        text_model, pad_tokens, num_tasks=2, task_names=TASKS, max_batch_size=12, max_wait_ms=5000
    )
    with serve.BatchingServer(batcher, host="127.0.0.1", port=0) as server:
        assert server.url.startswith("http://127.0.0.1:")
        url = server.url + "/predict"
        answers = concurrently(
            [lambda t=t, p=p: serve.post_json(url, {"inputs": t, "preference": p}, TIMEOUT) for t, p in requests]
        )
        stats = batcher.stats()
    for (status, body), (tokens, preference) in zip(answers, requests):
        assert status == 200, body
        assert body["batch_size"] == 12
        assert_matches(body["outputs"], direct(text_model, tokens, preference))
    assert stats["forwards"] == 1 and stats["batch_sizes"] == {"12": 1}
    assert stats["answered"] == stats["requests"] == 12
    # different preferences really gave different answers (the test would pass for a preference-blind server)
    first = answers[0][1]["outputs"]["a"]
    other = direct(text_model, requests[0][0], requests[-1][1])["a"]
    assert not torch.allclose(torch.tensor(first), other, atol=1e-3)


def test_short_window_still_batches_under_load(text_model, no_thread_left):
    requests = make_requests(24)
    batcher = serve.PreferenceBatcher(
        text_model, pad_tokens, num_tasks=2, task_names=TASKS, max_batch_size=8, max_wait_ms=20
    )
    with serve.BatchingServer(batcher, port=0) as server:
        url = server.url + "/predict"
        answers = concurrently(
            [lambda t=t, p=p: serve.post_json(url, {"inputs": t, "preference": p}, TIMEOUT) for t, p in requests]
        )
        _, stats = _get(server.url + "/stats")
    for (status, body), (tokens, preference) in zip(answers, requests):
        assert status == 200, body
        assert 1 <= body["batch_size"] <= 8
        assert_matches(body["outputs"], direct(text_model, tokens, preference))
    assert stats["answered"] == 24 and stats["max_batch_size_seen"] > 1 and stats["forwards"] < 24
    assert sum(int(size) * n for size, n in stats["batch_sizes"].items()) == 24


def _get(url):
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        connection.request("GET", parts.path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    "payload, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
        ({"preference": [0.5, 0.5]}, 400, "`inputs`"),
        ({"inputs": [1, 2]}, 400, "`preference`"),
        ({"inputs": [1, 2], "preference": [0.5, 0.4]}, 400, "sum to 1"),
        ({"inputs": [1, 2], "preference": [0.5, 0.25, 0.25]}, 400, "2 entries"),
        ({"inputs": [1, 2], "preference": [[0.5, 0.5]]}, 400, "one vector"),
        ({"inputs": [1, 2], "preference": {"a": 0.5, "c": 0.5}}, 400, "unknown task name"),
        ({"inputs": [1, 2], "preference": [-0.5, 1.5]}, 400, "non-negative"),
        ({"inputs": [1, 2], "preference": [10**400, 0]}, 400, "must be finite"),  # beyond float: was a dropped line
        (b'{"inputs": [1, 2], "preference": [' + b"1" * 5000 + b', 0]}', 400, "not valid JSON"),  # > 4300 digits
        ({"inputs": [1, 2], "preference": "0.5,0.5"}, 400, "string"),
        ({"inputs": "hello", "preference": [0.5, 0.5]}, 400, "token ids"),
        ({"inputs": [1, 2], "preference": [0.5, 0.5], "extra": 1}, 400, "unknown field"),
        ({"inputs": [1, 999], "preference": [0.5, 0.5]}, 500, "model failed"),  # token id beyond the vocabulary
    ],
    ids=lambda value: (
        ("deeply-nested" if value.startswith(b"[[") else "huge-int") if isinstance(value, bytes) and len(value) > 50
        else None
    ),
)
def test_bad_requests_are_answered_and_the_server_keeps_serving(text_model, payload, status, words, no_thread_left):
    batcher = serve.PreferenceBatcher(text_model, pad_tokens, num_tasks=2, task_names=TASKS, max_wait_ms=1)
    with serve.BatchingServer(batcher, port=0) as server:
        got, body = serve.post_json(server.url + "/predict", payload, TIMEOUT)
        assert got == status and words in body["error"], body
        got, body = serve.post_json(server.url + "/predict", {"inputs": [3, 4, 5], "preference": [0.3, 0.7]}, TIMEOUT)
        assert got == 200
        assert_matches(body["outputs"], direct(text_model, [3, 4, 5], [0.3, 0.7]))


@pytest.mark.parametrize("length", ["\u00b2", "\u0663", "+12", "1_2", "abc"])
def test_content_length_that_is_not_ascii_digits_is_a_400(text_model, length, no_thread_left):
    import socket
    from urllib.parse import urlsplit

    batcher = serve.PreferenceBatcher(text_model, pad_tokens, num_tasks=2, task_names=TASKS, max_wait_ms=1)
    with serve.BatchingServer(batcher, port=0) as server:
        parts = urlsplit(server.url)
        body = json.dumps({"inputs": [1, 2], "preference": [0.5, 0.5]}).encode()
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as connection:
            connection.sendall(head.encode("latin-1", errors="replace") if length.isascii() or length == "\u00b2"
                               else head.encode("utf-8"))
            connection.sendall(body)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.split()[1] == b"400", answer
        assert b"Content-Length" in rest.partition(b"\r\n\r\n")[2]
        got, reply = serve.post_json(server.url + "/predict", {"inputs": [3, 4, 5], "preference": [0.3, 0.7]}, TIMEOUT)
        assert got == 200
        assert_matches(reply["outputs"], direct(text_model, [3, 4, 5], [0.3, 0.7]))


def test_http_errors_for_paths_and_sizes(text_model, no_thread_left):
    batcher = serve.PreferenceBatcher(text_model, pad_tokens, num_tasks=2, task_names=TASKS)
    with serve.BatchingServer(batcher, port=0, max_body_bytes=100) as server:
        assert _get(server.url + "/health") == (200, {"status": "ok"})
        status, body = _get(server.url + "/nowhere")
        assert status == 404 and "/predict" in body["error"]
        status, body = serve.post_json(server.url + "/other", {"inputs": [1]}, TIMEOUT)
        assert status == 404
        status, body = serve.post_json(server.url + "/predict", {"inputs": list(range(1, 60)), "preference": [1, 0]})
        assert status == 413 and "limit is 100" in body["error"]
        assert serve.post_json(server.url + "/predict", {"inputs": [1], "preference": [1, 0]})[0] == 200


def test_a_bad_request_in_a_batch_does_not_spoil_the_others(text_model, no_thread_left):
    requests = make_requests(6)
    payloads = [{"inputs": t, "preference": p} for t, p in requests]
    payloads[2] = {"inputs": ["x"], "preference": [0.5, 0.5]}  # cannot be collated: 400
    payloads[4] = {"inputs": [1, 999], "preference": [0.5, 0.5]}  # the forward fails on it: 500
    batcher = serve.PreferenceBatcher(
        text_model, pad_tokens, num_tasks=2, task_names=TASKS, max_batch_size=6, max_wait_ms=5000
    )
    with serve.BatchingServer(batcher, port=0) as server:
        url = server.url + "/predict"
        answers = concurrently([lambda p=p: serve.post_json(url, p, TIMEOUT) for p in payloads])
        stats = batcher.stats()
    assert answers[2][0] == 400 and "invalid inputs" in answers[2][1]["error"]
    assert answers[4][0] == 500 and "model failed" in answers[4][1]["error"]
    for index in (0, 1, 3, 5):
        status, body = answers[index]
        assert status == 200, body
        assert_matches(body["outputs"], direct(text_model, *requests[index]))
    assert stats["bad_requests"] == 1 and stats["errors"] == 1 and stats["answered"] == 4


def test_clean_shutdown_and_refusal_after_close(text_model, no_thread_left):
    batcher = serve.PreferenceBatcher(text_model, pad_tokens, num_tasks=2, task_names=TASKS)
    server = serve.BatchingServer(batcher, port=0).start()
    url = server.url + "/predict"
    assert serve.post_json(url, {"inputs": [1, 2], "preference": [1, 0]}, TIMEOUT)[0] == 200
    start = time.monotonic()
    server.close(timeout=5)
    assert time.monotonic() - start < 5
    with pytest.raises(OSError):
        serve.post_json(url, {"inputs": [1, 2], "preference": [1, 0]}, timeout=2)
    with pytest.raises(serve.ServiceUnavailable, match="not running"):
        batcher.submit([1, 2], [1, 0], timeout=1)


def test_a_request_that_waits_too_long_gets_503_and_is_not_computed(no_thread_left):
    release = threading.Event()
    calls = []

    def slow_model(x, preference):
        calls.append(x.tolist())
        release.wait(TIMEOUT)
        return x * preference[:, :1]

    batcher = serve.PreferenceBatcher(slow_model, lambda s: {"x": torch.tensor(s)}, num_tasks=2, max_wait_ms=0)
    with batcher:
        with pytest.raises(serve.ServiceUnavailable, match="no answer within"):
            batcher.submit([1.0], [0.5, 0.5], timeout=0.2)  # the model is stuck on it
        with pytest.raises(serve.ServiceUnavailable, match="no answer within"):
            batcher.submit([3.0], [0.5, 0.5], timeout=0.2)  # queued behind it, then abandoned
        release.set()
        assert batcher.submit([2.0], [0.25, 0.75], timeout=TIMEOUT) == ([0.5], 1)
    assert calls == [[[1.0]], [[2.0]]]
    assert batcher.stats()["refused"] == 2


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="max_batch_size"):
        serve.PreferenceBatcher(lambda **k: None, pad_tokens, num_tasks=2, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        serve.PreferenceBatcher(lambda **k: None, pad_tokens, num_tasks=2, max_wait_ms=-1)
    with pytest.raises(ValueError, match="task_names"):
        serve.PreferenceBatcher(lambda **k: None, pad_tokens, num_tasks=3, task_names=TASKS)
    with pytest.raises(TypeError, match="callables"):
        serve.PreferenceBatcher(None, pad_tokens, num_tasks=2)


# ---- batch statistics: batching must not let requests change each other's answers ----------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, pixel_values):
        return self.fc(torch.relu(self.norm(self.conv(pixel_values))).flatten(1))


def test_per_sample_batch_norm_keeps_batch_statistics_models_exact():
    torch.manual_seed(0)
    net = ConvNet()
    use_batch_statistics(net)
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["conv", "fc"], init_weights=False)
    model = get_peft_model(net, config).eval()
    reference = copy.deepcopy(model)
    images = torch.rand(5, 1, 6, 6)
    preferences = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.5, 0.5], [0.1, 0.9], [0.0, 1.0]])
    with torch.no_grad():
        alone = torch.cat([reference(pixel_values=images[i : i + 1], preference=preferences[i]) for i in range(5)])
        mixed = reference(pixel_values=images, preference=preferences)
        assert not torch.allclose(mixed, alone, atol=1e-3)  # plain batching would be wrong here
        assert serve.per_sample_batch_norm(model) == 1
        torch.testing.assert_close(model(pixel_values=images, preference=preferences), alone, atol=1e-5, rtol=1e-5)


# ---- a saved bundle, as the main job writes it ----------------------------------------------------------------------
def test_load_bundle_serves_a_saved_multitask_resnet(tmp_path, no_thread_left):
    from recipes import small_backbone

    torch.manual_seed(0)
    base = small_backbone("resnet")
    base.save_pretrained(tmp_path / "base_model")
    config = peft_palora.PaLoRAConfig(
        task_names=["left", "right"], r=2, target_modules=["convolution"], init_weights=False
    )
    MultiTaskModel(get_peft_model(base, config), linear_heads(64, {"left": 10, "right": 10})).save_pretrained(
        str(tmp_path)
    )

    model, collate_fn, task_names, num_tasks = serve.load_bundle(str(tmp_path))
    assert task_names == ["left", "right"] and num_tasks == 2
    from transformers import AutoModel

    reference = MultiTaskModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "base_model"), str(tmp_path))
    reference.eval()
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    preferences = [[1.0, 0.0], [0.7, 0.3], [0.2, 0.8], {"left": 0.0, "right": 1.0}]
    batcher = serve.PreferenceBatcher(model, collate_fn, num_tasks, task_names, max_batch_size=4, max_wait_ms=5000)
    with serve.BatchingServer(batcher, port=0) as server:
        url = server.url + "/predict"
        answers = concurrently(
            [
                lambda i=i, p=p: serve.post_json(
                    url, {"inputs": {"pixel_values": images[i].tolist()}, "preference": p}
                )
                for i, p in enumerate(preferences)
            ]
        )
        status, body = serve.post_json(url, {"inputs": {"pixels": [[0.0]]}, "preference": [0.5, 0.5]}, TIMEOUT)
        assert status == 400 and "pixel_values" in body["error"]
    for i, (status, body) in enumerate(answers):
        assert status == 200 and body["batch_size"] == 4, body
        with torch.no_grad():
            expected = reference(pixel_values=images[i : i + 1], preference=preferences[i])
        assert_matches(body["outputs"], {task: logits[0] for task, logits in expected.items()})


@pytest.mark.slow
def test_the_script_serves_from_the_command_line(tmp_path):
    from recipes import small_backbone

    torch.manual_seed(0)
    base = small_backbone("resnet")
    base.save_pretrained(tmp_path / "base_model")
    config = peft_palora.PaLoRAConfig(task_names=["left", "right"], r=2, target_modules=["convolution"])
    MultiTaskModel(get_peft_model(base, config), linear_heads(64, {"left": 10, "right": 10})).save_pretrained(
        str(tmp_path)
    )
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO]))
    )
    command = [sys.executable, os.path.join(REPO, "examples", "serve.py"), "--bundle", str(tmp_path), "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            if " on http://" in line:
                url = line.split(" on ")[1].split()[0].rstrip(";")
        assert url is not None and url.startswith("http://127.0.0.1:"), "the server did not start"
        status, body = serve.post_json(
            url, {"inputs": {"pixel_values": [[[0.5] * 28] * 28]}, "preference": [0.5, 0.5]}
        )
        assert status == 200 and set(body["outputs"]) == {"left", "right"} and len(body["outputs"]["left"]) == 10
    finally:
        process.terminate()
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=TIMEOUT)
        process.stderr.close()


@pytest.mark.slow
def test_benchmark_script_runs_quickly():
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO]))
    )
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_serve.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = [line for line in result.stdout.splitlines() if line.startswith("RATIO")]
    assert ratios and all(float(line.split("=")[1].split()[0]) > 0 for line in ratios), result.stdout
