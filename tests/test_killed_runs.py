"""Runs of examples/train_mtl.py killed with SIGKILL, then resumed from their latest checkpoint.

A training job can die at any instant (out of memory, a pre-empted machine, Ctrl-\\). What a user relies on:

* the newest *complete* checkpoint is found by ``--resume_from_checkpoint latest``, whatever the kill left behind
  (a checkpoint folder whose files are only partly written, a temporary file of an atomic write);
* resuming from it ends with exactly the parameters, bit for bit, of a run that was never interrupted.

Every run is a fresh process of the real example script (the user's entry point) on a tiny MultiMNIST, one thread,
deterministic algorithms. Only the instant of the random kill changes between test runs; crashes *inside* a
checkpoint write are injected deterministically by a small launcher that patches the writer to SIGKILL its own
process at a chosen file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from peft_palora.training.trainer import TRAINER_STATE_NAME, latest_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_mtl.py")
MAX_STEPS = 12
TINY_RUN = [
    # 128 samples in batches of 16: the 12 steps cross an epoch boundary at step 8
    "--max_steps", str(MAX_STEPS), "--checkpointing_steps", "3", "--max_train_samples", "128",
    "--max_eval_samples", "32", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
    "--window_size", "2", "--eval_points_per_side", "3", "--disable_tqdm", "true",
]  # fmt: skip

# Runs the example in this process after installing the crash hook named by PALORA_TEST_CRASH:
#   "accelerate:<step>:<file>": SIGKILL right after Accelerate wrote <file> of checkpoint-<step> (the rest missing);
#   "commit:<step>": SIGKILL once checkpoint-<step> is completely written into its staging folder, before it is
#   swapped in; "after:<step>": SIGKILL right after it was swapped in.
# PALORA_TEST_STEP_DELAY (seconds) pauses before every training step, so that a kill from outside lands mid-training
# however fast the machine is (a tiny step takes ~10 ms); it changes no number.
LAUNCHER = r"""
import os, signal, sys, time
import torch
torch.use_deterministic_algorithms(True)
step_delay = float(os.environ.get("PALORA_TEST_STEP_DELAY") or 0)
if step_delay:
    from peft_palora.training.trainer import PaLoRATrainer
    real_training_step = PaLoRATrainer.training_step

    def training_step(self, *args, **kwargs):
        time.sleep(step_delay)
        return real_training_step(self, *args, **kwargs)

    PaLoRATrainer.training_step = training_step
crash = os.environ.get("PALORA_TEST_CRASH", "")
if crash:
    kind, step, *rest = crash.split(":")
    folder = f"checkpoint-{step}"

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def in_checkpoint(path):
        # the checkpoint folder itself, or the staging folder beside it that becomes it (".checkpoint-N.<...>")
        name = os.path.basename(os.path.dirname(str(path)))
        return name == folder or name.startswith("." + folder + ".")

    if kind == "accelerate":
        import accelerate.checkpointing as checkpointing
        real_save = checkpointing.save

        def save(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            if in_checkpoint(path) and os.path.basename(str(path)) == rest[0]:
                die()

        checkpointing.save = save
    elif kind in ("commit", "after"):
        import contextlib
        import peft_palora.training.trainer as training
        real_atomic_directory = training.atomic_directory

        @contextlib.contextmanager
        def atomic_directory(target, *args, **kwargs):
            mine = os.path.basename(str(target)) == folder
            with real_atomic_directory(target, *args, **kwargs) as staging:
                yield staging
                if mine and kind == "commit":
                    die()  # everything written into the staging folder, not yet swapped in
            if mine and kind == "after":
                die()

        training.atomic_directory = atomic_directory
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(crash: str = "", step_delay: float = 0.0) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PALORA_TEST_CRASH=crash,
               PALORA_TEST_STEP_DELAY=str(step_delay))  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "examples"), os.environ.get("PYTHONPATH", "")])
    return env


def _command(output_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, SCRIPT, *TINY_RUN, "--output_dir", output_dir, *extra]


def _run(output_dir: str, *extra: str, crash: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(output_dir, *extra), capture_output=True, text=True, timeout=300, env=_env(crash), cwd=REPO
    )


def _check_finished(completed: subprocess.CompletedProcess) -> None:
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    assert f"trained {MAX_STEPS} steps" in completed.stdout


def _check_killed(completed: subprocess.CompletedProcess) -> None:
    assert completed.returncode == -signal.SIGKILL, completed.stdout[-2000:] + completed.stderr[-4000:]


def _tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


