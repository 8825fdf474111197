"""Publishing PaLoRA bundles on the Hub: model card contents and a push/pull round trip through a loopback Hub.

The round trips run the real `huggingface_hub` client in a subprocess (this file, run as a script), because the
client reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` when it is imported -- see `hub_server.py`. The server runs here, so
the assertions can compare what the client saw with what the server stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml
from hub_server import DEFAULT_USER, running_hub

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sentiment", "topic"]
BASE_REPO = f"{DEFAULT_USER}/tiny-bert"
PALORA_REPO = f"{DEFAULT_USER}/tiny-bert-palora"
LORA_REPO = f"{DEFAULT_USER}/tiny-bert-lora"
PREFERENCES = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]]
# Three points of a two-objective front (both maximised). Their hypervolume against the origin, by hand, is the
# union of three rectangles swept from the lowest-x point: 0.6*0.8 + (0.8-0.6)*0.7 + (0.9-0.8)*0.5 = 0.67.
FRONT_ROWS = [
    {"preference": [0.8, 0.2], "sentiment accuracy": 0.9, "topic accuracy": 0.5},
    {"preference": [0.5, 0.5], "sentiment accuracy": 0.8, "topic accuracy": 0.7},
    {"preference": [0.2, 0.8], "sentiment accuracy": 0.6, "topic accuracy": 0.8},
]
FRONT_HYPERVOLUME = 0.6 * 0.8 + 0.2 * 0.7 + 0.1 * 0.5
BERT_KWARGS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
UNMODELLED_PATH = "/api/organizations/kernels-community/overview"


def tiny_png(width: int = 4, height: int = 3) -> bytes:
    """A valid RGB PNG built with the standard library, standing in for a matplotlib front plot."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(
        b"\x00" + b"".join(bytes([(40 * x) % 256, (70 * y) % 256, 128]) for x in range(width)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def run_client(hub, mode: str, work_dir: Path, timeout: int) -> dict:
    """Run this file as a Hub client in a fresh interpreter pointed at `hub`; return the JSON it reports."""
    env = hub.client_env(hf_home=work_dir / "hf_home")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TRANSFORMERS_VERBOSITY"] = "error"
    result_path = work_dir / f"{mode}.json"
    completed = subprocess.run(
        [sys.executable, __file__, mode, str(work_dir), str(result_path)],
        env=env, cwd=work_dir, capture_output=True, text=True, timeout=timeout,
    )
    output = f"{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"
    assert completed.returncode == 0, f"client {mode!r} failed:\n{output}"
    # Third-party imports may ask the endpoint things the server does not model (kernels asks for the
    # `kernels-community` organisation): those get a 404. Every request about the test user's repositories must be
    # one the server models, or the round trip would not be testing what the Hub does.
    ours = [request for request in hub.unhandled if f"/{DEFAULT_USER}/" in request[1]]
    assert ours == [], f"the client used Hub endpoints the loopback server lacks: {ours}"
    return json.loads(result_path.read_text())


def commit_requests(hub, repo_id: str) -> list[tuple[str, str]]:
    return [request for request in hub.requests if request == ("POST", f"/api/models/{repo_id}/commit/main")]


def parse_card(text: str) -> tuple[dict, str]:
    """(metadata, body) of a README, parsed independently of huggingface_hub."""
    assert text.startswith("---\n"), text[:200]
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]), text[end + 5 :]


