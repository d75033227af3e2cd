"""Clinical measurements read off the 19 ISBI 2015 landmarks, with their classes.

The eight measurements of the ISBI 2015 challenge's second task (ANB, SNB, SNA, ODI, APDI, FHI,
FMA, MW), computed as the challenge's evaluation code (``angle.py``, ported to Python 3 in
hjkwonispl/mpa ``src/evaluation.py``, class ``FacialTypeMeasurement``) computes them; see
``docs/measurements.md`` and ``../shared/docs/isbi2015-measurements.md``. Landmarks are ``(19, 2)``
x, y pixels in the ISBI order (0-based here: 0 S, 1 N, 2 Or, 3 Po, 4 A, 5 B, 6 Pog, 7 Me, 8 Gn,
9 Go, 10 LIT, 11 UIT, ..., 16 PNS, 17 ANS, 18 Ar).

* ANB = SNA - SNB, signed; SNA = angle(N->S, N->A), SNB = angle(N->S, N->B).
* ODI = angle(Me->Go, B->A) + PP-FH, where PP-FH = angle(Po->Or, PNS->ANS), negative when
  cross(Po->Or, PNS->ANS) < 0 (ANS tilted up).
* APDI = angle(Or->Po, N->Pog) + AB-FP + PP-FH, AB-FP = angle(N->Pog, A->B), negative when
  cross(N->Pog, A->B) > 0 (B behind A).
* FHI = |S-Go| / |N-Me|; "FMA" = angle(S->N, Go->Gn) (S-N vs Go-Gn, not Frankfort-mandibular).
* MW = |UIT-LIT| in mm, negative when UIT is behind LIT (x(UIT) < x(LIT) facing +x).

Angles are unsigned vector angles (0-180 degrees) unless a sign rule is given; cross products are
taken in image coordinates (y down). Values on a class boundary are normal (class 1).

Where this module departs from the challenge code, and why:

* **Facing.** The code assumes the face points to +x. Here the facing is read off the landmarks
  (N in front of S) and a patient facing -x is mirrored first, so a mirrored cephalogram gives the
  same values and classes (the cross-product signs and MW's sign would flip otherwise). On the ISBI
  images, which all face +x, this changes nothing.
* **Integer pixels.** The code casts coordinates to int (truncation) before computing anything.
  By default this module computes on the coordinates as given (a live, spacing-aware measurement
  should not move in 1-pixel steps); ``integer_pixels=True`` reproduces the cast, and the CLI's
  ``evaluate`` and ``benchmarks/measurements.py`` use it so that their agreement figures follow the
  challenge's protocol.
* **Spacing.** The code divides MW by 10 (0.1 mm per pixel); here MW is in pixels times
  ``spacing`` (default 0.1), the same on ISBI images.
* **Mean per-class recall.** mpa adds the recalls of classes 1-4 (a class missing from the truth
  counting 0) and divides by 3 for every measurement. :func:`agreement` averages the recalls of
  the classes present in the truth; the two agree whenever every class occurs in the truth (for MW:
  every class but the edge-to-edge class 2, which needs UIT == LIT exactly). mpa's number is
  reported beside it as ``mpa_score``.
* **Degenerate input** (two landmarks on top of each other, so an angle is undefined): values are
  NaN and the class is 0 ("not measurable"); the code would classify NaN as normal.

This module imports numpy only (no torch, no Qt), so the napari panel and the CLI load it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GlimpseError

MEASUREMENTS: tuple[str, ...] = ("ANB", "SNB", "SNA", "ODI", "APDI", "FHI", "FMA", "MW")

# 0-based landmark indices (ISBI order)
S, N, OR, PO, A, B, POG, ME, GN, GO, LIT, UIT = range(12)
PNS, ANS = 16, 17
N_LANDMARKS = 19


@dataclass(frozen=True)
class Norm:
    """A measurement's normal range ``[low, high]`` and the class numbers outside it."""

    name: str
    unit: str
    low: float
    high: float
    above: int  # class when value > high
    below: int  # class when value < low
    labels: dict  # class number -> meaning

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(sorted(self.labels))

    def range_text(self) -> str:
        return f"{self.low:g}–{self.high:g}{' ' + self.unit if self.unit else ''}"


