"""Two-process data-parallel training (CPU, gloo) against a one-process run with the same global batch.

What a user of ``accelerate launch --num_processes 2`` relies on:

* every rank draws the same preference windows and holds the same adapters AND base weights at every checkpoint
  (a rank that drifted would silently train another model);
* the run is the one-process run with the global batch (2 x the per-device batch), up to float rounding;
* only the main process writes the checkpoints and the bundle; the other rank writes nothing but its own RNG state
  (``random_states_1.pkl``, which an exact resume of a 2-process run needs).

The two ranks run under ``accelerate.debug_launcher`` in a fresh interpreter: forking a process whose OpenMP pool
already ran (earlier tests) can deadlock the children.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import ViTConfig, ViTModel

import peft_palora
from peft_palora.preferences import AnnealedGridSampler
from peft_palora.training.multitask import MultiTaskModel, linear_heads
from peft_palora.training.trainer import TRAINER_STATE_NAME, PaLoRATrainer, PaLoRATrainingArguments

TASKS = ["left", "right"]
PER_DEVICE_BATCH = 4
NUM_PROCESSES = 2
MAX_STEPS = 4
CHECKPOINT_STEPS = (2, 4)
NUM_SAMPLES = 24  # 3 global batches of 8: the 4 steps cross an epoch boundary


def build_model(seed: int) -> MultiTaskModel:
    torch.manual_seed(seed)
    base = ViTModel(
        ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=24, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    )  # fmt: skip
    config = peft_palora.PaLoRAConfig(
        task_names=TASKS, r=2, target_modules=["query", "value", "dense"], train_base_weights=True, init_weights=False
    )
    heads = linear_heads(16, {"left": 5, "right": 3})
    return MultiTaskModel(get_peft_model(base, config), heads, label_columns={t: f"labels_{t}" for t in TASKS})


def build_dataset() -> datasets.Dataset:
    generator = torch.Generator().manual_seed(7)
    columns = {
        "pixel_values": torch.rand(NUM_SAMPLES, 1, 8, 8, generator=generator).numpy(),
        "labels_left": torch.randint(0, 5, (NUM_SAMPLES,), generator=generator).numpy(),
        "labels_right": torch.randint(0, 3, (NUM_SAMPLES,), generator=generator).numpy(),
    }
    return datasets.Dataset.from_dict(columns).with_format("torch")


class RecordingSampler(AnnealedGridSampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def sample(self, progress, step=None):
        preferences = super().sample(progress, step)
        self.seen.append(preferences.clone())
        return preferences


class CheckingTrainer(PaLoRATrainer):
    """After every checkpoint: every rank must hold the same parameters and have drawn the same preferences."""

    def save_checkpoint(self, path=None):
        path = super().save_checkpoint(path)
        accelerator = self.accelerator
        parameters = torch.cat([p.detach().flatten() for p in self.unwrapped_model.parameters()])
        gathered = accelerator.gather(parameters[None])
        assert all(torch.equal(gathered[0], row) for row in gathered[1:]), f"ranks differ at {path}"
        windows = accelerator.gather(torch.stack(self.preference_sampler.seen)[None])
        assert all(torch.equal(windows[0], row) for row in windows[1:]), f"preferences differ at {path}"
        self.checked.append(os.path.basename(path))
        return path


def make_trainer(output_dir: str, model: MultiTaskModel, batch_size: int) -> CheckingTrainer:
    args = PaLoRATrainingArguments(
        output_dir=output_dir,
        max_steps=MAX_STEPS,
        checkpointing_steps=CHECKPOINT_STEPS[0],
        window_size=3,
        balancing="loss",  # its running mean is reduced over the ranks: the global batch's mean loss
        learning_rate=1e-2,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = CheckingTrainer(
        model,
        args,
        DataLoader(build_dataset(), batch_size=batch_size, shuffle=True),
        preference_sampler=RecordingSampler(len(TASKS), 3),
    )
    trainer.checked = []
    return trainer


# ---- what runs on each rank ------------------------------------------------------------------------------------------
_WRITING_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "tempfile.mkstemp", "tempfile.mkdtemp",
                   "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.symlink", "os.link", "os.truncate")  # fmt: skip


def _record_writes_under(root: str) -> list[tuple[str, str]]:
    """Record every file-system change this process makes under ``root``: Python-level ones through an audit hook,
    tensors saved by torch's and safetensors' native writers through wrappers."""
    import accelerate.utils.other
    import safetensors.torch

    import peft_palora.utils.atomic

    root = os.path.realpath(root)
    writes: list[tuple[str, str]] = []

    def under(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and under(path):
                writes.append(("open", os.fsdecode(path)))
        elif event in _WRITING_EVENTS and args and under(args[0]):
            if event == "os.mkdir" and os.path.isdir(args[0]):
                return  # os.makedirs(..., exist_ok=True) of a folder that is already there changes nothing
            writes.append((event, os.fsdecode(args[0])))

    sys.addaudithook(hook)

    def recording(name, function):
        def wrapper(obj, f, *args, **kwargs):
            if under(f):
                writes.append((name, os.fsdecode(f)))
            return function(obj, f, *args, **kwargs)

        return wrapper

    torch.save = recording("torch.save", torch.save)
    for module in (safetensors.torch, peft_palora.utils.atomic, accelerate.utils.other):
        for attribute in ("save_file", "safe_save_file"):
            if hasattr(module, attribute):
                setattr(module, attribute, recording("safetensors", getattr(module, attribute)))
    return writes


def _rank_run(output_dir: str) -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    rank = torch.distributed.get_rank()  # debug_launcher does not set RANK; its process group knows the rank
    writes = _record_writes_under(output_dir) if rank != 0 else []
    # different initial weights per rank: the run must start from rank 0's (DDP broadcasts them)
    trainer = make_trainer(output_dir, build_model(seed=rank), PER_DEVICE_BATCH)
    assert trainer.accelerator.num_processes == NUM_PROCESSES
    trainer.train()
    trainer.save_model()
    assert trainer.checked == [f"checkpoint-{step}" for step in CHECKPOINT_STEPS]
    if rank != 0:
        # A checkpoint is written into a staging folder beside checkpoint-N and swapped in as a whole (by rank 0):
        # the other ranks write their RNG states there, and nothing else anywhere.
        def checkpoint_step(folder: str) -> int | None:
            name = os.path.basename(folder)
            for step in CHECKPOINT_STEPS:
                if name == f"checkpoint-{step}" or name.startswith(f".checkpoint-{step}.palora-staging-"):
                    return step
            return None

        def allowed(path: str) -> bool:
            if os.path.dirname(path) != output_dir and os.path.basename(path) == f"random_states_{rank}.pkl":
                return os.path.dirname(os.path.dirname(path)) == output_dir and checkpoint_step(os.path.dirname(path))
            return os.path.dirname(path) == output_dir and checkpoint_step(path) is not None

        unexpected = [(event, path) for event, path in writes if not allowed(path)]
        assert unexpected == [], f"rank {rank} wrote {unexpected}"
        steps = sorted(checkpoint_step(os.path.dirname(path)) for _, path in writes if path.endswith(".pkl"))
        assert steps == list(CHECKPOINT_STEPS)  # the hook sees the writes it is meant to catch: one per checkpoint
    with open(os.path.join(output_dir, f"windows_rank{rank}.json"), "w") as handle:  # for the parent test only
        json.dump(torch.stack(trainer.preference_sampler.seen).tolist(), handle)


def _launch(rank_run: str, output_dir: str) -> None:
    """Run ``rank_run(output_dir)`` (a function of this module) in NUM_PROCESSES ranks under
    ``accelerate.debug_launcher``, in a fresh interpreter; every rank must succeed."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_multiprocess as t; "
        "from accelerate import debug_launcher; "
        f"debug_launcher(t.{rank_run}, args=(sys.argv[2],), num_processes=t.NUM_PROCESSES)"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-c", code, tests_dir, output_dir], capture_output=True, text=True, timeout=300, env=env
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


