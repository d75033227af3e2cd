"""A shape prior after the fine stage, chosen on validation (run 37): the model's answers on
Train 131-150, then the posterior mean of a Gaussian shape model fit to Train 001-130
(:class:`ShapePrior`) for each noise scale, written as JSON.

    python benchmarks/shape_prior.py --model benchmarks/models/validated_run32.pt \
        --scales 0.25 0.5 1 2 4 --out benchmarks/results/run37_shape_prior.json

The model reads each image once (its own choice: flip averaging, fine nets, windows); its
answer without the prior is the baseline (scale ``inf``). Test1 is not read.

Each landmark's position is read from its own windows, which know nothing of the other
landmarks. :class:`ShapePrior` is fit to the training images' points (aligned to their mean by
similarity transforms); :meth:`ShapePrior.apply` then treats a model's answer as a noisy
observation of a shape drawn from that Gaussian, each landmark's noise as large as its reported
spread (times a noise scale), and returns the posterior mean. Run 37 found every scale worse
than none, so the prior stays here, not in the package.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isbi import DEFAULT_DATA, N_TRAIN, ready, write_json  # noqa: E402


def similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None
               ) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity transform (scale ``s``, rotation ``r``, shift ``t``; no reflection) that
    maps the ``(K, 2)`` points ``src`` onto ``dst`` in weighted least squares: ``s * src @ r.T + t``."""
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    a, b = src - ms, dst - md
    h = a.T @ (b * w[:, None])  # (2, 2) weighted cross-covariance
    u, sv, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, d]) @ u.T
    var = float(w @ (a**2).sum(1))
    s = float((sv * [1.0, d]).sum() / var) if var > 0 else 1.0
    return s, r, md - s * ms @ r.T


def _apply(s: float, r: np.ndarray, t: np.ndarray, p: np.ndarray) -> np.ndarray:
    return s * p @ r.T + t


def _invert(s: float, r: np.ndarray, t: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (q - t) @ r / s


@dataclass(frozen=True)
class ShapePrior:
    """The mean ``(K, 2)`` (pixels) and covariance ``(2K, 2K)`` (x, y of each landmark in turn)
    of aligned training shapes; ``n_shapes`` of them."""

    mean: np.ndarray
    cov: np.ndarray
    n_shapes: int

    @classmethod
    def fit(cls, shapes: np.ndarray, rounds: int = 10, shrink: float = 0.1) -> "ShapePrior":
        """Generalised Procrustes alignment of ``(N, K, 2)`` shapes (``rounds`` rounds; the mean
        keeps the first shape's size), then their mean and covariance, shrunk toward its
        diagonal by ``shrink`` (``(1 - shrink) S + shrink diag(S)``: fewer shapes than numbers
        need it)."""
        shapes = np.asarray(shapes, dtype=np.float64)
        if shapes.ndim != 3 or shapes.shape[2] != 2:
            raise ValueError(f"shapes must be (N, K, 2), not {shapes.shape}")
        if not np.isfinite(shapes).all():
            raise ValueError("every training shape needs every landmark (found missing or non-finite points)")
        n, k = shapes.shape[:2]
        if n < 2 or k < 3:
            raise ValueError(f"a shape prior needs at least 2 shapes of 3 landmarks, not {n} of {k}")
        if not 0.0 <= shrink <= 1.0:
            raise ValueError(f"shrink must lie between 0 and 1, not {shrink}")
        mean = shapes[0] - shapes[0].mean(0)
        size = np.sqrt((mean**2).sum())
        for _ in range(rounds):
            aligned = np.stack([_apply(*similarity(x, mean), x) for x in shapes])
            new = aligned.mean(0)
            new = new - new.mean(0)
            mean = new * size / np.sqrt((new**2).sum())
        aligned = np.stack([_apply(*similarity(x, mean), x) for x in shapes])
        flat = aligned.reshape(n, 2 * k)
        cov = np.cov(flat, rowvar=False)
        cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov))
        return cls(mean=flat.mean(0).reshape(k, 2), cov=cov, n_shapes=n)

    def apply(self, points: np.ndarray, spread: np.ndarray, noise_scale: float) -> np.ndarray:
        """The posterior mean shape given ``(K, 2)`` answered ``points`` whose noise is
        ``noise_scale`` times ``spread`` (``(K,)`` pixels) per coordinate; ``noise_scale`` = inf
        gives the points back."""
        points = np.asarray(points, dtype=np.float64)
        k = len(self.mean)
        if points.shape != (k, 2) or np.shape(spread) != (k,):
            raise ValueError(f"a shape prior of {k} landmarks needs ({k}, 2) points and ({k},) spreads, "
                               f"not {points.shape} and {np.shape(spread)}")
        if not noise_scale > 0:
            raise ValueError(f"the noise scale must be positive, not {noise_scale}")
        if np.isinf(noise_scale):
            return points.copy()
        sd = np.maximum(np.asarray(spread, dtype=np.float64), 1e-3)
        s, r, t = similarity(points, self.mean, 1.0 / sd**2)
        p = _apply(s, r, t, points).reshape(-1)
        noise = np.repeat((noise_scale * sd * s) ** 2, 2)
        mu = self.mean.reshape(-1)
        post = mu + self.cov @ np.linalg.solve(self.cov + np.diag(noise), p - mu)
        return _invert(s, r, t, post.reshape(k, 2))



