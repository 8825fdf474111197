"""torch.compile: a PaLoRA model with a preference compiles to one graph without graph breaks, like PEFT's LoRA, and
serves new preferences (per call, per sample, set_preference, merged weights) without recompiling or stale results.

Counts come from a counting backend (`CompileCounterWithBackend`: one frame per compiled graph) and dynamo's
`counters["graph_break"]`. Outputs are compared with the eager model at the same preference (atol 1e-5, rtol 1e-5 for
the eager/aot_eager backends, which run the same aten ops; 1e-4 for inductor, which fuses and reorders) and, for a
shared preference, with an independent float64 computation of the merged weights W + (alpha/r) sum_t lambda_t B_t A_t.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import peft_palora
from peft_palora import palora_layers

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts from an empty dynamo cache and counters, and leaves dynamo's config as it found it."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(cache_size_limit=8):  # dynamo's default, restored on exit
        yield
    torch._dynamo.reset()
    counters.clear()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def palora_llama(num_tasks: int = 3, seed: int = 0):
    config = peft_palora.PaLoRAConfig(num_tasks=num_tasks, r=2, palora_alpha=4, target_modules="all-linear",
                                      init_weights=False)
    return get_peft_model(tiny_llama(seed), config).eval()


def breaks() -> int:
    return sum(counters["graph_break"].values())


def compiled(model, backend: str = "aot_eager", **kwargs):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(model, backend=counter, **kwargs), counter


def eager_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def independent_logits(model, ids, preference) -> torch.Tensor:
    """The base model with every targeted weight replaced by W + (alpha/r) sum_t lambda_t B_t A_t, built in float64
    from the adapter parameters (no PaLoRA code runs)."""
    base = tiny_llama()
    weights = {}
    for name, module in model.base_model.model.named_modules():
        if module in palora_layers(model):
            a = module.palora_A["default"].detach().double()
            b = module.palora_B["default"].detach().double()
            r, scale = module.r["default"], module.scaling["default"]
            delta = sum(preference[t] * scale * b[:, t * r:(t + 1) * r] @ a[t * r:(t + 1) * r] for t in range(len(preference)))
            weights[name + ".weight"] = (module.get_base_layer().weight.detach().double() + delta).float()
    with torch.no_grad():
        for name, weight in weights.items():
            base.get_parameter(name).copy_(weight)
        return base(input_ids=ids).logits


def test_peft_lora_reference_is_one_graph():
    lora = get_peft_model(tiny_llama(), LoraConfig(r=6, target_modules="all-linear", init_lora_weights=False)).eval()
    ids = torch.randint(0, 64, (2, 8))
    model, counter = compiled(lora)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager_logits(lora, ids), **TOL)
    assert (counter.frame_count, breaks()) == (1, 0)


def test_per_call_preferences_are_one_graph_and_never_recompile():
    """As PEFT's LoRA on the same model: one graph, no break; a 2nd and 3rd value reuse it (fullgraph=True holds)."""
    palora = palora_llama()
    ids = torch.randint(0, 64, (2, 8))
    model, counter = compiled(palora, fullgraph=True)
    preferences = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.25, 0.75]]
    with torch.no_grad():
        for preference in preferences:
            got = model(input_ids=ids, preference=torch.tensor(preference)).logits
            torch.testing.assert_close(got, eager_logits(palora, ids, preference=torch.tensor(preference)), **TOL)
            torch.testing.assert_close(got, independent_logits(palora, ids, preference), atol=1e-4, rtol=1e-4)
    assert (counter.frame_count, breaks()) == (1, 0)
    assert all(state.call is None for state in palora.base_model._preference_states.values())  # nothing left set
    assert palora.base_model._traced_batch is None


