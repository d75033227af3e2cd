"""Fine stage: window geometry, training targets, refinement, the checkpoint, the fine answer
in predict (both facings), training end to end and fine-tuning."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_CONFIG, randomise_weights

from napari_glimpse.checkpoint import FORMAT_VERSION, read_checkpoint
from napari_glimpse.coarse import CoarseConfig, CoarseNet, to_normalised
from napari_glimpse.errors import GlimpseError
from napari_glimpse.fine import (
    FineConfig,
    FineEnsemble,
    FineNet,
    cut_windows,
    fine_levels,
    kinds_of,
    refine,
    train_fine,
    window_matrix,
)
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset, read_image
from napari_glimpse.pyramid import build_pyramid, deepen
from napari_glimpse.training import TrainConfig, train

K = 3
TINY_COARSE = CoarseConfig(n_landmarks=K, input_hw=(64, 48), width=4, batch_size=4)
TINY_FINE = FineConfig(n_landmarks=K, level=1, patch=32, width=4, batch_size=8, context=2, jitter_mm=(0.5, 2.0))


def _dot_image(h: int, w: int, x: float, y: float, sigma: float = 1.5) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return 255.0 * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def _centroid(win: torch.Tensor) -> np.ndarray:
    """Intensity centroid (x, y) of a 2-D window, pixels."""
    h, w = win.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    m = win.double()
    return np.array([float((m * xx).sum() / m.sum()), float((m * yy).sum() / m.sum())])


def _weights(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def image(tiny_data):
    return read_image(tiny_data["test1"]["paths"][0])  # 256 x 256


@pytest.fixture
def fine_model(tiny_model):
    """The tiny glimpse model with random (but fixed) coarse and fine stages."""
    tiny_model.coarse = randomise_weights(CoarseNet(TINY_COARSE), seed=3)
    tiny_model.fine = randomise_weights(FineNet(TINY_FINE), seed=4)
    tiny_model.meta["iterations"] = 0
    return tiny_model


# ------------------------------------------------------------------------ 1. window geometry
@pytest.mark.parametrize("angle,scale", [(0.0, 1.0), (25.0, 1.0), (-15.0, 1.1)])
def test_window_shows_the_point_where_the_offset_says(angle, scale):
    """A window centred near a dot shows the dot at R^-1 (dot - centre) / scale from its middle."""
    h, w, p = 90, 120, 32
    dot = np.array([70.3, 41.6])
    level = _dot_image(h, w, *dot)[None, None]
    centre = dot + [-4.0, 3.0]
    a = math.radians(angle)
    theta = window_matrix((h, w), to_normalised(torch.tensor(np.array([centre]), dtype=torch.float32), (h, w)), p,
                          torch.tensor([a]), torch.tensor([scale]))
    win = cut_windows([level], theta, p)
    assert win.shape == (1, 1, p, p)
    d = dot - centre
    rot_inv = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    expect = rot_inv @ d / scale + (p - 1) / 2
    assert np.linalg.norm(_centroid(win[0, 0]) - expect) < 0.15


def test_context_windows_are_centred_alike_and_twice_as_wide():
    """Channel c is cut from the next level, same centre, same pixel count: twice the area."""
    img = _dot_image(128, 160, 90.0, 50.0, sigma=2.0)
    half = torch.nn.functional.avg_pool2d(img[None, None], 2)  # the next level, 64 x 80
    c = to_normalised(torch.tensor([[86.0, 54.0]]), (128, 160))
    theta = window_matrix((128, 160), c, 16, torch.zeros(1), torch.ones(1))
    win = cut_windows([img[None, None], half], theta, 16)
    assert win.shape == (1, 2, 16, 16)
    fine_xy, ctx_xy = _centroid(win[0, 0]), _centroid(win[0, 1])
    np.testing.assert_allclose(fine_xy - 7.5, [4.0, -4.0], atol=0.2)
    np.testing.assert_allclose(ctx_xy - 7.5, [2.0, -2.0], atol=0.2)  # half the offset at the coarser level


def test_training_cutter_equals_cut_windows():
    """The training path (crops around each centre, no whole-image copies) samples exactly what
    cut_windows samples from the whole images, edges and rotations included."""
    from napari_glimpse.fine import WindowCutter

    g = torch.Generator().manual_seed(0)
    levels = [torch.rand(5, 1, 200, 160, generator=g) * 255, torch.rand(5, 1, 100, 80, generator=g) * 255]
    i = torch.tensor([0, 3, 4, 4, 1, 2])
    c = torch.tensor([[0.1, -0.2], [0.95, 0.9], [-1.0, -1.0], [0.0, 0.0], [-0.5, 0.99], [0.3, 0.3]])
    theta = window_matrix((200, 160), c, 32, torch.tensor([0.2, -0.26, 0.1, 0.0, 0.25, -0.1]),
                          torch.tensor([1.1, 0.9, 1.0, 1.0, 1.105, 0.95]))
    want = cut_windows([lv[i] for lv in levels], theta, 32)
    torch.testing.assert_close(WindowCutter(levels, 32)(i, theta), want, atol=0.02, rtol=0)
    # centres beyond the image (a landmark near the edge plus the training jitter): edge pixels
    # repeated, as cut_windows' border sampling gives, rather than a torn crop
    out = torch.tensor([[1.1, 0.0], [-1.15, 0.5], [0.0, 1.2], [0.2, -1.3], [1.25, 1.25], [-1.2, -1.1]])
    theta = window_matrix((200, 160), out, 32, torch.tensor([0.2, -0.26, 0.1, 0.0, 0.25, -0.1]), torch.ones(6))
    want = cut_windows([lv[i] for lv in levels], theta, 32)
    torch.testing.assert_close(WindowCutter(levels, 32)(i, theta), want, atol=0.02, rtol=0)


def test_fine_levels_reads_the_context_levels_and_deepens_short_pyramids(tiny_data):
    ds = load_dataset(tiny_data["root"], "train")
    pyrs = [build_pyramid(ds.image(i), 3) for i in range(2)]
    truth = ds.ground_truth("mean")[:2]
    levels, tn = fine_levels(pyrs, truth, TINY_FINE)
    assert [tuple(x.shape) for x in levels] == [(2, 1, 128, 128), (2, 1, 64, 64)]
    assert torch.equal(levels[1][1, 0], pyrs[1].levels[2].float())
    np.testing.assert_allclose(tn[0].numpy(), to_normalised(torch.as_tensor(truth[0], dtype=torch.float32),
                                                            (256, 256)).numpy())
    # level 3 is below these 3-level pyramids: made from level 2 as refine() makes it
    deep, _ = fine_levels(pyrs, truth, replace(TINY_FINE, level=2))
    assert [tuple(x.shape) for x in deep] == [(2, 1, 64, 64), (2, 1, 32, 32)]
    assert torch.equal(deep[0], levels[1])
    assert torch.equal(deep[1][1, 0], deepen(pyrs[1].levels, 4)[3].float())


def test_train_fine_targets_sit_on_the_windows_landmarks(monkeypatch):
    """Inside train_fine: every window's target peak (heatmap pixels -> window pixels) is where
    the window shows its landmark's dot, and the windows are off-centre by the jitter."""
    from napari_glimpse import fine

    cfg = replace(TINY_FINE, n_landmarks=1, context=1, batch_size=16, jitter_mm=(0.4, 0.8), pixel_spacing=0.1)
    rng = np.random.default_rng(0)
    pts = rng.uniform([30, 30], [66, 98], (6, 1, 2))
    levels = torch.stack([_dot_image(128, 96, *q[0]) for q in pts])[:, None]
    truth_n = to_normalised(torch.as_tensor(pts, dtype=torch.float32), (128, 96))
    seen = {}
    targets = fine.gaussian_targets

    class SpyCutter(fine.WindowCutter):
        def __call__(self, i, theta):
            seen.setdefault("win", super().__call__(i, theta))
            return seen["win"]

    def spy_targets(xy, heat_hw, sigma):
        seen.setdefault("xy", xy.clone())
        return targets(xy, heat_hw, sigma)

    monkeypatch.setattr(fine, "WindowCutter", SpyCutter)
    monkeypatch.setattr(fine, "gaussian_targets", spy_targets)
    calls = []
    train_fine([levels], truth_n, cfg, 60.0, progress=False, should_stop=lambda: calls.append(1) or len(calls) > 1)
    win, xy = seen["win"], seen["xy"][:, 0].numpy()
    win_xy = (xy + 0.5) * 2 - 0.5  # heatmap (16 x 16) -> window (32 x 32) pixels
    off = []
    for b in range(16):
        assert np.linalg.norm(_centroid(win[b, 0]) - win_xy[b]) < 0.3, b
        off.append(np.linalg.norm(win_xy[b] - 15.5))
    # jitter 0.4-0.8 mm at level 1 (0.2 mm/px): 2-4 px per axis standard deviation
    assert 0.5 < float(np.mean(off)) < 8.0