def scores(pred: np.ndarray, truth: np.ndarray, spacing: float) -> dict:
    from napari_glimpse.metrics import radial_errors

    err = radial_errors(pred, truth, spacing)  # (N, K) mm
    return {"mre_mm": float(err.mean()), "sdr_2mm": float((err <= 2.0).mean()),
            "per_landmark_mre_mm": [round(float(v), 4) for v in err.mean(0)]}


def main(argv: list[str] | None = None) -> int:
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0],
                   help="noise scales to try (the spread's multiple)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if not ready(a.data, a.threads):
        return 2
    model = GlimpseModel.load(a.model, device="cpu")
    train = load_dataset(a.data, "train")
    fit, val = train.subset(range(N_TRAIN)), train.subset(range(N_TRAIN, len(train)))
    prior = ShapePrior.fit(fit.ground_truth("mean"))
    truth = val.ground_truth("mean")
    answers, spreads = [], []
    for i in range(len(val)):
        tr = model.predict(val.image(i), iterations=0)
        answers.append(tr.final)
        spreads.append(tr.uncertainty_mm / model.pixel_spacing)
    answers, spreads = np.array(answers), np.array(spreads)
    res: dict = {"model": a.model, "fit": f"ISBI Train 001-{N_TRAIN:03d}", "n_fit_shapes": prior.n_shapes,
                 "split": f"ISBI Train {N_TRAIN + 1}-{len(train)}", "images": len(val),
                 "landmarks": list(val.landmark_names), "test_read": False, "results": []}
    for c in [math.inf, *a.scales]:
        pred = np.stack([prior.apply(x, s, c) for x, s in zip(answers, spreads)])
        row = {"noise_scale": "inf" if math.isinf(c) else c, **scores(pred, truth, val.pixel_spacing)}
        res["results"].append(row)
        print(f"noise scale {row['noise_scale']}: MRE {row['mre_mm']:.5f} mm, SDR 2 mm {100 * row['sdr_2mm']:.1f} %")
    best = min(res["results"][1:], key=lambda r: r["mre_mm"])
    res["baseline_mre_mm"] = res["results"][0]["mre_mm"]
    res["best_noise_scale"], res["best_mre_mm"] = best["noise_scale"], best["mre_mm"]
    res["gain_mm"] = res["baseline_mre_mm"] - best["mre_mm"]
    print(f"best: noise scale {best['noise_scale']}, {best['mre_mm']:.5f} mm against {res['baseline_mre_mm']:.5f} "
          f"({res['gain_mm']:+.5f})")
    write_json(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
