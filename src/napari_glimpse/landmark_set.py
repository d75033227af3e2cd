"""Landmark sets: which points a model finds, with their names, short labels and colours.

A set is a small JSON file (docs/landmark-sets.md)::

    {"name": "lab5", "description": "...",
     "landmarks": [{"name": "Sella", "label": "S", "colour": "#1f77b4", "description": "..."}, ...]}

``label`` (default: the name) and ``colour`` (default: the palette's next colour) may be left
out, as may the descriptions. The order of the landmarks is the column order of the Kaggle CSVs
(``1_x,1_y`` is the first). The ISBI 2015 19 are the built-in default (:data:`ISBI19`).

A data folder declares its set in a ``landmarks.json`` beside its CSVs
(:func:`find_landmark_set`); a model carries its set in ``meta['landmark_set']``. Data that
declares none is the ISBI 19 when it has 19 landmarks, else ``L1 .. LK``
(:func:`set_for_names`). :func:`check_match` refuses a model of one set on data of another.
Plain Python: no numpy, no torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ._files import make_temp
from ._serde import DictConfig
from .errors import GlimpseError
from .landmarks import ISBI_ABBREVIATIONS, ISBI_LANDMARKS

SET_FILE = "landmarks.json"
FORMAT = 1

# 19 well-separated hues (tab20 without its grey); the ISBI 19 in this order, other sets cycle
PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232),
    (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
    (247, 182, 210), (219, 219, 141), (158, 218, 229), (255, 255, 255),
)
_HEX = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


def palette_colour(k: int) -> str:
    """The default colour of landmark ``k`` (0-based), ``#rrggbb``."""
    return "#{:02x}{:02x}{:02x}".format(*PALETTE_RGB[k % len(PALETTE_RGB)])


@dataclass(frozen=True)
class Landmark(DictConfig):
    """One point of a set: ``name`` (unique in the set), a short ``label`` for the canvas, a
    ``colour`` ``#rrggbb`` (or ``#rgb``) and an optional ``description``."""

    name: str
    label: str
    colour: str
    description: str = ""