def _assert_same_training_result(expected_dir: str, got_dir: str) -> None:
    """Parameters (adapter bundle, heads, the last checkpoint's full model, the saved base) bit-identical; same
    front and the same training log."""
    files = (
        "adapter_model.safetensors",
        "task_heads.safetensors",
        f"checkpoint-{MAX_STEPS}/model.safetensors",
        "base_model/model.safetensors",  # the initial weights the bundle is reloaded onto
    )
    for relative in files:
        expected, got = _tensors(os.path.join(expected_dir, relative)), _tensors(os.path.join(got_dir, relative))
        assert expected.keys() == got.keys(), relative
        different = [key for key in expected if not torch.equal(expected[key], got[key])]
        assert different == [], f"{relative}: {len(different)} tensors differ, e.g. {different[:3]}"
    with open(os.path.join(expected_dir, "front.json")) as handle:
        expected_front = json.load(handle)
    with open(os.path.join(got_dir, "front.json")) as handle:
        got_front = json.load(handle)
    assert got_front == expected_front
    with open(os.path.join(expected_dir, f"checkpoint-{MAX_STEPS}", TRAINER_STATE_NAME)) as handle:
        expected_state = json.load(handle)
    with open(os.path.join(got_dir, f"checkpoint-{MAX_STEPS}", TRAINER_STATE_NAME)) as handle:
        got_state = json.load(handle)
    assert got_state == expected_state


