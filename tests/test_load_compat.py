"""Bundles PEFT's LoRA loads, PaLoRA loads the same way (compared against plain PEFT LoRA on the same model)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import peft_palora

_LLAMA = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, tie_word_embeddings=False)


def _llama(vocab=48):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_LLAMA)).eval()
    model.resize_token_embeddings(vocab)  # the embeddings are then what training changed besides the adapters
    return model


@pytest.mark.parametrize("kind", ["lora", "palora"])
def test_untargeted_resized_embeddings_saved_by_peft_reload(tmp_path, kind):
    config = (LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False) if kind == "lora" else
              peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["q_proj"], init_weights=False))
    model = get_peft_model(_llama(), config)
    with torch.no_grad():  # the new rows, as training would have set them
        model.get_input_embeddings().weight[40:].normal_()
        model.get_output_embeddings().weight[40:].normal_()
    model.save_pretrained(tmp_path / "b", save_embedding_layers=True)
    saved = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(saved)
    ids = torch.randint(0, 48, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    fresh = _llama()  # the same base, its new rows as resizing left them: only the bundle can restore them
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, saved["base_model.model.model.embed_tokens.weight"])


@pytest.mark.parametrize("content", [[1, 2], 3, None, "text"])
def test_a_config_file_that_is_not_an_object_is_a_value_error_naming_it(tmp_path, content):
    """Before any tuner code runs (PeftConfig._get_peft_type): the same ValueError for LoRA and PaLoRA bundles."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"adapter_config\.json must hold a JSON object"):
        PeftModel.from_pretrained(_llama(), str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"adapter_config\.json must hold a JSON object"):
        PeftConfig.from_pretrained(str(tmp_path / "b"))


def test_config_file_check_keeps_peft_behaviour_for_objects(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 3, "runtime_config": {}}))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert PeftConfig.from_json_file(str(path)) == {"peft_type": "LORA", "r": 3}
