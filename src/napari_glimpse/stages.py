"""The detector's stages, in the order they read an image.

A :class:`~napari_glimpse.inference.GlimpseModel` is an ordered list of stages
(:attr:`~napari_glimpse.inference.GlimpseModel.stages`), each a small object with a typed spec
(how it reads: the model file keeps these in its meta, :meth:`InferenceSpec.of_meta`), its nets,
their runtime backends (:class:`~napari_glimpse.runtime.NetRuntime`: the float copy or the int8
graph) and a ``run``:

1. :class:`CoarseStage`: a U-Net (or an ensemble of them) over the whole image, resampled to a
   fixed size: each landmark's heatmap peak, its width, and how far the passes disagree.
2. :class:`FineStage`: a closer look around each coarse answer: windows of a few pyramid levels
   centred on it, a U-Net's heatmap peak there (``steps`` looks, each re-centred).
3. :class:`GlimpseStage`: the paper's glimpse iterations: a 64 x 64 patch per pyramid level
   centred on the estimate, the glimpse net's offset, move, repeat. A glimpse-only model has
   this stage alone and starts at the mean training position.

The model composes them (:meth:`~napari_glimpse.inference.GlimpseModel.predict`): facing,
spacing, the second search of implausible points, a site's offsets, the confidence; the
:class:`~napari_glimpse.result.Trajectory` records what each stage did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._serde import DictConfig
from .coarse import CoarseEnsemble, CoarseNet, locate_parts, view_level
from .devices import autocast
from .fine import FineEnsemble, FineLook, FineNet, kinds_of, refine, window_scale
from .glimpse import PyramidStack, sample_glimpses
from .model import GlimpseModelNet
from .pyramid import Pyramid
from .result import mirror_points
from .runtime import NetRuntime, members_of


# ------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class CoarseSpec(DictConfig):
    """``flip_average``: also read the mirrored image and average the answers;
    ``decode_window``: half-size (heatmap pixels) of the soft-argmax around each peak."""

    flip_average: bool = False
    decode_window: int = 2


@dataclass(frozen=True)
class FineSpec(DictConfig):
    """``steps``: looks after the coarse answer, each re-centred on the last; ``decode_window``
    as the coarse stage's; ``research``: search implausible points again from where the others
    imply them (with a shape model, :mod:`napari_glimpse.shape`)."""

    steps: int = 1
    decode_window: int = 2
    research: bool = True


@dataclass(frozen=True)
class GlimpseSpec(DictConfig):
    """``iterations``: glimpse steps when none are asked for; ``blend``: the answer is ``blend`` x
    the stages' before + ``(1 - blend)`` x the glimpses'; ``gate``: per landmark, whether asked-for
    steps are applied after a coarse and fine stage (None: everywhere; :mod:`napari_glimpse.gate`)."""

    iterations: int = 3
    blend: float = 0.0
    gate: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class InferenceSpec:
    """How a model reads an image, by stage: the typed view of the keys its file's meta keeps
    (``coarse_flip_average``, ``coarse_decode_window``, ``fine_steps``, ``fine_decode_window``,
    ``research``, ``iterations``, ``coarse_blend``, ``glimpse_gate``)."""

    coarse: CoarseSpec = field(default_factory=CoarseSpec)
    fine: FineSpec = field(default_factory=FineSpec)
    glimpse: GlimpseSpec = field(default_factory=GlimpseSpec)

    @classmethod
    def of_meta(cls, meta: dict[str, Any]) -> "InferenceSpec":
        gate = meta.get("glimpse_gate")
        return cls(
            CoarseSpec(bool(meta.get("coarse_flip_average", False)), int(meta.get("coarse_decode_window", 2))),
            FineSpec(int(meta.get("fine_steps", 1)), int(meta.get("fine_decode_window", 2)),
                     bool(meta.get("research", True))),
            GlimpseSpec(int(meta.get("iterations", 3)), float(meta.get("coarse_blend", 0.0)),
                        None if gate is None else tuple(bool(v) for v in np.asarray(gate["apply"]).reshape(-1))),
        )


# ------------------------------------------------------------------------------ stages
class _NetStage:
    """A stage of one net or an ensemble: the net, a runtime per member, a spec."""

    name = ""

    def __init__(self, net: torch.nn.Module, spec: Any):
        self.net = net
        self.spec = spec
        self.runtimes = [NetRuntime(m) for m in members_of(net)]

    @property
    def nets(self) -> list[torch.nn.Module]:
        """The stage's nets (an ensemble's members, else the net)."""
        return [rt.net for rt in self.runtimes]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.runtimes)} net{'s' if len(self.runtimes) > 1 else ''}, {self.spec})"


class CoarseStage(_NetStage):
    """The whole image at once (see the module)."""

    name = "coarse"

    def __init__(self, net: "CoarseNet | CoarseEnsemble", spec: CoarseSpec = CoarseSpec()):
        super().__init__(net, spec)

    def run(self, pyr: Pyramid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(K, 2)`` positions, ``(K,)`` spread and ``(K,)`` the passes' disagreement (full-resolution pixels)."""
        lv = view_level(pyr.shape, self.net.cfg.input_hw, len(pyr))
        pos, width, disagreement = locate_parts(self.net, pyr.levels[lv], pyr.shape, self.spec.flip_average,
                                                self.spec.decode_window, self.runtimes)
        return pos, np.sqrt(width ** 2 + disagreement ** 2), disagreement


