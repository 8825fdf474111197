"""PaLoRAGRPOTrainer: per-prompt preferences in generation, advantages and loss; the front it trains; refusals.

Tiny Llama/Qwen2 models from ``tests/tiny_lm.py``; two objectives with a known optimum: the share of red words and
the share of blue words in a completion.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tiny_lm import BLUE_WORDS, RED_WORDS, colour_share, make_model, make_tokenizer  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from peft_palora import PaLoRAConfig  # noqa: E402
from peft_palora.alignment import PaLoRAGRPOTrainer  # noqa: E402
from peft_palora.preferences import AnnealedGridSampler, FixedSampler  # noqa: E402

PROMPTS = ["say a color", "tell me one word", "the color is", "please say now"]
KINDS = ["llama", "qwen2"]


def red(completions, **kwargs):
    return [colour_share(text, RED_WORDS) for text in completions]


def blue(completions, **kwargs):
    return [colour_share(text, BLUE_WORDS) for text in completions]


def make_policy(kind, init_weights=True, seed=0):
    base = make_model(kind, seed=seed)
    # The random tiny model's lm_head (std 0.02) gives near-uniform logits that the inner layers can hardly move;
    # a wider one lets the adapters (TRL refuses adapters on lm_head) change the output distribution.
    with torch.no_grad():
        base.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    config = PaLoRAConfig(
        task_names=["red", "blue"], r=4, palora_alpha=8, target_modules="all-linear", init_weights=init_weights
    )
    return get_peft_model(base, config)


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=8, max_completion_length=6,
        max_steps=2, learning_rate=3e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, gradient_checkpointing=False, disable_tqdm=True,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def make_trainer(tmp_path, kind="llama", model=None, rewards=None, preference_sampler=None, **overrides):
    model = model if model is not None else make_policy(kind)
    return PaLoRAGRPOTrainer(
        model, rewards if rewards is not None else {"blue": blue, "red": red}, args=make_args(tmp_path, **overrides),
        preference_sampler=preference_sampler, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 50}), processing_class=make_tokenizer(),
    )


def generation_batch(trainer):
    return [{"prompt": prompt} for prompt in PROMPTS[:2] for _ in range(trainer.num_generations)]


# ---- (a) advantages ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_advantages_equal_an_independent_recomputation(tmp_path, kind):
    trainer = make_trainer(tmp_path, kind, model=make_policy(kind, init_weights=False))
    trainer.model.train()
    trainer.state.max_steps, trainer.state.global_step = 10, 4
    torch.manual_seed(0)
    output = trainer._generate_and_score_completions(generation_batch(trainer))

    groups = 2
    expected_rays = AnnealedGridSampler(2, groups).sample(0.4)  # progress = global_step / max_steps
    expected_prefs = np.repeat(expected_rays.double().numpy(), trainer.num_generations, axis=0)
    np.testing.assert_allclose(output["preference"].double().numpy(), expected_prefs, rtol=0, atol=1e-7)

    tokenizer = trainer.processing_class
    texts = tokenizer.batch_decode(output["completion_ids"], skip_special_tokens=True)
    # objectives in the model's task order (red, blue), whatever the order of the mapping
    rewards = np.array([[colour_share(t, RED_WORDS), colour_share(t, BLUE_WORDS)] for t in texts], dtype=np.float64)
    grouped = rewards.reshape(groups, trainer.num_generations, 2)
    normalised = (grouped - grouped.mean(axis=1, keepdims=True)) / (grouped.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    expected = (normalised.reshape(-1, 2) * expected_prefs).sum(axis=1)
    assert np.abs(expected).max() > 0.1  # the batch carries a signal
    np.testing.assert_allclose(output["advantages"].double().numpy(), expected, rtol=1e-5, atol=1e-5)


# ---- (c) generation at per-sample preferences ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_equals_each_prompt_alone_at_its_preference(tmp_path, kind):
    model = make_policy(kind, init_weights=False)
    trainer = make_trainer(
        tmp_path, kind, model=model, num_generations=2, per_device_train_batch_size=8,
        preference_sampler=FixedSampler([[1.0, 0.0], [0.7, 0.3], [0.2, 0.8], [0.0, 1.0]]),
        generation_kwargs={"do_sample": False},
    )
    trainer.model.train()
    trainer.state.max_steps = 10
    inputs = [{"prompt": prompt} for prompt in PROMPTS for _ in range(2)]
    output = trainer._generate_and_score_completions(inputs)
    tokenizer = trainer.processing_class
    model.eval()
    for row, prompt in enumerate(p["prompt"] for p in inputs):
        encoded = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            alone = model.generate(
                **encoded, preference=output["preference"][row].tolist(), do_sample=False, max_new_tokens=6,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )[0, encoded.input_ids.shape[1]:]
        length = int(output["completion_mask"][row].sum())
        assert output["completion_ids"][row, :length].tolist() == alone[:length].tolist()
        assert length == len(alone) or alone[length - 1].item() == tokenizer.eos_token_id
    # the preference mattered: the four preferences did not all give the first prompt's completion
    completions = {tuple(output["completion_ids"][2 * i].tolist()) for i in range(4)}
    assert len(completions) > 1


# ---- (b) the trained front --------------------------------------------------------------------------------------------
def mean_rewards(model, tokenizer, preference, samples=16):
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = encoded.input_ids.repeat(samples, 1), encoded.attention_mask.repeat(samples, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, preference=preference, do_sample=True, max_new_tokens=6,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return np.mean(red(texts)), np.mean(blue(texts))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_training_spreads_the_rewards_along_the_preference_grid(tmp_path, kind):
    trainer = make_trainer(tmp_path, kind, max_steps=20, logging_steps=5)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rewards/red/mean" in entry]
    assert logged and "rewards/blue/mean" in logged[0]  # mean reward logged per objective
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()
    grid = [[p, 1 - p] for p in np.linspace(0.0, 1.0, 5)]  # from all-blue to all-red
    table = np.array([mean_rewards(model, tokenizer, pref) for pref in grid])
    red_curve, blue_curve = table[:, 0], table[:, 1]
    tolerance = 0.05
    assert np.all(np.diff(red_curve) >= -tolerance), red_curve
    assert np.all(np.diff(blue_curve) <= tolerance), blue_curve
    assert red_curve[-1] - red_curve[0] > 0.5, red_curve  # measured ~0.99 at 20 steps (llama)
    assert blue_curve[0] - blue_curve[-1] > 0.5, blue_curve


# ---- (d) resume -------------------------------------------------------------------------------------------------------
def adapter_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "palora_" in name}


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    full = make_trainer(tmp_path / "full", **common)
    full.train()
    reference = adapter_state(full.model)

    resumed = make_trainer(tmp_path / "resumed", **common)
    resumed.train()  # writes checkpoint-2 on the way (then we resume a fresh trainer from it)
    fresh = make_trainer(tmp_path / "resumed", **common)
    fresh.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-2"))
    state = adapter_state(fresh.model)
    assert state.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(state[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


# ---- (e) refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"use_vllm": True}, "use_vllm"),
        ({"use_transformers_continuous_batching": True}, "use_transformers_continuous_batching"),
        ({"reward_weights": [1.0, 1.0]}, "reward_weights"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
        ({"scale_rewards": "batch"}, "scale_rewards"),
    ],
)
def test_options_without_per_sample_preferences_are_refused(tmp_path, overrides, option):
    with pytest.raises(ValueError, match=option):
        make_trainer(tmp_path, **overrides)


def test_tools_are_refused(tmp_path):
    def tool(x: str) -> str:
        """A tool.

        Args:
            x: anything.
        """
        return x

    policy = make_policy("llama")
    with pytest.raises(ValueError, match="tools"):
        PaLoRAGRPOTrainer(policy, {"red": red, "blue": blue}, args=make_args(tmp_path), tools=[tool],
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=make_tokenizer())


@pytest.mark.parametrize(
    "rewards, match",
    [
        ({"red": red}, r"missing \['blue'\]"),
        ({"red": red, "blue": blue, "green": red}, r"unknown \['green'\]"),
        ({"red": red, "Blue": blue}, r"missing \['blue'\], unknown \['Blue'\]"),
    ],
)
def test_reward_mapping_must_name_the_tasks(tmp_path, rewards, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, rewards=rewards)


def test_reward_funcs_must_be_a_mapping_and_the_model_palora(tmp_path):
    with pytest.raises(TypeError, match="reward_funcs"):
        make_trainer(tmp_path, rewards=[red, blue])
    with pytest.raises(TypeError, match="model"):
        PaLoRAGRPOTrainer(make_model("llama"), {"red": red, "blue": blue}, args=make_args(tmp_path))
    unnamed = get_peft_model(make_model("llama"), PaLoRAConfig(num_tasks=2, r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="task_names"):
        PaLoRAGRPOTrainer(unnamed, {"red": red, "blue": blue}, args=make_args(tmp_path))


def test_sampler_must_fit_the_generation_batch(tmp_path):
    with pytest.raises(ValueError, match="num_rays=2"):
        make_trainer(tmp_path, preference_sampler=AnnealedGridSampler(2, 5))
    with pytest.raises(ValueError, match="preference_sampler"):
        make_trainer(tmp_path, preference_sampler=AnnealedGridSampler(3, 2))


@pytest.mark.slow
def test_import_peft_palora_does_not_import_trl():
    code = "import sys, peft_palora, peft_palora.alignment; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_example_runs_tiny(tmp_path):
    import os

    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "align_grpo.py")
    result = subprocess.run(
        [sys.executable, script, "--tiny", "--output_dir", str(tmp_path), "--max_steps", "2", "--disable_tqdm", "true"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("preference {'red'") == 5
    assert (tmp_path / "adapter_config.json").is_file()
