"""Training PaLoRA with Accelerate: preference schedule, window of preferences, checkpoints and the final front.

:class:`PaLoRATrainer` runs the paper's recipe on any :class:`~peft_palora.training.multitask.MultiTaskModel`:

* every micro-batch is trained by :class:`~peft_palora.training.window.PreferenceWindow` -- the same object the
  ``transformers.Trainer`` integration uses: a window of ``m`` preferences drawn at
  ``progress = step / total_steps`` (by default the deterministic
  :class:`~peft_palora.preferences.AnnealedGridSampler`), run as one forward over the batch repeated ``m`` times
  with one preference per sample (or ``m`` forwards for models with batch norm), the ``(m, T)`` task losses
  combined by a :class:`~peft_palora.objectives.MultiTaskObjective`. Every process of a data-parallel run and every
  resumed run computes the very same preferences without communicating;
* the task adapters learn at ``T`` times the base learning rate (``peft_palora.adapter_param_groups``);
* gradient accumulation, mixed precision (where the hardware has it), gradient clipping, trackers, checkpoints
  every N steps (``accelerator.save_state``, swapped in as a whole) and exact resumption, data order included; a
  resume whose arguments would change the run is refused, naming the changed fields;
* at the end, the model is evaluated over a grid of preferences (:func:`~peft_palora.training.core.compute_front`,
  shared with the ``transformers.Trainer`` integration) and :func:`write_front_report` writes the per-preference
  metrics, the hypervolume and a plot;
* under ``accelerate launch`` with several processes, the processes form one run (:func:`distributed_state`); a
  launch whose processes would each run alone, all writing one output folder, is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from peft_palora.fronts.evaluation import MetricFn, evaluate_multitask
from peft_palora.objectives import MultiTaskObjective, ObjectiveOutput
from peft_palora.preferences import PreferenceSampler, simplex_grid
from peft_palora.training.core import (
    WindowPosition,
    build_optimizer,
    check_checkpoint_files,
    check_metric_fns,
    check_multitask_model,
    check_resume,
    compute_front,
    dataset_size,
    eval_mode,
    per_sample_front_applies,
    process_reducer,
    run_definition,
    shard_batches,
)
from peft_palora.training.multitask import MultiTaskModel
from peft_palora.training.window import (
    LossFn,
    PaLoRAArguments,
    PreferenceWindow,
    check_int_argument,
    check_real_argument,
)
from peft_palora.utils.atomic import atomic_directory, atomic_write_text
from peft_palora.utils.json_files import read_json

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
def _like_transformers(name: str, default: Any, help: str | None = None) -> Any:
    """A field that means what ``transformers.TrainingArguments.<name>`` means: its help text, our default."""
    from transformers import TrainingArguments

    source = TrainingArguments.__dataclass_fields__[name].metadata.get("help", "")
    return field(default=default, metadata={"help": help or source})


@dataclass
class PaLoRATrainingArguments(PaLoRAArguments):
    """Settings of :class:`PaLoRATrainer`: the PaLoRA fields of :class:`~peft_palora.training.window.PaLoRAArguments` (shared
    with the ``transformers.Trainer`` integration) plus the loop's own.

    The loop fields carry the names and help texts of ``transformers.TrainingArguments`` where they mean the same
    thing; the defaults suit adapter training (``learning_rate=1e-3``, ``logging_steps=10``, no trackers).
    """

    output_dir: str = _like_transformers("output_dir", "outputs/palora")
    learning_rate: float = _like_transformers(
        "learning_rate", 1e-3, "Learning rate of the base weights and the heads (the adapters get it times T)."
    )
    weight_decay: float = _like_transformers("weight_decay", 0.0, "AdamW weight decay.")
    max_steps: int = _like_transformers("max_steps", -1)
    num_train_epochs: float = _like_transformers("num_train_epochs", 1.0)
    gradient_accumulation_steps: int = _like_transformers("gradient_accumulation_steps", 1)
    max_grad_norm: float | None = _like_transformers("max_grad_norm", 1.0, "Gradient clipping norm (None or 0: off).")
    lr_scheduler_type: str = _like_transformers("lr_scheduler_type", "linear")
    warmup_steps: int = _like_transformers("warmup_steps", 0, "Linear warm-up steps.")
    mixed_precision: str = field(
        default="auto", metadata={"help": "auto (bf16/fp16 on a GPU that has it, else no), no, fp16 or bf16."}
    )
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save a checkpoint every N steps."})
    logging_steps: int = _like_transformers("logging_steps", 10, "Log every N steps.")
    report_to: str | None = field(
        default=None, metadata={"help": "Accelerate trackers (tensorboard, wandb, ..., all); none by default."}
    )
    project_name: str = field(default="palora", metadata={"help": "Tracker project name."})
    seed: int = _like_transformers("seed", 42, "Seed of initialisation, data order and dropout.")
    disable_tqdm: bool = _like_transformers("disable_tqdm", False, "Hide the progress bar.")
    use_cpu: bool = _like_transformers(
        "use_cpu", False, "Train on the CPU even if an accelerator is present (always the case without one)."
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder to resume from, or 'latest' for the newest in output_dir."},
    )
    push_to_hub: bool = _like_transformers("push_to_hub", False, "Publish the trained model to the Hub.")
    hub_model_id: str | None = _like_transformers("hub_model_id", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        # Types first, so that a wrong one fails with a message naming the argument rather than deep in a comparison.
        for name, minimum in _INT_ARGUMENTS.items():
            check_int_argument(name, getattr(self, name), minimum, optional=name in _OPTIONAL_ARGUMENTS)
        for name, (minimum, inclusive) in _REAL_ARGUMENTS.items():
            check_real_argument(name, getattr(self, name), minimum, inclusive, optional=name in _OPTIONAL_ARGUMENTS)
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(
                f"`mixed_precision` must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}."
            )
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set `max_steps` > 0 or `num_train_epochs` > 0.")
        if self.seed >= 2**32:
            raise ValueError(f"`seed` must be < 2**32 (numpy's seed range), got {self.seed}.")
        from transformers import SchedulerType

        schedulers = [scheduler.value for scheduler in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ValueError(f"`lr_scheduler_type` must be one of {schedulers}, got {self.lr_scheduler_type!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id`.")


# name -> smallest allowed value (None: no bound); arguments that may also be None are listed in _OPTIONAL_ARGUMENTS
_INT_ARGUMENTS = {
    "max_steps": None,
    "gradient_accumulation_steps": 1,
    "warmup_steps": 0,
    "checkpointing_steps": 1,
    "logging_steps": 1,
    "seed": 0,
}
# name -> (smallest allowed value, whether that value itself is allowed); every value must be finite
_REAL_ARGUMENTS = {
    "learning_rate": (0, False),
    "weight_decay": (0, True),
    "num_train_epochs": (0, True),
    "max_grad_norm": (0, True),
}
_OPTIONAL_ARGUMENTS = ("checkpointing_steps", "max_grad_norm")


def use_cpu(args: PaLoRATrainingArguments) -> bool:
    """Whether the trainer's Accelerator runs on the CPU: ``args.use_cpu``, or no GPU-like device. ``cpu=True`` is
    what lets ``accelerate launch --multi_gpu --num_processes N`` run N CPU processes (gloo) on a GPU-less machine.
    """
    from accelerate.utils import is_mps_available, is_xpu_available

    return bool(args.use_cpu) or not (torch.cuda.is_available() or is_xpu_available() or is_mps_available())


def distributed_state(args: PaLoRATrainingArguments) -> PartialState:
    """The process state (rank, main process, world size) that :class:`PaLoRATrainer` will train in.

    Accelerate's state is created once per process, by whoever asks first, and a later ``Accelerator(cpu=True)``
    cannot change it. A script that needs ``is_main_process`` before the trainer exists must ask here, not with a
    bare ``PartialState()``: on a GPU-less machine under ``accelerate launch --multi_gpu`` that one decides "not
    distributed", and every process would then train alone into the same output folder.
    """
    return PartialState(cpu=use_cpu(args))


def _check_one_run(accelerator: Accelerator) -> None:
    """Refuse a launch of several processes whose Accelerator runs each on its own (see :func:`distributed_state`)."""
    launched = os.environ.get("WORLD_SIZE", "1")
    launched = int(launched) if launched.isdigit() else 1
    if launched > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"this process was launched as one of {launched} (WORLD_SIZE), but Accelerate's state was created as a "
            "single process, so every process would train its own model into the same `output_dir`. Something "
            "created the state before the trainer without cpu=True (a bare `accelerate.PartialState()` on a "
            "GPU-less machine, say): create it with `peft_palora.training.trainer.distributed_state(args)` instead, "
            "or let the trainer create it first."
        )


def resolve_mixed_precision(choice: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a GPU that supports it, ``"fp16"`` on other GPUs, ``"no"`` elsewhere."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def _step_seed(seed: int, micro_step: int, process_index: int) -> int:
    """A seed for one micro-batch, a pure function of (seed, micro-step, rank).

    Re-seeding every micro-batch makes the randomness inside a step (dropout) independent of whatever consumed random
    numbers before it (a data loader drawing its worker seed, say), which is what lets a resumed run replay exactly.
    """
    return (seed * 1_000_003 + micro_step * 257 + process_index) % (2**32)


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-<step>`` folder of ``output_dir`` with the largest step that has a trainer state, or None."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE_NAME)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return max(found)[1] if found else None


@dataclass
class TrainOutput:
    """What :meth:`PaLoRATrainer.train` returns."""

    global_step: int
    training_loss: float
    front: Any = None
    log_history: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------
class PaLoRATrainer:
    """Trains a :class:`MultiTaskModel` with PaLoRA's recipe on Accelerate (single process, DDP, CPU or GPU).

    Args:
        model: the multi-task model (PEFT backbone with PaLoRA adapters + task heads + ``label_columns``).
        args: :class:`PaLoRATrainingArguments`.
        train_dataloader: batches holding the model inputs and every task's label column. Shuffle with
            ``shuffle=True``: the trainer's Accelerator replaces the random sampler by a seeded one whose order is a
            function of ``(args.seed, epoch)``, which makes the data order resumable.
        eval_dataloader: optional; used by :meth:`evaluate` and the final front.
        loss_fns: ``{task: loss_fn(logits, labels)}``; cross-entropy for every task by default.
        metric_fns: ``{name: fn(logits, labels)}`` computed per task at evaluation; ``{"accuracy": ...}`` by default.
        preference_sampler: a :class:`~peft_palora.preferences.PreferenceSampler` giving ``window_size`` rays; by
            default ``AnnealedGridSampler(T, window_size, sampler_mul, sampler_epsilon)``.
        objective: a :class:`MultiTaskObjective`; by default one built from ``args``.
        accelerator: an existing Accelerator (created from ``args`` when omitted). A user-provided one should use
            ``DataLoaderConfiguration(use_seedable_sampler=True)`` and ``step_scheduler_with_optimizer=False``.
        optimizer: by default AdamW over ``peft_palora.adapter_param_groups`` (adapters at ``lr * T``).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        args: PaLoRATrainingArguments,
        train_dataloader: DataLoader,
        eval_dataloader: DataLoader | None = None,
        loss_fns: Mapping[str, LossFn] | None = None,
        metric_fns: Mapping[str, MetricFn] | None = None,
        preference_sampler: PreferenceSampler | None = None,
        objective: MultiTaskObjective | None = None,
        accelerator: Accelerator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        check_multitask_model(model)
        if not isinstance(args, PaLoRATrainingArguments):
            raise TypeError(f"`args` must be PaLoRATrainingArguments, got {type(args).__name__}.")
        if not isinstance(train_dataloader, DataLoader):
            raise TypeError(f"`train_dataloader` must be a torch DataLoader, got {type(train_dataloader).__name__}.")
        if eval_dataloader is not None and not isinstance(eval_dataloader, DataLoader):
            raise TypeError(f"`eval_dataloader` must be a torch DataLoader, got {type(eval_dataloader).__name__}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        self.args = args
        self.task_names = model.task_names
        # sampling, expanding and combining (and checking `preference_sampler`, `objective`, `loss_fns`): the same
        # object as in the transformers.Trainer integration
        self.window = PreferenceWindow.from_arguments(
            args, model, preference_sampler=preference_sampler, objective=objective, loss_fns=loss_fns
        )
        self.loss_fns = self.window.loss_fns
        self.preference_sampler = self.window.sampler
        self.objective = self.window.objective
        self.window_mode = self.window.mode
        self.metric_fns = check_metric_fns(metric_fns)

        if accelerator is None:
            set_seed(args.seed)
            accelerator = Accelerator(
                cpu=use_cpu(args),
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                mixed_precision=resolve_mixed_precision(args.mixed_precision),
                log_with=args.report_to,
                project_dir=args.output_dir,
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
                step_scheduler_with_optimizer=False,
            )
        _check_one_run(accelerator)
        self.accelerator = accelerator
        if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            # Accelerate has no fp16 autocast on the CPU and quietly trains in float32.
            logger.warning("mixed_precision='fp16' has no effect on the CPU: training runs in float32. Use bf16.")

        if optimizer is None:
            optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, args.adapter_lr_multiplier)
        self.model, self.optimizer, self.train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
        self._unsharded_eval_dataloader = eval_dataloader  # the front shards it by batch: each sample once
        self.eval_dataloader = accelerator.prepare(eval_dataloader) if eval_dataloader is not None else None

        self.steps_per_epoch = math.ceil(len(self.train_dataloader) / args.gradient_accumulation_steps)
        if args.max_steps > 0:
            self.max_steps = args.max_steps
        else:
            self.max_steps = max(1, math.ceil(args.num_train_epochs * self.steps_per_epoch))
        from transformers import get_scheduler

        scheduler = get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=args.warmup_steps,
            num_training_steps=self.max_steps,
        )
        self.lr_scheduler = accelerator.prepare(scheduler)

        self.global_step = 0
        self.micro_step = 0
        self._position = WindowPosition()  # micro-batches of the current optimisation step already run
        self.epoch = 0
        self.batches_in_epoch = 0
        self.log_history: list[dict[str, float]] = []
        # Sums since the last log and over the whole run. They are checkpointed, so that a resumed run logs (and
        # returns as training_loss) exactly what an uninterrupted one would.
        self._running = _RunningStats(self.task_names)
        self._loss_sum, self._loss_count = 0.0, 0

    # ---- conveniences -------------------------------------------------------------------------------------------
    @property
    def unwrapped_model(self) -> MultiTaskModel:
        return self.accelerator.unwrap_model(self.model)

    def _reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return process_reducer(self.accelerator)(tensor)

    def sample_preferences(self, global_step: int, step: int) -> torch.Tensor:
        """The window of optimisation step ``global_step`` for sampler step ``step`` (:func:`window_step`): a pure
        function of the position in training, identical on every process."""
        return self.window.preferences(global_step, self.max_steps, step).to(
            device=self.accelerator.device, dtype=torch.float32
        )

    # ---- one step -----------------------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], step: int) -> ObjectiveOutput:
        """Sample the window for sampler step ``step``, run it over ``batch``, combine the losses
        (:meth:`PreferenceWindow.step`) and back-propagate (no optimiser step)."""
        output, _ = self.window.step(
            self.model,
            batch,
            self.global_step,
            self.max_steps,
            step,
            unwrapped=self.unwrapped_model,
            device=self.accelerator.device,
            reduce_fn=self._reduce_mean,
        )
        self.accelerator.backward(output.loss)
        return output

    # ---- the loop -----------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Train for ``max_steps`` optimisation steps, then evaluate the front if there is an eval dataloader.

        Args:
            resume_from_checkpoint: a ``checkpoint-<step>`` folder, or True / ``"latest"`` for the newest one in
                ``output_dir``; default ``args.resume_from_checkpoint``.
                The run continues exactly where the checkpoint left it: parameters, optimiser, scheduler, loss
                balancer, preference schedule and data order.
        """
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        if resume_from_checkpoint is None:
            resume_from_checkpoint = args.resume_from_checkpoint
        if resume_from_checkpoint:
            latest = resume_from_checkpoint is True or resume_from_checkpoint == "latest"
            path = latest_checkpoint(args.output_dir) if latest else resume_from_checkpoint
            if path is None:
                raise ValueError(f"resuming from the latest checkpoint but {args.output_dir!r} holds none.")
            self.load_checkpoint(path)
        if args.report_to:
            accelerator.init_trackers(args.project_name, config=_tracker_config(args))

        progress_bar = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            disable=args.disable_tqdm or not accelerator.is_local_main_process,
            desc="PaLoRA",
        )
        self.model.train()
        while self.global_step < self.max_steps:
            if self.batches_in_epoch >= len(self.train_dataloader):
                self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            self.train_dataloader.set_epoch(self.epoch)
            dataloader = self.train_dataloader
            if self.batches_in_epoch > 0:
                dataloader = accelerator.skip_first_batches(self.train_dataloader, self.batches_in_epoch)
            for batch in dataloader:
                with accelerator.accumulate(self.model):
                    set_seed(_step_seed(args.seed, self.micro_step, accelerator.process_index))
                    step = self._position.sampler_step(self.global_step, args.gradient_accumulation_steps)
                    output = self.training_step(batch, step)
                    self._position.advance(self.global_step)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                self.micro_step += 1
                self.batches_in_epoch += 1
                self._running.add(output)
                if not accelerator.sync_gradients:
                    continue
                self.lr_scheduler.step()
                self.global_step += 1
                progress_bar.update(1)
                if self.global_step % args.logging_steps == 0 or self.global_step == self.max_steps:
                    logs = self._running.summary(self._reduce_mean)
                    logs["train/learning_rate"] = self.lr_scheduler.get_last_lr()[0]
                    logs["train/epoch"] = self.epoch + self.batches_in_epoch / max(len(self.train_dataloader), 1)
                    self._loss_sum += logs["train/loss"] * self._running.count
                    self._loss_count += self._running.count
                    self._running = _RunningStats(self.task_names)
                    self.log_history.append({"step": self.global_step, **logs})
                    progress_bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
                    if args.report_to:
                        accelerator.log(logs, step=self.global_step)
                if args.checkpointing_steps and self.global_step % args.checkpointing_steps == 0:
                    self.save_checkpoint()
                if self.global_step >= self.max_steps:
                    break
            else:
                # the loader is exhausted: the next pass is a new epoch
                self.batches_in_epoch = len(self.train_dataloader)
        progress_bar.close()

        front = None
        if self.eval_dataloader is not None:
            front = self.evaluate_front()
        if args.report_to:
            accelerator.end_training()
        return TrainOutput(
            global_step=self.global_step,
            training_loss=self._loss_sum / max(self._loss_count, 1),
            front=front,
            log_history=list(self.log_history),
        )

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, preference: Any = None, dataloader: DataLoader | None = None) -> dict[str, float]:
        """Loss and metrics of every task on the eval set, at ``preference`` (default: the one in force).

        Logits and labels are gathered from all processes (``gather_for_metrics`` drops the samples Accelerate
        duplicated to even out the shards), so every process returns the same numbers, over the whole set.
        """
        dataloader = dataloader or self.eval_dataloader
        if dataloader is None:
            raise ValueError("`evaluate` needs an eval dataloader.")
        with eval_mode(self.model):
            return evaluate_multitask(
                self.model,
                dataloader,
                preference=preference,
                loss_fns=self.loss_fns,
                metric_fns=self.metric_fns,
                gather=self.accelerator.gather_for_metrics,
                unwrapped=self.unwrapped_model,
            )

    def evaluate_front(self, preferences: torch.Tensor | None = None, dataloader: DataLoader | None = None):
        """Evaluate at every preference of a grid (default: ``simplex_grid(T, eval_points_per_side)``).

        Returns the :func:`~peft_palora.training.core.compute_front` table: ``pref_<task>`` columns then, per task,
        ``<task>_loss`` and ``<task>_<metric>``, over the whole eval set on every process. With the default loss
        and metrics (cross-entropy, accuracy) and no batch statistics, the grid runs in one forward per batch, the
        processes of a data-parallel run each taking every N-th batch; otherwise :meth:`evaluate` runs at each
        preference in turn.

        Args:
            dataloader: default the trainer's eval dataloader. One given here is used as it is on every process.
        """
        if preferences is None:
            preferences = simplex_grid(len(self.task_names), self.args.eval_points_per_side)
        accelerator = self.accelerator
        raw = dataloader if dataloader is not None else self._unsharded_eval_dataloader
        if raw is None:
            raise ValueError("`evaluate_front` needs an eval dataloader.")
        num_batches = len(raw) if hasattr(raw, "__len__") else 0
        sharded = dataloader is None and accelerator.num_processes > 1 and num_batches >= accelerator.num_processes
        shards = (accelerator.process_index, accelerator.num_processes) if sharded else (0, 1)
        return compute_front(
            self.unwrapped_model,
            preferences,
            batches=functools.partial(shard_batches, raw, *shards, accelerator.device),
            evaluate_at=functools.partial(self.evaluate, dataloader=dataloader),
            per_sample=per_sample_front_applies(self.loss_fns, self.metric_fns),
            reduce_sum=process_reducer(accelerator, "sum") if sharded else None,
        )

    # ---- saving -------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None) -> str:
        """Save the adapter bundle and the task heads (main process only); returns the folder."""
        output_dir = output_dir or self.args.output_dir
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.unwrapped_model.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
        return output_dir

    def run_definition(self) -> dict[str, Any]:
        """What defines this run, JSON-ready: stored in every checkpoint and compared when resuming.

        Two runs with the same definition, the same initial weights and the same data make the same updates; a
        resumed run whose definition differs from its checkpoint's would not continue the uninterrupted one.
        """
        groups = []
        for group in self.optimizer.param_groups:
            hyper = {key: value for key, value in group.items() if key not in ("params", "lr")}
            hyper["initial_lr"] = group.get("initial_lr", group.get("lr"))
            hyper["num_parameters"] = sum(parameter.numel() for parameter in group["params"])
            groups.append(hyper)
        return run_definition(
            self.window,
            self.args,
            max_steps=self.max_steps,
            mixed_precision=self.accelerator.mixed_precision,
            num_processes=self.accelerator.num_processes,
            dataset_size=dataset_size(getattr(self.train_dataloader, "dataset", None)),
            batches_per_epoch=len(self.train_dataloader),
            optimizer={"type": type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__, "param_groups": groups},
        )

    def _trainer_state(self, running_stats: dict[str, Any]) -> dict[str, Any]:
        objective_state = self.objective.state_dict()["loss_balancer"]
        return {
            "global_step": self.global_step,
            "micro_step": self.micro_step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "max_steps": self.max_steps,
            "run": self.run_definition(),
            "objective": {
                "running_mean": [float(value) for value in objective_state["running_mean"].tolist()],
                "num_updates": int(objective_state["num_updates"]),
            },
            "log_history": self.log_history,
            "running_stats": running_stats,
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
        }

    def save_checkpoint(self, path: str | None = None) -> str:
        """``accelerator.save_state`` (model, optimizer, scheduler, RNG) plus ``trainer_state.json``, as one unit.

        Everything is written into a staging folder beside ``path`` (``atomic_directory``), which then replaces
        ``path`` as a whole: a crash at any instant leaves either the previous ``checkpoint-N`` (or none) or the
        complete new one, never a mix, and :func:`latest_checkpoint` only ever sees complete checkpoints.
        """
        path = path or os.path.join(self.args.output_dir, f"checkpoint-{self.global_step}")
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        # The partial sums differ between ranks; every rank resumes from their mean, which the next log (a mean over
        # the ranks) cannot tell apart. A collective: every rank takes part.
        running_stats = self._running.state_dict(self._reduce_mean)
        with contextlib.ExitStack() as stack:
            staging = (
                stack.enter_context(atomic_directory(path, keep_other_files=False))
                if accelerator.is_main_process
                else None
            )
            staging = self._broadcast_path(staging)  # every rank writes its RNG state into the same staging folder
            accelerator.save_state(staging)
            if accelerator.is_main_process:
                state = self._trainer_state(running_stats)
                atomic_write_text(os.path.join(staging, TRAINER_STATE_NAME), json.dumps(state, indent=2))
            accelerator.wait_for_everyone()
        accelerator.wait_for_everyone()  # the main process has swapped the checkpoint in
        return path

    def _broadcast_path(self, path: str | None) -> str:
        """The main process's ``path`` on every process (as bytes in a tensor: nothing is pickled)."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return path
        from accelerate.utils import broadcast

        size = 4096
        buffer = torch.zeros(size, dtype=torch.uint8, device=accelerator.device)
        if accelerator.is_main_process:
            encoded = os.fsencode(path)
            if len(encoded) >= size:
                raise ValueError(f"checkpoint path too long ({len(encoded)} bytes): {path!r}")
            buffer[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        buffer = broadcast(buffer, from_process=0).cpu()
        length = int((buffer != 0).sum()) if bool((buffer == 0).any()) else size
        return os.fsdecode(bytes(buffer[:length].tolist()))

    def load_checkpoint(self, path: str, allow_changed_arguments: bool | None = None) -> None:
        """Restore a :meth:`save_checkpoint` folder into this trainer.

        Args:
            path: the ``checkpoint-<step>`` folder.
            allow_changed_arguments: resume although the run definition (:meth:`run_definition`) differs from the
                checkpoint's; default ``args.allow_changed_arguments``. Without it such a resume raises a
                ValueError naming every changed field (``name: old -> new``) before anything is loaded. With it
                the changes are logged, and the new learning rates and weight decay apply from the resumed step on
                (the scheduler keeps its position).
        """
        if allow_changed_arguments is None:
            allow_changed_arguments = self.args.allow_changed_arguments
        state_path = os.path.join(path, TRAINER_STATE_NAME)
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"{path!r} is not a PaLoRA checkpoint: it has no {TRAINER_STATE_NAME}.")
        # Every file first (a torn one is named), and this process's RNG state must be there: Accelerate's
        # `load_state` would skip a missing or unreadable one silently, and the run would not replay.
        check_checkpoint_files(
            path, required=["model.safetensors", "optimizer.bin", f"random_states_{self.accelerator.process_index}.pkl"]
        )
        state = read_json(state_path, what="trainer state")
        if "run" not in state:
            raise ValueError(f"{state_path!r} holds no run definition: it is not a PaLoRATrainer checkpoint.")
        changes = check_resume(state["run"], self.run_definition(), path, allow_changed_arguments, logger)
        fresh_groups = [
            {key: value for key, value in group.items() if key != "params"} for group in self.optimizer.param_groups
        ]
        self.accelerator.load_state(path)
        if changes:
            self._apply_new_hyperparameters(fresh_groups)
        self.global_step = int(state["global_step"])
        self.micro_step = int(state["micro_step"])
        self._position.reset()
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.objective.load_state_dict(
            {
                "loss_balancer": {
                    "running_mean": torch.tensor(state["objective"]["running_mean"], dtype=torch.float64),
                    "num_updates": state["objective"]["num_updates"],
                }
            }
        )
        self.log_history = list(state.get("log_history", []))
        self._running = _RunningStats(self.task_names)
        self._running.load_state_dict(state["running_stats"])
        self._loss_sum, self._loss_count = float(state["loss_sum"]), int(state["loss_count"])

    def _apply_new_hyperparameters(self, fresh_groups: list[dict[str, Any]]) -> None:
        """After an allowed changed resume: this run's group hyperparameters replace the checkpoint's, and the
        learning rate is this run's at the restored scheduler position."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        groups = self.optimizer.param_groups
        if len(groups) != len(fresh_groups):
            raise ValueError(
                f"the checkpoint's optimizer has {len(groups)} parameter groups, this run's {len(fresh_groups)}."
            )
        initial = [fresh.get("initial_lr", fresh["lr"]) for fresh in fresh_groups]
        for group, fresh in zip(groups, fresh_groups):
            for key, value in fresh.items():
                if key != "lr":
                    group[key] = value
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = list(initial)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:
            for group, base, function in zip(groups, initial, lambdas):
                group["lr"] = base * function(scheduler.last_epoch)
        else:
            for group, base in zip(groups, initial):
                group["lr"] = base
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in groups]


class _RunningStats:
    """Sums of the logged quantities between two logging steps."""

    def __init__(self, task_names: Sequence[str]):
        self.task_names = list(task_names)
        self.count = 0
        self.loss = 0.0
        self.consistency = 0.0
        self.task_losses = torch.zeros(len(self.task_names), dtype=torch.float64)

    def add(self, output: ObjectiveOutput) -> None:
        self.count += 1
        self.loss += float(output.loss.detach())
        self.consistency += float(output.consistency)
        self.task_losses += output.task_losses.detach().double().mean(dim=0).cpu()

    def _sums(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.loss, self.consistency], dtype=torch.float64), self.task_losses])

    def state_dict(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """JSON-ready sums, reduced over the processes (Python floats round-trip through JSON exactly)."""
        values = reduce_fn(self._sums()).double().cpu().tolist()
        return {"count": self.count, "loss": values[0], "consistency": values[1], "task_losses": values[2:]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["task_losses"]) != len(self.task_names):
            raise ValueError(
                f"the checkpoint's running stats hold {len(state['task_losses'])} tasks, this run has "
                f"{len(self.task_names)}."
            )
        self.count = int(state["count"])
        self.loss = float(state["loss"])
        self.consistency = float(state["consistency"])
        self.task_losses = torch.tensor(state["task_losses"], dtype=torch.float64)

    def summary(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        values = reduce_fn((self._sums() / max(self.count, 1)).float()).double().cpu()
        logs = {"train/loss": float(values[0]), "train/consistency": float(values[1])}
        for index, task in enumerate(self.task_names):
            logs[f"train/loss_{task}"] = float(values[2 + index])
        return logs


def _tracker_config(args: PaLoRATrainingArguments) -> dict[str, Any]:
    """Tracker-friendly copy of the arguments (numbers, strings and bools only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(args).items()}


