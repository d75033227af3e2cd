"""Cephalograms facing either way: a mirrored image gives the mirrored landmarks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REAL_DATA, synthetic_coords, synthetic_image

from napari_glimpse import GlimpseError, load_dataset, write_landmarks_csv
from napari_glimpse.cli import main
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel


@pytest.fixture(scope="module")
def synth_images():
    rng = np.random.default_rng(5)
    return [synthetic_image(synthetic_coords(1, rng)[0], rng)]


@pytest.fixture(scope="module")
def isbi_dataset():
    if not (REAL_DATA / "train_senior.csv").exists():
        pytest.skip(f"ISBI data not found at {REAL_DATA}")
    return load_dataset(REAL_DATA, "train")


@pytest.fixture
def isbi_csv_two_images(tmp_path, isbi_dataset):
    ds = isbi_dataset.subset([3, 110])
    csv = tmp_path / "two.csv"
    write_landmarks_csv(csv, [str(p.resolve()) for p in ds.image_paths], ds.ground_truth())
    return csv


def _mirror(xy: np.ndarray, width: int) -> np.ndarray:
    return xy * [-1, 1] + [width - 1, 0]


def test_left_is_right_on_the_mirrored_image(tiny_model, synth_images):
    img = synth_images[0]
    right = tiny_model.predict(img, facing="right", record_glimpses=True)
    left = tiny_model.predict(np.ascontiguousarray(img[:, ::-1]), facing="left", record_glimpses=True)
    assert left.facing == "left" and right.facing == "right"
    np.testing.assert_allclose(left.positions, _mirror(right.positions, img.shape[1]), atol=1e-3)
    # glimpses come back in the image's own axes: those of the mirrored image, flipped
    np.testing.assert_array_equal(left.glimpses, right.glimpses[..., ::-1])


def test_a_given_start_is_mirrored_too(tiny_model, synth_images):
    img = synth_images[0]
    st = tiny_model.mean_start + 5.0
    tr = tiny_model.predict(img, facing="left", start=st, iterations=1)
    np.testing.assert_allclose(tr.positions[0], st, atol=1e-3)


def test_unknown_facing_is_a_clear_error(tiny_model, synth_images):
    with pytest.raises(GlimpseError, match="facing"):
        tiny_model.predict(synth_images[0], facing="up")


@pytest.fixture(scope="module")
def shipped():
    if not DEFAULT_MODEL.exists():
        pytest.skip("no shipped model")
    return GlimpseModel.load(None, "cpu")


def test_auto_finds_the_facing_of_real_cephalograms(shipped, isbi_dataset):
    ds = isbi_dataset.subset([0, 75])
    truth = ds.ground_truth()
    for i in range(len(ds)):
        img = ds.image(i)
        right = shipped.predict(img)
        left = shipped.predict(np.ascontiguousarray(img[:, ::-1]))
        assert right.facing == "right" and left.facing == "left"
        np.testing.assert_allclose(_mirror(left.final, img.shape[1]), right.final, atol=1e-2)
        assert np.linalg.norm(right.final - truth[i], axis=-1).mean() * 0.1 < 4.0


def test_evaluate_mirror_flag_gives_the_same_errors(tmp_path, shipped, isbi_csv_two_images, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["evaluate", "--data", str(isbi_csv_two_images), "--json", str(a)]) == 0
    assert main(["evaluate", "--data", str(isbi_csv_two_images), "--mirror", "--json", str(b)]) == 0
    import json

    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert rb["mirrored"] is True
    assert abs(ra["overall"]["mre_mm"] - rb["overall"]["mre_mm"]) < 0.01
