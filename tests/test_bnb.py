"""PaLoRA on bitsandbytes-quantised bases (4-bit ``Linear4bit``, 8-bit ``Linear8bitLt``), on CPU.

A tiny Llama is saved once and loaded quantised through transformers' ``BitsAndBytesConfig``. Every check compares
against an independent float32 computation: the dequantised base weights written into an unquantised copy of the
model, plus ``(alpha / r) * sum_t lambda_t B_t A_t`` built task by task from the adapter parameters.

The model comparisons run the PaLoRA model in train mode (no dropout in this config): in eval mode bitsandbytes
computes differently from its own dequantised weight on CPU (4-bit repacks for a bfloat16 kernel on AVX512-BF16
machines, 8-bit quantises the activations too), which is the base's rounding, not PaLoRA's. The eval path is checked
at the layer level instead: the adapters' contribution there is exact.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import peft_palora  # noqa: E402
import peft_palora.tuner.layer  # noqa: E402
import peft_palora.tuner.model  # noqa: E402
from peft_palora.tuner import bnb as palora_bnb  # noqa: E402
from peft_palora.tuner.layer import PreferenceState  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:MatMul8bitLt:UserWarning", "ignore:Merging PaLoRA:UserWarning"
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
KINDS = {
    "4bit": (
        lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        bnb.nn.Linear4bit,
        palora_bnb.Linear4bit,
    ),
    "8bit": (lambda: BitsAndBytesConfig(load_in_8bit=True), bnb.nn.Linear8bitLt, palora_bnb.Linear8bitLt),
}
NF4_HALF_GAP = 0.152  # half the widest gap between NF4 levels (-1.0 .. -0.6962), in units of the block's absmax


# ---- wiring -------------------------------------------------------------------------------------------------------
def _until_wired_dispatch(target, adapter_name, **kwargs):
    return palora_bnb.dispatch_bnb(target, adapter_name, **kwargs) or _ORIGINAL_DISPATCH(target, adapter_name, **kwargs)


_ORIGINAL_DISPATCH = peft_palora.tuner.model.dispatch_layer


def _until_wired_create_and_replace(self, palora_config, adapter_name, target, target_name, parent, current_key, **kw):
    if palora_config.train_base_weights:
        palora_bnb.check_base_weights_trainable(target, current_key)
    return _ORIGINAL_CREATE(self, palora_config, adapter_name, target, target_name, parent, current_key, **kw)


_ORIGINAL_CREATE = peft_palora.tuner.model.PaLoRAModel._create_and_replace


class _OneQuantizedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")

    def forward(self, x):
        return self.proj(x)


_MISSING_WIRING: list[tuple[object, str, object]] | None = None


def _wire_if_needed(set_attribute) -> None:
    """Route through ``dispatch_bnb`` and the ``train_base_weights`` check where the package does not do so yet.

    Each is probed once through the package's own entry points and patched only where missing, so once
    ``layer.dispatch_layer`` and ``PaLoRAModel._create_and_replace`` call them, the tests run the real path.
    """
    global _MISSING_WIRING
    if _MISSING_WIRING is None:
        _MISSING_WIRING = []
        probe = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32).to("cpu")
        made = peft_palora.tuner.model.dispatch_layer(probe, "probe", num_tasks=2, r=1, scaling=1.0,
                                                preference_state=PreferenceState(2))
        if not isinstance(made, palora_bnb.Linear4bit):
            _MISSING_WIRING.append((peft_palora.tuner.model, "dispatch_layer", _until_wired_dispatch))
        try:
            get_peft_model(_OneQuantizedLinear(), peft_palora.PaLoRAConfig(
                num_tasks=2, r=1, target_modules=["proj"], train_base_weights=True))
            refused = False
        except ValueError:
            refused = True
        except RuntimeError:  # bitsandbytes' codes refuse requires_grad: the raw error this check replaces
            refused = False
        if not refused:
            _MISSING_WIRING.append(
                (peft_palora.tuner.model.PaLoRAModel, "_create_and_replace", _until_wired_create_and_replace))
    for owner, name, replacement in _MISSING_WIRING:
        set_attribute(owner, name, replacement)


@pytest.fixture(autouse=True)
def _wired(monkeypatch):
    _wire_if_needed(monkeypatch.setattr)  # undone after each test


# ---- models and the independent reference -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    seed = torch.random.get_rng_state()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(seed)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def _quantized(tiny_dir, kind):
    return LlamaForCausalLM.from_pretrained(tiny_dir, quantization_config=KINDS[kind][0](), device_map="cpu")


def _palora(tiny_dir, kind, seed=1, **config):
    torch.manual_seed(seed)
    base = _quantized(tiny_dir, kind)
    config = {"num_tasks": 2, "r": 4, "palora_alpha": 8, "target_modules": TARGETS, "init_weights": False, **config}
    return get_peft_model(base, peft_palora.PaLoRAConfig(**config))


def _dequantize(module):
    """The float32 weight a bitsandbytes layer holds, straight from bitsandbytes (independent of peft_palora)."""
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        assert not getattr(weight.quant_state, "packing_format_for_cpu", False)  # only the usual layout, no repack
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()


def _quantized_weights(model):
    """{state-dict key of the plain model: float32 dequantised weight} for every bitsandbytes layer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[key + ".weight"] = _dequantize(module)
    return out


