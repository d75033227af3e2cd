"""How alike fine nets err: each net's answer on validation (Train 131-150) after the model's own
coarse answer, and the per-coordinate correlation of their errors (mm), written as JSON; also the
model's own fine stage's MRE and mean error per landmark (bias). ``--images train-odd`` reads
training images instead (Train 001, 003, ..., 129: how closely the nets fit what they learnt).

    python benchmarks/fine_error_correlation.py --model runs/r17/validated.pt \
        --add-fine runs/r20/val_fine_l2_avg0.9995.pt --names A C E L \
        --out benchmarks/results/run20_error_correlation.json

``--model``: a model with a coarse stage and a fine stage (one net or an ensemble); its coarse
choice (flip averaging, decode window) and fine decode window are used. ``--add-fine``: more
models whose fine nets join the comparison. Test1 is not read.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2015"


def main(argv: list[str] | None = None) -> int:
    from napari_glimpse.coarse import members_of
    from napari_glimpse.fine import refine
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--add-fine", nargs="*", default=[], metavar="MODEL")
    p.add_argument("--names", nargs="*", help="a name for each fine net (default: 0, 1, ...)")
    p.add_argument("--images", choices=("val", "train-odd"), default="val",
                   help="val: Train 131-150 (default); train-odd: Train 001, 003, ..., 129")
    p.add_argument("--data", default=str(REAL_DATA))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = GlimpseModel.load(a.model, device="cpu")
    if model.coarse is None or model.fine is None:
        raise SystemExit(f"{a.model} needs a coarse and a fine stage")
    nets = members_of(model.fine) + [n for f in a.add_fine for n in members_of(GlimpseModel.load(f, device="cpu").fine)]
    names = a.names or [str(i) for i in range(len(nets))]
    if len(names) != len(nets):
        raise SystemExit(f"{len(names)} names for {len(nets)} fine nets")
    ds = load_dataset(a.data, "train")
    idx = list(range(130, min(150, len(ds)))) if a.images == "val" else list(range(0, min(130, len(ds)), 2))
    truth = ds.ground_truth()[idx]
    answers = []
    for i in idx:
        pyr = model.pyramid(ds.image(i))
        start = model.locate_coarse(pyr, fine_steps=0)[0]  # the coarse answer, as the model reads it
        answers.append([refine(n, pyr.levels, pyr.shape, start, 1, model.fine_decode_window)[0] for n in nets])
    err = (np.array(answers) - truth[:, None]) * ds.pixel_spacing  # (N, nets, K, 2) mm
    corr = {f"{names[x]}-{names[y]}": round(float(np.corrcoef(err[:, x].ravel(), err[:, y].ravel())[0, 1]), 3)
            for x in range(len(nets)) for y in range(x + 1, len(nets))}
    mre = {n: round(float(np.linalg.norm(err[:, j], axis=-1).mean()), 4) for j, n in enumerate(names)}
    own = err[:, :len(members_of(model.fine))].mean(1)  # the model's fine stage: its nets' mean answer
    bias = own.mean(0)  # (K, 2) mean error per landmark, mm
    res = {"images": a.images, "n_images": len(idx), "image_names": [ds.image_paths[i].name for i in idx],
           "error_correlation_per_coordinate": corr, "mre_mm": mre,
           "model_fine_stage_mre_mm": round(float(np.linalg.norm(own, axis=-1).mean()), 4),
           "model_fine_stage_mean_error_mm": {name: [round(float(v), 3) for v in b]
                                              for name, b in zip(ds.landmark_names, bias)},
           "model": a.model, "add_fine": a.add_fine, "coarse_flip_average": bool(model.meta.get("coarse_flip_average")),
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
