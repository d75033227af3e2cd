"""The glimpse-only model, the paper's method: from the mean training position, glimpse, move, repeat.

No coarse or fine stage: every landmark starts at its mean training position and the glimpse
net (pyramid patches, shared trunk, spatial-softmax features, MLP offset) moves it step by
step. :func:`train_glimpse_only` trains one from scratch on a CPU budget:

- **starts, a curriculum**: three kinds of start per batch. *Wide*: around the mean position,
  N(mean, (s x the landmark's training spread)^2) with ``s`` narrowing from ``wide_std[0]`` to
  ``wide_std[1]``; *near*: around the target at a log-uniform radius whose upper bound narrows
  from ``near_px[0]`` to ``near_px[1]`` (what later steps see); *rollout*: the mean start
  followed for 0 to ``rollout_steps`` steps by the net itself (no gradient through them: the
  positions its own earlier steps reach at test time), a share growing from
  ``rollout_fraction[0]`` to ``[1]``. The narrowing ends at ``curriculum`` of the budget.
- **augmentation**: the sampling frame rotated and scaled, the patches' contrast, brightness and
  gamma varied, noise added;
- **weight averaging**: an exponential moving average of the weights (``ema_decay``), which is
  what is validated and saved unless the last weights do better on validation.

Validation (held-out images, :func:`validate`) gives the MRE after every step count up to the
largest asked; :func:`choose_steps` picks the model's default step count on it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import loop
from ._serde import DictConfig
from .devices import resolve_device
from .errors import GlimpseError
from .glimpse import PyramidStack, image_to_frame, sample_glimpses
from .inference import GlimpseModel
from .io import Dataset
from .metrics import radial_errors
from .model import GlimpseModelNet, ModelConfig
from .pyramid import levels_for


@dataclass(frozen=True)
class GlimpseOnlyConfig(DictConfig):
    """Optimisation, start curriculum, augmentation and weight averaging (see the module)."""

    batch_size: int = 48
    lr: float = 1.5e-3
    warmup: float = 0.03
    wide_std: tuple[float, float] = (1.5, 0.5)
    near_px: tuple[float, float] = (300.0, 40.0)
    near_min_px: float = 2.0
    near_fraction: tuple[float, float] = (0.6, 0.35)
    rollout_fraction: tuple[float, float] = (0.0, 0.45)
    rollout_steps: int = 4
    curriculum: float = 0.7
    rotation_deg: float = 10.0
    log_scale: float = 0.08
    contrast: float = 0.15
    brightness: float = 0.06
    gamma: float = 0.2
    noise: float = 0.01
    ema_decay: float = 0.998
    val_every_s: float = 900.0
    ground_truth: str = "mean"
    seed: int = 0


def curriculum_value(pair: Sequence[float], progress: float, end: float) -> float:
    """``pair[0]`` at the start, ``pair[1]`` from ``end`` of training on, linear between."""
    f = min(max(progress / max(end, 1e-9), 0.0), 1.0)
    return float(pair[0] + (pair[1] - pair[0]) * f)


def learning_rate(cfg: GlimpseOnlyConfig, progress: float) -> float:
    """Linear warm-up, then a cosine down to a hundredth."""
    if progress < cfg.warmup:
        return cfg.lr * (0.1 + 0.9 * progress / cfg.warmup)
    p = min((progress - cfg.warmup) / max(1e-9, 1 - cfg.warmup), 1.0)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class Batch:
    """The sampled pairs of one step and their data (all on the training device)."""

    img: torch.Tensor
    lm: torch.Tensor
    target: torch.Tensor
    size: torch.Tensor  # (B, 2) image (w, h)


def draw_starts(cfg: GlimpseOnlyConfig, progress: float, b: Batch, mean: torch.Tensor, std: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2)`` starts and ``(B,)`` bool: which of them are rollouts (to be followed by the net
    first; their start is the mean position)."""
    n, dev = len(b.img), b.target.device
    wide = curriculum_value(cfg.wide_std, progress, cfg.curriculum)
    hi = curriculum_value(cfg.near_px, progress, cfg.curriculum)
    f_near = curriculum_value(cfg.near_fraction, progress, cfg.curriculum)
    f_roll = curriculum_value(cfg.rollout_fraction, progress, cfg.curriculum)
    start = mean[b.lm] + torch.randn(n, 2, generator=gen).to(dev) * std[b.lm] * wide
    lo, hi = math.log(cfg.near_min_px), math.log(max(hi, cfg.near_min_px * 1.01))
    radius = torch.exp(lo + (hi - lo) * torch.rand(n, 1, generator=gen)).to(dev)
    near = b.target + torch.randn(n, 2, generator=gen).to(dev) * radius
    u = torch.rand(n, generator=gen).to(dev)
    start = torch.where((u < f_near)[:, None], near, start)
    roll = u >= 1.0 - f_roll
    start = torch.where(roll[:, None], mean[b.lm], start)
    return start, roll


