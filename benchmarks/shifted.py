#!/usr/bin/env python
"""Another scanner's cephalograms, simulated: the shipped model on a shifted ISBI set beside the plain one.

Each image of the split is made to look like another device's (deterministic per image, seed =
its index; :func:`shift_image`):

* **spacing** 0.125-0.14 mm per pixel (the image resampled, the anatomy unchanged) **given** to
  the model as ``spacing=`` (what ``--spacing`` or a DICOM header does);
* **field of view**: the top 8-15 % of the image cut off (the skull vault), and a dark collimator
  band (0-6 % of the width) on the back of the head;
* a **ruler**: a bright bar with ticks in front of the face (as a nasion-rod ruler), 25-60 px
  right of the most anterior landmark;
* **exposure**: gamma 0.7-1.4, contrast 0.8-1.1, Gaussian noise sd 2-6 grey levels;
* **JPEG** re-encoding at quality 40-75.

Errors are in mm of the anatomy (the shifted pixels times the shifted spacing); the truth is the
mean of the two doctors. The figures: MRE, SD, SDR at 2/2.5/3/4 mm, points more than 10 mm off,
for the shifted and the plain images side by side, with the plausibility flags' counts.

Usage::

    python benchmarks/shifted.py --split train --first 131 --last 150   # development (validation images)
    python benchmarks/shifted.py --split test1                          # the headline, read once
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2015"
OUT = ROOT / "benchmarks" / "results" / "shifted.json"
THRESHOLDS = (2.0, 2.5, 3.0, 4.0)


def shift_params(seed: int) -> dict:
    """The device an image is shown by (deterministic for ``seed``)."""
    r = np.random.default_rng(1000 + seed)
    return {"spacing": float(r.uniform(0.125, 0.14)), "crop_top": float(r.uniform(0.08, 0.15)),
            "collimator": float(r.uniform(0.0, 0.06)), "ruler_gap_px": int(r.integers(25, 61)),
            "gamma": float(np.exp(r.uniform(np.log(0.7), np.log(1.4)))), "contrast": float(r.uniform(0.8, 1.1)),
            "noise": float(r.uniform(2.0, 6.0)), "jpeg": int(r.integers(40, 76)),
            "noise_seed": int(r.integers(1 << 30))}


def shift_image(img: np.ndarray, truth_px: np.ndarray, p: dict, spacing: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``img`` (grey uint8 at ``spacing``) and its ``(K, 2)`` landmarks as the device ``p`` shows them."""
    import cv2

    h, w = img.shape
    f = spacing / p["spacing"]
    x = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA).astype(np.float32)
    pts = truth_px * [x.shape[1] / w, x.shape[0] / h]
    top = int(round(p["crop_top"] * x.shape[0]))
    x, pts = x[top:], pts - [0.0, top]
    band = int(round(p["collimator"] * x.shape[1]))
    x[:, :band] = x[:, :band] * 0.15 + 5.0
    x = 255.0 * (x / 255.0) ** p["gamma"]
    x = (x - 128.0) * p["contrast"] + 128.0
    _draw_ruler(x, int(pts[:, 0].max()) + p["ruler_gap_px"])
    x = x + np.random.default_rng(p["noise_seed"]).normal(0.0, p["noise"], x.shape).astype(np.float32)
    x = np.clip(x, 0, 255).round().astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, p["jpeg"]])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), pts


def _draw_ruler(x: np.ndarray, left: int) -> None:
    """A bright vertical bar 14 px wide with a tick every 40 px, from 15 % to 65 % of the height."""
    h, w = x.shape
    if left + 14 >= w:
        return
    y0, y1 = int(0.15 * h), int(0.65 * h)
    x[y0:y1, left:left + 14] = 235.0
    for y in range(y0, y1, 40):
        x[y:y + 3, max(left - 12, 0):left] = 235.0


def evaluate(model, ds, idx: list[int], shifted: bool) -> dict:
    """Errors (mm) of ``model`` on images ``idx`` of ``ds``, shifted or plain, and the flag counts."""
    from napari_glimpse.metrics import summarize

    truth = ds.ground_truth("mean")
    errs, flagged, flagged_far, researched, s_per_image = [], 0, 0, 0, []
    for i in idx:
        img, pts, sp = ds.image(i), truth[i], ds.pixel_spacing
        if shifted:
            p = shift_params(i)
            img, pts = shift_image(img, pts, p, ds.pixel_spacing)
            sp = p["spacing"]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = model.predict(img, spacing=sp)
        s_per_image.append(time.perf_counter() - t0)
        e = np.linalg.norm(tr.final - pts, axis=-1) * sp
        errs.append(e)
        if tr.flagged is not None:
            flagged += int(tr.flagged.sum())
            flagged_far += int((tr.flagged & (e > 10)).sum())
        if tr.researched is not None:
            researched += int(tr.researched.sum())
    err = np.stack(errs)
    s = summarize(err, ds.landmark_names, THRESHOLDS)
    s["overall"]["over10"] = int((err > 10).sum())
    s["overall"]["over5"] = int((err > 5).sum())
    s["overall"]["flagged"] = flagged
    s["overall"]["flagged_over10"] = flagged_far
    s["overall"]["researched"] = researched
    s["overall"]["s_per_image"] = round(float(np.median(s_per_image)), 3)
    s["worst"] = [[ds.image_paths[idx[r]].name, ds.landmark_names[c], round(float(err[r, c]), 2)]
                  for r, c in zip(*np.unravel_index(np.argsort(err, axis=None)[::-1][:10], err.shape))]
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="train", choices=["train", "test1"])
    ap.add_argument("--first", type=int, default=None, help="first image number (e.g. 131)")
    ap.add_argument("--last", type=int, default=None, help="last image number (e.g. 150)")
    ap.add_argument("--model", default=None, help="model file (default: the shipped one)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--no-research", action="store_true", help="flag implausible points only (no second search)")
    ap.add_argument("--tag", default=None, help="key of this run in the JSON (default: split and range)")
    a = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"error: no data at {DATA}", file=sys.stderr)
        return 2
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset

    ds = load_dataset(DATA, a.split)
    numbers = [int(p.stem) for p in ds.image_paths]
    idx = [k for k, n in enumerate(numbers) if (a.first is None or n >= a.first) and (a.last is None or n <= a.last)]
    model = GlimpseModel.load(a.model, device="cpu")
    if a.no_research:
        model.meta["research"] = False
    run = {"split": a.split, "images": [numbers[idx[0]], numbers[idx[-1]]], "n": len(idx),
           "model": a.model or "shipped default", "research": not a.no_research,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "loadavg": [round(v, 2) for v in os.getloadavg()]}
    for kind in ("plain", "shifted"):
        s = evaluate(model, ds, idx, kind == "shifted")
        run[kind] = s
        o = s["overall"]
        print(f"{kind:>8}: MRE {o['mre_mm']:.3f} mm, SDR2 {o['sdr']['2']:.1f} %, > 10 mm: {o['over10']}, "
              f"> 5 mm: {o['over5']}, flagged {o['flagged']}, searched again {o['researched']}", flush=True)
    run["mre_difference_mm"] = round(run["shifted"]["overall"]["mre_mm"] - run["plain"]["overall"]["mre_mm"], 4)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res[a.tag or f"{a.split} {run['images'][0]}-{run['images'][1]}"] = run
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
