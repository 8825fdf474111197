"""`import peft_palora` registers PALORA with PEFT, once, whatever the import order."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("before", ["", "import peft; from peft import LoraConfig, get_peft_model; import peft.tuners.lora"])
def test_fresh_interpreter_registration(before):
    out = _run(
        f"""
        {before}
        import importlib
        import peft_palora
        importlib.reload(peft_palora)  # a second import must not register twice or break anything
        import peft_palora.tuner.compat as reg; reg.register()
        from peft.utils import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
        assert PeftType("PALORA") is PeftType.PALORA and PeftType.PALORA == "PALORA"
        assert list(PeftType).count(PeftType.PALORA) == 1
        assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.PALORA] == "palora_"
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PALORA].__name__ == "PaLoRAModel"
        config = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PALORA](num_tasks=2, target_modules=["x"])
        assert config.to_dict()["peft_type"] == "PALORA"
        # other PEFT methods keep working and do not take the `preference` argument
        from peft import LoraConfig, get_peft_model
        import torch
        lora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), LoraConfig(target_modules=["0"]))
        assert "preference" not in lora.special_peft_forward_args
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


@pytest.mark.slow
def test_import_stays_light():
    """`import peft_palora` registers the tuner and imports nothing of the plotting, data or example stack beyond
    what PEFT itself imports (some PEFT and transformers releases pull in pandas or datasets on their own)."""
    script = textwrap.dedent(
        """
        import sys
        import peft, peft.tuners.lora  # what PEFT imports by itself is not ours to judge
        before = set(sys.modules)
        import peft_palora
        heavy = ("matplotlib", "datasets", "evaluate", "moocore", "pandas", "recipes",
                 "peft_palora.multimnist", "peft_palora.fronts.plotting", "peft_palora.training", "peft_palora.training.hf_trainer",
                 "peft_palora.training.multitask", "peft_palora.interop.hub", "peft_palora.interop.lora", "peft_palora.cli", "trl",
                 "peft_palora.alignment.dpo", "peft_palora.alignment.front")
        added = set(sys.modules) - before
        print(sorted(m for m in added if m.split(".")[0] in heavy or m.startswith(heavy)))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            check=True)  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_patches_are_version_guarded_and_hold_on_the_installed_peft():
    """The patches on PEFT are tested for the installed release; another release is warned about, by name."""
    import warnings
    from importlib import metadata

    import peft
    from peft import LoraConfig, PeftModel, get_peft_model
    from torch import nn

    import peft_palora
    from peft_palora.tuner import compat
    from peft_palora.tuner.peft_model import PaLoRAPeftModelMixin

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_peft_version() is True  # the installed PEFT is in the tested range
    assert metadata.version("peft") == peft.__version__
    with pytest.warns(RuntimeWarning, match=r"peft_palora.tuner.compat.*found peft 0\.22\.0"):
        assert compat.check_peft_version("0.22.0") is False
    with pytest.warns(RuntimeWarning, match="found peft 0.20.1"):
        assert compat.check_peft_version("0.20.1") is False

    # The patches, each observed on the installed PEFT: the enum member, the forward argument, the class.
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), peft_palora.PaLoRAConfig(num_tasks=2, target_modules=["0"]))
    assert peft.utils.PeftType.PALORA == "PALORA"
    assert "preference" in model.special_peft_forward_args
    assert isinstance(model, PaLoRAPeftModelMixin) and isinstance(model, PeftModel)
    lora = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
    assert type(lora) is PeftModel and "preference" not in lora.special_peft_forward_args

    # Not a patch, a read: `ignore_mismatched_sizes` is taken from the frame of PEFT's load function, which calls
    # the tuner's remap hook without it (`tuner.bundle.mismatched_sizes_ignored`).
    import inspect

    from peft.utils import save_and_load

    from peft_palora.tuner.bundle import _LOAD_FUNCTION

    function = getattr(save_and_load, _LOAD_FUNCTION[1])
    assert function.__module__ == _LOAD_FUNCTION[0]
    assert "ignore_mismatched_sizes" in inspect.signature(function).parameters
    assert "_remap_adapter_state_dict_for_load" in inspect.getsource(function)
