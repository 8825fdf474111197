"""PaLoRA layers for bitsandbytes-quantised bases: 4-bit ``Linear4bit`` (QLoRA's NF4/FP4) and 8-bit ``Linear8bitLt``
(LLM.int8()).

As LoRA's layers for these backends (``peft/tuners/lora/bnb.py``): the base runs through the quantised layer, the
stacked adapters run in their own (float) dtype on the input and their output is cast back, so the unmerged model is
exactly the dequantised base plus ``delta(lambda)``, at any shared or per-sample preference.

Merging dequantises the weight, adds ``delta(lambda)`` in float32 and quantises the sum again; unmerging subtracts
the delta at the remembered preference and quantises again. Each quantisation rounds:

* 8-bit (one absmax per row, 255 levels): the merged weight is within half a step (0.4 % of the row's absmax) of
  ``W + delta``; merging is allowed, with a warning.
* 4-bit (16 NF4/FP4 levels per block of 64): a step is up to 30 % of the block's absmax, about as large as a trained
  adapter's whole delta, so the merged model keeps only part of the chosen trade-off (measured on a tiny Llama: logits
  off by 60 % of what the adapters change). Merging therefore raises a ``ValueError`` unless asked for inside
  :func:`allow_4bit_requantization`; the error names the exact alternatives (``model.export_lora``, or merging into
  the unquantised base).

bitsandbytes stays optional: this module imports without it, and :func:`dispatch_bnb` returns None when bitsandbytes
was never imported (a model cannot hold a bitsandbytes layer then).
"""

from __future__ import annotations

import contextvars
import sys
import warnings
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from peft_palora.tuner.layer import Linear, _frozen_copy
from peft_palora.utils.context import contextvar_scope

_MERGE_WARNING = (
    "Merging PaLoRA adapters into a {kind} bitsandbytes layer dequantises its weight, adds delta(lambda) and "
    "quantises the sum again: the merged layer equals W + delta(lambda) only to within the {kind} rounding, and every "
    "unmerge or preference change of the merged model (set_preference re-merges) rounds again. For exact outputs keep "
    "the adapters unmerged (a preference change then costs nothing); to serve a trade-off with standard LoRA "
    "machinery, write a LoRA bundle with `model.export_lora(save_directory, preference=...)`."
)

_4BIT_MERGE_REFUSED = (
    "Refusing to merge PaLoRA adapters into the 4-bit bitsandbytes layer{where}: the merged weight would be quantised "
    "again to 16 levels per block, a rounding about as large as the adapters' own delta, so the merged model would "
    "keep only part of the chosen trade-off. Instead: (1) keep the adapters unmerged (exact, and any preference "
    "costs nothing); (2) serve the trade-off with standard LoRA machinery: `model.export_lora(save_directory, "
    "preference=...)` writes a plain PEFT LoRA bundle for this quantised base; (3) for a merged model, load the base "
    "unquantised, `PeftModel.from_pretrained(base, bundle)`, `merge_and_unload()`, and quantise the result. To "
    "requantise anyway, merge inside `with peft_palora.tuner.bnb.allow_4bit_requantization(): ...`."
)

_ALLOW_4BIT: contextvars.ContextVar[bool] = contextvars.ContextVar("palora_allow_4bit_requantization", default=False)


def allow_4bit_requantization() -> AbstractContextManager[bool]:
    """Let merges inside the block requantise 4-bit layers (lossy: see the module notes), in this thread only."""
    return contextvar_scope(_ALLOW_4BIT, True)


def check_merge_allowed(model: nn.Module) -> None:
    """Raise the 4-bit refusal before anything is merged when ``model`` holds a PaLoRA layer on a 4-bit base.

    The layers refuse on their own as well; checking the whole model first means a model that also has plain layers
    is never left half merged.

    Raises:
        ValueError: a PaLoRA ``Linear4bit`` layer with quantised codes, outside :func:`allow_4bit_requantization`.
    """
    if _ALLOW_4BIT.get():
        return
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and not module._holds_float_weight():
            raise ValueError(_4BIT_MERGE_REFUSED.format(where=f" '{name}'"))


def _bitsandbytes() -> ModuleType | None:
    # A model can only hold bitsandbytes layers once bitsandbytes was imported, so never import it here.
    return sys.modules.get("bitsandbytes")


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def quantization_kind(module: nn.Module) -> str | None:
    """``"4-bit"`` or ``"8-bit"`` when ``module`` (or the base layer it wraps) is a bitsandbytes linear layer."""
    bnb = _bitsandbytes()
    if bnb is None:
        return None
    base = _base_of(module)
    if isinstance(base, bnb.nn.Linear4bit):
        return "4-bit"
    if isinstance(base, bnb.nn.Linear8bitLt):
        return "8-bit"
    return None


