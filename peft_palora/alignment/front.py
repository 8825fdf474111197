"""The reward front of an aligned PaLoRA policy: generate at each preference of a grid, score, summarise.

:func:`evaluate_reward_front` generates completions for every (preference, prompt) pair in one ``generate`` call with a
per-sample ``(N * P, T)`` preference (greedy by default, so the front is deterministic), scores them with one reward
function per objective (TRL's reward-function signature), and returns the mean reward per objective at each preference
with the hypervolume and the preference-to-reward consistency.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from peft_palora.pareto import hypervolume, non_dominated, preference_consistency
from peft_palora.preferences import simplex_grid
from peft_palora.tuner.config import PaLoRAConfig
from peft_palora.tuner.preference import validate_preference

REFERENCE_MARGIN = 0.1


def _palora_config(model: Any) -> PaLoRAConfig:
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(configs, Mapping) else None
    if not isinstance(config, PaLoRAConfig):
        raise TypeError(f"`model` must be a PaLoRA PEFT model (get_peft_model(base, PaLoRAConfig(...))), got "
                        f"{type(model).__name__}.")
    return config


def _task_names(config: PaLoRAConfig) -> list[str]:
    return list(config.task_names) if config.task_names else [str(task) for task in range(config.num_tasks)]


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"`prompts` must be a list of strings, got {type(prompts).__name__}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty.")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"`prompts[{index}]` must be a string, got {type(prompt).__name__}.")
    return prompts


def _check_grid(preferences: Any, config: PaLoRAConfig) -> torch.Tensor:
    if isinstance(preferences, int) and not isinstance(preferences, bool):
        return simplex_grid(config.num_tasks, preferences)
    grid = validate_preference(preferences, config.num_tasks, config.task_names, name="preferences")
    if grid.dim() != 2:
        raise ValueError(f"`preferences` must be a grid of shape (N, {config.num_tasks}) (or points per side, an int); "
                         f"got shape {tuple(grid.shape)}.")
    return grid


def _check_reward_funcs(reward_funcs: Any, names: list[str], processing_classes: Any) -> dict[str, Any]:
    if not isinstance(reward_funcs, Mapping):
        raise TypeError(f"`reward_funcs` must be a mapping {{objective: reward function}}, got "
                        f"{type(reward_funcs).__name__}.")
    if set(reward_funcs) != set(names):
        raise ValueError(f"`reward_funcs` has the objectives {sorted(map(str, reward_funcs))}; the model's task names "
                         f"are {names}. Give exactly one reward function per task.")
    processing_classes = dict(processing_classes or {})
    for name in names:
        function = reward_funcs[name]
        if isinstance(function, nn.Module):
            if name not in processing_classes:
                raise ValueError(f"`reward_funcs[{name!r}]` is a reward model; give its tokenizer in "
                                 f"`reward_processing_classes[{name!r}]`.")
        elif not callable(function):
            raise TypeError(f"`reward_funcs[{name!r}]` must be callable(prompts, completions) -> list[float] or a "
                            f"reward model, got {type(function).__name__}.")
    return {name: reward_funcs[name] for name in names}


def _score(function: Any, name: str, prompts: list[str], completions: list[str], tokenizer: Any) -> np.ndarray:
    if isinstance(function, nn.Module):  # a sequence-classification reward model: logit 0 of prompt + completion
        device = next(function.parameters()).device
        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)
        with torch.no_grad():
            scores = function(**encoded).logits[:, 0].float().cpu().numpy()
    else:
        scores = function(prompts=prompts, completions=completions)
    scores = np.asarray([float("nan") if value is None else value for value in scores], dtype=float)
    if scores.shape != (len(prompts),):
        raise ValueError(f"`reward_funcs[{name!r}]` returned {scores.shape[0] if scores.ndim else 'a scalar'} rewards "
                         f"for {len(prompts)} completions; it must return one per completion.")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"`reward_funcs[{name!r}]` returned a non-finite or missing reward.")
    return scores


def _generate(model: Any, tokenizer: Any, prompts: list[str], grid: torch.Tensor, batch_size: int | None,
              generation_kwargs: dict[str, Any]) -> list[str]:
    """Completions for rows ``k * P + p`` = (preference ``k``, prompt ``p``), in one call per ``batch_size`` rows."""
    texts = [prompt for _ in range(grid.shape[0]) for prompt in prompts]
    rows = grid.repeat_interleave(len(prompts), dim=0)
    step = batch_size or len(texts)
    device = next(model.parameters()).device
    completions: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last position
    try:
        for start in range(0, len(texts), step):
            encoded = tokenizer(texts[start:start + step], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                output = model.generate(**encoded, preference=rows[start:start + step].to(device),
                                        **generation_kwargs)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return completions


def default_reference(mean_rewards: np.ndarray) -> np.ndarray:
    """The hypervolume reference when none is given: per objective, the worst mean reward over the grid minus 10% of
    the objective's range over the grid (minus 0.1 where the range is zero), so every grid point adds volume."""
    low, high = mean_rewards.min(axis=0), mean_rewards.max(axis=0)
    spread = high - low
    return low - REFERENCE_MARGIN * np.where(spread > 0, spread, 1.0)


