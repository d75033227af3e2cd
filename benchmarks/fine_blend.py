#!/usr/bin/env python
"""Blending the coarse answer into the fine one, chosen on validation (run 30).

Reads ISBI Train 131-150 (the validation split) with a model that has a coarse and a fine stage
(float nets), keeps each image's coarse answer and fine answer (``predict(record_stages=True)``),
and scores ``b x coarse + (1 - b) x fine`` for each ``--blends`` value b: MRE and SDR 2 mm
against the mean of the two doctors, and the best b's gain per landmark. Writes JSON.

Usage::

    python benchmarks/fine_blend.py --model runs/r24/validated_any.pt --out benchmarks/results/run30_blend.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from isbi import DEFAULT_DATA, N_TRAIN, ready, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--blends", type=float, nargs="+", default=[0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset
    from napari_glimpse.metrics import radial_errors

    if not ready(a.data, a.threads):
        return 2
    train = load_dataset(a.data, "train")
    val = train.subset(range(N_TRAIN, len(train)))
    model = GlimpseModel.load(a.model, "cpu", int8=False)
    coarse, fine = [], []
    for i in range(len(val)):
        tr = model.predict(val.image(i), record_stages=True)
        if tr.coarse_positions is None or tr.fine_looks != 1:
            raise SystemExit("the model must answer with one fine look after its coarse stage")
        np.testing.assert_allclose(tr.fine_positions[-1], tr.final)
        coarse.append(tr.coarse_positions)
        fine.append(tr.fine_positions[-1])
    coarse, fine = np.stack(coarse), np.stack(fine)
    truth = val.ground_truth("mean")
    rows = {}
    for b in a.blends:
        err = radial_errors(b * coarse + (1 - b) * fine, truth, val.pixel_spacing)  # (images, landmarks) mm
        rows[f"{b:g}"] = {"mre_mm": float(err.mean()), "sdr2": float((err <= 2.0).mean() * 100),
                          "per_landmark_mm": err.mean(0).round(4).tolist()}
        print(f"b {b:<5g} MRE {err.mean():.5f} mm  SDR2 {(err <= 2.0).mean() * 100:.1f} %", flush=True)
    base = rows["0"]["mre_mm"]
    best = min((k for k in rows if float(k) > 0), key=lambda k: rows[k]["mre_mm"])
    gain = base - rows[best]["mre_mm"]
    res = {"model": a.model, "split": f"ISBI Train {N_TRAIN + 1}-{len(train)}", "images": len(val),
           "blends": rows, "best": float(best), "gain_mm": gain, "ships": gain >= 0.005,
           "best_gain_per_landmark_mm": (np.array(rows["0"]["per_landmark_mm"])
                                         - np.array(rows[best]["per_landmark_mm"])).round(4).tolist(),
           "landmarks": list(val.landmark_names),
           "date": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    write_json(a.out, res)
    print(f"best b {best}: {gain:+.5f} mm against b = 0 ({'ships' if res['ships'] else 'below the rule'}); wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
