#!/usr/bin/env python
"""The faults a real archive throws at the command line (issue 23), run through the real CLI.

Each case prepares tiny inputs (256-pixel synthetic images, a 3-landmark model trained here for a
few steps) in a temporary folder, runs ``python -m napari_glimpse.cli ...`` in a subprocess and
records its exit code, the last line of its stderr, whether a traceback was printed and whether
the outputs are intact (no input overwritten, no NaN written, nothing half-written, no stale
temporary file). ``--before SRC`` runs every case a second time with ``PYTHONPATH=SRC`` (e.g. an
older ``src`` from ``git archive``) and records that as ``before``.

Permission cases (an unreadable image, a read-only folder) run without root's file-permission
override when this runs as root; the full disk is a 64 kB tmpfs (root only); both are skipped
otherwise.

Writes ``benchmarks/results/faults.json``. About 5 minutes (twice that with ``--before``).

Usage::

    python benchmarks/faults.py [--before /tmp/old/src] [--kills 5] [--out benchmarks/results/faults.json]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDE = 256
MEANS = np.array([[80.0, 80.0], [176.0, 96.0], [128.0, 180.0]])


# ------------------------------------------------------------------------------ inputs
def synthetic(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy image with three bright blobs (the landmarks) and their (3, 2) positions."""
    xy = np.round(MEANS + rng.uniform(-30, 30, (3, 2)))
    img = rng.normal(40, 8, (SIDE, SIDE)).clip(0, 255)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for r, (x, y) in zip((7, 9, 11), xy):
        img[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = 230
    return img.astype(np.uint8), xy


def write_labels(path: Path, names, coords, sep: str = ",", bom: bool = False) -> Path:
    header = ["image_path"] + [f"{k + 1}_{a}" for k in range(coords.shape[1]) for a in "xy"]
    lines = [sep.join(header)] + [sep.join([n] + [f"{v:g}" for v in c.reshape(-1)]) for n, c in zip(names, coords)]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_dataset(root: Path, n: int, seed: int, split: str = "train") -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names, coords = [], []
    for i in range(n):
        img, xy = synthetic(rng)
        name = f"{seed * 100 + i + 1:03d}.png"
        Image.fromarray(img).save(root / "images" / name)
        names.append(name)
        coords.append(xy)
    coords = np.stack(coords)
    return {"root": root, "names": names, "coords": coords,
            "csv": write_labels(root / f"{split}_senior.csv", names, coords)}


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims ``w x h`` 8-bit grey pixels and holds one empty data chunk (nothing allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def make_base(base: Path) -> dict:
    """The shared inputs: a data set, a tiny model trained on it, and that model with a NaN weight."""
    import torch

    from napari_glimpse.io import load_dataset
    from napari_glimpse.model import ModelConfig
    from napari_glimpse.training import TrainConfig, train

    data = make_dataset(base / "data", 6, 1)
    model = base / "tiny.pt"
    train(load_dataset(data["root"], "train"), model, ModelConfig(n_landmarks=3, n_levels=3, width=8, hidden=(64, 32)),
          TrainConfig(batch_size=8, max_steps=4, save_every_s=1e9), device="cpu", progress=False)
    ck = torch.load(model, weights_only=True)
    next(v for v in ck["state_dict"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(ck, base / "nan.pt")
    for p in base.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return {"data": data, "model": model, "nan_model": base / "nan.pt"}


# ------------------------------------------------------------------------------ running
def finite_model(path: Path) -> bool:
    """Every float tensor of a checkpoint finite (read independently of the package)."""
    import torch

    def walk(o) -> bool:
        if isinstance(o, torch.Tensor):
            return not o.is_floating_point() or bool(torch.isfinite(o).all())
        if isinstance(o, dict):
            return all(walk(v) for k, v in o.items() if k != "train_state")
        if isinstance(o, (list, tuple)):
            return all(walk(v) for v in o)
        return True

    try:
        return walk(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:
        return False


def csv_rows(path: Path) -> list[list[str]] | None:
    """The data rows of a landmark CSV whose values are all finite numbers, else None."""
    if not path.exists():
        return None
    rows = list(csv.reader(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()))
    try:
        if rows and all(math.isfinite(float(v)) for r in rows[1:] for v in r[1:]):
            return rows[1:]
    except ValueError:
        pass
    return None


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*.tmp")]


def _no_override(umask: int | None):
    """Run as root without the capabilities that bypass file permissions (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH, CAP_FOWNER: dropped from the bounding set before exec), so that a
    read-only folder or an unreadable file is refused as it would be for any user."""
    import ctypes

    def pre() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2, 3):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
        if umask is not None:
            os.umask(umask)
    return pre


class Runner:
    """Runs the CLI in subprocesses with one source tree (``src``: None for the installed one)."""

    def __init__(self, base: Path, shared: dict, src: str | None):
        self.base, self.shared, self.src = base, shared, src
        self.model, self.nan_model = str(shared["model"]), str(shared["nan_model"])
        self.home = base / "home"
        self.home.mkdir(exist_ok=True)
        self.home.chmod(0o777)

    def env(self) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS="1", HOME=str(self.home))
        if self.src:
            env["PYTHONPATH"] = self.src
        return env

    def start(self, argv, cwd: Path, user: str | None = None, umask: int | None = None) -> subprocess.Popen:
        pre = _no_override(umask) if user == "plain" else ((lambda: os.umask(umask)) if umask is not None else None)
        return subprocess.Popen([sys.executable, "-m", "napari_glimpse.cli"] + [str(a) for a in argv], cwd=cwd,
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pre)

    def run(self, argv, cwd: Path, timeout: float = 600, **kw) -> dict:
        t = time.perf_counter()
        p = self.start(argv, cwd, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        err_text = err.decode("utf-8", "backslashreplace")
        lines = [ln.split("\r")[-1].strip() for ln in err_text.splitlines()]
        lines = [ln for ln in lines if ln]
        cmd = "napari-glimpse " + " ".join(str(a) for a in argv)
        last = lines[-1] if lines else ""
        for prefix in (f"{cwd}/", f"{self.base}/"):  # paths relative to the case's folder, or the shared one
            cmd, last = cmd.replace(prefix, ""), last.replace(prefix, "")
        return {"command": cmd, "exit_code": p.returncode, "stderr_last_line": last,
                "stderr_lines": len(lines), "traceback": "Traceback (most recent call last)" in err_text,
                "seconds": round(time.perf_counter() - t, 1), "stdout_tail": out.decode(errors="replace")[-300:]}


CASES: list[tuple[str, str, int, object]] = []


def case(name: str, expect: str, rc: int):
    """Register a case: ``fn(runner, workdir) -> (run record, output intact, note)``."""
    def deco(fn):
        CASES.append((name, expect, rc, fn))
        return fn
    return deco


# ------------------------------------------------------------------------ label CSVs
def _edit_cell(d: dict, row: int, col: int, value: str) -> Path:
    lines = d["csv"].read_text().splitlines()
    cells = lines[row].split(",")
    cells[col] = value
    lines[row] = ",".join(cells)
    d["csv"].write_text("\n".join(lines) + "\n")
    return d["csv"]


@case("label CSV: one NaN cell (finetune)", "exit 2 naming file, line, image, column; no model written", 2)
def labels_nan_finetune(r: Runner, w: Path):
    d = make_dataset(w / "d", 3, 2)
    _edit_cell(d, 2, 3, "nan")
    res = r.run(["finetune", "--model", r.model, "--data", d["csv"], "--out", "ft.pt", "--max-steps", 20,
                 "--batch-size", 8], w)  # (enough samples to meet the NaN)
    return res, not (w / "ft.pt").exists() or finite_model(w / "ft.pt"), ""


@case("label CSV: one inf cell (evaluate)", "exit 2 naming the column; no NaN/inf MRE", 2)
def labels_inf_evaluate(r: Runner, w: Path):
    d = make_dataset(w / "d", 3, 2)
    _edit_cell(d, 1, 2, "inf")
    res = r.run(["evaluate", "--data", d["csv"], "--model", r.model, "--json", "e.json"], w)
    bad = (w / "e.json").exists() and ("NaN" in (w / "e.json").read_text() or "Infinity" in (w / "e.json").read_text())
    return res, not bad, ""


@case("label CSV: UTF-8 byte-order mark (Excel 'CSV UTF-8')", "read as usual (exit 0)", 0)
def labels_bom(r: Runner, w: Path):
    d = make_dataset(w / "d", 3, 2)
    write_labels(d["csv"], d["names"], d["coords"], bom=True)
    return r.run(["evaluate", "--data", d["csv"], "--model", r.model], w), True, ""


@case("label CSV: ';' separators", "read as usual (exit 0)", 0)
def labels_semicolon(r: Runner, w: Path):
    d = make_dataset(w / "d", 3, 2)
    write_labels(d["csv"], d["names"], d["coords"], sep=";")
    return r.run(["evaluate", "--data", d["csv"], "--model", r.model], w), True, ""


@case("label CSV: tab separators", "read as usual (exit 0)", 0)
def labels_tab(r: Runner, w: Path):
    d = make_dataset(w / "d", 3, 2)
    write_labels(d["csv"], d["names"], d["coords"], sep="\t")
    return r.run(["evaluate", "--data", d["csv"], "--model", r.model], w), True, ""


@case("label CSV: an image on two rows (conflicting)", "exit 2 naming the image and both lines", 2)
def labels_duplicate(r: Runner, w: Path):
    d = make_dataset(w / "d", 3, 2)
    coords = d["coords"].copy()
    coords[0] += 25
    write_labels(d["csv"], d["names"] + d["names"][:1], np.concatenate([d["coords"], coords[:1]]))
    return r.run(["evaluate", "--data", d["csv"], "--model", r.model], w), True, ""


@case("label CSV: a non-numeric cell", "exit 2 naming line, image and column", 2)
def labels_bad_column(r: Runner, w: Path):
    d = make_dataset(w / "d", 3, 2)
    _edit_cell(d, 2, 4, "12a")
    res = r.run(["evaluate", "--data", d["csv"], "--model", r.model], w)
    return res, True, "names the column: " + str("column 2_y" in res["stderr_last_line"]).lower()


# ------------------------------------------------------------------- models, NaN
@case("model with NaN weights (predict)", "exit 2 at load; no CSV", 2)
def nan_model_predict(r: Runner, w: Path):
    res = r.run(["predict", r.shared["data"]["root"] / "images", "--model", r.nan_model, "--out", "p.csv"], w)
    return res, csv_rows(w / "p.csv") is not None or not (w / "p.csv").exists(), ""


@case("model with NaN weights (evaluate --json)", "exit 2 at load; no NaN MRE in the JSON", 2)
def nan_model_evaluate(r: Runner, w: Path):
    res = r.run(["evaluate", "--data", r.shared["data"]["csv"], "--model", r.nan_model, "--json", "e.json"], w)
    return res, not ((w / "e.json").exists() and "NaN" in (w / "e.json").read_text()), ""


@case("model file: a pickle of protocol 4", "one error line, no torch warnings", 2)
def pickle_model(r: Runner, w: Path):
    import pickle

    with open(w / "p4.pt", "wb") as f:
        pickle.dump({"weights": [1, 2]}, f, protocol=4)
    res = r.run(["predict", r.shared["data"]["root"] / "images" / r.shared["data"]["names"][0], "--model", "p4.pt",
                 "--out", "p.csv"], w)
    return res, True, f"{res['stderr_lines']} stderr line(s)"


@case("float TIFF with one NaN pixel (ISBI image 001, shipped model)", "exit 0, one warning line, answers as "
      "without the NaN", 0)
def nan_pixel(r: Runner, w: Path):
    """An ISBI image (the tiny model answers much the same on any image) as a float TIFF, once
    as it is (the reference, predicted here) and once with one NaN pixel (through the CLI)."""
    from PIL import Image

    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import read_image

    real = ROOT.parent / "shared" / "data" / "isbi2015" / "images" / "001.jpg"
    if real.exists():
        f, model = read_image(real).astype(np.float32), []
    else:
        f, model = synthetic(np.random.default_rng(7))[0].astype(np.float32), ["--model", r.model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a note on the tiny image's pixel spacing)
        ref = GlimpseModel.load(model[1] if model else None, "cpu").predict(f).final
    f[3, 3] = np.nan
    Image.fromarray(f, mode="F").save(w / "scan.tif")
    res = r.run(["predict", "scan.tif", *model, "--out", "p.csv"], w)
    rows = csv_rows(w / "p.csv")
    err = np.abs(np.array(rows[0][1:], float).reshape(-1, 2) - ref).max() if rows else None
    ok = err is not None and err < 1.0
    return res, ok, ("no answer" if err is None else f"answers up to {err:.2f} px from the clean image's")


# ---------------------------------------------------------------------------- outputs
def _folder(w: Path, n: int = 4, seed: int = 3) -> dict:
    return make_dataset(w / "d", n, seed)


@case("predict --out is an input image", "exit 2 before any work; the image untouched", 2)
def out_is_input(r: Runner, w: Path):
    d = _folder(w)
    img = d["root"] / "images" / d["names"][0]
    before = img.read_bytes()
    res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", img], w)
    return res, img.read_bytes() == before, ""


@case("predict --out a.csv --confidence-out a.csv", "exit 2 before any work", 2)
def out_is_confidence_out(r: Runner, w: Path):
    d = _folder(w)
    res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", "a.csv", "--confidence-out", "a.csv"], w)
    rows = csv_rows(w / "a.csv")
    return res, not (w / "a.csv").exists() or (rows is not None and len(rows[0]) == 7), ""


@case("predict --out in a read-only folder", "exit 2 before any work, naming --out, not a temp file", 2)
def out_read_only(r: Runner, w: Path):
    if os.geteuid() != 0:
        return None, None, "skipped: needs root (to drop its file-permission override)"
    d = _folder(w)
    ro = w / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", ro / "p.csv"], w, user="plain")
    return res, ".tmp" not in res["stderr_last_line"], f"{res['seconds']} s"


@case("predict writes outputs with the umask's permissions (022)", "exit 0, files 0644", 0)
def out_permissions(r: Runner, w: Path):
    d = _folder(w, 1)
    res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", "p.csv"], w, umask=0o022)
    modes = sorted(oct((w / n).stat().st_mode & 0o777) for n in ("p.csv", "p_confidence.csv") if (w / n).exists())
    return res, modes == ["0o644", "0o644"], f"modes {modes}"


@case("full disk (64 kB tmpfs) under predict --out", "exit 2, one line; no temp file left", 2)
def full_disk(r: Runner, w: Path):
    if os.geteuid() != 0:
        return None, None, "skipped: needs root to mount a tmpfs"
    d = _folder(w, 2)
    disk = w / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        return None, None, "skipped: cannot mount a tmpfs"
    try:
        with open(disk / "filler", "wb") as f:
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", disk / "p.csv"], w)
        intact = no_temp_files(disk) and (csv_rows(disk / "p.csv") is not None or not (disk / "p.csv").exists())
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    return res, intact, ""


# ----------------------------------------------------------------------------- images
@case("image of 625 megapixels (header only)", "exit 2: above our 500 MP limit", 2)
def image_625mp(r: Runner, w: Path):
    png_header_only(w / "huge.png", 25000, 25000)
    return r.run(["predict", "huge.png", "--model", r.model, "--out", "p.csv"], w), True, ""


@case("image of 180 megapixels (12000x15000, data cut short)", "below the limit: decoded, a clear read error", 2)
def image_180mp(r: Runner, w: Path):
    png_header_only(w / "big.png", 12000, 15000)
    res = r.run(["predict", "big.png", "--model", r.model, "--out", "p.csv"], w)
    return res, True, "DecompressionBomb in stderr: " + str("DecompressionBomb" in res["stderr_last_line"]).lower()


@case("image of 100 megapixels (data cut short)", "one error line, no PIL warnings", 2)
def image_100mp(r: Runner, w: Path):
    png_header_only(w / "big.png", 10000, 10000)
    res = r.run(["predict", "big.png", "--model", r.model, "--out", "p.csv"], w)
    return res, True, f"{res['stderr_lines']} stderr line(s)"


@case("truncated PNG", "exit 2, one line", 2)
def truncated(r: Runner, w: Path):
    d = _folder(w, 1)
    p = d["root"] / "images" / d["names"][0]
    p.write_bytes(p.read_bytes()[:400])
    return r.run(["predict", p, "--model", r.model, "--out", "p.csv"], w), not (w / "p.csv").exists(), ""


@case("zero-byte image", "exit 2, one line", 2)
def zero_bytes(r: Runner, w: Path):
    (w / "empty.jpg").write_bytes(b"")
    return r.run(["predict", "empty.jpg", "--model", r.model, "--out", "p.csv"], w), True, ""


@case("symlink loop as the image", "exit 2, one line", 2)
def symlink_loop(r: Runner, w: Path):
    os.symlink("b.png", w / "a.png")
    os.symlink("a.png", w / "b.png")
    return r.run(["predict", "a.png", "--model", r.model, "--out", "p.csv"], w), True, ""


@case("image without read permission", "exit 2, one line", 2)
def permission_denied(r: Runner, w: Path):
    if os.geteuid() != 0:
        return None, None, "skipped: needs root (to drop its file-permission override)"
    d = _folder(w, 1)
    p = d["root"] / "images" / d["names"][0]
    p.chmod(0o000)
    out = w / "out"
    out.mkdir()
    out.chmod(0o777)
    return r.run(["predict", p, "--model", r.model, "--out", out / "p.csv"], w, user="plain"), True, ""


# ---------------------------------------------------------------------------- batches
def _with_bad(w: Path) -> dict:
    d = _folder(w, 4)
    good = (d["root"] / "images" / d["names"][0]).read_bytes()
    (d["root"] / "images" / "bad.png").write_bytes(good[: len(good) // 3])
    return d


@case("folder of 4 good images and 1 truncated", "exit 2 at the end; the 4 good rows written; one line per bad", 2)
def batch_bad(r: Runner, w: Path):
    d = _with_bad(w)
    res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", "p.csv"], w)
    rows = csv_rows(w / "p.csv")
    return res, rows is not None and len(rows) == 4, f"{0 if rows is None else len(rows)} row(s) written"


@case("the same with --skip-bad", "exit 0; the 4 good rows written", 0)
def batch_skip_bad(r: Runner, w: Path):
    d = _with_bad(w)
    res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", "p.csv", "--skip-bad"], w)
    rows = csv_rows(w / "p.csv")
    return res, rows is not None and len(rows) == 4, f"{0 if rows is None else len(rows)} row(s) written"


@case("predict --resume after a run killed half-way", "exit 0; the kept rows untouched, the others added", 0)
def batch_resume(r: Runner, w: Path):
    d = _folder(w, 4)
    first = r.run(["predict", d["root"] / "images" / d["names"][0], "--model", r.model, "--out", "p.csv"], w)
    kept = (w / "p.csv").read_text() if first["exit_code"] == 0 else ""
    with open(w / "p.csv", "a") as f:
        f.write(f"{d['names'][1]},12.0,")  # a row cut short by the kill
    res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", "p.csv", "--resume"], w)
    rows = csv_rows(w / "p.csv")
    ok = rows is not None and len(rows) == 4 and bool(kept) and (w / "p.csv").read_text().startswith(kept)
    return res, ok, f"{0 if rows is None else len(rows)} row(s)"


@case("a file name that is not UTF-8 (b'scan_\\xe9\\xff.png')", "exit 0; the name written back byte for byte", 0)
def non_utf8_name(r: Runner, w: Path):
    d = _folder(w, 1)
    raw = os.fsencode(d["root"] / "images") + b"/scan_\xe9\xff.png"
    os.rename(d["root"] / "images" / d["names"][0], raw)
    res = r.run(["predict", d["root"] / "images", "--model", r.model, "--out", "p.csv"], w)
    ok = (w / "p.csv").exists() and b"\nscan_\xe9\xff.png," in (w / "p.csv").read_bytes()
    return res, ok, ""


# --------------------------------------------------------------------------- training
def _train_args(r: Runner, out: str) -> list:
    return ["train", "--data", r.shared["data"]["root"], "--out", out, "--batch-size", 2, "--levels", 3]


@case("stale temp files of a save killed earlier, then train", "exit 0; the model loads; no .tmp left", 0)
def stale_temps(r: Runner, w: Path):
    dead = w / ".m.pt.4194000.abcd_123.tmp"  # (pid above the default pid_max: not running)
    old = w / ".m.pt.k2j4h5g6.tmp"  # an older version's name, two hours old
    for p in (dead, old):
        p.write_bytes(b"\0" * 4096)
    os.utime(old, (time.time() - 7200,) * 2)
    res = r.run(_train_args(r, "m.pt") + ["--max-steps", 2], w)
    return res, finite_model(w / "m.pt") and no_temp_files(w), ""


def _wait_for(p: subprocess.Popen, path: Path, limit_s: float) -> float | None:
    t = time.monotonic()
    while time.monotonic() - t < limit_s and p.poll() is None:
        if path.exists():
            return time.monotonic() - t
        time.sleep(0.5)
    return None


@case("train: the first resume point", "written within 60 s of the start (then killed)", -9)
def first_resume_point(r: Runner, w: Path):
    t = time.perf_counter()
    p = r.start(_train_args(r, "m.pt") + ["--time-budget", 3], w)
    found = _wait_for(p, w / "m.pt.resume", 90)
    p.kill()
    p.communicate()
    res = {"command": "napari-glimpse train --data data --out m.pt --batch-size 2 --levels 3 --time-budget 3",
           "exit_code": p.returncode, "stderr_last_line": "", "stderr_lines": 0, "traceback": False,
           "seconds": round(time.perf_counter() - t, 1)}
    ok = found is not None and found <= 60
    return res, ok and finite_model(w / "m.pt.resume"), (f"first resume point after {found:.0f} s" if found
                                                         else "no resume point within 90 s")


@case("finetune --resume after a kill", "exit 0; the model loads", 0)
def finetune_resume(r: Runner, w: Path):
    args = ["finetune", "--model", r.model, "--data", r.shared["data"]["csv"], "--out", "ft.pt", "--batch-size", 2,
            "--max-steps", 300]
    p = r.start(args + ["--time-budget", 2], w)
    found = _wait_for(p, w / "ft.pt.resume", 90)
    p.kill()
    p.communicate()
    res = r.run(args + ["--resume"], w)
    return res, finite_model(w / "ft.pt") and no_temp_files(w), (f"killed {found:.0f} s in, after the first resume "
                                                                 f"point" if found else "no resume point within 90 s")


def _kills(r: Runner, w: Path, args: list, out: str, n: int, seed: int) -> tuple[dict, bool, str]:
    """``n`` runs of ``args`` killed at random moments (the later ones with --resume where a resume
    point exists), each leaving a loadable output or none; then one run to the end."""
    rng = random.Random(seed)
    bad, at = [], []
    for i in range(n):
        resume = ["--resume"] if (w / f"{out}.resume").exists() and args[0] == "train" else []
        p = r.start(args + resume + ["--time-budget", 1], w)
        at.append(round(rng.uniform(1.0, 12.0), 1))
        time.sleep(at[-1])
        p.send_signal(signal.SIGKILL)
        p.communicate()
        for f in (w / out, w / f"{out}.resume"):
            if f.exists() and not finite_model(f):
                bad.append(f"{f.name} after kill {i + 1}")
    res = r.run(args + ["--max-steps", 3], w)
    ok = not bad and finite_model(w / out) and no_temp_files(w)
    return res, ok, f"killed at {at} s; " + ("; ".join(bad) or "every output loadable after each kill")


@case("train killed (SIGKILL) at random moments, then run again", "exit 0 at the end; outputs loadable; no .tmp", 0)
def kill_train(r: Runner, w: Path):
    return _kills(r, w, _train_args(r, "m.pt"), "m.pt", r.kills, 1)


@case("finetune killed (SIGKILL) at random moments, then run again", "exit 0 at the end; outputs loadable; no .tmp", 0)
def kill_finetune(r: Runner, w: Path):
    args = ["finetune", "--model", r.model, "--data", r.shared["data"]["csv"], "--out", "ft.pt", "--batch-size", 2]
    return _kills(r, w, args, "ft.pt", r.kills, 2)


# ------------------------------------------------------------------------------- main
def run_all(runner: Runner, base: Path, label: str, only: list[str] | None) -> dict:
    out = {}
    for _name, _expect, rc, fn in CASES:
        if only and fn.__name__ not in only:
            continue
        w = base / label / fn.__name__
        w.mkdir(parents=True)
        w.chmod(0o755)
        try:
            res, intact, note = fn(runner, w)
        except Exception as exc:  # the harness's own failure: recorded, not fatal
            res, intact, note = None, None, f"harness error: {exc.__class__.__name__}: {exc}"
        if res is None:
            out[fn.__name__] = {"skipped": note}
        else:
            res.pop("stdout_tail", None)
            ok = res["exit_code"] == rc and not res["traceback"] and bool(intact)
            out[fn.__name__] = {**res, "output_intact": bool(intact), "note": note, "as_expected": ok}
        print(f"[{label}] {fn.__name__}: {out[fn.__name__]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", metavar="SRC", help="also run every case with PYTHONPATH=SRC (an older src tree)")
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs of train and of finetune (default 5 each)")
    ap.add_argument("--only", nargs="*", help="run only these cases (function names)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    a = ap.parse_args()
    os.umask(0o022)
    base = Path(tempfile.mkdtemp(prefix="glimpse_faults_"))
    base.chmod(0o755)
    try:
        shared = make_base(base)
        results = {}
        for label, src in [("after", None)] + ([("before", a.before)] if a.before else []):
            runner = Runner(base, shared, src)
            runner.kills = a.kills
            results[label] = run_all(runner, base, label, a.only)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table = []
    for name, expect, _rc, fn in CASES:
        if fn.__name__ not in results["after"]:
            continue
        row = {"case": name, "id": fn.__name__, "expected": expect, **results["after"][fn.__name__]}
        if "before" in results:
            row["before"] = results["before"][fn.__name__]
        table.append(row)
    doc = {"what": "issue 23: faults of a real archive through the real CLI (benchmarks/faults.py)",
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0], "kills_each": a.kills,
           "before_src": "the src tree before the fixes (git archive 6a4c709^)" if a.before else None,
           "as_expected": sum(1 for r in table if r.get("as_expected")), "cases": len(table), "table": table}
    if a.only and Path(a.out).exists():  # the other cases' rows stay as they were
        old = {r["id"]: r for r in json.loads(Path(a.out).read_text())["table"]}
        old.update({r["id"]: r for r in table})
        table = [old[fn.__name__] for *_, fn in CASES if fn.__name__ in old]
        doc.update(table=table, cases=len(table), as_expected=sum(1 for r in table if r.get("as_expected")))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    for r in table:
        b = r.get("before", {})
        print(f"{r['id']:24s} after: rc {r.get('exit_code')!s:>3} tb {r.get('traceback')!s:5} intact "
              f"{r.get('output_intact')!s:5} ok {r.get('as_expected')!s:5} | before: rc {b.get('exit_code')!s:>3} "
              f"tb {b.get('traceback')!s:5} intact {b.get('output_intact')!s:5}")
    print(f"wrote {a.out}: {doc['as_expected']} of {doc['cases']} cases as expected")


if __name__ == "__main__":
    main()
