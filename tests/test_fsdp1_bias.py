"""A PaLoRA bundle with a learnable bias (``bias="all"`` or ``"palora_only"``) saved from an FSDP1-wrapped model
(``torch.distributed.fsdp.FullyShardedDataParallel``, ``use_orig_params=True`` as PEFT needs) reloads with every
trained tensor, as PEFT's LoRA does: saved the way Accelerate does (the full state dict gathered from the wrapper,
then ``save_pretrained(state_dict=...)``) and by calling ``save_pretrained`` on the wrapped PEFT model.
With one wrapper per decoder layer, ``save_pretrained`` on the wrapped model gets a state dict without the adapters
(PEFT's LoRA writes that bundle and loads it back without its adapters): refused, with what to do instead.

The wrapper needs a process group, so the check runs in a fresh interpreter (this file run as a script) with one
gloo rank. The bias round trip wraps the whole model: with a per-decoder-layer wrap policy, gathering FSDP1's full
state dict of this model fails inside torch 2.13 on CPU, for LoRA and PaLoRA alike (``FSDP assumes
...embed_tokens.weight is in the state_dict``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "v_proj"]


def _base():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _run(out: Path) -> None:
    """One gloo rank: for each bias mode, train one step under FSDP1, save two ways, reload, compare."""
    import tempfile

    import torch
    import torch.distributed as dist
    from peft import PeftModel, get_peft_model
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import peft_palora

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{out}.store")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    preference = torch.tensor([[0.3, 0.7], [0.8, 0.2]])
    results = {}
    for bias in ("all", "palora_only"):
        config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=TARGETS, bias=bias, init_weights=False)
        wrapped = FSDP(get_peft_model(_base(), config), use_orig_params=True, device_id=torch.device("cpu"))
        optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
        wrapped(input_ids=ids, labels=ids, preference=preference).loss.backward()
        optimizer.step()
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            gathered = {key: value.clone() for key, value in wrapped.state_dict().items()}
        trained = {k: v for k, v in gathered.items() if "palora_" in k or k.endswith(".bias")}
        for how in ("accelerate", "direct"):
            folder = tempfile.mkdtemp(dir=out.parent)
            if how == "accelerate":
                wrapped.module.save_pretrained(folder, state_dict=gathered)
            else:
                wrapped.module.save_pretrained(folder)
            try:
                reloaded = PeftModel.from_pretrained(_base(), folder).eval()
            except Exception as error:  # the outcome is the result: the test reports it
                results[f"{bias}/{how}"] = {"error": f"{type(error).__name__}: {error}"[:800]}
                continue
            state = reloaded.state_dict()
            expected_biases = [k for k in trained if k.endswith(".bias") and (bias == "all" or "base_layer" in k)]
            with torch.no_grad():
                wrapped.eval()
                expected = wrapped(input_ids=ids, preference=preference).logits
                got = reloaded(input_ids=ids, preference=preference).logits
                wrapped.train()
            results[f"{bias}/{how}"] = {
                "differing": sorted(k for k in trained if not torch.equal(state[k], trained[k])),
                "biases_checked": len(expected_biases),
                "biases_moved": sum(not torch.equal(trained[k], _base().state_dict()[k.replace(
                    "base_model.model.", "", 1).replace(".base_layer", "")]) for k in expected_biases),
                "max_logit_difference": (got - expected).abs().max().item(),
            }
    config = peft_palora.PaLoRAConfig(num_tasks=2, r=2, target_modules=TARGETS, bias="all", init_weights=False)
    nested = FSDP(get_peft_model(_base(), config), use_orig_params=True, device_id=torch.device("cpu"),
                  auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
    folder = out.parent / "nested"
    try:
        nested.module.save_pretrained(folder)
        results["nested/direct"] = {"error": None}
    except ValueError as error:
        results["nested/direct"] = {"error": str(error), "written": folder.exists()}
    dist.destroy_process_group()
    out.write_text(json.dumps(results))


def test_fsdp1_bundle_with_a_trained_bias_reloads(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    nested = results.pop("nested/direct")
    assert nested["error"] is not None and "Not saved" in nested["error"] and "get_state_dict" in nested["error"]
    assert nested["written"] is False
    assert sorted(results) == ["all/accelerate", "all/direct", "palora_only/accelerate", "palora_only/direct"]
    for name, result in results.items():
        assert "error" not in result, f"{name}: {result['error']}"
        assert result["differing"] == [], name  # every adapter and bias as trained
        assert result["biases_checked"] == result["biases_moved"] > 0, name  # the biases did train
        assert result["max_logit_difference"] < 1e-6, name
    assert results["all/direct"]["biases_checked"] > results["palora_only/direct"]["biases_checked"]


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
