"""The PaLoRA tuner on custom modules and tiny transformers models: maths, per-sample preferences, merging, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import ALL_CASES, CUSTOM_CASES, MLP, make_config, reference_model

import peft_palora
from peft_palora import palora_layers

PREFERENCES = [[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.1, 0.2, 0.7]]


def _build(case, seed=0, **config_kwargs):
    torch.manual_seed(seed)
    base = case.make_model().eval()
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, make_config(case, **config_kwargs)).eval()
    return pristine, model


def _run(case, model, inputs, **kwargs):
    return case.output(model(**inputs, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_output_equals_independent_recomputation(case):
    pristine, model = _build(case)
    torch.manual_seed(1)
    inputs = case.make_inputs(3)
    assert palora_layers(model), "nothing was targeted"
    for pref in PREFERENCES:
        model.set_preference(pref)
        expected = case.output(reference_model(pristine, model, torch.tensor(pref))(**inputs))
        with torch.no_grad():
            got = _run(case, model, inputs)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_per_sample_batch_equals_rows_one_at_a_time(case):
    _, model = _build(case)
    torch.manual_seed(2)
    inputs = case.make_inputs(3)
    prefs = torch.tensor(PREFERENCES)
    with torch.no_grad():
        batched = _run(case, model, inputs, preference=prefs)
        rows = [
            _run(case, model, {k: v[i : i + 1] for k, v in inputs.items()}, preference=prefs[i]) for i in range(3)
        ]
    torch.testing.assert_close(batched, torch.cat(rows), atol=1e-5, rtol=1e-4)
    # the per-call preference did not stick
    torch.testing.assert_close(model.get_preference(), torch.full((3,), 1 / 3))


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_merged_equals_unmerged_and_unmerge_restores(case):
    _, model = _build(case)
    torch.manual_seed(3)
    inputs = case.make_inputs(2)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.set_preference([0.2, 0.5, 0.3])
    with torch.no_grad():
        unmerged = _run(case, model, inputs)
        model.merge_adapter()
        torch.testing.assert_close(_run(case, model, inputs), unmerged, atol=2e-5, rtol=1e-4)
        # a new preference while merged re-merges at it (subtract, add); unmerge subtracts the delta again
        model.set_preference([1.0, 0.0, 0.0])
        merged_at_corner = _run(case, model, inputs)
        merged_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.unmerge_adapter()
        torch.testing.assert_close(merged_at_corner, _run(case, model, inputs), atol=2e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        # No copy of the weights is kept: restored to within float32 rounding, relative error < 1e-6 (relative to
        # the larger operand of the subtraction, the weight or its delta, as for any float sum).
        before = weights_before[name].double()
        delta = merged_weights[name].double() - before
        error = (param.double() - before).norm() / torch.maximum(before.norm(), delta.norm()).clamp_min(1e-30)
        assert error < 1e-6, (name, float(error))


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_merge_and_unload_gives_base_architecture_with_same_outputs(case):
    _, model = _build(case)
    inputs = case.make_inputs(2)
    model.set_preference([0.6, 0.1, 0.3])
    with torch.no_grad():
        expected = _run(case, model, inputs)
        merged = model.merge_and_unload()
        assert not palora_layers(merged)
        torch.testing.assert_close(case.output(merged(**inputs)), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CUSTOM_CASES, ids=lambda c: c.name)
def test_zero_preference_gives_zero_gradient_to_that_task(case):
    _, model = _build(case)
    model.train()
    inputs = case.make_inputs(4)
    out = _run(case, model, inputs, preference=[0.0, 0.4, 0.6])
    out.float().pow(2).mean().backward()
    for layer in palora_layers(model):
        r = layer.r["default"]
        grad_a, grad_b = layer.palora_A["default"].grad, layer.palora_B["default"].grad
        groups = getattr(layer, "groups", 1)
        a_rows = grad_a.view(groups, 3 * r, *grad_a.shape[1:])
        assert torch.count_nonzero(a_rows[:, :r]) == 0
        assert torch.count_nonzero(grad_b[:, :r]) == 0
        assert torch.count_nonzero(a_rows[:, r:]) > 0 and torch.count_nonzero(grad_b[:, r:]) > 0


def test_per_sample_zero_preference_rows_give_zero_gradient():
    _, model = _build(CUSTOM_CASES[0])
    x = torch.randn(2, 10)
    # task 0 has weight 0 in both rows -> its adapter gets no gradient even with per-sample mixing
    out = model(x=x, preference=torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]))
    out.sum().backward()
    layer = palora_layers(model)[0]
    assert torch.count_nonzero(layer.palora_A["default"].grad[:2]) == 0
    assert torch.count_nonzero(layer.palora_B["default"].grad[:, :2]) == 0


def test_init_weights_true_is_the_base_model_at_every_preference():
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(5, 10)
    expected = base(x)
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin0", "lin1"]))
    for pref in ([1.0, 0.0], [0.3, 0.7]):
        torch.testing.assert_close(model(x=x, preference=pref), expected)


def test_frozen_base_by_default_and_trainable_in_paper_mode():
    model = get_peft_model(MLP(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin0"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.lin0.palora_A.default", "base_model.model.lin0.palora_B.default"}

    model = get_peft_model(MLP(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin0"], train_base_weights=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.lin0.palora_A.default",
        "base_model.model.lin0.palora_B.default",
        "base_model.model.lin0.base_layer.weight",
        "base_model.model.lin0.base_layer.bias",
    }


def test_adapter_param_groups_give_adapters_lr_times_num_tasks():
    model = get_peft_model(
        MLP(), peft_palora.PaLoRAConfig(num_tasks=3, target_modules=["lin0"], train_base_weights=True)
    )
    groups = peft_palora.adapter_param_groups(model, lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["palora_adapters"]["lr"] == pytest.approx(3e-3)
    assert by_name["shared"]["lr"] == pytest.approx(1e-3)
    adapter_ids = {id(p) for p in by_name["palora_adapters"]["params"]}
    layer = palora_layers(model)[0]
    assert adapter_ids == {id(layer.palora_A["default"]), id(layer.palora_B["default"])}
    assert len(by_name["shared"]["params"]) == 2  # the trainable base weight and bias
    torch.optim.AdamW(groups)  # groups are accepted by a real optimizer


def test_disable_adapter_runs_the_base_weights_alone():
    pristine, model = _build(CUSTOM_CASES[0])
    x = torch.randn(3, 10)
    with model.disable_adapter():
        torch.testing.assert_close(model(x=x), pristine(x))
    assert not torch.allclose(model(x=x), pristine(x))


def test_dict_preferences_by_task_name():
    model = get_peft_model(MLP(), peft_palora.PaLoRAConfig(task_names=["digits", "parity"], target_modules=["lin0"]))
    assert model.peft_config["default"].num_tasks == 2
    model.set_preference({"parity": 0.25, "digits": 0.75})
    torch.testing.assert_close(model.get_preference(), torch.tensor([0.75, 0.25]))


def test_preference_context_restores_previous_preference():
    model = get_peft_model(MLP(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin0"]))
    model.set_preference([0.9, 0.1])
    with model.preference_context([0.0, 1.0]):
        torch.testing.assert_close(model.get_preference(), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(model.get_preference(), torch.tensor([0.9, 0.1]))


def test_two_named_adapters_keep_their_own_preferences():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin0"], init_weights=False))
    model.add_adapter("three", peft_palora.PaLoRAConfig(num_tasks=3, target_modules=["lin0"], init_weights=False))
    model.set_preference([0.2, 0.8])
    model.set_adapter("three")
    model.set_preference([0.1, 0.1, 0.8])
    torch.testing.assert_close(model.get_preference("default"), torch.tensor([0.2, 0.8]))
    torch.testing.assert_close(model.get_preference(), torch.tensor([0.1, 0.1, 0.8]))
    x = torch.randn(2, 10)
    out_three = model(x=x)
    model.set_adapter("default")
    assert not torch.allclose(model(x=x), out_three)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([0.5, 0.5, 0.0], "length|entries|num_tasks|expected"),
        ([0.7, 0.7], "sum"),
        ([1.5, -0.5], "negative"),
        ([float("nan"), 1.0], "finite|nan|NaN"),
        ([float("inf"), 0.0], "finite|inf"),
        ("ab", "string|str"),
        ({"a": 1.0}, "missing|task"),
        ({"a": 0.5, "b": 0.5, "c": 0.0}, "unknown|task"),
    ],
)
def test_bad_preferences_raise_value_error_and_change_nothing(bad, message):
    model = get_peft_model(MLP(), peft_palora.PaLoRAConfig(task_names=["a", "b"], target_modules=["lin0"]))
    model.set_preference([0.3, 0.7])
    with pytest.raises((ValueError, TypeError), match=message):
        model.set_preference(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        model(x=torch.randn(2, 10), preference=bad)
    torch.testing.assert_close(model.get_preference(), torch.tensor([0.3, 0.7]))


def test_per_sample_preference_with_wrong_batch_size_raises():
    model = get_peft_model(MLP(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="has 2 rows but the model was called with 3 samples"):
        model(x=torch.randn(3, 10), preference=torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    model.set_preference(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="has 2 rows but the model was called with 3 samples"):
        model(x=torch.randn(3, 10))


def test_per_sample_preference_cannot_be_merged():
    model = get_peft_model(MLP(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin0"]))
    weight = palora_layers(model)[0].get_base_layer().weight.detach().clone()
    model.set_preference(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="per-sample"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="per-sample"):
        model.merge_and_unload()
    assert torch.equal(palora_layers(model)[0].get_base_layer().weight, weight)
    model.set_preference([0.5, 0.5])
    model.merge_adapter()
    with pytest.raises(ValueError, match="per-sample"):
        model.set_preference(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    torch.testing.assert_close(model.get_preference(), torch.tensor([0.5, 0.5]))


def test_preference_on_another_dtype_just_works():
    _, model = _build(CUSTOM_CASES[0])
    x = torch.randn(2, 10)
    expected = model(x=x, preference=[0.25, 0.25, 0.5])
    torch.testing.assert_close(model(x=x, preference=torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)), expected)


def test_unsupported_target_raises_type_error():
    class WithNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(x)

    with pytest.raises(TypeError, match="not supported by PaLoRA"):
        get_peft_model(WithNorm(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["norm"]))


def test_bf16_base_keeps_fp32_adapters_and_finite_outputs():
    torch.manual_seed(0)
    base = MLP().to(torch.bfloat16)
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin0", "lin1"], init_weights=False))
    layer = palora_layers(model)[0]
    assert layer.palora_A["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype
    out = model(x=torch.randn(3, 10, dtype=torch.bfloat16), preference=[1e-8, 1 - 1e-8])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(layer.palora_A["default"].grad).all()


def test_unknown_target_modules_error_lists_what_exists():
    with pytest.raises(ValueError, match=r"not found in the base model.*PaLoRA can adapt: \['lin0', 'lin1'\]"):
        get_peft_model(MLP(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["lin9"]))


def test_default_target_modules_follow_lora_for_known_architectures():
    from transformers import BertConfig, BertModel

    base = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=20))
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2))
    assert model.peft_config["default"].target_modules == {"query", "value"}
    assert len(palora_layers(model)) == 2


def test_generate_with_per_sample_preferences_and_beam_search():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2, r=2, init_weights=False, task_type="CAUSAL_LM"))
    ids = torch.randint(1, 60, (2, 4))
    prefs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0)
    together = model.generate(input_ids=ids, preference=prefs, **kwargs)
    alone = [model.generate(input_ids=ids[i : i + 1], preference=prefs[i], **kwargs) for i in range(2)]
    assert torch.equal(together, torch.cat(alone))


def test_per_sample_batch_is_checked_for_task_typed_models_too():
    from transformers import BertConfig, BertForSequenceClassification

    base = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=20))
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2, task_type="SEQ_CLS"))
    prefs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # 4 samples and 2 preference rows: a multiple, which must not be silently repeated
    with pytest.raises(ValueError, match="2 rows but the model was called with 4 samples"):
        model(input_ids=torch.randint(1, 60, (4, 5)), preference=prefs)
    assert model(input_ids=torch.randint(1, 60, (2, 5)), preference=prefs).logits.shape == (2, 2)
