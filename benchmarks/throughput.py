#!/usr/bin/env python
"""Throughput of ``napari-glimpse predict`` on a folder, start-up included (issue 25).

Folders of 100 and 1000 Test1 images (symlinks to ISBI 2015 images 151-250; the 1000 repeat them
ten times under other names) go through the whole CLI, ``python -m napari_glimpse predict DIR
--out CSV --workers W`` in a subprocess, once per setting (``--workers`` 1 and 2): wall seconds
per image from the command's start to its exit, the child's peak RSS and CPU time
(``os.wait4``), and the machine's load (``os.getloadavg``) before and after each run, since
other jobs may share the cores. Every run's CSVs are checked against the one-worker run's (the
one-by-one path, as before issue 25): the same bytes (``same_csvs_as_workers_1``); the
1000-image rows against the 100's.

``--profile`` first records where the time of the one-by-one path goes (a fresh process on 20
Test1 images): start-up (imports, model load, ONNX sessions, first image's extra) and each
image's stages (read, pyramid, coarse, fine, the rest), CPU and wall, with torch on 1 and on 2
threads.

Before running, waits (up to ``--max-wait`` s) for the 1-minute load to fall to
``--quiet-load``; runs anyway after that and says so in the JSON.

``--train`` instead times training (issue 25): optimizer steps per second of the shipped
model's coarse net and one fine net (their default configs, synthetic 2400 x 1935 images) in one
process on 1 and on 2 threads and in 2 processes of 1 thread each (``torchrun --standalone
--nproc_per_node 2``, gloo), the same global batch throughout (coarse 8, fine 32: 4 and 16 per
process), the first steps left out as warm-up; also the seconds per step spent making the
batches (each process makes its share, see ``napari_glimpse.distributed``). About 2 minutes; it
writes the ``train`` part of the JSON, and nothing when the machine is not quiet by ``--max-wait``.

Writes the ``predict`` part of ``benchmarks/results/throughput.json`` (other parts, e.g. the
training part, are kept). A setting run again replaces its run, which moves to ``earlier_runs``
(e.g. one made on a busier machine); runs are compared through their CSVs' digests. About 8
minutes on 2 cores for everything.

Usage::

    python benchmarks/throughput.py [--sizes 100 1000] [--workers 1 2] [--profile] [--max-wait 600]
    python benchmarks/throughput.py --train [--max-wait 600]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2015" / "images"
TEST1 = list(range(151, 251))
OUT = ROOT / "benchmarks" / "results" / "throughput.json"


def make_folder(root: Path, n: int) -> Path:
    """``n`` symlinks ``NNNN.jpg`` to the Test1 images, image ``i`` to ``151 + i % 100``."""
    d = root / f"test1_x{n}"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        link = d / f"{i:04d}.jpg"
        if not link.exists():
            link.symlink_to(DATA / f"{TEST1[i % len(TEST1)]}.jpg")
    return d


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_quiet(threshold: float, max_wait: float) -> dict:
    """Wait until the 1-minute load is at most ``threshold`` (checked every 20 s, up to ``max_wait`` s)."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > threshold and time.monotonic() - t0 < max_wait:
        print(f"load {load()}: waiting for <= {threshold} ...", flush=True)
        time.sleep(20)
    waited = time.monotonic() - t0
    quiet = os.getloadavg()[0] <= threshold
    return {"threshold": threshold, "waited_s": round(waited, 1), "quiet_when_started": quiet, "load": load()}


def run_cli(args: list[str], log: Path) -> dict:
    """``python -m napari_glimpse ARGS`` in a child (its output to ``log``): wall seconds, the
    child's peak RSS (MB) and CPU seconds (``os.wait4``), the load before and after."""
    before = load()
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "napari_glimpse", *args], os.environ,
                             file_actions=[(os.POSIX_SPAWN_DUP2, f.fileno(), 1), (os.POSIX_SPAWN_DUP2, f.fileno(), 2)])
        samples: list[tuple[float, float]] = []
        sampler = threading.Thread(target=sample_rss, args=(pid, samples), daemon=True)
        sampler.start()
        _, status, ru = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
        sampler.join()
    text = log.read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"napari-glimpse {' '.join(args)} failed:\n{text[-2000:]}")
    summary = [ln.split("\r")[-1] for ln in text.splitlines() if "wrote " in ln]
    return {"seconds": round(wall, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "user_s": round(ru.ru_utime, 2),
            "sys_s": round(ru.ru_stime, 2), "rss_mb_by_tenth": by_tenth(samples, wall), "load_before": before,
            "load_after": load(), "summary": summary[-1] if summary else None}


def sample_rss(pid: int, into: list) -> None:
    """``(seconds, RSS MB)`` of process ``pid`` every 0.25 s until it is gone."""
    t0 = time.perf_counter()
    while True:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        rss = [ln.split()[1] for ln in text.splitlines() if ln.startswith("VmRSS:")]
        if not rss:  # a zombie: exited, not yet reaped
            return
        into.append((time.perf_counter() - t0, int(rss[0]) / 1024))
        time.sleep(0.25)


def by_tenth(samples: list[tuple[float, float]], wall: float) -> list[float | None]:
    """The largest RSS sampled in each tenth of the run (start-up in the first): flat = no growth."""
    out: list[float | None] = [None] * 10
    for t, mb in samples:
        i = min(9, int(10 * t / wall))
        out[i] = round(max(out[i] or 0.0, mb), 1)
    return out


def csv_rows(path: Path) -> list[list[str]]:
    return [ln.split(",") for ln in path.read_text().splitlines()[1:]]


def conf(p: Path) -> Path:
    return p.with_name(p.stem + "_confidence.csv")


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes() + b"\0" + conf(p).read_bytes()).hexdigest()[:16]


