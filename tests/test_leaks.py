"""A preference never leaks out of its call: generators, other threads, checkpoint recomputation, merged weights,
encoder-decoder generation."""

from __future__ import annotations

import contextlib
import copy
import threading

import pytest
import torch
import torch.utils.checkpoint
from peft import get_peft_model
from torch import nn

import peft_palora
from peft_palora import PaLoRAConfig
from peft_palora.tuner import state

TIMEOUT = 60.0


class MLP(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.l1 = nn.Linear(6, width)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, 4)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _model(width=8, seed=0):
    torch.manual_seed(seed)
    config = PaLoRAConfig(num_tasks=2, r=2, target_modules=["l1", "l2", "l3"], init_weights=False)
    return get_peft_model(MLP(width), config).eval()


def _at(model, x, preference):
    with torch.no_grad():
        return model(x, preference=preference)


# ---- preference_context in generators -------------------------------------------------------------------------------


def _generator(model, x, preference):
    with model.preference_context(preference):
        yield model(x)
        yield model(x)


def test_paused_generator_does_not_leak_its_preference():
    model = _model()
    x = torch.randn(3, 6)
    default = _at(model, x, [0.5, 0.5])
    with torch.no_grad():
        generator = _generator(model, x, [1.0, 0.0])
        torch.testing.assert_close(next(generator), _at(model, x, [1.0, 0.0]))
        torch.testing.assert_close(model(x), default)  # paused inside the block: the caller is at the default
        assert model.get_preference().tolist() == [0.5, 0.5]
        torch.testing.assert_close(next(generator), _at(model, x, [1.0, 0.0]))  # resumed: its own again
        generator.close()
    assert not state._SCOPES


def test_interleaved_generators_each_see_their_own():
    model = _model()
    x = torch.randn(3, 6)
    with torch.no_grad():
        first, second = _generator(model, x, [1.0, 0.0]), _generator(model, x, [0.0, 1.0])
        a1, b1, a2, b2 = next(first), next(second), next(first), next(second)
    for got in (a1, a2):
        torch.testing.assert_close(got, _at(model, x, [1.0, 0.0]))
    for got in (b1, b2):
        torch.testing.assert_close(got, _at(model, x, [0.0, 1.0]))


def test_closing_a_generator_from_another_thread_is_quiet_and_leaves_no_preference():
    model = _model()
    x = torch.randn(3, 6)
    errors = []
    with torch.no_grad():
        generator = _generator(model, x, [1.0, 0.0])
        next(generator)

        def close():
            try:
                generator.close()
            except BaseException as error:  # noqa: BLE001 - recorded for the assertion
                errors.append(error)

        thread = threading.Thread(target=close)
        thread.start()
        thread.join(TIMEOUT)
    assert not errors
    assert model.get_preference().tolist() == [0.5, 0.5]
    torch.testing.assert_close(_at(model, x, [0.5, 0.5]), model(x).detach())
    assert not state._SCOPES


def test_preference_context_through_wrappers_and_nesting():
    model = _model()
    x = torch.randn(3, 6)

    @contextlib.contextmanager
    def at(preference):
        with model.preference_context(preference):
            yield

    def helper():
        return model(x)

    with torch.no_grad():
        with at([1.0, 0.0]):
            torch.testing.assert_close(helper(), _at(model, x, [1.0, 0.0]))
            with model.preference_context([0.0, 1.0]):
                torch.testing.assert_close(model(x), _at(model, x, [0.0, 1.0]))
                assert model.get_preference().tolist() == [0.0, 1.0]
            torch.testing.assert_close(model(x), _at(model, x, [1.0, 0.0]))
        with contextlib.ExitStack() as stack:
            stack.enter_context(model.preference_context([0.25, 0.75]))
            torch.testing.assert_close(model(x), _at(model, x, [0.25, 0.75]))
        torch.testing.assert_close(model(x), _at(model, x, [0.5, 0.5]))
    assert not state._SCOPES


def test_preference_context_is_not_seen_by_other_threads():
    model = _model()
    x = torch.randn(3, 6)
    seen = {}
    with torch.no_grad(), model.preference_context([1.0, 0.0]):
        thread = threading.Thread(target=lambda: seen.setdefault("out", model(x)))
        thread.start()
        thread.join(TIMEOUT)
    torch.testing.assert_close(seen["out"], _at(model, x, [0.5, 0.5]))


# ---- merged models --------------------------------------------------------------------------------------------------


