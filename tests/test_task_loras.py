"""`export_task_loras`: one plain PEFT LoRA per task, mixed in plain PEFT into any trade-off.

The T task LoRAs are loaded by plain PEFT in a fresh interpreter that never imports `peft_palora` (asserted there),
combined with `add_weighted_adapter(tasks, weights=lambda, combination_type="cat")` as `palora_tasks.json` says, and
the outputs compared with the PaLoRA model's at lambda: vertices and interior points, on a small MLP (with
rank_pattern/alpha_pattern), GPT-2 (transformers' Conv1D) and a tiny Llama (with an embedding adapter).
Tolerance: 1e-5 absolute on float32 outputs of order 1 (the mix and PaLoRA sum the same products in another order).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from peft import get_peft_model
from plain_peft import MLP, gpt2, llama, output, run_plain_peft, save_case
from safetensors.torch import load_file
from transformers import LlamaModel

from peft_palora import PaLoRAConfig
from peft_palora.interop.lora import export_task_loras_from_bundle
from peft_palora.training.multitask import MultiTaskModel, linear_heads, load_task_heads, save_task_heads
from peft_palora.tuner.conversion import TASK_LORAS_INDEX, export_task_loras

TOL = 1e-5


# name: (model factory, how the subprocess rebuilds it, make inputs, PaLoRA config, preferences)
CASES = {
    "mlp": (
        MLP, "MLP", lambda: {"x": torch.randn(5, 10)},
        dict(num_tasks=3, r=2, palora_alpha=3.0, target_modules=["lin0", "lin1"]),
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.6, 0.3], [0.5, 0.0, 0.5]],
    ),
    "mlp_patterns": (
        MLP, "MLP", lambda: {"x": torch.randn(5, 10)},
        dict(num_tasks=2, r=2, palora_alpha=3.0, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 3},
             alpha_pattern={"lin0": 5.0}, palora_dropout=0.1),
        [[1.0, 0.0], [0.0, 1.0], [0.25, 0.75]],
    ),
    "gpt2_conv1d": (
        gpt2, "transformers", lambda: {"input_ids": torch.randint(0, 40, (2, 7))},
        dict(task_names=["short", "long"], r=3, palora_alpha=6.0, target_modules=["c_attn", "c_proj"]),
        [[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]],
    ),
    "llama_embedding": (
        llama, "transformers", lambda: {"input_ids": torch.randint(1, 40, (2, 6))},
        dict(task_names=["a", "b", "c"], r=2, target_modules=["q_proj", "v_proj", "embed_tokens"],
             rank_pattern={"embed_tokens": 4}),
        [[0.0, 0.0, 1.0], [0.2, 0.5, 0.3], [0.0, 0.6, 0.4]],
    ),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Every CASES model's task LoRAs, mixed in ONE fresh interpreter without peft_palora; PaLoRA's outputs."""
    root = tmp_path_factory.mktemp("task_loras")
    manifest, expected, effects, models = {}, {}, {}, {}
    for index, (name, (factory, build, make_inputs, config, preferences)) in enumerate(CASES.items()):
        base, inputs, manifest[name] = save_case(root, name, index, factory, build, make_inputs)
        model = get_peft_model(base, PaLoRAConfig(init_weights=False, **config)).eval()
        loras = str(root / name / "loras")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export_task_loras(loras)  # reached through PeftModel -> PaLoRAModel
        with torch.no_grad():
            for i, preference in enumerate(preferences):
                expected[f"{name}/{i}"] = output(model(**inputs, preference=preference))
            with model.disable_adapter():
                plain = output(model(**inputs))
        effects[name] = min((expected[f"{name}/{i}"] - plain).abs().max().item() for i in range(len(preferences)))
        manifest[name].update(loras=loras, preferences=preferences)
        models[name] = model
    got = run_plain_peft("mix", manifest, root)  # a fresh interpreter that never imports peft_palora (asserted)
    assert got.keys() == expected.keys()
    differences = {key: (got[key] - expected[key]).abs().max().item() for key in expected}
    return differences, manifest, effects, models


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_task_loras_mixed_in_plain_peft_equal_palora(mixed, name):
    differences, _, effects, _ = mixed
    worst = max(value for key, value in differences.items() if key.startswith(f"{name}/"))
    print(f"{name}: max |PEFT cat mix - PaLoRA| = {worst:.2e} over {len(CASES[name][4])} preferences "
          f"(adapters change the output by >= {effects[name]:.2f})")
    assert effects[name] > 1e-2  # the adapters matter: 1000x the tolerance
    assert worst < TOL