def run_predict(sizes: list[int], workers: list[int], tmp: Path) -> list[dict]:
    """One run per (size, workers): its figures, the digest of its two CSVs and, for a folder of
    more than 100 images run with the 100-image folder, whether its rows are the 100's."""
    runs = []
    base = None
    for n in sizes:
        folder = make_folder(tmp, n)
        for w in sorted(workers):
            out = tmp / f"p{n}_w{w}.csv"
            print(f"{n} images, --workers {w} ...", flush=True)
            r = run_cli(["predict", str(folder), "--out", str(out), "--workers", str(w)], out.with_suffix(".log"))
            r = {"images": n, "workers": w, "s_per_image": round(r["seconds"] / n, 4),
                 "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **r,
                 "csvs_sha256": digest(out)}
            if n == 100:
                base = base or csv_rows(out)
            elif base is not None:
                r["rows_same_as_the_100_image_run"] = all(row[1:] == base[i % len(base)][1:]
                                                          for i, row in enumerate(csv_rows(out)))
            print(json.dumps(r), flush=True)
            runs.append(r)
    return runs


def merge_runs(old: dict, new: list[dict]) -> tuple[list[dict], list[dict]]:
    """The runs to keep (one per setting, the newest) and the earlier runs they replace; each
    run's ``same_csvs_as_workers_1``: its CSVs' digest against the one-worker run's of its size."""
    runs = {(r["images"], r["workers"]): r for r in old.get("runs", [])}
    earlier = list(old.get("earlier_runs", []))
    for r in new:
        if (r["images"], r["workers"]) in runs:
            earlier.append(runs[(r["images"], r["workers"])])
        runs[(r["images"], r["workers"])] = r
    for (n, _), r in runs.items():
        ref = runs.get((n, 1))
        r["same_csvs_as_workers_1"] = None if ref is None else r.get("csvs_sha256") == ref.get("csvs_sha256")
    return sorted(runs.values(), key=lambda r: (r["images"], r["workers"])), earlier


