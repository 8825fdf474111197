"""PaLoRA-DPO against fixed-weight DPO, Rewarded Soups and "Soups start, PaLoRA finish", at equal training compute.

Setting (CPU, minutes): the tests' 2-layer Llama (``tests/tiny_lm.py``, hidden 32) over a 30-word vocabulary; no
pretrained LM ships offline and no pre-training is done here: the random model's ``lm_head`` is re-drawn with std 0.2
(seeded), without which the adapters (never on ``lm_head``) barely move its greedy output. Two synthetic objectives
with a known answer: "red" and "blue", the share of ``RED_WORDS`` / ``BLUE_WORDS`` among the words of a greedy
4-token completion (``tiny_lm.colour_share``). Every completion is at most 4 words, so ``red + blue <= 1``: the true
front is the line ``red + blue = 1``, a red-only completion at the "red" end.

Data: DPO pairs generated here. A completion is 4 words: ``k_red ~ U{0..4}`` red words, ``k_blue ~ U{0..4-k_red}``
blue words, the rest neutral, shuffled; for objective "red" the chosen completion has more red words than the
rejected one (ties redrawn), for "blue" more blue words; the two objectives get independent pairs. Prompts are 4
neutral words. Every prompt and completion tokenises to exactly 5 tokens (BOS + 4 words; 4 words + EOS), so every
pair is ``2 * (5 + 5) = 20`` policy tokens.

Methods, each trained in its own process (its peak resident memory is its ``ru_maxrss``):

* ``palora`` (P): one PaLoRA model (rank r per objective) trained with ``PaLoRADPOTrainer`` (window m of the annealed
  grid, B pairs of each objective per step: ``m * 2 * B`` policy pair-forwards per step).
* ``fixed`` (a): 5 LoRA models (rank r), each trained with TRL's own ``DPOTrainer`` on a mixture of the two
  objectives' pairs, a pair drawn from "red" with probability ``w_red``, for ``w_red`` in (0, .25, .5, .75, 1). Each gets
  1/5 of P's compute; ``fixed_equal`` (if run) gives each P's whole compute (5x in all).
* ``soups`` (b): one LoRA per objective (TRL ``DPOTrainer``, half of P's compute each), mixed after training with
  ``from_lora_adapters`` (Rewarded Soups as a PaLoRA model).
* ``soups_palora`` (c): the same LoRAs at a quarter of P's compute each (the checkpoint at half of (b)'s steps; the
  learning rate is constant, so it is exactly the shorter run), ``from_lora_adapters``, then PaLoRA-DPO for the
  remaining half.

Compute is counted in policy pair-forwards (forward + backward of a chosen and a rejected sequence through the
trained policy; 20 tokens each): every optimizer step of every method does the same number (``m * 2 * B``, TRL's
batch set to match), so total optimizer steps x tokens are equal: P steps S; (a) 5 x S/5; (b) 2 x S/2;
(c) 2 x S/4 + S/2. The reference forwards (adapters off, no backward) are counted apart: TRL does one per pair, PaLoRA
one per pair for all m window copies.

The front: greedy completions of the evaluation prompts at a fixed preference grid; hypervolume of the mean rewards
from ONE fixed reference point ``(0, 0)`` (the worst possible colour shares) for all methods, on the 5-point grid
(where (a) has its 5 models) and, for the methods that have a preference, on an 11-point grid too. Consistency is the
Spearman correlation of each objective's weight with its reward (``evaluate_reward_front``; for (a), the same
``preference_consistency`` over the 5 models).

Run: ``nice -n 10 python benchmarks/alignment/bench_alignment.py`` (see the README for the exact command and times).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_lm: the tests' tiny Llama and word tokenizer

TASKS = ("red", "blue")
FIXED_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # weight on "red"
REFERENCE = (0.0, 0.0)
WORDS_PER_TEXT = 4
TOKENS_PER_PAIR = 2 * ((WORDS_PER_TEXT + 1) + (WORDS_PER_TEXT + 1))


# ---- data -----------------------------------------------------------------------------------------------------------
def _completion(rng: random.Random) -> str:
    from tiny_lm import BLUE_WORDS, OTHER_WORDS, RED_WORDS

    num_red = rng.randint(0, WORDS_PER_TEXT)
    num_blue = rng.randint(0, WORDS_PER_TEXT - num_red)
    words = (rng.choices(RED_WORDS, k=num_red) + rng.choices(BLUE_WORDS, k=num_blue)
             + rng.choices(OTHER_WORDS, k=WORDS_PER_TEXT - num_red - num_blue))
    rng.shuffle(words)
    return " ".join(words)


def prompts(count: int, seed: int) -> list[str]:
    from tiny_lm import OTHER_WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choices(OTHER_WORDS, k=WORDS_PER_TEXT)) for _ in range(count)]


def preference_pairs(objective: str, count: int, seed: int) -> dict[str, list[str]]:
    """``count`` pairs for ``objective``: chosen has strictly more of the objective's words than rejected."""
    from tiny_lm import BLUE_WORDS, RED_WORDS

    words = RED_WORDS if objective == "red" else BLUE_WORDS
    rng = random.Random(f"{objective}-{seed}")
    prompt_list = prompts(count, seed=rng.randrange(2**31))
    chosen, rejected = [], []
    while len(chosen) < count:
        first, second = _completion(rng), _completion(rng)
        a, b = (sum(word in words for word in text.split()) for text in (first, second))
        if a == b:
            continue
        chosen.append(first if a > b else second)
        rejected.append(second if a > b else first)
    return {"prompt": prompt_list, "chosen": chosen, "rejected": rejected}