def check_base_weights_trainable(target: nn.Module, key: str) -> None:
    """Refuse ``train_base_weights=True`` for a targeted layer whose weight is quantised (it has no gradient).

    Raises:
        ValueError: ``target`` (or its base layer) is a bitsandbytes quantised layer.
    """
    kind = quantization_kind(target) or _quantized_embedding_kind(target)
    if kind is None:
        return
    raise ValueError(
        f"`train_base_weights=True` cannot train the targeted layer '{key}' ({type(_base_of(target)).__name__}): its "
        f"weight is stored as {kind} bitsandbytes codes, which take no gradient. Use `train_base_weights=False` to "
        "train the adapters on the frozen quantised base (the QLoRA recipe), or load the base model unquantised to "
        "train its weights with the adapters."
    )


def _quantized_embedding_kind(module: nn.Module) -> str | None:
    bnb = _bitsandbytes()
    if bnb is None:
        return None
    base = _base_of(module)
    kinds = (("Embedding4bit", "4-bit"), ("Embedding8bit", "8-bit"))
    for name, kind in kinds:
        cls = getattr(bnb.nn, name, None)
        if cls is not None and isinstance(base, cls):
            return kind
    return None


class _QuantizedLinear(Linear):
    """The shared part of the two bitsandbytes layers: the forward of :class:`Linear`, a merge that requantises."""

    quantization: str = ""

    def _describe_base_layer(self, base_layer):
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _delta_from(self, a, b, scale):
        # The (out, in) delta of a linear layer; the quantised weight's own shape is that of its packed codes.
        return self._scaled_b(b, scale) @ a

    def _check_requantization_allowed(self) -> None:
        """Raise a ValueError when this kind's rounding would lose too much of the delta (4-bit)."""

    # ---- the two conversions each kind provides -----------------------------------------------------------------
    def _holds_float_weight(self) -> bool:
        """True while the base weight is still a float tensor (not quantised yet): merging is then exact."""
        return self.get_base_layer().weight.dtype.is_floating_point

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the quantised layer computes with, as a float32 (out, in) tensor (a new tensor)."""
        raise NotImplementedError

    def _store_weight(self, weight: torch.Tensor) -> None:
        """Quantise the float (out, in) ``weight`` and make it the base layer's weight."""
        raise NotImplementedError

    def _after_float_weight_change(self) -> None:
        """Drop what the base layer derived from its float weight (8-bit layers cache its quantisation)."""

    # ---- merging ------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the delta at the preference in force: dequantise, add in float32, quantise once for all adapters.

        The preference (T floats) is remembered, as in :meth:`PaLoRALayer.merge`, so ``unmerge`` can subtract the
        same delta; nothing else is copied.
        """
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.palora_A]
        if not adapter_names:
            return
        preferences = {name: self._shared_preference(name, None) for name in adapter_names}  # raises before writing
        if self._holds_float_weight():
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self._after_float_weight_change()
            return
        self._check_requantization_allowed()
        warnings.warn(_MERGE_WARNING.format(kind=self.quantization), UserWarning, stacklevel=2)
        with torch.no_grad():
            weight = self.dequantized_weight()
            for name, preference in preferences.items():
                weight += self.get_delta_weight(name, preference).to(weight.device, torch.float32)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(
                    f"NaNs or infs detected when merging adapters {adapter_names} into a {self.quantization} layer; "
                    "nothing was merged."
                )
            self._store_weight(weight)
        for name, preference in preferences.items():
            self.merged_preferences[name] = _frozen_copy(preference)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged deltas at their remembered preferences and quantise again (rounding once more)."""
        if not self.merged:
            return
        if self._holds_float_weight():
            super().unmerge()
            self._after_float_weight_change()
            return
        with torch.no_grad():
            weight = self.dequantized_weight()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                preference = self.merged_preferences.pop(name)
                weight -= self.get_delta_weight(name, preference).to(weight.device, torch.float32)
            self._store_weight(weight)