def test_train_fine_batch_is_the_reference_formula(monkeypatch):
    """The first batch train_fine makes, against the formula written out here: the same random
    draws in the same order, windows, weights (1 for a landmark inside its window) and targets (a
    Gaussian at each landmark inside, zero for the others)."""
    from napari_glimpse import fine

    hw = (128, 96)
    cfg = replace(TINY_FINE, n_landmarks=2, context=1, batch_size=16, sigma=1.0, jitter_mm=(0.5, 4.0),
                  rotation_deg=15.0, log_scale=0.15, pixel_spacing=0.1)
    truth = to_normalised(torch.tensor([[[43.0, 50.0], [50.0, 60.0]], [[60.0, 67.0], [20.0, 30.0]],
                                        [[11.0, 123.0], [80.0, 100.0]]]), hw)
    levels = [torch.rand(3, 1, *hw, generator=torch.Generator().manual_seed(0)) * 255]
    got = {}

    def one_batch(net, stage, lr, batch, *args, **kwargs):
        got["batch"] = batch()
        return []

    monkeypatch.setattr(fine, "fit_heatmaps", one_batch)
    train_fine(levels, truth, cfg, 1.0, progress=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    b, heat_hw, px_mm = cfg.batch_size, (16, 16), cfg.pixel_spacing * 2 ** cfg.level
    lo, hi = (np.log(v / px_mm) for v in cfg.jitter_mm)
    i = torch.randint(0, len(truth), (b,), generator=gen)
    j = torch.randint(0, 2, (b,), generator=gen)
    sd = torch.exp(lo + (hi - lo) * torch.rand(b, 1, generator=gen))
    off = torch.randn(b, 2, generator=gen) * sd * 2 / torch.tensor([hw[1], hw[0]])
    ang = (torch.rand(b, generator=gen) * 2 - 1) * np.radians(cfg.rotation_deg)
    scl = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * cfg.log_scale)
    theta = fine.window_matrix(hw, truth[i, j] + off, cfg.patch, ang, scl)
    x = fine.augment_intensity(fine.WindowCutter(levels, cfg.patch)(i, theta), gen)
    a, t = theta[:, :, :2], theta[:, :, 2]
    o = torch.einsum("bij,bkj->bki", torch.linalg.inv(a), truth[i] - t[:, None, :])
    inside = (o.abs() < 0.95).all(-1).float()
    target = fine.gaussian_targets(fine.from_normalised(o, heat_hw), heat_hw, cfg.sigma)
    got_x, got_target, got_inside = got["batch"]
    assert torch.equal(got_x, x)
    assert torch.equal(got_inside, inside) and 0 < inside.sum() < 2 * b  # some landmarks outside
    assert torch.equal(got_target, target * inside[..., None, None])


def test_a_fine_config_of_a_file_with_the_removed_options_loads():
    """Files written before ``target``, ``coord_weight`` and ``erase`` were removed (every shipped
    net has them at ``"mean"``, 0 and 0) load; what is written has none of them."""
    old = {**TINY_FINE.to_dict(), "target": "mean", "coord_weight": 0.0, "erase": 0.0}
    cfg = FineConfig.from_dict(old)
    assert cfg == TINY_FINE
    assert set(cfg.to_dict()) == set(old) - {"target", "coord_weight", "erase"}
    assert FineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------------ 2. refinement
