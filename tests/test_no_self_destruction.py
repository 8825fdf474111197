"""Nothing destroys its own input, and numbers beyond the float range are errors, not crashes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_palora
from peft_palora import PaLoRAConfig
from peft_palora.cli import main
from peft_palora.interop.lora import export_lora_from_bundle
from peft_palora.tuner.conversion import export_lora
from peft_palora.tuner.preference import validate_preference

HUGE = 10**400  # a Python int float() cannot hold


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _base():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def bundle(tmp_path):
    model = get_peft_model(_base(), PaLoRAConfig(num_tasks=2, r=2, target_modules=["l1", "l2"], init_weights=False))
    path = tmp_path / "bundle"
    model.save_pretrained(path)
    return path


def _snapshot(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name))}


@pytest.mark.parametrize("where", ["same", "inside", "parent", "symlink", "relative"])
def test_export_lora_from_bundle_refuses_to_write_over_its_input(bundle, tmp_path, where, monkeypatch):
    before = _snapshot(bundle)
    if where == "same":
        out = bundle
    elif where == "inside":
        out = bundle / "lora"
    elif where == "parent":
        out = tmp_path
    elif where == "symlink":
        out = tmp_path / "link"
        os.symlink(bundle, out)
    else:
        monkeypatch.chdir(bundle)
        out = "."
    with pytest.raises(ValueError, match=r"`save_directory`.*(is|is inside|contains) the PaLoRA bundle"):
        export_lora_from_bundle(bundle, out, base=_base())
    assert _snapshot(bundle) == before
    assert json.load(open(bundle / "adapter_config.json"))["peft_type"] == "PALORA"
    assert not os.path.exists(bundle / "lora")


def test_export_lora_from_bundle_still_writes_beside_its_input(bundle, tmp_path):
    out = export_lora_from_bundle(bundle, tmp_path / "lora", preference=[0.25, 0.75], base=_base())
    assert json.load(open(os.path.join(out, "adapter_config.json")))["peft_type"] == "LORA"
    palora = PeftModel.from_pretrained(_base(), str(bundle)).eval()
    lora = PeftModel.from_pretrained(_base(), out).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), palora(x, preference=[0.25, 0.75]), atol=1e-5, rtol=1e-5)


def test_cli_export_lora_refuses_its_input_as_output(bundle, capsys, monkeypatch):
    before = _snapshot(bundle)
    status = main(["export-lora", str(bundle), "--out", str(bundle)])
    assert status != 0
    assert "PaLoRA bundle" in capsys.readouterr().err
    assert _snapshot(bundle) == before


def test_export_lora_refuses_the_folder_the_model_was_loaded_from(bundle, tmp_path):
    before = _snapshot(bundle)
    model = PeftModel.from_pretrained(_base(), str(bundle)).eval()
    with pytest.raises(ValueError, match="loaded from"):
        export_lora(model, bundle)
    with pytest.raises(ValueError, match="loaded from"):
        model.base_model.export_lora(str(bundle / "sub"))
    assert _snapshot(bundle) == before
    export_lora(model, tmp_path / "elsewhere")  # anywhere else is fine
    assert os.path.isfile(tmp_path / "elsewhere" / "adapter_config.json")


# ---- numbers beyond the float range ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preference",
    [[HUGE, 0], [[HUGE, 0], [0.5, 0.5]], {"a": HUGE, "b": 0}, [torch.tensor(0.5), HUGE]],
    ids=["list", "rows", "dict", "mixed"],
)
def test_overflowing_preference_is_a_value_error_naming_the_argument(preference):
    with pytest.raises(ValueError, match=r"preference.* must be finite.*beyond the float range"):
        validate_preference(preference, 2, task_names=["a", "b"])


def test_overflowing_preference_through_the_model(bundle, tmp_path):
    model = PeftModel.from_pretrained(_base(), str(bundle)).eval()
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="preference must be finite"):
        model(x, preference=[HUGE, 0])
    with pytest.raises(ValueError, match="preference must be finite"):
        model.set_preference([HUGE, 0])
    with pytest.raises(ValueError, match="preference must be finite"):
        export_lora(model, tmp_path / "out", preference=[HUGE, 0])
    assert not os.path.exists(tmp_path / "out")
    assert peft_palora  # registered


@pytest.mark.parametrize("where", ["same", "inside"])
def test_export_task_loras_from_bundle_refuses_to_write_over_its_input(bundle, where):
    from peft_palora.interop.lora import export_task_loras_from_bundle

    before = _snapshot(bundle)
    out = bundle if where == "same" else bundle / "tasks"
    with pytest.raises(ValueError, match=r"`out`.*(is|is inside|contains) the PaLoRA bundle"):
        export_task_loras_from_bundle(bundle, out, base=_base())
    assert _snapshot(bundle) == before and not os.path.exists(bundle / "tasks")
