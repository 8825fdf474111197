"""Saving and loading PaLoRA bundles: safetensors, fresh processes, both base-weight modes, clear mismatch errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertConfig, BertModel

import peft_palora
from peft_palora import palora_layers
from peft_palora.tuner.bundle import check_local_bundle

PREFS = [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_bert_dir(tmp_path, hidden=16):
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=20))
    path = tmp_path / f"bert{hidden}"
    base.save_pretrained(path)
    return str(path)


def _trained_bundle(tmp_path, train_base_weights):
    base_dir = _tiny_bert_dir(tmp_path)
    base = AutoModel.from_pretrained(base_dir).eval()
    config = peft_palora.PaLoRAConfig(num_tasks=3, r=2, target_modules=["query", "value"], init_weights=False,
                                      train_base_weights=train_base_weights, task_names=["a", "b", "c"])
    model = get_peft_model(base, config).eval()
    if train_base_weights:  # stand-in for training: the base weights moved away from the pretrained ones
        with torch.no_grad():
            for layer in palora_layers(model):
                layer.get_base_layer().weight.add_(0.05 * torch.randn_like(layer.get_base_layer().weight))
    bundle = tmp_path / f"bundle_{train_base_weights}"
    model.save_pretrained(bundle)
    return base_dir, str(bundle), model


def _outputs(model, input_ids):
    with torch.no_grad():
        return {f"pref{i}": model(input_ids=input_ids, preference=p).last_hidden_state for i, p in enumerate(PREFS)}


@pytest.mark.slow
@pytest.mark.parametrize("train_base_weights", [False, True])
def test_reload_in_fresh_process_reproduces_outputs(tmp_path, train_base_weights, one_thread):
    # Bit-for-bit equality across processes needs the same kernels: both sides run on one thread, whatever the
    # thread count the test process happens to have.
    base_dir, bundle, model = _trained_bundle(tmp_path, train_base_weights)
    input_ids = torch.randint(1, 60, (2, 5))
    save_file({"input_ids": input_ids}, str(tmp_path / "inputs.safetensors"))
    expected = _outputs(model, input_ids)

    keys = set(load_file(os.path.join(bundle, "adapter_model.safetensors")))
    assert all(("palora_" in k) or ("base_layer" in k) for k in keys)
    assert any(k.endswith("base_layer.weight") for k in keys) == train_base_weights
    assert json.load(open(os.path.join(bundle, "adapter_config.json")))["peft_type"] == "PALORA"
    assert not os.path.exists(os.path.join(bundle, "adapter_model.bin"))

    script = textwrap.dedent(
        f"""
        import torch, peft_palora
        torch.set_num_threads(1)
        from peft import PeftModel, AutoPeftModel
        from transformers import AutoModel
        from safetensors.torch import load_file, save_file
        ids = load_file({str(tmp_path / "inputs.safetensors")!r})["input_ids"]
        prefs = {PREFS!r}
        out = {{}}
        model = PeftModel.from_pretrained(AutoModel.from_pretrained({base_dir!r}), {bundle!r}).eval()
        auto = AutoPeftModel.from_pretrained({bundle!r}).eval()
        with torch.no_grad():
            for i, p in enumerate(prefs):
                out[f"pref{{i}}"] = model(input_ids=ids, preference=p).last_hidden_state
                out[f"auto{{i}}"] = auto(input_ids=ids, preference=p).last_hidden_state
        save_file(out, {str(tmp_path / "reloaded.safetensors")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    reloaded = load_file(str(tmp_path / "reloaded.safetensors"))
    for i in range(len(PREFS)):
        torch.testing.assert_close(reloaded[f"pref{i}"], expected[f"pref{i}"], atol=0, rtol=0)
        torch.testing.assert_close(reloaded[f"auto{i}"], expected[f"pref{i}"], atol=0, rtol=0)


def test_load_adapter_second_name_and_resume_trainable(tmp_path):
    base_dir, bundle, saved = _trained_bundle(tmp_path, train_base_weights=False)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), bundle, is_trainable=True)
    assert any(p.requires_grad for n, p in model.named_parameters() if "palora_" in n)
    model.load_adapter(bundle, adapter_name="second")
    model.set_adapter("second")
    model.set_preference({"a": 0.1, "b": 0.1, "c": 0.8})
    ids = torch.randint(1, 60, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).last_hidden_state, saved(input_ids=ids, preference=[0.1, 0.1, 0.8]).last_hidden_state
        )