# ------------------------------------------------------------------------------------------------- the server
@pytest.mark.parametrize("lfs", [False, True], ids=["inline", "lfs"])
def test_loopback_hub_serves_the_real_client(tmp_path, lfs):
    payload = bytes(range(256)) * 40  # 10 KiB, binary
    with running_hub(tmp_path / "store", lfs=lfs) as hub:
        report = run_client(hub, "plain", tmp_path, timeout=120)
        first, second = report["commits"]
        files = hub.list_files(f"{DEFAULT_USER}/plain")
        assert sorted(files) == [".gitattributes", "notes.txt", "weights/model.safetensors"]
        assert files["weights/model.safetensors"].lfs is lfs
        assert files["notes.txt"].lfs is False
        assert hub.read_file(f"{DEFAULT_USER}/plain", "weights/model.safetensors") == payload
        assert hub.read_file(f"{DEFAULT_USER}/plain", "notes.txt", revision=first) == b"first"
        assert [commit.oid for commit in hub.commit_log(f"{DEFAULT_USER}/plain")[:2]] == [second, first]
        lfs_calls = [path for method, path in hub.requests if path.endswith("/info/lfs/objects/batch")]
        assert bool(lfs_calls) is lfs
        # huggingface_hub 2.4 fetches its agent registry from the endpoint when it builds its first request headers;
        # it reaching this server shows that HF_ENDPOINT, set before the import, took effect.
        assert ("GET", "/api/agent-harnesses") in hub.requests

    assert report["whoami"] == DEFAULT_USER
    assert report["repo_id"] == f"{DEFAULT_USER}/plain"  # created without a namespace: the token's user
    assert report["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert report["old_notes"] == "first" and report["new_notes"] == "second"
    assert report["info_sha"] == second
    assert report["files"] == [".gitattributes", "notes.txt", "weights/model.safetensors"]
    assert report["exists"] == {"notes.txt": True, "missing.txt": False}
    assert report["errors"] == {
        "missing file": "RemoteEntryNotFoundError",
        "missing repo": "RepositoryNotFoundError",
        "missing revision": "RevisionNotFoundError",
        "bad token": "HfHubHTTPError",
    }


# ------------------------------------------------------------------------------------------------- the round trip
@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Push a tiny PaLoRA model to a loopback Hub (LFS on, as the Hub stores safetensors) and pull it back."""
    work_dir = tmp_path_factory.mktemp("hub_round_trip")
    (work_dir / "front_plot.png").write_bytes(tiny_png())
    with running_hub(work_dir / "store", lfs=True) as hub:
        report = run_client(hub, "palora", work_dir, timeout=400)
        server = {
            "log": hub.commit_log(PALORA_REPO),
            "readme": hub.read_file(PALORA_REPO, "README.md", revision=report["palora_commit"]).decode(),
            "files": hub.list_files(PALORA_REPO, revision=report["palora_commit"]),
            "adapter_config": json.loads(
                hub.read_file(PALORA_REPO, "adapter_config.json", revision=report["palora_commit"])
            ),
            "plot": hub.read_file(PALORA_REPO, "front.png", revision=report["palora_commit"]),
            "final_readme": hub.read_file(PALORA_REPO, "README.md").decode(),
            "final_files": hub.list_files(PALORA_REPO),
            "lora_readme": hub.read_file(LORA_REPO, "README.md").decode(),
            "palora_commit_requests": commit_requests(hub, PALORA_REPO),
        }
    return report, server


def test_importing_peft_palora_routes_push_to_hub(tiny_palora_model, monkeypatch):
    """`import peft_palora` must make `push_to_hub` of a PaLoRA `PeftModel` publish with our card.

    (That other PEFT models keep transformers' method is `test_other_peft_models_keep_transformers_push`.)
    """
    from peft_palora.tuner import peft_model

    calls = []
    monkeypatch.setattr(
        peft_model, "push_palora_to_hub", lambda model, repo_id, **kwargs: calls.append((model, repo_id, kwargs))
    )
    tiny_palora_model.push_to_hub("user/repo", commit_message="m", max_shard_size="1GB")
    assert calls == [(tiny_palora_model, "user/repo", {"commit_message": "m"})]


@pytest.mark.slow
def test_pulled_models_match_the_pushed_model_at_every_preference(round_trip):
    import torch

    report, _ = round_trip
    reference = torch.tensor(report["outputs"]["pushed"])
    # The comparison means something only if the preference changes the output.
    assert (reference[0] - reference[1]).abs().max() > 1e-3
    for loader in ("peft_model_from_pretrained", "auto_peft_model_from_pretrained"):
        pulled = torch.tensor(report["outputs"][loader])
        assert pulled.shape == reference.shape
        torch.testing.assert_close(pulled, reference, rtol=0, atol=1e-6, msg=f"{loader} differs")
    torch.testing.assert_close(
        torch.tensor(report["outputs"]["per_sample_pulled"]), torch.tensor(report["outputs"]["per_sample_pushed"]),
        rtol=0, atol=1e-6,
    )
    assert report["base_name_or_path"] == BASE_REPO
    assert report["auto_base_name_or_path"] == BASE_REPO


def test_push_publishes_the_bundle_in_one_commit(round_trip):
    report, server = round_trip
    commit = next(c for c in server["log"] if c.oid == report["palora_commit"])
    parent_files = {} if commit.parent is None else next(c for c in server["log"] if c.oid == commit.parent).files
    changed = sorted(path for path, entry in commit.files.items() if parent_files.get(path) != entry)
    assert changed == ["README.md", "adapter_config.json", "adapter_model.safetensors", "front.png"]
    assert commit.title == "Publish the PaLoRA front"
    assert len(server["palora_commit_requests"]) == 3  # first push, the README edit, second push: one commit each
    assert server["files"]["adapter_model.safetensors"].lfs  # went through the LFS batch API, like on the Hub
    assert server["adapter_config"]["peft_type"] == "PALORA"
    assert server["adapter_config"]["task_names"] == TASKS
    assert server["adapter_config"]["base_model_name_or_path"] == BASE_REPO
    assert hashlib.sha256(server["plot"]).hexdigest() == hashlib.sha256(tiny_png()).hexdigest()
    assert report["plot_sha256"] == hashlib.sha256(tiny_png()).hexdigest()


def test_published_readme_is_the_palora_card(round_trip):
    report, server = round_trip
    assert report["readme"] == server["readme"]  # what the client downloads is what the server stored
    metadata, body = parse_card(server["readme"])
    assert metadata["library_name"] == "peft"
    assert {"peft", "palora", f"base_model:adapter:{BASE_REPO}"} <= set(metadata["tags"])
    assert metadata["base_model"] == BASE_REPO
    assert "library_name: transformers" not in server["readme"]
    assert report["model_info"] == {"library_name": "peft", "has_palora_tag": True}

    assert "| 0 | sentiment |" in body and "| 1 | topic |" in body
    assert "non-negative weights that sum to 1" in body
    assert "import peft_palora" in body
    assert f'PeftModel.from_pretrained(base, "{PALORA_REPO}")' in body
    assert f'BertModel.from_pretrained("{BASE_REPO}")' in body
    assert 'model.set_preference({"sentiment": 0.7, "topic": 0.3})' in body
    assert "- Rank per task adapter: r = 2" in body
    assert "- Target modules: `query`, `value`" in body
    assert "- `train_base_weights` = False" in body

    table = [line for line in body.splitlines() if line.startswith("| (")]
    assert table == [
        "| (0.8, 0.2) | 0.9 | 0.5 |",
        "| (0.5, 0.5) | 0.8 | 0.7 |",
        "| (0.2, 0.8) | 0.6 | 0.8 |",
    ]
    assert "| preference | sentiment accuracy | topic accuracy |" in body
    assert "Hypervolume: **0.67** (reference point (0, 0))" in body
    assert "![Pareto front of this adapter](front.png)" in body
    assert "front.png" in report["files"]


def test_a_later_push_keeps_user_metadata_and_removes_the_stale_front(round_trip):
    report, server = round_trip
    newest = [commit.oid for commit in server["log"][:3]]
    assert newest == [report["second_push_commit"], report["readme_edit_commit"], report["palora_commit"]]
    metadata, body = parse_card(server["final_readme"])
    assert metadata["license"] == "mit"  # added on the Hub by hand between the pushes
    assert "user-tag" in metadata["tags"] and "palora" in metadata["tags"]
    assert "## Pareto front" not in body
    assert "front.png" not in server["final_files"]  # the old plot no longer describes the weights
    assert "adapter_model.safetensors" in server["final_files"]


def test_other_peft_models_keep_transformers_push(round_trip):
    _, server = round_trip
    metadata, _ = parse_card(server["lora_readme"])
    assert "palora" not in (metadata.get("tags") or [])


@pytest.mark.slow
def test_an_unmodelled_request_during_a_push_does_not_break_it(tmp_path):
    """A request the loopback server does not model (as `kernels` makes for `kernels-community` when bitsandbytes
    loads) gets a clean 404 the client handles, and the push still lands as one commit."""
    with running_hub(tmp_path / "store", lfs=True) as hub:
        report = run_client(hub, "unmodelled", tmp_path, timeout=300)
        assert ("GET", UNMODELLED_PATH) in hub.unhandled
        assert commit_requests(hub, PALORA_REPO) == [("POST", f"/api/models/{PALORA_REPO}/commit/main")]
        assert hub.commit_log(PALORA_REPO)[0].oid == report["commit"]  # after the repository's initial commit
        assert sorted(hub.list_files(PALORA_REPO)) == [
            ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"
        ]
        metadata, _ = parse_card(hub.read_file(PALORA_REPO, "README.md").decode())
    assert report["unmodelled_status"] == 404
    assert metadata["library_name"] == "peft" and "palora" in metadata["tags"]


# ------------------------------------------------------------------------------------------------- the card, offline
@pytest.fixture(scope="module")
def tiny_palora_model():
    import torch
    from peft import get_peft_model
    from transformers import BertConfig, BertModel

    from peft_palora import PaLoRAConfig

    torch.manual_seed(0)
    base = BertModel(BertConfig(**BERT_KWARGS))
    config = PaLoRAConfig(num_tasks=2, task_names=TASKS, r=2, target_modules=["query", "value"], init_weights=False)
    return get_peft_model(base, config)


def test_card_from_a_config_alone_names_placeholders():
    from peft_palora import PaLoRAConfig
    from peft_palora.interop.hub import build_model_card

    config = PaLoRAConfig(num_tasks=3, r=4, target_modules=["q"], task_type="SEQ_CLS")
    card = build_model_card(config)
    metadata, body = parse_card(str(card))
    assert metadata["library_name"] == "peft"
    assert metadata["pipeline_tag"] == "text-classification"
    assert "base_model" not in metadata
    assert [line for line in body.splitlines() if line.startswith("| ") and line[2].isdigit()] == [
        "| 0 | task_0 |", "| 1 | task_1 |", "| 2 | task_2 |",
    ]
    assert "AutoModelForSequenceClassification.from_pretrained" in body
    assert "AutoPeftModelForSequenceClassification" in body
    assert 'model.set_preference({"task_0": 0.7, "task_1": 0.3, "task_2": 0.0})' in body
    assert "## Pareto front" not in body


def test_card_table_accepts_dataframes_and_column_mappings(tiny_palora_model):
    import pandas as pd

    from peft_palora.interop.hub import build_model_card, front_table_markdown

    columns = {"lambda_0": [1.0, 0.25], "loss a": [0.123456, 2], "note": ["a|b", None]}
    expected = "| lambda_0 | loss a | note |\n| --- | --- | --- |\n| 1 | 0.1235 | a\\|b |\n| 0.25 | 2 |  |"
    assert front_table_markdown(columns) == expected
    assert front_table_markdown(pd.DataFrame(columns)) == expected
    card = build_model_card(tiny_palora_model, front_table=pd.DataFrame(columns))
    assert expected in str(card)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hypervolume": float("nan")}, TypeError, "hypervolume"),
        ({"hypervolume": -0.5}, ValueError, "hypervolume"),
        ({"hypervolume": True}, TypeError, "hypervolume"),
        ({"hypervolume_reference": [0.0, 0.0]}, ValueError, "hypervolume_reference"),
        ({"front_table": {"a": [1, 2], "b": [1]}}, ValueError, "equal lengths"),
        ({"front_table": []}, ValueError, "front_table"),
        ({"front_table": [[1, 2]]}, TypeError, "front_table"),
        ({"front_table": "a,b"}, TypeError, "front_table"),
        ({"plot_path": "front.pdf"}, ValueError, "plot_path"),
        ({"tags": "palora"}, TypeError, "tags"),
        ({"repo_id": ""}, ValueError, "repo_id"),
        ({"adapter_name": "other"}, ValueError, "adapter_name"),
    ],
)
def test_card_rejects_bad_input_naming_the_argument(tiny_palora_model, kwargs, error, message):
    from peft_palora.interop.hub import build_model_card

    with pytest.raises(error, match=message):
        build_model_card(tiny_palora_model, **kwargs)


def test_card_rejects_models_that_are_not_palora():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    from peft_palora.interop.hub import build_model_card, push_palora_to_hub

    lora = get_peft_model(BertModel(BertConfig(**BERT_KWARGS)), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(TypeError, match="PaLoRA"):
        build_model_card(lora)
    with pytest.raises(TypeError, match="`model`"):
        push_palora_to_hub(lora, "user/repo", is_main_process=True)


def test_push_validates_before_contacting_the_hub_and_skips_other_processes(tiny_palora_model, tmp_path):
    """Runs with HF_HUB_OFFLINE=1: any Hub request would raise OfflineModeIsEnabled instead of what is expected."""
    from peft_palora.interop.hub import push_palora_to_hub

    with pytest.raises(ValueError, match="plot_path"):
        push_palora_to_hub(tiny_palora_model, "user/repo", plot_path=tmp_path / "missing.png", is_main_process=True)
    with pytest.raises(ValueError, match="repo_id"):
        push_palora_to_hub(tiny_palora_model, "  ", is_main_process=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        push_palora_to_hub(tiny_palora_model, "user/repo", front_tabel=FRONT_ROWS, is_main_process=True)
    assert push_palora_to_hub(tiny_palora_model, "user/repo", front_table=FRONT_ROWS, is_main_process=False) is None


def test_the_main_jobs_card_names_no_local_path_shows_the_front_and_the_heads(tmp_path):
    """What `examples/train_mtl.py` saves: a from-scratch base recorded by its absolute path, task heads, a front."""
    import pandas as pd
    import torch
    from peft import get_peft_model
    from transformers import BertConfig, BertModel

    from peft_palora import PaLoRAConfig
    from peft_palora.fronts.evaluation import write_front_report
    from peft_palora.interop.hub import write_model_card
    from peft_palora.training.multitask import MultiTaskModel, linear_heads

    torch.manual_seed(0)
    base = BertModel(BertConfig(**BERT_KWARGS))  # built from a config: `name_or_path` is ""
    base.batch_norm = torch.nn.BatchNorm1d(4, track_running_stats=False)  # normalises with batch statistics
    base_dir = str(tmp_path / "machine" / "run" / "base_model")
    config = PaLoRAConfig(task_names=TASKS, r=2, target_modules=["query"])
    backbone = get_peft_model(base, config)
    backbone.peft_config["default"].base_model_name_or_path = base_dir
    model = MultiTaskModel(backbone, linear_heads(32, {"sentiment": 2, "topic": 3}))
    out = tmp_path / "out"
    model.save_pretrained(out)
    model.save_pretrained(out)  # a second save updates the existing card as PEFT does (PEFT writes `base_model: ''`)

    def card():
        text = (out / "README.md").read_text(encoding="utf-8")
        assert str(tmp_path) not in text and "\\x3c" not in text
        return parse_card(text)

    metadata, body = card()
    assert "base_model" not in metadata and not any(tag.startswith("base_model:") for tag in metadata["tags"])
    assert body.startswith("\n# PaLoRA adapter for base_model\n")  # the folder's name only
    assert 'BertModel.from_pretrained("base_model")' in body
    assert "`MultiTaskModel.from_pretrained(base, path)` loads heads and adapters together" in body
    assert "MISSING or newly initialised" in body and "palora front --help" in body

    # The front as `write_front_report` writes it: the card shows preferences and accuracies (not the losses) and the
    # hypervolume; by hand, 0.6*0.8 + (0.8-0.6)*0.7 + (0.9-0.8)*0.5 against the origin.
    front = pd.DataFrame([
        {"pref_sentiment": row["preference"][0], "pref_topic": row["preference"][1],
         "sentiment_accuracy": row["sentiment accuracy"], "topic_accuracy": row["topic accuracy"],
         "sentiment_loss": 1.0, "topic_loss": 2.0}
        for row in FRONT_ROWS
    ])
    write_front_report(front, str(out), TASKS, metric="accuracy")
    write_model_card(model, out)
    metadata, body = card()
    assert "| pref_sentiment | pref_topic | sentiment_accuracy | topic_accuracy |" in body
    assert "| 0.8 | 0.2 | 0.9 | 0.5 |" in body and "_loss" not in body
    assert f"Hypervolume: **{FRONT_HYPERVOLUME:.6g}** (reference point (0, 0))" in body
    assert "![Pareto front of this adapter](front.png)" in body
    assert "base_model" not in metadata


def test_a_hub_base_model_is_named_and_a_local_one_is_not(tiny_palora_model, tmp_path):
    from peft_palora.interop.hub import build_model_card

    for local in (str(tmp_path / "bases" / "my-bert"), "./my-bert", "C:\\models\\my-bert"):
        metadata, body = parse_card(str(build_model_card(tiny_palora_model, base_model=local)))
        assert "base_model" not in metadata and "bases" not in body and "models" not in body
        assert "# PaLoRA adapter for my-bert\n" in body and 'BertModel.from_pretrained("my-bert")' in body
    metadata, body = parse_card(str(build_model_card(tiny_palora_model, base_model="org/bert-base")))
    assert metadata["base_model"] == "org/bert-base" and "base_model:adapter:org/bert-base" in metadata["tags"]
    metadata, body = parse_card(str(build_model_card(tiny_palora_model)))  # nothing known: nothing claimed
    assert "base_model" not in metadata and "# PaLoRA adapter\n" in body


# ------------------------------------------------------------------------------------------------- client side
def _client_plain(work_dir: Path, result_path: Path) -> None:
    """Exercise the server with the plain client: repo creation, inline/LFS commits, downloads, errors."""
    import httpx2  # noqa: F401 - the transport huggingface_hub 2.4 uses; fail loudly if it changes
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    report: dict = {"whoami": api.whoami()["name"]}
    repo_id = api.create_repo("plain").repo_id
    report["repo_id"] = repo_id
    api.create_repo(repo_id, exist_ok=True)  # 409 -> accepted
    payload = bytes(range(256)) * 40
    first = api.upload_file(path_or_fileobj=b"first", path_in_repo="notes.txt", repo_id=repo_id).oid
    staging = work_dir / "plain_folder"
    (staging / "weights").mkdir(parents=True)
    (staging / "weights" / "model.safetensors").write_bytes(payload)
    (staging / "notes.txt").write_bytes(b"second")
    second = api.create_commit(
        repo_id,
        operations=[
            _add(staging / "weights" / "model.safetensors", "weights/model.safetensors"),
            _add(staging / "notes.txt", "notes.txt"),
        ],
        commit_message="weights",
    ).oid
    report["commits"] = [first, second]
    downloaded = Path(hf_hub_download(repo_id, "weights/model.safetensors"))
    report["payload_sha256"] = hashlib.sha256(downloaded.read_bytes()).hexdigest()
    report["old_notes"] = Path(hf_hub_download(repo_id, "notes.txt", revision=first)).read_text()
    report["new_notes"] = Path(hf_hub_download(repo_id, "notes.txt")).read_text()
    report["info_sha"] = api.model_info(repo_id).sha
    report["files"] = sorted(api.list_repo_files(repo_id))
    report["exists"] = {name: api.file_exists(repo_id, name) for name in ("notes.txt", "missing.txt")}
    errors = {}
    attempts = {
        "missing file": lambda: hf_hub_download(repo_id, "missing.txt"),
        "missing repo": lambda: hf_hub_download(f"{repo_id}-nope", "notes.txt"),
        "missing revision": lambda: hf_hub_download(repo_id, "notes.txt", revision="0" * 40),
        "bad token": lambda: HfApi(token="hf_wrong").whoami(),
    }
    for label, attempt in attempts.items():
        try:
            attempt()
        except HfHubHTTPError as error:
            errors[label] = type(error).__name__
    report["errors"] = errors
    result_path.write_text(json.dumps(report))


def _add(path: Path, path_in_repo: str):
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path))


def _client_palora(work_dir: Path, result_path: Path) -> None:
    """Push a tiny PaLoRA model through `model.push_to_hub`, pull it back two ways, report outputs and files."""
    import torch
    from huggingface_hub import HfApi, hf_hub_download
    from peft import AutoPeftModel, LoraConfig, PeftModel, get_peft_model
    from transformers import BertConfig, BertModel

    from peft_palora import PaLoRAConfig
    report: dict = {}
    api = HfApi()

    torch.manual_seed(0)
    BertModel(BertConfig(**BERT_KWARGS)).push_to_hub("tiny-bert")  # no namespace: the token's user
    base = BertModel.from_pretrained(BASE_REPO).eval()
    report["base_name_or_path"] = base.name_or_path

    torch.manual_seed(1)
    config = PaLoRAConfig(num_tasks=2, task_names=TASKS, r=2, target_modules=["query", "value"], init_weights=False)
    model = get_peft_model(base, config).eval()
    generator = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(0, 100, (3, 7), generator=generator), "attention_mask": torch.ones(3, 7)}
    per_sample = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])

    def outputs_of(peft_model) -> list:
        with torch.no_grad():
            return [peft_model(**inputs, preference=pref).last_hidden_state.tolist() for pref in PREFERENCES]

    def per_sample_outputs_of(peft_model) -> list:
        with torch.no_grad():
            return peft_model(**inputs, preference=per_sample).last_hidden_state.tolist()

    outputs = {"pushed": outputs_of(model), "per_sample_pushed": per_sample_outputs_of(model)}
    commit = model.push_to_hub(
        PALORA_REPO,
        front_table=FRONT_ROWS,
        hypervolume=FRONT_HYPERVOLUME,
        hypervolume_reference=[0.0, 0.0],
        plot_path=work_dir / "front_plot.png",
        commit_message="Publish the PaLoRA front",
    )
    report["palora_commit"] = commit.oid

    pulled = PeftModel.from_pretrained(BertModel.from_pretrained(BASE_REPO), PALORA_REPO).eval()
    outputs["peft_model_from_pretrained"] = outputs_of(pulled)
    outputs["per_sample_pulled"] = per_sample_outputs_of(pulled)
    auto = AutoPeftModel.from_pretrained(PALORA_REPO).eval()
    outputs["auto_peft_model_from_pretrained"] = outputs_of(auto)
    report["auto_base_name_or_path"] = auto.peft_config["default"].base_model_name_or_path
    report["outputs"] = outputs

    report["readme"] = Path(hf_hub_download(PALORA_REPO, "README.md")).read_text(encoding="utf-8")
    report["plot_sha256"] = hashlib.sha256(Path(hf_hub_download(PALORA_REPO, "front.png")).read_bytes()).hexdigest()
    report["files"] = sorted(api.list_repo_files(PALORA_REPO))
    info = api.model_info(PALORA_REPO)
    report["model_info"] = {"library_name": info.library_name, "has_palora_tag": "palora" in (info.tags or [])}

    # A user adds a license and a tag on the Hub; the next push (without a front) must keep them.
    readme = report["readme"].replace("library_name: peft", "library_name: peft\nlicense: mit", 1)
    readme = readme.replace("- palora\n", "- palora\n- user-tag\n", 1)
    report["readme_edit_commit"] = api.upload_file(
        path_or_fileobj=readme.encode(), path_in_repo="README.md", repo_id=PALORA_REPO
    ).oid
    report["second_push_commit"] = model.push_to_hub(PALORA_REPO).oid

    lora = get_peft_model(BertModel.from_pretrained(BASE_REPO), LoraConfig(r=2, target_modules=["query"]))
    lora.push_to_hub(LORA_REPO)
    result_path.write_text(json.dumps(report))


def _client_unmodelled(work_dir: Path, result_path: Path) -> None:
    """Push a tiny PaLoRA model while, mid-push, asking the endpoint something the loopback server does not model."""
    import huggingface_hub
    import torch
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from peft import get_peft_model
    from transformers import BertConfig, BertModel

    from peft_palora import PaLoRAConfig

    report: dict = {}
    create_commit = HfApi.create_commit

    def create_commit_after_an_unmodelled_request(self, *args, **kwargs):
        try:  # what kernels does to check a publisher, and it too swallows the error
            self.get_organization_overview(UNMODELLED_PATH.split("/")[3])
        except HfHubHTTPError as error:
            report["unmodelled_status"] = error.response.status_code
        return create_commit(self, *args, **kwargs)

    huggingface_hub.HfApi.create_commit = create_commit_after_an_unmodelled_request
    torch.manual_seed(0)
    config = PaLoRAConfig(task_names=TASKS, r=2, target_modules=["query"], init_weights=False)
    model = get_peft_model(BertModel(BertConfig(**BERT_KWARGS)), config)
    report["commit"] = model.push_to_hub(PALORA_REPO).oid
    result_path.write_text(json.dumps(report))


if __name__ == "__main__":
    mode, work, result = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    {"plain": _client_plain, "palora": _client_palora, "unmodelled": _client_unmodelled}[mode](work, result)
