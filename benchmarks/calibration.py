#!/usr/bin/env python
"""Calibrated confidence (issue 29, item 4): fit on validation images, measure on ISBI Test1.

Two steps::

    git show 975c025:benchmarks/models/validated_run32.pt > /tmp/validated.pt
    python benchmarks/calibration.py fit --validation-model /tmp/validated.pt
    python benchmarks/calibration.py test

``fit`` (never reads Test1): the shape model (:mod:`napari_glimpse.shape`) from the labels of
ISBI Train 001-150 (the one shipped) and 001-130 (the one the validation features use, so that
validation images are out of its sample too); the validation model (the shipped recipe's coarse
net and three fine nets trained on Train 001-130 only) predicts Train 131-150 as they are and
perturbed (gamma, contrast, noise, blur, JPEG, another pixel spacing, a cropped field of view:
more and harder answers of the same 20 images); the calibrator
(:func:`napari_glimpse.confidence.fit_calibrator`) is fitted on those answers and written with
the shipped shape model to ``src/napari_glimpse/models/default.confidence.json``.

``test`` (after everything is fixed): the shipped model with that file on Test1 151-300 (the
truth: the mean of both doctors): AUROC of ``1 - confidence`` for errors > 2 mm and > 5 mm,
expected calibration error (10 equal-width bins), beside the old confidence
(``exp(-uncertainty_mm / 2)``); flagged points; ``benchmarks/results/calibration.json`` and the
reliability diagram ``docs/reliability.png``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "isbi2015"
SIDECAR = ROOT / "src" / "napari_glimpse" / "models" / "default.confidence.json"
N_TRAIN = 130  # Train 001-130 train the validation model, 131-150 validate
SPACING = 0.1


# ----------------------------------------------------------------------------- perturbations
def _jpeg(img: np.ndarray, q: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_GRAYSCALE)


def _gamma(img: np.ndarray, g: float) -> np.ndarray:
    return (255.0 * (img / 255.0) ** g).round().astype(np.uint8)


def _noise(img: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img + rng.normal(0, sd, img.shape), 0, 255).round().astype(np.uint8)


def variants(img: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> list[tuple]:
    """``(name, image, truth (K, 2) pixels, spacing mm)``: the image as it is and perturbed."""
    h, w = img.shape
    small = (int(round(w / 1.3)), int(round(h / 1.3)))
    out = [("plain", img, truth, SPACING),
           ("gamma0.6", _gamma(img, 0.6), truth, SPACING),
           ("gamma1.6", _gamma(img, 1.6), truth, SPACING),
           ("contrast0.5", (img * 0.5 + 64).round().astype(np.uint8), truth, SPACING),
           ("noise15", _noise(img, 15, rng), truth, SPACING),
           ("blur3", cv2.GaussianBlur(img, (0, 0), 3), truth, SPACING),
           ("jpeg15", _jpeg(img, 15), truth, SPACING),
           ("spacing0.13", cv2.resize(img, small, interpolation=cv2.INTER_AREA), truth / 1.3, SPACING * 1.3)]
    top = 350  # a cropped skull top (and a bar of extra neck below): the field of view of another device
    crop = np.concatenate([img[top:], np.full((top, w), int(np.median(img[-200:])), np.uint8)])
    out.append(("crop_top", crop, truth - [0, top], SPACING))
    hard = _noise(_gamma(cv2.resize(img, small, interpolation=cv2.INTER_AREA), 1.4), 10, rng)
    out.append(("spacing0.13_gamma1.4_noise10", hard, truth / 1.3, SPACING * 1.3))
    return out


# ----------------------------------------------------------------------------- answers and features
def answers(model, items, log=print) -> dict:
    """Predict each ``(name, image, truth, spacing)``: features ``(N, K, F)``, errors (mm), old confidence."""
    feats, errs, old, names, kinds, probs, finals, flags, zs = [], [], [], [], [], [], [], [], []
    t0 = time.perf_counter()
    for j, (name, kind, img, truth, spacing) in enumerate(items):
        tr = model.predict(img, spacing=spacing)
        feats.append(tr.features)
        errs.append(np.linalg.norm(tr.final - truth, axis=1) * spacing)
        old.append(np.exp(-tr.uncertainty_mm / 2.0))
        probs.append(tr.confidence)
        finals.append(tr.final * spacing)
        flags.append(tr.flagged)
        zs.append(tr.shape_z)
        names.append(name)
        kinds.append(kind)
        if j % 20 == 19:
            log(f"  {j + 1}/{len(items)} answers, {time.perf_counter() - t0:.0f} s")
    return {"features": np.stack(feats), "errors": np.stack(errs), "old": np.stack(old), "names": names,
            "kinds": kinds, "confidence": np.stack(probs), "final_mm": np.stack(finals),
            "flagged": np.stack(flags), "shape_z": np.stack(zs)}


def validation_items(ds, idx, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = ds.ground_truth("mean")
    for i in idx:
        img = ds.image(i)
        for kind, im, t, sp in variants(img, truth[i], rng):
            yield ds.image_paths[i].name, kind, im, t, sp


def shape_of(ds, idx):
    from napari_glimpse.shape import fit_shape_model

    return fit_shape_model(ds.ground_truth("mean")[idx] * SPACING, tuple(ds.image_paths[i].name for i in idx))


# ----------------------------------------------------------------------------- measures
def auroc(bad: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` (higher: more likely bad) for the boolean ``bad`` (ties count half)."""
    bad, score = np.asarray(bad, bool).reshape(-1), np.asarray(score, float).reshape(-1)
    n1, n0 = int(bad.sum()), int((~bad).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):  # average ranks of ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[bad].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def reliability(prob: np.ndarray, hit: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error over ``bins`` equal-width bins of ``prob`` (the event: ``hit``),
    and each bin's count, mean probability and observed frequency."""
    p, y = np.asarray(prob, float).reshape(-1), np.asarray(hit, float).reshape(-1)
    which = np.minimum((p * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(sel.sum()),
                     "mean_probability": float(p[sel].mean()) if sel.any() else None,
                     "observed": float(y[sel].mean()) if sel.any() else None})
    return {"ece": float(ece), "bins": rows}


