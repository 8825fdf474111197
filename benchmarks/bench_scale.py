"""PaLoRA at LLM scale on CPU: step time and peak memory of a ~0.5B Qwen2-style model, side by side in one run.

The model is Qwen2-0.5B's shape built from its config (hidden 896, 24 layers, 14 heads with 2 key/value heads, MLP
4864, vocabulary 151936, tied embeddings: 494M parameters) with random weights, so nothing is downloaded. Adapters
go on the attention and MLP projections (q, k, v, o, gate, up, down). Candidates, all on the same batch of
`batch_size x seq_len` tokens with the causal-LM loss, one training step = zero_grad + forward + backward + AdamW:

* `palora`: PaLoRA, T=3 tasks of rank r=8, frozen base (the PEFT convention), one preference for the batch;
* `lora_r24`: PEFT LoRA of rank T*r = 24 on the same modules (same number of trainable parameters);
* `full_ft`: the plain model, every weight trained (full fine-tuning);
* `palora_base`: PaLoRA with every base weight training too (`train_base_weights=True`, the paper's mode), i.e.
  full fine-tuning plus the adapters: the model a multi-task front costs when the base trains;
* `pamal`: PaMaL (Pareto Manifold Learning), T full copies of the model whose convex combination
  `sum_t lambda_t W_t` runs the forward (`torch.func.functional_call`), all copies trained;
* `merge_export`: `export_lora(model, dir, preference=...)` (a plain PEFT LoRA bundle at that preference) and
  `merge_and_unload()` on a PaLoRA model with random adapters, each timed and its extra memory measured, plus the
  largest logit difference between the merged and the unmerged model.

How time is measured: every candidate lives in its own worker process, built once (on Linux forked from the parent
after the imports, so no worker re-imports torch; elsewhere this script started again with `--worker`).
The parent asks the workers of a group for one step in turn (warm-up rounds first), so drifts in machine load hit
every candidate of a group alike, and reports the median. The step is timed inside the worker, the pipe excluded.
The frozen-base candidates (`palora`, `lora_r24`, the step-time target) take `--steps` timed steps; the ones that
train every weight take `--heavy_steps` (their steps cost several times more, and their memory peak comes in the
first step, when AdamW allocates its moments).
Torch keeps the machine's default thread count unless `--threads` is given.

How memory is measured: resident set size (RSS), per process, so each candidate's figure is its own. On Linux the
kernel's high-water mark (`VmHWM` in /proc/self/status) is reset (`echo 5 > /proc/self/clear_refs`) after the model
is built and read after the last step: "peak" is the highest RSS during training, which includes the resident
weights, gradients, optimizer states, activations, the interpreter and torch itself (the `floor`, the RSS of a
worker that imported everything and built nothing, is reported too). Without clear_refs the script falls back to
`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the high-water mark over the whole process life, and says so. For
`merge_and_unload` and `export_lora` the mark is reset right before the call; their figure is the peak during the
call minus the RSS just before it. RSS counts what the allocator holds, which can exceed the live tensors by the
allocator's free lists, for every candidate alike.

Measured and computed: a candidate runs only when its predicted peak fits the memory budget (`--memory_budget_gib`,
by default 80% of the memory available at start); workers run together in groups that fit the budget. A candidate
that does not fit (at 0.5B scale, PaMaL with T=3: three models with their AdamW states, about 26 GiB) is *computed*
from measured figures and exact byte counts: its peak is the measured full fine-tuning peak plus what T copies add,
4 bytes x P x (T-1 weights + T-1 gradients + 2(T-1) AdamW moments + 1 combined weight set). The computed value is
printed next to the measured one wherever both exist (always in `--tiny`), which checks the formula.

Memory overhead against PaMaL: for both methods, the peak when training the front minus the peak of full fine-tuning
of one model (the same all-weights-trained setting, as in the paper): `palora_base - full_ft` against
`pamal - full_ft`. Target: at least 20x smaller at T=3. PaLoRA's overhead (about 16 bytes per adapter parameter,
201 MiB at 0.5B) is within the run-to-run RSS noise of two 9 GiB processes, so the target ratio divides by the larger
of its measured and computed values (which can only make the ratio smaller); both are in the JSON. Parameter
overhead: PaMaL adds (T-1) x P parameters, PaLoRA T x r x (in + out) per adapted layer. Step-time target:
`palora` <= 1.05 x `lora_r24` (ratio of the medians; the median of the ratios of back-to-back steps is printed too,
it is less sensitive to load that changes between rounds).

Run (17 minutes on 2 cores shared with a load average of about 9, a few minutes on a quiet machine; about 16 GiB
of resident memory at peak, for the first group of workers):

    HF_HUB_OFFLINE=1 python benchmarks/bench_scale.py --memory_budget_gib 16 \
        --output benchmarks/results/bench_scale.json

`--tiny` runs a tiny config with one step per candidate (a smoke test, seconds); `--layers N` scales the model down;
`--candidates palora,lora_r24` runs a subset (e.g. the step-time pair alone, with more `--steps`); `--from_json PATH`
measures nothing and recomputes the ratios, the table and the JSON from a saved run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFERENCE = [0.2, 0.3, 0.5]
TRAINING_CANDIDATES = ["palora", "lora_r24", "full_ft", "palora_base", "pamal"]
LIGHT_CANDIDATES = ("palora", "lora_r24")  # frozen base: the step-time target; the others get --heavy_steps
GIB = 1024**3
FP32 = 4
TARGET_STEP_RATIO = 1.05
TARGET_OVERHEAD_RATIO = 20.0


# ---- memory probes (Linux /proc, with a getrusage fallback) ---------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    value = _status_bytes("VmRSS")
    if value is not None:
        return value
    import psutil  # non-Linux fallback

    return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def peak_rss(resettable: bool) -> int:
    if resettable:
        value = _status_bytes("VmHWM")
        if value is not None:
            return value
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


# ---- model and candidates -------------------------------------------------------------------------------------------


def model_config(args):
    from transformers import Qwen2Config

    if args.tiny:
        sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
    else:  # Qwen2-0.5B's shape
        sizes = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936)
    if args.layers is not None:
        sizes["num_hidden_layers"] = args.layers
    return Qwen2Config(**sizes, tie_word_embeddings=True, max_position_embeddings=max(512, args.seq_len),
                       attention_dropout=0.0)


def parameter_counts(args) -> dict[str, int]:
    """Exact counts from a model built on the meta device (no memory): P, and the adapter parameters T*r*(in+out)."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(model_config(args))
    base = sum(p.numel() for p in model.parameters())
    adapters = sum(
        args.num_tasks * args.r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    )
    return {"base": base, "adapters": adapters}