class _DotFinder(FineNet):
    """A 'fine net' that answers with a sharp heatmap on the brightest pixel of its window, for
    every landmark: refine must then land on the image's dot, whatever the start."""

    def forward(self, x):
        b, _, h, w = x.shape
        hh, ww = (h + 1) // 2, (w + 1) // 2
        pooled = torch.nn.functional.avg_pool2d(x[:, :1], 2)
        logits = pooled.reshape(b, 1, -1) * 0.2
        return logits.reshape(b, 1, hh, ww).expand(b, self.cfg.n_landmarks, hh, ww).clone()


def test_refine_lands_on_the_dot_from_an_offset_start():
    img = _dot_image(256, 192, 101.0, 141.0, sigma=3.0).round().clamp(0, 255).to(torch.uint8)
    pyr = build_pyramid(img.numpy(), 3)
    net = _DotFinder(replace(TINY_FINE, n_landmarks=2, context=1)).eval()
    start = np.array([[94.0, 147.0], [108.0, 136.0]])
    pos, spread = refine(net, pyr.levels, pyr.shape, start, steps=1)
    assert pos.shape == (2, 2) and spread.shape == (2,)
    np.testing.assert_allclose(pos, [[101.0, 141.0]] * 2, atol=1.5)  # full-resolution pixels
    assert np.all(spread > 0)


def test_refine_makes_the_levels_a_pyramid_lacks():
    """A fine net may read deeper than the pyramid it is given (a wide context window): the
    missing levels are made from the last one, the same answer as from a pyramid deepened
    beforehand, and close to one built that deep."""
    img = _dot_image(128, 128, 60.0, 70.0, sigma=3.0).round().clamp(0, 255).to(torch.uint8)
    net = _sharp(randomise_weights(FineNet(replace(TINY_FINE, context=3)), 4))
    start = np.array([[58.0, 73.0], [63.0, 66.0], [55.0, 70.0]])
    short = build_pyramid(img.numpy(), 2)
    got = refine(net, short.levels, short.shape, start)
    want = refine(net, deepen(short.levels, 4), short.shape, start)
    np.testing.assert_array_equal(got[0], want[0])
    native = build_pyramid(img.numpy(), 4)
    np.testing.assert_allclose(got[0], refine(net, native.levels, native.shape, start)[0], atol=0.5)


# ------------------------------------------------------------------------ 3. in the model
def test_predict_refines_the_coarse_answer(fine_model, image):
    coarse_only = fine_model.locate_coarse(image, fine_steps=0)[0]
    pyr = fine_model.pyramid(image)
    want, want_spread = refine(fine_model.fine, pyr.levels, pyr.shape, coarse_only, steps=1)
    tr = fine_model.predict(image, facing="right")
    got = tr.final
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(got, coarse_only)
    # the uncertainty is the fine stage's own (not the coarse stage's) when it looks
    coarse_spread = fine_model.locate_coarse(image, fine_steps=0)[1]
    np.testing.assert_allclose(tr.uncertainty_mm, want_spread * fine_model.pixel_spacing, rtol=1e-4)
    np.testing.assert_allclose(fine_model.locate_coarse(image)[1], want_spread, rtol=1e-4)
    assert not np.allclose(want_spread, coarse_spread, rtol=1e-2)
    fine_model.meta["fine_steps"] = 0  # a model file's choice (a recipe's inference fine_steps)
    tr0 = fine_model.predict(image, facing="right")
    np.testing.assert_allclose(tr0.final, coarse_only, atol=1e-4)
    np.testing.assert_allclose(tr0.uncertainty_mm, coarse_spread * fine_model.pixel_spacing, rtol=1e-4)
    fine_model.meta["fine_steps"] = 2
    two = refine(fine_model.fine, pyr.levels, pyr.shape, coarse_only, steps=2)[0]
    np.testing.assert_allclose(fine_model.predict(image, facing="right").final, two, atol=1e-4)


def test_coarse_views_that_disagree_beyond_the_fine_reach_keep_the_point_uncertain(fine_model, image, monkeypatch):
    """The fine stage corrects offsets up to ``jitter_mm[1]``; where the coarse passes (views,
    nets) disagree by more, its own narrow peak cannot vouch for the point: the uncertainty is at
    least the disagreement. Below that, it is the fine stage's alone. Positions do not change."""
    import napari_glimpse.stages as stages_mod

    real = stages_mod.locate_parts
    reach = fine_model.fine.cfg.jitter_mm[1] / fine_model.pixel_spacing  # full-resolution pixels
    plain = fine_model.predict(image, facing="right")
    dis = np.zeros(K)
    dis[0], dis[1] = 10 * reach, 0.9 * reach

    def disagreeing(*args, **kwargs):
        pos, width, _ = real(*args, **kwargs)
        return pos, width, dis

    monkeypatch.setattr(stages_mod, "locate_parts", disagreeing)
    tr = fine_model.predict(image, facing="right")
    np.testing.assert_allclose(tr.final, plain.final, atol=1e-6)
    assert tr.uncertainty_mm[0] == pytest.approx(10 * reach * fine_model.pixel_spacing)
    assert plain.uncertainty_mm[0] < tr.uncertainty_mm[0]
    np.testing.assert_allclose(tr.uncertainty_mm[1:], plain.uncertainty_mm[1:], rtol=1e-6)
    np.testing.assert_allclose(fine_model.locate_coarse(image)[1] * fine_model.pixel_spacing, tr.uncertainty_mm,
                               rtol=1e-6)
    # without a fine look the coarse spread already counts the disagreement in quadrature
    s0 = fine_model.locate_coarse(image, fine_steps=0)[1]
    assert s0[0] >= 10 * reach


