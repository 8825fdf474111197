"""PaLoRADPOTrainer on tiny Llama and Qwen2 models: the loss against a float64 recomputation, per-sample preferences,
a short training that spreads the two synthetic objectives along the preference grid, resume, and bad inputs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tiny_lm import BLUE_WORDS, RED_WORDS, make_model, make_tokenizer  # noqa: E402
from trl import DPOConfig  # noqa: E402

from peft_palora import PaLoRAConfig  # noqa: E402
from peft_palora.alignment import PaLoRADPOTrainer, split_by_objective  # noqa: E402
from peft_palora.preferences import DirichletSampler  # noqa: E402

KINDS = ["llama", "qwen2"]
TASKS = ["red", "blue"]
PROMPTS = ["tell me a color", "say one word", "tell me one word please", "a color now"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def colour_data(num_pairs: int = 16, seed: int = 0) -> dict[str, Dataset]:
    """"red" prefers completions of RED_WORDS over BLUE_WORDS, "blue" the reverse (lengths vary)."""
    rng = random.Random(seed)
    prompts, red, blue = [], [], []
    for _ in range(num_pairs):
        prompts.append(rng.choice(PROMPTS))
        red.append(" ".join(rng.choices(RED_WORDS, k=rng.randint(1, 4))))
        blue.append(" ".join(rng.choices(BLUE_WORDS, k=rng.randint(1, 4))))
    return {
        "red": Dataset.from_dict({"prompt": prompts, "chosen": red, "rejected": blue}),
        "blue": Dataset.from_dict({"prompt": prompts, "chosen": blue, "rejected": red}),
    }


def palora_model(kind: str, init_weights: bool = False, seed: int = 0):
    config = PaLoRAConfig(task_names=TASKS, r=4, palora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                          init_weights=init_weights, task_type="CAUSAL_LM")
    model = make_model(kind, seed=seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, config)


def dpo_config(path, **overrides) -> DPOConfig:
    settings = dict(output_dir=str(path), max_steps=10, per_device_train_batch_size=3, report_to=[], use_cpu=True,
                    bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=1, beta=0.5, seed=0,
                    learning_rate=1e-2, dataloader_num_workers=0)
    settings.update(overrides)
    return DPOConfig(**settings)


def make_trainer(kind, tmp_path, data=None, init_weights=False, window_size=3, **overrides):
    model = palora_model(kind, init_weights=init_weights)
    trainer = PaLoRADPOTrainer(model, args=dpo_config(tmp_path, **overrides), train_dataset=data or colour_data(),
                               processing_class=make_tokenizer(), window_size=window_size)
    return trainer, model


# ---- independent float64 computation --------------------------------------------------------------------------------
def completion_log_prob(model, prompt_ids, completion_ids, preference) -> torch.Tensor:
    """log p(completion | prompt) in float64 from the model's logits, one unpadded sequence at one preference."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids, preference=preference).logits.double() if preference is not None else \
        model(input_ids=ids).logits.double()
    log_probs = logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
    return log_probs[len(prompt_ids) - 1:].sum()


