"""Readers and writers: images, Kaggle-layout CSVs, the original ISBI layout, datasets.

Coordinates are ``(x, y)`` in full-resolution pixels, x = column, y = row, origin at the
top-left pixel, as in the ISBI data.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import GlimpseError
from .landmarks import ISBI_LANDMARKS, ISBI_PIXEL_SPACING_MM

IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff")

ISBI_SPLIT_FOLDERS = {"train": "TrainingData", "test1": "Test1Data", "test2": "Test2Data"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as a 2-D grey ``uint8`` array.

    8-bit images are kept as they are; 16-bit and float images are windowed to their
    0.5-99.5 percentile range; RGB is averaged to grey.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise GlimpseError(f"image not found: {path}")
    if path.is_dir():
        raise GlimpseError(f"expected an image file, got a folder: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                im = im.convert("L")
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise GlimpseError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None
    return to_grey_uint8(arr)


def to_grey_uint8(arr: np.ndarray) -> np.ndarray:
    """Convert an image array (grey or RGB/RGBA, any dtype) to grey ``uint8``."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        was_uint8 = arr.dtype == np.uint8
        if arr.shape[-1] in (3, 4):
            arr = arr[..., :3].astype(np.float32).mean(axis=-1)
        elif arr.shape[0] in (3, 4):
            arr = arr[:3].astype(np.float32).mean(axis=0)
        else:
            raise GlimpseError(f"expected a 2-D grey or RGB image, got shape {arr.shape}")
        if was_uint8:
            return (arr + 0.5).astype(np.uint8)
    if arr.ndim != 2:
        raise GlimpseError(f"expected a 2-D grey or RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer) and a.max() <= 255 and a.min() >= 0 and arr.dtype != np.uint16:
        return a.astype(np.uint8)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def landmark_columns(n: int) -> list[str]:
    cols = ["image_path"]
    for i in range(1, n + 1):
        cols += [f"{i}_x", f"{i}_y"]
    return cols


def read_landmarks_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a Kaggle-layout CSV: ``image_path,1_x,1_y,...``. Returns names and ``(N, K, 2)``."""
    path = Path(path)
    if not path.exists():
        raise GlimpseError(f"landmark file not found: {path}")
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise GlimpseError(f"cannot read {path}: {exc}") from None
    numbered = [(i, r) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not numbered:
        raise GlimpseError(f"{path} is empty")
    header = [c.strip() for c in numbered[0][1]]
    if len(header) < 3 or (len(header) - 1) % 2 != 0 or header[0] != "image_path":
        raise GlimpseError(
            f"{path}: header must be image_path,1_x,1_y,...,K_x,K_y (got {len(header)} columns)"
        )
    n = (len(header) - 1) // 2
    names, coords = [], []
    for lineno, row in numbered[1:]:
        if len(row) != len(header):
            raise GlimpseError(
                f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}"
            )
        try:
            vals = [float(c) for c in row[1:]]
        except ValueError:
            raise GlimpseError(f"{path}:{lineno}: non-numeric coordinate") from None
        names.append(row[0].strip())
        coords.append(np.asarray(vals, dtype=np.float64).reshape(n, 2))
    if not names:
        raise GlimpseError(f"{path} has a header but no rows")
    return names, np.stack(coords)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_landmarks_csv(
    path: str | os.PathLike, names: Sequence[str], coords: np.ndarray, decimals: int = 2
) -> None:
    """Write ``(N, K, 2)`` coordinates in the Kaggle layout (atomically)."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 3 or coords.shape[-1] != 2 or coords.shape[0] != len(names):
        raise ValueError(f"coords must be (N, K, 2) with N={len(names)}, got {coords.shape}")
    rows = [[name] + [f"{v:.{decimals}f}" for v in c.reshape(-1)] for name, c in zip(names, coords)]
    write_table_csv(path, landmark_columns(coords.shape[1]), rows)


def write_table_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Write a small CSV table atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    _atomic_write_text(Path(path), buf.getvalue())


def read_isbi_txt(path: str | os.PathLike, n_landmarks: int = 19) -> np.ndarray:
    """Read an ISBI ``AnnotationsByMD`` txt: ``n_landmarks`` lines ``x,y`` then class lines."""
    path = Path(path)
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise GlimpseError(f"cannot read {path}: {exc}") from None
    pts = []
    for i, ln in enumerate(lines[:n_landmarks]):
        parts = ln.replace(" ", "").split(",")
        if len(parts) != 2:
            raise GlimpseError(f"{path}:{i + 1}: expected 'x,y', got {ln!r}")
        try:
            pts.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise GlimpseError(f"{path}:{i + 1}: non-numeric coordinate {ln!r}") from None
    if len(pts) < n_landmarks:
        raise GlimpseError(f"{path}: expected {n_landmarks} landmark lines, found {len(pts)}")
    return np.asarray(pts, dtype=np.float64)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def expand_image_args(args: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders given on a command line into image paths."""
    out: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            imgs = list_images(p)
            if not imgs:
                raise GlimpseError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            out += imgs
        elif p.exists():
            out.append(p)
        else:
            raise GlimpseError(f"image not found: {p}")
    if not out:
        raise GlimpseError("no images given")
    return out


@dataclass
class Dataset:
    """A set of images with landmark annotations (one or more annotators)."""

    image_paths: list[Path]
    annotations: dict[str, np.ndarray]  # annotator -> (N, K, 2)
    landmark_names: tuple[str, ...] = ISBI_LANDMARKS
    pixel_spacing: float = ISBI_PIXEL_SPACING_MM
    _images: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.image_paths)

    def ground_truth(self, which: str = "mean") -> np.ndarray:
        """``(N, K, 2)`` labels: ``mean`` of all annotators, or one annotator by name."""
        if which == "mean":
            return np.mean(self.each_annotator(), axis=1)
        if which not in self.annotations:
            raise GlimpseError(
                f"annotator {which!r} not in this dataset (have: {', '.join(self.annotations)})"
            )
        return self.annotations[which]

    def each_annotator(self) -> np.ndarray:
        """``(N, A, K, 2)``: every annotator's labels, in the order of :attr:`annotations`."""
        return np.stack(list(self.annotations.values()), axis=1)

    def subset(self, idx: Sequence[int]) -> "Dataset":
        idx = list(idx)
        return Dataset(
            [self.image_paths[i] for i in idx],
            {k: v[idx] for k, v in self.annotations.items()},
            self.landmark_names,
            self.pixel_spacing,
        )

    def image(self, i: int) -> np.ndarray:
        return read_image(self.image_paths[i])

    def check_inside(self, i: int, shape: tuple[int, int]) -> None:
        """Raise if any label of image ``i`` lies outside an image of ``shape``."""
        h, w = shape
        for who, ann in self.annotations.items():
            c = ann[i]
            bad = np.nonzero((c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] > w - 1) | (c[:, 1] > h - 1))[0]
            if bad.size:
                k = int(bad[0])
                raise GlimpseError(
                    f"{self.image_paths[i].name}: landmark {k + 1} ({who}) at "
                    f"({c[k, 0]:g}, {c[k, 1]:g}) is outside the {w}x{h} image"
                )


def _names_for(n: int) -> tuple[str, ...]:
    return ISBI_LANDMARKS if n == len(ISBI_LANDMARKS) else tuple(f"L{i + 1}" for i in range(n))


def _find_image(root: Path, name: str) -> Path:
    for cand in (root / name, root / "images" / name):
        if cand.exists():
            return cand
    raise GlimpseError(f"image {name} listed in the labels was not found in {root} or {root / 'images'}")


def load_dataset(
    data: str | os.PathLike, split: str = "train", pixel_spacing: float | None = None
) -> Dataset:
    """Load a labelled split from a folder or a CSV file.

    Layouts understood:

    * Kaggle: ``DIR/{split}_senior.csv`` and/or ``DIR/{split}_junior.csv`` (or ``DIR/{split}.csv``)
      with images in ``DIR/images/`` or ``DIR/``;
    * a single Kaggle-layout CSV file given directly;
    * original ISBI: ``DIR/RawImage/<TrainingData|Test1Data|Test2Data>/NNN.bmp`` with
      ``DIR/AnnotationsByMD/400_{senior,junior}/NNN.txt``.
    """
    root = Path(data)
    spacing = ISBI_PIXEL_SPACING_MM if pixel_spacing is None else float(pixel_spacing)
    if not root.exists():
        raise GlimpseError(f"data not found: {root}")
    if root.is_file():
        names, coords = read_landmarks_csv(root)
        paths = [_find_image(root.parent, n) for n in names]
        return Dataset(paths, {"labels": coords}, _names_for(coords.shape[1]), spacing)

    kaggle = {who: root / f"{split}_{who}.csv" for who in ("senior", "junior")}
    kaggle = {k: v for k, v in kaggle.items() if v.exists()}
    if not kaggle and (root / f"{split}.csv").exists():
        kaggle = {"labels": root / f"{split}.csv"}
    if kaggle:
        ann: dict[str, np.ndarray] = {}
        names0: list[str] | None = None
        for who, p in kaggle.items():
            names, coords = read_landmarks_csv(p)
            if names0 is None:
                names0 = names
            elif names != names0:
                order = {n: i for i, n in enumerate(names)}
                missing = [n for n in names0 if n not in order]
                if missing:
                    raise GlimpseError(f"{p} lacks rows for {', '.join(missing[:3])}")
                coords = coords[[order[n] for n in names0]]
            ann[who] = coords
        assert names0 is not None
        shapes = {v.shape[1] for v in ann.values()}
        if len(shapes) != 1:
            raise GlimpseError(f"annotators disagree on the number of landmarks: {sorted(shapes)}")
        paths = [_find_image(root, n) for n in names0]
        return Dataset(paths, ann, _names_for(shapes.pop()), spacing)

    raw = root / "RawImage"
    if raw.is_dir():
        folder = ISBI_SPLIT_FOLDERS.get(split.lower(), split)
        img_dir = raw / folder
        if not img_dir.is_dir():
            raise GlimpseError(f"ISBI layout: no folder {img_dir} for split {split!r}")
        paths = list_images(img_dir)
        if not paths:
            raise GlimpseError(f"no images in {img_dir}")
        ann = {}
        for who in ("senior", "junior"):
            d = root / "AnnotationsByMD" / f"400_{who}"
            if d.is_dir():
                txts = [d / f"{p.stem}.txt" for p in paths]
                missing = [t.name for t in txts if not t.exists()]
                if missing:
                    raise GlimpseError(f"{d}: missing annotation files {', '.join(missing[:3])}")
                ann[who] = np.stack([read_isbi_txt(t) for t in txts])
        if not ann:
            raise GlimpseError(f"ISBI layout: no AnnotationsByMD/400_senior or 400_junior in {root}")
        return Dataset(paths, ann, ISBI_LANDMARKS, spacing)

    raise GlimpseError(
        f"{root}: no labels for split {split!r} (looked for {split}_senior.csv, {split}_junior.csv, "
        f"{split}.csv and the ISBI RawImage/AnnotationsByMD layout)"
    )


def concat_datasets(parts: Sequence[Dataset]) -> Dataset:
    """Join datasets; each image's labels are the mean of its own annotators."""
    parts = list(parts)
    names = parts[0].landmark_names
    for d in parts[1:]:
        if len(d.landmark_names) != len(names):
            raise GlimpseError("datasets have different numbers of landmarks")
    return Dataset(
        [p for d in parts for p in d.image_paths],
        {"labels": np.concatenate([d.ground_truth("mean") for d in parts])},
        names,
        parts[0].pixel_spacing,
    )
