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


# ---------------------------------------------------------------- library functions behind `palora front --prompts`
REWARD_MODULE = """
from tiny_lm import BLUE_WORDS, RED_WORDS, colour_share


def red(prompts, completions, **kwargs):
    return [colour_share(c, RED_WORDS) for c in completions]


def broken(prompts, completions, **kwargs):
    return 1 / 0


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A reward module `front_rewards` on sys.path (and as a file)."""
    (tmp_path / "front_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "front_rewards.py"


def test_parse_reward_spec():
    from peft_palora.alignment.front import parse_reward_spec

    assert parse_reward_spec(" helpful = mypkg.rewards:helpful ") == ("helpful", "mypkg.rewards", "helpful")
    assert parse_reward_spec("b=C:/dir/r.py:brief") == ("b", "C:/dir/r.py", "brief")  # the last colon splits
    for spec in ("red", "red=module", "red=module:", "=module:red", "red=:f"):
        with pytest.raises(ValueError, match="`rewards` entry .* must read OBJECTIVE=MODULE:FUNCTION"):
            parse_reward_spec(spec)
    with pytest.raises(ValueError, match="is not a function name"):
        parse_reward_spec("red=module:not-a-name")
    with pytest.raises(TypeError, match="`rewards` entry must be a string"):
        parse_reward_spec(3)


def test_load_reward_functions_imports_by_name_and_by_file(reward_module):
    import importlib

    from peft_palora.alignment.front import load_reward_functions

    functions = load_reward_functions([f"blue={reward_module}:red", "red=front_rewards:red"], ["red", "blue"])
    assert list(functions) == ["red", "blue"]  # task order, not the order given
    completions = ["red red apple", "blue sky"]
    expected = importlib.import_module("front_rewards").red(prompts=["p", "q"], completions=completions)
    assert expected == [colour_share(c, RED_WORDS) for c in completions]  # the user's function, independently
    for function in functions.values():
        assert function(prompts=["p", "q"], completions=completions) == expected


@pytest.mark.parametrize(
    ("specs", "error", "message"),
    [
        (["red=front_rewards:red"], ValueError, "no reward function for the tasks \\['blue'\\]"),
        (["red=front_rewards:red", "green=front_rewards:red"], ValueError, "has no task 'green'"),
        (["red=front_rewards:red", "red=front_rewards:red"], ValueError, "objective 'red' twice"),
        (["red=no_such_module_xyz:red"], ValueError, "importing 'no_such_module_xyz' failed \\(ModuleNotFoundError"),
        (["red=front_rewards:nothing"], ValueError, "has no attribute 'nothing'"),
        (["red=front_rewards:NOT_A_FUNCTION"], TypeError, "is a int, not a function"),
        (["red=missing/rewards.py:red"], ValueError, "'missing/rewards.py' is not a file"),
        ("red=front_rewards:red", TypeError, "`rewards` must be a list"),
    ],
)
def test_load_reward_functions_bad_specs(reward_module, specs, error, message):
    from peft_palora.alignment.front import load_reward_functions

    with pytest.raises(error, match=message):
        load_reward_functions(specs, ["red", "blue"])


def test_a_failing_reward_function_names_its_spec(reward_module):
    from peft_palora.alignment.front import load_reward_functions

    functions = load_reward_functions(["red=front_rewards:broken", "blue=front_rewards:red"], ["red", "blue"])
    with pytest.raises(ValueError, match="`rewards` entry 'red=front_rewards:broken' raised ZeroDivisionError") as info:
        functions["red"](prompts=["p"], completions=["c"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_an_import_that_exits_is_a_value_error(tmp_path):
    from peft_palora.alignment.front import load_reward_functions

    (tmp_path / "exits.py").write_text("raise SystemExit(3)\n")
    with pytest.raises(ValueError, match="importing .* failed \\(SystemExit: 3\\)"):
        load_reward_functions([f"red={tmp_path / 'exits.py'}:red"], ["red"])


def test_reward_front_report_writes_what_evaluate_reward_front_returns(tmp_path):
    import json

    import pandas as pd

    from peft_palora.alignment.front import reward_front_report

    torch.manual_seed(5)
    config = PaLoRAConfig(task_names=["red", "blue"], r=4, palora_alpha=16, target_modules=["q_proj", "v_proj"],
                          init_weights=False, task_type="CAUSAL_LM")
    policy = get_peft_model(make_model("llama", seed=1), config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, summary = evaluate_reward_front(policy, PROMPTS, reward_funcs(), 3, processing_class=make_tokenizer(),
                                                  max_new_tokens=4)
        report = reward_front_report(policy, PROMPTS, reward_funcs(), 3, tmp_path / "out",
                                     processing_class=make_tokenizer(), max_new_tokens=4)
    out = tmp_path / "out"
    pd.testing.assert_frame_equal(pd.read_csv(out / "front.csv"), expected, check_exact=False, rtol=1e-12)
    stored = json.loads((out / "front.json").read_text())
    assert stored == {key: value for key, value in report.items()
                      if key not in ("table", "json", "completions", "plots")}
    assert stored["hypervolume"] == pytest.approx(summary["hypervolume"], rel=1e-12)
    assert stored["reference"] == pytest.approx(summary["reference"])
    assert stored["num_prompts"] == 2 and stored["max_new_tokens"] == 4 and stored["metric"] == "reward"
    assert len(stored["front"]) == 3
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [row["completion"] for row in rows] == summary["completions"]
    grid = simplex_grid(2, 3).tolist()
    assert [row["preference"] for row in rows] == [grid[k] for k in range(3) for _ in PROMPTS]
    assert [row["prompt"] for row in rows] == PROMPTS * 3
    assert report["plots"] == [str(out / "front.png"), str(out / "reward_vs_preference.png")]
    for plot in report["plots"]:
        assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_read_prompts(tmp_path):
    import pandas as pd

    from peft_palora.fronts.data import read_prompts

    (tmp_path / "p.txt").write_text("first prompt\n\n  \nsecond one\r\nthird\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second one", "third"]
    assert read_prompts(str(tmp_path / "p.txt"), max_samples=2) == ["first prompt", "second one"]
    pd.DataFrame({"text": ["a", "b c"], "n": [1, 2]}).to_csv(tmp_path / "p.csv", index=False)
    assert read_prompts(str(tmp_path / "p.csv"), column="text") == ["a", "b c"]
    with pytest.raises(ValueError, match="`column`: .* has no column 'prompt'"):
        read_prompts(str(tmp_path / "p.csv"))
    with pytest.raises(TypeError, match="row 0 of column 'n' is a int, not a string"):
        read_prompts(str(tmp_path / "p.csv"), column="n")
    with pytest.raises(ValueError, match="`prompts_file` .* is not a file"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="`max_samples` must be a positive integer"):
        read_prompts(str(tmp_path / "p.txt"), max_samples=0)
