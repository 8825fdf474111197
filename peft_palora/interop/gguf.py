"""The whole front served by llama.cpp: a GGUF base plus one GGUF LoRA per task, mixed per request by scales.

:func:`~peft_palora.tuner.conversion.export_task_loras` writes each task adapter as a standard PEFT LoRA whose
scaling is folded in (``lora_alpha`` equals the rank), so the PaLoRA model at a preference ``lambda`` is the base plus
the task LoRAs scaled by ``lambda_t``. llama.cpp applies several LoRA adapters at once, each with its own scale (the
server's per-request ``"lora": [{"id": t, "scale": lambda_t}, ...]``, or ``llama_set_adapters_lora`` in the C API),
and a GGUF LoRA adapter scales ``B A`` by ``scale * lora_alpha / rank`` -- here ``scale``. So the adapter scales
*are* the preference.

* :func:`convert_base_to_gguf` runs llama.cpp's ``convert_hf_to_gguf.py`` on a saved base model folder;
* :func:`export_task_loras_gguf` runs ``convert_lora_to_gguf.py`` on every task LoRA and writes
  ``palora_gguf.json`` (:data:`GGUF_INDEX`): the base and the adapters in task order;
* :func:`load_gguf_front` opens that folder with ``llama-cpp-python``: ``front.set_preference(lambda)`` sets the
  adapter scales.

The converter scripts are not installed by ``pip install llama-cpp-python``: they live in a llama.cpp source tree
(``scripts/get_llama_cpp.sh`` unpacks the one vendored in the ``llama-cpp-python`` source distribution). Pass its path
as ``llama_cpp_dir`` or set ``PALORA_LLAMA_CPP_DIR``. They run in a subprocess with this interpreter (or ``python``);
they need ``torch``, ``transformers``, ``numpy``, ``sentencepiece`` and ``gguf`` (the extra ``[llamacpp]``).
Nothing here imports ``llama_cpp`` or ``gguf`` at module import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from peft_palora.tuner.conversion import TASK_LORAS_INDEX, export_task_loras
from peft_palora.tuner.preference import validate_preference
from peft_palora.utils.atomic import atomic_directory
from peft_palora.utils.json_files import read_json

__all__ = [
    "GGUF_INDEX",
    "LLAMA_CPP_DIR_ENV",
    "GGUFFront",
    "convert_base_to_gguf",
    "export_task_loras_gguf",
    "find_llama_cpp_dir",
    "load_gguf_front",
]

GGUF_INDEX = "palora_gguf.json"
LLAMA_CPP_DIR_ENV = "PALORA_LLAMA_CPP_DIR"
BASE_CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
# The output types both converters accept (llama.cpp's own names).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def find_llama_cpp_dir(llama_cpp_dir: str | os.PathLike | None = None) -> str:
    """The llama.cpp source folder that holds the converter scripts.

    Args:
        llama_cpp_dir: a llama.cpp source tree, or an unpacked ``llama-cpp-python`` source distribution (its
            ``vendor/llama.cpp`` is used). None: the environment variable ``PALORA_LLAMA_CPP_DIR``.

    Raises:
        ValueError: neither is given, or the folder holds no ``convert_hf_to_gguf.py`` and ``convert_lora_to_gguf.py``.
    """
    if llama_cpp_dir is None:
        llama_cpp_dir = os.environ.get(LLAMA_CPP_DIR_ENV) or None
        if llama_cpp_dir is None:
            raise ValueError(
                f"`llama_cpp_dir` is None and {LLAMA_CPP_DIR_ENV} is not set: pass the path of a llama.cpp source tree "
                "holding convert_hf_to_gguf.py and convert_lora_to_gguf.py (scripts/get_llama_cpp.sh unpacks one)."
            )
    if not isinstance(llama_cpp_dir, (str, os.PathLike)):
        raise TypeError(f"`llama_cpp_dir` must be a path, got {type(llama_cpp_dir).__name__}.")
    root = os.path.abspath(os.fspath(llama_cpp_dir))
    for candidate in (root, os.path.join(root, "vendor", "llama.cpp")):
        if all(os.path.isfile(os.path.join(candidate, script)) for script in (BASE_CONVERTER, LORA_CONVERTER)):
            return candidate
    raise ValueError(
        f"`llama_cpp_dir` {root!r} holds no {BASE_CONVERTER} and {LORA_CONVERTER} (nor does its vendor/llama.cpp): "
        "pass a llama.cpp source tree (scripts/get_llama_cpp.sh unpacks one)."
    )


def _check_outtype(outtype: Any) -> str:
    if outtype not in OUTTYPES:
        raise ValueError(f"`outtype` must be one of {list(OUTTYPES)}, got {outtype!r}.")
    return outtype


def _run_converter(python: str | None, script: str, args: Sequence[str], what: str) -> None:
    command = [python or sys.executable, script, *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise RuntimeError(
            f"{os.path.basename(script)} failed converting {what} (exit code {result.returncode}); command: "
            f"{' '.join(command)}\n{tail}"
        )


def convert_base_to_gguf(
    base_model_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    outtype: str = "f32",
    llama_cpp_dir: str | os.PathLike | None = None,
    python: str | None = None,
) -> str:
    """Convert a saved Hugging Face base model (``save_pretrained`` folder with its tokenizer) to one GGUF file.

    Runs ``python convert_hf_to_gguf.py BASE_MODEL_DIR --outtype OUTTYPE --outfile OUT_FILE`` from llama.cpp. The
    folder must hold the tokenizer (llama.cpp embeds the vocabulary in the GGUF file).

    Returns:
        The path of ``out_file``.

    Raises:
        ValueError: ``base_model_dir`` has no ``config.json``, a bad ``outtype`` or ``llama_cpp_dir``.
        RuntimeError: the converter failed (its output's last lines are in the message).
    """
    base_model_dir = _check_base_dir(base_model_dir)
    outtype = _check_outtype(outtype)
    scripts = find_llama_cpp_dir(llama_cpp_dir)
    out_file = os.path.abspath(os.fspath(out_file))
    _run_converter(
        python, os.path.join(scripts, BASE_CONVERTER),
        [base_model_dir, "--outtype", outtype, "--outfile", out_file], f"the base model {base_model_dir}",
    )
    return out_file


def _check_base_dir(base_model_dir: Any) -> str:
    if not isinstance(base_model_dir, (str, os.PathLike)):
        raise TypeError(f"`base_model_dir` must be a path, got {type(base_model_dir).__name__}.")
    base_model_dir = os.path.abspath(os.fspath(base_model_dir))
    if not os.path.isfile(os.path.join(base_model_dir, "config.json")):
        raise ValueError(
            f"`base_model_dir` {base_model_dir!r} has no config.json: pass the folder the base model was saved to with "
            "`save_pretrained` (and its tokenizer with `tokenizer.save_pretrained`)."
        )
    return base_model_dir


def _check_task_lora(folder: str, task: str) -> None:
    """Refuse a task LoRA that llama.cpp would scale wrongly: a GGUF adapter has ONE alpha for all its layers."""
    config = read_json(os.path.join(folder, "adapter_config.json"), what=f"task {task!r} LoRA config")
    if config.get("use_rslora"):
        raise ValueError(f"Task LoRA {folder!r} uses rsLoRA; llama.cpp scales adapters by lora_alpha / rank.")
    patterns = {key: config.get(key) for key in ("rank_pattern", "alpha_pattern") if config.get(key)}
    if patterns:
        raise ValueError(
            f"Task LoRA {folder!r} has per-layer ranks or alphas ({patterns}): a GGUF LoRA adapter carries one "
            "lora_alpha and llama.cpp scales every layer by lora_alpha / (that layer's rank), so layers whose rank "
            "differs from r would be scaled wrongly. Train with one rank for every layer to serve with llama.cpp."
        )


def export_task_loras_gguf(
    model_or_task_lora_dir: Any,
    out_dir: str | os.PathLike,
    *,
    base_model_dir: str | os.PathLike | None = None,
    base_gguf: str | os.PathLike | None = None,
    outtype: str = "f32",
    llama_cpp_dir: str | os.PathLike | None = None,
    python: str | None = None,
) -> str:
    """Write the whole front for llama.cpp: one GGUF LoRA adapter per task, the GGUF base, and the index.

    ``out_dir`` receives ``lora_<task>.gguf`` for every task (from ``convert_lora_to_gguf.py``), ``base.gguf`` (from
    ``convert_hf_to_gguf.py``, unless ``base_gguf`` names one already converted) and ``palora_gguf.json``
    (:data:`GGUF_INDEX`): the tasks, the adapter files in task order and the rule -- at preference ``lambda`` the
    adapter of task ``t`` gets the scale ``lambda_t``. When a model is given, its task LoRAs are exported first into
    ``out_dir/peft_task_loras/`` (:func:`~peft_palora.tuner.conversion.export_task_loras`).

    Args:
        model_or_task_lora_dir: a PaLoRA model (as for ``export_task_loras``), or a folder ``export_task_loras``
            wrote (it holds ``palora_tasks.json``).
        out_dir: the folder to write; replaced as a whole when everything converted.
        base_model_dir: the base model's ``save_pretrained`` folder, with its tokenizer (the LoRA converter reads
            its config.json; the base converter its weights and tokenizer). None: the task LoRAs'
            ``base_model_name_or_path`` when that is a local folder.
        base_gguf: an existing GGUF file of the base (e.g. quantised) to record instead of converting the base.
        outtype: the GGUF tensor type of the adapters and of the converted base: ``"f32"`` (exact), ``"f16"``,
            ``"bf16"`` or ``"q8_0"``.
        llama_cpp_dir: the llama.cpp source tree (:func:`find_llama_cpp_dir`).
        python: the interpreter for the converters (this one when None).

    Returns:
        The path of ``out_dir``.

    Raises:
        ValueError: a folder without ``palora_tasks.json``, no usable ``base_model_dir``, a ``base_gguf`` that is
            not a file, task LoRAs with per-layer ranks or alphas, a bad ``outtype`` or ``llama_cpp_dir``.
        RuntimeError: a converter failed.
    """
    outtype = _check_outtype(outtype)
    scripts = find_llama_cpp_dir(llama_cpp_dir)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"`out_dir` must be a path, got {type(out_dir).__name__}.")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if base_gguf is not None:
        if not isinstance(base_gguf, (str, os.PathLike)) or not os.path.isfile(base_gguf):
            raise ValueError(f"`base_gguf` must be an existing GGUF file, got {base_gguf!r}.")
        base_gguf = os.path.abspath(os.fspath(base_gguf))

    with atomic_directory(out_dir) as staging:
        if isinstance(model_or_task_lora_dir, (str, os.PathLike)):
            task_dir = os.path.abspath(os.fspath(model_or_task_lora_dir))
            if not os.path.isfile(os.path.join(task_dir, TASK_LORAS_INDEX)):
                raise ValueError(
                    f"`model_or_task_lora_dir` {task_dir!r} holds no {TASK_LORAS_INDEX}: pass a PaLoRA model or a "
                    "folder written by `model.export_task_loras`."
                )
        else:
            task_dir = export_task_loras(model_or_task_lora_dir, os.path.join(staging, "peft_task_loras"))
        index = read_json(os.path.join(task_dir, TASK_LORAS_INDEX), what="task LoRA index")
        tasks = index.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(task, str) for task in tasks):
            raise ValueError(f"{os.path.join(task_dir, TASK_LORAS_INDEX)} has no list of task names under 'tasks'.")
        if base_model_dir is None:
            recorded = index.get("base_model_name_or_path")
            if not (isinstance(recorded, str) and os.path.isdir(recorded)):
                raise ValueError(
                    "`base_model_dir` is None and the task LoRAs' base_model_name_or_path "
                    f"({recorded!r}) is not a local folder: pass the folder the base model and tokenizer were saved to."
                )
            base_model_dir = recorded
        base_model_dir = _check_base_dir(base_model_dir)
        for task in tasks:
            _check_task_lora(os.path.join(task_dir, task), task)

        adapters = []
        for task in tasks:
            name = f"lora_{task}.gguf"
            _run_converter(
                python, os.path.join(scripts, LORA_CONVERTER),
                [os.path.join(task_dir, task), "--base", base_model_dir, "--outtype", outtype,
                 "--outfile", os.path.join(staging, name)],
                f"the LoRA of task {task!r}",
            )
            adapters.append(name)
        if base_gguf is None:
            base_entry = "base.gguf"
            convert_base_to_gguf(
                base_model_dir, os.path.join(staging, base_entry), outtype=outtype, llama_cpp_dir=scripts,
                python=python,
            )
        else:
            base_entry = base_gguf
        manifest = {
            "format": "palora_gguf_task_loras",
            "version": 1,
            "tasks": tasks,
            "base": base_entry,
            "adapters": adapters,
            "outtype": outtype,
            "rule": (
                "At preference lambda (non-negative, sums to 1, in the order of `tasks`), apply adapters[t] with the "
                "scale lambda_t on the base: W(lambda) = W + sum_t lambda_t * B_t A_t (lora_alpha equals the rank in "
                "every adapter, so llama.cpp's scale * alpha / rank is lambda_t). Paths are relative to this file."
            ),
            "llama_server": " ".join(
                ["llama-server", "-m", base_entry, *(part for name in adapters for part in ("--lora", name)),
                 "--lora-init-without-apply"]
            ),
            "request_lora_field": [{"id": t, "scale": f"lambda_{t}"} for t in range(len(tasks))],
            "default_preference": index.get("default_preference"),
        }
        with open(os.path.join(staging, GGUF_INDEX), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
    return out_dir


class GGUFFront:
    """A ``llama_cpp.Llama`` on the GGUF base with every task adapter loaded; the preference sets their scales.

    Build it with :func:`load_gguf_front`. ``front.llama`` is the ``Llama`` object (``eval``, ``scores``,
    ``create_completion``, ...); ``front.set_preference(lambda)`` applies adapter ``t`` with the scale ``lambda_t``
    to the context, for every later call. One context holds one preference at a time: serve concurrent
    preferences with llama.cpp's server and its per-request ``lora`` field.
    """

    def __init__(self, llama: Any, adapters: list, tasks: list[str]):
        self.llama = llama
        self.tasks = list(tasks)
        self._adapters = adapters
        self._preference: list[float] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def set_preference(self, pref: Any) -> None:
        """Apply the adapters with the scales ``pref`` (a sequence, array, tensor of shape ``(T,)`` or a dict)."""
        import ctypes

        import llama_cpp

        values = validate_preference(pref, self.num_tasks, self.tasks, name="pref")
        if values.dim() != 1:
            raise ValueError(f"pref must be one preference of shape ({self.num_tasks},), got {tuple(values.shape)}.")
        scales = [float(value) for value in values.tolist()]
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * len(self._adapters))(*self._adapters)
        c_scales = (ctypes.c_float * len(scales))(*scales)
        if llama_cpp.llama_set_adapters_lora(self.llama._ctx.ctx, adapters, len(self._adapters), c_scales):
            raise RuntimeError("llama_set_adapters_lora failed.")
        self._preference = scales

    def get_preference(self) -> list[float] | None:
        """The scales in force (None before the first :meth:`set_preference`: the base model alone)."""
        return None if self._preference is None else list(self._preference)

    def close(self) -> None:
        """Detach the adapters from the context and free the model (llama.cpp frees its adapters with it)."""
        import llama_cpp

        if self._adapters:
            llama_cpp.llama_set_adapters_lora(self.llama._ctx.ctx, None, 0, None)
            self._adapters = []
        self.llama.close()

    def __enter__(self) -> GGUFFront:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_gguf_front(gguf_dir: str | os.PathLike, **llama_kwargs: Any) -> GGUFFront:
    """Open a folder :func:`export_task_loras_gguf` wrote with ``llama-cpp-python``; no adapter applied yet.

    Args:
        gguf_dir: the folder holding ``palora_gguf.json``.
        **llama_kwargs: passed to ``llama_cpp.Llama`` (``n_ctx``, ``n_threads``, ``logits_all``, ``verbose``, ...).

    Raises:
        ImportError: ``llama_cpp`` is not installed (the extra ``[llamacpp]``).
        ValueError: the folder holds no index, or a listed file is missing.
        RuntimeError: llama.cpp could not load an adapter.
    """
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(
            "load_gguf_front needs llama-cpp-python: pip install 'peft-palora[llamacpp]'."
        ) from error
    if not isinstance(gguf_dir, (str, os.PathLike)):
        raise TypeError(f"`gguf_dir` must be a path, got {type(gguf_dir).__name__}.")
    gguf_dir = os.fspath(gguf_dir)
    manifest = read_json(os.path.join(gguf_dir, GGUF_INDEX), what="GGUF front index")
    tasks, adapters = manifest.get("tasks"), manifest.get("adapters")
    if not isinstance(tasks, list) or not isinstance(adapters, list) or len(tasks) != len(adapters):
        raise ValueError(f"{os.path.join(gguf_dir, GGUF_INDEX)} must list as many adapters as tasks.")
    paths = [os.path.join(gguf_dir, name) for name in [manifest.get("base"), *adapters]]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"GGUF front {gguf_dir!r}: missing files {missing}.")
    llama = llama_cpp.Llama(model_path=paths[0], **llama_kwargs)
    loaded = []
    try:
        for path in paths[1:]:
            adapter = llama_cpp.llama_adapter_lora_init(llama._model.model, path.encode("utf-8"))
            if not adapter:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path!r}.")
            loaded.append(adapter)
    except BaseException:
        for adapter in loaded:
            llama_cpp.llama_adapter_lora_free(adapter)
        llama.close()
        raise
    return GGUFFront(llama, loaded, tasks)

