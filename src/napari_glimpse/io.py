"""Readers and writers: images, Kaggle-layout CSVs, the original ISBI layout, datasets.

Coordinates are ``(x, y)`` in full-resolution pixels, x = column, y = row, origin at the
top-left pixel, as in the ISBI data.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ._files import make_temp
from .errors import GlimpseError, GlimpseWarning
from .landmark_set import SET_FILE, LandmarkSet, find_landmark_set, set_for_count
from .landmarks import ISBI_LANDMARKS, ISBI_PIXEL_SPACING_MM

IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")  # read with pydicom (napari_glimpse.spacing.read_dicom)

ISBI_SPLIT_FOLDERS = {"train": "TrainingData", "test1": "Test1Data", "test2": "Test2Data"}

# Our own limit on an image's size (a 500-megapixel image takes about 5 GB to predict); below it,
# images are decoded without PIL's decompression-bomb warnings (PIL's own limit is raised to it).
MAX_PIXELS = 500_000_000


def _too_large(path: Path, size: tuple[int, int] | None, detail: str = "") -> GlimpseError:
    what = f"{size[0]}x{size[1]} pixels, {size[0] * size[1] / 1e6:.0f} megapixels" if size else detail
    return GlimpseError(f"image {path} is too large ({what}); napari-glimpse reads images of up to "
                        f"{MAX_PIXELS / 1e6:.0f} megapixels")


def _open_image(path: Path):
    """``PIL.Image.open`` with our pixel limit instead of PIL's (no decompression-bomb warnings
    below it, a clear :class:`GlimpseError` above it)."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            m = re.search(r"\((\d+) pixels\)", str(exc))
            raise _too_large(path, None, f"{int(m.group(1)) / 1e6:.0f} megapixels" if m else str(exc)) from None
    if im.size[0] * im.size[1] > MAX_PIXELS:
        im.close()
        raise _too_large(path, im.size)
    return im


