#!/usr/bin/env python
"""Throughput of ``napari-glimpse predict`` on a folder, start-up included (issue 25).

Folders of 100 and 1000 Test1 images (symlinks to ISBI 2015 images 151-250; the 1000 repeat them
ten times under other names) go through the whole CLI, ``python -m napari_glimpse predict DIR
--out CSV --workers W`` in a subprocess, once per setting (``--workers`` 1 and 2): wall seconds
per image from the command's start to its exit, the child's peak RSS and CPU time
(``os.wait4``), and the machine's load (``os.getloadavg``) before and after each run, since
other jobs may share the cores. Every run's CSVs are checked against the one-worker run's (the
one-by-one path, as before issue 25): the same bytes; the 1000-image rows against the 100's.

``--profile`` first records where the time of the one-by-one path goes (a fresh process on 20
Test1 images): start-up (imports, model load, ONNX sessions, first image's extra) and each
image's stages (read, pyramid, coarse, fine, the rest), CPU and wall, with torch on 1 and on 2
threads.

Before running, waits (up to ``--max-wait`` s) for the 1-minute load to fall to
``--quiet-load``; runs anyway after that and says so in the JSON.

Writes the ``predict`` part of ``benchmarks/results/throughput.json`` (other parts, e.g. a
training part, are kept). About 8 minutes on 2 cores.

Usage::

    python benchmarks/throughput.py [--sizes 100 1000] [--workers 1 2] [--profile] [--max-wait 600]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
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
        _, status, ru = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"napari-glimpse {' '.join(args)} failed:\n{text[-2000:]}")
    summary = [ln.split("\r")[-1] for ln in text.splitlines() if "wrote " in ln]
    return {"seconds": round(wall, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "load_before": before, "load_after": load(),
            "summary": summary[-1] if summary else None}


def csv_rows(path: Path) -> list[list[str]]:
    return [ln.split(",") for ln in path.read_text().splitlines()[1:]]


def same_answers(csv: Path, ref: Path, ref100: Path | None) -> dict:
    """Whether ``csv`` (and its confidence CSV) are the bytes of ``ref``'s, and its rows those of
    the 100-image run for the same source images."""
    out = {"same_csv_as_workers_1": csv.read_bytes() == ref.read_bytes()
           and conf(csv).read_bytes() == conf(ref).read_bytes()}
    if ref100 is not None:
        base = csv_rows(ref100)
        out["rows_same_as_the_100_image_run"] = all(r[1:] == base[i % len(base)][1:]
                                                    for i, r in enumerate(csv_rows(csv)))
    return out


def conf(p: Path) -> Path:
    return p.with_name(p.stem + "_confidence.csv")


def run_predict(sizes: list[int], workers: list[int], tmp: Path) -> list[dict]:
    runs = []
    ref100 = None
    for n in sizes:
        folder = make_folder(tmp, n)
        ref = None
        for w in sorted(workers):
            out = tmp / f"p{n}_w{w}.csv"
            print(f"{n} images, --workers {w} ...", flush=True)
            r = run_cli(["predict", str(folder), "--out", str(out), "--workers", str(w)], out.with_suffix(".log"))
            r = {"images": n, "workers": w, "s_per_image": round(r["seconds"] / n, 4), **r}
            ref = ref or out
            r.update(same_answers(out, ref, ref100 if n != 100 else None))
            print(json.dumps(r), flush=True)
            runs.append(r)
        if n == 100:
            ref100 = ref
    return runs


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
    a = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs the ISBI 2015 images in {DATA}")
    quiet = wait_for_quiet(a.quiet_load, a.max_wait)
    part: dict = {"meta": meta(quiet)}
    with tempfile.TemporaryDirectory(prefix="throughput") as tmp:
        if a.profile:
            part["profile"] = {f"torch_threads_{t}": profile(t) for t in (1, 2)}
        part["one_image"] = run_one_image(Path(tmp))
        part["runs"] = run_predict(a.sizes, a.workers, Path(tmp))
    part["meta"]["load_at_end"] = load()
    doc = json.loads(a.out.read_text()) if a.out.exists() else {}
    doc["predict"] = part
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
                      "peak_rss_mb and cpu_s: the child process's (os.wait4 rusage)",
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


if __name__ == "__main__":
    main()
