"""`benchmarks/bench_scale.py --tiny` runs end to end, in a subprocess (its workers and thread settings stay there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"

# The tiny Qwen2 config of the script, counted by hand: hidden 32, 2 layers, 4 heads of 8 with 2 key/value heads
# (k/v project to 16), MLP 64, vocabulary 256, tied embeddings.
HIDDEN, KV, MLP, LAYERS, VOCAB, T, R = 32, 16, 64, 2, 256, 3, 8
PER_LAYER = (HIDDEN * HIDDEN + HIDDEN) + 2 * (HIDDEN * KV + KV) + HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN
BASE = VOCAB * HIDDEN + LAYERS * PER_LAYER + HIDDEN
IN_PLUS_OUT = 2 * HIDDEN + 2 * (HIDDEN + KV) + 2 * HIDDEN + 3 * (HIDDEN + MLP)  # q, k, v, o, gate, up, down
ADAPTERS = LAYERS * T * R * IN_PLUS_OUT


def run(*args, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench_scale") / "results" / "bench_scale.json"
    result = run("--tiny", "--threads", "1", "--output", str(output))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout, json.loads(output.read_text())


@pytest.mark.slow
def test_tiny_run_measures_every_candidate(tiny_run):
    stdout, report = tiny_run
    ratios = [line for line in stdout.splitlines() if line.startswith("RATIO")]
    values = {line.split("=")[0][len("RATIO "):].strip(): line.split("=")[1].split()[0] for line in ratios}
    assert len(values) == 9, ratios
    # On a model this small the measured memory overheads are allocator noise, so their ratio may have any sign.
    noisy = "memory overhead PaMaL / PaLoRA"
    assert all(float(value) > 0 for label, value in values.items() if label != noisy), ratios
    float(values[noisy])
    rows = report["candidates"]
    assert all(row["measured"] for row in rows.values())
    expected_trainable = {"palora": ADAPTERS, "lora_r24": ADAPTERS, "full_ft": BASE, "palora_base": BASE + ADAPTERS,
                          "pamal": T * BASE}
    assert {name: row["trainable_parameters"] for name, row in rows.items()} == expected_trainable
    for row in rows.values():
        assert len(row["step_seconds"]) == 1 and row["step_seconds_median"] > 0
        assert row["threads"] == 1
        assert 0 < row["floor_bytes"] <= row["peak_bytes"] <= row["process_peak_bytes"] * 1.01 + 2**20
    assert report["model"]["parameters"] == BASE and report["setup"]["adapter_parameters"] == ADAPTERS


def test_tiny_run_ratios_and_computed_memory(tiny_run):
    _, report = tiny_run
    ratios, rows = report["ratios"], report["candidates"]
    assert ratios["parameter_overhead_pamal_over_palora"] == pytest.approx((T - 1) * BASE / ADAPTERS)
    assert ratios["parameters_total_pamal_over_palora"] == pytest.approx(T * BASE / (BASE + ADAPTERS))
    computed = report["computed"]
    assert computed["pamal_overhead_bytes"] == 4 * BASE * (4 * (T - 1) + 1)
    assert computed["palora_base_overhead_bytes"] == 16 * ADAPTERS
    assert computed["pamal_peak_bytes"] == rows["full_ft"]["peak_bytes"] + computed["pamal_overhead_bytes"]
    assert ratios["step_palora_over_lora_r24"] == pytest.approx(
        rows["palora"]["step_seconds_median"] / rows["lora_r24"]["step_seconds_median"])
    assert ratios["peak_palora_over_full_ft"] == pytest.approx(
        rows["palora"]["peak_bytes"] / rows["full_ft"]["peak_bytes"])
    assert ratios["memory_overhead_pamal_over_palora_computed"] == pytest.approx(
        4 * BASE * (4 * (T - 1) + 1) / (16 * ADAPTERS))
    sources = report["overhead_bytes"]["sources"]
    assert (sources["pamal"], sources["palora_base"]) == ("measured", "measured")
    in_ratio = max(report["overhead_bytes"]["palora_base"], computed["palora_base_overhead_bytes"])
    assert report["overhead_bytes"]["palora_base_in_ratio"] == in_ratio
    assert ratios["memory_overhead_pamal_over_palora"] == pytest.approx(report["overhead_bytes"]["pamal"] / in_ratio)


def test_tiny_run_merge_and_export(tiny_run):
    stdout, report = tiny_run
    merge = report["merge_and_unload"]
    assert merge["seconds"] > 0 and merge["max_logit_difference"] < 1e-4 * max(1.0, merge["logit_scale"])
    export = report["export_lora"]
    if "skipped" in export:
        assert "export_lora: skipped" in stdout
    else:
        assert export["lora_rank"] == T * R and export["bundle_bytes"] > 4 * ADAPTERS and export["seconds"] > 0


@pytest.mark.slow
def test_tiny_budget_too_small_computes_instead_of_running(tmp_path):
    output = tmp_path / "small.json"
    result = run("--tiny", "--threads", "1", "--memory_budget_gib", "0.0001", "--output", str(output))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert not any(row["measured"] for row in report["candidates"].values())
    sources = report["overhead_bytes"]["sources"]
    assert (sources["pamal"], sources["palora_base"]) == ("computed", "computed")
    assert report["ratios"]["memory_overhead_pamal_over_palora"] == pytest.approx(
        report["ratios"]["memory_overhead_pamal_over_palora_computed"])
    assert "not run" in result.stdout
    assert "skipped" in report["merge_and_unload"] and "skipped" in report["export_lora"]


@pytest.mark.parametrize(
    "flag, value", [("--steps", "0"), ("--num_tasks", "1"), ("--r", "-2"), ("--candidates", "palora,bogus")]
)
def test_bad_arguments_are_refused_by_name(flag, value):
    result = run(flag, value, timeout=60)
    assert result.returncode == 2 and flag in result.stderr


@pytest.mark.slow
def test_from_json_recomputes_the_same_figures_without_measuring(tiny_run, tmp_path):
    _, report = tiny_run
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(report))
    again = tmp_path / "again.json"
    result = run("--tiny", "--from_json", str(saved), "--output", str(again))
    assert result.returncode == 0, result.stderr[-4000:]
    redone = json.loads(again.read_text())
    assert redone["ratios"] == report["ratios"] and redone["candidates"] == report["candidates"]
    assert "reanalysed_from" in redone and "reanalysed_from" not in report
    # The model options must match the saved run's model.
    wrong = run("--tiny", "--layers", "3", "--from_json", str(saved))
    assert wrong.returncode != 0 and "--from_json" in wrong.stderr