class FineStage(_NetStage):
    """A closer look around each answer (see the module)."""

    name = "fine"

    def __init__(self, net: "FineNet | FineEnsemble", spec: FineSpec = FineSpec()):
        super().__init__(net, spec)

    def reach_px(self, pixel_spacing: float) -> float:
        """The largest offset (full-resolution pixels) every fine net was trained to correct."""
        return min(m.cfg.jitter_mm[1] for m in self.nets) / pixel_spacing

    def run(self, pyr: Pyramid, pos: np.ndarray, steps: int | None = None,
            looks: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``steps`` looks (default the spec's) from ``pos`` ``(K, 2)``: positions and spread;
        ``looks`` receives each look's :class:`~napari_glimpse.fine.FineLook`."""
        steps = self.spec.steps if steps is None else steps
        return refine(self.net, pyr.levels, pyr.shape, pos, steps, self.spec.decode_window, looks, self.runtimes)

    def record(self, coarse: np.ndarray, looks: list[FineLook], pyr: Pyramid, ks: np.ndarray,
               mirrored: bool) -> dict:
        """The :class:`~napari_glimpse.result.Trajectory` fields of the coarse answer and the fine
        ``looks`` (landmarks ``ks``), in the image's own pixels: with ``mirrored`` (the stages read
        the mirrored image) positions, windows and heatmaps are flipped back, as glimpses are."""
        cfg = self.net.cfg
        w = pyr.shape[1]
        coarse = np.asarray(coarse, dtype=np.float64)[ks]
        fine = np.stack([lk.positions for lk in looks])[:, ks]
        windows = np.stack([lk.windows for lk in looks])[:, ks]
        heat = np.stack([lk.heatmaps for lk in looks])[:, ks]
        if mirrored:
            # axis-aligned windows centred on a point: the mirrored window is the window of the mirrored point
            coarse, fine = mirror_points(coarse, w), mirror_points(fine, w)
            windows, heat = windows[..., ::-1], heat[..., ::-1]
        return {
            "coarse_positions": coarse,
            "fine_positions": fine,
            "fine_windows": np.ascontiguousarray(windows),
            "fine_heatmaps": np.ascontiguousarray(heat),
            "fine_window_scale": window_scale(pyr.shape, tuple(pyr.levels[cfg.level].shape), cfg.context),
            "fine_level": int(cfg.level),
            "fine_nets": (len(kinds_of(self.nets)[(cfg.level, cfg.context)]), len(self.nets)),
        }


@dataclass
class GlimpseSteps:
    """What :meth:`GlimpseStage.run` did: ``positions`` ``(T + 1, S, K, 2)`` every start's path;
    ``glimpses`` ``(T, K, L, P, P)`` uint8 and ``heatmaps`` float16 (first start, on request)."""

    positions: np.ndarray
    glimpses: np.ndarray | None = None
    heatmaps: np.ndarray | None = None


class GlimpseStage:
    """The glimpse iterations (see the module): the glimpse net, its spec; it runs in torch."""

    name = "glimpse"

    def __init__(self, net: GlimpseModelNet, spec: GlimpseSpec = GlimpseSpec()):
        self.net = net
        self.spec = spec

    @property
    def nets(self) -> list[torch.nn.Module]:
        return [self.net]

    def __repr__(self) -> str:
        return f"GlimpseStage({self.net.cfg.n_levels} levels, {self.spec})"

    def run(self, pyr: Pyramid, centers: np.ndarray, ks: np.ndarray, iterations: int, record_glimpses: bool = False,
            record_heatmaps: bool = False, bf16: bool = False) -> GlimpseSteps:
        """``iterations`` steps from ``centers`` ``(S, K, 2)`` (starts of landmarks ``ks``) on one pyramid."""
        h, w = pyr.shape
        cfg = self.net.cfg
        dev = next(self.net.parameters()).device
        stack = PyramidStack([pyr]).to(dev)
        n_s, n_k = centers.shape[:2]
        c = torch.as_tensor(centers.reshape(-1, 2), dtype=torch.float32, device=dev)
        lm = torch.as_tensor(np.tile(ks, n_s), dtype=torch.long, device=dev)
        idx = torch.zeros(len(c), dtype=torch.long, device=dev)
        lo = torch.zeros(2, device=dev)
        hi = torch.tensor([w - 1.0, h - 1.0], device=dev)
        c = torch.maximum(torch.minimum(c, hi), lo)
        positions = [c.clone()]
        glimpses, heatmaps = [], []
        self.net.eval()
        with torch.inference_mode(), autocast(dev, bf16):
            for _ in range(iterations):
                patches = sample_glimpses(stack, idx, c, cfg.patch)
                if record_heatmaps:
                    out, hm = self.net(patches, lm, heatmaps=True)
                    heatmaps.append(hm[:n_k].to(torch.float16).cpu().numpy())
                else:
                    out = self.net(patches, lm)
                if record_glimpses:
                    glimpses.append(patches[:n_k].round().clamp(0, 255).to(torch.uint8).cpu().numpy())
                c = torch.maximum(torch.minimum(c + out.float() * cfg.offset_unit, hi), lo)
                positions.append(c.clone())
        pos = torch.stack(positions).cpu().numpy().astype(np.float64).reshape(iterations + 1, n_s, n_k, 2)
        return GlimpseSteps(pos, np.stack(glimpses) if record_glimpses else None,
                            np.stack(heatmaps) if record_heatmaps else None)
