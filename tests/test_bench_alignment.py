"""`benchmarks/alignment/bench_alignment.py` runs end to end at tiny settings (in a subprocess) and writes well-formed
JSON: every method, equal compute counted the same way, hypervolumes recomputed from the stored front points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # ten training/evaluation subprocesses

from peft_palora.pareto import hypervolume  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "alignment" / "bench_alignment.py"
METHODS = {"palora", "fixed_share", "soups", "soups_palora"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_alignment")
    output = folder / "results" / "bench_alignment.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "20", "--seeds", "0", "--pairs", "16", "--eval_prompts", "4",
         "--output", str(output), "--workdir", str(folder / "work")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "| method |" in result.stdout
    return json.loads(output.read_text()), output.parent


def test_every_method_reports_front_compute_memory_and_bytes(report):
    summary, folder = report
    assert set(summary["methods"]) == METHODS
    assert (folder / "front.png").stat().st_size > 0
    for name, method in summary["methods"].items():
        assert method["grid5"]["hypervolume_mean"] >= 0.0, name
        assert method["max_rss_mib"] > 0 and method["adapter_bytes"] > 0, name
        for entry in method["per_seed"]:
            rewards = np.asarray(entry["fronts"]["grid5"]["rewards"])
            assert rewards.shape == (5, 2) and np.all((rewards >= 0) & (rewards <= 1)), name
            # the hypervolume is that of the stored points from the one fixed reference
            expected = hypervolume(rewards, np.asarray(summary["setting"]["reference"]), maximize=True)
            assert entry["fronts"]["grid5"]["hypervolume"] == pytest.approx(expected), name
    assert summary["setting"]["reference"] == [0.0, 0.0]


def test_compute_is_equal_across_methods(report):
    summary, _ = report
    setting = summary["setting"]
    # PaLoRA: steps x window x objectives x rows; everyone else matches that per step
    assert setting["pairs_per_step"] == setting["window"] * 2 * setting["batch"]
    tokens = {name: method["policy_tokens"] for name, method in summary["methods"].items()}
    steps = {name: method["optimizer_steps"] for name, method in summary["methods"].items()}
    assert set(steps.values()) == {setting["steps"]}, steps
    assert set(tokens.values()) == {setting["steps"] * setting["pairs_per_step"] * 20}, tokens
    jobs = {record["job"]: record for record in summary["records"]}
    assert [jobs[f"fixed_share_{i}"]["optimizer_steps"] for i in range(5)] == [setting["steps"] // 5] * 5
    assert jobs["lora_red"]["optimizer_steps"] == jobs["lora_blue"]["optimizer_steps"] == setting["steps"] // 2
    assert jobs["soups_palora"]["optimizer_steps"] == setting["steps"] // 2