def _deltas(model, preference):
    """{key: (alpha / r) * sum_t lambda_t B_t A_t}, task by task from the parameters (float32)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, palora_bnb._QuantizedLinear):
            a, b = module.palora_A["default"].detach(), module.palora_B["default"].detach()
            r, scaling = module.r["default"], module.scaling["default"]
            delta = torch.zeros(b.shape[0], a.shape[1])
            for t, weight in enumerate(preference.tolist()):
                delta += weight * scaling * b[:, t * r:(t + 1) * r] @ a[t * r:(t + 1) * r]
            out[name.removeprefix("base_model.model.") + ".weight"] = delta
    return out


_FLOAT_MODELS = {}


def _float_model(tiny_dir, weights):
    if tiny_dir not in _FLOAT_MODELS:
        _FLOAT_MODELS[tiny_dir] = LlamaForCausalLM.from_pretrained(tiny_dir)
    model = copy.deepcopy(_FLOAT_MODELS[tiny_dir])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected
    return model.eval()


def _reference_logits(tiny_dir, base_weights, deltas, ids):
    weights = {key: value + deltas.get(key, 0.0) for key, value in base_weights.items()}
    with torch.no_grad():
        return _float_model(tiny_dir, weights)(ids).logits


def _logits(model, ids, **kwargs):
    model.train()  # bitsandbytes' exact (dequantise + float matmul) path on CPU; see the module docstring
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 4], [8, 8, 15, 99, 42, 3, 0], [61, 7, 23, 5, 5, 11, 90]])


# ---- dispatch -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_layers_get_their_own_palora_layer(tiny_dir, kind):
    model = _palora(tiny_dir, kind)
    _, bnb_cls, palora_cls = KINDS[kind]
    layers = [m for m in model.modules() if isinstance(m, peft_palora.tuner.layer.PaLoRALayer)]
    assert len(layers) == 2 * len(TARGETS)
    assert all(type(m) is palora_cls and isinstance(m.get_base_layer(), bnb_cls) for m in layers)
    assert all(m.get_base_layer().weight.dtype in (torch.uint8, torch.int8) for m in layers)
    assert palora_bnb.dispatch_bnb(nn.Linear(4, 4), "default") is None


def test_quantized_embedding_is_refused():
    embedding = bnb.nn.Embedding8bit(10, 8)
    with pytest.raises(TypeError, match="embeddings"):
        palora_bnb.dispatch_bnb(embedding, "default", num_tasks=2, r=1, scaling=1.0,
                                preference_state=PreferenceState(2))


# ---- forward ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_dequantized_reference(tiny_dir, kind):
    model = _palora(tiny_dir, kind)
    base = _quantized_weights(model)
    shared = torch.tensor([0.7, 0.3])
    model.set_preference(shared)
    expected = _reference_logits(tiny_dir, base, _deltas(model, shared), IDS)
    torch.testing.assert_close(_logits(model, IDS), expected, atol=2e-5, rtol=1e-4)

    rows = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]])
    got = _logits(model, IDS, preference=rows)
    for i, row in enumerate(rows):
        expected = _reference_logits(tiny_dir, base, _deltas(model, row), IDS[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_forward_adds_the_exact_adapter_branch(tiny_dir, kind):
    model = _palora(tiny_dir, kind).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 64)
    rows = torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.4, 0.6]])
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
        for preference in (torch.tensor([0.2, 0.8]), rows):
            with model.preference_context(preference):
                got = layer(x) - base_out
            a, b, r, s = layer.palora_A["default"], layer.palora_B["default"], layer.r["default"], layer.scaling["default"]
            per_row = preference.expand(3, 2)
            expected = sum(
                s * per_row[:, t, None, None] * (x @ a[t * r:(t + 1) * r].T @ b[:, t * r:(t + 1) * r].T)
                for t in range(2)
            )
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---- merging ------------------------------------------------------------------------------------------------------
def _rounding_bound(layer, target):
    """The largest error one quantisation of ``target`` may make, entry by entry, for this layer's kind."""
    if isinstance(layer, palora_bnb.Linear4bit):
        blocks = target.reshape(-1, layer.get_base_layer().weight.blocksize)
        # The block absmax may itself be rounded (8-bit when double-quantised, bfloat16 after a CPU repack).
        per_block = (NF4_HALF_GAP * 1.02 + 2**-8) * blocks.abs().amax(dim=1, keepdim=True)
        return per_block.expand_as(blocks).reshape(target.shape) + 1e-6
    row_absmax = target.abs().amax(dim=1, keepdim=True)
    return 0.5 * row_absmax / 127 + 1e-3 * target.abs() + 1e-6  # int8 rows, from a float16 copy


