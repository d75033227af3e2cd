"""npe2 writer: a landmarks Points layer -> Kaggle-layout CSV (``image_path,1_x,1_y,...``).

No napari or Qt import. napari points are ``(y, x)`` (or ``(plane, y, x)`` for a layer holding
several images); the CSV holds ``x, y`` in pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import GlimpseError
from .io import write_landmarks_csv


def _column(features: Any, name: str) -> np.ndarray | None:
    if features is None:
        return None
    try:
        if name in features:
            return np.asarray(features[name])
    except TypeError:
        return None
    return None


def _image_name(meta: dict) -> str:
    md = meta.get("metadata") or {}
    path = md.get("image_path") or md.get("path")
    if path:
        return Path(path).name
    return str(meta.get("name") or "image")


def _order(n: int, index: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Row of each landmark 1..K in a plane of ``n`` points (by the ``index`` feature if present)."""
    if index is None:
        return np.arange(n), n
    idx = index.astype(int)
    if len(set(idx.tolist())) != len(idx):
        dup = sorted({int(v) for v in idx if (idx == v).sum() > 1})
        raise GlimpseError(f"landmark(s) {', '.join(map(str, dup))} appear more than once")
    k = int(idx.max())
    missing = sorted(set(range(1, k + 1)) - set(idx.tolist()))
    if missing:
        raise GlimpseError(f"landmark(s) {', '.join(map(str, missing))} are missing; a CSV row needs all {k}")
    return np.argsort(idx), k


def layer_to_rows(data: np.ndarray, meta: dict) -> tuple[list[str], np.ndarray]:
    """Image names and ``(N, K, 2)`` x, y coordinates of a Points layer's data and metadata."""
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] not in (2, 3) or len(data) == 0:
        raise GlimpseError(f"expected 2-D points (y, x), got data of shape {data.shape}")
    feats = meta.get("features")
    index = _column(feats, "index")
    if data.shape[1] == 2:
        order, _ = _order(len(data), index)
        return [_image_name(meta)], data[order][:, ::-1][None]
    planes = data[:, 0]
    images = _column(feats, "image")
    names, coords = [], []
    for pl in np.unique(planes):
        sel = np.nonzero(planes == pl)[0]
        order, _ = _order(len(sel), index[sel] if index is not None else None)
        coords.append(data[sel][order][:, :0:-1])
        names.append(str(images[sel][0]) if images is not None else f"{_image_name(meta)}_{int(pl)}")
    if len({c.shape for c in coords}) != 1:
        raise GlimpseError("images hold different numbers of landmarks")
    return names, np.stack(coords)


def write_landmarks(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for Points layers."""
    names, coords = layer_to_rows(data, meta)
    write_landmarks_csv(path, names, coords)
    return [path]
