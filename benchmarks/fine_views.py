#!/usr/bin/env python
"""Each fine net of an ensemble reading its own turned or scaled window, chosen on validation (run 31).

Reads ISBI Train 131-150 (the validation split) with a model whose fine stage is an ensemble of
three nets (float nets), once per choice of views (``meta["fine_views"]``: per net, the window's
angle in degrees and scale; the first net reads the plain window, the second ``+a`` / ``1 + s``,
the third ``-a`` / ``1 - s``), and writes MRE and SDR 2 mm for each against the mean of the two
doctors, with the plain reading as the baseline.

Usage::

    python benchmarks/fine_views.py --model runs/r24/validated_any.pt --out benchmarks/results/run31_views.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from isbi import DEFAULT_DATA, N_TRAIN, write_json  # noqa: E402


def choices(angles, scales) -> dict:
    out = {"plain": None}
    for a in angles:
        out[f"turn {a:g}"] = [(0.0, 1.0), (a, 1.0), (-a, 1.0)]
    for s in scales:
        out[f"scale {s:g}"] = [(0.0, 1.0), (0.0, 1.0 + s), (0.0, 1.0 - s)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--angles", type=float, nargs="*", default=[3, 5, 8])
    ap.add_argument("--scales", type=float, nargs="*", default=[0.05, 0.1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    from napari_glimpse.coarse import members_of
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset
    from napari_glimpse.metrics import radial_errors

    if not a.data.exists():
        print(f"ISBI data not found at {a.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    train = load_dataset(a.data, "train")
    val = train.subset(range(N_TRAIN, len(train)))
    images = [val.image(i) for i in range(len(val))]
    truth = val.ground_truth("mean")
    model = GlimpseModel.load(a.model, "cpu", int8=False)
    if model.fine is None or len(members_of(model.fine)) != 3:
        raise SystemExit("the model's fine stage must be an ensemble of three nets")
    rows = {}
    for name, views in choices(a.angles, a.scales).items():
        model.meta.pop("fine_views", None)
        if views is not None:
            model.meta["fine_views"] = views
        err = radial_errors(np.stack([model.predict(im).final for im in images]), truth, val.pixel_spacing)
        rows[name] = {"views": views, "mre_mm": float(err.mean()), "sdr2": float((err <= 2.0).mean() * 100),
                      "per_landmark_mm": err.mean(0).round(4).tolist()}
        print(f"{name:<10} MRE {err.mean():.5f} mm  SDR2 {(err <= 2.0).mean() * 100:.1f} %", flush=True)
    base = rows["plain"]["mre_mm"]
    best = min((k for k in rows if k != "plain"), key=lambda k: rows[k]["mre_mm"])
    gain = base - rows[best]["mre_mm"]
    res = {"model": a.model, "split": f"ISBI Train {N_TRAIN + 1}-{len(train)}", "images": len(val), "choices": rows,
           "best": best, "gain_mm": gain, "beats_rule": gain >= 0.005, "landmarks": list(val.landmark_names),
           "date": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    write_json(a.out, res)
    print(f"best {best}: {gain:+.5f} mm against the plain windows; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