@dataclass(frozen=True)
class LandmarkSet:
    """A named, ordered set of landmarks; checked when made (:meth:`check`)."""

    name: str
    landmarks: tuple[Landmark, ...]
    description: str = ""

    def __post_init__(self) -> None:
        self.check()

    def __len__(self) -> int:
        return len(self.landmarks)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.landmarks)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(p.label for p in self.landmarks)

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(p.colour for p in self.landmarks)

    @property
    def is_isbi(self) -> bool:
        """The ISBI 19 in their order: what the measurements, the shipped model's calibration and
        the ISBI benchmarks are made for."""
        return self.names == ISBI_LANDMARKS

    def describe(self) -> str:
        """``'lab5' (5 landmarks)``: how errors name the set."""
        return f"{self.name!r} ({len(self)} landmark{'s' if len(self) != 1 else ''})"

    def check(self) -> None:
        """Raise a one-line :class:`GlimpseError` for an unnamed or empty set, a landmark without a
        name or label, a colour that is not ``#rrggbb``, or two landmarks of one name or label."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise GlimpseError("a landmark set needs a name")
        if not self.landmarks:
            raise GlimpseError(f"landmark set {self.name!r} has no landmarks")
        seen: dict[tuple[str, str], int] = {}
        for k, p in enumerate(self.landmarks, start=1):
            where = f"landmark set {self.name!r}, landmark {k}"
            if not isinstance(p.name, str) or not p.name.strip():
                raise GlimpseError(f"{where}: no name")
            where += f" ({p.name})"
            if not isinstance(p.label, str) or not p.label.strip():
                raise GlimpseError(f"{where}: no short label")
            if not isinstance(p.colour, str) or not _HEX.fullmatch(p.colour.strip()):
                raise GlimpseError(f"{where}: colour {p.colour!r} is not a hex colour like '#1f77b4'")
            for what, value in (("name", p.name.strip()), ("label", p.label.strip())):
                if (what, value.casefold()) in seen:
                    raise GlimpseError(f"{where}: {what} {value!r} is also landmark {seen[what, value.casefold()]}'s; "
                                       f"every landmark needs its own {what}")
                seen[what, value.casefold()] = k

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "description": self.description,
                "landmarks": [p.to_dict() for p in self.landmarks]}

    @classmethod
    def from_dict(cls, d: Any, source: str = "landmark set") -> "LandmarkSet":
        """A set from its JSON form; labels and colours may be left out (see the module's doc)."""
        if not isinstance(d, dict) or not isinstance(d.get("landmarks"), list):
            raise GlimpseError(f"{source}: not a landmark set (a JSON object with a name and a list of landmarks)")
        if d.get("format", FORMAT) != FORMAT:
            raise GlimpseError(f"{source}: landmark set format {d.get('format')!r}; this version reads format {FORMAT}")
        points = []
        for k, p in enumerate(d["landmarks"]):
            if isinstance(p, str):
                p = {"name": p}
            if not isinstance(p, dict):
                raise GlimpseError(f"{source}: landmark {k + 1} is {p!r}, not an object with a name")
            name = str(p.get("name") or "")
            points.append(Landmark(name, str(p.get("label") or name), str(p.get("colour", p.get("color")) or
                                                                          palette_colour(k)),
                                   str(p.get("description") or "")))
        try:
            return cls(str(d.get("name") or ""), tuple(points), str(d.get("description") or ""))
        except GlimpseError as exc:
            raise GlimpseError(f"{source}: {exc}") from None


ISBI19 = LandmarkSet(
    "isbi19",
    tuple(Landmark(n, a, palette_colour(k)) for k, (n, a) in enumerate(zip(ISBI_LANDMARKS, ISBI_ABBREVIATIONS))),
    "The 19 cephalometric landmarks of the ISBI 2015 challenge (Wang et al. 2016), in its column order.",
)


def generic_names(k: int) -> tuple[str, ...]:
    """``L1 .. Lk``: the names of ``k`` landmarks that no set names."""
    return tuple(f"L{i + 1}" for i in range(k))


def set_for_names(names: Sequence[str]) -> LandmarkSet:
    """The set of data or a model that declares none: the ISBI 19 for their names, else an
    ``unnamed`` set of these names (labels the names, palette colours)."""
    names = tuple(names)
    if names == ISBI_LANDMARKS:
        return ISBI19
    return LandmarkSet("unnamed", tuple(Landmark(n, n, palette_colour(k)) for k, n in enumerate(names)))


def set_for_count(k: int) -> LandmarkSet:
    """The set assumed for ``k`` landmarks when nothing names them: the ISBI 19, else ``L1 .. Lk``."""
    return ISBI19 if k == len(ISBI_LANDMARKS) else set_for_names(generic_names(k))


def load_landmark_set(path: str | os.PathLike) -> LandmarkSet:
    """Read a set's JSON file (errors name the file)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise GlimpseError(f"landmark set not found: {path}") from None
    except OSError as exc:
        raise GlimpseError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise GlimpseError(f"{path}: not valid JSON ({exc})") from None
    return LandmarkSet.from_dict(d, str(path))


def save_landmark_set(lset: LandmarkSet, path: str | os.PathLike) -> None:
    """Write ``lset`` as JSON to ``path`` (atomically)."""
    path = Path(path)
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(lset.to_dict(), indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def find_landmark_set(folder: str | os.PathLike) -> LandmarkSet | None:
    """The set a data folder declares (``folder/landmarks.json``), or None."""
    path = Path(folder) / SET_FILE
    return load_landmark_set(path) if path.is_file() else None


def model_landmark_set(meta: dict, names: Sequence[str], source: str = "model") -> LandmarkSet:
    """A model's set: ``meta['landmark_set']``, else :func:`set_for_names` of its landmark names
    (the shipped model: the ISBI 19). A stored set must hold exactly those names."""
    d = meta.get("landmark_set")
    if d is None:
        return set_for_names(names)
    lset = LandmarkSet.from_dict(d, f"{source}: its landmark set")
    if lset.names != tuple(names):
        raise GlimpseError(f"{source}: its landmark set {lset.describe()} does not name its {len(names)} landmarks")
    return lset


def of_data(data: Any) -> LandmarkSet:
    """The set of a :class:`~napari_glimpse.io.Dataset`: the one it declares, else
    :func:`set_for_names` of its landmark names."""
    return data.landmark_set if data.landmark_set is not None else set_for_names(data.landmark_names)


def check_match(model: LandmarkSet, data: LandmarkSet | None, n_data: int, what: str = "the data") -> None:
    """Refuse ``model``'s set on data of another set: another number of landmarks, or (where the
    data declares a set: ``data`` not None) other names. ``what`` names the data in the error."""
    if data is not None:
        n_data = len(data)
    theirs = f"{what}'s landmark set {data.describe()}" if data is not None else (
        f"{what} ({n_data} landmarks; no {SET_FILE} beside it names them)")
    head = f"model {model.describe()} does not match {theirs}"
    if n_data != len(model):
        raise GlimpseError(f"{head}: a model finds the landmarks of its own set; use data labelled with that set, "
                           f"or train a model for this data (napari-glimpse train)")
    if data is not None and data.names != model.names:
        k = next(i for i, (a, b) in enumerate(zip(model.names, data.names)) if a != b)
        raise GlimpseError(f"{head}: landmark {k + 1} is {model.names[k]!r} in the model, {data.names[k]!r} "
                           f"in {what}")
