#!/usr/bin/env python
"""The coarse and fine nets' inference copies with their weights in channels-last layout (as
:func:`napari_glimpse.coarse.inference_net` makes them) against the default layout: the answers
on the validation split (Train 131-150) and the whole prediction's time on 20 Test1 images, the
two layouts taking turns image by image in one process (a shared machine's speed drifts).

Usage::

    python benchmarks/weight_layout.py --model runs/r17/validated.pt --out benchmarks/results/weight_layout.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from isbi import DEFAULT_DATA, N_TRAIN  # noqa: E402
from speed import cpu_model  # noqa: E402


def _set_layout(model, layout: torch.memory_format) -> None:
    """Put every inference copy of the model's coarse and fine nets into ``layout``."""
    from napari_glimpse.coarse import inference_net, members_of

    for stage in (model.coarse, model.fine):
        for net in members_of(stage) if stage is not None else []:
            inference_net(net).to(memory_format=layout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset
    from napari_glimpse.metrics import radial_errors
    from napari_glimpse.training import evaluate_model

    torch.set_num_threads(a.threads)
    model = GlimpseModel.load(a.model, device="cpu")
    layouts = {"default": torch.contiguous_format, "channels_last": torch.channels_last}
    train = load_dataset(a.data, "train")
    val = train.subset(range(N_TRAIN, len(train)))
    truth = val.ground_truth("mean")
    preds, mre = {}, {}
    for name, layout in layouts.items():
        _set_layout(model, layout)
        preds[name] = evaluate_model(model, val, progress=False)["predictions"]
        mre[name] = float(radial_errors(preds[name], truth, val.pixel_spacing).mean())
    move = np.abs(preds["channels_last"] - preds["default"])
    test = load_dataset(a.data, "test1")
    images = [test.image(i) for i in range(min(a.images, len(test)))]
    # one model per layout, each image timed on both in turn (the order alternating), so that
    # the machine's drift falls on both alike
    models = {"default": model, "channels_last": GlimpseModel.load(a.model, device="cpu")}
    for name, m in models.items():
        _set_layout(m, layouts[name])
        for im in images[:2]:
            m.predict(im)
    seconds = {name: [] for name in layouts}
    ratios = []
    for r in range(a.rounds):
        ts = {name: [] for name in layouts}
        for i, im in enumerate(images):
            for name in (list(layouts) if i % 2 == 0 else list(layouts)[::-1]):
                t0 = time.perf_counter()
                models[name].predict(im)
                ts[name].append(time.perf_counter() - t0)
        for name in layouts:
            seconds[name].append(statistics.median(ts[name]))
        ratios.append(statistics.median(b / d for b, d in zip(ts["channels_last"], ts["default"])))
        print(f"round {r + 1}: " + ", ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items())
              + f", median per-image ratio {ratios[-1]:.3f}")
    rec = {
        "model": a.model or "default",
        "val_mre_mm": mre,
        "val_max_answer_move_px": float(move.max()),
        "val_mean_answer_move_px": float(move.mean()),
        "seconds_per_image": seconds,
        "median_ratio_channels_last_to_default": ratios,
        "threads": a.threads, "images": len(images),
        "machine": cpu_model(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/weight_layout.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rec, indent=1))
    print(f"validation MRE {mre}; answers moved up to {move.max():.4f} px; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