def predicted_peak(name: str, counts: dict[str, int], args) -> float:
    """Rough bytes for packing the groups: fp32 weights + gradients + two AdamW moments, activations on top."""
    p, a, t = counts["base"], counts["adapters"], args.num_tasks
    cfg = model_config(args)
    logits = 3 * FP32 * args.batch_size * args.seq_len * cfg.vocab_size  # logits, their grad, the loss' log-softmax
    floor = 0.5 * GIB
    states = {
        "palora": FP32 * (p + 4 * a),
        "lora_r24": FP32 * (p + 4 * a),
        "full_ft": FP32 * 4 * p,
        "palora_base": FP32 * 4 * (p + a),
        "pamal": FP32 * (4 * t * p + p),
        "merge_export": FP32 * (p + a) * 1.2,
    }[name]
    return floor + 1.1 * states + logits


def preference_for(num_tasks: int) -> list[float]:
    """The preference every candidate trains at: PREFERENCE for T=3, uniform otherwise."""
    return list(PREFERENCE) if num_tasks == len(PREFERENCE) else [1.0 / num_tasks] * num_tasks


def build_base(args):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(model_config(args))


def build_candidate(name: str, args):
    """(model or None, forward(input_ids) -> loss, trainable parameters) for one training candidate."""
    from peft import LoraConfig, get_peft_model

    import peft_palora

    base = build_base(args)
    if name in ("palora", "palora_base"):
        model = get_peft_model(base, peft_palora.PaLoRAConfig(
            num_tasks=args.num_tasks, r=args.r, palora_alpha=float(args.r), target_modules=TARGETS,
            train_base_weights=name == "palora_base"))
        model.set_preference(preference_for(args.num_tasks))
        if name == "palora_base":  # every weight trains, as in full fine-tuning (embeddings and norms too)
            for parameter in model.parameters():
                parameter.requires_grad_(True)
    elif name == "lora_r24":
        rank = args.num_tasks * args.r
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS))
    elif name == "full_ft":
        model = base
    elif name == "pamal":
        return build_pamal(base, args)
    else:
        raise ValueError(f"unknown candidate {name!r}")
    model.train()

    def forward(input_ids):
        return model(input_ids=input_ids, labels=input_ids).loss

    return model, forward, [p for p in model.parameters() if p.requires_grad]


