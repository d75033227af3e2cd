"""Calibrated confidence (napari_glimpse.confidence): fitted on validation only, a probability,
monotone in its cues, near 0 for a gross failure, and what Trajectory.confidence and the CLI give."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import REAL_DATA

from napari_glimpse.confidence import FEATURES, Calibrator, Confidence, fit_calibrator, validation_only
from napari_glimpse.errors import GlimpseWarning
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel

SIDECAR = DEFAULT_MODEL.with_name("default.confidence.json")
needs_data = pytest.mark.skipif(not REAL_DATA.exists(), reason="needs the ISBI data")


def shipped() -> Confidence:
    return Confidence.from_dict(json.loads(SIDECAR.read_text()))


@pytest.fixture(scope="module")
def model() -> GlimpseModel:
    return GlimpseModel.load(device="cpu")


def _toy(n: int = 60, k: int = 3, seed: int = 0):
    """Toy answers: within 2 mm more often when feature 0 (a spread) is small."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, k, len(FEATURES)))
    y = rng.random((n, k)) < 1 / (1 + np.exp(-(1.5 - 2 * x[..., 0])))
    return x, y, [f"{131 + i % 20:03d}.jpg" for i in range(n)]


def test_validation_only_refuses_isbi_test_images():
    assert validation_only(["131.jpg", "150.jpg", "my_ceph.png", "99.tif"]) == ["131.jpg", "150.jpg", "my_ceph.png",
                                                                              "99.tif"]
    for bad in ("151.jpg", "300.jpg", "0200.png", "images/175.bmp", "400.jpg"):
        with pytest.raises(ValueError, match="validation images only"):
            validation_only(["131.jpg", bad])


def test_fit_refuses_test1_images_and_names_its_images():
    x, y, names = _toy()
    with pytest.raises(ValueError, match="validation images only"):
        fit_calibrator(x, y, names[:-1] + ["151.jpg"])
    cal = fit_calibrator(x, y, names)
    assert cal.fit_images == tuple(sorted(set(names)))
    assert cal.slopes[0] > 1  # the cue that matters, with the sign it has
    assert (cal.slopes >= 0).all()  # no cue raises the probability when it gets worse


def test_shipped_calibration_was_fitted_on_validation_images_only():
    conf = shipped()
    cal = conf.calibrator
    assert cal.fit_images == tuple(f"{i:03d}.jpg" for i in range(131, 151))
    validation_only(cal.fit_images)
    assert "validation" in cal.note
    assert conf.shape.fit_images == tuple(f"{i:03d}.jpg" for i in range(1, 151))  # labels of Train only
    assert cal.intercept.shape == (19,) and (cal.slopes >= 0).all() and cal.slopes.any()


def test_the_shipped_model_reads_its_calibration_from_the_sidecar():
    """The shipped file carries no calibration of its own (one in its meta would hide the sidecar,
    refitted for its nets): the loaded model's is the sidecar's."""
    from napari_glimpse.checkpoint import read_checkpoint

    assert "confidence" not in read_checkpoint(DEFAULT_MODEL)["meta"]
    loaded = GlimpseModel.load(device="cpu").meta["confidence"]
    assert loaded == json.loads(SIDECAR.read_text())


def test_a_sidecar_beside_a_file_wins_over_the_calibration_it_carries(tiny_staged_model_path, tmp_path):
    """A model saved after loading (a fine-tuned one) carries its parent's calibration in its
    meta; a calibration refitted for it and written beside the file is the one it then uses."""
    model = GlimpseModel.load(tiny_staged_model_path, device="cpu")
    model.meta["confidence"] = {"shape": None, "calibrator": None, "which": "carried"}
    out = tmp_path / "tuned.pt"
    model.save(out)
    assert GlimpseModel.load(out, device="cpu").meta["confidence"]["which"] == "carried"
    refit = {"shape": None, "calibrator": None, "which": "refit"}
    (tmp_path / "tuned.confidence.json").write_text(json.dumps(refit))
    assert GlimpseModel.load(out, device="cpu").meta["confidence"] == refit
    # writing another model over the file: the sidecar beside it was fitted for the old one
    with pytest.warns(GlimpseWarning, match="tuned.confidence.json .* takes the place of this model's own"):
        model.save(out)


