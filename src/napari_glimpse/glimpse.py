"""Batched foveated glimpse sampling.

A glimpse is one ``P x P`` patch per pyramid level, all centred on the same point. Level ``l``
samples a ``P * 2**l`` full-resolution pixel square at ``P`` samples per side. With augmentation
the sampling frame is rotated by ``angle`` and scaled by ``scale``; the network then predicts
offsets in that frame, and :func:`frame_to_image` turns them back into image axes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .pyramid import Pyramid


class PyramidStack:
    """Many pyramids padded to a common size per level, for gather-based sampling.

    ``levels[l]`` is a ``(N, H_l, W_l)`` uint8 tensor; ``sizes[n, l] = (h, w)`` the true size.
    """

    def __init__(self, pyramids: Sequence[Pyramid]):
        if not pyramids:
            raise ValueError("no pyramids")
        n_levels = len(pyramids[0])
        if any(len(p) != n_levels for p in pyramids):
            raise ValueError("all pyramids need the same number of levels")
        self.n_levels = n_levels
        self.levels: list[torch.Tensor] = []
        sizes = torch.zeros(len(pyramids), n_levels, 2, dtype=torch.long)
        for lv in range(n_levels):
            hs = [p.levels[lv].shape[0] for p in pyramids]
            ws = [p.levels[lv].shape[1] for p in pyramids]
            if len(pyramids) == 1:
                stack = pyramids[0].levels[lv][None]
            else:
                stack = torch.zeros(len(pyramids), max(hs), max(ws), dtype=torch.uint8)
                for i, p in enumerate(pyramids):
                    stack[i, : hs[i], : ws[i]] = p.levels[lv]
            self.levels.append(stack)
            sizes[:, lv, 0] = torch.tensor(hs)
            sizes[:, lv, 1] = torch.tensor(ws)
        self.sizes = sizes

    def __len__(self) -> int:
        return self.levels[0].shape[0]

    def to(self, device) -> "PyramidStack":
        """Move the stack to ``device`` (in place); returns self."""
        self.levels = [lv.to(device) for lv in self.levels]
        self.sizes = self.sizes.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.levels[0].device


def patch_grid(patch: int) -> torch.Tensor:
    """``(P, P, 2)`` sample offsets (x, y) in level pixels, centred: -(P-1)/2 ... (P-1)/2."""
    r = torch.arange(patch, dtype=torch.float32) - (patch - 1) / 2.0
    gy, gx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def rotation(angle: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 2)`` rotation matrices (radians), acting on column vectors (x, y)."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def frame_to_image(offset: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Map ``(B, 2)`` offsets from the glimpse frame to image axes: ``scale * R(angle) @ v``."""
    return scale[:, None] * torch.einsum("bij,bj->bi", rotation(angle), offset)


def image_to_frame(offset: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`frame_to_image`."""
    return torch.einsum("bji,bj->bi", rotation(angle), offset) / scale[:, None]


def _bilinear(level: torch.Tensor, sizes: torch.Tensor, index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Sample ``level`` (N, H, W) uint8 at ``xy`` (B, P, P, 2) for images ``index`` (B,).

    Outside the image the value is 0 (black, as the edge of an X-ray).
    """
    n, H, W = level.shape
    flat = level.reshape(-1)
    x, y = xy[..., 0], xy[..., 1]
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    h = sizes[:, 0].view(-1, 1, 1)
    w = sizes[:, 1].view(-1, 1, 1)
    base = (index * (H * W)).view(-1, 1, 1)
    out = torch.zeros(xy.shape[:-1], dtype=torch.float32, device=xy.device)
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (yi >= 0) & (xi < w) & (yi < h)
        idx = base + yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)
        out += wgt * flat[idx].float() * ok
    return out


def sample_glimpses(
    stack: PyramidStack,
    index: torch.Tensor,
    centers: torch.Tensor,
    patch: int = 64,
    angle: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample ``(B, L, P, P)`` glimpses (values 0..255 as float) in one call.

    Parameters
    ----------
    stack : PyramidStack
        The images' pyramids.
    index : (B,) long tensor
        Which image of the stack each glimpse comes from.
    centers : (B, 2) float tensor
        Glimpse centres (x, y) in full-resolution pixels.
    patch : int
        Patch side ``P``.
    angle, scale : (B,) float tensors, optional
        Rotation (radians) and scale of the sampling frame (augmentation).
    """
    b = centers.shape[0]
    index = index.long()
    centers = centers.float()
    dev = centers.device
    grid = patch_grid(patch).to(dev).view(1, patch * patch, 2).expand(b, -1, -1)
    if angle is not None or scale is not None:
        a = angle if angle is not None else torch.zeros(b, device=dev)
        s = scale if scale is not None else torch.ones(b, device=dev)
        grid = s.view(b, 1, 1) * torch.einsum("bij,bnj->bni", rotation(a.float()), grid)
    grid = grid.reshape(b, patch, patch, 2)
    out = []
    for lv in range(stack.n_levels):
        f = float(2**lv)
        xy = centers.view(b, 1, 1, 2) / f + grid
        out.append(_bilinear(stack.levels[lv], stack.sizes[index, lv], index, xy))
    return torch.stack(out, dim=1)
