"""The rows of the tuner matrix (`test_tuner_matrix.py`): tiny models, their inputs and what PaLoRA targets.

Each row builds its base model from a seed, so a "fresh base" (for a save/load round trip) is the same base model
again. Custom rows cover every layer type PaLoRA supports (Linear, GPT-2's `Conv1D`, Conv1d/2d/3d with groups and a
depthwise kernel, Embedding); the transformers rows are tiny models built from configs (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.pytorch_utils import Conv1D

VOCAB = 64

# ---- custom torch modules, one per layer type -----------------------------------------------------------------------


class MatrixMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.act = nn.Tanh()
        self.lin1 = nn.Linear(20, 16)
        self.head = nn.Linear(16, 3)  # not targeted

    def forward(self, x):
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


class MatrixConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, kernel_size=3, padding=1)
        self.grouped = nn.Conv1d(6, 9, kernel_size=2, stride=2, groups=3)
        self.head = nn.Linear(9 * 4, 3)

    def forward(self, x):  # x: (B, 4, 8)
        return self.head(torch.relu(self.grouped(torch.tanh(self.conv(x)))).flatten(1))


class MatrixConv2d(nn.Module):
    """A plain, a grouped (groups=2) and a depthwise (groups=channels) convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(8, 8, kernel_size=(3, 1), padding=(1, 0), groups=2)
        self.depthwise = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8)
        self.head = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):  # x: (B, 3, 6, 6)
        h = torch.tanh(self.conv(x))
        h = torch.tanh(self.grouped(h))
        return self.head(self.depthwise(h).flatten(1))


class MatrixConv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, kernel_size=(1, 2, 2))
        self.grouped = nn.Conv3d(4, 4, kernel_size=2, groups=2)
        self.head = nn.Linear(4 * 2 * 2 * 2, 3)

    def forward(self, x):  # x: (B, 2, 3, 4, 4)
        return self.head(self.grouped(torch.tanh(self.conv(x))).flatten(1))


class MatrixEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.emb(x))


class MatrixGPT2Conv1D(nn.Module):
    """transformers' `Conv1D` (weight stored as (in, out), as in GPT-2), between an embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.c_fc = Conv1D(12, 8)
        self.c_proj = Conv1D(8, 12)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.c_proj(torch.tanh(self.c_fc(self.emb(x)))))


# ---- the rows -----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One model of the matrix.

    Attributes:
        name: the test id.
        build: makes the base model (random weights; the caller seeds).
        inputs: `inputs(batch)` gives the keyword inputs of a forward call (the caller seeds).
        target_modules: what `PaLoRAConfig` targets.
        output: picks the tensor to compare from the model's output.
        config_kwargs: extra `PaLoRAConfig` arguments.
        known_failures: `{check: (exception type, reason)}` for package bugs not fixed yet; the check is marked
            `xfail(strict=True, raises=exception type)` on this row, so the fix makes it fail until the entry is removed. `check` is the test
            function's name, or `name[variant]` for one variant of a parametrised test.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict]
    target_modules: list[str] | str
    output: Callable = staticmethod(lambda out: out)
    config_kwargs: dict = field(default_factory=dict)
    known_failures: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def _logits(out):
    return out.logits


def _token_ids(length: int = 5) -> Callable[[int], dict]:
    return lambda batch: {"input_ids": torch.randint(1, VOCAB, (batch, length))}


def _causal_lm(model_cls, config_cls, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = config_cls(vocab_size=VOCAB, **kwargs)
        config._attn_implementation = "eager"  # the same kernel at every dtype and under inference_mode
        return model_cls(config).eval()

    return build


_LLAMA_LIKE = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=32)

CUSTOM_ROWS = [
    Row("mlp", MatrixMLP, lambda b: {"x": torch.randn(b, 10)}, ["lin0", "lin1"]),
    Row("conv1d", MatrixConv1d, lambda b: {"x": torch.randn(b, 4, 8)}, ["conv", "grouped"]),
    Row("conv2d", MatrixConv2d, lambda b: {"x": torch.randn(b, 3, 6, 6)}, ["conv", "grouped", "depthwise"]),
    Row("conv3d", MatrixConv3d, lambda b: {"x": torch.randn(b, 2, 3, 4, 4)}, ["conv", "grouped"]),
    Row("embedding", MatrixEmbedding, lambda b: {"x": torch.randint(0, VOCAB, (b, 5))}, ["emb"]),
    Row("gpt2_conv1d", MatrixGPT2Conv1D, lambda b: {"x": torch.randint(0, VOCAB, (b, 5))}, ["c_fc", "c_proj"]),
]

TRANSFORMERS_ROWS = [
    Row(
        "opt",
        _causal_lm(OPTForCausalLM, OPTConfig, hidden_size=16, num_hidden_layers=1, ffn_dim=24, num_attention_heads=2,
                   word_embed_proj_dim=16, max_position_embeddings=32),
        _token_ids(),
        ["q_proj", "v_proj", "out_proj"],  # not fc1/fc2: OPT flattens their input to (batch * seq, hidden)
        _logits,
    ),
    Row(
        "gpt2",
        _causal_lm(GPT2LMHeadModel, GPT2Config, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                   bos_token_id=1, eos_token_id=2),
        _token_ids(),
        ["c_attn", "c_proj", "c_fc"],
        _logits,
    ),
    Row(
        "gptj",
        _causal_lm(GPTJForCausalLM, GPTJConfig, n_embd=16, n_layer=1, n_head=2, rotary_dim=4, n_positions=32,
                   bos_token_id=1, eos_token_id=2),
        _token_ids(),
        ["q_proj", "v_proj", "fc_in"],
        _logits,
    ),
    Row(
        "llama",
        _causal_lm(LlamaForCausalLM, LlamaConfig, **_LLAMA_LIKE),
        _token_ids(),
        ["q_proj", "v_proj", "down_proj", "embed_tokens"],
        _logits,
    ),
    Row(
        "qwen2",
        _causal_lm(Qwen2ForCausalLM, Qwen2Config, **_LLAMA_LIKE),
        _token_ids(),
        ["q_proj", "k_proj", "o_proj", "up_proj"],
        _logits,
    ),
    Row(
        "gemma3",
        _causal_lm(Gemma3ForCausalLM, Gemma3TextConfig, head_dim=8, sliding_window=8, tie_word_embeddings=False,
                   **_LLAMA_LIKE),
        _token_ids(),
        ["q_proj", "v_proj", "gate_proj", "embed_tokens"],
        _logits,
    ),
    Row(
        "t5",
        _causal_lm(T5ForConditionalGeneration, T5Config, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                   num_decoder_layers=1, num_heads=2, decoder_start_token_id=0),
        lambda b: {"input_ids": torch.randint(1, VOCAB, (b, 5)), "decoder_input_ids": torch.randint(1, VOCAB, (b, 4))},
        ["q", "v", "wo"],
        _logits,
    ),
]

ROWS = CUSTOM_ROWS + TRANSFORMERS_ROWS
