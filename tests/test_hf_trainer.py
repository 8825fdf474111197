"""PaLoRAHFTrainer as a transformers user expects it: the map(tokenize) flow, evaluate(), light checkpoints, resume
checks, the front callback, and one window shared with the Accelerate trainer."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import get_peft_model
from transformers import BertConfig, BertModel, HfArgumentParser, PreTrainedTokenizerFast, TrainingArguments

import peft_palora
from peft_palora.preferences import simplex_grid
from peft_palora.training.hf_trainer import FrontEvaluationCallback, PaLoRAHFTrainer, PaLoRAHFTrainingArguments
from peft_palora.training.multitask import MultiTaskModel, linear_heads

TASKS = ["topic", "mood"]
LABELS = {"topic": "topic_label", "mood": "mood_label"}
WORDS = "the a match team goal phone app battery great awful slow fast broke won lost love hate again new old".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: index + 2 for index, word in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def text_dataset(size: int = 32, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    texts, topics, moods = [], [], []
    for _ in range(size):
        length = int(torch.randint(3, 8, (1,), generator=generator))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)]
        texts.append(" ".join(words))
        topics.append(int("phone" in words or "app" in words or "battery" in words))
        moods.append(int(sum(w in ("great", "won", "love", "fast") for w in words) > 0))
    return Dataset.from_dict({"text": texts, "topic_label": topics, "mood_label": moods})


def tokenized(dataset: Dataset, tokenizer) -> Dataset:
    return dataset.map(lambda batch: tokenizer(batch["text"]), batched=True)  # the text column stays


def tiny_model(adapter_seed: int = 0, init_weights: bool = False) -> MultiTaskModel:
    """The same frozen base every time (as a pretrained one would be); adapters and heads from ``adapter_seed``."""
    torch.manual_seed(0)
    base = BertModel(
        BertConfig(
            vocab_size=len(WORDS) + 2,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    )
    config = peft_palora.PaLoRAConfig(
        task_names=TASKS, r=2, target_modules=["query", "value"], init_weights=init_weights
    )
    torch.manual_seed(adapter_seed)
    return MultiTaskModel(
        get_peft_model(base, config), linear_heads(16, {"topic": 2, "mood": 2}), label_columns=LABELS, pooling="mean"
    )


def arguments(output_dir, **overrides) -> PaLoRAHFTrainingArguments:
    values = dict(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, window_size=3,
        logging_steps=1, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return PaLoRAHFTrainingArguments(**values)


def make_trainer(output_dir, model=None, train=None, eval_dataset=None, **overrides) -> PaLoRAHFTrainer:
    tokenizer = word_tokenizer()
    return PaLoRAHFTrainer(
        model=model or tiny_model(),
        args=arguments(output_dir, **overrides),
        train_dataset=train if train is not None else tokenized(text_dataset(), tokenizer),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


# ---- the standard flow ------------------------------------------------------------------------------------------
def test_map_tokenize_with_processing_class_trains(tmp_path):
    trainer = make_trainer(tmp_path)
    result = trainer.train()  # the text column would crash the padding collator if it were kept
    assert result.global_step == 2
    assert {"input_ids", "attention_mask", "topic_label", "mood_label"} <= set(trainer._signature_columns)
    assert "text" not in trainer._signature_columns
    batch = next(iter(trainer.get_train_dataloader()))
    assert "text" not in batch and set(LABELS.values()) <= set(batch)


def test_evaluate_returns_each_task_loss_and_accuracy(tmp_path):
    tokenizer = word_tokenizer()
    eval_set = tokenized(text_dataset(20, seed=1), tokenizer)
    trainer = make_trainer(tmp_path, eval_dataset=eval_set)
    preference = [0.3, 0.7]
    metrics = trainer.evaluate(preference=preference)

    model = trainer.model.eval()
    encoded = tokenizer(list(eval_set["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**encoded, preference=torch.tensor(preference))
    expected = {}
    for task in TASKS:
        labels = torch.tensor(list(eval_set[LABELS[task]]))
        expected[f"eval_{task}_loss"] = float(F.cross_entropy(outputs[task], labels))
        expected[f"eval_{task}_accuracy"] = float((outputs[task].argmax(-1) == labels).float().mean())
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    weighted = 0.3 * expected["eval_topic_loss"] + 0.7 * expected["eval_mood_loss"]
    assert metrics["eval_loss"] == pytest.approx(weighted, rel=1e-5)
    assert trainer.state.log_history[-1]["eval_topic_accuracy"] == metrics["eval_topic_accuracy"]


def test_front_callback_logs_the_hypervolume_of_the_label_column_front(tmp_path):
    tokenizer = word_tokenizer()
    eval_set = tokenized(text_dataset(24, seed=2), tokenizer)
    callback = FrontEvaluationCallback(points_per_side=3)
    trainer = make_trainer(tmp_path, eval_dataset=eval_set)
    trainer.add_callback(callback)
    metrics = trainer.evaluate()

    model = trainer.model.eval()
    encoded = tokenizer(list(eval_set["text"]), padding=True, return_tensors="pt")
    points = []
    with torch.no_grad():
        for preference in simplex_grid(2, 3):
            outputs = model(**encoded, preference=preference)
            points.append([float((outputs[t].argmax(-1) == torch.tensor(list(eval_set[LABELS[t]]))).float().mean())
                           for t in TASKS])  # fmt: skip
    # brute-force 2-D hypervolume above the origin: union of the rectangles [0, x] x [0, y]
    volume, best_y = 0.0, 0.0
    for x, y in sorted(points, key=lambda p: -p[0]):
        if y > best_y:
            volume += x * (y - best_y)
            best_y = y
    assert metrics["eval_front_hypervolume"] == pytest.approx(volume)
    front = callback.fronts[0]
    assert front[["topic_accuracy", "mood_accuracy"]].to_numpy().tolist() == [pytest.approx(p) for p in points]
    assert "eval_front_hypervolume" in trainer.state.log_history[-1]
    with pytest.raises(ValueError, match="reference"):
        FrontEvaluationCallback(metric="loss")


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_checkpoints_hold_only_what_trains_and_resume_exactly(tmp_path):
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = make_trainer(tmp_path / "full", model=tiny_model(init_weights=False), **overrides)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "task_heads.safetensors", "palora_run.json", "optimizer.pt"} <= files
    assert "model.safetensors" not in files and "training_args.bin" not in files  # no frozen weights, no pickle
    base_size = sum(p.numel() * 4 for p in full.model.get_base_model().parameters())
    weights = sum(
        os.path.getsize(checkpoint / name) for name in ("adapter_model.safetensors", "task_heads.safetensors")
    )
    assert weights < base_size / 3

    resumed = make_trainer(tmp_path / "full", model=tiny_model(adapter_seed=9, init_weights=False), **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = full.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)

    changed = make_trainer(tmp_path / "full", model=tiny_model(), **{**overrides, "learning_rate": 5e-3})
    with pytest.raises(ValueError, match=r"learning_rate: 0\.01 -> 0\.005"):
        changed.train(resume_from_checkpoint=str(checkpoint))
    changed = make_trainer(tmp_path / "full", model=tiny_model(), **{**overrides, "window_size": 2})
    with pytest.raises(ValueError, match="preference_sampler"):
        changed.train(resume_from_checkpoint=True)


# ---- one window for both trainers -------------------------------------------------------------------------------
def test_both_trainers_draw_the_same_windows_with_accumulation(tmp_path):
    from torch.utils.data import DataLoader

    from peft_palora.training.trainer import PaLoRATrainer, PaLoRATrainingArguments

    tokenizer = word_tokenizer()
    data = tokenized(text_dataset(32), tokenizer)
    hf = make_trainer(tmp_path / "hf", train=data, max_steps=2, gradient_accumulation_steps=2,
                      per_device_train_batch_size=4, balancing="loss")  # fmt: skip
    loader = DataLoader(data.remove_columns(["text"]), batch_size=4,
                        collate_fn=lambda rows: dict(tokenizer.pad(rows, return_tensors="pt")))  # fmt: skip
    accelerate = PaLoRATrainer(
        tiny_model(),
        PaLoRATrainingArguments(
            output_dir=str(tmp_path / "acc"),
            max_steps=2,
            gradient_accumulation_steps=2,
            window_size=3,
            balancing="loss",
            disable_tqdm=True,
            use_cpu=True,
        ),  # fmt: skip
        loader,
    )
    calls = {}
    for name, trainer in (("hf", hf), ("accelerate", accelerate)):
        seen = calls.setdefault(name, [])
        sample = trainer.window.sampler.sample
        trainer.window.sampler.sample = lambda progress, step=None, seen=seen, sample=sample: (
            seen.append((progress, step)) or sample(progress, step)
        )
        trainer.train()
        assert trainer.objective.balancing == "loss"  # the same default objective, from the same argument
    assert calls["hf"] == calls["accelerate"] == [(0.0, 0), (0.0, 1), (0.5, 2), (0.5, 3)]


def test_accumulated_steps_average_the_micro_batches(tmp_path):
    # plain SGD without clipping: the update is proportional to the gradient (Adam would hide a wrong scale); a label
    # column named "labels" makes the Trainer count `num_items_in_batch`, which must not stop it averaging
    data = tokenized(text_dataset(8), word_tokenizer()).rename_column("topic_label", "labels")
    trained = []
    for name, batch_size, accumulation in (("one", 8, 1), ("two", 4, 2)):
        model = tiny_model()
        model.label_columns = {"topic": "labels", "mood": "mood_label"}
        trainer = PaLoRAHFTrainer(
            model=model,
            args=arguments(
                tmp_path / name,
                max_steps=1,
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                max_grad_norm=0.0,
            ),  # fmt: skip
            train_dataset=data,
            processing_class=word_tokenizer(),
            optimizers=(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5), None),
        )
        trainer.train()
        trained.append(model.state_dict())
    for name, expected in trained[0].items():
        torch.testing.assert_close(trained[1][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(value, tiny_model().state_dict()[key]) for key, value in trained[0].items())


# ---- arguments --------------------------------------------------------------------------------------------------
def test_palora_fields_parse_like_any_training_argument(tmp_path):
    (args,) = HfArgumentParser(PaLoRAHFTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--window_size", "5", "--balancing", "loss", "--report_to", "none"]
    )
    assert (args.window_size, args.balancing, args.learning_rate) == (5, "loss", 5e-05)
    with pytest.raises(ValueError, match="window_size"):
        PaLoRAHFTrainingArguments(output_dir=str(tmp_path), window_size=0)
    with pytest.raises(ValueError, match="balancing"):
        PaLoRAHFTrainingArguments(output_dir=str(tmp_path), balancing="magic")


def test_plain_training_arguments_and_keyword_overrides(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    trainer = PaLoRAHFTrainer(
        model=tiny_model(), args=args, train_dataset=tokenized(text_dataset(8), word_tokenizer()),
        processing_class=word_tokenizer(), window_size=2, sampler_mul=3.0,
    )  # fmt: skip
    assert repr(trainer.preference_sampler) == "AnnealedGridSampler(num_tasks=2, num_rays=2, mul=3.0, epsilon=0.01)"
    with pytest.raises(TypeError, match="MultiTaskModel"):
        PaLoRAHFTrainer(model=tiny_model().backbone, args=args)


def test_gradient_checkpointing_through_the_trainer_gives_the_same_update(tmp_path):
    data = tokenized(text_dataset(8), word_tokenizer())
    trained = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        model = tiny_model()
        model.train()
        trainer = make_trainer(tmp_path / name, model=model, train=data, max_steps=1,
                               activation_checkpointing=checkpointing)  # fmt: skip
        trainer.train()
        assert model.get_base_model().is_gradient_checkpointing == checkpointing
        trained.append(model.state_dict())
    for key, expected in trained[0].items():
        torch.testing.assert_close(trained[1][key], expected, rtol=1e-5, atol=1e-7, msg=key)


# ---- TrainingArguments flags a multi-task model handles or refuses -----------------------------------------------
def test_label_smoothing_smooths_each_task_cross_entropy(tmp_path):
    trainer = make_trainer(tmp_path, label_smoothing_factor=0.2, window_size=2)
    assert trainer.args.label_smoothing_factor == 0.2  # the user's arguments are left as given
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    window = trainer.current_preferences()
    loss = trainer.compute_loss(trainer.model, batch)

    # independent: the window's mean of preference-weighted label-smoothed cross-entropies, written out by hand
    model = trainer.model
    expected = 0.0
    for preference in window.double():
        with torch.no_grad():
            outputs = model(**model.model_inputs(batch), preference=preference.float())
        for index, task in enumerate(TASKS):
            logits, labels = outputs[task].double(), batch[LABELS[task]]
            log_probs = torch.log_softmax(logits, dim=-1)
            smoothed = (1 - 0.2) * -log_probs.gather(1, labels[:, None]).squeeze(1) - 0.2 * log_probs.mean(dim=-1)
            expected += float(preference[index]) * float(smoothed.mean()) / len(window)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    plain = make_trainer(tmp_path / "plain", model=model, window_size=2)
    assert float(plain.compute_loss(model, batch)) != pytest.approx(expected, rel=1e-3)
    assert trainer.run_definition()["label_smoothing_factor"] == 0.2
    assert "label_smoothing_factor" not in plain.run_definition()


def test_label_smoothing_trains_and_evaluates_plain_cross_entropy(tmp_path):
    tokenizer = word_tokenizer()
    eval_set = tokenized(text_dataset(12, seed=1), tokenizer)
    trainer = make_trainer(tmp_path, eval_dataset=eval_set, label_smoothing_factor=0.1)
    assert trainer.train().global_step == 2
    metrics = trainer.evaluate(preference=[1.0, 0.0])
    model = trainer.model.eval()
    encoded = tokenizer(list(eval_set["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded, preference=torch.tensor([1.0, 0.0]))["topic"]
    plain = float(F.cross_entropy(logits, torch.tensor(list(eval_set["topic_label"]))))
    assert metrics["eval_topic_loss"] == pytest.approx(plain, rel=1e-5)


def test_label_smoothing_with_custom_losses_and_neftune_are_refused(tmp_path):
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        make_trainer(tmp_path, neftune_noise_alpha=5.0)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        PaLoRAHFTrainer(
            model=tiny_model(),
            args=arguments(tmp_path, label_smoothing_factor=0.1),
            train_dataset=tokenized(text_dataset(), word_tokenizer()),
            processing_class=word_tokenizer(),
            loss_fns={task: F.cross_entropy for task in TASKS},
        )
