"""Another device's artefacts, painted on the coarse and fine nets' training images.

A cephalostat shows things the training images do not: a nasion-rod ruler (a bright bar with
ticks a few millimetres in front of the face), collimator edges and a cropped field of view. On
such images (``benchmarks/shifted.py``) the fine nets took the ruler's edge for the soft-tissue
profile (the upper lip moved 5-8 mm towards it, from a coarse answer 2-4 mm off) and the coarse
net failed grossly on some cropped, stretched views (a Subnasale 28.8 mm off).

The fine nets' windows (:func:`paint_artefacts`) get, each with probability ``p``:

* a **ruler**: a bright vertical bar (grey 180-255, 0.8-4 mm wide) with ticks on its left side,
  anywhere across the window but never over the landmark the window is centred near;
* with probability ``p / 2``, a **dark band** from the window's top or left edge (a collimator or
  the edge of the field of view), never over that landmark.

The window's channels are pyramid levels centred alike, channel ``c``'s pixel ``2**c`` times
channel 0's, so a bar is painted at the same place of the anatomy in each. The coarse net's
whole-image views get the skull top cut off (:func:`crop_views`), a ruler in front of the face
and a collimator band behind the head (:func:`paint_views`). Draws are made for the whole batch
alike on every rank under torchrun and each rank keeps its share (as
:func:`napari_glimpse.coarse.augment_intensity`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import distributed


def with_artefacts(net: torch.nn.Module, p: float | None):
    """Set ``artefacts`` ``p`` in ``net``'s config (None: leave it) and return that config: a net
    tuned from ``net`` takes its config, so it trains with ``p`` and records it."""
    if p is not None:
        net.cfg = replace(net.cfg, artefacts=p)
    return net.cfg


def _draws(b: int, gen: torch.Generator):
    """``u(lo, hi)``: ``(b,)`` uniform draws made for the whole batch (every rank alike), this rank's share."""
    b_all, own = b * distributed.world_size(), distributed.share

    def u(lo: float, hi: float) -> torch.Tensor:
        return own(lo + (hi - lo) * torch.rand(b_all, 1, generator=gen))[:, 0]

    return u


def _col(v: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1)``, to broadcast a per-sample value over an image's rows and columns."""
    return v[:, None, None]


def _centres(n: int) -> torch.Tensor:
    """``(n,)`` the normalised coordinates (-1..1) of ``n`` pixels' centres."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1


def _darken(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``x`` (0-255) as behind a collimator where ``where``."""
    return torch.where(where, x * 0.15 + 5.0, x)


def paint_artefacts(x: torch.Tensor, target: torch.Tensor, p: float, mm_per_unit: float,
                    gen: torch.Generator) -> torch.Tensor:
    """``x`` ``(B, C, P, P)`` windows (0-255) with artefacts painted; ``target`` ``(B, 2)`` the
    landmark each window is centred near, in channel 0's normalised coordinates (-1..1);
    ``mm_per_unit``: millimetres per normalised unit of channel 0 (half its width in mm)."""
    if p <= 0:
        return x
    b, c, h, w = x.shape
    u = _draws(b, gen)
    ruler, band = u(0, 1) < p, u(0, 1) < p / 2
    left, width = u(-1.3, 1.0), u(0.8, 4.0) / mm_per_unit
    # a bar (or its 1 mm ticks) over the landmark moves to its right (in front of the face),
    # its ticks 0.5-3 mm clear of it
    tx, ty = target[:, 0], target[:, 1]
    over = (tx > left - 1.5 / mm_per_unit) & (tx < left + width + 0.5 / mm_per_unit)
    left = torch.where(over, tx + u(1.5, 4.0) / mm_per_unit, left)
    top, bottom = u(-4.0, 0.5), u(-0.5, 4.0)
    tick, grey = u(2.0, 6.0) / mm_per_unit, u(180.0, 255.0)
    edge, from_top = u(-2.0, 1.0), u(0, 1) < 0.5
    band = band & torch.where(from_top, ty > edge + 0.1, tx > edge + 0.1)  # never over the landmark
    g = _centres(w)  # channel 0's
    out = x.clone()
    for ch in range(c):
        gx = (g * 2.0**ch)[None, None, :]  # (1, 1, W) in channel 0's units
        gy = (g * 2.0**ch)[None, :, None]
        in_y = (gy >= _col(top)) & (gy <= _col(bottom))
        bar = (gx >= _col(left)) & (gx <= _col(left + width)) & in_y
        ticks = ((gx >= _col(left - 1.0 / mm_per_unit)) & (gx < _col(left)) & in_y
                 & (torch.remainder(gy - _col(top), _col(tick)) < 0.3 / mm_per_unit))
        paint = (bar | ticks) & _col(ruler)
        dark = torch.where(_col(from_top), gy < _col(edge), gx < _col(edge)) & _col(band)
        v = _darken(out[:, ch], dark)
        out[:, ch] = torch.where(paint, _col(grey).expand_as(v), v)
    return out


