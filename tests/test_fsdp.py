"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with two gloo processes on CPU, against a one-process run.

What a user who shards a PaLoRA model relies on:

* sharding changes nothing but memory: two ranks that each train on their half of the batch (with that half's
  per-sample preferences) reach the adapters, losses and outputs of one process trained on the whole batch;
* a bundle saved from the sharded model (full state dict gathered to rank 0, then ``save_pretrained(state_dict=...)``)
  reloads with ``PeftModel.from_pretrained`` into the trained model, and merging that gathered model is exact.

The ranks are shard-ed directly with ``fully_shard``: Accelerate with ``cpu=True`` turns an FSDP config into DDP,
which would test nothing here. Each rank is a fresh interpreter (``tests/fsdp_worker.py``) joined through a file
store; both run once for the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsdp_worker as worker
import pytest
import torch
import torch.distributed as dist
from peft import PeftModel
from safetensors.torch import load_file

WORLD_SIZE = 2
TIMEOUT_S = 240  # a hang guard: the two ranks take ~10 s on a quiet 2-core machine, over a minute under load
TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _launch_ranks(out: Path) -> list[dict]:
    """Run the ranks to the end (or kill them all at the first failure or at the deadline); their JSON results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    store = out / "store"
    logs = [open(out / f"rank{rank}.log", "w+", encoding="utf-8") for rank in range(WORLD_SIZE)]  # noqa: SIM115
    command = [sys.executable, str(Path(__file__).with_name("fsdp_worker.py")), "--world-size", str(WORLD_SIZE),
               "--store", str(store), "--out", str(out), "--merge", "--accelerate-wrap"]  # fmt: skip
    processes = [
        subprocess.Popen([*command, "--rank", str(rank)], env=env, stdout=log, stderr=subprocess.STDOUT)
        for rank, log in enumerate(logs)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in processes):
            failed = any(p.returncode not in (None, 0) for p in processes)
            if failed or time.monotonic() > deadline:
                break  # a rank that died leaves the other waiting in a collective: stop both now
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    report = "\n".join(
        f"--- rank {r} (exit {p.returncode}) ---\n{t[-6000:]}" for r, (p, t) in enumerate(zip(processes, texts))
    )
    assert all(p.returncode == 0 for p in processes), f"an FSDP rank failed or timed out:\n{report}"
    results = []
    for rank in range(WORLD_SIZE):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} exited 0 without writing its results:\n{report}"
        results.append(json.loads(path.read_text(encoding="utf-8")))
        assert results[-1]["finished"] is True
    return results


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    results = _launch_ranks(out)
    return {"out": out, "results": results}


@pytest.fixture(scope="module")
def reference() -> dict:
    return one_process_run()


def one_process_run() -> dict:
    """The same steps in this process on the whole batch: trained model, losses, initial and final state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            model = worker.build_model()
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ids, preference = worker.global_batch()
        losses = torch.stack(worker.train_steps(model, ids, preference))
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, preference=worker.eval_preference()).logits
    finally:
        torch.set_num_threads(threads)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"model": model, "initial": initial, "final": final, "losses": losses, "logits": logits, "ids": ids}


def _adapter_keys(state: dict) -> list[str]:
    return sorted(k for k in state if "palora_" in k)


@pytest.mark.slow
def test_sharded_training_matches_one_process(sharded, reference):
    results = sharded["results"]
    # The loss of each step: the mean over both ranks' halves is the one-process loss on the whole batch.
    for result in results:
        sharded_losses = torch.tensor(result["losses"])
        assert (sharded_losses - reference["losses"]).abs().max() < TOLERANCE, (sharded_losses, reference["losses"])
    assert results[1]["state_keys_off_rank0"] == 0  # cpu_offload + full_state_dict: only rank 0 receives tensors

    gathered = load_file(sharded["out"] / "full_state.safetensors")
    assert sorted(gathered) == sorted(reference["final"])  # the full state dict has the unsharded model's keys
    adapters = _adapter_keys(gathered)
    assert len(adapters) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    moved = max((reference["final"][k] - reference["initial"][k]).abs().max().item() for k in adapters)
    assert moved > 1e-2, "training did not move the adapters: the comparison below would be vacuous"
    for key, value in gathered.items():
        assert value.shape == reference["final"][key].shape, key
        diff = (value - reference["final"][key]).abs().max().item()
        assert diff < TOLERANCE, f"{key} differs by {diff} from the one-process run"
        if "palora_" not in key:  # frozen base weights, sharded in the same units as the trained adapters
            assert torch.equal(value, reference["initial"][key]), f"the frozen {key} changed"

    # The sharded model's outputs after training, rank by rank, are the one-process model's.
    half = worker.GLOBAL_BATCH // WORLD_SIZE
    for rank in range(WORLD_SIZE):
        logits = load_file(sharded["out"] / f"rank{rank}_logits.safetensors")["logits"]
        expected = reference["logits"][rank * half : (rank + 1) * half]
        assert (logits - expected).abs().max() < TOLERANCE


def test_bundle_saved_from_the_sharded_model_reloads(sharded, reference):
    bundle = sharded["out"] / "bundle"
    saved = load_file(bundle / "adapter_model.safetensors")
    assert all("palora_" in key for key in saved) and len(saved) == 8  # adapters only: the base was frozen
    with torch.random.fork_rng(devices=[]):
        base = worker.build_base()
    loaded = PeftModel.from_pretrained(base, str(bundle)).eval()
    ids, preference = reference["ids"], worker.eval_preference()
    with torch.no_grad():
        logits = loaded(input_ids=ids, preference=preference).logits
    assert (logits - reference["logits"]).abs().max() < TOLERANCE

    # Merging on the gathered (unsharded) weights is the supported path, and it is exact.
    loaded.set_preference(worker.MERGE_PREFERENCE)
    with torch.no_grad():
        unmerged = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            base_logits = loaded(input_ids=ids).logits
        merged = loaded.merge_and_unload()(input_ids=ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapters matter at this preference
    assert (merged - unmerged).abs().max() < TOLERANCE


def test_accelerate_fsdp2_wrapping_keeps_each_palora_layer_in_its_decoder_unit(sharded, reference):
    """What ``accelerate launch`` does with docs/how-to/fsdp.md's config (FSDP2, transformer-based wrap)."""
    for result in sharded["results"]:
        wrapped = result["accelerate"]
        layers = [f"base_model.model.model.layers.{i}" for i in range(2)]
        assert set(layers) <= set(wrapped["units"]) and "" in wrapped["units"]
        assert len(wrapped["palora_units"]) == 4
        for name, unit in wrapped["palora_units"].items():
            assert unit in layers and name.startswith(unit + ".self_attn."), (name, unit)
        losses = torch.tensor(wrapped["losses"])
        assert (losses - reference["losses"]).abs().max() < TOLERANCE, (losses, reference["losses"])


def test_merge_on_the_sharded_model_is_exact(sharded):
    """`merge_adapter` on DTensor shards: every rank gathers the factors, adds its shard of the delta, and the merged
    sharded model equals the unmerged one (and unmerge puts it back)."""
    for result in sharded["results"]:
        merge = result["merge"]
        assert merge["merged"], merge
        assert merge["adapter_effect"] > 1e-3  # the merge has something to do
        assert merge["merged_max_diff"] < TOLERANCE, merge
        assert merge["unmerged_max_diff"] < TOLERANCE, merge