def objective_datasets(count: int, seed: int):
    from datasets import Dataset

    return {task: Dataset.from_dict(preference_pairs(task, count, seed)) for task in TASKS}


def mixture_dataset(weight_red: float, count: int, seed: int):
    """Row i is pair i of "red" with probability ``weight_red``, else pair i of "blue"."""
    from datasets import Dataset

    pools = {task: preference_pairs(task, count, seed) for task in TASKS}
    rng = random.Random(f"mix-{weight_red}-{seed}")
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for index in range(count):
        task = "red" if rng.random() < weight_red else "blue"
        for column in rows:
            rows[column].append(pools[task][column][index])
    return Dataset.from_dict(rows)


# ---- models and rewards ---------------------------------------------------------------------------------------------
def base_model(seed: int):
    import torch
    from tiny_lm import make_model

    model = make_model("llama", seed=seed)
    with torch.no_grad():  # a wider lm_head, so the adapters can move the random model's greedy output
        model.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    return model


def reward_funcs():
    from tiny_lm import BLUE_WORDS, RED_WORDS, colour_share

    return {
        "red": lambda completions, **kwargs: [colour_share(text, RED_WORDS) for text in completions],
        "blue": lambda completions, **kwargs: [colour_share(text, BLUE_WORDS) for text in completions],
    }


def greedy_mean_rewards(model, tokenizer, prompt_list, max_new_tokens, preference=None) -> list[float]:
    """Mean reward of each objective over greedy completions of ``prompt_list`` (for plain LoRA models)."""
    import torch

    tokenizer.padding_side = "left"
    encoded = tokenizer(prompt_list, return_tensors="pt", padding=True)
    extra = {} if preference is None else {"preference": preference}
    model.eval()
    with torch.no_grad():
        output = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, **extra)
    texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return [sum(func(completions=texts)) / len(texts) for func in reward_funcs().values()]


def dpo_args(out: str, steps: int, batch: int, settings: dict, seed: int):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=settings["lr"],
        lr_scheduler_type="constant", warmup_steps=0, beta=settings["beta"], seed=seed, report_to=[], use_cpu=True,
        bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=max(steps, 1),
        dataloader_num_workers=0, disable_tqdm=True,
    )


def lora_config(settings: dict):
    from peft import LoraConfig

    return LoraConfig(r=settings["r"], lora_alpha=2 * settings["r"], target_modules=settings["targets"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")


def palora_config(settings: dict):
    from peft_palora import PaLoRAConfig

    return PaLoRAConfig(task_names=list(TASKS), r=settings["r"], palora_alpha=2 * settings["r"],
                        target_modules=settings["targets"], task_type="CAUSAL_LM")


def safetensors_bytes(folder: str) -> int:
    return os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))