def finite_pixels(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """``arr`` with its NaN and infinite pixels (float images only) set to the image's lowest
    finite value, with one :class:`GlimpseWarning` naming ``name`` and the count; an image without
    any finite pixel is a :class:`GlimpseError`."""
    if not np.issubdtype(arr.dtype, np.floating):
        return arr
    ok = np.isfinite(arr)
    if ok.all():
        return arr
    if not ok.any():
        raise GlimpseError(f"{name}: no finite pixel values (all NaN or infinite)")
    lo = arr[ok].min()
    warnings.warn(f"{name}: {arr.size - int(ok.sum())} NaN or infinite pixel(s) set to the image's lowest "
                  f"value ({lo:g})", GlimpseWarning, stacklevel=2)
    return np.where(ok, arr, lo)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as a 2-D grey ``uint8`` array.

    8-bit images are kept as they are; 16-bit and float images are windowed to their
    0.5-99.5 percentile range; RGB becomes its luma (PIL's ``convert("L")``). NaN or infinite pixels of a float image
    are set to its lowest value, with a warning (:func:`finite_pixels`); an image above
    :data:`MAX_PIXELS` is a clear error.
    """
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise GlimpseError(f"image not found: {path}")
    if path.is_dir():
        raise GlimpseError(f"expected an image file, got a folder: {path}")
    try:
        with _open_image(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                im = im.convert("L")
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise GlimpseError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None
    return to_grey_uint8(finite_pixels(arr, str(path)))


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """``(H, W)`` luma of an ``(H, W, 3|4)`` RGB(A) array (alpha ignored), as :func:`read_image` makes
    it of an RGB file (PIL's ``convert("L")``: ITU-R 601-2 weights): bit for bit for ``uint8``,
    ``float32`` for other types."""
    rgb = np.asarray(rgb)[..., :3]
    if rgb.dtype == np.uint8:  # PIL's integer formula
        r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_grey_uint8(arr: np.ndarray) -> np.ndarray:
    """Convert an image array (grey or RGB/RGBA, any dtype) to grey ``uint8`` (RGB: :func:`rgb_to_grey`)."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        if arr.shape[-1] in (3, 4):
            arr = rgb_to_grey(arr)
        elif arr.shape[0] in (3, 4):
            arr = rgb_to_grey(np.moveaxis(arr, 0, -1))
        else:
            raise GlimpseError(f"expected a 2-D grey or RGB image, got shape {arr.shape}")
    if arr.ndim != 2:
        raise GlimpseError(f"expected a 2-D grey or RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = finite_pixels(arr).astype(np.float32)
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


CSV_ENCODING = "utf-8-sig"  # a leading byte-order mark (Excel's "CSV UTF-8") is skipped
# bytes that are not UTF-8 (file names in another encoding) pass through unchanged, as os.fsdecode does
CSV_ERRORS = "surrogateescape"


def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV with their line numbers; ``,``, or else ``;`` or tab
    (whichever the first line has) as the separator."""
    if not path.exists():
        raise GlimpseError(f"landmark file not found: {path}")
    try:
        text = path.read_text(encoding=CSV_ENCODING, errors=CSV_ERRORS)
    except OSError as exc:
        raise GlimpseError(f"cannot read {path}: {exc.strerror or exc}") from None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delimiter = ","
    if "," not in first and (";" in first or "\t" in first):
        delimiter = ";" if first.count(";") >= first.count("\t") else "\t"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise GlimpseError(f"{path}:{reader.line_num}: not a readable CSV ({exc})") from None
    return [(i, r) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]


def _check_header(path: Path, header: list[str]) -> None:
    if header[0] != "image_path":
        raise GlimpseError(f"{path}: the first column must be image_path, found {header[0][:40]!r} "
                           f"(header: image_path,1_x,1_y,...,K_x,K_y)")
    if len(header) < 3 or (len(header) - 1) % 2 != 0:
        raise GlimpseError(f"{path}: header must be image_path,1_x,1_y,...,K_x,K_y: an x and a y column per "
                           f"landmark (got {len(header)} columns, the last {header[-1][:40]!r})")


def _coordinate(path: Path, lineno: int, name: str, column: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        hint = "; a decimal comma? write 12.5, not 12,5" if re.fullmatch(r"\s*-?\d+,\d+\s*", text) else ""
        raise GlimpseError(f"{path}:{lineno}: non-numeric value {text[:40]!r} (image {name}, column {column}"
                           f"{hint})") from None
    if not math.isfinite(v):
        raise GlimpseError(f"{path}:{lineno}: image {name}, column {column}: {text.strip()!r} is not a finite number")
    return v


def _pair(path: Path, lineno: int, name: str, cols: Sequence[str], cells: Sequence[str]) -> tuple[float, float]:
    """One landmark's ``(x, y)``: both cells empty is an absent landmark (NaN, NaN); one of them
    empty, text, ``nan`` or ``inf`` is an error naming the line, image and column."""
    empty = [not c.strip() for c in cells]
    if all(empty):
        return math.nan, math.nan
    if any(empty):
        col, other = (cols[0], cols[1]) if empty[0] else (cols[1], cols[0])
        _coordinate(path, lineno, name, other, cells[1] if empty[0] else cells[0])  # text or nan there: that error
        raise GlimpseError(f"{path}:{lineno}: non-numeric value '' (image {name}, column {col}; an absent landmark "
                           f"leaves both its cells empty, {other} is not)")
    return _coordinate(path, lineno, name, cols[0], cells[0]), _coordinate(path, lineno, name, cols[1], cells[1])


def _column_labels(header: Sequence[str], landmark_names: Sequence[str] | None) -> list[str]:
    """The header's coordinate columns as errors name them: ``7_y (Lower incisal incision)`` where
    the landmarks have names, else ``7_y``."""
    cols = list(header[1:])
    if landmark_names is None:
        return cols
    return [f"{c} ({landmark_names[i // 2]})" for i, c in enumerate(cols)]


def _check_count(path: Path, n: int, landmark_names: Sequence[str] | None, set_name: str | None) -> None:
    if landmark_names is not None and n != len(landmark_names):
        whose = f"the data's landmark set {set_name!r} ({SET_FILE})" if set_name else "the landmark set"
        raise GlimpseError(f"{path} has {n} landmarks ({2 * n} coordinate columns), {whose} has "
                           f"{len(landmark_names)}: the CSV and the set must list the same landmarks")


def read_landmarks_csv(path: str | os.PathLike, unique: bool = False,
                       landmark_set: LandmarkSet | None = None) -> tuple[list[str], np.ndarray]:
    """Read a Kaggle-layout CSV: ``image_path,1_x,1_y,...``. Returns names and ``(N, K, 2)``.

    UTF-8 with or without a byte-order mark; ``,`` separators, or ``;`` or tabs throughout.
    Every coordinate must be a finite number (errors name the line, image and column), except
    that a landmark whose x and y cells are both empty is *absent* (marked not visible, as
    :meth:`~napari_glimpse.corrections.CorrectionLog.export_training_csv` writes it) and reads
    as ``(NaN, NaN)``: training, fine-tuning and evaluation leave it out. Only one of the two
    cells empty, or ``nan``/``inf`` written out, is an error; so is a row with every landmark absent.
    ``unique``: an image named on two rows is an error (labels for training or evaluation).
    ``landmark_set``: the set the data declares; the CSV must have as many landmarks, and errors
    name the landmark of a column (without a set, a CSV of 19 landmarks is read as the ISBI 19).
    """
    path = Path(path)
    numbered = _read_csv_rows(path)
    if not numbered:
        raise GlimpseError(f"{path} is empty")
    header = [c.strip() for c in numbered[0][1]]
    _check_header(path, header)
    n = (len(header) - 1) // 2
    _check_count(path, n, landmark_set.names if landmark_set else None, landmark_set.name if landmark_set else None)
    named = landmark_set.names if landmark_set else set_for_count(n).names if n == len(ISBI_LANDMARKS) else None
    cols = _column_labels(header, named)
    names, coords, seen = [], [], {}
    for lineno, row in numbered[1:]:
        name = row[0].strip()
        if len(row) != len(header):
            detail = (f"no value for column {(['image_path'] + cols)[len(row)]}" if len(row) < len(header)
                      else f"a value beyond the last column {cols[-1]}")
            raise GlimpseError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)} "
                               f"(image {name}: {detail})")
        if unique and name in seen:
            raise GlimpseError(f"{path}:{lineno}: image {name} has a second row (the first on line {seen[name]}); "
                               f"keep one row per image")
        seen.setdefault(name, lineno)
        vals = [_pair(path, lineno, name, cols[2 * k: 2 + 2 * k], row[1 + 2 * k: 3 + 2 * k]) for k in range(n)]
        if all(math.isnan(x) for x, _ in vals):
            raise GlimpseError(f"{path}:{lineno}: image {name} has every landmark absent (all its cells empty); "
                               f"label at least one landmark or leave the image out")
        names.append(name)
        coords.append(np.asarray(vals, dtype=np.float64).reshape(n, 2))
    if not names:
        raise GlimpseError(f"{path} has a header but no rows")
    return names, np.stack(coords)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8", errors=CSV_ERRORS) as f:
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
    """Write ``(N, K, 2)`` coordinates in the Kaggle layout (atomically); NaN or infinite
    coordinates are refused (nothing is written)."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 3 or coords.shape[-1] != 2 or coords.shape[0] != len(names):
        raise ValueError(f"coords must be (N, K, 2) with N={len(names)}, got {coords.shape}")
    bad = np.nonzero(~np.isfinite(coords).all(axis=(1, 2)))[0]
    if bad.size:
        raise GlimpseError(f"refusing to write {path}: the coordinates of {names[int(bad[0])]} "
                           f"({bad.size} image(s) in all) are not finite numbers")
    rows = [[name] + [f"{v:.{decimals}f}" for v in c.reshape(-1)] for name, c in zip(names, coords)]
    write_table_csv(path, landmark_columns(coords.shape[1]), rows)


def write_table_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Write a small CSV table atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    _atomic_write_text(Path(path), buf.getvalue())


class CsvAppender:
    """A CSV written a row at a time: the header and ``rows`` are written atomically first
    (with the umask's permissions), then each :meth:`write` appends one row and flushes it, so a
    run that is killed leaves every row it finished, whole."""

    def __init__(self, path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence] = ()):
        self.path = Path(path)
        write_table_csv(self.path, header, rows)
        self._f = open(self.path, "a", newline="", encoding="utf-8", errors=CSV_ERRORS)
        self._w = csv.writer(self._f, lineterminator="\n")

    def write(self, row: Sequence) -> None:
        self._w.writerow(row)
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def read_rows_to_resume(path: str | os.PathLike, header: Sequence[str]) -> list[list[str]]:
    """The whole rows of a CSV written with ``header`` (by :class:`CsvAppender`), to continue it:
    none if the file does not exist; a last line cut short (no newline) is dropped, as are rows of
    another length; another header is a :class:`GlimpseError`."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding=CSV_ENCODING, errors=CSV_ERRORS)
    except OSError as exc:
        raise GlimpseError(f"cannot read {path} to resume: {exc.strerror or exc}") from None
    text = text[: text.rfind("\n") + 1]
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    except csv.Error as exc:
        raise GlimpseError(f"{path}: not a CSV this program wrote ({exc}); cannot resume it") from None
    if not rows:
        return []
    if [c.strip() for c in rows[0]] != list(header):
        raise GlimpseError(f"{path} has other columns ({len(rows[0])}) than these predictions ({len(header)}); "
                           f"cannot resume it: give another --out, or drop --resume to replace it")
    return [r for r in rows[1:] if len(r) == len(header)]


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
        if not all(map(math.isfinite, pts[-1])):
            raise GlimpseError(f"{path}:{i + 1}: coordinate {ln!r} is not a finite number")
    if len(pts) < n_landmarks:
        raise GlimpseError(f"{path}: expected {n_landmarks} landmark lines, found {len(pts)}")
    return np.asarray(pts, dtype=np.float64)


def is_dicom(path: str | os.PathLike) -> bool:
    """A DICOM file: named ``.dcm`` / ``.dicom``, or (as PACS exports name them: ``IM0001``,
    ``1.2.840.113619.2.5``) any other name but an image's whose bytes 128-131 are ``DICM``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def list_images(folder: str | os.PathLike, dicom: bool = False) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; ``dicom``: DICOM files too (by
    suffix or, without one, by content: :func:`is_dicom`)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or (dicom and is_dicom(p))))


