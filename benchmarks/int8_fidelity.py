#!/usr/bin/env python
"""How far int8 graphs move a model's answers from its float nets', by quantizing variant (run 29).

Each variant is made from the model's float nets with :func:`napari_glimpse.int8.quantize`:

* ``V0``: every net, calibrated on Train ``0:150:15`` (as the shipped file);
* ``V1``: the fine nets only (the coarse net runs float), the same calibration;
* ``V2``: every net, calibrated on 30 images, Train ``0:150:5``;
* ``V3``: every net with its first and last convolution float (``float_ends``), as V0's calibration.

``--fidelity``: on every Train image no variant calibrates on (120), each answer's distance from
the float model's (mm): RMS (the rule's measure), mean, largest, count above 0.5 mm. No labels are
read. ``--timing``: interleaved rounds over 20 Test1 images (images only), each variant's median
seconds per image per round (run it on an idle machine). Variants are saved to ``--workdir`` and
reused by a later ``--timing`` run. Writes JSON (``--out``, updated in place).

Usage::

    python benchmarks/int8_fidelity.py --fidelity --out benchmarks/results/run29_fidelity.json
    python benchmarks/int8_fidelity.py --timing --rounds 6 --out benchmarks/results/run29_fidelity.json
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from isbi import DEFAULT_DATA, ready, write_json  # noqa: E402

VARIANTS = {
    "V0": dict(calibrate=slice(0, 150, 15), which=("coarse", "fine"), float_ends=False),
    "V1": dict(calibrate=slice(0, 150, 15), which=("fine",), float_ends=False),
    "V2": dict(calibrate=slice(0, 150, 5), which=("coarse", "fine"), float_ends=False),
    "V3": dict(calibrate=slice(0, 150, 15), which=("coarse", "fine"), float_ends=True),
}


def _describe(v: dict) -> dict:
    c = v["calibrate"]
    return {"calibrate": f"{c.start}:{c.stop}:{c.step}", "which": list(v["which"]), "float_ends": v["float_ends"]}


def make_variants(model_path: str, train, workdir: Path) -> dict:
    from napari_glimpse import int8
    from napari_glimpse.inference import GlimpseModel

    workdir.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, v in VARIANTS.items():
        out = workdir / f"{name}.pt"
        m = GlimpseModel.load(model_path, "cpu")
        idx = list(range(len(train)))[v["calibrate"]]
        t = time.perf_counter()
        int8.quantize(m, [train.image(i) for i in idx], which=v["which"], float_ends=v["float_ends"])
        made[name] = {"seconds": time.perf_counter() - t, "int8_nets": list(m.int8_nets)}
        m.save(out, half_weights=True)
        print(f"{name}: {made[name]}", flush=True)
    return made


def fidelity(model_path: str, train, workdir: Path, limit: int | None = None) -> dict:
    from napari_glimpse.inference import GlimpseModel

    calibrated = set()
    for v in VARIANTS.values():
        calibrated |= set(range(len(train))[v["calibrate"]])
    images = [i for i in range(len(train)) if i not in calibrated][:limit]
    ref_model = GlimpseModel.load(model_path, "cpu", int8=False)
    models = {name: GlimpseModel.load(workdir / f"{name}.pt", "cpu") for name in VARIANTS}
    px = ref_model.pixel_spacing
    moves: dict = {name: [] for name in models}
    for n, i in enumerate(images):
        im = train.image(i)
        ref = ref_model.predict(im).final
        for name, m in models.items():
            moves[name].append(np.linalg.norm(m.predict(im).final - ref, axis=-1) * px)
        if (n + 1) % 20 == 0:
            print(f"{n + 1}/{len(images)} images", flush=True)
    out = {}
    for name, d in moves.items():
        d = np.stack(d)  # (images, landmarks) mm
        worst = np.unravel_index(int(d.argmax()), d.shape)
        out[name] = {"rms_mm": float(np.sqrt((d ** 2).mean())), "mean_mm": float(d.mean()),
                     "median_mm": float(np.median(d)), "max_mm": float(d.max()),
                     "max_at": {"image": f"{images[worst[0]] + 1:03d}", "landmark": int(worst[1]) + 1},
                     "over_0.5_mm": int((d > 0.5).sum()), "over_1_mm": int((d > 1.0).sum()), "points": int(d.size),
                     "int8_nets": list(models[name].int8_nets)}
        print(name, {k: v for k, v in out[name].items() if k != "int8_nets"}, flush=True)
    return {"images": [f"{i + 1:03d}" for i in images], "variants": out}


def timing(workdir: Path, test, rounds: int, threads: int) -> dict:
    from napari_glimpse.inference import GlimpseModel

    ims = [test.image(i) for i in range(20)]
    models = {name: GlimpseModel.load(workdir / f"{name}.pt", "cpu") for name in VARIANTS}
    names = list(models)
    for m in models.values():
        for im in ims[:2]:
            m.predict(im)
    per: dict = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # each variant takes each turn
        for name in order:
            ts = []
            for im in ims:
                t = time.perf_counter()
                models[name].predict(im)
                ts.append(time.perf_counter() - t)
            per[name].append(statistics.median(ts))
        print(f"round {r + 1}: " + ", ".join(f"{n} {per[n][-1] * 1000:.1f} ms" for n in names), flush=True)
    return {"seconds_per_image": per,
            "median_round_s": {n: statistics.median(v) for n, v in per.items()},
            "minus_V0_ms": {n: statistics.median((a - b) * 1000 for a, b in zip(per[n], per["V0"])) for n in names},
            "rounds": rounds, "threads": threads, "images": len(ims)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model file ('default': the shipped model)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workdir", type=Path, default=Path("runs/r29"))
    ap.add_argument("--fidelity", action="store_true")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--limit", type=int, help="fidelity on the first N of the 120 images only (a smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    from napari_glimpse.inference import DEFAULT_MODEL
    from napari_glimpse.io import load_dataset

    if not ready(a.data, a.threads):
        return 2
    model = str(DEFAULT_MODEL) if a.model == "default" else a.model
    res = json.loads(a.out.read_text()) if a.out.exists() else {}
    res.update({"model": a.model, "variants": {n: _describe(v) for n, v in VARIANTS.items()}})
    if a.fidelity:
        train = load_dataset(a.data, "train")
        res["made"] = make_variants(model, train, a.workdir)
        res["fidelity"] = fidelity(model, train, a.workdir, a.limit)
    if a.timing:
        res["timing"] = timing(a.workdir, load_dataset(a.data, "test1"), a.rounds, a.threads)
        res["timing"]["date"] = _dt.datetime.now().isoformat(timespec="seconds")
    res.setdefault("commands", []).append(" ".join(sys.argv))
    res["date"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_json(a.out, res)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
