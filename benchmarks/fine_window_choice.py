#!/usr/bin/env python
"""A choice of fine nets where each net may read its heatmaps with its own decode window.

An ensemble's answer after one fine look is the mean of its nets' answers from the same coarse
start (:func:`napari_glimpse.fine.refine`), so each net's validation answers (Train 131-150) are
computed once per window and subsets are averaged here; the record checks that the plain
ensemble's figure is reproduced. Test1 is not read. Run 34::

    python benchmarks/fine_window_choice.py --model benchmarks/models/validated_run32.pt \
        --fine runs/rb/val_fine_doctors_avg0.9995.pt --names A C X5 X7 --windows X7=10,16,24,31 \
        --max-nets 3 --out benchmarks/results/run34_choice.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import itertools
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from isbi import DEFAULT_DATA, N_TRAIN, ready, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="validated model: coarse stage, choice, fine nets")
    ap.add_argument("--fine", nargs="*", default=[], help="more models whose fine nets join")
    ap.add_argument("--names", nargs="+", required=True, help="a name per fine net, the model's first")
    ap.add_argument("--windows", nargs="*", default=[], metavar="NAME=W,W",
                    help="decode windows to try for a net (others keep the model's)")
    ap.add_argument("--max-nets", type=int, default=3)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    from napari_glimpse.coarse import members_of
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset
    from napari_glimpse.metrics import radial_errors
    from napari_glimpse.training import evaluate_model

    if not ready(a.data, a.threads):
        return 2
    model = GlimpseModel.load(a.model, "cpu")
    nets = members_of(model.fine) + [n for f in a.fine for n in members_of(GlimpseModel.load(f, "cpu").fine)]
    if len(nets) != len(a.names):
        ap.error(f"{len(nets)} fine nets, {len(a.names)} names")
    base_w = model.fine_decode_window
    tries = {name: [base_w] for name in a.names}
    for spec in a.windows:
        name, ws = spec.split("=")
        if name not in tries:
            ap.error(f"--windows {spec}: no fine net named {name!r} (names: {' '.join(a.names)})")
        tries[name] = [int(w) for w in ws.split(",")]
    train = load_dataset(a.data, "train")
    val = train.subset(range(N_TRAIN, len(train)))
    truth = val.ground_truth("mean")

    def mre(p: np.ndarray) -> float:
        return float(radial_errors(p, truth, val.pixel_spacing).mean())

    answers: dict[tuple[str, int], np.ndarray] = {}
    for name, net in zip(a.names, nets):
        m = copy.copy(model)
        m.meta = dict(model.meta)
        m.fine = net
        for w in tries[name]:
            m.meta["fine_decode_window"] = w
            answers[name, w] = np.asarray(evaluate_model(m, val, iterations=0, progress=False)["predictions"])
            print(f"{name} w={w}: {mre(answers[name, w]):.5f} mm", flush=True)
    plain = mre(np.asarray(evaluate_model(model, val, iterations=0, progress=False)["predictions"]))
    first = a.names[: len(members_of(model.fine))]
    averaged = mre(np.mean([answers[n, base_w] for n in first], axis=0))
    choices = []
    for r in range(1, a.max_nets + 1):
        for sub in itertools.combinations(a.names, r):
            for ws in itertools.product(*(tries[n] for n in sub)):
                err = radial_errors(np.mean([answers[n, w] for n, w in zip(sub, ws)], axis=0), truth,
                                    val.pixel_spacing)
                choices.append({"nets": list(sub), "windows": list(ws), "mre_mm": float(err.mean()),
                                "sdr2_pct": float((err < 2).mean() * 100)})
    choices.sort(key=lambda c: c["mre_mm"])
    for c in choices[:8]:
        print(c)
    write_json(a.out, {
        "model": a.model, "fine": a.fine, "names": a.names, "windows_tried": tries, "split": "Train 131-150",
        "check": {"model_ensemble_mre_mm": plain, "its_nets_answers_averaged_mre_mm": averaged},
        "alone": {f"{n} w={w}": mre(p) for (n, w), p in answers.items()},
        "choices": choices, "best": choices[0],
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
    })
    print(f"check: the model's ensemble {plain:.5f} mm, its nets' answers averaged {averaged:.5f} mm; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
