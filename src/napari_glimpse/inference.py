"""The detector: :class:`GlimpseModel`, its stages in order (:mod:`napari_glimpse.stages`), and how it reads an
image (facing, pixel spacing, the second search, a site's offsets, the confidence) into a :class:`Trajectory`."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import checkpoint, runtime
from .checkpoint import read_checkpoint
from .coarse import CoarseEnsemble, CoarseNet, facing_of
from .devices import resolve_device  # noqa: F401  resolve_device: re-exported (recipe, benchmarks)
from .errors import GlimpseError, GlimpseWarning
from .fine import FineEnsemble, FineLook, FineNet
from .io import is_dicom, read_image, to_grey_uint8
from .landmark_set import LandmarkSet, model_landmark_set
from .model import GlimpseModelNet, ModelConfig
from .pyramid import Pyramid, build_pyramid
from .result import Trajectory, mirror_points  # noqa: F401  re-exported where they used to live
from .spacing import (
    SpacingWarning,
    model_shape,
    read_image_and_spacing,
    resample,
    resolve_spacing,
    to_image_pixels,
    to_model_pixels,
)
from .stages import CoarseStage, FineStage, GlimpseStage, InferenceSpec

MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL = MODELS / "default.pt"
# an image is resampled to the model's spacing when its own differs by more than this fraction
SPACING_TOLERANCE = 0.01
# the longest side (pixels at the model's spacing) a resampled image may have: beyond it, the
# spacing given is taken for a mistake (the ISBI images are 2400 pixels at 0.1 mm)
MAX_MODEL_SIDE = 8000


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A model's file: ``None`` the shipped default; a packaged model's name (``default``,
    ``glimpse``: no suffix, no folder part, no such file here; a folder of that name here does not
    hide it) ``models/NAME.pt`` in the package (a one-line error naming the file when it is
    missing); anything else the path as given."""
    if model is None:
        return DEFAULT_MODEL
    p = Path(model)
    if p.suffix or p.is_file() or os.sep in str(model) or "/" in str(model):
        return p
    if p.is_dir() and not (MODELS / f"{p.name}.pt").exists():
        return p  # not a packaged name: the folder, which the loader refuses with its own error
    f = MODELS / f"{p.name}.pt"
    if not f.exists():
        hint = f" (train it: napari-glimpse train --recipe glimpse --data DIR --out {f})" if p.name == "glimpse" else ""
        raise GlimpseError(f"no model {p.name!r} in the package: {f} is missing{hint}")
    return f


def _peaks(looks: list | None) -> np.ndarray | None:
    """``(K,)`` the last fine look's heatmap peak probability per landmark (``None`` without looks)."""
    if not looks:
        return None
    return looks[-1].heatmaps.reshape(len(looks[-1].heatmaps), -1).astype(np.float32).max(1)


@dataclass(frozen=True)
class _StageAnswer:
    """What the coarse and fine stages answered on one image (:meth:`GlimpseModel._coarse_fine`):
    ``positions`` and ``spread`` ``(K, ...)`` all landmarks, image pixels; ``facing`` as read;
    ``mirrored`` the mirrored pyramid the stages read (None when the image was read as it is);
    ``record`` the :class:`Trajectory` fields of the stages (on request) and ``cues`` the
    confidence's inputs."""

    positions: np.ndarray
    spread: np.ndarray
    facing: str
    mirrored: Pyramid | None
    record: dict
    cues: dict


