#!/usr/bin/env python
"""ISBI 2015 accuracy benchmark: a napari-glimpse model file, or the peer, on Test1.

Protocol (the same for napari-glimpse and the peer):

* Ground truth: the mean of the senior and junior doctors' points. Every choice is made on the
  validation split, Train 131-150; Test1 (151-300) is read once, for a model about to ship.
* ``glimpse`` (the default method): evaluate a model file (``--model``: a path or a packaged
  model's name, default the shipped ``default``) on Test1, or with ``--split val`` on the
  validation split. The model answers with the settings it carries (glimpse iterations, flip
  averaging, fine looks, decode windows, int8 graphs). The shipped model is rebuilt by
  ``napari-glimpse train --recipe default``.
* ``landmarker``: the peer, ``benchmarks/peer_landmarker.py`` (``pip install -c constraints.txt
  -e ".[benchmark]"``), trained here for ``--budget-min`` minutes of wall time (data loading
  excluded, validation included) on ``--threads`` CPU threads, on Train 001-130 with its
  checkpoint chosen on 131-150, or with ``--train-all`` on 001-150 (its last weights); the
  process CPU time is recorded too.
* Accuracy: MRE +- SD, SDR at 2/2.5/3/4 mm, the per-landmark table and every prediction; for
  napari-glimpse the same on every image mirrored left-right (labels mirrored with it: the
  facing-left check; the peer is not trained for it).
* Speed: seconds per image at inference, model loaded, image already decoded in memory
  (pyramid / resize, network, decoding all included), median over 20 images of the split, on
  ``--speed-threads`` threads (default 2: the whole machine).

The record (``--out``) has the layout of ``benchmarks/results/isbi_test1.json`` (napari-glimpse)
and ``benchmarks/results/peer_landmarker_test1.json`` (the peer): ``test`` (``overall``,
``per_landmark``), ``test_mirrored``, ``test_predictions``, ``seconds_per_image``,
``speed_threads``, ``protocol`` (``test`` names the split read), ``machine``, ``date``,
``command``; for a model file also what it carries (``train``, ``curve``, ``config``, its
inference settings, ``int8_nets``), for the peer its training run (``train``, ``curve``,
``config``, ``budget_min``, ``threads``, ``seed``).

Usage::

    python benchmarks/isbi.py --out benchmarks/results/isbi_test1.json
    python benchmarks/isbi.py --model runs/default.pt --split val --out runs/default_val.json
    python benchmarks/isbi.py --method landmarker --train-all --budget-min 115 --threads 2 --seed 0 \\
        --out benchmarks/results/peer_landmarker_test1.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "isbi2015"
N_TRAIN = 130  # Train 001-130 train, 131-150 validate
SPLITS = {"test1": "ISBI Test1 151-300", "val": "ISBI Train 131-150 (the validation split)"}


def ready(data, threads: int) -> bool:
    """Whether the ISBI data is at ``data`` (else says so on stderr); torch then runs ``threads``
    threads. The benchmarks' common start: ``if not ready(a.data, a.threads): return 2``."""
    if not Path(data).exists():
        print(f"ISBI data not found at {data}", file=sys.stderr)
        return False
    torch.set_num_threads(threads)
    return True


def write_json(path, res: dict) -> None:
    """A benchmark's record: ``res`` as indented JSON (numpy scalars as floats), folders made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=float))


def _speed(fn, images: list[np.ndarray], threads: int) -> float:
    """Median seconds of ``fn(image)`` over ``images`` (after one warm-up call), on ``threads``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn(images[0])  # warm-up
        ts = []
        for im in images:
            t = time.perf_counter()
            fn(im)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    finally:
        torch.set_num_threads(old)


