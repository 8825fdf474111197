"""Tests for the shipped `evaluate` metric peft_palora/metrics/front_quality: offline loading, numbers, combine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch

from peft_palora.fronts.evaluation import FRONT_QUALITY_METRIC_PATH, load_front_quality_metric
from peft_palora.pareto import hypervolume, num_non_dominated, preference_consistency

REPO_ROOT = Path(__file__).resolve().parents[1]

# Three losses at three preferences: staircase hypervolume 0.09 + 0.2 + 0.04 w.r.t. (1, 1), all non-dominated,
# and more weight on a task always lowers its loss.
PREDICTIONS = [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]
REFERENCES = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]


def random_front(num_tasks: int, seed: int):
    rng = np.random.default_rng(seed)
    preferences = rng.dirichlet(np.ones(num_tasks), size=12)
    losses = 1.0 - 0.6 * preferences + 0.1 * rng.random((12, num_tasks))
    return losses, preferences


def test_hand_computed_example():
    metric = load_front_quality_metric(reference_point=[1.0, 1.0], keep_in_memory=True)
    results = metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert results["hypervolume"] == pytest.approx(0.33)
    assert results["num_non_dominated"] == 3
    assert results == {
        "hypervolume": pytest.approx(0.33),
        "num_non_dominated": 3,
        "spearman_0": 1.0,
        "spearman_1": 1.0,
        "mean_spearman": 1.0,
    }


@pytest.mark.parametrize(("num_tasks", "maximize"), [(2, False), (3, False), (3, True), (2, [True, False])])
def test_same_numbers_as_the_library(num_tasks, maximize):
    losses, preferences = random_front(num_tasks, seed=num_tasks)
    flags = np.broadcast_to(np.asarray(maximize), (num_tasks,))
    objectives = np.where(flags, -losses, losses)  # maximised objectives are scores: negated losses
    reference = np.where(flags, -2.0, 2.0)
    metric = load_front_quality_metric(keep_in_memory=True)
    results = metric.compute(
        predictions=objectives.tolist(),
        references=preferences.tolist(),
        reference_point=reference.tolist(),
        maximize=maximize,
        task_names=[f"t{t}" for t in range(num_tasks)],
    )
    expected = {
        "hypervolume": hypervolume(objectives, reference, maximize=maximize),
        "num_non_dominated": num_non_dominated(objectives, maximize=maximize),
        **preference_consistency(
            preferences, objectives, higher_is_better=maximize, task_names=[f"t{t}" for t in range(num_tasks)]
        ),
    }
    assert results == pytest.approx(expected, rel=1e-12)
    # The data are built so that more weight means a better objective, whatever the direction.
    assert results["mean_spearman"] > 0.5


def test_incremental_adds_and_tensor_inputs_equal_one_shot():
    metric = load_front_quality_metric(reference_point=[1.0, 1.0], keep_in_memory=True)
    metric.add_batch(
        predictions=torch.tensor(PREDICTIONS[:2], dtype=torch.float64), references=np.array(REFERENCES[:2])
    )
    metric.add(prediction=PREDICTIONS[2], reference=REFERENCES[2])
    assert metric.compute() == pytest.approx(metric.compute(predictions=PREDICTIONS, references=REFERENCES))


def test_compute_arguments_override_load_time_defaults():
    metric = load_front_quality_metric(reference_point=[1.0, 1.0], keep_in_memory=True)
    results = metric.compute(predictions=PREDICTIONS, references=REFERENCES, reference_point=[2.0, 2.0])
    assert results["hypervolume"] == pytest.approx(hypervolume(PREDICTIONS, [2.0, 2.0]))
    # Reading the losses as scores flips the correlations.
    flipped = metric.compute(predictions=PREDICTIONS, references=REFERENCES, maximize=True, reference_point=[0, 0])
    assert flipped["mean_spearman"] == -1.0


def test_errors_are_reported():
    metric = load_front_quality_metric(keep_in_memory=True)
    with pytest.raises(ValueError, match="reference_point` is required"):
        metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    with pytest.raises(ValueError, match="does not bound"):
        metric.compute(predictions=PREDICTIONS, references=REFERENCES, reference_point=[0.5, 0.5])
    with pytest.raises(ValueError, match="same shape"):
        metric.compute(predictions=PREDICTIONS, references=[[0.2, 0.3, 0.5]] * 3, reference_point=[1.0, 1.0])


def write_spread_metric(directory: Path) -> Path:
    """A second local module with the same vector-valued inputs, to combine with front_quality."""
    module_dir = directory / "front_spread"
    module_dir.mkdir()
    (module_dir / "front_spread.py").write_text(
        textwrap.dedent(
            '''
            """Range of each objective over the front."""

            import datasets
            import evaluate
            import numpy as np


            class FrontSpread(evaluate.Metric):
                def _info(self):
                    return evaluate.MetricInfo(
                        description="Range of each objective over the front.",
                        citation="",
                        inputs_description="predictions: objective vectors; references: preferences",
                        features=datasets.Features(
                            {
                                "predictions": datasets.Sequence(datasets.Value("float64")),
                                "references": datasets.Sequence(datasets.Value("float64")),
                            }
                        ),
                    )

                def _compute(self, predictions, references):
                    spread = np.ptp(np.asarray(predictions), axis=0)
                    return {"spread": spread.tolist(), "num_points": len(predictions)}
            '''
        )
    )
    return module_dir


def test_combine_with_itself_and_with_another_module(tmp_path):
    combined = evaluate.combine(
        {
            "loose": load_front_quality_metric(reference_point=[2.0, 2.0], keep_in_memory=True),
            "tight": load_front_quality_metric(reference_point=[1.0, 1.0], keep_in_memory=True),
            "spread": evaluate.load(str(write_spread_metric(tmp_path)), keep_in_memory=True),
        }
    )
    results = combined.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert results["loose_hypervolume"] == pytest.approx(hypervolume(PREDICTIONS, [2.0, 2.0]))
    assert results["tight_hypervolume"] == pytest.approx(0.33)
    assert results["loose_num_non_dominated"] == results["tight_num_non_dominated"] == 3
    assert results["tight_mean_spearman"] == 1.0
    assert results["spread"] == pytest.approx([0.8, 0.8]) and results["num_points"] == 3
    # The incremental interface goes through combine too.
    for prediction, reference in zip(PREDICTIONS, REFERENCES):
        combined.add(prediction=prediction, reference=reference)
    again = combined.compute()
    assert again.keys() == results.keys()
    for key, value in results.items():  # pytest.approx compares flat containers only (pytest 9 refuses nesting)
        assert again[key] == pytest.approx(value), key


@pytest.mark.slow
def test_loads_offline_in_a_fresh_process_from_a_copied_module(tmp_path):
    """evaluate copies the script into its module cache and imports the copy; with every network path shut
    (offline flags and an unreachable endpoint) and empty caches, loading and computing must still work."""
    script = textwrap.dedent(
        f"""
        import json, os
        import evaluate
        from peft_palora.fronts.evaluation import FRONT_QUALITY_METRIC_PATH, load_front_quality_metric

        from_helper = load_front_quality_metric(reference_point=[1.0, 1.0])
        from_directory = evaluate.load(os.path.dirname(FRONT_QUALITY_METRIC_PATH), reference_point=[1.0, 1.0])
        combined = evaluate.combine([from_helper, from_directory], force_prefix=True)
        results = {{
            "helper": from_helper.compute(predictions={PREDICTIONS}, references={REFERENCES}),
            "directory": from_directory.compute(predictions={PREDICTIONS}, references={REFERENCES}),
            "combined": combined.compute(predictions={PREDICTIONS}, references={REFERENCES}),
        }}
        print("RESULTS=" + json.dumps(results))
        """
    )
    hf_home = tmp_path / "hf_home"
    environment = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    for variable in ("HF_MODULES_CACHE", "HF_METRICS_CACHE", "HF_EVALUATE_CACHE"):
        environment.pop(variable, None)
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULTS="))
    results = json.loads(line[len("RESULTS=") :])
    expected = {
        "hypervolume": 0.33,
        "num_non_dominated": 3,
        "spearman_0": 1.0,
        "spearman_1": 1.0,
        "mean_spearman": 1.0,
    }
    assert results["helper"] == pytest.approx(expected)
    assert results["directory"] == pytest.approx(expected)
    assert results["combined"] == pytest.approx(
        {f"front_quality_{index}_{key}": value for index in (0, 1) for key, value in expected.items()}
    )
    # The module really was copied into the fresh cache and imported from there.
    copies = list((hf_home / "modules" / "evaluate_modules" / "metrics" / "front_quality").rglob("front_quality.py"))
    assert copies and all(copy.read_text() == Path(FRONT_QUALITY_METRIC_PATH).read_text() for copy in copies)