def test_glimpses_start_from_the_fine_answer(fine_model, image):
    tr = fine_model.predict(image, iterations=2, facing="right")
    np.testing.assert_allclose(tr.positions[0], fine_model.predict(image, facing="right").final, atol=1e-3)


def test_mirrored_image_gets_the_mirrored_fine_answer(fine_model, image):
    right = fine_model.predict(image, facing="right").final
    left = fine_model.predict(np.ascontiguousarray(image[:, ::-1]), facing="left")
    np.testing.assert_allclose(left.final, right * [-1, 1] + [image.shape[1] - 1, 0], atol=1e-3)


def test_checkpoint_round_trip_with_a_fine_stage(fine_model, image, tmp_path):
    p = tmp_path / "fine.pt"
    fine_model.save(p)
    ck = read_checkpoint(p)
    # one fine net stays readable by version-4 readers
    assert ck["format_version"] == 4 < FORMAT_VERSION and ck["fine"]["config"] == TINY_FINE.to_dict()
    torch.load(p, map_location="cpu", weights_only=True)
    loaded = GlimpseModel.load(p, device="cpu")
    assert isinstance(loaded.fine, FineNet) and loaded.fine.cfg == TINY_FINE and not loaded.fine.training
    assert _same(_weights(fine_model.fine), _weights(loaded.fine))
    np.testing.assert_array_equal(loaded.predict(image).positions, fine_model.predict(image).positions)


def test_a_version_4_file_is_refused_clearly_by_a_version_3_reader(fine_model, tmp_path, monkeypatch):
    import napari_glimpse.checkpoint as ckmod

    fine_model.save(tmp_path / "f.pt")
    monkeypatch.setattr(ckmod, "FORMAT_VERSION", 3)
    with pytest.raises(GlimpseError, match="newer napari-glimpse"):
        GlimpseModel.load(tmp_path / "f.pt", device="cpu")


def test_a_corrupt_fine_stage_is_a_clear_error(fine_model, tmp_path):
    ck = fine_model.to_checkpoint()
    ck["fine"]["state_dict"].pop(next(iter(ck["fine"]["state_dict"])))
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(GlimpseError, match="bad fine stage"):
        GlimpseModel.load(tmp_path / "bad.pt", device="cpu")


# ------------------------------------------------------------------------ 4. training
def test_train_fine_learns_to_find_dots_quickly():
    """Windows whose only content is the landmark's dot: a few hundred steps bring refine much
    closer to the dots than the starts were."""
    torch.set_num_threads(1)
    cfg = FineConfig(n_landmarks=1, level=0, patch=32, width=8, batch_size=16, context=1, jitter_mm=(0.3, 0.6),
                     pixel_spacing=0.1, lr=3e-3, seed=1)
    rng = np.random.default_rng(2)
    pts = rng.uniform(30, 98, (12, 1, 2))
    levels = torch.stack([_dot_image(128, 128, *q[0], sigma=2.0) for q in pts])[:, None]
    net, hist = train_fine([levels], to_normalised(torch.as_tensor(pts, dtype=torch.float32), (128, 128)), cfg,
                           1e9, progress=False, max_steps=150)
    assert hist[-1]["step"] == 150
    errs, start_errs = [], []
    for q in rng.uniform(35, 93, (8, 2)):
        img = _dot_image(128, 128, *q, sigma=2.0).round().to(torch.uint8)
        start = q + rng.normal(0, 4.0, 2)
        pos, _ = refine(net, [img], (128, 128), start[None], steps=1)
        errs.append(np.linalg.norm(pos[0] - q))
        start_errs.append(np.linalg.norm(start - q))
    assert np.mean(errs) < 0.4 * np.mean(start_errs), (np.mean(errs), np.mean(start_errs))


def test_update_average_moves_a_fraction_of_the_way_and_copies_counters():
    from napari_glimpse.coarse import update_average

    net, avg = randomise_weights(FineNet(TINY_FINE), seed=1), randomise_weights(FineNet(TINY_FINE), seed=2)
    before, target = _weights(avg), _weights(net)
    update_average(avg, net, 0.9, step=1000)  # past the ramp: the decay itself
    after = _weights(avg)
    for k, v in after.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * target[k])
        else:  # batch norm's step counter
            assert torch.equal(v, target[k])
    avg2 = randomise_weights(FineNet(TINY_FINE), seed=2)
    update_average(avg2, net, 0.9, step=1)  # early: decay (1 + 1) / (10 + 1), nearer the net
    k = "head.weight"
    torch.testing.assert_close(avg2.state_dict()[k], 2 / 11 * before[k] + 9 / 11 * target[k])


def test_train_fine_keeps_weight_averages_without_changing_the_net():
    """The averages ride along: the net trained with them equals the one trained without (same
    seed), and each average is a different net in eval mode, nearer the net the higher its
    weight on recent steps."""
    torch.set_num_threads(1)
    cfg = FineConfig(n_landmarks=1, level=0, patch=32, width=4, batch_size=4, context=1, jitter_mm=(0.3, 0.6),
                     pixel_spacing=0.1, seed=3)
    pts = np.array([[[40.0, 50.0]], [[70.0, 60.0]]])
    levels = [torch.stack([_dot_image(128, 128, *q[0], sigma=2.0) for q in pts])[:, None]]
    truth = to_normalised(torch.as_tensor(pts, dtype=torch.float32), (128, 128))
    plain, _ = train_fine(levels, truth, cfg, 1e9, progress=False, max_steps=60)
    averages = {0.5: None, 0.8: None}  # past the ramp ((1 + step) / (10 + step)) from steps 8 and 35
    net, _ = train_fine(levels, truth, cfg, 1e9, progress=False, max_steps=60, averages=averages)
    assert _same(_weights(plain), _weights(net))
    fast, slow = averages[0.5], averages[0.8]
    assert not fast.training and not slow.training and isinstance(slow, FineNet)
    assert not any(p.requires_grad for p in slow.parameters())

    def dist(a, b):
        return sum(float((a.state_dict()[k] - b.state_dict()[k]).abs().sum()) for k, _ in a.named_parameters())

    assert 0 < dist(fast, net) < dist(slow, net)
    with pytest.raises(ValueError, match="between 0 and 1"):
        train_fine(levels, truth, cfg, 1e9, progress=False, max_steps=1, averages={1.0: None})