NORMS: dict[str, Norm] = {n.name: n for n in (
    Norm("ANB", "°", 3.2, 5.7, 2, 3, {1: "skeletal Class I", 2: "skeletal Class II", 3: "skeletal Class III"}),
    Norm("SNB", "°", 74.6, 78.7, 3, 2, {1: "normal mandible", 2: "retrognathic mandible",
                                       3: "prognathic mandible"}),
    Norm("SNA", "°", 79.4, 83.2, 2, 3, {1: "normal maxilla", 2: "prognathic maxilla", 3: "retrognathic maxilla"}),
    Norm("ODI", "°", 68.4, 80.5, 2, 3, {1: "normal", 2: "deep-bite tendency", 3: "open-bite tendency"}),
    Norm("APDI", "°", 77.6, 85.2, 3, 2, {1: "normal", 2: "Class II tendency", 3: "Class III tendency"}),
    Norm("FHI", "", 0.65, 0.75, 2, 3, {1: "normal", 2: "short-face tendency", 3: "long-face tendency"}),
    Norm("FMA", "°", 26.8, 31.4, 2, 3, {1: "normal", 2: "high-angle tendency", 3: "low-angle tendency"}),
    Norm("MW", "mm", 2.0, 4.5, 4, 3, {1: "normal", 2: "edge-to-edge", 3: "anterior crossbite (< 2 mm)",
                                      4: "large overjet"}),
)}


def classify(name: str, value: float) -> int:
    """Class of one measurement's value: 1 normal (boundaries included), 2/3/(4) outside; 0 if NaN."""
    norm = NORMS[name]
    if np.isnan(value):
        return 0
    if norm.low <= value <= norm.high:
        return 1
    if name == "MW":  # the code's order: exactly 0 is edge-to-edge, anything else below 2 is class 3
        return 2 if value == 0 else (3 if value < norm.low else 4)
    return norm.above if value > norm.high else norm.below


