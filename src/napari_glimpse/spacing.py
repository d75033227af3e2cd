"""Pixel spacing (mm per pixel): read from an image file, checked, remembered per folder; images
resampled to a model's spacing and points mapped between the two.

Where a spacing comes from, first match wins (:meth:`GlimpseModel.predict`, the CLI, the Detect widget):

1. the one given (``spacing=``, ``--spacing MM``, the Detect widget's field);
2. the file's own: DICOM ``PixelSpacing``, else ``ImagerPixelSpacing`` (needs pydicom); a TIFF's
   ``XResolution``/``YResolution`` when ``ResolutionUnit`` is inch or cm and the resolution gives
   0.01-1 mm per pixel (72 and 96 dpi, which image software writes by default, and a missing unit
   mean nothing);
3. the model's own (0.1 mm for the shipped model, the ISBI 2015 images'), with a one-line
   :class:`SpacingWarning` when the image's longer side would then be outside 180-300 mm (the
   training images are 194 x 240 mm), and always for a DICOM file that records no spacing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import GlimpseError, GlimpseWarning
from .io import Dataset, concat_datasets, is_dicom, read_image, to_grey_uint8

MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 1.0
# spacings within 1 % of the model's are taken as the model's (no resampling)
SPACING_TOLERANCE = 0.01
# the longer side of the training cephalograms (ISBI 2015: 1935 x 2400 pixels at 0.1 mm = 240 mm)
# and the range of longer sides that raise no notice
TRAIN_SIDE_MM = (180.0, 300.0)
_DEFAULT_DPI = (72.0, 96.0)
TIFF_SUFFIXES = (".tif", ".tiff")


class SpacingWarning(GlimpseWarning):
    """The spacing was assumed (none given or recorded) and may be wrong for this image (the CLI
    prints it as one ``napari-glimpse: warning: ...`` line)."""


def check_spacing(value, what: str = "pixel spacing") -> float:
    """``value`` as a float of mm per pixel, or one clear :class:`GlimpseError` line when it is not a
    number, not finite, <= 0 or outside 0.01-1 mm."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GlimpseError(f"{what} must be a number of mm per pixel (e.g. 0.1), got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise GlimpseError(f"{what} must be a positive number of mm per pixel (e.g. 0.1), got {value}")
    if not MIN_SPACING_MM <= v <= MAX_SPACING_MM:
        raise GlimpseError(f"{what} of {v:g} mm per pixel is outside {MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm "
                           "(cephalograms have about 0.1)")
    return v


def _isotropic(row: float, col: float, what: str) -> float:
    """One spacing from a (row, column) pair; their mean, with a warning, when they differ by > 1 %."""
    if abs(row - col) > SPACING_TOLERANCE * max(row, col):
        warnings.warn(f"{what}: pixels are not square ({row:g} x {col:g} mm): using {(row + col) / 2:g} mm",
                      SpacingWarning, stacklevel=3)
        return (row + col) / 2
    return col


def dicom_spacing(ds) -> float | None:
    """A pydicom dataset's spacing: ``PixelSpacing`` (calibrated), else ``ImagerPixelSpacing`` (at the
    detector); ``None`` when neither is there or readable. Not range-checked (see :func:`check_spacing`)."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        val = getattr(ds, tag, None)
        try:
            nums = [float(v) for v in val] if val else []
        except (TypeError, ValueError):
            continue
        if len(nums) >= 2:
            return _isotropic(nums[0], nums[1], f"DICOM {tag}")
        if len(nums) == 1:
            return nums[0]
    return None


def tiff_spacing(path: str | os.PathLike) -> float | None:
    """A TIFF's spacing from its resolution tags, when meaningful (see the module's notes), else ``None``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            tags = dict(getattr(im, "tag_v2", {}) or {})
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    unit = tags.get(296)  # ResolutionUnit: 1 none, 2 inch, 3 cm
    xres, yres = tags.get(282), tags.get(283)
    if unit not in (2, 3) or xres is None:
        return None
    try:
        xres = float(xres)
        yres = float(yres) if yres is not None else xres
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(xres) and math.isfinite(yres)) or xres <= 0 or yres <= 0:
        return None
    if unit == 2 and (xres in _DEFAULT_DPI or yres in _DEFAULT_DPI):
        return None
    per = 25.4 if unit == 2 else 10.0
    mm = _isotropic(per / yres, per / xres, f"{Path(path).name} resolution")
    mm = float(f"{mm:.6g}")  # 254 dpi is 0.1 mm, not 0.09999999999999999
    return mm if MIN_SPACING_MM <= mm <= MAX_SPACING_MM else None


