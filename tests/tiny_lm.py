"""Tiny causal language models for the alignment tests: built from configs, with a word-level tokenizer made here.

No pretrained causal LM ships offline, so the tests build a two-layer Llama or Qwen2 from its config and a tokenizer
with the ``tokenizers`` library over a fixed vocabulary. The vocabulary has two disjoint word sets (``RED_WORDS`` and
``BLUE_WORDS``): synthetic objectives prefer completions made of one set or the other, so the right answer is known.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
RED_WORDS = ["red", "rose", "fire", "ruby", "brick", "cherry", "blood", "flame"]
BLUE_WORDS = ["blue", "sky", "sea", "ice", "navy", "cobalt", "ocean", "azure"]
OTHER_WORDS = ["the", "a", "is", "and", "of", "to", "say", "word", "color", "tell", "me", "please", "now", "one"]
VOCAB = SPECIAL + RED_WORDS + BLUE_WORDS + OTHER_WORDS


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`VOCAB` (whitespace split), with BOS added and pad/eos/unk set."""
    vocab = {word: index for index, word in enumerate(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.padding_side = "left"  # generation pads on the left
    return fast


def make_model(kind: str = "llama", seed: int = 0, hidden_size: int = 32) -> torch.nn.Module:
    """A 2-layer ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` over :data:`VOCAB`, seeded, in float32, eval mode."""
    common = dict(
        vocab_size=len(VOCAB), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"kind must be 'llama' or 'qwen2', got {kind!r}")
    model.generation_config.pad_token_id = 0
    return model.eval()


def colour_share(text: str, words: list[str]) -> float:
    """Fraction of the words of ``text`` that are in ``words`` (0 for an empty text): a reward with a known optimum."""
    tokens = text.split()
    return sum(token in words for token in tokens) / len(tokens) if tokens else 0.0
