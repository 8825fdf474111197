"""Align one policy for a whole front of objectives with PaLoRA + DPO, then measure its reward front.

What it shows: a causal LM gets one PaLoRA adapter per objective (``PaLoRAConfig(task_names=[...])``);
``PaLoRADPOTrainer`` (a ``trl.DPOTrainer``) trains it on one preference dataset per objective, each step at a window
of preferences from the paper's annealed schedule; ``evaluate_reward_front`` then generates at a grid of preferences
and scores every objective's reward. The output folder receives the adapter bundle, the front table
(``front.csv``), its summary (``front.json``: hypervolume, consistency) and a plot (``front.png``).

Real run (GPU; needs the Hub or a local cache): Qwen2.5-0.5B-Instruct on PKU-SafeRLHF, objectives "helpful"
(``better_response_id``) and "harmless" (``safer_response_id``), the front scored by two open GPT-2 reward models:

    accelerate launch examples/align_dpo.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name PKU-Alignment/PKU-SafeRLHF \\
        --max_train_samples 20000 --output_dir outputs/align_dpo --bf16 --learning_rate 5e-5 --beta 0.1 \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --max_steps 1000 --window_size 3 \\
        --max_length 512 --logging_steps 10 --save_steps 250 --report_to none

CPU smoke run (seconds; a 2-layer Llama built from a config, synthetic "red"/"blue" colour objectives):

    python examples/align_dpo.py --tiny --output_dir /tmp/align_dpo --max_steps 8 --use_cpu

Arguments follow the transformers examples; ``--help`` lists them all (``DPOConfig``'s included).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from transformers import HfArgumentParser
from trl import DPOConfig

from peft_palora import PaLoRAConfig
from peft_palora.alignment import PaLoRADPOTrainer, evaluate_reward_front, split_by_objective


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "The policy."})
    tiny: bool = field(default=False, metadata={"help": "A 2-layer Llama and synthetic colour objectives (CPU)."})
    r: int = field(default=8, metadata={"help": "Rank of each objective's adapter."})
    palora_alpha: float = field(default=16.0, metadata={"help": "Scaling numerator (alpha / r per adapter)."})
    target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names (no lm_head: TRL scores with lm_head.weight directly)."},
    )
    window_size: int = field(default=3, metadata={"help": "Preferences per step (the batch runs this many times)."})


@dataclass
class DataArguments:
    dataset_name: str = field(default="PKU-Alignment/PKU-SafeRLHF", metadata={"help": "Multi-label preferences."})
    objectives: str = field(
        default="helpful=better_response_id,harmless=safer_response_id",
        metadata={"help": "objective=label column pairs; the label column holds the id of the preferred response."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    num_front_prompts: int = field(default=64, metadata={"help": "Test prompts generated at each grid point."})
    front_points_per_side: int = field(default=6, metadata={"help": "Preference grid of the front."})
    max_new_tokens: int = field(default=128, metadata={"help": "Completion length for the front."})
    reward_models: str = field(
        default="helpful=Ray2333/gpt2-large-helpful-reward_model,harmless=Ray2333/gpt2-large-harmless-reward_model",
        metadata={"help": "objective=reward model pairs scoring the front (sequence classification, logit 0)."},
    )


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


# ---- tiny CPU setup -------------------------------------------------------------------------------------------------
RED = ["red", "rose", "fire", "ruby"]
BLUE = ["blue", "sky", "sea", "ice"]


def tiny_setup(seed: int):
    """A 2-layer Llama over a word vocabulary, "red"/"blue" preference data, colour-share rewards, prompts."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "<s>", "</s>", "<unk>", *RED, *BLUE, "tell", "me", "a",
                                                 "color", "say", "word"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    rng = random.Random(seed)
    prompts = [rng.choice(["tell me a color", "say a word"]) for _ in range(32)]
    red = [" ".join(rng.choices(RED, k=2)) for _ in prompts]
    blue = [" ".join(rng.choices(BLUE, k=2)) for _ in prompts]
    data = {"red": Dataset.from_dict({"prompt": prompts, "chosen": red, "rejected": blue}),
            "blue": Dataset.from_dict({"prompt": prompts, "chosen": blue, "rejected": red})}

    def share(words):
        return lambda prompts, completions: [sum(w in words for w in c.split()) / max(len(c.split()), 1)
                                             for c in completions]

    return model, tokenizer, data, {"red": share(RED), "blue": share(BLUE)}, ["tell me a color", "say a word"]