def test_bundle_for_another_base_model_is_refused_and_model_untouched(tmp_path):
    _, bundle, _ = _trained_bundle(tmp_path, train_base_weights=True)
    other = AutoModel.from_pretrained(_tiny_bert_dir(tmp_path, hidden=24))
    before = {id(p): p.detach().clone() for p in other.parameters()}
    with pytest.raises(ValueError, match="does not match the model.*shape"):
        PeftModel.from_pretrained(other, bundle)
    # no base weight was overwritten by the refused bundle
    assert all(torch.equal(p, before[id(p)]) for p in other.parameters() if id(p) in before)


def test_config_with_other_task_count_than_weights_is_refused(tmp_path):
    base_dir, bundle, _ = _trained_bundle(tmp_path, train_base_weights=False)
    config_path = os.path.join(bundle, "adapter_config.json")
    config = json.load(open(config_path))
    config.update(num_tasks=2, task_names=None)
    json.dump(config, open(config_path, "w"))
    with pytest.raises(ValueError, match="num_tasks=2, r=2"):
        PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), bundle)


def test_bundle_missing_a_layer_is_refused(tmp_path):
    base_dir, bundle, _ = _trained_bundle(tmp_path, train_base_weights=False)
    weights_path = os.path.join(bundle, "adapter_model.safetensors")
    weights = load_file(weights_path)
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, weights_path)
    with pytest.raises(ValueError, match="missing from the bundle"):
        PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), bundle)


def test_model_card_is_tagged_palora(tmp_path):
    _, bundle, _ = _trained_bundle(tmp_path, train_base_weights=False)
    card = open(os.path.join(bundle, "README.md")).read()
    assert "library_name: peft" in card and "- palora" in card


def test_interrupted_save_leaves_the_previous_bundle_loadable(tmp_path, monkeypatch):
    import peft.peft_model

    base_dir, bundle, model = _trained_bundle(tmp_path, train_base_weights=False)
    weights = os.path.join(bundle, "adapter_model.safetensors")
    good = open(weights, "rb").read()

    def crash_mid_write(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\x00" * 100)  # a torn write...
        raise KeyboardInterrupt  # ...then the process is interrupted

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash_mid_write)
    with torch.no_grad():
        for layer in palora_layers(model):
            layer.palora_B["default"].add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(bundle)
    assert open(weights, "rb").read() == good
    assert not [name for name in os.listdir(bundle) if name.startswith(".tmp")]
    PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), bundle)  # still loads


def test_pickle_bundles_are_refused(tmp_path):
    _, bundle, model = _trained_bundle(tmp_path, train_base_weights=False)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()


