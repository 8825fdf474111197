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

import paper_datasets  # noqa: E402
import paper_models  # noqa: E402
import paper_training as pt  # noqa: E402


def _load_script(name: str):
    """Import benchmarks/paper/<name>.py under a unique module name (``multimnist`` would be ambiguous)."""
    spec = importlib.util.spec_from_file_location(f"paper_benchmark_{name}", PAPER_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convergence = _load_script("convergence")
memory = _load_script("memory")
multimnist = _load_script("multimnist")
multimnist3 = _load_script("multimnist3")
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


# ---- settings, process state, statistics ------------------------------------------------------------------------------
def test_main_restores_threads_and_random_state(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # the scripts run with --threads 1, so a leak would show
    try:
        torch.manual_seed(1234)
        rng, np_rng = torch.get_rng_state(), np.random.get_state()
        multimnist.main(SMOKE + ["--threads", "1", "--methods", "ls", "--output_dir", str(tmp_path)])
        assert torch.get_num_threads() == threads + 1
        assert torch.equal(torch.get_rng_state(), rng)
        assert np.array_equal(np.random.get_state()[1], np_rng[1])
        schedule_ablation.main(
            SMOKE
            + ["--threads", "1", "--samplers", "annealed", "--max_steps", "1", "--epochs", "1", "--num_test", "32"]
            + ["--num_eval", "32", "--output_dir", str(tmp_path / "ablation")]
        )
        assert torch.get_num_threads() == threads + 1 and torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.set_num_threads(threads)


def test_paired_difference_matches_hand_computed_t_interval():
    stats = pt.paired_difference([0.8, 0.9, 1.0], [0.7, 0.7, 0.7])
    np.testing.assert_allclose(stats["differences"], [0.1, 0.2, 0.3])
    assert stats["mean"] == pytest.approx(0.2)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * sample sd / sqrt(n)
    np.testing.assert_allclose(stats["interval"], [0.2 - half, 0.2 + half])
    assert pt.paired_difference([0.5], [0.4])["interval"] is None
    with pytest.raises(ValueError, match="`a` and `b`"):
        pt.paired_difference([], [])


def test_input_scale_multiplies_pixels_and_gets_its_own_files(tmp_path):
    plain, labels = pt.load_split("test", 16)
    scaled, scaled_labels = pt.load_split("test", 16, input_scale=255)
    torch.testing.assert_close(scaled, plain * 255)
    assert torch.equal(labels, scaled_labels) and scaled.max() > 1
    with pytest.raises(ValueError, match="input_scale"):
        pt.load_split("test", 16, input_scale=0)
    with pytest.raises(SystemExit):
        multimnist.parse_args(["--input_scale", "-1"])
    base = SMOKE + ["--methods", "ls", "stl", "--output_dir", str(tmp_path)]
    multimnist.main(base)
    before = (tmp_path / "multimnist.json").read_text()
    result = multimnist.main(base + ["--input_scale", "255"])
    assert (tmp_path / "multimnist.json").read_text() == before  # scale 1's tables are left alone
    for name in ("multimnist_scale255.json", "multimnist_scale255.md", "multimnist_scale255_seed0.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    seed = json.loads((tmp_path / "multimnist_scale255_seed0.json").read_text())
    assert seed["config"]["input_scale"] == 255 and set(seed["methods"]) == {"ls", "stl"}
    assert "input scale 255" in (tmp_path / "multimnist_scale255.md").read_text()
    # the missing methods of the default set are listed, not silently dropped
    assert {row["method"] for row in result["missing_runs"]} == {"palora", "palora_conv_r1", "pamal", "pamal_annealed"}


def test_seed_files_from_before_the_new_settings_still_aggregate(tmp_path):
    multimnist.main(SMOKE + ["--methods", "ls", "--output_dir", str(tmp_path)])
    path = tmp_path / "multimnist_seed0.json"
    payload = json.loads(path.read_text())
    for key in multimnist.SETTING_DEFAULTS:  # a file written before these keys existed
        del payload["config"][key]
    path.write_text(json.dumps(payload))
    result = multimnist.main(SMOKE + ["--methods", "ls", "--output_dir", str(tmp_path), "--aggregate_only"])
    assert result["seeds"] == [0] and set(result["summary"]) == {"ls"}
    # ...and another scale does not pick them up
    assert multimnist.main(SMOKE + ["--output_dir", str(tmp_path), "--aggregate_only", "--input_scale", "2"]) is None


def test_paper_conv_layout_is_passed_through_or_refused_clearly(tmp_path):
    argv = SMOKE + ["--methods", "palora_paper_conv", "--output_dir", str(tmp_path)]
    if not pt.config_supports_conv_layout():
        with pytest.raises(SystemExit):
            multimnist.main(argv)
        with pytest.raises(ValueError, match="conv_layout"):
            pt.build_palora(0, conv_layout="paper")
        return
    seed = multimnist.main(argv) and json.loads((tmp_path / "multimnist_seed0.json").read_text())
    model = pt.build_palora(0, conv_layout="paper")
    assert model.peft_config["default"].conv_layout == "paper"
    assert 0.0 <= seed["methods"]["palora_paper_conv"]["hypervolume"] <= 1.0


# ---- MultiFashion and Fashion+MNIST ----------------------------------------------------------------------------------
def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_idx_parser_reads_hand_built_files_and_rejects_broken_ones():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(paper_datasets.parse_idx(_idx_bytes(images, 0x08)), images)
    ints = np.array([[-5, 70000], [1, 2]], dtype=np.int32)
    np.testing.assert_array_equal(paper_datasets.parse_idx(_idx_bytes(ints, 0x0C)), ints)
    good = _idx_bytes(images, 0x08)
    for broken, message in (
        (b"\x01" + good[1:], "magic"),
        (good[:2] + b"\x07" + good[3:], "type code"),
        (good[:-1], "needs 24 bytes"),
        (good[:6], "truncated header"),
    ):
        with pytest.raises(ValueError, match=message):
            paper_datasets.parse_idx(broken, source="x.idx")
    with pytest.raises(TypeError, match="data must be bytes"):
        paper_datasets.parse_idx("not bytes")


def _fashion_or_skip():
    try:
        return paper_datasets.load_fashion_arrays()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed: apt-get update && apt-get install -y dataset-fashion-mnist")


def test_fashion_reader_splits_the_debian_files():
    fashion = _fashion_or_skip()
    assert {split: tuple(x.shape) for split, (x, _) in fashion.items()} == {
        "train": (50_000, 28, 28),
        "validation": (10_000, 28, 28),
        "test": (10_000, 28, 28),
    }
    # the first labels of Fashion-MNIST's training and test files, as published with the data set
    assert fashion["train"][1][:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert fashion["test"][1][:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    for x, y in fashion.values():
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.bincount(y, minlength=10).shape == (10,) and int(y.max()) == 9
    assert int(fashion["train"][0].max()) == 255


@pytest.mark.parametrize("dataset", ["multifashion", "fashion_mnist"])
def test_fashion_datasets_are_composed_like_multimnist(dataset):
    fashion = _fashion_or_skip()
    mnist = paper_datasets.load_mnist_arrays()
    x, y = paper_datasets.make_pair_dataset(dataset, "test", num_samples=6, seed=0)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (6, 2) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    again, again_labels = paper_datasets.make_pair_dataset(dataset, "test", num_samples=6, seed=0)
    assert torch.equal(x, again) and torch.equal(y, again_labels)
    other, _ = paper_datasets.make_pair_dataset(dataset, "test", num_samples=6, seed=1)
    assert not torch.equal(x, other)
    # a full round uses every source image of the split once on each side: the label counts are the sources'
    full_x, full_y = paper_datasets.make_pair_dataset(dataset, "validation")
    left_source = fashion if dataset == "multifashion" else mnist
    for side, source in ((0, left_source), (1, fashion)):
        assert torch.equal(torch.bincount(full_y[:, side], minlength=10), torch.bincount(source["validation"][1]))
    # the images are the sources overlaid: top-left image at (0, 0), bottom-right at (6, 6) of a 36x36 canvas
    index = 3
    canvas = torch.zeros(36, 36)
    pairs = paper_datasets.multimnist_pairs(10_000, 10_000, seed=0, split="validation")
    left = left_source["validation"][0][pairs[0][index]].float() / 255
    right = fashion["validation"][0][pairs[1][index]].float() / 255
    canvas[:28, :28] = left
    canvas[6:34, 6:34] = torch.maximum(canvas[6:34, 6:34], right)
    expected = torch.nn.functional.interpolate(canvas[None, None], size=(28, 28), mode="bicubic", antialias=True)
    torch.testing.assert_close(full_x[index], expected[0].clamp(0, 1))
    assert full_y[index].tolist() == [
        int(left_source["validation"][1][pairs[0][index]]),
        int(fashion["validation"][1][pairs[1][index]]),
    ]


@pytest.mark.parametrize("dataset", ["multifashion", "fashion_mnist"])
def test_multimnist_script_runs_the_fashion_datasets(tmp_path, dataset):
    _fashion_or_skip()
    result = multimnist.main(
        SMOKE + ["--dataset", dataset, "--methods", "palora", "pamal", "--output_dir", str(tmp_path)]
    )
    for name in (f"{dataset}.md", f"{dataset}.json", f"{dataset}_front.png", f"{dataset}_seed0.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "multimnist.json").exists()
    seed = json.loads((tmp_path / f"{dataset}_seed0.json").read_text())
    assert seed["config"]["dataset"] == dataset
    assert all(0.0 <= run["hypervolume"] <= 1.0 and _finite(run["loss"]) for run in seed["methods"].values())
    (paired,) = [row for row in result["paired_differences"] if row["pamal"] == "pamal"]
    assert paired["differences"] == [
        seed["methods"]["palora"]["hypervolume"] - seed["methods"]["pamal"]["hypervolume"]
    ]
    assert paper_datasets.DATASET_LABELS[dataset] in (tmp_path / f"{dataset}.md").read_text()


# ---- the side-by-side overview --------------------------------------------------------------------------------------
overview = _load_script("overview")


def _aggregated(hypervolumes: dict[str, dict[int, float]]) -> dict:
    """An aggregated table as multimnist.py writes it, reduced to what the overview reads."""
    return {
        "summary": {
            method: {
                "seeds": list(by_seed),
                "hypervolume": list(by_seed.values()),
                "hypervolume_mean_std": pt.mean_std(list(by_seed.values())),
            }
            for method, by_seed in hypervolumes.items()
        }
    }


def test_overview_sets_settings_side_by_side_with_paired_differences(tmp_path):
    from scipy import stats

    palora = {0: 0.74, 1: 0.70, 2: 0.72, 3: 0.69}
    pamal = {0: 0.70, 1: 0.71, 2: 0.69, 4: 0.66}  # seed 3 only for PaLoRA, seed 4 only for PaMaL
    (tmp_path / "multimnist.json").write_text(json.dumps(_aggregated({"palora": palora, "pamal": pamal})))
    (tmp_path / "multifashion.json").write_text(json.dumps(_aggregated({"ls": {0: 0.2}, "palora": {0: 0.25}})))
    result = overview.main(["--results_dir", str(tmp_path)])

    assert result["settings"] == ["multimnist", "multifashion"]
    (row,) = result["paired_differences"]["multimnist"]
    assert (row["first"], row["second"], row["seeds"], row["wins"]) == ("palora", "pamal", [0, 1, 2], 2)
    a, b = [0.74, 0.70, 0.72], [0.70, 0.71, 0.69]
    assert row["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    np.testing.assert_allclose(row["interval"], stats.ttest_rel(a, b).confidence_interval(0.95))
    assert result["paired_differences"]["multifashion"] == []  # no PaMaL there: nothing to pair
    text = (tmp_path / "overview.md").read_text()
    assert "| PaLoRA | 0.7125 ± 0.0222 (4) | 0.2500 (1) |" in text
    assert "| LS (equal weights) | - | 0.2000 (1) |" in text
    assert "| 2/3 | +0.0200 | [-0.0457, +0.0857] |" in text
    assert json.loads((tmp_path / "overview.json").read_text()) == result


def test_overview_without_tables_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run benchmarks/paper/multimnist.py first"):
        overview.main(["--results_dir", str(tmp_path)])


# ---- MultiMNIST-3 and convergence -----------------------------------------------------------------------------------
def test_multimnist3_images_are_three_digits_overlaid_on_the_diagonal():
    mnist = paper_datasets.load_mnist_arrays()["validation"]
    x, y = paper_datasets.make_multimnist3("validation")
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (10_000, 3)
    # a full round uses every digit once in each position, never twice in one image
    triples = paper_datasets.multimnist3_triples(10_000, 10_000, seed=0, split="validation")
    for k in range(3):
        assert torch.equal(triples[:, k].sort().values, torch.arange(10_000))
        assert torch.equal(torch.bincount(y[:, k], minlength=10), torch.bincount(mnist[1]))
    assert bool((triples[:, 0] != triples[:, 1]).all() and (triples[:, 1] != triples[:, 2]).all())
    assert bool((triples[:, 0] != triples[:, 2]).all())
    # hand-composed: digits at (0, 0), (7, 7), (14, 14) of a 42x42 canvas, brightest wins, bicubic resize to 28
    index = 5
    canvas = np.zeros((42, 42), dtype=np.float32)
    for k, offset in enumerate((0, 7, 14)):
        digit = mnist[0][triples[index, k]].numpy().astype(np.float32) / 255
        canvas[offset : offset + 28, offset : offset + 28] = np.maximum(
            canvas[offset : offset + 28, offset : offset + 28], digit
        )
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(canvas)[None, None], size=(28, 28), mode="bicubic", antialias=True
    )
    torch.testing.assert_close(x[index], expected[0].clamp(0, 1))
    assert y[index].tolist() == [int(mnist[1][triples[index, k]]) for k in range(3)]
    small, small_labels = paper_datasets.make_multimnist3("validation", num_samples=7)
    assert torch.equal(small, x[:7]) and torch.equal(small_labels, y[:7])
    with pytest.raises(ValueError, match="split"):
        paper_datasets.make_multimnist3("dev")
    with pytest.raises(ValueError, match="digits"):
        paper_datasets.compose_multimnist3(torch.zeros(2, 2, 28, 28))
    with pytest.raises(ValueError, match="num_samples"):
        paper_datasets.multimnist3_triples(10, 0)


def test_task_losses_refuse_labels_of_another_task_count():
    model = paper_models.MultiLeNet(("a", "b", "c"))
    with pytest.raises(ValueError, match="labels"):
        pt.task_losses(model(torch.zeros(2, 1, 28, 28)), torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.slow  # a benchmark smoke run (~5-20 s): the full suite runs it
def test_multimnist3_script_writes_finite_tables_and_epoch_curves(tmp_path):
    result = multimnist3.main(SMOKE + ["--epochs", "2", "--output_dir", str(tmp_path)])
    for name in ("multimnist3.md", "multimnist3.json", "multimnist3_front.png", "multimnist3_seed0.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    seed = json.loads((tmp_path / "multimnist3_seed0.json").read_text())
    assert set(seed["methods"]) == set(multimnist3.METHODS)
    for method, run in seed["methods"].items():
        assert _finite(run["loss"]) and _finite(run["accuracy"]), method
        assert 0.0 <= run["hypervolume"] <= 1.0
        assert np.asarray(run["loss"]).shape[1] == 3
        assert run["steps"] == (9 if method == "stl" else 3)
    for method in ("palora", "palora_paper_conv", "pamal"):
        run = seed["methods"][method]
        assert len(run["loss"]) == 66 and run["preferences"] == pt.simplex_grid(3, 11).tolist()
        assert [point["epoch"] for point in run["epoch_hypervolumes"]] == [1, 2]
        assert [point["step"] for point in run["epoch_hypervolumes"]] == [2, 3]
    assert abs(np.mean(seed["methods"]["ls"]["loss"]) - math.log(10)) < 0.3
    assert set(result["paired_differences"]) == {"palora - pamal", "palora_paper_conv - pamal"}
    assert "| PaMaL |" in (tmp_path / "multimnist3.md").read_text()
    with pytest.raises(SystemExit):
        multimnist3.main(["--epoch_grid", "1"])
    with pytest.raises(SystemExit):
        multimnist3.main(["--epoch_num_test", "0"])


@pytest.mark.slow  # a benchmark smoke run (~5-20 s): the full suite runs it
def test_multimnist3_epoch_curve_uses_the_first_epoch_num_test_images(tmp_path, monkeypatch):
    """The per-epoch front is evaluated on the first --epoch_num_test test images, the final one on all; on the same
    grid and all the images, the last epoch's point is the final front's hypervolume."""
    args = SMOKE + ["--epochs", "1", "--methods", "palora", "--grid", "6", "--epoch_grid", "6"]
    full = multimnist3.main(args + ["--epoch_num_test", "256", "--output_dir", str(tmp_path / "a")])
    seed = json.loads((tmp_path / "a" / "multimnist3_seed0.json").read_text())["methods"]["palora"]
    assert seed["epoch_hypervolumes"][-1]["hypervolume"] == pytest.approx(seed["hypervolume"])
    assert full["config"]["epoch_num_test"] == 256
    evaluated, original = [], pt.evaluate_palora

    def recording(model, x, labels, **kwargs):
        evaluated.append(x.shape[0])
        return original(model, x, labels, **kwargs)

    monkeypatch.setattr(pt, "evaluate_palora", recording)
    multimnist3.main(args + ["--epoch_num_test", "64", "--output_dir", str(tmp_path / "b")])
    assert evaluated == [64, 256]  # after the epoch, then the final front
    few = json.loads((tmp_path / "b" / "multimnist3_seed0.json").read_text())["methods"]["palora"]
    assert few["loss"] == seed["loss"]  # same training, same final front


def test_log_every_epoch_records_the_hypervolume_of_each_epoch(tmp_path):
    multimnist.main(
        SMOKE + ["--epochs", "2", "--methods", "palora", "pamal", "--log_every_epoch", "--output_dir", str(tmp_path)]
    )
    seed = json.loads((tmp_path / "multimnist_seed0.json").read_text())
    for method in ("palora", "pamal"):
        curve = seed["methods"][method]["epoch_hypervolumes"]
        assert [point["epoch"] for point in curve] == [1, 2] and [point["step"] for point in curve] == [2, 3]
        # the last epoch's evaluation is the final evaluation: same model, grid and images
        assert curve[-1]["hypervolume"] == pytest.approx(seed["methods"][method]["hypervolume"])
    multimnist.main(SMOKE + ["--methods", "ls", "--output_dir", str(tmp_path / "plain")])
    plain = json.loads((tmp_path / "plain" / "multimnist_seed0.json").read_text())
    assert "epoch_hypervolumes" not in plain["methods"]["ls"]


def test_epochs_to_fraction_matches_hand_computation():
    assert convergence.epochs_to_fraction([0.1, 0.5, 0.6, 0.62, 0.6]) == 3  # 0.95 * 0.6 = 0.57
    assert convergence.epochs_to_fraction([0.7, 0.5, 0.6]) == 1
    assert convergence.epochs_to_fraction([0.2, 0.66, 0.7]) == 3  # 0.66 < 0.95 * 0.7 = 0.665
    assert convergence.epochs_to_fraction([0.2]) == 1
    assert convergence.epochs_to_fraction([0.0, 0.0]) is None  # never inside the reference box
    assert convergence.epochs_to_fraction([0.1, 0.5, 1.0], fraction=0.5) == 2
    for bad in ([], [[0.1]], [float("nan")]):
        with pytest.raises(ValueError, match="hypervolumes"):
            convergence.epochs_to_fraction(bad)
    with pytest.raises(ValueError, match="fraction"):
        convergence.epochs_to_fraction([0.1], fraction=1.5)


def test_convergence_script_tabulates_stored_curves(tmp_path):
    def curve(values):
        return [{"epoch": i + 1, "step": 10 * (i + 1), "hypervolume": v} for i, v in enumerate(values)]

    (tmp_path / "convergence").mkdir()
    seed = {"seed": 0, "config": {"epochs": 3}, "methods": {}}
    seed["methods"]["pamal"] = {"hypervolume": 0.7, "epoch_hypervolumes": curve([0.2, 0.67, 0.7])}
    seed["methods"]["palora_paper_conv"] = {"hypervolume": 0.72, "epoch_hypervolumes": curve([0.69, 0.7, 0.72])}
    seed["methods"]["ls"] = {"hypervolume": 0.6}  # no curve: not a row
    (tmp_path / "convergence" / "multimnist_seed0.json").write_text(json.dumps(seed))
    three = {"seed": 1, "config": {}, "methods": {"pamal": {"hypervolume": 0.3, "epoch_hypervolumes": curve([0.3])}}}
    (tmp_path / "multimnist3_seed1.json").write_text(json.dumps(three))
    rows = convergence.main(["--results_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    found = {(row["setting"], row["method"]): row["epochs_to_95"] for row in rows}
    assert found == {
        ("MultiMNIST, input scale 1", "pamal"): 2,
        ("MultiMNIST, input scale 1", "palora_paper_conv"): 1,
        ("MultiMNIST-3", "pamal"): 1,
    }
    for name in ("convergence.md", "convergence.json", "convergence.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    summary = {(g["setting"], g["method"]): g for g in json.loads((tmp_path / "out" / "convergence.json").read_text())[
        "summary"]}
    assert summary[("MultiMNIST, input scale 1", "pamal")]["mean_curve"] == pytest.approx([0.2, 0.67, 0.7])
    assert summary[("MultiMNIST, input scale 1", "pamal")]["first_inside"] == [1]
    assert convergence.first_inside([0.0, 0.0, 0.3, 0.5]) == 3 and convergence.first_inside([0.0]) is None
    assert convergence.main(["--results_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o2")]) == []
