"""Inference: the trajectory (positions, glimpses, heatmaps), starts, clamping, subsets."""

import numpy as np
import pytest
import torch
from conftest import save_png

from napari_glimpse.errors import GlimpseError
from napari_glimpse.glimpse import PyramidStack, sample_glimpses
from napari_glimpse.inference import GlimpseModel, Trajectory
from napari_glimpse.io import read_image
from napari_glimpse.pyramid import build_pyramid

K, L, P = 3, 3, 64


@pytest.fixture
def image(tiny_data):
    return read_image(tiny_data["test1"]["paths"][0])  # 256 x 256, the training size


def _set_constant_output(model, offset):
    """Make every prediction the constant ``offset`` (in units of offset_unit)."""
    with torch.no_grad():
        for net in model.net.nets:
            net.head_w.zero_()
            net.head_b.copy_(torch.tensor(offset, dtype=torch.float32).expand_as(net.head_b))


def test_trajectory_shapes_without_recording(tiny_model, image):
    tr = tiny_model.predict(image, iterations=3)
    assert isinstance(tr, Trajectory)
    assert tr.positions.shape == (4, K, 2) and tr.positions.dtype == np.float64
    assert tr.glimpses is None and tr.heatmaps is None
    assert tr.uncertainty_mm.shape == (K,)
    assert tr.final.shape == (K, 2)
    np.testing.assert_array_equal(tr.final, tr.positions[-1])
    assert tr.offsets.shape == (3, K, 2)
    np.testing.assert_allclose(tr.offsets, np.diff(tr.positions, axis=0))
    assert tr.iterations == 3
    assert tr.image_shape == (256, 256) and tr.patch == P
    assert tr.landmark_names == ("L1", "L2", "L3")
    np.testing.assert_allclose(tr.confidence, np.exp(-tr.uncertainty_mm / 2.0))
    assert np.all((tr.confidence > 0) & (tr.confidence <= 1))


def test_trajectory_with_glimpses_and_heatmaps(tiny_model, image):
    tr = tiny_model.predict(image, iterations=2, record_glimpses=True, record_heatmaps=True)
    assert tr.glimpses.shape == (2, K, L, P, P) and tr.glimpses.dtype == np.uint8
    c = 4 * tiny_model.config.width
    assert tr.heatmaps.shape == (2, K, L, c, 8, 8) and tr.heatmaps.dtype == np.float16
    np.testing.assert_allclose(tr.heatmaps.astype(np.float32).sum(axis=(-1, -2)), 1.0, atol=1e-2)
    # iteration t's glimpse is centred on positions[t]
    stack = PyramidStack([build_pyramid(image, L, P)])
    for t in range(2):
        ref = sample_glimpses(stack, torch.zeros(K, dtype=torch.long),
                              torch.as_tensor(tr.positions[t], dtype=torch.float32), P)
        np.testing.assert_array_equal(tr.glimpses[t], ref.round().clamp(0, 255).to(torch.uint8).numpy())


def test_first_position_is_the_mean_start(tiny_model, image):
    tr = tiny_model.predict(image, iterations=1)
    np.testing.assert_allclose(tr.positions[0], tiny_model.mean_start, atol=1e-4)


def test_steps_follow_the_network_output(tiny_model, image):
    _set_constant_output(tiny_model, [0.1, -0.05])  # 10 px right, 5 px up per step (unit 100)
    tr = tiny_model.predict(image, iterations=3)
    np.testing.assert_allclose(tr.offsets, np.broadcast_to([10.0, -5.0], (3, K, 2)), atol=1e-3)
    # one start: the uncertainty is the last step's length in mm
    np.testing.assert_allclose(tr.uncertainty_mm, np.hypot(10, 5) * tiny_model.pixel_spacing, rtol=1e-5)


def test_mean_start_scales_with_the_image_size(tiny_model, tiny_data):
    big = np.zeros((384, 512), np.uint8)  # h = 384 = 1.5 x 256, w = 512 = 2 x 256
    tr = tiny_model.predict(big, iterations=1)
    np.testing.assert_allclose(tr.positions[0], tiny_model.mean_start * [2.0, 1.5], atol=1e-3)
    assert tr.image_shape == (384, 512)


