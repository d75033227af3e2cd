"""Anatomical plausibility: where the other landmarks imply each one should be.

A shape model of the ``K`` landmarks, fitted on labelled images (the shipped one on ISBI Train
001-150's labels, the mean of both doctors): for each landmark ``k``, the other ``K - 1`` points
are aligned to their mean shape by a similarity (scale, rotation, shift) and landmark ``k``'s
aligned position is predicted from theirs by ridge regression. An answer's **plausibility** is
the distance (mm) between where the model put landmark ``k`` and where the others imply it,
and ``z``, that distance in units of the training spread (a Mahalanobis distance with the
cross-validated residual covariance). A point with ``z > z_flag`` and more than ``min_mm`` off is
flagged. The check is robust to a gross failure: the worst flagged point is replaced by its
implied position and the others checked again (a few rounds), so that one point on the wrong bone
does not make its neighbours look implausible.

Qt-free and numpy-only; positions in mm (``pixels * spacing``) in the training images' facing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# a point is flagged when it is this many training sds and this many mm from the others' implied position
Z_FLAG = 4.0
MIN_MM = 3.0
ROUNDS = 4  # outliers replaced one by one, at most this many


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``x -> s R x + t`` taking ``(N, 2)`` points ``src`` onto ``dst``
    (rotation without reflection): ``(s, R, t)``."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, sv, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag([1.0, d]) @ vt
    s = float((sv * [1.0, d]).sum() / max((a**2).sum(), 1e-12))
    return s, rot, md - s * rot @ ms


def mean_shape(shapes: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Generalised Procrustes mean of ``(N, K, 2)`` shapes, in the first shape's frame and size."""
    ref = shapes[0] - shapes[0].mean(0)
    for _ in range(rounds):
        aligned = [_apply(similarity(x, ref), x) for x in shapes]
        new = np.mean(aligned, 0)
        new = new - new.mean(0)
        new *= np.sqrt((ref**2).sum() / (new**2).sum())
        ref = _apply(similarity(new, ref), new)
    return ref