def test_the_fine_decode_window_is_the_models_choice(fine_model, image):
    """meta['fine_decode_window'] (default 2) sets the soft-argmax neighbourhood of the fine look."""
    assert fine_model.fine_decode_window == 2
    coarse_only = fine_model.locate_coarse(image, fine_steps=0)[0]
    pyr = fine_model.pyramid(image)
    w2 = refine(fine_model.fine, pyr.levels, pyr.shape, coarse_only, steps=1, decode_window=2)[0]
    w5 = refine(fine_model.fine, pyr.levels, pyr.shape, coarse_only, steps=1, decode_window=5)[0]
    assert not np.allclose(w2, w5, atol=1e-3)
    np.testing.assert_allclose(fine_model.predict(image, facing="right").final, w2, atol=1e-4)
    fine_model.meta["fine_decode_window"] = 5
    np.testing.assert_allclose(fine_model.predict(image, facing="right").final, w5, atol=1e-4)
    # the coarse stage's window too (meta['coarse_decode_window'], default 2)
    from napari_glimpse.coarse import locate_parts, view_level

    lv = view_level(pyr.shape, fine_model.coarse.cfg.input_hw, len(pyr))
    c2, c5 = (locate_parts(fine_model.coarse, pyr.levels[lv], pyr.shape, decode_window=w)[0] for w in (2, 5))
    assert not np.allclose(c2, c5, atol=1e-3)
    np.testing.assert_allclose(fine_model.locate_coarse(image, fine_steps=0)[0], c2, atol=1e-4)
    fine_model.meta["coarse_decode_window"] = 5
    np.testing.assert_allclose(fine_model.locate_coarse(image, fine_steps=0)[0], c5, atol=1e-4)
    fine_model.meta["coarse_decode_window"] = 2
    # a left-facing image is read mirrored, with the same window
    left = fine_model.predict(np.ascontiguousarray(image[:, ::-1]), facing="left").final
    np.testing.assert_allclose(left, w5 * [-1, 1] + [image.shape[1] - 1, 0], atol=1e-3)
    # an average (kept without gradients) fine-tunes: train_fine's copy of it learns
    frozen = copy.deepcopy(fine_model.fine).requires_grad_(False)
    assert all(p.requires_grad for p in train_fine(
        [torch.zeros(2, 1, 64, 64)] * TINY_FINE.context, torch.zeros(2, K, 2), TINY_FINE, 1e9, progress=False,
        max_steps=1, init=frozen)[0].parameters())


def test_train_with_coarse_and_fine_stages_end_to_end(tiny_data, tmp_path):
    ds = load_dataset(tiny_data["root"], "train")
    val = load_dataset(tiny_data["root"], "test1")
    infos = []
    model = train(ds, tmp_path / "m.pt", TINY_MODEL_CONFIG, TrainConfig(batch_size=4, max_steps=2, save_every_s=1e9),
                  device="cpu", progress=False, callback=infos.append, val=val, coarse_steps=3,
                  coarse_config=TINY_COARSE, fine_steps=4, fine_config=TINY_FINE)
    assert isinstance(model.fine, FineNet) and model.fine.cfg == TINY_FINE and not model.fine.training
    stages = [i.get("stage", "glimpse") for i in infos]
    assert stages == ["coarse"] * 3 + ["fine"] * 4 + ["glimpse"] * 2
    hist = model.meta["fine_history"]
    assert hist[-1]["step"] == 4 and math.isfinite(hist[-1]["val_mre_mm"])
    loaded = GlimpseModel.load(tmp_path / "m.pt", device="cpu")
    assert _same(_weights(model.fine), _weights(loaded.fine))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_coarse_and_fine_stages_train_on_cuda(tiny_data, tmp_path):
    """With device="cuda" every stage trains there (batches made on the CPU, moved to the net)."""
    ds = load_dataset(tiny_data["root"], "train")
    model = train(ds, tmp_path / "m.pt", TINY_MODEL_CONFIG, TrainConfig(batch_size=4, max_steps=2, save_every_s=1e9),
                  device="cuda", progress=False, coarse_steps=3, coarse_config=TINY_COARSE, fine_steps=4,
                  fine_config=TINY_FINE)
    for net in (model.net, model.coarse, model.fine):
        assert next(net.parameters()).device.type == "cuda"
    assert model.meta["fine_history"][-1]["step"] == 4
    assert np.isfinite(model.predict(read_image(tiny_data["test1"]["paths"][0])).final).all()


def test_a_fine_stage_needs_a_coarse_stage(tiny_data, tmp_path):
    ds = load_dataset(tiny_data["root"], "train")
    with pytest.raises(GlimpseError, match="needs a coarse stage"):
        train(ds, tmp_path / "m.pt", TINY_MODEL_CONFIG, TrainConfig(batch_size=4, max_steps=1), device="cpu",
              progress=False, fine_steps=2, fine_config=TINY_FINE)