def _settings(model) -> dict:
    """What a model file carries besides its weights: its training record (times, curve, configs)
    and the inference settings it answers with (every net of each stage is used)."""
    from napari_glimpse.coarse import members_of

    m = model.meta
    coarse = members_of(model.coarse) if model.coarse is not None else []
    fine = members_of(model.fine) if model.fine is not None else []
    return {
        "train": {k: m.get(k) for k in ("train_wall_s", "coarse_train_wall_s", "fine_train_wall_s", "train_steps")},
        "curve": m.get("coarse_history", []) + m.get("fine_history", []) + m.get("history", []),
        "config": {"model": model.config.to_dict(), "coarse": [n.cfg.to_dict() for n in coarse],
                   "fine": [n.cfg.to_dict() for n in fine]},
        "iterations": model.default_iterations,
        "coarse_flip_average": bool(m.get("coarse_flip_average", False)),
        "coarse_blend": float(m.get("coarse_blend", 0.0)),
        "fine_steps": model.fine_steps,
        "coarse_nets": list(range(len(coarse))),
        "fine_nets": list(range(len(fine))),
        "coarse_decode_window": model.coarse_decode_window if coarse else None,
        "fine_decode_window": model.fine_decode_window if fine else None,
        "int8_nets": list(model.int8_nets),
    }


def run_glimpse(a, ds, log) -> dict:
    """Evaluate the model file ``--model`` on ``ds``: as it is, then mirrored, then its speed."""
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.training import evaluate_model

    model = GlimpseModel.load(a.model, "cpu")
    res: dict = {"method": "glimpse", "model": str(a.model), **_settings(model)}
    res["threads"] = a.threads
    r = evaluate_model(model, ds, progress=False)
    res["test"] = {k: r[k] for k in ("overall", "per_landmark")}
    log(f"{a.split}: MRE {r['overall']['mre_mm']:.3f} mm, SDR2 {r['overall']['sdr']['2']:.1f} %")
    rm = evaluate_model(model, ds, progress=False, mirror=True)
    res["test_mirrored"] = {k: rm[k] for k in ("overall", "per_landmark")}
    log(f"{a.split} mirrored: MRE {rm['overall']['mre_mm']:.3f} mm")
    res["test_predictions"] = np.asarray(r["predictions"]).round(2).tolist()
    imgs = [ds.image(i) for i in range(min(20, len(ds)))]
    res["seconds_per_image"] = _speed(lambda im: model.predict(im), imgs, a.speed_threads)
    res["speed_threads"] = a.speed_threads
    log(f"inference {res['seconds_per_image']:.3f} s/image ({a.speed_threads} threads)")
    res["protocol"] = {"train": {k: model.meta.get(k) for k in ("n_train_images", "coarse_n_train_images",
                                                                 "fine_n_train_images")},
                       "val": None}
    return res


