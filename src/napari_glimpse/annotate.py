"""Annotating from zero: a landmark set typed in, images labelled without a model, a model trained on them.

What the napari widgets "Annotate" and "Train a model" do, without Qt or napari (tested headless):

* :func:`parse_landmark_lines` / :func:`set_from_text`: a set from the text an annotator types, one
  landmark a line (``Sella, S``: a name and an optional short label).
* :func:`folder_set` / :func:`save_folder_set`: the set of an image folder, its ``landmarks.json``
  (docs/landmark-sets.md), which the export's CSV then has beside it.
* :func:`start_from_zero`: an image enters the corrections log with no point (a ``propose`` record
  of ``K`` missing points, by no model); the annotator's points are then ``add`` records, as in a
  review, and the image is accepted and exported the same way.
* :func:`next_to_place`: the landmark to place next (the keyboard's next/previous landmark).
* :func:`train_command`: the ``napari-glimpse train`` process of the "Train a model" widget.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .corrections import Correction, CorrectionLog
from .errors import GlimpseError
from .io import read_landmarks_csv
from .landmark_set import SET_FILE, Landmark, LandmarkSet, find_landmark_set, palette_colour, save_landmark_set

FROM_ZERO = None
"""The ``model`` of a from-zero image's first record: none proposed its points."""

DEFAULT_RECIPE = "default"
DEFAULT_TRAIN_MINUTES = 30.0
TRAIN_NICE = 10  # the training process's CPU priority below napari's (as the fine-tune widget's)

_LINE = re.compile(r"^\s*(?:\d+[.)]\s+)?(?P<name>[^,;\t]+?)\s*(?:[,;\t]\s*(?P<label>[^,;\t]*?)\s*)?$")


def parse_landmark_lines(text: str) -> list[tuple[str, str]]:
    """``(name, label)`` per non-empty line of ``text``: ``Sella, S`` (or ``Sella; S``, a tab) gives a
    name and a short label, ``Sella`` a name whose label is the name. A leading ``1.`` is dropped;
    lines starting with ``#`` are comments."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise GlimpseError(f"line {n}: {line.strip()!r}: expected a name, or 'name, label'")
        name = m["name"].strip()
        out.append((name, (m["label"] or "").strip() or name))
    return out


def set_from_text(name: str, text: str, description: str = "") -> LandmarkSet:
    """A set named ``name`` from the lines of ``text`` (:func:`parse_landmark_lines`), the palette's
    colours in order; checked (one-line errors: no name, no landmark, a name or label twice)."""
    rows = parse_landmark_lines(text)
    points = tuple(Landmark(n, lab, palette_colour(k)) for k, (n, lab) in enumerate(rows))
    return LandmarkSet(name.strip(), points, description.strip())


def set_to_text(lset: LandmarkSet) -> str:
    """The lines :func:`set_from_text` reads back (``name, label``; the name alone when they are equal)."""
    return "\n".join(p.name if p.label == p.name else f"{p.name}, {p.label}" for p in lset.landmarks)


def folder_set(folder: str | os.PathLike) -> LandmarkSet | None:
    """The set an image folder declares (its ``landmarks.json``), or None."""
    return find_landmark_set(folder)


def save_folder_set(lset: LandmarkSet, folder: str | os.PathLike) -> Path:
    """Write ``lset`` as the folder's ``landmarks.json``; returns the file."""
    path = Path(folder) / SET_FILE
    save_landmark_set(lset, path)
    return path


def check_log_set(log: CorrectionLog, lset: LandmarkSet) -> None:
    """Refuse annotating ``lset`` into a log that holds records of other landmarks."""
    names = log.state.landmark_names
    if names != lset.names and log.records:  # both named in full: the same names in another order differ too
        raise GlimpseError(f"{log.path} holds records of {len(names)} other landmarks ({', '.join(names)}); "
                           f"landmark set {lset.describe()} ({', '.join(lset.names)}) needs a log of its own: choose "
                           f"another log file (Review and corrections: Log file…) or another folder")


