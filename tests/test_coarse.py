"""Coarse first pass: the whole-image view geometry, heatmap decoding, the checkpoint, the
coarse answer as the glimpses' start and facing, and a tiny end-to-end training run."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_CONFIG

from napari_glimpse.checkpoint import FORMAT_VERSION, atomic_torch_save, read_checkpoint
from napari_glimpse.coarse import (
    CoarseConfig,
    CoarseEnsemble,
    CoarseNet,
    decode,
    facing_of,
    from_normalised,
    gaussian_targets,
    locate,
    render_views,
    to_normalised,
    train_coarse,
    view_level,
    view_levels,
    view_matrix,
)
from napari_glimpse.errors import GlimpseError
from napari_glimpse.inference import GlimpseModel, Trajectory
from napari_glimpse.io import load_dataset, read_image
from napari_glimpse.pyramid import build_pyramid
from napari_glimpse.runtime import NetRuntime, TorchBackend
from napari_glimpse.training import TrainConfig, TrainingData, resume_path, train

K = 3
TINY_COARSE = CoarseConfig(n_landmarks=K, input_hw=(64, 48), width=4, batch_size=4)


# --------------------------------------------------------------------------------- helpers
def _dot_image(h: int, w: int, x: float, y: float, sigma: float = 2.0) -> torch.Tensor:
    """``(h, w)`` float image, zero except a Gaussian dot (peak 255) at pixel (x, y)."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return 255.0 * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def _peak(view: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Brightest pixel (x, y) of a 2-D view and the intensity centroid in a 7x7 window there."""
    h, w = view.shape
    i = int(view.argmax())
    iy, ix = divmod(i, w)
    y0, y1, x0, x1 = max(0, iy - 3), min(h, iy + 4), max(0, ix - 3), min(w, ix + 4)
    win = view[y0:y1, x0:x1].double()
    yy, xx = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float64), torch.arange(x0, x1, dtype=torch.float64),
                            indexing="ij")
    c = np.array([float((win * xx).sum() / win.sum()), float((win * yy).sum() / win.sum())])
    return np.array([ix, iy], dtype=float), c


def _where_in_view(xy: np.ndarray, theta: torch.Tensor, image_hw, input_hw) -> np.ndarray:
    """train_coarse's formula: o = A^-1 (u - t), then from_normalised to view pixels. (B, 2)."""
    u = to_normalised(torch.as_tensor(xy, dtype=torch.float32)[None, None].expand(theta.shape[0], 1, 2), image_hw)
    a, t = theta[:, :, :2], theta[:, :, 2]
    o = torch.einsum("bij,bkj->bki", torch.linalg.inv(a), u - t[:, None, :])
    return from_normalised(o, input_hw)[:, 0].numpy()


def _randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights *and* batch-norm statistics, so a checkpoint that drops any of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if not v.is_floating_point():
                continue
            r = torch.randn(v.shape, generator=g)
            v.copy_(r.abs() + 0.5 if k.endswith("running_var") else r * 0.3)
    return net.eval()


@pytest.fixture
def image(tiny_data):
    return read_image(tiny_data["test1"]["paths"][0])  # 256 x 256


@pytest.fixture
def coarse_model(tiny_model):
    """The tiny glimpse model with a random (but fixed) coarse stage attached."""
    tiny_model.coarse = _randomise(CoarseNet(TINY_COARSE), seed=3)
    return tiny_model


def _mirror(xy: np.ndarray, width: int) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64) * [-1, 1] + [width - 1, 0]


# ------------------------------------------------------------------------ 1. view geometry
IMG_HW = (120, 200)  # non-square
VIEW_HW = (60, 100)  # same aspect: one view pixel = two image pixels in both axes
THETAS = {  # angle (deg), scale, flip, shift
    "identity": (0.0, 1.0, False, (0.0, 0.0)),
    "rot+scale+flip+shift": (20.0, 0.9, True, (0.05, -0.03)),
    "rot-+zoom-out+shift": (-12.0, 1.1, False, (-0.04, 0.06)),
    "flip only": (0.0, 1.0, True, (0.0, 0.0)),
}


def _theta(angle_deg, scale, flip, shift, image_hw=IMG_HW) -> torch.Tensor:
    return view_matrix(image_hw, torch.tensor([math.radians(angle_deg)]), torch.tensor([float(scale)]),
                       torch.tensor([bool(flip)]), torch.tensor([shift], dtype=torch.float32))


@pytest.mark.parametrize("name", list(THETAS))
@pytest.mark.parametrize("dot", [(130.0, 45.0), (61.5, 83.25)])
def test_rendered_dot_lands_where_the_training_formula_puts_it(name, dot):
    theta = _theta(*THETAS[name])
    img = _dot_image(*IMG_HW, *dot)
    view = render_views(img[None, None], theta, VIEW_HW)[0, 0]
    assert view.shape == VIEW_HW
    want = _where_in_view(np.array(dot), theta, IMG_HW, VIEW_HW)[0]
    assert 3 < want[0] < VIEW_HW[1] - 4 and 3 < want[1] < VIEW_HW[0] - 4  # well inside the view
    brightest, centroid = _peak(view)
    assert np.abs(brightest - want).max() <= 1.0, (name, brightest, want)
    assert np.linalg.norm(centroid - want) < 0.3, (name, centroid, want)


