"""Glimpse explorer: what the model saw and did, stage by stage, for one landmark.

Two views. **Coarse → fine stages** (what the shipped model's answer is made of): the coarse
stage's answer, the fine stage's answer and the arrow between them, the outlines of the windows
the fine look read (one per context level, at true scale and position) and landmark ``k``'s fine
heatmap over the image; in the widget the windows side by side with the heatmap over them.
**Glimpse steps**, computed here (in a worker, when the view asks for them) from the current
proposal, so exploring never changes the points: every pyramid level's patch over the image at
true scale and position (level ``l`` covers ``64 * 2**l`` pixels centred on the estimate), their
outlines, the step the model predicted as an arrow, the estimates so far (a path and points) and
the softmax heatmap of a chosen trunk channel; in the widget the patches side by side, with the
heatmaps under them. "Apply these steps to the proposal" moves the landmark to the estimate
after the shown step, as an edit the corrections log records. A slider (with play) steps through
the fine looks or glimpse steps; the animation exports to GIF/MP4 with labelled frames.

Everything drawn is prepared by :mod:`napari_glimpse._layer_data` from a
:class:`~napari_glimpse.inference.Trajectory`, in three layers: one image (the patches, or the
fine heatmap) under the landmarks, and the outlines and arrows (Shapes) and markers (Points)
over them. They exist only while the explorer is shown: hiding (or closing) the widget hides
them, so they do not cover the image while another widget is in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QWidget,
)

from .. import _layer_data as ld
from ..errors import GlimpseError
from ..gate import gate_note
from ._state import Detection, camera_of, error_text, layer_positions, real_viewer, scroll_body, state_for, status

PREFIX = "glimpse"
LEVEL_COLORS = ld.LEVEL_COLORS
LAYER_NAMES = {"image": f"{PREFIX} patches / heatmap", "shapes": f"{PREFIX} outlines / arrows",
               "points": f"{PREFIX} estimates"}
TILE_UPSCALE = 2  # exported tile frames: each tile pixel 2 x 2 (legible labels beside them)


STAGES, GLIMPSES = "stages", "glimpses"
_VIEWS = ((STAGES, "Coarse → fine stages"), (GLIMPSES, "Glimpse steps"))
PROPOSAL, MEAN = "proposal", "mean"
_ORIGINS = ((PROPOSAL, "the proposal"), (MEAN, "the mean start (the paper's journey)"))
TRUTH_COLOR = "lime"
_GLIMPSE_TIPS = ("Step: the glimpse seen and the step taken",
                 "Top: the patch of each level (finest left, red cross = the estimate); "
                 "below: softmax heatmaps, one channel per row")
_STAGE_TIPS = ("Fine look (usually one): the windows read and the move made",
               "Top: the fine windows of each context level (finest left; red cross = the coarse answer, "
               "where the look started; green = the fine answer); below: the same windows with this landmark's "
               "fine heatmap over the part the finest window covers")


def mean_start(model: Any, image_hw: tuple[int, int], facing: str) -> np.ndarray:
    """``(K, 2)`` the model's mean start in an image of ``image_hw`` (its own pixels, scaled from the
    training images' size as :meth:`GlimpseModel.predict` scales it; mirrored for a left-facing image)."""
    h, w = image_hw
    start = np.asarray(model.mean_start, dtype=np.float64)
    if "train_image_shape" in model.meta:
        th, tw = model.meta["train_image_shape"]
        start = start * np.array([w / tw, h / th])
    return start * [-1, 1] + [w - 1, 0] if facing == "left" else start


def _explore_job(get_model: Callable, model_key: tuple, image: np.ndarray, pyramid: Any, k: int,
                 start: np.ndarray | None, steps: int, facing: str, spacing: float | None):
    """Worker body (no Qt, no layers): ``steps`` glimpse steps of landmark ``k`` from ``start``
    (``(K, 2)`` x, y; ``None``: the model's mean start, the paper's journey), recorded. Returns
    ``(pyramid or None, Trajectory)``: the pyramid is reused next time (only at the model's own
    spacing: another is resampled by ``predict``)."""
    model = get_model(model_key)
    if start is None:
        start = mean_start(model, tuple(pyramid.shape) if pyramid is not None else image.shape[:2], facing)
    if len(start) != model.config.n_landmarks:
        raise GlimpseError(f"the model locates {model.config.n_landmarks} landmarks, the proposal has {len(start)}")
    at_model = spacing is None or abs(spacing / model.pixel_spacing - 1) <= 0.01
    if at_model and pyramid is None:
        pyramid = model.pyramid(image)
    traj = model.predict(pyramid if at_model else image, iterations=steps, landmarks=[k], start=start,
                         record_glimpses=True, record_heatmaps=True, facing=facing, spacing=spacing)
    return (pyramid if at_model else None), traj


def _canvas_hw(viewer: Any) -> tuple[int, int]:
    """The canvas (height, width) in screen pixels (600 x 600 when unknown)."""
    size = getattr(getattr(viewer, "canvas", None), "size", None) or getattr(viewer, "_canvas_size", None)
    return tuple(int(v) for v in size) if size else (600, 600)  # type: ignore[return-value]


def _outline_width(box: np.ndarray) -> float:
    """An outline's width (image pixels): thin for a small square, so it does not cover what it frames."""
    return float(np.clip(0.015 * np.ptp(box[:, -1]), 1.0, 8.0))