def build_pamal(base, args):
    """PaMaL: T full copies W_t (copy 0 is the module's own weights); the forward runs sum_t lambda_t W_t."""
    from torch.func import functional_call

    base.train()
    weights = [dict(base.named_parameters())]  # tied lm_head/embedding appears once
    for _ in range(1, args.num_tasks):
        weights.append({n: p.detach().clone().requires_grad_(True) for n, p in weights[0].items()})
    lam = preference_for(args.num_tasks)

    def forward(input_ids):
        combined = {n: sum(lam[t] * weights[t][n] for t in range(args.num_tasks)) for n in weights[0]}
        return functional_call(base, combined, args=(), kwargs={"input_ids": input_ids, "labels": input_ids}).loss

    return base, forward, [p for copy in weights for p in copy.values()]


# ---- worker process -------------------------------------------------------------------------------------------------


class Channel:
    """JSON lines between the parent and a worker: commands in, replies out (nothing is pickled)."""

    def __init__(self, commands, replies):
        self.commands, self.replies = commands, replies

    def send(self, **message):
        self.replies.write(json.dumps(message) + "\n")
        self.replies.flush()

    def commands_received(self):
        for line in self.commands:
            yield line.strip()


def worker(name: str, args, channel: Channel) -> None:
    import torch

    import peft_palora  # noqa: F401  (registers PALORA before any model is built)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    floor = current_rss()
    resettable = reset_peak()
    generator = torch.Generator().manual_seed(1)
    cfg = model_config(args)
    input_ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=generator)

    if name == "merge_export":
        merge_export_worker(channel, args, input_ids, floor, resettable)
        return

    model, forward, trainable = build_candidate(name, args)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    built = current_rss()
    build_peak = peak_rss(resettable)
    if resettable:
        reset_peak()
    channel.send(event="ready", floor=floor, built=built, build_peak=build_peak, threads=torch.get_num_threads(),
                 trainable=sum(p.numel() for p in trainable), resettable=resettable)
    for command in channel.commands_received():
        if command == "step":
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = forward(input_ids)
            loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - start
            channel.send(event="step", seconds=seconds, loss=loss.item())
        elif command == "finish":
            channel.send(event="done", train_peak=peak_rss(resettable),
                         process_peak=peak_rss(False), rss_end=current_rss())
            return


def merge_export_worker(channel, args, input_ids, floor, resettable) -> None:
    import torch
    from peft import get_peft_model

    import peft_palora

    base = build_base(args)
    model = get_peft_model(base, peft_palora.PaLoRAConfig(
        num_tasks=args.num_tasks, r=args.r, palora_alpha=float(args.r), target_modules=TARGETS, init_weights=False))
    preference = preference_for(args.num_tasks)
    model.set_preference(preference)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
    result = {"event": "ready", "floor": floor, "built": current_rss(), "resettable": resettable}

    try:
        from peft_palora.tuner.conversion import export_lora
    except ImportError as error:
        result["export"] = {"skipped": f"peft_palora.interop.lora.export_lora is not importable: {error}"}
    else:
        with tempfile.TemporaryDirectory() as directory:
            reset_peak()
            before = current_rss()
            with warnings.catch_warnings(record=True) as caught:  # e.g. "rank 24 is above vLLM's default 16"
                warnings.simplefilter("always")
                start = time.perf_counter()
                export_lora(model, directory, preference=preference)
                seconds = time.perf_counter() - start
            extra = peak_rss(resettable) - before
            size = sum(f.stat().st_size for f in Path(directory).iterdir())
            with open(Path(directory) / "adapter_config.json") as handle:
                rank = json.load(handle)["r"]
        result["export"] = {"seconds": seconds, "extra_peak": extra, "bundle_bytes": size, "lora_rank": rank,
                            "warnings": [str(w.message) for w in caught]}

    reset_peak()
    before = current_rss()
    start = time.perf_counter()
    merged = model.merge_and_unload()
    seconds = time.perf_counter() - start
    extra = peak_rss(resettable) - before
    with torch.no_grad():
        difference = (merged(input_ids=input_ids).logits - reference).abs().max().item()
    result["merge"] = {"seconds": seconds, "extra_peak": extra, "max_logit_difference": difference,
                       "logit_scale": reference.abs().max().item()}
    channel.send(**result)


