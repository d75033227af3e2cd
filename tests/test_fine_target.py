"""The fine net's target where the data has several annotators: a Gaussian at their mean point
(``FineConfig.target = "mean"``, the default) or one at each annotator's point (``"annotators"``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_CONFIG

from napari_glimpse import fine
from napari_glimpse.cli import main
from napari_glimpse.coarse import CoarseConfig, to_normalised
from napari_glimpse.errors import GlimpseError
from napari_glimpse.fine import FineConfig, FineNet, train_fine
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset
from napari_glimpse.training import TrainConfig, train

# one landmark, no geometric augmentation, a small jitter: 16 x 16 heatmaps, 2 level pixels each
CFG = FineConfig(n_landmarks=1, level=1, patch=32, width=4, batch_size=6, context=1, sigma=1.0,
                 rotation_deg=0.0, log_scale=0.0, jitter_mm=(0.05, 0.1), pixel_spacing=0.1)
HW = (128, 96)


def _truth(senior: list, junior: list) -> torch.Tensor:
    """(N, 2, 1, 2) normalised points of two annotators, level pixels given."""
    pts = torch.tensor([[[s], [j]] for s, j in zip(senior, junior)], dtype=torch.float32)
    return to_normalised(pts, HW)


def _first_batch(monkeypatch, truth_n: torch.Tensor, cfg: FineConfig, spy_maps: bool = False) -> dict:
    """The first training batch train_fine makes (inputs, targets, weights), and with ``spy_maps``
    every Gaussian it drew (heatmap pixel centres and maps)."""
    seen: dict = {}
    targets = fine.gaussian_targets

    def spy(xy, heat_hw, sigma):
        out = targets(xy, heat_hw, sigma)
        seen.setdefault("xy", xy.clone())
        seen.setdefault("maps", out.clone())
        return out

    def one_batch(net, stage, lr, batch, *args, **kwargs):
        seen["x"], seen["target"], seen["inside"] = batch()
        return []

    if spy_maps:
        monkeypatch.setattr(fine, "gaussian_targets", spy)
    monkeypatch.setattr(fine, "fit_heatmaps", one_batch)
    levels = [torch.rand(len(truth_n), 1, *HW, generator=torch.Generator().manual_seed(0)) * 255]
    train_fine(levels, truth_n, cfg, 1.0, progress=False)
    return seen


def test_each_annotator_gets_half_of_the_target(monkeypatch):
    truth = _truth([(40.0, 50.0), (60.0, 70.0)], [(46.0, 50.0), (60.0, 64.0)])
    b = _first_batch(monkeypatch, truth, replace(CFG, target="annotators"), spy_maps=True)
    xy, maps = b["xy"], b["maps"]  # (B, 2, 1, 2) heatmap pixels, (B, 2, 1, h, w)
    assert xy.shape[1] == 2
    torch.testing.assert_close(b["target"], maps.mean(1))
    assert torch.equal(b["inside"], torch.ones(6, 1))
    # the annotators are 6 level pixels = 3 heatmap pixels apart, along x for image 0, y for image 1
    gap = (xy[:, 1] - xy[:, 0])[:, 0]
    assert all(torch.allclose(g.abs(), torch.tensor([3.0, 0.0]), atol=1e-3)
               or torch.allclose(g.abs(), torch.tensor([0.0, 3.0]), atol=1e-3) for g in gap)
    # windows are centred near the annotators' mean (jitter 0.05-0.1 mm: under a heatmap pixel)
    assert (xy.mean(1)[:, 0] - 7.5).abs().max() < 0.6  # the senior's point would be 1.5 off
    # the target has two peaks, one on each annotator's point
    t = b["target"][0, 0]
    for p in xy[0, :, 0]:
        x, y = (int(round(float(v))) for v in p)
        assert t[y, x] > t[int(round(float(xy[0, :, 0, 1].mean()))), int(round(float(xy[0, :, 0, 0].mean())))]


def test_mean_target_from_each_annotators_points_is_the_mean_points_target(monkeypatch):
    truth = _truth([(40.0, 50.0), (60.0, 70.0)], [(46.0, 50.0), (60.0, 64.0)])
    a = _first_batch(monkeypatch, truth, CFG)
    b = _first_batch(monkeypatch, truth.mean(1), CFG)
    for k in ("x", "target", "inside"):
        assert torch.equal(a[k], b[k]), k


def test_the_mean_target_is_the_batch_made_before_the_option(monkeypatch):
    """The batch as train_fine made it before targets per annotator existed (the formula kept
    here as the reference): the same inputs, weights and, wherever the weight is 1, targets."""
    truth = _truth([(40.0, 50.0), (60.0, 70.0), (10.0, 120.0)], [(46.0, 50.0), (60.0, 64.0), (12.0, 126.0)]).mean(1)
    cfg = replace(CFG, batch_size=16, jitter_mm=(0.5, 4.0), rotation_deg=15.0, log_scale=0.15)
    got = _first_batch(monkeypatch, truth, cfg)
    # the reference: the old batch(), the same random draws in the same order
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    levels = [torch.rand(len(truth), 1, *HW, generator=torch.Generator().manual_seed(0)) * 255]
    b, heat_hw, px_mm = cfg.batch_size, (16, 16), cfg.pixel_spacing * 2 ** cfg.level
    lo, hi = (np.log(v / px_mm) for v in cfg.jitter_mm)
    i = torch.randint(0, len(truth), (b,), generator=gen)
    j = torch.randint(0, 1, (b,), generator=gen)
    sd = torch.exp(lo + (hi - lo) * torch.rand(b, 1, generator=gen))
    off = torch.randn(b, 2, generator=gen) * sd * 2 / torch.tensor([HW[1], HW[0]])
    ang = (torch.rand(b, generator=gen) * 2 - 1) * np.radians(cfg.rotation_deg)
    scl = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * cfg.log_scale)
    theta = fine.window_matrix(HW, truth[i, j] + off, cfg.patch, ang, scl)
    x = fine.augment_intensity(fine.WindowCutter(levels, cfg.patch)(i, theta), gen)
    a, t = theta[:, :, :2], theta[:, :, 2]
    o = torch.einsum("bij,bkj->bki", torch.linalg.inv(a), truth[i] - t[:, None, :])
    inside = (o.abs() < 0.95).all(-1).float()
    target = fine.gaussian_targets(fine.from_normalised(o, heat_hw), heat_hw, cfg.sigma)
    assert torch.equal(got["x"], x)
    assert torch.equal(got["inside"], inside) and 0 < inside.sum() < b
    w = inside.bool()
    assert torch.equal(got["target"][w], target[w])


def test_one_annotator_is_taught_alike_either_way(monkeypatch):
    truth = _truth([(40.0, 50.0), (60.0, 70.0)], [(40.0, 50.0), (60.0, 70.0)])[:, :1]
    a = _first_batch(monkeypatch, truth, replace(CFG, target="annotators"))
    b = _first_batch(monkeypatch, truth[:, 0], CFG)
    for k in ("x", "target", "inside"):
        assert torch.equal(a[k], b[k]), k


def test_a_point_only_one_annotator_puts_inside_the_window_is_taught_alone(monkeypatch):
    # the doctors 30 level pixels apart, each 15 from the window centre (its half-width 16): the
    # jitter (2-4 level pixels) puts one of them outside in many windows
    truth = _truth([(33.0, 50.0)], [(63.0, 50.0)])
    b = _first_batch(monkeypatch, truth, replace(CFG, target="annotators", batch_size=64, jitter_mm=(0.4, 0.8)),
                     spy_maps=True)
    xy, maps = b["xy"][:, :, 0], b["maps"][:, :, 0]  # (B, 2, 2), (B, 2, h, w)
    inside = ((xy > -0.1) & (xy < 15.1)).all(-1)  # |window normalised| < 0.95, per annotator
    alone = inside.sum(1) == 1
    assert 5 <= int(alone.sum()) < 64
    for bi in torch.nonzero(alone)[:, 0]:
        torch.testing.assert_close(b["target"][bi, 0], maps[bi, int(inside[bi].int().argmax())])
    torch.testing.assert_close(b["inside"][:, 0], inside.any(1).float())
    both = inside.all(1)
    torch.testing.assert_close(b["target"][both, 0], maps[both].mean(1))


def test_the_target_kind_is_checked_and_round_trips():
    with pytest.raises(GlimpseError, match="fine target 'doctors'"):
        FineConfig(target="doctors")
    cfg = replace(CFG, target="annotators")
    assert FineConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["target"]  # a file written before the option
    assert FineConfig.from_dict(old).target == "mean"


def test_training_data_gives_annotators_nets_each_annotators_points(kaggle_dataset, tmp_path, monkeypatch):
    d = kaggle_dataset(n=4, junior_shift=6.0)
    ds = load_dataset(d["root"], "train")
    got = {}
    real = fine.train_fine

    def spy(levels, truth_n, cfg, *a, **kw):
        got[cfg.target] = truth_n.clone()
        return real(levels, truth_n, cfg, *a, **kw)

    import napari_glimpse.training as training

    monkeypatch.setattr(training, "train_fine", spy)
    coarse = CoarseConfig(n_landmarks=3, input_hw=(64, 48), width=4, batch_size=4)
    fcfg = FineConfig(n_landmarks=3, level=1, patch=32, width=4, batch_size=4, context=2, target="annotators")
    model = train(ds, tmp_path / "m.pt", TINY_MODEL_CONFIG, TrainConfig(batch_size=4, max_steps=1, save_every_s=1e9),
                  device="cpu", progress=False, coarse_steps=1, coarse_config=coarse, fine_steps=2, fine_config=fcfg)
    t = got["annotators"]
    assert t.shape == (4, 2, 3, 2)
    # the junior is the senior shifted 6 px right: in normalised x, 6 * 2 / width
    width = np.asarray(ds.image(0)).shape[1]
    torch.testing.assert_close(t[:, 1, :, 0] - t[:, 0, :, 0], torch.full((4, 3), 12.0 / width), atol=1e-5, rtol=0)
    assert GlimpseModel.load(tmp_path / "m.pt", "cpu").fine.cfg.target == "annotators"
    assert isinstance(model.fine, FineNet)
    with pytest.raises(GlimpseError, match="must be 'mean', not 'senior'"):
        train(ds, tmp_path / "s.pt", TINY_MODEL_CONFIG,
              TrainConfig(batch_size=4, max_steps=1, save_every_s=1e9, ground_truth="senior"), device="cpu",
              progress=False, coarse_steps=1, coarse_config=coarse, fine_steps=1, fine_config=fcfg)


def test_cli_fine_target_needs_a_new_fine_stage(tiny_data, tmp_path, capsys):
    rc = main(["train", "--data", str(tiny_data["root"]), "--out", str(tmp_path / "m.pt"), "--max-steps", "1",
               "--fine-target", "annotators"])
    assert rc == 2 and "--fine-target applies to a new fine stage" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_cli_train_fine_target(kaggle_dataset, tmp_path, capsys):
    d = kaggle_dataset(n=4, junior_shift=4.0)
    out = tmp_path / "m.pt"
    rc = main(["train", "--data", str(d["root"]), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
               "--coarse-minutes", "0.02", "--fine-minutes", "0.02", "--fine-target", "annotators"])
    assert rc == 0, capsys.readouterr().err
    assert GlimpseModel.load(out, "cpu").fine.cfg.target == "annotators"
