"""Another device's artefacts on the fine nets' training windows (napari_glimpse.artefacts)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from conftest import TINY_MODEL_CONFIG  # noqa: F401  (the tiny configs' module)

from napari_glimpse.artefacts import paint_artefacts
from napari_glimpse.coarse import to_normalised


def _windows(b: int = 64, c: int = 3, p: int = 32) -> torch.Tensor:
    return torch.full((b, c, p, p), 100.0)


def test_off_paints_nothing_and_draws_nothing():
    gen = torch.Generator().manual_seed(3)
    x = _windows()
    state = gen.get_state()
    assert paint_artefacts(x, torch.zeros(len(x), 2), 0.0, 3.2, gen) is x
    assert torch.equal(gen.get_state(), state)


def test_rulers_and_bands_never_cover_the_landmark():
    """Every window has a ruler (p = 1); the pixels around the landmark stay as they were in each
    channel, while some windows show a bright bar and some a dark band."""
    gen = torch.Generator().manual_seed(0)
    b, p = 256, 32
    target = (torch.rand(b, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.6
    y = paint_artefacts(_windows(b, 3, p), target, 1.0, 3.2, gen)  # 0.2 mm pixels: 3.2 mm per unit
    for ch in range(3):
        px = ((target / 2.0**ch + 1) / 2 * p - 0.5).round().long().clamp(0, p - 1)
        at = y[torch.arange(b), ch, px[:, 1], px[:, 0]]
        assert torch.equal(at, torch.full((b,), 100.0)), ch
    bright, dark = (y > 150).flatten(1).any(1), (y < 30).flatten(1).any(1)
    assert bright.float().mean() > 0.8 and 0.1 < dark.float().mean() < 0.6


def test_a_ruler_sits_at_the_same_place_of_the_anatomy_in_every_channel():
    """Channel c's pixels are 2**c times channel 0's: a bar 8 pixels wide in channel 0 is about 4
    in channel 1, both at the same distance from the centre in channel 0's units."""
    gen = torch.Generator().manual_seed(5)
    p = 64
    y = paint_artefacts(_windows(32, 2, p), torch.zeros(32, 2), 1.0, 6.4, gen)
    g = (torch.arange(p) + 0.5) / p * 2 - 1
    checked = 0
    for w in y:
        cols = [torch.nonzero((w[ch] > 150).float().mean(0) > 0.2)[:, 0] for ch in range(2)]
        if len(cols[0]) < 4 or len(cols[1]) < 2 or cols[0][0] == 0 or cols[0][-1] == p - 1:
            continue  # a bar cut by the window's edge, or none
        centre0, centre1 = g[cols[0]].mean(), g[cols[1]].mean() * 2
        assert abs(float(centre0 - centre1)) < 0.12
        assert 1.4 < len(cols[0]) / len(cols[1]) < 2.8
        checked += 1
    assert checked >= 5


def test_fine_batches_show_the_artefacts_only_when_asked():
    """The fine net's training windows with ``artefacts`` 0 are the same as before the option
    (no draws), with 1 they differ and hold bright bars."""
    from test_fine import TINY_FINE

    from napari_glimpse import fine

    hw = (128, 96)
    truth = to_normalised(torch.tensor([[[43.0, 50.0]], [[60.0, 67.0]], [[11.0, 100.0]]]), hw)
    levels = [torch.rand(3, 1, *hw, generator=torch.Generator().manual_seed(0)) * 120 for _ in range(2)]
    batches = {}
    for a in (0.0, 1.0):
        cfg = replace(TINY_FINE, n_landmarks=1, context=2, batch_size=16, pixel_spacing=0.1, artefacts=a)
        make = fine._fine_batches(levels, truth, None, cfg, torch.Generator().manual_seed(0))
        batches[a] = make()
    x0, x1 = batches[0.0][0], batches[1.0][0]
    assert not torch.equal(x0, x1)
    assert float((x1 > 200).float().mean()) > float((x0 > 200).float().mean()) + 0.01
    assert torch.equal(batches[0.0][1].sum((-1, -2)) > 0, batches[1.0][1].sum((-1, -2)) > 0)  # same windows
    np.testing.assert_array_equal(batches[0.0][2].numpy(), batches[1.0][2].numpy())


