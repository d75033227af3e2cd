"""Calibrated confidence: per landmark, the probability that the answer lies within 2 mm of the truth.

The model's own cues about each answer (see :data:`FEATURES`: how wide and how unanimous the
fine nets' heatmaps are, how far the fine stage moved from the coarse answer, how unsure the
coarse stage was, how far the point is from where the other landmarks imply it, see
:mod:`napari_glimpse.shape`) go through a small logistic regression: a per-landmark intercept
(shrunk towards a shared one) and shared slopes, each slope constrained so that a worse cue never
raises the probability. It is fitted on **validation** images only (a model's predictions on
images it was not trained on; ISBI Test1 and Test2 ids are refused, see :func:`validation_only`)
and travels as JSON: in the model's ``meta['confidence']`` or beside the model file as
``<model stem>.confidence.json`` (the shipped model's: ``models/default.confidence.json``),
read by :meth:`GlimpseModel.load <napari_glimpse.inference.GlimpseModel.load>`.

``Trajectory.confidence`` is then this probability, and ``Trajectory.expected_misses`` (the sum
of ``1 - p``: the expected number of points beyond 2 mm) an image-level score.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .shape import ShapeModel

if TYPE_CHECKING:
    from .inference import GlimpseModel, Trajectory

FEATURES = ("log_fine_spread", "log_coarse_fine", "log_coarse_spread", "neg_log_peak", "shape_excess")
"""The cues, each oriented so that larger is worse: log of the fine stage's spread (mm: its
heatmap peaks' width and its nets' disagreement, the old confidence's ``uncertainty_mm``), log of
0.1 mm + the distance between the coarse and the final answer (mm), log of the coarse stage's
spread (mm), minus the log of the fine heatmap's peak probability, and how far the plausibility
``z`` (training sds from where the other landmarks imply the point) exceeds :data:`Z_FREE`
(capped at :data:`Z_CAP`): within a couple of sds every shape is normal, only beyond it does
distance count."""
Z_FREE = 2.0
Z_CAP = 12.0
THRESHOLD_MM = 2.0
SIDECAR_SUFFIX = ".confidence.json"
# ISBI 2015 ids that are never fitted on: Test1 (151-300) and Test2 (301-400)
HELD_OUT_IDS = range(151, 401)


def validation_only(names: Sequence[str]) -> list[str]:
    """``names`` (image file names) as a list; a :class:`ValueError` if any is an ISBI Test1 or
    Test2 image (a file stem that is a number 151-400): a calibrator is fitted on validation data only."""
    out = [str(n) for n in names]
    bad = [n for n in out if (m := re.fullmatch(r"0*(\d+)", Path(n).stem)) and int(m.group(1)) in HELD_OUT_IDS]
    if bad:
        raise ValueError(f"calibration is fitted on validation images only, not ISBI test images "
                         f"({', '.join(bad[:3])})")
    return out


@dataclass(frozen=True)
class Calibrator:
    """``p = sigmoid(intercept[k] - slopes . features)`` for landmark ``k`` (``slopes >= 0``)."""

    intercept: np.ndarray
    slopes: np.ndarray
    features: tuple[str, ...] = FEATURES
    fit_images: tuple[str, ...] = ()
    note: str = ""

    def probability(self, x: np.ndarray) -> np.ndarray:
        """``(..., K, F)`` features -> ``(..., K)`` probabilities of being within 2 mm."""
        z = self.intercept - np.asarray(x, dtype=np.float64) @ self.slopes
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def to_dict(self, digits: int = 6) -> dict:
        return {"features": list(self.features), "intercept": np.round(self.intercept, digits).tolist(),
                "slopes": np.round(self.slopes, digits).tolist(), "fit_images": list(self.fit_images),
                "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        feats = tuple(d.get("features", FEATURES))
        unknown = [f for f in feats if f not in FEATURES]
        slopes = np.asarray(d["slopes"], dtype=np.float64)
        if unknown or slopes.shape != (len(feats),):
            raise ValueError(f"calibrator features {unknown or feats} do not fit its slopes")
        return cls(np.asarray(d["intercept"], dtype=np.float64), slopes, feats, tuple(d.get("fit_images", ())),
                   str(d.get("note", "")))


def _newton(x: np.ndarray, y: np.ndarray, w: np.ndarray, penalty: np.ndarray, iters: int = 50) -> np.ndarray:
    """Penalised weighted logistic regression (design ``x``, labels ``y`` in {0, 1}): coefficients."""
    beta = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ beta, -40, 40)))
        grad = x.T @ (w * (p - y)) + penalty * beta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta


def fit_calibrator(features: np.ndarray, within: np.ndarray, fit_images: Sequence[str],
                   weights: np.ndarray | None = None, use: Sequence[str] = FEATURES,
                   shrink: float = 20.0, ridge: float = 1.0, prior: np.ndarray | None = None,
                   note: str = "") -> Calibrator:
    """Fit a :class:`Calibrator` on ``(N, K, F)`` features (:data:`FEATURES` order) of ``N``
    validation answers and ``(N, K)`` whether each was within 2 mm. ``fit_images``: the ``N``
    images' names (refused if any is an ISBI test image, see :func:`validation_only`); ``weights``
    ``(N,)`` or ``(N, K)``; ``use``: the features to fit (the others get slope 0); ``shrink``: the
    penalty pulling each landmark's intercept towards the shared one; ``ridge``: on the slopes;
    ``prior`` ``(K,)``: a per-landmark covariate (e.g. how much the doctors disagree on each
    landmark in the training labels) towards whose linear fit the intercepts are pulled instead.
    A slope that comes out of the wrong sign (a worse cue raising the probability) is set to 0
    and the rest refitted."""
    names = validation_only(fit_images)
    x = np.asarray(features, dtype=np.float64)
    n, k, f = x.shape
    if len(names) != n:
        raise ValueError(f"{n} answers but {len(names)} image names")
    wt = np.broadcast_to(np.ones((n, k)) if weights is None else np.asarray(weights, float).reshape(n, -1), (n, k))
    free = [FEATURES.index(u) for u in use]
    while True:
        onehot = np.broadcast_to(np.eye(k), (n, k, k))
        base = np.broadcast_to(np.zeros(k) if prior is None else np.asarray(prior, float), (n, k))[..., None]
        design = np.concatenate([np.ones((n, k, 1)), base, onehot, -x[..., free]], -1).reshape(n * k, -1)
        penalty = np.concatenate([[0.0, 0.0 if prior is not None else 1.0], np.full(k, shrink),
                                  np.full(len(free), ridge)])
        beta = _newton(design, np.asarray(within, float).reshape(-1), wt.reshape(-1), penalty)
        slopes = beta[2 + k:]
        if (slopes >= 0).all():
            break
        free = [j for j, s in zip(free, slopes) if s >= 0]
    full = np.zeros(f)
    full[free] = slopes
    intercept = beta[0] + beta[1] * base[0, :, 0] + beta[2:2 + k]
    return Calibrator(intercept, full, FEATURES, tuple(sorted(set(names))), note)


# ----------------------------------------------------------------------------- at inference
def features_of(final_px: np.ndarray, coarse_px: np.ndarray, fine_spread_px: np.ndarray,
                coarse_spread_px: np.ndarray, peak: np.ndarray, shape_z: np.ndarray, spacing: float) -> np.ndarray:
    """``(K, F)`` :data:`FEATURES` of one answer (positions and spreads in pixels at ``spacing`` mm)."""
    cf = np.linalg.norm(np.asarray(final_px) - np.asarray(coarse_px), axis=-1) * spacing
    return np.stack([
        np.log(np.maximum(np.asarray(fine_spread_px) * spacing, 1e-3)),
        np.log(0.1 + cf),
        np.log(np.maximum(np.asarray(coarse_spread_px) * spacing, 1e-3)),
        -np.log(np.clip(np.asarray(peak, dtype=np.float64), 1e-6, 1.0)),
        np.clip(np.asarray(shape_z, dtype=np.float64) - Z_FREE, 0.0, Z_CAP - Z_FREE),
    ], -1)


@dataclass(frozen=True)
class Confidence:
    """What a model knows about its answers' reliability: a shape model and a calibrator (either may be absent)."""

    shape: ShapeModel | None = None
    calibrator: Calibrator | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "Confidence | None":
        if not d:
            return None
        return cls(ShapeModel.from_dict(d["shape"]) if d.get("shape") else None,
                   Calibrator.from_dict(d["calibrator"]) if d.get("calibrator") else None)

    def to_dict(self) -> dict:
        return {"shape": None if self.shape is None else self.shape.to_dict(),
                "calibrator": None if self.calibrator is None else self.calibrator.to_dict()}


