#!/usr/bin/env python
"""Fine-stage trial: train a fine stage for a few minutes and score it on the validation split.

The coarse answers come from a model's coarse stage (default: the shipped model); the fine stage
is trained on ISBI Train 001-130 and scored on Train 131-150 (never Test1). This is how the
window level / channels of the fine stage were chosen (benchmarks/results/trial_fine_stage.json)::

    python benchmarks/trial_fine.py 12 2 runs/fine_12.pt
    python benchmarks/trial_fine.py 12 1 runs/fine_c2l2.pt '{"context": 2}'
    python benchmarks/trial_fine.py 12 1 runs/fine_c3l1.pt '{"context": 3, "level": 1}'

Arguments: minutes, threads, output file, and optionally a JSON of FineConfig fields.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_glimpse.fine import FineConfig, fine_levels, refine, train_fine
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset, to_grey_uint8
from napari_glimpse.metrics import radial_errors
from napari_glimpse.pyramid import build_pyramid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2015"


def main(argv: list[str]) -> int:
    minutes, threads, out = float(argv[0]), int(argv[1]), argv[2]
    kw = json.loads(argv[3]) if len(argv) > 3 else {}
    torch.set_num_threads(threads)
    tr = load_dataset(DATA, "train")
    model = GlimpseModel.load(None, "cpu")
    nl = model.config.n_levels

    def pyramids(idx):
        return [build_pyramid(to_grey_uint8(tr.image(i)), nl, model.config.patch) for i in idx]

    t0 = time.time()
    ptr, pva = pyramids(range(130)), pyramids(range(130, 150))
    print("pyramids", time.time() - t0, flush=True)
    truth = tr.ground_truth("mean")
    cfg = FineConfig(**kw)
    levels, tn = fine_levels(ptr, truth[:130], cfg)
    vt = truth[130:150]
    coarse = [model.locate_coarse(p, fine_steps=0)[0] for p in pva]
    print("coarse val MRE", radial_errors(np.stack(coarse), vt, 0.1).mean(), flush=True)

    def score(net, steps=1):
        pred = np.stack([refine(net, p.levels, p.shape, c, steps)[0] for p, c in zip(pva, coarse)])
        return float(radial_errors(pred, vt, 0.1).mean())

    net, hist = train_fine(levels, tn, cfg, minutes * 60, progress=False, evaluate=score, eval_every_s=300)
    for h in hist:
        print(h, flush=True)
    r = {s: score(net, s) for s in (1, 2, 3)}
    print("final", r, flush=True)
    torch.save({"cfg": cfg.to_dict(), "state": net.state_dict(), "hist": hist, "steps": r}, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