def test_task_lora_factors_against_float64_reference(mixed):
    """Each task folder holds exactly s * B_t @ A_t of its task (scale folded in, LoRA scaling 1)."""
    _, manifest, _, models = mixed
    model = models["mlp_patterns"]
    tasks = json.load(open(os.path.join(manifest["mlp_patterns"]["loras"], TASK_LORAS_INDEX)))["tasks"]
    assert tasks == ["task_0", "task_1"]
    for path, r, s in (("lin0", 2, 5.0 / 2), ("lin1", 3, 3.0 / 3)):
        layer = model.base_model.model.get_submodule(path)
        a, b = layer.palora_A["default"].double(), layer.palora_B["default"].double()
        for t, task in enumerate(tasks):
            folder = os.path.join(manifest["mlp_patterns"]["loras"], task)
            tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
            config = json.load(open(os.path.join(folder, "adapter_config.json")))
            lora_a, lora_b = (tensors[f"base_model.model.{path}.lora_{f}.weight"].double() for f in "AB")
            assert lora_a.shape == (r, a.shape[1])
            expected = s * b[:, t * r : (t + 1) * r] @ a[t * r : (t + 1) * r]
            assert (lora_b @ lora_a - expected).abs().max() < 1e-6
            assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2
            assert config["rank_pattern"] == {"^lin1$": 3} and config["alpha_pattern"] == {"^lin1$": 3}


def test_palora_tasks_json(mixed):
    _, manifest, _, _ = mixed
    loras = manifest["llama_embedding"]["loras"]
    index = json.load(open(os.path.join(loras, TASK_LORAS_INDEX)))
    assert index["format"] == "palora_task_loras" and index["version"] == 1
    assert index["tasks"] == ["a", "b", "c"]
    assert sorted(os.listdir(loras)) == sorted(["a", "b", "c", TASK_LORAS_INDEX])
    assert "sum_t lambda_t" in index["rule"]
    assert any("add_weighted_adapter(['a', 'b', 'c'], weights=lambda_" in line and "combination_type='cat'" in line
               for line in index["peft_recipe"])
    assert "weights = lambda itself" in index["weights"]
    assert index["peft_recipe"][-1].startswith("model.eval()")
    assert index["default_preference"] == pytest.approx([1 / 3] * 3)
    assert index["palora"] == {"r": 2, "palora_alpha": 4.0, "num_tasks": 3}
    for task in "abc":
        assert sorted(os.listdir(os.path.join(loras, task))) == ["adapter_config.json", "adapter_model.safetensors"]