def reference_dpo_loss(reference, rows, window, beta) -> torch.Tensor:
    """``(1/m) sum_k sum_t lambda_kt mean_b L_DPO,t`` recomputed sample by sample on ``reference`` (in float64)."""
    expected = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for preference in window:
            for task in range(len(TASKS)):
                losses = []
                for row in rows:
                    prompt, chosen, rejected = (row[c][task] for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
                    policy = [completion_log_prob(reference, prompt, ids, preference) for ids in (chosen, rejected)]
                    with reference.disable_adapter():
                        base = [completion_log_prob(reference, prompt, ids, None) for ids in (chosen, rejected)]
                    margin = (policy[0] - base[0]) - (policy[1] - base[1])
                    losses.append(-F.logsigmoid(beta * margin))
                expected += preference[task] * torch.stack(losses).mean() / len(window)
    return expected


def float64_copy(kind, trained):
    model = palora_model(kind)
    model.load_state_dict(trained.state_dict())
    return model.double().eval()


@pytest.mark.parametrize("kind", KINDS)
def test_loss_equals_float64_weighted_sum_of_objective_dpo_losses(kind, tmp_path):
    trainer, model = make_trainer(kind, tmp_path, window_size=3)
    trainer.state.global_step, trainer.state.max_steps = 4, 10  # progress 0.4: a spread, non-uniform window
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
    window = trainer.current_preferences().double()
    assert not torch.allclose(window[0], window[-1])

    reference = float64_copy(kind, model)
    beta = trainer.beta
    expected = reference_dpo_loss(reference, rows, window, beta)
    assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_preferences_match_each_sample_alone(kind, tmp_path):
    trainer, model = make_trainer(kind, tmp_path)
    model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    rows = batch["input_ids"].shape[0]
    preferences = torch.distributions.Dirichlet(torch.ones(2)).sample((rows,))
    with torch.no_grad():
        together = trainer.sequence_log_probs(model, batch, preferences)
        alone = []
        for index in range(rows):
            length = int(batch["attention_mask"][index].sum())
            single = {key: batch[key][index:index + 1, :length]
                      for key in ("input_ids", "attention_mask", "completion_mask")}
            alone.append(trainer.sequence_log_probs(model, single, preferences[index:index + 1]))
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # and the preference matters: the same rows at one shared preference differ
    with torch.no_grad():
        shared = trainer.sequence_log_probs(model, batch, torch.tensor([[1.0, 0.0]]).expand(rows, 2).contiguous())
    assert not torch.allclose(together, shared, atol=1e-4)


def margins_on_grid(trainer, model, points):
    """Mean implicit reward margin beta * (log-ratio(chosen) - log-ratio(rejected)) of each objective's pairs."""
    model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    objective = batch["objective_ids"]
    result = []
    with torch.no_grad():
        reference = trainer.sequence_log_probs(model, batch, None)
        for point in points:
            preference = torch.tensor([point, 1 - point]).expand(batch["input_ids"].shape[0], 2).contiguous()
            chosen, rejected = (trainer.sequence_log_probs(model, batch, preference) - reference).chunk(2)
            margins = trainer.beta * (chosen - rejected)
            result.append([margins[objective == task].mean().item() for task in range(len(TASKS))])
    return torch.tensor(result)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_training_orders_each_objective_reward_along_the_grid(kind, tmp_path):
    trainer, model = make_trainer(kind, tmp_path, data=colour_data(12), init_weights=True, max_steps=24,
                                  per_device_train_batch_size=4, learning_rate=3e-2, beta=1.0, logging_steps=24)
    trainer.train()
    points = [0.0, 0.25, 0.5, 0.75, 1.0]  # weight on "red"
    margins = margins_on_grid(trainer, model, points)
    red, blue = margins[:, 0], margins[:, 1]
    # each objective's margin rises with its own weight: monotone along the grid up to 0.02, ends clearly ordered
    assert torch.all(red[1:] >= red[:-1] - 0.02), red
    assert torch.all(blue[:-1] >= blue[1:] - 0.02), blue
    assert red[-1] - red[0] > 0.5 and blue[0] - blue[-1] > 0.5, margins
    assert red[-1] > 0 and blue[0] > 0  # at its own vertex each objective prefers its chosen completions
    logged = trainer.state.log_history[0]
    for name in TASKS:
        assert {f"loss/{name}", f"rewards/{name}/margins", f"rewards/{name}/accuracies"} <= set(logged)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(kind, tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1)
    whole, _ = make_trainer(kind, tmp_path / "whole", **common)
    whole.train()
    first, _ = make_trainer(kind, tmp_path / "split", **common)
    first.train()
    resumed, _ = make_trainer(kind, tmp_path / "split", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-3"))

    def losses(trainer):
        return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}

    expected, got = losses(whole), losses(resumed)
    assert set(got) >= {4, 5, 6}
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_sampler_window_and_weights_follow_the_sampler(tmp_path):
    sampler = DirichletSampler(2, num_rays=2, seed=3)
    model = palora_model("llama")
    trainer = PaLoRADPOTrainer(model, args=dpo_config(tmp_path), train_dataset=colour_data(),
                               processing_class=make_tokenizer(), preference_sampler=sampler)
    trainer.state.global_step, trainer.state.max_steps = 2, 10
    torch.testing.assert_close(trainer.current_preferences(), sampler.sample(0.2, step=2))
    assert "ref" not in model.peft_config  # the reference is the adapters-disabled model


@pytest.mark.slow  # a fresh interpreter; tests/test_registration.py::test_import_stays_light checks it too
def test_import_peft_palora_does_not_import_trl():
    script = "import sys, peft_palora, peft_palora.alignment; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)


# ---- data -------------------------------------------------------------------------------------------------------------
def test_split_by_objective_picks_each_objective_label():
    data = Dataset.from_dict({
        "prompt": ["p0", "p1"], "response_0": ["a0", "a1"], "response_1": ["b0", "b1"],
        "better_response_id": [1, 0], "safer_response_id": [0, 0],
    })
    split = split_by_objective(data, {"helpful": "better_response_id", "harmless": "safer_response_id"})
    assert split["helpful"].to_dict() == {"prompt": ["p0", "p1"], "chosen": ["b0", "a1"], "rejected": ["a0", "b1"]}
    assert split["harmless"].to_dict() == {"prompt": ["p0", "p1"], "chosen": ["a0", "a1"], "rejected": ["b0", "b1"]}


def test_split_by_objective_bad_inputs():
    data = Dataset.from_dict({"prompt": ["p"], "response_0": ["a"], "response_1": ["b"], "label": [2]})
    with pytest.raises(ValueError, match="row 0"):
        split_by_objective(data, {"x": "label"})
    with pytest.raises(ValueError, match="no column"):
        split_by_objective(data, {"x": "safer_response_id"})
    with pytest.raises(ValueError, match="`objectives` is empty"):
        split_by_objective(data, {})
    with pytest.raises(TypeError, match="`dataset`"):
        split_by_objective({"prompt": ["p"]}, {"x": "label"})
    with pytest.raises(ValueError, match="`dataset` is empty"):
        split_by_objective(data.select([]), {"x": "label"})


def test_shorter_objective_is_cycled(tmp_path):
    data = colour_data(6)
    data["blue"] = data["blue"].select(range(2))
    trainer, _ = make_trainer("llama", tmp_path, data=data)
    assert len(trainer.train_dataset) == 6
    assert trainer.train_dataset[4]["chosen_ids"][1] == trainer.train_dataset[0]["chosen_ids"][1]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda d: {"red": d["red"]}, ValueError, "missing: \\['blue'\\]"),
        (lambda d: {**d, "green": d["red"]}, ValueError, "unknown: \\['green'\\]"),
        (lambda d: d["red"], TypeError, "must be a mapping"),
        (lambda d: {**d, "blue": d["blue"].select([])}, ValueError, "`train_dataset\\['blue'\\]` is empty"),
        (lambda d: {**d, "blue": d["blue"].remove_columns("rejected")}, ValueError, "no column\\(s\\) \\['rejected'\\]"),
        (lambda d: {**d, "blue": d["blue"].to_dict()}, TypeError, "datasets.Dataset"),
    ],
)
def test_bad_datasets(tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        PaLoRADPOTrainer(palora_model("llama"), args=dpo_config(tmp_path), train_dataset=change(colour_data()),
                         processing_class=make_tokenizer())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(loss_type=["sigmoid", "nca_pair"]), "`loss_type` \\['nca_pair'\\]"),
        (dict(precompute_ref_log_probs=True), "`precompute_ref_log_probs`"),
        (dict(use_weighting=True), "`use_weighting`"),
        (dict(ld_alpha=0.5), "`ld_alpha`"),
        (dict(f_divergence_type="forward_kl"), "`f_divergence_type`"),
    ],
)
def test_unsupported_trl_options_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        PaLoRADPOTrainer(palora_model("llama"), args=dpo_config(tmp_path, **overrides), train_dataset=colour_data(),
                         processing_class=make_tokenizer())


