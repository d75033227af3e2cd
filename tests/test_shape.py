"""The anatomical plausibility check (napari_glimpse.shape) and its use by GlimpseModel.predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REAL_DATA

from napari_glimpse.confidence import Confidence
from napari_glimpse.inference import DEFAULT_MODEL
from napari_glimpse.shape import ShapeModel, fit_shape_model, similarity

SIDECAR = DEFAULT_MODEL.with_name("default.confidence.json")


def _synthetic(n: int = 80, k: int = 8, seed: int = 0) -> np.ndarray:
    """``(n, k, 2)`` shapes (mm): a mean shape, rotated, scaled and shifted, with 1 mm noise."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0, 100, (k, 2))
    out = []
    for _ in range(n):
        a, s = rng.normal(0, 0.1), rng.uniform(0.9, 1.1)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        out.append(s * (mean + rng.normal(0, 1, (k, 2))) @ rot.T + rng.uniform(-50, 50, 2))
    return np.asarray(out)


def shipped_shape() -> ShapeModel:
    return Confidence.from_dict(json.loads(SIDECAR.read_text())).shape


def test_similarity_recovers_a_transform():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 10, (6, 2))
    a = 0.3
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    s, r, t = similarity(src, 1.7 * src @ rot.T + [3, -2])
    assert s == pytest.approx(1.7) and np.allclose(r, rot) and np.allclose(t, [3, -2])


def test_synthetic_shapes_flag_only_the_moved_point():
    shapes = _synthetic()
    model = fit_shape_model(shapes[:60], ("a",))
    assert np.sqrt(np.trace(model.cov, axis1=1, axis2=2)).max() < 3  # about 1 mm noise per axis
    for s in shapes[60:]:
        assert not model.check(s).flagged.any()
    moved = shapes[60].copy()
    moved[3] += [25.0, -10.0]
    chk = model.check(moved)
    assert chk.flagged.tolist() == [k == 3 for k in range(8)]
    assert chk.distance_mm[3] == pytest.approx(np.hypot(25, 10), abs=3)
    assert np.linalg.norm(chk.implied[3] - shapes[60][3]) < 3  # where it was
    # two gross failures at once: both flagged, the others not (the check is robust)
    moved[6] -= [30.0, 5.0]
    assert np.nonzero(model.check(moved).flagged)[0].tolist() == [3, 6]


def _predict_one(model: ShapeModel, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Landmark ``k`` predicted from the others, alone: its implied position (the answer's frame)
    and its residual in the mean frame."""
    others = np.delete(np.arange(model.n_landmarks), k)
    s, rot, shift = similarity(points[others], model.mean[others])
    guess = model.coef[k] @ np.append((s * points[others] @ rot.T + shift).reshape(-1), 1.0)
    return (guess - shift) @ rot / s, s * points[k] @ rot.T + shift - guess


def test_a_round_checks_every_landmark_as_one_at_a_time_does():
    """The batched round (every landmark left out at once) gives each landmark's own prediction
    from the others (one at a time, :func:`_predict_one`), mirrored and rotated shapes included."""
    shapes = _synthetic()
    model = fit_shape_model(shapes[:60], ("a",))
    rng = np.random.default_rng(3)
    flip = np.array([[-1.0, 0.0], [0.0, 1.0]])
    for s in list(shapes[60:]) + [shapes[61] @ flip, shapes[62] + rng.normal(0, 15, (8, 2))]:
        implied, dist, z = model._round(s)
        for k in range(8):
            imp, r = _predict_one(model, s, k)
            assert np.allclose(implied[k], imp, atol=1e-9) and dist[k] == pytest.approx(np.linalg.norm(s[k] - imp))
            assert z[k] == pytest.approx(np.sqrt(r @ np.linalg.solve(model.cov[k], r)), rel=1e-9)


def test_round_trip_through_a_dict():
    model = fit_shape_model(_synthetic(), ("x.jpg",))
    back = ShapeModel.from_dict(json.loads(json.dumps(model.to_dict())))
    s = _synthetic(seed=3)[0]
    assert np.allclose(back.check(s).z, model.check(s).z, atol=1e-3)
    assert back.fit_images == ("x.jpg",)


def test_shipped_shape_model_is_small_and_named():
    assert SIDECAR.stat().st_size <= 50_000
    shape = shipped_shape()
    assert shape.n_landmarks == 19
    assert len(shape.fit_images) == 150 and shape.fit_images[0] == "001.jpg" and shape.fit_images[-1] == "150.jpg"


@pytest.mark.skipif(not REAL_DATA.exists(), reason="needs the ISBI data")
def test_train_labels_pass_and_a_point_off_the_face_is_flagged():
    from napari_glimpse.io import load_dataset

    truth = load_dataset(REAL_DATA, "train").ground_truth("mean") * 0.1
    shape = shipped_shape()
    assert not any(shape.check(t).flagged.any() for t in truth[::10])
    off = truth[0].copy()
    off[1] = [off[1, 0] + 40.0, off[1, 1]]  # Nasion 40 mm in front of the face
    chk = shape.check(off)
    assert np.nonzero(chk.flagged)[0].tolist() == [1]
    assert chk.z[1] > 8 and chk.distance_mm[1] > 30
    off = truth[0].copy()
    off[1] = off[7]  # Nasion on Menton (the wrong bone)
    assert np.nonzero(shape.check(off).flagged)[0].tolist() == [1]


@pytest.mark.skipif(not REAL_DATA.exists(), reason="needs the ISBI data")
def test_model_answers_on_train_images_are_not_flagged():
    from napari_glimpse.inference import GlimpseModel

    model = GlimpseModel.load(device="cpu")
    for name in ("003.jpg", "047.jpg", "131.jpg"):
        tr = model.predict(REAL_DATA / "images" / name)
        assert tr.flagged is not None and not tr.flagged.any(), name
        assert tr.shape_z.shape == (19,) and (tr.shape_z < 4).all()
        assert np.abs(tr.implied_positions - tr.final).max() < 150  # within 15 mm


@pytest.mark.skipif(not REAL_DATA.exists(), reason="needs the ISBI data")
def test_a_point_on_the_wrong_bone_is_searched_again_where_the_others_imply_it():
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset

    model = GlimpseModel.load(device="cpu")
    ds = load_dataset(REAL_DATA, "train")
    i = 46  # 047.jpg
    pyr = model.pyramid(ds.image(i))
    good = model.predict(pyr).final
    spread = np.full(19, 10.0)
    wrong = good.copy()
    wrong[1] = good[7]  # Nasion answered on Menton
    pos, _, moved = model._research(pyr, wrong, spread, None)
    assert moved.tolist() == [k == 1 for k in range(19)]
    assert np.linalg.norm(pos[1] - good[1]) * 0.1 < 2.0  # back on Nasion (was ~100 mm off)
    assert np.array_equal(pos[np.arange(19) != 1], wrong[np.arange(19) != 1])
    # nothing flagged: nothing moves; switched off: nothing either
    assert not model._research(pyr, good, spread, None)[2].any()
    model.meta["research"] = False
    assert model._research(pyr, wrong, spread, None)[2] is None
    # through predict: the trajectory says which points moved (none on this image)
    model.meta["research"] = True
    tr = model.predict(pyr)
    assert tr.researched is not None and not tr.researched.any()
