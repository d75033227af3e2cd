"""Gaussian image pyramid: x2 down per level, stored as uint8.

Level ``l`` pixel ``j`` sits at full-resolution coordinate ``j * 2**l`` (blur, then keep every
second pixel), so a point ``p`` in full-resolution pixels is at ``p / 2**l`` on level ``l``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .errors import GlimpseError


def levels_for(shape: tuple[int, int], patch: int = 64, slack: float = 1.25) -> int:
    """Number of levels so that the top level fits about one glimpse.

    The top level's longer side is at most ``slack * patch`` pixels: 6 levels for a
    1935x2400 cephalogram with 64-pixel glimpses (top level 61x75).
    """
    side = max(shape)
    return 1 + max(0, math.ceil(math.log2(side / (slack * patch))))


_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _down2(x: torch.Tensor) -> torch.Tensor:
    """Blur with the 5-tap binomial kernel (reflect padding), keeping every other pixel.

    Only the kept pixels are computed: output ``j`` is the blur at input ``2 j``. Rows, then
    columns (the same pass on the transposed result). The reference for :func:`_down2_array`,
    and what it uses on sides of 1-2 pixels (padded by repeating, not reflecting).
    """
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"

    def rows(y: torch.Tensor) -> torch.Tensor:
        n = (y.shape[-2] + 1) // 2
        yp = F.pad(y, (0, 0, 2, 2), mode=mode)
        out = yp[..., 0 : 2 * n : 2, :] * _BINOMIAL[0]
        for k in range(1, 5):
            out.add_(yp[..., k : k + 2 * n : 2, :], alpha=_BINOMIAL[k])
        return out

    return rows(rows(x).transpose(-1, -2)).transpose(-1, -2)


def _down2_array(x: np.ndarray) -> np.ndarray:
    """:func:`_down2` of a 2-D float32 array: OpenCV's ``pyrDown`` (the same 5-tap binomial
    blur, reflected borders and decimation; on an ISBI image 8x faster than the torch passes and
    36x faster than scikit-image's ``pyramid_reduce``, ``benchmarks/image_ops.py``), except for
    sides of 1-2 pixels, which it borders differently."""
    h, w = x.shape
    if min(h, w) > 2:
        import cv2

        return cv2.pyrDown(x, dstsize=((w + 1) // 2, (h + 1) // 2))
    return _down2(torch.from_numpy(x)[None, None])[0, 0].numpy()


@dataclass(frozen=True, eq=False)
class Pyramid:
    """The levels of one image, finest first, each a 2-D ``uint8`` tensor."""

    levels: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels[0].shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.levels)


def build_pyramid(image: np.ndarray | torch.Tensor, n_levels: int, patch: int = 64) -> Pyramid:
    """Build an ``n_levels`` Gaussian pyramid of a grey ``uint8`` image."""
    img = torch.as_tensor(np.asarray(image))
    if img.ndim != 2:
        raise GlimpseError(f"expected a 2-D grey image, got shape {tuple(img.shape)}")
    h, w = img.shape
    if h < patch or w < patch:
        raise GlimpseError(f"image is {w}x{h} pixels, smaller than one {patch}x{patch} glimpse")
    levels = [img.to(torch.uint8).contiguous()]
    # every level is blurred from the previous one in float, and stored rounded
    x = img.numpy().astype(np.float32)
    for _ in range(1, n_levels):
        x = _down2_array(x)
        levels.append(_stored(x))
    return Pyramid(tuple(levels))


def _stored(x: np.ndarray) -> torch.Tensor:
    """A float level as it is kept: rounded to ``uint8``."""
    return torch.from_numpy(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def deepen(levels: "tuple[torch.Tensor, ...] | list[torch.Tensor]", n_levels: int) -> list[torch.Tensor]:
    """``levels`` (finest first, 2-D ``uint8``) with coarser ones added until there are
    ``n_levels``: each is blurred and halved from the stored ``uint8`` level above it (not from
    the float chain :func:`build_pyramid` keeps, so it may differ from a natively built level by
    a grey level). A stage that reads deeper than the model's pyramid (a fine net's widest
    context window) makes its extra levels this way in training and at inference alike."""
    out = list(levels)
    while len(out) < n_levels:
        out.append(_stored(_down2_array(out[-1].cpu().numpy().astype(np.float32))))
    return out


@lru_cache(maxsize=8)
def _cached(path: str, mtime: float, n_levels: int, patch: int) -> Pyramid:
    from .io import read_image

    return build_pyramid(read_image(path), n_levels, patch)


def pyramid_from_file(path, n_levels: int, patch: int = 64) -> Pyramid:
    """Read an image and build its pyramid, cached on (path, mtime, levels)."""
    import os

    p = os.fspath(path)
    try:
        mtime = os.path.getmtime(p)
    except OSError:
        mtime = -1.0
    return _cached(p, mtime, n_levels, patch)