def test_bad_models_and_samplers(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(TypeError, match="PaLoRA PEFT model"):
        PaLoRADPOTrainer(make_model("llama"), args=dpo_config(tmp_path), train_dataset=colour_data(),
                         processing_class=tokenizer)
    unnamed = get_peft_model(make_model("llama"), PaLoRAConfig(num_tasks=2, r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="`task_names`"):
        PaLoRADPOTrainer(unnamed, args=dpo_config(tmp_path), train_dataset=colour_data(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="`preference_sampler` draws preferences over 3 tasks"):
        PaLoRADPOTrainer(palora_model("llama"), args=dpo_config(tmp_path), train_dataset=colour_data(),
                         processing_class=tokenizer, preference_sampler=DirichletSampler(3, 2))
    with pytest.raises(ValueError, match="`window_size`"):
        PaLoRADPOTrainer(palora_model("llama"), args=dpo_config(tmp_path), train_dataset=colour_data(),
                         processing_class=tokenizer, window_size=0)
    with pytest.raises(ValueError, match="no pair left"):
        PaLoRADPOTrainer(palora_model("llama"), args=dpo_config(tmp_path, max_length=2), train_dataset=colour_data(),
                         processing_class=tokenizer)


@pytest.mark.slow
def test_example_script_runs_tiny(tmp_path):
    from align_dpo import main

    summary = main(["--tiny", "--output_dir", str(tmp_path), "--max_steps", "2", "--use_cpu", "--report_to", "none",
                    "--per_device_train_batch_size", "4", "--gradient_checkpointing", "false",
                    "--front_points_per_side", "3", "--save_strategy", "no"])
    assert {"front.csv", "front.json", "front.png", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    assert len(summary["completions"]) == 3 * 2  # 3 preferences x 2 prompts


def test_explicit_reference_model_and_gradient_checkpointing_give_the_same_loss(tmp_path):
    """A frozen copy of the base as `ref_model` is the adapters-disabled model; checkpointing keeps the per-sample
    preferences (its recomputed forward sees the same rows)."""
    losses = []
    for index, (ref_model, checkpointing) in enumerate([(None, False), (make_model("llama"), False), (None, True)]):
        model = palora_model("llama")
        trainer = PaLoRADPOTrainer(model, ref_model=ref_model, processing_class=make_tokenizer(),
                                   args=dpo_config(tmp_path / str(index), gradient_checkpointing=checkpointing),
                                   train_dataset=colour_data(), window_size=2)
        trainer.state.global_step, trainer.state.max_steps = 5, 10
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        model.train()
        if checkpointing:  # Trainer.train turns it on; here by hand
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.get_base_model().model.gradient_checkpointing
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        losses.append((loss.item(), gradient))
    for loss, gradient in losses[1:]:
        assert loss == pytest.approx(losses[0][0], rel=1e-6)
        torch.testing.assert_close(gradient, losses[0][1], rtol=1e-4, atol=1e-6)


def test_eval_dataset_mapping_logs_per_objective_metrics(tmp_path):
    model = palora_model("llama")
    trainer = PaLoRADPOTrainer(model, args=dpo_config(tmp_path, max_steps=1), train_dataset=colour_data(),
                               eval_dataset=colour_data(4, seed=1), processing_class=make_tokenizer(), window_size=2)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_loss/red", "eval_rewards/blue/margins"} <= set(metrics)
    other = trainer.evaluate(colour_data(5, seed=2))  # a mapping given later is prepared and zipped the same way
    assert {"eval_loss", "eval_loss/blue"} <= set(other) and other["eval_loss"] != metrics["eval_loss"]
    with pytest.raises(ValueError, match="`eval_dataset` has the objectives"):
        trainer.evaluate({"red": colour_data()["red"]})
    with pytest.raises(ValueError, match="`eval_dataset` has the objectives"):
        PaLoRADPOTrainer(palora_model("llama"), args=dpo_config(tmp_path), train_dataset=colour_data(),
                         eval_dataset={"red": colour_data()["red"]}, processing_class=make_tokenizer())