def palora_front(model, tokenizer, settings: dict, out: str, seed: int) -> dict:
    from peft_palora.alignment import evaluate_reward_front

    eval_prompts = prompts(settings["eval_prompts"], seed=10_000 + seed)
    result = {}
    for points in (5, 11):
        table, summary = evaluate_reward_front(
            model, eval_prompts, reward_funcs(), points, processing_class=tokenizer, reference=list(REFERENCE),
            max_new_tokens=WORDS_PER_TEXT,
        )
        result[f"grid{points}"] = {
            "preferences_red": table["pref_red"].tolist(),
            "rewards": table[["red_reward", "blue_reward"]].values.tolist(),
            "hypervolume": summary["hypervolume"], "mean_spearman": summary["mean_spearman"],
            "spearman_red": summary["spearman_red"], "spearman_blue": summary["spearman_blue"],
        }
    return result


def train_palora_dpo(model, tokenizer, steps: int, settings: dict, out: str, seed: int) -> None:
    from peft_palora.alignment import PaLoRADPOTrainer

    trainer = PaLoRADPOTrainer(model, args=dpo_args(out, steps, settings["batch"], settings, seed),
                               train_dataset=objective_datasets(settings["pairs"], seed), processing_class=tokenizer,
                               window_size=settings["window"])
    trainer.train()


def train_lora_dpo(dataset, steps: int, settings: dict, out: str, seed: int, half_dir: str | None = None):
    from peft import get_peft_model
    from tiny_lm import make_tokenizer
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class SaveAt(TrainerCallback):  # the checkpoint of (c): the adapter after half of the steps
        def on_step_end(self, args, state, control, **kwargs):
            if half_dir is not None and state.global_step == steps // 2:
                kwargs["model"].save_pretrained(half_dir)

    model = get_peft_model(base_model(seed), lora_config(settings))
    batch = settings["pairs_per_step"]  # TRL: one pair per row; the batch matches PaLoRA's pair-forwards per step
    trainer = DPOTrainer(model, args=dpo_args(out, steps, batch, settings, seed), train_dataset=dataset,
                         processing_class=make_tokenizer(), callbacks=[SaveAt()])
    trainer.train()
    model.save_pretrained(out)
    return model


