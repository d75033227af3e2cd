"""What a model did on one image: :class:`Trajectory` (the answer, each stage's record, the confidence)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def mirror_points(points: np.ndarray, width: int) -> np.ndarray:
    """``(..., 2)`` pixel positions (x, y) in an image ``width`` pixels wide, mirrored left-right."""
    return np.asarray(points, dtype=np.float64) * [-1, 1] + [width - 1, 0]


@dataclass(frozen=True)
class Trajectory:
    """What the model did on one image.

    ``positions[t, k]`` is landmark ``k``'s estimate (x, y, full-resolution pixels) before
    iteration ``t``; ``positions[0]`` is the start and ``positions[-1]`` the answer.
    ``glimpses[t, k, l]`` is the ``P x P`` patch of level ``l`` seen at iteration ``t`` (uint8) and
    ``heatmaps[t, k, l, c]`` the trunk's softmax map of channel ``c`` (float16); both only on
    request. ``facing`` is ``right`` when the image was read as it is (the training set's
    orientation) and ``left`` when it was mirrored first: positions are always in the image's own
    pixels, and glimpses and heatmaps are flipped back to the image's axes. ``uncertainty_mm`` is
    the spread of the perturbed starts' answers (or, with one start, the length of the last step);
    ``confidence = exp(-uncertainty_mm / 2 mm)``.

    The stages before the glimpses, on request (``record_stages``) and only when the fine stage
    looked (else ``None``): ``coarse_positions`` ``(K, 2)`` the coarse answer; for each of the ``S``
    fine looks ``fine_positions[s]`` ``(K, 2)`` its answer (look ``s`` is centred on
    :attr:`stage_positions` ``[s]``), ``fine_windows[s, k]`` ``(C, P, P)`` uint8 the windows landmark
    ``k``'s look read (pyramid levels ``fine_level``, ``fine_level + 1``, ...: finest first) and
    ``fine_heatmaps[s, k]`` ``(h, w)`` float16 the softmax of its own heatmap there (with fine nets
    that read different levels, the windows and maps of the first net's kind; the positions are
    always the whole stage's answer);
    ``fine_window_scale[c]`` the full-resolution pixels (x, y) per window pixel of context level
    ``c`` (window pixel ``j`` at ``centre + (j - (P - 1) / 2) * scale``). Flipped like the glimpses.
    ``fine_nets`` ``(shown, total)``: how many fine nets' maps ``fine_heatmaps`` averages (those
    of the first net's kind) and how many nets the fine stage has.

    Spacing (:meth:`GlimpseModel.predict` ``spacing``): ``pixel_spacing`` is the image's (mm per
    pixel of ``positions``) and ``spacing_source`` where it came from (``given``, ``file`` or
    ``model``). The model works at its own spacing: an image at another (by more than 1 %) is
    resampled first and every position mapped back to the image's pixels; ``model_scale`` (x, y)
    is then the model's pixels per image pixel (else 1, 1): glimpses and heatmaps are in the
    model's pixels (a level-``l`` glimpse covers ``patch * 2**l / model_scale`` image pixels),
    ``fine_window_scale`` is in the image's. ``uncertainty_mm`` is in mm whatever the spacing.

    Confidence (a model with ``meta['confidence']``, see :mod:`napari_glimpse.confidence`; the
    coarse and fine stages' answers only, else ``None``): ``probability`` ``(K,)`` the calibrated
    probability that each point lies within 2 mm of the truth (then :attr:`confidence`),
    ``features`` ``(K, F)`` the cues it was computed from, ``shape_z`` / ``shape_mm`` how far (training
    sds / mm) each point is from where the other landmarks imply it (``implied_positions``, image
    pixels; :mod:`napari_glimpse.shape`), :attr:`flagged` the implausible ones, :attr:`expected_misses`
    the image-level score. ``researched`` ``(K,)`` bool: the points the shape check flagged that were
    searched again from their implied position and moved there (:meth:`GlimpseModel._research`).

    ``steps_gated`` ``(K,)`` bool: glimpse steps were asked for after the coarse and fine stages
    but not applied to these landmarks, the model's gate (``meta['glimpse_gate']``, see
    :mod:`napari_glimpse.gate`) keeping them off: their positions are the 0-step answer at every
    step. ``None`` when no step was asked for or the model has no gate.
    """

    positions: np.ndarray
    uncertainty_mm: np.ndarray
    landmark_names: tuple[str, ...]
    pixel_spacing: float
    image_shape: tuple[int, int]
    patch: int
    glimpses: np.ndarray | None = None
    heatmaps: np.ndarray | None = None
    facing: str = "right"
    coarse_positions: np.ndarray | None = None
    fine_positions: np.ndarray | None = None
    fine_windows: np.ndarray | None = None
    fine_heatmaps: np.ndarray | None = None
    fine_window_scale: np.ndarray | None = None
    fine_level: int | None = None
    fine_nets: tuple[int, int] | None = None
    spacing_source: str = "model"
    model_scale: tuple[float, float] = (1.0, 1.0)
    probability: np.ndarray | None = None
    features: np.ndarray | None = None
    shape_z: np.ndarray | None = None
    shape_mm: np.ndarray | None = None
    implied_positions: np.ndarray | None = None
    researched: np.ndarray | None = None
    steps_gated: np.ndarray | None = None

    @property
    def final(self) -> np.ndarray:
        return self.positions[-1]

    @property
    def offsets(self) -> np.ndarray:
        """``(T, K, 2)`` the step taken at each iteration (the offset arrows)."""
        return np.diff(self.positions, axis=0)

    @property
    def confidence(self) -> np.ndarray:
        """``(K,)`` in [0, 1]: :attr:`probability` when the model is calibrated, else
        ``exp(-uncertainty_mm / 2 mm)``."""
        return np.exp(-self.uncertainty_mm / 2.0) if self.probability is None else self.probability

    @property
    def expected_misses(self) -> float | None:
        """The expected number of landmarks beyond 2 mm of the truth (the sum of ``1 - probability``):
        which image to review first. ``None`` without a calibrated :attr:`probability`."""
        return None if self.probability is None else float((1.0 - self.probability).sum())

    @property
    def flagged(self) -> np.ndarray | None:
        """``(K,)`` bool: points far from where the other landmarks imply they should be
        (:mod:`napari_glimpse.shape`; ``None`` without a shape model)."""
        if self.shape_z is None:
            return None
        from .shape import MIN_MM, Z_FLAG

        return (self.shape_z > Z_FLAG) & (self.shape_mm > MIN_MM)

    @property
    def iterations(self) -> int:
        return self.positions.shape[0] - 1

    @property
    def fine_looks(self) -> int:
        """Recorded fine looks (0 without stage records)."""
        return 0 if self.fine_positions is None else self.fine_positions.shape[0]

    @property
    def stage_answers(self) -> list[tuple[str, np.ndarray]]:
        """What each stage answered, in the order they ran: ``("coarse", (K, 2))`` and one
        ``("fine", (K, 2))`` per fine look when the stages were recorded (``record_stages``), then
        ``("glimpse", (K, 2))`` per glimpse step; without stage records ``("start", ...)`` first,
        where the glimpses started (a glimpse-only model: the mean training position). The last
        entry's positions are the answer's."""
        out: list[tuple[str, np.ndarray]] = []
        if self.coarse_positions is not None:
            out.append(("coarse", self.coarse_positions))
        if self.fine_positions is not None:
            out.extend(("fine", p) for p in self.fine_positions)
        if not out:
            out.append(("start", self.positions[0]))
        out.extend(("glimpse", p) for p in self.positions[1:])
        return out

    @property
    def stage_positions(self) -> np.ndarray | None:
        """``(S + 1, K, 2)`` the coarse answer, then each fine look's (``None`` without records)."""
        if self.coarse_positions is None or self.fine_positions is None:
            return None
        return np.concatenate([self.coarse_positions[None], self.fine_positions])
