#!/usr/bin/env python
"""Peer for the ISBI 2015 benchmark: a heatmap model from the PyPI package ``landmarker``.

The peer is trained from scratch under a wall-clock budget on the same images as napari-glimpse,
with the library's own building blocks (written against ``landmarker`` 0.4.1, the version
installed here with ``pip install -c constraints.txt landmarker``; any 0.4.x should do):

* **model** -- ``landmarker.models.SpatialConfigurationNet`` (SCN, Payer et al. 2019, landmarker's
  adapted version: a MONAI residual U-Net as local-appearance net times a ``tanh`` spatial-
  configuration net working at 1/16 resolution with 11x11 kernels). The library default
  ``la_channels=(128, 128, 128, 128)`` costs ~2 s per 320x256 image per step on one CPU core, so it
  would see only a few dozen epochs in a 100-minute CPU budget; this peer uses a lighter,
  deeper local-appearance U-Net ``la_channels=(16, 32, 64, 128, 256)``,
  ``la_strides=(2, 2, 2, 2)`` (~0.35-0.4 s per image per step on one core) and otherwise the
  library defaults (2 residual units, instance norm, PReLU, spatial-configuration net of
  128 channels, 11x11 kernels, downsampling 16, image given to it as well).
* **targets** -- ``landmarker.heatmap.GaussianHeatmapGenerator`` (sigma ``SIGMA`` = 2 input pixels,
  ``gamma=1``: each target is a normalised Gaussian density), computed once per training image
  and warped with the image by the augmentation (as landmarker's ``HeatmapDataset`` does with its
  transforms), then renormalised to sum 1.
* **loss** -- ``landmarker.losses.NLLLoss`` (landmarker's "indirect" heatmap regression: spatial
  softmax of the 19 output maps, cross-entropy against the target densities). It was preferred over
  the L2 / adaptive-sigma L2 (``GaussianHeatmapL2Loss``) losses because it has no all-zero plateau
  at the start, which matters when a CPU budget buys only a few thousand steps.
* **decoding** -- spatial softmax (``landmarker.models.utils.SoftmaxND``), then
  ``landmarker.heatmap.decoder.coord_local_weighted``: argmax, refined by the probability-weighted
  mean in a ``DECODE_WINDOW`` x ``DECODE_WINDOW`` window around it (a local soft-argmax).

Everything else is this file's own: images are resized once to ``input_hw`` (default 320x256,
i.e. ~0.75 mm per input pixel, aspect ratio not preserved), light on-the-fly augmentation in torch
(random affine: rotation +-10 deg, isotropic scale +-10 %, translation +-5 % of the size; intensity:
gamma, contrast, brightness, Gaussian noise; no flips, so each landmark keeps its identity), AdamW
with a linear warm-up and a cosine learning-rate decay over the wall-clock budget, validation MRE
(mm, 0.1 mm/px) every ~5 minutes and at the end, best-on-validation checkpoint used for the test
predictions. landmarker ships no trainer (its ``__all__`` lists ``train`` but there is no such
module in 0.4.1), hence the simple loop here.

Usage::

    python benchmarks/peer_landmarker.py --smoke      # 10 train / 5 val / 5 test images, 90 s, 1 thread

From code: ``train_and_predict(train_images, train_points, val_images, val_points, test_images,
budget_s=6000, threads=2)``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from typing import Any, Callable, Sequence

import landmarker
import numpy as np
import torch
import torch.nn.functional as F
from landmarker.heatmap import GaussianHeatmapGenerator
from landmarker.heatmap.decoder import coord_local_weighted
from landmarker.losses import NLLLoss
from landmarker.models import SpatialConfigurationNet
from landmarker.models.utils import SoftmaxND

PIXEL_SPACING_MM = 0.1  # ISBI 2015
N_LANDMARKS = 19

MODEL_KWARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": N_LANDMARKS,
    "la_channels": (16, 32, 64, 128, 256),
    "la_strides": (2, 2, 2, 2),
    "la_num_res_units": 2,
    "sp_channels": 128,
    "sp_kernel_size": 11,
    "sp_downsample": 16,
}
SIGMA = 2.0  # target Gaussian sigma, input pixels
BATCH = 4
LR = 1e-3
LR_MIN = 1e-5
WEIGHT_DECAY = 1e-4
WARMUP_STEPS = 30
GRAD_CLIP = 5.0
DECODE_WINDOW = 9
EVAL_EVERY_S = 300.0
AUG: dict[str, float] = {
    "rotation_deg": 10.0,
    "scale": 0.10,
    "translation_frac": 0.05,
    "gamma_log": 0.25,  # gamma = exp(U(-g, g))
    "contrast": 0.15,  # multiplicative, 1 +- c
    "brightness": 0.08,  # additive, on [0, 1] intensities
    "noise_std": 0.02,
}

Log = Callable[[str], Any]


# ----------------------------------------------------------------------------------------------
# data helpers
# ----------------------------------------------------------------------------------------------
def _resize_image(img: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """Grey uint8 (H, W) -> float (1, h, w) in [0, 1], antialiased bilinear."""
    t = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float32).div_(255.0)[None, None]
    out = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


def _to_input_xy(points: np.ndarray, src_hw: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """Full-resolution (x, y) -> input-grid (x, y), pixel centres at integers (align_corners=False)."""
    sx, sy = hw[1] / src_hw[1], hw[0] / src_hw[0]
    out = np.asarray(points, dtype=np.float64).copy()
    out[..., 0] = (out[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (out[..., 1] + 0.5) * sy - 0.5
    return out


def _to_full_xy(points: np.ndarray, src_hw: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`_to_input_xy`."""
    sx, sy = src_hw[1] / hw[1], src_hw[0] / hw[0]
    out = np.asarray(points, dtype=np.float64).copy()
    out[..., 0] = (out[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (out[..., 1] + 0.5) * sy - 0.5
    return out


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] intensities -> network input (fixed affine map; the U-Net has instance norm)."""
    return (x - 0.5) / 0.25


# ----------------------------------------------------------------------------------------------
# augmentation (torch, on the fly)
# ----------------------------------------------------------------------------------------------
def _random_theta(b: int, hw: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """``affine_grid`` matrices (B, 2, 3) for random rotation/scale/translation about the centre."""
    h, w = hw
    u = lambda: torch.rand(b, generator=gen, dtype=torch.float64) * 2 - 1  # noqa: E731
    ang = u() * math.radians(AUG["rotation_deg"])
    sc = 1.0 + u() * AUG["scale"]
    tx, ty = u() * AUG["translation_frac"] * w, u() * AUG["translation_frac"] * h
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cos, sin = torch.cos(ang) * sc, torch.sin(ang) * sc
    m = torch.zeros(b, 3, 3, dtype=torch.float64)  # forward map, input px -> output px
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    m[:, 0, 2] = cx + tx - (cos * cx - sin * cy)
    m[:, 1, 2] = cy + ty - (sin * cx + cos * cy)
    m[:, 2, 2] = 1.0
    n = torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]],
                     dtype=torch.float64)
    theta = n @ torch.linalg.inv(m) @ torch.linalg.inv(n)  # output (normalised) -> input (normalised)
    return theta[:, :2].to(torch.float32)


def _augment(
    imgs: torch.Tensor, heat: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random affine on images (B,1,h,w) and target densities (B,K,h,w); intensity jitter."""
    b, _, h, w = imgs.shape
    theta = _random_theta(b, (h, w), gen)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    imgs = F.grid_sample(imgs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    heat = F.grid_sample(heat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    s = heat.sum(dim=(2, 3), keepdim=True)
    heat = torch.where(s > 0.05, heat / s.clamp_min(1e-6), torch.zeros_like(heat))

    u = lambda: (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)  # noqa: E731
    gamma = torch.exp(u() * AUG["gamma_log"])
    imgs = imgs.clamp(0.0, 1.0).pow(gamma)
    imgs = imgs * (1.0 + u() * AUG["contrast"]) + u() * AUG["brightness"]
    imgs = imgs + torch.randn(imgs.shape, generator=gen) * AUG["noise_std"]
    return imgs, heat


# ----------------------------------------------------------------------------------------------
# prediction
# ----------------------------------------------------------------------------------------------
def _decode(logits: torch.Tensor) -> torch.Tensor:
    """Network output (B, K, h, w) -> (B, K, 2) input-grid (x, y) via landmarker's decoders."""
    probs = SoftmaxND(spatial_dims=2)(logits.float())
    yx = coord_local_weighted(probs, window=DECODE_WINDOW, spatial_dims=2, activation=None)
    return yx.flip(-1)


@torch.inference_mode()
def _predict_resized(model: torch.nn.Module, x01: torch.Tensor, batch: int = BATCH) -> np.ndarray:
    """Resized [0, 1] images (N, 1, h, w) -> (N, K, 2) input-grid (x, y)."""
    model.eval()
    out = []
    for i in range(0, x01.shape[0], batch):
        out.append(_decode(model(_normalise(x01[i : i + batch]))))
    model.train()
    return torch.cat(out).numpy().astype(np.float64)


def _mre_mm(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(np.linalg.norm(pred - gt, axis=-1).mean() * PIXEL_SPACING_MM)


# ----------------------------------------------------------------------------------------------
# the benchmark entry point
# ----------------------------------------------------------------------------------------------
def train_and_predict(
    train_images: list[np.ndarray],
    train_points: np.ndarray,
    val_images: list[np.ndarray],
    val_points: np.ndarray,
    test_images: list[np.ndarray],
    budget_s: float,
    threads: int,
    seed: int = 0,
    input_hw: tuple[int, int] = (320, 256),
    log: Log = print,
) -> dict:
    """Train landmarker's SCN from scratch for ``budget_s`` wall seconds; predict the test images.

    ``train_points``/``val_points`` are ``(N, 19, 2)`` full-resolution ``(x, y)`` pixels of grey
    ``uint8`` images ``(H, W)``. The budget counts everything after the train/val images are
    resized (target generation, training steps, validation evaluations, the final evaluation).
    Returns ``test_pred`` ``(M, 19, 2)`` full-resolution ``(x, y)``, ``seconds_per_image`` (model
    loaded; resize + forward + decode), ``config``, ``train_wall_s``, ``train_cpu_s``, ``curve``
    (validation MRE in mm over elapsed seconds) and ``best_val_mre_mm``.
    """
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    h, w = int(input_hw[0]), int(input_hw[1])
    div = int(np.prod(MODEL_KWARGS["la_strides"]))
    if h % div or w % div or h % MODEL_KWARGS["sp_downsample"] or w % MODEL_KWARGS["sp_downsample"]:
        raise ValueError(f"input_hw {input_hw} must be divisible by {max(div, MODEL_KWARGS['sp_downsample'])}")
    train_points = np.asarray(train_points, dtype=np.float64)
    val_points = np.asarray(val_points, dtype=np.float64)
    n_train, n_val = len(train_images), len(val_images)
    if n_train == 0 or train_points.shape != (n_train, N_LANDMARKS, 2):
        raise ValueError(f"train_points must be ({n_train}, {N_LANDMARKS}, 2), got {train_points.shape}")
    if n_val and val_points.shape != (n_val, N_LANDMARKS, 2):
        raise ValueError(f"val_points must be ({n_val}, {N_LANDMARKS}, 2), got {val_points.shape}")

    # --- resize once (not counted in the budget) ---
    tr_x = torch.stack([_resize_image(im, (h, w)) for im in train_images])  # (N,1,h,w)
    tr_xy = np.stack([_to_input_xy(p, im.shape[:2], (h, w)) for im, p in zip(train_images, train_points)])
    va_x = torch.stack([_resize_image(im, (h, w)) for im in val_images]) if n_val else None
    va_hw = [im.shape[:2] for im in val_images]

    t0, c0 = time.perf_counter(), time.process_time()
    elapsed = lambda: time.perf_counter() - t0  # noqa: E731

    # --- targets: landmarker's Gaussian densities, once per image (fp16 storage) ---
    generator = GaussianHeatmapGenerator(
        nb_landmarks=N_LANDMARKS, sigmas=SIGMA, gamma=1.0, heatmap_size=(h, w), learnable=False
    )
    yx = torch.from_numpy(tr_xy[..., ::-1].copy()).float()  # landmarker wants (y, x)
    tr_heat = torch.empty(n_train, N_LANDMARKS, h, w, dtype=torch.float16)
    with torch.no_grad():
        for i in range(0, n_train, 8):
            tr_heat[i : i + 8] = generator(yx[i : i + 8]).to(torch.float16)
    log(f"[peer] targets for {n_train} images in {elapsed():.1f} s")

    model = SpatialConfigurationNet(**MODEL_KWARGS)
    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    criterion = NLLLoss(spatial_dims=2, apply_softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def val_mre() -> float:
        assert va_x is not None
        pred = _predict_resized(model, va_x)
        full = np.stack([_to_full_xy(p, hw_, (h, w)) for p, hw_ in zip(pred, va_hw)])
        return _mre_mm(full, val_points)

    curve: list[dict[str, float]] = []
    best_mre, best_state, best_step = math.inf, None, 0
    step, seen = 0, 0
    step_times: list[float] = []
    eval_every = min(EVAL_EVERY_S, budget_s / 3.0)
    next_eval = eval_every
    eval_reserve = 0.0  # estimated duration of one validation pass
    log_every = max(10.0, min(60.0, budget_s / 10.0))
    next_log = log_every
    order: list[int] = []
    loss_ema = float("nan")

    def evaluate(tag: str) -> None:
        nonlocal best_mre, best_state, best_step, eval_reserve
        if not n_val:
            return
        te = time.perf_counter()
        mre = val_mre()
        eval_reserve = time.perf_counter() - te
        curve.append({"elapsed_s": round(elapsed(), 1), "val_mre_mm": round(mre, 4), "step": step})
        if mre < best_mre:
            best_mre, best_state, best_step = mre, copy.deepcopy(model.state_dict()), step
        log(f"[peer] {tag} step {step} ({seen / n_train:.1f} ep) t={elapsed():.0f}s "
            f"val MRE {mre:.3f} mm (best {best_mre:.3f} @ step {best_step}); eval {eval_reserve:.1f}s")

    while True:
        mean_step = float(np.mean(step_times[-20:])) if step_times else 0.0
        if step > 0 and elapsed() + mean_step + eval_reserve >= budget_s:
            break
        if step == 0 and budget_s <= 0:
            break
        if n_val and elapsed() >= next_eval and elapsed() + 2 * eval_reserve + mean_step < budget_s:
            evaluate("eval")
            next_eval = elapsed() + eval_every
            continue
        ts = time.perf_counter()
        horizon = max(budget_s - eval_reserve, 1e-6)
        frac = min(1.0, elapsed() / horizon)
        lr = LR_MIN + 0.5 * (LR - LR_MIN) * (1.0 + math.cos(math.pi * frac))
        if step < WARMUP_STEPS:
            lr *= (step + 1) / WARMUP_STEPS
        for g in opt.param_groups:
            g["lr"] = lr
        if len(order) < BATCH:
            order += rng.permutation(n_train).tolist()
        idx, order = order[:BATCH], order[BATCH:]
        x, t = _augment(tr_x[idx], tr_heat[idx].float(), gen)
        out = model(_normalise(x))
        loss = criterion(out, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        step += 1
        seen += len(idx)
        lv = float(loss.detach())
        loss_ema = lv if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * lv
        step_times.append(time.perf_counter() - ts)
        if step == 1 and n_val:
            # rough first guess: forward + decode of one image ~ 1/2 of its share of a train step
            eval_reserve = 0.5 * step_times[0] / BATCH * n_val
        if elapsed() >= next_log:
            log(f"[peer] step {step} ep {seen / n_train:.1f} t={elapsed():.0f}s loss {loss_ema:.3f} "
                f"lr {lr:.2e} {float(np.median(step_times)):.2f} s/step")
            next_log = elapsed() + log_every

    evaluate("final")
    if best_state is not None and best_step != step:
        model.load_state_dict(best_state)
    train_wall, train_cpu = elapsed(), time.process_time() - c0
    log(f"[peer] trained {step} steps ({seen / n_train:.1f} epochs) in {train_wall:.0f} s wall, "
        f"{train_cpu:.0f} s CPU; using step {best_step if best_state is not None else step}")

    # --- test: per image, resize + forward + decode + map back, model loaded ---
    model.eval()
    preds: list[np.ndarray] = []
    ti = time.perf_counter()
    with torch.inference_mode():
        for im in test_images:
            x = _normalise(_resize_image(im, (h, w))[None])
            p = _decode(model(x))[0].numpy().astype(np.float64)
            preds.append(_to_full_xy(p, im.shape[:2], (h, w)))
    spi = (time.perf_counter() - ti) / max(1, len(test_images))
    test_pred = np.stack(preds) if preds else np.zeros((0, N_LANDMARKS, 2))

    config = {
        "peer": "landmarker",
        "landmarker_version": getattr(landmarker, "__version__", "?"),
        "torch_version": torch.__version__,
        "model": "landmarker.models.SpatialConfigurationNet",
        "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_KWARGS.items()},
        "n_params": int(n_params),
        "input_hw": [h, w],
        "target": f"landmarker.heatmap.GaussianHeatmapGenerator(sigma={SIGMA}, gamma=1) densities",
        "sigma_px": SIGMA,
        "loss": "landmarker.losses.NLLLoss(apply_softmax=True)",
        "decoder": f"SoftmaxND + landmarker.heatmap.decoder.coord_local_weighted(window={DECODE_WINDOW})",
        "optimizer": "AdamW",
        "lr": LR,
        "lr_min": LR_MIN,
        "lr_schedule": f"linear warm-up {WARMUP_STEPS} steps, cosine over the wall-clock budget",
        "weight_decay": WEIGHT_DECAY,
        "grad_clip": GRAD_CLIP,
        "batch": BATCH,
        "augmentation": dict(AUG),
        "threads": int(threads),
        "seed": int(seed),
        "budget_s": float(budget_s),
        "steps": step,
        "epochs": round(seen / n_train, 2),
        "s_per_step_median": round(float(np.median(step_times)), 4) if step_times else None,
        "s_per_step_mean": round(float(np.mean(step_times)), 4) if step_times else None,
        "best_step": best_step if best_state is not None else step,
        "eval_every_s": eval_every,
    }
    return {
        "test_pred": test_pred,
        "seconds_per_image": spi,
        "config": config,
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "curve": curve,
        "best_val_mre_mm": None if math.isinf(best_mre) else best_mre,
    }


def inference_speed(test_images: list[np.ndarray], threads: int, input_hw: tuple[int, int] = (320, 256)) -> float:
    """Median seconds per image for the peer's inference (resize + forward + decode + map back).

    Speed does not depend on the weights, so a freshly built model of the benchmark's
    configuration is timed (after one warm-up image); used to time the peer on an idle machine.
    """
    from landmarker.models import SpatialConfigurationNet

    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        model = SpatialConfigurationNet(**MODEL_KWARGS).eval()
        h, w = int(input_hw[0]), int(input_hw[1])
        ts = []
        with torch.inference_mode():
            for i, im in enumerate([test_images[0], *test_images]):
                t = time.perf_counter()
                x = _normalise(_resize_image(im, (h, w))[None])
                p = _decode(model(x))[0].numpy().astype(np.float64)
                _to_full_xy(p, im.shape[:2], (h, w))
                if i:
                    ts.append(time.perf_counter() - t)
        return float(np.median(ts))
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# smoke mode
# ----------------------------------------------------------------------------------------------
def _smoke(data: str, budget_s: float, threads: int) -> None:
    from napari_glimpse.io import load_dataset

    ds = load_dataset(data, "train")
    gt = ds.ground_truth("mean")
    tr, va, te = list(range(10)), list(range(10, 15)), list(range(15, 20))

    def load(idx: Sequence[int]) -> list[np.ndarray]:
        return [ds.image(i) for i in idx]

    res = train_and_predict(load(tr), gt[tr], load(va), gt[va], load(te), budget_s=budget_s,
                            threads=threads, seed=0)
    test_mre = _mre_mm(res["test_pred"], gt[te])
    cfg = res["config"]
    print(f"landmarker {cfg['landmarker_version']}, {cfg['model']} ({cfg['n_params'] / 1e6:.2f} M params), "
          f"input {cfg['input_hw']}")
    print(f"steps {cfg['steps']} (batch {cfg['batch']}, {cfg['epochs']} epochs of 10 images), "
          f"{cfg['s_per_step_median']:.3f} s/step median ({cfg['s_per_step_mean']:.3f} mean), threads {threads}")
    print(f"train wall {res['train_wall_s']:.1f} s, CPU {res['train_cpu_s']:.1f} s")
    print("val curve:", res["curve"])
    print(f"best val MRE {res['best_val_mre_mm']:.3f} mm; TEST MRE {test_mre:.3f} mm (5 images)")
    print(f"inference {res['seconds_per_image']:.3f} s/image (resize + forward + decode)")
    steps_100min = 6000.0 / cfg["s_per_step_median"]
    print(f"at this speed a 100-min budget buys ~{steps_100min:.0f} steps = "
          f"~{steps_100min * cfg['batch'] / 150:.0f} epochs of 150 images (threads={threads})")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="10/5/5 images of the train split, 90 s, 1 thread")
    ap.add_argument("--data", default="/work/shared/data/isbi2015")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds (smoke mode)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not args.smoke:
        ap.print_help()
        return 2
    _smoke(args.data, args.budget, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