# --------------------------------------------------------------------------- the coarse net's views
def test_a_cropped_view_cuts_the_top_and_stretches_the_rest():
    """``crop_views`` with p = 1: the view's top edge reads the image 0-15 % down, its bottom edge
    the image's bottom, x is left as it was."""
    from napari_glimpse.artefacts import crop_views
    from napari_glimpse.coarse import view_matrix

    b = 64
    theta = view_matrix((240, 190), torch.zeros(b), torch.ones(b), torch.zeros(b, dtype=torch.bool), torch.zeros(b, 2))
    out = crop_views(theta, 1.0, torch.Generator().manual_seed(0))
    top = out[:, 1, 1] * -1 + out[:, 1, 2]  # image y (normalised) of the view's top edge
    bottom = out[:, 1, 1] * 1 + out[:, 1, 2]
    cut = (top + 1) / 2
    assert float(cut.min()) >= 0 and float(cut.max()) <= 0.15 and float(cut.std()) > 0.02
    assert torch.allclose(bottom, torch.ones(b))
    assert torch.equal(out[:, 0], theta[:, 0])  # x untouched


def test_the_ruler_stands_in_front_of_the_face_and_the_band_behind_the_head():
    """``paint_views`` with p = 1 on views whose landmarks span x -0.5..0.4: a bright bar beyond the
    most anterior landmark (x > 0.4; x < -0.4 in a mirrored view), dark columns only behind the
    head, and no landmark's pixel painted."""
    from napari_glimpse.artefacts import paint_views

    b, h, w = 32, 80, 64
    x = torch.full((b, 1, h, w), 100.0)
    o = torch.tensor([[-0.5, 0.0], [0.4, 0.2], [0.0, -0.3]]).expand(b, 3, 2).clone()
    flip = torch.arange(b) % 2 == 1
    o[flip, :, 0] *= -1
    y = paint_views(x, o, torch.ones(b, 3, dtype=torch.bool), flip, 1.0, torch.Generator().manual_seed(0))
    gx = (torch.arange(w) + 0.5) / w * 2 - 1
    for k in range(b):
        s = -1.0 if flip[k] else 1.0
        bright = (y[k, 0] > 150).any(0)
        dark = (y[k, 0] < 30).any(0)
        assert bright.any() and bool((gx[bright] * s > 0.4).all()), k
        assert bool((gx[dark] * s < -0.5).all()), k
        for px, py in o[k]:
            assert y[k, 0, int((py + 1) / 2 * h), int((px + 1) / 2 * w)] == 100.0
    assert 0.1 < float(((y < 30).flatten(1).any(1)).float().mean()) < 0.9  # bands on about half


def test_coarse_batches_show_the_artefacts_only_when_asked():
    """The coarse net's batch with ``artefacts`` 1 differs from the one with 0 in its views and in
    its targets (they follow the cropped views)."""
    from test_coarse import TINY_COARSE

    from napari_glimpse import coarse

    hw = (96, 80)
    truth = to_normalised(torch.tensor([[[20.0, 30.0], [60.0, 70.0]], [[25.0, 40.0], [55.0, 60.0]]]), hw)
    levels = torch.rand(2, 1, 64, 56, generator=torch.Generator().manual_seed(0)) * 120
    out = {}
    for a in (0.0, 1.0):
        cfg = replace(TINY_COARSE, n_landmarks=2, batch_size=8, artefacts=a)
        make = coarse._coarse_batches(levels, hw, truth, torch.ones(2, 2, dtype=torch.bool), cfg,
                                      torch.Generator().manual_seed(0))
        out[a] = make()
    assert not torch.equal(out[0.0][0], out[1.0][0]) and not torch.equal(out[0.0][1], out[1.0][1])