def test_probability_is_in_0_1_and_monotone_in_the_cues():
    cal = shipped().calibrator
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 2, (200, 19)) for _ in FEATURES], -1)
    x[..., FEATURES.index("shape_excess")] = np.abs(x[..., FEATURES.index("shape_excess")])
    p = cal.probability(x)
    assert p.shape == (200, 19) and ((p >= 0) & (p <= 1)).all()
    for j, name in enumerate(FEATURES):
        worse = x.copy()
        worse[..., j] += 1.0
        q = cal.probability(worse)
        assert (q <= p + 1e-12).all(), name
        if cal.slopes[j] > 0:
            assert (q < p).mean() > 0.9, name
    assert np.isclose(cal.probability(np.full((19, len(FEATURES)), -50.0)), 1).all()
    assert (cal.probability(np.full((19, len(FEATURES)), 50.0)) < 1e-6).all()


def test_calibrator_round_trip_and_bad_dicts():
    x, y, names = _toy()
    cal = fit_calibrator(x, y, names, note="toy")
    back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert np.allclose(back.probability(x), cal.probability(x), atol=1e-5) and back.note == "toy"
    with pytest.raises(ValueError):
        Calibrator.from_dict({"features": ["log_fine_spread", "nonsense"], "intercept": [0.0], "slopes": [1.0, 1.0]})


@needs_data
def test_trajectory_confidence_is_the_probability_and_positions_do_not_change(model):
    img = REAL_DATA / "images" / "131.jpg"
    tr = model.predict(img)
    assert tr.probability is not None and np.array_equal(tr.confidence, tr.probability)
    assert ((tr.confidence >= 0) & (tr.confidence <= 1)).all()
    assert tr.expected_misses == pytest.approx(float((1 - tr.probability).sum()))
    assert tr.features.shape == (19, len(FEATURES))
    plain = GlimpseModel.load(device="cpu")
    plain.meta.pop("confidence")
    before = plain.predict(img)
    assert before.probability is None and np.array_equal(before.final, tr.final)  # answers unchanged
    assert np.array_equal(before.uncertainty_mm, tr.uncertainty_mm)
    assert np.array_equal(model.predict(img, record_stages=True).final, tr.final)


@needs_data
def test_a_point_20_mm_off_gets_a_probability_near_0(model):
    from napari_glimpse.confidence import features_of

    tr = model.predict(REAL_DATA / "images" / "140.jpg", record_stages=True)
    conf = shipped()
    s = tr.pixel_spacing
    assert (tr.probability[[0, 1, 6, 7, 8, 11]] > 0.5).all()  # sharp landmarks, found
    for k in (1, 6, 12):  # Nasion, Pogonion, upper lip: put 20 mm off, coarse and fine answers together
        final, coarse = tr.final.copy(), tr.coarse_positions.copy()
        final[k] += [20 / s, 0]
        coarse[k] += [20 / s, 0]
        chk = conf.shape.check(final * s)
        assert chk.flagged[k] and chk.flagged.sum() == 1
        x = tr.features.copy()
        x[k] = features_of(final, coarse, np.full(19, np.exp(tr.features[k, 0]) / s), np.ones(19), np.ones(19),
                           chk.z, s)[k]
        x[k, 2:4] = tr.features[k, 2:4]  # the coarse spread and the peak as they were: confident
        assert conf.calibrator.probability(x)[k] < 0.1, k


@needs_data
def test_the_fine_stage_run_from_a_gross_coarse_failure_gets_a_low_probability(model):
    from conftest import load_benchmark

    from napari_glimpse.io import load_dataset

    bench = load_benchmark("calibration")
    ds = load_dataset(REAL_DATA, "train").subset([135])
    rng = np.random.default_rng(3)
    for _ in range(3):
        feats, err, moved = bench.displaced(model, ds.image(0), ds.ground_truth("mean")[0], rng)
        p = shipped().calibrator.probability(feats)
        far = moved & (err > 10)
        assert (p[far] < 0.1).all(), (p[moved], err[moved])


@needs_data
def test_cli_confidence_csv_holds_the_probability(tmp_path, model):
    from napari_glimpse.cli import main

    out = tmp_path / "preds.csv"
    assert main(["predict", str(REAL_DATA / "images" / "131.jpg"), "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.reader(open(tmp_path / "preds_confidence.csv")))
    assert rows[0][1] == "1_confidence" and len(rows) == 2
    got = np.array([float(v) for v in rows[1][1:20]])
    assert np.allclose(got, model.predict(REAL_DATA / "images" / "131.jpg").probability, atol=1e-3)
