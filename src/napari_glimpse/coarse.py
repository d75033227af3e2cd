"""Coarse first pass: all landmarks at once from a small whole-image view.

A small U-Net looks at the whole cephalogram resampled to ``input_hw`` (320 x 256 by default,
about 0.75 mm per pixel) and predicts one heatmap per landmark at half that resolution. The
heatmap peaks (refined by a local soft-argmax) are where the next stage starts (the fine
stage's windows, or glimpse steps), in place of the training-set mean, so it only has to refine
a point a few millimetres away.

It is trained with left-right flips (landmarks keep their identity), so it finds the landmarks
whichever way the patient faces; comparing its answer with the training layout tells the facing.

The view is resampled from one pyramid level (the finest that is still at least ``input_hw``)
through :func:`view_grid`, identically at training (with a random affine) and inference.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, loop
from ._serde import DictConfig
from .artefacts import crop_views, paint_views
from .errors import GlimpseError
from .model import _conv_bn
from .runtime import NetRuntime, members_of, runtimes_of  # noqa: F401  members_of: re-exported


@dataclass(frozen=True)
class CoarseConfig(DictConfig):
    """Coarse network and its training. ``sigma``: target Gaussian, heatmap pixels. ``artefacts``:
    the probability that a training view shows another device's field of view (the skull top cut
    off, the rest stretched to the view), a ruler in front of the face or a collimator band
    (:mod:`napari_glimpse.artefacts`; 0 draws nothing)."""

    n_landmarks: int = 19
    input_hw: tuple[int, int] = (320, 256)
    width: int = 16
    sigma: float = 1.5
    batch_size: int = 8
    lr: float = 2e-3
    rotation_deg: float = 10.0
    log_scale: float = 0.1
    shift: float = 0.05
    flip: float = 0.5
    artefacts: float = 0.0
    seed: int = 0


class CoarseNet(nn.Module):
    """U-Net, 5 scales (w, 2w, 4w, 8w, 8w channels): (B, 1, H, W) -> (B, K, H/2, W/2) logits."""

    def __init__(self, cfg: CoarseConfig, in_channels: int = 1):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        ch = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.stem = nn.Sequential(_conv_bn(in_channels, ch[0], 2), _conv_bn(ch[0], ch[0], 1))
        self.down = nn.ModuleList(
            nn.Sequential(_conv_bn(ch[i], ch[i + 1], 2), _conv_bn(ch[i + 1], ch[i + 1], 1)) for i in range(4)
        )
        self.up = nn.ModuleList(
            nn.Sequential(_conv_bn(ch[i + 1] + ch[i], ch[i], 1), _conv_bn(ch[i], ch[i], 1)) for i in range(4)
        )
        self.head = nn.Conv2d(ch[0], cfg.n_landmarks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x / 255.0) - 0.5) / 0.25
        skips = [self.stem(x.contiguous(memory_format=torch.channels_last))]
        for d in self.down:
            skips.append(d(skips[-1]))
        y = skips.pop()
        for i in reversed(range(4)):
            s = skips.pop()
            y = F.interpolate(y, size=s.shape[-2:], mode="bilinear", align_corners=False)
            y = self.up[i](torch.cat([y, s], 1))
        return self.head(y).float()


# ------------------------------------------------------------------------------ the view
def view_level(shape: tuple[int, int], input_hw: tuple[int, int], n_levels: int) -> int:
    """The coarsest pyramid level that is still at least ``input_hw`` (so nothing is lost)."""
    h, w = shape
    ratio = min(h / input_hw[0], w / input_hw[1])
    return int(min(max(0, math.floor(math.log2(max(ratio, 1.0)))), n_levels - 1))


def view_matrix(image_hw: tuple[int, int], angle: torch.Tensor, scale: torch.Tensor, flip: torch.Tensor,
                shift: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` affine from view to image normalised coordinates (``affine_grid``'s theta).

    The rotation and scale act in pixel units (so a rotation does not shear a non-square image);
    ``flip`` (bool) mirrors left-right; ``shift`` (B, 2) is in normalised units.
    """
    h, w = image_hw
    b = angle.shape[0]
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    fx = torch.where(flip, -1.0, 1.0)
    # D^-1 R F D with D = diag(w, h)
    m = torch.zeros(b, 2, 3)
    m[:, 0, 0] = cos * fx
    m[:, 0, 1] = -sin * h / w
    m[:, 1, 0] = sin * w / h * fx
    m[:, 1, 1] = cos
    m[:, :, 2] = shift
    return m