def sidecar_path(model_path: str | Path) -> Path:
    """The ``<stem>.confidence.json`` beside a model file."""
    p = Path(model_path)
    return p.with_name(p.stem + SIDECAR_SUFFIX)


def read_sidecar(model_path: str | Path) -> dict | None:
    """The ``<stem>.confidence.json`` beside a model file, if there is one (else ``None``)."""
    side = sidecar_path(model_path)
    return json.loads(side.read_text(encoding="utf-8")) if side.is_file() else None


def of_model(model: "GlimpseModel") -> Confidence | None:
    """The model's :class:`Confidence` (``meta['confidence']``), parsed once and cached."""
    d = model.meta.get("confidence")
    cached = model.__dict__.get("_confidence")
    if cached is not None and cached[0] is d:
        return cached[1]
    conf = Confidence.from_dict(d)
    model.__dict__["_confidence"] = (d, conf)
    return conf


def assess(model: "GlimpseModel", tr: "Trajectory", cues: dict) -> "Trajectory":
    """``tr`` (model frame: the model's pixels and spacing) with its plausibility and calibrated
    probability filled in from the stages' ``cues`` (``coarse``, ``final``: ``(K, 2)`` all
    landmarks, image frame; ``coarse_spread``, ``fine_spread`` ``(K,)`` pixels; ``peak`` ``(K,)``
    or None; ``ks`` the landmarks ``tr`` holds). Unchanged when the model has no shape model."""
    conf = of_model(model)
    if conf is None or conf.shape is None or conf.shape.n_landmarks != model.config.n_landmarks:
        return tr
    ks, s = cues["ks"], model.pixel_spacing
    final = np.asarray(cues["final"], dtype=np.float64).copy()
    final[ks] = tr.final
    mm = final * s * ([-1.0, 1.0] if tr.facing == "left" else [1.0, 1.0])  # the training facing
    chk = conf.shape.check(mm)
    implied = chk.implied * ([-1.0, 1.0] if tr.facing == "left" else [1.0, 1.0]) / s
    out = {"shape_z": chk.z[ks], "shape_mm": chk.distance_mm[ks], "implied_positions": implied[ks]}
    if cues.get("peak") is not None:
        x = features_of(final, cues["coarse"], cues["fine_spread"], cues["coarse_spread"], cues["peak"], chk.z, s)
        out["features"] = x[ks]
        if conf.calibrator is not None:
            out["probability"] = conf.calibrator.probability(x)[ks]
    return dataclasses.replace(tr, **out)