# ------------------------------------------------------------------------- the coarse net's views

def crop_views(theta: torch.Tensor, p: float, gen: torch.Generator, most: float = 0.15) -> torch.Tensor:
    """``theta`` ``(B, 2, 3)`` (view -> image, :func:`~napari_glimpse.coarse.view_matrix`) with, with
    probability ``p``, the top 0-``most`` of the image cut off and the rest stretched to the view's
    height, as a whole image whose skull top is cut is read (its aspect changes)."""
    u = _draws(theta.shape[0], gen)
    c = torch.where(u(0, 1) < p, u(0.0, most), torch.zeros(()))
    out = theta.clone()
    out[:, :, 2] = theta[:, :, 2] + c[:, None] * theta[:, :, 1]
    out[:, :, 1] = theta[:, :, 1] * (1 - c[:, None])
    return out


def paint_views(x: torch.Tensor, o: torch.Tensor, present: torch.Tensor, flip: torch.Tensor, p: float,
                gen: torch.Generator) -> torch.Tensor:
    """``x`` ``(B, 1, H, W)`` whole-image views (0-255) with, each with probability ``p``, a ruler in
    front of the face (a bright bar 1-9 % of the landmarks' width beyond the most anterior one) and,
    with ``p / 2``, a dark collimator band at the back of the head, clear of every landmark.
    ``o`` ``(B, K, 2)``: the landmarks in view normalised coordinates, ``present`` ``(B, K)`` bool,
    ``flip`` ``(B,)`` bool: the view is mirrored (the face on the left)."""
    b, _, h, w = x.shape
    u = _draws(b, gen)
    ruler, band = u(0, 1) < p, u(0, 1) < p / 2
    s = torch.where(flip, -1.0, 1.0)[:, None]  # towards the face
    ox = torch.where(present, o[..., 0] * s, torch.nan)
    front, back = ox.nan_to_num(-9.0).amax(1), ox.nan_to_num(9.0).amin(1)
    extent = (front - back).clamp(0.2, 2.0)
    left = front + extent * u(0.01, 0.09)
    right = left + torch.maximum(extent * u(0.008, 0.03), torch.tensor(2.0 / w))  # a view pixel at least
    top, bottom = u(-1.0, -0.2), u(0.1, 1.0)
    grey = u(180.0, 255.0)
    edge = -1 + 2 * u(0.0, 0.12)
    band = band & (back > edge + 0.02)
    gx = _centres(w)[None, None, :] * s[:, :, None]  # (B, 1, W)
    gy = _centres(h)[None, :, None]
    bar = (gx >= _col(left)) & (gx <= _col(right)) & (gy >= _col(top)) & (gy <= _col(bottom)) & _col(ruler)
    dark = (gx < _col(edge)) & _col(band)
    v = _darken(x[:, 0], dark)
    return torch.where(bar, _col(grey).expand_as(v), v)[:, None]
