"""Annotating from zero without Qt (napari_glimpse.annotate): a set typed in, images logged with no
point, placed, accepted and exported as the set's CSV; the training command the GUI runs, and
``train --recipe default --progress-json`` on that export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import draw_blob, save_png

from napari_glimpse.annotate import (
    is_from_zero,
    next_to_place,
    parse_landmark_lines,
    save_folder_set,
    set_beside_labels,
    set_from_text,
    set_to_text,
    start_from_zero,
    train_command,
)
from napari_glimpse.cli import main
from napari_glimpse.corrections import CorrectionLog
from napari_glimpse.errors import GlimpseError
from napari_glimpse.io import load_dataset
from napari_glimpse.landmark_set import palette_colour

TEXT = "# my study\n1. Sella, S\nNasion;N\n\nMenton\tMe\nGonion\n"


def test_a_set_typed_one_landmark_a_line():
    assert parse_landmark_lines(TEXT) == [("Sella", "S"), ("Nasion", "N"), ("Menton", "Me"), ("Gonion", "Gonion")]
    lset = set_from_text(" lab4 ", TEXT)
    assert lset.name == "lab4" and lset.labels == ("S", "N", "Me", "Gonion")
    assert lset.colours == tuple(palette_colour(k) for k in range(4))
    assert set_from_text("lab4", set_to_text(lset)) == lset
    with pytest.raises(GlimpseError, match="label 'S' is also landmark 1"):
        set_from_text("x", "Sella, S\nSubspinale, S")
    with pytest.raises(GlimpseError, match="needs a name"):
        set_from_text("", TEXT)
    with pytest.raises(GlimpseError, match="no landmarks"):
        set_from_text("x", "\n# nothing\n")


def test_next_to_place_wraps_in_landmark_order():
    assert next_to_place([1, 3], None, 4) == 1
    assert next_to_place([1, 3], 1, 4) == 3 and next_to_place([1, 3], 3, 4) == 1
    assert next_to_place([1, 3], 2, 4, step=-1) == 1 and next_to_place([1, 3], 0, 4, step=-1) == 3
    assert next_to_place([], 2, 4) is None and next_to_place([2], 2, 4) == 2


def _images(folder, n=2, h=320, w=256, seed=0):
    rng = np.random.default_rng(seed)
    truth = []
    for i in range(n):
        c = np.array([[60, 70], [190, 80], [150, 260], [70, 230]], float) + rng.uniform(-8, 8, (4, 2))
        img = rng.normal(40, 8, size=(h, w)).clip(0, 255)
        for k, (x, y) in enumerate(c):
            draw_blob(img, k % 3, x, y)
        save_png(folder / f"{i + 1:03d}.png", img.astype(np.uint8))
        truth.append(np.round(c))
    return truth


def test_annotated_from_zero_exported_and_trained(tmp_path, capsys):
    folder = tmp_path / "clinic"
    truth = _images(folder)
    lset = set_from_text("lab4", TEXT)
    save_folder_set(lset, folder)
    log = CorrectionLog(folder, lset.names)
    for i, c in enumerate(truth):
        image = folder / f"{i + 1:03d}.png"
        assert start_from_zero(log, image) is not None and start_from_zero(log, image) is None  # once
        assert is_from_zero(log, image) and log.state.missing(image) == [0, 1, 2, 3]
        log.add(image, 2, c[2])
        with pytest.raises(GlimpseError, match=r"landmark 1 \(Sella\) and 2 more are missing"):
            log.accept(image)  # not before every landmark is placed (or absent)
        for k in (0, 3):
            log.add(image, k, c[k])
        if i == 0:
            log.add(image, 1, c[1])
        else:
            log.mark_absent(image, 1)  # Nasion not visible: an empty pair of cells
        log.accept(image)
        assert is_from_zero(log, image)  # still: no model proposed its points
    csv = log.export_training_csv()
    rows = csv.read_text().splitlines()
    assert rows[0] == "image_path,1_x,1_y,2_x,2_y,3_x,3_y,4_x,4_y" and rows[2].split(",")[3:5] == ["", ""]
    ds = load_dataset(csv)
    assert ds.landmark_set == lset and len(ds) == 2  # the set beside the CSV names its columns

    args = train_command(csv, tmp_path / "lab4.pt", 0.2, max_steps=1, spacing=0.1)
    assert args[:3] == ["-m", "napari_glimpse.cli", "train"] and args[args.index("--recipe") + 1] == "default"
    assert "--progress-json" in args and args[args.index("--nice") + 1] == "10"
    assert args[args.index("--max-steps") + 1] == "1" and args[args.index("--spacing") + 1] == "0.1"
    assert "--max-steps" not in train_command(csv, "m.pt", 30)
    with pytest.raises(GlimpseError, match="time budget"):
        train_command(csv, "m.pt", 0)

    capsys.readouterr()
    i = args.index("--nice")
    assert main(args[2:i] + args[i + 2:]) == 0  # the widget's command, in-process (pytest's priority as it is)
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    steps, done = lines[:-1], lines[-1]
    # the nets, then the recipe's tune stages: the fine nets', then the coarse net's
    assert [ln["stage"] for ln in steps] == ["coarse"] + ["fine"] * 4 + ["fine"] * 4 + ["coarse"]
    assert [ln.get("member") for ln in steps] == [None, 0, 1, 2, 3, 0, 1, 2, 3, None]
    progress = [ln["progress"] for ln in steps]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    assert all("loss" in ln and "eta_s" in ln and ln["steps"] == 1 for ln in steps)
    assert done["done"] and done["out"] == str(tmp_path / "lab4.pt") and done["summary"].startswith("recipe default")
    from napari_glimpse.inference import GlimpseModel

    model = GlimpseModel.load(tmp_path / "lab4.pt", "cpu")
    assert model.landmark_set == lset  # the new model finds the set's points
    assert model.predict(str(folder / "001.png"), spacing=0.1).final.shape == (4, 2)


def test_a_sets_labels_and_colours_on_the_canvas():
    from napari_glimpse._layer_data import landmark_content, register_labels

    names = ("Porion point X", "Basion point Y")
    c = landmark_content(np.array([[10.0, 20.0], [30.0, 40.0]]), names)
    assert list(c["features"]["abbr"]) == list(names)  # unknown names: the names themselves
    register_labels(names, ("PoX", "BaY"), ("#00ff00", "#f0f"))
    c = landmark_content(np.array([[10.0, 20.0], [np.nan, np.nan]]), names)
    assert list(c["features"]["abbr"]) == ["PoX"] and list(c["features"]["label"]) == ["PoX"]
    np.testing.assert_allclose(c["face_color"], [[0, 1, 0, 1]])


def test_a_set_is_saved_beside_labels_of_as_many_landmarks_only(tmp_path):
    """Train a model on a CSV whose folder has no landmarks.json while annotating a set of 4: the set is
    written there only for a CSV of 4 landmarks (a 19-landmark dataset got a 4-landmark landmarks.json)."""
    from napari_glimpse.io import write_landmarks_csv

    lset = set_from_text("lab4", TEXT)
    isbi = tmp_path / "isbi2015" / "train_senior.csv"
    isbi.parent.mkdir()
    write_landmarks_csv(isbi, ["001.bmp"], np.arange(38, dtype=float).reshape(1, 19, 2))
    with pytest.raises(GlimpseError, match=r"train_senior.csv has 19 landmarks .* not the 4 of landmark set 'lab4'"):
        set_beside_labels(isbi, lset)
    ours = tmp_path / "clinic" / "napari-glimpse-reviewed.csv"
    ours.parent.mkdir()
    write_landmarks_csv(ours, ["001.png"], np.arange(8, dtype=float).reshape(1, 4, 2))
    assert set_beside_labels(ours, lset) is lset
