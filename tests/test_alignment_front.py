"""evaluate_reward_front against a hand computation: per-preference generation, mean rewards, 2-D hypervolume by
sweeping, Spearman consistency from scipy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from peft import get_peft_model
from scipy.stats import spearmanr
from tiny_lm import BLUE_WORDS, RED_WORDS, colour_share, make_model, make_tokenizer

from peft_palora import PaLoRAConfig
from peft_palora.alignment import evaluate_reward_front
from peft_palora.preferences import simplex_grid

PROMPTS = ["tell me a color", "say one word please"]  # same token length: the batched call needs no padding


def reward_funcs():
    return {
        "red": lambda prompts, completions: [colour_share(c, RED_WORDS) for c in completions],
        "blue": lambda prompts, completions: [colour_share(c, BLUE_WORDS) + 0.01 * len(p) for p, c in
                                              zip(prompts, completions, strict=True)],
    }


@pytest.fixture(params=["llama", "qwen2"])
def policy(request):
    torch.manual_seed(5)
    config = PaLoRAConfig(task_names=["red", "blue"], r=4, palora_alpha=16,
                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_weights=False,
                          task_type="CAUSAL_LM")
    return get_peft_model(make_model(request.param, seed=1), config).eval()


def hypervolume_2d_max(points, reference):
    """Area dominated by maximised 2-D points above ``reference``: sweep in decreasing first objective."""
    area, best_y = 0.0, reference[1]
    for x, y in sorted(map(tuple, points), reverse=True):
        if y > best_y:
            area += (x - reference[0]) * (y - best_y)
            best_y = y
    return area


def test_front_matches_a_hand_computation(policy, tmp_path):
    tokenizer = make_tokenizer()
    grid = simplex_grid(2, 5)
    funcs = reward_funcs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, summary = evaluate_reward_front(policy, PROMPTS, funcs, grid, processing_class=tokenizer,
                                               max_new_tokens=6, plot_path=tmp_path / "front.png")

    expected = np.zeros((len(grid), 2))
    completions = []
    for k, preference in enumerate(grid):
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), preference=preference,
                                      do_sample=False, max_new_tokens=6, pad_token_id=0)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            completions.append(text)
            expected[k, 0] += colour_share(text, RED_WORDS) / len(PROMPTS)
            expected[k, 1] += (colour_share(text, BLUE_WORDS) + 0.01 * len(prompt)) / len(PROMPTS)

    assert summary["completions"] == completions
    assert len(set(completions)) > 1  # the preference changes what is generated
    assert list(table.columns) == ["pref_red", "pref_blue", "red_reward", "blue_reward"]
    np.testing.assert_allclose(table[["pref_red", "pref_blue"]].to_numpy(), grid.numpy())
    np.testing.assert_allclose(table[["red_reward", "blue_reward"]].to_numpy(), expected, rtol=1e-12)

    spread = expected.max(0) - expected.min(0)
    reference = expected.min(0) - 0.1 * np.where(spread > 0, spread, 1.0)
    np.testing.assert_allclose(summary["reference"], reference)
    assert summary["hypervolume"] == pytest.approx(hypervolume_2d_max(expected, reference), rel=1e-9)
    for task, name in enumerate(["red", "blue"]):
        rho = spearmanr(grid[:, task].numpy(), expected[:, task]).statistic
        np.testing.assert_equal(summary[f"spearman_{name}"], rho)  # nan where a column is constant
    assert (tmp_path / "front.png").exists() and summary["plot"] == str(tmp_path / "front.png")


def test_user_reference_and_batching(policy):
    tokenizer = make_tokenizer()
    funcs = {"red": lambda prompts, completions: [1.0 + i for i in range(len(completions))],
             "blue": lambda prompts, completions: [2.0] * len(completions)}
    table, summary = evaluate_reward_front(policy, PROMPTS, funcs, [[1.0, 0.0], [0.0, 1.0]],
                                           processing_class=tokenizer, reference=[0.0, 0.0], batch_size=3,
                                           max_new_tokens=2)
    # rows k * P + p: preference 0 gets rewards 1, 2 (mean 1.5), preference 1 gets 3, 4 (mean 3.5)
    np.testing.assert_allclose(table["red_reward"], [1.5, 3.5])
    assert summary["hypervolume"] == pytest.approx(3.5 * 2.0)
    assert summary["num_non_dominated"] == 1


def test_bad_inputs(policy):
    tokenizer = make_tokenizer()
    funcs = reward_funcs()
    run = dict(processing_class=tokenizer, max_new_tokens=2)
    with pytest.raises(ValueError, match="`reward_funcs` has the objectives"):
        evaluate_reward_front(policy, PROMPTS, {"red": funcs["red"]}, 3, **run)
    with pytest.raises(ValueError, match="`prompts` is empty"):
        evaluate_reward_front(policy, [], funcs, 3, **run)
    with pytest.raises(TypeError, match="`prompts`"):
        evaluate_reward_front(policy, "tell me", funcs, 3, **run)
    with pytest.raises(ValueError, match="sum"):
        evaluate_reward_front(policy, PROMPTS, funcs, [[0.5, 0.6]], **run)
    with pytest.raises(ValueError, match="returned 1 rewards for 6 completions"):
        evaluate_reward_front(policy, PROMPTS, {**funcs, "blue": lambda prompts, completions: [0.0]}, 3, **run)
    with pytest.raises(TypeError, match="`reward_funcs\\['blue'\\]` must be callable"):
        evaluate_reward_front(policy, PROMPTS, {**funcs, "blue": 3}, 3, **run)
    with pytest.raises(ValueError, match="reference"):
        evaluate_reward_front(policy, PROMPTS, funcs, 3, reference=[5.0, 5.0], **run)
    with pytest.raises(TypeError, match="PaLoRA PEFT model"):
        evaluate_reward_front(make_model("llama"), PROMPTS, funcs, 3, **run)
