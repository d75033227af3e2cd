"""Two training options of the fine net: a loss on the heatmap's expected position
(``FineConfig.coord_weight``) and windows with a rectangle erased (``FineConfig.erase``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from napari_glimpse import fine
from napari_glimpse.coarse import expected_position, fit_heatmaps, gaussian_targets, to_normalised
from napari_glimpse.errors import GlimpseError
from napari_glimpse.fine import FineConfig, erase_rectangles, train_fine

# one landmark, no geometric augmentation, a small jitter: 16 x 16 heatmaps, 2 level pixels each
CFG = FineConfig(n_landmarks=1, level=1, patch=32, width=4, batch_size=6, context=2, sigma=1.0,
                 rotation_deg=0.0, log_scale=0.0, jitter_mm=(0.05, 0.1), pixel_spacing=0.1)
HW = (128, 96)


def _first_batch(monkeypatch, cfg: FineConfig) -> dict:
    """The first batch train_fine makes, and the keyword arguments it gives the training loop."""
    seen: dict = {}

    def one_batch(net, stage, lr, batch, *args, **kwargs):
        seen["batch"], seen["kwargs"] = batch(), kwargs
        return []

    monkeypatch.setattr(fine, "fit_heatmaps", one_batch)
    gen = torch.Generator().manual_seed(0)
    levels = [torch.rand(2, 1, HW[0] // 2 ** c, HW[1] // 2 ** c, generator=gen) * 255 for c in range(cfg.context)]
    truth = to_normalised(torch.tensor([[[40.0, 50.0]], [[60.0, 70.0]]]), HW)
    train_fine(levels, truth, cfg, 1.0, progress=False)
    return seen


def test_expected_position_is_the_distributions_mean():
    p = torch.zeros(2, 1, 5, 7)
    p[0, 0, 3, 2] = 1.0  # a point: x 2, y 3
    p[1, 0, 1, 1] = p[1, 0, 4, 6] = 0.5  # two halves: their midpoint
    torch.testing.assert_close(expected_position(p), torch.tensor([[[2.0, 3.0]], [[3.5, 2.5]]]))
    g = gaussian_targets(torch.tensor([[[6.3, 9.6]]]), (20, 16), 1.5)  # a Gaussian well inside: its centre
    torch.testing.assert_close(expected_position(g), torch.tensor([[[6.3, 9.6]]]), atol=1e-4, rtol=0)


def test_without_the_options_the_batch_and_loop_are_as_before(monkeypatch):
    b = _first_batch(monkeypatch, CFG)
    assert len(b["batch"]) == 3  # inputs, targets, weights: no positions to carry
    assert b["kwargs"]["coord_weight"] == 0.0
    again = _first_batch(monkeypatch, CFG)["batch"]
    for u, v in zip(b["batch"], again, strict=True):
        assert torch.equal(u, v)


def test_coord_weight_gives_the_loop_each_taught_point(monkeypatch):
    base = _first_batch(monkeypatch, CFG)["batch"]
    b = _first_batch(monkeypatch, replace(CFG, coord_weight=0.5))
    x, target, inside, pos = b["batch"]
    assert b["kwargs"]["coord_weight"] == 0.5
    for u, v in zip(base, (x, target, inside), strict=True):
        assert torch.equal(u, v)  # the same draws: only the positions are added
    assert pos.shape == (6, 1, 2)
    # the taught point is the target Gaussian's centre (sigma 1 heatmap pixel, well inside 16 x 16)
    torch.testing.assert_close(pos, expected_position(target), atol=1e-3, rtol=0)
    assert ((pos - 7.5).abs() < 1.0).all()  # windows centred within 0.1 mm: under a heatmap pixel off


def test_the_coordinate_term_adds_the_mean_distance_to_the_loss():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 1)
    x = torch.rand(3, 1, 8, 8) * 255
    target = gaussian_targets(torch.rand(3, 2, 2) * 7, (8, 8), 1.0)
    inside = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    pos = torch.rand(3, 2, 2) * 7
    losses = {}
    for w in (0.0, 2.0):
        rec: list = []
        state = {k: v.clone() for k, v in net.state_dict().items()}
        fit_heatmaps(net, "t", 1e-3, lambda: (x, target, inside, pos), 60.0, progress=False,
                     callback=rec.append, max_steps=1, coord_weight=w)
        net.load_state_dict(state)
        losses[w] = rec[0]["loss"]
    with torch.no_grad():
        p = torch.softmax(net(x).flatten(2), -1).view(3, 2, 8, 8)
        dist = ((expected_position(p) - pos).norm(dim=-1) * inside).sum() / inside.sum()
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * float(dist), rel=1e-4)


def test_the_coordinate_term_moves_the_expected_position_to_the_point():
    """A free heatmap trained on the position term alone ends up with its mean on the point."""
    logits = torch.nn.Parameter(torch.zeros(1, 1, 8, 8))

    class Free(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1, -1, -1)

    point = torch.tensor([[[5.0, 2.0]]])
    fit_heatmaps(Free(), "t", 0.5, lambda: (torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.ones(1, 1), point),
                 60.0, progress=False, max_steps=300, coord_weight=1.0)
    assert (expected_position(torch.softmax(logits.flatten(2), -1).view(1, 1, 8, 8)) - point).norm() < 0.2


def test_erase_fills_one_rectangle_of_the_first_channel_with_its_mean():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(40, 3, 32, 32, generator=gen) * 255
    y = erase_rectangles(x, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(y[:, 1:], x[:, 1:])  # the context channels are untouched
    for i in range(len(x)):
        changed = y[i, 0] != x[i, 0]
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        # one rectangle: every pixel between its first and last changed row and column changed
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert bool(changed[r0:r1, c0:c1].all()) and int(changed.sum()) == (r1 - r0) * (c1 - c0)
        assert 0.15 * 32 - 1 <= r1 - r0 <= 0.5 * 32 + 1 and 0.15 * 32 - 1 <= c1 - c0 <= 0.5 * 32 + 1
        torch.testing.assert_close(y[i, 0, r0:r1, c0:c1], x[i, 0].mean().expand(r1 - r0, c1 - c0))
    assert torch.equal(erase_rectangles(x, 0.0, torch.Generator().manual_seed(2)), x)
    hits = (erase_rectangles(x, 0.5, torch.Generator().manual_seed(3)) != x).flatten(1).any(1)
    assert 0 < int(hits.sum()) < len(x)


def test_erase_applies_to_training_windows(monkeypatch):
    plain = _first_batch(monkeypatch, CFG)["batch"]
    erased = _first_batch(monkeypatch, replace(CFG, erase=1.0))["batch"]
    assert torch.equal(plain[1], erased[1]) and torch.equal(plain[2], erased[2])  # targets unchanged
    assert torch.equal(plain[0][:, 1:], erased[0][:, 1:])
    assert (plain[0][:, 0] != erased[0][:, 0]).flatten(1).any(1).all()  # every window's finest channel


@pytest.mark.parametrize("field, value", [("coord_weight", -0.1), ("erase", 1.5), ("erase", -0.1)])
def test_bad_values_are_refused(field, value):
    with pytest.raises(GlimpseError, match=field):
        replace(CFG, **{field: value})


def test_the_options_round_trip_and_old_configs_load():
    cfg = replace(CFG, coord_weight=1.0, erase=0.5)
    assert FineConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in CFG.to_dict().items() if k not in ("coord_weight", "erase")}
    back = FineConfig.from_dict(old)
    assert back.coord_weight == 0.0 and back.erase == 0.0