def _apply(t: tuple[float, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    s, rot, shift = t
    return s * x @ rot.T + shift


@dataclass(frozen=True)
class ShapeCheck:
    """A plausibility check of one answer (``K`` points, mm).

    ``implied`` ``(K, 2)`` where the others put each point (mm, the answer's frame); ``distance_mm``
    ``(K,)`` from the answer to it; ``z`` ``(K,)`` that distance in training sds; ``flagged``
    ``(K,)`` points far from where they should be (``z > z_flag`` and ``distance_mm > min_mm``)."""

    implied: np.ndarray
    distance_mm: np.ndarray
    z: np.ndarray
    flagged: np.ndarray


@dataclass(frozen=True)
class ShapeModel:
    """Per landmark, a prediction of its position from the others' (see the module's docstring).

    ``mean`` ``(K, 2)`` mean shape (mm); ``coef`` ``(K, 2, 2K - 1)`` each landmark's aligned x, y
    from the others' aligned coordinates (flattened, then 1); ``cov`` ``(K, 2, 2)`` the residuals'
    covariance (mm², out of fold); ``fit_images`` names what it was fitted on."""

    mean: np.ndarray
    coef: np.ndarray
    cov: np.ndarray
    fit_images: tuple[str, ...] = ()

    @property
    def n_landmarks(self) -> int:
        return self.mean.shape[0]

    def _round(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each landmark predicted from the others (their :func:`similarity` onto the mean shape,
        then ``coef``), every landmark at once: implied positions (the answer's frame), distances to
        them, and the residuals (in the mean frame) in training sds."""
        n = self.n_landmarks
        others = np.array([np.delete(np.arange(n), k) for k in range(n)])  # (K, K - 1)
        src, dst = points[others], self.mean[others]  # (K, K - 1, 2)
        ms, md = src.mean(1, keepdims=True), dst.mean(1, keepdims=True)
        a, b = src - ms, dst - md
        u, sv, vt = np.linalg.svd(np.einsum("kni,knj->kij", b, a))
        d = np.sign(np.linalg.det(u @ vt))
        d = np.where(d == 0, 1.0, d)
        flip = np.stack([np.ones(n), d], -1)  # (K, 2)
        rot = u @ (flip[:, :, None] * vt)
        scale = (sv * flip).sum(1) / np.maximum((a**2).sum((1, 2)), 1e-12)  # (K,)
        shift = md[:, 0] - scale[:, None] * np.einsum("kij,kj->ki", rot, ms[:, 0])

        def apply(x: np.ndarray) -> np.ndarray:  # (K, M, 2) through each landmark's similarity
            return scale[:, None, None] * np.einsum("kmj,kij->kmi", x, rot) + shift[:, None]

        aligned = apply(src).reshape(n, -1)
        guess = np.einsum("kij,kj->ki", self.coef, np.concatenate([aligned, np.ones((n, 1))], 1))  # (K, 2)
        implied = np.einsum("ki,kij->kj", guess - shift, rot) / scale[:, None]
        r = apply(points[:, None])[:, 0] - guess
        z = np.sqrt(np.maximum(np.einsum("ki,ki->k", r, np.linalg.solve(self.cov, r[..., None])[..., 0]), 0.0))
        return implied, np.linalg.norm(points - implied, axis=1), z

    def check(self, points_mm: np.ndarray, z_flag: float = Z_FLAG, min_mm: float = MIN_MM,
              rounds: int = ROUNDS) -> ShapeCheck:
        """Check ``(K, 2)`` points (mm, training facing). Each flagged point, worst first, is
        replaced by its implied position before the others are checked again; a replaced point
        keeps the figures of the round that flagged it."""
        pts = np.asarray(points_mm, dtype=np.float64).copy()
        if pts.shape != self.mean.shape or not np.isfinite(pts).all():
            raise ValueError(f"expected {self.mean.shape} finite points, got {pts.shape}")
        fixed = np.zeros(len(pts), bool)
        f_imp, f_dist, f_z = np.zeros_like(pts), np.zeros(len(pts)), np.zeros(len(pts))
        for _ in range(rounds + 1):
            implied, dist, z = self._round(pts)
            implied[fixed], dist[fixed], z[fixed] = f_imp[fixed], f_dist[fixed], f_z[fixed]
            bad = (z > z_flag) & (dist > min_mm) & ~fixed
            if not bad.any() or fixed.sum() >= rounds:
                break
            k = int(np.argmax(np.where(bad, z, -np.inf)))
            fixed[k] = True
            f_imp[k], f_dist[k], f_z[k] = implied[k], dist[k], z[k]
            pts[k] = implied[k]
        flagged = (z > z_flag) & (dist > min_mm)
        orig = np.asarray(points_mm, dtype=np.float64)
        return ShapeCheck(implied=implied, distance_mm=np.linalg.norm(orig - implied, axis=1), z=z, flagged=flagged)

    # ------------------------------------------------------------------------- storage
    def to_dict(self, digits: int = 5) -> dict:
        def r(a: np.ndarray) -> list:
            return np.round(np.asarray(a, dtype=np.float64), digits).tolist()

        return {"mean_mm": r(self.mean), "coef": r(self.coef), "cov_mm2": r(self.cov),
                "fit_images": list(self.fit_images)}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeModel":
        mean = np.asarray(d["mean_mm"], dtype=np.float64)
        k = mean.shape[0]
        coef = np.asarray(d["coef"], dtype=np.float64)
        cov = np.asarray(d["cov_mm2"], dtype=np.float64)
        if mean.shape != (k, 2) or coef.shape != (k, 2, 2 * k - 1) or cov.shape != (k, 2, 2):
            raise ValueError("shape model arrays do not fit together")
        return cls(mean, coef, cov, tuple(d.get("fit_images", ())))



def _aligned_pairs(shapes: np.ndarray, mean: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For every shape: the other landmarks aligned to ``mean`` (flattened) and landmark ``k``
    under the same similarity."""
    others = np.delete(np.arange(shapes.shape[1]), k)
    xs, ys = [], []
    for s in shapes:
        t = similarity(s[others], mean[others])
        xs.append(_apply(t, s[others]).reshape(-1))
        ys.append(_apply(t, s[k][None])[0])
    return np.asarray(xs), np.asarray(ys)


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """``(out, in + 1)`` ridge coefficients (the intercept, last, not penalised)."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - my))
    return np.concatenate([w.T, (my - mx @ w)[:, None]], 1)


def fit_shape_model(shapes_mm: np.ndarray, fit_images: tuple[str, ...] = (), lam: float = 100.0,
                    folds: int = 10, seed: int = 0) -> ShapeModel:
    """A :class:`ShapeModel` of ``(N, K, 2)`` labelled shapes (mm, training facing): ridge
    ``lam`` (mm²); the residual covariance from ``folds``-fold out-of-fold predictions."""
    shapes = np.asarray(shapes_mm, dtype=np.float64)
    n, k = shapes.shape[:2]
    mean = mean_shape(shapes)
    fold = np.random.default_rng(seed).permutation(n) % folds
    coef, cov = np.empty((k, 2, 2 * k - 1)), np.empty((k, 2, 2))
    for j in range(k):
        x, y = _aligned_pairs(shapes, mean, j)
        res = np.empty_like(y)
        for f in range(folds):
            w = _ridge(x[fold != f], y[fold != f], lam)
            res[fold == f] = y[fold == f] - np.c_[x[fold == f], np.ones((fold == f).sum())] @ w.T
        coef[j] = _ridge(x, y, lam)
        cov[j] = np.cov(res.T) + 1e-3 * np.eye(2)
    return ShapeModel(mean, coef, cov, tuple(fit_images))
