"""Bundles hold what their config declares, nothing more and nothing less (issue: hardening, second round)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

import peft_palora
from peft_palora import palora_layers

_BERT = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)


def _bert(seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(**{**_BERT, **overrides})).eval()


def _outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_a_bundle_cannot_overwrite_base_weights_its_config_does_not_declare(tmp_path):
    model = get_peft_model(_bert(), peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["query"],
                                                             init_weights=False))
    model.save_pretrained(tmp_path / "bundle")
    weights = tmp_path / "bundle" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.embeddings.word_embeddings.weight"] = torch.zeros(60, 16)
    save_file(tensors, weights)
    base = _bert()
    ids = torch.randint(1, 60, (2, 5))
    before = _outputs(base, ids)
    with pytest.raises(ValueError, match="does not declare.*embeddings.word_embeddings.weight"):
        PeftModel.from_pretrained(base, tmp_path / "bundle")
    assert not palora_layers(base)
    assert torch.equal(_outputs(base, ids), before)


def test_a_config_listing_modules_to_save_without_their_tensors_is_refused_and_the_model_left_alone(tmp_path):
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**_BERT)).eval()
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["query"],
                                                          modules_to_save=["classifier"], init_weights=False))
    model.save_pretrained(tmp_path / "bundle")
    weights = tmp_path / "bundle" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "classifier" not in k}, weights)
    torch.manual_seed(0)
    fresh = BertForSequenceClassification(BertConfig(**_BERT)).eval()
    with pytest.raises(ValueError, match=r"adapter_model.safetensors lacks the tensors of modules_to_save.*"
                                         r"classifier.weight"):
        PeftModel.from_pretrained(fresh, tmp_path / "bundle")
    assert type(fresh.classifier) is nn.Linear  # no ModulesToSaveWrapper left behind
    assert not palora_layers(fresh)


def test_bias_all_with_modules_to_save_reloads_like_lora(tmp_path):
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**_BERT)).eval()
    model = get_peft_model(base, peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["query"], bias="all",
                                                          modules_to_save=["classifier"], init_weights=False))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].bias.add_(0.5)
        palora_layers(model)[0].get_base_layer().bias.add_(0.25)
    model.save_pretrained(tmp_path / "bundle")
    ids = torch.randint(1, 60, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(BertForSequenceClassification(BertConfig(**_BERT)), tmp_path / "bundle")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_ignore_mismatched_sizes_loads_onto_a_resized_vocabulary(tmp_path):
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["query", "word_embeddings"],
                                      init_weights=False)
    model = get_peft_model(_bert(), config)
    model.save_pretrained(tmp_path / "bundle")
    resized = _bert()
    resized.resize_token_embeddings(64)
    with pytest.raises(ValueError, match="shape of .*word_embeddings.palora_A.default"):
        PeftModel.from_pretrained(resized, tmp_path / "bundle")
    resized = _bert()
    resized.resize_token_embeddings(64)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        loaded = PeftModel.from_pretrained(resized, tmp_path / "bundle", ignore_mismatched_sizes=True)
    saved = load_file(tmp_path / "bundle" / "adapter_model.safetensors")
    query = [layer for name, layer in loaded.named_modules() if name.endswith("query")][0]
    key = next(k for k in saved if k.endswith("query.palora_A.weight") or k.endswith("query.palora_A"))
    assert torch.equal(query.palora_A["default"], saved[key])  # what fits is loaded, the rest is reported


def test_ignore_mismatched_sizes_is_honoured_by_set_peft_model_state_dict(tmp_path):
    """PEFT's own load function, called directly (as `MultiTaskModel` and users' loops do), skips mismatched tensors
    with the flag and is refused before anything loads without it, as `from_pretrained` is."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["query", "word_embeddings"],
                                      init_weights=False)
    get_peft_model(_bert(), config).save_pretrained(tmp_path / "bundle")
    weights = load_peft_weights(str(tmp_path / "bundle"))
    resized = _bert(seed=1)
    resized.resize_token_embeddings(64)
    model = get_peft_model(resized, peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["query",
                                                                                              "word_embeddings"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape of .*word_embeddings.palora_A.default"):
        set_peft_model_state_dict(model, weights)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded

    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        set_peft_model_state_dict(model, weights, ignore_mismatched_sizes=True)
    query = next(layer for name, layer in model.named_modules() if name.endswith("layer.0.attention.self.query"))
    key = next(k for k in weights if "layer.0.attention.self.query.palora_A" in k)
    assert torch.equal(query.palora_A["default"], weights[key])  # what fits is loaded
    embeddings = model.base_model.model.embeddings.word_embeddings
    assert torch.equal(embeddings.palora_A["default"], before[next(k for k in before
                                                                 if k.endswith("word_embeddings.palora_A.default"))])


def test_ignore_mismatched_sizes_is_honoured_by_auto_peft_model(tmp_path):
    """`AutoPeftModel*.from_pretrained(bundle, ignore_mismatched_sizes=True)` onto a local base whose vocabulary
    differs from the one the bundle was trained on: loads what fits, as PEFT's LoRA does."""
    from peft import AutoPeftModel

    _bert(seed=1, vocab_size=64).save_pretrained(tmp_path / "base")
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["query", "word_embeddings"],
                                      init_weights=False)
    trained = get_peft_model(_bert(), config)
    trained.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    trained.save_pretrained(tmp_path / "bundle")
    with pytest.raises(ValueError, match="shape of .*word_embeddings.palora_A.default"):
        AutoPeftModel.from_pretrained(tmp_path / "bundle")
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        loaded = AutoPeftModel.from_pretrained(tmp_path / "bundle", ignore_mismatched_sizes=True)
    saved = load_file(tmp_path / "bundle" / "adapter_model.safetensors")
    query = next(layer for name, layer in loaded.named_modules() if name.endswith("layer.0.attention.self.query"))
    key = next(k for k in saved if "layer.0.attention.self.query.palora_A" in k)
    assert torch.equal(query.palora_A["default"], saved[key])


def test_a_save_that_lacks_adapter_tensors_is_refused_and_writes_nothing(tmp_path):
    """A `state_dict=` without some adapter tensors (what a nested FSDP1 wrapper gives) would write a bundle that
    cannot be loaded back: refused, and an earlier bundle in that folder stays as it was."""
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=["query"], init_weights=False)
    model = get_peft_model(_bert(), config)
    model.save_pretrained(tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in (tmp_path / "bundle").iterdir()}
    partial = {k: v for k, v in model.state_dict().items() if not k.endswith("query.palora_B.default")}
    with pytest.raises(ValueError, match=r"Not saved: .*lacks its adapter tensors .*query\.palora_B"):
        model.save_pretrained(tmp_path / "bundle", state_dict=partial)
    assert {p.name: p.read_bytes() for p in (tmp_path / "bundle").iterdir()} == before
    with pytest.raises(ValueError, match="Not saved"):
        model.save_pretrained(tmp_path / "new", state_dict=partial)
    assert not (tmp_path / "new").exists()