def scores(res: dict, prob: np.ndarray) -> dict:
    """AUROC for > 2 mm and > 5 mm, ECE, Brier score and the mean probability vs the observed rate."""
    err = res["errors"]
    rel = reliability(prob, err <= 2.0)
    return {"auroc_error_gt_2mm": auroc(err > 2, -prob), "auroc_error_gt_5mm": auroc(err > 5, -prob),
            "ece_10_bins": rel["ece"], "brier": float(((prob - (err <= 2)) ** 2).mean()),
            "mean_probability": float(prob.mean()), "fraction_within_2mm": float((err <= 2).mean()),
            "reliability": rel["bins"]}


# ----------------------------------------------------------------------------- the reliability diagram
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _axes(draw, box, font) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0), width=2)
    for t in range(11):
        x = x0 + (x1 - x0) * t / 10
        y = y1 - (y1 - y0) * t / 10
        draw.line([(x, y0), (x, y1)], fill=(232, 232, 232))
        draw.line([(x0, y), (x1, y)], fill=(232, 232, 232))
        if t % 2 == 0:
            draw.text((x, y1 + 8), f"{t / 10:.1f}", fill=(0, 0, 0), font=font, anchor="mt")
            draw.text((x0 - 8, y), f"{t / 10:.1f}", fill=(0, 0, 0), font=font, anchor="rm")
    draw.line([(x0, y1), (x1, y0)], fill=(120, 120, 120), width=2)
    draw.rectangle(box, outline=(0, 0, 0), width=2)