# ---- the tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_dir(tmp_path_factory) -> str:
    output_dir = str(tmp_path_factory.mktemp("two_processes"))
    _launch("_rank_run", output_dir)
    return output_dir


@pytest.fixture(scope="module")
def one_process_dir(tmp_path_factory) -> str:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    output_dir = str(tmp_path_factory.mktemp("one_process"))
    trainer = make_trainer(output_dir, build_model(seed=0), NUM_PROCESSES * PER_DEVICE_BATCH)
    assert trainer.accelerator.num_processes == 1
    trainer.train()
    trainer.save_model()
    with open(os.path.join(output_dir, "windows_rank0.json"), "w") as handle:
        json.dump(torch.stack(trainer.preference_sampler.seen).tolist(), handle)
    AcceleratorState._reset_state(reset_partial_state=True)  # leave no Accelerate singleton to later tests
    GradientState._reset_state()
    return output_dir


@pytest.mark.slow
def test_each_file_is_written_once_by_the_main_process(two_process_dir):
    # the per-rank checks (identical ranks at each checkpoint, rank 1 writing only its RNG state) ran in the ranks
    names = sorted(os.listdir(two_process_dir))
    assert names == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "multitask_config.json",
         "task_heads.safetensors", "windows_rank0.json", "windows_rank1.json"]
        + [f"checkpoint-{step}" for step in CHECKPOINT_STEPS]
    )  # fmt: skip
    for step in CHECKPOINT_STEPS:
        folder = os.path.join(two_process_dir, f"checkpoint-{step}")
        assert sorted(os.listdir(folder)) == [
            "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
            TRAINER_STATE_NAME,
        ]  # fmt: skip
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as handle:
            assert json.load(handle)["global_step"] == step


