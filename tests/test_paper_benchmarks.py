"""Smoke tests of the paper-reproduction benchmarks (benchmarks/paper/) plus checks of their building blocks.

The scripts run for a few steps on a few hundred images; the checks are that every output is written, that the
numbers are finite and in range, and that the pieces the tables rest on (the PaMaL mixture, the hypervolume helper,
per-sample evaluation, the parameter counts behind the memory claim) agree with independent computations.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PAPER_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "paper"
sys.path.insert(0, str(PAPER_DIR))  # the scripts' shared modules: paper_models, paper_training

import paper_models  # noqa: E402
import paper_training as pt  # noqa: E402


def _load_script(name: str):
    """Import benchmarks/paper/<name>.py under a unique module name (``multimnist`` would be ambiguous)."""
    spec = importlib.util.spec_from_file_location(f"paper_benchmark_{name}", PAPER_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory = _load_script("memory")
multimnist = _load_script("multimnist")
schedule_ablation = _load_script("schedule_ablation")

SMOKE = ["--max_steps", "3", "--num_train", "512", "--num_test", "256", "--seeds", "0"]


def _finite(values) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())


# ---- building blocks ------------------------------------------------------------------------------------------------
def test_loss_hypervolume_matches_hand_computation():
    assert pt.loss_hypervolume([[0.5, 0.5]]) == pytest.approx(0.25)
    # two boxes of 0.32 overlapping on [0.6, 1]^2 = 0.16
    assert pt.loss_hypervolume([[0.2, 0.6], [0.6, 0.2]]) == pytest.approx(0.48)
    # a point beyond the reference adds nothing (as in the paper's pymoo computation) instead of raising
    assert pt.loss_hypervolume([[2.0, 0.1], [0.5, 0.5]]) == pytest.approx(0.25)
    assert pt.loss_hypervolume([[2.3, 2.3]]) == 0.0


def test_pamal_mixes_independent_copies_convexly():
    torch.manual_seed(0)
    model = paper_models.PaMaL(paper_models.MultiLeNet(), num_tasks=2)
    x = torch.rand(5, 1, 28, 28)
    names = [name for name, _ in paper_models.MultiLeNet().named_parameters()]
    members = [dict(zip(names, member)) for member in model.members]
    assert not torch.equal(members[0]["encoder.conv1.weight"], members[1]["encoder.conv1.weight"])

    def run_with(state):
        reference = paper_models.MultiLeNet()
        reference.load_state_dict({k: v.detach() for k, v in state.items()})
        return reference(x)

    lam = torch.tensor([0.3, 0.7])
    mixed = {name: 0.3 * members[0][name] + 0.7 * members[1][name] for name in names}
    with torch.no_grad():
        for pref, state in (
            (torch.tensor([1.0, 0.0]), members[0]),
            (torch.tensor([0.0, 1.0]), members[1]),
            (lam, mixed),
        ):
            got, expected = model(x, pref), run_with(state)
            for task in paper_models.MULTIMNIST_TASKS:
                torch.testing.assert_close(got[task], expected[task], atol=1e-5, rtol=1e-5)
    assert paper_models.count_parameters(model) == 2 * paper_models.count_parameters(paper_models.MultiLeNet())


def test_per_sample_evaluation_equals_one_preference_at_a_time():
    model = pt.build_palora(seed=0)
    with torch.no_grad():  # make the adapters matter
        for name, param in model.named_parameters():
            if "palora_B" in name:
                param.normal_(0, 0.5)
    torch.manual_seed(1)
    x, labels = torch.rand(30, 1, 28, 28), torch.randint(0, 10, (30, 2))
    prefs = torch.tensor([[0.0, 1.0], [0.25, 0.75], [1.0, 0.0]])
    batched = pt.evaluate_palora(model, x, labels, prefs, chunk=7)
    for i, pref in enumerate(prefs):
        with torch.no_grad():
            losses = pt.task_losses(model(x=x, preference=pref), labels)
        np.testing.assert_allclose(batched["loss"][i], losses.tolist(), rtol=1e-5)
    # the two window modes give the same training losses
    torch.testing.assert_close(
        pt.palora_window_losses(model, x, labels, prefs, mode="batched"),
        pt.palora_window_losses(model, x, labels, prefs, mode="sequential"),
    )


def test_parameter_overheads_match_hand_counts_and_the_papers_ratios():
    lenet = memory.parameter_table("multilenet")
    # hand count, T=2, r=1: conv1 2*(1*25) + 10*2, conv2 2*(10*25) + 20*2, fc 2*320 + 50*2,
    # per head fc1 2*50 + 50*2 and fc2 2*50 + 10*2
    assert lenet["palora_adapters"] == 70 + 540 + 740 + 2 * (200 + 120)
    assert lenet["base"] == 27_450 and lenet["pamal_extra"] == 27_450
    # paper's layout r*k*(in*k + out*k) per task: 2*5*(5+50) + 2*5*(50+100) + 2*370 + 2*(2*100 + 2*60)
    assert lenet["palora_adapters_paper_layout"] == 550 + 1500 + 740 + 640
    # the independently recomputed overhead ratios quoted for the paper's 23.8-31.7x claim
    assert memory.parameter_table("segnet_cityscapes")["ratio_paper_layout"] == pytest.approx(23.9, abs=0.05)
    assert memory.parameter_table("segnet_nyuv2")["ratio_paper_layout"] == pytest.approx(31.6, abs=0.05)


# ---- the scripts ----------------------------------------------------------------------------------------------------
def test_multimnist_script_writes_finite_tables(tmp_path):
    result = multimnist.main(SMOKE + ["--output_dir", str(tmp_path)])
    for name in ("multimnist.md", "multimnist.json", "multimnist_front.png", "multimnist_seed0.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    seed = json.loads((tmp_path / "multimnist_seed0.json").read_text())
    assert set(seed["methods"]) == {"palora", "palora_conv_r1", "pamal", "pamal_annealed", "ls", "stl"}
    for method, run in seed["methods"].items():
        assert _finite(run["loss"]) and _finite(run["accuracy"]), method
        assert 0.0 <= run["hypervolume"] <= 1.0
        assert np.all((np.asarray(run["accuracy"]) >= 0) & (np.asarray(run["accuracy"]) <= 1))
        assert run["steps"] == (6 if method == "stl" else 3)
    assert len(seed["methods"]["palora"]["loss"]) == len(seed["methods"]["pamal"]["loss"]) == 11
    # after 3 steps from a random init the cross-entropies are still near ln(10)
    assert abs(np.mean(seed["methods"]["ls"]["loss"]) - math.log(10)) < 0.3
    # rank 5 on the 5x5 convolutions (conv1 250 + 100, conv2 2500 + 200), rank 1 elsewhere (740 + 2 * (200 + 120))
    assert seed["methods"]["palora"]["adapter_parameters"] == 350 + 2700 + 740 + 640
    assert seed["methods"]["palora_conv_r1"]["adapter_parameters"] == 1990
    assert len(result["end_checks"]) == 2
    assert "| PaLoRA |" in (tmp_path / "multimnist.md").read_text()


def test_multimnist_seed_files_merge_methods_run_separately(tmp_path):
    base = SMOKE + ["--num_train", "256", "--output_dir", str(tmp_path)]
    multimnist.main(base + ["--methods", "ls"])
    multimnist.main(base + ["--methods", "stl"])
    seed = json.loads((tmp_path / "multimnist_seed0.json").read_text())
    assert set(seed["methods"]) == {"ls", "stl"}


def test_schedule_ablation_script_tracks_every_epoch(tmp_path):
    result = schedule_ablation.main(
        SMOKE + ["--epochs", "2", "--num_test", "128", "--num_eval", "64", "--output_dir", str(tmp_path)]
    )
    for name in (
        "schedule_ablation.md",
        "schedule_ablation.json",
        "schedule_ablation.png",
        "schedule_ablation_seed0.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    seed = json.loads((tmp_path / "schedule_ablation_seed0.json").read_text())
    assert set(seed["samplers"]) == set(schedule_ablation.SAMPLERS)
    for run in seed["samplers"].values():
        assert [h["epoch"] for h in run["history"]] == [1, 2]  # 512 images = 2 steps/epoch, 3 steps in all
        assert run["steps"] == 3
        for record in run["history"] + [run["final"]]:
            assert _finite(record["loss"]) and 0.0 <= record["hypervolume"] <= 1.0
            rho = record["loss_mean_spearman"]
            assert math.isnan(rho) or -1.0 <= rho <= 1.0
    assert set(result["summary"]) == set(schedule_ablation.SAMPLERS)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # the profiler, on PaMaL
def test_memory_script_measures_and_tabulates(tmp_path):
    payload = memory.main(["--models", "multilenet", "--in_process", "--output_dir", str(tmp_path)])
    for name in ("memory.md", "memory.json", "memory.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    runs = {run["method"]: run for run in payload["runs"]}
    assert set(runs) == {"plain", "palora", "pamal"}
    for run in runs.values():
        assert run["tensor_peak_mib"] is not None and run["tensor_peak_mib"] > 0
        assert run["step_seconds"] > 0
    # parameter bytes alone bound the tensor peak from below (4 bytes each: weights, and Adam's two moments)
    assert runs["pamal"]["tensor_peak_mib"] >= 3 * 4 * runs["pamal"]["parameters"] / 2**20
    assert runs["palora"]["parameters"] == 27_450 + 1990


def test_pamal_copy_is_independent_of_its_template():
    template = paper_models.MultiLeNet()
    before = copy.deepcopy(template.state_dict())
    model = paper_models.PaMaL(template, num_tasks=3)
    assert len(model.members) == 3
    # the template's own weights are emptied (unused), its trainable state lives in the members only
    assert all(p.numel() == 0 for p in template.parameters())
    assert paper_models.count_parameters(model) == 3 * sum(v.numel() for v in before.values())
