"""Training, evaluation and the run/store/aggregate plumbing shared by ``multimnist.py``, ``multimnist3.py`` and
``schedule_ablation.py``.

The loops follow the paper's code (github.com/nik-dim/palora): Adam, batch 256, the training progress
``t = (step + 1) / total_steps`` fed to the preference sampler, and for a window of ``m`` preferences the objective
``sum_i sum_t lambda_it * L_it`` (the per-preference scalarised losses are summed over the window, as the paper's
multi-forward trainer does). Everything here is plain PyTorch on in-memory tensors: MultiMNIST fits in memory, and
slicing tensors is much cheaper than a DataLoader on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_REPO_ROOT))

from paper_datasets import make_pair_dataset  # noqa: E402
from paper_models import MULTILENET_TARGETS, MULTIMNIST_TASKS, MultiLeNet, PaMaL, count_parameters  # noqa: E402
from peft import get_peft_model  # noqa: E402

import peft_palora  # noqa: E402  (registers PALORA with PEFT)
from peft_palora import adapter_param_groups  # noqa: E402
from peft_palora.pareto import hypervolume, preference_consistency  # noqa: E402
from peft_palora.preferences import simplex_grid  # noqa: E402

LOSS_REFERENCE = (1.0, 1.0)  # the paper's hypervolume reference point for the (loss_left, loss_right) front
EVAL_PREFERENCES = simplex_grid(2, 11)  # [p, 1 - p] for p = 0, 0.1, ..., 1 (weight of the left digit first)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def load_split(
    split: str, num_samples: int | None = None, dataset: str = "multimnist", input_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` and labels ``(N, 2)`` (top-left, bottom-right class) as plain tensors.

    ``dataset`` is one of ``paper_datasets.DATASETS`` (MultiMNIST, MultiFashion, Fashion+MNIST). The images are in
    [0, 1] times ``input_scale``: 255 gives the 0-255 pixels of the official generator's commented-out resize path.
    """
    if not (isinstance(input_scale, (int, float)) and not isinstance(input_scale, bool) and input_scale > 0):
        raise ValueError(f"`input_scale` must be a positive number, got {input_scale!r}.")
    images, labels = make_pair_dataset(dataset, split, num_samples=num_samples, seed=0)
    if input_scale != 1:
        images = images * float(input_scale)
    return images.contiguous(), labels


