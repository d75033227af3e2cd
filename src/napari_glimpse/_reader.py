"""npe2 readers: cephalograms as grey Image layers, landmark files (Kaggle-layout CSV, ISBI txt)
as Points layers.

Returns napari LayerData tuples; no napari or Qt import. Points are (row, col) = (y, x).
Images are read with :func:`napari_glimpse.io.read_image` (what the model sees); DICOM files
(``.dcm``/``.dicom``) only when pydicom is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import GlimpseError
from .io import DICOM_SUFFIXES, IMAGE_SUFFIXES, is_dicom, read_image, read_isbi_txt, read_landmarks_csv
from .landmarks import ISBI_LANDMARKS
from .spacing import have_pydicom, read_dicom, tiff_spacing  # noqa: F401  re-exported


def read_cephalogram(path: str):
    """Reader: one grey image layer; ``metadata['path']`` records the file."""
    p = Path(path)
    spacing = None
    if is_dicom(p):
        img, spacing = read_dicom(p)
    else:
        img = read_image(p)
        if p.suffix.lower() in (".tif", ".tiff"):
            spacing = tiff_spacing(p)  # only a meaningful resolution (not 72/96 dpi, a unit given)
    meta = {"path": str(p)}
    if spacing is not None:
        meta["pixel_spacing_mm"] = spacing
    return [(img, {"name": p.stem, "colormap": "gray", "metadata": meta}, "image")]


def _points_layer(coords: np.ndarray, name: str, image_names: list[str] | None = None):
    k = coords.shape[1]
    names = list(ISBI_LANDMARKS) if k == len(ISBI_LANDMARKS) else [f"L{i + 1}" for i in range(k)]
    n = coords.shape[0]
    if n == 1:
        data = coords[0][:, ::-1]
        feats = {"landmark": names, "index": np.arange(1, k + 1)}
    else:  # one plane per image
        data = np.concatenate([np.column_stack([np.full(k, i), coords[i][:, ::-1]]) for i in range(n)])
        feats = {"landmark": names * n, "index": np.tile(np.arange(1, k + 1), n),
                 "image": [im for im in (image_names or []) for _ in range(k)] or None}
        feats = {a: b for a, b in feats.items() if b is not None}
    keep = ~np.isnan(data[:, -2:]).all(-1)  # an absent landmark (empty cells in the CSV) has no point
    if not keep.all():
        data, feats = data[keep], {a: np.asarray(b)[keep] for a, b in feats.items()}
    kwargs = {"name": name, "features": feats, "size": 25, "text": {"string": "{index}", "size": 10}}
    return [(data, kwargs, "points")]


def read_landmarks(path: str):
    p = Path(path)
    if p.suffix.lower() == ".txt":
        return _points_layer(read_isbi_txt(p)[None], p.stem)
    names, coords = read_landmarks_csv(p)
    return _points_layer(coords, p.stem, names)


def get_reader(path):
    if isinstance(path, list):
        return None
    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
        return read_cephalogram
    if p.suffix.lower() in DICOM_SUFFIXES and p.is_file():
        return read_cephalogram if have_pydicom() else None
    if p.suffix.lower() == ".csv":
        try:
            with open(p) as f:
                head = f.readline()
        except OSError:
            return None
        return read_landmarks if head.startswith("image_path") else None
    if p.suffix.lower() == ".txt":
        try:
            read_isbi_txt(p)
        except GlimpseError:
            return None
        return read_landmarks
    return None
