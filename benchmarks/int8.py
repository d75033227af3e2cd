#!/usr/bin/env python
"""Int8 inference of a napari-glimpse model against its float nets, on an ISBI split.

Quantizes the model's coarse and fine nets (:func:`napari_glimpse.int8.quantize`), calibrated on
ISBI Train images ``--calibrate START:STOP:STEP`` (0-based: ``0:130:13`` = 001, 014, ..., 118), then
reads ``--split`` with the float nets and with the int8 graphs: MRE, SDR, how far int8 moves each
answer, and interleaved timings (median seconds per image, model loaded, ``--threads``); also each
net's own time, float and int8, on one image's inputs (``per_net_ms``). Writes JSON; ``--save-as`` keeps the quantized model (weights as they were read: float16 if they were).

Usage::

    python benchmarks/int8.py --model runs/r24/validated_any.pt --calibrate 0:130:13 --split val \\
        --out benchmarks/results/run25_int8_val.json
    python benchmarks/int8.py --model runs/r24/default.pt --calibrate 0:150:15 --split none \\
        --save-as runs/r25/default.pt --out benchmarks/results/run25_quantize.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from isbi import DEFAULT_DATA, N_TRAIN, ready, write_json  # noqa: E402


def _slice(text: str) -> slice:
    parts = [int(p) for p in text.split(":")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("START:STOP:STEP")
    return slice(*parts)


def _per_net_ms(model, image, rounds: int) -> dict:
    """Each coarse and fine net's time (ms, median of ``rounds`` x 20 runs, float and int8 in turn)
    on the inputs it sees when the model reads ``image``."""
    from napari_glimpse import int8
    from napari_glimpse.coarse import inference_net

    model.use_int8(False)
    seen = int8.record_inputs(model, [image], None)
    model.use_int8(True)
    out = {}
    for stage, nets in int8.stages(model).items():
        for i, net in enumerate(nets):
            x = torch.from_numpy(seen[id(net)][0])
            ts: dict = {"float": [], "int8": []}
            with torch.inference_mode():
                for _ in range(rounds):
                    for kind in ("float", "int8"):
                        f = inference_net(net, int8=kind == "int8")
                        f(x)
                        t = time.perf_counter()
                        for _ in range(20):
                            f(x)
                        ts[kind].append((time.perf_counter() - t) / 20 * 1000)
            out[f"{stage}{i} {tuple(x.shape)}"] = {k: statistics.median(v) for k, v in ts.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--calibrate", type=_slice, required=True, help="Train images START:STOP:STEP (0-based)")
    ap.add_argument("--split", choices=["val", "test1", "none"], default="val",
                    help=f"val: Train {N_TRAIN + 1:03d}-150; test1: Test1 (final figures only); none: just quantize")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (float, int8)")
    ap.add_argument("--save-as", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    from napari_glimpse import int8
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset
    from napari_glimpse.metrics import radial_errors, summarize

    if not ready(a.data, a.threads):
        return 2
    train = load_dataset(a.data, "train")
    calib = list(range(len(train)))[a.calibrate]
    if a.split == "val" and any(i >= N_TRAIN for i in calib):
        ap.error(f"calibrating on validation images (Train {N_TRAIN + 1:03d}-150) while reading them")
    model = GlimpseModel.load(a.model, "cpu")
    t0 = time.monotonic()
    n = int8.quantize(model, [train.image(i) for i in calib])
    res: dict = {"model": a.model, "calibration_images": [train.image_paths[i].name for i in calib],
                 "nets_quantized": n, "quantize_s": time.monotonic() - t0, "int8_nets": list(model.int8_nets)}
    print(f"quantized {n} nets in {res['quantize_s']:.1f} s", flush=True)
    res["per_net_ms"] = _per_net_ms(model, train.image(calib[0]), a.rounds)
    print("per net, ms (float, int8): " + "; ".join(f"{k} {v['float']:.1f}, {v['int8']:.1f}"
                                                    for k, v in res["per_net_ms"].items()), flush=True)
    if a.save_as:
        from napari_glimpse.checkpoint import read_checkpoint

        stored = read_checkpoint(a.model).get("weights_stored_as", "float32")
        model.save(a.save_as, half_weights=stored == "float16")
        res["saved_as"] = str(a.save_as)
        res["bytes"] = a.save_as.stat().st_size
        print(f"saved {a.save_as} ({res['bytes']:,} bytes, weights {stored})", flush=True)
    if a.split != "none":
        ds = train.subset(range(N_TRAIN, len(train))) if a.split == "val" else load_dataset(a.data, "test1")
        truth = ds.ground_truth("mean")
        images = [ds.image(i) for i in range(len(ds))]
        preds, times = {}, {"float": [], "int8": []}
        for kind in ("float", "int8"):
            model.use_int8(kind == "int8")
            preds[kind] = np.stack([model.predict(im).final for im in images])
            err = radial_errors(preds[kind], truth, ds.pixel_spacing)
            res[kind] = summarize(err, model.landmark_names)
            print(f"{kind}: MRE {err.mean():.4f} mm, SDR2 {(err <= 2).mean() * 100:.1f} %", flush=True)
        moved = np.linalg.norm(preds["int8"] - preds["float"], axis=-1) * ds.pixel_spacing
        res["int8_moved_mm"] = {"mean": float(moved.mean()), "max": float(moved.max())}
        timed = images[:20]
        for _ in range(a.rounds):
            for kind in ("float", "int8"):
                model.use_int8(kind == "int8")
                model.predict(timed[0])
                ts = []
                for im in timed:
                    t = time.perf_counter()
                    model.predict(im)
                    ts.append(time.perf_counter() - t)
                times[kind].append(statistics.median(ts))
        res["seconds_per_image"] = times
        print("seconds per image: " + "; ".join(f"{k} {', '.join(f'{v:.3f}' for v in vs)}" for k, vs in times.items()))
    res.update(split=a.split, threads=a.threads, date=_dt.datetime.now().isoformat(timespec="seconds"),
               command=" ".join(sys.argv))
    write_json(a.out, res)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