def _clamp(c: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    return torch.minimum(c.clamp(min=0), size - 1)


@torch.no_grad()
def rollout(net: GlimpseModelNet, stack: PyramidStack, b: Batch, start: torch.Tensor, steps: torch.Tensor,
            unit: float) -> torch.Tensor:
    """Follow each start for its ``steps`` glimpse steps (0 or more) with ``net`` as at test time
    (eval mode, no augmentation, no gradient); returns where each one got to."""
    c = start.clone()
    if len(c) == 0 or int(steps.max()) == 0:
        return c
    was = net.training
    net.eval()
    for t in range(int(steps.max())):
        go = steps > t
        p = sample_glimpses(stack, b.img[go], c[go], net.cfg.patch)
        c[go] = _clamp(c[go] + net(p, b.lm[go]).float() * unit, b.size[go])
    net.train(was)
    return c


def augment(patches: torch.Tensor, cfg: GlimpseOnlyConfig, gen: torch.Generator) -> torch.Tensor:
    """Per glimpse: gamma, contrast and brightness (the same on every level), then noise."""
    n, dev = patches.shape[0], patches.device

    def u(scale: float) -> torch.Tensor:
        return ((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * scale).to(dev)

    x = patches.clamp(0, 255) / 255.0
    x = x ** torch.exp(u(cfg.gamma))
    x = (x - 0.5) * torch.exp(u(cfg.contrast)) + 0.5 + u(cfg.brightness)
    x = x * 255.0
    if cfg.noise > 0:
        x = x + torch.randn(x.shape, generator=gen).to(dev) * (255.0 * cfg.noise)
    return x


def sample_batch(cfg: GlimpseOnlyConfig, truth: torch.Tensor, present: torch.Tensor | None, shapes: torch.Tensor,
                 gen: torch.Generator) -> Batch:
    from .fine import present_pairs

    dev = truth.device
    n_i, n_k = truth.shape[:2]
    img = torch.randint(0, n_i, (cfg.batch_size,), generator=gen).to(dev)
    lm = torch.randint(0, n_k, (cfg.batch_size,), generator=gen).to(dev)
    if present is not None:
        img, lm = present_pairs(img, lm, present, gen)
    return Batch(img, lm, truth[img, lm], shapes[img].flip(-1))


def train_step(net: GlimpseModelNet, opt: torch.optim.Optimizer, cfg: GlimpseOnlyConfig, progress: float,
               stack: PyramidStack, data: dict, gen: torch.Generator) -> float:
    """One optimizer step; returns the batch's mean radial error (full-resolution pixels)."""
    unit = net.cfg.offset_unit
    b = sample_batch(cfg, data["truth"], data["present"], data["shapes"], gen)
    start, roll = draw_starts(cfg, progress, b, data["mean"], data["std"], gen)
    steps = torch.randint(0, cfg.rollout_steps + 1, (len(start),), generator=gen).to(start.device) * roll
    c = _clamp(rollout(net, stack, b, start, steps, unit), b.size)
    n = len(c)
    ang = ((torch.rand(n, generator=gen) * 2 - 1) * math.radians(cfg.rotation_deg)).to(c.device)
    scl = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * cfg.log_scale).to(c.device)
    patches = augment(sample_glimpses(stack, b.img, c, net.cfg.patch, ang, scl), cfg, gen)
    pred = net(patches, b.lm).float()
    tgt = image_to_frame(b.target - c, ang, scl) / unit
    err = torch.sqrt(((pred - tgt) ** 2).sum(-1) + 1e-8)
    opt.zero_grad(set_to_none=True)
    err.mean().backward()
    opt.step()
    return float(err.detach().mean()) * unit


class WeightAverage:
    """An exponential moving average of a net's weights (buffers copied), its decay warmed up."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.net = copy.deepcopy(net).eval()
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for a, p in zip(self.net.parameters(), net.parameters()):
            a.mul_(d).add_(p.detach(), alpha=1 - d)
        for a, p in zip(self.net.buffers(), net.buffers()):
            a.copy_(p)


# ------------------------------------------------------------------------------ validation
def validate(model: GlimpseModel, ds: Dataset, max_steps: int = 5, ground_truth: str = "mean") -> dict:
    """Validation figures after each step count 1 .. ``max_steps`` (one run of ``max_steps`` steps
    per image from the mean start, as :meth:`GlimpseModel.predict` does by default, facing auto):
    ``{"steps": {t: {"mre_mm", "sdr2_pct"}}, "per_landmark_mre_mm": {t: [K]}, "n_images",
    "read_as_left_facing"}`` (the last: images that facing auto mirrored; the ISBI images all face right)."""
    if model.coarse is not None:
        raise GlimpseError("validate() is for glimpse-only models (this one has a coarse stage)")
    positions, left = [], 0
    for i in range(len(ds)):
        tr = model.predict(ds.image(i), iterations=max_steps, spacing=ds.pixel_spacing)
        positions.append(tr.positions)
        left += tr.facing == "left"
    pos = np.stack(positions, axis=1)  # (T + 1, N, K, 2)
    truth = ds.ground_truth(ground_truth)
    out: dict = {"steps": {}, "per_landmark_mre_mm": {}, "n_images": len(ds), "read_as_left_facing": left}
    for t in range(1, max_steps + 1):
        err = radial_errors(pos[t], truth, ds.pixel_spacing)
        out["steps"][t] = {"mre_mm": float(np.nanmean(err)), "sdr2_pct": float(np.nanmean(err[np.isfinite(err)] < 2.0)
                                                                                * 100)}
        out["per_landmark_mre_mm"][t] = [float(v) for v in np.nanmean(err, axis=0)]
    return out


def choose_steps(val: dict, margin_mm: float = 0.005) -> int:
    """The fewest steps whose validation MRE is within ``margin_mm`` of the best."""
    mre = {int(t): r["mre_mm"] for t, r in val["steps"].items()}
    best = min(mre.values())
    return min(t for t, v in mre.items() if v <= best + margin_mm)


def validation_line(val: dict, steps: Sequence[int] = (1, 2, 3, 5)) -> str:
    parts = [f"{t} step{'s' if t > 1 else ''} {val['steps'][t]['mre_mm']:.2f} mm "
             f"({val['steps'][t]['sdr2_pct']:.0f} % < 2 mm)" for t in steps if t in val["steps"]]
    return "validation MRE: " + ", ".join(parts)


# ------------------------------------------------------------------------------ training
def _new_model(train_ds: Dataset, mcfg: ModelConfig, cfg: GlimpseOnlyConfig, shape: tuple[int, int],
               dev: torch.device, meta: dict | None) -> GlimpseModel:
    from .landmark_set import of_data
    from .training import start_statistics

    names = train_ds.landmark_names
    torch.manual_seed(cfg.seed)
    truth = train_ds.ground_truth(cfg.ground_truth).astype(np.float64)
    m = dict(meta or {})
    m.update({"train_image_shape": list(shape), "auto_levels": levels_for(shape, mcfg.patch),
              "n_train_images": len(train_ds), "train_images": [p.name for p in train_ds.image_paths],
              "glimpse_net": "trained", "kind": "glimpse-only", "landmark_set": of_data(train_ds).to_dict()})
    return GlimpseModel(GlimpseModelNet(mcfg).to(dev), names, train_ds.pixel_spacing,
                        *start_statistics(truth, names), cfg.to_dict(), m)


def _tensors(data: Any, model: GlimpseModel, dev: torch.device) -> dict:
    return {"truth": data.truth.to(dev), "present": None if bool(data.present.all()) else data.present.to(dev),
            "shapes": torch.as_tensor(data.shapes, dtype=torch.float32, device=dev),
            "mean": torch.as_tensor(model.mean_start, dtype=torch.float32, device=dev),
            "std": torch.as_tensor(model.std_start, dtype=torch.float32, device=dev)}


def _with_net(model: GlimpseModel, net: GlimpseModelNet) -> GlimpseModel:
    """``model`` answering with ``net`` (the same landmarks, starts and meta)."""
    return GlimpseModel(net.eval(), model.landmark_names, model.pixel_spacing, model.mean_start, model.std_start,
                        model.train_config, model.meta)


def _loop(model: GlimpseModel, avg: WeightAverage, data: Any, cfg: GlimpseOnlyConfig, budget_s: float,
          max_steps: int | None, val: Dataset | None, progress: bool,
          callback: Callable[[dict], None] | None) -> list[dict]:
    """The training loop (:func:`napari_glimpse.loop.run`, until ``budget_s`` or ``max_steps``); returns
    its history records."""
    dev = model.device
    net, stack, t = model.net.train(), data.stack.to(dev), _tensors(data, model, dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []

    def one_step(frac: float) -> float:
        px = train_step(net, opt, cfg, frac, stack, t, gen)
        avg.update(net)
        return px

    def validated(info: dict, bar) -> None:
        info["val_mre_mm"] = validate(_with_net(model, avg.net), val, 3)["steps"][3]["mre_mm"]
        history.append(dict(info))
        bar.write(f"step {info['step']}: validation MRE after 3 steps {info['val_mre_mm']:.2f} mm")

    res = loop.run(one_step, opt, lambda frac: learning_rate(cfg, frac), stage="glimpse", time_budget_s=budget_s,
                   max_steps=max_steps, progress=progress, callback=callback,
                   hooks=[loop.Hook(cfg.val_every_s, validated)] if val is not None else [],
                   loss_key="loss_mm", loss_scale=model.pixel_spacing, loss_unit=" mm", stage_key=False)
    history.append({"step": res.step, "elapsed_s": res.elapsed_s, "loss_mm": res.loss,
                    "stopped": "steps" if res.stopped == "steps" else "minutes"})
    return history


def train_glimpse_only(train_ds: Dataset, val_ds: Dataset | None, model_config: ModelConfig,
                       cfg: GlimpseOnlyConfig, budget_s: float, max_steps: int | None = None, device: str = "auto",
                       progress: bool = True, callback: Callable[[dict], None] | None = None,
                       meta: dict | None = None, eval_steps: int = 5,
                       init: GlimpseModel | None = None) -> GlimpseModel:
    """Train a glimpse-only model on ``train_ds`` for ``budget_s`` seconds (or ``max_steps``),
    from scratch or, with ``init``, from that model's net (same architecture and landmarks);
    with ``val_ds``, validate after 1 .. ``eval_steps`` steps, keep the weight average or the last
    weights (whichever validates better) and set ``meta['iterations']`` by :func:`choose_steps`
    (without: the weight average and 3 steps). Returns the model (not written)."""
    from .training import TrainingData

    dev = resolve_device(device)
    data = TrainingData(train_ds, model_config.n_levels, model_config.patch, cfg.ground_truth, progress=progress)
    shape = tuple(int(v) for v in np.median(data.shapes, axis=0))
    model = _new_model(train_ds, model_config, cfg, shape, dev, meta)
    if init is not None:
        model.net.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in init.net.state_dict().items()})
    avg = WeightAverage(model.net, cfg.ema_decay)
    history = _loop(model, avg, data, cfg, budget_s, max_steps, val_ds, progress, callback)
    del data
    return _finish(model, avg, val_ds, history, eval_steps)


def _finish(model: GlimpseModel, avg: WeightAverage, val_ds: Dataset | None, history: list[dict],
            eval_steps: int) -> GlimpseModel:
    """Pick the weights (average or last) and the step count on validation; record it all in meta."""
    last = history[-1]
    model.meta.update({"train_steps": last["step"], "train_wall_s": last["elapsed_s"], "history": history,
                       "weights": "average", "ema_updates": avg.updates})
    if val_ds is None:
        model.net = avg.net.eval()
        model.meta["iterations"] = 3
        return model
    t0 = time.monotonic()
    averaged = validate(_with_net(model, avg.net), val_ds, eval_steps)
    plain = validate(_with_net(model, model.net.eval()), val_ds, eval_steps)
    best = min(averaged["steps"][t]["mre_mm"] for t in averaged["steps"])
    if min(plain["steps"][t]["mre_mm"] for t in plain["steps"]) < best:
        val, model.meta["weights"] = plain, "last"
    else:
        val, model.net = averaged, avg.net.eval()
    model.meta["iterations"] = choose_steps(val)
    other = plain if val is averaged else averaged
    model.meta["validation"] = {**val, "images": [p.name for p in val_ds.image_paths],
                                "wall_s": time.monotonic() - t0, "chosen_iterations": model.meta["iterations"],
                                "other_weights_mre_mm": {t: r["mre_mm"] for t, r in other["steps"].items()}}
    return model


def split_by_ids(ds: Dataset, train_ids: Sequence[int], val_ids: Sequence[int]) -> tuple[Dataset, Dataset | None]:
    """The images whose name is a number in ``train_ids`` (an inclusive ``[first, last]``) and
    those in ``val_ids`` (validation; ``None`` when there is none). An image in neither is left out."""
    def pick(lo_hi: Sequence[int]) -> list[int]:
        lo, hi = int(lo_hi[0]), int(lo_hi[1])
        return [i for i, p in enumerate(ds.image_paths) if p.stem.isdigit() and lo <= int(p.stem) <= hi]

    tr, va = pick(train_ids), pick(val_ids)
    if not tr:
        raise GlimpseError(f"no training image is numbered {train_ids[0]}-{train_ids[1]} in the data "
                           f"(the recipe trains on those and validates on {val_ids[0]}-{val_ids[1]})")
    return ds.subset(tr), (ds.subset(va) if va else None)
