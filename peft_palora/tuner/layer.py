"""PaLoRA tuner layers.

Each adapted layer holds, per PEFT adapter name, the T task adapters of rank r stacked into one pair of matrices:

* ``palora_A[name]`` with the T * r down-projections (task t owns rows ``t*r : (t+1)*r``),
* ``palora_B[name]`` with the T * r up-projections (task t owns columns ``t*r : (t+1)*r``).

Stacking is what makes the forward fast: the T adapters run as ONE rank-(T*r) product, and the preference only
enters as a per-direction scale in the middle, ``scale = (alpha / r) * repeat_interleave(lambda, r)``. For one
preference per batch the scale is folded into the (small) ``B`` matrix; for one preference per sample it multiplies
the (batch, ..., T*r) hidden activations row by row. No Python loop runs over tasks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_palora.tuner import state as _per_call
from peft_palora.tuner.folded_conv import conv_with_rebuilt_kernel
from peft_palora.tuner.state import scale_vector


class PreferenceState:
    """The default preference of one adapter, shared by every layer that carries that adapter.

    The value is immutable: :meth:`PaLoRAModel.set_preference` replaces it with a new tensor, never edits it, so a
    reader holding the old one keeps a consistent value. Calls do not read it layer by layer: each model call takes
    one snapshot (see ``_per_call``), and a per-call ``preference=`` never touches it.
    """

    def __init__(self, num_tasks: int, value: torch.Tensor | None = None) -> None:
        self.num_tasks = num_tasks
        self._value = torch.full((num_tasks,), 1.0 / num_tasks) if value is None else _frozen_copy(value)
        # ``(preference, expansion)`` of the model call that dynamo is tracing; written only inside traced code (a
        # side effect dynamo replays as the restore at the end of the call), never while eager code runs.
        self.call: tuple[torch.Tensor, int] | None = None

    @property
    def value(self) -> torch.Tensor:
        """The default preference: shape (T,) for the whole batch or (batch, T) per sample."""
        return self._value

    @value.setter
    def value(self, preference: torch.Tensor) -> None:
        self._value = _frozen_copy(preference)  # callers validate; later in-place edits by the user can't leak in


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _frozen_copy(preference: torch.Tensor) -> torch.Tensor:
    # A plain tensor made outside any inference_mode block, so later training and merges may use it.
    with torch.inference_mode(False):
        return preference.detach().to(torch.float32).clone()


class PaLoRALayer(BaseTunerLayer):
    """Common state of the PaLoRA layers (the mixin that LoRA calls ``LoraLayer``)."""

    adapter_layer_names: tuple[str, ...] = ("palora_A", "palora_B")
    other_param_names: tuple[str, ...] = (
        "r", "scaling", "palora_dropout", "num_tasks", "preference_states", "merged_preferences", "trains_base_weights"
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_tasks: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.palora_dropout = nn.ModuleDict({})
        self.palora_A = nn.ParameterDict({})
        self.palora_B = nn.ParameterDict({})
        self.preference_states: dict[str, PreferenceState] = {}
        # The (T,) preference each merged adapter was merged at: unmerge subtracts exactly that delta (no weight copy).
        self.merged_preferences: dict[str, torch.Tensor] = {}
        # Adapters whose config trains this layer's base weight (`train_base_weights=True`; set by the tuner): their
        # delta is relative to a changed base, so PEFT's LoRA conversion of the delta alone is refused.
        self.trains_base_weights: dict[str, bool] = {}
        # Which dimension of this layer's input holds the samples: 0, or 1 inside a `batch_first=False` module.
        self.batch_dim = 0
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

    # ---- construction -------------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        num_tasks: int,
        r: int,
        scaling: float,
        dropout: float,
        init_weights: bool,
        preference_state: PreferenceState,
    ) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.num_tasks[adapter_name] = num_tasks
        self.scaling[adapter_name] = scaling
        self.preference_states[adapter_name] = preference_state
        self.palora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        a_shape, b_shape = self._adapter_shapes(num_tasks * r)
        self.palora_A[adapter_name] = nn.Parameter(torch.empty(a_shape))
        self.palora_B[adapter_name] = nn.Parameter(torch.empty(b_shape))
        self.reset_palora_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _adapter_shapes(self, total_rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def reset_palora_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """Kaiming-uniform ``A`` (as LoRA); ``B`` zero so the adapters start as the identity, or random for tests."""
        with torch.no_grad():
            a, b = self.palora_A[adapter_name], self.palora_B[adapter_name]
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(b)
            else:
                nn.init.normal_(b, std=0.1)

    # ---- the preference -----------------------------------------------------------------------------------------
    def _directions(self, adapter_name: str) -> int:
        """How many adapter directions each task owns (its block of rows of A, columns of B): r."""
        return self.r[adapter_name]

    def _traced_preference(self, adapter_name: str) -> tuple[torch.Tensor, int]:
        """Under ``torch.compile``: ``(preference, expansion)`` in force for this adapter, read without a graph break
        from the traced model call (``PreferenceState.call``). A layer traced on its own (a compiled block inside an
        eager call) looks the call up eagerly instead: a graph break, but the preference is still a graph input."""
        state = self.preference_states[adapter_name]
        if state.call is not None:
            return state.call
        snapshot = _per_call.current_outside_graph()
        if snapshot is not None and adapter_name in snapshot.values:
            return snapshot.values[adapter_name], snapshot.expansion
        return state.value, 1

    def _preference(self, adapter_name: str) -> torch.Tensor:
        """The preference in force for this adapter: the running call's, else the adapter's default."""
        if _per_call.compiling():
            return self._traced_preference(adapter_name)[0]
        snapshot = _per_call.current()
        if snapshot is not None and adapter_name in snapshot.values:
            return snapshot.values[adapter_name]
        return self.preference_states[adapter_name].value

    def _scale(self, adapter_name: str, like: torch.Tensor) -> torch.Tensor:
        """This layer's ``(alpha / r) * lambda`` per adapter direction at the preference in force, on ``like``'s
        device and dtype (from the running call's snapshot, which computes it once per call)."""
        if _per_call.compiling():
            preference, expansion = self._traced_preference(adapter_name)
            return self._scale_at(adapter_name, preference, like, expansion)
        snapshot = _per_call.current()
        if snapshot is not None and adapter_name in snapshot.values:
            r, scaling = self._directions(adapter_name), self.scaling[adapter_name]
            return snapshot.scale(adapter_name, r, scaling, like.device, like.dtype)
        return self._scale_at(adapter_name, self.preference_states[adapter_name].value, like)

    def _scale_at(self, adapter_name: str, preference: torch.Tensor, like: torch.Tensor, expansion: int = 1):
        """``(alpha / r) * preference`` per adapter direction of this layer, on ``like``'s device and dtype."""
        scale = scale_vector(preference, self._directions(adapter_name), self.scaling[adapter_name], expansion)
        return scale.to(like.device, like.dtype)

    def _shared_preference(self, adapter_name: str, preference: torch.Tensor | None) -> torch.Tensor:
        preference = self._preference(adapter_name) if preference is None else preference
        if preference.dim() != 1:
            raise ValueError(
                f"Adapter '{adapter_name}' has a per-sample preference of shape {tuple(preference.shape)}; one "
                "preference for the whole model is needed here (merging bakes a single preference into the weights)."
            )
        return preference

    def _forward_scales(self) -> dict[str, torch.Tensor]:
        """The per-direction scale of every active adapter that adds something to this forward.

        An adapter merged at ``lambda_m`` is already in the weight; a call at another preference ``lambda`` adds
        the adapter at ``lambda - lambda_m`` (the delta is linear in the preference), so a merged model serves any
        preference without its shared weights being touched.
        """
        scales = {}
        for name in self._active_palora_adapters():
            b = self.palora_B[name]
            if name not in self.merged_adapters:
                scales[name] = self._scale(name, b)
                continue
            if _per_call.compiling():
                preference, expansion = self._traced_preference(name)
                if preference is self.merged_preferences[name]:
                    continue  # a call at the default, which the weights hold (identity: decided while tracing)
                scales[name] = self._scale_at(name, preference - self.merged_preferences[name].to(preference), b,
                                              expansion)
                continue
            preference = self._preference(name)
            merged_at = self.merged_preferences[name].to(preference)
            if preference.dim() == 1 and not preference.requires_grad and torch.equal(preference, merged_at):
                continue  # (a preference that requires grad keeps its zero-valued term: its gradient is not zero)
            snapshot = _per_call.current()
            expansion = snapshot.expansion if snapshot is not None else 1
            scales[name] = self._scale_at(name, preference - merged_at, b, expansion)
        return scales

    # ---- the delta ----------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str, preference: torch.Tensor | None = None) -> torch.Tensor:
        """``(alpha / r) * sum_t lambda_t B_t A_t`` in the base weight's layout.

        Args:
            adapter_name: the PEFT adapter.
            preference: a validated (T,) preference; the one in force when None (the running call's, else the
                default set by ``set_preference``).
        """
        # Under FSDP2 the factors and the weight are DTensor shards: the delta is built from the gathered factors
        # (a collective, so every rank must merge together) and cut back to this rank's shard of the weight.
        a, b = _full_tensor(self.palora_A[adapter_name]), _full_tensor(self.palora_B[adapter_name])
        preference = self._shared_preference(adapter_name, preference)
        delta = self._delta_from(a, b, self._scale_at(adapter_name, preference, b))
        weight = self.get_base_layer().weight
        if _is_dtensor(weight):
            from torch.distributed.tensor import distribute_tensor

            delta = distribute_tensor(delta.detach(), weight.device_mesh, weight.placements, src_data_rank=None)
        return delta

    def _delta_from(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The delta for stacked factors ``a``, ``b`` and per-direction ``scale``, in the base weight's layout."""
        zeros = torch.zeros(self.get_base_layer().weight.shape, dtype=b.dtype, device=b.device)
        return self._add_delta(zeros, a, b, scale)

    def _add_delta(
        self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, alpha: float = 1.0
    ) -> torch.Tensor:
        """The formula of this layer type: ``out += alpha * delta`` in place (one fused multiply-add, no temporary
        of the weight's size), returning ``out``. Differentiable, so the folded convolution builds its kernel with it.
        """
        raise NotImplementedError

    @staticmethod
    def _scaled_b(b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``B`` with its T*r columns scaled by a shared ``scale`` (the one place ``B`` meets the preference)."""
        return (b.flatten(1) * scale).view_as(b)

    # ---- PEFT's LoRA conversion ---------------------------------------------------------------------------------
    def lora_conversion_refusal(self, adapter_name: str = "default") -> str | None:
        """Why PEFT's ``convert_to_lora``/``save_as_lora`` cannot convert this layer's adapter, or None when it can.

        PEFT converts a layer by a truncated SVD of ``get_delta_weight(adapter_name)`` (here at the preference in
        force), read as a 2-D ``(out, in)`` matrix and written as ``lora_A.weight``/``lora_B.weight``. That is right
        for the additive linear layers (``nn.Linear``, transformers' ``Conv1D``, bitsandbytes' linears).
        """
        if adapter_name not in self.palora_A:
            return f"it has no PaLoRA adapter {adapter_name!r}"
        if getattr(self, "trains_base_weights", {}).get(adapter_name, False):
            return (
                "its adapter was trained with train_base_weights=True: the base weight changed, and a LoRA of the "
                "delta alone would be applied to the original base"
            )
        return None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's conversion protocol: True when ``peft.convert_to_lora`` can convert this layer (see
        :meth:`lora_conversion_refusal` for the reason when not)."""
        return self.lora_conversion_refusal(adapter_name) is None

    # ---- merging ------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the delta at the preference in force to the base weight, and remember that preference (T floats).

        No copy of the weight is kept: ``unmerge`` subtracts the same delta again.
        """
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.palora_A]
        preferences = {name: self._shared_preference(name, None) for name in adapter_names}  # raises before writing
        weight = self.get_base_layer().weight
        for name, preference in preferences.items():
            with torch.no_grad():
                if safe_merge:  # checks the sum before writing: needs it in full, once
                    merged = weight.data + self.get_delta_weight(name, preference).to(weight.dtype)
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs or infs detected when merging adapter '{name}'; nothing was merged.")
                    weight.data.copy_(merged)
                    del merged
                else:
                    self._add_delta_to_weight(name, preference, alpha=1.0)
            # The default itself when merged at it (it is never edited in place): a compiled call at the default
            # then knows, while tracing, that the weights already hold its preference.
            default = self.preference_states[name].value
            self.merged_preferences[name] = preference if preference is default else _frozen_copy(preference)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged deltas again (to within float rounding)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            preference = self.merged_preferences.pop(name)
            with torch.no_grad():
                self._add_delta_to_weight(name, preference, alpha=-1.0)

    def _add_delta_to_weight(self, adapter_name: str, preference: torch.Tensor, alpha: float) -> None:
        """``W += alpha * delta(preference)``: in place when the weight is a plain tensor of the adapters' dtype,
        else through ``get_delta_weight`` (sharded weights, another dtype: built, cast, added, freed)."""
        weight = self.get_base_layer().weight
        a, b = self.palora_A[adapter_name], self.palora_B[adapter_name]
        if _is_dtensor(weight) or _is_dtensor(a) or weight.dtype != b.dtype or weight.device != b.device:
            weight.data.add_(self.get_delta_weight(adapter_name, preference).to(weight.dtype), alpha=alpha)
            return
        self._add_delta(weight.data, a, b, self._scale_at(adapter_name, preference, b), alpha=alpha)

    def remerge(self) -> None:
        """Move the merged adapters to the preference now in force: subtract the old delta, add the new one."""
        if not self.merged:
            return
        names = list(self.merged_adapters)
        for name in names:
            self._shared_preference(name, None)  # a per-sample preference cannot be merged: refuse before writing
        self.unmerge()
        self.merge(adapter_names=names)

    # ---- forward ------------------------------------------------------------------------------------------------
    def _active_palora_adapters(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.palora_A]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if _per_call.compiling():  # a traced checkpoint recomputes from the graph's inputs: no stack to walk
            return self._forward(x, self._forward_scales(), *args, **kwargs)
        recorded = _per_call.checkpoint_preferences(self.training)  # a checkpoint re-run: its forward's preference
        if recorded is not None:
            with _per_call.call_preferences(recorded):
                return self._forward(x, self._forward_scales(), *args, **kwargs)
        return self._forward(x, self._forward_scales(), *args, **kwargs)

    def _forward(self, x: torch.Tensor, scales: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer plus each adapter's branch at its scale (the branch every layer type has)."""
        result = self.base_layer(x, *args, **kwargs)
        for name, scale in scales.items():
            result = result + self._adapter_output(name, x, scale).to(result.dtype)
        return result

    def _adapter_output(self, adapter_name: str, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _per_sample_scale(self, scale: torch.Tensor, hidden: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Shape a (rows, C) per-sample scale to broadcast over ``hidden``: samples at ``batch_dim``, channels at
        ``channel_dim``. The rows must be exactly the samples: nothing is repeated or guessed."""
        rows = hidden.shape[self.batch_dim] if hidden.dim() > max(self.batch_dim, 1) else None
        if _per_call.compiling():
            expansion = 1  # call-wide: any active adapter's
            for name in self._active_palora_adapters():
                expansion = self._traced_preference(name)[1]
        else:
            snapshot = _per_call.current()
            expansion = snapshot.expansion if snapshot is not None else 1
        if rows is not None and expansion > 1 and rows * expansion == scale.shape[0]:
            # `generate` expands each sample into `expansion` rows for the decoder only: an encoder (T5, BART) runs
            # once per sample, and its rows take each sample's first (identical) expanded row.
            scale = scale[::expansion]
        if rows != scale.shape[0]:
            raise ValueError(
                f"A per-sample preference has {scale.shape[0]} rows but this {type(self.get_base_layer()).__name__} "
                f"layer's input has "
                + (f"{rows} samples along dimension {self.batch_dim}" if rows is not None else "no batch dimension")
                + f" (its adapter activations have shape {tuple(hidden.shape)}); give exactly one preference row per "
                "sample."
            )
        shape = [1] * hidden.dim()
        shape[self.batch_dim] = rows
        shape[channel_dim] = scale.shape[1]
        return scale.view(shape)


class _PaLoRAModule(nn.Module, PaLoRALayer):
    """The ``nn.Module`` side shared by the concrete layers (LoRA writes this out in each of its layer classes).

    It also puts ``PaLoRALayer.forward`` ahead of ``nn.Module``'s in the method order.
    """

    forward = PaLoRALayer.forward

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        num_tasks: int,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init_weights: bool = True,
        preference_state: PreferenceState,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        PaLoRALayer.__init__(self, base_layer, **kwargs)
        self._describe_base_layer(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, num_tasks, r, scaling, dropout, init_weights, preference_state)

    def _describe_base_layer(self, base_layer: nn.Module) -> None:
        """Read the shapes the adapters need (``in_features``, ``out_features``, ...) off the base layer."""
        raise NotImplementedError

    def _linear_up_projection(self, adapter_name: str, hidden: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``B`` applied to the (..., T*r) hidden directions, with the preference folded in."""
        b = self.palora_B[adapter_name]
        if scale.dim() == 2:  # one preference per sample: scale the activations row by row
            return F.linear(hidden * self._per_sample_scale(scale, hidden, channel_dim=-1), b)
        # One preference for the batch: scale the (out, T*r) matrix, not the (batch, ..., T*r) activations.
        return F.linear(hidden, self._scaled_b(b, scale))

    def __repr__(self) -> str:
        return "palora." + super().__repr__()


class Linear(_PaLoRAModule):
    """PaLoRA for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 style, weight stored as (in, out))."""

    def _describe_base_layer(self, base_layer):
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _adapter_shapes(self, total_rank):
        return (total_rank, self.in_features), (self.out_features, total_rank)

    def _add_delta(self, out, a, b, scale, alpha=1.0):
        # (out, in) += B_s @ A; a Conv1D weight is stored (in, out): its transpose is the (out, in) view
        (out.T if self.fan_in_fan_out else out).addmm_(self._scaled_b(b, scale), a, alpha=alpha)
        return out

    def _adapter_output(self, adapter_name, x, scale):
        a = self.palora_A[adapter_name]
        x = self.palora_dropout[adapter_name](self._cast_input_dtype(x, a.dtype))
        return self._linear_up_projection(adapter_name, F.linear(x, a), scale)


class Embedding(_PaLoRAModule):
    """PaLoRA for ``nn.Embedding``: ``A`` is looked up like an embedding table, ``B`` projects to the embedding.

    As in LoRA, ``palora_dropout`` does not apply to embeddings (their input is token ids), and a config that sets it
    for other layers may still target embeddings.
    """

    def _describe_base_layer(self, base_layer):
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def update_layer(self, adapter_name, num_tasks, r, scaling, dropout, init_weights, preference_state):
        super().update_layer(adapter_name, num_tasks, r, scaling, 0.0, init_weights, preference_state)

    def _adapter_shapes(self, total_rank):
        return (total_rank, self.in_features), (self.out_features, total_rank)

    def reset_palora_parameters(self, adapter_name, init_weights):
        # As LoRA does for embeddings: the lookup table A starts at zero and B is normal, so the adapters start as
        # the identity while the gradient reaches A (the factor that sees the tokens) from the first step. Random
        # A (and B as small as the other layers' test B) with init_weights=False (for tests).
        with torch.no_grad():
            a, b = self.palora_A[adapter_name], self.palora_B[adapter_name]
            if init_weights:
                nn.init.zeros_(a)
                nn.init.normal_(b)
            else:
                nn.init.normal_(a)
                nn.init.normal_(b, std=0.1)

    def _add_delta(self, out, a, b, scale, alpha=1.0):
        out.T.addmm_(self._scaled_b(b, scale), a, alpha=alpha)  # the table is (num_embeddings, dim): delta transposed
        return out

    def lora_conversion_refusal(self, adapter_name="default"):
        return super().lora_conversion_refusal(adapter_name) or (
            "PEFT's convert_to_lora writes lora_A/lora_B.weight from a 2-D SVD, which a LoRA Embedding does not read "
            "(it holds lora_embedding_A/B): the embedding adapter would not load (PEFT only warns of missing keys). Use "
            "`model.export_lora(dir)` (exact, writes embedding LoRAs)"
        )

    def _adapter_output(self, adapter_name, x, scale):
        base = self.get_base_layer()
        hidden = F.embedding(x, self.palora_A[adapter_name].T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                             norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        out = self._linear_up_projection(adapter_name, hidden, scale)
        embed_scale = self._get_embed_scale()  # e.g. Gemma scales its embeddings; the delta must be scaled alike
        return out if embed_scale is None else out * embed_scale.to(out.dtype)


class ConvNd(_PaLoRAModule):
    """PaLoRA for ``nn.Conv1d/2d/3d`` with any kernel size, stride, padding, dilation, padding mode and groups.

    ``A`` is a convolution shaped like the base one (same kernel, stride, padding, dilation and ``groups``) with
    ``groups * T * r`` output channels; ``B`` is a grouped 1x1 convolution back to the output channels. Per group the
    delta is then ``B_g @ A_g``, which has exactly the block-diagonal layout of the base grouped weight, so merging
    works for every ``groups`` and the adapter has the same parameter count as for ``groups=1``.
    """

    def _describe_base_layer(self, base_layer):
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.groups = base_layer.groups
        self._spatial_dims = base_layer.weight.dim() - 2

    def _adapter_shapes(self, total_rank):
        kernel = tuple(self.get_base_layer().kernel_size)
        g = self.groups
        a_shape = (g * total_rank, self.in_features // g, *kernel)
        b_shape = (self.out_features, total_rank) + (1,) * self._spatial_dims
        return a_shape, b_shape

    def _add_delta(self, out, a, b, scale, alpha=1.0):
        g, total_rank = self.groups, b.shape[1]
        b_scaled = self._scaled_b(b, scale).reshape(g, self.out_features // g, total_rank)
        a_grouped = a.reshape(g, total_rank, -1)
        if not out.is_contiguous():  # e.g. a channels_last kernel: no grouped view of it
            return out.add_(torch.bmm(b_scaled, a_grouped).reshape(out.shape), alpha=alpha)
        out.view(g, self.out_features // g, -1).baddbmm_(b_scaled, a_grouped, alpha=alpha)  # per group B_g @ A_g
        return out

    def lora_conversion_refusal(self, adapter_name="default"):
        return super().lora_conversion_refusal(adapter_name) or (
            f"PEFT's convert_to_lora takes the SVD of a 2-D delta, and this {type(self.get_base_layer()).__name__}'s "
            f"delta is a {self.get_base_layer().weight.dim()}-D kernel (LoRA's conv form is a k x k conv then 1x1). Use "
            "`model.export_lora(dir)` (exact for conv_layout='peft' with groups=1, no dilation, zero padding)"
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() == self._spatial_dims + 1:  # an unbatched input, which nn.Conv accepts: run it as a batch of one
            return self.forward(x.unsqueeze(0), *args, **kwargs).squeeze(0)
        return super().forward(x, *args, **kwargs)

    def _forward(self, x, scales, *args, **kwargs):
        if not scales or self.merged or not self._can_fold_into_weight(scales, x):
            return super()._forward(x, scales, *args, **kwargs)
        # One preference for the whole batch: run ONE convolution with W + delta(lambda). The delta is as small as
        # the kernel, while the adapter branch would store (batch, T*r, *spatial) activations and run a second
        # convolution. Gradients still reach W, A and B through the sum. The scales are this forward's: backward may
        # run after the preference has changed (a window of preferences), and the rebuilt kernel must be this one.
        base = self.get_base_layer()
        names = list(scales)
        inputs = [base.weight] + [t for name in names for t in (self.palora_A[name], self.palora_B[name])]
        scale_list = [scales[name] for name in names]

        def summed_kernel(weight: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
            kernel = weight.clone()
            for i, scale in enumerate(scale_list):
                kernel = self._add_delta(kernel, factors[2 * i], factors[2 * i + 1], scale)
            return kernel

        training = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if training and x.dtype == base.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # Do not keep the summed kernel (a copy of W) for backward; it is rebuilt there.
            return conv_with_rebuilt_kernel(base, x, summed_kernel, inputs)
        return base._conv_forward(x, summed_kernel(*inputs), base.bias)

    def _can_fold_into_weight(self, scales: dict[str, torch.Tensor], x: torch.Tensor) -> bool:
        """The cost rule between the two paths: whether the forward may use the summed weight.

        It may with a shared preference, no active dropout on the adapter input, adapters in the base weight's dtype
        (summing a small delta into a lower-precision weight would round it away), no hooks on the base layer that
        its ``forward`` would have run, and enough output positions.

        Building the delta costs about ``out * T*r * in/groups * prod(kernel)`` multiply-adds; the adapter branch
        costs about as much per output position times ``(in/groups * prod(kernel) + out) / out``. So the summed
        kernel is cheaper once the batch has at least ``out_channels`` output positions, the common case for
        convolutions (a deep, narrow feature map at batch 1 takes the branch).

        In training, the summed kernel's backward computes the gradient of the whole kernel. That is free when the
        base weight trains anyway (``train_base_weights=True``, the paper's mode) but a full extra weight-gradient
        convolution for a frozen base, where the branch only needs the small ``A`` and ``B`` gradients: a frozen
        base therefore keeps the branch while gradients are being recorded.
        """
        base = self.get_base_layer()
        if not self._folding_keeps_the_result(scales):
            return False
        if torch.is_grad_enabled() and not base.weight.requires_grad:
            return False
        spatial = x.shape[-self._spatial_dims :]
        positions = x.shape[0] * math.prod(spatial) // math.prod(base.stride)
        return positions >= self.out_features

    def _folding_keeps_the_result(self, scales: dict[str, torch.Tensor]) -> bool:
        """The conditions under which the summed kernel computes what the branch computes: a shared preference,
        no active dropout on the adapter input, adapters in the weight's dtype, a plain base convolution (no hooks
        or overridden ``forward`` that the summed kernel would skip)."""
        base = self.get_base_layer()
        if base._forward_hooks or base._forward_pre_hooks or type(base).forward not in _PLAIN_CONV_FORWARDS:
            return False
        for name, scale in scales.items():
            dropout = self.palora_dropout[name]
            if scale.dim() != 1 or (dropout.training and not isinstance(dropout, nn.Identity)):
                return False
            if self.palora_A[name].dtype != base.weight.dtype or self.palora_B[name].dtype != base.weight.dtype:
                return False
        return True

    def _adapter_output(self, adapter_name, x, scale):
        base = self.get_base_layer()
        a, b = self.palora_A[adapter_name], self.palora_B[adapter_name]
        x = self.palora_dropout[adapter_name](self._cast_input_dtype(x, a.dtype))
        # `_conv_forward` applies the base layer's stride, padding (and padding mode), dilation and groups.
        hidden = base._conv_forward(x, a, None)
        if scale.dim() == 2:
            hidden = hidden * self._per_sample_scale(scale.repeat(1, self.groups), hidden, channel_dim=1)
            return self._grouped_pointwise(hidden, b)
        return self._grouped_pointwise(hidden, self._scaled_b(b, scale))

    def _grouped_pointwise(self, hidden: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B`` as a grouped 1x1 convolution, written as one batched matmul over the channels.

        With only ``T * r`` input channels a 1x1 convolution is a poor fit for the convolution kernels (on CPU,
        oneDNN ran it about 4x slower than the matmul, forward and backward); the result is the same.
        """
        g, total_rank = self.groups, b.shape[1]
        batch, spatial = hidden.shape[0], hidden.shape[2:]
        grouped = hidden.reshape(batch, g, total_rank, -1)  # (B, g, T*r, positions)
        weight = b.reshape(g, self.out_features // g, total_rank)  # (g, out/g, T*r)
        out = torch.matmul(weight.unsqueeze(0), grouped)  # (B, g, out/g, positions)
        return out.reshape(batch, self.out_features, *spatial)


class PaperConvNd(ConvNd):
    """The paper's convolution adapter (``PaLoRAConfig(conv_layout="paper")``), as the authors' code shapes it.

    For a kernel ``(k_1, ..., k_d)`` each task owns ``r * k_1`` directions: ``B`` is ``(out/groups * k_1, T*r*k_1)``
    and ``A`` is ``(T*r*k_1, in * k_2 * ... * k_d)``, and ``B_s @ A`` is reshaped into the kernel, so at r = 1 a 5x5
    kernel delta can have full rank (PEFT's layout, a k x k convolution to r channels then 1x1, has rank at most r).
    For Conv2d with a square kernel this is exactly ``B (out*k, r*k) @ A (r*k, in*k)``. ``A`` starts
    Kaiming-uniform with the paper's bound ``1/sqrt(in * k)``.

    The delta is not a product of two convolutions, so it always runs folded into the kernel: one convolution
    with ``W + delta(lambda)`` for a shared preference, and, per sample, one convolution per task with that task's
    kernel delta, weighted by each sample's preference.
    """

    def _matrix_shape(self) -> tuple[int, int]:
        kernel = tuple(self.get_base_layer().kernel_size)
        return self.out_features // self.groups * kernel[0], self.in_features * math.prod(kernel[1:])

    def _directions(self, adapter_name):
        return self.r[adapter_name] * self.get_base_layer().kernel_size[0]

    def _adapter_shapes(self, total_rank):
        rows, cols = self._matrix_shape()
        inner = total_rank * self.get_base_layer().kernel_size[0]
        return (inner, cols), (rows, inner)

    def _add_delta(self, out, a, b, scale, alpha=1.0):
        if not out.is_contiguous():
            return out.add_((self._scaled_b(b, scale) @ a).reshape(out.shape), alpha=alpha)
        out.view(self._matrix_shape()).addmm_(self._scaled_b(b, scale), a, alpha=alpha)
        return out

    def _can_fold_into_weight(self, scales, x):
        # The branch here is itself a full convolution with the kernel delta, so folding is never the dearer path:
        # only the conditions under which folding would change the result remain.
        return self._folding_keeps_the_result(scales)

    def _adapter_output(self, adapter_name, x, scale):
        base = self.get_base_layer()
        a, b = self.palora_A[adapter_name], self.palora_B[adapter_name]
        x = self.palora_dropout[adapter_name](self._cast_input_dtype(x, a.dtype))
        if scale.dim() == 1:
            return base._conv_forward(x, self._delta_from(a, b, scale), None)
        # One preference per sample: the T task deltas as T convolutions, mixed per sample. `scale` holds each
        # task's scaling * lambda repeated over its directions; its first direction per task is that factor.
        directions = self._directions(adapter_name)
        per_task = scale[:, ::directions]  # (rows, T)
        out = None
        for task in range(per_task.shape[1]):
            unit = torch.zeros(per_task.shape[1] * directions, dtype=b.dtype, device=b.device)
            unit[task * directions : (task + 1) * directions] = 1.0
            hidden = base._conv_forward(x, self._delta_from(a, b, unit), None)
            term = hidden * self._per_sample_scale(per_task[:, task : task + 1], hidden, channel_dim=1)
            out = term if out is None else out + term
        return out


SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# A subclass that overrides ``forward`` may do more than ``_conv_forward``; such layers keep the adapter branch.
_PLAIN_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def dispatch_layer_type_supported(module: nn.Module) -> bool:
    """Whether PaLoRA has a layer for this module type."""
    return isinstance(module, SUPPORTED_LAYER_TYPES)


def dispatch_default(target: nn.Module, adapter_name: str, conv_layout: str = "peft", **kwargs: Any) -> nn.Module | None:
    """The PaLoRA layer for a plain layer type, or None when ``target`` is not one (PEFT LoRA's ``dispatch_default``).

    The weight layout follows the layer type: transformers' ``Conv1D`` stores (in, out) (``fan_in_fan_out``),
    ``nn.Linear`` (out, in), whatever the config's ``fan_in_fan_out`` says. ``conv_layout`` picks the convolution
    adapter: ``"peft"`` (:class:`ConvNd`) or ``"paper"`` (:class:`PaperConvNd`).
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, (nn.Linear, Conv1D)):
        return Linear(target, adapter_name, **kwargs)
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, **kwargs)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (PaperConvNd if conv_layout == "paper" else ConvNd)(target, adapter_name, **kwargs)
    return None

