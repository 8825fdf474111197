"""The whole front served by llama.cpp: GGUF base + one GGUF LoRA per task, the preference as the adapter scales.

The llama.cpp test (marked ``llamacpp`` and ``slow``) builds a tiny ``LlamaForCausalLM`` from its config with a
byte-fallback BPE tokenizer made here (llama.cpp embeds the vocabulary in the GGUF, so the converter needs one),
gives it a PaLoRA adapter with three random task adapters on every linear layer, converts the base and the task LoRAs
to f32 GGUF with llama.cpp's own converter scripts, loads them with ``llama-cpp-python`` and compares the logits at
every position of a few prompts with the PaLoRA model's (float32, torch) at vertices and interior preferences, and
with the base alone before any adapter is applied. Tolerance: 1e-5 absolute on logits of order 0.5 (f32 GGUF and an
f32 KV cache; measured: at most 1e-6). llama.cpp's default f16 KV cache alone moves the logits by up to about 4e-3
here (relative 3e-3), so the test asks for an f32 cache. It needs ``llama_cpp`` importable and ``PALORA_LLAMA_CPP_DIR`` pointing at a llama.cpp
source tree with the converters (``scripts/get_llama_cpp.sh``); otherwise it is skipped, saying which is missing.

The other tests run everywhere: argument checks, the manifest written in task order (with stand-in converter
scripts that only record their arguments), and that importing the module imports neither ``llama_cpp`` nor ``gguf``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model

from peft_palora import PaLoRAConfig
from peft_palora.interop.gguf import (
    GGUF_INDEX,
    LLAMA_CPP_DIR_ENV,
    convert_base_to_gguf,
    export_task_loras_gguf,
    find_llama_cpp_dir,
    load_gguf_front,
)

TOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_tokenizer():
    """A Llama-style (SentencePiece-like) BPE tokenizer with byte fallback, as llama.cpp's Llama converter reads it.

    Vocabulary: ``<unk> <s> </s>``, the 256 byte tokens ``<0x00>``..``<0xFF>``, ``▁`` and the letters, and a few
    merges (291 tokens).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    letters = ["\u2581", *"abcdefghijklmnopqrstuvwxyz"]
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("\u2581", "a"), ("i", "n")]
    vocab = {token: i for i, token in enumerate(special + byte_tokens + letters + ["".join(m) for m in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_base(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------- everywhere: checks, manifest, lazy imports


def test_importing_the_module_imports_neither_llama_cpp_nor_gguf():
    code = textwrap.dedent(
        """
        import sys
        import peft_palora, peft_palora.interop.gguf
        loaded = sorted(name for name in ("llama_cpp", "gguf") if name in sys.modules)
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_find_llama_cpp_dir_names_the_argument(tmp_path, monkeypatch):
    monkeypatch.delenv(LLAMA_CPP_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=f"`llama_cpp_dir` is None and {LLAMA_CPP_DIR_ENV}"):
        find_llama_cpp_dir()
    with pytest.raises(ValueError, match="`llama_cpp_dir` .* holds no convert_hf_to_gguf.py"):
        find_llama_cpp_dir(tmp_path)
    with pytest.raises(TypeError, match="`llama_cpp_dir` must be a path"):
        find_llama_cpp_dir(3)
    # an unpacked llama-cpp-python sdist: its vendor/llama.cpp
    vendored = tmp_path / "vendor" / "llama.cpp"
    vendored.mkdir(parents=True)
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        (vendored / script).write_text("")
    assert find_llama_cpp_dir(tmp_path) == str(vendored)
    monkeypatch.setenv(LLAMA_CPP_DIR_ENV, str(vendored))
    assert find_llama_cpp_dir() == str(vendored)


FAKE_CONVERTER = textwrap.dedent(
    """
    import json, sys
    args = sys.argv[1:]
    out = args[args.index("--outfile") + 1]
    with open(out, "w") as handle:
        json.dump({"script": sys.argv[0].rsplit("/", 1)[-1], "args": args}, handle)
    """
)


@pytest.fixture
def fake_llama_cpp(tmp_path):
    """A folder with stand-in converters that write their arguments to --outfile."""
    folder = tmp_path / "fake_llama_cpp"
    folder.mkdir()
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        (folder / script).write_text(FAKE_CONVERTER)
    return folder


@pytest.fixture
def task_loras(tmp_path):
    """A saved tiny Llama base (with tokenizer) and its PaLoRA model's task LoRAs (tasks named out of order)."""
    tokenizer = make_tokenizer()
    base = make_base(tokenizer)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = PaLoRAConfig(task_names=["zeta", "alpha", "mid"], r=2, target_modules=["q_proj", "v_proj"],
                          init_weights=False)
    model = get_peft_model(base, config)
    return model, base_dir


def test_export_writes_adapters_in_task_order(tmp_path, fake_llama_cpp, task_loras):
    model, base_dir = task_loras
    out = export_task_loras_gguf(model, tmp_path / "front", base_model_dir=base_dir, llama_cpp_dir=fake_llama_cpp)
    manifest = json.loads((tmp_path / "front" / GGUF_INDEX).read_text())
    assert manifest["tasks"] == ["zeta", "alpha", "mid"]
    assert manifest["adapters"] == ["lora_zeta.gguf", "lora_alpha.gguf", "lora_mid.gguf"]
    assert manifest["base"] == "base.gguf"
    assert manifest["llama_server"] == (
        "llama-server -m base.gguf --lora lora_zeta.gguf --lora lora_alpha.gguf --lora lora_mid.gguf "
        "--lora-init-without-apply"
    )
    for task, name in zip(manifest["tasks"], manifest["adapters"]):
        call = json.loads((tmp_path / "front" / name).read_text())
        assert call["script"] == "convert_lora_to_gguf.py"
        # each adapter converts its own task's PEFT LoRA, against the base's config
        assert call["args"][0].endswith(os.path.join(os.sep, "peft_task_loras", task))  # converted while staged
        assert os.path.isfile(os.path.join(out, "peft_task_loras", task, "adapter_config.json"))
        assert call["args"][call["args"].index("--base") + 1] == str(base_dir)
        assert call["args"][call["args"].index("--outtype") + 1] == "f32"
    call = json.loads((tmp_path / "front" / "base.gguf").read_text())
    assert call["script"] == "convert_hf_to_gguf.py" and call["args"][0] == str(base_dir)

    # from the task LoRA folder, with an existing base GGUF: the base is recorded, not converted
    existing = tmp_path / "base-q8_0.gguf"
    existing.write_text("stand-in")
    export_task_loras_gguf(
        tmp_path / "front" / "peft_task_loras", tmp_path / "front2", base_model_dir=base_dir, base_gguf=existing,
        outtype="f16", llama_cpp_dir=fake_llama_cpp,
    )
    manifest = json.loads((tmp_path / "front2" / GGUF_INDEX).read_text())
    assert manifest["base"] == str(existing) and manifest["outtype"] == "f16"
    assert not (tmp_path / "front2" / "base.gguf").exists()


def test_bad_arguments_are_refused_by_name(tmp_path, fake_llama_cpp, task_loras):
    model, base_dir = task_loras
    with pytest.raises(ValueError, match="`outtype` must be one of"):
        export_task_loras_gguf(model, tmp_path / "o", base_model_dir=base_dir, outtype="q4", llama_cpp_dir=fake_llama_cpp)
    with pytest.raises(ValueError, match="`model_or_task_lora_dir` .* holds no palora_tasks.json"):
        export_task_loras_gguf(tmp_path, tmp_path / "o", base_model_dir=base_dir, llama_cpp_dir=fake_llama_cpp)
    with pytest.raises(ValueError, match="`base_model_dir` .* has no config.json"):
        export_task_loras_gguf(model, tmp_path / "o", base_model_dir=tmp_path, llama_cpp_dir=fake_llama_cpp)
    with pytest.raises(ValueError, match="`base_model_dir` is None"):
        export_task_loras_gguf(model, tmp_path / "o", llama_cpp_dir=fake_llama_cpp)
    with pytest.raises(ValueError, match="`base_gguf` must be an existing GGUF file"):
        export_task_loras_gguf(model, tmp_path / "o", base_model_dir=base_dir, base_gguf=tmp_path / "none.gguf",
                               llama_cpp_dir=fake_llama_cpp)
    with pytest.raises(ValueError, match="`base_model_dir` .* has no config.json"):
        convert_base_to_gguf(tmp_path, tmp_path / "b.gguf", llama_cpp_dir=fake_llama_cpp)
    assert not (tmp_path / "o").exists()
    if importlib.util.find_spec("llama_cpp") is None:
        with pytest.raises(ImportError, match=r"pip install 'peft-palora\[llamacpp\]'"):
            load_gguf_front(tmp_path)
    else:
        with pytest.raises(ValueError, match="GGUF front index .* does not exist"):
            load_gguf_front(tmp_path)


def test_per_layer_ranks_are_refused(tmp_path, fake_llama_cpp):
    tokenizer = make_tokenizer()
    base = make_base(tokenizer)
    base.save_pretrained(tmp_path / "base")
    config = PaLoRAConfig(num_tasks=2, r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4},
                          init_weights=False)
    with pytest.raises(ValueError, match="per-layer ranks or alphas"):
        export_task_loras_gguf(get_peft_model(base, config), tmp_path / "o", base_model_dir=tmp_path / "base",
                               llama_cpp_dir=fake_llama_cpp)


def test_a_failing_converter_reports_its_output(tmp_path, task_loras):
    model, base_dir = task_loras
    broken = tmp_path / "broken"
    broken.mkdir()
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        (broken / script).write_text("import sys\nprint('no such tensor: xyz', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match=r"(?s)convert_lora_to_gguf.py failed .*exit code 3.*no such tensor: xyz"):
        export_task_loras_gguf(model, tmp_path / "o", base_model_dir=base_dir, llama_cpp_dir=broken)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- llama.cpp itself


def _llama_cpp_or_skip() -> str:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'peft-palora[llamacpp]')")
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("sentencepiece is not installed: llama.cpp's Llama converter imports it (extra [llamacpp])")
    try:
        return find_llama_cpp_dir()
    except ValueError as error:
        pytest.skip(f"no llama.cpp converter scripts: {error}")


PROMPTS = ["the cat in a hat", "a bin the thin", "hello world xyz"]
PREFERENCES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.3, 0.0],
               [0.1, 0.25, 0.65]]


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_serves_the_front(tmp_path):
    llama_cpp_dir = _llama_cpp_or_skip()
    tokenizer = make_tokenizer()
    base = make_base(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    config = PaLoRAConfig(num_tasks=3, r=4, palora_alpha=8.0, target_modules=TARGETS, init_weights=False)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():  # B_t large enough that the tasks' logits differ by far more than the tolerance
        for name, parameter in model.named_parameters():
            if "palora_B" in name:
                parameter.normal_(0.0, 0.2)

    out = export_task_loras_gguf(model, tmp_path / "front", base_model_dir=tmp_path / "base", outtype="f32",
                                 llama_cpp_dir=llama_cpp_dir)
    prompts = [tokenizer(text).input_ids for text in PROMPTS]
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32  # the KV cache in f32 too (llama.cpp's default is f16)
    front = load_gguf_front(out, n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False, type_k=f32, type_v=f32)
    with front:

        def gguf_logits(ids):
            front.llama.reset()
            front.llama.eval(ids)
            return torch.from_numpy(front.llama.scores[: len(ids)].copy())

        # no adapter applied: the base alone
        with torch.no_grad(), model.disable_adapter():
            for ids in prompts:
                expected = model(input_ids=torch.tensor([ids])).logits[0]
                torch.testing.assert_close(gguf_logits(ids), expected, atol=TOL, rtol=0)

        errors = []
        for pref in PREFERENCES:
            front.set_preference(pref)
            assert front.get_preference() == pytest.approx(pref)
            for ids in prompts:
                with torch.no_grad():
                    expected = model(input_ids=torch.tensor([ids]), preference=pref).logits[0]
                got = gguf_logits(ids)
                errors.append((got - expected).abs().max().item())
                torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        # the comparison is not vacuous: the vertices' logits differ by far more than the tolerance
        with torch.no_grad():
            vertex = [model(input_ids=torch.tensor([prompts[0]]), preference=p).logits[0] for p in PREFERENCES[:3]]
        spread = min((vertex[i] - vertex[j]).abs().max().item() for i in range(3) for j in range(i + 1, 3))
        assert spread > 100 * TOL, spread
        print(f"llama.cpp vs PaLoRA: max |logit error| {max(errors):.2e}; smallest vertex-to-vertex gap {spread:.2e}")

        with pytest.raises(ValueError, match="sum to 1"):
            front.set_preference([0.5, 0.2, 0.2])
