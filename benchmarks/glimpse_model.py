#!/usr/bin/env python
"""The glimpse-only model (the paper's method) on ISBI Test1, and the default model's glimpse gate.

* **glimpse**: every Test1 image predicted once with 5 glimpse steps from the mean start (the
  model's own facing choice); the answer after 1, 2, 3 and 5 steps is read from the same
  trajectory (step ``t``'s position is what ``--iterations t`` answers). MRE, SD and SDR at
  2/2.5/3/4 mm against the mean of the two doctors, file size, training budget (from the model's
  metadata), and s/image at the model's own step count (median, one thread after a warm-up).
* **default + glimpse steps**: the shipped default with 0, 1 and 3 steps (its gate keeps its
  0-step answer where validation did not show the steps help: the three must agree).

Usage::

    python benchmarks/glimpse_model.py --model src/napari_glimpse/models/glimpse.pt
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
OUT = ROOT / "benchmarks" / "results" / "glimpse_model.json"
STEPS = (1, 2, 3, 5)


def _summary(err: np.ndarray, names) -> dict:
    from napari_glimpse.metrics import summarize

    s = summarize(err, names, (2.0, 2.5, 3.0, 4.0))
    o = s["overall"]
    return {"mre_mm": round(o["mre_mm"], 4), "sd_mm": round(o["sd_mm"], 4),
            "sdr": {k: round(v, 2) for k, v in o["sdr"].items()}, "over10": int((err > 10).sum()),
            "per_landmark_mm": [round(r["mre_mm"], 3) for r in s["per_landmark"]]}


def glimpse_figures(path: str, ds) -> dict:
    """Errors after 1/2/3/5 steps from one 5-step trajectory per image; facing; s/image."""
    import torch

    from napari_glimpse.inference import GlimpseModel

    torch.set_num_threads(1)
    model = GlimpseModel.load(path, device="cpu")
    truth = ds.ground_truth("mean")
    per_step, facings, times = {t: [] for t in (0, *STEPS)}, [], []
    for i in range(len(ds)):
        img = ds.image(i)
        tr = model.predict(img, iterations=max(STEPS))
        facings.append(tr.facing)
        for t in per_step:
            per_step[t].append(np.linalg.norm(tr.positions[t] - truth[i], axis=-1) * ds.pixel_spacing)
        if i < 11:  # timing at the model's own step count (the first image warms up)
            t0 = time.perf_counter()
            model.predict(img)
            if i:
                times.append(time.perf_counter() - t0)
    meta = model.meta
    return {"file": str(path), "file_mb": round(os.path.getsize(path) / 2**20, 2),
            "default_steps": model.default_iterations,
            "train_minutes": round(meta.get("train_wall_s", 0) / 60, 1), "train_steps": meta.get("train_steps"),
            "validation": meta.get("validation"),
            "read_left_facing": int(sum(f == "left" for f in facings)),
            "s_per_image_1_thread": round(float(np.median(times)), 3),
            "errors": {f"{t} steps": _summary(np.stack(per_step[t]), ds.landmark_names) for t in per_step}}


def default_gate(ds) -> dict:
    """The shipped default with 0, 1 and 3 glimpse steps: MRE and the largest difference in position."""
    from napari_glimpse.inference import GlimpseModel

    model = GlimpseModel.load(None, device="cpu")
    truth = ds.ground_truth("mean")
    pos = {t: np.stack([model.predict(ds.image(i), iterations=t).final for i in range(len(ds))]) for t in (0, 1, 3)}
    return {f"{t} steps": {"mre_mm": round(float((np.linalg.norm(p - truth, axis=-1) * ds.pixel_spacing).mean()), 4),
                           "max_moved_px": float(np.abs(p - pos[0]).max())} for t, p in pos.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "src" / "napari_glimpse" / "models" / "glimpse.pt"))
    ap.add_argument("--no-default", action="store_true", help="skip the default model's gate check")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--split", default="test1", help="test1 (the headline) or train (checking the script)")
    ap.add_argument("--limit", type=int, default=None, help="the first N images only (checking the script)")
    a = ap.parse_args(argv)
    from napari_glimpse.io import load_dataset

    ds = load_dataset(DATA, a.split)
    if a.limit:
        ds = ds.subset(list(range(a.limit)))
    warnings.simplefilter("ignore")
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "loadavg": [round(v, 2) for v in os.getloadavg()],
           "split": a.split, "images": len(ds), "glimpse": glimpse_figures(a.model, ds)}
    for t, s in res["glimpse"]["errors"].items():
        print(f"glimpse model, {t}: MRE {s['mre_mm']:.3f} mm, SDR2 {s['sdr']['2']:.1f} %, > 10 mm {s['over10']}")
    if not a.no_default:
        res["default_with_steps"] = default_gate(ds)
        print("default model:", res["default_with_steps"])
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
