"""Fine stage: a closer look around each coarse answer, all landmarks with one network.

The coarse stage reads the whole cephalogram at about 0.75 mm per pixel and its heatmaps at
1.5 mm per pixel. The fine stage cuts a ``patch x patch`` window from a finer pyramid level
(level 1 by default: 0.2 mm per pixel for ISBI images, a 12.8 mm window), plus windows of the
same pixel size and centre from the next ``context - 1`` levels as extra channels (by default
25.6 and 51.2 mm: a small foveated glimpse), centred on each landmark's coarse answer; the same
small U-Net as the coarse stage (:class:`CoarseNet`, one heatmap per landmark at half the finest
window's resolution) says where in the window the landmark is.
Landmark ``k``'s answer is read from heatmap ``k`` of the window centred on its own coarse answer;
training supervises every landmark that falls inside a window (one shared network, one head
channel per landmark), with windows centred on the true point plus a random offset the size of
the coarse stage's errors.

Images are always read the way the training images face: the caller mirrors a left-facing
image first (as the coarse stage decides), so no flips are needed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from ._serde import DictConfig
from .artefacts import paint_artefacts
from .coarse import (
    CoarseConfig,
    CoarseNet,
    Ensemble,
    augment_intensity,
    decode,
    fit_heatmaps,
    from_normalised,
    gaussian_targets,
    members_of,
    starting_net,
    to_normalised,
)
from .errors import GlimpseError
from .pyramid import deepen
from .runtime import NetRuntime, runtimes_of


@dataclass(frozen=True)
class FineConfig(DictConfig):
    """Fine network and its training.

    ``level``: pyramid level the windows are cut from; ``patch``: window side (pixels of that
    level); ``sigma``: target Gaussian (heatmap pixels, half the level's resolution);
    ``jitter_mm``: the window centre's offset from the true point at training, per axis, normal
    with a standard deviation drawn log-uniformly in this range (the coarse stage errs by
    about 1–2 mm, rarely 5–10); ``context``: how many levels the window is cut from (``level``,
    ``level + 1``, ...; each its own input channel, all ``patch`` pixels and centred alike, so each
    coarser one sees twice the area: a small glimpse; levels below the model's pyramid are made
    from its last one, :func:`napari_glimpse.pyramid.deepen`). Each training window's heatmap is
    taught one Gaussian at the mean of the annotators' points. Files written before ``target``,
    ``coord_weight`` and ``erase`` were removed still load (:meth:`from_dict` ignores those keys;
    every shipped net had them ``"mean"``, 0 and 0, what training does now). ``artefacts``: the
    probability that a training window shows another device's ruler or dark band
    (:mod:`napari_glimpse.artefacts`; 0 draws nothing).
    """

    n_landmarks: int = 19
    level: int = 1
    patch: int = 64
    width: int = 16
    sigma: float = 1.5
    batch_size: int = 32
    lr: float = 2e-3
    rotation_deg: float = 10.0
    log_scale: float = 0.1
    jitter_mm: tuple[float, float] = (0.5, 4.0)
    context: int = 3
    pixel_spacing: float = 0.1
    artefacts: float = 0.0
    seed: int = 0


class FineNet(CoarseNet):
    """The coarse U-Net on ``patch x patch`` windows: (B, 1, P, P) -> (B, K, P/2, P/2) logits."""

    def __init__(self, cfg: FineConfig):
        super().__init__(CoarseConfig(n_landmarks=cfg.n_landmarks, input_hw=(cfg.patch, cfg.patch), width=cfg.width),
                         in_channels=cfg.context)
        self.cfg = cfg  # type: ignore[assignment]


class FineEnsemble(Ensemble):
    """Fine nets whose answers are averaged. They share the window size (so their heatmaps have
    one size) but may read windows from different levels (:func:`kinds_of`): the windows of each
    kind are cut once, and every net of that kind reads them."""

    same = ("n_landmarks", "patch")
    stage = "fine"


def kinds_of(nets: "list[FineNet]") -> "dict[tuple[int, int], list[int]]":
    """The nets grouped by the windows they read: ``(level, context)`` -> their indices in
    ``nets``, in order of first appearance (the first net's kind first)."""
    kinds: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(nets):
        kinds.setdefault((m.cfg.level, m.cfg.context), []).append(i)
    return kinds


def window_matrix(level_hw: tuple[int, int], center_n: torch.Tensor, patch: int, angle: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` affine from window to level normalised coordinates (``affine_grid``'s theta).

    The window is ``patch`` level pixels on a side (times ``scale``), rotated by ``angle`` and
    centred at ``center_n`` (B, 2), the level's normalised coordinates.
    """
    h, w = level_hw
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    m = torch.zeros(center_n.shape[0], 2, 3)
    # A = diag(1/w, 1/h) R diag(patch, patch)
    m[:, 0, 0] = cos * patch / w
    m[:, 0, 1] = -sin * patch / w
    m[:, 1, 0] = sin * patch / h
    m[:, 1, 1] = cos * patch / h
    m[:, :, 2] = center_n
    return m


def _context_theta(theta: torch.Tensor, c: int) -> torch.Tensor:
    """The window of context level ``c``: ``2**c`` times as wide in normalised units (the same
    pixel count on a level with half the pixels per step), same centre."""
    th = theta.clone()
    th[:, :, :2] *= 2**c
    return th


def cut_windows(levels: "list[torch.Tensor]", theta: torch.Tensor, patch: int) -> torch.Tensor:
    """Resample ``(B, 1, h, w)`` float images (one per context level, finest first) through
    ``theta`` (the finest level's window) to ``(B, C, patch, patch)`` (see :func:`_context_theta`)."""
    out = []
    for c, lv in enumerate(levels):
        grid = F.affine_grid(_context_theta(theta, c), [theta.shape[0], 1, patch, patch], align_corners=False)
        out.append(F.grid_sample(lv, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return torch.cat(out, 1)


class WindowCutter:
    """:func:`cut_windows` for training batches: image ``i[b]`` of each stack, without copying
    whole images. Each level is padded once (edge pixels repeated, as ``border`` sampling does);
    each window is then sampled from a small crop around its centre."""

    def __init__(self, levels: "list[torch.Tensor]", patch: int):
        self.patch = patch
        self.r = patch  # crop half-size: covers a window rotated 45 degrees and scaled up 1.4x
        self.hw = [tuple(lv.shape[-2:]) for lv in levels]
        self.padded = [F.pad(lv, (self.r,) * 4, mode="replicate") for lv in levels]

    def __call__(self, i: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        r, out = self.r, []
        for c, (lv, (h, w)) in enumerate(zip(self.padded, self.hw)):
            th = _context_theta(theta, c)
            # the window's centre in this level's pixels, the crop's corner (x0, y0) around it; a
            # centre beyond the image is brought to its edge (the crop must lie in the padded level,
            # and beyond the edge both hold the same repeated edge pixels)
            cx = ((th[:, 0, 2] + 1) / 2 * w - 0.5).round().long().clamp(0, w - 1)
            cy = ((th[:, 1, 2] + 1) / 2 * h - 0.5).round().long().clamp(0, h - 1)
            x0, y0 = cx - r, cy - r
            crops = torch.stack([lv[int(b), :, int(y) + r: int(y) + 3 * r, int(x) + r: int(x) + 3 * r]
                                 for b, x, y in zip(i, x0, y0)])
            # level normalised n -> crop normalised m: m = n * (size / 2R) + (size / 2 - corner) / R - 1
            sx, sy = w / (2 * r), h / (2 * r)
            th[:, 0, :] *= sx
            th[:, 1, :] *= sy
            th[:, 0, 2] += (w / 2 - x0) / r - 1
            th[:, 1, 2] += (h / 2 - y0) / r - 1
            grid = F.affine_grid(th, [len(i), 1, self.patch, self.patch], align_corners=False)
            out.append(F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False))
        return torch.cat(out, 1)


@dataclass(frozen=True)
class FineLook:
    """What one fine look read and answered, for every landmark (see :func:`refine`'s ``record``).

    ``centers`` ``(K, 2)``: each landmark's window centre (x, y, full-resolution pixels: the
    position the look started from); ``positions`` ``(K, 2)``: its answer; ``windows``
    ``(K, C, P, P)`` uint8: the window around landmark ``k`` of each context level, finest first;
    ``heatmaps`` ``(K, h, w)`` float16: the softmax of heatmap ``k`` of window ``k`` (the one its
    answer is read from; an ensemble's nets' maps averaged). With an ensemble whose nets read
    different levels (:func:`kinds_of`), the windows and maps are those of the first net's kind;
    ``positions`` is the whole ensemble's answer.
    """

    centers: np.ndarray
    positions: np.ndarray
    windows: np.ndarray
    heatmaps: np.ndarray


def window_scale(image_hw: tuple[int, int], level_hw: tuple[int, int], context: int) -> np.ndarray:
    """``(context, 2)`` full-resolution pixels (x, y) per window pixel of each context level.

    Context level ``c``'s window pixel spans ``2**c`` pixels of the finest read level (``level_hw``,
    see :func:`_context_theta`), each ``image / level`` full-resolution pixels wide. Window pixel
    ``j`` (0-based) of a window centred at ``x`` sits at ``x + (j - (P - 1) / 2) * scale`` in the
    frame :func:`refine` reads its answers in (``align_corners=False`` normalised coordinates).
    """
    f = np.array([image_hw[1] / level_hw[1], image_hw[0] / level_hw[0]])
    return np.stack([f * 2.0**c for c in range(context)])


def refine(net: "FineNet | FineEnsemble", pyramid_levels: "list[torch.Tensor]", image_hw: tuple[int, int],
           positions: np.ndarray, steps: int = 1, decode_window: int = 2,
           record: "list[FineLook] | None" = None, runtimes: "list[NetRuntime] | None" = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Move each landmark's ``(K, 2)`` full-resolution position to the fine heatmap's peak.

    ``pyramid_levels``: the image's pyramid levels, ``(h, w)`` uint8 each (each net reads levels
    ``cfg.level`` to ``cfg.level + cfg.context - 1`` of its own config). ``steps``: windows
    re-centred on the last answer this many times. ``decode_window``: the heatmap peak is refined by a soft-argmax over
    ``(2 decode_window + 1)^2`` heatmap pixels around it (:func:`~napari_glimpse.coarse.decode`).
    An ensemble's nets each read the windows of their kind (level and context levels; all are
    ``patch`` pixels, centred alike), cut once per kind; the answer is the mean of theirs.
    Returns positions (inside the image) and each answer's spread (full-resolution pixels): the
    heatmap peaks' width and, with an ensemble, how far its nets disagree.
    ``record``: a list to which every look appends a :class:`FineLook` (windows and heatmaps for
    display; the answer is the same with or without it). ``runtimes``: how each net runs (a
    stage's, :mod:`napari_glimpse.runtime`; default: their float copies).
    """
    cfg = net.cfg
    nets = members_of(net)
    runtimes = runtimes_of(net) if runtimes is None else runtimes
    kinds = kinds_of(nets)
    dev = next(net.parameters()).device
    k = positions.shape[0]
    read = sorted({lv + c for lv, ctx in kinds for c in range(ctx)})
    pyramid_levels = deepen(pyramid_levels, read[-1] + 1)  # levels below the pyramid's are made here
    as_float = {i: pyramid_levels[i].to(dev, torch.float32)[None, None] for i in read}
    used = {(lv, ctx): [as_float[lv + c] for c in range(ctx)] for lv, ctx in kinds}
    pos = torch.as_tensor(positions, dtype=torch.float32)
    spread = torch.zeros(k)
    heat_hw = ((cfg.patch + 1) // 2, (cfg.patch + 1) // 2)
    ks = torch.arange(k)
    limit = torch.tensor([image_hw[1] - 1.0, image_hw[0] - 1.0])
    for _ in range(steps):
        c = to_normalised(pos, image_hw)
        every = torch.empty(k, len(nets), 2)  # each net's answer, full-resolution pixels
        width = torch.empty(k, len(nets))  # each net's heatmap peak width, full-resolution pixels
        look = None
        for kind, idx in kinds.items():
            lhw = tuple(used[kind][0].shape[-2:])
            theta = window_matrix(lhw, c, cfg.patch, torch.zeros(k), torch.ones(k))
            with torch.inference_mode():
                win = cut_windows([x.expand(k, *x.shape[1:]) for x in used[kind]], theta.to(dev), cfg.patch)
                # (K, M, h, w): window k, heatmap k, of each net of this kind
                logits = torch.cat([runtimes[i](win)[ks, ks][:, None].cpu() for i in idx], 1)
            xy, sp = decode(logits, decode_window)
            o = to_normalised(xy, heat_hw)  # (K, M, 2) window normalised
            u = torch.einsum("kij,kmj->kmi", theta[:, :, :2], o) + theta[:, None, :, 2]
            every[:, idx] = torch.minimum(from_normalised(u, image_hw).clamp_min(0), limit)
            width[:, idx] = sp * (cfg.patch / heat_hw[0] * (image_hw[1] / lhw[1]))  # heatmap -> full-res pixels
            if record is not None and look is None:  # the first net's kind is the one shown
                look = (win, torch.softmax(logits.reshape(k, len(idx), -1).float(), -1).mean(1).reshape(k, *heat_hw))
        if record is not None:
            record.append(FineLook(centers=pos.numpy().astype(np.float64),
                                   positions=every.mean(1).numpy().astype(np.float64),
                                   windows=look[0].round().clamp(0, 255).to(torch.uint8).cpu().numpy(),
                                   heatmaps=look[1].to(torch.float16).numpy()))
        pos = every.mean(1)
        spread = torch.sqrt(width.mean(1) ** 2 + ((every - pos[:, None]) ** 2).sum(-1).mean(1))
    return pos.numpy().astype(np.float64), spread.numpy().astype(np.float64)


def present_pairs(i: torch.Tensor, j: torch.Tensor, present: torch.Tensor, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (image ``i``, landmark ``j``) pairs with those whose landmark is absent
    (``present[i, j]`` False, ``present`` being ``(N, K)`` bool) drawn again among the present
    pairs, so that every present pair is as likely and an absent one is never drawn. Nothing is
    drawn again (no random numbers used) when all of them are present."""
    bad = ~present[i, j]
    if not bool(bad.any()):
        return i, j
    pairs = present.nonzero()
    if not len(pairs):
        raise GlimpseError("every landmark of the training set is absent: nothing to train on")
    pick = pairs[torch.randint(0, len(pairs), (int(bad.sum()),), generator=gen).to(pairs.device)]
    i, j = i.clone(), j.clone()
    i[bad], j[bad] = pick[:, 0].to(i.device), pick[:, 1].to(j.device)
    return i, j


def train_fine(
    levels: "list[torch.Tensor]",
    truth_n: torch.Tensor,
    cfg: FineConfig,
    time_budget_s: float,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    evaluate: Callable[[FineNet], float] | None = None,
    eval_every_s: float = 300.0,
    max_steps: int | None = None,
    init: FineNet | None = None,
    lr_scale: float = 1.0,
    averages: "dict[float, FineNet] | None" = None,
    device: "str | torch.device" = "cpu",
    layers: str = "all",
    present: torch.Tensor | None = None,
) -> tuple[FineNet, list[dict]]:
    """Train a fine net for ``time_budget_s`` seconds of wall time (or ``max_steps`` steps).

    ``levels``: per context level (finest first), ``(N, 1, h, w)`` float, every training image's
    level (:func:`fine_levels`); ``truth_n``: ``(N, K, 2)`` positions in normalised coordinates.
    ``present``: ``(N, K)`` bool, False where a landmark is absent (default: where ``truth_n`` is
    NaN); no window is centred on an absent landmark, and none is taught, whatever its ``truth_n``.
    ``averages``: weight averages to keep (see :func:`napari_glimpse.coarse.fit_heatmaps`).
    The rest (``device`` and ``layers`` too) as :func:`napari_glimpse.coarse.train_coarse`.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = starting_net(FineNet, cfg, init, device, layers)
    cfg = net.cfg
    batch = _fine_batches(levels, truth_n, present, cfg, gen)
    history = fit_heatmaps(net, "fine", cfg.lr * lr_scale, batch, time_budget_s, progress, callback, should_stop,
                           evaluate, eval_every_s, max_steps, averages)
    return net, history


def _fine_batches(levels: "list[torch.Tensor]", truth_n: torch.Tensor, present: torch.Tensor | None,
                  cfg: FineConfig, gen: torch.Generator) -> Callable[[], tuple]:
    """The fine net's batches (see :func:`train_fine`): windows near random present landmarks of
    random images, their target heatmaps and which landmarks are inside, drawn from ``gen``."""
    ok = torch.isfinite(truth_n).all(-1) if present is None else present.bool()  # (N, K)
    truth_n = torch.where(ok[..., None], truth_n, 0.0)  # an absent landmark's NaN is never read
    n, k = truth_n.shape[:2]
    lhw = tuple(levels[0].shape[-2:])
    heat_hw = ((cfg.patch + 1) // 2, (cfg.patch + 1) // 2)
    px_mm = cfg.pixel_spacing * 2 ** cfg.level  # mm per level pixel
    cutter = WindowCutter(levels, cfg.patch)
    lo, hi = (math.log(v / px_mm) for v in cfg.jitter_mm)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = cfg.batch_size
        i = torch.randint(0, n, (b,), generator=gen)
        j = torch.randint(0, k, (b,), generator=gen)
        i, j = present_pairs(i, j, ok, gen)
        sd = torch.exp(lo + (hi - lo) * torch.rand(b, 1, generator=gen))  # level pixels
        off = torch.randn(b, 2, generator=gen) * sd * 2 / torch.tensor([lhw[1], lhw[0]])
        ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(cfg.rotation_deg)
        scl = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * cfg.log_scale)
        theta = window_matrix(lhw, truth_n[i, j] + off, cfg.patch, ang, scl)
        i, theta = distributed.share(i), distributed.share(theta)  # this rank's windows (all in one process)
        a, t = theta[:, :, :2], theta[:, :, 2]
        # every landmark's point in window normalised coordinates: (B, K, 2)
        o = torch.einsum("bij,bkj->bki", torch.linalg.inv(a), truth_n[i] - t[:, None, :])
        x = cutter(i, theta)
        if cfg.artefacts > 0:  # another device's ruler and dark bands (no draws when off)
            x = paint_artefacts(x, o[torch.arange(len(o)), distributed.share(j)], cfg.artefacts,
                                px_mm * cfg.patch / 2, gen)
        x = augment_intensity(x, gen)
        o = torch.where(ok[i][..., None], o, 2.0)  # an absent landmark: outside every window, not taught
        inside = (o.abs() < 0.95).all(-1).float()  # (B, K)
        # a Gaussian at each landmark inside the window (zero elsewhere: its weight is 0 too)
        target = gaussian_targets(from_normalised(o, heat_hw), heat_hw, cfg.sigma) * inside[..., None, None]
        return x, target, inside

    return batch


def fine_levels_by_kind(pyramids: list, truth: np.ndarray, cfgs: "list[FineConfig]"
                        ) -> "dict[tuple[int, int], tuple[list[torch.Tensor], torch.Tensor]]":
    """:func:`fine_levels` for each kind of fine net (``(level, context)`` -> its stacks and the
    normalised truth); kinds that read the same level share its stack (made once)."""
    lo = min(c.level for c in cfgs)
    hi = max(c.level + c.context for c in cfgs)
    stacks, truth_n = fine_levels(pyramids, truth, replace(cfgs[0], level=lo, context=hi - lo))
    return {(c.level, c.context): (stacks[c.level - lo: c.level - lo + c.context], truth_n) for c in cfgs}


def fine_levels(pyramids: list, truth: np.ndarray, cfg: FineConfig) -> tuple["list[torch.Tensor]", torch.Tensor]:
    """Every image's levels ``cfg.level`` .. ``cfg.level + cfg.context - 1``, each as one
    ``(N, 1, h, w)`` float stack, and the normalised positions (images of other sizes are
    resampled to the first one's level sizes); ``truth`` is ``(N, K, 2)`` (for :func:`train_fine`)."""
    deep = [deepen(p.levels, cfg.level + cfg.context) for p in pyramids]  # as refine() makes them
    stacks = []
    for c in range(cfg.context):
        lv = cfg.level + c
        hw = tuple(deep[0][lv].shape[-2:])
        out = []
        for p in deep:
            x = p[lv].float()[None, None]
            if tuple(x.shape[-2:]) != hw:
                x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
            out.append(x[0])
        stacks.append(torch.stack(out))
    tn = [to_normalised(torch.as_tensor(t, dtype=torch.float32), tuple(p.shape)) for p, t in zip(pyramids, truth)]
    return stacks, torch.stack(tn)