def expand_image_args(args: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders given on a command line into image paths (a folder's images and
    DICOM files, sorted by name)."""
    out: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            imgs = list_images(p, dicom=True)
            if not imgs:
                raise GlimpseError(f"no images ({', '.join(IMAGE_SUFFIXES)}, .dcm) in folder {p}")
            out += imgs
        elif p.exists():
            out.append(p)
        else:
            raise GlimpseError(f"image not found: {p}")
    if not out:
        raise GlimpseError("no images given")
    return out


def absent(coords: np.ndarray) -> np.ndarray:
    """``(...)`` True where a ``(..., 2)`` landmark is absent: both coordinates NaN."""
    return np.isnan(np.asarray(coords, dtype=np.float64)).all(-1)


def present(coords: np.ndarray) -> np.ndarray:
    """``(...)`` True where a ``(..., 2)`` landmark has a finite position (not absent)."""
    return np.isfinite(np.asarray(coords, dtype=np.float64)).all(-1)


@dataclass
class Dataset:
    """A set of images with landmark annotations (one or more annotators)."""

    image_paths: list[Path]
    annotations: dict[str, np.ndarray]  # annotator -> (N, K, 2)
    landmark_names: tuple[str, ...] = ISBI_LANDMARKS
    pixel_spacing: float = ISBI_PIXEL_SPACING_MM
    _images: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # the set the data declares (its landmarks.json), whose names are landmark_names; None: none declared
    landmark_set: LandmarkSet | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image_paths)

    def ground_truth(self, which: str = "mean") -> np.ndarray:
        """``(N, K, 2)`` labels: ``mean`` of all annotators, or one annotator by name. An absent
        landmark is NaN (see :func:`present`); the mean is over the annotators who placed it."""
        if which == "mean":
            each = self.each_annotator()
            if np.isfinite(each).all():
                return np.mean(each, axis=1)
            ok = present(each)[..., None]
            count = ok.sum(axis=1)
            mean = np.where(ok, each, 0.0).sum(axis=1) / np.maximum(count, 1)
            return np.where(count > 0, mean, np.nan)
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
            landmark_set=self.landmark_set,
        )

    def image(self, i: int) -> np.ndarray:
        return read_image(self.image_paths[i])

    def check_inside(self, i: int, shape: tuple[int, int]) -> None:
        """Raise if any label of image ``i`` lies outside an image of ``shape`` or is not a finite
        position; absent landmarks (both coordinates NaN) are skipped."""
        h, w = shape
        for who, ann in self.annotations.items():
            c = ann[i]
            nonfinite = np.nonzero(~np.isfinite(c).all(-1) & ~absent(c))[0]
            if nonfinite.size:
                k = int(nonfinite[0])
                raise GlimpseError(f"{self.image_paths[i].name}: landmark {k + 1} ({self._named(k)}{who}) at "
                                   f"({c[k, 0]:g}, {c[k, 1]:g}) is not a finite position")
            bad = np.nonzero((c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] > w - 1) | (c[:, 1] > h - 1))[0]
            if bad.size:
                k = int(bad[0])
                raise GlimpseError(
                    f"{self.image_paths[i].name}: landmark {k + 1} ({self._named(k)}{who}) at "
                    f"({c[k, 0]:g}, {c[k, 1]:g}) is outside the {w}x{h} image"
                )

    def _named(self, k: int) -> str:
        """``'Sella', `` for a landmark with a name of its own (not ``L1 .. LK``), else nothing."""
        name = self.landmark_names[k] if k < len(self.landmark_names) else f"L{k + 1}"
        return "" if name == f"L{k + 1}" else f"{name}, "


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

    A ``landmarks.json`` in the folder (beside the CSV file) declares the landmark set
    (:mod:`napari_glimpse.landmark_set`): the CSVs must have its number of landmarks, and the
    data's :attr:`Dataset.landmark_names` are its names. Without one, 19 landmarks are the ISBI 19
    and any other number ``L1 .. LK``.
    """
    root = Path(data)
    spacing = ISBI_PIXEL_SPACING_MM if pixel_spacing is None else float(pixel_spacing)
    if not root.exists():
        raise GlimpseError(f"data not found: {root}")
    folder = root.parent if root.is_file() else root
    lset = find_landmark_set(folder)
    if root.is_file():
        names, coords = read_landmarks_csv(root, unique=True, landmark_set=lset)
        paths, ann = [_find_image(folder, n) for n in names], {"labels": coords}
    elif (found := _load_kaggle(root, split, lset)) is not None:
        paths, ann = found
    elif (root / "RawImage").is_dir():
        paths, ann = _load_isbi(root, split)
        _check_count(root, len(ISBI_LANDMARKS), lset.names if lset else None, lset.name if lset else None)
    else:
        raise GlimpseError(
            f"{root}: no labels for split {split!r} (looked for {split}_senior.csv, {split}_junior.csv, "
            f"{split}.csv and the ISBI RawImage/AnnotationsByMD layout)"
        )
    k = next(iter(ann.values())).shape[1]
    names = lset.names if lset is not None else set_for_count(k).names
    return Dataset(paths, ann, names, spacing, landmark_set=lset)


def _load_kaggle(root: Path, split: str, lset: LandmarkSet | None) -> tuple[list[Path], dict] | None:
    """The Kaggle layout's image paths and labels by annotator, or None without its CSVs."""
    kaggle = {who: root / f"{split}_{who}.csv" for who in ("senior", "junior")}
    kaggle = {k: v for k, v in kaggle.items() if v.exists()}
    if not kaggle and (root / f"{split}.csv").exists():
        kaggle = {"labels": root / f"{split}.csv"}
    if not kaggle:
        return None
    ann: dict[str, np.ndarray] = {}
    names0: list[str] | None = None
    for who, p in kaggle.items():
        names, coords = read_landmarks_csv(p, unique=True, landmark_set=lset)
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
    return [_find_image(root, n) for n in names0], ann


def _load_isbi(root: Path, split: str) -> tuple[list[Path], dict]:
    """The original ISBI layout's image paths and labels by annotator."""
    folder = ISBI_SPLIT_FOLDERS.get(split.lower(), split)
    img_dir = root / "RawImage" / folder
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
    return paths, ann


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
        landmark_set=parts[0].landmark_set,
    )