def test_estimates_are_clamped_inside_the_image(tiny_model, image):
    _set_constant_output(tiny_model, [50.0, -50.0])  # 5000 px steps right and up
    tr = tiny_model.predict(image, iterations=2)
    np.testing.assert_allclose(tr.final[:, 0], 255.0)
    np.testing.assert_allclose(tr.final[:, 1], 0.0)
    _set_constant_output(tiny_model, [-50.0, 50.0])
    tr = tiny_model.predict(image, iterations=1)
    np.testing.assert_allclose(tr.final, np.broadcast_to([0.0, 255.0], (K, 2)))
    # a start given outside the image is clamped before the first glimpse
    _set_constant_output(tiny_model, [0.0, 0.0])
    tr = tiny_model.predict(image, iterations=1, start=np.array([[-40.0, 10], [300, 500], [20, 30]]))
    np.testing.assert_allclose(tr.positions[0], [[0, 10], [255, 255], [20, 30]])


def test_multiple_starts_give_uncertainty(tiny_model, image):
    one = tiny_model.predict(image, iterations=2, starts=1)
    many = tiny_model.predict(image, iterations=2, starts=6, seed=0)
    assert many.positions.shape == (3, K, 2)
    np.testing.assert_allclose(many.positions[0], one.positions[0])  # first start = the mean
    assert np.all(many.uncertainty_mm > 0)
    # the answer is the mean of the starts' answers, so it differs from the single-start answer
    assert not np.allclose(many.final, one.final)
    again = tiny_model.predict(image, iterations=2, starts=6, seed=0)
    np.testing.assert_array_equal(again.final, many.final)
    other = tiny_model.predict(image, iterations=2, starts=6, seed=1)
    assert not np.allclose(other.final, many.final)


def test_multiple_starts_with_a_perfect_model_agree(tiny_model, image):
    # a network that always predicts zero offset keeps every start where it is: the spread of
    # the answers is the spread of the starts (0.5 x the training std per axis)
    _set_constant_output(tiny_model, [0.0, 0.0])
    tr = tiny_model.predict(image, iterations=1, starts=100, seed=0)
    np.testing.assert_allclose(tr.final, tiny_model.mean_start, atol=0.2 * tiny_model.std_start.max())
    expected = 0.5 * np.linalg.norm(tiny_model.std_start, axis=-1) * tiny_model.pixel_spacing
    np.testing.assert_allclose(tr.uncertainty_mm, expected, rtol=0.2)


def test_landmark_subset(tiny_model, image):
    full = tiny_model.predict(image, iterations=3)
    sub = tiny_model.predict(image, iterations=3, landmarks=[2, 0], record_glimpses=True)
    assert sub.positions.shape == (4, 2, 2)
    assert sub.landmark_names == ("L3", "L1")
    assert sub.glimpses.shape == (3, 2, L, P, P)
    assert sub.uncertainty_mm.shape == (2,)
    np.testing.assert_allclose(sub.positions, full.positions[:, [2, 0]], atol=1e-3)


def test_image_inputs_path_array_pyramid(tiny_model, tiny_data, image):
    path = tiny_data["test1"]["paths"][0]
    a = tiny_model.predict(path, iterations=2)
    b = tiny_model.predict(image, iterations=2)
    c = tiny_model.predict(build_pyramid(image, L, P), iterations=2)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.positions, c.positions)
    with pytest.raises(GlimpseError, match="pyramid has 2 levels"):
        tiny_model.predict(build_pyramid(image, 2, P))


def test_bad_inputs(tiny_model, tmp_path):
    with pytest.raises(GlimpseError, match="iterations"):
        tiny_model.predict(np.zeros((100, 100), np.uint8), iterations=0)
    with pytest.raises(GlimpseError, match="smaller than one 64x64 glimpse"):
        tiny_model.predict(np.zeros((40, 40), np.uint8))
    with pytest.raises(GlimpseError, match="image not found"):
        tiny_model.predict(tmp_path / "missing.png")
    p = tmp_path / "garbage.jpg"
    p.write_bytes(b"not an image at all")
    with pytest.raises(GlimpseError, match="cannot read image"):
        tiny_model.predict(p)


def test_rgb_file_predicts_like_grey_file(tiny_model, image, tmp_path):
    rgb = save_png(tmp_path / "rgb.png", np.repeat(image[..., None], 3, axis=-1))
    grey = save_png(tmp_path / "grey.png", image)
    np.testing.assert_array_equal(tiny_model.predict(rgb).positions, tiny_model.predict(grey).positions)


def test_default_model_missing_or_present(monkeypatch, tmp_path):
    import napari_glimpse.inference as inf

    monkeypatch.setattr(inf, "DEFAULT_MODEL", tmp_path / "absent.pt")
    with pytest.raises(GlimpseError, match="default model is missing"):
        GlimpseModel.load(None, device="cpu")
