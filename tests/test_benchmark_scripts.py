"""The top-level benchmark scripts still run (tiny sizes, one repeat) and print their ratios."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args",
    [
        ("bench_conv.py", ["--batch_size", "2", "--image_size", "32", "--repeats", "1", "--threads", "1"]),
        ("bench_tuner.py", ["--batch_size", "1", "--seq_len", "8", "--repeats", "1", "--threads", "1"]),
        ("bench_merge.py", ["--quick"]),
    ],
)
def test_benchmark_script_prints_its_ratios(script, args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ratios = [line for line in result.stdout.splitlines() if line.startswith("RATIO")]
    assert ratios and all(float(line.split("=")[1].split()[0]) > 0 for line in ratios)