@pytest.mark.parametrize("kind", KINDS)
def test_merge_dequantizes_adds_and_requantizes(tiny_dir, kind):
    model = _palora(tiny_dir, kind)
    base = _quantized_weights(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)  # an eval forward first: on AVX512-BF16 CPUs 4-bit codes get repacked, merge must cope
    if kind == "4bit":
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
        packed = getattr(q_proj.weight.quant_state, "packing_format_for_cpu", False)
        assert packed == (q_proj.support_avx512bf16_for_cpu and hasattr(bnb.functional, "_convert_weight_packed_for_cpu"))
    preference = torch.tensor([0.6, 0.4])
    model.set_preference(preference)
    deltas = _deltas(model, preference)
    expected = _reference_logits(tiny_dir, base, deltas, IDS)

    with palora_bnb.allow_4bit_requantization(), pytest.warns(UserWarning, match="export_lora"):
        model.merge_adapter()
    for name, layer in model.named_modules():
        if isinstance(layer, palora_bnb._QuantizedLinear):
            key = name.removeprefix("base_model.model.") + ".weight"
            assert layer.get_base_layer().weight.dtype in (torch.uint8, torch.int8)  # still quantised
            target = base[key] + deltas[key]
            error = (_dequantize(layer.get_base_layer()) - target).abs()
            assert (error <= _rounding_bound(layer, target)).all(), (key, error.max())
            assert error.max() < 0.5 * deltas[key].abs().max()  # the delta is in the weight, not rounded away

    merged = _logits(model, IDS)
    adapter_effect = (expected - _reference_logits(tiny_dir, base, {}, IDS)).abs().max()
    # Rounding, not a wrong merge: well below what the adapters change (measured: 4-bit 13 %, 8-bit 1 %).
    assert (merged - expected).abs().max() < (0.25 if kind == "4bit" else 0.04) * adapter_effect


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_and_remerge_track_the_preference(tiny_dir, kind):
    with palora_bnb.allow_4bit_requantization():
        _check_unmerge_and_remerge(tiny_dir, kind)