# ---- parent: start workers, interleave steps ------------------------------------------------------------------------


_PARENT_FDS: list[int] = []  # the parent's pipe ends, closed in every new worker


class Worker:
    """One candidate in its own process, so that its resident memory is its own.

    On Linux the worker is forked from the parent, which imported torch, transformers, PEFT and peft_palora and ran
    no computation (so no thread pool exists yet): it starts in milliseconds instead of re-importing. Elsewhere it
    is this script started again with ``--worker``. Either way it talks JSON lines over two pipes.
    """

    def __init__(self, name: str, argv: list[str], args):
        self.name, self.pid, self.process = name, None, None
        if hasattr(os, "fork") and sys.platform.startswith("linux"):
            command_read, command_write = os.pipe()
            reply_read, reply_write = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    for fd in _PARENT_FDS + [command_write, reply_read]:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    sys.stdout = sys.stderr  # library prints must not mix with the parent's table
                    worker(name, args, Channel(os.fdopen(command_read), os.fdopen(reply_write, "w")))
                    code = 0
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            os.close(command_read)
            os.close(reply_write)
            _PARENT_FDS.extend([command_write, reply_read])
            self.pid = pid
            self.commands, self.replies = os.fdopen(command_write, "w"), os.fdopen(reply_read)
        else:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", name, *argv],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1,
            )
            self.commands, self.replies = self.process.stdin, self.process.stdout

    def receive(self) -> dict:
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"worker {self.name!r} died (exit status {self.wait()}); its traceback is above")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.commands.write(command + "\n")
        self.commands.flush()
        return self.receive()

    def wait(self) -> int:
        if self.process is not None:
            return self.process.wait(timeout=300)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        for handle in (self.commands, self.replies):
            with contextlib.suppress(OSError, ValueError):
                if self.pid is not None:
                    _PARENT_FDS.remove(handle.fileno())
                handle.close()
        if self.pid is not None:
            with contextlib.suppress(ChildProcessError):
                self.wait()
        else:
            self.wait()


def run_group(names: list[str], argv: list[str], args) -> dict[str, dict]:
    workers = [Worker(name, argv, args) for name in names]
    try:
        results = {w.name: {"build": w.receive(), "steps": []} for w in workers}
        timed = {w.name: args.steps if w.name in LIGHT_CANDIDATES else args.heavy_steps for w in workers}
        for round_index in range(args.warmup + max(timed.values())):
            for w in workers:  # interleaved: one step of each candidate in turn
                if round_index >= args.warmup + timed[w.name]:
                    continue
                reply = w.ask("step")
                print(f"  {w.name}: step {round_index + 1} took {reply['seconds']:.2f} s", file=sys.stderr, flush=True)
                if round_index >= args.warmup:
                    results[w.name]["steps"].append(reply["seconds"])
                results[w.name]["loss"] = reply["loss"]
        for w in workers:
            results[w.name]["memory"] = w.ask("finish")
    finally:
        for w in workers:
            w.close()
    return results


