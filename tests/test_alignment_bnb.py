"""PaLoRADPOTrainer and PaLoRAGRPOTrainer on a bitsandbytes 4-bit base (NF4 ``Linear4bit``, CPU), frozen base.

A tiny Llama from ``tests/tiny_lm.py`` is saved once and loaded quantised through transformers'
``BitsAndBytesConfig`` (every linear but ``lm_head`` becomes a ``Linear4bit``); the PaLoRA adapters sit on q/k/v/o.
The DPO loss is checked against the float64 recomputation of ``tests/test_alignment_dpo.py`` run on an unquantised
copy of the model holding the dequantised base weights (straight from bitsandbytes) and the same adapters. As in
``tests/test_bnb.py``, the quantised model is run in train mode there (no dropout in this config): it is
bitsandbytes' exact path on CPU (dequantise, then a float matmul); eval mode may repack for a bfloat16 kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")
bnb = pytest.importorskip("bitsandbytes")

from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from test_alignment_dpo import TASKS, colour_data, dpo_config, reference_dpo_loss  # noqa: E402
from test_alignment_grpo import PROMPTS, blue, make_args, red  # noqa: E402
from tiny_lm import make_model, make_tokenizer  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from peft_palora import PaLoRAConfig  # noqa: E402
from peft_palora.alignment import PaLoRADPOTrainer, PaLoRAGRPOTrainer  # noqa: E402
from peft_palora.tuner import bnb as palora_bnb  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# float32 forward with bfloat16 adapters (TRL's QLoRA cast) vs the float64 recomputation: measured rel 3.2e-5
LOSS_TOLERANCE = dict(rel=1e-4, abs=1e-5)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two saved tiny Llamas: as built (DPO), and with the wider lm_head the GRPO tests use (see make_policy)."""
    plain = make_model("llama", seed=0)
    wide = make_model("llama", seed=0)
    with torch.no_grad():
        wide.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    paths = {}
    for name, model in (("plain", plain), ("wide", wide)):
        paths[name] = tmp_path_factory.mktemp(f"tiny_llama_{name}")
        model.save_pretrained(paths[name])
    return paths


def quantised_palora(path, init_weights=False, targets=TARGETS, seed=1):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    base.generation_config.pad_token_id = 0
    config = PaLoRAConfig(task_names=TASKS, r=4, palora_alpha=8, target_modules=targets, init_weights=init_weights,
                          train_base_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    layers = [m for m in model.modules() if isinstance(m, palora_bnb.Linear4bit)]
    assert len(layers) == 2 * len(targets) if isinstance(targets, list) else layers  # 2 decoder layers
    return model


def quantised_state(model) -> dict[str, torch.Tensor]:
    """The packed 4-bit codes and block scales of every bitsandbytes layer (what a frozen base must keep)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name + ".codes"] = module.weight.data.clone()
            state[name + ".absmax"] = module.weight.quant_state.absmax.clone()
    assert state
    return state


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "palora_" in name}


def float64_reference(path, quantised):
    """An unquantised PaLoRA copy in float64: bitsandbytes' dequantised base weights, the same adapters."""
    base = LlamaForCausalLM.from_pretrained(path)
    weights = {}
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
            weights[key] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    _, unexpected = base.load_state_dict(weights, strict=False)
    assert not unexpected
    config = PaLoRAConfig(task_names=TASKS, r=4, palora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    reference = get_peft_model(base, config)
    adapters = adapter_state(quantised)
    _, unexpected = reference.load_state_dict(adapters, strict=False)
    assert not unexpected
    copied = adapter_state(reference)
    for name, value in adapters.items():
        torch.testing.assert_close(copied[name], value.float(), rtol=0, atol=0)
    return reference.double().eval()


def test_dpo_on_a_4bit_base_matches_float64_and_trains_only_the_adapters(tiny_dirs, tmp_path):
    path = tiny_dirs["plain"]
    model = quantised_palora(path)
    trainer = PaLoRADPOTrainer(model, args=dpo_config(tmp_path, max_steps=3, learning_rate=3e-2),
                               train_dataset=colour_data(), processing_class=make_tokenizer(), window_size=3)

    # TRL casts the trainable adapters of a quantised model to bfloat16 (QLoRA); the reference copies those values
    assert {p.dtype for n, p in model.named_parameters() if "palora_" in n} == {torch.bfloat16}

    # (1) the loss of one batch equals the float64 recomputation (as in test_alignment_dpo.py test (a))
    trainer.state.global_step, trainer.state.max_steps = 4, 10
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    model.train()  # bitsandbytes' exact CPU path; no dropout here
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
    window = trainer.current_preferences().double()
    reference = float64_reference(path, model)
    expected = reference_dpo_loss(reference, rows, window, trainer.beta)
    assert abs(expected.item() - 0.6931) > 1e-3  # the adapters are not zero: the policy differs from the reference
    assert loss == pytest.approx(expected.item(), **LOSS_TOLERANCE)

    # (2) a few steps: finite losses, the adapters move, the quantised base does not
    trainer.state.global_step = 0
    frozen, adapters = quantised_state(model), adapter_state(model)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "palora_" not in n)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = adapter_state(model)
    assert max((after[k] - adapters[k]).abs().max().item() for k in adapters) > 1e-4
    torch.testing.assert_close(quantised_state(model), frozen, rtol=0, atol=0)


def test_grpo_on_a_4bit_base_trains_only_the_adapters(tiny_dirs, tmp_path):
    model = quantised_palora(tiny_dirs["wide"], init_weights=True, targets="all-linear")
    frozen, adapters = quantised_state(model), adapter_state(model)
    trainer = PaLoRAGRPOTrainer(
        model, {"red": red, "blue": blue},
        args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=8, num_generations=4),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 10}), processing_class=make_tokenizer(),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    assert {"rewards/red/mean", "rewards/blue/mean"} <= set(logged[0])
    after = adapter_state(model)
    assert max((after[k] - adapters[k]).abs().max().item() for k in adapters) > 1e-4
    torch.testing.assert_close(quantised_state(model), frozen, rtol=0, atol=0)
