"""Review corrections: an append-only, crash-safe log of landmark edits and the review state.

No Qt and no napari here: the napari widget (``_widgets``) drives this module, and scripts
and tests can use it directly.

The log
-------
Every proposal, point edit, undo/redo and accept is appended at once, as one JSON line, to
``<image folder>/napari-glimpse-corrections.jsonl`` (:data:`DEFAULT_LOG_NAME`). The file is
never rewritten. A record looks like::

    {"seq": 42, "time": "2025-01-31T09:15:02.123+00:00", "image": "151.bmp", "action": "move",
     "landmark": 5, "name": "Subspinale (A point)", "old": [803.5, 1021.0], "new": [811.0, 1019.5],
     "model": "glimpse-compact-v1", "undoes": null, "redoes": null, "confidence": null,
     "names": null, "user": "alice"}

``action`` is one of ``propose`` (the model's answer for a whole image: ``new``/``old`` are
``K`` points, ``confidence`` ``K`` numbers, ``names`` the landmark names), ``move``, ``add``,
``delete`` (one landmark), ``absent`` (one landmark the annotator marks as not visible / not
present on this image: no point, and it does not block accepting; exported as empty cells),
``undo``/``redo`` (one landmark; ``undoes``/``redoes`` name the
``seq`` of the edit reverted / re-applied), ``accept``/``unaccept`` (a whole image; ``accept``
stores the accepted positions in ``new``). ``landmark`` in the file is **1-based**, as the
``1_x`` columns of the Kaggle CSV; the Python API uses **0-based** indices ``k`` throughout
(``Correction.k``, ``ReviewState.positions(image)[k]``). Missing points are ``null`` in the file
and ``NaN`` in arrays. Coordinates are ``(x, y)`` full-resolution pixels, as in :mod:`.io`.

Crash safety
------------
A record is written with a single ``os.write`` on an ``O_APPEND`` descriptor and ``fsync``-ed
before the call returns; a call that has returned (the correction is *acknowledged*) survives a
crash or ``SIGKILL`` of the process. A crash in the middle of a write can leave at most a torn
(incomplete) last line; readers ignore it, and the next append first terminates it with a
newline so the file stays a sequence of lines. Lines that do not parse are skipped (and listed
in :attr:`CorrectionLog.skipped_lines`), never fatal. Appends take an exclusive ``flock`` (where
available) and first read what other processes appended, so two viewers on one folder keep
consistent sequence numbers and states.
"""

from __future__ import annotations

import csv
import getpass
import io as _stdio
import json
import math
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import GlimpseError
from .io import Dataset, _atomic_write_text, landmark_columns
from .landmarks import ISBI_LANDMARKS, ISBI_PIXEL_SPACING_MM

try:  # POSIX advisory locking; absent on Windows (single writer assumed there)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_LOG_NAME", "DEFAULT_EXPORT_NAME", "ACTIONS", "POINT_EDITS",
    "Correction", "ReviewState", "CorrectionLog",
]

DEFAULT_LOG_NAME = "napari-glimpse-corrections.jsonl"
"""File name of the log inside an image folder."""

DEFAULT_EXPORT_NAME = "napari-glimpse-reviewed.csv"
"""File name of :meth:`CorrectionLog.export_training_csv`'s default output (in the image folder)."""

POINT_EDITS = ("move", "add", "delete", "absent")
"""Actions made by the annotator on one landmark; these are what undo/redo act on."""

ACTIONS = ("propose",) + POINT_EDITS + ("undo", "redo", "accept", "unaccept")
"""Every action a record can carry."""

_IMAGE_ACTIONS = ("propose", "accept", "unaccept")


# --------------------------------------------------------------------------- small helpers
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _default_user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return None


def _image_key(image: str | os.PathLike) -> str:
    name = Path(image).name
    if not name:
        raise GlimpseError(f"not an image file name: {image!r}")
    return name