class GlimpseModel:
    """A trained detector: an ordered list of stages (:attr:`stages`: coarse, fine, glimpse; see
    :mod:`napari_glimpse.stages`), the landmarks, the glimpses' mean start, and the metadata it
    was trained with (which also keeps how it reads: :attr:`spec`).

    ``net``, ``coarse`` and ``fine`` are the stages' nets (``coarse`` and ``fine`` ``None`` when
    the model has no such stage); setting one makes that stage anew (its runtimes, without int8
    graphs)."""

    def __init__(
        self,
        net: GlimpseModelNet,
        landmark_names: Sequence[str],
        pixel_spacing: float,
        mean_start: np.ndarray,
        std_start: np.ndarray | None = None,
        train_config: dict | None = None,
        meta: dict | None = None,
        coarse: "CoarseNet | CoarseEnsemble | None" = None,
        fine: "FineNet | FineEnsemble | None" = None,
    ):
        self._glimpse_stage = GlimpseStage(net)
        self._coarse_stage: CoarseStage | None = None
        self._fine_stage: FineStage | None = None
        self.coarse = coarse
        self.fine = fine
        self.landmark_names = tuple(landmark_names)
        self.pixel_spacing = float(pixel_spacing)
        self.mean_start = np.asarray(mean_start, dtype=np.float64)
        self.std_start = (
            np.asarray(std_start, dtype=np.float64) if std_start is not None else np.zeros_like(self.mean_start)
        )
        self.train_config = dict(train_config or {})
        self.meta = dict(meta or {})
        self.half_weights = False  # the file it was loaded from stored float16 weights (save keeps that)

    # ----------------------------------------------------------------------------- stages
    @property
    def net(self) -> GlimpseModelNet:
        """The glimpse stage's net."""
        return self._glimpse_stage.net

    @net.setter
    def net(self, net: GlimpseModelNet) -> None:
        self._glimpse_stage = GlimpseStage(net)

    @property
    def config(self) -> ModelConfig:
        """The glimpse net's configuration (landmarks, pyramid levels, patch)."""
        return self._glimpse_stage.net.cfg

    @property
    def coarse(self) -> "CoarseNet | CoarseEnsemble | None":
        """The coarse stage's net (or ensemble), ``None`` without one."""
        return None if self._coarse_stage is None else self._coarse_stage.net

    @coarse.setter
    def coarse(self, net: "CoarseNet | CoarseEnsemble | None") -> None:
        self._coarse_stage = None if net is None else CoarseStage(net)

    @property
    def fine(self) -> "FineNet | FineEnsemble | None":
        """The fine stage's net (or ensemble), ``None`` without one."""
        return None if self._fine_stage is None else self._fine_stage.net

    @fine.setter
    def fine(self, net: "FineNet | FineEnsemble | None") -> None:
        self._fine_stage = None if net is None else FineStage(net)

    @property
    def spec(self) -> InferenceSpec:
        """How the model reads an image, by stage (the typed view of its meta's keys)."""
        return InferenceSpec.of_meta(self.meta)

    @property
    def stages(self) -> tuple:
        """The stages in the order they read an image: :class:`~napari_glimpse.stages.CoarseStage`
        and :class:`~napari_glimpse.stages.FineStage` when the model has them, then the
        :class:`~napari_glimpse.stages.GlimpseStage`; each with its spec as the meta says now."""
        spec = self.spec
        out = []
        pairs = ((self._coarse_stage, spec.coarse), (self._fine_stage, spec.fine), (self._glimpse_stage, spec.glimpse))
        for st, sp in pairs:
            if st is not None:
                st.spec = sp
                out.append(st)
        return tuple(out)

    @property
    def runtimes(self) -> dict:
        """How the coarse and fine stages' nets run (their :class:`~napari_glimpse.runtime.NetRuntime`
        each), by stage: ``{"coarse": [...], "fine": [...]}`` for the stages the model has."""
        return {st.name: st.runtimes for st in (self._coarse_stage, self._fine_stage) if st is not None}

    def stage(self, name: str):
        """The stage called ``name`` (``coarse``, ``fine`` or ``glimpse``), its spec as the meta says
        now; a :class:`GlimpseError` when the model has none."""
        for st in self.stages:
            if st.name == name:
                return st
        raise GlimpseError(f"this model has no {name} stage")

    @property
    def default_iterations(self) -> int:
        """Glimpse steps used when none are asked for (``meta['iterations']``, else 3)."""
        return self.spec.glimpse.iterations

    @property
    def fine_steps(self) -> int:
        """Fine-stage looks after the coarse answer (``meta['fine_steps']``, else 1; 0 without one)."""
        return self.spec.fine.steps if self.fine is not None and self.coarse is not None else 0

    @property
    def coarse_decode_window(self) -> int:
        """Half-size of the neighbourhood (heatmap pixels) whose soft-argmax refines each coarse
        heatmap's peak (``meta['coarse_decode_window']``, else 2: a 5 x 5 neighbourhood)."""
        return self.spec.coarse.decode_window

    @property
    def fine_decode_window(self) -> int:
        """Half-size of the neighbourhood (heatmap pixels) whose soft-argmax refines each fine
        heatmap's peak (``meta['fine_decode_window']``, else 2: a 5 x 5 neighbourhood)."""
        return self.spec.fine.decode_window

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def landmark_set(self) -> LandmarkSet:
        """The landmarks this model finds, as a set (:mod:`napari_glimpse.landmark_set`):
        ``meta['landmark_set']``; a model without one (the shipped model): the ISBI 19 for the ISBI
        names, else an unnamed set of its names. Every model written carries it."""
        return model_landmark_set(self.meta, self.landmark_names)

    # ----------------------------------------------------------------------------- files
    def to_checkpoint(self) -> dict:
        """The model as a checkpoint dict (:func:`napari_glimpse.checkpoint.to_checkpoint`)."""
        return checkpoint.to_checkpoint(self)

    def save(self, path: str | os.PathLike, half_weights: bool | None = None) -> None:
        """Write the model to ``path`` (atomically). ``half_weights``: store the convolution and
        linear weights as float16, about half the file (see :func:`~napari_glimpse.checkpoint.halve_weights`);
        ``None``: as the file it was loaded from stored them (:attr:`half_weights`), so that a model
        tuned from the shipped one is as small as it. Stored as float16, the weights in memory are
        rounded alike (:func:`~napari_glimpse.checkpoint.round_to_half`): the model answers as the file."""
        checkpoint.save(self, path, self.half_weights if half_weights is None else bool(half_weights))
        from .confidence import sidecar_path

        side = sidecar_path(path)
        if side.is_file():  # it was fitted for what was there before, and it wins when the file is loaded
            warnings.warn(f"{side} (a confidence calibration fitted for an earlier {Path(path).name}) takes the "
                          f"place of this model's own when it is loaded: refit it or remove it", GlimpseWarning,
                          stacklevel=2)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: str | torch.device | None = "cpu", source: str = "checkpoint",
                        int8: bool = True) -> "GlimpseModel":
        """A model from a checkpoint dict of any version (:func:`napari_glimpse.checkpoint.from_checkpoint`)."""
        return checkpoint.from_checkpoint(cls, ckpt, device, source, int8)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
             int8: bool = True) -> "GlimpseModel":
        """Load a checkpoint file; ``None`` loads the default model shipped in the package.

        ``int8``: on the CPU, run the int8 graphs the file carries (:mod:`napari_glimpse.int8`;
        faster; answers 0.03-0.05 mm from the float nets' on average on ISBI, rarely more where a
        heatmap has two near-equal peaks); ``False``
        runs the float nets (see :meth:`use_int8`). A ``<stem>.confidence.json`` beside the file
        (the shipped model's ``default.confidence.json``) goes into ``meta['confidence']``, in
        place of any the file carries (a calibration refitted for the file's nets; a model saved
        after loading, e.g. a fine-tuned one, carries its parent's; :mod:`napari_glimpse.confidence`)."""
        if path is None:
            path = DEFAULT_MODEL
            if not path.exists():
                raise GlimpseError(f"the default model is missing from the package ({path}); pass --model")
        path = resolve_model(path)
        model = cls.from_checkpoint(read_checkpoint(path), device, source=str(path), int8=int8)
        from .confidence import read_sidecar

        side = read_sidecar(path)  # a calibration beside the file (<stem>.confidence.json): a refit wins
        if side is not None:
            model.meta["confidence"] = side
        return model

    def use_int8(self, enabled: bool = True) -> tuple[int, int]:
        """Run the coarse and fine nets' int8 graphs (where usable: see
        :meth:`napari_glimpse.runtime.NetRuntime.usable`) or, with ``enabled=False``, the float nets. Returns
        (nets that now run int8, coarse and fine nets)."""
        runtime.set_enabled(self, enabled)
        return runtime.status(self)

    @property
    def int8_nets(self) -> tuple[int, int]:
        """(coarse and fine nets that run their int8 graphs now, coarse and fine nets)."""
        return runtime.status(self)

    # ------------------------------------------------------------------------- inference
    def pyramid(self, image: np.ndarray | str | os.PathLike | Pyramid) -> Pyramid:
        if isinstance(image, Pyramid):
            if len(image) != self.config.n_levels:
                raise GlimpseError(f"pyramid has {len(image)} levels, the model needs {self.config.n_levels}")
            return image
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image)
        return build_pyramid(to_grey_uint8(image), self.config.n_levels, self.config.patch)

    def predict(self, image: np.ndarray | str | os.PathLike | Pyramid, iterations: int | None = None,
                landmarks: Sequence[int] | None = None, starts: int = 1, start: np.ndarray | None = None,
                record_glimpses: bool = False, record_heatmaps: bool = False, bf16: bool | None = None,
                seed: int = 0, facing: str = "auto", record_stages: bool = False,
                spacing: float | None = None) -> Trajectory:
        """Locate the landmarks in one image.

        Parameters
        ----------
        image : array, path or Pyramid
            The cephalogram (grey or RGB, any bit depth).
        iterations : int, optional
            Glimpse steps per landmark (default: :attr:`default_iterations`, the number chosen on
            validation when the model was made, else 3). With a coarse stage, 0 returns its answer.
        landmarks : sequence of int, optional
            Indices of the landmarks to locate (default all).
        starts : int
            Number of starts per landmark: the mean start plus ``starts - 1`` perturbed by half
            the training spread; the answer is their mean and their spread the uncertainty.
        start : (K, 2) array, optional
            Start positions instead of the coarse stage's answer (or, without a coarse stage,
            the training mean).
        record_glimpses, record_heatmaps : bool
            Keep every iteration's patches / softmax maps in the trajectory (first start only).
        bf16 : bool, optional
            bfloat16 autocast (off by default: ``benchmarks/speed.py`` measured it slower on
            this project's CPUs for both trunks).
        facing : {"auto", "right", "left"}
            Which way the patient faces: ``right`` as in the training images, ``left`` for a
            mirrored cephalogram (the image is flipped, located, and the answer flipped back);
            ``auto``: with a coarse stage, read from its answer (the landmarks' left-right layout
            against the training set's); without one, both are run and the one whose glimpses
            settle (smaller mean uncertainty) is kept.
        record_stages : bool
            Keep the coarse answer and the fine looks (windows, heatmaps, answers) in the
            trajectory (see :class:`Trajectory`; nothing without a fine look).
        spacing : float, optional
            The image's pixel spacing in mm (0.01-1; anything else is a :class:`GlimpseError`).
            Default: the one the file records (DICOM, TIFF; see :mod:`napari_glimpse.spacing`),
            else the model's own (:attr:`pixel_spacing`), with a one-line
            :class:`~napari_glimpse.spacing.SpacingWarning` when the image's size is then unlike
            the training images' (and always for a DICOM file that records none). An image at
            another spacing than the model's (by more than 1 %) is resampled to the model's,
            located there and the answer mapped back: positions are always in the image's pixels,
            mm figures at its spacing. A :class:`Pyramid` is taken as the image's own.

        With a coarse stage and ``meta['coarse_blend'] = b > 0`` the answer is ``b`` x the coarse
        answer + ``(1 - b)`` x the glimpses' (``b`` chosen on validation; the shipped model's is 0).
        """
        run = {"iterations": iterations, "landmarks": landmarks, "starts": starts, "start": start,
               "record_glimpses": record_glimpses, "record_heatmaps": record_heatmaps, "bf16": bf16, "seed": seed,
               "facing": facing, "record_stages": record_stages}
        return self._predict_at_spacing(image, spacing, run)

    def _predict_at_spacing(self, image: np.ndarray | str | os.PathLike | Pyramid, spacing: float | None,
                            run: dict) -> Trajectory:
        """:meth:`predict` at the image's spacing (given, the file's or the model's; see there)."""
        image, spacing, source, notice = self._spacing_of(image, spacing)
        factor = spacing / self.pixel_spacing
        if abs(factor - 1) > SPACING_TOLERANCE:
            tr = self._predict_resampled(image, spacing, source, run)
        elif factor == 1:
            tr = dataclasses.replace(self._predict(image, **run), spacing_source=source)
        else:  # within 1 % of the model's: the same pixels, their mm at the image's spacing
            tr = self._predict(image, **run)
            tr = dataclasses.replace(tr, pixel_spacing=spacing, uncertainty_mm=tr.uncertainty_mm * factor,
                                     spacing_source=source)
        if notice:  # once there is an answer (an image that cannot be read gets its error alone)
            import warnings


            warnings.warn(notice, SpacingWarning, stacklevel=3)  # at predict's caller
        return tr

    def _spacing_of(self, image: np.ndarray | str | os.PathLike | Pyramid,
                    spacing: float | None) -> tuple[np.ndarray | Pyramid, float, str, str | None]:
        """The image (read when a path; grey ``uint8`` when an array), its spacing (checked), where
        that came from (``given``, ``file`` or ``model``) and the notice to give (see :meth:`predict`)."""

        name, dicom, recorded = "image", False, None
        if isinstance(image, (str, os.PathLike)):
            name, dicom = Path(image).name, is_dicom(image)
            image, recorded = read_image_and_spacing(image)
        elif not isinstance(image, Pyramid):
            image = to_grey_uint8(image)
        return image, *resolve_spacing(spacing, recorded, image.shape, self.pixel_spacing, name, dicom)

    def _predict_resampled(self, image: np.ndarray | Pyramid, spacing: float, source: str, run: dict) -> Trajectory:
        """:meth:`predict` of an image at another spacing than the model's: resampled to the model's,
        located there, and every position (and fine window scale) mapped back to the image's pixels."""

        img = image.levels[0].numpy() if isinstance(image, Pyramid) else image
        h, w = img.shape
        nh, nw = model_shape((h, w), spacing / self.pixel_spacing)
        if max(nh, nw) > MAX_MODEL_SIDE:
            raise GlimpseError(f"at {spacing:g} mm per pixel this {w}x{h} image is {w * spacing:.0f} x "
                               f"{h * spacing:.0f} mm ({nw}x{nh} pixels at the model's {self.pixel_spacing:g} mm): "
                               "check the pixel spacing")
        scale = np.array([nw / w, nh / h])
        if run["start"] is not None:
            run["start"] = to_model_pixels(run["start"], scale)
        tr = self._predict(resample(img, (nh, nw)), **run)
        hi = np.array([w - 1.0, h - 1.0])
        back = {k: np.clip(to_image_pixels(getattr(tr, k), scale), 0, hi)
                for k in ("positions", "coarse_positions", "fine_positions", "implied_positions")
                if getattr(tr, k) is not None}
        if tr.fine_window_scale is not None:
            back["fine_window_scale"] = np.asarray(tr.fine_window_scale, dtype=np.float64) / scale
        return dataclasses.replace(tr, **back, pixel_spacing=spacing, image_shape=(h, w), spacing_source=source,
                                   model_scale=(float(scale[0]), float(scale[1])))

    def _predict(self, image: np.ndarray | Pyramid, iterations: int | None, landmarks: Sequence[int] | None,
                 starts: int, start: np.ndarray | None, record_glimpses: bool, record_heatmaps: bool,
                 bf16: bool | None, seed: int, facing: str, record_stages: bool) -> Trajectory:
        """:meth:`predict` at the model's own spacing (the image's pixels as they are)."""
        if iterations is None:
            iterations = self.default_iterations
        if iterations < (0 if self.coarse is not None else 1):
            raise GlimpseError("iterations must be at least 1" if self.coarse is None
                               else "iterations must be at least 0")
        if facing not in ("auto", "right", "left"):
            raise GlimpseError(f"facing must be auto, right or left, not {facing!r}")
        pyr = self.pyramid(image)
        if iterations == 0 and start is not None:  # nothing to do: the given start is the answer
            ks = np.arange(self.config.n_landmarks) if landmarks is None else np.asarray(landmarks, dtype=int)
            st = np.asarray(start, dtype=np.float64)[ks]
            return Trajectory(positions=st[None], uncertainty_mm=np.zeros(len(ks)),
                              landmark_names=tuple(self.landmark_names[k] for k in ks),
                              pixel_spacing=self.pixel_spacing, image_shape=pyr.shape, patch=self.config.patch,
                              facing=facing if facing != "auto" else "right")
        mirrored = coarse_start = None
        stages: dict = {}
        cues: dict | None = None  # what the confidence is computed from (napari_glimpse.confidence)
        if self.coarse is not None and start is None:
            st = self._coarse_fine(pyr, facing, landmarks, record_stages)
            start = coarse_start = st.positions
            facing, mirrored, stages, cues = st.facing, st.mirrored, st.record, st.cues
            ks = cues["ks"]
            gate = self.glimpse_gate
            if iterations == 0 or (gate is not None and not gate[ks].any()):
                tr = Trajectory(
                    positions=start[ks][None], uncertainty_mm=st.spread[ks] * self.pixel_spacing,
                    landmark_names=tuple(self.landmark_names[k] for k in ks), pixel_spacing=self.pixel_spacing,
                    image_shape=pyr.shape, patch=self.config.patch, facing=facing,
                    glimpses=np.zeros((0, len(ks), self.config.n_levels, self.config.patch, self.config.patch),
                                      np.uint8) if record_glimpses else None,
                    steps_gated=np.ones(len(ks), bool) if iterations > 0 else None, **stages,
                )
                return self._assess(tr, cues)
        tr = self._predict_facing(pyr, mirrored, facing, iterations=iterations, landmarks=landmarks, starts=starts,
                                  start=start, record_glimpses=record_glimpses, record_heatmaps=record_heatmaps,
                                  bf16=bf16, seed=seed)
        if stages:
            tr = dataclasses.replace(tr, **stages)
        if coarse_start is not None and self.glimpse_gate is not None:
            tr = self._gated(tr, coarse_start, cues["fine_spread"], cues["ks"])
        blend = self.spec.glimpse.blend if coarse_start is not None else 0.0
        if blend > 0:
            # the answer blends the glimpses' last estimate with the coarse stage's (two estimators
            # with partly independent errors; the weight is chosen on validation)
            ks = np.arange(self.config.n_landmarks) if landmarks is None else np.asarray(landmarks, dtype=int)
            pos = tr.positions.copy()
            pos[-1] = blend * coarse_start[ks] + (1 - blend) * pos[-1]
            tr = dataclasses.replace(tr, positions=pos)
        return self._assess(tr, cues)

    @property
    def glimpse_gate(self) -> np.ndarray | None:
        """``(K,)`` bool: the landmarks whose glimpse steps are applied after the coarse and fine
        stages (``meta['glimpse_gate']['apply']``, fitted on validation by
        :func:`napari_glimpse.gate.fit_gate`); ``None``: no gate, every asked-for step is applied."""
        g = self.spec.glimpse.gate
        return None if g is None else np.asarray(g, dtype=bool).reshape(self.config.n_landmarks)

    def _gated(self, tr: Trajectory, start: np.ndarray, spread: np.ndarray, ks: np.ndarray) -> Trajectory:
        """``tr`` with the gated-off landmarks kept at the 0-step answer ``start`` (and its spread)."""
        off = ~self.glimpse_gate[ks]
        pos, unc = tr.positions.copy(), tr.uncertainty_mm.copy()
        pos[:, off] = start[ks][off]
        unc[off] = spread[ks][off] * self.pixel_spacing
        return dataclasses.replace(tr, positions=pos, uncertainty_mm=unc, steps_gated=off)

    def _coarse_fine(self, pyr: Pyramid, facing: str, landmarks: Sequence[int] | None,
                     record_stages: bool) -> _StageAnswer:
        """The coarse stage, the fine stage's looks and the second search of implausible points,
        read in the training images' facing (a left-facing image mirrored first: exactly the
        mirrored answer), with what the confidence is computed from."""
        w = pyr.shape[1]
        start, spread, disagreement = self._coarse(pyr)
        cues = {"coarse_spread": spread}
        if facing == "auto":
            facing = facing_of(start, self.mean_start)
        looks: list | None = [] if record_stages or self.meta.get("confidence") else None
        mirrored = None
        if facing == "left":
            mirrored = build_pyramid(pyr.levels[0].flip(-1).numpy(), self.config.n_levels, self.config.patch)
            coarse, spread, disagreement = self._coarse(mirrored)
            cues["coarse_spread"] = spread
        else:
            coarse = start
        frame = pyr if mirrored is None else mirrored
        pos, spread = self._refine(frame, coarse, spread, disagreement=disagreement, looks=looks)
        pos, spread, researched = self._research(frame, pos, spread, looks)
        if mirrored is not None:
            pos = mirror_points(pos, w)
        ks = np.arange(self.config.n_landmarks) if landmarks is None else np.asarray(landmarks, dtype=int)
        record = self._fine_stage.record(coarse, looks, pyr, ks, mirrored is not None) if looks and record_stages \
            else {}
        if researched is not None:
            record["researched"] = researched[ks]
        cues.update(coarse=coarse if mirrored is None else mirror_points(coarse, w), final=pos,
                    fine_spread=spread, ks=ks, peak=_peaks(looks))
        return _StageAnswer(pos, spread, facing, mirrored, record, cues)

    def _assess(self, tr: Trajectory, cues: dict | None) -> Trajectory:
        """``tr`` with its plausibility check and calibrated confidence (:mod:`napari_glimpse.confidence`),
        when the model carries them (``meta['confidence']``) and the coarse and fine stages ran."""
        if cues is None or not self.meta.get("confidence"):
            return tr
        from .confidence import assess

        off = self.landmark_offsets
        if off is None:
            return assess(self, tr, cues)
        # the shape model and the calibrator know answers without a site's offsets (finetune): judge
        # the answer as the nets gave it, and show it (and where the others imply it) with them
        d = off * ([-1.0, 1.0] if tr.facing == "left" else [1.0, 1.0])
        ks = cues["ks"]
        pos = tr.positions.copy()
        pos[-1] -= d[ks]
        judged = assess(self, dataclasses.replace(tr, positions=pos), {**cues, "final": cues["final"] - d})
        implied = None if judged.implied_positions is None else judged.implied_positions + d[ks]
        return dataclasses.replace(judged, positions=tr.positions, implied_positions=implied)

    def _predict_facing(self, pyr: Pyramid, mirrored: Pyramid | None, facing: str, **run) -> Trajectory:
        """The glimpse iterations for one facing (``auto``: both, keep the settled one)."""
        start = run["start"]
        if facing == "right":
            return self._run(pyr, **run)
        w = pyr.shape[1]
        if mirrored is None:
            mirrored = build_pyramid(pyr.levels[0].flip(-1).numpy(), self.config.n_levels, self.config.patch)
        if start is not None:
            run["start"] = mirror_points(start, w)
        left = self._run(mirrored, **run)
        run["start"] = start
        pos = mirror_points(left.positions, w)

        def unflip(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.ascontiguousarray(a[..., ::-1])

        left = dataclasses.replace(left, positions=pos, facing="left",
                                   glimpses=unflip(left.glimpses), heatmaps=unflip(left.heatmaps))
        if facing == "left":
            return left
        right = self._run(pyr, **run)
        return right if right.uncertainty_mm.mean() <= left.uncertainty_mm.mean() else left

    def locate_coarse(self, image: np.ndarray | str | os.PathLike | Pyramid,
                      fine_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The coarse stage (and the fine stage after it): ``(K, 2)`` positions and ``(K,)``
        spread (full-res pixels), the image read as it stands.

        With ``meta['coarse_flip_average']`` the coarse stage averages the image's and its
        mirror's answers. ``fine_steps``: fine-stage looks (default :attr:`fine_steps`; 0: the
        coarse answer alone). The spread is the fine stage's when it looks (its heatmap peaks'
        width over the decode window and its nets' disagreement: on ISBI validation it ranks the
        errors better, Spearman 0.48 with the shipped model's window 10, 0.33 with window 2, the
        coarse spread 0.15), else the coarse stage's; but where the coarse
        passes disagree by more than the fine stage was trained to correct, at least that
        disagreement (the fine stage cannot vouch for a point it may not be able to reach).
        """
        if self.coarse is None:
            raise GlimpseError("this model has no coarse stage")
        pyr = self.pyramid(image)
        pos, spread, disagreement = self._coarse(pyr)
        return self._refine(pyr, pos, spread, fine_steps, disagreement)

    def _coarse(self, pyr: Pyramid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The coarse stage's positions, spread and passes' disagreement (full-res pixels)."""

        return self.stage("coarse").run(pyr)

    def _refine(self, pyr: Pyramid, pos: np.ndarray, spread: np.ndarray, fine_steps: int | None = None,
                disagreement: np.ndarray | None = None, looks: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The fine stage's looks around ``pos`` (default :attr:`fine_steps` of them): positions
        and their spread; ``pos`` and ``spread`` (the coarse stage's) as they are when it does not
        look. ``disagreement``: the coarse passes'; where it exceeds the largest offset the fine
        stage was trained to correct (``jitter_mm[1]``, the smallest of its nets'), the spread is
        at least that. ``looks``: receives each look's :class:`~napari_glimpse.fine.FineLook`.
        The last stage's answer is shifted by :attr:`landmark_offsets` (a fine-tuned site's convention)."""
        steps = self.fine_steps if fine_steps is None else fine_steps
        if steps <= 0 or self.fine is None:
            return (self._shifted(pos, pyr.shape) if self.fine is None else pos), spread

        fine = self.stage("fine")
        pos, fine_spread = fine.run(pyr, pos, steps, looks)
        if disagreement is not None:
            reach = fine.reach_px(self.pixel_spacing)
            fine_spread = np.where(disagreement > reach, np.maximum(fine_spread, disagreement), fine_spread)
        return self._shifted(pos, pyr.shape), fine_spread

    def _research(self, pyr: Pyramid, pos: np.ndarray, spread: np.ndarray, looks: list | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Implausible answers searched again: each point the shape check flags (``pos``: all
        landmarks, the stages' frame, i.e. the training images' facing) gets a fine look from where
        the other landmarks imply it, and keeps the new answer where that is more plausible (a
        lower ``z``). Returns positions, spread and which points moved (None without a shape
        model or a fine stage, or with ``meta['research'] = False``); ``looks`` (the fine looks) take
        the new looks' entries of those points."""
        from .confidence import of_model

        conf = of_model(self)
        if (conf is None or conf.shape is None or self.fine is None or self.fine_steps <= 0
                or conf.shape.n_landmarks != len(pos) or not self.spec.fine.research):
            return pos, spread, None
        off = 0.0 if self.landmark_offsets is None else self.landmark_offsets  # judged without a site's offsets
        s = self.pixel_spacing
        before = conf.shape.check((pos - off) * s)
        moved = np.zeros(len(pos), bool)
        if not before.flagged.any():
            return pos, spread, moved
        new_looks: list | None = [] if looks else None
        cand, cand_spread = self._refine(pyr, before.implied / s, spread, looks=new_looks)
        trial = np.where(before.flagged[:, None], cand, pos)
        after = conf.shape.check((trial - off) * s)
        moved = before.flagged & (after.z < before.z)
        if looks and new_looks:
            for i, (old, new) in enumerate(zip(looks, new_looks)):
                looks[i] = FineLook(*(np.where(moved.reshape((-1,) + (1,) * (a.ndim - 1)), b, a) for a, b in
                                      ((old.centers, new.centers), (old.positions, new.positions),
                                       (old.windows, new.windows), (old.heatmaps, new.heatmaps))))
        return np.where(moved[:, None], cand, pos), np.where(moved, cand_spread, spread), moved

    @property
    def landmark_offsets(self) -> np.ndarray | None:
        """``(K, 2)`` shift (x, y, the model's pixels, the image read as the training images face)
        added to the coarse and fine stages' answer: a site's systematic difference from the
        training labels, learned by ``finetune`` (``meta['landmark_offsets_px']``); None without."""
        off = self.meta.get("landmark_offsets_px")
        return None if off is None else np.asarray(off, dtype=np.float64).reshape(self.config.n_landmarks, 2)

    def _shifted(self, pos: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """``pos`` plus :attr:`landmark_offsets` (kept inside an image of ``shape``)."""
        off = self.landmark_offsets
        if off is None:
            return pos
        return np.clip(pos + off, 0.0, [shape[1] - 1.0, shape[0] - 1.0])

    def _run(self, pyr: Pyramid, iterations: int, landmarks: Sequence[int] | None, starts: int,
             start: np.ndarray | None, record_glimpses: bool, record_heatmaps: bool, bf16: bool | None,
             seed: int) -> Trajectory:
        """The glimpse iterations on one pyramid, as the image stands."""
        ks = np.arange(self.config.n_landmarks) if landmarks is None else np.asarray(landmarks, dtype=int)
        centers = self._start_centres(ks, starts, start, seed, pyr.shape)
        steps = self.stage("glimpse").run(pyr, centers, ks, iterations, record_glimpses, record_heatmaps, bool(bf16))
        return self._glimpse_trajectory(steps.positions, ks, pyr.shape, steps.glimpses, steps.heatmaps)

    def _start_centres(self, ks: np.ndarray, starts: int, start: np.ndarray | None, seed: int,
                       shape: tuple[int, int]) -> np.ndarray:
        """``(starts, K, 2)`` the glimpses' starts: ``start`` or the training mean (scaled to the
        image's size), then ``starts - 1`` more perturbed by half the training spread."""
        h, w = shape
        base = self.mean_start[ks] if start is None else np.asarray(start, dtype=np.float64)[ks]
        # image size differs from training: scale the mean start with it
        if start is None and "train_image_shape" in self.meta:
            th, tw = self.meta["train_image_shape"]
            base = base * np.array([w / tw, h / th])
        centers = np.repeat(base[None], starts, axis=0)
        if starts > 1:
            rng = np.random.default_rng(seed)
            centers[1:] += rng.normal(size=centers[1:].shape) * 0.5 * self.std_start[ks][None]
        return centers

    def _glimpse_trajectory(self, pos: np.ndarray, ks: np.ndarray, shape: tuple[int, int],
                            glimpses: np.ndarray | None, heatmaps: np.ndarray | None) -> Trajectory:
        """The trajectory of ``pos`` ``(T + 1, starts, K, 2)``: the first start's path ending at the
        starts' mean, the uncertainty their spread (one start: its last step's length)."""
        final = pos[-1].mean(axis=0)
        n_s = pos.shape[1]
        if n_s > 1:
            unc = np.sqrt(((pos[-1] - final[None]) ** 2).sum(-1).mean(0)) * self.pixel_spacing
        else:
            unc = np.linalg.norm(pos[-1, 0] - pos[-2, 0], axis=-1) * self.pixel_spacing
        traj_pos = pos[:, 0].copy()
        traj_pos[-1] = final
        return Trajectory(
            positions=traj_pos,
            uncertainty_mm=unc,
            landmark_names=tuple(self.landmark_names[k] for k in ks),
            pixel_spacing=self.pixel_spacing,
            image_shape=shape,
            patch=self.config.patch,
            glimpses=glimpses,
            heatmaps=heatmaps,
        )
