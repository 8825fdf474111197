"""PaLoRA training on Accelerate: the preference window, exact resumption, data parallelism, the HF Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

import peft_palora
from peft_palora.fronts.evaluation import write_front_report
from peft_palora.preferences import AnnealedGridSampler
from peft_palora.training.multitask import TASK_HEADS_FILENAME, MultiTaskModel, linear_heads
from peft_palora.training.trainer import PaLoRATrainer, PaLoRATrainingArguments
from peft_palora.training.window import resolve_window_mode, window_task_losses

TASKS = ["left", "right"]
LABEL_COLUMNS = {"left": "labels_left", "right": "labels_right"}
LOSS_FNS = {task: F.cross_entropy for task in TASKS}


def tiny_base(seed: int = 0, dropout: float = 0.0) -> ViTModel:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
    )
    return ViTModel(config)


def tiny_model(seed: int = 0, dropout: float = 0.0, init_weights: bool = False) -> MultiTaskModel:
    base = tiny_base(seed, dropout)
    palora = peft_palora.PaLoRAConfig(
        task_names=TASKS,
        r=2,
        target_modules=["q_proj", "v_proj", "fc1"],
        palora_dropout=dropout,
        train_base_weights=True,
        init_weights=init_weights,
    )
    backbone = get_peft_model(base, palora)
    return MultiTaskModel(backbone, linear_heads(16, {"left": 10, "right": 10}), label_columns=LABEL_COLUMNS)


def tiny_dataset(num_samples: int = 40, seed: int = 1) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    columns = {
        "pixel_values": torch.rand(num_samples, 1, 28, 28, generator=generator).numpy(),
        "labels_left": torch.randint(0, 10, (num_samples,), generator=generator).numpy(),
        "labels_right": torch.randint(0, 10, (num_samples,), generator=generator).numpy(),
    }
    return datasets.Dataset.from_dict(columns).with_format("torch")


def tiny_batch(batch_size: int = 6):
    dataset = tiny_dataset(batch_size)
    batch = dataset[:batch_size]
    return {"pixel_values": batch["pixel_values"]}, {"left": batch["labels_left"], "right": batch["labels_right"]}


WINDOW = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])


# ---- the window of preferences --------------------------------------------------------------------------------------
def test_batched_window_matches_sequential_losses_and_gradients():
    model = tiny_model()
    inputs, labels = tiny_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]

    batched = window_task_losses(model, inputs, labels, WINDOW, LOSS_FNS, TASKS, mode="batched")
    batched_grads = torch.autograd.grad((WINDOW * batched).sum(1).mean(), trainable)
    sequential = window_task_losses(model, inputs, labels, WINDOW, LOSS_FNS, TASKS, mode="sequential")
    sequential_grads = torch.autograd.grad((WINDOW * sequential).sum(1).mean(), trainable)

    assert batched.shape == (3, 2)
    torch.testing.assert_close(batched, sequential, rtol=1e-5, atol=1e-6)
    for batched_grad, sequential_grad in zip(batched_grads, sequential_grads):
        torch.testing.assert_close(batched_grad, sequential_grad, rtol=1e-4, atol=1e-6)


def test_batched_window_row_k_is_the_model_at_preference_k():
    model = tiny_model()
    inputs, labels = tiny_batch()
    with torch.no_grad():
        batched = window_task_losses(model, inputs, labels, WINDOW, LOSS_FNS, TASKS, mode="batched")
        for k, preference in enumerate(WINDOW):
            model.set_preference(preference)
            outputs = model(**inputs)
            expected = torch.stack([F.cross_entropy(outputs[task], labels[task]) for task in TASKS])
            torch.testing.assert_close(batched[k], expected, rtol=1e-5, atol=1e-6)
    # the rows really differ: a permuted row order would be caught
    assert not torch.allclose(batched[0], batched[2])


def test_window_mode_auto_is_sequential_for_batch_norm():
    resnet = ResNetModel(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1]))
    assert resolve_window_mode("auto", resnet) == "sequential"
    assert resolve_window_mode("auto", tiny_model()) == "batched"
    with pytest.raises(ValueError, match="window_mode"):
        resolve_window_mode("parallel", resnet)


# ---- the trainer ------------------------------------------------------------------------------------------------
def make_trainer(output_dir, model=None, **overrides):
    arguments = dict(
        output_dir=str(output_dir), max_steps=4, window_size=3, disable_tqdm=True, logging_steps=1, use_cpu=True
    )
    arguments.update(overrides)
    args = PaLoRATrainingArguments(**arguments)
    dataset = tiny_dataset()
    return PaLoRATrainer(
        model or tiny_model(init_weights=True),
        args,
        DataLoader(dataset, batch_size=8, shuffle=True),
        DataLoader(dataset, batch_size=20),
    )


def test_adapters_learn_at_lr_times_num_tasks(tmp_path):
    trainer = make_trainer(tmp_path, learning_rate=1e-3)
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert groups["palora_adapters"]["lr"] == pytest.approx(2e-3)
    assert groups["shared"]["lr"] == pytest.approx(1e-3)
    head_ids = {id(p) for p in trainer.unwrapped_model.heads.parameters()}
    assert head_ids <= {id(p) for p in groups["shared"]["params"]}


def test_train_follows_the_schedule_and_evaluates_the_front(tmp_path):
    trainer = make_trainer(tmp_path, eval_points_per_side=3)
    seen = []
    original = trainer.preference_sampler.sample

    def recording(progress, step=None):
        seen.append((progress, step))
        return original(progress, step)

    trainer.preference_sampler.sample = recording
    before = {name: p.detach().clone() for name, p in trainer.unwrapped_model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert result.global_step == 4
    assert seen == [(0.0, 0), (0.25, 1), (0.5, 2), (0.75, 3)]
    after = dict(trainer.unwrapped_model.named_parameters())
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []
    assert list(result.front.columns[:2]) == ["pref_left", "pref_right"]
    assert result.front.shape[0] == 3
    # the front's single-task end is the model evaluated at that preference
    expected = trainer.evaluate(preference=torch.tensor([1.0, 0.0]))
    assert result.front.iloc[-1]["left_accuracy"] == pytest.approx(expected["left_accuracy"])
    assert result.front.iloc[-1]["left_loss"] == pytest.approx(expected["left_loss"], rel=1e-5)
    assert [entry["step"] for entry in result.log_history] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resumed_run_is_bit_identical(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        overrides = dict(
            max_steps=5, gradient_accumulation_steps=2, checkpointing_steps=2, balancing="loss", window_size=3
        )
        full = make_trainer(tmp_path, model=tiny_model(dropout=0.1, init_weights=True), **overrides)
        full.train()
        assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]
        with open(tmp_path / "checkpoint-2" / "trainer_state.json") as handle:
            state = json.load(handle)
        assert (state["global_step"], state["epoch"], state["batches_in_epoch"]) == (2, 0, 4)

        resumed = make_trainer(tmp_path, model=tiny_model(seed=123, dropout=0.1, init_weights=True), **overrides)
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    finally:
        torch.use_deterministic_algorithms(False)
    expected, got = full.unwrapped_model.state_dict(), resumed.unwrapped_model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    torch.testing.assert_close(
        full.objective.loss_balancer.running_mean, resumed.objective.loss_balancer.running_mean, rtol=0, atol=0
    )


def test_resume_latest_needs_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="holds none"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_refuses_a_different_schedule(tmp_path):
    make_trainer(tmp_path, max_steps=2, checkpointing_steps=2).train()
    with pytest.raises(ValueError, match="max_steps"):
        make_trainer(tmp_path, max_steps=3).load_checkpoint(str(tmp_path / "checkpoint-2"))


def _two_process_run(output_dir: str) -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    class RecordingSampler(AnnealedGridSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen = []

        def sample(self, progress, step=None):
            preferences = super().sample(progress, step)
            self.seen.append(preferences.clone())
            return preferences

    # debug_launcher sets no RANK, so both ranks start from seed 0 here; tests/test_multiprocess.py starts the ranks
    # from different weights and checks that DDP broadcasts rank 0's.
    rank = int(os.environ.get("RANK", "0"))
    args = PaLoRATrainingArguments(
        output_dir=output_dir, max_steps=3, window_size=3, balancing="loss", disable_tqdm=True
    )
    sampler = RecordingSampler(2, 3)
    trainer = PaLoRATrainer(
        tiny_model(seed=rank, init_weights=True),
        args,
        DataLoader(tiny_dataset(48), batch_size=8, shuffle=True),
        preference_sampler=sampler,
    )
    accelerator = trainer.accelerator
    assert accelerator.num_processes == 2
    trainer.train()
    preferences = accelerator.gather(torch.stack(sampler.seen)[None])
    assert torch.equal(preferences[0], preferences[1])
    parameters = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    gathered = accelerator.gather(parameters[None])
    assert torch.equal(gathered[0], gathered[1])
    running_means = accelerator.gather(trainer.objective.loss_balancer.running_mean.float()[None])
    assert torch.equal(running_means[0], running_means[1])


@pytest.mark.slow
def test_two_processes_keep_preferences_and_parameters_identical(tmp_path):
    # A fresh interpreter: forking a process whose OpenMP pool already ran (earlier tests) can deadlock the children.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_training; from accelerate import debug_launcher; "
        "debug_launcher(test_training._two_process_run, args=(sys.argv[2],), num_processes=2)"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    completed = subprocess.run(
        [sys.executable, "-c", code, tests_dir, str(tmp_path)], capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


# ---- saving -----------------------------------------------------------------------------------------------------
def test_save_model_round_trip(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / TASK_HEADS_FILENAME).is_file()
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()

    # the same base initialisation (seed 0) and untrained heads
    reloaded = MultiTaskModel.from_pretrained(
        tiny_base(seed=0), str(tmp_path / "saved"), linear_heads(16, {"left": 10, "right": 10})
    )
    assert reloaded.label_columns == LABEL_COLUMNS
    inputs, _ = tiny_batch()
    trained = trainer.unwrapped_model.eval()
    reloaded.eval()
    with torch.no_grad():
        for preference in ([1.0, 0.0], [0.3, 0.7]):
            expected = trained(**inputs, preference=torch.tensor(preference))
            got = reloaded(**inputs, preference=torch.tensor(preference))
            for task in TASKS:
                torch.testing.assert_close(got[task], expected[task])

    wrong_heads = linear_heads(16, {"left": 10, "right": 3})
    with pytest.raises(ValueError, match="`right.bias` has shape"):
        MultiTaskModel.from_pretrained(tiny_base(), str(tmp_path / "saved"), wrong_heads)
    assert wrong_heads["right"].weight.shape == (3, 16)


def test_write_front_report_hand_computed_hypervolume(tmp_path):
    import pandas as pd

    front = pd.DataFrame(
        {
            "pref_a": [0.0, 0.5, 1.0],
            "pref_b": [1.0, 0.5, 0.0],
            "a_accuracy": [0.2, 0.5, 0.9],
            "b_accuracy": [0.9, 0.5, 0.1],
        }
    )
    report = write_front_report(front, str(tmp_path), ["a", "b"])
    # union of [0, 0.2]x[0, 0.9], [0, 0.5]x[0, 0.5], [0, 0.9]x[0, 0.1]: 0.18 + 0.15 + 0.04
    assert report["hypervolume"] == pytest.approx(0.37)
    with open(report["json"]) as handle:
        saved = json.load(handle)
    assert saved["hypervolume"] == pytest.approx(0.37)
    assert saved["front"][2] == {"pref_a": 1.0, "pref_b": 0.0, "a_accuracy": 0.9, "b_accuracy": 0.1}
    assert os.path.getsize(report["plot"]) > 0
    with pytest.raises(ValueError, match="a_loss"):
        write_front_report(front, str(tmp_path), ["a", "b"], metric="loss")


# ---- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"window_size": 0}, "window_size"),
        ({"window_mode": "fast"}, "window_mode"),
        ({"balancing": "magic"}, "balancing"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"max_steps": 0, "num_train_epochs": 0}, "max_steps"),
        ({"push_to_hub": True}, "hub_model_id"),
    ],
)
def test_arguments_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        PaLoRATrainingArguments(**overrides)


def test_trainer_rejects_a_model_without_label_columns(tmp_path):
    model = tiny_model()
    model.label_columns = {"left": "labels_left"}
    with pytest.raises(ValueError, match="label_columns"):
        make_trainer(tmp_path, model=model)


# ---- transformers.Trainer ---------------------------------------------------------------------------------------
def test_hf_trainer_loss_is_the_scalarised_window(tmp_path):
    from transformers import TrainingArguments

    from peft_palora.training.hf_trainer import PaLoRAHFTrainer

    model = tiny_model(init_weights=False)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = PaLoRAHFTrainer(model=model, args=args, train_dataset=tiny_dataset(24), window_size=3)
    trainer.state.max_steps, trainer.state.global_step = 4, 2
    preferences = trainer.current_preferences()
    torch.testing.assert_close(preferences, AnnealedGridSampler(2, 3).sample(0.5))

    batch = tiny_dataset(6)[:6]
    loss = trainer.compute_loss(model, dict(batch))
    inputs, labels = tiny_batch()
    with torch.no_grad():
        expected = 0.0
        for preference in preferences:
            outputs = model(**inputs, preference=preference)
            expected += sum(
                preference[i] * F.cross_entropy(outputs[task], labels[task]) for i, task in enumerate(TASKS)
            )
    assert loss.item() == pytest.approx(float(expected) / 3, rel=1e-5)

    trainer.state.global_step = 0
    result = trainer.train()
    assert result.global_step == 3
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert set(groups) == {"palora_adapters", "shared"}
    assert groups["palora_adapters"]["initial_lr"] == pytest.approx(2e-3)


# ---- resuming with changed arguments (what defines the run is stored in the checkpoint) -------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("saved_run")
    trainer = make_trainer(output_dir, max_steps=4, checkpointing_steps=2)
    trainer.train()
    return output_dir


def _swapped_tasks_model():
    base = tiny_base()
    palora = peft_palora.PaLoRAConfig(task_names=["right", "left"], r=2, target_modules=["q_proj"])
    return MultiTaskModel(
        get_peft_model(base, palora), linear_heads(16, {"right": 10, "left": 10}),
        label_columns={"right": "labels_right", "left": "labels_left"},
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides, changed",
    [
        ({"learning_rate": 2e-3}, "learning_rate: 0.001 -> 0.002"),
        ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type: 'linear' -> 'cosine'"),
        ({"window_size": 2}, "preference_sampler"),
        ({"sampler_mul": 3.0}, "mul=3.0"),
        ({"seed": 7}, "seed: 42 -> 7"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps: 1 -> 2"),
        ({"balancing": "loss"}, "objective.balancing: 'none' -> 'loss'"),
        ({"weight_decay": 0.1}, "weight_decay: 0.0 -> 0.1"),
        ({"max_steps": 6}, "max_steps: 4 -> 6"),
        ({"warmup_steps": 1}, "warmup_steps: 0 -> 1"),
        ({"max_grad_norm": 0.5}, "max_grad_norm: 1.0 -> 0.5"),
        ({"dataset": 48}, "dataset_size: 40 -> 48"),
        ({"model": "swapped"}, "task_names: ['left', 'right'] -> ['right', 'left']"),
    ],
)
def test_resume_refuses_changed_arguments_naming_them(saved_run, tmp_path, overrides, changed):
    overrides = {"max_steps": 4, **overrides}
    model = _swapped_tasks_model() if overrides.pop("model", None) else None
    size = overrides.pop("dataset", None)
    trainer = make_trainer(tmp_path, model=model, **overrides)
    if size is not None:
        trainer = PaLoRATrainer(
            tiny_model(init_weights=True), trainer.args, DataLoader(tiny_dataset(size), batch_size=8, shuffle=True)
        )
    before = {key: value.clone() for key, value in trainer.unwrapped_model.state_dict().items()}
    with pytest.raises(ValueError, match="differs from the one that saved it") as info:
        trainer.load_checkpoint(str(saved_run / "checkpoint-2"))
    assert changed in str(info.value)
    assert "allow_changed_arguments=True" in str(info.value)
    assert trainer.global_step == 0  # refused before anything was loaded
    assert all(torch.equal(before[key], value) for key, value in trainer.unwrapped_model.state_dict().items())


def test_resume_with_unchanged_arguments_is_accepted_also_for_log_settings(saved_run, tmp_path):
    trainer = make_trainer(saved_run, max_steps=4, logging_steps=3, eval_points_per_side=5)
    trainer.load_checkpoint(str(saved_run / "checkpoint-2"))  # logging and evaluation do not change the updates
    assert trainer.global_step == 2


def test_allowed_changed_learning_rate_is_logged_and_applies_from_the_resumed_step(saved_run, tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=4, learning_rate=4e-3, allow_changed_arguments=True)
    with caplog.at_level("WARNING", logger="peft_palora.training"):
        trainer.train(resume_from_checkpoint=str(saved_run / "checkpoint-2"))
    assert "changed arguments" in caplog.text and "learning_rate: 0.001 -> 0.004" in caplog.text
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert groups["shared"]["initial_lr"] == pytest.approx(4e-3)
    assert groups["palora_adapters"]["initial_lr"] == pytest.approx(8e-3)
    # linear decay over 4 steps, no warm-up: after step 4 the rate is 0; at step 3 it was 4e-3 * 1/4
    assert trainer.log_history[-2]["train/learning_rate"] == pytest.approx(8e-3 * 0.25)


def test_sampler_step_counts_micro_batches_within_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    seen = []
    original = trainer.preference_sampler.sample
    trainer.preference_sampler.sample = lambda progress, step=None: seen.append((progress, step)) or original(
        progress, step
    )
    trainer.train()
    assert seen == [(0.0, 0), (0.0, 1), (0.5, 2), (0.5, 3)]
