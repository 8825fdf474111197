"""Plain PEFT, without `peft_palora`: the tiny models and the fresh interpreter that loads exported LoRA bundles.

Shared by the LoRA interop tests (`test_lora_interop`, `test_task_loras`, `test_lora_conversion`). This module is
pure torch/transformers/peft and never imports `peft_palora`: `run_plain_peft` runs THIS file as a script in a
fresh interpreter (PYTHONPATH emptied), which asserts at its start and at its end that `peft_palora` was never
imported, rebuilds each base model of a manifest (one of the classes below, or a transformers model saved with
`save_pretrained`), loads the bundles with plain PEFT and saves the outputs for the test to compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)
        self.point = nn.Conv2d(6, 5, kernel_size=1)
        self.conv1d = nn.Conv1d(5, 4, kernel_size=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.point(torch.relu(self.conv(x)))  # (B, 5, 4, 4)
        h = self.conv1d(h.flatten(2))  # (B, 4, 15)
        return self.fc(h.transpose(1, 2))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 6, kernel_size=3, padding=1)

    def forward(self, x):
        h = torch.tanh(self.lin(self.emb(x)))  # (B, L, 8)
        return self.conv(h.transpose(1, 2))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, kernel_size=3, groups=2)

    def forward(self, x):
        return self.conv(x)


# The manifest's "build": one of these names, or "transformers" (a model saved with `save_pretrained`).
MODELS = {"MLP": MLP, "ConvNet": ConvNet, "Mixed": Mixed, "Grouped": Grouped}


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(
        LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=16)
    )


def output(out) -> torch.Tensor:
    """A plain model's tensor, or a transformers model's last hidden state."""
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


# ---- the test's side ------------------------------------------------------------------------------------------------


def save_case(root, name: str, index: int, factory, build: str, make_inputs) -> tuple[nn.Module, dict, dict]:
    """Seed with `index`, make the inputs and the base model, and save both for the plain interpreter.

    Returns the base (in eval mode), the inputs and the case's manifest entry (``build``, ``base``, ``inputs``).
    """
    torch.manual_seed(index)
    inputs = make_inputs()
    base = factory().eval()
    directory = os.path.join(str(root), name)
    if build == "transformers":
        base_path = os.path.join(directory, "base")
        base.save_pretrained(base_path)
    else:
        if build not in MODELS:
            raise ValueError(f"`build` must be 'transformers' or one of {sorted(MODELS)}, got {build!r}")
        os.makedirs(directory, exist_ok=True)
        base_path = os.path.join(directory, "base.safetensors")
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    inputs_path = os.path.join(directory, "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, inputs_path)
    return base, inputs, {"build": build, "base": base_path, "inputs": inputs_path}


def with_and_without_adapters(model: PeftModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The PEFT model's output and the base model's (adapters disabled), without gradients."""
    with torch.no_grad():
        adapted = output(model(**inputs))
        with model.disable_adapter():
            plain = output(model(**inputs))
    return adapted, plain


def run_plain_peft(mode: str, manifest: dict, root) -> dict[str, torch.Tensor]:
    """Run the manifest in a fresh interpreter that never imports `peft_palora`; the outputs it saved.

    ``mode`` "lora": each case's ``lora`` folder loaded with `PeftModel.from_pretrained`, output under the case's
    name. ``mode`` "mix": each case's ``loras`` folder of task LoRAs (`palora_tasks.json`) loaded, mixed with
    `add_weighted_adapter(tasks, weights=preference, combination_type="cat")` for each of its ``preferences``,
    outputs under ``"name/i"``.
    """
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {sorted(_MODES)}, got {mode!r}")
    manifest_path = os.path.join(str(root), "manifest.json")
    outputs_path = os.path.join(str(root), "outputs.safetensors")
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), mode, manifest_path, outputs_path],
                          capture_output=True, text=True, env=env, cwd=str(root), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(outputs_path)


# ---- the fresh interpreter's side -----------------------------------------------------------------------------------


def _load_base(case: dict) -> nn.Module:
    if case["build"] == "transformers":
        import transformers

        return transformers.AutoModel.from_pretrained(case["base"])
    base = MODELS[case["build"]]()
    base.load_state_dict(load_file(case["base"]))
    return base


def _load_lora(name: str, case: dict, outputs: dict) -> None:
    model = PeftModel.from_pretrained(_load_base(case), case["lora"]).eval()
    assert type(model.peft_config["default"]).__name__ == "LoraConfig"
    inputs = load_file(case["inputs"])
    with torch.no_grad():
        outputs[name] = output(model(**inputs)).contiguous()


def _mix_task_loras(name: str, case: dict, outputs: dict) -> None:
    with open(os.path.join(case["loras"], "palora_tasks.json")) as handle:
        tasks = json.load(handle)["tasks"]
    model = PeftModel.from_pretrained(_load_base(case), os.path.join(case["loras"], tasks[0]), adapter_name=tasks[0])
    for task in tasks[1:]:
        model.load_adapter(os.path.join(case["loras"], task), adapter_name=task)
    assert all(type(c).__name__ == "LoraConfig" for c in model.peft_config.values())
    model.eval()
    inputs = load_file(case["inputs"])
    for i, preference in enumerate(case["preferences"]):
        model.add_weighted_adapter(tasks, weights=preference, adapter_name=f"mix{i}", combination_type="cat")
        model.set_adapter(f"mix{i}")
        model.eval()  # as palora_tasks.json says: the new adapter's dropout starts in training mode
        with torch.no_grad():
            outputs[f"{name}/{i}"] = output(model(**inputs)).contiguous()


_MODES = {"lora": _load_lora, "mix": _mix_task_loras}


def _main(mode: str, manifest_path: str, outputs_path: str) -> None:
    assert "peft_palora" not in sys.modules
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    outputs: dict = {}
    for name, case in manifest.items():
        _MODES[mode](name, case, outputs)
    assert "peft_palora" not in sys.modules
    save_file(outputs, outputs_path)


if __name__ == "__main__":
    _main(*sys.argv[1:])