def read_spacing(path: str | os.PathLike) -> float | None:
    """The spacing ``path`` records (DICOM or TIFF; see the module's notes), else ``None``. A DICOM
    file needs pydicom (a clear error without it); the DICOM value is not range-checked."""
    p = Path(path)
    suffix = p.suffix.lower()
    if is_dicom(p):
        try:
            import pydicom
        except ImportError:
            raise GlimpseError("reading DICOM needs pydicom: pip install 'napari-glimpse[dicom]'") from None
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many kinds
            raise GlimpseError(f"cannot read DICOM {p}: {exc.__class__.__name__}: {exc}") from None
        return dicom_spacing(ds)
    if suffix in TIFF_SUFFIXES:
        return tiff_spacing(p)
    return None


def read_image_and_spacing(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """An image file as grey ``uint8`` (DICOM too, with pydicom) and the spacing it records (or ``None``)."""
    p = Path(path)
    if is_dicom(p):
        return read_dicom(p)
    img = read_image(p)
    return img, tiff_spacing(p) if p.suffix.lower() in TIFF_SUFFIXES else None


def size_notice(shape: tuple[int, int], spacing: float, name: str = "image", dicom: bool = False) -> str | None:
    """The one-line notice for an image given no spacing and read at ``spacing`` (the model's): when
    its longer side is then outside :data:`TRAIN_SIDE_MM`, or always for a DICOM file; else ``None``."""
    h, w = shape
    side = max(h, w) * spacing
    unusual = not TRAIN_SIDE_MM[0] <= side <= TRAIN_SIDE_MM[1]
    if not (unusual or dicom):
        return None
    what = "the DICOM file records no pixel spacing" if dicom else "no pixel spacing given or recorded"
    return (f"{name}: {what}; at the model's {spacing:g} mm per pixel it is {w * spacing:.0f} x {h * spacing:.0f} mm"
            + (" (training images: about 194 x 240 mm)" if unusual else "")
            + "; give the spacing (--spacing MM, or the Detect widget's field) if that is wrong")


def resolve_spacing(given: float | None, recorded: float | None, shape: tuple[int, int] | None,
                    model_spacing: float, name: str = "image", dicom: bool = False) -> tuple[float, str, str | None]:
    """The spacing to read an image at, where it came from (``given``, ``file`` or ``model``) and the
    notice to show (or ``None``): ``given`` if not ``None``, else ``recorded`` (the file's), else the
    model's with :func:`size_notice` (none without the image's ``shape``). A bad given or recorded
    value is one clear :class:`GlimpseError`."""
    if given is not None:
        return check_spacing(given), "given", None
    if recorded is not None:
        try:
            return check_spacing(recorded, f"{name}: the recorded pixel spacing"), "file", None
        except GlimpseError as exc:
            raise GlimpseError(f"{exc}; give the right one (--spacing MM)") from None
    return model_spacing, "model", None if shape is None else size_notice(shape, model_spacing, name, dicom)


def model_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``shape`` (h, w) scaled by ``factor`` (model pixels per image pixel), rounded, at least 1."""
    return max(1, int(round(shape[0] * factor))), max(1, int(round(shape[1] * factor)))


def resample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D image resized to ``shape`` (h, w): area averaging when shrinking, bilinear when enlarging.
    Pixel centres map as ``(x + 0.5) * new / old - 0.5`` (see :func:`to_model_pixels`)."""
    import cv2  # 11-44x faster than scikit-image's resize on an ISBI image (benchmarks/image_ops.py)

    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if shape[0] * shape[1] < h * w else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (shape[1], shape[0]), interpolation=interp)