def test_cli_finetune_tunes_the_fine_stage_after_the_coarse_one(fine_model, tiny_data, tmp_path, capsys):
    from napari_glimpse.cli import main

    parent = tmp_path / "parent.pt"
    fine_model.save(parent)
    before = _weights(fine_model.fine)
    out = tmp_path / "ft.pt"
    assert main(["finetune", "--model", str(parent), "--data", str(tiny_data["root"]), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--progress-json"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    stages = [ln.get("stage", "glimpse") for ln in lines if not ln.get("done")]
    # the answer is the coarse and fine stages' (0 glimpse steps): the images are read, the offsets
    # learned (one line per image), then those stages are tuned, the glimpse net is not
    n_read = stages.count("read")
    assert n_read >= 1 and stages[:n_read] == ["read"] * n_read
    assert stages[n_read:] == ["offsets"] * 6 + ["coarse"] * 2 + ["fine"] * 2
    tuned = GlimpseModel.load(out, device="cpu")
    assert not _same(before, _weights(tuned.fine)) and tuned.meta["fine_finetune_steps"] == 2
    # --fine-steps 0 keeps it
    out2 = tmp_path / "ft2.pt"
    assert main(["finetune", "--model", str(parent), "--data", str(tiny_data["root"]), "--out", str(out2),
                 "--max-steps", "1", "--batch-size", "2", "--fine-steps", "0"]) == 0
    assert _same(before, _weights(GlimpseModel.load(out2, device="cpu").fine))


# ------------------------------------------------------------------------ 5. ensembles
@pytest.fixture
def ensemble_model(fine_model):
    """The fine model with a second (different) fine net: a fine ensemble."""
    fine_model.fine = FineEnsemble([fine_model.fine, randomise_weights(FineNet(TINY_FINE), seed=9)])
    return fine_model


def test_a_fine_ensemble_answers_the_mean_of_its_nets(ensemble_model, image):
    pyr = ensemble_model.pyramid(image)
    start = ensemble_model.locate_coarse(image, fine_steps=0)[0]
    a, b = ensemble_model.fine.members
    pa, sa = refine(a, pyr.levels, pyr.shape, start)
    pb, sb = refine(b, pyr.levels, pyr.shape, start)
    assert not np.allclose(pa, pb, atol=0.5)
    pos, spread = refine(ensemble_model.fine, pyr.levels, pyr.shape, start)
    np.testing.assert_allclose(pos, (pa + pb) / 2, atol=1e-3)
    # the spread adds the nets' disagreement (half their distance) to their mean peak width
    half_gap2 = ((pa - pb) ** 2).sum(-1) / 4
    np.testing.assert_allclose(spread ** 2, ((sa + sb) / 2) ** 2 + half_gap2, rtol=1e-3)
    np.testing.assert_allclose(ensemble_model.predict(image, facing="right").final, pos, atol=1e-3)
    # a second look re-centres every net's windows on the mean answer
    two = refine(ensemble_model.fine, pyr.levels, pyr.shape, start, steps=2)[0]
    np.testing.assert_allclose(two, (refine(a, pyr.levels, pyr.shape, pos)[0]
                                     + refine(b, pyr.levels, pyr.shape, pos)[0]) / 2, atol=1e-3)


def test_fine_ensemble_members_must_share_the_window_size():
    with pytest.raises(ValueError, match="share n_landmarks, patch"):
        FineEnsemble([FineNet(TINY_FINE), FineNet(replace(TINY_FINE, patch=16))])
    with pytest.raises(ValueError, match="at least one"):
        FineEnsemble([])
    FineEnsemble([FineNet(TINY_FINE), FineNet(replace(TINY_FINE, width=6, seed=3))])  # width may differ
    FineEnsemble([FineNet(TINY_FINE), FineNet(replace(TINY_FINE, level=2, context=1))])  # and the levels read


def _sharp(net: torch.nn.Module, gain: float = 40.0) -> torch.nn.Module:
    """Scale a random net's heatmap weights up, so its softmax maps have clear, input-driven peaks."""
    with torch.no_grad():
        net.head.weight.mul_(gain)
    return net


def test_a_fine_ensemble_of_two_kinds_gives_each_net_its_own_windows():
    """Nets reading different levels: each answers from its own windows (as it would alone), the
    ensemble answers their mean, and the look it records is its first net's kind's."""
    img = _dot_image(128, 128, 60.0, 70.0, sigma=3.0).round().clamp(0, 255).to(torch.uint8)
    pyr = build_pyramid(img.numpy(), 4)
    # a and b find the dot from level 1's and level 2's windows; c is a random level-1 net
    a, b = _DotFinder(TINY_FINE).eval(), _DotFinder(replace(TINY_FINE, level=2)).eval()
    c = _sharp(randomise_weights(FineNet(TINY_FINE), 3))
    assert kinds_of([a, b, c]) == {(1, 2): [0, 2], (2, 2): [1]}
    start = np.array([[58.0, 73.0], [63.0, 66.0], [55.0, 70.0]])
    looks_a, looks_b, looks_c = [], [], []
    alone = [refine(m, pyr.levels, pyr.shape, start, record=rec)
             for m, rec in ((a, looks_a), (b, looks_b), (c, looks_c))]
    for found, _ in alone[:2]:  # each in its own geometry
        np.testing.assert_allclose(found, [[60.0, 70.0]] * K, atol=4.0)
    assert not np.allclose(alone[0][0], alone[2][0], atol=1.0)
    looks = []
    pos, spread = refine(FineEnsemble([a, b, c]), pyr.levels, pyr.shape, start, record=looks)
    each = np.stack([p for p, _ in alone], 1)  # (K, 3, 2)
    np.testing.assert_allclose(pos, each.mean(1), atol=1e-3)
    # one net's spread is its peak's width (b's from its own, twice as large, heatmap pixels)
    width = np.mean([s for _, s in alone], 0)
    np.testing.assert_allclose(spread ** 2, width ** 2 + ((each - pos[:, None]) ** 2).sum(-1).mean(1), rtol=1e-4)
    # the recorded look: level 1's windows (a's and c's), their two maps averaged, the whole answer
    np.testing.assert_array_equal(looks[0].windows, looks_a[0].windows)
    maps = [lk[0].heatmaps.astype(np.float32) for lk in (looks_a, looks_b, looks_c)]
    got = looks[0].heatmaps.astype(np.float32)
    np.testing.assert_allclose(got, (maps[0] + maps[2]) / 2, rtol=0.02, atol=1e-4)
    assert np.abs(got - (maps[0] + maps[1] + maps[2]) / 3).max() > 0.01  # b's map is not in it
    np.testing.assert_allclose(looks[0].positions, pos)
    # b reads level 3, below a 3-level pyramid: made there, as deepen makes it
    short = refine(FineEnsemble([a, b]), pyr.levels[:3], pyr.shape, start)[0]
    np.testing.assert_array_equal(short, refine(FineEnsemble([a, b]), deepen(pyr.levels[:3], 4), pyr.shape, start)[0])


def test_recorded_stages_follow_the_first_fine_nets_kind(fine_model, image):
    other = randomise_weights(FineNet(replace(TINY_FINE, level=2, context=1)), 5)
    first = fine_model.fine
    fine_model.fine = FineEnsemble([other, first])
    t = fine_model.predict(image, record_stages=True, facing="right")
    alone = fine_model.predict(image, record_stages=True, facing="right", iterations=0)
    fine_model.fine = other
    o = fine_model.predict(image, record_stages=True, facing="right")
    assert t.fine_level == o.fine_level == 2 and t.fine_windows.shape[2] == 1
    assert t.fine_nets == (1, 2) and o.fine_nets == (1, 1)  # whose maps are shown, of how many
    np.testing.assert_array_equal(t.fine_windows, o.fine_windows)
    np.testing.assert_array_equal(t.fine_window_scale, o.fine_window_scale)
    np.testing.assert_array_equal(t.positions, alone.positions)
    assert not np.allclose(t.positions, o.positions, atol=0.01)  # the answer is both nets'


def test_finetune_tunes_each_net_of_a_two_kind_ensemble_on_its_own_windows(fine_model, tiny_data, tmp_path,
                                                                           monkeypatch):
    import napari_glimpse.fine as fine_module
    from napari_glimpse.cli import main

    seen = []

    def spy(levels, truth_n, cfg, *args, **kw):
        seen.append(((cfg.level, cfg.context), [tuple(x.shape[-2:]) for x in levels]))
        return train_fine(levels, truth_n, cfg, *args, **kw)

    monkeypatch.setattr(fine_module, "train_fine", spy)  # finetune calls it from there
    fine_model.fine = FineEnsemble([fine_model.fine,
                                    randomise_weights(FineNet(replace(TINY_FINE, level=2, context=1)), 5)])
    parent, out = tmp_path / "parent.pt", tmp_path / "ft.pt"
    fine_model.save(parent)
    before = [_weights(m) for m in fine_model.fine.members]
    assert main(["finetune", "--model", str(parent), "--data", str(tiny_data["root"]), "--out", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--coarse-steps", "0", "--fine-steps", "2"]) == 0
    # each net got its own levels (tiny images are 256 px: level l is 256 / 2**l)
    assert seen == [((1, 2), [(128, 128), (64, 64)]), ((2, 1), [(64, 64)])]
    tuned = GlimpseModel.load(out, device="cpu")
    assert [(m.cfg.level, m.cfg.context) for m in tuned.fine.members] == [(1, 2), (2, 1)]
    for b, m in zip(before, tuned.fine.members):
        assert not _same(b, _weights(m))


# ------------------------------------------------------------------------ 6. stage records
def test_refine_records_each_look_without_changing_it():
    """record= gets one FineLook per step: the windows it read (the dot where the geometry says),
    the heatmap it decoded and its answer; the answers are the same as without it."""
    from napari_glimpse.fine import window_scale

    img = _dot_image(256, 192, 101.0, 141.0, sigma=3.0).round().clamp(0, 255).to(torch.uint8)
    pyr = build_pyramid(img.numpy(), 4)
    cfg = replace(TINY_FINE, n_landmarks=2, context=2)
    net = _DotFinder(cfg).eval()
    start = np.array([[94.0, 147.0], [108.0, 136.0]])
    plain = refine(net, pyr.levels, pyr.shape, start, steps=2)
    looks = []
    got = refine(net, pyr.levels, pyr.shape, start, steps=2, record=looks)
    np.testing.assert_array_equal(got[0], plain[0])
    np.testing.assert_array_equal(got[1], plain[1])
    assert len(looks) == 2
    np.testing.assert_array_equal(looks[0].centers, start)
    np.testing.assert_allclose(looks[1].centers, looks[0].positions)  # the second look re-centres on the first answer
    np.testing.assert_allclose(looks[-1].positions, got[0])
    first = looks[0]
    assert first.windows.shape == (2, 2, 32, 32) and first.windows.dtype == np.uint8
    assert first.heatmaps.shape == (2, 16, 16) and first.heatmaps.dtype == np.float16
    np.testing.assert_allclose(first.heatmaps.astype(np.float32).sum((-1, -2)), 1.0, atol=2e-3)
    scale = window_scale(pyr.shape, tuple(pyr.levels[1].shape), 2)
    np.testing.assert_allclose(scale, [[2.0, 2.0], [4.0, 4.0]])
    for k in range(2):
        for c in range(2):
            # the window's frame (normalised, align_corners=False) puts level-l pixel j at (j + 0.5) 2**l - 0.5,
            # the pyramid at j 2**l: the dot shows 2**(l - 1) - 0.5 full-resolution pixels further on
            seen = np.array([101.0, 141.0]) + 2.0 ** (1 + c - 1) - 0.5
            expect = (seen - start[k]) / scale[c] + 15.5
            assert np.linalg.norm(_centroid(torch.as_tensor(first.windows[k, c])) - expect) < 0.15, (k, c)


def test_refine_records_an_ensembles_mean_heatmap():
    img = _dot_image(128, 128, 60.0, 70.0, sigma=3.0).round().clamp(0, 255).to(torch.uint8)
    pyr = build_pyramid(img.numpy(), 3)
    a, b = randomise_weights(FineNet(TINY_FINE), 1), randomise_weights(FineNet(TINY_FINE), 2)
    start = np.array([[60.0, 70.0]] * K)
    looks_a, looks_b, looks = [], [], []
    refine(a, pyr.levels, pyr.shape, start, record=looks_a)
    refine(b, pyr.levels, pyr.shape, start, record=looks_b)
    refine(FineEnsemble([a, b]), pyr.levels, pyr.shape, start, record=looks)
    np.testing.assert_array_equal(looks[0].windows, looks_a[0].windows)
    mean = (looks_a[0].heatmaps.astype(np.float32) + looks_b[0].heatmaps.astype(np.float32)) / 2
    np.testing.assert_allclose(looks[0].heatmaps.astype(np.float32), mean, atol=1e-3)


@pytest.mark.parametrize("iterations,landmarks", [(0, None), (2, None), (0, [2, 0])])
def test_recording_the_stages_changes_no_answer(fine_model, image, iterations, landmarks):
    for facing in ("right", "left"):
        kw = dict(iterations=iterations, landmarks=landmarks, facing=facing)
        plain = fine_model.predict(image, **kw)
        rec = fine_model.predict(image, record_stages=True, **kw)
        np.testing.assert_array_equal(rec.positions, plain.positions)
        np.testing.assert_array_equal(rec.uncertainty_mm, plain.uncertainty_mm)
        assert plain.coarse_positions is None and plain.fine_windows is None and plain.fine_looks == 0
        n = K if landmarks is None else len(landmarks)
        assert rec.coarse_positions.shape == (n, 2) and rec.fine_positions.shape == (1, n, 2)
        assert rec.fine_windows.shape == (1, n, 2, 32, 32) and rec.fine_heatmaps.shape == (1, n, 16, 16)
        assert rec.fine_level == 1 and rec.fine_window_scale.shape == (2, 2) and rec.fine_looks == 1
        assert rec.stage_positions.shape == (2, n, 2)


def test_stage_records_hold_the_coarse_and_fine_answers(fine_model, image):
    ks = [2, 0]
    coarse, _ = fine_model.locate_coarse(image, fine_steps=0)
    tr = fine_model.predict(image, facing="right", record_stages=True, landmarks=ks)
    np.testing.assert_allclose(tr.coarse_positions, coarse[ks], atol=1e-6)
    np.testing.assert_allclose(tr.fine_positions[-1], tr.final, atol=1e-6)
    assert not np.allclose(tr.coarse_positions, tr.final)
    # the windows are the image around the coarse answer: the finest one's centre pixels
    lv1 = fine_model.pyramid(image).levels[1].numpy().astype(np.float32)
    for i, k in enumerate(ks):
        x, y = (coarse[k] + 0.5) / 2 - 0.5  # level-1 pixel of the window centre (normalised frame)
        centre = tr.fine_windows[0, i, 0, 15:17, 15:17].astype(np.float32).mean()
        assert abs(centre - lv1[round(y) - 1: round(y) + 1, round(x) - 1: round(x) + 1].mean()) < 12
    # glimpses after the fine look: the records stay
    tr2 = fine_model.predict(image, facing="right", record_stages=True, iterations=2)
    np.testing.assert_allclose(tr2.positions[0], tr2.fine_positions[-1], atol=1e-3)
    # two looks: each recorded, the second centred on the first answer
    fine_model.meta["fine_steps"] = 2
    two = fine_model.predict(image, facing="right", record_stages=True)
    assert two.fine_windows.shape[0] == 2 and two.fine_looks == 2
    np.testing.assert_allclose(two.fine_positions[-1], two.final, atol=1e-6)


def test_a_mirrored_image_records_the_mirrored_stages(fine_model, image):
    """facing=left reads the mirrored image: the records come back in the image's own pixels,
    positions mirrored and windows and heatmaps flipped left-right, as the glimpses are."""
    w = image.shape[1]
    right = fine_model.predict(image, facing="right", record_stages=True)
    left = fine_model.predict(np.ascontiguousarray(image[:, ::-1]), facing="left", record_stages=True)
    assert left.facing == "left"
    mirror = np.array([-1.0, 1.0]), np.array([w - 1.0, 0.0])
    np.testing.assert_allclose(left.coarse_positions, right.coarse_positions * mirror[0] + mirror[1], atol=1e-3)
    np.testing.assert_allclose(left.fine_positions, right.fine_positions * mirror[0] + mirror[1], atol=1e-3)
    np.testing.assert_allclose(left.fine_positions[-1], left.final, atol=1e-6)
    np.testing.assert_array_equal(left.fine_windows, right.fine_windows[..., ::-1])
    np.testing.assert_allclose(left.fine_heatmaps.astype(np.float32), right.fine_heatmaps[..., ::-1].astype(np.float32),
                               atol=1e-3)
    np.testing.assert_allclose(left.fine_window_scale, right.fine_window_scale)


def test_no_stage_records_without_a_fine_look(fine_model, tiny_model, image):
    fine_model.meta["fine_steps"] = 0
    tr = fine_model.predict(image, facing="right", record_stages=True)
    assert tr.coarse_positions is None and tr.fine_positions is None and tr.stage_positions is None
    fine_model.meta["fine_steps"] = 1
    start = fine_model.locate_coarse(image)[0]
    assert fine_model.predict(image, start=start, iterations=1, record_stages=True).fine_windows is None
    tiny_model.coarse = tiny_model.fine = None
    assert tiny_model.predict(image, iterations=1, record_stages=True).fine_windows is None


def test_the_trajectory_records_what_each_stage_answered(fine_model, image):
    """``stage_answers``: the coarse answer, each fine look's, then each glimpse step's, in order;
    the last is the answer; without stage records the glimpses' start comes first."""
    fine_model.meta["fine_steps"] = 2
    tr = fine_model.predict(image, iterations=2, facing="right", record_stages=True, spacing=0.1)
    names = [n for n, _ in tr.stage_answers]
    assert names == ["coarse", "fine", "fine", "glimpse", "glimpse"]
    np.testing.assert_array_equal(tr.stage_answers[0][1], tr.coarse_positions)
    np.testing.assert_array_equal(tr.stage_answers[2][1], tr.fine_positions[1])
    np.testing.assert_array_equal(tr.stage_answers[-1][1], tr.final)
    plain = fine_model.predict(image, iterations=2, facing="right", spacing=0.1)
    assert [n for n, _ in plain.stage_answers] == ["start", "glimpse", "glimpse"]
    np.testing.assert_array_equal(plain.stage_answers[0][1], tr.fine_positions[1])  # the glimpses start there
