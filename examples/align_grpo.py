"""Train one PaLoRA policy for a whole front of reward trade-offs with GRPO (``PaLoRAGRPOTrainer``).

Each objective is a reward function; each prompt gets its own preference (the paper's annealed schedule), its
completions are generated and scored at that preference, and every objective's reward is normalised within the
prompt's group and weighted by the preference. After training, ``model.generate(..., preference=[w_1, ..., w_T])``
picks the trade-off at inference, with no retraining.

Tiny, on CPU, in seconds (a random 2-layer Llama, a word-level vocabulary, and two objectives with a known
optimum: the share of red words and the share of blue words in a completion; needs the repository's ``tests/``)::

    python examples/align_grpo.py --tiny --output_dir /tmp/align-grpo --max_steps 20

A real model on one GPU (the rewards here are the example's toy ones, ``brevity`` and ``politeness``; put your own
reward functions or reward models in ``REWARDS``)::

    python examples/align_grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/tldr --output_dir qwen-palora-grpo \\
        --per_device_train_batch_size 16 --num_generations 8 --max_completion_length 128 \\
        --learning_rate 1e-5 --max_steps 500 --bf16 --r 8 --palora_alpha 16

``use_vllm`` is refused (vLLM's copy of the weights cannot hold a per-sample preference); generation runs in
transformers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from datasets import Dataset, load_dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import GRPOConfig

from peft_palora import PaLoRAConfig
from peft_palora.alignment import PaLoRAGRPOTrainer


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A causal LM on the Hub or on disk."})
    tiny: bool = field(default=False, metadata={"help": "Use the tests' tiny random Llama and the colour rewards."})
    r: int = field(default=4, metadata={"help": "Rank of each objective's adapter."})
    palora_alpha: float = field(default=8.0, metadata={"help": "Adapters are scaled by palora_alpha / r."})
    target_modules: str = field(default="all-linear", metadata={"help": "Comma-separated names, or 'all-linear'."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset with a 'prompt' column."})
    dataset_split: str = field(default="train")


# ---- rewards: one function per objective, TRL's signature ---------------------------------------------------------------
def brevity(completions, **kwargs):
    return [-len(text.split()) / 100.0 for text in completions]


def politeness(completions, **kwargs):
    words = ("please", "thank", "thanks", "kindly", "appreciate")
    return [float(sum(text.lower().count(word) for word in words)) for text in completions]


REWARDS = {"brevity": brevity, "politeness": politeness}


def tiny_setup():
    """The tests' tiny Llama, tokenizer, prompts and colour rewards (``tests/tiny_lm.py``)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
    from tiny_lm import BLUE_WORDS, RED_WORDS, colour_share, make_model, make_tokenizer

    model = make_model("llama")
    with torch.no_grad():  # a wider lm_head, so the adapters can move the tiny model's outputs
        model.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    prompts = ["say a color", "tell me one word", "the color is", "please say now"] * 100
    rewards = {
        "red": lambda completions, **kwargs: [colour_share(text, RED_WORDS) for text in completions],
        "blue": lambda completions, **kwargs: [colour_share(text, BLUE_WORDS) for text in completions],
    }
    return model, make_tokenizer(), Dataset.from_dict({"prompt": prompts}), rewards


# --tiny's defaults (CPU, float32, a large learning rate for a 20-step run); flags given on the command line win.
TINY_DEFAULTS = [
    "--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
    "--per_device_train_batch_size", "16", "--num_generations", "8", "--max_completion_length", "6",
    "--learning_rate", "3e-2", "--lr_scheduler_type", "constant", "--save_strategy", "no", "--logging_steps", "5",
]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--tiny" in argv:
        argv = TINY_DEFAULTS + argv
    parser = HfArgumentParser((ModelArguments, DataArguments, GRPOConfig))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    if model_args.tiny:
        base, tokenizer, dataset, rewards = tiny_setup()
    else:
        if model_args.model_name_or_path is None or data_args.dataset_name is None:
            raise ValueError("Give --model_name_or_path and --dataset_name, or --tiny.")
        base = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
        dataset = load_dataset(data_args.dataset_name, split=data_args.dataset_split)
        rewards = REWARDS

    targets = model_args.target_modules
    config = PaLoRAConfig(
        task_names=list(rewards), r=model_args.r, palora_alpha=model_args.palora_alpha,
        target_modules=targets if targets == "all-linear" else targets.split(","),
    )
    model = get_peft_model(base, config)

    trainer = PaLoRAGRPOTrainer(
        model, rewards, args=training_args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)

    # The front: mean reward of every objective at a few preferences, one model.
    model.eval()
    prompts = list(dataset["prompt"][:8])
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    names = list(rewards)
    for weight in (0.0, 0.25, 0.5, 0.75, 1.0):
        preference = [weight, 1.0 - weight] if len(names) == 2 else [1.0 / len(names)] * len(names)
        torch.manual_seed(training_args.seed)
        with torch.no_grad():
            out = model.generate(
                **encoded, preference=preference, do_sample=True, max_new_tokens=training_args.max_completion_length,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        means = {name: sum(func(completions=texts, prompts=prompts)) / len(texts) for name, func in rewards.items()}
        print(f"preference {dict(zip(names, preference))}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


if __name__ == "__main__":
    main()