def batch_indices(num_samples: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One shuffled epoch of index batches; the last, smaller batch is kept (a DataLoader's default)."""
    order = torch.randperm(num_samples, generator=generator)
    yield from order.split(batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def config_supports_conv_layout() -> bool:
    """Whether the installed ``PaLoRAConfig`` has a ``conv_layout`` field (the paper's convolution adapter form)."""
    return "conv_layout" in {field.name for field in dataclasses.fields(peft_palora.PaLoRAConfig)}


def build_palora(
    seed: int,
    rank: int = 1,
    alpha: float = 1.0,
    rank_pattern: dict[str, int] | None = None,
    conv_layout: str | None = None,
    task_names: Sequence[str] = MULTIMNIST_TASKS,
) -> nn.Module:
    """MultiLeNet with PaLoRA on every convolution and linear layer, base weights trained (the paper's setting).

    ``palora_alpha = 1`` is the paper's ``lora_alpha`` default, so with ``r = 1`` the adapters are scaled by 1.
    Layers given another rank by ``rank_pattern`` keep the same scale ``alpha / rank``. ``conv_layout`` is passed
    to ``PaLoRAConfig`` when given (``None``: the config's default, PEFT's layout). ``task_names``: one head and one
    adapter per task (three for MultiMNIST-3).
    """
    layout = {}
    if conv_layout is not None:
        if not config_supports_conv_layout():
            raise ValueError(
                f"conv_layout={conv_layout!r}: the installed peft_palora.PaLoRAConfig has no `conv_layout` field, so "
                "the paper's convolution adapter layout cannot be used with this version of the library."
            )
        layout = {"conv_layout": conv_layout}
    torch.manual_seed(seed)
    rank_pattern = dict(rank_pattern or {})
    config = peft_palora.PaLoRAConfig(
        **layout,
        task_names=list(task_names),
        r=rank,
        palora_alpha=alpha,
        target_modules=MULTILENET_TARGETS,
        train_base_weights=True,
        rank_pattern=rank_pattern,
        alpha_pattern={layer: layer_rank * alpha / rank for layer, layer_rank in rank_pattern.items()},
    )
    return get_peft_model(MultiLeNet(task_names), config)


def build_pamal(seed: int, task_names: Sequence[str] = MULTIMNIST_TASKS) -> PaMaL:
    torch.manual_seed(seed)
    return PaMaL(MultiLeNet(task_names), num_tasks=len(task_names))


def build_plain(seed: int, task_names: Sequence[str] = MULTIMNIST_TASKS) -> MultiLeNet:
    torch.manual_seed(seed)
    return MultiLeNet(task_names)


def task_losses(outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """``(T,)`` mean cross-entropy of each task; the model's heads are in the order of the label columns."""
    _check_tasks(outputs, labels)
    return torch.stack([F.cross_entropy(outputs[task], labels[:, t]) for t, task in enumerate(outputs)])


def _check_tasks(outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    if labels.ndim != 2 or labels.shape[1] != len(outputs):
        raise ValueError(f"`labels` must have one column per task ({len(outputs)}), got shape {tuple(labels.shape)}.")


def palora_window_losses(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, prefs: torch.Tensor, mode: str = "sequential"
) -> torch.Tensor:
    """``(m, T)`` task losses under ``m`` preferences.

    ``"sequential"``: one forward per preference, as the paper's trainer does. ``"batched"``: ONE forward over the
    batch repeated m times with one preference per sample. MultiLeNet has no batch norm, so both give the same losses;
    on one CPU core the sequential one is faster here (the per-sample path runs the adapters on m times larger
    activations in one go, which gains nothing without parallel hardware).
    """
    if mode == "sequential":
        return torch.stack([task_losses(model(x=x, preference=pref), labels) for pref in prefs])
    if mode != "batched":
        raise ValueError(f"`mode` must be 'sequential' or 'batched', got {mode!r}.")
    num_rays, batch = prefs.shape[0], x.shape[0]
    outputs = model(x=x.repeat(num_rays, 1, 1, 1), preference=prefs.repeat_interleave(batch, dim=0))
    _check_tasks(outputs, labels)
    repeated = labels.repeat(num_rays, 1)
    columns = [
        F.cross_entropy(outputs[task], repeated[:, t], reduction="none").view(num_rays, batch).mean(1)
        for t, task in enumerate(outputs)
    ]
    return torch.stack(columns, dim=1)


def pamal_window_losses(model: PaMaL, x: torch.Tensor, labels: torch.Tensor, prefs: torch.Tensor) -> torch.Tensor:
    """``(m, T)`` task losses, one forward per preference (each preference is a different full weight mixture)."""
    return torch.stack([task_losses(model(x, pref), labels) for pref in prefs])


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def train(
    loss_fn: Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    batch_size: int,
    seed: int,
    max_steps: int | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
    modules: Sequence[nn.Module] = (),
    name: str | None = None,
) -> dict[str, Any]:
    """Minimise ``loss_fn(x, labels, progress, step)`` with ``optimizer``; returns steps and seconds.

    ``progress = (step + 1) / total_steps`` as in the paper's trainer. ``max_steps`` cuts training short (smoke
    tests); the schedule is then laid out over the shortened run. ``on_epoch_end(epoch, step)`` runs after every
    epoch (and after the last step when ``max_steps`` ends an epoch early), outside the timed region. With a ``name``,
    one progress line is printed per epoch.
    """
    x, labels = data
    steps_per_epoch = -(-x.shape[0] // batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    step, seconds = 0, 0.0
    for module in modules:
        module.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        for index in batch_indices(x.shape[0], batch_size, generator):
            if step >= total_steps:
                break
            loss = loss_fn(x[index], labels[index], (step + 1) / total_steps, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        seconds += time.perf_counter() - start
        if name is not None:
            print(f"  {name}: epoch {epoch + 1}/{epochs}, {step}/{total_steps} steps, {seconds:.0f}s", flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, step)
            for module in modules:
                module.train()
        if step >= total_steps:
            break
    return {"steps": step, "train_seconds": seconds}


def train_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler,
    window_losses: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    args: argparse.Namespace,
    seed: int,
    data: tuple[torch.Tensor, torch.Tensor],
    on_epoch_end: Callable[[int, int], None] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """:func:`train` on a window of preferences per step: ``prefs = sampler.sample(progress, step=step)`` (m, T) and
    the objective ``sum_i sum_t prefs_it * L_it`` with ``L = window_losses(x, labels, prefs)``. The budget comes from
    ``args`` (``epochs``, ``batch_size``, ``max_steps``)."""

    def loss_fn(x, labels, progress, step):
        prefs = sampler.sample(progress, step=step)
        return (prefs * window_losses(x, labels, prefs)).sum()

    return train(
        loss_fn,
        optimizer,
        data,
        args.epochs,
        args.batch_size,
        seed,
        args.max_steps,
        on_epoch_end=on_epoch_end,
        modules=[model],
        name=name,
    )


def train_front(
    kind: str,
    model: nn.Module,
    sampler,
    args: argparse.Namespace,
    seed: int,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    *,
    name: str,
    prefs: torch.Tensor = EVAL_PREFERENCES,
    epoch_prefs: torch.Tensor | None = None,
    store_curve: bool = False,
    reference: Sequence[float] = LOSS_REFERENCE,
    window_mode: str = "sequential",
    epoch_test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train a PaLoRA (``kind="palora"``: adapters at lr x T) or PaMaL (``kind="pamal"``) model with Adam at
    ``args.lr`` on the windows of ``sampler``, then evaluate its front at ``prefs`` on ``test_data``.

    With ``epoch_prefs``, the loss hypervolume (w.r.t. ``reference``) at those preferences is logged after every
    epoch (on ``epoch_test_data``, default ``test_data``); ``store_curve`` puts that list (empty without
    ``epoch_prefs``) in the result as ``epoch_hypervolumes``.
    """
    epoch_test_data = test_data if epoch_test_data is None else epoch_test_data
    if kind == "palora":
        optimizer = torch.optim.Adam(adapter_param_groups(model, lr=args.lr), lr=args.lr)
        window_losses = functools.partial(palora_window_losses, model, mode=window_mode)
        evaluate, evaluate_epoch = (functools.partial(evaluate_palora, model, *data)
                                    for data in (test_data, epoch_test_data))
    elif kind == "pamal":
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=args.lr)
        window_losses = functools.partial(pamal_window_losses, model)
        evaluate, evaluate_epoch = (functools.partial(evaluate_pamal, model, *data)
                                    for data in (test_data, epoch_test_data))
    else:
        raise ValueError(f"`kind` must be 'palora' or 'pamal', got {kind!r}.")
    curve = []
    on_epoch_end = None if epoch_prefs is None else epoch_logger(lambda: evaluate_epoch(prefs=epoch_prefs), curve, reference)
    stats = train_window(model, optimizer, sampler, window_losses, args, seed, train_data, on_epoch_end, name)
    logged = {"epoch_hypervolumes": curve} if store_curve else {}
    sizes = {"parameters": count_parameters(model)}
    if kind == "palora":
        sizes["adapter_parameters"] = sum(p.numel() for n, p in model.named_parameters() if "palora_" in n)
    return evaluate(prefs=prefs) | stats | logged | sizes


def train_plain(
    args: argparse.Namespace,
    seed: int,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    task_names: Sequence[str] = MULTIMNIST_TASKS,
) -> dict[str, Any]:
    """One plain multi-task model trained on ``sum_t weights_t * L_t`` (LS; a one-hot ``weights`` is STL's model)."""
    model = build_plain(seed, task_names=task_names)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    def loss_fn(x, labels, progress, step):
        return (weights * task_losses(model(x), labels)).sum()

    stats = train(loss_fn, optimizer, train_data, args.epochs, args.batch_size, seed, args.max_steps, modules=[model])
    return evaluate_plain(model, *test_data) | stats | {"parameters": count_parameters(model)}


def equal_weights(task_names: Sequence[str] = MULTIMNIST_TASKS) -> torch.Tensor:
    return torch.full((len(task_names),), 1 / len(task_names))


def train_stl(
    args: argparse.Namespace,
    seed: int,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    task_names: Sequence[str] = MULTIMNIST_TASKS,
) -> dict[str, Any]:
    """One model per task; the reported point takes each task's metric from its own model."""
    num_tasks = len(task_names)
    per_task = [
        train_plain(args, seed, train_data, test_data, torch.eye(num_tasks)[t], task_names) for t in range(num_tasks)
    ]
    return {
        "preferences": None,
        "loss": [[per_task[t]["loss"][0][t] for t in range(num_tasks)]],
        "accuracy": [[per_task[t]["accuracy"][0][t] for t in range(num_tasks)]],
        "steps": sum(r["steps"] for r in per_task),
        "train_seconds": sum(r["train_seconds"] for r in per_task),
        "parameters": sum(r["parameters"] for r in per_task),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _accumulate(forward: Callable[[torch.Tensor], dict[str, torch.Tensor]], x, labels, chunk) -> tuple:
    loss_sum = torch.zeros(labels.shape[1], dtype=torch.float64)
    correct = torch.zeros(labels.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start : start + chunk], labels[start : start + chunk]
        outputs = forward(xb)
        _check_tasks(outputs, yb)
        for t, task in enumerate(outputs):
            loss_sum[t] += F.cross_entropy(outputs[task], yb[:, t], reduction="sum").double()
            correct[t] += (outputs[task].argmax(-1) == yb[:, t]).sum().double()
    return (loss_sum / x.shape[0]).tolist(), (correct / x.shape[0]).tolist()


@torch.no_grad()
def evaluate_palora(model: nn.Module, x, labels, prefs: torch.Tensor = EVAL_PREFERENCES, chunk: int = 1000) -> dict:
    """Per-preference mean losses and accuracies. Each chunk of images runs ONCE for all preferences: the chunk is
    repeated ``P`` times with one preference per copy (PaLoRA's per-sample preferences)."""
    model.eval()
    num_prefs = prefs.shape[0]
    loss_sum = torch.zeros(num_prefs, labels.shape[1], dtype=torch.float64)
    correct = torch.zeros_like(loss_sum)
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start : start + chunk], labels[start : start + chunk]
        batch = xb.shape[0]
        outputs = model(x=xb.repeat(num_prefs, 1, 1, 1), preference=prefs.repeat_interleave(batch, dim=0))
        _check_tasks(outputs, yb)
        for t, task in enumerate(outputs):
            logits = outputs[task].view(num_prefs, batch, -1)
            target = yb[:, t].expand(num_prefs, batch)
            loss_sum[:, t] += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1).double()
            correct[:, t] += (logits.argmax(-1) == target).sum(1).double()
    return {
        "preferences": prefs.tolist(),
        "loss": (loss_sum / x.shape[0]).tolist(),
        "accuracy": (correct / x.shape[0]).tolist(),
    }


def _functional_forward(network: nn.Module, parameters: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return torch.func.functional_call(network, parameters, (x,))


@torch.no_grad()
def evaluate_pamal(model: PaMaL, x, labels, prefs: torch.Tensor = EVAL_PREFERENCES, chunk: int = 2000) -> dict:
    model.eval()
    losses, accuracies = [], []
    for pref in prefs:
        forward = functools.partial(_functional_forward, model.network, model.mixed_parameters(pref))
        loss, acc = _accumulate(forward, x, labels, chunk)
        losses.append(loss)
        accuracies.append(acc)
    return {"preferences": prefs.tolist(), "loss": losses, "accuracy": accuracies}


@torch.no_grad()
def evaluate_plain(model: nn.Module, x, labels, chunk: int = 2000) -> dict:
    model.eval()
    loss, acc = _accumulate(model, x, labels, chunk)
    return {"preferences": None, "loss": [loss], "accuracy": [acc]}


def loss_hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float] = LOSS_REFERENCE) -> float:
    """Hypervolume of (loss_left, loss_right) points w.r.t. ``reference``, minimised.

    Points worse than the reference in some objective add no volume; they are dropped before calling
    ``peft_palora.pareto.hypervolume`` (which refuses them, to catch mistakes). This is what the paper's pymoo-based
    computation does with them, and it matters only for barely trained models (smoke tests).
    """
    array = np.asarray(points, dtype=np.float64).reshape(-1, len(reference))
    inside = (array <= np.asarray(reference)).all(axis=1)
    return hypervolume(array[inside], reference) if inside.any() else 0.0


def epoch_logger(
    evaluate: Callable[[], dict], curve: list[dict], reference: Sequence[float] = LOSS_REFERENCE
) -> Callable[[int, int], None]:
    """An ``on_epoch_end`` for :func:`train` that appends ``{"epoch", "step", "hypervolume"}`` to ``curve``.

    ``evaluate()`` returns a front (``{"loss": [[...], ...]}``, e.g. a partial of :func:`evaluate_palora`); its loss
    hypervolume w.r.t. ``reference`` is recorded. ``train`` runs it outside the timed region and puts the modules back
    in training mode afterwards.
    """

    def on_epoch_end(epoch: int, step: int) -> None:
        front = evaluate()
        curve.append({"epoch": epoch, "step": step, "hypervolume": loss_hypervolume(front["loss"], reference)})

    return on_epoch_end


def consistency(front: dict) -> dict[str, float]:
    """Spearman between lambda_t and task t's loss (oriented: 1 = more weight, lower loss) and accuracy."""
    prefs = np.asarray(front["preferences"])
    by_loss = preference_consistency(
        prefs, np.asarray(front["loss"]), higher_is_better=False, task_names=list(MULTIMNIST_TASKS)
    )
    by_acc = preference_consistency(
        prefs, np.asarray(front["accuracy"]), higher_is_better=True, task_names=list(MULTIMNIST_TASKS)
    )
    return {"loss_" + key: value for key, value in by_loss.items()} | {
        "acc_" + key: value for key, value in by_acc.items()
    }


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=True) + "\n")


def atomic_save_figure(figure, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def fmt(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def same_setting(stored: dict | None, config: dict, defaults: dict | None = None) -> bool:
    """Whether a seed file's ``stored`` config is ``config``; keys it lacks take ``defaults`` (settings added to the
    scripts after that file was written, at the value every earlier run had)."""
    return stored is not None and (dict(defaults or {}) | stored) == config


def load_seed_results(
    directory: str | os.PathLike, prefix: str, config: dict, defaults: dict | None = None
) -> list[dict]:
    """The per-seed result files ``<prefix>_seed<N>.json`` in ``directory`` whose config matches ``config``."""
    results = []
    for path in sorted(Path(directory).glob(f"{prefix}_seed*.json")):
        payload = json.loads(path.read_text())
        if same_setting(payload.get("config"), config, defaults):
            results.append(payload)
    return sorted(results, key=lambda payload: payload["seed"])


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of the paired differences ``a - b`` and its two-sided Student-t confidence interval.

    With ``n`` pairs: ``mean +- t_{(1 + confidence) / 2, n - 1} * sd / sqrt(n)``. The interval is ``None`` for a
    single pair (no spread to estimate).
    """
    from scipy import stats

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"`a` and `b` must be non-empty 1-D sequences of the same length, got {diff.shape}.")
    mean = float(diff.mean())
    interval = None
    if diff.size > 1:
        half = float(stats.t.ppf((1 + confidence) / 2, diff.size - 1) * diff.std(ddof=1) / np.sqrt(diff.size))
        interval = [mean - half, mean + half]
    return {"differences": diff.tolist(), "mean": mean, "confidence": confidence, "interval": interval}


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark scripts: arguments, runs stored per seed, aggregation
# ---------------------------------------------------------------------------------------------------------------------
def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    epochs: int,
    methods: Sequence[str],
    default_methods: Sequence[str],
    results_dir: str | os.PathLike,
) -> None:
    """The arguments of the per-method scripts: the training budget, the window, seeds, methods, output."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--window", type=int, default=4, help="Preferences per step (PaLoRA and PaMaL).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(default_methods), choices=methods)
    parser.add_argument("--num_train", type=int, default=None, help="Training images (default: all 50k).")
    parser.add_argument("--num_test", type=int, default=None, help="Test images (default: all 10k).")
    parser.add_argument("--max_steps", type=int, default=None, help="Stop every run after this many steps.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", default=str(results_dir))
    parser.add_argument("--aggregate_only", action="store_true", help="Only rebuild the tables from seed files.")


def run_and_store(
    path: str | os.PathLike,
    seed: int,
    config: dict,
    key: str,
    names: Sequence[str],
    run: Callable[[str], dict],
    report: Callable[[str, dict, float], str],
    defaults: dict | None = None,
) -> dict:
    """Run ``run(name)`` for each of ``names`` and write ``{"seed", "config", key: {name: result}}`` to ``path``
    after each, so what is done survives an interrupted later run. The results of an earlier invocation with the same
    setting (:func:`same_setting` with ``defaults``) are kept. ``report(name, result, seconds)`` is printed."""
    path = Path(path)
    payload = {"seed": seed, "config": config, key: {}}
    if path.exists():
        previous = json.loads(path.read_text())
        if same_setting(previous.get("config"), config, defaults):
            payload[key] = previous[key]
    for name in names:
        start = time.perf_counter()
        payload[key][name] = run(name)
        atomic_write_json(path, payload)
        print(report(name, payload[key][name], time.perf_counter() - start), flush=True)
    return payload


def run_methods(
    path: str | os.PathLike,
    seed: int,
    config: dict,
    methods: Sequence[str],
    run: Callable[[str], dict],
    reference: Sequence[float] = LOSS_REFERENCE,
    defaults: dict | None = None,
) -> dict:
    """:func:`run_and_store` of the methods' fronts under ``"methods"``, each with its loss ``hypervolume``."""

    def run_one(method: str) -> dict:
        result = run(method)
        return result | {"hypervolume": loss_hypervolume(result["loss"], reference)}

    def report(method: str, result: dict, seconds: float) -> str:
        return (
            f"[seed {seed}] {method}: hypervolume {result['hypervolume']:.4f}, "
            f"{result['steps']} steps in {seconds:.0f}s"
        )

    return run_and_store(path, seed, config, "methods", methods, run_one, report, defaults)


def load_train_eval(
    load: Callable[[str, int | None], tuple[torch.Tensor, torch.Tensor]],
    eval_split: str,
    num_train: int | None,
    num_test: int | None,
    label: str,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``load("train", num_train)`` and ``load(eval_split, num_test)``, with one line saying what was loaded."""
    start = time.perf_counter()
    train_data, eval_data = load("train", num_train), load(eval_split, num_test)
    print(
        f"data: {label}, {train_data[0].shape[0]} train / {eval_data[0].shape[0]} {eval_split} images "
        f"({time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    return train_data, eval_data


def run_benchmark(
    args: argparse.Namespace,
    load_data: Callable[[], tuple],
    run_seed: Callable[..., Any],
    aggregate: Callable[[argparse.Namespace], Any],
) -> Any:
    """A script's ``main``: unless ``args.aggregate_only``, ``run_seed(args, seed, *load_data())`` for each of
    ``args.seeds``; then ``aggregate(args)``. Threads and RNG states are the caller's again afterwards."""
    with restored_global_state():
        set_threads(args.threads)
        os.makedirs(args.output_dir, exist_ok=True)
        if not args.aggregate_only:
            data = load_data()
            for seed in args.seeds:
                run_seed(args, seed, *data)
        return aggregate(args)


def having(seed_results: list[dict], *methods: str) -> list[dict]:
    """The seed results that hold every one of ``methods``."""
    return [r for r in seed_results if all(m in r["methods"] for m in methods)]


def summarise(
    seed_results: list[dict], methods: Sequence[str], fields: dict[str, Callable[[list[dict]], Any]]
) -> dict:
    """Per method, over the seeds that ran it: ``seeds``, the hypervolumes with their mean and std, the mean loss and
    accuracy fronts, then ``fields`` (name: function of the method's runs)."""
    summary = {}
    for method in methods:
        runs_of = having(seed_results, method)
        if not runs_of:
            continue
        runs = [r["methods"][method] for r in runs_of]
        hv = [run["hypervolume"] for run in runs]
        summary[method] = {
            "seeds": [r["seed"] for r in runs_of],
            "hypervolume": hv,
            "hypervolume_mean_std": mean_std(hv),
            "loss_mean": np.mean([run["loss"] for run in runs], axis=0).tolist(),
            "accuracy_mean": np.mean([run["accuracy"] for run in runs], axis=0).tolist(),
        } | {name: field(runs) for name, field in fields.items()}
    return summary


def set_threads(threads: int) -> None:
    """One thread by default: on a shared 2-core machine two OpenMP threads fighting other processes are several
    times slower than one. Scripts call it inside :func:`restored_global_state`, which undoes it."""
    torch.set_num_threads(threads)


@contextlib.contextmanager
def restored_global_state() -> Iterator[None]:
    """Restore torch's thread count, default dtype and global RNG states, numpy's and Python's global RNGs on exit.

    The scripts' ``main()`` run under it, so calling one from Python (the smoke tests, a notebook) leaves the process
    as it was: the model builders seed torch's global generator and :func:`set_threads` changes the thread count.
    """
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch_rng, numpy_rng, python_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
