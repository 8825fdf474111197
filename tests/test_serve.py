"""examples/serve.py (LitServe): concurrent requests with their own preferences share forwards and get their own answers.

The servers run as subprocesses of ``python examples/serve.py`` on a free loopback port (LitServe's inference workers
are spawned processes) and are always stopped, with their whole process group, when the module's tests end. The
LitAPI's steps are also tested in-process, without HTTP.
"""

from __future__ import annotations

import copy
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

import peft_palora
from peft_palora.training.multitask import MultiTaskModel, linear_heads, use_batch_statistics

pytest.importorskip("litserve")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["a", "b"]
TIMEOUT = 30.0  # every wait on a request is bounded
WORDS = "the a small model serves many users with their own trade off between two tasks every request".split()


def _load_example():
    spec = importlib.util.spec_from_file_location("palora_serve_example", os.path.join(REPO, "examples", "serve.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


serve = _load_example()


# ---- bundles, as the training scripts save them --------------------------------------------------------------------
def save_text_bundle(path):
    """A tiny BERT with a word-level tokenizer and PaLoRA on query/value, two heads, saved as a bundle."""
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    os.makedirs(path / "base_model")
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path / "base_model")
    base = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    base.save_pretrained(path / "base_model")
    config = peft_palora.PaLoRAConfig(task_names=TASKS, r=2, target_modules=["query", "value"], init_weights=False)
    MultiTaskModel(get_peft_model(base, config), linear_heads(16, {"a": 3, "b": 2}), pooling="mean").save_pretrained(
        str(path)
    )


def save_resnet_bundle(path):
    """The main job's kind of model: a small ResNet whose batch norms use batch statistics, two heads."""
    from recipes import small_backbone

    torch.manual_seed(0)
    base = small_backbone("resnet")
    base.save_pretrained(path / "base_model")
    config = peft_palora.PaLoRAConfig(task_names=TASKS, r=2, target_modules=["convolution"], init_weights=False)
    MultiTaskModel(get_peft_model(base, config), linear_heads(64, {"a": 10, "b": 10})).save_pretrained(str(path))


def load_reference(path):
    model = MultiTaskModel.from_pretrained(AutoModel.from_pretrained(path / "base_model"), str(path))
    return model.eval()


# ---- a server subprocess, always stopped ---------------------------------------------------------------------------
def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, bundle, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "examples")]))
        command = [sys.executable, os.path.join(REPO, "examples", "serve.py"), "--bundle", str(bundle)]
        command += ["--port", str(self.port), "--threads", "1", *flags]
        # its own process group: stopping it stops LitServe's worker processes too
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO, start_new_session=True
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if request("GET", self.url + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"the server did not start: {self.process.stderr.read()[-3000:]}")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        self.process.wait(timeout=TIMEOUT)
        self.process.stderr.close()