def _base_outputs(model):
    torch.manual_seed(5)
    ids = torch.randint(1, 60, (2, 5))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate_weights", "adapter_model.safetensors is not a readable safetensors file"),
        ("garbage_weights", "adapter_model.safetensors is not a readable safetensors file"),
        ("only_pickle", "does not load the pickle file adapter_model.bin"),
        ("config_not_json", "adapter_config.json is not valid JSON"),
        ("config_unknown_field", "fields PaLoRAConfig does not know: \\['mystery'\\]"),
        ("config_missing_num_tasks", "adapter_config.json is not a valid PaLoRA config: Give `num_tasks`"),
        ("config_bad_rank", "adapter_config.json is not a valid PaLoRA config: `r` must be >= 1"),
        ("config_unknown_peft_type", "adapter_config.json has peft_type 'FOO', which this PEFT installation"),
        ("config_other_rank", "shape of .*query.palora_A.default: bundle \\(6, 16\\), model \\(3, 16\\)"),
        ("config_more_targets", "missing from the bundle \\(its config's target_modules"),
        ("config_fewer_targets", "in the bundle but not in the model"),
    ],
)
def test_damaged_bundles_are_refused_naming_the_file_and_base_model_untouched(tmp_path, damage, message):
    base_dir, bundle, _ = _trained_bundle(tmp_path, train_base_weights=False)
    weights = os.path.join(bundle, "adapter_model.safetensors")
    config_path = os.path.join(bundle, "adapter_config.json")
    config = json.load(open(config_path))
    if damage == "truncate_weights":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
    elif damage == "garbage_weights":
        open(weights, "wb").write(b"not a safetensors file at all")
    elif damage == "only_pickle":
        os.replace(weights, os.path.join(bundle, "adapter_model.bin"))
    elif damage == "config_not_json":
        open(config_path, "w").write("{ num_tasks: 3")
    elif damage == "config_unknown_field":
        json.dump({**config, "mystery": 1}, open(config_path, "w"))
    elif damage == "config_missing_num_tasks":
        json.dump({k: v for k, v in config.items() if k not in ("num_tasks", "task_names")}, open(config_path, "w"))
    elif damage == "config_bad_rank":
        json.dump({**config, "r": 0}, open(config_path, "w"))
    elif damage == "config_unknown_peft_type":
        json.dump({**config, "peft_type": "FOO"}, open(config_path, "w"))
    elif damage == "config_other_rank":
        json.dump({**config, "r": 1}, open(config_path, "w"))
    elif damage == "config_more_targets":
        json.dump({**config, "target_modules": ["query", "value", "key"]}, open(config_path, "w"))
    elif damage == "config_fewer_targets":
        json.dump({**config, "target_modules": ["query"]}, open(config_path, "w"))
    base = AutoModel.from_pretrained(base_dir)
    expected = _base_outputs(base)
    if damage in ("config_not_json", "config_unknown_peft_type"):
        # PEFT reads peft_type itself before any PaLoRA code runs (PaLoRA no longer wraps PEFT's methods), so PEFT's
        # own error comes first, as for any method; PaLoRA's check (the CLI's, `palora info`) still names the file.
        with pytest.raises((ValueError, KeyError)):
            PeftModel.from_pretrained(base, bundle)
        with pytest.raises(ValueError, match=message):
            check_local_bundle(bundle)
    else:
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(base, bundle)
    assert not palora_layers(base)
    torch.testing.assert_close(_base_outputs(base), expected, atol=0, rtol=0)


def test_refused_weights_leave_the_base_model_as_it_was(tmp_path):
    _, bundle, _ = _trained_bundle(tmp_path, train_base_weights=True)
    other = AutoModel.from_pretrained(_tiny_bert_dir(tmp_path, hidden=24))
    expected = _base_outputs(other)
    with pytest.raises(ValueError, match="does not match the model"):
        PeftModel.from_pretrained(other, bundle)
    assert not palora_layers(other) and not hasattr(other, "peft_config")
    torch.testing.assert_close(_base_outputs(other), expected, atol=0, rtol=0)


def test_refused_load_adapter_leaves_the_peft_model_as_it_was(tmp_path):
    base_dir, bundle, _ = _trained_bundle(tmp_path, train_base_weights=False)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), bundle)
    config_path = os.path.join(bundle, "adapter_config.json")
    json.dump({**json.load(open(config_path)), "num_tasks": 2, "task_names": None}, open(config_path, "w"))
    with pytest.raises(ValueError, match="does not match the model"):
        model.load_adapter(bundle, adapter_name="second")
    assert set(model.peft_config) == {"default"}
    assert all(set(layer.palora_A) == {"default"} for layer in palora_layers(model))
