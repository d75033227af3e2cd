"""Glimpse explorer: what the model saw and did, stage by stage, for one landmark.

Two views. **Coarse → fine stages** (what the shipped model's answer is made of): the coarse
stage's answer, the fine stage's answer and the arrow between them, the outlines of the windows
the fine look read (one per context level, at true scale and position) and landmark ``k``'s fine
heatmap over the image; in the widget the windows side by side with the heatmap over them.
**Glimpse iterations** (when the detection ran any), over the image at true scale and position:
every pyramid level's patch as an image layer (level ``l`` covers ``64 * 2**l`` pixels centred on
the estimate) with its outline, the offset the model predicted as an arrow (Vectors), the
estimates so far (a path and points) and the softmax heatmap of a chosen trunk channel; in the
widget the patches side by side, with the heatmaps under them. A slider (with play) steps through
the fine looks or iterations; the animation exports to GIF/MP4. Everything drawn comes from the
detection's :class:`~napari_glimpse.inference.Trajectory`, prepared by :mod:`napari_glimpse._layer_data`.

The overlay layers exist only while the explorer is shown: hiding (or closing) the widget hides
them, so they do not cover the image while another widget is in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
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
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari.utils.colormaps import Colormap

from .. import _layer_data as ld
from ._state import Detection, camera_of, error_text, real_viewer, state_for, status

PREFIX = "glimpse"
LEVEL_COLORS = ["#ff5050", "#ff9f1c", "#ffe600", "#3ddc84", "#33b5ff", "#c77dff", "#ff70a6", "#ffffff"]


STAGES, GLIMPSES = "stages", "glimpses"
_VIEWS = ((STAGES, "Coarse → fine stages"), (GLIMPSES, "Glimpse iterations"))
_GLIMPSE_TIPS = ("Iteration: the glimpse seen and the step taken",
                 "Top: the patch of each level (finest left, red cross = the estimate); "
                 "below: softmax heatmaps, one channel per row")
_STAGE_TIPS = ("Fine look (usually one): the windows read and the move made",
               "Top: the fine windows of each context level (finest left; red cross = the coarse answer, "
               "where the look started; green = the fine answer); below: the same windows with this landmark's "
               "fine heatmap over the part the finest window covers")


class ExplorerWidget(QWidget):
    """Step through one landmark's coarse -> fine stages, or its glimpses, offsets, trajectory and heatmaps."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # napari hands each widget its own proxy
        self.state = state_for(self.viewer)
        self.det: Detection | None = None
        self.layers: dict[str, Any] = {}
        self._updating = False
        self._dock = None

        self.landmark_combo = QComboBox()
        self.landmark_combo.setToolTip("Landmark to explore")
        self.landmark_combo.currentIndexChanged.connect(lambda _: self.update_layers())
        self.view_combo = QComboBox()
        for key, text in _VIEWS:
            self.view_combo.addItem(text, key)
        self.view_combo.setToolTip("Coarse → fine: the stages that make the answer; glimpse iterations: the "
                                   "foveated glimpse network's steps after them (when the detection ran any)")
        self.view_combo.currentIndexChanged.connect(lambda _: self._view_changed())

        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.setToolTip("Iteration: the glimpse seen and the step taken")
        self.slider.valueChanged.connect(lambda _: self.update_layers())
        self.iter_label = QLabel("iteration –")
        self.play_btn = QPushButton("▶ Play")
        self.play_btn.setCheckable(True)
        self.play_btn.setToolTip("Cycle through the iterations")
        self.play_btn.toggled.connect(self._toggle_play)
        self._timer = QTimer(self)
        self._timer.setInterval(900)
        self._timer.timeout.connect(self._advance)
        srow = QHBoxLayout()
        srow.addWidget(self.slider, 1)
        srow.addWidget(self.iter_label)
        srow.addWidget(self.play_btn)

        self.max_level = QSpinBox()
        self.max_level.setRange(0, 0)
        self.max_level.setToolTip("Show the pyramid levels 0 … this one over the image")
        self.max_level.valueChanged.connect(lambda _: self.update_layers())
        self.hm_check = QCheckBox("heatmap")
        self.hm_check.setChecked(True)
        self.hm_check.setToolTip("Show the trunk's softmax map of one channel over the image")
        self.hm_check.toggled.connect(lambda _: self.update_layers())
        self.hm_level = QSpinBox()
        self.hm_level.setRange(0, 0)
        self.hm_level.setToolTip("Pyramid level of the heatmap shown over the image")
        self.hm_level.valueChanged.connect(lambda _: self.update_layers())
        self.channel = QSpinBox()
        self.channel.setRange(0, 0)
        self.channel.setToolTip("Trunk channel whose softmax heatmap is shown")
        self.channel.valueChanged.connect(lambda _: self.update_layers())
        self.auto_channel = QCheckBox("most peaked")
        self.auto_channel.setChecked(True)
        self.auto_channel.setToolTip("Pick the channel whose softmax is the most concentrated")
        self.auto_channel.toggled.connect(self._auto_toggled)

        self.n_rows = QSpinBox()
        self.n_rows.setRange(1, 8)
        self.n_rows.setValue(2)
        self.n_rows.setToolTip("Heatmap rows under the tiles: the chosen channel, then the next most peaked ones")
        self.n_rows.valueChanged.connect(lambda _: self.update_layers())

        form = QFormLayout()
        form.addRow("View", self.view_combo)
        form.addRow("Landmark", self.landmark_combo)
        self.step_name = QLabel("Iteration")
        form.addRow(self.step_name, srow)
        labels = [QLabel(t) for t in ("Levels up to", "level", "channel", "Heatmap rows")]
        form.addRow(labels[0], self.max_level)
        hrow = QHBoxLayout()
        hrow.addWidget(self.hm_check)
        hrow.addWidget(labels[1])
        hrow.addWidget(self.hm_level)
        hrow.addWidget(labels[2])
        hrow.addWidget(self.channel)
        hrow.addWidget(self.auto_channel)
        hrow.addStretch(1)
        form.addRow(hrow)
        form.addRow(labels[3], self.n_rows)
        # controls of the glimpse view only (hidden in the stage view)
        self._glimpse_controls = [*labels, self.max_level, self.hm_level, self.channel, self.auto_channel, self.n_rows]

        self.tiles = QLabel("run Detect, then pick a landmark")
        self.tiles.setAlignment(Qt.AlignCenter)
        self.tiles.setMinimumHeight(90)
        self.tiles.setToolTip(_GLIMPSE_TIPS[1])
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
        export.setToolTip("Write the iterations (or fine looks) as a GIF or MP4 (imageio)")
        export.clicked.connect(self._browse_export)
        erow = QHBoxLayout()
        erow.addWidget(focus)
        erow.addWidget(self.fps)
        erow.addWidget(export)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.tiles)
        lay.addWidget(self.info)
        lay.addLayout(erow)
        lay.addWidget(self.status_label)
        lay.addStretch(1)

        self.state.detection_changed.connect(self.set_detection)
        self.state.landmark_selected.connect(self.set_landmark)
        self.set_detection(self.state.current)

    # ------------------------------------------------------------------------ inputs
    @property
    def traj(self):
        return self.det.trajectory if self.det is not None else None

    def available(self) -> dict[str, bool]:
        """Which views the current detection can show."""
        traj = self.traj
        return {STAGES: ld.has_stages(traj),
                GLIMPSES: traj is not None and traj.glimpses is not None and traj.iterations > 0}

    def view(self) -> str:
        """The chosen view: ``stages`` or ``glimpses``."""
        return self.view_combo.currentData()

    def set_view(self, view: str) -> None:
        self.view_combo.setCurrentIndex(self.view_combo.findData(view))

    def set_detection(self, det: Detection | None) -> None:
        self.det = det
        traj = self.traj
        ok = self.available()
        self._updating = True
        try:
            self.landmark_combo.clear()
            for i in range(self.view_combo.count()):
                self.view_combo.model().item(i).setEnabled(ok[self.view_combo.itemData(i)])
            if not any(ok.values()):
                self._remove_layers()
                self.slider.setRange(0, 0)  # no stale steps for the play button or the export
                self.iter_label.setText("iteration –")
                self.tiles.setPixmap(QPixmap())
                self.tiles.setText("run Detect on this image to explore its stages and glimpses"
                                   if traj is None or traj.glimpses is None
                                   else "nothing to explore: this detection recorded no fine look and no glimpse steps")
                self.info.setText("")
                return
            if not ok[self.view()]:
                self.set_view(STAGES if ok[STAGES] else GLIMPSES)
            abbr = ld.abbreviations(traj.landmark_names)
            self.landmark_combo.addItems([f"{i + 1}. {n} ({a})" for i, (n, a) in enumerate(zip(traj.landmark_names, abbr))])
            if ok[GLIMPSES]:
                n_levels = traj.glimpses.shape[2]
                self.max_level.setRange(0, n_levels - 1)
                self.max_level.setValue(n_levels - 1)
                self.hm_level.setRange(0, n_levels - 1)
                if traj.heatmaps is not None:
                    self.channel.setRange(0, traj.heatmaps.shape[3] - 1)
            self._configure_view()
            self.slider.setValue(0)
            if self.state.selected_landmark is not None and self.state.selected_landmark < len(traj.landmark_names):
                self.landmark_combo.setCurrentIndex(self.state.selected_landmark)
        finally:
            self._updating = False
        self.update_layers()

    def _configure_view(self) -> None:
        """Slider range, labels and which controls apply, for the chosen view."""
        traj, stages = self.traj, self.view() == STAGES
        steps = (traj.fine_looks if stages else traj.iterations) if traj is not None else 1
        self.slider.setRange(0, max(0, steps - 1))
        self.step_name.setText("Fine look" if stages else "Iteration")
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

    # ------------------------------------------------------------------------ layers
    def _layer(self, key: str, factory):
        layer = self.layers.get(key)
        if layer is None or layer not in self.viewer.layers:
            layer = factory()
            self.layers[key] = layer
        return layer

    def _remove_layers(self) -> None:
        for layer in list(self.layers.values()):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.layers.clear()

    def current_channel(self) -> int:
        traj, k, t = self.traj, self.landmark_combo.currentIndex(), self.slider.value()
        if traj is None or traj.heatmaps is None:
            return 0
        if self.auto_channel.isChecked():
            c = ld.top_channels(traj, k, t, self.hm_level.value(), 1)[0]
            self.channel.blockSignals(True)
            self.channel.setValue(c)
            self.channel.blockSignals(False)
            return c
        return self.channel.value()

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

    def tile_channels(self, first: int) -> list[int]:
        """The channels of the tile rows: ``first``, then the most peaked others."""
        traj, k, t = self.traj, self.landmark_combo.currentIndex(), self.slider.value()
        n = self.n_rows.value()
        if traj is None or traj.heatmaps is None:
            return []
        others = [c for c in ld.top_channels(traj, k, t, self.hm_level.value(), n + 1) if c != first]
        return [first] + others[: n - 1]

    def _base(self) -> tuple[np.ndarray, np.ndarray]:
        """The image layer's (scale, translate): the overlays sit in its world frame."""
        img_layer = self.det.image_layer
        base_scale = np.asarray(img_layer.scale) if img_layer is not None else np.ones(2)
        base_tr = np.asarray(img_layer.translate) if img_layer is not None else np.zeros(2)
        return base_scale, base_tr

    def _hide_other_view(self, stages: bool) -> None:
        for key, layer in self.layers.items():
            if key.startswith("stage") != stages and layer in self.viewer.layers:
                layer.visible = False

    def _finish(self, active: Any) -> None:
        """Landmarks back on top, and the layer selection as it was before any layer was added."""
        v = self.viewer
        lm = self.det.points_layer
        if lm is not None and lm in v.layers and v.layers.index(lm) != len(v.layers) - 1:
            v.layers.move(v.layers.index(lm), len(v.layers))  # landmarks stay on top
        if active is not None and active in v.layers:
            v.layers.selection.active = active  # adding layers must not steal the selection

    def _heatmap(self, key: str, hm: np.ndarray | None, placement, **style) -> None:
        """Show ``hm`` (stretched to 0..1) over the image as layer ``key`` at ``placement()``'s
        (scale, translate) in image pixels, made with ``style`` the first time; hide it when ``hm``
        is None."""
        if hm is None:
            if key in self.layers and self.layers[key] in self.viewer.layers:
                self.layers[key].visible = False
            return
        base_scale, base_tr = self._base()
        scale, tr = placement()
        hml = self._layer(key, lambda: self.viewer.add_image(hm, contrast_limits=(0, 1), **style))
        hml.data = hm
        hml.scale = tuple(np.asarray(scale) * base_scale)
        hml.translate = tuple(np.asarray(tr) * base_scale + base_tr)
        hml.visible = True

    def update_layers(self) -> None:
        """Draw landmark ``k``'s fine look or glimpse iteration ``t`` over the image and in the tiles
        (when shown)."""
        traj = self.traj
        if self._updating or traj is None or self.landmark_combo.currentIndex() < 0:
            return
        view = self.view()
        if not self.available()[view]:
            return
        if not self.is_shown():
            return  # drawn when shown
        self._hide_other_view(view == STAGES)
        if view == STAGES:
            self._draw_stages()
        else:
            self._draw_glimpses()

    def _draw_stages(self) -> None:
        """The coarse answer, fine look ``s``'s answer and move, its windows' outlines and heatmap."""
        traj, v = self.traj, self.viewer
        k, s = self.landmark_combo.currentIndex(), self.slider.value()
        base_scale, base_tr = self._base()
        active = v.layers.selection.active
        n_ctx = traj.fine_windows.shape[2]
        colors = [LEVEL_COLORS[(traj.fine_level + c) % len(LEVEL_COLORS)] for c in range(n_ctx)]
        boxes = [ld.fine_window_box(traj, k, s, c) for c in range(n_ctx)]
        shp = self._layer("stage windows", lambda: v.add_shapes(
            boxes, shape_type="rectangle", name=f"{PREFIX} fine windows", edge_color=colors,
            face_color="transparent", edge_width=4, scale=tuple(base_scale), translate=tuple(base_tr)))
        shp.data = boxes  # keeps each outline's type and colour (always one per context level)
        shp.visible = True
        hm = ld.stretch(traj.fine_heatmaps[s, k]) if self.hm_check.isChecked() else None
        self._heatmap("stage heatmap", hm, lambda: ld.fine_heatmap_placement(traj, k, s),
                      name=f"{PREFIX} fine heatmap", colormap=Colormap(ld.HEAT_RGBA, name="glimpse fine heat"),
                      blending="translucent", opacity=0.8, gamma=0.5)  # gamma: the peak's tail too
        vec = ld.stage_vector(traj, k, s)
        arr = self._layer("stage arrow", lambda: v.add_vectors(
            vec, name=f"{PREFIX} coarse → fine", edge_color="#ff00ff", edge_width=6, opacity=1.0,
            vector_style="arrow", scale=tuple(base_scale), translate=tuple(base_tr)))
        arr.data = vec
        arr.visible = True
        pts, feats = ld.stage_points(traj, k, s)
        pl = self._layer("stage points", lambda: v.add_points(
            pts, name=f"{PREFIX} coarse / fine", size=6, canvas_size_limits=(8, 12), face_color=feats["color"],
            border_color="black", border_width=0.15, features=feats, scale=tuple(base_scale),
            translate=tuple(base_tr)))  # no text: the two points are often a few pixels apart
        pl.data = pts
        pl.features = feats
        pl.face_color = feats["color"]
        pl.visible = True
        self._finish(active)
        # widget side
        self._show_strip(ld.fine_tile_strip(traj, k, s))
        self.iter_label.setText(f"{s + 1}/{traj.fine_looks}")
        self.info.setText(ld.fine_look_caption(traj, k, s))

    def _draw_glimpses(self) -> None:
        """Glimpse iteration ``t``: every level's patch, outlines, heatmap, path and offset."""
        traj = self.traj
        k, t = self.landmark_combo.currentIndex(), self.slider.value()
        v = self.viewer
        base_scale, base_tr = self._base()
        center = traj.positions[t, k]
        n_levels, patch = traj.glimpses.shape[2], traj.patch
        top = self.max_level.value()
        active = v.layers.selection.active
        # coarse levels first (below), fine last (on top)
        for lv in reversed(range(n_levels)):
            scale, tr = ld.glimpse_placement(center, lv, patch)
            layer = self._layer(f"L{lv}", lambda lv=lv, scale=scale: v.add_image(
                traj.glimpses[t, k, lv], name=f"{PREFIX} L{lv} ({patch * 2 ** lv}px)", colormap="gray",
                contrast_limits=(0, 255), opacity=0.92, scale=tuple(np.asarray(scale) * base_scale)))
            layer.data = traj.glimpses[t, k, lv]
            layer.translate = tuple(np.asarray(tr) * base_scale + base_tr)
            layer.visible = lv <= top
        for key in ("boxes", "path", "estimates", "offset"):
            if key in self.layers:
                self.layers[key].visible = True
        boxes = [ld.glimpse_box(center, lv, patch) for lv in range(top + 1)]
        shp = self._layer("boxes", lambda: v.add_shapes(
            boxes, shape_type="rectangle", name=f"{PREFIX} outlines", edge_color=LEVEL_COLORS[: top + 1],
            face_color="transparent", edge_width=5, scale=tuple(base_scale), translate=tuple(base_tr)))
        if len(shp.data) == len(boxes):
            shp.data = boxes  # keeps each outline's type and colour
        else:
            shp.data = []
            shp.add_rectangles(boxes, edge_color=[LEVEL_COLORS[i % len(LEVEL_COLORS)] for i in range(len(boxes))],
                               face_color="transparent", edge_width=5)
        # heatmap
        hm_on = self.hm_check.isChecked() and traj.heatmaps is not None
        ch = self.current_channel()
        hl = self.hm_level.value()
        hm = ld.stretch(traj.heatmaps[t, k, hl, ch]) if hm_on else None
        self._heatmap("heatmap", hm, lambda: ld.heatmap_placement(center, hl, patch, hm.shape[-1]),
                      name=f"{PREFIX} heatmap", colormap="inferno", blending="additive", opacity=0.55)
        # trajectory and arrow
        path = ld.trajectory_path(traj, k, t)
        pth = self._layer("path", lambda: v.add_shapes(
            [path], shape_type="path", name=f"{PREFIX} path", edge_color="cyan", edge_width=4,
            scale=tuple(base_scale), translate=tuple(base_tr)))
        pth.data = [path]
        pts = self._layer("estimates", lambda: v.add_points(
            path, name=f"{PREFIX} estimates", size=14, face_color="cyan", border_color="black",
            scale=tuple(base_scale), translate=tuple(base_tr)))
        pts.data = path
        vec = ld.offset_vector(traj, k, t)
        arr = self._layer("offset", lambda: v.add_vectors(
            vec, name=f"{PREFIX} offset", edge_color="#ff00ff", edge_width=8, opacity=1.0,
            vector_style="arrow", scale=tuple(base_scale), translate=tuple(base_tr)))
        arr.data = vec
        self._finish(active)
        # widget side
        strip = ld.tile_strip(traj, k, t, self.tile_channels(ch) if hm_on else [])
        self._show_strip(strip)
        step = traj.positions[t + 1, k] - traj.positions[t, k]
        mm = float(np.hypot(*step)) * traj.pixel_spacing
        self.iter_label.setText(f"{t + 1}/{traj.iterations}")
        self.info.setText(
            f"<b>{traj.landmark_names[k]}</b> iteration {t + 1}: glimpse at "
            f"({center[0]:.0f}, {center[1]:.0f}) px, step ({step[0]:+.0f}, {step[1]:+.0f}) px = {mm:.1f} mm"
            + (f"; heatmap: level {self.hm_level.value()}, channel {ch}" if hm_on else "")
        )

    def _show_strip(self, strip: np.ndarray) -> None:
        h, w, _ = strip.shape
        strip = np.ascontiguousarray(strip)
        qimg = QImage(strip.data, w, h, 3 * w, QImage.Format_RGB888).copy()
        target = max(w, min(2 * w, max(self.tiles.width() - 8, w)))
        self.tiles.setPixmap(QPixmap.fromImage(qimg).scaledToWidth(target, Qt.FastTransformation))

    def focus(self, level: int = 3, context: int | None = None) -> None:
        """Centre the view on the current glimpse, zoomed so level ``level``'s square fills it; in
        the stage view on the fine look, zoomed so context level ``context``'s window (default the
        widest) fills it."""
        traj = self.traj
        if traj is None or self.landmark_combo.currentIndex() < 0:
            return
        k, t = self.landmark_combo.currentIndex(), self.slider.value()
        if self.view() == STAGES and ld.has_stages(traj):
            c = traj.stage_positions[t: t + 2, k].mean(0)
            ctx = traj.fine_windows.shape[2] - 1 if context is None else context
            side = float(ld.fine_window_side(traj, ctx).max())
        else:
            c = traj.positions[t, k]
            side = traj.patch * 2**level
        v = self.viewer
        cam = camera_of(v)
        cam.center = (float(c[1]), float(c[0]))
        size = min(getattr(v, "_canvas_size", (600, 600)))
        cam.zoom = max(size, 100) / (side * 1.15)

    # ------------------------------------------------------------------------ export
    def _browse_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export glimpse animation", "glimpse.gif", "GIF (*.gif);;MP4 (*.mp4)")
        if path:
            self.export(path)

    def frames(self, source: str = "canvas") -> list[np.ndarray]:
        """One RGB frame per iteration (per fine look in the stage view): the viewer canvas
        (``canvas``) or the tile strip (``tiles``)."""
        traj = self.traj
        if traj is None:
            raise ValueError("nothing to export: run Detect first")
        k = self.landmark_combo.currentIndex()
        if not self.available()[self.view()] or k < 0:
            # the slider would step through nothing: frames of the bare image, or no tiles at all
            raise ValueError("nothing to export: this detection recorded no fine look and no glimpse steps"
                             if not any(self.available().values()) else "nothing to export in this view")
        keep = self.slider.value()
        out = []
        try:
            for t in range(self.slider.maximum() + 1):
                self.slider.setValue(t)
                self.update_layers()
                if source == "tiles" and self.view() == STAGES:
                    out.append(ld.fine_tile_strip(traj, k, t))
                elif source == "tiles":
                    out.append(ld.tile_strip(traj, k, t, self.tile_channels(self.current_channel())))
                else:
                    QApplication.processEvents()
                    out.append(np.asarray(self.viewer.screenshot(canvas_only=True, flash=False)))
        finally:
            self.slider.setValue(keep)
        return out

    def export(self, path: str | Path, fps: float | None = None, source: str = "canvas") -> Path | None:
        """Write the iterations of the current landmark as an animated GIF or MP4."""
        try:
            frames = self.frames(source)
            out = ld.write_animation(frames, path, fps or self.fps.value(), hold_last=2)
        except (ValueError, RuntimeError, OSError) as exc:
            status(self.status_label, error_text(exc), error=True)
            return None
        status(self.status_label, f"wrote {out} ({len(frames)} frames)")
        return out
