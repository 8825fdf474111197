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

from peft_palora.training import TRAINER_STATE_NAME, latest_checkpoint

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
#   "state:<step>": SIGKILL after trainer_state.json of checkpoint-<step> went to its temporary file, before the
#   rename that publishes it.
# PALORA_TEST_STEP_DELAY (seconds) pauses before every training step, so that a kill from outside lands mid-training
# however fast the machine is (a tiny step takes ~10 ms); it changes no number.
LAUNCHER = r"""
import os, signal, sys, time
import torch
torch.use_deterministic_algorithms(True)
step_delay = float(os.environ.get("PALORA_TEST_STEP_DELAY") or 0)
if step_delay:
    from peft_palora.training import PaLoRATrainer
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

    if kind == "accelerate":
        import accelerate.checkpointing as checkpointing
        real_save = checkpointing.save

        def save(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            if os.path.basename(os.path.dirname(str(path))) == folder and os.path.basename(str(path)) == rest[0]:
                die()

        checkpointing.save = save
    elif kind == "state":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith(os.path.join(folder, "trainer_state.json")):
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(crash: str = "", step_delay: float = 0.0) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PALORA_TEST_CRASH=crash,
               PALORA_TEST_STEP_DELAY=str(step_delay))  # fmt: skip
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
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


def test_crashes_inside_checkpoint_writes_fall_back_to_the_previous_checkpoint(uninterrupted, tmp_path):
    output_dir = str(tmp_path / "crashed")

    # 1. Killed while Accelerate writes checkpoint-6: weights and optimizer on disk, scheduler/RNG/trainer state not.
    _check_killed(_run(output_dir, crash="accelerate:6:optimizer.bin"))
    partial = os.path.join(output_dir, "checkpoint-6")
    assert sorted(os.listdir(partial)) == ["model.safetensors", "optimizer.bin"]
    assert latest_checkpoint(output_dir) == os.path.join(output_dir, "checkpoint-3")
    _check_torn_checkpoint_is_refused_by_name(partial, tmp_path)

    # 2. Resumed from checkpoint-3 ("latest" skips the torn checkpoint-6), then killed inside the atomic write of
    #    checkpoint-9's trainer state: only its temporary file exists.
    _check_killed(_run(output_dir, "--resume_from_checkpoint", "latest", crash="state:9"))
    assert _step_of(os.path.join(output_dir, "checkpoint-6")) == 6  # the torn checkpoint was rewritten completely
    leftovers = [name for name in os.listdir(os.path.join(output_dir, "checkpoint-9")) if name.startswith(".tmp-")]
    assert len(leftovers) == 1
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-9", TRAINER_STATE_NAME))
    assert latest_checkpoint(output_dir) == os.path.join(output_dir, "checkpoint-6")

    # 3. Resumed from checkpoint-6 to the end: the same parameters as the run that never crashed.
    _check_finished(_run(output_dir, "--resume_from_checkpoint", "latest"))
    assert latest_checkpoint(output_dir) == os.path.join(output_dir, f"checkpoint-{MAX_STEPS}")
    _assert_same_training_result(uninterrupted, output_dir)


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
