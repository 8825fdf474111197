"""Tests for peft_palora.fronts.plotting: valid PNGs of the expected size, written atomically, no pyplot side effects."""

from __future__ import annotations

import os
import struct

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from peft_palora.fronts.plotting import plot_front_2d, plot_front_3d, plot_metrics_vs_preference

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 150


def png_size(path: str) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG stores right after the signature."""
    with open(path, "rb") as handle:
        header = handle.read(24)
    assert header[:8] == PNG_SIGNATURE
    assert header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def assert_sane_png(path: str, expected_inches: tuple[float, float]) -> None:
    assert os.path.isfile(path)
    assert 10_000 < os.path.getsize(path) < 5_000_000
    width, height = png_size(path)
    assert (width, height) == (round(expected_inches[0] * DPI), round(expected_inches[1] * DPI))
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    # Not a blank canvas: a drawing has many distinct colours (RGBA packed into one integer per pixel).
    packed = np.ascontiguousarray((pixels * 255).round().astype(np.uint8)).view(np.uint32)
    assert len(np.unique(packed)) > 50


def no_temporary_files(directory) -> bool:
    return not [name for name in os.listdir(directory) if name.startswith(".tmp-")]


def two_task_front():
    weights = np.linspace(0.0, 1.0, 11)
    preferences = np.stack([weights, 1.0 - weights], axis=1)
    points = np.stack([0.2 + 0.6 * (1 - weights) ** 1.5, 0.25 + 0.6 * weights**1.5], axis=1)
    points[3] += [0.15, 0.1]  # one dominated point
    return points, preferences


def three_task_front():
    grid = np.array([[i, j, 6 - i - j] for i in range(7) for j in range(7 - i)], dtype=float) / 6
    return 1.0 - 0.7 * grid + 0.05 * np.sin(np.arange(len(grid)))[:, None], grid


@pytest.fixture(autouse=True)
def pyplot_untouched():
    """The plotting functions must not change the backend or leave pyplot figures open."""
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    figures = plt.get_fignums()
    yield
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figures


def test_plot_front_2d(tmp_path):
    points, preferences = two_task_front()
    path = tmp_path / "nested" / "front.png"  # parent directories are created
    result = plot_front_2d(points, preferences, path=path, labels=["loss a", "loss b"], maximize=False)
    assert result == str(path)
    assert_sane_png(result, (6.4, 4.8))
    assert no_temporary_files(path.parent)


def test_plot_front_2d_without_preferences_from_a_dataframe(tmp_path):
    points, _ = two_task_front()
    table = pd.DataFrame(points, columns=["acc_a", "acc_b"])
    assert_sane_png(plot_front_2d(table, path=tmp_path / "plain.png"), (6.4, 4.8))


def test_plot_front_2d_replaces_an_existing_file(tmp_path):
    points, preferences = two_task_front()
    path = tmp_path / "front.png"
    path.write_bytes(b"old content")
    plot_front_2d(points, preferences, path=path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(os.listdir(tmp_path)) == ["front.png"]


def test_plot_front_3d(tmp_path):
    points, preferences = three_task_front()
    with_preferences = plot_front_3d(
        points,
        preferences,
        path=tmp_path / "front3d.png",
        labels=["seg loss", "depth loss", "normals loss"],
        task_names=["seg", "depth", "normals"],
        maximize=False,
    )
    assert_sane_png(with_preferences, (12.0, 5.5))
    assert_sane_png(plot_front_3d(points, path=tmp_path / "plain3d.png"), (7.0, 6.0))
    assert no_temporary_files(tmp_path)


def test_plot_metrics_vs_preference_from_each_table_kind(tmp_path):
    import datasets

    weights = np.linspace(0.0, 1.0, 11)
    columns = {
        "pref_a": weights,
        "pref_b": 1.0 - weights,
        "acc_a": 0.5 + 0.4 * weights,
        "loss_a": 1.0 - weights,
        "acc_b": 0.9 - 0.4 * weights,
    }
    for name, table in {
        "frame": pd.DataFrame(columns),
        "dataset": datasets.Dataset.from_dict({key: value.tolist() for key, value in columns.items()}),
        "dict": columns,
    }.items():
        assert_sane_png(plot_metrics_vs_preference(table, path=tmp_path / f"{name}.png"), (8.4, 3.8))
    # An explicit mapping draws only the tasks it names.
    only_b = plot_metrics_vs_preference(columns, path=tmp_path / "b.png", metrics={"b": "acc_b"})
    assert_sane_png(only_b, (4.2, 3.8))


def test_plot_metrics_vs_preference_three_tasks(tmp_path):
    points, grid = three_task_front()
    table = pd.DataFrame(
        {"pref_seg": grid[:, 0], "pref_depth": grid[:, 1], "pref_normals": grid[:, 2]}
        | {f"{task}_loss": points[:, t] for t, task in enumerate(["seg", "depth", "normals"])}
    )
    assert_sane_png(plot_metrics_vs_preference(table, path=tmp_path / "three.png"), (12.6, 3.8))


def test_plotting_input_errors(tmp_path):
    points, preferences = two_task_front()
    three_points, three_preferences = three_task_front()
    with pytest.raises(ValueError, match="must end with .png"):
        plot_front_2d(points, path=tmp_path / "front.jpg")
    with pytest.raises(ValueError, match="2 objectives"):
        plot_front_2d(three_points, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="preferences.*10 rows but there are 11 points"):
        plot_front_2d(points, preferences[:10], path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels.*one name per objective"):
        plot_front_2d(points, path=tmp_path / "x.png", labels=["only one"])
    with pytest.raises(ValueError, match="task_names.*one name per task"):
        plot_front_2d(points, preferences, path=tmp_path / "x.png", task_names=["a"])
    with pytest.raises(ValueError, match="3 objectives"):
        plot_front_3d(points, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="3 columns"):
        plot_front_3d(three_points, three_preferences[:, :2], path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        plot_front_2d([[1.0, float("nan")]], path=tmp_path / "x.png")
    table = {"pref_a": [0.0, 1.0], "pref_b": [1.0, 0.0], "score": [0.1, 0.2]}
    with pytest.raises(ValueError, match="no metric column found for task 'a'"):
        plot_metrics_vs_preference(table, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="lacks"):
        plot_metrics_vs_preference(table, path=tmp_path / "x.png", metrics={"a": "missing"})
    with pytest.raises(ValueError, match="no `pref_<task>`"):
        plot_metrics_vs_preference({"score": [1.0]}, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="tasks \\['c'\\]"):
        plot_metrics_vs_preference(table, path=tmp_path / "x.png", metrics={"c": "score"})
    with pytest.raises(TypeError, match="table"):
        plot_metrics_vs_preference([1, 2], path=tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")