def _check_unmerge_and_remerge(tiny_dir, kind):
    model = _palora(tiny_dir, kind)
    base = _quantized_weights(model)
    first, second = torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.7])
    model.set_preference(first)
    model.merge_adapter()
    layers = {name.removeprefix("base_model.model.") + ".weight": layer for name, layer in model.named_modules()
              if isinstance(layer, palora_bnb._QuantizedLinear)}
    assert all(torch.equal(layer.merged_preferences["default"], first) for layer in layers.values())

    model.set_preference(second)  # re-merges: subtract at `first`, add at `second`, quantise again
    deltas_first, deltas = _deltas(model, first), _deltas(model, second)
    for key, layer in layers.items():
        target = base[key] + deltas[key]
        # Three quantisations so far (merge at `first`, unmerge, merge at `second`): their rounding adds up.
        bound = sum(_rounding_bound(layer, w) for w in (base[key] + deltas_first[key], base[key], target))
        error = (_dequantize(layer.get_base_layer()) - target).abs()
        assert (error <= bound).all(), (key, error.max())
        assert torch.equal(layer.merged_preferences["default"], second)

    model.unmerge_adapter()
    for key, layer in layers.items():
        bound = 2 * _rounding_bound(layer, base[key]) + sum(
            _rounding_bound(layer, base[key] + d[key]) for d in (deltas_first, deltas))
        error = (_dequantize(layer.get_base_layer()) - base[key]).abs()
        assert (error <= bound).all(), (key, error.max())
        assert not layer.merged and not layer.merged_preferences


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_the_merged_quantized_model(tiny_dir, kind):
    merged = _palora(tiny_dir, kind)
    merged.set_preference([0.5, 0.5])
    with palora_bnb.allow_4bit_requantization():
        merged.merge_adapter()
    expected = _logits(merged, IDS)

    model = _palora(tiny_dir, kind)  # the same seed: the same adapters on the same quantised base
    model.set_preference([0.5, 0.5])
    with palora_bnb.allow_4bit_requantization():
        unloaded = model.merge_and_unload()
    _, bnb_cls, _ = KINDS[kind]
    assert not any(isinstance(m, peft_palora.tuner.layer.PaLoRALayer) for m in unloaded.modules())
    assert all(isinstance(getattr(layer.self_attn, name), bnb_cls) for layer in unloaded.model.layers
               for name in ("q_proj", "v_proj"))
    torch.testing.assert_close(_logits(unloaded, IDS), expected, atol=0, rtol=0)


def test_4bit_merge_is_refused_unless_asked_for(tiny_dir):
    model = _palora(tiny_dir, "4bit")
    model.set_preference([0.3, 0.7])
    expected = _logits(model, IDS)
    codes = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    for merge in (model.merge_adapter, model.merge_and_unload, lambda: palora_bnb.check_merge_allowed(model)):
        with pytest.raises(ValueError, match=r"4-bit.*export_lora.*allow_4bit_requantization"):
            merge()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in codes.items())  # nothing was written
    assert not any(m.merged for m in model.modules() if isinstance(m, palora_bnb.Linear4bit))
    torch.testing.assert_close(_logits(model, IDS), expected, atol=0, rtol=0)

    # Merged while allowed, then a preference change outside the opt-in: no requantisation, the layers stay merged
    # at the old preference and the forward adds the adapters at the difference (exact apart from the one merge).
    base = _quantized_weights(model)
    with palora_bnb.allow_4bit_requantization():
        model.merge_adapter()
    merged_codes = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    model.set_preference([0.9, 0.1])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in merged_codes.items())
    layers = [m for m in model.modules() if isinstance(m, palora_bnb.Linear4bit)]
    assert all(torch.equal(m.merged_preferences["default"], torch.tensor([0.3, 0.7])) for m in layers)
    reference = _reference_logits(tiny_dir, base, _deltas(model, torch.tensor([0.9, 0.1])), IDS)
    effect = (reference - _reference_logits(tiny_dir, base, {}, IDS)).abs().max()
    assert (_logits(model, IDS) - reference).abs().max() < 0.25 * effect


def test_merge_refuses_a_per_sample_preference(tiny_dir):
    model = _palora(tiny_dir, "8bit")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.get_base_layer().weight.data.clone()
    with model.preference_context([[1.0, 0.0], [0.0, 1.0]]), pytest.raises(ValueError, match="per-sample"):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight.data, before) and not layer.merged


# ---- training -----------------------------------------------------------------------------------------------------
def test_train_base_weights_is_refused_on_a_quantized_base(tiny_dir):
    base = _quantized(tiny_dir, "4bit")
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=TARGETS, train_base_weights=True)
    with pytest.raises(ValueError, match="train_base_weights=True.*4-bit"):
        get_peft_model(base, config)
    assert not any(isinstance(m, peft_palora.tuner.layer.PaLoRALayer) for m in base.modules())  # left as it was