def _arrow_items(vector: np.ndarray) -> list[tuple[np.ndarray, str, str, str, float]]:
    """The Shapes items of an arrow (magenta shaft and head), its shaft as wide as a fifth of its length
    (1 to 8 image pixels)."""
    width = float(np.clip(0.2 * np.hypot(*np.asarray(vector)[0, 1]), 1.0, 8.0))
    return [(d, typ, "#ff00ff", "#ff00ff" if typ == "polygon" else "transparent", width if typ == "path" else 0.5)
            for d, typ in ld.arrow_shapes(vector)]


class ExplorerWidget(QWidget):
    """Step through one landmark's coarse -> fine stages, or glimpse steps from its proposal."""

    steps_ready = Signal(object)  # the glimpse steps just computed (a one-landmark Trajectory)

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # napari hands each widget its own proxy
        self.state = state_for(self.viewer)
        self.det: Detection | None = None
        self.layers: dict[str, Any] = {}
        self._updating = False
        self._dock = None
        self._explored: dict[tuple, Any] = {}  # request key -> Trajectory of one landmark
        self._pyramid: tuple[tuple, Any] | None = None
        self._worker = None
        self._again = False
        self._failed: tuple | None = None  # the request whose computation failed (not retried)
        self._hooked = None  # the landmarks layer whose edits re-ask for steps
        self.last_captions: list[list[str]] = []
        self._build_controls()
        self._build_layout()
        self._redraw = QTimer(self)  # an edit of the proposal: steps from the new position, once
        self._redraw.setSingleShot(True)
        self._redraw.setInterval(300)
        self._redraw.timeout.connect(self.update_layers)
        self.state.detection_changed.connect(self.set_detection)
        self.state.landmark_selected.connect(self.set_landmark)
        self.set_detection(self.state.current)

    def _spin(self, lo: int, hi: int, tip: str, value: int | None = None) -> QSpinBox:
        s = QSpinBox()
        s.setRange(lo, hi)
        if value is not None:
            s.setValue(value)
        s.setToolTip(tip)
        s.valueChanged.connect(lambda _: self.update_layers())
        return s

    def _build_controls(self) -> None:
        self.landmark_combo = QComboBox()
        self.landmark_combo.setToolTip("Landmark to explore")
        self.landmark_combo.currentIndexChanged.connect(lambda _: self.update_layers())
        self.view_combo = QComboBox()
        for key, text in _VIEWS:
            self.view_combo.addItem(text, key)
        self.view_combo.setToolTip("Coarse → fine: the stages that made the answer; glimpse steps: what the "
                                   "foveated glimpse network does from the current proposal (it does not move it)")
        self.view_combo.currentIndexChanged.connect(lambda _: self._view_changed())
        self.steps = QSpinBox()
        self.steps.setRange(1, 20)
        self.steps.setValue(3)
        self.steps.setToolTip("Glimpse steps to compute from the current proposal")
        self.steps.valueChanged.connect(lambda _: self._view_changed())
        self.origin = QComboBox()
        for key, text in _ORIGINS:
            self.origin.addItem(text, key)
        self.origin.setToolTip("Where the glimpse steps start: the current proposal, or every landmark's mean "
                               "training position (a glimpse-only model's own start: its whole journey)")
        self.origin.currentIndexChanged.connect(lambda _: self._view_changed())
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.valueChanged.connect(lambda _: self.update_layers())
        self.iter_label = QLabel("step –")
        self.play_btn = QPushButton("▶ Play")
        self.play_btn.setCheckable(True)
        self.play_btn.setToolTip("Cycle through the steps")
        self.play_btn.toggled.connect(self._toggle_play)
        self._timer = QTimer(self)
        self._timer.setInterval(900)
        self._timer.timeout.connect(self._advance)
        self.max_level = self._spin(0, 0, "Show the pyramid levels 0 … this one over the image")
        self.hm_check = QCheckBox("heatmap")
        self.hm_check.setChecked(True)
        self.hm_check.toggled.connect(lambda _: self.update_layers())
        self.hm_level = self._spin(0, 0, "Pyramid level of the heatmap shown over the image")
        self.channel = self._spin(0, 0, "Trunk channel whose softmax heatmap is shown")
        self.auto_channel = QCheckBox("most peaked")
        self.auto_channel.setChecked(True)
        self.auto_channel.setToolTip("Pick the channel whose softmax is the most concentrated inside the patch "
                                     "(a band along its border is left out: peaks there are padding artefacts)")
        self.auto_channel.toggled.connect(self._auto_toggled)
        self.n_rows = self._spin(1, 8, "Heatmap rows under the tiles: the chosen channel, then the next most "
                                       "peaked ones", 2)
        self.apply_btn = QPushButton("Apply these steps to the proposal")
        self.apply_btn.setToolTip("Move this landmark to the estimate after the shown step (logged as an edit, "
                                  "undoable); exploring alone never moves it")
        self.apply_btn.clicked.connect(lambda: self.apply_steps())

    def _build_layout(self) -> None:
        form = self._build_form()
        erow = self._build_view_rows()
        lay = scroll_body(self)
        lay.addLayout(form)
        lay.addWidget(self.tiles_scroll, 1)
        lay.addWidget(self.info)
        lay.addWidget(self.apply_btn)
        lay.addLayout(erow)
        lay.addWidget(self.status_label)

    def _build_form(self) -> QFormLayout:
        """The view, landmark, steps, slider, levels and heatmap controls in one form."""
        srow = QHBoxLayout()
        srow.addWidget(self.slider, 1)
        srow.addWidget(self.iter_label)
        srow.addWidget(self.play_btn)
        form = QFormLayout()
        form.addRow("View", self.view_combo)
        form.addRow("Landmark", self.landmark_combo)
        labels = [QLabel(t) for t in ("Steps", "Levels up to", "level", "channel", "Heatmap rows")]
        form.addRow(labels[0], self.steps)
        from_label = QLabel("From")
        form.addRow(from_label, self.origin)
        self.step_name = QLabel("Step")
        form.addRow(self.step_name, srow)
        form.addRow(labels[1], self.max_level)
        hrow = QHBoxLayout()
        for w in (self.hm_check, labels[2], self.hm_level, labels[3], self.channel, self.auto_channel):
            hrow.addWidget(w)
        hrow.addStretch(1)
        form.addRow(hrow)
        form.addRow(labels[4], self.n_rows)
        # controls of the glimpse view only (hidden in the stage view)
        self._glimpse_controls = [*labels[:1], self.steps, from_label, self.origin, *labels[1:], self.max_level,
                                  self.hm_level, self.channel,
                                  self.auto_channel, self.n_rows, self.apply_btn]
        return form

    def _build_view_rows(self) -> QHBoxLayout:
        """The tiles, the info line, the centre/fps/export row (returned) and the status line."""
        self.tiles = QLabel("run Detect, then pick a landmark")
        self.tiles.setAlignment(Qt.AlignCenter)
        self.tiles.setToolTip(_GLIMPSE_TIPS[1])
        self.tiles_scroll = QScrollArea()  # docked under another widget, the tiles scroll instead of clipping
        self.tiles_scroll.setWidget(self.tiles)
        self.tiles_scroll.setWidgetResizable(True)
        self.tiles_scroll.setAlignment(Qt.AlignCenter)
        self.tiles_scroll.setMinimumHeight(80)
        self.info = QLabel("")
        self.info.setWordWrap(True)

        focus = QPushButton("Centre view")
        focus.setToolTip("Centre and zoom the view on the glimpse (or the fine windows)")
        focus.clicked.connect(lambda: self.focus())
        self.fps = QSpinBox()
        self.fps.setRange(1, 30)
        self.fps.setValue(2)
        self.fps.setSuffix(" fps")
        export = QPushButton("Export animation…")
        export.setToolTip("Write the steps (or fine looks) as a GIF or MP4 (imageio), each frame labelled: "
                          "landmark, step, scale bar, colours")
        export.clicked.connect(self._browse_export)
        erow = QHBoxLayout()
        erow.addWidget(focus)
        erow.addWidget(self.fps)
        erow.addWidget(export)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        return erow

    # ------------------------------------------------------------------------ inputs
    @property
    def traj(self):
        """The detection's trajectory (the stage view's records)."""
        return self.det.trajectory if self.det is not None else None

    def available(self) -> dict[str, bool]:
        """Which views the current detection can show."""
        det = self.det
        return {STAGES: ld.has_stages(self.traj),
                GLIMPSES: det is not None and det.points_layer is not None and bool(det.landmark_names)}

    def view(self) -> str:
        """The chosen view: ``stages`` or ``glimpses``."""
        return self.view_combo.currentData()

    def set_view(self, view: str) -> None:
        self.view_combo.setCurrentIndex(self.view_combo.findData(view))

    def set_detection(self, det: Detection | None) -> None:
        if det is not self.det:
            self._explored.clear()
            self._pyramid = None
        self.det = det
        self._hook(det.points_layer if det is not None else None)
        ok = self.available()
        self._updating = True
        try:
            self.landmark_combo.clear()
            for i in range(self.view_combo.count()):
                self.view_combo.model().item(i).setEnabled(ok[self.view_combo.itemData(i)])
            if not any(ok.values()):
                self._remove_layers()
                self.slider.setRange(0, 0)  # no stale steps for the play button or the export
                self.iter_label.setText("step –")
                self.tiles.setPixmap(QPixmap())
                self.tiles.setText("run Detect on this image to explore its stages and glimpses")
                self.info.setText("")
                return
            if not ok[self.view()]:
                self.set_view(STAGES if ok[STAGES] else GLIMPSES)
            names = list(det.landmark_names)
            self.landmark_combo.addItems([f"{i + 1}. {n} ({a})" for i, (n, a) in
                                          enumerate(zip(names, ld.abbreviations(names)))])
            self._configure_view()
            self.slider.setValue(0)
            if self.state.selected_landmark is not None and self.state.selected_landmark < len(names):
                self.landmark_combo.setCurrentIndex(self.state.selected_landmark)
        finally:
            self._updating = False
        self.update_layers()

    def _hook(self, layer: Any) -> None:
        """Follow edits of ``layer`` (the proposal): the glimpse steps start from it."""
        if self._hooked is not None:
            try:
                self._hooked.events.data.disconnect(self._proposal_edited)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._hooked = layer
        if layer is not None:
            layer.events.data.connect(self._proposal_edited)

    def _proposal_edited(self, event=None) -> None:
        if self.view() == GLIMPSES and self.is_shown():
            self._redraw.start()

    def _configure_view(self) -> None:
        """Slider range, labels and which controls apply, for the chosen view."""
        traj, stages = self.traj, self.view() == STAGES
        steps = (traj.fine_looks if traj is not None else 1) if stages else self.steps.value()
        self.slider.setRange(0, max(0, steps - 1))
        self.step_name.setText("Fine look" if stages else "Step")
        tips = _STAGE_TIPS if stages else _GLIMPSE_TIPS
        self.slider.setToolTip(tips[0])
        self.tiles.setToolTip(tips[1])
        for w in self._glimpse_controls:
            w.setVisible(not stages)
        self.hm_check.setToolTip("Show the fine stage's heatmap of this landmark over the image" if stages
                                 else "Show the trunk's softmax map of one channel over the image")

    def _view_changed(self) -> None:
        if self._updating:
            return
        self._configure_view()
        self.update_layers()

    def set_landmark(self, k: int) -> None:
        if 0 <= k < self.landmark_combo.count():
            self.landmark_combo.setCurrentIndex(k)

    def set_iteration(self, t: int) -> None:
        self.slider.setValue(t)

    def _auto_toggled(self, on: bool) -> None:
        self.channel.setEnabled(not on)
        self.update_layers()

    def _toggle_play(self, on: bool) -> None:
        self.play_btn.setText("⏸ Pause" if on else "▶ Play")
        if on:
            self._timer.start()
        else:
            self._timer.stop()

    def _advance(self) -> None:
        n = self.slider.maximum() + 1
        self.slider.setValue((self.slider.value() + 1) % n)

    # ------------------------------------------------------------------ glimpse steps
    def proposal(self) -> np.ndarray | None:
        """``(K, 2)`` x, y of the landmarks layer (NaN where a landmark has no point)."""
        det = self.det
        if det is None or det.points_layer is None:
            return None
        return layer_positions(det.points_layer, len(det.landmark_names))

    def _request(self) -> tuple[tuple, np.ndarray] | None:
        """The key of the steps the glimpse view shows now, and the start they need (``None`` when
        the chosen landmark has no point)."""
        pos, k, mean = self.proposal(), self.landmark_combo.currentIndex(), self.origin.currentData() == MEAN
        if pos is None or k < 0 or not (mean or np.isfinite(pos[k]).all()):
            return None
        traj = self.traj
        facing = traj.facing if traj is not None else "auto"
        if mean and facing == "auto":
            facing = "right"  # one journey from the mean start, as the training images face
        spacing = float(traj.pixel_spacing) if traj is not None else None
        where = MEAN if mean else tuple(np.round(pos[k], 3))
        key = (k, self.steps.value(), self.state.model_key(), where, facing, spacing)
        return key, pos

    def truth(self) -> np.ndarray | None:
        """``(K, 2)`` x, y of the labels loaded for the detection's image (a Points layer with an
        ``index`` feature, e.g. a Kaggle CSV or an ISBI txt opened in napari, rows of this image
        where it has an ``image`` feature; NaN where none), or ``None`` without such a layer."""
        det = self.det
        if det is None:
            return None
        from napari.layers import Points

        own = {d.points_layer for d in self.state.detections.values()} | {det.points_layer, *self.layers.values()}
        names = {det.image_name, Path(det.image_name).stem}
        if det.image_path is not None:
            names |= {det.image_path.name, det.image_path.stem}
        n = len(det.landmark_names)
        for layer in self.viewer.layers:
            feats = getattr(layer, "features", None)
            if not isinstance(layer, Points) or layer in own or feats is None or "index" not in feats:
                continue
            rows = np.ones(len(layer.data), bool)
            if "image" in feats:
                rows = np.array([Path(str(v)).name in names or Path(str(v)).stem in names for v in feats["image"]])
            if not rows.any():
                continue
            out = np.full((n, 2), np.nan)
            idx = np.asarray(feats["index"])[rows].astype(int) - 1
            ok = (idx >= 0) & (idx < n)
            out[idx[ok]] = np.asarray(layer.data)[rows][ok][:, -2:][:, ::-1]
            return out
        return None

    def truth_error_mm(self, traj: Any, t: int) -> tuple[float, float] | None:
        """(error to the truth after step ``t + 1``, at the start) in mm, or ``None`` without labels."""
        truth = self.truth()
        k = self.landmark_combo.currentIndex()
        if truth is None or not np.isfinite(truth[k]).all():
            return None
        err = np.hypot(*(traj.positions[[t + 1, 0], 0] - truth[k]).T) * traj.pixel_spacing
        return float(err[0]), float(err[1])

    def glimpse_traj(self):
        """The glimpse steps of the chosen landmark from its current position (one-landmark
        Trajectory), or ``None`` while they are computed (or cannot be)."""
        req = self._request()
        return self._explored.get(req[0]) if req is not None else None

    def busy(self) -> bool:
        return self._worker is not None

    def _compute(self, key: tuple, pos: np.ndarray) -> None:
        """Compute the steps of ``key`` in a worker (one at a time: a request meanwhile waits)."""
        if self._worker is not None:
            self._again = True
            return
        k, steps, model_key, _, facing, spacing = key
        det = self.det
        pyr = self._pyramid[1] if self._pyramid is not None and self._pyramid[0] == model_key else None
        image = np.asarray(det.image_layer.data) if pyr is None and det.image_layer is not None else None
        if pyr is None and image is None:
            status(self.status_label, "no image to glimpse at: the detection's image layer is gone", error=True)
            return
        start = None if key[3] == MEAN else np.where(np.isfinite(pos), pos, 0.0)  # only row k is read
        worker = create_worker(_explore_job, self.state.get_model, model_key, image, pyr, k, start, steps, facing,
                               spacing, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda res: self._on_explored(key, det, res))
        worker.errored.connect(lambda exc: self._on_explore_error(key, exc))
        worker.finished.connect(self._on_explore_finished)
        self._worker = worker
        status(self.status_label, f"computing {steps} glimpse step(s) of {det.landmark_names[k]} from "
                                  f"{'the mean start' if start is None else 'the proposal'}…")
        worker.start()

    def _on_explored(self, key: tuple, det: Detection, res: tuple) -> None:
        pyr, traj = res
        if det is not self.det:
            return  # another image meanwhile
        if pyr is not None:
            self._pyramid = (key[2], pyr)
        if len(self._explored) > 64:
            self._explored.clear()
        self._explored[key] = traj
        n_levels = traj.glimpses.shape[2]
        self._updating = True
        try:
            if self.max_level.maximum() != n_levels - 1:
                self.max_level.setRange(0, n_levels - 1)
                self.max_level.setValue(n_levels - 1)
                self.hm_level.setRange(0, n_levels - 1)
            self.channel.setRange(0, traj.heatmaps.shape[3] - 1)
        finally:
            self._updating = False
        status(self.status_label, "")
        self.steps_ready.emit(traj)

    def _on_explore_error(self, key: tuple, exc: BaseException) -> None:
        self._failed = key
        status(self.status_label, error_text(exc), error=True)

    def _on_explore_finished(self) -> None:
        self._worker = None
        self._again = False
        self.update_layers()  # the steps just computed, or those asked for meanwhile

    def apply_steps(self) -> list:
        """Move the landmark to the estimate after the shown step: an edit of the landmarks layer,
        recorded in the corrections log (as a drag would be). Returns the log records made."""
        traj, det = self.glimpse_traj(), self.det
        if traj is None or det is None or det.points_layer not in self.viewer.layers:
            status(self.status_label, "nothing to apply: wait for the glimpse steps", error=True)
            return []
        k, t = self.landmark_combo.currentIndex(), self.slider.value()
        layer, new = det.points_layer, traj.positions[t + 1, 0]
        old = self.proposal()[k]
        rows = np.nonzero(np.asarray(layer.features["index"]) == k + 1)[0]
        data = np.array(layer.data, dtype=np.float64)
        data[rows[0], -2:] = new[::-1]
        layer.data = data  # an edit, not a quiet rewrite: a listening corrections widget logs it too
        recs: list = []
        log, image = self.state.log, det.image_path
        if log is not None and image is not None and log.state.has_proposal(image):
            try:
                recs = log.sync(image, layer_positions(layer, log.state.n_landmarks))  # what it did not log
            except GlimpseError as exc:
                status(self.status_label, error_text(exc), error=True)
                return []
            self.state.log_changed.emit()
            logged = "logged" if log.state.corrected(image) else "not logged"
        else:
            logged = "not logged: the image has no corrections log"
        mm = float(np.hypot(*(new - old))) * traj.pixel_spacing
        status(self.status_label, f"applied {t + 1} step(s) to {det.landmark_names[k]}: moved {mm:.1f} mm ({logged})")
        return recs

    # ------------------------------------------------------------------------ layers
    def _remove_layers(self) -> None:
        for layer in list(self.layers.values()):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.layers.clear()

    def _layer(self, key: str, factory):
        layer = self.layers.get(key)
        if layer is None or layer not in self.viewer.layers:
            layer = factory()
            self.layers[key] = layer
        return layer

    def current_channel(self) -> int:
        traj, t = self.glimpse_traj(), self.slider.value()
        if traj is None or traj.heatmaps is None:
            return 0
        if self.auto_channel.isChecked():
            c = ld.top_channels(traj, 0, t, self.hm_level.value(), 1)[0]
            self.channel.blockSignals(True)
            self.channel.setValue(c)
            self.channel.blockSignals(False)
            return c
        return self.channel.value()

    def tile_channels(self, first: int) -> list[int]:
        """The channels of the tile rows: ``first``, then the most peaked others."""
        traj, t, n = self.glimpse_traj(), self.slider.value(), self.n_rows.value()
        if traj is None or traj.heatmaps is None:
            return []
        others = [c for c in ld.top_channels(traj, 0, t, self.hm_level.value(), n + 1) if c != first]
        return [first] + others[: n - 1]

    def is_shown(self) -> bool:
        """Visible on screen (not closed, and not a hidden tab of tabified docks)."""
        return self.isVisible() and not self.visibleRegion().isEmpty()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().showEvent(event)
        dock = self.parent()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parent()
        if dock is not None and dock is not self._dock:  # tab switches only show in the dock's signal
            dock.visibilityChanged.connect(self._dock_visibility)
            self._dock = dock
        QTimer.singleShot(0, self.update_layers)

    def hideEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().hideEvent(event)
        self._hide_layers()

    def _dock_visibility(self, visible: bool) -> None:
        if visible:
            QTimer.singleShot(0, self.update_layers)
        else:
            self._hide_layers()

    def _hide_layers(self) -> None:
        self._timer.stop()
        self.play_btn.setChecked(False)
        for layer in self.layers.values():
            if layer in self.viewer.layers:
                layer.visible = False

    def _base(self) -> tuple[np.ndarray, np.ndarray]:
        """The image layer's (scale, translate): the overlays sit in its world frame."""
        img_layer = self.det.image_layer
        base_scale = np.asarray(img_layer.scale)[-2:] if img_layer is not None else np.ones(2)
        base_tr = np.asarray(img_layer.translate)[-2:] if img_layer is not None else np.zeros(2)
        return base_scale, base_tr

    def _place(self, layer: Any, scale: Any = (1.0, 1.0), translate: Any = (0.0, 0.0)) -> None:
        """Put ``layer`` at (scale, translate) in image pixels, in the image layer's world frame."""
        base_scale, base_tr = self._base()
        layer.scale = tuple(np.asarray(scale, dtype=np.float64) * base_scale)
        layer.translate = tuple(np.asarray(translate, dtype=np.float64) * base_scale + base_tr)

    def _show_image(self, rgba: np.ndarray | None, placement: tuple = ((1.0, 1.0), (0.0, 0.0)),
                    opacity: float = 1.0) -> None:
        """The explorer's one image layer: ``rgba`` at ``placement`` (hidden when ``None``)."""
        if rgba is None:
            if "image" in self.layers and self.layers["image"] in self.viewer.layers:
                self.layers["image"].visible = False
            return
        layer = self._layer("image", lambda: self.viewer.add_image(rgba, rgb=True, name=LAYER_NAMES["image"],
                                                                   blending="translucent"))
        layer.data = rgba
        self._place(layer, *placement)
        layer.opacity = opacity
        layer.visible = True

    def _show_shapes(self, items: list[tuple[np.ndarray, str, str, str, float]]) -> None:
        """The explorer's one Shapes layer: ``(data, type, edge colour, face colour, edge width)`` each."""
        layer = self._layer("shapes", lambda: self.viewer.add_shapes(None, ndim=2, name=LAYER_NAMES["shapes"]))
        layer.selected_data = set()
        layer.data = []
        if items:
            data, types, edges, faces, widths = (list(v) for v in zip(*items))
            layer.add(data, shape_type=types, edge_color=edges, face_color=faces, edge_width=widths)
        self._place(layer)
        layer.visible = True

    def _show_points(self, pts: np.ndarray, colors: list[str], size: float) -> None:
        """The explorer's one Points layer (no text: software GL and text-labelled points do not mix)."""
        layer = self._layer("points", lambda: self.viewer.add_points(
            pts, name=LAYER_NAMES["points"], size=size, canvas_size_limits=(7, 11), face_color=colors,
            border_color="black", border_width=0.15))
        layer.selected_data = set()
        layer.data = pts
        layer.size = size
        layer.face_color = colors
        self._place(layer)
        layer.visible = True

    def _arrange(self, active: Any) -> None:
        """The patches under the landmarks, outlines, arrows and markers over them; the layer
        selection as it was before any layer was added."""
        v = self.viewer
        lm = self.det.points_layer if self.det is not None else None
        img = self.layers.get("image")
        if lm in v.layers and img in v.layers and v.layers.index(img) > v.layers.index(lm):
            v.layers.move(v.layers.index(img), v.layers.index(lm))
        for key in ("shapes", "points"):
            layer = self.layers.get(key)
            if layer in v.layers and v.layers.index(layer) != len(v.layers) - 1:
                v.layers.move(v.layers.index(layer), len(v.layers))
        if active is not None and active in v.layers and v.layers.selection.active is not active:
            v.layers.selection.active = active  # adding layers must not steal the selection

    def update_layers(self) -> None:
        """Draw landmark ``k``'s fine look or glimpse step ``t`` over the image and in the tiles
        (when shown); in the glimpse view, ask for the steps first when they are not there."""
        if self._updating or self.det is None or self.landmark_combo.currentIndex() < 0:
            return
        view = self.view()
        if not self.available()[view] or not self.is_shown():
            return  # drawn when shown
        if view == STAGES:
            self._draw_stages()
            return
        req = self._request()
        if req is None:
            self._hide_layers()
            self._no_tiles(f"{self.det.landmark_names[self.landmark_combo.currentIndex()]} has no point: place it "
                           "to explore its glimpse steps")
        elif req[0] == self._failed:
            self._hide_layers()
            self._no_tiles("the glimpse steps could not be computed (see below)")
        elif req[0] not in self._explored:
            self._no_tiles("computing the glimpse steps from the proposal…")
            self._compute(*req)
        else:
            self._draw_glimpses(self._explored[req[0]])
        self.apply_btn.setEnabled(req is not None and req[0] in self._explored)

    def _no_tiles(self, text: str) -> None:
        self.tiles.setPixmap(QPixmap())
        self.tiles.setText(text)
        self.info.setText("")

    def _draw_stages(self) -> None:
        """The coarse answer, fine look ``s``'s answer and move, its windows' outlines and heatmap."""
        traj, v = self.traj, self.viewer
        k, s = self.landmark_combo.currentIndex(), self.slider.value()
        active = v.layers.selection.active
        n_ctx = traj.fine_windows.shape[2]
        colors = [LEVEL_COLORS[(traj.fine_level + c) % len(LEVEL_COLORS)] for c in range(n_ctx)]
        boxes = [ld.fine_window_box(traj, k, s, c) for c in range(n_ctx)]
        items = [(b, "rectangle", colors[c], "transparent", _outline_width(b)) for c, b in enumerate(boxes)]
        items += _arrow_items(ld.stage_vector(traj, k, s))
        self._show_shapes(items)
        hm = ld.heat_rgba(ld.stretch(traj.fine_heatmaps[s, k])) if self.hm_check.isChecked() else None
        self._show_image(hm, ld.fine_heatmap_placement(traj, k, s), opacity=0.8)
        pts, feats = ld.stage_points(traj, k, s)
        self._show_points(pts, feats["color"], 6)
        self._arrange(active)
        self._show_strip(ld.fine_tile_strip(traj, k, s))
        self.iter_label.setText(f"{s + 1}/{traj.fine_looks}")
        self.info.setText(ld.fine_look_caption(traj, k, s))

    def _draw_glimpses(self, traj: Any) -> None:
        """Glimpse step ``t`` of the explored landmark: its patches, outlines, heatmap, path and step."""
        t, v = self.slider.value(), self.viewer
        top = self.max_level.value()
        active = v.layers.selection.active
        hm_on = self.hm_check.isChecked() and traj.heatmaps is not None
        ch, hl = self.current_channel(), self.hm_level.value()
        heat = ld.stretch(traj.heatmaps[t, 0, hl, ch]) if hm_on else None
        rgba, scale, tr = ld.glimpse_overlay(traj, 0, t, top, heat, hl)
        self._show_image(rgba, (scale, tr))
        path = ld.trajectory_path(traj, 0, t)
        items = [(box, "rectangle", LEVEL_COLORS[lv % len(LEVEL_COLORS)], "transparent", _outline_width(box))
                 for lv, box in enumerate(ld.glimpse_boxes(traj, 0, t, top))]
        items.append((path, "path", "cyan", "transparent", 1.5))
        items += _arrow_items(ld.offset_vector(traj, 0, t))
        truth = self.truth()
        k = self.landmark_combo.currentIndex()
        pts, colors = path, ["cyan"] * len(path)
        if truth is not None and np.isfinite(truth[k]).all():  # the labels loaded: where it should get to
            items.append((np.array([path[-1], truth[k][::-1]]), "line", TRUTH_COLOR, "transparent", 1.0))
            pts, colors = np.vstack([path, truth[k][::-1]]), colors + [TRUTH_COLOR]
        self._show_shapes(items)
        self._show_points(pts, colors, 4)
        self._arrange(active)
        self._show_strip(ld.tile_strip(traj, 0, t, self.tile_channels(ch) if hm_on else []))
        step = traj.positions[t + 1, 0] - traj.positions[t, 0]
        total = traj.positions[t + 1, 0] - traj.positions[0, 0]
        c = traj.positions[t, 0]
        self.iter_label.setText(f"{t + 1}/{traj.iterations}")
        err = self.truth_error_mm(traj, t)
        origin = "mean start" if self.origin.currentData() == MEAN else "proposal"
        self.info.setText(
            (f"From the {origin}" + (f"; error to the truth {err[1]:.1f} → {err[0]:.1f} mm" if err else "")
             + (f". {gate_note(self.traj)}" if gate_note(self.traj) else "") + "<br>")
            + f"<b>{traj.landmark_names[0]}</b> step {t + 1}: glimpse at ({c[0]:.0f}, {c[1]:.0f}) px, step "
            f"({step[0]:+.0f}, {step[1]:+.0f}) px = {np.hypot(*step) * traj.pixel_spacing:.1f} mm"
            + (f"; heatmap: level {hl}, channel {ch}" if hm_on else "")
            + f"<br>Apply would move the proposal {np.hypot(*total) * traj.pixel_spacing:.1f} mm")

    def _show_strip(self, strip: np.ndarray) -> None:
        h, w, _ = strip.shape
        strip = np.ascontiguousarray(strip)
        qimg = QImage(strip.data, w, h, 3 * w, QImage.Format_RGB888).copy()
        room = self.tiles_scroll.viewport().width() - 8
        target = max(w, min(2 * w, room))
        self.tiles.setPixmap(QPixmap.fromImage(qimg).scaledToWidth(target, Qt.FastTransformation))

    def focus(self, level: int = 3, context: int | None = None) -> None:
        """Centre the view on the current glimpse, zoomed so level ``level``'s square fills it; in
        the stage view on the fine look, zoomed so context level ``context``'s window (default the
        widest) fills it."""
        if self.det is None or self.landmark_combo.currentIndex() < 0:
            return
        k, t = self.landmark_combo.currentIndex(), self.slider.value()
        if self.view() == STAGES and ld.has_stages(self.traj):
            traj = self.traj
            c = traj.stage_positions[t: t + 2, k].mean(0)
            ctx = traj.fine_windows.shape[2] - 1 if context is None else context
            side = float(ld.fine_window_side(traj, ctx).max())
        else:
            traj, pos = self.glimpse_traj(), self.proposal()
            c = traj.positions[t, 0] if traj is not None else (pos[k] if pos is not None else None)
            if c is None or not np.isfinite(c).all():
                return
            side = 64 * 2**level / (min(traj.model_scale) if traj is not None else 1.0)
        base_scale, base_tr = self._base()
        cam = camera_of(self.viewer)
        cam.center = tuple(np.asarray(c[::-1], dtype=np.float64) * base_scale + base_tr)
        cam.zoom = max(min(_canvas_hw(self.viewer)), 100) / (side * float(base_scale[0]) * 1.15)

    # ------------------------------------------------------------------------ export
    def _browse_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export glimpse animation", "glimpse.gif",
                                              "GIF (*.gif);;MP4 (*.mp4)")
        if path:
            self.export(path)

    def _frame_traj(self) -> tuple[Any, int]:
        """The trajectory the frames show and the landmark's index in it."""
        k = self.landmark_combo.currentIndex()
        if self.view() == STAGES:
            return self.traj, k
        traj = self.glimpse_traj()
        if traj is None:
            raise ValueError("the glimpse steps are still being computed: export again in a moment"
                             if self._request() is not None else "this landmark has no point to explore from")
        return traj, 0

    def _frame_labels(self, traj: Any, k: int, t: int, frame: np.ndarray, source: str) -> tuple[list[str], float, list]:
        """Title lines, frame pixels per mm and legend of frame ``t``."""
        stages = self.view() == STAGES
        image = self.det.image_name if self.det is not None else ""
        lines = (ld.stage_caption if stages else ld.glimpse_caption)(traj, k, t, image)
        err, truth_key = None, []
        if not stages:
            if self.origin.currentData() == MEAN:
                lines = [lines[0], lines[1].replace("from the proposal", "from the mean start")]
            err = self.truth_error_mm(traj, t)
            if err is not None:
                lines = lines + [f"error to the truth: {err[0]:.1f} mm (at the start {err[1]:.1f} mm)"]
                truth_key = [("truth (labels loaded)", (0, 255, 0))]
        heat = self.hm_check.isChecked()
        if stages:
            levels = [traj.fine_level + c for c in range(traj.fine_windows.shape[2])]
        else:
            levels = list(range(self.max_level.value() + 1))
        legend = ld.explorer_legend(self.view(), source, levels, heat) + (truth_key if not stages and err else [])
        if source == "tiles":
            px = (float(traj.fine_window_scale[0][0]) if stages else 1.0 / float(traj.model_scale[0]))
            per_mm = TILE_UPSCALE / (px * traj.pixel_spacing)  # the finest (first) tile's pixels
            lines = lines + ["tiles: finest level left, each next one 2x wider; scale bar: the first tile"]
        else:
            h, w = _canvas_hw(self.viewer)
            base_scale, _ = self._base()
            per_mm = camera_of(self.viewer).zoom * float(base_scale[1]) / traj.pixel_spacing * frame.shape[1] / w
        return lines, per_mm, legend

    def frames(self, source: str = "canvas", labels: bool = True) -> list[np.ndarray]:
        """One RGB frame per glimpse step (per fine look in the stage view): the viewer canvas
        (``canvas``) or the tile strip (``tiles``, each pixel 2 x 2); with ``labels`` each framed by
        its title (landmark, step, image), a scale bar and the colours' legend (the titles are kept
        in :attr:`last_captions`)."""
        if self.det is None:
            raise ValueError("nothing to export: run Detect first")
        if not self.available()[self.view()] or self.landmark_combo.currentIndex() < 0:
            raise ValueError("nothing to export: this detection has no landmarks to explore"
                             if not any(self.available().values()) else "nothing to export in this view")
        traj, k = self._frame_traj()
        keep, out, self.last_captions = self.slider.value(), [], []
        try:
            for t in range(self.slider.maximum() + 1):
                self.slider.setValue(t)
                self.update_layers()
                if source == "tiles":
                    f = (ld.fine_tile_strip(traj, k, t) if self.view() == STAGES else
                         ld.tile_strip(traj, k, t, self.tile_channels(self.current_channel())))
                    f = np.repeat(np.repeat(f, TILE_UPSCALE, axis=0), TILE_UPSCALE, axis=1)
                else:
                    QApplication.processEvents()
                    f = np.asarray(self.viewer.screenshot(canvas_only=True, flash=False))[..., :3]
                if labels:
                    lines, per_mm, legend = self._frame_labels(traj, k, t, f, source)
                    self.last_captions.append(lines)
                    f = ld.label_frame(f, lines, per_mm, legend)
                out.append(f)
        finally:
            self.slider.setValue(keep)
        return ld.same_size(out)

    def export(self, path: str | Path, fps: float | None = None, source: str = "canvas",
               labels: bool = True) -> Path | None:
        """Write the steps (fine looks) of the current landmark as an animated GIF or MP4."""
        try:
            frames = self.frames(source, labels)
            out = ld.write_animation(frames, path, fps or self.fps.value(), hold_last=2)
        except (ValueError, RuntimeError, OSError) as exc:
            status(self.status_label, error_text(exc), error=True)
            return None
        status(self.status_label, f"wrote {out} ({len(frames)} frames)")
        return out