def run_landmarker(a, train_ds, val_ds, test_ds, log) -> dict:
    """Train the peer (``benchmarks/peer_landmarker.py``) and evaluate it on ``test_ds``."""
    from napari_glimpse.metrics import radial_errors, summarize

    sys.path.insert(0, str(HERE.parent))
    from peer_landmarker import train_and_predict

    def imgs(ds):
        return [ds.image(i) for i in range(len(ds))]

    # with --train-all there is no validation split: the peer's last weights are its answer
    tr_i, te_i = imgs(train_ds), imgs(test_ds)
    va_i = imgs(val_ds) if val_ds is not None else []
    va_p = val_ds.ground_truth("mean") if val_ds is not None else np.zeros((0, len(train_ds.landmark_names), 2))
    t0, c0 = time.monotonic(), time.process_time()
    r = train_and_predict(tr_i, train_ds.ground_truth("mean"), va_i, va_p, te_i,
                          budget_s=a.budget_min * 60, threads=a.threads, seed=a.seed, log=log)
    res = {"method": "landmarker", "config": r.get("config"), "curve": r.get("curve"),
           "train": {"wall_s": r.get("train_wall_s"), "cpu_s": r.get("train_cpu_s"),
                     "wall_incl_test_s": time.monotonic() - t0, "cpu_incl_test_s": time.process_time() - c0}}
    pred = np.asarray(r["test_pred"], dtype=np.float64)
    s = summarize(radial_errors(pred, test_ds.ground_truth("mean"), test_ds.pixel_spacing), test_ds.landmark_names)
    res["test"] = s
    res["test_predictions"] = pred.round(2).tolist()
    res["seconds_per_image"] = r.get("seconds_per_image")
    res["speed_threads"] = r.get("speed_threads", a.threads)
    res.update({"budget_min": a.budget_min, "threads": a.threads, "seed": a.seed})
    res["protocol"] = {"train": f"ISBI Train 001-{150 if a.train_all else N_TRAIN:03d}",
                       "val": "ISBI Train 131-150" if val_ds else None}
    log(f"Test1: MRE {s['overall']['mre_mm']:.3f} mm, SDR2 {s['overall']['sdr']['2']:.1f} %")
    return res


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["glimpse", "landmarker"], default="glimpse",
                   help="glimpse: evaluate a napari-glimpse model file; landmarker: train and evaluate the peer")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the ISBI 2015 folder")
    p.add_argument("--model", default="default",
                   help="glimpse: the model file, or a packaged model's name (default: the shipped 'default')")
    p.add_argument("--split", choices=sorted(SPLITS), default="test1",
                   help="glimpse: evaluate on Test1 (default) or on the validation split, Train 131-150")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the peer: while it trains)")
    p.add_argument("--speed-threads", type=int, default=2, help="torch threads for the speed measurement")
    p.add_argument("--budget-min", type=float, help="landmarker: training wall time, minutes (default 100)")
    p.add_argument("--seed", type=int, help="landmarker: its training seed (default 0)")
    p.add_argument("--train-all", action="store_true",
                   help="landmarker: train on all of Train 001-150 (no validation split: its last weights)")
    p.add_argument("--limit", type=int, help="smoke test: use only this many images of each split")
    p.add_argument("--out", required=True, help="JSON to write")
    return p


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.method == "glimpse" and (a.budget_min is not None or a.seed is not None or a.train_all):
        p.error("--budget-min, --seed and --train-all train the peer; a napari-glimpse model is rebuilt by "
                "'napari-glimpse train --recipe default' and evaluated here as a file (--model)")
    if a.method == "landmarker" and (a.model != "default" or a.split != "test1"):
        p.error("--model and --split are for a napari-glimpse model; the peer is trained here and read on Test1")
    a.budget_min = 100.0 if a.budget_min is None else a.budget_min
    a.seed = 0 if a.seed is None else a.seed

    from napari_glimpse.io import load_dataset

    if not ready(a.data, a.threads):
        return 2
    root = Path(a.data)
    train = load_dataset(root, "train")
    test = load_dataset(root, "test1")

    def first(ds, idx):
        return ds.subset(list(idx)[: a.limit] if a.limit else list(idx))

    def log(msg: str) -> None:
        print(f"[{_dt.datetime.now():%H:%M:%S}] {msg}", flush=True)

    if a.method == "glimpse":
        ds = first(test, range(len(test))) if a.split == "test1" else first(train, range(N_TRAIN, len(train)))
        log(f"glimpse: {a.model} on {SPLITS[a.split]}, {len(ds)} images")
        res = run_glimpse(a, ds, log)
    else:
        n_train = len(train) if a.train_all else N_TRAIN
        train_ds = first(train, range(n_train))
        val_ds = None if a.train_all else first(train, range(n_train, len(train)))
        ds = first(test, range(len(test)))
        log(f"landmarker: train {len(train_ds)}, val {len(val_ds) if val_ds else 0}, test {len(ds)}; "
            f"budget {a.budget_min} min, {a.threads} threads")
        res = run_landmarker(a, train_ds, val_ds, ds, log)
    res["protocol"].update({"test": SPLITS[a.split], "ground_truth": "mean of senior and junior", "n_test": len(ds),
                            "limit": a.limit})
    res.update({
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    })
    write_json(a.out, res)
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