@pytest.mark.parametrize("kind", KINDS)
def test_kbit_training_trains_only_the_adapters_with_exact_gradients(tiny_dir, kind):
    torch.manual_seed(2)
    base = prepare_model_for_kbit_training(_quantized(tiny_dir, kind))  # freezes, enables gradient checkpointing
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=TARGETS,
                                                          init_weights=False))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".palora_A." in name or ".palora_B." in name for name in trainable)
    codes = {k: v.clone() for k, v in model.state_dict().items() if v.dtype in (torch.uint8, torch.int8)}

    # The same adapters on the dequantised float model, as plain PaLoRA layers: gradients must agree.
    reference = get_peft_model(_float_model(tiny_dir, _quantized_weights(model)),
                               peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=TARGETS))
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "palora_" in k}, strict=False)
    rows = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5]])
    grads = []
    for candidate in (model, reference):
        candidate.train()
        candidate(input_ids=IDS, labels=IDS, preference=rows).loss.backward()
        grads.append({n: p.grad.clone() for n, p in candidate.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)
        assert grads[0][name].abs().sum() > 0

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(input_ids=IDS, labels=IDS, preference=rows).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in codes.items())  # the quantised base did not move


# ---- saving and loading -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_bundle_reloads_on_a_fresh_quantized_base(tiny_dir, kind, tmp_path):
    model = _palora(tiny_dir, kind)
    model.set_preference([0.2, 0.8])
    expected = _logits(model, IDS)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(_quantized(tiny_dir, kind), tmp_path)
    _, _, palora_cls = KINDS[kind]
    assert all(type(m) is palora_cls for m in loaded.modules() if isinstance(m, peft_palora.tuner.layer.PaLoRALayer))
    saved = {k: v for k, v in model.state_dict().items() if "palora_" in k}
    reloaded = loaded.state_dict()
    assert saved and all(torch.equal(reloaded[k], v) for k, v in saved.items())
    torch.testing.assert_close(loaded.get_preference(), torch.tensor([0.2, 0.8]))
    torch.testing.assert_close(_logits(loaded, IDS), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_export_lora_serves_the_trade_off_on_the_quantized_base(tiny_dir, kind, tmp_path):
    """The alternative the 4-bit merge refusal points to: plain PEFT LoRA (its own bnb layers) on the same base."""
    model = _palora(tiny_dir, kind)
    model.export_lora(tmp_path, preference=[0.6, 0.4])
    model.set_preference([0.6, 0.4])
    lora = PeftModel.from_pretrained(_quantized(tiny_dir, kind), tmp_path)
    assert lora.peft_config["default"].peft_type.value == "LORA"
    torch.testing.assert_close(_logits(lora, IDS), _logits(model, IDS), atol=1e-5, rtol=1e-5)


# ---- the figures quoted in the README: `HF_HUB_OFFLINE=1 python tests/test_bnb.py` ------------------------------
def _figures(tiny_dir) -> None:
    preference = torch.tensor([0.6, 0.4])
    for kind in KINDS:
        for b_scale in (1.0, 0.1):  # random adapters as in the tests (B ~ N(0, 0.1)), and ten times smaller ones
            model = _palora(tiny_dir, kind)
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, palora_bnb._QuantizedLinear):
                        module.palora_B["default"].mul_(b_scale)
            base, deltas = _quantized_weights(model), _deltas(model, preference)
            expected = _reference_logits(tiny_dir, base, deltas, IDS)
            effect = (expected - _reference_logits(tiny_dir, base, {}, IDS)).abs().max()
            model.set_preference(preference)
            forward = (_logits(model, IDS) - expected).abs().max()
            layers = {n.removeprefix("base_model.model.") + ".weight": m for n, m in model.named_modules()
                      if isinstance(m, palora_bnb._QuantizedLinear)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with palora_bnb.allow_4bit_requantization():
                    model.merge_adapter()
                merged = (_logits(model, IDS) - expected).abs().max()
                weight = max(((_dequantize(m.get_base_layer()) - base[k] - deltas[k]).abs().max()
                              / (base[k] + deltas[k]).abs().max()).item() for k, m in layers.items())
                model.unmerge_adapter()
            drift = max(((_dequantize(m.get_base_layer()) - base[k]).abs().max() / base[k].abs().max()).item()
                        for k, m in layers.items())
            scale = expected.abs().max()
            print(f"{kind} B x{b_scale}: unmerged forward max abs diff {forward:.2e}; merged logits max abs diff "
                  f"{merged:.2e} ({merged / scale:.2%} of max |logit|, {merged / effect:.1%} of the adapters' effect "
                  f"{effect:.3f}); merged weight error <= {weight:.2%} of max |W + delta|; after unmerge the weight is "
                  f"off by <= {drift:.2%} of max |W|")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=100)).save_pretrained(directory)
        _wire_if_needed(setattr)
        _figures(directory)
