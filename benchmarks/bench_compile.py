"""torch.compile on a PaLoRA model with a per-call preference, beside PEFT's LoRA of the same total rank.

A small Llama (transformers, from its config: hidden 256, 4 layers by default) gets, on every linear layer, either
PaLoRA (T tasks of rank r) or PEFT's LoRA of rank T*r. Each model is compiled (inductor by default) and timed against
its eager self on the same CPU in one run, all four interleaved round-robin, median of N forwards at batch x seq tokens under no_grad:

* PaLoRA is called with a new per-call preference tensor every forward (`model(ids, preference=p)`);
* the graph, graph-break and recompile counts of each compiled model are read from dynamo's counters and a counting
  backend (one frame per graph).

Writes `benchmarks/results/bench_compile.json` (with `--out`). Usage:
`python benchmarks/bench_compile.py [--hidden 256 --layers 4 --batch 4 --seq 64 --repeats 20 --backend inductor]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import peft_palora

RESULTS = Path(__file__).resolve().parent / "results" / "bench_compile.json"


def llama(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def compile_and_check(name, model, make_kwargs, backend):
    """Compile `model` (counting graphs, breaks and recompiles over three inputs) and check it against eager."""
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        start = time.perf_counter()
        compiled(**make_kwargs(0))
        compile_s = time.perf_counter() - start
        for i in range(1, 3):  # a 2nd and 3rd preference value: no recompile expected
            compiled(**make_kwargs(i))
        kwargs = make_kwargs(99)
        error = (compiled(**kwargs).logits - model(**kwargs).logits).abs().max().item()
    return compiled, {
        "compile_s": compile_s,
        "graphs": counter.frame_count,
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompiles": counter.frame_count - 1,
        "max_abs_diff_vs_eager": error,
    }


def time_interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median forward time (ms) of each run, round-robin so that a change in the machine's load hits all alike."""
    times = {name: [] for name in runs}
    with torch.no_grad():
        for fn, make_kwargs in runs.values():  # warm-up
            fn(**make_kwargs(0))
        for i in range(repeats):
            for name, (fn, make_kwargs) in runs.items():
                kwargs = make_kwargs(100 + i)
                start = time.perf_counter()
                fn(**kwargs)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    lora = get_peft_model(llama(args.hidden, args.layers), LoraConfig(
        r=args.tasks * args.r, target_modules="all-linear", init_lora_weights=False)).eval()
    palora = get_peft_model(llama(args.hidden, args.layers), peft_palora.PaLoRAConfig(
        num_tasks=args.tasks, r=args.r, target_modules="all-linear", init_weights=False)).eval()
    preferences = torch.distributions.Dirichlet(torch.ones(args.tasks)).sample((200,))

    inputs = {"lora": lambda i: {"input_ids": ids},
              "palora": lambda i: {"input_ids": ids, "preference": preferences[i % 200]}}
    models = {"lora": lora, "palora": palora}
    results = {"config": vars(args) | {"torch": torch.__version__, "threads": torch.get_num_threads()}}
    runs = {}
    for name, model in models.items():
        compiled, results[name] = compile_and_check(name, model, inputs[name], args.backend)
        runs[f"{name}_eager"] = (model, inputs[name])
        runs[f"{name}_compiled"] = (compiled, inputs[name])
    times = time_interleaved(runs, args.repeats)
    for name in models:
        result = results[name]
        result["eager_ms"], result["compiled_ms"] = times[f"{name}_eager"], times[f"{name}_compiled"]
        result["speedup"] = result["eager_ms"] / result["compiled_ms"]
        print(f"{name:>7}: eager {result['eager_ms']:8.2f} ms  compiled {result['compiled_ms']:8.2f} ms  "
              f"speedup {result['speedup']:.2f}x  graphs {result['graphs']}  breaks {result['graph_breaks']}  "
              f"recompiles {result['recompiles']}  compile {result['compile_s']:.1f} s  "
              f"max|diff| {result['max_abs_diff_vs_eager']:.1e}")
    results["palora_over_lora_compiled"] = results["palora"]["compiled_ms"] / results["lora"]["compiled_ms"]
    results["palora_over_lora_eager"] = results["palora"]["eager_ms"] / results["lora"]["eager_ms"]
    print(f"speedup from compile: lora {results['lora']['speedup']:.2f}x, palora {results['palora']['speedup']:.2f}x; "
          f"palora/lora: eager {results['palora_over_lora_eager']:.2f}, "
          f"compiled {results['palora_over_lora_compiled']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
