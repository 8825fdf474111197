"""Resuming from a damaged checkpoint is a ValueError naming the file, never a raw OSError/JSONDecodeError/
SafetensorError, and never a resume that silently skips the random state (Accelerate's `load_state` does that)."""

from __future__ import annotations

import os
import shutil

import pytest
import test_hf_trainer as hf
import test_training as acc


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(max(1, size // 2))


@pytest.fixture(scope="module")
def accelerate_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("acc")
    acc.make_trainer(out, max_steps=2, checkpointing_steps=2).train()
    return out / "checkpoint-2"


@pytest.mark.parametrize("name", ["trainer_state.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl"])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_accelerate_trainer_names_the_damaged_file(accelerate_checkpoint, tmp_path, name, damage):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(accelerate_checkpoint, copy)
    assert name in os.listdir(copy)
    if damage == "truncate":
        _truncate(copy / name)
    else:
        os.remove(copy / name)
    trainer = acc.make_trainer(tmp_path / "run", max_steps=2, checkpointing_steps=2)
    error = FileNotFoundError if (damage, name) == ("delete", "trainer_state.json") else ValueError
    with pytest.raises(error, match=name.replace(".", r"\.")) as info:
        trainer.load_checkpoint(str(copy))
    if error is ValueError:
        assert "earlier checkpoint" in str(info.value)


def test_accelerate_undamaged_checkpoint_still_resumes(accelerate_checkpoint, tmp_path):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(accelerate_checkpoint, copy)
    trainer = acc.make_trainer(tmp_path / "run", max_steps=2, checkpointing_steps=2)
    trainer.load_checkpoint(str(copy))
    assert trainer.global_step == 2


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    hf.make_trainer(out, model=hf.tiny_model(init_weights=False), max_steps=2, save_strategy="steps",
                    save_steps=2).train()
    return out / "checkpoint-2"


@pytest.mark.parametrize(
    "name", ["rng_state.pth", "trainer_state.json", "palora_run.json", "adapter_model.safetensors", "optimizer.pt"]
)
def test_hf_trainer_names_the_damaged_file(hf_checkpoint, tmp_path, name):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(hf_checkpoint, copy)
    assert name in os.listdir(copy)
    _truncate(copy / name)
    trainer = hf.make_trainer(tmp_path / "run", model=hf.tiny_model(init_weights=False), max_steps=2,
                              save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*earlier checkpoint"):
        trainer.train(resume_from_checkpoint=str(copy))