def run_one_image(tmp: Path) -> dict:
    """Start-up: the CLI on one image (default workers)."""
    folder = make_folder(tmp, 1)
    r = run_cli(["predict", str(folder / "0000.jpg"), "--out", str(tmp / "one.csv")], tmp / "one.log")
    return {"what": "predict on one image, start-up included", **r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--profile", action="store_true", help="also profile the one-by-one path (stages)")
    ap.add_argument("--quiet-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=600)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--train", action="store_true", help="time training steps/s, 1 vs 2 processes (no ISBI data)")
    ap.add_argument("--train-child", type=Path, metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.train_child:
        return train_child(a.train_child, a.threads)
    if a.train:
        return run_train(a)
    if not DATA.exists():
        raise SystemExit(f"needs the ISBI 2015 images in {DATA}")
    quiet = wait_for_quiet(a.quiet_load, a.max_wait)
    doc = json.loads(a.out.read_text()) if a.out.exists() else {}
    part = doc.get("predict", {})
    part["meta"] = meta(quiet)
    with tempfile.TemporaryDirectory(prefix="throughput") as tmp:
        if a.profile:
            if "profile" in part:
                part.setdefault("earlier_profiles", []).append(part["profile"])
            part["profile"] = {f"torch_threads_{t}": profile(t) for t in (1, 2)}
        part["one_image"] = run_one_image(Path(tmp))
        part["runs"], part["earlier_runs"] = merge_runs(part, run_predict(a.sizes, a.workers, Path(tmp)))
    part["meta"]["load_at_end"] = load()
    keys = ("meta", "profile", "one_image", "runs", "earlier_profiles", "earlier_runs")
    doc["predict"] = {k: part[k] for k in keys if k in part}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")


def meta(quiet: dict) -> dict:
    import onnxruntime
    import torch

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    return {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "git_commit": commit, "model": "shipped (default.pt)", "argv": sys.argv[1:],
            "images": "ISBI 2015 Test1 (151-250.jpg, 1935x2400) as symlinks; 1000 = Test1 ten times",
            "quiet_wait": quiet,
            "notes": ["s_per_image = the whole command's wall time (python start, imports, model load, every "
                      "image, CSVs written) / images; one run per setting",
                      "peak_rss_mb and cpu_s: the child process's (os.wait4 rusage); rss_mb_by_tenth: the largest "
                      "RSS sampled (every 0.25 s, /proc) in each tenth of the run's wall time",
                      "workers 1 is the one-by-one path (torch's default threads, as before issue 25)"]}


# ---------------------------------------------------------------------------- profile
PROFILE_CHILD = r"""
import json, sys, time
T, W = time.process_time, time.perf_counter
t0, w0 = T(), W()
import torch
torch.set_num_threads(int(sys.argv[1]))
t1 = T()
import napari_glimpse.cli, napari_glimpse._predict
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import read_image
t2 = T()
m = GlimpseModel.load()
t3 = T()
paths = sys.argv[2:]
m.predict(paths[0])
t4 = T()
m.predict(paths[1])
t5 = T()
start = {"import_torch": t1 - t0, "import_napari_glimpse": t2 - t1, "model_load": t3 - t2,
         "first_image_extra": (t4 - t3) - (t5 - t4)}
cpu = dict.fromkeys(("read", "pyramid", "coarse", "fine", "predict_from_path"), 0.0)
wall = dict(cpu)
for p in paths[2:]:
    marks = [(T(), W())]
    img = read_image(p); marks.append((T(), W()))
    pyr = m.pyramid(img); marks.append((T(), W()))
    pos, spread, dis = m._coarse(pyr); marks.append((T(), W()))
    m._refine(pyr, pos, spread, disagreement=dis); marks.append((T(), W()))
    m.predict(p); marks.append((T(), W()))
    for k, (a, b) in zip(cpu, zip(marks, marks[1:])):
        cpu[k] += b[0] - a[0]
        wall[k] += b[1] - a[1]
n = len(paths) - 2
ms = lambda d: {k: round(v / n * 1000, 1) for k, v in d.items()}
print(json.dumps({"start_up_cpu_s": {k: round(v, 3) for k, v in start.items()}, "images": n,
                  "per_image_cpu_ms": ms(cpu), "per_image_wall_ms": ms(wall)}))
"""


def profile(threads: int) -> dict:
    """Where the one-by-one path's time goes (a fresh process, torch on ``threads`` threads)."""
    paths = [str(DATA / f"{i}.jpg") for i in TEST1[:22]]
    t = time.perf_counter()
    before = load()
    r = subprocess.run([sys.executable, "-c", PROFILE_CHILD, str(threads), *paths], capture_output=True, text=True,
                       check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(load_before=before, load_after=load(), seconds=round(time.perf_counter() - t, 2))
    print(json.dumps(res), flush=True)
    return res


# ---------------------------------------------------------------------------- training
TRAIN_STEPS = {"coarse": 10, "fine": 30}  # steps timed per stage, the first WARM_UP of them left out
WARM_UP = 2
TRAIN_SETTINGS = ((1, 1), (1, 2), (2, 1))  # (processes, torch threads each)


def synthetic_set(n: int = 8, hw: tuple[int, int] = (2400, 1935), k: int = 19, seed: int = 0):
    """``n`` noisy images of a cephalogram's size, each with ``k`` bright discs at its landmarks:
    their pyramids (4 levels, as the shipped model's) and the ``(n, k, 2)`` landmarks."""
    import numpy as np

    from napari_glimpse.pyramid import build_pyramid

    rng = np.random.default_rng(seed)
    pyramids, truth = [], rng.uniform([200, 200], [hw[1] - 200, hw[0] - 200], size=(n, k, 2))
    yy, xx = np.ogrid[:hw[0], :hw[1]]
    for pts in truth:
        img = rng.normal(60, 12, size=hw).astype(np.float32)
        for x, y in pts:
            img[(xx - x) ** 2 + (yy - y) ** 2 <= 15 ** 2] = 220
        pyramids.append(build_pyramid(img.clip(0, 255).astype(np.uint8), 4, 64))
    return pyramids, truth


def _timed_steps(train, steps: int) -> dict:
    """Run ``train(callback, max_steps)`` and time its steps after the warm-up (rank 0's clock),
    and the seconds per step spent in ``batch()`` (see :func:`train_child`)."""
    times: list[float] = []
    BATCH_S[0] = 0.0
    train(lambda info: times.append(info["elapsed_s"]), steps)
    rate = (len(times) - WARM_UP) / (times[-1] - times[WARM_UP - 1])
    return {"steps": len(times), "steps_per_s": round(rate, 3), "s_per_step": round(1 / rate, 4),
            "batch_making_s_per_step": round(BATCH_S[0] / len(times), 4)}


BATCH_S = [0.0]


def train_child(out: Path, threads: int) -> None:
    """One process of a timing run (alone, or one of torchrun's): train the coarse net and a fine
    net for :data:`TRAIN_STEPS`; rank 0 writes the figures to ``out``."""
    import torch

    from napari_glimpse import coarse, distributed, fine

    def timed(net, stage, lr, batch, *args, **kw):  # fit_heatmaps, timing batch()
        def timed_batch():
            t = time.perf_counter()
            b = batch()
            BATCH_S[0] += time.perf_counter() - t
            return b
        return fit(net, stage, lr, timed_batch, *args, **kw)

    fit = coarse.fit_heatmaps
    coarse.fit_heatmaps = fine.fit_heatmaps = timed
    torch.set_num_threads(threads)
    with distributed.session("cpu"):
        main_rank, world = distributed.is_main(), distributed.world_size()
        pyramids, truth = synthetic_set()
        ccfg, fcfg = coarse.CoarseConfig(), fine.FineConfig(context=3, pixel_spacing=0.1)
        views = coarse.view_levels(pyramids, truth, ccfg)
        levels, truth_f = fine.fine_levels(pyramids, truth, fcfg)
        del pyramids
        res = {"processes": world, "threads_each": threads, "global_batch": {"coarse": ccfg.batch_size,
                                                                            "fine": fcfg.batch_size},
               "coarse": _timed_steps(lambda cb, n: coarse.train_coarse(*views, ccfg, 1e9, progress=False, callback=cb,
                                                                        max_steps=n), TRAIN_STEPS["coarse"]),
               "fine": _timed_steps(lambda cb, n: fine.train_fine(levels, truth_f, fcfg, 1e9, progress=False,
                                                                  callback=cb, max_steps=n), TRAIN_STEPS["fine"])}
    if main_rank:
        out.write_text(json.dumps(res))


def run_train(a: argparse.Namespace) -> None:
    """Every setting of :data:`TRAIN_SETTINGS` in a fresh process (or two), once the machine is
    quiet; the ``train`` part of the JSON (the ``predict`` part kept)."""
    quiet = wait_for_quiet(a.quiet_load, a.max_wait)
    if not quiet["quiet_when_started"]:  # other jobs' share of the cores would decide 1 vs 2 processes
        raise SystemExit(f"load {quiet['load']} after {quiet['waited_s']} s: training not timed (nothing written)")
    runs = []
    with tempfile.TemporaryDirectory(prefix="throughput-train") as tmp:
        for procs, threads in TRAIN_SETTINGS:
            out = Path(tmp) / f"p{procs}_t{threads}.json"
            child = [str(Path(__file__).resolve()), "--train-child", str(out), "--threads", str(threads)]
            cmd = ([sys.executable, *child] if procs == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                    *child])
            print(f"training: {procs} process(es) x {threads} thread(s) ...", flush=True)
            before, t = load(), time.perf_counter()
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            r = json.loads(out.read_text())
            r.update(wall_s=round(time.perf_counter() - t, 1), load_before=before, load_after=load())
            print(json.dumps(r), flush=True)
            runs.append(r)
    for stage in TRAIN_STEPS:
        base = {(r["processes"], r["threads_each"]): r[stage]["steps_per_s"] for r in runs}
        for r in runs:
            r[stage]["speed_vs_1_process_1_thread"] = round(r[stage]["steps_per_s"] / base[1, 1], 3)
            r[stage]["speed_vs_1_process_2_threads"] = round(r[stage]["steps_per_s"] / base[1, 2], 3)
    doc = json.loads(a.out.read_text()) if a.out.exists() else {}
    old = doc.get("train", {})
    m = meta(quiet)
    m.update(model="the shipped model's coarse net and one fine net (default CoarseConfig, FineConfig context 3)",
             images="8 synthetic 2400 x 1935 images (noise and 19 bright discs), 4-level pyramids", load_at_end=load(),
             notes=[f"steps/s over steps {WARM_UP + 1}-{max(TRAIN_STEPS.values())} of each stage (rank 0's clock)",
                    "the same global batch in every setting; 2 processes: torchrun --standalone, gloo, "
                    "batch norms synced, gradients all-reduced"])
    doc["train"] = {"meta": m, "runs": runs,
                    "earlier_runs": old.get("earlier_runs", []) + ([old["runs"]] if "runs" in old else [])}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