def test_identity_view_is_the_resized_image():
    dot = (130.0, 45.0)
    theta = _theta(0.0, 1.0, False, (0.0, 0.0))
    np.testing.assert_allclose(theta[0], [[1, 0, 0], [0, 1, 0]], atol=1e-7)
    view = render_views(_dot_image(*IMG_HW, *dot)[None, None], theta, VIEW_HW)[0, 0]
    # pixel-centre convention: x_view = (x + 0.5) * W_view / W - 0.5
    resized = np.array([(dot[0] + 0.5) * VIEW_HW[1] / IMG_HW[1] - 0.5, (dot[1] + 0.5) * VIEW_HW[0] / IMG_HW[0] - 0.5])
    np.testing.assert_allclose(resized, [64.75, 22.25])
    brightest, centroid = _peak(view)
    assert np.abs(brightest - resized).max() <= 1.0
    assert np.linalg.norm(centroid - resized) < 0.3
    # and from_normalised/to_normalised are each other's inverse between any two sizes
    xy = torch.tensor([[3.0, 7.5], [199.0, 0.0], [-0.5, 119.5]])
    torch.testing.assert_close(from_normalised(to_normalised(xy, IMG_HW), IMG_HW), xy)
    torch.testing.assert_close(to_normalised(torch.tensor([[-0.5, -0.5], [199.5, 119.5]]), IMG_HW),
                               torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))


@pytest.mark.parametrize("angle,scale,flip", [(30.0, 1.0, False), (-25.0, 0.8, True), (90.0, 1.0, False)])
def test_rotation_and_scale_act_in_pixel_units(angle, scale, flip):
    """A rotation must not shear a non-square image: distances shrink by exactly 2 * scale
    (view = image / 2), and the direction between two dots turns by the angle."""
    a, b = np.array([80.0, 50.0]), np.array([120.0, 75.0])
    theta = _theta(angle, scale, flip, (0.0, 0.0))
    got = []
    for p in (a, b):
        view = render_views(_dot_image(*IMG_HW, *p)[None, None], theta, VIEW_HW)[0, 0]
        got.append(_peak(view)[1])
    d_img, d_view = b - a, got[1] - got[0]
    assert np.linalg.norm(d_view) == pytest.approx(np.linalg.norm(d_img) / (2 * scale), rel=0.02)
    ang_img = math.atan2(d_img[1], d_img[0] * (-1 if flip else 1))
    ang_view = math.atan2(d_view[1], d_view[0])
    turn = math.degrees(math.remainder(ang_view - ang_img, 2 * math.pi))
    assert abs(abs(turn) - abs(angle)) < 1.5, (turn, angle)


# ------------------------------------------------------------------------------ 2. decode
def _gauss_logits(cx: float, cy: float, sigma: float, h: int = 16, w: int = 24) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return (-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))[None, None]


def test_decode_finds_a_sub_pixel_peak():
    xy, spread = decode(_gauss_logits(10.3, 7.6, 0.8))
    assert xy.shape == (1, 1, 2) and spread.shape == (1, 1)
    np.testing.assert_allclose(xy[0, 0].numpy(), [10.3, 7.6], atol=0.1)
    # a second landmark and a second image in the same batch are decoded independently
    logits = torch.cat([torch.cat([_gauss_logits(10.3, 7.6, 0.8), _gauss_logits(3.7, 12.2, 0.8)], 1),
                        torch.cat([_gauss_logits(20.5, 2.5, 0.8), _gauss_logits(15.0, 9.9, 0.8)], 1)])
    xy, _ = decode(logits)
    np.testing.assert_allclose(xy.numpy(), [[[10.3, 7.6], [3.7, 12.2]], [[20.5, 2.5], [15.0, 9.9]]], atol=0.1)


def test_decode_spread_grows_with_the_peak_width():
    _, sharp = decode(_gauss_logits(10.3, 7.6, 0.5))
    _, mid = decode(_gauss_logits(10.3, 7.6, 1.0))
    _, broad = decode(_gauss_logits(10.3, 7.6, 3.0))
    assert float(sharp) < 0.8
    assert float(sharp) < float(mid) < float(broad)
    assert float(broad) > 1.5
    # a distant second mode outside the window does not drag the answer
    logits = torch.logaddexp(_gauss_logits(10.3, 7.6, 0.8), _gauss_logits(20.0, 2.0, 0.8) - 1.0)
    xy, _ = decode(logits)
    np.testing.assert_allclose(xy[0, 0].numpy(), [10.3, 7.6], atol=0.1)


# -------------------------------------------------------------------- 3. gaussian_targets
def test_gaussian_targets_sum_to_one_and_peak_at_the_point():
    xy = torch.tensor([[[5.0, 3.0], [10.0, 12.0]], [[0.0, 0.0], [7.3, 9.6]]])  # (B=2, K=2, 2)
    t = gaussian_targets(xy, (24, 20), sigma=1.5)
    assert t.shape == (2, 2, 24, 20)
    torch.testing.assert_close(t.sum((-1, -2)), torch.ones(2, 2))
    flat = t.flatten(2).argmax(-1)
    assert [divmod(int(i), 20)[::-1] for i in flat.flatten()] == [(5, 3), (10, 12), (0, 0), (7, 10)]
    # away from the border the target's centre of mass is the point itself (sub-pixel too)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(20.0), indexing="ij")
    com = torch.stack([(t * xx).sum((-1, -2)), (t * yy).sum((-1, -2))], -1)
    torch.testing.assert_close(com[0, 1], xy[0, 1], atol=1e-3, rtol=0)
    torch.testing.assert_close(com[1, 1], xy[1, 1], atol=1e-3, rtol=0)
    # a smaller sigma is sharper
    assert gaussian_targets(xy, (24, 20), 0.7).max() > t.max()


# ------------------------------------------------------------------------------ 4. facing
def test_facing_of():
    mean = np.array([[80.0, 80.0], [176.0, 96.0], [128.0, 180.0], [30.0, 50.0]])
    assert facing_of(mean, mean) == "right"
    assert facing_of(_mirror(mean, 256), mean) == "left"
    # shifted, scaled (another image size) and noisy layouts keep their facing
    rng = np.random.default_rng(0)
    moved = mean * 1.7 + [40.0, -10.0] + rng.normal(0, 3, mean.shape)
    assert facing_of(moved, mean) == "right"
    assert facing_of(_mirror(moved, 600), mean) == "left"