def _point(xy: Any, what: str) -> np.ndarray:
    """A finite ``(2,)`` float array, or a clear error."""
    try:
        p = np.asarray(xy, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise GlimpseError(f"{what}: expected an (x, y) pair, got {xy!r}") from None
    if p.shape != (2,) or not np.all(np.isfinite(p)):
        raise GlimpseError(f"{what}: expected a finite (x, y) pair, got {xy!r}")
    return p


def _pt_json(p: np.ndarray | None) -> list[float] | None:
    if p is None or not np.all(np.isfinite(p)):
        return None
    return [float(p[0]), float(p[1])]


def _pts_json(a: np.ndarray | None) -> list[list[float] | None] | None:
    return None if a is None else [_pt_json(row) for row in a]


def _pt_from(v: Any) -> np.ndarray:
    if v is None:
        return np.full(2, np.nan)
    p = np.asarray(v, dtype=np.float64)
    if p.shape != (2,):
        raise ValueError(f"bad point {v!r}")
    return p


def _pts_from(v: Any) -> np.ndarray | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise ValueError("expected a list of points")
    return np.stack([_pt_from(p) for p in v]) if v else np.zeros((0, 2))


def _opt_int(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _opt_str(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


# --------------------------------------------------------------------------- records
@dataclass(frozen=True, eq=False)
class Correction:
    """One record of the log.

    Attributes
    ----------
    seq : int
        Sequence number, strictly increasing within a log (1, 2, ...).
    time : str
        ISO-8601 UTC time stamp of the append.
    image : str
        Image file name (no folder).
    action : str
        One of :data:`ACTIONS`.
    k : int or None
        **0-based** landmark index for point records (``move``/``add``/``delete``/``undo``/
        ``redo``); ``None`` for whole-image records. The file stores ``k + 1`` as ``landmark``.
    name : str or None
        Landmark name (point records).
    old, new : ndarray or None
        Position before / after: ``(2,)`` for point records, ``(K, 2)`` for ``propose`` (and
        ``new`` of ``accept``); ``NaN`` marks a missing point (``old`` of ``add``, ``new`` of
        ``delete``).
    model : str or None
        The model that proposed this image's landmarks (``None`` if the image has no proposal).
    undoes, redoes : int or None
        For ``undo`` / ``redo``: the ``seq`` of the edit reverted / re-applied.
    confidence : ndarray or None
        ``(K,)`` per-landmark confidence in ``[0, 1]`` of a ``propose`` record, if known.
    names : tuple of str or None
        Landmark names of a ``propose`` record.
    user : str or None
        Login name of whoever made the record.
    """

    seq: int
    time: str
    image: str
    action: str
    k: int | None = None
    name: str | None = None
    old: np.ndarray | None = None
    new: np.ndarray | None = None
    model: str | None = None
    undoes: int | None = None
    redoes: int | None = None
    confidence: np.ndarray | None = None
    names: tuple[str, ...] | None = None
    user: str | None = None

    @property
    def landmark(self) -> int | None:
        """1-based landmark number (as in the file and the CSV columns), or ``None``."""
        return None if self.k is None else self.k + 1

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON object written to the log."""
        point = self.action not in _IMAGE_ACTIONS
        return {
            "seq": self.seq,
            "time": self.time,
            "image": self.image,
            "action": self.action,
            "landmark": self.landmark,
            "name": self.name,
            "old": _pt_json(self.old) if point else _pts_json(self.old),
            "new": _pt_json(self.new) if point else _pts_json(self.new),
            "model": self.model,
            "undoes": self.undoes,
            "redoes": self.redoes,
            "confidence": None if self.confidence is None else [
                float(c) if math.isfinite(c) else None for c in self.confidence
            ],
            "names": None if self.names is None else list(self.names),
            "user": self.user,
        }

    def to_line(self) -> bytes:
        """The record as one UTF-8 JSON line, newline included."""
        return (json.dumps(self.to_json(), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, d: Any) -> "Correction":
        """Parse a record; raises ``ValueError`` (or ``TypeError``) if it is malformed."""
        if not isinstance(d, dict):
            raise ValueError("record is not a JSON object")
        action = d.get("action")
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        seq = _opt_int(d.get("seq"))
        image = _opt_str(d.get("image"))
        if seq is None or not image:
            raise ValueError("record lacks seq or image")
        point = action not in _IMAGE_ACTIONS
        landmark = _opt_int(d.get("landmark"))
        if point and (landmark is None or landmark < 1):
            raise ValueError("point record lacks a landmark number")
        conf = d.get("confidence")
        names = d.get("names")
        return cls(
            seq=seq,
            time=str(d.get("time") or ""),
            image=image,
            action=action,
            k=None if landmark is None else landmark - 1,
            name=_opt_str(d.get("name")),
            old=_pt_from(d.get("old")) if point else _pts_from(d.get("old")),
            new=_pt_from(d.get("new")) if point else _pts_from(d.get("new")),
            model=_opt_str(d.get("model")),
            undoes=_opt_int(d.get("undoes")),
            redoes=_opt_int(d.get("redoes")),
            confidence=None if conf is None else np.array(
                [np.nan if c is None else float(c) for c in conf], dtype=np.float64
            ),
            names=None if names is None else tuple(str(n) for n in names),
            user=_opt_str(d.get("user")),
        )


# --------------------------------------------------------------------------- state
@dataclass
class _ImageState:
    current: np.ndarray                     # (K, 2), NaN = missing
    proposed: np.ndarray | None = None      # (K, 2)
    confidence: np.ndarray | None = None    # (K,)
    model: str | None = None
    accepted: bool = False
    undo: list[int] = field(default_factory=list)   # seqs of effective edits, oldest first
    redo: list[int] = field(default_factory=list)   # seqs of undone edits, most recent last
    absent: set[int] = field(default_factory=set)   # landmarks marked absent (no point, not missing)
    n_records: int = 0


class ReviewState:
    """The state of a review, rebuilt by replaying log records in order.

    Read it through a :class:`CorrectionLog` (``log.state``); it changes only by
    :meth:`apply`, which the log calls for every record it reads or writes. All landmark
    indices ``k`` are 0-based.

    Parameters
    ----------
    landmark_names : sequence of str
        Names of the ``K`` landmarks, in column order.
    """

    def __init__(self, landmark_names: Sequence[str] = ISBI_LANDMARKS) -> None:
        self.landmark_names: tuple[str, ...] = tuple(landmark_names)
        self._images: dict[str, _ImageState] = {}
        self._edits: dict[int, Correction] = {}
        self._was_absent: dict[int, bool] = {}  # edit seq -> its landmark was absent before it
        self.last_seq: int = 0

    # ---- queries
    @property
    def n_landmarks(self) -> int:
        """Number of landmarks ``K``."""
        return len(self.landmark_names)

    def images(self) -> list[str]:
        """Image names that appear in the log, in order of first appearance."""
        return list(self._images)

    def __contains__(self, image: object) -> bool:
        return isinstance(image, (str, os.PathLike)) and _image_key(image) in self._images

    def positions(self, image: str | os.PathLike) -> np.ndarray:
        """``(K, 2)`` current positions of ``image`` (a copy); ``NaN`` rows are missing points.

        An image that is not in the log has all rows ``NaN``.
        """
        st = self._images.get(_image_key(image))
        return np.full((self.n_landmarks, 2), np.nan) if st is None else st.current.copy()

    def proposed(self, image: str | os.PathLike) -> np.ndarray | None:
        """``(K, 2)`` positions of the latest proposal for ``image`` (a copy), or ``None``."""
        st = self._images.get(_image_key(image))
        return None if st is None or st.proposed is None else st.proposed.copy()

    def has_proposal(self, image: str | os.PathLike) -> bool:
        """Whether a model has proposed landmarks for ``image``."""
        st = self._images.get(_image_key(image))
        return st is not None and st.proposed is not None

    def confidence(self, image: str | os.PathLike) -> np.ndarray | None:
        """``(K,)`` confidence of the latest proposal (a copy), or ``None`` if none was given."""
        st = self._images.get(_image_key(image))
        return None if st is None or st.confidence is None else st.confidence.copy()

    def model(self, image: str | os.PathLike) -> str | None:
        """Name of the model whose proposal ``image`` currently starts from, or ``None``."""
        st = self._images.get(_image_key(image))
        return None if st is None else st.model

    def missing(self, image: str | os.PathLike) -> list[int]:
        """0-based indices of the landmarks ``image`` currently lacks (deleted or never placed).

        Landmarks marked :meth:`absent` are not missing: they have no point on purpose.
        """
        gone = set(self.absent(image))
        return [int(k) for k in np.nonzero(~np.isfinite(self.positions(image)).all(axis=1))[0] if int(k) not in gone]

    def absent(self, image: str | os.PathLike) -> list[int]:
        """0-based indices of the landmarks marked absent (not visible) on ``image``, sorted."""
        st = self._images.get(_image_key(image))
        return [] if st is None else sorted(st.absent)

    def is_accepted(self, image: str | os.PathLike) -> bool:
        """Whether ``image`` is currently marked reviewed."""
        st = self._images.get(_image_key(image))
        return st is not None and st.accepted

    def accepted(self) -> list[str]:
        """Names of the accepted (reviewed) images, sorted."""
        return sorted(n for n, st in self._images.items() if st.accepted)

    def corrected(self, image: str | os.PathLike) -> list[int]:
        """0-based indices of landmarks with an effective (not undone) edit by the user, sorted."""
        st = self._images.get(_image_key(image))
        if st is None:
            return []
        return sorted({self._edits[s].k for s in st.undo if self._edits[s].k is not None})  # type: ignore[misc]

    def can_undo(self, image: str | os.PathLike) -> bool:
        """Whether :meth:`CorrectionLog.undo` would revert something on ``image``."""
        st = self._images.get(_image_key(image))
        return st is not None and bool(st.undo)

    def can_redo(self, image: str | os.PathLike) -> bool:
        """Whether :meth:`CorrectionLog.redo` would re-apply something on ``image``."""
        st = self._images.get(_image_key(image))
        return st is not None and bool(st.redo)

    def undo_target(self, image: str | os.PathLike) -> Correction | None:
        """The edit the next undo on ``image`` reverts, or ``None``."""
        st = self._images.get(_image_key(image))
        return self._edits[st.undo[-1]] if st is not None and st.undo else None

    def redo_target(self, image: str | os.PathLike) -> Correction | None:
        """The edit the next redo on ``image`` re-applies, or ``None``."""
        st = self._images.get(_image_key(image))
        return self._edits[st.redo[-1]] if st is not None and st.redo else None

    # ---- the review queue
    def _order(self, image: str | os.PathLike) -> list[int]:
        """All landmarks, least confident first (ties and unknown confidence by index)."""
        conf = self.confidence(image)
        ks = list(range(self.n_landmarks))
        if conf is None:
            return ks
        key = np.where(np.isfinite(conf), conf, np.inf)
        return sorted(ks, key=lambda k: (float(key[k]), k))

    def review_queue(self, image: str | os.PathLike) -> list[int]:
        """0-based landmarks of ``image`` still to review, least confident first.

        Landmarks the user has already corrected (an effective move, add or delete) and
        landmarks without a position are left out. Without confidences the order is the
        landmark order.
        """
        done = set(self.corrected(image)) | set(self.missing(image)) | set(self.absent(image))
        return [k for k in self._order(image) if k not in done]

    def next_to_review(self, image: str | os.PathLike, after: int | None = None) -> int | None:
        """The landmark to jump to next on ``image`` (0-based), or ``None`` when none is left.

        Parameters
        ----------
        image : str or path
            The image.
        after : int, optional
            The landmark just looked at. The answer is then the next uncorrected landmark
            *after it* in least-to-most-confident order, so a landmark the annotator judged
            fine (and did not move) is skipped; without it, the least confident uncorrected one.
        """
        queue = self.review_queue(image)
        if after is None or not queue:
            return queue[0] if queue else None
        order = self._order(image)
        if not 0 <= after < self.n_landmarks:
            raise GlimpseError(f"landmark index {after} out of range 0..{self.n_landmarks - 1}")
        rank = {k: i for i, k in enumerate(order)}
        later = [k for k in queue if rank[k] > rank[after]]
        return later[0] if later else None

    def global_queue(self, include_accepted: bool = False) -> list[tuple[str, int]]:
        """``(image, k)`` pairs still to review over all images, least confident first.

        Images without confidences come last, in landmark order. Accepted images are left
        out unless ``include_accepted``.
        """
        items: list[tuple[float, str, int]] = []
        for name, st in self._images.items():
            if st.accepted and not include_accepted:
                continue
            for k in self.review_queue(name):
                c = np.inf if st.confidence is None or not np.isfinite(st.confidence[k]) else float(st.confidence[k])
                items.append((c, name, k))
        items.sort(key=lambda t: (t[0], t[1], t[2]))
        return [(n, k) for _, n, k in items]

    # ---- replay
    def _image(self, name: str) -> _ImageState:
        st = self._images.get(name)
        if st is None:
            st = self._images[name] = _ImageState(np.full((self.n_landmarks, 2), np.nan))
        return st

    def check(self, rec: Correction) -> str | None:
        """Why ``rec`` cannot be applied to this state (a short reason), or ``None`` if it can."""
        K = self.n_landmarks
        if rec.k is not None and not 0 <= rec.k < K:
            return f"landmark {rec.k + 1} out of range 1..{K}"
        if rec.action == "propose":
            if rec.new is None or rec.new.shape != (K, 2):
                return f"proposal must have {K} points"
            if rec.confidence is not None and rec.confidence.shape != (K,):
                return f"proposal must have {K} confidences"
        elif rec.action in POINT_EDITS + ("undo", "redo"):
            if rec.new is None:
                return "point record lacks new position"
            if rec.action == "undo" and rec.undoes is None:
                return "undo record lacks undoes"
            if rec.action == "redo" and rec.redoes is None:
                return "redo record lacks redoes"
        return None

    def apply(self, rec: Correction) -> bool:
        """Apply one record; returns ``False`` (state unchanged) if it cannot apply."""
        if self.check(rec) is not None:
            return False
        st = self._image(rec.image)
        st.n_records += 1
        self.last_seq = max(self.last_seq, rec.seq)
        a = rec.action
        if a == "propose":
            assert rec.new is not None
            st.proposed = rec.new.copy()
            st.current = rec.new.copy()
            st.confidence = None if rec.confidence is None else rec.confidence.copy()
            st.model = rec.model
            st.accepted = False
            st.undo.clear()
            st.redo.clear()
            st.absent.clear()
        elif a in POINT_EDITS:
            assert rec.k is not None and rec.new is not None
            st.current[rec.k] = rec.new
            self._edits[rec.seq] = rec
            self._was_absent[rec.seq] = rec.k in st.absent
            _set_absent(st, rec.k, a == "absent")
            st.undo.append(rec.seq)
            st.redo.clear()
        elif a == "undo":
            assert rec.k is not None and rec.new is not None and rec.undoes is not None
            st.current[rec.k] = rec.new
            _set_absent(st, rec.k, self._was_absent.get(rec.undoes, False))
            if rec.undoes in st.undo:
                st.undo.remove(rec.undoes)
                if rec.undoes in self._edits:
                    st.redo.append(rec.undoes)
        elif a == "redo":
            assert rec.k is not None and rec.new is not None and rec.redoes is not None
            st.current[rec.k] = rec.new
            redone = self._edits.get(rec.redoes)
            _set_absent(st, rec.k, redone is not None and redone.action == "absent")
            if rec.redoes in st.redo:
                st.redo.remove(rec.redoes)
                st.undo.append(rec.redoes)
        elif a == "accept":
            st.accepted = True
        elif a == "unaccept":
            st.accepted = False
        return True


def _set_absent(st: _ImageState, k: int, absent: bool) -> None:
    if absent:
        st.absent.add(k)
    else:
        st.absent.discard(k)


# --------------------------------------------------------------------------- the log
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _pread(fd: int, n: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.read(fd, n)  # pragma: no cover


class CorrectionLog:
    """The corrections log of one image folder, and the review state it records.

    Opening reads (replays) the existing log; the file itself is created by the first
    append. Mutating methods append one record, ``fsync`` it and only then return it: a
    returned :class:`Correction` is on disk. Queries go through :attr:`state`.

    Parameters
    ----------
    path : str or path
        The image folder (the log is ``<folder>/napari-glimpse-corrections.jsonl``) or the log
        file itself (any name ending in ``.jsonl``, or an existing file).
    landmark_names : sequence of str, optional
        Names of the landmarks. Default: those stored with the log's proposals, else the 19
        ISBI landmarks. Raises :class:`GlimpseError` if they disagree with the log.
    image_dir : str or path, optional
        Where the images are; default the log's folder. Used by the export.
    user : str, optional
        Recorded in every record; default the login name.

    Raises
    ------
    GlimpseError
        If the log cannot be read, or its proposals have another number of landmarks or other
        landmark names (a log is read only under the names it was written with).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        landmark_names: Sequence[str] | None = None,
        image_dir: str | os.PathLike | None = None,
        user: str | None = None,
    ) -> None:
        p = Path(path)
        if p.is_dir() or (not p.exists() and p.suffix.lower() != ".jsonl"):
            p = p / DEFAULT_LOG_NAME
        self.path: Path = p
        self.image_dir: Path = Path(image_dir) if image_dir is not None else p.parent
        self.user: str | None = user if user is not None else _default_user()
        self.records: list[Correction] = []
        """Every record applied so far, in file order."""
        self.skipped_lines: list[int] = []
        """1-based line numbers of lines that could not be parsed or applied (e.g. a torn record)."""
        self._offset = 0        # bytes of the file consumed (whole lines only)
        self._lineno = 0        # lines consumed
        self._lock = threading.RLock()
        names = tuple(landmark_names) if landmark_names is not None else self._names_in_log()
        self.state: ReviewState = ReviewState(names if names else ISBI_LANDMARKS)
        self.refresh()

    def __repr__(self) -> str:
        return (f"CorrectionLog({str(self.path)!r}, {len(self.records)} records, "
                f"{len(self.state.images())} images, {len(self.state.accepted())} accepted)")

    # ---- reading
    def _names_in_log(self) -> tuple[str, ...] | None:
        """Landmark names stored with the first readable proposal, if any."""
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break
                    try:
                        d = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(d, dict) and d.get("action") == "propose":
                        if isinstance(d.get("names"), list) and d["names"]:
                            return tuple(str(n) for n in d["names"])
                        if isinstance(d.get("new"), list) and d["new"]:
                            n = len(d["new"])
                            return ISBI_LANDMARKS if n == len(ISBI_LANDMARKS) else tuple(f"L{i + 1}" for i in range(n))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise GlimpseError(f"cannot read corrections log {self.path}: {exc}") from None
        return None

    def _consume(self, data: bytes) -> None:
        """Parse and apply the complete lines of ``data`` (which starts at ``self._offset``)."""
        end = data.rfind(b"\n")
        if end < 0:
            return
        K = self.state.n_landmarks
        for line in data[: end + 1].split(b"\n")[:-1]:
            self._lineno += 1
            if not line.strip():
                continue
            try:
                rec = Correction.from_json(json.loads(line.decode("utf-8")))
            except (ValueError, TypeError, UnicodeDecodeError):
                self.skipped_lines.append(self._lineno)
                continue
            if rec.action == "propose" and rec.new is not None and rec.new.shape[0] != K:
                raise GlimpseError(
                    f"{self.path}:{self._lineno}: a proposal for {rec.image} has {rec.new.shape[0]} "
                    f"landmarks, this log was opened for {K}; pass the matching landmark_names"
                )
            if rec.action == "propose" and rec.names is not None and tuple(rec.names) != self.state.landmark_names:
                # same count, other names (or order): read under these, a point would be another landmark
                raise GlimpseError(
                    f"{self.path}:{self._lineno}: the proposal for {rec.image} was logged for landmarks "
                    f"({', '.join(rec.names)}), this log was opened for ({', '.join(self.state.landmark_names)}); "
                    f"open it with its own landmark names (or choose another log for the other set)"
                )
            if self.state.apply(rec):
                self.records.append(rec)
            else:
                self.skipped_lines.append(self._lineno)
        self._offset += end + 1

    def _read_tail(self, fd: int | None = None) -> None:
        if fd is None:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            except OSError as exc:
                raise GlimpseError(f"cannot read corrections log {self.path}: {exc}") from None
        else:
            size = os.fstat(fd).st_size
            if size <= self._offset:
                return
            data = _pread(fd, size - self._offset, self._offset)
        self._consume(data)

    def refresh(self) -> None:
        """Read records appended since the last read (e.g. by another viewer on the same folder)."""
        with self._lock:
            self._read_tail()

    # ---- writing
    def _append(self, build: Callable[[ReviewState, int], Correction]) -> Correction:
        """Lock, catch up, build the record from the up-to-date state, write, fsync, apply."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
            except OSError as exc:
                raise GlimpseError(f"cannot open corrections log {self.path} for writing: {exc}") from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if created:
                    _fsync_dir(self.path.parent)
                self._read_tail(fd)
                rec = build(self.state, self.state.last_seq + 1)
                reason = self.state.check(rec)
                if reason is not None:  # a bug in the builder, not user input
                    raise GlimpseError(f"refusing to log an invalid record: {reason}")
                data = rec.to_line()
                size = os.fstat(fd).st_size
                if size > 0 and _pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # terminate a torn last line left by a crash
                try:
                    n = os.write(fd, data)
                    while n < len(data):  # short write (rare): finish it, still under the lock
                        n += os.write(fd, data[n:])
                    os.fsync(fd)
                except OSError as exc:
                    raise GlimpseError(f"cannot write corrections log {self.path}: {exc}") from None
                before = len(self.records)
                self._read_tail(fd)
                if len(self.records) == before or self.records[-1].seq != rec.seq:
                    raise GlimpseError(f"corrections log {self.path} did not read back record {rec.seq}")
                return self.records[-1]
            finally:
                os.close(fd)  # also releases the flock

    def _base(self, image: str, action: str, seq: int, state: ReviewState, **kw: Any) -> Correction:
        return Correction(seq=seq, time=_now(), image=image, action=action,
                          model=state.model(image), user=self.user, **kw)

    def _k(self, k: int) -> int:
        K = self.state.n_landmarks
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) < K:
            raise GlimpseError(f"landmark index {k!r} out of range 0..{K - 1} (indices are 0-based)")
        return int(k)

    def propose(
        self,
        image: str | os.PathLike,
        positions: np.ndarray,
        model: str | None,
        confidence: np.ndarray | None = None,
    ) -> Correction:
        """Record a model's proposal for ``image``: all ``K`` landmarks in one record.

        The image's current positions become the proposal; its undo/redo history is cleared
        and it is no longer accepted (a proposal starts the review of the image afresh). Call
        it once when an image is first opened (see :meth:`ReviewState.has_proposal`) or when the
        annotator asks for a new prediction.

        Parameters
        ----------
        image : str or path
            The image (only its file name is stored).
        positions : (K, 2) array
            Proposed ``(x, y)`` positions (``NaN`` rows allowed for landmarks not proposed).
        model : str or None
            Name of the proposing model (e.g. the checkpoint file name).
        confidence : (K,) array, optional
            Per-landmark confidence in ``[0, 1]`` (``Trajectory.confidence``); drives the review
            queue.
        """
        name = _image_key(image)
        K = self.state.n_landmarks
        pos = np.asarray(positions, dtype=np.float64)
        if pos.shape != (K, 2):
            raise GlimpseError(f"proposal for {name}: expected ({K}, 2) positions, got {pos.shape}")
        conf = None
        if confidence is not None:
            conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
            if conf.shape != (K,):
                raise GlimpseError(f"proposal for {name}: expected {K} confidences, got {conf.shape[0]}")

        def build(state: ReviewState, seq: int) -> Correction:
            old = state.positions(name) if name in state else None
            return Correction(seq=seq, time=_now(), image=name, action="propose", old=old,
                              new=pos.copy(), model=model, confidence=conf,
                              names=state.landmark_names, user=self.user)

        return self._append(build)

    def move(self, image: str | os.PathLike, k: int, xy: Sequence[float] | np.ndarray) -> Correction:
        """Record that landmark ``k`` (0-based) of ``image`` was dragged to ``xy``.

        Raises :class:`GlimpseError` if the landmark has no position (use :meth:`add`).
        """
        name, k, new = _image_key(image), self._k(k), _point(xy, "move")

        def build(state: ReviewState, seq: int) -> Correction:
            old = state.positions(name)[k]
            if not np.all(np.isfinite(old)):
                raise GlimpseError(f"{name}: landmark {k + 1} ({state.landmark_names[k]}) has no point to move; add it")
            return self._base(name, "move", seq, state, k=k, name=state.landmark_names[k], old=old, new=new)

        return self._append(build)

    def add(self, image: str | os.PathLike, k: int, xy: Sequence[float] | np.ndarray) -> Correction:
        """Record that landmark ``k`` (0-based) of ``image`` was placed at ``xy``.

        Raises :class:`GlimpseError` if the landmark already has a position (use :meth:`move`).
        """
        name, k, new = _image_key(image), self._k(k), _point(xy, "add")

        def build(state: ReviewState, seq: int) -> Correction:
            old = state.positions(name)[k]
            if np.all(np.isfinite(old)):
                raise GlimpseError(f"{name}: landmark {k + 1} ({state.landmark_names[k]}) is already placed; move it")
            return self._base(name, "add", seq, state, k=k, name=state.landmark_names[k],
                              old=np.full(2, np.nan), new=new)

        return self._append(build)

    def delete(self, image: str | os.PathLike, k: int) -> Correction:
        """Record that landmark ``k`` (0-based) of ``image`` was deleted.

        Raises :class:`GlimpseError` if the landmark has no position.
        """
        name, k = _image_key(image), self._k(k)

        def build(state: ReviewState, seq: int) -> Correction:
            old = state.positions(name)[k]
            if not np.all(np.isfinite(old)):
                raise GlimpseError(f"{name}: landmark {k + 1} ({state.landmark_names[k]}) has no point to delete")
            return self._base(name, "delete", seq, state, k=k, name=state.landmark_names[k],
                              old=old, new=np.full(2, np.nan))

        return self._append(build)

    def mark_absent(self, image: str | os.PathLike, k: int) -> Correction | None:
        """Record that landmark ``k`` (0-based) is absent (not visible) on ``image``.

        Its point, if any, goes; the image can still be accepted, and the export leaves the
        landmark's cells empty (training reads them as missing). Undo restores the point.
        Returns ``None`` (nothing logged) if it is already marked absent.
        """
        name, k = _image_key(image), self._k(k)

        def build(state: ReviewState, seq: int) -> Correction:
            if k in state.absent(name):
                raise _Nothing
            return self._base(name, "absent", seq, state, k=k, name=state.landmark_names[k],
                              old=state.positions(name)[k], new=np.full(2, np.nan))

        try:
            return self._append(build)
        except _Nothing:
            return None

    def set_point(self, image: str | os.PathLike, k: int, xy: Sequence[float] | np.ndarray | None) -> Correction | None:
        """Move, add or delete landmark ``k`` (0-based) as needed so it ends at ``xy``.

        ``xy=None`` (or NaN) deletes. Returns ``None`` (nothing logged) if nothing changes.
        """
        k = self._k(k)
        cur = self.state.positions(image)[k]
        gone = xy is None or not np.all(np.isfinite(np.asarray(xy, dtype=np.float64)))
        if gone:
            return self.delete(image, k) if np.all(np.isfinite(cur)) else None
        if not np.all(np.isfinite(cur)):
            return self.add(image, k, xy)  # type: ignore[arg-type]
        if np.array_equal(_point(xy, "set_point"), cur):
            return None
        return self.move(image, k, xy)  # type: ignore[arg-type]

    def sync(self, image: str | os.PathLike, positions: np.ndarray, tol: float = 1e-6) -> list[Correction]:
        """Log the differences between ``positions`` and the current state of ``image``.

        Convenient for a viewer that only sees the layer's new ``(K, 2)`` data: each landmark
        that moved by more than ``tol`` pixels, appeared or disappeared (``NaN`` row) gets one
        record (in landmark order); unchanged landmarks none.
        """
        pos = np.asarray(positions, dtype=np.float64)
        K = self.state.n_landmarks
        if pos.shape != (K, 2):
            raise GlimpseError(f"expected ({K}, 2) positions, got {pos.shape}")
        out: list[Correction] = []
        cur = self.state.positions(image)
        for k in range(K):
            a_ok, b_ok = bool(np.all(np.isfinite(cur[k]))), bool(np.all(np.isfinite(pos[k])))
            if a_ok and b_ok and np.max(np.abs(cur[k] - pos[k])) <= tol:
                continue
            if a_ok or b_ok:
                rec = self.set_point(image, k, pos[k] if b_ok else None)
                if rec is not None:
                    out.append(rec)
        return out

    def undo(self, image: str | os.PathLike) -> Correction | None:
        """Revert the latest effective move/add/delete on ``image``; ``None`` if there is none.

        The undo is itself a record (``undoes`` = the reverted edit's ``seq``); the undo and
        redo stacks are rebuilt by replay, so they survive closing and reopening the log.
        """
        return self._step_history(image, "undo")

    def redo(self, image: str | os.PathLike) -> Correction | None:
        """Re-apply the latest undone edit on ``image``; ``None`` if there is none.

        Any new move/add/delete (or proposal) on the image clears what can be redone.
        """
        return self._step_history(image, "redo")

    def _step_history(self, image: str | os.PathLike, action: str) -> Correction | None:
        """Append an ``undo`` (back to the target's ``old``) or ``redo`` (to its ``new``)."""
        name = _image_key(image)
        undo = action == "undo"

        def build(state: ReviewState, seq: int) -> Correction:
            t = state.undo_target(name) if undo else state.redo_target(name)
            if t is None:
                raise _Nothing
            assert t.k is not None
            link = {"undoes": t.seq} if undo else {"redoes": t.seq}
            return self._base(name, action, seq, state, k=t.k, name=t.name,
                              old=state.positions(name)[t.k], new=t.old if undo else t.new, **link)

        try:
            return self._append(build)
        except _Nothing:
            return None

    def accept(self, image: str | os.PathLike, allow_missing: bool = False) -> Correction:
        """Mark ``image`` reviewed; the record stores the accepted positions.

        Later edits keep the image accepted (the export uses the positions current at export
        time); :meth:`propose` or :meth:`unaccept` clear it.

        Raises
        ------
        GlimpseError
            If the image has no landmarks in the log, or (unless ``allow_missing``) lacks some;
            an accepted image with missing landmarks cannot be exported.
        """
        name = _image_key(image)

        def build(state: ReviewState, seq: int) -> Correction:
            pos = state.positions(name)
            miss = state.missing(name)
            if len(miss) == state.n_landmarks:
                raise GlimpseError(f"{name}: no landmarks to accept")
            if miss and not allow_missing:
                raise GlimpseError(
                    f"{name}: cannot accept, landmark {miss[0] + 1} ({state.landmark_names[miss[0]]})"
                    + (f" and {len(miss) - 1} more are" if len(miss) > 1 else " is") + " missing"
                )
            return self._base(name, "accept", seq, state, new=pos)

        return self._append(build)

    def unaccept(self, image: str | os.PathLike) -> Correction | None:
        """Mark ``image`` not reviewed; ``None`` (nothing logged) if it was not accepted."""
        name = _image_key(image)

        def build(state: ReviewState, seq: int) -> Correction:
            if not state.is_accepted(name):
                raise _Nothing
            return self._base(name, "unaccept", seq, state)

        try:
            return self._append(build)
        except _Nothing:
            return None

    # ---- export
    def _reviewed(self, images: Iterable[str | os.PathLike] | None) -> tuple[list[str], np.ndarray]:
        st = self.state
        if images is None:
            names = st.accepted()
            if not names:
                raise GlimpseError(f"no accepted images in {self.path}: nothing to export")
        else:
            names = [_image_key(i) for i in images]
            if not names:
                raise GlimpseError("no images given to export")
            bad = [n for n in names if not st.is_accepted(n)]
            if bad:
                raise GlimpseError(f"{bad[0]} is not accepted (reviewed); only accepted images are exported")
        coords = np.stack([st.positions(n) for n in names])
        for n in names:
            miss = st.missing(n)
            if miss:
                k = int(miss[0])
                raise GlimpseError(
                    f"{n}: landmark {k + 1} ({st.landmark_names[k]}) is missing (deleted) in an accepted "
                    f"image; add it or unaccept the image before exporting"
                )
        return names, coords

    def _image_path(self, name: str) -> Path:
        for cand in (self.image_dir / name, self.image_dir / "images" / name):
            if cand.exists():
                return cand
        raise GlimpseError(f"image {name} of the corrections log is not in {self.image_dir}")

    def export_training_csv(
        self,
        path: str | os.PathLike | None = None,
        images: Iterable[str | os.PathLike] | None = None,
        decimals: int = 2,
    ) -> Path:
        """Write the reviewed labels as a training set in the Kaggle CSV layout, atomically.

        The CSV (``image_path,1_x,1_y,...,K_x,K_y``) loads with
        ``napari_glimpse.io.load_dataset(csv)`` and trains with
        ``napari-glimpse train --data <csv>``. ``load_dataset`` looks an ``image_path`` up
        relative to the CSV's folder (and its ``images/`` subfolder), so the column holds the
        bare file name when the images are there, and otherwise their path relative to the
        CSV's folder (absolute if there is none).

        Parameters
        ----------
        path : str or path, optional
            Output file; default ``<image folder>/napari-glimpse-reviewed.csv``.
        images : iterable of str or path, optional
            Images to export (each must be accepted); default every accepted image, sorted by name.
        decimals : int
            Decimals of the coordinates.

        Returns
        -------
        Path
            The file written.

        Raises
        ------
        GlimpseError
            If there is nothing accepted to export, an image given is not accepted, an accepted
            image lacks a landmark (naming the image and the landmark), or an image file is not
            found.
        """
        with self._lock:
            self._read_tail()
            out = Path(path) if path is not None else self.image_dir / DEFAULT_EXPORT_NAME
            names, coords = self._reviewed(images)
            csv_dir = out.parent.resolve() if out.parent.exists() else Path(os.path.abspath(out.parent))
            buf = _stdio.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(landmark_columns(coords.shape[1]))
            for n, c in zip(names, coords):
                img = self._image_path(n).resolve()
                if img.parent in (csv_dir, csv_dir / "images"):
                    col = img.name
                else:
                    try:
                        col = Path(os.path.relpath(img, csv_dir)).as_posix()
                    except ValueError:  # pragma: no cover - other drive on Windows
                        col = str(img)
                w.writerow([col] + ["" if not math.isfinite(v) else f"{v:.{decimals}f}" for v in c.reshape(-1)])
            _atomic_write_text(out, buf.getvalue())
            return out

    def reviewed_dataset(
        self, images: Iterable[str | os.PathLike] | None = None, pixel_spacing: float = ISBI_PIXEL_SPACING_MM
    ) -> Dataset:
        """The reviewed labels as an in-memory :class:`~napari_glimpse.io.Dataset` (annotator ``reviewed``).

        Same selection and checks as :meth:`export_training_csv`.
        """
        with self._lock:
            self._read_tail()
            names, coords = self._reviewed(images)
            paths = [self._image_path(n) for n in names]
            return Dataset(paths, {"reviewed": coords}, self.state.landmark_names, pixel_spacing)


class _Nothing(Exception):
    """Internal: the requested undo/redo/unaccept has nothing to act on."""
