"""The preference travels as data: concurrent calls, inference_mode, gradient checkpointing, rows matched to samples,
and merged models that serve other preferences without touching their weights."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import get_peft_model
from tiny_models import ALL_CASES, CUSTOM_CASES, make_config
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import peft_palora
from peft_palora import palora_layers


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24))
    config = peft_palora.PaLoRAConfig(num_tasks=3, r=2, target_modules=["query", "value", "dense"],
                                      init_weights=False)
    return get_peft_model(base, config).eval()


def test_threads_never_see_each_others_preference_nor_a_concurrent_set_preference():
    """6 threads serve 3 per-call preferences (one per-sample) while a 7th keeps calling set_preference: every answer
    equals the single-threaded one, and the default ends as set_preference last set it."""
    model = tiny_bert()
    torch.manual_seed(1)
    ids = torch.randint(1, 60, (3, 7))
    requests = [
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([0.2, 0.3, 0.5]),
        torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.1, 0.8, 0.1]]),  # per sample
    ]
    with torch.no_grad():
        expected = [model(input_ids=ids, preference=p).last_hidden_state for p in requests]
    defaults = [torch.tensor([0.6, 0.2, 0.2]), torch.tensor([0.0, 1.0, 0.0])]
    mismatches, errors, stop = [], [], threading.Event()

    def serve(index: int) -> None:
        try:
            for _ in range(15):
                with torch.no_grad():
                    out = model(input_ids=ids, preference=requests[index % 3]).last_hidden_state
                if not torch.allclose(out, expected[index % 3], atol=1e-6, rtol=0):
                    mismatches.append(index)
        except Exception as error:  # surfaced below
            errors.append(repr(error))

    def keep_setting() -> None:
        i = 0
        while not stop.is_set():
            model.set_preference(defaults[i % 2])
            i += 1
        model.set_preference(defaults[1])

    setter = threading.Thread(target=keep_setting)
    servers = [threading.Thread(target=serve, args=(i,)) for i in range(6)]
    setter.start()
    for thread in servers:
        thread.start()
    for thread in servers:
        thread.join(timeout=120)
    stop.set()
    setter.join(timeout=30)
    assert not errors, errors
    assert not mismatches, f"{len(mismatches)} answers computed at another preference"
    assert torch.equal(model.get_preference(), defaults[1])


def test_a_call_without_preference_sees_one_default_throughout_while_another_thread_sets_it():
    model = tiny_bert()
    ids = torch.randint(1, 60, (2, 5))
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    with torch.no_grad():
        expected = [model(input_ids=ids, preference=p).last_hidden_state for p in (a, b)]
    stop, bad = threading.Event(), []
    model.set_preference(a)

    def flip() -> None:
        while not stop.is_set():
            model.set_preference(a)
            model.set_preference(b)

    thread = threading.Thread(target=flip)
    thread.start()
    try:
        for _ in range(20):
            with torch.no_grad():
                out = model(input_ids=ids).last_hidden_state
            if not any(torch.allclose(out, e, atol=1e-6, rtol=0) for e in expected):
                bad.append(out)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not bad, "a forward mixed two defaults across its layers"


@pytest.mark.parametrize("train_base_weights", [False, True])
@pytest.mark.parametrize("case", CUSTOM_CASES + ALL_CASES[-2:], ids=lambda c: c.name)
def test_inference_mode_forward_then_training_backward_and_merge(case, train_base_weights):
    torch.manual_seed(0)
    model = get_peft_model(case.make_model(), make_config(case, train_base_weights=train_base_weights))
    inputs = case.make_inputs(2)
    model.set_preference([0.2, 0.5, 0.3])
    model.eval()
    with torch.inference_mode():
        case.output(model(**inputs))
        case.output(model(**inputs, preference=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    model.train()
    out = case.output(model(**inputs, preference=[0.1, 0.1, 0.8]))
    out.float().pow(2).mean().backward()  # would fail on a tensor cached under inference_mode
    assert all(p.grad is not None for n, p in model.named_parameters() if "palora_" in n and p.requires_grad)
    model.eval()
    with torch.inference_mode():
        reference = case.output(model(**inputs)).clone()
    with torch.no_grad():
        model.merge_adapter()
        torch.testing.assert_close(case.output(model(**inputs)), reference, atol=2e-5, rtol=1e-4)
        model.unmerge_adapter()


def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    return get_peft_model(base, config)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_at_the_calls_preference(use_reentrant):
    torch.manual_seed(3)
    ids = torch.randint(1, 64, (2, 6))
    preference = torch.tensor([[0.9, 0.1], [0.3, 0.7]])

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        out = model(input_ids=ids, labels=ids, preference=preference)
        model.set_preference([1.0, 0.0])  # between forward and backward: must not reach the recomputation
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "palora_" in n}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_sequence_first_transformer_layer_pairs_rows_with_samples():
    """nn.TransformerEncoderLayer(batch_first=False) feeds its linears (seq, batch, d); with seq == batch the rows
    must still go to the samples, not to the positions."""
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=False)
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["linear1", "linear2"],
                                                          init_weights=False)).eval()
    assert {layer.batch_dim for layer in palora_layers(model)} == {1}
    x = torch.randn(3, 3, 8)  # (seq=3, batch=3, d)
    prefs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    with torch.no_grad():
        batched = model(x, preference=prefs)
        for i in range(3):
            single = model(x[:, i : i + 1], preference=prefs[i])
            torch.testing.assert_close(batched[:, i : i + 1], single, atol=1e-6, rtol=1e-5)


class FeaturesModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, features):
        return self.proj(features)


def test_rows_are_never_repeated_to_fit_an_input_the_model_cannot_name():
    model = get_peft_model(FeaturesModel(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="has 2 rows but this Linear layer's input has 4 samples along dimension 0"):
        model(features=torch.randn(4, 6), preference=[[1.0, 0.0], [0.0, 1.0]])
    assert model(features=torch.randn(2, 6), preference=[[1.0, 0.0], [0.0, 1.0]]).shape == (2, 4)


def test_generate_expands_per_sample_rows_over_beams_and_returned_sequences():
    model = _llama().eval()
    ids = torch.randint(1, 64, (2, 4))
    prefs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = model.generate(input_ids=ids, preference=prefs, max_new_tokens=3, do_sample=False, num_beams=2,
                         num_return_sequences=2, pad_token_id=0)
    assert out.shape[0] == 4
    for i in range(2):  # each sample's sequences equal a generate of that sample alone at its preference
        alone = model.generate(input_ids=ids[i : i + 1], preference=prefs[i], max_new_tokens=3, do_sample=False,
                               num_beams=2, num_return_sequences=2, pad_token_id=0)
        assert torch.equal(out[2 * i : 2 * i + 2], alone)
    with pytest.raises(ValueError, match="3 rows but the model was called with 2 samples"):
        model.generate(input_ids=ids, preference=torch.tensor([[1.0, 0.0]] * 3), max_new_tokens=2, pad_token_id=0)


@pytest.mark.parametrize("case", CUSTOM_CASES, ids=lambda c: c.name)
def test_merged_model_serves_other_preferences_without_touching_its_weights(case):
    torch.manual_seed(0)
    model = get_peft_model(case.make_model(), make_config(case)).eval()
    inputs = case.make_inputs(2)
    other = [[0.0, 0.2, 0.8], [1.0, 0.0, 0.0]]
    with torch.no_grad():
        expected_shared = case.output(model(**inputs, preference=[0.0, 1.0, 0.0]))
        expected_rows = case.output(model(**inputs, preference=other))
        model.set_preference([0.5, 0.25, 0.25])
        model.merge_adapter()
        merged = {name: p.detach().clone() for name, p in model.named_parameters()}
        torch.testing.assert_close(case.output(model(**inputs, preference=[0.0, 1.0, 0.0])), expected_shared,
                                   atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(case.output(model(**inputs, preference=other)), expected_rows, atol=2e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        assert torch.equal(param, merged[name]), name
    torch.testing.assert_close(model.get_preference(), torch.tensor([0.5, 0.25, 0.25]))


def test_merge_keeps_no_copy_of_the_weights():
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64)), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["0"]))
    model.set_preference([0.3, 0.7])
    model.merge_adapter()
    layer = palora_layers(model)[0]
    sizes = [v.numel() for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    sizes += [v.numel() for d in vars(layer).values() if isinstance(d, dict) for v in d.values()
              if isinstance(v, torch.Tensor)]
    assert max(sizes, default=0) <= 2  # the merged preference: T floats, no weight-sized tensor
    torch.testing.assert_close(layer.merged_preferences["default"], torch.tensor([0.3, 0.7]))


def test_preference_context_is_local_to_its_thread_and_leaves_the_default():
    model = tiny_bert()
    ids = torch.randint(1, 60, (2, 5))
    with torch.no_grad():
        at_corner = model(input_ids=ids, preference=[0.0, 0.0, 1.0]).last_hidden_state
        seen_elsewhere = []
        with model.preference_context([0.0, 0.0, 1.0]):
            torch.testing.assert_close(model(input_ids=ids).last_hidden_state, at_corner)
            thread = threading.Thread(target=lambda: seen_elsewhere.append(model.get_preference()))
            thread.start()
            thread.join()
        torch.testing.assert_close(seen_elsewhere[0], torch.full((3,), 1 / 3))
        torch.testing.assert_close(model.get_preference(), torch.full((3,), 1 / 3))


def test_a_list_of_task_dicts_is_a_per_sample_preference():
    base = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=24))
    model = get_peft_model(base, peft_palora.PaLoRAConfig(task_names=["a", "b"], r=2, target_modules=["query"],
                                                          init_weights=False)).eval()
    ids = torch.randint(1, 60, (2, 5))
    with torch.no_grad():
        by_dicts = model(input_ids=ids, preference=[{"a": 1.0, "b": 0.0}, {"b": 0.75, "a": 0.25}]).last_hidden_state
        by_rows = model(input_ids=ids, preference=[[1.0, 0.0], [0.25, 0.75]]).last_hidden_state
    torch.testing.assert_close(by_dicts, by_rows, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"preference\[1\]"):
        model(input_ids=ids, preference=[{"a": 1.0, "b": 0.0}, {"a": 0.5}])


def test_the_deployment_preference_is_saved_and_restored(tmp_path):
    model = tiny_bert()
    model.set_preference([0.7, 0.2, 0.1])
    model.save_pretrained(tmp_path / "bundle")
    base = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24))
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(base, tmp_path / "bundle")
    torch.testing.assert_close(reloaded.get_preference(), torch.tensor([0.7, 0.2, 0.1]))
    with pytest.raises(ValueError, match="default_preference"):
        peft_palora.PaLoRAConfig(num_tasks=2, default_preference=[0.7, 0.7])


def test_peft_mixed_adapter_batches_are_refused_clearly():
    model = get_peft_model(FeaturesModel(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="adapter_names=.*not supported by PaLoRA.*per-sample `preference=`"):
        model(features=torch.randn(2, 6), adapter_names=["default", "default"])


def test_lora_models_in_the_same_process_see_peft_unchanged():
    from peft import LoraConfig, PeftModel

    lora = get_peft_model(FeaturesModel(), LoraConfig(target_modules=["proj"]))
    palora = get_peft_model(FeaturesModel(), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["proj"]))
    assert type(lora) is PeftModel
    assert isinstance(palora, PeftModel) and type(palora) is not PeftModel
    assert type(palora).__name__ == "PeftModel"
    assert "preference" in palora.special_peft_forward_args and "preference" not in lora.special_peft_forward_args
    for name in ("save_pretrained", "load_adapter", "push_to_hub", "forward", "generate"):
        assert name not in vars(PeftModel) or not hasattr(vars(PeftModel)[name], "_palora_wrapped")
        assert getattr(type(lora), name) is getattr(PeftModel, name)