def pack_groups(counts, args, budget, selected) -> tuple[list[list[str]], list[str]]:
    groups, current, used, computed = [], [], 0.0, []
    for name in (n for n in TRAINING_CANDIDATES if n in selected):
        need = predicted_peak(name, counts, args)
        if need > budget:
            computed.append(name)
            continue
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0.0
        current.append(name)
        used += need
    if current:
        groups.append(current)
    return groups, computed


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.3f} GiB"


def reanalyse(args) -> None:
    """Recompute everything derived (ratios, computed memory, table, JSON) from the measurements of a saved run."""
    saved = json.loads(Path(args.from_json).read_text())
    counts = parameter_counts(args)
    if (saved["model"]["parameters"], saved["setup"]["adapter_parameters"]) != (counts["base"], counts["adapters"]):
        raise ValueError(
            f"--from_json {args.from_json!r} measured a model with {saved['model']['parameters']} parameters and "
            f"{saved['setup']['adapter_parameters']} adapter parameters; these options give {counts['base']} and "
            f"{counts['adapters']}: pass the model options of that run (e.g. --tiny or --layers)."
        )
    for name in ("warmup", "steps", "heavy_steps"):
        setattr(args, name, saved["setup"].get(name, getattr(args, name)))
    meta = {key: saved[key] for key in ("command", "memory_method", "machine", "groups", "wall_seconds")}
    meta["reanalysed_from"] = "the measurements of this run, re-read by --from_json (figures derived anew)"
    ops = {"merge": saved["merge_and_unload"], "export": saved["export_lora"]}
    report_results(args, counts, saved["candidates"], ops, meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config, one step per candidate (smoke test)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--num_tasks", type=int, default=3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per candidate (5; 1 with --tiny)")
    parser.add_argument("--heavy_steps", type=int, default=None,
                        help="timed steps of the all-weights candidates (full_ft, palora_base, pamal): 2; 1 with "
                             "--tiny. Their memory peak comes in the first step, when AdamW allocates its moments")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (1; 0 with --tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers (machine default)")
    parser.add_argument("--memory_budget_gib", type=float, default=None,
                        help="memory for the workers alive at once (default: 80%% of the memory available at start)")
    parser.add_argument("--candidates", type=str, default=",".join(TRAINING_CANDIDATES + ["merge_export"]),
                        help="comma-separated subset of " + ", ".join(TRAINING_CANDIDATES + ["merge_export"]))
    parser.add_argument("--output", type=str, default=None, help="write the results as JSON to this path")
    parser.add_argument("--from_json", type=str, default=None,
                        help="measure nothing: recompute the ratios and the table from a JSON this script wrote "
                             "(give the same model options, e.g. --tiny)")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("num_tasks", "r", "batch_size", "seq_len", "steps", "heavy_steps", "warmup", "threads", "layers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be positive, got {value}")
    if args.num_tasks < 2:
        parser.error(f"--num_tasks must be at least 2, got {args.num_tasks}")
    args.steps = args.steps if args.steps is not None else (1 if args.tiny else 5)
    selected = [name.strip() for name in args.candidates.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(TRAINING_CANDIDATES + ["merge_export"]))
    if unknown or not selected:
        parser.error(f"--candidates: unknown or empty {unknown or selected}; choose from "
                     f"{TRAINING_CANDIDATES + ['merge_export']}")
    args.heavy_steps = args.heavy_steps if args.heavy_steps is not None else (1 if args.tiny else 2)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1)

    if args.worker is not None:  # started by a parent that cannot fork
        sys.stdout = sys.stderr
        worker(args.worker, args, Channel(sys.stdin, os.fdopen(os.dup(1), "w")))
        return
    # Import everything once here: forked workers inherit the modules instead of importing them again.
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from peft import LoraConfig  # noqa: F401

    import peft_palora  # noqa: F401

    if args.from_json is not None:
        reanalyse(args)
        return

    passthrough = ["--tiny"] if args.tiny else []
    for name in ("layers", "num_tasks", "r", "batch_size", "seq_len", "steps", "heavy_steps", "warmup", "threads"):
        if getattr(args, name) is not None:
            passthrough += [f"--{name}", str(getattr(args, name))]
    started = time.time()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    counts = parameter_counts(args)
    budget = args.memory_budget_gib * GIB if args.memory_budget_gib is not None else 0.8 * available_memory()
    groups, computed_only = pack_groups(counts, args, budget, selected)
    t, p, a = args.num_tasks, counts["base"], counts["adapters"]
    cfg = model_config(args)
    print(f"Qwen2-style model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{p / 1e6:.1f}M parameters; PaLoRA T={t}, r={args.r} on {TARGETS} ({a / 1e6:.2f}M adapter parameters)")
    print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.warmup} warm-up + {args.steps} timed steps "
          f"({args.heavy_steps} for the all-weights candidates); "
          f"memory budget {gib(budget)}; groups {groups}; computed only: {computed_only or 'none'}")

    measured: dict[str, dict] = {}
    for group_index, names in enumerate(groups):
        for name, result in run_group(names, passthrough, args).items():
            result["group"] = group_index
            measured[name] = result
    if "merge_export" not in selected:
        ops = {"export": {"skipped": "not selected"}, "merge": {"skipped": "not selected"}}
    elif predicted_peak("merge_export", counts, args) <= budget:
        merge_export = Worker("merge_export", passthrough, args)
        try:
            ops = merge_export.receive()
        finally:
            merge_export.close()
    else:
        reason = "the model does not fit the memory budget"
        ops = {"export": {"skipped": reason}, "merge": {"skipped": reason}}

    resettable = all(r["build"]["resettable"] for r in measured.values())
    floor = statistics.median(r["build"]["floor"] for r in measured.values()) if measured else None
    rows = {}
    for name in TRAINING_CANDIDATES:
        if name in measured:
            r = measured[name]
            rows[name] = {
                "measured": True, "group": r["group"], "trainable_parameters": r["build"]["trainable"],
                "step_seconds_median": statistics.median(r["steps"]), "step_seconds": r["steps"],
                "peak_bytes": r["memory"]["train_peak"], "process_peak_bytes": r["memory"]["process_peak"],
                "rss_after_build_bytes": r["build"]["built"], "floor_bytes": r["build"]["floor"],
                "threads": r["build"]["threads"], "final_loss": r["loss"],
            }
        else:
            reason = "not selected" if name not in selected else "does not fit the memory budget"
            rows[name] = {"measured": False, "reason": reason}
    meta = {
        "command": " ".join([os.path.basename(sys.executable), "benchmarks/bench_scale.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "memory_method": ("VmHWM per worker process, reset by /proc/self/clear_refs after the build" if resettable
                          else "ru_maxrss per worker process (whole life; no high-water reset available)"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_start": load_at_start, "memory_budget_bytes": budget, "floor_rss_bytes": floor},
        "groups": groups,
        "wall_seconds": time.time() - started,
    }
    report_results(args, counts, rows, ops, meta)


def paired_ratio(numerator: dict, denominator: dict) -> float | None:
    """Median over rounds of the ratio of two candidates' steps taken back to back (same group, same rounds)."""
    if not numerator.get("measured") or not denominator.get("measured") or numerator["group"] != denominator["group"]:
        return None
    pairs = list(zip(numerator["step_seconds"], denominator["step_seconds"]))
    return statistics.median(x / y for x, y in pairs) if pairs else None


def report_results(args, counts: dict[str, int], rows: dict, ops: dict, meta: dict) -> None:
    """Ratios, computed figures, the table and the JSON, from the measured rows (of this run or of a saved one)."""
    t, p, a = args.num_tasks, counts["base"], counts["adapters"]
    cfg = model_config(args)
    # Computed figures: exact byte counts of what T copies add (PaMaL) or what the adapters add (PaLoRA) on top of
    # the measured full fine-tuning peak.
    pamal_extra_bytes = FP32 * p * (4 * (t - 1) + 1)
    palora_extra_bytes = FP32 * 4 * a
    full_peak = rows["full_ft"].get("peak_bytes")
    computed = {
        "pamal_overhead_bytes": pamal_extra_bytes,
        "palora_base_overhead_bytes": palora_extra_bytes,
        "pamal_peak_bytes": None if full_peak is None else full_peak + pamal_extra_bytes,
        "palora_base_peak_bytes": None if full_peak is None else full_peak + palora_extra_bytes,
        "formula_pamal": "measured full_ft peak + 4 bytes x P x (4(T-1) + 1)",
        "formula_palora_base": "measured full_ft peak + 4 bytes x adapters x 4 (weights, gradients, 2 AdamW moments)",
    }

    def step(name):
        return rows[name].get("step_seconds_median")

    def peak(name):
        return rows[name].get("peak_bytes")

    def ratio(x, y):
        return None if x is None or y is None or y == 0 else x / y

    def over_full(name):
        return None if peak(name) is None or full_peak is None else peak(name) - full_peak

    overhead_palora_measured, overhead_pamal_measured = over_full("palora_base"), over_full("pamal")
    overhead_pamal = overhead_pamal_measured if overhead_pamal_measured is not None else pamal_extra_bytes
    overhead_palora = overhead_palora_measured if overhead_palora_measured is not None else palora_extra_bytes
    # PaLoRA's overhead (about 16 bytes per adapter parameter) can be smaller than the RSS noise of two 0.5B runs;
    # the target ratio then uses the larger of the measured and the computed value, which can only lower the ratio.
    overhead_palora_for_ratio = max(overhead_palora, palora_extra_bytes)
    ratios = {
        "step_palora_over_lora_r24": ratio(step("palora"), step("lora_r24")),
        "step_palora_over_lora_r24_paired": paired_ratio(rows["palora"], rows["lora_r24"]),
        "step_palora_over_full_ft": ratio(step("palora"), step("full_ft")),
        "step_palora_base_over_full_ft": ratio(step("palora_base"), step("full_ft")),
        "peak_palora_over_lora_r24": ratio(peak("palora"), peak("lora_r24")),
        "peak_palora_over_full_ft": ratio(peak("palora"), peak("full_ft")),
        "parameter_overhead_pamal_over_palora": (t - 1) * p / a,
        "parameters_total_pamal_over_palora": t * p / (p + a),
        "memory_overhead_pamal_over_palora": ratio(overhead_pamal, overhead_palora_for_ratio),
        "memory_overhead_pamal_over_palora_computed": pamal_extra_bytes / palora_extra_bytes,
    }
    overhead_sources = {
        "pamal": "measured" if overhead_pamal_measured is not None else "computed",
        "palora_base": "measured" if overhead_palora_measured is not None else "computed",
        "palora_base_in_ratio": "computed" if overhead_palora_for_ratio > overhead_palora else "measured",
    }

    print()
    print(f"{'candidate':<12} {'group':>5} {'trainable':>11} {'step (median)':>14} {'peak RSS':>13} "
          f"{'step/LoRA24':>11} {'peak/LoRA24':>11} {'peak/full':>9}")
    for name in TRAINING_CANDIDATES:
        row = rows[name]
        if row["measured"]:
            print(f"{name:<12} {row['group']:>5} {row['trainable_parameters'] / 1e6:>10.2f}M "
                  f"{row['step_seconds_median'] * 1e3:>11.1f} ms {gib(row['peak_bytes']):>13} "
                  f"{ratio(step(name), step('lora_r24')) or 0:>11.3f} "
                  f"{ratio(peak(name), peak('lora_r24')) or 0:>11.3f} "
                  f"{ratio(peak(name), full_peak) or 0:>9.3f}")
        else:
            value = computed.get(f"{name}_peak_bytes")
            print(f"{name:<12} {'-':>5} {'-':>11} {'not run':>14} {gib(value):>13}  "
                  f"(computed; {row.get('reason', 'not run')})")
    for name in ("pamal", "palora_base"):
        if rows[name]["measured"] and full_peak is not None:
            print(f"check: {name} peak measured {gib(peak(name))}, computed {gib(computed[f'{name}_peak_bytes'])}")
    export = ops.get("export", {})
    if "skipped" in export:
        print(f"export_lora: skipped ({export['skipped']})")
    else:
        print(f"export_lora (preference {PREFERENCE}): {export['seconds'] * 1e3:.1f} ms, extra peak "
              f"{export['extra_peak'] / 2**20:.1f} MiB, bundle {export['bundle_bytes'] / 2**20:.1f} MiB, "
              f"LoRA rank {export['lora_rank']}")
    merge = ops.get("merge", {})
    if "skipped" in merge:
        print(f"merge_and_unload: skipped ({merge['skipped']})")
    else:
        print(f"merge_and_unload: {merge['seconds'] * 1e3:.1f} ms, extra peak {merge['extra_peak'] / 2**20:.1f} MiB, "
              f"max |logit difference| {merge['max_logit_difference']:.2e} (logit scale {merge['logit_scale']:.2f})")
    print(f"memory overhead over full fine-tuning: PaLoRA (base trained) {overhead_palora / 2**20:.1f} MiB "
          f"({overhead_sources['palora_base']}), PaMaL T={t} {overhead_pamal / 2**20:.1f} MiB "
          f"({overhead_sources['pamal']})")
    print()

    def show(label, value, target=""):
        print(f"RATIO {label} = {'n/a' if value is None else f'{value:.3f}'}{'  ' + target if target else ''}")

    show("step PaLoRA / LoRA r24", ratios["step_palora_over_lora_r24"], f"(target <= {TARGET_STEP_RATIO})")
    show("step PaLoRA / LoRA r24, median of back-to-back pairs", ratios["step_palora_over_lora_r24_paired"])
    show("step PaLoRA / full fine-tuning", ratios["step_palora_over_full_ft"])
    show("step PaLoRA base trained / full fine-tuning", ratios["step_palora_base_over_full_ft"])
    show("peak PaLoRA / LoRA r24", ratios["peak_palora_over_lora_r24"])
    show("peak PaLoRA / full fine-tuning", ratios["peak_palora_over_full_ft"])
    show("parameter overhead PaMaL / PaLoRA", ratios["parameter_overhead_pamal_over_palora"])
    show("memory overhead PaMaL / PaLoRA", ratios["memory_overhead_pamal_over_palora"],
         f"(target >= {TARGET_OVERHEAD_RATIO}; PaMaL {overhead_sources['pamal']}, "
         f"PaLoRA {overhead_sources['palora_base_in_ratio']})")
    show("memory overhead PaMaL / PaLoRA, computed", ratios["memory_overhead_pamal_over_palora_computed"])

    if args.output is not None:
        report = {
            "command": meta["command"],
            "model": {"family": "Qwen2", "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                      "intermediate": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                      "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size, "parameters": p,
                      "weights": "random (built from the config)"},
            "setup": {"num_tasks": t, "r": args.r, "lora_rank": t * args.r, "targets": TARGETS,
                      "adapter_parameters": a, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "warmup": args.warmup, "steps": args.steps, "heavy_steps": args.heavy_steps,
                      "optimizer": "torch.optim.AdamW (defaults)",
                      "preference": PREFERENCE, "tiny": args.tiny},
            "memory_method": meta["memory_method"],
            "machine": meta["machine"],
            "groups": meta["groups"],
            "candidates": rows,
            "computed": computed,
            "overhead_bytes": {"palora_base": overhead_palora, "pamal": overhead_pamal,
                               "palora_base_in_ratio": overhead_palora_for_ratio, "sources": overhead_sources},
            "merge_and_unload": merge,
            "export_lora": export,
            "ratios": ratios,
            "targets": {
                "step_palora_over_lora_r24": {"target": f"<= {TARGET_STEP_RATIO}",
                                              "met": None if ratios["step_palora_over_lora_r24"] is None
                                              else ratios["step_palora_over_lora_r24"] <= TARGET_STEP_RATIO},
                "memory_overhead_pamal_over_palora": {
                    "target": f">= {TARGET_OVERHEAD_RATIO}",
                    "met": None if ratios["memory_overhead_pamal_over_palora"] is None
                    else ratios["memory_overhead_pamal_over_palora"] >= TARGET_OVERHEAD_RATIO},
            },
            "wall_seconds": meta["wall_seconds"],
        }
        if "reanalysed_from" in meta:
            report["reanalysed_from"] = meta["reanalysed_from"]
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {path}")


if __name__ == "__main__":
    main()
