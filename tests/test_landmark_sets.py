"""Landmark sets (issue 24): the set file, a data folder's landmarks.json, a model's set, CSVs of
any number of landmarks with errors that name the landmark, the CLI on a 5-landmark set, and a
model of one set refused on data of another. Tiny synthetic data (tests/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_MODEL_CONFIG, save_png, synthetic_image, write_csv

from napari_glimpse.cli import main
from napari_glimpse.errors import GlimpseError
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset, read_landmarks_csv, write_landmarks_csv
from napari_glimpse.landmark_set import (
    ISBI19,
    Landmark,
    LandmarkSet,
    check_match,
    find_landmark_set,
    load_landmark_set,
    save_landmark_set,
    set_for_count,
)
from napari_glimpse.landmarks import ISBI_ABBREVIATIONS, ISBI_LANDMARKS

LAB5 = {"name": "lab5", "description": "five points of one study",
        "landmarks": [{"name": "Sella", "label": "S"}, {"name": "Nasion", "label": "N", "colour": "#ff0000"},
                      "Menton", {"name": "Gonion", "label": "Go", "description": "the angle of the jaw"},
                      {"name": "Pogonion", "label": "Pog", "color": "#0f0"}]}
MEANS5 = np.array([[60.0, 60.0], [190.0, 70.0], [128.0, 128.0], [70.0, 190.0], [190.0, 190.0]])


def make_set_data(root, lset: dict | None = LAB5, seed: int = 0) -> dict:
    """``root/images``, ``train.csv`` (6 images) and ``test1.csv`` (3) of 5 synthetic landmarks, and
    ``root/landmarks.json`` (``lset``; none if None)."""
    rng = np.random.default_rng(seed)
    out = {"root": root}
    for split, n, first in (("train", 6, 1), ("test1", 3, 101)):
        coords = np.round(MEANS5[None] + rng.uniform(-15, 15, size=(n, 5, 2)))
        names = [f"{first + i:03d}.png" for i in range(n)]
        for name, c in zip(names, coords):
            save_png(root / "images" / name, synthetic_image(c, rng, 256))
        write_csv(root / f"{split}.csv", names, coords)
        out[split] = (names, coords)
    if lset is not None:
        (root / "landmarks.json").write_text(json.dumps(lset))
    return out


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(capsys, *args) -> str:
    rc, out, err = run(capsys, *args)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1].split("\r")[-1]
    assert line.startswith("napari-glimpse: error: ")
    return line


# ----------------------------------------------------------------------------- the set itself
def test_isbi19_is_the_projects_19():
    from napari_glimpse._layer_data import abbreviations, landmark_colors

    assert ISBI19.name == "isbi19" and ISBI19.is_isbi and len(ISBI19) == 19
    assert ISBI19.names == ISBI_LANDMARKS and ISBI19.labels == ISBI_ABBREVIATIONS
    assert list(ISBI19.labels) == abbreviations(ISBI_LANDMARKS)
    rgb = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in ISBI19.colours]) / 255
    np.testing.assert_allclose(rgb, landmark_colors(19)[:, :3])
    assert set_for_count(19) is ISBI19 and set_for_count(4).names == ("L1", "L2", "L3", "L4")


def test_a_set_round_trips_and_fills_its_defaults(tmp_path):
    lset = LandmarkSet.from_dict(LAB5)
    assert lset.names == ("Sella", "Nasion", "Menton", "Gonion", "Pogonion")
    assert lset.labels == ("S", "N", "Menton", "Go", "Pog")  # the name where no label is given
    assert lset.colours[1] == "#ff0000" and lset.colours[4] == "#0f0" and lset.colours[2] == ISBI19.colours[2]
    assert lset.landmarks[3] == Landmark("Gonion", "Go", ISBI19.colours[3], "the angle of the jaw")
    assert not lset.is_isbi and lset.describe() == "'lab5' (5 landmarks)"
    save_landmark_set(lset, tmp_path / "landmarks.json")
    assert load_landmark_set(tmp_path / "landmarks.json") == lset == find_landmark_set(tmp_path)
    assert json.loads((tmp_path / "landmarks.json").read_text())["landmarks"][0] == {
        "name": "Sella", "label": "S", "colour": ISBI19.colours[0], "description": ""}
    assert find_landmark_set(tmp_path / "nowhere") is None


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(landmarks=[]), "landmark set 'lab5' has no landmarks"),
    (lambda d: d["landmarks"].append("nasion"), "landmark 6 (nasion): name 'nasion' is also landmark 2's"),
    (lambda d: d["landmarks"].append({"name": "Porion", "label": "Go"}), "landmark 6 (Porion): label 'Go' is also"),
    (lambda d: d["landmarks"].append({"name": "Porion", "colour": "blue"}),
     "landmark 6 (Porion): colour 'blue' is not a hex colour like '#1f77b4'"),
    (lambda d: d["landmarks"].append({"label": "X"}), "landmark set 'lab5', landmark 6: no name"),
    (lambda d: d.pop("name"), "a landmark set needs a name"),
    (lambda d: d.pop("landmarks"), "not a landmark set"),
])
def test_a_bad_set_is_one_clear_line(tmp_path, change, message):
    d = json.loads(json.dumps(LAB5))
    change(d)
    (tmp_path / "landmarks.json").write_text(json.dumps(d))
    with pytest.raises(GlimpseError) as exc:
        load_landmark_set(tmp_path / "landmarks.json")
    assert message in str(exc.value) and "landmarks.json" in str(exc.value) and "\n" not in str(exc.value)


def test_a_set_file_that_is_not_json(tmp_path):
    (tmp_path / "landmarks.json").write_text("{name: lab5")
    with pytest.raises(GlimpseError, match=r"landmarks\.json: not valid JSON"):
        load_landmark_set(tmp_path / "landmarks.json")


def test_check_match_names_both_sets():
    lab5 = LandmarkSet.from_dict(LAB5)
    check_match(lab5, lab5, 5)
    check_match(lab5, None, 5)  # data that declares no set: its count must match
    with pytest.raises(GlimpseError, match=r"^model 'isbi19' \(19 landmarks\) does not match the data's landmark "
                                           r"set 'lab5' \(5 landmarks\): a model finds the landmarks of its own set"):
        check_match(ISBI19, lab5, 5)
    other = LandmarkSet.from_dict({**LAB5, "name": "other5", "landmarks": ["Sella", "Porion", "A", "B", "C"]})
    with pytest.raises(GlimpseError, match=r"model 'lab5' \(5 landmarks\) does not match the data's landmark set "
                                           r"'other5' \(5 landmarks\): landmark 2 is 'Nasion' in the model, 'Porion'"):
        check_match(lab5, other, 5)


# ------------------------------------------------------------------------------------ CSVs
def test_csvs_hold_any_number_of_landmarks(tmp_path):
    coords = np.arange(2 * 7 * 2, dtype=float).reshape(2, 7, 2) + 0.25
    coords[1, 3] = np.nan  # absent
    write_landmarks_csv(tmp_path / "p.csv", ["a.png", "b.png"], np.nan_to_num(coords, nan=1.0))
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == ",".join(
        ["image_path"] + [f"{k}_{c}" for k in range(1, 8) for c in "xy"])
    write_csv(tmp_path / "q.csv", ["a.png", "b.png"], coords, fmt="{:g}")
    (tmp_path / "q.csv").write_text((tmp_path / "q.csv").read_text().replace(",nan", ","))
    names, back = read_landmarks_csv(tmp_path / "q.csv")
    np.testing.assert_array_equal(back, coords)


def test_csv_errors_name_the_landmark(tmp_path):
    coords = np.tile(MEANS5, (2, 1, 1))
    write_csv(tmp_path / "train.csv", ["a.png", "b.png"], coords)
    text = (tmp_path / "train.csv").read_text().replace("b.png,60,60,190,70,128,128", "b.png,60,60,190,70,128,x")
    (tmp_path / "train.csv").write_text(text)
    lab5 = LandmarkSet.from_dict(LAB5)
    with pytest.raises(GlimpseError, match=r"train\.csv:3: non-numeric value 'x' \(image b\.png, column 3_y "
                                           r"\(Menton\)\)"):
        read_landmarks_csv(tmp_path / "train.csv", landmark_set=lab5)
    isbi = np.tile(np.arange(38.0).reshape(19, 2), (1, 1, 1))
    write_csv(tmp_path / "isbi.csv", ["a.png"], isbi)
    (tmp_path / "isbi.csv").write_text((tmp_path / "isbi.csv").read_text().replace(",21,", ",inf,"))
    with pytest.raises(GlimpseError, match=r"column 11_y \(Lower incisal incision\): 'inf' is not a finite number"):
        read_landmarks_csv(tmp_path / "isbi.csv")  # 19 landmarks without a set: the ISBI 19
    (tmp_path / "landmarks.json").write_text(json.dumps(LAB5))
    with pytest.raises(GlimpseError, match=r"isbi\.csv has 19 landmarks \(38 coordinate columns\), the data's "
                                           r"landmark set 'lab5' \(landmarks\.json\) has 5"):
        load_dataset(tmp_path / "isbi.csv")


def test_a_data_folder_carries_its_set(tmp_path):
    make_set_data(tmp_path / "lab5")
    ds = load_dataset(tmp_path / "lab5", "train")
    assert ds.landmark_set == LandmarkSet.from_dict(LAB5) and ds.landmark_names == ds.landmark_set.names
    assert ds.subset([0, 1]).landmark_set == ds.landmark_set
    assert load_dataset(tmp_path / "lab5" / "test1.csv").landmark_set == ds.landmark_set
    make_set_data(tmp_path / "plain", None)
    plain = load_dataset(tmp_path / "plain", "train")
    assert plain.landmark_set is None and plain.landmark_names == ("L1", "L2", "L3", "L4", "L5")


# ------------------------------------------------------------------------------------ models
def test_the_shipped_model_is_the_isbi19():
    assert GlimpseModel.load(None, "cpu").landmark_set == ISBI19


def test_a_set_round_trips_through_a_model_file(tmp_path):
    from dataclasses import replace

    from napari_glimpse.training import TrainConfig, train

    make_set_data(tmp_path / "lab5")
    ds = load_dataset(tmp_path / "lab5", "train")
    model = train(ds, tmp_path / "m.pt", replace(TINY_MODEL_CONFIG, n_landmarks=5),
                  TrainConfig(batch_size=4, max_steps=1, save_every_s=1e9), device="cpu", progress=False)
    assert model.meta["landmark_set"] == ds.landmark_set.to_dict()
    back = GlimpseModel.load(tmp_path / "m.pt", "cpu")
    assert back.landmark_set == ds.landmark_set and back.landmark_names == ds.landmark_names
    back.meta.pop("landmark_set")  # a model written before sets: its names, an unnamed set, in the file again
    back.save(tmp_path / "old.pt")
    assert GlimpseModel.load(tmp_path / "old.pt", "cpu").landmark_set.names == ds.landmark_names
    back.meta["landmark_set"] = {**LAB5, "landmarks": LAB5["landmarks"][:4] + ["Porion"]}
    with pytest.raises(GlimpseError, match=r"its landmark set 'lab5' \(5 landmarks\) does not name its 5 landmarks"):
        back.to_checkpoint()


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def lab5_cli(tmp_path_factory):
    """A model of the lab5 set trained from the CLI (coarse and fine stages, 2 glimpse steps)."""
    root = tmp_path_factory.mktemp("lab5cli")
    data = make_set_data(root / "data")
    rc = main(["train", "--data", str(data["root"]), "--out", str(root / "m.pt"), "--max-steps", "2",
               "--coarse-minutes", "0.01", "--fine-minutes", "0.01", "--levels", "3", "--threads", "1"])
    assert rc == 0
    return {"root": root, "data": data, "model": root / "m.pt"}


def test_a_five_landmark_set_trains_predicts_and_evaluates(capsys, lab5_cli, tmp_path):
    model = GlimpseModel.load(lab5_cli["model"], "cpu")
    assert model.landmark_set == LandmarkSet.from_dict(LAB5) and model.coarse is not None and model.fine is not None
    data = lab5_cli["data"]["root"]
    rc, out, err = run(capsys, "predict", data / "images" / "101.png", data / "images" / "102.png",
                       "--model", lab5_cli["model"], "--out", tmp_path / "p.csv")
    assert rc == 0, err
    names, coords = read_landmarks_csv(tmp_path / "p.csv")
    assert names == ["101.png", "102.png"] and coords.shape == (2, 5, 2) and np.isfinite(coords).all()
    assert (tmp_path / "p_confidence.csv").read_text().splitlines()[0] == (
        "image_path,1_confidence,2_confidence,3_confidence,4_confidence,5_confidence,facing")
    rc, out, err = run(capsys, "evaluate", "--data", data, "--model", lab5_cli["model"], "--json", tmp_path / "r.json")
    assert rc == 0, err
    assert "Pogonion" in out and "measurement classes" not in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["n_images"] == 3 and "classification" not in res
    line = error_line(capsys, "predict", data / "images" / "101.png", "--model", lab5_cli["model"],
                      "--out", tmp_path / "m.csv", "--measures", tmp_path / "me.csv")
    assert "--measures needs a model of the ISBI 19 landmarks; this one's landmark set is 'lab5' (5 landmarks)" in line


def test_a_model_of_one_set_on_data_of_another(capsys, lab5_cli, tiny_data, tmp_path):
    line = error_line(capsys, "evaluate", "--data", lab5_cli["data"]["root"])  # the shipped model
    assert "model 'isbi19' (19 landmarks) does not match the data's landmark set 'lab5' (5 landmarks)" in line
    line = error_line(capsys, "finetune", "--data", lab5_cli["data"]["root"], "--out", tmp_path / "t.pt")
    assert "model 'isbi19' (19 landmarks) does not match the data's landmark set 'lab5' (5 landmarks)" in line
    line = error_line(capsys, "evaluate", "--data", tiny_data["root"], "--model", lab5_cli["model"])
    assert "model 'lab5' (5 landmarks) does not match the data (3 landmarks; no landmarks.json" in line
    other = {**LAB5, "name": "other5", "landmarks": ["Sella", "Porion", "Menton", "Gonion", "Pogonion"]}
    make_set_data(tmp_path / "other", other)
    for cmd in (["evaluate"], ["finetune", "--out", tmp_path / "t.pt", "--max-steps", "1"]):
        line = error_line(capsys, *cmd, "--data", tmp_path / "other", "--model", lab5_cli["model"])
        assert ("model 'lab5' (5 landmarks) does not match the data's landmark set 'other5' (5 landmarks): "
                "landmark 2 is 'Nasion' in the model, 'Porion' in the data") in line
    line = error_line(capsys, "train", "--data", tmp_path / "other", "--init", lab5_cli["model"], "--out",
                      tmp_path / "i.pt", "--max-steps", "1")
    assert "does not match the training data's landmark set 'other5'" in line
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "i.pt").exists()