def _as_batch(landmarks) -> np.ndarray:
    arr = np.asarray(landmarks, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[-2:] != (N_LANDMARKS, 2) or arr.ndim > 3:
        raise GlimpseError(f"measurements need (19, 2) or (N, 19, 2) landmarks (ISBI order), got {arr.shape}")
    return arr.reshape(-1, N_LANDMARKS, 2)


def facing_of(landmarks) -> np.ndarray:
    """``(N,)`` +1 where the patient faces +x (nasion in front of sella), -1 where they face -x."""
    c = _as_batch(landmarks)
    return np.where(c[:, N, 0] >= c[:, S, 0], 1.0, -1.0)


def _angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unsigned angle in degrees between the rows of ``u`` and ``v`` ((N, 2) each); NaN if one is 0."""
    norms = np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ij,ij->i", u, v) / norms
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]


def _canonical(landmarks, facing: str, integer_pixels: bool) -> np.ndarray:
    c = _as_batch(landmarks)
    if integer_pixels:
        c = np.trunc(c)  # the challenge code's int() cast
    if facing == "auto":
        sign = facing_of(c)
    elif facing in ("right", "left"):
        sign = np.full(len(c), 1.0 if facing == "right" else -1.0)
    else:
        raise GlimpseError(f"facing must be auto, right or left, got {facing!r}")
    c = c.copy()
    c[:, :, 0] *= sign[:, None]  # mirror the patients facing -x: every one now faces +x
    return c


def measure_batch(landmarks, spacing: "float | np.ndarray" = 0.1, *, facing: str = "auto",
                  integer_pixels: bool = False) -> np.ndarray:
    """``(N, 8)`` values in :data:`MEASUREMENTS` order from ``(N, 19, 2)`` (or ``(19, 2)``) pixels.

    ``spacing`` is in mm per pixel, one for all or ``(N,)``, one per image (MW only; the rest are
    angles and a ratio). ``facing`` is
    ``auto`` (read off the landmarks), ``right`` (+x) or ``left``. ``integer_pixels`` truncates
    the coordinates first, as the challenge's code does.
    """
    c = _canonical(landmarks, facing, integer_pixels)
    p = {k: c[:, k] for k in (S, N, OR, PO, A, B, POG, ME, GN, GO, LIT, UIT, PNS, ANS)}
    sna = _angle(p[S] - p[N], p[A] - p[N])
    snb = _angle(p[S] - p[N], p[B] - p[N])
    fh, pp = p[OR] - p[PO], p[ANS] - p[PNS]
    pp_fh = np.where(_cross(fh, pp) < 0, -1.0, 1.0) * _angle(fh, pp)
    odi = _angle(p[GO] - p[ME], p[A] - p[B]) + pp_fh
    fp, ab = p[POG] - p[N], p[B] - p[A]
    ab_fp = np.where(_cross(fp, ab) > 0, -1.0, 1.0) * _angle(fp, ab)
    apdi = _angle(-fh, fp) + ab_fp + pp_fh
    with np.errstate(invalid="ignore", divide="ignore"):
        fhi = np.linalg.norm(p[S] - p[GO], axis=-1) / np.linalg.norm(p[N] - p[ME], axis=-1)
    fma = _angle(p[N] - p[S], p[GN] - p[GO])
    mw = np.linalg.norm(p[UIT] - p[LIT], axis=-1) * np.asarray(spacing, dtype=np.float64)
    mw = np.where(p[UIT][:, 0] < p[LIT][:, 0], -mw, mw)
    return np.stack([sna - snb, snb, sna, odi, apdi, fhi, fma, mw], axis=1)


def classify_batch(values) -> np.ndarray:
    """``(N, 8)`` integer classes of ``(N, 8)`` values (see :func:`classify`)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, len(MEASUREMENTS))
    return np.array([[classify(name, x) for name, x in zip(MEASUREMENTS, row)] for row in v], dtype=int)


def measure(landmarks, spacing: float = 0.1, *, facing: str = "auto",
            integer_pixels: bool = False) -> dict[str, float]:
    """The eight values of one patient's ``(19, 2)`` landmarks, by name (see :func:`measure_batch`)."""
    if np.asarray(landmarks).ndim != 2:
        raise GlimpseError(f"measure takes one patient's (19, 2) landmarks, got {np.shape(landmarks)}")
    row = measure_batch(landmarks, spacing, facing=facing, integer_pixels=integer_pixels)[0]
    return {name: float(v) for name, v in zip(MEASUREMENTS, row)}


def measure_and_classify(landmarks, spacing: float = 0.1, **kw) -> dict[str, tuple[float, int]]:
    """``{name: (value, class)}`` for one patient's ``(19, 2)`` landmarks."""
    values = measure(landmarks, spacing, **kw)
    return {name: (v, classify(name, v)) for name, v in values.items()}


def agreement(truth, pred, classes=(1, 2, 3)) -> dict:
    """Agreement of predicted classes with true ones (1-D integer arrays of equal length).

    Returns ``mean_recall`` (mean over the classes present in ``truth`` of the per-class recall:
    the diagonal of the row-normalised confusion matrix), ``accuracy``, ``confusion`` (rows: truth,
    columns: prediction, in ``classes`` order; predictions outside ``classes`` are counted as misses
    only), ``recall`` per class (None when the class is absent from the truth), and ``mpa_score``,
    the challenge code's number (recalls summed, absent classes as 0, divided by 3).
    """
    t, p = np.asarray(truth, dtype=int).ravel(), np.asarray(pred, dtype=int).ravel()
    if t.shape != p.shape:
        raise GlimpseError(f"truth and prediction differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise GlimpseError("no classes to compare")
    idx = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), dtype=int)
    for a, b in zip(t, p):
        if a in idx and b in idx:
            conf[idx[a], idx[b]] += 1
    recall = {}
    for c in classes:
        n = int(np.sum(t == c))
        recall[c] = float(np.sum((t == c) & (p == c)) / n) if n else None
    present = [r for r in recall.values() if r is not None]
    return {
        "mean_recall": float(np.mean(present)) if present else float("nan"),
        "accuracy": float(np.mean(t == p)),
        "confusion": conf.tolist(),
        "classes": list(classes),
        "recall": {str(c): r for c, r in recall.items()},
        "support": {str(c): int(np.sum(t == c)) for c in classes},
        "mpa_score": float(sum(r or 0.0 for r in recall.values()) / 3),
    }