def to_model_pixels(points: np.ndarray, scale) -> np.ndarray:
    """``(..., 2)`` points (x, y) in image pixels -> resampled-image pixels; ``scale`` (x, y) = new / old size."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * np.asarray(scale, dtype=np.float64) - 0.5


def to_image_pixels(points: np.ndarray, scale) -> np.ndarray:
    """The inverse of :func:`to_model_pixels`."""
    return (np.asarray(points, dtype=np.float64) + 0.5) / np.asarray(scale, dtype=np.float64) - 0.5


# ------------------------------------------------------------------ labelled sets
@dataclass
class ResampledDataset(Dataset):
    """A labelled set seen at another spacing: image ``i`` is resampled by ``factors[i]`` (new
    pixels per file pixel) when read, and the labels are already in the resampled pixels."""

    factors: np.ndarray = field(default_factory=lambda: np.ones(0))

    def image(self, i: int) -> np.ndarray:
        img = read_image(self.image_paths[i])
        f = float(self.factors[i])
        return img if f == 1 else resample(img, model_shape(img.shape, f))

    def subset(self, idx: Sequence[int]) -> "ResampledDataset":
        idx = list(idx)
        return ResampledDataset([self.image_paths[i] for i in idx], {k: v[idx] for k, v in self.annotations.items()},
                                self.landmark_names, self.pixel_spacing, factors=self.factors[idx],
                                landmark_set=self.landmark_set)


def _image_hw(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # the header only
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError, ValueError):
        return read_image(path).shape  # the reader's own error


def at_spacing(parts: Sequence[Dataset], spacing: float) -> Dataset:
    """Labelled sets (each at its own ``pixel_spacing``) as one set at ``spacing``: images resampled
    when read and labels scaled, where a set's spacing differs from it by more than 1 %. When none
    does: the set itself, or the sets joined as :func:`~napari_glimpse.io.concat_datasets` does
    (each image's labels the mean of its annotators, as also when resampling several sets)."""
    parts = list(parts)
    if all(abs(d.pixel_spacing / spacing - 1) <= SPACING_TOLERANCE for d in parts):
        return parts[0] if len(parts) == 1 else concat_datasets(parts)
    paths, factors, scaled = [], [], []
    for d in parts:
        f = d.pixel_spacing / spacing
        labels = d.annotations if len(parts) == 1 else {"labels": d.ground_truth("mean")}
        scales = []
        for p in d.image_paths:
            h, w = _image_hw(p)
            nh, nw = model_shape((h, w), f)
            scales.append([nw / w, nh / h])
        scales = np.asarray(scales, dtype=np.float64)[:, None]  # (N, 1, 2): every landmark alike
        scaled.append({k: to_model_pixels(v, scales) for k, v in labels.items()})
        paths += list(d.image_paths)
        factors += [f] * len(d)
    ann = {k: np.concatenate([s[k] for s in scaled]) for k in scaled[0]}
    return ResampledDataset(paths, ann, parts[0].landmark_names, spacing, factors=np.asarray(factors),
                            landmark_set=parts[0].landmark_set)


# ------------------------------------------------------------------ remembered per folder
def config_dir() -> Path:
    """Where napari-glimpse keeps its settings: ``$NAPARI_GLIMPSE_CONFIG_DIR``, else the user's
    config folder (``platformdirs``: ``~/.config/napari-glimpse`` on Linux)."""
    env = os.environ.get("NAPARI_GLIMPSE_CONFIG_DIR")
    if env:
        return Path(env)
    try:
        from platformdirs import user_config_dir
    except ImportError:
        return Path.home() / ".config" / "napari-glimpse"
    return Path(user_config_dir("napari-glimpse", appauthor=False))


def _spacing_file() -> Path:
    return config_dir() / "spacing.json"


def _remembered() -> dict:
    try:
        data = json.loads(_spacing_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _folder_key(folder: str | os.PathLike) -> str:
    return str(Path(folder).expanduser().resolve())


def remembered_spacing(folder: str | os.PathLike) -> float | None:
    """The spacing remembered for the images of ``folder`` (``None`` when none, or not a valid one)."""
    val = _remembered().get(_folder_key(folder))
    try:
        return check_spacing(val)
    except GlimpseError:
        return None


def remember_spacing(folder: str | os.PathLike, spacing: float | None) -> bool:
    """Remember ``spacing`` for ``folder`` (``None`` or 0 forgets it) in ``spacing.json`` under
    :func:`config_dir`; False when it cannot be written (the setting then lasts the session)."""
    data = _remembered()
    key = _folder_key(folder)
    if spacing:
        data[key] = check_spacing(spacing)
    elif data.pop(key, None) is None:
        return True
    path = _spacing_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- DICOM
def have_pydicom() -> bool:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


def read_dicom(path: str | Path) -> tuple[np.ndarray, float | None]:
    """Read a DICOM cephalogram as grey ``uint8`` plus its pixel spacing in mm (if recorded)."""
    try:
        import pydicom
    except ImportError:
        raise GlimpseError("reading DICOM needs pydicom: pip install 'napari-glimpse[dicom]'") from None
    try:
        ds = pydicom.dcmread(str(path))
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many kinds (missing handlers, bad files)
        raise GlimpseError(f"cannot read DICOM {path}: {exc.__class__.__name__}: {exc}") from None
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[0]  # multi-frame: the first frame
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    icept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope != 1 or icept != 0:
        arr = arr.astype(np.float32) * slope + icept
    img = to_grey_uint8(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        img = 255 - img
    return img, dicom_spacing(ds)  # PixelSpacing, else ImagerPixelSpacing, else None
