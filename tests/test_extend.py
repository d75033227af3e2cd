"""Extending a model with new landmarks (issue 24): new heads keep the old answers exactly, the
original set is replayed with the new landmarks absent, ``finetune --extend`` writes a model of the
larger set that predicts it, and the errors name what is wrong. Tiny synthetic data
(tests/conftest.py: 3 landmarks, L1 L2 L3)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import write_csv

from napari_glimpse.cli import main
from napari_glimpse.errors import GlimpseError
from napari_glimpse.extend import landmark_map, relabelled, widen, widened_state
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset
from napari_glimpse.landmark_set import LandmarkSet, set_for_count

pytestmark = pytest.mark.filterwarnings("ignore::napari_glimpse.spacing.SpacingWarning")  # 26 mm images

TINY4 = {"name": "tiny4", "landmarks": ["L1", "L2", {"name": "New", "label": "Nw"}, "L3"]}


def make_extended_data(tiny_data, root, lset: dict = TINY4):
    """The tiny training images labelled with ``lset``: L1-L3 as they are, ``New`` 10 px right of L1."""
    src = tiny_data["train"]
    (root / "images").mkdir(parents=True)
    for p in src["paths"]:
        shutil.copy(p, root / "images" / p.name)
    idx = {"L1": 0, "L2": 1, "L3": 2}
    names = [n if isinstance(n, str) else n["name"] for n in lset["landmarks"]]
    cols = [src["mean"][:, idx[n]] if n in idx else src["mean"][:, 0] + [10.0, 0.0] for n in names]
    write_csv(root / "train.csv", src["names"], np.stack(cols, 1))
    (root / "landmarks.json").write_text(json.dumps(lset))
    return root


def test_landmark_map_matches_names_and_refuses_what_is_not_an_extension():
    old = set_for_count(3)
    assert landmark_map(old, LandmarkSet.from_dict(TINY4)) == [0, 1, None, 2]
    assert landmark_map(old, LandmarkSet.from_dict({"name": "x", "landmarks": ["l3", "New", "L1", "L2"]})) == \
        [2, None, 0, 1]  # any order, names without case
    with pytest.raises(GlimpseError, match=r"the new set lacks L2 \(an extension keeps every landmark"):
        landmark_map(old, LandmarkSet.from_dict({"name": "x", "landmarks": ["L1", "L3", "New"]}))
    with pytest.raises(GlimpseError, match="adds no landmark"):
        landmark_map(old, LandmarkSet.from_dict({"name": "x", "landmarks": ["L3", "L2", "L1"]}))


def test_widened_state_copies_old_channels_and_starts_new_ones_at_their_mean():
    import torch

    old = {"head.weight": torch.arange(6.0).view(3, 2), "head.bias": torch.tensor([1.0, 2.0, 6.0]),
           "body": torch.ones(2, 2)}
    tmpl = {"head.weight": torch.zeros(4, 2), "head.bias": torch.zeros(4), "body": torch.zeros(2, 2)}
    out = widened_state(old, tmpl, [0, 1, None, 2])
    assert out["head.weight"].tolist() == [[0, 1], [2, 3], [2, 3], [4, 5]]
    assert out["head.bias"].tolist() == [1, 2, 3, 6] and out["body"] is old["body"]


def test_relabelled_replay_has_the_new_landmarks_absent(tiny_data):
    ds = load_dataset(tiny_data["root"], "train")
    new = LandmarkSet.from_dict(TINY4)
    r = relabelled(ds, new)
    gt = r.ground_truth()
    assert r.landmark_names == new.names and r.landmark_set == new and gt.shape == (6, 4, 2)
    assert np.isnan(gt[:, 2]).all()
    np.testing.assert_array_equal(gt[:, [0, 1, 3]], ds.ground_truth())


def test_widening_keeps_every_old_answer_exactly(tiny_data, tiny_staged_model_path, tmp_path):
    model = GlimpseModel.load(tiny_staged_model_path, "cpu", int8=False)
    model.meta["landmark_offsets_px"] = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    data = load_dataset(make_extended_data(tiny_data, tmp_path / "ext"), "train")
    wide = widen(model, data.landmark_set, data)
    assert wide.landmark_set == LandmarkSet.from_dict(TINY4) and wide.config.n_landmarks == 4
    assert wide.meta["extended"]["added"] == ["New"] and wide.meta["landmark_offsets_px"][2] == [0.0, 0.0]
    np.testing.assert_allclose(wide.mean_start[2], data.ground_truth()[:, 2].mean(0))
    for path in tiny_data["test1"]["paths"]:
        a, b = model.predict(path), wide.predict(path)
        np.testing.assert_array_equal(b.final[[0, 1, 3]], a.final)
        assert b.final.shape == (4, 2) and np.isfinite(b.final).all()
    wide.save(tmp_path / "w.pt")  # a model of the larger set round-trips
    assert GlimpseModel.load(tmp_path / "w.pt", "cpu").landmark_set == wide.landmark_set


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_finetune_extend_writes_a_model_of_the_larger_set(capsys, tiny_data, tiny_quantized_model_path, tmp_path):
    ext = make_extended_data(tiny_data, tmp_path / "ext")
    out = tmp_path / "ext.pt"
    rc, so, err = run(capsys, "finetune", "--extend", "--model", tiny_quantized_model_path, "--data", ext,
                      "--mix-data", tiny_data["root"], "--max-steps", "2", "--time-budget", "1", "--threads", "1",
                      "--out", out)
    assert rc == 0, err
    model = GlimpseModel.load(out, "cpu")
    assert model.landmark_set == LandmarkSet.from_dict(TINY4)
    rec = model.meta["finetuned"]
    assert model.meta["extended"]["added"] == ["New"] and rec["mix_images"] == 6
    assert rec["stages"] == ["coarse", "fine"] and rec["config"]["lr_scale"] == 0.3  # no offsets: same conventions
    assert model.int8_nets == (3, 3)  # the parent's int8 graphs made again for the widened nets
    assert model.predict(tiny_data["test1"]["paths"][0]).final.shape == (4, 2)
    rc, so, err = run(capsys, "predict", tiny_data["test1"]["paths"][0], "--model", out, "--out", tmp_path / "p.csv")
    assert rc == 0, err
    assert (tmp_path / "p.csv").read_text().splitlines()[0].endswith("4_x,4_y")


def test_finetune_extend_errors_name_the_landmark(capsys, tiny_data, tiny_staged_model_path, tmp_path):
    def error(data, *extra) -> str:
        rc, so, err = run(capsys, "finetune", *extra, "--model", tiny_staged_model_path, "--data", data,
                          "--max-steps", "1", "--out", tmp_path / "x.pt")
        assert rc == 2 and "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    lacks = make_extended_data(tiny_data, tmp_path / "lacks", {"name": "lacks", "landmarks": ["L1", "L3", "New"]})
    assert "the new set lacks L2" in error(lacks, "--extend")
    ext = make_extended_data(tiny_data, tmp_path / "ext")
    assert "does not match the data's landmark set 'tiny4' (4 landmarks)" in error(ext)  # without --extend
    assert "--extend needs a landmarks.json beside the data" in error(tiny_data["root"], "--extend")
    same = make_extended_data(tiny_data, tmp_path / "same", {"name": "same", "landmarks": ["L3", "L1", "L2"]})
    assert "adds no landmark" in error(same, "--extend")
    assert not (tmp_path / "x.pt").exists()


def test_a_model_without_a_coarse_stage_is_refused(tiny_data, tiny_model, tmp_path):
    data = load_dataset(make_extended_data(tiny_data, tmp_path / "ext"), "train")
    with pytest.raises(GlimpseError, match="--extend needs a model with a coarse stage"):
        widen(tiny_model, data.landmark_set, data)


def test_kept_offsets_come_off_the_labels_the_nets_learn(monkeypatch, tiny_data, tiny_staged_model_path, tmp_path):
    """A parent's per-landmark offsets, kept (not learned) as --extend does, are added to the nets'
    answer: the nets must learn the labels minus them, or the offsets count twice."""
    import napari_glimpse.finetune as ft

    seen = {}

    def capture(model, train_ds, *args, **kw) -> dict:
        seen["labels"] = train_ds.ground_truth()
        return {}

    monkeypatch.setattr(ft, "_tune_nets", capture)
    model = GlimpseModel.load(tiny_staged_model_path, "cpu", int8=False)
    model.meta["landmark_offsets_px"] = [[4.0, -2.0], [0.0, 0.0], [1.0, 1.0]]
    ds = load_dataset(tiny_data["root"], "train")
    cfg = ft.FinetuneConfig(offsets=False, coarse_steps=1, fine_steps=1, time_budget_s=None)
    ft.finetune(model, ds, tmp_path / "t.pt", cfg)
    np.testing.assert_allclose(seen["labels"], ds.ground_truth() - [[4.0, -2.0], [0.0, 0.0], [1.0, 1.0]])
    assert model.meta["landmark_offsets_px"] == [[4.0, -2.0], [0.0, 0.0], [1.0, 1.0]]  # kept as they were
