#!/usr/bin/env python
"""Time an ensemble's fine nets on the 19 windows of one image: one net on 2 and on 1 threads, the
nets one after another on 2 threads (as ``refine`` runs them) and side by side on one thread each
(a trial: a thread pool, each of its threads set to one torch thread), taking turns call by call
(a shared machine's speed drifts from minute to minute). On this project's 2-core EPYC machine
side by side was no faster (``benchmarks/results/fine_side_by_side.json``), so ``refine`` does not
do it.

Usage::

    python benchmarks/fine_side_by_side.py --out benchmarks/results/fine_side_by_side.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file with a fine ensemble (default: the shipped model)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    from concurrent.futures import ThreadPoolExecutor

    from napari_glimpse.coarse import inference_net, members_of
    from napari_glimpse.inference import GlimpseModel

    model = GlimpseModel.load(a.model, "cpu")
    nets = members_of(model.fine)
    if len(nets) < 2:
        print("the model's fine stage is a single net", file=sys.stderr)
        return 2
    cfg = nets[0].cfg
    win = torch.rand(cfg.n_landmarks, cfg.context, cfg.patch, cfg.patch, generator=torch.Generator().manual_seed(0)) * 255
    ks = torch.arange(cfg.n_landmarks)
    fused = [inference_net(n) for n in nets]
    pool = ThreadPoolExecutor(len(fused))

    def one_thread(f):
        torch.set_num_threads(1)  # this pool thread's own count
        with torch.inference_mode():
            return f(win)[ks, ks]

    def side_by_side():
        try:
            return list(pool.map(one_thread, fused))
        finally:
            torch.set_num_threads(2)  # the process-wide count, which the pool threads' setting overwrote

    def with_threads(n, f):
        def g():
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                return f()
            finally:
                torch.set_num_threads(before)
        return g

    ways = {
        "one_net_2_threads_ms": with_threads(2, lambda: fused[0](win)),
        "one_net_1_thread_ms": with_threads(1, lambda: fused[0](win)),
        "one_after_another_2_threads_ms": with_threads(2, lambda: [f(win) for f in fused]),
        "side_by_side_ms": with_threads(2, side_by_side),
    }
    rounds = []
    with torch.inference_mode():
        for f in ways.values():  # warm up
            f()
            f()
        for r in range(a.rounds):
            # the ways take turns call by call, so that the machine's drift falls on all of them alike
            times = {k: [] for k in ways}
            for _ in range(a.repeats):
                for k, f in ways.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            row = {k: float(np.median(v) * 1000) for k, v in times.items()}
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    out = {"rounds": rounds, "nets": len(nets), "windows": cfg.n_landmarks, "repeats": a.repeats,
           "model": a.model or "default", "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(["benchmarks/fine_side_by_side.py", *(argv or sys.argv[1:])])}
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
