"""npe2 sample data: one ISBI 2015 cephalogram.

Where it comes from, in order:

1. a local copy of the data set: the folder in the environment variable ``NAPARI_GLIMPSE_DATA``
   (the data set folder, with ``images/NNN.jpg``, or the images folder itself, or the original
   ``RawImage/...`` layout);
2. the same, from the ``data_dir`` setting (``napari_glimpse._sample_data.set_data_dir``), stored in
   ``$NAPARI_GLIMPSE_CONFIG`` or ``~/.config/napari-glimpse/settings.json``;
3. a download with pooch (optional dependency) into pooch's cache, from the public copy of the
   ISBI release named in ``SAMPLE_URL`` (override with ``NAPARI_GLIMPSE_SAMPLE_URL``).

Failures end in a :class:`~napari_glimpse.errors.GlimpseError` that says what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import GlimpseError
from .io import IMAGE_SUFFIXES, read_image

SAMPLE_ID = "151"  # the first image of the ISBI Test1 split
# Public copy of the ISBI 2015 release the shared data set was taken from (see its README).
SAMPLE_URL = (
    "https://raw.githubusercontent.com/shraddhaa09/Cephalometric-Landmark-Detection/main/"
    "Cephalometric%20dataset/cepha400/151.jpg"
)
ENV_DATA = "NAPARI_GLIMPSE_DATA"
ENV_URL = "NAPARI_GLIMPSE_SAMPLE_URL"
ENV_CONFIG = "NAPARI_GLIMPSE_CONFIG"


def settings_path() -> Path:
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "napari-glimpse" / "settings.json"


def read_settings() -> dict:
    p = settings_path()
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def set_data_dir(folder: str | os.PathLike | None) -> None:
    """Remember (or forget, with None) a local ISBI data set folder for the sample data."""
    s = read_settings()
    if folder is None:
        s.pop("data_dir", None)
    else:
        s["data_dir"] = str(Path(folder).resolve())
    p = settings_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(s, indent=2) + "\n")


def find_local_sample(folder: str | os.PathLike) -> Path | None:
    """The sample image inside a local data set folder, or any image there; None if none."""
    root = Path(folder)
    for sub in ("images", ".", "RawImage/Test1Data", "RawImage/TrainingData"):
        d = root / sub
        if not d.is_dir():
            continue
        for suffix in IMAGE_SUFFIXES:
            cand = d / f"{SAMPLE_ID}{suffix}"
            if cand.is_file():
                return cand
        imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if imgs:
            return imgs[0]
    return None


_HINT = (f"set {ENV_DATA} to a local copy of the ISBI 2015 data set "
         "(a folder holding images/151.jpg or RawImage/Test1Data/151.bmp)")


def download_sample(url: str | None = None, why_not_local: str = "") -> Path:
    """Fetch the sample image with pooch (cached); a clear error when offline or without pooch."""
    url = url or os.environ.get(ENV_URL) or SAMPLE_URL
    try:
        import pooch
    except ImportError:
        raise GlimpseError(f"no ISBI sample image{why_not_local}, and pooch (to download one) is not "
                           f"installed: {_HINT}, or pip install pooch") from None
    try:
        path = pooch.retrieve(url, known_hash=None, fname=f"isbi2015_{SAMPLE_ID}{Path(url).suffix or '.jpg'}",
                              path=pooch.os_cache("napari-glimpse"), progressbar=False)
    except Exception as exc:  # requests / urllib errors differ between pooch versions
        raise GlimpseError(
            f"no ISBI sample image{why_not_local}, and downloading {url} failed "
            f"({exc.__class__.__name__}: offline?): {_HINT}, or connect to the internet"
        ) from None
    return Path(path)


def sample_path() -> Path:
    """Where the sample cephalogram is: local data set first, else the download."""
    tried = []
    for what, source in ((ENV_DATA, os.environ.get(ENV_DATA)),
                         ("the data_dir setting", read_settings().get("data_dir"))):
        if source:
            found = find_local_sample(source)
            if found is not None:
                return found
            tried.append(f"{what} ({source}) holds none")
    return download_sample(why_not_local=(": " + "; ".join(tried)) if tried else "")


def isbi_cephalogram():
    """npe2 sample data: the ISBI cephalogram as a grey image layer."""
    path = sample_path()
    return [(read_image(path), {"name": path.stem, "colormap": "gray", "metadata": {"path": str(path)}}, "image")]
