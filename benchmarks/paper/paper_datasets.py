"""MultiFashion and Fashion+MNIST, the PaLoRA paper's other two small benchmarks, built as MultiMNIST is.

* **MultiFashion**: two Fashion-MNIST items overlaid, one in the top-left and one in the bottom-right of a 36x36
  canvas, resized to 28x28 (the pairing, the composition and the resize are those of ``recipes.multimnist``).
* **Fashion+MNIST**: an MNIST digit in the top-left and a Fashion-MNIST item in the bottom-right, same composition.

The two tasks keep MultiMNIST's names, ``left`` and ``right``: the class of the top-left image and of the
bottom-right one.

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``:
``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``), or from the folder named by ``$PALORA_FASHION_MNIST_DIR``.
The files are IDX arrays (big-endian header, then raw uint8 data), parsed here with numpy; nothing is unpickled.

Splits follow the MNIST file used for MultiMNIST (50k train / 10k validation / 10k test): the first 50,000 of
Fashion-MNIST's 60,000 training images are "train", the last 10,000 "validation", and its 10,000 test images "test".
Each split draws only on the same split of both sources, so no split shares a source image with another.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from recipes.multimnist import compose_multimnist, load_mnist_arrays, make_multimnist, multimnist_pairs

FASHION_DIR_ENV = "PALORA_FASHION_MNIST_DIR"
FASHION_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL_HINT = (
    "Fashion-MNIST comes from Debian's package dataset-fashion-mnist: `apt-get update && apt-get install -y "
    f"dataset-fashion-mnist` (or set {FASHION_DIR_ENV} to a folder holding the four *-ubyte.gz files)."
)
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NUM_TRAIN = 50_000  # the rest of Fashion-MNIST's 60k training images is the validation split
SPLITS = ("train", "validation", "test")
#: Benchmark datasets: name -> (source of the top-left image, source of the bottom-right image).
DATASETS = {
    "multimnist": ("mnist", "mnist"),
    "multifashion": ("fashion", "fashion"),
    "fashion_mnist": ("mnist", "fashion"),
}
DATASET_LABELS = {"multimnist": "MultiMNIST", "multifashion": "MultiFashion", "fashion_mnist": "Fashion+MNIST"}

# IDX type codes (third byte of the magic number) -> numpy dtype; multi-byte types are big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one IDX array (the format of the MNIST and Fashion-MNIST files) from its uncompressed bytes.

    Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32 sizes and the
    data in C order.

    Raises:
        ValueError: naming ``source``, if the header is malformed or the data has the wrong length.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}.")
    data = bytes(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source} is not an IDX file: bad magic number {data[:4]!r}")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{source} is not an IDX file: unknown type code {code:#04x}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{source} is not an IDX file: truncated header ({len(data)} bytes, {ndim} dimensions)")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{source}: shape {shape} of {dtype.str} needs {expected} bytes of data, the file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def find_fashion_dir(directory: str | os.PathLike | None = None) -> Path:
    """The folder of the four Fashion-MNIST files: ``directory``, else ``$PALORA_FASHION_MNIST_DIR``, else Debian's."""
    if directory is None:
        directory = os.environ.get(FASHION_DIR_ENV) or FASHION_DEFAULT_DIR
    folder = Path(directory).expanduser()
    missing = [name for pair in FASHION_FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files {missing} not found in {str(folder)!r}. {FASHION_INSTALL_HINT}")
    return folder


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw.startswith(b"\x1f\x8b"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip data ({error})") from None
    return parse_idx(raw, source=str(path))


@functools.lru_cache(maxsize=2)
def _load_fashion_cached(folder: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts = {}
    for part, (image_file, label_file) in FASHION_FILES.items():
        images = _read_idx(Path(folder) / image_file)
        labels = _read_idx(Path(folder) / label_file)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{image_file}: expected uint8 (N, 28, 28) images, got {images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.shape != (images.shape[0],) or labels.max(initial=0) > 9:
            raise ValueError(f"{label_file}: expected {images.shape[0]} labels in 0..9, got {labels.shape}")
        parts[part] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    (train_x, train_y), test = parts["train"], parts["test"]
    if train_x.shape[0] <= NUM_TRAIN:
        raise ValueError(
            f"Fashion-MNIST's training file has {train_x.shape[0]} images, expected more than {NUM_TRAIN}"
        )
    return {
        "train": (train_x[:NUM_TRAIN], train_y[:NUM_TRAIN]),
        "validation": (train_x[NUM_TRAIN:], train_y[NUM_TRAIN:]),
        "test": test,
    }


def load_fashion_arrays(directory: str | os.PathLike | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fashion-MNIST as ``{"train" | "validation" | "test": (uint8 images (N, 28, 28), int64 labels (N,))}``.

    N is 50000, 10000 and 10000 (see the module docstring). Cached per process; the returned tensors are copies.
    """
    folder = find_fashion_dir(directory).resolve()
    return {split: (x.clone(), y.clone()) for split, (x, y) in _load_fashion_cached(str(folder)).items()}


def _source(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (load_mnist_arrays() if name == "mnist" else load_fashion_arrays())[split]


def make_pair_dataset(
    dataset: str, split: str, num_samples: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels ``(N, 2)`` (top-left class, bottom-right class).

    ``"multimnist"`` is ``recipes.multimnist.make_multimnist`` itself. The other two pair their sources with
    ``multimnist_pairs`` (a seeded permutation per round, the top-left image ``perm[i]`` and the bottom-right one
    ``perm[i - 1]`` of the other source, which has as many images in every split) and overlay them with
    ``compose_multimnist``. Deterministic in ``(dataset, split, num_samples, seed)``.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    if dataset == "multimnist":
        columns = make_multimnist(split, num_samples=num_samples, seed=seed)[:]
        labels = torch.stack([columns["labels_left"], columns["labels_right"]], dim=1)
        return columns["pixel_values"].contiguous(), labels.contiguous()
    left_name, right_name = DATASETS[dataset]
    left_x, left_y = _source(left_name, split)
    right_x, right_y = _source(right_name, split)
    if left_x.shape[0] != right_x.shape[0]:
        raise ValueError(f"{dataset}: the two sources have {left_x.shape[0]} and {right_x.shape[0]} {split} images.")
    if num_samples is None:
        num_samples = left_x.shape[0]
    left_index, right_index = multimnist_pairs(left_x.shape[0], num_samples, seed=seed, split=split)
    images = compose_multimnist(left_x[left_index], right_x[right_index])
    labels = torch.stack([left_y[left_index], right_y[right_index]], dim=1)
    return images.contiguous(), labels.contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# MultiMNIST-3: three digits per image
# ---------------------------------------------------------------------------------------------------------------------
MULTIMNIST3_TASKS = ("left", "middle", "right")
#: Canvas of MultiMNIST-3 and the offset of each digit along the diagonal. MultiMNIST puts two 28x28 digits 6 pixels
#: apart on a 36x36 canvas (a shift of 1/6 of the canvas); three digits 7 pixels apart on a 42x42 canvas keep that
#: ratio, so neighbouring digits overlap as much as MultiMNIST's two and the first and last overlap less.
MULTIMNIST3_CANVAS = 42
MULTIMNIST3_OFFSETS = (0, 7, 14)
_DIGIT = 28
_COMPOSE_CHUNK = 8192


def multimnist3_triples(num_source: int, num_samples: int, seed: int = 0, split: str = "train") -> torch.Tensor:
    """``(num_samples, 3)`` indices of the (left, middle, right) source digits of each MultiMNIST-3 image.

    As ``recipes.multimnist.multimnist_pairs``: each round draws a seeded permutation ``perm`` and takes ``perm[i]``,
    ``perm[i - 1]`` and ``perm[i - 2]``, so within a round every digit appears once in each position and never twice
    in one image. The generator is keyed on ``(seed, split)`` (a different stream from the pairs').
    """
    for name, value, low in (("num_source", num_source, 3), ("num_samples", num_samples, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(3, SPLITS.index(split))))
    rounds = []
    for _ in range(-(-int(num_samples) // int(num_source))):
        perm = rng.permutation(int(num_source))
        rounds.append(np.stack([perm, np.roll(perm, 1), np.roll(perm, 2)], axis=1))
    return torch.from_numpy(np.concatenate(rounds)[:num_samples])


def compose_multimnist3(digits: torch.Tensor, image_size: int = 28) -> torch.Tensor:
    """Overlay triples of 28x28 digits ``(B, 3, 28, 28)`` (uint8 or floats in [0, 1]) into ``(B, 1, S, S)`` images.

    Digit ``k`` goes to ``canvas[o_k:o_k + 28, o_k:o_k + 28]`` of a black 42x42 canvas with ``o = (0, 7, 14)``; where
    digits overlap the brightest pixel wins. The canvas is resized to ``image_size`` with bicubic antialiased
    interpolation and clamped to [0, 1], as ``recipes.multimnist.compose_multimnist`` does for two digits.
    """
    if not isinstance(digits, torch.Tensor):
        raise TypeError(f"`digits` must be a tensor, got {type(digits).__name__}.")
    if digits.ndim != 4 or tuple(digits.shape[1:]) != (3, _DIGIT, _DIGIT):
        raise ValueError(f"`digits` must have shape (B, 3, 28, 28), got {tuple(digits.shape)}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive integer, got {image_size!r}.")
    out = torch.empty(digits.shape[0], 1, image_size, image_size, dtype=torch.float32)
    for start in range(0, digits.shape[0], _COMPOSE_CHUNK):
        chunk = digits[start : start + _COMPOSE_CHUNK]
        chunk = chunk.to(torch.float32) / 255 if chunk.dtype == torch.uint8 else chunk.to(torch.float32)
        canvas = torch.zeros(chunk.shape[0], 1, MULTIMNIST3_CANVAS, MULTIMNIST3_CANVAS)
        for k, offset in enumerate(MULTIMNIST3_OFFSETS):
            region = canvas[:, 0, offset : offset + _DIGIT, offset : offset + _DIGIT]
            torch.maximum(region, chunk[:, k], out=region)
        resized = torch.nn.functional.interpolate(
            canvas, size=(image_size, image_size), mode="bicubic", antialias=True
        )
        out[start : start + _COMPOSE_CHUNK] = resized.clamp_(0, 1)
    return out


def make_multimnist3(split: str, num_samples: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiMNIST-3: images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels ``(N, 3)`` (left, middle, right digit).

    The digits are those of the MNIST file behind ``recipes.multimnist`` (50k train / 10k validation / 10k test);
    each split uses only its own digits. ``N`` defaults to the split's number of digits. Deterministic in
    ``(split, num_samples, seed)``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    images, labels = load_mnist_arrays()[split]
    if num_samples is None:
        num_samples = images.shape[0]
    index = multimnist3_triples(images.shape[0], num_samples, seed=seed, split=split)
    composed = compose_multimnist3(images[index], image_size=28)
    return composed.contiguous(), labels[index].contiguous()