def evaluate_reward_front(
    model: Any,
    prompts: Sequence[str],
    reward_funcs: Mapping[str, Callable[..., Sequence[float]] | nn.Module],
    preferences: Any,
    *,
    processing_class: Any,
    reference: Sequence[float] | None = None,
    batch_size: int | None = None,
    reward_processing_classes: Mapping[str, Any] | None = None,
    plot_path: str | os.PathLike | None = None,
    **generation_kwargs: Any,
):
    """Mean reward per objective at each preference of a grid, with the front's hypervolume and consistency.

    For each preference ``λ_k`` and prompt ``p`` the policy generates one completion at ``λ_k`` (all pairs in one
    ``generate`` call with a per-sample ``(N * P, T)`` preference, or ``batch_size`` rows per call). Every objective's
    reward function scores all completions; the front point of ``λ_k`` is the mean reward over the prompts.

    Args:
        model: a PaLoRA PEFT causal LM (``PeftModelForCausalLM``).
        prompts: the ``P`` prompts (plain text; apply a chat template beforehand if the model needs one).
        reward_funcs: ``{objective: f}`` with one entry per task name of the model. ``f(prompts=..., completions=...)``
            returns one float per completion (TRL's reward-function signature, prompts repeated once per
            preference), or ``f`` is a sequence-classification reward model scored on ``prompt + completion``
            (logit 0) with the tokenizer in ``reward_processing_classes``.
        preferences: the ``(N, T)`` grid (rows on the simplex; a dict per row is not accepted), or an int: points per
            side of :func:`~peft_palora.preferences.simplex_grid`.
        processing_class: the policy's tokenizer (prompts are left-padded while generating).
        reference: the hypervolume reference point, one reward per objective (every front point must be at least as
            good). Default :func:`default_reference`: the per-objective minimum over the grid minus 10% of the range,
            which depends on the front itself; give a fixed ``reference`` to compare models.
        batch_size: rows per ``generate`` call (default: all ``N * P`` in one).
        reward_processing_classes: ``{objective: tokenizer}`` for objectives scored by a reward model.
        plot_path: optional PNG path: the 2-objective front via
            :func:`~peft_palora.fronts.plotting.plot_front_2d` (needs ``T == 2``).
        **generation_kwargs: passed to ``generate``; default ``do_sample=False`` (greedy) and ``max_new_tokens=32``.

    Returns:
        ``(table, summary)``. ``table`` is a pandas DataFrame with one row per preference: ``pref_<task>`` then
        ``<task>_reward`` (the mean reward). ``summary`` holds ``hypervolume`` (of the mean rewards, maximised, from
        ``reference``), ``reference``, ``num_non_dominated``, the Spearman consistency of each objective's reward with
        its preference weight (``spearman_<task>``, ``mean_spearman``; see
        :func:`~peft_palora.pareto.preference_consistency`; ``nan`` for a grid of one point), ``plot`` (the PNG path
        or ``None``) and ``completions`` (the ``N * P`` decoded completions, row ``k * P + p``).

    Raises:
        TypeError / ValueError: naming the argument (a model that is not PaLoRA, objectives that are not the model's
            task names, an empty prompt list, a malformed grid, a reward function returning the wrong number of
            rewards, a reference that does not bound the front).
    """
    import pandas as pd

    config = _palora_config(model)
    names = _task_names(config)
    prompt_list = _check_prompts(prompts)
    grid = _check_grid(preferences, config)
    functions = _check_reward_funcs(reward_funcs, names, reward_processing_classes)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be an int >= 1 or None, got {batch_size!r}.")
    if processing_class is None:
        raise ValueError("`processing_class` (the policy's tokenizer) is required.")
    generation_kwargs.setdefault("do_sample", False)
    generation_kwargs.setdefault("max_new_tokens", 32)
    if getattr(processing_class, "pad_token_id", None) is not None:
        generation_kwargs.setdefault("pad_token_id", processing_class.pad_token_id)

    was_training = model.training
    model.eval()
    try:
        completions = _generate(model, processing_class, prompt_list, grid, batch_size, generation_kwargs)
    finally:
        model.train(was_training)
    repeated_prompts = prompt_list * grid.shape[0]
    num_points, num_prompts = grid.shape[0], len(prompt_list)
    mean_rewards = np.empty((num_points, len(names)))
    for task, name in enumerate(names):
        tokenizer = (reward_processing_classes or {}).get(name)
        scores = _score(functions[name], name, repeated_prompts, completions, tokenizer)
        mean_rewards[:, task] = scores.reshape(num_points, num_prompts).mean(axis=1)

    reference_point = default_reference(mean_rewards) if reference is None else np.asarray(reference, dtype=float)
    if reference_point.shape != (len(names),):
        raise ValueError(f"`reference` must hold one reward per objective ({len(names)}), got shape "
                         f"{reference_point.shape}.")
    grid_array = grid.double().numpy()
    table = pd.concat(
        [pd.DataFrame({f"pref_{name}": grid_array[:, task] for task, name in enumerate(names)}),
         pd.DataFrame({f"{name}_reward": mean_rewards[:, task] for task, name in enumerate(names)})],
        axis=1,
    )
    summary: dict[str, Any] = {
        "hypervolume": hypervolume(mean_rewards, reference_point, maximize=True),
        "reference": reference_point.tolist(),
        "num_non_dominated": int(np.asarray(non_dominated(mean_rewards, maximize=True)).sum()),
    }
    if num_points >= 2:
        summary.update(preference_consistency(grid_array, mean_rewards, higher_is_better=True, task_names=names))
    else:
        summary.update({f"spearman_{name}": math.nan for name in names} | {"mean_spearman": math.nan})
    summary["plot"] = None
    if plot_path is not None:
        if len(names) != 2:
            raise ValueError(f"`plot_path` draws a 2-objective front; this model has {len(names)} objectives.")
        from peft_palora.fronts.plotting import plot_front_2d

        summary["plot"] = plot_front_2d(mean_rewards, grid_array, path=plot_path,
                                        labels=[f"{name} reward" for name in names], maximize=True, task_names=names)
    summary["completions"] = completions
    return table, summary