class Linear4bit(_QuantizedLinear):
    """PaLoRA for bitsandbytes ``Linear4bit`` (NF4 or FP4 blocks of 64 values with one absmax each, QLoRA)."""

    quantization = "4-bit"

    def _check_requantization_allowed(self):
        if not _ALLOW_4BIT.get():
            raise ValueError(_4BIT_MERGE_REFUSED.format(where=""))

    def remerge(self):
        # Re-merging requantises twice. Outside the opt-in, stay merged at the old preference: the forward then adds
        # the adapters at the difference of preferences, so every output is still the one at the new preference.
        if self.merged and not self._holds_float_weight() and not _ALLOW_4BIT.get():
            return
        super().remerge()

    def _holds_float_weight(self):
        weight = self.get_base_layer().weight
        return weight.dtype.is_floating_point and not getattr(weight, "bnb_quantized", False)

    def _unpack_cpu_layout(self) -> None:
        # On CPUs with AVX512-BF16, bitsandbytes repacks the codes for its inference kernel at the first eval forward
        # (another layout, absmax in bfloat16); dequantising those bytes as the usual layout would be garbage.
        # Undo it first, as bitsandbytes does itself before saving.
        weight = self.get_base_layer().weight
        state = weight.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            return
        inverse = getattr(_bitsandbytes().functional, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:
            raise ValueError(
                "This bitsandbytes version repacked the 4-bit weight for its CPU kernel and offers no way back, so "
                "the weight cannot be merged; use `model.export_lora(save_directory, preference=...)` instead."
            )
        weight.data, weight.quant_state = inverse(weight.data, state)
        absmax = weight.quant_state.absmax
        if not weight.quant_state.nested and absmax.dim() == 2:
            # bitsandbytes 0.50 restores the layout of double-quantised (nested) block scales only: plain ones stay
            # in the kernel's transposed (in / blocksize, out) bfloat16 layout, which would scale the wrong blocks.
            weight.quant_state.absmax = absmax.T.reshape(-1).to(torch.float32)

    def dequantized_weight(self):
        self._unpack_cpu_layout()
        weight = self.get_base_layer().weight
        return _bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)

    def _store_weight(self, weight):
        bnb = _bitsandbytes()
        base = self.get_base_layer()
        old = base.weight
        dtype = old.quant_state.dtype  # the float dtype the codes were made from (and dequantise to)
        new = bnb.nn.Params4bit(
            weight.to("cpu", dtype),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=base,
        )
        base.weight = new.to(old.device)  # moving an unquantised Params4bit to a device quantises it there


class Linear8bitLt(_QuantizedLinear):
    """PaLoRA for bitsandbytes ``Linear8bitLt`` (int8 codes with one absmax per output row, LLM.int8())."""

    quantization = "8-bit"

    def _scales(self) -> torch.Tensor:
        base = self.get_base_layer()
        # Fresh weights carry their row scales; the first forward moves them into the layer's matmul state.
        scales = getattr(base.weight, "SCB", None)
        return base.state.SCB if scales is None else scales

    def dequantized_weight(self):
        codes = self.get_base_layer().weight.data
        return codes.to(torch.float32) * (self._scales().to(codes.device, torch.float32) / 127.0).unsqueeze(1)

    def _store_weight(self, weight):
        bnb = _bitsandbytes()
        base = self.get_base_layer()
        old = base.weight
        new = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
        base.weight = new.to(old.device)  # moving a float Int8Params to a device quantises it there (row absmax)
        base.state.reset_grads()  # forget the old codes and scales: the next forward takes the new ones

    def _after_float_weight_change(self):
        self.get_base_layer().state.reset_grads()  # has_fp16_weights=True layers cache the weight's int8 codes


def dispatch_bnb(target: nn.Module, adapter_name: str, conv_layout: str = "peft", **kwargs: Any) -> nn.Module | None:
    """The PaLoRA layer for a (possibly already wrapped) bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, else None.

    Must run before the plain ``nn.Linear`` dispatch: both bitsandbytes layers subclass ``nn.Linear``.

    Raises:
        TypeError: ``target`` is a bitsandbytes quantised embedding (its weight could not be merged correctly).
    """
    kind = quantization_kind(target)
    if kind == "4-bit":
        return Linear4bit(target, adapter_name, **kwargs)
    if kind == "8-bit":
        return Linear8bitLt(target, adapter_name, **kwargs)
    embedding_kind = _quantized_embedding_kind(target)
    if embedding_kind is not None:
        raise TypeError(
            f"PaLoRA has no layer for bitsandbytes {embedding_kind} embeddings ({type(_base_of(target)).__name__}); "
            "leave them out of `target_modules` (bitsandbytes linear layers are supported)."
        )
    return None