def to_normalised(xy: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    h, w = image_hw
    return (xy + 0.5) / torch.tensor([w, h], dtype=xy.dtype) * 2 - 1


def from_normalised(u: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    h, w = image_hw
    return (u + 1) / 2 * torch.tensor([w, h], dtype=u.dtype) - 0.5


def render_views(level: torch.Tensor, theta: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """Resample ``(B, 1, h, w)`` float images through ``theta`` to ``(B, 1, *input_hw)``."""
    grid = F.affine_grid(theta, [level.shape[0], 1, *input_hw], align_corners=False)
    return F.grid_sample(level, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def heat_to_view(hm_xy: torch.Tensor, heat_hw: tuple[int, int]) -> torch.Tensor:
    """Heatmap pixel coordinates -> view normalised coordinates."""
    return to_normalised(hm_xy, heat_hw)


def decode(logits: torch.Tensor, window: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak of each heatmap refined by a soft-argmax in a ``(2 window + 1)^2`` neighbourhood.

    Returns ``(B, K, 2)`` heatmap-pixel coordinates (x, y) and ``(B, K)`` spread (pixels).
    """
    b, k, h, w = logits.shape
    p = torch.softmax(logits.reshape(b, k, -1), -1).reshape(b, k, h, w)
    idx = p.reshape(b, k, -1).argmax(-1)
    iy, ix = idx // w, idx % w
    off = torch.arange(-window, window + 1)
    ys = (iy[..., None] + off).clamp(0, h - 1)  # (B, K, n)
    xs = (ix[..., None] + off).clamp(0, w - 1)
    bi = torch.arange(b)[:, None, None, None]
    ki = torch.arange(k)[None, :, None, None]
    loc = p[bi, ki, ys[..., :, None], xs[..., None, :]]  # (B, K, n, n)
    loc = loc / loc.sum((-1, -2), keepdim=True).clamp_min(1e-12)
    gx = xs[..., None, :].float().expand_as(loc)
    gy = ys[..., :, None].float().expand_as(loc)
    mx = (loc * gx).sum((-1, -2))
    my = (loc * gy).sum((-1, -2))
    var = (loc * ((gx - mx[..., None, None]) ** 2 + (gy - my[..., None, None]) ** 2)).sum((-1, -2))
    return torch.stack([mx, my], -1), var.sqrt()


class Ensemble(nn.Module):
    """Several nets of one stage (the same landmarks; ``same`` says what else they share) whose
    answers are averaged.

    Nets trained from different seeds make partly independent errors, so the mean of their
    answers is closer than either. ``same``: the config fields every
    member must share.
    """

    same: tuple[str, ...] = ("n_landmarks",)
    stage = "stage"

    def __init__(self, members: "list[nn.Module]"):
        super().__init__()
        if not members:
            raise ValueError(f"a {self.stage} ensemble needs at least one net")
        first = members[0].cfg
        for m in members[1:]:
            for key in self.same:
                if getattr(m.cfg, key) != getattr(first, key):
                    raise ValueError(f"{self.stage} ensemble members must share {', '.join(self.same)} "
                                     f"({key}: {getattr(first, key)} vs {getattr(m.cfg, key)})")
        self.members = nn.ModuleList(members)

    @property
    def cfg(self):
        return self.members[0].cfg


class CoarseEnsemble(Ensemble):
    """Coarse nets (same view size and landmarks) whose answers are averaged; :func:`locate`
    accepts either kind."""

    same = ("input_hw", "n_landmarks")
    stage = "coarse"


def locate(net: "CoarseNet | CoarseEnsemble", level: torch.Tensor, image_hw: tuple[int, int],
           flip_average: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run the coarse net on one pyramid level ``(h, w)`` uint8 of an image of ``image_hw``:
    ``(K, 2)`` full-resolution positions and ``(K,)`` spread in full-resolution pixels, the heatmap
    peaks' width and the passes' disagreement in quadrature (see :func:`locate_parts`)."""
    pos, width, disagreement = locate_parts(net, level, image_hw, flip_average)
    return pos, np.sqrt(width ** 2 + disagreement ** 2)


def locate_parts(net: "CoarseNet | CoarseEnsemble", level: torch.Tensor, image_hw: tuple[int, int],
                 flip_average: bool = False, decode_window: int = 2, runtimes: "list[NetRuntime] | None" = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the coarse net on one pyramid level ``(h, w)`` uint8 of an image of ``image_hw``.

    ``flip_average``: also look at the mirrored view and average the two answers (test-time
    augmentation; the net was trained with flips). An ensemble averages its members' answers.
    ``decode_window``: the soft-argmax neighbourhood's half-size around each peak (:func:`decode`).
    Returns ``(K, 2)`` full-resolution positions, and ``(K,)`` in full-resolution pixels the
    heatmap peaks' width (mean over passes) and how far the passes (members, views) disagree (RMS
    distance of their answers from the mean). ``runtimes``: how each member runs (a stage's,
    :mod:`napari_glimpse.runtime`; default: their float copies).
    """
    cfg = net.cfg
    runtimes = runtimes_of(net) if runtimes is None else runtimes
    dev = next(net.parameters()).device
    n = 2 if flip_average else 1
    x = level.to(dev, torch.float32)[None, None].expand(n, 1, *level.shape)
    flip = torch.tensor([False, True][:n])
    theta = view_matrix(image_hw, torch.zeros(n), torch.ones(n), flip, torch.zeros(n, 2)).to(dev)
    with torch.inference_mode():
        views = render_views(x, theta, cfg.input_hw)
        logits = torch.cat([rt(views) for rt in runtimes]).cpu()  # (M n, K, h, w)
    heat_hw = tuple(logits.shape[-2:])
    xy, spread = decode(logits, decode_window)
    o = heat_to_view(xy, heat_hw)  # (M n, K, 2) view coordinates; image = A o with A = diag(+-1, 1)
    o = o.reshape(-1, n, *o.shape[1:])
    o[:, 1:, :, 0] = -o[:, 1:, :, 0]
    every = from_normalised(o.reshape(-1, *o.shape[2:]), image_hw)  # (M n, K, 2) full-resolution pixels
    pos = every.mean(0)
    scale = image_hw[1] / heat_hw[1]
    # in quadrature (locate), the two rank validation errors better than the width alone
    # (Spearman 0.20 -> 0.24 with the coarse pair)
    disagreement = ((every - pos) ** 2).sum(-1).mean(0).sqrt()
    return (pos.numpy().astype(np.float64), (spread.mean(0) * scale).numpy().astype(np.float64),
            disagreement.numpy().astype(np.float64))


def facing_of(positions: np.ndarray, mean_start: np.ndarray) -> str:
    """``right`` when the landmarks' left-right layout matches the training set's, else ``left``."""
    a = positions[:, 0] - positions[:, 0].mean()
    b = mean_start[:, 0] - mean_start[:, 0].mean()
    return "right" if float((a * b).sum()) >= 0 else "left"


# ------------------------------------------------------------------------------ training
def gaussian_targets(xy: torch.Tensor, heat_hw: tuple[int, int], sigma: float) -> torch.Tensor:
    """``(B, K, h, w)`` normalised Gaussians at heatmap-pixel coordinates ``xy`` (B, K, 2)."""
    h, w = heat_hw
    gy = torch.arange(h, dtype=torch.float32)[:, None]
    gx = torch.arange(w, dtype=torch.float32)[None, :]
    d2 = (gx - xy[..., 0, None, None]) ** 2 + (gy - xy[..., 1, None, None]) ** 2
    t = torch.exp(-d2 / (2 * sigma**2))
    return t / t.sum((-1, -2), keepdim=True).clamp_min(1e-12)


def augment_intensity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random gamma, contrast, brightness and noise for a ``(B, C, h, w)`` batch (0-255 scale).

    Under torchrun ``x`` is this rank's share of the batch: the draws are made for the whole batch,
    alike on every rank, and each rank keeps its share's (:func:`napari_glimpse.distributed.share`)."""
    b, own = x.shape[0] * distributed.world_size(), distributed.share
    g_ = torch.exp((own(torch.rand(b, 1, 1, 1, generator=gen)) * 2 - 1) * 0.3)
    x = 255.0 * (x.clamp(0, 255) / 255.0) ** g_
    x = x * (1 + (own(torch.rand(b, 1, 1, 1, generator=gen)) * 2 - 1) * 0.15) \
        + (own(torch.rand(b, 1, 1, 1, generator=gen)) * 2 - 1) * 15.0
    return x + own(torch.randn((b, *x.shape[1:]), generator=gen)) * 3.0


def heatmap_lr_factor(frac: float) -> float:
    """The heatmap nets' schedule: a 3 % linear warm-up from a tenth, then a cosine to 1 %."""
    if frac < 0.03:
        return 0.1 + 0.9 * frac / 0.03
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (frac - 0.03) / 0.97))


def fit_heatmaps(
    net: nn.Module,
    stage: str,
    lr: float,
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    time_budget_s: float,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_every_s: float = 300.0,
    max_steps: int | None = None,
    averages: "dict[float, nn.Module] | None" = None,
) -> list[dict]:
    """The training loop shared by the coarse and fine stages.

    ``batch()`` returns ``(x, target, inside)``: inputs, ``(B, K, h, w)`` target distributions
    and ``(B, K)`` weights (0 for landmarks outside the view); the loss is their cross-entropy
    with the net's heatmaps (under torchrun, ``batch()`` returns this rank's share of the batch).
    AdamW, warm-up then cosine to 1 % of ``lr``, fitted to the nearer of ``time_budget_s`` and
    ``max_steps``.
    ``callback`` gets a dict per step (``stage``, ``step``, ``loss``, ``lr``, ``elapsed_s``,
    ``progress``); ``evaluate(net) -> mm`` runs every ``eval_every_s`` and at the end. Returns the
    history; the net is left in eval mode.

    ``averages``: a dict whose keys are decays (e.g. ``{0.999: None}``); each value is replaced
    by a copy of the net whose weights (and batch-norm statistics) are the exponential moving
    average of the net's after every step with that decay (:func:`update_average`), in eval
    mode: ordinary nets of the same size, so an average costs nothing more at inference.

    Under torchrun (:mod:`napari_glimpse.distributed`) each process trains on its share of the
    global batch, with the batch norms' statistics and the gradients over all of them; the clock
    and ``should_stop`` are rank 0's, and only rank 0 shows progress and evaluates.
    """
    if averages is not None:
        for d in list(averages):
            if not 0.0 < d < 1.0:
                raise ValueError(f"an average's decay must lie between 0 and 1, not {d}")
            averages[d] = copy.deepcopy(net).eval().requires_grad_(False)
    training_mode(net)
    progress, evaluate = (progress, evaluate) if distributed.is_main() else (False, None)
    distributed.broadcast_state(net)
    synced = distributed.synced_batchnorm(net)
    fit = _HeatmapFit(net, stage, lr, batch, averages, evaluate)
    try:
        res = loop.run(fit.step, fit.opt, lambda frac: lr * heatmap_lr_factor(frac), stage=stage,
                       time_budget_s=time_budget_s, max_steps=max_steps, progress=progress, callback=callback,
                       should_stop=should_stop, hooks=[loop.Hook(eval_every_s, fit.validated)] if evaluate else [])
    finally:
        distributed.plain_batchnorm(synced)
    net.eval()
    return fit.finish(res)


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """The heatmap nets' loss (see :func:`fit_heatmaps`): the cross-entropy of ``target`` with the
    heatmaps ``logits``, weighted by ``inside``, averaged over the landmarks inside (every rank's)."""
    logp = torch.log_softmax(logits.flatten(2), -1)
    count = distributed.mean_divisor(inside.sum())
    return (-(target.flatten(2) * logp).sum(-1) * inside).sum() / count


class _HeatmapFit:
    """What :func:`fit_heatmaps` hands :func:`napari_glimpse.loop.run`: the step (with its optimiser
    and weight averages) and the validation hook, with the history they record."""

    def __init__(self, net: nn.Module, stage: str, lr: float, batch: Callable[[], tuple],
                 averages: "dict[float, nn.Module] | None", evaluate: Callable[[nn.Module], float] | None):
        self.net, self.stage, self.batch = net, stage, batch
        self.averages, self.evaluate = averages or {}, evaluate
        self.dev = next(net.parameters()).device  # batches are made on the CPU, then moved to the net's device
        self.opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
        self.history: list[dict] = []
        self.steps = 0

    def step(self, frac: float) -> float:
        x, target, inside = (t.to(self.dev, non_blocking=True) for t in self.batch())
        loss = heatmap_loss(self.net(x), target, inside)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.net.parameters())
        self.opt.step()
        self.steps += 1
        for d, avg in self.averages.items():
            update_average(avg, self.net, d, self.steps)
        return loss.item()

    def validated(self, info: dict, bar) -> None:
        self.net.eval()
        info["val_mre_mm"] = self.evaluate(self.net)
        training_mode(self.net)
        bar.write(f"{self.stage} step {info['step']}: val MRE {info['val_mre_mm']:.2f} mm")
        self.history.append(info)

    def finish(self, res: loop.LoopResult) -> list[dict]:
        """The history with the last step's record (and the net's validation at the end)."""
        rec = {"stage": self.stage, "step": res.step, "loss": res.loss, "elapsed_s": res.elapsed_s}
        if self.evaluate is not None:
            rec["val_mre_mm"] = self.evaluate(self.net)
        self.history.append(rec)
        return self.history


# which layers of a U-Net learn when it is trained (see tune_only)
LAYERS = ("all", "decoder", "last", "head")


def tune_only(net: CoarseNet, layers: str = "all") -> CoarseNet:
    """Let only ``layers`` of a coarse or fine U-Net learn (the others' weights are frozen): ``all``;
    ``decoder`` (the up blocks and the head); ``last`` (the finest up block and the head); ``head``
    (the 1x1 convolution that makes the heatmaps). Frozen layers keep their batch-norm statistics
    too (:func:`training_mode`). Returns ``net``."""
    if layers not in LAYERS:
        raise GlimpseError(f"layers to tune: one of {', '.join(LAYERS)}, not {layers!r}")
    learn = {"all": [net], "decoder": [net.up, net.head], "last": [net.up[0], net.head], "head": [net.head]}[layers]
    net.requires_grad_(False)
    for m in learn:
        m.requires_grad_(True)
    return net


def training_mode(net: nn.Module) -> nn.Module:
    """``net.train()``, except that modules none of whose weights learn stay in eval mode (their
    batch norms keep the statistics they have: see :func:`tune_only`)."""
    net.train()
    for m in net.modules():
        own = list(m.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            m.eval()
    return net


def update_average(avg: nn.Module, net: nn.Module, decay: float, step: int) -> None:
    """One step of an exponential moving average of ``net``'s state into ``avg`` (the same
    architecture). The decay ramps up as ``min(decay, (1 + step) / (10 + step))``, so early
    random weights are soon forgotten; integer buffers (batch norm's step count) are copied."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for a, b in zip(avg.state_dict().values(), net.state_dict().values(), strict=True):
            if a.is_floating_point():
                a.lerp_(b.detach().to(a.device), 1.0 - d)
            else:
                a.copy_(b)


def train_coarse(
    levels: torch.Tensor,
    image_hw: tuple[int, int],
    truth_n: torch.Tensor,
    cfg: CoarseConfig,
    time_budget_s: float,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    evaluate: Callable[[CoarseNet], float] | None = None,
    eval_every_s: float = 300.0,
    max_steps: int | None = None,
    init: CoarseNet | None = None,
    lr_scale: float = 1.0,
    device: "str | torch.device" = "cpu",
    layers: str = "all",
    present: torch.Tensor | None = None,
) -> tuple[CoarseNet, list[dict]]:
    """Train a coarse net for ``time_budget_s`` seconds of wall time (or ``max_steps`` steps,
    whichever comes first; the learning-rate schedule follows the nearer).

    ``levels``: ``(N, 1, h, w)`` float images (see :func:`view_levels`); ``image_hw``: the
    typical full-resolution size (for the aspect ratio of rotations); ``truth_n``: ``(N, K, 2)``
    positions in each image's normalised coordinates (:func:`to_normalised`). ``evaluate(net) -> mm``
    is called every ``eval_every_s`` and at the end.
    ``init``: fine-tune a copy of this net (its configuration replaces ``cfg``) instead of
    starting from random weights; ``lr_scale`` scales the learning rate (e.g. 0.1 to fine-tune).
    ``device``: where the net trains (e.g. ``"cuda"``); batches are made on the CPU from
    ``levels`` and moved there. ``layers``: which of its layers learn (:func:`tune_only`).
    ``present``: ``(N, K)`` bool, False where a landmark is absent (default: where ``truth_n`` is
    NaN); an absent landmark's heatmap is left out of the loss, whatever its ``truth_n``.
    Returns the net (eval mode, on ``device``) and its history.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = starting_net(CoarseNet, cfg, init, device, layers)
    cfg = net.cfg
    ok = torch.isfinite(truth_n).all(-1) if present is None else present.bool()  # (N, K)
    batch = _coarse_batches(levels, image_hw, truth_n, ok, cfg, gen)
    history = fit_heatmaps(net, "coarse", cfg.lr * lr_scale, batch, time_budget_s, progress, callback, should_stop,
                           evaluate, eval_every_s, max_steps)
    return net, history


def starting_net(make: Callable[[Any], nn.Module], cfg: Any, init: nn.Module | None,
                 device: "str | torch.device", layers: str) -> nn.Module:
    """The net a heatmap stage trains: ``make(cfg)``, or a copy of ``init`` (whose configuration
    wins; it may be a weight average, kept without gradients), on ``device``, only ``layers`` learning."""
    if init is not None:
        net = copy.deepcopy(init).to(device).requires_grad_(True)
    else:
        net = make(cfg).to(device)
    return tune_only(net, layers)


def _coarse_batches(levels: torch.Tensor, image_hw: tuple[int, int], truth_n: torch.Tensor, ok: torch.Tensor,
                    cfg: CoarseConfig, gen: torch.Generator
                    ) -> Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The coarse net's batches (see :func:`train_coarse`): random views of random images, their
    target heatmaps and which landmarks are inside, drawn from ``gen``."""
    n = levels.shape[0]
    heat_hw = ((cfg.input_hw[0] + 1) // 2, (cfg.input_hw[1] + 1) // 2)  # the stride-2 stem's output

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = cfg.batch_size
        i = torch.randint(0, n, (b,), generator=gen)
        ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(cfg.rotation_deg)
        scl = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * cfg.log_scale)
        flip = torch.rand(b, generator=gen) < cfg.flip
        shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.shift
        theta = view_matrix(image_hw, ang, scl, flip, shift)
        i, theta = distributed.share(i), distributed.share(theta)  # this rank's views (all in one process)
        if cfg.artefacts > 0:  # another device's field of view (no draws when off)
            theta = crop_views(theta, cfg.artefacts, gen)
        x = render_views(levels[i], theta, cfg.input_hw)
        # landmark positions in the view: o = A^-1 (u - t)
        a, t = theta[:, :, :2], theta[:, :, 2]
        o = torch.einsum("bij,bkj->bki", torch.linalg.inv(a), truth_n[i] - t[:, None, :])
        if cfg.artefacts > 0:  # and its ruler and collimator band
            x = paint_views(x, o, ok[i], distributed.share(flip), cfg.artefacts, gen)
        x = augment_intensity(x, gen)
        # an absent landmark's heatmap is not taught (weight 0, its target made from a point outside)
        o = torch.where(ok[i][..., None], o, 2.0)
        inside = (o.abs() < 0.98).all(-1).float()
        return x, gaussian_targets(from_normalised(o, heat_hw), heat_hw, cfg.sigma), inside

    return batch


def view_levels(pyramids: list, truth: np.ndarray, cfg: CoarseConfig
                ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Every image's view level (see :func:`view_level`) as one ``(N, 1, h, w)`` float stack.

    ``pyramids``: each image's :class:`~napari_glimpse.pyramid.Pyramid`. Images of different
    sizes are resampled to twice the view size (positions are carried in normalised
    coordinates, so nothing else changes). Returns the stack, the median image size and
    ``(N, K, 2)`` normalised positions.
    """
    shapes = np.array([p.shape for p in pyramids])
    image_hw = tuple(int(v) for v in np.median(shapes, axis=0))
    truth_n = torch.stack([to_normalised(torch.as_tensor(t, dtype=torch.float32), tuple(s))
                           for t, s in zip(truth, shapes)])
    same = bool((shapes == shapes[0]).all())
    out = []
    for p in pyramids:
        lv = view_level(p.shape, cfg.input_hw, len(p))
        x = p.levels[lv].float()[None, None]
        if not same:
            x = F.interpolate(x, size=(2 * cfg.input_hw[0], 2 * cfg.input_hw[1]), mode="bilinear",
                              antialias=True, align_corners=False)
        out.append(x[0])
    return torch.stack(out), image_hw, truth_n  # type: ignore[return-value]
