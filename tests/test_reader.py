"""The npe2 reader (landmark files as a Points layer) and the plugin manifest."""

import importlib.util
import shutil
import subprocess

import numpy as np
import pytest
from conftest import write_csv

from napari_glimpse._reader import get_reader, read_landmarks
from napari_glimpse.landmarks import ISBI_LANDMARKS


def _isbi_txt(path, pts, n_class_lines=8):
    lines = [f"{x},{y}" for x, y in pts] + ["1"] * n_class_lines
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kaggle_csv_single_image(tmp_path):
    c = np.array([[[10.0, 20.0], [30.0, 40.0], [55.5, 66.0]]])
    p = write_csv(tmp_path / "pred.csv", ["a.png"], c)
    reader = get_reader(str(p))
    assert callable(reader)
    layers = reader(str(p))
    assert len(layers) == 1
    data, kwargs, kind = layers[0]
    assert kind == "points"
    # napari points are (row, col) = (y, x)
    np.testing.assert_array_equal(data, [[20, 10], [40, 30], [66, 55.5]])
    assert kwargs["name"] == "pred"
    assert list(kwargs["features"]["landmark"]) == ["L1", "L2", "L3"]
    assert list(kwargs["features"]["index"]) == [1, 2, 3]


def test_kaggle_csv_several_images_one_plane_each(tmp_path):
    c = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    p = write_csv(tmp_path / "two.csv", ["a.png", "b.png"], c)
    data, kwargs, kind = read_landmarks(str(p))[0]
    assert kind == "points"
    np.testing.assert_array_equal(data, [[0, 2, 1], [0, 4, 3], [1, 6, 5], [1, 8, 7]])
    f = kwargs["features"]
    assert list(f["image"]) == ["a.png", "a.png", "b.png", "b.png"]
    assert list(f["index"]) == [1, 2, 1, 2]


def test_19_landmarks_get_isbi_names(tmp_path):
    c = np.arange(38, dtype=float).reshape(1, 19, 2)
    p = write_csv(tmp_path / "isbi.csv", ["001.jpg"], c)
    data, kwargs, _ = get_reader(str(p))(str(p))[0]
    assert list(kwargs["features"]["landmark"]) == list(ISBI_LANDMARKS)
    np.testing.assert_array_equal(data[0], [1, 0])  # landmark 1 at x=0, y=1


def test_isbi_txt(tmp_path):
    pts = [(100 + i, 900 - i) for i in range(19)]
    p = _isbi_txt(tmp_path / "001.txt", pts)
    reader = get_reader(str(p))
    assert callable(reader)
    data, kwargs, kind = reader(str(p))[0]
    assert kind == "points" and kwargs["name"] == "001"
    assert data.shape == (19, 2)
    np.testing.assert_array_equal(data[0], [900, 100])  # (y, x)
    np.testing.assert_array_equal(data[18], [882, 118])


def test_images_open_as_grey_image_layers(tmp_path):
    from conftest import save_png

    img = np.random.default_rng(0).integers(0, 256, size=(80, 90), dtype=np.uint8)
    p = save_png(tmp_path / "ceph.png", img)
    reader = get_reader(str(p))
    assert callable(reader)
    data, kwargs, kind = reader(str(p))[0]
    assert kind == "image"
    np.testing.assert_array_equal(data, img)
    assert kwargs["name"] == "ceph"


def test_other_files_are_declined(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    (tmp_path / "other.csv").write_text("name,x,y\na,1,2\n")
    (tmp_path / "data.json").write_text("{}")
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "dir.png").mkdir()
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "other.csv")) is None
    assert get_reader(str(tmp_path / "data.json")) is None
    assert get_reader(str(tmp_path / "missing.csv")) is None
    assert get_reader(str(tmp_path / "missing.png")) is None
    assert get_reader(str(tmp_path / "dir.csv")) is None
    assert get_reader(str(tmp_path / "dir.png")) is None
    assert get_reader([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) is None
    short = _isbi_txt(tmp_path / "short.txt", [(1, 2)] * 5, n_class_lines=0)
    assert get_reader(str(short)) is None


def test_points_layer_written_back_gives_the_same_csv(tmp_path):
    writer = pytest.importorskip("napari_glimpse._writer")
    c = np.array([[[1.5, 2.0], [3.0, 4.25]], [[5.0, 6.0], [7.0, 8.0]]])
    p = write_csv(tmp_path / "two.csv", ["a.png", "b.png"], c)
    data, kwargs, _ = read_landmarks(str(p))[0]
    out = tmp_path / "back.csv"
    writer.write_landmarks(str(out), data, kwargs)
    from napari_glimpse.io import read_landmarks_csv

    names, coords = read_landmarks_csv(out)
    assert names == ["a.png", "b.png"]
    np.testing.assert_allclose(coords, c)


# ---------------------------------------------------------------------------- manifest
npe2_missing = importlib.util.find_spec("npe2") is None


@pytest.mark.skipif(npe2_missing, reason="npe2 not installed (pip install -e '.[test]')")
def test_manifest_from_distribution():
    import npe2

    pm = npe2.PluginManifest.from_distribution("napari-glimpse")
    assert pm.name == "napari-glimpse"
    readers = pm.contributions.readers
    assert readers and readers[0].command == "napari-glimpse.get_reader"
    assert {"*.csv", "*.txt"} <= set(readers[0].filename_patterns)
    cmds = {c.id: c.python_name for c in pm.contributions.commands}
    assert cmds["napari-glimpse.get_reader"] == "napari_glimpse._reader:get_reader"
    # every python_name outside the Qt widgets resolves to a callable
    import importlib

    for name in cmds.values():
        if name.startswith("napari_glimpse._widgets"):
            continue
        mod, attr = name.split(":")
        assert callable(getattr(importlib.import_module(mod), attr))


@pytest.mark.skipif(npe2_missing or shutil.which("npe2") is None, reason="npe2 command not installed")
def test_npe2_validate():
    r = subprocess.run(["npe2", "validate", "napari-glimpse"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
