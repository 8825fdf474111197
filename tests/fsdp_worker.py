"""One rank of the FSDP2 check in ``tests/test_fsdp.py``, and the model, data and training steps both sides share.

Run as a script, once per rank, in fresh interpreters (a forked child of a process whose OpenMP pool already ran can
deadlock)::

    python tests/fsdp_worker.py --rank R --world-size 2 --store FILE --out DIR [--merge] [--accelerate-wrap]

Each rank joins a gloo group through a file store (no port to pick), builds the same tiny PaLoRA Llama from a seed,
shards it with ``torch.distributed.fsdp.fully_shard`` (every decoder layer, then the root), trains ``STEPS`` SGD steps
on its half of the global batch with that half's per-sample preferences, and writes, under ``DIR``:

* ``rank{R}.json``: the global mean loss of every step (the mean of the ranks' losses), and the merge outcome;
* ``rank{R}_logits.safetensors``: the sharded model's eval logits for its rows after training;
* rank 0 only: ``full_state.safetensors`` (the full state dict gathered to rank 0) and ``bundle/``
  (``save_pretrained`` with that state dict).

With ``--merge`` it then tries ``merge_adapter()`` / ``unmerge_adapter()`` on the sharded model and records what
happened; with ``--accelerate-wrap`` it shards a fresh model with Accelerate's FSDP2 preparation (what
``accelerate launch`` does with the how-to's config) and trains the same steps. The JSON file is written after ``destroy_process_group``; the process then leaves with ``os._exit(0)``, so a
rank that reports ``"finished": true`` and exit status 0 ran to a clean end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_palora

NUM_TASKS = 2
TARGETS = ["q_proj", "v_proj"]
STEPS = 3
LEARNING_RATE = 0.5  # large enough that the adapters move well beyond float rounding in 3 steps
GLOBAL_BATCH = 4
SEQUENCE_LENGTH = 6
VOCAB = 64
SEED = 0
MERGE_PREFERENCE = [0.3, 0.7]


def build_base(seed: int = SEED) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 16, initialised from ``seed``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def build_model(seed: int = SEED) -> PeftModel:
    """PaLoRA (T=2, r=2, random B) on the attention's query and value projections; the base stays frozen."""
    base = build_base(seed)
    config = peft_palora.PaLoRAConfig(num_tasks=NUM_TASKS, r=2, target_modules=TARGETS, init_weights=False)
    return get_peft_model(base, config)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(GLOBAL_BATCH, SEQUENCE_LENGTH)`` (also the labels) and one preference row per sample."""
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQUENCE_LENGTH), generator=torch.Generator().manual_seed(1))
    preference = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]])
    return ids, preference


def eval_preference() -> torch.Tensor:
    """Per-sample preferences for the outputs compared after training (not the training ones)."""
    return torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.6, 0.4], [0.25, 0.75]])


def train_steps(model: torch.nn.Module, ids: torch.Tensor, preference: torch.Tensor) -> list[torch.Tensor]:
    """``STEPS`` plain SGD steps on the mean token loss; returns each step's loss (detached, before the update)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids, preference=preference).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def shard(model: PeftModel) -> None:
    """FSDP2: one unit per decoder layer (its PaLoRA layers inside it), the rest (embeddings, head) in the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def _try_merge(model: PeftModel, ids: torch.Tensor) -> dict:
    """Merge at one preference on the sharded model; compare its outputs with the unmerged ones."""
    model.eval()
    model.set_preference(MERGE_PREFERENCE)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    try:
        model.merge_adapter()
    except Exception as error:  # the outcome is the result: record it for the test to judge
        return {"merged": False, "error_type": type(error).__name__, "error": str(error).splitlines()[0][:500]}
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    model.unmerge_adapter()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    return {
        "merged": True,
        "merged_max_diff": (merged - before).abs().max().item(),
        "unmerged_max_diff": (unmerged - before).abs().max().item(),
        "adapter_effect": (before - base).abs().max().item(),  # how far from the base model the merge has to go
    }


def _accelerate_wrap(rank: int, world_size: int) -> dict:
    """Shard a fresh model with Accelerate's own FSDP2 preparation and train the same steps.

    ``accelerate launch`` with ``fsdp_version: 2`` and a transformer-based wrap of ``LlamaDecoderLayer`` runs
    ``fsdp2_prepare_model`` inside ``accelerator.prepare``. On CPU, Accelerate never selects FSDP (``cpu=True`` means
    DDP), so this calls that function directly with the few ``Accelerator`` attributes it reads for this plugin.
    """
    import types

    import torch.distributed as dist
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    from peft_palora.tuner.layer import PaLoRALayer

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="FULL_STATE_DICT",
    )
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=rank == 0,
        device=torch.device("cpu"), torch_device_mesh=None,
    )  # fmt: skip
    model = fsdp2_prepare_model(accelerator, build_model())
    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    palora_units = {}
    for name, module in model.named_modules():
        if isinstance(module, PaLoRALayer):  # the innermost unit that holds this layer's parameters
            palora_units[name] = max((u for u in units if u == "" or name.startswith(u + ".")), key=len)
    ids, preference = global_batch()
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    losses = torch.stack(train_steps(model, ids[rows], preference[rows]))
    dist.all_reduce(losses)
    return {"units": units, "palora_units": palora_units, "losses": (losses / world_size).tolist()}


def run_rank(rank: int, world_size: int, store: str, out: str, merge: bool, accelerate_wrap: bool) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    result: dict = {"rank": rank}
    try:
        model = build_model()
        shard(model)
        ids, preference = global_batch()
        rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        losses = torch.stack(train_steps(model, ids[rows], preference[rows]))
        dist.all_reduce(losses)  # every rank has as many tokens: the mean of the ranks' means is the global mean
        result["losses"] = (losses / world_size).tolist()

        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids[rows], preference=eval_preference()[rows]).logits
        save_file({"logits": logits.contiguous()}, os.path.join(out, f"rank{rank}_logits.safetensors"))

        # A collective: every rank takes part, rank 0 receives the full tensors (on CPU), the others an empty dict.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "full_state.safetensors"))
            model.save_pretrained(os.path.join(out, "bundle"), state_dict=state)
        else:
            result["state_keys_off_rank0"] = len(state)
        dist.barrier()

        if merge:
            result["merge"] = _try_merge(model, ids[rows])
        dist.barrier()
        if accelerate_wrap:
            result["accelerate"] = _accelerate_wrap(rank, world_size)
    finally:
        dist.destroy_process_group()
    result["finished"] = True
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True, help="a file path that does not exist yet (the gloo file store)")
    parser.add_argument("--out", required=True, help="an existing directory for the results")
    parser.add_argument("--merge", action="store_true", help="also try merge_adapter() on the sharded model")
    parser.add_argument(
        "--accelerate-wrap", action="store_true", help="also train a model sharded by Accelerate's FSDP2 preparation"
    )
    args = parser.parse_args(argv)
    run_rank(args.rank, args.world_size, args.store, args.out, args.merge, args.accelerate_wrap)
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without running interpreter teardown: the process group is already destroyed and the results are on disk;
    # gloo's and OpenMP's exit handlers have aborted clean runs on some platforms.
    os._exit(0)


if __name__ == "__main__":
    main()