# ---- one job per process --------------------------------------------------------------------------------------------
def run_job(job: str, seed: int, settings: dict, workdir: str) -> dict:
    import torch
    from peft import get_peft_model
    from tiny_lm import make_tokenizer

    from peft_palora.interop.lora import from_lora_adapters

    torch.set_num_threads(1)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steps, per_step = settings["steps"], settings["pairs_per_step"]
    tokenizer = make_tokenizer()
    out = os.path.join(workdir, f"seed{seed}", job)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    record: dict = {"job": job, "seed": seed}
    if job == "palora":
        torch.manual_seed(seed)
        model = get_peft_model(base_model(seed), palora_config(settings))
        train_palora_dpo(model, tokenizer, steps, settings, out, seed)
        model.save_pretrained(out)
        record.update(optimizer_steps=steps, adapter_bytes=safetensors_bytes(out),
                      reference_pair_forwards=steps * settings["batch"] * len(TASKS))
        record["front"] = palora_front(model, tokenizer, settings, out, seed)
    elif job.startswith("fixed"):  # fixed_<equal|share>_<index>
        _, budget, index = job.split("_")
        weight = FIXED_WEIGHTS[int(index)]
        run_steps = steps if budget == "equal" else steps // len(FIXED_WEIGHTS)
        torch.manual_seed(seed)
        model = train_lora_dpo(mixture_dataset(weight, settings["pairs"] * 2, seed), run_steps, settings, out, seed)
        eval_prompts = prompts(settings["eval_prompts"], seed=10_000 + seed)
        record.update(weight_red=weight, optimizer_steps=run_steps, adapter_bytes=safetensors_bytes(out),
                      reference_pair_forwards=run_steps * per_step,
                      rewards=greedy_mean_rewards(model, tokenizer, eval_prompts, WORDS_PER_TEXT))
    elif job.startswith("lora_"):  # lora_red / lora_blue: (b)'s LoRA at S/2 steps, (c)'s at S/4 (saved on the way)
        task = job.split("_", 1)[1]
        torch.manual_seed(seed)
        train_lora_dpo(objective_datasets(settings["pairs"], seed)[task], steps // 2, settings, out, seed,
                       half_dir=os.path.join(out, "half"))
        record.update(optimizer_steps=steps // 2, adapter_bytes=safetensors_bytes(out),
                      reference_pair_forwards=(steps // 2) * per_step)
    elif job == "soups":
        folders = {task: os.path.join(workdir, f"seed{seed}", f"lora_{task}") for task in TASKS}
        model = from_lora_adapters(base_model(seed), folders, task_type="CAUSAL_LM")
        model.save_pretrained(out)
        record.update(optimizer_steps=0, adapter_bytes=safetensors_bytes(out), reference_pair_forwards=0,
                      lora_adapter_bytes=sum(safetensors_bytes(folder) for folder in folders.values()))
        record["front"] = palora_front(model, tokenizer, settings, out, seed)
    elif job == "soups_palora":
        folders = {task: os.path.join(workdir, f"seed{seed}", f"lora_{task}", "half") for task in TASKS}
        torch.manual_seed(seed)
        model = from_lora_adapters(base_model(seed), folders, task_type="CAUSAL_LM",
                                   palora_alpha=2 * settings["r"])
        train_palora_dpo(model, tokenizer, steps // 2, settings, out, seed)
        model.save_pretrained(out)
        record.update(optimizer_steps=steps // 2, adapter_bytes=safetensors_bytes(out),
                      reference_pair_forwards=(steps // 2) * settings["batch"] * len(TASKS))
        record["front"] = palora_front(model, tokenizer, settings, out, seed)
    else:
        raise ValueError(f"`--job` must name a job of the benchmark, got {job!r}.")
    record["pairs_per_step"] = per_step
    record["policy_pair_forwards"] = record["optimizer_steps"] * per_step
    record["policy_tokens"] = record["policy_pair_forwards"] * TOKENS_PER_PAIR
    record["seconds"] = time.perf_counter() - start
    record["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["rss_after_imports_mib"] = rss_start / 1024
    return record


# ---- driver ---------------------------------------------------------------------------------------------------------
def method_summary(name: str, records: list[dict]) -> dict:
    """Per seed: the method's front, hypervolume and consistency, compute, peak memory and adapter bytes."""
    import numpy as np

    from peft_palora.pareto import hypervolume, preference_consistency

    def front_of(record, grid):
        front = record["front"][grid]
        return {"preferences_red": front["preferences_red"], "rewards": front["rewards"],
                "hypervolume": front["hypervolume"], "mean_spearman": front["mean_spearman"]}

    seeds = sorted({record["seed"] for record in records})
    per_seed = []
    for seed in seeds:
        mine = [record for record in records if record["seed"] == seed]
        by_job = {record["job"]: record for record in mine}
        if name == "palora":
            parts, fronts = [by_job["palora"]], {g: front_of(by_job["palora"], g) for g in ("grid5", "grid11")}
        elif name in ("soups", "soups_palora"):
            parts = [by_job["lora_red"], by_job["lora_blue"], by_job[name]]
            fronts = {g: front_of(by_job[name], g) for g in ("grid5", "grid11")}
        else:  # fixed_share / fixed_equal
            parts = sorted((r for r in mine if r["job"].startswith(name + "_")), key=lambda r: r["weight_red"])
            grid = np.array([[r["weight_red"], 1 - r["weight_red"]] for r in parts])
            rewards = np.array([r["rewards"] for r in parts])
            fronts = {"grid5": {"preferences_red": grid[:, 0].tolist(), "rewards": rewards.tolist(),
                                "hypervolume": hypervolume(rewards, np.array(REFERENCE), maximize=True),
                                "mean_spearman": preference_consistency(grid, rewards, higher_is_better=True,
                                                                        task_names=list(TASKS))["mean_spearman"]}}
        if name == "soups":
            optimizer_steps = by_job["lora_red"]["optimizer_steps"] + by_job["lora_blue"]["optimizer_steps"]
            adapter_bytes = by_job["lora_red"]["adapter_bytes"] + by_job["lora_blue"]["adapter_bytes"]
        elif name == "soups_palora":
            optimizer_steps = (by_job["lora_red"]["optimizer_steps"] + by_job["lora_blue"]["optimizer_steps"]) // 2 \
                + by_job[name]["optimizer_steps"]
            adapter_bytes = by_job[name]["adapter_bytes"]
        else:
            optimizer_steps = sum(r["optimizer_steps"] for r in parts)
            adapter_bytes = sum(r["adapter_bytes"] for r in parts)
        per_step = parts[0]["pairs_per_step"]
        per_seed.append({
            "seed": seed, "fronts": fronts, "optimizer_steps": optimizer_steps,
            "policy_pair_forwards": optimizer_steps * per_step, "policy_tokens": optimizer_steps * per_step
            * TOKENS_PER_PAIR, "adapter_bytes": adapter_bytes,
            "max_rss_mib": max(r["max_rss_mib"] for r in parts),
            "seconds": sum(r["seconds"] for r in parts),
        })
    result = {"per_seed": per_seed}
    for grid in ("grid5", "grid11"):
        if all(grid in entry["fronts"] for entry in per_seed):
            hv = [entry["fronts"][grid]["hypervolume"] for entry in per_seed]
            rho = [entry["fronts"][grid]["mean_spearman"] for entry in per_seed]
            result[grid] = {"hypervolume_mean": float(np.mean(hv)), "hypervolume_std": float(np.std(hv)),
                            "mean_spearman_mean": float(np.nanmean(rho)) if not np.all(np.isnan(rho)) else None}
    for key in ("optimizer_steps", "policy_tokens", "adapter_bytes"):
        result[key] = per_seed[0][key]
    result["max_rss_mib"] = max(entry["max_rss_mib"] for entry in per_seed)
    result["seconds_per_seed"] = float(np.mean([entry["seconds"] for entry in per_seed]))
    return result


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"palora": ("C0", "o", "P: PaLoRA-DPO"), "fixed_share": ("C1", "s", "(a) fixed w, 1/5 compute each"),
              "fixed_equal": ("C4", "D", "(a') fixed w, full compute each"),
              "soups": ("C2", "^", "(b) Rewarded Soups"), "soups_palora": ("C3", "v", "(c) Soups + PaLoRA")}
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [1, 0], color="0.7", linestyle="--", label="true front (red + blue = 1)")
    for name, method in summary["methods"].items():
        color, marker, label = styles[name]
        for index, entry in enumerate(method["per_seed"]):
            front = entry["fronts"].get("grid11", entry["fronts"]["grid5"])
            xs, ys = zip(*front["rewards"], strict=True)
            axis.plot(xs, ys, color=color, marker=marker, alpha=1.0 if index == 0 else 0.45,
                      linestyle="-" if index == 0 else ":", label=label if index == 0 else None)
    axis.set_xlabel("red share (reward 'red')")
    axis.set_ylabel("blue share (reward 'blue')")
    axis.set_xlim(-0.03, 1.03)
    axis.set_ylim(-0.03, 1.03)
    axis.set_title("Reward fronts, equal compute (solid: seed 0, dotted: others)", fontsize=9)
    axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(summary: dict) -> str:
    lines = ["| method | HV 5-pt | HV 11-pt | Spearman 5-pt | Spearman 11-pt | steps | steps x tokens | "
             "peak RSS MiB | adapter bytes | s/seed |", "|" + " --- |" * 10]
    def cell(method, grid, key):
        if grid not in method:
            return "-"
        if key == "hv":
            return f"{method[grid]['hypervolume_mean']:.3f} ± {method[grid]['hypervolume_std']:.3f}"
        value = method[grid]["mean_spearman_mean"]
        return "nan" if value is None else f"{value:.3f}"

    for name, method in summary["methods"].items():
        lines.append(f"| {name} | {cell(method, 'grid5', 'hv')} | {cell(method, 'grid11', 'hv')} | "
                     f"{cell(method, 'grid5', 'rho')} | {cell(method, 'grid11', 'rho')} | {method['optimizer_steps']} | {method['policy_tokens']} | "
                     f"{method['max_rss_mib']:.0f} | {method['adapter_bytes']} | {method['seconds_per_seed']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="P's optimizer steps S (a multiple of 20).")
    parser.add_argument("--batch", type=int, default=2, help="PaLoRA rows per step (B pairs of each objective).")
    parser.add_argument("--window", type=int, default=4, help="PaLoRA preferences per step (m).")
    parser.add_argument("--r", type=int, default=4, help="Rank of every LoRA and of each PaLoRA task adapter.")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--pairs", type=int, default=256, help="Preference pairs per objective.")
    parser.add_argument("--eval_prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fixed_equal", action="store_true", help="Also run (a) with P's whole compute per model.")
    parser.add_argument("--output", default=str(HERE / "results" / "bench_alignment.json"))
    parser.add_argument("--plot", default=None, help="Front plot (default: front.png next to --output).")
    parser.add_argument("--workdir", default=None, help="Adapters and per-job records (default: a temp folder).")
    parser.add_argument("--reuse", action="store_true",
                        help="Reuse job records already in --workdir (summarise a finished or interrupted run).")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job in this process
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 20 or args.steps % 20:
        raise ValueError(f"`--steps` must be a positive multiple of 20 (split 5 ways and in quarters), got {args.steps}.")
    for name in ("batch", "window", "r", "pairs", "eval_prompts"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    settings = {"steps": args.steps, "batch": args.batch, "window": args.window, "r": args.r, "lr": args.lr,
                "beta": args.beta, "pairs": args.pairs, "eval_prompts": args.eval_prompts,
                "pairs_per_step": args.window * len(TASKS) * args.batch,
                "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}

    if args.job is not None:
        record = run_job(args.job, args.seed, settings, args.workdir)
        path = Path(args.workdir) / f"seed{args.seed}" / f"{args.job}.json"
        path.write_text(json.dumps(record, indent=2))
        return None

    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_alignment_")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")])}
    jobs = ["palora", *[f"fixed_share_{i}" for i in range(len(FIXED_WEIGHTS))], "lora_red", "lora_blue", "soups",
            "soups_palora"]
    if args.fixed_equal:
        jobs += [f"fixed_equal_{i}" for i in range(len(FIXED_WEIGHTS))]
    passthrough = [f"--{key}={getattr(args, key)}" for key in ("steps", "batch", "window", "r", "lr", "beta", "pairs",
                                                                "eval_prompts")]
    start = time.perf_counter()
    records = []
    for seed in args.seeds:
        os.makedirs(os.path.join(workdir, f"seed{seed}"), exist_ok=True)
        for job in jobs:  # one process per job: its own peak RSS, one thread
            done = Path(workdir) / f"seed{seed}" / f"{job}.json"
            if args.reuse and done.exists():
                records.append(json.loads(done.read_text()))
                continue
            command = [sys.executable, str(Path(__file__).resolve()), "--job", job, "--seed", str(seed),
                       "--workdir", workdir, *passthrough]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"job {job} (seed {seed}) failed:\n{result.stderr[-4000:]}")
            record = json.loads((Path(workdir) / f"seed{seed}" / f"{job}.json").read_text())
            records.append(record)
            print(f"seed {seed} {job}: {record['seconds']:.1f} s, max RSS {record['max_rss_mib']:.0f} MiB",
                  flush=True)

    methods = ["palora", "fixed_share", "soups", "soups_palora"] + (["fixed_equal"] if args.fixed_equal else [])
    summary = {
        "setting": {**{k: v for k, v in settings.items()}, "seeds": args.seeds, "fixed_weights_red": FIXED_WEIGHTS,
                    "reference": REFERENCE, "tokens_per_pair": TOKENS_PER_PAIR, "max_new_tokens": WORDS_PER_TEXT,
                    "model": "tests/tiny_lm.py make_model('llama', seed) (2 layers, hidden 32), lm_head re-drawn "
                             "N(0, 0.2) seeded; no pre-training",
                    "compute": "policy pair-forwards (chosen + rejected, forward + backward) x 20 tokens; "
                               "pairs_per_step for every method",
                    "memory": "ru_maxrss of the job's own process (includes the Python/torch/TRL imports); for a "
                              "method of several processes, the largest",
                    "wall_seconds": None},
        "methods": {},
        "records": records,
    }
    for name in methods:
        mine = [r for r in records if r["job"] == name or r["job"].startswith(name + "_")
                or (name in ("soups", "soups_palora") and r["job"].startswith("lora_"))]
        summary["methods"][name] = method_summary(name, mine)
    summary["setting"]["wall_seconds"] = time.perf_counter() - start
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    plot(summary, Path(args.plot) if args.plot else output.parent / "front.png")
    print(table(summary))
    print(f"wall time {summary['setting']['wall_seconds']:.0f} s; wrote {output}")
    return summary


if __name__ == "__main__":
    main()