def start_from_zero(log: CorrectionLog, image: str | os.PathLike) -> Correction | None:
    """Enter ``image`` in ``log`` with no point (a proposal of ``K`` missing points, by no model), so
    that the annotator's points are logged as ``add`` records. ``None``: already in the log."""
    if log.state.has_proposal(image):
        return None
    return log.propose(image, np.full((log.state.n_landmarks, 2), np.nan), FROM_ZERO)


def is_from_zero(log: CorrectionLog | None, image: str | os.PathLike | None) -> bool:
    """Whether ``image`` was entered in the log without a model (:func:`start_from_zero`)."""
    if log is None or image is None or not log.state.has_proposal(image):
        return False
    proposed = log.state.proposed(image)
    return log.state.model(image) is None and proposed is not None and not np.isfinite(proposed).any()


def next_to_place(missing: Sequence[int], current: int | None, n_landmarks: int, step: int = 1) -> int | None:
    """The landmark to place after (``step`` 1) or before (-1) ``current``: the next one of ``missing``
    in landmark order, wrapping around; None when nothing is missing."""
    todo = sorted(set(int(k) for k in missing))
    if not todo:
        return None
    if current is None or not 0 <= current < n_landmarks:
        return todo[0] if step > 0 else todo[-1]
    for i in range(1, n_landmarks + 1):
        k = (current + step * i) % n_landmarks
        if k in todo:
            return k
    return None


def train_command(data: str | os.PathLike, out: str | os.PathLike, minutes: float, max_steps: int = 0,
                  threads: int = 1, device: str = "auto", spacing: float | None = None,
                  recipe: str = DEFAULT_RECIPE, nice: int = TRAIN_NICE) -> list[str]:
    """The arguments (after the Python executable) of a ``napari-glimpse train`` process on the labels
    CSV ``data`` (its folder's ``landmarks.json`` names the set), writing ``out``: the ``recipe``'s
    stages in ``minutes`` (they scale every stage's), each capped at ``max_steps`` steps (0: the
    recipe's), progress as JSON lines, at a lower CPU priority."""
    if minutes <= 0:
        raise GlimpseError(f"time budget {minutes} min: expected more than 0")
    args = ["-m", "napari_glimpse.cli", "train", "--data", str(data), "--out", str(out), "--recipe", recipe,
            "--time-budget", f"{minutes:g}", "--threads", str(int(threads)), "--device", device,
            "--progress-json", "--nice", str(int(nice))]
    if max_steps > 0:
        args += ["--max-steps", str(int(max_steps))]
    if spacing:
        args += ["--spacing", f"{spacing:g}"]
    return args


def labels_csv_set(csv: str | os.PathLike) -> LandmarkSet | None:
    """The set beside a labels CSV (its folder's ``landmarks.json``), or None."""
    return find_landmark_set(Path(csv).expanduser().resolve().parent)


def set_beside_labels(csv: str | os.PathLike, lset: LandmarkSet) -> LandmarkSet:
    """``lset``, to be saved beside the labels CSV ``csv`` (whose folder has no ``landmarks.json``),
    when the CSV has exactly its landmarks; a CSV of another number of landmarks is a one-line
    :class:`GlimpseError` naming both (``lset`` there would break every later load of that folder)."""
    _names, coords = read_landmarks_csv(csv)
    k = coords.shape[1]
    if k != len(lset):
        raise GlimpseError(f"{Path(csv).name} has {k} landmarks ({2 * k} coordinate columns), not the {len(lset)} of "
                           f"landmark set {lset.describe()}, and no {SET_FILE} beside it: choose the CSV of the set's "
                           f"labels (Review and corrections: Export reviewed…)")
    return lset


def csv_rows(csv: str | os.PathLike) -> int:
    """How many labelled images a Kaggle-layout CSV holds (0 when unreadable)."""
    try:
        return max(0, sum(1 for line in Path(csv).read_text().splitlines() if line.strip()) - 1)
    except (OSError, UnicodeDecodeError):
        return 0