def _step_of(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as handle:
        state = json.load(handle)
    assert os.path.basename(checkpoint) == f"checkpoint-{state['global_step']}"
    return state["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> str:
    output_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    _check_finished(_run(output_dir))
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-")) == [
        "checkpoint-12", "checkpoint-3", "checkpoint-6", "checkpoint-9"
    ]  # fmt: skip
    return output_dir


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_latest_is_bit_identical(uninterrupted, tmp_path):
    output_dir = str(tmp_path / "killed")
    rng = random.Random()  # the kill instant is the only thing that varies between test runs
    # steps take >= 50 ms: the kill lands within ~4 steps after checkpoint-3 or -6, before step 12 ends training
    wait_for, delay = rng.choice([3, 6]), rng.uniform(0.0, 0.2)
    env = _env(step_delay=0.05)
    process = subprocess.Popen(
        _command(output_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    marker = os.path.join(output_dir, f"checkpoint-{wait_for}", TRAINER_STATE_NAME)
    deadline = time.monotonic() + 240
    try:
        while not os.path.exists(marker):
            assert process.poll() is None, f"the run ended before checkpoint-{wait_for}: {process.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, (
        f"the run was not killed (kill after checkpoint-{wait_for} + {delay:.3f} s): {stdout[-1000:]}"
    )

    latest = latest_checkpoint(output_dir)
    print(f"killed {delay:.3f} s after checkpoint-{wait_for} was complete; resuming from {latest}")
    assert latest is not None and _step_of(latest) >= wait_for
    assert not os.path.exists(os.path.join(output_dir, "front.json"))  # it really died mid-training

    _check_finished(_run(output_dir, "--resume_from_checkpoint", "latest"))
    _assert_same_training_result(uninterrupted, output_dir)


@pytest.mark.slow
def test_crashes_inside_checkpoint_writes_fall_back_to_the_previous_checkpoint(uninterrupted, tmp_path):
    output_dir = str(tmp_path / "crashed")

    # 1. Killed while Accelerate writes checkpoint-6: weights and optimizer are in its staging folder, the scheduler,
    #    RNG and trainer states are not. checkpoint-6 itself does not exist: it only appears complete.
    _check_killed(_run(output_dir, crash="accelerate:6:optimizer.bin"))
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-6"))
    torn = _torn_folders(output_dir)
    assert len(torn) == 1 and sorted(os.listdir(torn[0])) == ["model.safetensors", "optimizer.bin"]
    assert latest_checkpoint(output_dir) == os.path.join(output_dir, "checkpoint-3")
    _check_torn_checkpoint_is_refused_by_name(torn[0], tmp_path)

    # 2. Resumed from checkpoint-3 ("latest" never sees the torn one), then killed once checkpoint-9 was completely
    #    staged but before it was swapped in.
    _check_killed(_run(output_dir, "--resume_from_checkpoint", "latest", crash="commit:9"))
    assert _step_of(os.path.join(output_dir, "checkpoint-6")) == 6  # checkpoint-6 was written completely this time
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-9"))
    assert latest_checkpoint(output_dir) == os.path.join(output_dir, "checkpoint-6")

    # 3. Resumed from checkpoint-6 to the end: the same parameters as the run that never crashed, and the staging
    #    folders the killed processes left behind are gone.
    _check_finished(_run(output_dir, "--resume_from_checkpoint", "latest"))
    assert latest_checkpoint(output_dir) == os.path.join(output_dir, f"checkpoint-{MAX_STEPS}")
    _assert_same_training_result(uninterrupted, output_dir)
    assert [name for name in os.listdir(output_dir) if name.startswith(".")] == []


def _torn_folders(output_dir: str) -> list[str]:
    """Folders under ``output_dir`` holding checkpoint files but no trainer state (what a killed save leaves)."""
    found = []
    for root, _, files in os.walk(output_dir):
        if "optimizer.bin" in files and TRAINER_STATE_NAME not in files:
            found.append(root)
    return found


def _check_torn_checkpoint_is_refused_by_name(torn: str, tmp_path) -> None:
    """Naming the torn folder explicitly fails before anything is loaded, and says which file is missing."""
    from accelerate.state import AcceleratorState, GradientState
    from test_training import make_trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # whatever an earlier test left behind
    GradientState._reset_state()
    trainer = make_trainer(tmp_path / "explicit")
    before = {key: value.clone() for key, value in trainer.unwrapped_model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="is not a PaLoRA checkpoint: it has no trainer_state.json"):
        trainer.train(resume_from_checkpoint=torn)
    assert trainer.global_step == 0
    after = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


# ---- re-saving checkpoint-N into a used output_dir -----------------------------------------------------------------
# A tiny PaLoRATrainer run (the ViT of test_training) whose adapters and heads start from `--adapter_seed`: two runs
# with different seeds have the same run definition (so either may resume the other's checkpoints) but different
# weights, so every checkpoint file tells which run wrote it.
RESAVE_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
output_dir, adapter_seed, resume = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
import torch
from torch.utils.data import DataLoader
import test_training
from peft_palora.training.trainer import PaLoRATrainer, PaLoRATrainingArguments

model = test_training.tiny_model(init_weights=False)
torch.manual_seed(adapter_seed)
with torch.no_grad():
    for name, parameter in model.named_parameters():
        if "palora_" in name or name.startswith("heads."):
            parameter.copy_(0.1 * torch.randn_like(parameter))
args = PaLoRATrainingArguments(output_dir=output_dir, max_steps=4, checkpointing_steps=2, window_size=2,
                               disable_tqdm=True, use_cpu=True, logging_steps=1)
trainer = PaLoRATrainer(model, args, DataLoader(test_training.tiny_dataset(32), batch_size=8, shuffle=True))
trainer.train(resume_from_checkpoint="latest" if resume else None)
trainer.save_model(output_dir + "/final")
print("finished")
"""


def _resave_run(output_dir: str, adapter_seed: int, resume: bool = False, crash: str = ""):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = LAUNCHER.replace("runpy.run_path(sys.argv[0], run_name=\"__main__\")", "exec(compile(sys.argv[0], 'resave', 'exec'))")
    command = [sys.executable, "-c", code, RESAVE_SCRIPT, tests_dir, output_dir, str(adapter_seed),
               "resume" if resume else "fresh"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(crash), cwd=REPO)


def _folder_bytes(folder: str) -> dict[str, bytes]:
    contents = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            contents[name] = handle.read()
    return contents


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run A (adapter seed 1) and run B (seed 2), each uninterrupted in its own folder."""
    folders = {}
    for label, seed in (("A", 1), ("B", 2)):
        folder = str(tmp_path_factory.mktemp(f"run_{label}"))
        completed = _resave_run(folder, seed)
        assert completed.returncode == 0 and "finished" in completed.stdout, completed.stderr[-3000:]
        folders[label] = folder
    for step in (2, 4):  # the two runs really differ in every checkpoint
        a = _folder_bytes(os.path.join(folders["A"], f"checkpoint-{step}"))
        b = _folder_bytes(os.path.join(folders["B"], f"checkpoint-{step}"))
        assert a.keys() == b.keys() and a["model.safetensors"] != b["model.safetensors"]
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["accelerate:4:model.safetensors", "commit:4", "after:4"])
def test_resaving_a_checkpoint_into_a_used_folder_never_mixes_two_runs(two_runs, tmp_path, crash):
    """Run B is started in run A's output folder, re-saves checkpoint-2, and is killed while it re-saves
    checkpoint-4: every checkpoint is then all A's or all B's, and resuming from "latest" ends exactly as the run it
    resumed from."""
    import shutil

    used = str(tmp_path / "used")
    shutil.copytree(two_runs["A"], used)
    shutil.rmtree(os.path.join(used, "final"))
    killed = _resave_run(used, 2, crash=crash)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-1000:] + killed.stderr[-3000:]

    owners = {}
    for step in (2, 4):
        folder = os.path.join(used, f"checkpoint-{step}")
        got = _folder_bytes(folder)
        for label in ("A", "B"):
            if got == _folder_bytes(os.path.join(two_runs[label], f"checkpoint-{step}")):
                owners[step] = label
        assert step in owners, f"checkpoint-{step} mixes the files of two runs after the kill at {crash}"
    assert owners[2] == "B"  # re-saved before the kill: swapped in complete
    assert owners[4] == ("B" if crash.startswith("after") else "A")
    latest = latest_checkpoint(used)
    assert latest == os.path.join(used, "checkpoint-4")

    resumed = _resave_run(used, 2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = _tensors(os.path.join(two_runs[owners[4]], "final", "adapter_model.safetensors"))
    got = _tensors(os.path.join(used, "final", "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
