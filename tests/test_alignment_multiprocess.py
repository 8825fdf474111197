"""PaLoRADPOTrainer and PaLoRAGRPOTrainer on two processes (CPU, gloo, ``accelerate.debug_launcher``).

What a user of ``accelerate launch --num_processes 2`` relies on: both ranks run one job of world size 2, draw the same
preference window at every step (the windows are not broadcast: each rank draws them from the step), and hold the
same adapters after the steps although each started from its own random adapters (DDP starts from rank 0's) and
saw its own shard of the data. GRPO: each rank generates and scores its own slice of the global preference rows.

As in ``tests/test_multiprocess.py``, the ranks run in a fresh interpreter, and each one removes
``ACCELERATE_USE_CPU`` and sets RANK/LOCAL_RANK as ``accelerate launch`` does on a GPU-less machine, so the state is
the one ``TrainingArguments(use_cpu=True)`` creates, not one the debug launcher forces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from safetensors.torch import load_file  # noqa: E402

NUM_PROCESSES = 2
MAX_STEPS = 3


def _adapters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().contiguous().clone() for name, p in model.named_parameters() if "palora_" in name}


def _prepare_rank() -> int:
    from accelerate.state import AcceleratorState, GradientState

    rank = torch.distributed.get_rank()  # debug_launcher does not set RANK; its process group knows the rank
    os.environ.pop("ACCELERATE_USE_CPU", None)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(NUM_PROCESSES))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return rank


def _dpo_rank_run(output_dir: str) -> None:
    import warnings

    from peft import get_peft_model
    from safetensors.torch import save_file
    from test_alignment_dpo import TASKS, colour_data, dpo_config
    from tiny_lm import make_model, make_tokenizer

    from peft_palora import PaLoRAConfig
    from peft_palora.alignment import PaLoRADPOTrainer

    warnings.simplefilter("ignore")
    rank = _prepare_rank()
    config = PaLoRAConfig(task_names=TASKS, r=4, palora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                          init_weights=False, task_type="CAUSAL_LM")
    base = make_model("llama", seed=0)
    torch.manual_seed(10 + rank)  # each rank starts from its own adapters
    model = get_peft_model(base, config)
    initial = _adapters(model)
    trainer = PaLoRADPOTrainer(
        model, args=dpo_config(os.path.join(output_dir, "run"), max_steps=MAX_STEPS, per_device_train_batch_size=2,
                               disable_tqdm=True),
        train_dataset=colour_data(), processing_class=make_tokenizer(), window_size=3,
    )
    windows = []
    draw = trainer.current_preferences

    def recording():
        window = draw()
        windows.append([trainer.state.global_step, window.tolist()])
        return window

    trainer.current_preferences = recording
    trainer.train()
    report = {
        "world_size": [trainer.accelerator.num_processes, trainer.args.world_size, torch.distributed.get_world_size()],
        "process_index": trainer.accelerator.process_index,
        "windows": windows,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    save_file(initial, os.path.join(output_dir, f"initial_rank{rank}.safetensors"))
    save_file(_adapters(model), os.path.join(output_dir, f"adapters_rank{rank}.safetensors"))
    with open(os.path.join(output_dir, f"dpo_rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


def _grpo_rank_run(output_dir: str) -> None:
    import warnings

    from datasets import Dataset
    from safetensors.torch import save_file
    from test_alignment_grpo import PROMPTS, blue, make_args, make_policy, red
    from tiny_lm import make_tokenizer

    from peft_palora.alignment import PaLoRAGRPOTrainer

    warnings.simplefilter("ignore")
    rank = _prepare_rank()
    model = make_policy("llama", init_weights=True)
    trainer = PaLoRAGRPOTrainer(
        model, {"red": red, "blue": blue},
        args=make_args(_Path(output_dir), max_steps=2, per_device_train_batch_size=4, num_generations=4),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 10}), processing_class=make_tokenizer(),
    )
    rows = []
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        output = generate(inputs)
        rows.append([trainer.state.global_step, output["preference"].tolist()])
        return output

    trainer._generate_and_score_completions = recording
    trainer.train()
    report = {
        "world_size": trainer.accelerator.num_processes,
        "groups": trainer.preference_sampler.num_rays,
        "rows": rows,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    save_file(_adapters(model), os.path.join(output_dir, f"grpo_adapters_rank{rank}.safetensors"))
    with open(os.path.join(output_dir, f"grpo_rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


class _Path(str):
    """``make_args`` joins with ``/``; a str that does so (the rank runs get a plain string)."""

    def __truediv__(self, other: str) -> str:
        return os.path.join(self, other)


def _launch(rank_run: str, output_dir: str) -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_alignment_multiprocess as t; "
        "from accelerate import debug_launcher; "
        f"debug_launcher(t.{rank_run}, args=(sys.argv[2],), num_processes=t.NUM_PROCESSES)"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", code, tests_dir, output_dir], capture_output=True, text=True, timeout=300, env=env
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.mark.slow
def test_dpo_on_two_processes_is_one_run_with_one_window_per_step(tmp_path):
    output_dir = str(tmp_path)
    _launch("_dpo_rank_run", output_dir)
    reports = [json.load(open(os.path.join(output_dir, f"dpo_rank{rank}.json"))) for rank in range(NUM_PROCESSES)]
    for rank, report in enumerate(reports):
        assert report["world_size"] == [NUM_PROCESSES] * 3
        assert report["process_index"] == rank
        assert len(report["losses"]) == MAX_STEPS and all(torch.isfinite(torch.tensor(report["losses"])))
    # one window per step, the same on both ranks, and it changes along the run
    steps = [step for step, _ in reports[0]["windows"]]
    assert steps == list(range(MAX_STEPS))
    assert reports[0]["windows"] == reports[1]["windows"]
    assert reports[0]["windows"][0][1] != reports[0]["windows"][-1][1]
    # the logged loss is the mean over the ranks (TRL gathers it), so both logs agree
    assert reports[0]["losses"] == pytest.approx(reports[1]["losses"], rel=1e-6)

    initial = [load_file(os.path.join(output_dir, f"initial_rank{rank}.safetensors")) for rank in range(2)]
    final = [load_file(os.path.join(output_dir, f"adapters_rank{rank}.safetensors")) for rank in range(2)]
    assert any(not torch.equal(initial[0][k], initial[1][k]) for k in initial[0])  # they did start apart
    assert final[0].keys() == final[1].keys() == initial[0].keys()
    for key in final[0]:
        torch.testing.assert_close(final[1][key], final[0][key], rtol=0, atol=0)
    assert max((final[0][k] - initial[0][k]).abs().max().item() for k in final[0]) > 1e-4


@pytest.mark.slow
def test_grpo_on_two_processes_each_rank_takes_its_slice_of_the_preference_rows(tmp_path):
    from peft_palora.preferences import AnnealedGridSampler

    output_dir = str(tmp_path)
    _launch("_grpo_rank_run", output_dir)
    reports = [json.load(open(os.path.join(output_dir, f"grpo_rank{rank}.json"))) for rank in range(NUM_PROCESSES)]
    for report in reports:
        assert report["world_size"] == NUM_PROCESSES
        assert report["groups"] == 2  # generation batch 2 x 4 rows over 4 generations
        assert len(report["losses"]) == 2 and all(torch.isfinite(torch.tensor(report["losses"])))
    assert [step for step, _ in reports[0]["rows"]] == [step for step, _ in reports[1]["rows"]] == [0, 1]
    assert reports[0]["rows"][1][1] != reports[1]["rows"][1][1]  # at step 1 the two groups differ: a real slice
    for (step, rows_0), (_, rows_1) in zip(reports[0]["rows"], reports[1]["rows"], strict=True):
        # the global rows are the sampler's groups, each repeated for its 4 completions; rank r holds rows 4r..4r+3
        groups = AnnealedGridSampler(2, 2).sample(step / 2, step=step)
        expected = groups.repeat_interleave(4, dim=0).tolist()
        torch.testing.assert_close(torch.tensor(rows_0 + rows_1), torch.tensor(expected), rtol=0, atol=1e-7)
    final = [load_file(os.path.join(output_dir, f"grpo_adapters_rank{rank}.safetensors")) for rank in range(2)]
    for key in final[0]:
        torch.testing.assert_close(final[1][key], final[0][key], rtol=0, atol=0)