def request(method, url, payload=None, timeout=TIMEOUT, headers=None):
    """``(status, decoded JSON)`` of one HTTP request; ``payload`` is JSON-encoded unless it is bytes."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        body = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
        connection.request(method, "/" + url.split("/", 3)[3], body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")
    finally:
        connection.close()


def post(url, payload, timeout=TIMEOUT):
    return request("POST", url + "/predict", payload, timeout, {"Content-Type": "application/json"})


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
        thread.join(3 * TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"
    return results


def assert_matches(outputs, expected):
    assert set(outputs) == set(expected)
    for task, row in expected.items():
        torch.testing.assert_close(torch.tensor(outputs[task]), row, atol=1e-5, rtol=1e-5)


def make_requests(count):
    generator = torch.Generator().manual_seed(1)
    requests = []
    for i in range(count):
        length = 3 + i % 5
        text = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=generator))
        w = round(i / max(count - 1, 1), 4)
        preference = [w, 1 - w] if i % 2 else {"a": w, "b": 1 - w}  # both forms
        requests.append((text, preference))
    return requests


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("text_bundle")
    save_text_bundle(path)
    model = load_reference(path)
    tokenizer = AutoTokenizer.from_pretrained(path / "base_model")

    def direct(text, preference):
        """The answer of ONE call of the model on this sample alone: what the server must reproduce."""
        with torch.no_grad():
            out = model(**tokenizer([text], return_tensors="pt"), preference=preference)
        return {task: logits[0] for task, logits in out.items()}

    return path, direct


@pytest.fixture(scope="module")
def text_server(text_bundle):
    # a long window and a batch of 8: concurrent clients share forwards whatever the machine load
    server = Server(text_bundle[0], "--max_batch_size", "8", "--batch_timeout", "0.5", "--max_body_bytes", "5000")
    yield server
    server.stop()


# ---- the LitAPI's steps, in-process ---------------------------------------------------------------------------------
def test_the_api_steps_answer_each_sample_as_a_single_call(text_bundle):
    path, direct = text_bundle
    api = serve.PaLoRAAPI(str(path), max_batch_size=8, batch_timeout=0.01)
    api.setup("cpu")
    requests = make_requests(6)
    samples = [api.decode_request({"inputs": t, "preference": p}) for t, p in requests]
    answers = [api.encode_response(a) for a in api.unbatch(api.predict(api.batch(samples)))]
    for answer, (text, preference) in zip(answers, requests):
        assert answer["batch_size"] == 6
        assert_matches(answer["outputs"], direct(text, preference))
    # different preferences really gave different answers (the test would pass for a preference-blind server)
    other = direct(requests[0][0], requests[-1][1])["a"]
    assert not torch.allclose(torch.tensor(answers[0]["outputs"]["a"]), other, atol=1e-3)
    with pytest.raises(serve.HTTPException, match="sum to 1") as error:
        api.decode_request({"inputs": "the model", "preference": [0.5, 0.4]})
    assert error.value.status_code == 400


@pytest.mark.parametrize(
    "preference, words",
    [([1e400, 0], "finite"), ([10**400, 0], "too large"), ([float("nan"), 1.0], "finite")],
)
def test_overflowing_preferences_are_bad_requests(text_bundle, preference, words):
    api = serve.PaLoRAAPI(str(text_bundle[0]))
    api.setup("cpu")
    with pytest.raises(serve.HTTPException, match=words) as error:
        api.decode_request({"inputs": "the model", "preference": preference})
    assert error.value.status_code == 400


def test_per_sample_batch_norm_keeps_batch_statistics_models_exact():
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, pixel_values):
            return self.fc(torch.relu(self.norm(self.conv(pixel_values))).flatten(1))

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


# ---- over HTTP ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_requests_share_forwards_and_get_their_own_answers(text_bundle, text_server):
    _, direct = text_bundle
    assert request("GET", text_server.url + "/health") == (200, "ok")
    requests = make_requests(24)
    answers = concurrently(
        [lambda t=t, p=p: post(text_server.url, {"inputs": t, "preference": p}) for t, p in requests]
    )
    for (status, body), (text, preference) in zip(answers, requests):
        assert status == 200, body
        assert 1 <= body["batch_size"] <= 8
        assert_matches(body["outputs"], direct(text, preference))
    assert max(body["batch_size"] for _, body in answers) > 1  # batches did form


@pytest.mark.slow
@pytest.mark.parametrize(
    "payload, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"[" * 100000 + b"]" * 100000, 413, "limit is 5000"),  # over --max_body_bytes
        (b"[" * 2400 + b"]" * 2400, 400, "nested too deeply"),
        (b'{"inputs": "the model", "preference": [1e400, 0]}', 400, "finite"),
        ({"inputs": "the model", "preference": [10**400, 0]}, 400, "too large"),
        ({"preference": [0.5, 0.5]}, 400, "`inputs`"),
        ({"inputs": "the model"}, 400, "`preference`"),
        ({"inputs": "the model", "preference": [0.5, 0.4]}, 400, "sum to 1"),
        ({"inputs": "the model", "preference": [0.5, 0.25, 0.25]}, 400, "2 entries"),
        ({"inputs": "the model", "preference": [[0.5, 0.5]]}, 400, "one vector"),
        ({"inputs": "the model", "preference": {"a": 0.5, "c": 0.5}}, 400, "unknown task name"),
        ({"inputs": "the model", "preference": [-0.5, 1.5]}, 400, "non-negative"),
        ({"inputs": "the model", "preference": "0.5,0.5"}, 400, "string"),
        ({"inputs": [1, 2], "preference": [0.5, 0.5]}, 400, "non-empty string"),
        ({"inputs": "the model", "preference": [0.5, 0.5], "extra": 1}, 400, "unknown ['extra']"),
    ],
    ids=lambda value: f"body-{len(value)}" if isinstance(value, bytes) and len(value) > 60 else None,
)
def test_bad_requests_are_answered_and_the_server_keeps_serving(text_bundle, text_server, payload, status, words):
    got, body = post(text_server.url, payload)
    assert got == status and words in body["detail"], body
    got, body = post(text_server.url, {"inputs": "many users", "preference": [0.3, 0.7]})
    assert got == 200, body
    assert_matches(body["outputs"], text_bundle[1]("many users", [0.3, 0.7]))


@pytest.mark.slow
def test_http_errors_for_paths_and_headers(text_server):
    status, _ = request("GET", text_server.url + "/nowhere")
    assert status == 404
    assert request("POST", text_server.url + "/other", b"{}")[0] in (404, 405)
    with socket.create_connection(("127.0.0.1", text_server.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 4"), answer  # a malformed Content-Length is a client error, not a 500
    assert post(text_server.url, {"inputs": "the model", "preference": [1, 0]})[0] == 200


@pytest.mark.slow
def test_a_bad_request_in_a_batch_does_not_spoil_the_others(text_bundle, text_server):
    requests = make_requests(8)
    payloads = [{"inputs": t, "preference": p} for t, p in requests]
    payloads[2] = {"inputs": "the model", "preference": [0.5, 0.6]}
    payloads[5] = {"inputs": "", "preference": [0.5, 0.5]}
    answers = concurrently([lambda p=p: post(text_server.url, p) for p in payloads])
    assert answers[2][0] == 400 and "sum to 1" in answers[2][1]["detail"]
    assert answers[5][0] == 400 and "non-empty string" in answers[5][1]["detail"]
    for index in (0, 1, 3, 4, 6, 7):
        status, body = answers[index]
        assert status == 200, body
        assert_matches(body["outputs"], text_bundle[1](*requests[index]))
    assert max(answers[i][1]["batch_size"] for i in (0, 1, 3, 4, 6, 7)) > 1


@pytest.mark.slow
def test_a_saved_multitask_resnet_is_served_exactly_and_failures_stay_isolated(tmp_path):
    save_resnet_bundle(tmp_path)
    reference = load_reference(tmp_path)
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    preferences = [[1.0, 0.0], [0.7, 0.3], [0.2, 0.8], {"a": 0.0, "b": 1.0}]
    payloads = [{"inputs": {"pixel_values": images[i].tolist()}, "preference": p} for i, p in enumerate(preferences)]
    payloads.append(
        {"inputs": {"pixel_values": torch.rand(3, 28, 28).tolist()}, "preference": [0.5, 0.5]}
    )  # 3 channels
    server = Server(tmp_path, "--max_batch_size", "5", "--batch_timeout", "0.5")
    try:
        answers = concurrently([lambda p=p: post(server.url, p) for p in payloads])
        status, body = post(server.url, {"inputs": {"pixels": [[0.0]]}, "preference": [0.5, 0.5]})
        assert status == 400 and "pixel_values" in body["detail"]
        status, body = post(server.url, {"inputs": {"pixel_values": [[[0.5] * 28] * 28]}, "preference": [0.5, 0.5]})
        assert status == 200 and set(body["outputs"]) == {"a", "b"} and len(body["outputs"]["a"]) == 10
    finally:
        server.stop()
    assert answers[4][0] == 500 and "model failed" in answers[4][1]["detail"], answers[4]
    for i, (status, body) in enumerate(answers[:4]):
        assert status == 200, body
        with torch.no_grad():
            expected = reference(pixel_values=images[i : i + 1], preference=preferences[i])
        assert_matches(body["outputs"], {task: logits[0] for task, logits in expected.items()})


@pytest.mark.slow
def test_benchmark_script_runs_quickly():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "examples")]))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_serve.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
        start_new_session=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = [line for line in result.stdout.splitlines() if line.startswith("RATIO")]
    assert ratios and all(float(line.split("=")[1].split()[0]) > 0 for line in ratios), result.stdout
    # the T-LoRA server (cat-mixed task LoRAs, PEFT's mixed-adapter batches) answers as PaLoRA at the same preference
    (check,) = [line for line in result.stdout.splitlines() if line.startswith("T LoRAs (cat mix) vs PaLoRA")]
    assert float(check.rsplit("=", 1)[1]) <= 1e-5, result.stdout