def reliability_png(path: Path, curves: list[tuple[str, dict, tuple]], title: str, n_points: int) -> None:
    """A reliability diagram: for each curve ``(label, reliability bins, colour)`` the observed
    fraction within 2 mm against the mean probability of each non-empty bin (marker area: count),
    the diagonal, and the bins' counts as a histogram below."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (760, 900), "white")
    d = ImageDraw.Draw(img)
    f, small, big = _font(18), _font(15), _font(22)
    box = (130, 90, 720, 680)
    _axes(d, box, f)
    d.text((380, 20), title, fill=(0, 0, 0), font=big, anchor="mt")
    d.text((425, 718), "predicted probability of being within 2 mm", fill=(0, 0, 0), font=f, anchor="mt")
    for i, word in enumerate(("observed", "fraction", "within", "2 mm")):
        d.text((48, 350 + 22 * i), word, fill=(0, 0, 0), font=f, anchor="mm")
    x0, y0, x1, y1 = box

    def at(p, q):
        return x0 + (x1 - x0) * p, y1 - (y1 - y0) * q

    hist_top, hist_bottom = 760, 860
    d.line([(x0, hist_bottom), (x1, hist_bottom)], fill=(0, 0, 0))
    d.line([(x0, hist_top), (x0, hist_bottom)], fill=(0, 0, 0))
    d.text((x0 - 8, hist_top), "100 %", fill=(0, 0, 0), font=small, anchor="rm")
    d.text((x0 - 8, hist_bottom), "0", fill=(0, 0, 0), font=small, anchor="rm")
    for c, (label, bins, colour) in enumerate(curves):
        pts = [(at(b["mean_probability"], b["observed"]), b["n"]) for b in bins if b["n"]]
        d.line([p for p, _ in pts], fill=colour, width=3)
        for (px, py), n in pts:
            r = 3 + 9 * np.sqrt(n / n_points)
            d.ellipse([px - r, py - r, px + r, py + r], fill=colour, outline=(0, 0, 0))
        ly = y0 + 26 + 28 * c
        d.ellipse([x0 + 16, ly - 7, x0 + 30, ly + 7], fill=colour, outline=(0, 0, 0))
        d.text((x0 + 40, ly), label, fill=colour, font=f, anchor="lm")
        for b in bins:
            frac = b["n"] / n_points
            bx0 = x0 + (x1 - x0) * b["lo"] + 3 + c * 29
            d.rectangle([bx0, hist_bottom - (hist_bottom - hist_top) * frac, bx0 + 26, hist_bottom], fill=colour)
    d.text((x0, hist_bottom + 10), "share of the points in each probability bin", fill=(60, 60, 60), font=small)
    img.save(path)


def displaced(model, img: np.ndarray, truth: np.ndarray, rng: np.random.Generator, moved: int = 2) -> tuple:
    """A gross failure made on purpose: the coarse answer of ``moved`` random landmarks put 8-30 mm
    away (as when the coarse stage takes another structure for the landmark), the fine stage run
    from there as it would be. ``(features (K, F), errors (K,) mm, which (K,) bool: the moved ones)``."""
    from napari_glimpse.confidence import assess
    from napari_glimpse.inference import Trajectory, _peaks

    pyr = model.pyramid(img)
    k = model.config.n_landmarks
    coarse, cspread, dis = model._coarse(pyr)
    which = np.zeros(k, bool)
    which[rng.choice(k, moved, replace=False)] = True
    ang, dist = rng.uniform(0, 2 * np.pi, moved), rng.uniform(8, 30, moved) / SPACING
    start = coarse.copy()
    start[which] += dist[:, None] * np.c_[np.cos(ang), np.sin(ang)]
    start = np.clip(start, 0, [pyr.shape[1] - 1, pyr.shape[0] - 1])
    looks: list = []
    fine, spread = model._refine(pyr, start, cspread, disagreement=dis, looks=looks)
    tr = Trajectory(positions=fine[None], uncertainty_mm=spread * SPACING, landmark_names=model.landmark_names,
                    pixel_spacing=SPACING, image_shape=pyr.shape, patch=model.config.patch)
    cues = {"coarse": start, "final": fine, "fine_spread": spread, "coarse_spread": cspread, "ks": np.arange(k),
            "peak": _peaks(looks)}
    tr = assess(model, tr, cues)
    return tr.features, np.linalg.norm(fine - truth, axis=1) * SPACING, which


def displaced_answers(model, ds, idx, per_image: int = 5, seed: int = 1, log=print) -> dict:
    """:func:`displaced` ``per_image`` times on each of the images ``idx``."""
    rng = np.random.default_rng(seed)
    truth = ds.ground_truth("mean")
    feats, errs, which, names = [], [], [], []
    for i in idx:
        img = ds.image(i)
        for _ in range(per_image):
            f, e, w = displaced(model, img, truth[i], rng)
            feats.append(f)
            errs.append(e)
            which.append(w)
            names.append(ds.image_paths[i].name)
    log(f"  {len(feats)} answers with gross failures made on purpose")
    return {"features": np.stack(feats), "errors": np.stack(errs), "moved": np.stack(which), "names": names}


# ----------------------------------------------------------------------------- fitting (validation only)
USE = ("log_fine_spread", "shape_excess")  # chosen by the cross-validation below (see CHOICES)
CHOICES = {"use": [("log_fine_spread",), ("log_fine_spread", "shape_excess"),
                   ("log_fine_spread", "neg_log_peak", "shape_excess"),
                   ("log_fine_spread", "log_coarse_fine", "log_coarse_spread", "neg_log_peak", "shape_excess")],
           "prior": [False, True]}


def label_noise(ds, idx) -> np.ndarray:
    """``(K,)`` log of how much the two doctors' labels scatter per landmark (mm; the RMS of their
    difference about its mean, halved: a landmark the doctors place loosely is hard to hit within 2 mm)."""
    a = ds.each_annotator()[list(idx)] * SPACING
    diff = a[:, 0] - a[:, 1]
    return np.log(np.sqrt(((diff - diff.mean(0)) ** 2).sum(-1).mean(0)) / 2)


def _stack(plain: dict, moved: dict, moved_weight: float) -> tuple:
    """Features, within-2-mm, weights and names of the plain answers and the moved points."""
    x = np.concatenate([plain["features"], moved["features"]])
    y = np.concatenate([plain["errors"], moved["errors"]]) <= 2.0
    w = np.concatenate([np.ones(plain["errors"].shape), moved["moved"] * moved_weight])
    return x, y, w, np.array(list(plain["names"]) + list(moved["names"]))


def fit_on(plain: dict, moved: dict, prior, use=USE, moved_weight: float = 1.0):
    from napari_glimpse.confidence import fit_calibrator

    x, y, w, names = _stack(plain, moved, moved_weight)
    note = (f"validation answers: {len(plain['names'])} (ISBI Train 131-150 as they are and perturbed, the validation "
            f"model trained on 001-130) + {int(moved['moved'].sum())} gross failures made on purpose; "
            f"features {', '.join(use)}; intercepts from the doctors' label scatter on Train 001-130")
    return fit_calibrator(x, y, names, weights=w, use=use, shrink=1e6 if prior is not None else 20.0,
                          prior=prior, note=note)


def cross_validate(plain: dict, moved: dict, prior, use, folds: int = 5) -> dict:
    """Image-grouped ``folds``-fold cross-validation on the validation images: the held-out images'
    unperturbed answers scored (AUROC > 2 mm, log loss, ECE)."""
    images = sorted(set(plain["names"]))
    fold_of = {n: i % folds for i, n in enumerate(images)}
    fp, fm = (np.array([fold_of[n] for n in r["names"]]) for r in (plain, moved))
    prob = np.full(plain["errors"].shape, np.nan)
    kinds = np.array(plain["kinds"])
    for f in range(folds):
        pick = lambda r, sel: {k: (np.asarray(v)[sel] if k != "kinds" else v) for k, v in r.items()}  # noqa: E731
        cal = fit_on(pick(plain, fp != f), pick(moved, fm != f), prior, use)
        prob[fp == f] = cal.probability(plain["features"][fp == f])
    sel = kinds == "plain"
    p, e = prob[sel], plain["errors"][sel]
    return {"auroc_error_gt_2mm": auroc(e > 2, -p), "log_loss": float(-np.log(np.where(e <= 2, p, 1 - p)).mean()),
            "ece_10_bins": reliability(p, e <= 2)["ece"], "old_auroc_error_gt_2mm": auroc(e > 2, -plain["old"][sel])}


def choose(plain: dict, moved: dict, prior, log=print) -> tuple[tuple, bool, list]:
    """The features and whether to use the label-scatter prior: the lowest cross-validated log loss."""
    rows = []
    for use in CHOICES["use"]:
        for with_prior in CHOICES["prior"]:
            r = cross_validate(plain, moved, prior if with_prior else None, use)
            rows.append({"features": list(use), "label_prior": with_prior, **r})
            log(f"  {'+'.join(use)}{' +prior' if with_prior else ''}: AUROC {r['auroc_error_gt_2mm']:.3f}, "
                f"log loss {r['log_loss']:.3f}, ECE {r['ece_10_bins']:.3f}")
    best = min(rows, key=lambda r: r["log_loss"])
    return tuple(best["features"]), best["label_prior"], rows


def run_fit(a, log=print) -> dict:
    """The ``fit`` command: validation answers, the choice, the calibrator; the sidecar written."""
    from napari_glimpse.confidence import validation_only
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset

    ds = load_dataset(a.data, "train")
    val = range(N_TRAIN, len(ds))
    validation_only([ds.image_paths[i].name for i in val])
    model = GlimpseModel.load(a.validation_model, device="cpu")
    model.meta["confidence"] = {"shape": shape_of(ds, range(N_TRAIN)).to_dict(), "calibrator": None}
    log(f"validation answers of {a.validation_model} on Train {N_TRAIN + 1}-{len(ds)} (as they are and perturbed)")
    if a.cache and Path(a.cache).exists():  # the answers of an earlier run of this step
        plain, moved = pickle.loads(Path(a.cache).read_bytes())
    else:
        plain = answers(model, list(validation_items(ds, val)), log)
        moved = displaced_answers(model, ds, val, log=log)
        if a.cache:
            Path(a.cache).write_bytes(pickle.dumps((plain, moved)))
    prior = label_noise(ds, range(N_TRAIN))
    use, with_prior, rows = choose(plain, moved, prior, log)
    cal = fit_on(plain, moved, prior if with_prior else None, use)
    side = {"about": "napari_glimpse.confidence: calibrated confidence and plausibility of models/default.pt; "
                     "made by benchmarks/calibration.py fit",
            "shape": shape_of(ds, range(len(ds))).to_dict(), "calibrator": cal.to_dict()}
    Path(a.sidecar).write_text(json.dumps(side, separators=(",", ":")) + "\n", encoding="utf-8")
    log(f"wrote {a.sidecar} ({Path(a.sidecar).stat().st_size} bytes): slopes {dict(zip(cal.features, cal.slopes))}")
    return {"validation_model": str(a.validation_model), "validation_images": sorted(set(plain["names"])),
            "validation_answers": len(plain["names"]), "moved_points": int(moved["moved"].sum()),
            "cross_validation": rows, "chosen": {"features": list(use), "label_prior": with_prior},
            "validation_fraction_within_2mm": float((plain["errors"][np.array(plain["kinds"]) == "plain"] <= 2).mean())}


# ----------------------------------------------------------------------------- Test1 (read once)
def image_level(res: dict) -> dict:
    """How well the image score (expected points beyond 2 mm) orders the images by their real count."""
    exp = (1 - res["confidence"]).sum(1)
    real = (res["errors"] > 2).sum(1)
    rank = lambda v: np.argsort(np.argsort(v, kind="mergesort"), kind="mergesort")  # noqa: E731
    worst = np.argsort(-exp)[: max(1, len(exp) // 10)]
    return {"spearman_expected_vs_real_misses": float(np.corrcoef(rank(exp), rank(real))[0, 1]),
            "mean_expected_misses": float(exp.mean()), "mean_real_misses": float(real.mean()),
            "real_misses_in_top_10pct_by_score": float(real[worst].mean())}


def flag_summary(res: dict) -> dict:
    """The flagged points and the gross failures (> 10 mm): where, how far off, their probability."""
    f, e = res["flagged"], res["errors"]

    def point(i: int, k: int) -> dict:
        return {"image": res["names"][i], "landmark": int(k) + 1, "error_mm": round(float(e[i, k]), 2),
                "probability": round(float(res["confidence"][i, k]), 4),
                "old_confidence": round(float(res["old"][i, k]), 3),
                "shape_z": round(float(res["shape_z"][i, k]), 1), "flagged": bool(f[i, k])}

    return {"flagged_points": int(f.sum()), "flagged": [point(i, k) for i, k in zip(*np.nonzero(f))],
            "points_gt_10mm": int((e > 10).sum()), "points_gt_10mm_flagged": int((f & (e > 10)).sum()),
            "gt_10mm": [point(i, k) for i, k in zip(*np.nonzero(e > 10))],
            "points_gt_5mm": int((e > 5).sum()),
            "median_probability_gt_5mm": float(np.median(res["confidence"][e > 5])),
            "max_shape_z": float(res["shape_z"].max())}


def run_test(a, log=print) -> dict:
    """The ``test`` command: the shipped model (and its sidecar) on Test1."""
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset

    model = GlimpseModel.load(device="cpu")
    if model.meta.get("confidence", {}).get("calibrator") is None:
        raise SystemExit("the shipped model has no calibrator: run the fit step first")
    ds = load_dataset(a.data, "test1")
    truth = ds.ground_truth("mean")
    log(f"Test1: {len(ds)} images")
    res = answers(model, [(ds.image_paths[i].name, "plain", ds.image(i), truth[i], SPACING) for i in range(len(ds))],
                  log)
    new, old = scores(res, res["confidence"]), scores(res, res["old"])
    reliability_png(Path(a.png), [("calibrated probability", new["reliability"], (31, 119, 180)),
                                  ("old confidence exp(-u/2mm)", old["reliability"], (200, 90, 40))],
                    f"ISBI Test1: {res['errors'].size} points, 150 images", res["errors"].size)
    for name, s in (("new", new), ("old", old)):
        log(f"{name}: AUROC >2 mm {s['auroc_error_gt_2mm']:.3f}, >5 mm {s['auroc_error_gt_5mm']:.3f}, "
            f"ECE {s['ece_10_bins']:.3f}")
    return {"test1_mre_mm": float(res["errors"].mean()), "calibrated": new, "old_confidence": old,
            "image_level": image_level(res), "plausibility": flag_summary(res),
            "acceptance": {"auroc_error_gt_2mm_at_least_0.80": new["auroc_error_gt_2mm"] >= 0.80,
                           "ece_at_most_0.05": new["ece_10_bins"] <= 0.05}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["fit", "test"])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--validation-model", default="/tmp/validated.pt",
                   help="the validation model (git show 975c025:benchmarks/models/validated_run32.pt)")
    p.add_argument("--sidecar", default=str(SIDECAR))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration.json"))
    p.add_argument("--png", default=str(ROOT / "docs" / "reliability.png"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", help="fit: keep the validation answers in this file (and reuse them when it exists)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if not Path(a.data).exists():
        print(f"ISBI data not found at {a.data}", file=sys.stderr)
        return 2
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    t0 = time.perf_counter()
    res[a.step] = run_fit(a) if a.step == "fit" else run_test(a)
    res[a.step]["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
