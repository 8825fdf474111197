"""PaLoRA in PEFT's LoRA conversion protocol: `peft.save_as_lora` / `peft.convert_to_lora` at the preference in force.

PEFT converts each layer by a truncated SVD of `get_delta_weight` at the rank passed. At a rank of at least the
layer's T * r the SVD keeps every direction of the delta, so the LoRA equals PaLoRA to float32 SVD rounding: the
bundles are loaded by plain PEFT in a fresh interpreter that never imports `peft_palora` (asserted) and compared
with PaLoRA's outputs at 1e-4 absolute (outputs of order 1). Below that rank the delta is truncated: checked against
an independent float64 SVD (Eckart-Young: the error is the norm of the dropped singular values).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, convert_to_lora, get_peft_model, save_as_lora
from plain_peft import MLP, Mixed, gpt2, llama, run_plain_peft, save_case, with_and_without_adapters
from torch import nn

from peft_palora import PaLoRAConfig

TOL = 1e-4


# name: (factory, how the subprocess rebuilds it, inputs, PaLoRA config, preference set before converting, rank)
# The rank is the largest T * r of the layers: the SVD then keeps the whole delta.
CASES = {
    "mlp_patterns": (
        MLP, "MLP", lambda: {"x": torch.randn(5, 10)},
        dict(num_tasks=3, r=2, palora_alpha=3.0, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 3},
             alpha_pattern={"lin0": 5.0}),
        [0.2, 0.3, 0.5], 9,
    ),
    "gpt2_conv1d": (
        gpt2, "transformers", lambda: {"input_ids": torch.randint(0, 40, (2, 7))},
        dict(num_tasks=2, r=3, palora_alpha=6.0, target_modules=["c_attn", "c_proj"]),
        [0.7, 0.3], 6,
    ),
    "llama": (
        llama, "transformers", lambda: {"input_ids": torch.randint(1, 40, (2, 6))},
        dict(task_names=["a", "b"], r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
        {"a": 0.0, "b": 1.0}, 4,
    ),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("save_as_lora")
    manifest, expected, effects = {}, {}, {}
    for index, (name, (factory, build, make_inputs, config, preference, rank)) in enumerate(CASES.items()):
        base, inputs, manifest[name] = save_case(root, name, index, factory, build, make_inputs)
        model = get_peft_model(base, PaLoRAConfig(init_weights=False, **config)).eval()
        model.set_preference(preference)
        assert model.supports_lora_conversion()  # PeftModel -> PaLoRAModel -> every layer
        manifest[name]["lora"] = str(root / name / "lora")
        save_as_lora(manifest[name]["lora"], model, rank=rank)  # PEFT's own function, at the preference in force
        expected[name], plain = with_and_without_adapters(model, inputs)
        effects[name] = (expected[name] - plain).abs().max().item()
    got = run_plain_peft("lora", manifest, root)  # a fresh interpreter that never imports peft_palora (asserted)
    return {name: (got[name] - expected[name]).abs().max().item() for name in CASES}, effects


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_save_as_lora_loads_in_plain_peft_and_equals_palora(converted, name):
    differences, effects = converted
    print(f"{name}: save_as_lora(rank={CASES[name][5]}) max |LoRA - PaLoRA| = {differences[name]:.2e} "
          f"(adapters change the output by {effects[name]:.2f})")
    assert effects[name] > 1e-2
    assert differences[name] < TOL


def _reference_delta(layer, preference: list[float]) -> torch.Tensor:
    """float64 ``s * sum_t lambda_t B_t A_t`` from the raw parameters, in (out, in) layout."""
    a, b = layer.palora_A["default"].double(), layer.palora_B["default"].double()
    r, s = layer.r["default"], layer.scaling["default"]
    return sum(s * p * b[:, t * r : (t + 1) * r] @ a[t * r : (t + 1) * r] for t, p in enumerate(preference))


def test_convert_to_lora_follows_the_preference_in_force_and_truncates_as_svd():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), PaLoRAConfig(num_tasks=3, r=2, target_modules=["lin0", "lin1"], init_weights=False))
    model.set_preference([0.2, 0.3, 0.5])
    layers = {path: model.base_model.model.get_submodule(path) for path in ("lin0", "lin1")}

    config, state = convert_to_lora(model, rank=6)  # T * r = 6: exact
    assert config.r == config.lora_alpha == 6
    for path, layer in layers.items():
        got = state[f"base_model.model.{path}.lora_B.weight"].double() @ state[
            f"base_model.model.{path}.lora_A.weight"].double()
        assert (got - _reference_delta(layer, [0.2, 0.3, 0.5])).abs().max() < 1e-5

    with model.preference_context([1.0, 0.0, 0.0]):  # a preference in force for this block only
        _, vertex = convert_to_lora(model, rank=6)
    got = vertex["base_model.model.lin0.lora_B.weight"].double() @ vertex["base_model.model.lin0.lora_A.weight"].double()
    assert (got - _reference_delta(layers["lin0"], [1.0, 0.0, 0.0])).abs().max() < 1e-5
    assert model.get_preference().tolist() == pytest.approx([0.2, 0.3, 0.5])  # the default is untouched

    _, truncated = convert_to_lora(model, rank=2)  # below T * r: PEFT keeps the top 2 singular directions
    for path, layer in layers.items():
        reference = _reference_delta(layer, [0.2, 0.3, 0.5])
        singular = torch.linalg.svdvals(reference)
        got = truncated[f"base_model.model.{path}.lora_B.weight"].double() @ truncated[
            f"base_model.model.{path}.lora_A.weight"].double()
        error = torch.linalg.matrix_norm(got - reference).item()
        optimum = singular[2:].norm().item()  # Eckart-Young: the best rank-2 error
        print(f"{path}: rank-2 truncation error {error:.4f} (optimum {optimum:.4f}, delta norm "
              f"{singular.norm().item():.4f})")
        assert optimum > 1e-3 and error == pytest.approx(optimum, rel=1e-4)


def test_layers_that_cannot_convert_say_so():
    torch.manual_seed(0)
    mixed = get_peft_model(Mixed(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["emb", "lin", "conv"]))
    assert mixed.supports_lora_conversion() is False
    refusals = mixed.lora_conversion_refusals()
    assert sorted(refusals) == ["conv", "emb"]
    assert "lora_embedding_A" in refusals["emb"] and "export_lora" in refusals["emb"]
    assert "3-D kernel" in refusals["conv"] and "export_lora" in refusals["conv"]
    assert mixed.base_model.model.lin.supports_lora_conversion()
    assert not mixed.base_model.model.emb.supports_lora_conversion("default")
    with pytest.raises(TypeError, match="Embedding.*ConvNd|ConvNd.*Embedding"):
        convert_to_lora(mixed, rank=2)

    paper = get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3)),
                           PaLoRAConfig(num_tasks=2, r=1, target_modules=["0"], conv_layout="paper"))
    assert "4-D kernel" in paper.lora_conversion_refusals()["0"]

    other = get_peft_model(MLP(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"]))
    assert other.base_model.model.lin0.lora_conversion_refusal("missing") == "it has no PaLoRA adapter 'missing'"
    # (PEFT's PeftModel.supports_lora_conversion drops its adapter_name: ask the tuner)
    assert other.base_model.supports_lora_conversion("missing") is False


def test_trained_base_weights_refuse_conversion_also_after_reload(tmp_path):
    torch.manual_seed(0)
    config = PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"], train_base_weights=True)
    model = get_peft_model(MLP(), config)
    assert model.supports_lora_conversion() is False
    assert "train_base_weights=True" in model.lora_conversion_refusals()["lin0"]
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        save_as_lora(str(tmp_path / "no"), model, rank=4)
    model.save_pretrained(tmp_path / "bundle")
    reloaded = PeftModel.from_pretrained(MLP(), str(tmp_path / "bundle"))
    assert "train_base_weights=True" in reloaded.lora_conversion_refusals()["lin0"]


def test_per_sample_preference_in_force_is_refused():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["lin0"]))
    model.set_preference([[0.5, 0.5], [1.0, 0.0]])
    with pytest.raises(ValueError, match="per-sample"):
        convert_to_lora(model, rank=4)
