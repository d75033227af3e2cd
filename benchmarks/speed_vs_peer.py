#!/usr/bin/env python
"""Inference speed of napari-glimpse models against the peer, on the machine at hand.

Machines differ (the same models run 1.2-1.8x slower on this project's AMD EPYC hosts than on its
Intel Xeon), and a shared machine's speed drifts from minute to minute, so a speed bound is only
checked fairly by timing both sides together: ``--rounds`` interleaved rounds, each timing every
model and then the peer (``benchmarks/peer_landmarker.py``: its SpatialConfigurationNet at
320x256; speed does not depend on weights) as ``benchmarks/isbi.py`` does: median seconds per
image over 20 Test1 images, model loaded, image decoded in memory, ``--threads`` torch threads.

Usage::

    python benchmarks/speed_vs_peer.py --out benchmarks/results/speed_vs_peer.json   # the shipped default
    python benchmarks/speed_vs_peer.py --model runs/a.pt runs/b.pt --out /tmp/speed.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from isbi import DEFAULT_DATA, _speed, ready, write_json  # noqa: E402 (sibling scripts, after the sys.path insert)
from peer_landmarker import inference_speed  # noqa: E402 (as above)
from speed import cpu_model  # noqa: E402 (as above)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["default"],
                    help="napari-glimpse model files ('default': the shipped model)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel
    from napari_glimpse.io import load_dataset

    if not ready(a.data, a.threads):
        return 2
    test = load_dataset(a.data, "test1")
    images = [test.image(i) for i in range(min(a.images, len(test)))]
    paths = [str(DEFAULT_MODEL) if m == "default" else m for m in a.model]
    models = {p: GlimpseModel.load(p, "cpu") for p in paths}
    labels = dict(zip(paths, a.model), peer="peer")  # as given on the command line
    rounds = []
    for r in range(a.rounds):
        row = {p: _speed(lambda im, m=m: m.predict(im), images, a.threads) for p, m in models.items()}
        row["peer"] = inference_speed(images, a.threads)
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{labels[k]} {v:.3f} s" for k, v in row.items()), flush=True)
    res = {
        "seconds_per_image": {k: [row[k] for row in rounds] for k in rounds[0]},
        "ratio_to_peer": {p: [row[p] / row["peer"] for row in rounds] for p in paths},
        "threads": a.threads, "images": len(images),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": cpu_model(),
                    "torch": torch.__version__},
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    write_json(a.out, res)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