def _flat(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def parse_reward_spec(spec: str) -> tuple[str, str, str]:
    """``"objective=module:function"`` (or ``"objective=path/to/file.py:function"``) -> ``(objective, module,
    function)``. Only the syntax is checked; :func:`load_reward_functions` imports the module."""
    if not isinstance(spec, str):
        raise TypeError(f"a `rewards` entry must be a string OBJECTIVE=MODULE:FUNCTION, got {type(spec).__name__}.")
    objective, equals, target = spec.partition("=")
    module, colon, function = target.rpartition(":")
    if not equals or not objective.strip() or not colon or not module.strip() or not function.strip():
        raise ValueError(f"`rewards` entry {spec!r} must read OBJECTIVE=MODULE:FUNCTION, e.g. "
                         "helpful=mypkg.rewards:helpful.")
    if not function.strip().isidentifier():
        raise ValueError(f"`rewards` entry {spec!r}: {function!r} is not a function name.")
    return objective.strip(), module.strip(), function.strip()


def _import_module(module: str, spec: str) -> Any:
    """Import the user's reward module: a dotted name (the current directory is searched first, as ``python -m``
    does) or a ``.py`` file. Any exception of the user's code (even ``SystemExit``) becomes a ``ValueError``."""
    from_file = module.endswith(".py") or os.sep in module or bool(os.altsep and os.altsep in module)
    if from_file:
        if not os.path.isfile(module):
            raise ValueError(f"`rewards` entry {spec!r}: {module!r} is not a file.")
        name = "palora_reward_" + os.path.splitext(os.path.basename(module))[0].replace("-", "_")
        loader_spec = importlib.util.spec_from_file_location(name, module)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"`rewards` entry {spec!r}: cannot import {module!r} as a Python file.")
    try:
        if from_file:
            loaded = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(loaded)
            return loaded
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module)
        finally:
            if added:
                sys.path.remove(os.getcwd())
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # the user's code: any exception is reported on one line
        raise ValueError(f"`rewards` entry {spec!r}: importing {module!r} failed ({type(error).__name__}: "
                         f"{_flat(error)})") from None


