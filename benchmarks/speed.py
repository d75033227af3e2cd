#!/usr/bin/env python
"""Speed benchmark for napari-glimpse: prediction and training throughput.

Measures, for the ``compact`` and ``paper`` configurations, with bfloat16 autocast on and off:

* **predict**: seconds per image (all 19 landmarks, 3 iterations), median over a few real ISBI
  images (``151.jpg``, ``152.jpg``, ...):

  - ``excl_load``: the model is already loaded; image path in -> trajectory out (this includes
    reading the image and building its pyramid);
  - ``incl_load``: ``GlimpseModel.load(checkpoint)`` + the same predict.

  ``compact`` uses the shipped ``src/napari_glimpse/models/default.pt`` when it exists, otherwise a
  randomly initialised model saved to a temporary checkpoint (speed does not depend on the
  weights); ``paper`` is always randomly initialised.

* **train**: glimpse-steps per second, one glimpse being one (image, landmark) sample at all
  pyramid levels taken through forward + backward + Adam step. The training step of
  ``napari_glimpse.training.train`` is replicated (random starts from the preset's start mode,
  rotation/scale/noise augmentation via ``sample_glimpses``, network forward, radial loss,
  backward, ``Adam.step``) on a ``PyramidStack`` of a few images, after warm-up steps.

Results go to JSON (default ``benchmarks/results/speed.json``) and a short summary is printed.
Note: the network forward already converts its input to ``channels_last``; nothing to toggle here.

Usage::

    python benchmarks/speed.py                     # full run, 2 threads
    python benchmarks/speed.py --quick --threads 1 # smoke run (noisy numbers)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_glimpse.glimpse import PyramidStack
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel, resolve_device
from napari_glimpse.io import read_image
from napari_glimpse.landmarks import ISBI_LANDMARKS, ISBI_PIXEL_SPACING_MM
from napari_glimpse.model import GlimpseModelNet, ModelConfig
from napari_glimpse.pyramid import build_pyramid
from napari_glimpse.training import TrainConfig, presets, train_step

HERE = Path(__file__).resolve()
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "isbi2015"
DEFAULT_OUT = HERE.parent / "results" / "speed.json"
SYNTH_SHAPE = (2400, 1935)  # (h, w) of an ISBI cephalogram
FIRST_IMAGE_ID = 151  # Test1 images: 151.jpg, 152.jpg, ...

# Mean / spread of the 19 ISBI landmarks (x, y; full-resolution pixels) over the 150 training
# images (senior annotations), rounded: a plausible start for randomly initialised models.
MEAN_START = np.array(
    [[807, 1041], [1390, 970], [1265, 1226], [605, 1223], [1388, 1525], [1363, 1839], [1352, 1980],
     [1296, 2041], [1334, 2021], [747, 1744], [1420, 1691], [1437, 1701], [1557, 1621], [1537, 1803],
     [1496, 1497], [1427, 2053], [968, 1429], [1398, 1445], [670, 1329]],
    dtype=np.float64,
)
STD_START = np.array(
    [[45, 48], [62, 71], [49, 63], [37, 40], [67, 70], [84, 78], [97, 89], [97, 90], [98, 90],
     [62, 70], [76, 78], [76, 76], [69, 82], [82, 83], [66, 79], [99, 91], [46, 52], [61, 75],
     [39, 45]],
    dtype=np.float64,
)

ITERATIONS = 3
CONFIGS = ("compact", "paper")


# --------------------------------------------------------------------------------- helpers
def log(msg: str = "") -> None:
    print(msg, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median(xs):
    return float(statistics.median(xs)) if xs else None


def bf16_supported(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except Exception:
        return False


def cpu_bf16_flags() -> list[str]:
    """CPU features relevant to bf16 speed (Linux only; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            return sorted({f for f in line.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx")})
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def find_images(data: Path, n: int) -> tuple[list[Path], str]:
    """Real ISBI images 151.jpg, 152.jpg, ... (or the first images found); [] if none."""
    folder = data / "images" if (data / "images").is_dir() else data
    if not folder.is_dir():
        return [], f"data folder {data} not found"
    picks = []
    for i in range(FIRST_IMAGE_ID, FIRST_IMAGE_ID + 400):
        for suf in (".jpg", ".bmp", ".png"):
            p = folder / f"{i:03d}{suf}"
            if p.exists():
                picks.append(p)
                break
        if len(picks) >= n:
            break
    if not picks:
        picks = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() in (".jpg", ".jpeg", ".bmp", ".png", ".tif", ".tiff"))[:n]
    if not picks:
        return [], f"no images in {folder}"
    return picks, str(folder)


def synthetic_images(tmp: Path, n: int) -> list[Path]:
    """Smooth random 1935x2400 grey JPEGs (a stand-in when the real data is absent)."""
    from PIL import Image

    paths = []
    h, w = SYNTH_SHAPE
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.random((h // 16 + 1, w // 16 + 1)).astype(np.float32)
        img = torch.nn.functional.interpolate(torch.from_numpy(small)[None, None], size=(h, w), mode="bilinear",
                                              align_corners=False)[0, 0].numpy()
        img = img * 180 + rng.normal(0, 8, size=(h, w)).astype(np.float32) + 30
        p = tmp / f"synthetic_{i:03d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=75)
        paths.append(p)
    return paths


def random_model(cfg: ModelConfig, seed: int = 0) -> GlimpseModel:
    torch.manual_seed(seed)
    net = GlimpseModelNet(cfg).eval()
    h, w = SYNTH_SHAPE
    return GlimpseModel(net, ISBI_LANDMARKS, ISBI_PIXEL_SPACING_MM, MEAN_START, STD_START,
                        meta={"train_image_shape": [h, w], "benchmark": "random init"})


def n_params(model: GlimpseModel) -> int:
    return int(sum(p.numel() for p in model.net.parameters()))


# ------------------------------------------------------------------------------- predict
def bench_predict(name: str, images: list[Path], dev: torch.device, tmp: Path, bf16_modes: list[bool],
                  repeats: int, quick: bool) -> dict:
    mcfg, _ = presets(name)
    if name == "compact" and DEFAULT_MODEL.exists():
        ckpt = DEFAULT_MODEL
        source = f"shipped model {DEFAULT_MODEL}"
    else:
        ckpt = tmp / f"{name}_random.pt"
        t = time.perf_counter()
        random_model(mcfg).save(ckpt)
        log(f"  [{name}] random-init checkpoint written ({ckpt.stat().st_size / 1e6:.0f} MB, "
            f"{time.perf_counter() - t:.1f} s)")
        source = "random init (speed does not depend on the weights)"

    t = time.perf_counter()
    model = GlimpseModel.load(ckpt, device=dev)
    sync(dev)
    first_load = time.perf_counter() - t
    cfg = model.config
    res: dict = {
        "model_source": source,
        "model_config": cfg.to_dict(),
        "n_params": n_params(model),
        "checkpoint_mb": round(ckpt.stat().st_size / 1e6, 1),
        "iterations": ITERATIONS,
        "n_landmarks": cfg.n_landmarks,
        "default_bf16": cfg.trunk == "paper",
        "first_load_s": first_load,
    }
    log(f"  [{name}] {res['n_params'] / 1e6:.1f} M parameters, {cfg.mode}, loaded in {first_load:.2f} s")

    # warm-up (kernel selection, allocator, caches) for every autocast mode
    pyr = model.pyramid(images[0])
    for bf in bf16_modes:
        t = time.perf_counter()
        if quick:
            model.predict(pyr, iterations=1, landmarks=[0, 1], bf16=bf)
        else:
            model.predict(pyr, iterations=ITERATIONS, bf16=bf)
        log(f"  [{name}] warm-up bf16={'on' if bf else 'off'}: {time.perf_counter() - t:.2f} s")

    # image read + pyramid alone (part of every predict below)
    prep = []
    for p in images:
        t = time.perf_counter()
        model.pyramid(p)
        prep.append(time.perf_counter() - t)
    res["read_and_pyramid_s"] = median(prep)

    excl = {bf: [] for bf in bf16_modes}
    incl = {bf: [] for bf in bf16_modes}
    loads = []
    for r in range(repeats):
        for p in images:
            # interleave the modes so background-load drift hits both alike
            for bf in bf16_modes:
                t = time.perf_counter()
                tr = model.predict(p, iterations=ITERATIONS, bf16=bf)
                sync(dev)
                excl[bf].append(time.perf_counter() - t)
                assert tr.positions.shape == (ITERATIONS + 1, cfg.n_landmarks, 2)
            for bf in bf16_modes:
                t = time.perf_counter()
                m2 = GlimpseModel.load(ckpt, device=dev)
                sync(dev)
                tl = time.perf_counter() - t
                m2.predict(p, iterations=ITERATIONS, bf16=bf)
                sync(dev)
                incl[bf].append(time.perf_counter() - t)
                loads.append(tl)
                del m2
            log(f"  [{name}] {p.name} rep {r + 1}: " + ", ".join(
                f"bf16 {'on' if bf else 'off'} {excl[bf][-1]:.2f} s / {incl[bf][-1]:.2f} s with load"
                for bf in bf16_modes))
    res["load_s"] = median(loads)
    for bf in bf16_modes:
        res[f"bf16_{'on' if bf else 'off'}"] = {
            "excl_load_s": median(excl[bf]),
            "incl_load_s": median(incl[bf]),
            "excl_load_samples_s": excl[bf],
            "incl_load_samples_s": incl[bf],
        }
    if len(bf16_modes) == 2:
        off, on = res["bf16_off"]["excl_load_s"], res["bf16_on"]["excl_load_s"]
        res["faster"] = "bf16_on" if on < off else "bf16_off"
        res["bf16_speedup"] = off / on  # >1: bf16 faster
    del model
    return res


# --------------------------------------------------------------------------------- train
def bench_train(name: str, pyramids, dev: torch.device, bf16_modes: list[bool], batch: int | None,
                warmup: int, steps: int, seed: int = 0) -> dict:
    """Replicates the inner step of ``training.train`` and times it."""
    mcfg, tcfg = presets(name)
    # one glimpse pass per step: throughput per glimpse does not depend on train_iterations
    tcfg = TrainConfig.from_dict({**tcfg.to_dict(), "train_iterations": 1,
                                  **({"batch_size": batch} if batch else {})})
    model = random_model(mcfg, seed)
    net = model.net.to(dev)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=tcfg.lr)
    gen = torch.Generator().manual_seed(seed)

    stack = PyramidStack(pyramids).to(dev)
    n_i, n_k = len(pyramids), mcfg.n_landmarks
    shapes = torch.as_tensor([p.shape for p in pyramids], dtype=torch.float32, device=dev)
    mean = torch.as_tensor(MEAN_START, dtype=torch.float32, device=dev)
    std = torch.as_tensor(STD_START, dtype=torch.float32, device=dev) * tcfg.start_std_scale
    # synthetic ground truth near the mean (speed does not depend on the labels)
    truth = (mean[None] + torch.randn(n_i, n_k, 2, generator=gen).to(dev) * std[None])
    truth = torch.minimum(truth.clamp(min=0), shapes[:, None].flip(-1) - 1)

    # net/opt are arguments rather than closure variables: they are ``del``-ed at the end
    def step_once(net: torch.nn.Module, opt: torch.optim.Optimizer, use_bf16: bool) -> float:
        loss = train_step(net, opt, mcfg, replace(tcfg, bf16=use_bf16), stack, truth, shapes,
                          mean, std, gen)
        sync(dev)
        return loss

    per_step = tcfg.batch_size * tcfg.train_iterations
    res: dict = {
        "batch_size": tcfg.batch_size,
        "n_levels": mcfg.n_levels,
        "patch": mcfg.patch,
        "train_iterations": tcfg.train_iterations,
        "preset_train_iterations": presets(name)[1].train_iterations,
        "preset_batch_size": presets(name)[1].batch_size,
        "start_mode": tcfg.start_mode,
        "mode": mcfg.mode,
        "n_images_in_stack": n_i,
        "glimpses_per_step": per_step,
        "warmup_steps": warmup,
        "measured_steps": steps,
        "preset_bf16": presets(name)[1].bf16,
    }
    for bf in bf16_modes:
        for _ in range(warmup):
            step_once(net, opt, bf)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = step_once(net, opt, bf)
            times.append(time.perf_counter() - t)
            if not math.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite training loss")
        med = median(times)
        key = f"bf16_{'on' if bf else 'off'}"
        res[key] = {
            "step_s_median": med,
            "step_samples_s": times,
            "glimpses_per_s": per_step / med,
            "glimpses_per_s_mean": per_step * len(times) / sum(times),
            "s_per_glimpse": med / per_step,
        }
        log(f"  [{name}] train bf16={'on' if bf else 'off'}: {med:.3f} s/step, "
            f"{per_step / med:.1f} glimpses/s ({per_step} glimpses x {mcfg.n_levels} levels per step)")
    if len(bf16_modes) == 2:
        off, on = res["bf16_off"]["glimpses_per_s"], res["bf16_on"]["glimpses_per_s"]
        res["faster"] = "bf16_on" if on > off else "bf16_off"
        res["bf16_speedup"] = on / off
    del opt, net, model
    return res


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"ISBI 2015 folder holding images/ (default {DEFAULT_DATA})")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="fewer images, repetitions and steps (smoke run)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated subset of compact,paper (default both)")
    ap.add_argument("--images", type=int, default=None,
                    help="images for predict (default 3, quick 1)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="passes over the images per measurement (default 2, quick 1)")
    ap.add_argument("--paper-batch", type=int, default=4,
                    help="samples per training step for paper (default 4; each is 6 levels)")
    args = ap.parse_args(argv)

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s) {bad}; choose from {CONFIGS}")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    dev = resolve_device(args.device)

    quick = args.quick
    n_images = args.images or (1 if quick else 3)
    repeats = args.repeats or (1 if quick else 2)
    train_imgs = 2 if quick else 4
    plan = {  # (warm-up steps, measured steps, batch override)
        "compact": (1, 3, None) if quick else (3, 10, None),
        "paper": (1, 2, args.paper_batch) if quick else (1, 4, args.paper_batch),
    }

    can_bf16 = bf16_supported(dev)
    bf16_modes = [False, True] if can_bf16 else [False]

    out: dict = {
        "meta": {
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_bf16_flags": cpu_bf16_flags(),
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "device": str(dev),
            "cuda_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "bf16_supported": can_bf16,
            "quick": quick,
            "repeats": repeats,
            "argv": sys.argv[1:],
            "notes": [
                "predict: 19 landmarks, 3 iterations, 1 start; excl_load = image path in -> trajectory "
                "out with the model already loaded (includes image read + pyramid); incl_load = "
                "GlimpseModel.load(checkpoint) + the same predict (checkpoint file warm in the OS page cache).",
                "times are medians over images x repeats; bf16 on/off interleaved per image.",
                "channels_last is already applied inside GlimpseNet.forward; not toggled here.",
                "train: one glimpse = one (image, landmark) sample at all pyramid levels through forward + "
                "backward + Adam step; the step of training.train replicated with train_iterations=1.",
                "random-init models: speed does not depend on the weights.",
            ],
        },
        "predict": {},
        "train": {},
    }
    if not can_bf16:
        log(f"note: bf16 autocast unavailable on {dev}; measuring bf16 off only")

    with tempfile.TemporaryDirectory(prefix="glimpse_speed_") as td:
        tmp = Path(td)
        images, where = find_images(args.data, n_images)
        if images:
            out["meta"]["data"] = where
            log(f"data: {len(images)} image(s) from {where}: {', '.join(p.name for p in images)}")
        else:
            log(f"NOTE: real images unavailable ({where}); falling back to synthetic "
                f"{SYNTH_SHAPE[1]}x{SYNTH_SHAPE[0]} images -- pass --data to use the ISBI set")
            images = synthetic_images(tmp, n_images)
            out["meta"]["data"] = f"synthetic {SYNTH_SHAPE[1]}x{SYNTH_SHAPE[0]} (real data not found: {where})"
        out["meta"]["images"] = [p.name for p in images]
        log(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {dev}, "
            f"{'quick' if quick else 'full'} run")

        for name in configs:
            log(f"\npredict: {name}")
            out["predict"][name] = bench_predict(name, images, dev, tmp, bf16_modes, repeats, quick)

        # training pyramids: the predict images, topped up with synthetic ones if too few
        train_paths = list(images[:train_imgs])
        if len(train_paths) < train_imgs:
            if out["meta"]["data"].startswith("synthetic"):
                train_paths += synthetic_images(tmp, train_imgs)[len(train_paths):]
            else:
                more, _ = find_images(args.data, train_imgs)
                train_paths = more or train_paths
        out["meta"]["train_images"] = [p.name for p in train_paths]
        pyr_cache: dict = {}
        for name in configs:
            mcfg, _ = presets(name)
            key = (mcfg.n_levels, mcfg.patch)
            if key not in pyr_cache:
                pyr_cache[key] = [build_pyramid(read_image(p), *key) for p in train_paths]
            warm, steps, batch = plan[name]
            log(f"\ntrain: {name}")
            out["train"][name] = bench_train(name, pyr_cache[key], dev, bf16_modes, batch, warm, steps)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    # ------------------------------------------------------------------------ summary
    log("\n=== summary " + "=" * 60)
    m = out["meta"]
    log(f"torch {m['torch']} | threads {m['torch_num_threads']} | CPUs {m['cpu_count']} | device {m['device']}"
        f" | {m['timestamp']}{' | QUICK' if quick else ''}")
    log(f"predict (s/image, 19 landmarks x {ITERATIONS} iterations, median of {len(images) * repeats}):")
    for name, r in out["predict"].items():
        parts = []
        for bf in bf16_modes:
            k = f"bf16_{'on' if bf else 'off'}"
            parts.append(f"bf16 {'on ' if bf else 'off'}: {r[k]['excl_load_s']:.3f} loaded / "
                         f"{r[k]['incl_load_s']:.3f} incl. load")
        extra = f" -> faster: {r['faster']} (x{r['bf16_speedup']:.2f} bf16 speed-up)" if "faster" in r else ""
        log(f"  {name:8s} " + " | ".join(parts) + extra)
        log(f"  {'':8s} load {r['load_s']:.3f} s, read+pyramid {r['read_and_pyramid_s']:.3f} s, "
            f"{r['n_params'] / 1e6:.1f} M params, {r['model_source'].split(' (')[0]}")
    log("train (glimpse-steps/s; glimpse = 1 sample x all levels, fwd+bwd+Adam):")
    for name, r in out["train"].items():
        parts = [f"bf16 {'on ' if bf else 'off'}: {r[f'bf16_{k}']['glimpses_per_s']:.2f}/s "
                 f"({r[f'bf16_{k}']['s_per_glimpse']:.3f} s/glimpse)"
                 for bf, k in ((b, 'on' if b else 'off') for b in bf16_modes)]
        extra = f" -> faster: {r['faster']} (x{r['bf16_speedup']:.2f})" if "faster" in r else ""
        log(f"  {name:8s} batch {r['batch_size']}: " + " | ".join(parts) + extra)
    log(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
