"""Another device's artefacts, painted on the fine nets' training windows.

A cephalostat shows things the training images do not: a nasion-rod ruler (a bright bar with
ticks a few millimetres in front of the face), collimator edges and a cropped field of view (dark
bands). On such images the fine nets took the ruler's edge for the soft-tissue profile (the upper
lip moved 5-8 mm towards it on shifted training images, from a coarse answer 2-4 mm off). Training
windows get, each with probability ``p``:

* a **ruler**: a bright vertical bar (grey 180-255, 0.8-4 mm wide) with ticks on its left side,
  anywhere across the window but never over the landmark the window is centred near;
* with probability ``p / 2``, a **dark band** from the window's top or left edge (a collimator or
  the edge of the field of view), never over that landmark.

The window's channels are pyramid levels centred alike, channel ``c``'s pixel ``2**c`` times
channel 0's, so a bar is painted at the same place of the anatomy in each. Draws are made for the
whole batch alike on every rank under torchrun and each rank keeps its share (as
:func:`napari_glimpse.coarse.augment_intensity`).
"""

from __future__ import annotations

import torch

from . import distributed


def paint_artefacts(x: torch.Tensor, target: torch.Tensor, p: float, mm_per_unit: float,
                    gen: torch.Generator) -> torch.Tensor:
    """``x`` ``(B, C, P, P)`` windows (0-255) with artefacts painted; ``target`` ``(B, 2)`` the
    landmark each window is centred near, in channel 0's normalised coordinates (-1..1);
    ``mm_per_unit``: millimetres per normalised unit of channel 0 (half its width in mm)."""
    if p <= 0:
        return x
    b_all, own = x.shape[0] * distributed.world_size(), distributed.share
    b, c, h, w = x.shape

    def u(lo: float, hi: float, n: int = 1) -> torch.Tensor:
        return own(lo + (hi - lo) * torch.rand(b_all, n, generator=gen))

    ruler, band = u(0, 1)[:, 0] < p, u(0, 1)[:, 0] < p / 2
    left, width = u(-1.3, 1.0)[:, 0], u(0.8, 4.0)[:, 0] / mm_per_unit
    # a bar (or its 1 mm ticks) over the landmark moves to its right (in front of the face),
    # its ticks 0.5-3 mm clear of it
    tx, ty = target[:, 0], target[:, 1]
    over = (tx > left - 1.5 / mm_per_unit) & (tx < left + width + 0.5 / mm_per_unit)
    left = torch.where(over, tx + u(1.5, 4.0)[:, 0] / mm_per_unit, left)
    top, bottom = u(-4.0, 0.5)[:, 0], u(-0.5, 4.0)[:, 0]
    tick, grey = u(2.0, 6.0)[:, 0] / mm_per_unit, u(180.0, 255.0)[:, 0]
    edge, from_top = u(-2.0, 1.0)[:, 0], u(0, 1)[:, 0] < 0.5
    band = band & torch.where(from_top, ty > edge + 0.1, tx > edge + 0.1)  # never over the landmark
    g = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1  # channel 0's normalised pixel centres
    out = x.clone()
    for ch in range(c):
        gx = (g * 2.0**ch)[None, None, :]  # (1, 1, W) in channel 0's units
        gy = (g * 2.0**ch)[None, :, None]
        col = lambda v: v[:, None, None]  # noqa: E731
        in_y = (gy >= col(top)) & (gy <= col(bottom))
        bar = (gx >= col(left)) & (gx <= col(left + width)) & in_y
        ticks = ((gx >= col(left - 1.0 / mm_per_unit)) & (gx < col(left)) & in_y
                 & (torch.remainder(gy - col(top), col(tick)) < 0.3 / mm_per_unit))
        paint = (bar | ticks) & col(ruler)
        dark = torch.where(col(from_top), gy < col(edge), gx < col(edge)) & col(band)
        v = torch.where(dark, out[:, ch] * 0.15 + 5.0, out[:, ch])
        out[:, ch] = torch.where(paint, col(grey).expand_as(v), v)
    return out