def _reported(function: Any, spec: str) -> Any:
    """``function``, whose exceptions (the user's code failing) become ``ValueError`` naming ``spec``."""

    def reward(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise ValueError(f"`rewards` entry {spec!r} raised {type(error).__name__}: {_flat(error)}") from error

    return reward


def load_reward_functions(rewards: Sequence[str], task_names: Sequence[str]) -> dict[str, Any]:
    """``{objective: function}`` from ``objective=module:function`` specs, one per task name, in task order.

    ``module`` is a dotted module name (the current directory is searched first, like ``python -m``) or a ``.py``
    file. **The modules are imported and run**: name only code you trust. Each function is wrapped so that an
    exception it raises while scoring becomes a ``ValueError`` naming its spec (the original is chained).

    Raises:
        ValueError / TypeError: naming ``rewards`` and the entry (a malformed spec, an objective that is not in
            ``task_names`` or given twice, a task without a reward, a module that fails to import, a missing or
            non-callable function).
    """
    if isinstance(rewards, str) or not isinstance(rewards, Sequence):
        raise TypeError(f"`rewards` must be a list of OBJECTIVE=MODULE:FUNCTION strings, got {type(rewards).__name__}.")
    task_names = [str(task) for task in task_names]
    functions: dict[str, Any] = {}
    for spec in rewards:
        objective, module, name = parse_reward_spec(spec)
        if objective in functions:
            raise ValueError(f"`rewards` gives the objective {objective!r} twice.")
        if objective not in task_names:
            raise ValueError(f"`rewards` entry {spec!r}: the model has no task {objective!r}; its tasks are "
                             f"{task_names}.")
        function = getattr(_import_module(module, spec), name, None)
        if function is None:
            raise ValueError(f"`rewards` entry {spec!r}: module {module!r} has no attribute {name!r}.")
        if not callable(function):
            raise TypeError(f"`rewards` entry {spec!r}: {module}:{name} is a {type(function).__name__}, not a "
                            "function.")
        functions[objective] = _reported(function, spec)
    missing = [task for task in task_names if task not in functions]
    if missing:
        raise ValueError(f"`rewards`: no reward function for the tasks {missing}; give one "
                         f"OBJECTIVE=MODULE:FUNCTION per task ({', '.join(task_names)}).")
    return {task: functions[task] for task in task_names}


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def reward_front_report(
    model: Any,
    prompts: Sequence[str],
    reward_funcs: Mapping[str, Callable[..., Sequence[float]] | nn.Module],
    preferences: Any,
    output_dir: str | os.PathLike,
    *,
    processing_class: Any,
    reference: Sequence[float] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = 32,
    **generation_kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate_reward_front` (greedy by default), written to ``output_dir``.

    Writes ``front.csv`` (the table), ``front.json`` (the summary with ``NaN`` as ``null``, ``num_prompts``,
    ``max_new_tokens`` and the table's rows under ``front``), ``completions.jsonl`` (one ``{"preference", "prompt",
    "completion"}`` per generated row), ``front.png`` (two objectives) and ``reward_vs_preference.png``.

    Returns:
        what ``front.json`` holds, plus the paths ``table``, ``json``, ``completions`` and ``plots`` (a list).

    Raises:
        TypeError / ValueError: those of :func:`evaluate_reward_front`, naming the argument.
    """
    from peft_palora.fronts.plotting import plot_metrics_vs_preference
    from peft_palora.utils.atomic import atomic_write_text

    names = _task_names(_palora_config(model))
    prompt_list = _check_prompts(prompts)
    out = os.fspath(output_dir)
    os.makedirs(out, exist_ok=True)
    plot_path = os.path.join(out, "front.png") if len(names) == 2 else None
    table, summary = evaluate_reward_front(
        model, prompt_list, reward_funcs, preferences, processing_class=processing_class, reference=reference,
        batch_size=batch_size, plot_path=plot_path, max_new_tokens=max_new_tokens, **generation_kwargs,
    )
    table_path = os.path.join(out, "front.csv")
    atomic_write_text(table_path, table.to_csv(index=False))
    completions = summary.pop("completions")
    rows = [
        {"preference": table.loc[index // len(prompt_list), [f"pref_{task}" for task in names]].tolist(),
         "prompt": prompt_list[index % len(prompt_list)], "completion": completion}
        for index, completion in enumerate(completions)
    ]
    completions_path = os.path.join(out, "completions.jsonl")
    atomic_write_text(completions_path, "".join(json.dumps(row) + "\n" for row in rows))
    report = {
        "task_names": list(names), "metric": "reward", "maximize": True,
        **{key: _json_number(value) for key, value in summary.items() if key != "plot"},
        "num_prompts": len(prompt_list), "max_new_tokens": max_new_tokens,
        "front": table.to_dict(orient="records"),
    }
    json_path = os.path.join(out, "front.json")
    atomic_write_text(json_path, json.dumps(report, indent=2))
    plots = [summary["plot"]] if summary.get("plot") else []
    metrics = {task: [f"{task}_reward"] for task in names}
    plots.append(plot_metrics_vs_preference(table, path=os.path.join(out, "reward_vs_preference.png"),
                                            metrics=metrics))
    return {**report, "table": table_path, "json": json_path, "completions": completions_path, "plots": plots}


__all__ = ["default_reference", "evaluate_reward_front", "load_reward_functions", "parse_reward_spec",
           "reward_front_report"]