def test_multitask_model_exports_task_loras_with_heads(tmp_path):
    torch.manual_seed(0)
    backbone = get_peft_model(MLP(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"], init_weights=False))
    model = MultiTaskModel(backbone, linear_heads(3, {"cls": 2, "reg": 1}), pooling="pooler")
    model.export_task_loras(str(tmp_path))
    index = json.load(open(tmp_path / TASK_LORAS_INDEX))
    assert index["tasks"] == ["cls", "reg"]  # the heads' names when the config has no task_names
    assert {"cls", "reg", "task_heads.safetensors", "multitask_config.json"} <= set(os.listdir(tmp_path))


def test_export_task_loras_from_bundle(tmp_path):
    torch.manual_seed(4)
    base = llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, PaLoRAConfig(task_names=["x", "y"], r=2, target_modules=["q_proj"],
                                              init_weights=False))
    model.save_pretrained(tmp_path / "bundle")
    export_task_loras(model, tmp_path / "direct")
    export_task_loras_from_bundle(tmp_path / "bundle", tmp_path / "loaded", base=str(tmp_path / "base"))
    for task in ("x", "y"):
        first = load_file(tmp_path / "direct" / task / "adapter_model.safetensors")
        second = load_file(tmp_path / "loaded" / task / "adapter_model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match="`bundle` must be an existing folder"):
        export_task_loras_from_bundle(tmp_path / "missing", tmp_path / "out")


def test_refusals(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "out"
    shared = get_peft_model(MLP(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="modules_to_save.*export_lora"):
        shared.export_task_loras(str(out))
    biased = get_peft_model(MLP(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match="bias='all'"):
        biased.export_task_loras(str(out))
    slashed = get_peft_model(MLP(), PaLoRAConfig(task_names=["a/b", "c"], r=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="cannot name a folder"):
        slashed.export_task_loras(str(out))
    cased = get_peft_model(MLP(), PaLoRAConfig(task_names=["Task", "task"], r=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="differ only in case"):
        cased.export_task_loras(str(out))
    with pytest.raises(TypeError, match="PaLoRA"):
        export_task_loras(MLP(), str(out))
    with pytest.raises(TypeError, match="save_directory"):
        shared.base_model.export_task_loras(None)
    assert not out.exists()  # nothing half-written


def test_train_base_weights_refused_with_a_recipe_that_works(tmp_path):
    """The refusal names what works, for a PeftModel and for a MultiTaskModel, and the recipe is run here."""
    torch.manual_seed(5)
    inputs = {"input_ids": torch.randint(1, 40, (2, 6))}
    config = dict(num_tasks=2, r=2, target_modules=["q_proj", "v_proj"], train_base_weights=True, init_weights=False)

    model = get_peft_model(llama(), PaLoRAConfig(**config)).eval()
    with pytest.raises(ValueError, match=r"merge_and_unload\(\)\.save_pretrained\(dir\)") as error:
        model.export_task_loras(str(tmp_path / "no"))
    assert "train_base_weights=True" in str(error.value)
    with pytest.raises(ValueError, match="merge_and_unload"):  # export_lora says the same
        model.export_lora(str(tmp_path / "no"))
    model.set_preference([0.3, 0.7])
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got = LlamaModel.from_pretrained(tmp_path / "merged").eval()(**inputs).last_hidden_state
    assert (got - expected).abs().max() < TOL

    torch.manual_seed(6)
    backbone = get_peft_model(llama(), PaLoRAConfig(**config))
    multi = MultiTaskModel(backbone, linear_heads(16, {"a": 2, "b": 3}), pooling="cls").eval()
    for method in (multi.export_task_loras, multi.export_lora):
        with pytest.raises(ValueError, match=r"merged\.backbone\.save_pretrained\(dir\)") as error:
            method(str(tmp_path / "no"))
        assert "save_task_heads(merged.heads, dir)" in str(error.value)
    assert not (tmp_path / "no").exists()
    # The recipe of the message, step by step.
    multi.set_preference([0.6, 0.4])
    with torch.no_grad():
        expected = multi(**inputs)
    merged = multi.merge_and_unload()
    merged.backbone.save_pretrained(tmp_path / "multi")
    save_task_heads(merged.heads, str(tmp_path / "multi"))
    reloaded = LlamaModel.from_pretrained(tmp_path / "multi").eval()
    heads = load_task_heads(linear_heads(16, {"a": 2, "b": 3}), str(tmp_path / "multi"))
    with torch.no_grad():
        features = reloaded(**inputs).last_hidden_state[:, 0]
        for task in ("a", "b"):
            assert (heads[task](features) - expected[task]).abs().max() < TOL