# -------------------------------------------------------------------------- 5. view_level
def test_view_level():
    assert view_level((2400, 1935), (320, 256), 6) == 2  # level 2 is 600x484, level 3 would be 300x242
    assert view_level((2400, 1935), (320, 256), 2) == 1  # capped at n_levels - 1
    assert view_level((2400, 1935), (320, 256), 1) == 0
    assert view_level((100, 80), (320, 256), 6) == 0  # smaller than the view: full resolution
    assert view_level((320, 256), (320, 256), 6) == 0
    assert view_level((640, 512), (320, 256), 6) == 1
    assert view_level((639, 512), (320, 256), 6) == 0  # level 1 would be 319 rows < 320
    assert view_level((256, 256), (64, 48), 3) == 2
    # the chosen level is never smaller than the view, and the next one would be
    for shape in [(2400, 1935), (1000, 3000), (777, 555)]:
        lv = view_level(shape, (320, 256), 10)
        assert shape[0] / 2**lv >= 320 and shape[1] / 2**lv >= 256
        assert shape[0] / 2 ** (lv + 1) < 320 or shape[1] / 2 ** (lv + 1) < 256


# ----------------------------------------------------------------------- network and config
def test_coarse_net_shapes_and_config_round_trip():
    net = CoarseNet(TINY_COARSE).eval()
    with torch.no_grad():
        out = net(torch.full((2, 1, 64, 48), 100.0))
    assert out.shape == (2, K, 32, 24) and out.dtype == torch.float32
    d = TINY_COARSE.to_dict()
    assert d["input_hw"] == [64, 48]
    assert CoarseConfig.from_dict(d) == TINY_COARSE
    assert CoarseConfig.from_dict({**d, "future_option": 1}) == TINY_COARSE


def test_odd_view_size_trains_or_is_refused_clearly():
    cfg = replace(TINY_COARSE, n_landmarks=1, input_hw=(65, 49), batch_size=2)
    calls = []
    try:
        train_coarse(torch.zeros(2, 1, 130, 98), (130, 98), torch.zeros(2, 1, 2), cfg, 60.0, progress=False,
                     should_stop=lambda: calls.append(1) or len(calls) > 1)
    except (ValueError, GlimpseError):
        pass  # refusing odd sizes up front is fine


def test_locate_flip_average_is_mirror_symmetric():
    """With flip averaging, the mirrored level gives exactly the mirrored answer, and the
    answer is the mean of the plain and the mirrored-back passes."""
    net = _randomise(CoarseNet(TINY_COARSE), seed=7)
    rng = np.random.default_rng(0)
    level = torch.as_tensor(rng.integers(0, 256, (64, 64)), dtype=torch.uint8)
    hw = (256, 256)
    p, s = locate(net, level, hw, flip_average=True)
    pm, sm = locate(net, level.flip(-1), hw, flip_average=True)
    np.testing.assert_allclose(pm, _mirror(p, 256), atol=1e-3)
    np.testing.assert_allclose(sm, s, rtol=1e-4)
    a, sa = locate(net, level, hw)
    b, sb = locate(net, level.flip(-1), hw)
    assert not np.allclose(a, _mirror(b, 256), atol=1.0)  # a random net is not symmetric by itself
    np.testing.assert_allclose(p, (a + _mirror(b, 256)) / 2, atol=1e-3)
    # spread: the two passes' mean spread and their disagreement (half their distance), in quadrature
    half = np.linalg.norm(a - _mirror(b, 256), axis=-1) / 2
    np.testing.assert_allclose(s, np.sqrt(((sa + sb) / 2) ** 2 + half**2), rtol=1e-3)
    assert p.shape == (K, 2) and s.shape == (K,) and p.dtype == np.float64
    assert np.all((p >= 0) & (p <= 255)) and np.all(s > 0)


def test_view_levels_carry_positions_in_normalised_coordinates():
    """Mixed sizes are resampled to twice the view; a dot's position follows via normalised
    coordinates (to within the pyramid's sub-level-pixel anchoring)."""
    cfg = replace(TINY_COARSE, input_hw=(32, 24))
    shapes, dots = [(256, 192), (200, 300)], np.array([[[100.0, 60.0]], [[210.0, 150.0]]])
    pyrs = [build_pyramid(_dot_image(*hw, *d[0], sigma=6.0).round().to(torch.uint8).numpy(), 3) for hw, d in
            zip(shapes, dots)]
    stack, image_hw, truth_n = view_levels(pyrs, dots, cfg)
    assert stack.shape == (2, 1, 64, 48) and stack.dtype == torch.float32
    assert image_hw == (228, 246)  # the median size
    for i, (hw, d) in enumerate(zip(shapes, dots)):
        torch.testing.assert_close(truth_n[i], to_normalised(torch.as_tensor(d, dtype=torch.float32), hw))
        want = from_normalised(truth_n[i], (64, 48))[0].numpy()
        _, c = _peak(stack[i, 0])
        assert np.linalg.norm(c - want) < 1.0, (i, c, want)
    # same-size images: the level itself, untouched
    same = [build_pyramid(np.full((256, 256), v, np.uint8), 3) for v in (10, 200)]
    stack, image_hw, _ = view_levels(same, np.zeros((2, 1, 2)), TINY_COARSE)
    assert image_hw == (256, 256) and stack.shape == (2, 1, 64, 64)
    torch.testing.assert_close(stack[1, 0], same[1].levels[2].float())


