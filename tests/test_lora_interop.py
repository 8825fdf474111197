"""PaLoRA <-> standard PEFT LoRA: `export_lora`, `export_lora_from_bundle` and `from_lora_adapters`.

The exported bundles are loaded by plain PEFT in a fresh interpreter that never imports `peft_palora` (asserted), and
its outputs are compared with the PaLoRA model's at the exported preference. Imported LoRAs are compared with the
LoRA models PEFT itself builds from the same bundles: outputs at the vertices, merged weights in between.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from plain_peft import MLP, ConvNet, Grouped, Mixed, gpt2, llama, run_plain_peft, save_case, with_and_without_adapters
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaModel

import peft_palora
from peft_palora import PaLoRAConfig
from peft_palora.interop.lora import export_lora_from_bundle, from_lora_adapters
from peft_palora.tuner.conversion import export_lora

TOL = 1e-5


# name: (model factory, how the subprocess rebuilds it, make inputs, PaLoRA config, preference to export)
EXPORT_CASES = {
    "mlp_patterns": (
        MLP, "MLP", lambda: {"x": torch.randn(5, 10)},
        dict(num_tasks=3, r=2, palora_alpha=3.0, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 3},
             alpha_pattern={"lin0": 5.0}),
        [0.5, 0.0, 0.5],
    ),
    "mlp_bias_and_modules_to_save": (
        MLP, "MLP", lambda: {"x": torch.randn(5, 10)},
        dict(num_tasks=2, r=2, target_modules=["lin0"], bias="all", modules_to_save=["head"]),
        [0.25, 0.75],
    ),
    "mlp_palora_only_bias": (
        MLP, "MLP", lambda: {"x": torch.randn(5, 10)},
        dict(num_tasks=2, r=1, target_modules=["lin1"], bias="palora_only"),
        [0.5, 0.5],
    ),
    "gpt2_conv1d": (
        gpt2, "transformers", lambda: {"input_ids": torch.randint(0, 40, (2, 7))},
        dict(num_tasks=2, r=3, palora_alpha=6.0, target_modules=["c_attn", "c_proj"]),
        [0.3, 0.7],
    ),
    "llama_embedding": (
        llama, "transformers", lambda: {"input_ids": torch.randint(1, 40, (2, 6))},
        dict(task_names=["a", "b", "c"], r=2, target_modules=["q_proj", "v_proj", "embed_tokens"],
             rank_pattern={"embed_tokens": 4}),
        {"a": 0.0, "b": 0.6, "c": 0.4},
    ),
    "conv2d_conv1d": (
        ConvNet, "ConvNet", lambda: {"x": torch.randn(2, 3, 8, 8)},
        dict(num_tasks=2, r=2, palora_alpha=4.0, target_modules=["conv", "point", "conv1d", "fc"]),
        [0.0, 1.0],
    ),
}


def _simulate_training(model: nn.Module) -> None:
    """Change what `bias="all"` and `modules_to_save` would train, so the bundle must carry it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "palora_" not in name:
                param.add_(torch.randn_like(param) * 0.3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every EXPORT_CASES model exported, loaded in ONE fresh interpreter without peft_palora; the max differences."""
    root = tmp_path_factory.mktemp("export")
    manifest, expected, effects = {}, {}, {}
    for index, (name, (factory, build, make_inputs, config, preference)) in enumerate(EXPORT_CASES.items()):
        base, inputs, manifest[name] = save_case(root, name, index, factory, build, make_inputs)
        model = get_peft_model(base, PaLoRAConfig(init_weights=False, **config)).eval()
        _simulate_training(model)
        manifest[name]["lora"] = str(root / name / "lora")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_lora(model, manifest[name]["lora"], preference=preference)
        model.set_preference(preference)
        expected[name], plain = with_and_without_adapters(model, inputs)
        effects[name] = (expected[name] - plain).abs().max().item()
    got = run_plain_peft("lora", manifest, root)  # a fresh interpreter that never imports peft_palora (asserted)
    differences = {name: (got[name] - expected[name]).abs().max().item() for name in EXPORT_CASES}
    return differences, manifest, effects


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_loads_in_plain_peft_and_matches(exported, name):
    differences, _, effects = exported
    print(f"{name}: max |LoRA - PaLoRA| = {differences[name]:.2e} (adapters change the output by {effects[name]:.2f})")
    assert effects[name] > 1e-2  # the adapters (and carried biases/modules) matter: 1000x the tolerance
    assert differences[name] < TOL


def test_export_bundle_layout(exported):
    _, manifest, _ = exported
    lora_dir = manifest["mlp_patterns"]["lora"]
    config = json.load(open(os.path.join(lora_dir, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and not config["use_rslora"]
    # preference (0.5, 0, 0.5): task 2 dropped, so lin0 has rank 2*2=4, lin1 2*3=6
    tensors = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
    assert tensors["base_model.model.lin0.lora_A.weight"].shape == (4, 10)
    assert tensors["base_model.model.lin1.lora_B.weight"].shape == (12, 6)
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert config["rank_pattern"] == {"^lin1$": 6} and config["alpha_pattern"] == {"^lin1$": 6}
    assert sorted(config["target_modules"]) == ["lin0", "lin1"]
    embed = load_file(os.path.join(manifest["llama_embedding"]["lora"], "adapter_model.safetensors"))
    assert embed["base_model.model.embed_tokens.lora_embedding_A"].shape == (8, 40)  # 2 non-zero tasks * rank 4
    extras = load_file(os.path.join(manifest["mlp_bias_and_modules_to_save"]["lora"], "adapter_model.safetensors"))
    assert "base_model.model.head.weight" in extras and "base_model.model.lin0.base_layer.bias" in extras


def test_export_factors_against_float64_reference(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), PaLoRAConfig(num_tasks=3, r=2, palora_alpha=3.0, target_modules=["lin0"],
                                               init_weights=False))
    export_lora(model, tmp_path, preference=[0.2, 0.0, 0.8])
    layer = model.base_model.model.lin0
    a, b = layer.palora_A["default"].double(), layer.palora_B["default"].double()
    expected = 1.5 * (0.2 * b[:, 0:2] @ a[0:2] + 0.8 * b[:, 4:6] @ a[4:6])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    lora_a, lora_b = (tensors[f"base_model.model.lin0.lora_{f}.weight"].double() for f in "AB")
    got = lora_b @ lora_a
    assert (got - expected).abs().max() < 1e-6


def test_export_uses_preference_in_force_and_tuner(tmp_path):
    torch.manual_seed(1)
    model = get_peft_model(MLP(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"], init_weights=False))
    model.set_preference([0.9, 0.1])
    export_lora(model, tmp_path / "a")
    export_lora(model.base_model, tmp_path / "b", preference=[0.9, 0.1])  # the tuner works too
    from peft_palora.training.multitask import MultiTaskModel, linear_heads

    export_lora(MultiTaskModel(model, linear_heads(3, {"a": 2, "b": 2})), tmp_path / "c")  # and its backbone
    first = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for other in ("b", "c"):
        second = load_file(tmp_path / other / "adapter_model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_export_target_modules_avoid_suffix_collisions(tmp_path):
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.block = nn.Module()
            self.block.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.block.lin(self.lin(x))

    model = get_peft_model(Nested(), PaLoRAConfig(num_tasks=2, r=1, target_modules=r"^lin$", init_weights=False))
    export_lora(model, tmp_path, preference=[0.5, 0.5])
    config = LoraConfig.from_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(Nested(), str(tmp_path))
    adapted = [name for name, m in loaded.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert adapted == ["lin"], (config.target_modules, adapted)


def test_export_refusals(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="per-sample"):
        export_lora(model, tmp_path, preference=[[0.5, 0.5], [1.0, 0.0]])
    with pytest.raises(ValueError, match="sum"):
        export_lora(model, tmp_path, preference=[0.5, 0.6])
    with pytest.raises(TypeError, match="PaLoRA"):
        export_lora(MLP(), tmp_path)
    trained_base = get_peft_model(
        MLP(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"], train_base_weights=True)
    )
    with pytest.raises(ValueError, match="merge_and_unload"):
        export_lora(trained_base, tmp_path)
    grouped = get_peft_model(Grouped(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["conv"]))
    with pytest.raises(ValueError, match="groups=2"):
        export_lora(grouped, tmp_path)
    assert not os.listdir(tmp_path)  # nothing half-written


def test_export_warns_once_for_servers(tmp_path):
    torch.manual_seed(0)
    linear = get_peft_model(MLP(), PaLoRAConfig(num_tasks=2, r=8, target_modules=["lin0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_lora(linear, tmp_path / "quiet", preference=[1.0, 0.0])  # rank 8 on a linear layer: servable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_lora(linear, tmp_path / "rank16", preference=[0.5, 0.5])  # rank 16: vLLM's default limit
    wide = get_peft_model(MLP(), PaLoRAConfig(num_tasks=3, r=8, target_modules=["lin0"]))
    with pytest.warns(UserWarning) as record:
        export_lora(wide, tmp_path / "wide", preference=[0.2, 0.3, 0.5])
    assert len(record) == 1 and "max-lora-rank 32" in str(record[0].message)
    emb = get_peft_model(Mixed(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["emb", "conv"]))
    with pytest.warns(UserWarning, match="conv layers and embedding layers") as record:
        export_lora(emb, tmp_path / "emb", preference=[0.5, 0.5])
    assert len(record) == 1


# ---- export from a saved bundle -------------------------------------------------------------------------------------


def test_export_lora_from_bundle(tmp_path):
    torch.manual_seed(3)
    base = llama()
    base.save_pretrained(tmp_path / "base")
    base = LlamaModel.from_pretrained(tmp_path / "base")  # PEFT records its name_or_path in the bundle
    model = get_peft_model(base, PaLoRAConfig(num_tasks=2, r=2, target_modules=["q_proj", "v_proj"],
                                              init_weights=False))
    model.save_pretrained(tmp_path / "bundle")
    export_lora(model, tmp_path / "direct", preference=[0.7, 0.3])
    export_lora_from_bundle(tmp_path / "bundle", tmp_path / "via_config", preference=[0.7, 0.3])
    export_lora_from_bundle(str(tmp_path / "bundle"), str(tmp_path / "via_base"), (0.7, 0.3),
                            base=str(tmp_path / "base"))
    direct = load_file(tmp_path / "direct" / "adapter_model.safetensors")
    for other in ("via_config", "via_base"):
        got = load_file(tmp_path / other / "adapter_model.safetensors")
        assert got.keys() == direct.keys()
        assert max((got[k] - direct[k]).abs().max().item() for k in got) == 0.0
    export_lora_from_bundle(tmp_path / "bundle", tmp_path / "from_text", preference="0.7, 0.3")
    got = load_file(tmp_path / "from_text" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], direct[k]) for k in direct)
    with pytest.raises(ValueError, match="not a number"):
        export_lora_from_bundle(tmp_path / "bundle", tmp_path / "x", preference="0.7,abc")
    with pytest.raises(ValueError, match="sum"):
        export_lora_from_bundle(tmp_path / "bundle", tmp_path / "x", preference="0.7,0.7")
    with pytest.raises(ValueError, match="no PaLoRA bundle"):
        export_lora_from_bundle(tmp_path / "direct", tmp_path / "x")
    with pytest.raises(ValueError, match="existing folder"):
        export_lora_from_bundle(tmp_path / "missing", tmp_path / "x")


# ---- import -------------------------------------------------------------------------------------------------------


LORA_SETTINGS = {
    "small": dict(r=2, lora_alpha=3),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=3, lora_alpha=1, rank_pattern={"lin": 5}, alpha_pattern={"conv": 7}),
}
MIXED_TARGETS = ["emb", "lin", "conv"]


@pytest.fixture(scope="module")
def lora_bundles(tmp_path_factory):
    """Three LoRAs of one Mixed base, trained nowhere but randomly initialised by plain PEFT, saved as bundles."""
    root = tmp_path_factory.mktemp("loras")
    torch.manual_seed(0)
    base = Mixed().eval()
    paths, loras = {}, {}
    for index, (task, settings) in enumerate(LORA_SETTINGS.items()):
        torch.manual_seed(100 + index)
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=MIXED_TARGETS, init_lora_weights=False,
                                                              **settings)).eval()
        paths[task] = str(root / task)
        lora.save_pretrained(paths[task])
        loras[task] = lora
    return base, paths, loras


def _tokens() -> torch.Tensor:
    return torch.tensor([[3, 7, 0, 21, 29], [1, 2, 3, 4, 5]])


def test_import_vertices_equal_each_lora(lora_bundles):
    base, paths, loras = lora_bundles
    palora = from_lora_adapters(copy.deepcopy(base), paths).eval()
    assert palora.peft_config["default"].task_names == list(paths)
    x = _tokens()
    worst = 0.0
    for t, task in enumerate(paths):
        one_hot = [1.0 if i == t else 0.0 for i in range(len(paths))]
        with torch.no_grad():
            got, want = palora(x, preference=one_hot), loras[task](x)
        worst = max(worst, (got - want).abs().max().item())
        assert (want - base(x)).abs().max() > 0.1  # the LoRA does change the output
    print(f"vertices: max |PaLoRA - LoRA| = {worst:.2e}")
    assert worst < TOL
    ranks = {name: m.r["default"] for name, m in palora.base_model.model.named_modules() if hasattr(m, "palora_A")}
    assert ranks == {"emb": 4, "lin": 5, "conv": 4}


def test_import_midpoint_is_average_of_lora_deltas(lora_bundles):
    base, paths, loras = lora_bundles
    two = {task: paths[task] for task in ("small", "patterns")}
    palora = from_lora_adapters(copy.deepcopy(base), two)
    palora.set_preference([0.5, 0.5])
    merged = palora.merge_and_unload()
    worst = 0.0
    for name in MIXED_TARGETS:
        lora_deltas = [getattr(loras[task].base_model.model, name).get_delta_weight("default") for task in two]
        expected = getattr(base, name).weight + 0.5 * (lora_deltas[0] + lora_deltas[1])
        worst = max(worst, (getattr(merged, name).weight - expected).abs().max().item())
    print(f"midpoint: max |W(0.5, 0.5) - (W + mean LoRA delta)| = {worst:.2e}")
    assert worst < TOL


def test_import_trains_including_padded_directions(lora_bundles):
    base, paths, _ = lora_bundles
    palora = from_lora_adapters(copy.deepcopy(base), {"a": paths["small"], "b": paths["rslora"]}, palora_dropout=0.0)
    trainable = [n for n, p in palora.named_parameters() if p.requires_grad]
    assert trainable and all("palora_" in n for n in trainable)
    palora(_tokens(), preference=[0.5, 0.5]).pow(2).mean().backward()
    b = palora.base_model.model.lin.palora_B["default"]  # rank 4: task "a" (rank 2) padded by two columns
    assert b.grad[:, 2:4].abs().sum() > 0  # padded directions receive gradient (their A rows are not zero)
    assert torch.count_nonzero(b.detach()[:, 2:4]) == 0  # ... and start at zero, keeping the vertex exact


def test_export_import_round_trip(tmp_path):
    torch.manual_seed(5)
    base = Mixed().eval()
    original = get_peft_model(copy.deepcopy(base), PaLoRAConfig(task_names=["x", "y"], r=2, palora_alpha=3.0,
                                                                target_modules=MIXED_TARGETS, init_weights=False))
    original.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_lora(original, tmp_path / "x", preference={"x": 1.0, "y": 0.0})
        export_lora(original, tmp_path / "y", preference={"x": 0.0, "y": 1.0})
    rebuilt = from_lora_adapters(copy.deepcopy(base), {"x": tmp_path / "x", "y": tmp_path / "y"}).eval()
    x = _tokens()
    worst = 0.0
    for preference in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.3, 0.7]):
        with torch.no_grad():
            difference = rebuilt(x, preference=preference) - original(x, preference=preference)
        worst = max(worst, difference.abs().max().item())
    print(f"round trip: max difference over 4 preferences = {worst:.2e}")
    assert worst < TOL


# ---- import refusals ----------------------------------------------------------------------------------------------


def _lora_bundle(path, model, **settings):
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings))
    lora.save_pretrained(str(path))
    return str(path)


def test_import_input_validation(tmp_path, lora_bundles):
    base, paths, _ = lora_bundles
    with pytest.raises(ValueError, match="at least two"):
        from_lora_adapters(copy.deepcopy(base), {})
    with pytest.raises(ValueError, match="at least two"):
        from_lora_adapters(copy.deepcopy(base), {"only": paths["small"]})
    with pytest.raises(TypeError, match="mapping"):
        from_lora_adapters(copy.deepcopy(base), [paths["small"], paths["rslora"]])
    with pytest.raises(ValueError, match="task names"):
        from_lora_adapters(copy.deepcopy(base), {1: paths["small"], "b": paths["rslora"]})
    with pytest.raises(ValueError, match="not an existing folder"):
        from_lora_adapters(copy.deepcopy(base), {"a": paths["small"], "b": str(tmp_path / "nope")})
    with pytest.raises(TypeError, match="nn.Module"):
        from_lora_adapters("bert", {"a": paths["small"], "b": paths["rslora"]})
    with pytest.raises(ValueError, match="cannot be overridden"):
        from_lora_adapters(copy.deepcopy(base), {"a": paths["small"], "b": paths["rslora"]}, target_modules=["lin"])
    with pytest.raises(TypeError, match="Unknown PaLoRAConfig field"):
        from_lora_adapters(copy.deepcopy(base), {"a": paths["small"], "b": paths["rslora"]}, lora_alpha=3)
    palora_bundle = tmp_path / "palora"
    palora = get_peft_model(copy.deepcopy(base), PaLoRAConfig(num_tasks=2, target_modules=["lin"]))
    palora.save_pretrained(palora_bundle)
    with pytest.raises(ValueError, match=r"palora.*not a LoRA bundle: peft_type is 'PALORA'"):
        from_lora_adapters(copy.deepcopy(base), {"a": paths["small"], "b": palora_bundle})
    pickled = tmp_path / "pickled"
    os.makedirs(pickled)
    with open(pickled / "adapter_config.json", "w") as handle:
        json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 2}, handle)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never loaded"):
        from_lora_adapters(copy.deepcopy(base), {"a": paths["small"], "b": pickled})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(use_dora=True), "use_dora"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(bias="all"), "bias"),
        (dict(modules_to_save=["conv"]), "modules_to_save"),
    ],
)
def test_import_refuses_features(tmp_path, lora_bundles, settings, message):
    base, paths, _ = lora_bundles
    targets = ["lin", "emb"] if "modules_to_save" in settings else ["lin", "conv"]
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=targets, init_lora_weights=False, **settings)
    lora = get_peft_model(copy.deepcopy(base), config)
    if "modules_to_save" in settings:
        with torch.no_grad():  # as if the saved module had been trained
            lora.base_model.model.conv.modules_to_save["default"].weight.add_(1.0)
    bad = str(tmp_path / "bad")
    lora.save_pretrained(bad)
    with pytest.raises(ValueError, match=message):
        from_lora_adapters(copy.deepcopy(base), {"good": paths["small"], "bad": bad})


def test_import_refuses_mismatched_targets_and_bases(tmp_path, lora_bundles):
    base, paths, _ = lora_bundles
    fewer = _lora_bundle(tmp_path / "fewer", copy.deepcopy(base), r=2, target_modules=["lin", "conv"])
    with pytest.raises(ValueError, match=r"fewer.*lacks \['emb'\]"):
        from_lora_adapters(copy.deepcopy(base), {"a": paths["small"], "b": fewer})
    class Wider(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 8)
            self.lin = nn.Linear(8, 9)
            self.conv = nn.Conv1d(8, 6, kernel_size=3)

    other = _lora_bundle(tmp_path / "other", Wider(), r=2, target_modules=MIXED_TARGETS)
    with pytest.raises(ValueError, match=r"other.*'lin'.*another base model"):
        from_lora_adapters(copy.deepcopy(base), {"a": paths["small"], "b": other})
    grouped = _lora_bundle(tmp_path / "grouped", Grouped(), r=2, target_modules=["conv"])
    grouped_too = _lora_bundle(tmp_path / "grouped2", Grouped(), r=4, target_modules=["conv"])
    with pytest.raises(ValueError, match="groups=2"):
        from_lora_adapters(Grouped(), {"a": grouped, "b": grouped_too})


def test_import_accepts_lora_with_saved_embedding_base(tmp_path):
    """PEFT saves a targeted embedding's (unchanged) base weight next to the factors; that copy is accepted."""
    torch.manual_seed(2)
    base = llama().eval()
    bundles = {}
    for task in ("a", "b"):
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"],
                                                              init_lora_weights=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora.save_pretrained(tmp_path / task, save_embedding_layers=True)
        bundles[task] = tmp_path / task
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert any("lora_" not in key for key in keys)  # the base embedding copy is there
    palora = from_lora_adapters(copy.deepcopy(base), bundles).eval()
    lora_a = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    ids = torch.randint(1, 40, (2, 5))
    with torch.no_grad():
        got = palora(input_ids=ids, preference=[1.0, 0.0]).last_hidden_state
        diff = got - lora_a(input_ids=ids).last_hidden_state
    assert diff.abs().max() < TOL


def test_public_names():
    assert peft_palora.interop.lora.__all__ == ["export_lora", "export_lora_from_bundle", "from_lora_adapters"]
