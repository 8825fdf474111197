"""Tiny models and an independent re-computation of PaLoRA, shared by the tuner tests.

The reference never calls the layer code: it reads the adapter parameters, builds
``W + (alpha / r) * sum_t lambda_t * B_t @ A_t`` task by task with plain einsums, writes that into a copy of the
*base* model and runs it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    ConvNextConfig,
    ConvNextModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    ResNetConfig,
    ResNetModel,
    RobertaConfig,
    RobertaModel,
    T5Config,
    T5Model,
    ViTConfig,
    ViTModel,
)
from transformers.pytorch_utils import Conv1D

import peft_palora
from peft_palora.tuner.layer import ConvNd, Embedding, Linear, PaLoRALayer

# ---- small custom torch modules -------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 6, bias=False)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 12, padding_idx=0)
        self.lin = nn.Linear(12, 4)

    def forward(self, x):
        return self.lin(self.emb(x))


class ConvModel(nn.Module):
    """Conv1d/2d/3d with odd kernels, strides, padding modes, dilation and groups (incl. depthwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(4, 8, kernel_size=3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 12, kernel_size=(3, 1), padding=(1, 0), groups=4, padding_mode="reflect")
        self.depthwise = nn.Conv2d(12, 12, kernel_size=3, padding=2, dilation=2, groups=12)
        self.conv1d = nn.Conv1d(12, 6, kernel_size=2, stride=1)
        self.conv3d = nn.Conv3d(1, 3, kernel_size=(1, 2, 2))

    def forward(self, x):
        h = self.depthwise(self.grouped(self.conv2d(x)))  # (B, 12, 4, 4)
        h1 = self.conv1d(h.flatten(2))  # (B, 6, 15)
        h3 = self.conv3d(h1.unsqueeze(1).unflatten(-1, (3, 5)))  # (B, 3, 6, 2, 4)
        return torch.cat([h1.flatten(1), h3.flatten(1)], dim=1)


class GPT2StyleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(9, 5)  # nf=9 outputs, nx=5 inputs: weight (5, 9)

    def forward(self, x):
        return self.c_attn(x)


@dataclass
class Case:
    """A model to adapt, how to build its inputs and what PaLoRA should target."""

    name: str
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[int], dict]
    target_modules: list[str] | str
    output: Callable = staticmethod(lambda out: out)


def _ids(vocab: int, length: int = 6) -> Callable[[int], dict]:
    return lambda batch: {"input_ids": torch.randint(1, vocab, (batch, length))}


def _pixels(channels: int, size: int) -> Callable[[int], dict]:
    return lambda batch: {"pixel_values": torch.randn(batch, channels, size, size)}


def _hidden(out):
    return out.last_hidden_state


CUSTOM_CASES = [
    Case("mlp", MLP, lambda b: {"x": torch.randn(b, 10)}, ["lin0", "lin1"]),
    Case("mlp_3d_input", MLP, lambda b: {"x": torch.randn(b, 3, 10)}, ["lin0"]),
    Case("embedding", EmbeddingModel, lambda b: {"x": torch.randint(0, 50, (b, 7))}, ["emb", "lin"]),
    Case("conv", ConvModel, lambda b: {"x": torch.randn(b, 4, 8, 8)}, ["conv2d", "grouped", "depthwise", "conv1d", "conv3d"]),
    Case("gpt2_conv1d", GPT2StyleModel, lambda b: {"x": torch.randn(b, 4, 5)}, ["c_attn"]),
]

_TEXT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20)

TRANSFORMERS_CASES = [
    Case("bert", lambda: BertModel(BertConfig(vocab_size=60, **_TEXT)), _ids(60), ["query", "value", "dense"], _hidden),
    Case("roberta", lambda: RobertaModel(RobertaConfig(vocab_size=60, **_TEXT)), _ids(60), "all-linear", _hidden),
    Case(
        "gpt2",
        lambda: GPT2Model(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
        _ids(60),
        ["c_attn", "c_proj", "wte"],
        _hidden,
    ),
    Case(
        "llama",
        lambda: LlamaModel(
            LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=32)
        ),
        _ids(60),
        ["q_proj", "v_proj", "down_proj", "embed_tokens"],
        _hidden,
    ),
    Case(
        "t5",
        lambda: T5Model(T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2)),
        lambda b: {"input_ids": torch.randint(1, 60, (b, 5)), "decoder_input_ids": torch.randint(1, 60, (b, 4))},
        ["q", "v", "wo"],
        _hidden,
    ),
    Case(
        "vit",
        lambda: ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=3, **_TEXT)),
        _pixels(3, 8),
        ["query", "value", "projection"],  # `projection` is the Conv2d patch embedding
        _hidden,
    ),
    Case(
        "resnet",
        lambda: ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")),
        _pixels(3, 16),
        r".*convolution",
        _hidden,
    ),
    Case(
        "convnext",  # depthwise 7x7 convolutions (groups = channels) and linear pointwise layers
        lambda: ConvNextModel(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)),
        _pixels(3, 16),
        ["dwconv", "pwconv1", "pwconv2"],
        _hidden,
    ),
]

ALL_CASES = CUSTOM_CASES + TRANSFORMERS_CASES


def make_config(case: Case, num_tasks: int = 3, r: int = 2, **kwargs) -> peft_palora.PaLoRAConfig:
    kwargs.setdefault("init_weights", False)
    kwargs.setdefault("palora_alpha", 3.0)
    return peft_palora.PaLoRAConfig(num_tasks=num_tasks, r=r, target_modules=case.target_modules, **kwargs)


# ---- the independent reference -----------------------------------------------------------------------------------


def reference_delta(layer: PaLoRALayer, adapter: str, preference: torch.Tensor) -> torch.Tensor:
    """``(alpha/r) * sum_t lambda_t B_t A_t`` task by task, in the layout of the base weight."""
    a = layer.palora_A[adapter].detach().double()
    b = layer.palora_B[adapter].detach().double()
    r, num_tasks, scaling = layer.r[adapter], layer.num_tasks[adapter], layer.scaling[adapter]
    base = layer.get_base_layer()
    total = 0
    for t in range(num_tasks):
        rows = slice(t * r, (t + 1) * r)
        if isinstance(layer, ConvNd):
            groups = base.groups
            out_per_group = base.out_channels // groups
            blocks = []
            for g in range(groups):
                a_g = a[g * num_tasks * r:(g + 1) * num_tasks * r][rows]  # (r, in/g, *k)
                b_g = b[g * out_per_group:(g + 1) * out_per_group, rows].flatten(1)  # (out/g, r)
                blocks.append(torch.einsum("or,r...->o...", b_g, a_g))
            task_delta = torch.cat(blocks, dim=0)
        else:
            task_delta = torch.einsum("or,ri->oi", b[:, rows], a[rows])  # (out, in)
            if isinstance(layer, Embedding) or (isinstance(layer, Linear) and layer.fan_in_fan_out):
                task_delta = task_delta.T
        total = total + float(preference[t]) * task_delta
    return scaling * total


def reference_model(base_model: nn.Module, peft_model: nn.Module, preference: torch.Tensor, adapter="default") -> nn.Module:
    """A copy of ``base_model`` whose targeted weights are replaced by W(lambda)."""
    expected = copy.deepcopy(base_model)
    modules = dict(expected.named_modules())
    for name, layer in peft_model.named_modules():
        if isinstance(layer, PaLoRALayer) and adapter in layer.palora_A:
            target = modules[name.removeprefix("base_model.model.")]
            with torch.no_grad():
                target.weight += reference_delta(layer, adapter, preference).to(target.weight.dtype)
    return expected