def test_embeddings_accept_a_dropout_config_and_start_like_lora():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            return self.lin(self.emb(x))

    model = get_peft_model(Model(), peft_palora.PaLoRAConfig(num_tasks=2, r=3, target_modules=["emb", "lin"],
                                                             palora_dropout=0.5))
    emb, lin = palora_layers(model)
    assert isinstance(emb.palora_dropout["default"], nn.Identity)  # token ids take no dropout, as in LoRA
    assert isinstance(lin.palora_dropout["default"], nn.Dropout)
    assert torch.count_nonzero(emb.palora_A["default"]) == 0 and emb.palora_B["default"].std() > 0.5
    x = torch.randint(0, 20, (3, 5))
    model.train()
    out = model(x=x, preference=[0.5, 0.5])
    out.sum().backward()
    assert emb.palora_A["default"].grad.abs().sum() > 0  # A (the factor that sees the tokens) learns from step one


@pytest.mark.parametrize("name", ["a.b", "", "tab\there"])
def test_task_names_that_cannot_be_keys_are_refused_by_the_config(name):
    with pytest.raises(ValueError, match="`task_names` entries must be non-empty, printable and free of '.'"):
        peft_palora.PaLoRAConfig(task_names=["ok", name])


def test_lora_reloads_unaffected_by_palora(tmp_path):
    model = get_peft_model(_bert(), LoraConfig(target_modules=["query"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "lora")
    assert json.load(open(os.path.join(tmp_path, "lora", "adapter_config.json")))["peft_type"] == "LORA"
    reloaded = PeftModel.from_pretrained(_bert(), tmp_path / "lora")
    ids = torch.randint(1, 60, (2, 5))
    torch.testing.assert_close(_outputs(reloaded, ids), _outputs(model, ids))
