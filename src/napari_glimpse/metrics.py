"""ISBI 2015 metrics: radial error in mm, MRE +- SD, success detection rates."""

from __future__ import annotations

from typing import Sequence

import numpy as np

SDR_THRESHOLDS_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)


def radial_errors(pred: np.ndarray, truth: np.ndarray, pixel_spacing: float = 0.1) -> np.ndarray:
    """Euclidean distance in mm between ``(..., 2)`` pixel coordinates; NaN where the truth is an
    absent landmark (NaN: see :func:`napari_glimpse.io.present`), which :func:`summarize` leaves out."""
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    if pred.shape != truth.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {truth.shape}")
    return np.linalg.norm(pred - truth, axis=-1) * pixel_spacing


def _summary(err: np.ndarray, thresholds: Sequence[float]) -> dict:
    """MRE, SD and SDR over the errors that are not NaN (``n``; ``n_absent``: the NaN ones, points
    whose ground truth is absent); None for each statistic when there is none."""
    err = np.asarray(err, float).reshape(-1)
    missing = np.isnan(err)
    err = err[~missing]
    if not err.size:
        return {"mre_mm": None, "sd_mm": None, "sdr": {f"{t:g}": None for t in thresholds}, "n": 0,
                "n_absent": int(missing.sum())}
    return {
        "mre_mm": float(err.mean()),
        "sd_mm": float(err.std(ddof=0)),
        "sdr": {f"{t:g}": float((err <= t).mean() * 100.0) for t in thresholds},
        "n": int(err.size),
        "n_absent": int(missing.sum()),
    }


def summarize(
    errors_mm: np.ndarray,
    landmark_names: Sequence[str] | None = None,
    thresholds: Sequence[float] = SDR_THRESHOLDS_MM,
) -> dict:
    """Overall and per-landmark MRE, SD and SDR (percent within ``t`` mm) for ``(N, K)`` errors.

    NaN errors (absent ground-truth landmarks) are left out: the statistics are over the present
    points, counted in ``n``, the absent ones in ``n_absent``."""
    errors_mm = np.asarray(errors_mm, float)
    k = errors_mm.shape[1]
    names = list(landmark_names) if landmark_names is not None else [f"L{i + 1}" for i in range(k)]
    out = {"overall": _summary(errors_mm, thresholds), "per_landmark": []}
    for i in range(k):
        row = _summary(errors_mm[:, i], thresholds)
        row["landmark"] = names[i]
        row["index"] = i + 1
        out["per_landmark"].append(row)
    return out


def format_table(summary: dict) -> str:
    """A plain-text table of :func:`summarize` output."""
    th = list(summary["overall"]["sdr"].keys())
    head = f"{'#':>3} {'landmark':<24} {'MRE':>6} {'SD':>6} " + " ".join(f"{'SDR' + t:>8}" for t in th)
    lines = [head, "-" * len(head)]

    def row(idx, name, s):
        if s["mre_mm"] is None:  # every point of this landmark absent
            return f"{idx:>3} {name[:24]:<24} {'-':>6} {'-':>6} " + " ".join(f"{'-':>8}" for t in th)
        return f"{idx:>3} {name[:24]:<24} {s['mre_mm']:6.2f} {s['sd_mm']:6.2f} " + " ".join(
            f"{s['sdr'][t]:7.1f}%" for t in th
        )

    for s in summary["per_landmark"]:
        lines.append(row(s["index"], s["landmark"], s))
    lines.append("-" * len(head))
    lines.append(row("", "overall", summary["overall"]))
    lines.append("(MRE and SD in mm; SDR = % within 2, 2.5, 3, 4 mm)")
    absent = summary["overall"].get("n_absent", 0)
    if absent:
        lines.append(f"({summary['overall']['n']} points; {absent} absent in the ground truth, not counted)")
    return "\n".join(lines)