def test_two_processes_match_one_process_with_the_global_batch(two_process_dir, one_process_dir):
    windows = [json.load(open(os.path.join(d, f"windows_rank{r}.json"))) for d, r in
               [(two_process_dir, 0), (two_process_dir, 1), (one_process_dir, 0)]]  # fmt: skip
    assert windows[0] == windows[1] == windows[2]
    assert len(windows[0]) == MAX_STEPS

    for step in CHECKPOINT_STEPS:
        two = load_file(os.path.join(two_process_dir, f"checkpoint-{step}", "model.safetensors"))
        one = load_file(os.path.join(one_process_dir, f"checkpoint-{step}", "model.safetensors"))
        assert two.keys() == one.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    # the logged losses (means over the ranks) and the partial sums a resume continues from agree as well
    for step in CHECKPOINT_STEPS:
        states = []
        for folder in (two_process_dir, one_process_dir):
            with open(os.path.join(folder, f"checkpoint-{step}", TRAINER_STATE_NAME)) as handle:
                states.append(json.load(handle))
        two_state, one_state = states
        assert two_state["running_stats"]["count"] == one_state["running_stats"]["count"]
        for key in ("loss", "task_losses"):
            assert two_state["running_stats"][key] == pytest.approx(one_state["running_stats"][key], rel=1e-5)
        assert len(two_state["log_history"]) == len(one_state["log_history"])
        for two_log, one_log in zip(two_state["log_history"], one_state["log_history"]):
            assert two_log == pytest.approx(one_log, rel=1e-5)
    assert one_state["log_history"] and states[0]["running_stats"]["count"] == 0  # logged at the last step
    with open(os.path.join(one_process_dir, f"checkpoint-{CHECKPOINT_STEPS[0]}", TRAINER_STATE_NAME)) as handle:
        assert json.load(handle)["running_stats"]["count"] == CHECKPOINT_STEPS[0]  # not logged yet: sums kept

    # the runs really trained, base weights included: the comparison above is not between two initial models
    initial = build_model(seed=0).state_dict()
    final = load_file(os.path.join(one_process_dir, f"checkpoint-{MAX_STEPS}", "model.safetensors"))
    moved = [key for key in final if not torch.equal(final[key], initial[key])]
    for part in ("palora_A", "palora_B", "base_layer.weight", "heads."):
        assert any(part in key for key in moved), part

    two_bundle = load_file(os.path.join(two_process_dir, "adapter_model.safetensors"))
    one_bundle = load_file(os.path.join(one_process_dir, "adapter_model.safetensors"))
    assert two_bundle.keys() == one_bundle.keys()
    for key in one_bundle:
        torch.testing.assert_close(two_bundle[key], one_bundle[key], rtol=1e-5, atol=1e-6)


# ---- `accelerate launch --multi_gpu --num_processes 2` on a GPU-less machine ---------------------------------------
def _launched_rank_run(output_dir: str) -> None:
    """What each process of ``accelerate launch --multi_gpu --num_processes 2 examples/train_mtl.py`` sees on a CPU
    machine: RANK/LOCAL_RANK/WORLD_SIZE set, no ACCELERATE_USE_CPU (which debug_launcher sets, hiding the bug)."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState, GradientState

    from peft_palora.training.trainer import distributed_state

    rank = torch.distributed.get_rank()
    os.environ.pop("ACCELERATE_USE_CPU", None)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(NUM_PROCESSES))
    args = PaLoRATrainingArguments(
        output_dir=output_dir, max_steps=2, checkpointing_steps=2, window_size=2, disable_tqdm=True, use_cpu=True
    )
    loader = DataLoader(build_dataset(), batch_size=PER_DEVICE_BATCH, shuffle=True)

    # a bare PartialState() first (what the example did) makes a one-process state: refused, nothing written
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert PartialState().num_processes == 1
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        PaLoRATrainer(build_model(seed=0), args, loader)

    # the trainer's state asked for first (what the example does now): one run of two processes
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    state = distributed_state(args)
    trainer = PaLoRATrainer(build_model(seed=rank), args, loader)
    trainer.train()
    report = {
        "state": [state.num_processes, state.process_index, state.is_main_process],
        "accelerator": [trainer.accelerator.num_processes, trainer.accelerator.process_index],
    }
    with open(os.path.join(output_dir, f"launched_rank{rank}.json"), "w") as handle:  # for the parent test only
        json.dump(report, handle)


@pytest.mark.slow
def test_a_multi_gpu_launch_on_cpu_is_one_run(tmp_path):
    output_dir = str(tmp_path)
    _launch("_launched_rank_run", output_dir)
    reports = [json.load(open(os.path.join(output_dir, f"launched_rank{rank}.json"))) for rank in range(2)]
    assert reports[0] == {"state": [2, 0, True], "accelerator": [2, 0]}
    assert reports[1] == {"state": [2, 1, False], "accelerator": [2, 1]}
    # one checkpoint, holding both ranks' RNG states: two lone runs would each have written random_states_0 only
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint")) == ["checkpoint-2"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(os.path.join(output_dir, "checkpoint-2")))