# ------------------------------------------------------------------ 6. checkpoint round trip
def test_checkpoint_round_trip_with_a_coarse_stage(coarse_model, image, tmp_path):
    p = tmp_path / "coarse.pt"
    coarse_model.save(p)
    ck = read_checkpoint(p)
    assert ck["format_version"] == 2 <= FORMAT_VERSION  # a single coarse net stays readable by version-2 readers
    assert ck["coarse_config"] == TINY_COARSE.to_dict()
    torch.load(p, map_location="cpu", weights_only=True)  # still no pickled code
    loaded = GlimpseModel.load(p, device="cpu")
    assert loaded.coarse is not None and not loaded.coarse.training
    assert loaded.coarse.cfg == TINY_COARSE
    sa, sb = coarse_model.coarse.state_dict(), loaded.coarse.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for kw in ({"iterations": 0}, {"iterations": 2}, {"iterations": 2, "facing": "left"}):
        a, b = coarse_model.predict(image, **kw), loaded.predict(image, **kw)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.uncertainty_mm, b.uncertainty_mm)
        assert a.facing == b.facing
    # the coarse weights matter: another random coarse stage answers differently
    loaded.coarse = _randomise(CoarseNet(TINY_COARSE), seed=4)
    assert not np.allclose(loaded.locate_coarse(image)[0], coarse_model.locate_coarse(image)[0])


def test_model_without_coarse_writes_format_version_1(tiny_model, tmp_path):
    assert tiny_model.coarse is None
    tiny_model.save(tmp_path / "plain.pt")
    ck = read_checkpoint(tmp_path / "plain.pt")
    assert ck["format_version"] == 1
    assert "coarse_state_dict" not in ck and "coarse_config" not in ck
    assert GlimpseModel.load(tmp_path / "plain.pt", device="cpu").coarse is None


def _corrupt(model: GlimpseModel, path, **changes):
    ck = model.to_checkpoint()
    for k, v in changes.items():
        if v is None:
            del ck[k]
        else:
            ck[k] = v
    atomic_torch_save(ck, path)
    return path


def test_corrupt_coarse_stage_is_a_clear_error(coarse_model, tmp_path):
    sd = dict(coarse_model.to_checkpoint()["coarse_state_dict"])
    sd["head.weight"] = torch.zeros(5, 4, 1, 1)  # 5 landmarks instead of 3
    p = _corrupt(coarse_model, tmp_path / "bad.pt", coarse_state_dict=sd)
    with pytest.raises(GlimpseError, match=r"bad\.pt: bad coarse stage"):
        GlimpseModel.load(p, device="cpu")
    sd = dict(coarse_model.to_checkpoint()["coarse_state_dict"])
    del sd["stem.0.0.weight"]
    with pytest.raises(GlimpseError, match="bad coarse stage"):
        GlimpseModel.load(_corrupt(coarse_model, tmp_path / "missing_key.pt", coarse_state_dict=sd), device="cpu")
    with pytest.raises(GlimpseError, match="bad coarse stage"):
        GlimpseModel.load(_corrupt(coarse_model, tmp_path / "no_cfg.pt", coarse_config=None), device="cpu")
    with pytest.raises(GlimpseError, match="bad coarse stage"):
        GlimpseModel.load(_corrupt(coarse_model, tmp_path / "bad_cfg.pt",
                                   coarse_config={**TINY_COARSE.to_dict(), "width": "wide"}), device="cpu")


def test_corrupt_coarse_stage_error_names_the_tensor(coarse_model, tmp_path):
    sd = dict(coarse_model.to_checkpoint()["coarse_state_dict"])
    sd["head.weight"] = torch.zeros(5, 4, 1, 1)
    p = _corrupt(coarse_model, tmp_path / "bad.pt", coarse_state_dict=sd)
    with pytest.raises(GlimpseError, match=r"head\.weight"):
        GlimpseModel.load(p, device="cpu")


# ------------------------------------------------------------- 7. predict with a coarse stage
def test_zero_iterations_return_the_coarse_answer(coarse_model, image):
    pos, spread = coarse_model.locate_coarse(image)
    assert pos.shape == (K, 2) and spread.shape == (K,)
    tr = coarse_model.predict(image, iterations=0, facing="right")
    assert isinstance(tr, Trajectory)
    assert tr.positions.shape == (1, K, 2) and tr.iterations == 0
    np.testing.assert_array_equal(tr.positions[0], pos)
    np.testing.assert_array_equal(tr.final, pos)
    np.testing.assert_allclose(tr.uncertainty_mm, spread * coarse_model.pixel_spacing)
    assert coarse_model.predict(image, iterations=0).facing == facing_of(pos, coarse_model.mean_start)
    # facing left: the mirrored image is read the training way round and the answer mirrored back
    flipped = np.ascontiguousarray(image[:, ::-1])
    left = coarse_model.predict(image, iterations=0, facing="left")
    np.testing.assert_allclose(left.final, _mirror(coarse_model.locate_coarse(flipped)[0], 256), atol=1e-4)
    assert tr.image_shape == (256, 256) and tr.landmark_names == ("L1", "L2", "L3")
    # a landmark subset picks rows; the recorded glimpses are empty
    sub = coarse_model.predict(image, iterations=0, landmarks=[2, 0], record_glimpses=True, facing="right")
    np.testing.assert_array_equal(sub.positions[0], pos[[2, 0]])
    assert sub.landmark_names == ("L3", "L1") and sub.glimpses.shape == (0, 2, 3, 64, 64)
    # the same from a path, an array and a pyramid
    np.testing.assert_array_equal(coarse_model.locate_coarse(build_pyramid(image, 3))[0], pos)
    with pytest.raises(GlimpseError, match="at least 0"):
        coarse_model.predict(image, iterations=-1)


def test_zero_iterations_without_a_coarse_stage_is_an_error(tiny_model, image):
    with pytest.raises(GlimpseError, match="at least 1"):
        tiny_model.predict(image, iterations=0)
    with pytest.raises(GlimpseError, match="no coarse stage"):
        tiny_model.locate_coarse(image)