def test_per_sample_preferences_compile_once_for_their_shape():
    palora = palora_llama()
    model, counter = compiled(palora, fullgraph=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for batch in (2, 2, 3, 4, 5):  # a new value each time; batch sizes become dynamic after the first change
            ids = torch.randint(0, 64, (batch, 8))
            preference = torch.distributions.Dirichlet(torch.ones(3)).sample((batch,))
            got = model(input_ids=ids, preference=preference).logits
            torch.testing.assert_close(got, eager_logits(palora, ids, preference=preference), **TOL)
            for row in range(batch):  # each sample at its own preference
                torch.testing.assert_close(got[row], eager_logits(palora, ids[row:row + 1], preference=preference[row])[0],
                                           atol=1e-5, rtol=1e-4)
    assert breaks() == 0
    assert counter.frame_count <= 2  # batch 2, then one dynamic-batch graph


def test_set_preference_between_calls_is_never_stale_and_never_recompiles():
    palora = palora_llama()
    ids = torch.randint(0, 64, (2, 8))
    model, counter = compiled(palora, fullgraph=True)
    with torch.no_grad():
        for preference in ([0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [0.6, 0.4, 0.0]):
            palora.set_preference(preference)
            torch.testing.assert_close(model(input_ids=ids).logits, eager_logits(palora, ids), **TOL)
            torch.testing.assert_close(model(input_ids=ids).logits, independent_logits(palora, ids, preference),
                                       atol=1e-4, rtol=1e-4)
        palora.set_preference([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # a per-sample default: its own graph, once
        torch.testing.assert_close(model(input_ids=ids).logits, eager_logits(palora, ids), **TOL)
        palora.set_preference([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
        torch.testing.assert_close(model(input_ids=ids).logits, eager_logits(palora, ids), **TOL)
    assert (counter.frame_count, breaks()) == (2, 0)


def test_a_list_preference_is_validated_before_the_graph_and_does_not_recompile():
    """Non-tensor forms (lists, dicts) are validated eagerly: one graph break before the graph, no recompile per value."""
    palora = palora_llama()
    ids = torch.randint(0, 64, (2, 8))
    model, counter = compiled(palora)
    seen = []
    with torch.no_grad():
        for preference in ([0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]):
            torch.testing.assert_close(model(input_ids=ids, preference=preference).logits,
                                       eager_logits(palora, ids, preference=preference), **TOL)
            seen.append((counter.frame_count, breaks()))
    assert counter.frame_count == 1  # the model's graph; the break is before any operation
    assert seen[-1] == seen[1] and breaks() <= 2  # (dynamo counts breaks while tracing: the frame's 2 variants)


def test_bad_preferences_are_refused_under_compile():
    palora = palora_llama()
    ids = torch.randint(0, 64, (2, 8))
    model, _ = compiled(palora)
    with torch.no_grad():
        model(input_ids=ids, preference=torch.tensor([0.2, 0.3, 0.5]))
        with pytest.raises(RuntimeError, match="preference must be finite, non-negative and sum to 1"):
            model(input_ids=ids, preference=torch.tensor([0.2, 0.3, 0.6]))  # the same graph checks the values
        with pytest.raises(RuntimeError, match="sum to 1"):
            model(input_ids=ids, preference=torch.tensor([-0.5, 0.5, 1.0]))
        with pytest.raises(RuntimeError, match="sum to 1"):
            model(input_ids=ids, preference=torch.tensor([float("nan"), 0.5, 0.5]))
        with pytest.raises(ValueError, match="3 entries"):
            model(input_ids=ids, preference=torch.tensor([0.5, 0.5]))
        with pytest.raises(ValueError, match="rows"):
            model(input_ids=ids, preference=torch.tensor([[0.5, 0.5, 0.0]] * 3))
        with pytest.raises(ValueError, match="sum to 1"):
            model(input_ids=ids, preference=[0.5, 0.6, 0.0])  # validated eagerly: the eager ValueError
        with pytest.raises(TypeError, match="bool"):
            model(input_ids=ids, preference=torch.tensor([True, False, False]))


def test_preference_context_around_a_compiled_call():
    palora = palora_llama()
    ids = torch.randint(0, 64, (2, 8))
    model, _ = compiled(palora)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with palora.preference_context([1.0, 0.0, 0.0]):
            torch.testing.assert_close(model(input_ids=ids).logits, eager_logits(palora, ids), **TOL)
            torch.testing.assert_close(model(input_ids=ids).logits,
                                       eager_logits(palora, ids, preference=[1.0, 0.0, 0.0]), **TOL)
        torch.testing.assert_close(model(input_ids=ids).logits, before, **TOL)  # the block ended: the default again


def test_compiled_merged_model_serves_a_new_preference_in_place_without_recompiling():
    """set_preference on a merged model rewrites the merged weights in place (copy_ semantics, as PEFT's
    hotswap_adapter): the compiled merged model gives the new preference's outputs with the same graph."""
    palora = palora_llama()
    reference = copy.deepcopy(palora)  # stays unmerged
    ids = torch.randint(0, 64, (2, 8))
    palora.set_preference([0.2, 0.3, 0.5])
    palora.merge_adapter()
    weight = palora_layers(palora)[0].get_base_layer().weight
    pointer = weight.data_ptr()
    model, counter = compiled(palora, fullgraph=True)
    with torch.no_grad():
        for preference in ([0.2, 0.3, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]):
            palora.set_preference(preference)
            torch.testing.assert_close(model(input_ids=ids).logits,
                                       eager_logits(reference, ids, preference=preference), atol=1e-4, rtol=1e-4)
        assert (counter.frame_count, breaks()) == (1, 0)
        assert weight.data_ptr() == pointer  # rewritten in place, never replaced
        # a per-call preference on the merged model: the adapters at the difference, in another graph (once)
        for preference in ([1.0, 0.0, 0.0], [0.1, 0.1, 0.8]):
            torch.testing.assert_close(model(input_ids=ids, preference=torch.tensor(preference)).logits,
                                       eager_logits(reference, ids, preference=preference), atol=1e-4, rtol=1e-4)
    assert (counter.frame_count, breaks()) == (2, 0)


def test_a_compiled_decoder_layer_inside_an_eager_call_sees_the_call_preference():
    """Regional compilation (a compiled block inside an eager model call) stays correct: the layers look the call
    up eagerly (a graph break each) and take its preference as a graph input."""
    palora = palora_llama()
    ids = torch.randint(0, 64, (2, 8))
    expected = {tuple(p): eager_logits(palora, ids, preference=p) for p in ([1.0, 0.0, 0.0], [0.0, 0.5, 0.5])}
    layers = palora.base_model.model.model.layers
    layers[0] = torch.compile(layers[0], backend="aot_eager")
    with torch.no_grad():
        for preference, logits in expected.items():
            torch.testing.assert_close(eager_logits(palora, ids, preference=list(preference)), logits, **TOL)


@pytest.mark.slow
def test_inductor_per_call_preferences():
    palora = palora_llama()
    ids = torch.randint(0, 64, (2, 8))
    model, counter = compiled(palora, backend="inductor", fullgraph=True)
    with torch.no_grad():
        for preference in ([0.2, 0.3, 0.5], [0.0, 0.0, 1.0]):
            torch.testing.assert_close(model(input_ids=ids, preference=torch.tensor(preference)).logits,
                                       eager_logits(palora, ids, preference=preference), atol=1e-4, rtol=1e-4)
    assert (counter.frame_count, breaks()) == (1, 0)