# ---- real setup -----------------------------------------------------------------------------------------------------
def real_setup(model_args: ModelArguments, data_args: DataArguments, training_args: DPOConfig):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=torch.bfloat16 if training_args.bf16 else torch.float32
    )
    train = load_dataset(data_args.dataset_name, split="train")
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    data = split_by_objective(train, _pairs(data_args.objectives))

    def conversational(example):  # TRL applies the policy's chat template to conversational datasets
        return {"prompt": [{"role": "user", "content": example["prompt"]}],
                "chosen": [{"role": "assistant", "content": example["chosen"]}],
                "rejected": [{"role": "assistant", "content": example["rejected"]}]}

    data = {name: dataset.map(conversational) for name, dataset in data.items()}

    test = load_dataset(data_args.dataset_name, split="test").select(range(data_args.num_front_prompts))
    questions = list(test["prompt"])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    question_of = dict(zip(prompts, questions, strict=True))
    device = training_args.device

    def reward_model(name_or_path):
        scorer = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(device).eval()
        scorer_tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        scorer_tokenizer.pad_token = scorer_tokenizer.pad_token or scorer_tokenizer.eos_token
        scorer.config.pad_token_id = scorer_tokenizer.pad_token_id

        def score(prompts, completions):  # the Anthropic-HH format these reward models were trained on
            texts = [f"\n\nHuman: {question_of[p]} \n\nAssistant: {c}" for p, c in zip(prompts, completions,
                                                                                       strict=True)]
            scores = []
            for start in range(0, len(texts), 16):
                encoded = scorer_tokenizer(texts[start:start + 16], return_tensors="pt", padding=True,
                                           truncation=True, max_length=1024).to(device)
                with torch.no_grad():
                    scores += scorer(**encoded).logits[:, 0].float().tolist()
            return scores

        return score

    rewards = {name: reward_model(path) for name, path in _pairs(data_args.reward_models).items()}
    return model, tokenizer, data, rewards, prompts


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, DPOConfig))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.tiny:
        model, tokenizer, data, rewards, prompts = tiny_setup(training_args.seed)
    else:
        model, tokenizer, data, rewards, prompts = real_setup(model_args, data_args, training_args)

    config = PaLoRAConfig(task_names=list(data), r=model_args.r, palora_alpha=model_args.palora_alpha,
                          target_modules=model_args.target_modules.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainer = PaLoRADPOTrainer(model, args=training_args, train_dataset=data, processing_class=tokenizer,
                               window_size=model_args.window_size)
    trainer.train()
    trainer.save_model(training_args.output_dir)

    max_new_tokens = 4 if model_args.tiny else data_args.max_new_tokens
    table, summary = evaluate_reward_front(
        trainer.model, prompts, rewards, data_args.front_points_per_side, processing_class=tokenizer,
        batch_size=None if model_args.tiny else 64, max_new_tokens=max_new_tokens,
        plot_path=os.path.join(training_args.output_dir, "front.png") if len(data) == 2 else None,
    )
    if trainer.accelerator.is_main_process:
        table.to_csv(os.path.join(training_args.output_dir, "front.csv"), index=False)
        report = {key: value for key, value in summary.items() if key != "completions"}
        with open(os.path.join(training_args.output_dir, "front.json"), "w") as handle:
            json.dump(report, handle, indent=2)
        print(table.to_string(index=False))
        print(json.dumps(report, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