def agreement_table(truth_classes, pred_classes) -> dict[str, dict]:
    """:func:`agreement` per measurement for ``(N, 8)`` class arrays, plus the averages over the 8."""
    t, p = np.asarray(truth_classes), np.asarray(pred_classes)
    if t.shape != p.shape or t.ndim != 2 or t.shape[1] != len(MEASUREMENTS):
        raise GlimpseError(f"class arrays must both be (N, 8), got {t.shape} and {p.shape}")
    out = {name: agreement(t[:, j], p[:, j], NORMS[name].classes) for j, name in enumerate(MEASUREMENTS)}
    out["average"] = {key: float(np.mean([out[m][key] for m in MEASUREMENTS]))
                      for key in ("mean_recall", "accuracy", "mpa_score")}
    return out


TABLE_COLUMNS: tuple[str, ...] = ("image_path", *MEASUREMENTS, *(f"{m}_class" for m in MEASUREMENTS))
"""Columns of the CLI's measurement CSV (``napari-glimpse measure``, ``predict --measures``)."""


def _fmt(name: str, value: float) -> str:
    if np.isnan(value):
        return ""
    return f"{value:.4f}" if name == "FHI" else f"{value:.3f}"


def table_rows(names, landmarks, spacing: "float | np.ndarray" = 0.1, **kw) -> list[list[str]]:
    """Rows of :data:`TABLE_COLUMNS` for ``names`` and their ``(N, 19, 2)`` landmarks (NaN: empty
    cell); ``spacing``: one for all, or ``(N,)`` (see :func:`measure_batch`)."""
    values = measure_batch(landmarks, spacing, **kw)
    classes = classify_batch(values)
    if len(names) != len(values):
        raise GlimpseError(f"{len(names)} names for {len(values)} landmark sets")
    return [[str(n), *(_fmt(m, v) for m, v in zip(MEASUREMENTS, vals)), *(str(int(c)) for c in cls)]
            for n, vals, cls in zip(names, values, classes)]


def classification_agreement(pred_landmarks, true_landmarks, spacing: float = 0.1,
                             integer_pixels: bool = True) -> dict[str, dict]:
    """:func:`agreement_table` of the classes from ``(N, 19, 2)`` predicted and true landmarks.

    ``integer_pixels`` (default on) truncates both sets of coordinates first, as the challenge's
    evaluation code does.
    """
    pred = classify_batch(measure_batch(pred_landmarks, spacing, integer_pixels=integer_pixels))
    truth = classify_batch(measure_batch(true_landmarks, spacing, integer_pixels=integer_pixels))
    if len(pred) != len(truth):
        raise GlimpseError(f"{len(pred)} predictions for {len(truth)} ground-truth landmark sets")
    return agreement_table(truth, pred)


def format_agreement(table: dict[str, dict]) -> str:
    """A small text table of :func:`agreement_table`'s mean per-class recall and accuracy."""
    lines = ["measure  recall  accuracy"]
    for name in (*MEASUREMENTS, "average"):
        r = table[name]
        lines.append(f"{name:<8} {100 * r['mean_recall']:5.1f}%  {100 * r['accuracy']:6.1f}%")
    return "\n".join(lines)