def test_merged_model_calls_are_exact_while_another_thread_sets_the_preference():
    model = _model(width=96)
    reference = copy.deepcopy(model)
    x = torch.randn(16, 6)
    call_preferences = [[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]]
    expected = [_at(reference, x, p) for p in call_preferences]
    model.set_preference([0.5, 0.5])
    model.merge_adapter()
    failures, stop = [], threading.Event()

    def caller():
        with torch.no_grad():
            for i in range(150):
                k = i % len(call_preferences)
                got = model(x, preference=call_preferences[k])
                if not torch.allclose(got, expected[k], atol=1e-4, rtol=1e-4):
                    failures.append((i, (got - expected[k]).abs().max().item()))
        stop.set()

    def setter():
        i = 0
        while not stop.is_set() and i < 5000:
            model.set_preference([0.9, 0.1] if i % 2 else [0.2, 0.8])
            i += 1

    threads = [threading.Thread(target=caller), threading.Thread(target=setter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures[:5]
    model.unmerge_adapter()  # the weights are back at the base
    for name in ("l1", "l2", "l3"):
        torch.testing.assert_close(getattr(model.base_model.model, name).get_base_layer().weight,
                                   getattr(reference.base_model.model, name).get_base_layer().weight,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("at_merged_preference", [True, False])
def test_merged_model_keeps_the_gradient_of_the_preference(at_merged_preference):
    model = _model()
    reference = copy.deepcopy(model)
    model.set_preference([0.3, 0.7])
    model.merge_adapter()
    x = torch.randn(5, 6)
    start = [0.3, 0.7] if at_merged_preference else [0.6, 0.4]
    grads = []
    for m in (model, reference):
        preference = torch.tensor(start, requires_grad=True)
        m(x, preference=preference).pow(2).sum().backward()
        grads.append(preference.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_merge_from_inside_a_call_is_refused_not_a_deadlock():
    model = _model()
    model.merge_adapter()
    handle = model.base_model.model.l2.register_forward_hook(lambda *args: model.set_preference([1.0, 0.0]))
    try:
        with pytest.raises(RuntimeError, match="inside a call"):
            model(torch.randn(2, 6))
    finally:
        handle.remove()
    model.set_preference([1.0, 0.0])  # outside a call it works


def test_merge_lock_survives_deepcopy():
    model = _model()
    copied = copy.deepcopy(model)
    assert copied.base_model._merge_lock is not model.base_model._merge_lock
    copied.merge_adapter()
    copied.unmerge_adapter()


# ---- encoder-decoder generate ---------------------------------------------------------------------------------------


def _seq2seq(kind):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        base = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                                   eos_token_id=1))
        targets = ["q", "v"]
    else:
        base = BartForConditionalGeneration(BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                                       encoder_attention_heads=2, decoder_attention_heads=2,
                                                       encoder_ffn_dim=32, decoder_ffn_dim=32,
                                                       max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                                       eos_token_id=2, decoder_start_token_id=2,
                                                       forced_eos_token_id=None))
        targets = ["q_proj", "v_proj"]
    config = PaLoRAConfig(num_tasks=2, r=2, target_modules=targets, init_weights=False, task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(base, config).eval()
    with torch.no_grad():  # strong adapters, so that the two preferences generate different tokens
        for name, param in model.named_parameters():
            if "palora_B" in name:
                param.mul_(30)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t5", "bart"])
@pytest.mark.parametrize("settings", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)],
                         ids=["beams", "beams-returned"])
def test_seq2seq_generate_with_per_sample_preference(kind, settings):
    model = _seq2seq(kind)
    torch.manual_seed(1)
    input_ids = torch.randint(3, 40, (2, 7))
    preferences = [[1.0, 0.0], [0.0, 1.0]]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, **settings)
    with torch.no_grad():
        together = model.generate(input_ids=input_ids, preference=preferences, **kwargs)
        alone = [model.generate(input_ids=input_ids[i:i + 1], preference=preferences[i], **kwargs) for i in range(2)]
    per_sample = settings.get("num_return_sequences", 1)
    assert together.shape[0] == 2 * per_sample
    for i in range(2):
        rows = together[i * per_sample:(i + 1) * per_sample]
        assert torch.equal(rows[:, : alone[i].shape[1]], alone[i]), (i, rows, alone[i])
    assert not torch.equal(alone[0], alone[1])  # the preferences matter
    assert peft_palora  # registered


# ---- a user's own torch.utils.checkpoint ----------------------------------------------------------------------------


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant=None):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        h = self.inp(x)
        if self.use_reentrant is None:
            h = self.block(h)
        else:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return self.out(h)


def _grads(use_reentrant, preference, trainable_preference):
    torch.manual_seed(0)
    config = PaLoRAConfig(num_tasks=2, r=2, target_modules=["inp", "block.0", "block.2", "out"], init_weights=False)
    model = get_peft_model(Checkpointed(use_reentrant), config).train()
    torch.manual_seed(1)
    x = torch.randn(4, 6, requires_grad=use_reentrant is True)  # reentrant checkpoints need an input with grad
    preference = torch.tensor(preference, requires_grad=trainable_preference)
    model(x, preference=preference).pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if trainable_preference:
        grads["preference"] = preference.grad.clone()
    return grads


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    ("preference", "trainable"),
    [([0.9, 0.1], False), ([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5], [0.0, 1.0]], False), ([0.7, 0.3], True)],
    ids=["shared", "per-sample", "trainable-preference"],
)
def test_user_checkpoint_recomputes_at_the_forward_preference(use_reentrant, preference, trainable):
    expected = _grads(None, preference, trainable)
    got = _grads(use_reentrant, preference, trainable)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_user_checkpoint_backward_after_set_preference_uses_the_forward_preference():
    torch.manual_seed(0)
    config = PaLoRAConfig(num_tasks=2, r=2, target_modules=["block.0", "block.2"], init_weights=False)
    model = get_peft_model(Checkpointed(False), config).train()
    reference = copy.deepcopy(model)
    reference.base_model.model.use_reentrant = None
    x = torch.randn(4, 6)
    model.set_preference([1.0, 0.0])
    reference.set_preference([1.0, 0.0])
    loss, loss_ref = model(x).sum(), reference(x).sum()
    model.set_preference([0.0, 1.0])  # between forward and backward (e.g. a window of preferences)
    loss.backward()
    loss_ref.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