def test_the_coarse_answer_is_the_glimpses_start(coarse_model, image):
    pos, _ = coarse_model.locate_coarse(image)
    tr = coarse_model.predict(image, iterations=2, facing="right")
    np.testing.assert_allclose(tr.positions[0], np.clip(pos, 0, 255), atol=1e-4)
    assert not np.allclose(tr.positions[0], coarse_model.mean_start, atol=1.0)


def test_a_given_start_bypasses_the_coarse_stage(coarse_model, image, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("locate_coarse called although a start was given")

    monkeypatch.setattr(coarse_model, "locate_coarse", boom)
    st = coarse_model.mean_start + [7.0, -4.0]
    for facing in ("right", "left", "auto"):
        tr = coarse_model.predict(image, iterations=1, start=st, facing=facing)
        np.testing.assert_allclose(tr.positions[0], st, atol=1e-3)


def test_facing_comes_from_the_coarse_answer(coarse_model, image, monkeypatch):
    mean = coarse_model.mean_start
    canon = mean + [3.0, -2.0]  # what the coarse stage reads on the mirrored image (training way round)
    answer = {"pos": _mirror(mean, 256)}
    seen = []

    def fake(pyr):  # the coarse stage's (positions, spread, disagreement)
        seen.append(pyr)
        return (answer["pos"].copy() if len(seen) % 2 else canon.copy()), np.ones(K), np.zeros(K)

    monkeypatch.setattr(coarse_model, "_coarse", fake)
    tr = coarse_model.predict(image, iterations=1)
    assert tr.facing == "left" and len(seen) == 2
    np.testing.assert_array_equal(seen[1].levels[0].numpy(), image[:, ::-1])  # re-read mirrored
    np.testing.assert_allclose(tr.positions[0], _mirror(canon, 256), atol=1e-3)  # in image pixels
    seen.clear()
    assert coarse_model.predict(image, iterations=0).facing == "left"
    # the left run is the mirrored image's run mapped back
    seen.clear()
    ref = coarse_model.predict(image, iterations=1, facing="left", start=_mirror(canon, 256))
    np.testing.assert_allclose(tr.positions, ref.positions, atol=1e-6)
    seen.clear()
    answer["pos"] = mean.copy()
    seen.clear()
    assert coarse_model.predict(image, iterations=1).facing == "right" and len(seen) == 1
    assert coarse_model.predict(image, iterations=0).facing == "right"
    # an explicit facing overrides the coarse stage's
    answer["pos"] = _mirror(mean, 256)
    assert coarse_model.predict(image, iterations=1, facing="right").facing == "right"
    assert coarse_model.predict(image, iterations=0, facing="right").facing == "right"


def test_flip_average_meta_reaches_locate(coarse_model, image):
    plain = coarse_model.locate_coarse(image)[0]
    coarse_model.meta["coarse_flip_average"] = True
    avg = coarse_model.locate_coarse(image)[0]
    assert not np.allclose(plain, avg)
    np.testing.assert_array_equal(coarse_model.predict(image, iterations=0, facing="right").positions[0], avg)


def test_zero_iterations_with_a_given_start(coarse_model, image):
    st = coarse_model.mean_start + 3.0
    tr = coarse_model.predict(image, iterations=0, start=st, facing="right")
    np.testing.assert_allclose(tr.positions[-1], st, atol=1e-3)
    assert tr.positions.shape[0] == 1 and tr.iterations == 0


# ------------------------------------------------------------------------ 8. end to end
def test_training_data_builds_the_views(tiny_data):
    ds = load_dataset(tiny_data["root"], "train")
    plain = TrainingData(ds, 3, 64)
    assert plain.views is None
    data = TrainingData(ds, 3, 64, coarse=TINY_COARSE)
    views, hw, truth_n = data.views
    assert views.shape == (6, 1, 64, 64) and hw == (256, 256)
    torch.testing.assert_close(truth_n, to_normalised(data.truth, (256, 256)))
    for i in (0, 5):
        torch.testing.assert_close(views[i, 0], build_pyramid(ds.image(i), 3).levels[2].float())


def test_train_coarse_targets_sit_on_the_rendered_landmarks(monkeypatch):
    """Inside train_coarse itself: every augmented view's target peak (heatmap pixels, mapped
    to view pixels) is where the rendered view shows the landmark's dot."""
    from napari_glimpse import coarse

    cfg = replace(TINY_COARSE, n_landmarks=1, batch_size=16, rotation_deg=10.0, log_scale=0.1, shift=0.05,
                  flip=0.5, seed=3)
    rng = np.random.default_rng(1)
    pts = rng.uniform([30, 35], [66, 93], (8, 1, 2))  # (x, y) in 96 x 128 images, well inside
    levels = torch.stack([_dot_image(128, 96, *p[0], sigma=2.0) for p in pts])[:, None]
    truth_n = to_normalised(torch.as_tensor(pts, dtype=torch.float32), (128, 96))
    seen = {}
    render, targets = coarse.render_views, coarse.gaussian_targets

    def spy_render(level, theta, hw):
        seen.setdefault("views", render(level, theta, hw))
        seen.setdefault("theta", theta)
        return seen["views"]

    def spy_targets(xy, heat_hw, sigma):
        seen.setdefault("hm_xy", xy.clone())
        return targets(xy, heat_hw, sigma)

    monkeypatch.setattr(coarse, "render_views", spy_render)
    monkeypatch.setattr(coarse, "gaussian_targets", spy_targets)
    calls = []
    train_coarse(levels, (128, 96), truth_n, cfg, time_budget_s=60.0, progress=False,
                 should_stop=lambda: calls.append(1) or len(calls) > 1)
    views, hm_xy, theta = seen["views"], seen["hm_xy"], seen["theta"]
    assert views.shape == (16, 1, 64, 48) and hm_xy.shape == (16, 1, 2)
    flips = theta[:, 0, 0] < 0
    assert 0 < int(flips.sum()) < 16  # both orientations in the batch
    view_xy = (hm_xy[:, 0].numpy() + 0.5) * 2 - 0.5  # heatmap (32 x 24) -> view (64 x 48) pixels
    for b in range(16):
        brightest, centroid = _peak(views[b, 0])
        assert np.abs(brightest - view_xy[b]).max() <= 1.0, (b, brightest, view_xy[b])
        assert np.linalg.norm(centroid - view_xy[b]) < 0.5, (b, centroid, view_xy[b])


def test_train_coarse_learns_the_layout_quickly():
    """On views whose only content is one dot per landmark, a few seconds of training put
    the heatmap peaks much closer to the dots than the layout's mean."""
    cfg = replace(TINY_COARSE, n_landmarks=2, lr=5e-3, batch_size=8, rotation_deg=5.0, flip=0.5)
    rng = np.random.default_rng(0)
    pts = np.stack([np.array([[40.0, 40.0], [90.0, 80.0]]) + rng.uniform(-20, 20, (2, 2)) for _ in range(16)])
    imgs = []
    for p in pts:  # 128 x 96 "level" (image = level), dot k has size 3 + 3 k
        im = torch.zeros(128, 96)
        for k, (x, y) in enumerate(p):
            im = torch.maximum(im, _dot_image(128, 96, x, y, sigma=2.0 + 2.0 * k))
        imgs.append(im)
    levels = torch.stack(imgs)[:, None]
    truth_n = to_normalised(torch.as_tensor(pts, dtype=torch.float32), (128, 96))
    seen = []
    net, hist = train_coarse(levels, (128, 96), truth_n, cfg, time_budget_s=600.0, progress=False,
                             callback=seen.append, evaluate=lambda n: 1.5, max_steps=250)
    assert not net.training and hist[-1]["stage"] == "coarse" and hist[-1]["val_mre_mm"] == 1.5
    assert hist[-1]["step"] == len(seen) == 250 and seen[-1]["loss"] < seen[0]["loss"]
    err = [np.linalg.norm(locate(net, lv[0].round().to(torch.uint8), (128, 96))[0] - p, axis=-1).mean()
           for lv, p in zip(levels[:6], pts[:6])]
    base = np.linalg.norm(pts[:6] - pts.mean(0), axis=-1).mean()
    assert np.mean(err) < 0.75 * base, (np.mean(err), base)  # about 0.4 after ~250 steps


def test_train_with_a_coarse_stage_end_to_end(tiny_data, tmp_path):
    ds = load_dataset(tiny_data["root"], "train")
    val = load_dataset(tiny_data["root"], "test1")
    out = tmp_path / "m.pt"
    infos = []
    t = time.monotonic()
    model = train(ds, out, TINY_MODEL_CONFIG, TrainConfig(batch_size=4, max_steps=4, save_every_s=1e9, seed=0),
                  device="cpu", progress=False, callback=infos.append, val=val, coarse_budget_s=3.0,
                  coarse_config=TINY_COARSE)
    assert time.monotonic() - t < 15
    assert isinstance(model.coarse, CoarseNet) and not model.coarse.training
    assert model.coarse.cfg == TINY_COARSE
    hist = model.meta["coarse_history"]
    assert hist[-1]["stage"] == "coarse" and hist[-1]["step"] >= 1
    assert math.isfinite(hist[-1]["val_mre_mm"])
    assert 3.0 <= model.meta["coarse_train_wall_s"] < 8.0
    assert model.meta["train_steps"] == 4
    # the coarse stage trains first, then the glimpses
    stages = [i.get("stage", "glimpse") for i in infos]
    assert stages[0] == "coarse" and stages[-1] == "glimpse"
    assert stages == sorted(stages)  # "coarse" < "glimpse": no interleaving
    assert [i["step"] for i in infos if "stage" not in i] == [1, 2, 3, 4]
    # the file (and the resume state) carry the coarse stage
    assert read_checkpoint(out)["format_version"] == 2
    loaded = GlimpseModel.load(out, device="cpu")
    assert loaded.coarse is not None and loaded.meta["coarse_history"][-1]["step"] == hist[-1]["step"]
    for k, v in model.coarse.state_dict().items():
        assert torch.equal(v, loaded.coarse.state_dict()[k]), k
    img = ds.image(0)
    np.testing.assert_array_equal(loaded.predict(img, iterations=0).positions,
                                  model.predict(img, iterations=0).positions)
    assert read_checkpoint(resume_path(out))["coarse_state_dict"].keys() == model.coarse.state_dict().keys()
    # resuming does not train the coarse stage again, and keeps it
    more = train(ds, out, device="cpu", resume=True, progress=False, max_steps=6, coarse_budget_s=3.0)
    assert more.meta["train_steps"] == 6
    assert more.meta["coarse_history"] == loaded.meta["coarse_history"]
    for k, v in model.coarse.state_dict().items():
        assert torch.equal(v, more.coarse.state_dict()[k]), k


def test_coarse_blend_mixes_the_two_answers(coarse_model, image):
    coarse_model.meta.pop("coarse_blend", None)
    plain = coarse_model.predict(image, iterations=2, facing="right")
    coarse = coarse_model.predict(image, iterations=0, facing="right").final
    try:
        coarse_model.meta["coarse_blend"] = 0.25
        mixed = coarse_model.predict(image, iterations=2, facing="right")
        np.testing.assert_allclose(mixed.final, 0.25 * coarse + 0.75 * plain.final, atol=1e-4)
        np.testing.assert_allclose(mixed.positions[:-1], plain.positions[:-1])  # only the answer changes
        # a given start means no coarse answer to blend with
        st = coarse_model.mean_start.copy()
        coarse_model.meta["coarse_blend"] = 0.0
        with_start = coarse_model.predict(image, iterations=1, start=st, facing="right").final
        coarse_model.meta["coarse_blend"] = 0.25
        np.testing.assert_allclose(coarse_model.predict(image, iterations=1, start=st, facing="right").final,
                                   with_start)
    finally:
        coarse_model.meta.pop("coarse_blend", None)


# ------------------------------------------------------------------------ coarse ensemble
def test_ensemble_answer_is_the_mean_of_its_members():
    a, b = _randomise(CoarseNet(TINY_COARSE), seed=11), _randomise(CoarseNet(TINY_COARSE), seed=12)
    rng = np.random.default_rng(1)
    level = torch.as_tensor(rng.integers(0, 256, (64, 64)), dtype=torch.uint8)
    hw = (256, 256)
    for flip in (False, True):
        pa, sa = locate(a, level, hw, flip_average=flip)
        pb, sb = locate(b, level, hw, flip_average=flip)
        assert not np.allclose(pa, pb, atol=1.0)  # the members disagree, so the mean is a real test
        p, s = locate(CoarseEnsemble([a, b]), level, hw, flip_average=flip)
        np.testing.assert_allclose(p, (pa + pb) / 2, atol=1e-3)
        if not flip:  # two passes: the members' mean spread and half their distance, in quadrature
            half = np.linalg.norm(pa - pb, axis=-1) / 2
            np.testing.assert_allclose(s, np.sqrt(((sa + sb) / 2) ** 2 + half**2), rtol=1e-3)
    pm, _ = locate(CoarseEnsemble([a, b]), level.flip(-1), hw, flip_average=True)
    np.testing.assert_allclose(pm, _mirror(locate(CoarseEnsemble([a, b]), level, hw, flip_average=True)[0], 256),
                               atol=1e-3)


def test_ensemble_members_must_agree_on_view_and_landmarks():
    a = CoarseNet(TINY_COARSE)
    with pytest.raises(ValueError, match="share"):
        CoarseEnsemble([a, CoarseNet(replace(TINY_COARSE, n_landmarks=TINY_COARSE.n_landmarks + 1))])
    with pytest.raises(ValueError, match="at least one"):
        CoarseEnsemble([])


def test_ensemble_checkpoint_round_trip(coarse_model, image, tmp_path):
    coarse_model.coarse = CoarseEnsemble([coarse_model.coarse, _randomise(CoarseNet(TINY_COARSE), seed=5)])
    p = tmp_path / "ensemble.pt"
    coarse_model.save(p)
    ck = read_checkpoint(p)
    assert ck["format_version"] == 3 and FORMAT_VERSION >= 3
    assert len(ck["coarse_members"]) == 2 and "coarse_state_dict" not in ck
    torch.load(p, map_location="cpu", weights_only=True)
    loaded = GlimpseModel.load(p, device="cpu")
    assert isinstance(loaded.coarse, CoarseEnsemble) and len(loaded.coarse.members) == 2
    assert not loaded.coarse.training
    for kw in ({"iterations": 0}, {"iterations": 1, "facing": "left"}):
        a, b = coarse_model.predict(image, **kw), loaded.predict(image, **kw)
        np.testing.assert_array_equal(a.positions, b.positions)
    # the second member counts: alone, the first gives another answer
    first = loaded.locate_coarse(image)[0]
    loaded.coarse = loaded.coarse.members[0]
    assert not np.allclose(first, loaded.locate_coarse(image)[0])


def test_a_version_3_file_is_refused_clearly_by_a_version_2_reader(coarse_model, tmp_path, monkeypatch):
    import napari_glimpse.checkpoint as ckmod

    coarse_model.coarse = CoarseEnsemble([coarse_model.coarse, coarse_model.coarse])
    coarse_model.save(tmp_path / "e.pt")
    monkeypatch.setattr(ckmod, "FORMAT_VERSION", 2)
    with pytest.raises(GlimpseError, match="newer napari-glimpse"):
        GlimpseModel.load(tmp_path / "e.pt", device="cpu")


# ------------------------------------------------------------------------ fine-tuning the coarse stage
def _weights(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_train_coarse_from_init_starts_at_its_weights_and_moves():
    init = _randomise(CoarseNet(TINY_COARSE), seed=21)
    before = _weights(init)
    levels = torch.rand(3, 1, 128, 96) * 255
    truth_n = torch.rand(3, K, 2) * 1.2 - 0.6
    other_cfg = replace(TINY_COARSE, width=8)  # ignored: the init's configuration wins
    net, hist = train_coarse(levels, (256, 192), truth_n, other_cfg, 1e9, progress=False, max_steps=2,
                             init=init, lr_scale=0.1)
    assert net is not init and _same(before, _weights(init))  # the init is copied, not changed
    assert net.cfg == TINY_COARSE and hist[-1]["step"] == 2
    assert not _same(before, _weights(net))


def test_finetune_tunes_every_member_of_the_coarse_ensemble(coarse_model, tiny_data, tmp_path):
    coarse_model.coarse = CoarseEnsemble([coarse_model.coarse, _randomise(CoarseNet(TINY_COARSE), seed=6)])
    before = [_weights(m) for m in coarse_model.coarse.members]
    ds = load_dataset(tiny_data["root"], "train")
    infos = []
    model = train(ds, tmp_path / "ft.pt", train_config=TrainConfig(batch_size=4, max_steps=2, save_every_s=1e9),
                  device="cpu", init=coarse_model, progress=False, callback=infos.append, coarse_steps=3)
    assert isinstance(model.coarse, CoarseEnsemble) and len(model.coarse.members) == 2
    for b, m in zip(before, model.coarse.members):
        assert not _same(b, _weights(m)) and not m.training
    coarse_infos = [i for i in infos if i.get("stage") == "coarse"]
    assert [(i["member"], i["step"]) for i in coarse_infos] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    prog = [i["progress"] for i in coarse_infos]
    assert prog == sorted(prog) and 0 < prog[0] and prog[-1] == pytest.approx(1.0)
    assert model.meta["coarse_finetune_steps"] == 3 and len(model.meta["coarse_finetune_history"]) >= 2
    assert model.meta["train_steps"] == 2
    loaded = GlimpseModel.load(tmp_path / "ft.pt", device="cpu")
    for m, n in zip(model.coarse.members, loaded.coarse.members):
        assert _same(_weights(m), _weights(n))


def test_finetune_without_coarse_steps_keeps_the_coarse_stage(coarse_model, tiny_data, tmp_path):
    before = _weights(coarse_model.coarse)
    ds = load_dataset(tiny_data["root"], "train")
    model = train(ds, tmp_path / "ft.pt", train_config=TrainConfig(batch_size=4, max_steps=1, save_every_s=1e9),
                  device="cpu", init=coarse_model, progress=False)
    assert _same(before, _weights(model.coarse))
    assert "coarse_finetune_steps" not in model.meta


def test_cli_finetune_tunes_the_coarse_stage_and_reports_it(coarse_model, tiny_data, tmp_path, capsys):
    import json

    from napari_glimpse.cli import main

    parent = tmp_path / "parent.pt"
    coarse_model.save(parent)
    before = _weights(coarse_model.coarse)
    out = tmp_path / "ft.pt"
    assert main(["finetune", "--model", str(parent), "--data", str(tiny_data["root"]), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--progress-json"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    coarse = [ln for ln in lines if ln.get("stage") == "coarse"]
    assert [ln["step"] for ln in coarse] == [1, 2]  # --max-steps by default
    glimpse = [ln for ln in lines if "stage" not in ln and not ln.get("done")]
    assert [ln["step"] for ln in glimpse] == [1, 2] and all("loss_mm" in ln for ln in glimpse)
    assert lines.index(coarse[-1]) < lines.index(glimpse[0])  # the coarse stage first
    assert lines[-1]["done"] is True
    assert not _same(before, _weights(GlimpseModel.load(out, device="cpu").coarse))
    # --coarse-steps 0 leaves the coarse stage as it was
    assert main(["finetune", "--model", str(parent), "--data", str(tiny_data["root"]), "--out", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--coarse-steps", "0"]) == 0
    assert _same(before, _weights(GlimpseModel.load(out, device="cpu").coarse))


# ------------------------------------------------------------------------ inference copy
def _dict_keys(net: torch.nn.Module) -> list[set]:
    """Every module's own attribute names (its ``__dict__``), module by module."""
    return [set(m.__dict__) for m in net.modules()]


def test_the_torch_backend_folds_batch_norm_and_follows_the_weights():
    """A net's runtime (runtime.NetRuntime, its TorchBackend) runs a copy of it without its
    batch-norm layers, with the net's answers; the copy is made once, and again after the weights
    change; a net in training mode is used as it is. Nothing is stored on the net, and a copy of
    the runtime makes its own copy."""
    import copy

    net = _randomise(CoarseNet(TINY_COARSE), seed=11)
    fresh = _dict_keys(CoarseNet(TINY_COARSE))
    assert _dict_keys(net) == fresh
    rt = NetRuntime(net)
    x = torch.rand(2, 1, *TINY_COARSE.input_hw) * 255
    fast = rt.backend()
    assert rt.int8 is None and rt.graph() is None and rt.usable() is None  # no graph: the float copy
    assert fast is rt.torch.module() and fast is rt.backend(int8=False)
    assert fast is not net and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the net keeps its own
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rt(x), net(x), atol=1e-4, rtol=1e-4)
    # the copy's convolution weights are laid out channels-last, like the activations; the net's stay as they were
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous(memory_format=torch.channels_last)
                   for w in (m.weight for m in net.modules()
                             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1))
    assert rt.backend() is fast and rt.torch.module() is fast  # unchanged weights: the same copy
    # nothing on the net: no module gained an attribute, the state dict is the net's own
    assert _dict_keys(net) == fresh
    assert list(net.state_dict()) == list(CoarseNet(TINY_COARSE).state_dict())
    held = [v for m in net.modules() for a in m.__dict__.values()
            for v in (a if isinstance(a, (tuple, list)) else (a,))]
    assert not any(isinstance(v, (torch.nn.Module, TorchBackend, NetRuntime)) for v in held)
    # so another backend of the same net makes its own copy (with the same answers)
    other = TorchBackend(net).module()
    assert other is not fast
    with torch.inference_mode():
        torch.testing.assert_close(other(x), fast(x), atol=1e-5, rtol=1e-5)
    # a copy of the runtime does not carry the fused copy: it makes its own, of its own net
    twin = copy.deepcopy(rt)
    assert twin.torch._copy is None and twin.net is not net and twin.torch.net is twin.net
    twin_fast = twin.backend()
    assert twin_fast is not fast and rt.backend() is fast
    with torch.inference_mode():
        torch.testing.assert_close(twin_fast(x), fast(x), atol=1e-5, rtol=1e-5)
    # an optimiser step changes the weights in place: a new copy, with the new answers
    net.train()
    assert rt.backend() is net and rt.backend(int8=False) is net
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x).square().mean().backward()
    opt.step()
    net.eval()
    again = rt.backend()
    assert again is not fast and rt.backend() is again
    with torch.inference_mode():
        assert not torch.allclose(again(x), fast(x), atol=1e-3)
        torch.testing.assert_close(again(x), net(x), atol=1e-4, rtol=1e-4)
    # loading other weights, too
    net.load_state_dict(_randomise(CoarseNet(TINY_COARSE), seed=12).state_dict())
    third = rt.backend()
    assert third is not again
    with torch.inference_mode():
        torch.testing.assert_close(third(x), net(x), atol=1e-4, rtol=1e-4)
    assert _dict_keys(net) == fresh
