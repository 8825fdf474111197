"""Atomic file writes: a crash mid-save never leaves a half-written file in place of a good one.

Every write goes to a temporary file in the destination's own directory (so the final ``os.replace`` is a rename
within one file system, which POSIX makes atomic) and is flushed to disk before the rename.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors.torch import save_file


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _temp_path_beside(path: str, suffix: str) -> str:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(handle)
    return tmp_path


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    tmp_path = _temp_path_beside(path, ".txt")
    try:
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        _remove_quietly(tmp_path)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically."""
    tmp_path = _temp_path_beside(path, ".safetensors")
    try:
        save_file(tensors, tmp_path, metadata=metadata)
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        _remove_quietly(tmp_path)
        raise


@contextmanager
def atomic_directory(target: str) -> Iterator[str]:
    """Yield a staging directory; on success move every file written there into ``target``, each atomically.

    Used to make savers that write several files with plain ``open`` (PEFT's ``save_pretrained``) crash-safe: each
    file of the bundle is either the old complete one or the new complete one, never a torn write.
    """
    os.makedirs(target, exist_ok=True)
    staging = tempfile.mkdtemp(dir=target, prefix=".tmp-save-")
    try:
        yield staging
        for root, _, files in os.walk(staging):
            relative = os.path.relpath(root, staging)
            destination_dir = target if relative == "." else os.path.join(target, relative)
            os.makedirs(destination_dir, exist_ok=True)
            for name in files:
                source = os.path.join(root, name)
                _fsync_file(source)
                os.replace(source, os.path.join(destination_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
