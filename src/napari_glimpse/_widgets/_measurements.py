"""Measurements widget: the 8 ISBI clinical measurements of the current landmarks, live.

Follows the current detection's landmarks layer (the shared state's ``detection_changed``; or,
with no detection, the selected Points layer holding 19 ISBI landmarks) and recomputes when its
points move. napari (0.9) blocks a Points layer's ``data`` events while a point is dragged (one
``changing`` at the start, ``changed`` at the release); every step of the drag refreshes the
layer, which emits ``set_data``: the widget listens to both, so the table follows the point
during the drag, not only at the release. Per measurement:
value, class, normal range, out-of-range rows highlighted, and, where the layer carries the
model's per-landmark uncertainty, the 90 % range of the value over each point's likely positions
(points moved by hand count as certain). Optionally draws the lines of the measurements on the
image (a Vectors layer), and exports the landmarks with their measurements. The numbers come
from :mod:`napari_glimpse.measurements` (docs/measurements.md).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..landmarks import ISBI_LANDMARKS, ISBI_PIXEL_SPACING_MM
from ..measurements import MEASUREMENTS, NORMS, TABLE_COLUMNS, classify, classify_batch, measure_batch, table_rows
from ._state import Detection, error_text, layer_positions, real_viewer, scroll_body, state_for, status

K = 19
OVERLAY_NAME = "measurement lines"
# (from, to) landmark indices (0-based) and colour of each line drawn
LINES = (
    ((0, 1), "white"), ((1, 4), "orange"), ((1, 5), "cyan"), ((3, 2), "yellow"), ((16, 17), "aquamarine"),
    ((9, 7), "red"), ((4, 5), "red"), ((1, 6), "lime"), ((9, 8), "violet"), ((0, 9), "lightsteelblue"),
    ((1, 7), "lightsteelblue"), ((11, 10), "magenta"),
)
COLUMNS = ("measure", "value", "class", "normal", "likely (90 %)")
OUT_OF_RANGE = QColor(120, 40, 40)
UNSURE = QColor(255, 170, 60)
N_SAMPLES = 256
LINES_EVERY_MS = 30  # the overlay follows a drag at most this often (a Vectors update costs ~15 ms)


def likely_ranges(pos: np.ndarray, sigma_px: np.ndarray, spacing: float, seed: int = 0) -> np.ndarray:
    """``(8, 2)`` 5th and 95th percentiles of each measurement when every landmark moves by a
    Gaussian of ``sigma_px`` (per axis, ``(19,)``) around ``pos`` (``(19, 2)``); NaN where undefined."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((N_SAMPLES, K, 2)) * np.nan_to_num(sigma_px)[None, :, None]
    vals = measure_batch(pos[None] + noise, spacing)
    with warnings.catch_warnings():  # all-NaN columns (a landmark missing) give NaN quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(vals, [5, 95], axis=0).T


class MeasurementsWidget(QWidget):
    """The 8 measurements of the current landmarks, updated while a point is dragged."""

    updated = Signal()  # after every recomputation

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = real_viewer(napari_viewer)
        self.state = state_for(self.viewer)
        self.layer = None
        self.det: Detection | None = None
        self.values = np.full(8, np.nan)
        self.classes = np.zeros(8, dtype=int)
        self.ranges = np.full((8, 2), np.nan)
        self.last_update_s = 0.0
        self._origin: np.ndarray | None = None
        self._last_pos: np.ndarray | None = None
        self._lines_keep: np.ndarray | None = None
        self._lines_timer = QTimer(self)
        self._lines_timer.setSingleShot(True)
        self._lines_timer.setInterval(LINES_EVERY_MS)
        self._lines_timer.timeout.connect(lambda: self._draw_lines(self.positions()))

        self.info = QLabel("no landmarks yet: detect, or open a landmarks file")
        self.info.setWordWrap(True)
        self.table = QTableWidget(len(MEASUREMENTS), len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        for i, name in enumerate(MEASUREMENTS):
            self.table.setItem(i, 0, QTableWidgetItem(name))
            for j in range(1, len(COLUMNS)):
                self.table.setItem(i, j, QTableWidgetItem(""))
            self.table.item(i, 3).setText(NORMS[name].range_text())
        self.lines_box = QCheckBox("Draw the lines on the image")
        self.lines_box.toggled.connect(self._toggle_lines)
        self.export_btn = QPushButton("Export landmarks + measurements…")
        self.export_btn.clicked.connect(self._browse_export)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        lay = scroll_body(self)
        lay.addWidget(self.info)
        lay.addWidget(self.table, 1)
        hint = QLabel("red rows: outside the normal range; an orange range: the class may change within "
                      "the landmarks' uncertainty")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        lay.addWidget(self.lines_box)
        lay.addWidget(self.export_btn)
        lay.addWidget(self.status_label)

        self.state.detection_changed.connect(self._on_detection)
        self.viewer.layers.selection.events.active.connect(self._on_active)
        if self.state.current is not None:
            self._on_detection(self.state.current)
        else:
            self._on_active()
        if self.layer is None:
            self.recompute()

    # ------------------------------------------------------------------------ binding
    def _on_detection(self, det: Detection | None) -> None:
        self.det = det
        # the measurements read the ISBI 19: the landmarks of another set (annotated from zero, a model of
        # that set) are not them, even where their numbers are
        self.other_set = det is not None and bool(det.landmark_names) and tuple(det.landmark_names) != ISBI_LANDMARKS
        self.bind(det.points_layer if det is not None and not self.other_set else None)

    def _on_active(self, event=None) -> None:
        """With no detection, follow the selected Points layer if it holds 19 ISBI landmarks."""
        if self.det is not None:
            return
        layer = self.viewer.layers.selection.active
        if layer is not None and layer is not self.layer and _is_landmarks(layer):
            self.bind(layer)

    def bind(self, layer: Any) -> None:
        """Follow ``layer``'s data events (unhooking the previous layer)."""
        if self.layer is not None:
            for emitter in (self.layer.events.data, self.layer.events.set_data):
                try:
                    emitter.disconnect(self._on_data)
                except (TypeError, ValueError, RuntimeError):
                    pass
        self.layer = layer
        self._origin = None
        if layer is not None:
            layer.events.data.connect(self._on_data)
            layer.events.set_data.connect(self._on_data)  # every step of a drag
            self._origin = layer_positions(layer, K)
        self.recompute()

    def spacing(self) -> float:
        md = getattr(self.layer, "metadata", None) or {}
        sp = md.get("pixel_spacing")
        return float(sp) if sp else ISBI_PIXEL_SPACING_MM

    def image_name(self) -> str:
        if self.det is not None:
            return self.det.image_name
        md = getattr(self.layer, "metadata", None) or {}
        return Path(md["image_path"]).name if md.get("image_path") else str(getattr(self.layer, "name", "image"))

    # ------------------------------------------------------------------------ updates
    def _on_data(self, event=None) -> None:
        if self.layer is not None and np.array_equal(self.positions(), self._last_pos, equal_nan=True):
            return  # a refresh that moved nothing (slicing, colours)
        self.recompute()

    def positions(self) -> np.ndarray:
        return layer_positions(self.layer, K) if self.layer is not None else np.full((K, 2), np.nan)

    def _sigma_px(self, pos: np.ndarray) -> np.ndarray:
        """Per-axis standard deviation (pixels) of each landmark: the layer's ``uncertainty_mm``
        (taken as radial) over sqrt(2); 0 for points moved by hand since the layer was bound."""
        sigma = np.zeros(K)
        feats = getattr(self.layer, "features", None)
        if feats is None or "uncertainty_mm" not in feats or "index" not in feats:
            return sigma
        for idx, u in zip(np.asarray(feats["index"]), np.asarray(feats["uncertainty_mm"], dtype=float)):
            if 1 <= int(idx) <= K and np.isfinite(u):
                sigma[int(idx) - 1] = u / self.spacing() / np.sqrt(2)
        if self._origin is not None:
            moved = np.linalg.norm(pos - self._origin, axis=1) > 0.5
            sigma[moved] = 0.0  # NaN (missing) compares False
        return sigma

    def recompute(self) -> None:
        t = time.perf_counter()
        pos, sp = self.positions(), self.spacing()
        self._last_pos = pos
        self.values = measure_batch(pos, sp)[0]
        self.classes = classify_batch(self.values)[0]
        sigma = self._sigma_px(pos)
        self.ranges = likely_ranges(pos, sigma, sp) if sigma.any() else np.full((8, 2), np.nan)
        self.ranges[self.ranges[:, 1] - self.ranges[:, 0] < 1e-9] = np.nan  # not moved by the uncertain points
        self._show()
        if self.lines_box.isChecked() and not self._lines_timer.isActive():
            self._lines_timer.start()  # the table first; the lines at the next timer tick
        self.last_update_s = time.perf_counter() - t
        self.updated.emit()

    def _show(self) -> None:
        if self.layer is None and getattr(self, "other_set", False):
            self.info.setText(f"{self.det.image_name}: its landmarks are not the ISBI 19 the measurements read "
                              f"({len(self.det.landmark_names)}: {', '.join(self.det.landmark_names[:3])}...)")
        elif self.layer is None:
            self.info.setText("no landmarks yet: detect, or open a landmarks file")
        else:
            missing = int(np.isnan(self.positions()).any(axis=1).sum())
            self.info.setText(f"{self.image_name()}: {self.spacing():g} mm/px"
                              + (f"; {missing} landmark(s) missing" if missing else ""))
        for i, name in enumerate(MEASUREMENTS):
            v, k, norm = self.values[i], int(self.classes[i]), NORMS[name]
            self.table.item(i, 1).setText("—" if np.isnan(v) else f"{v:.{3 if name == 'FHI' else 1}f}")
            self.table.item(i, 2).setText(f"{k}: {norm.labels[k]}" if k else "not measurable")
            lo, hi = self.ranges[i]
            rng = self.table.item(i, 4)
            if np.isnan(lo):
                rng.setText("")
                rng.setForeground(QBrush())
            else:
                fmt = ".3f" if name == "FHI" else ".1f"
                rng.setText(f"{lo:{fmt}} – {hi:{fmt}}")
                unsure = classify(name, lo) != classify(name, hi)
                rng.setForeground(QBrush(UNSURE) if unsure else QBrush())
            bg = QBrush(OUT_OF_RANGE) if k not in (0, 1) else QBrush()
            for j in range(4):
                self.table.item(i, j).setBackground(bg)

    # ------------------------------------------------------------------------ overlay
    def _toggle_lines(self, on: bool) -> None:
        if on:
            self._draw_lines(self.positions())
        elif OVERLAY_NAME in self.viewer.layers:
            self.viewer.layers.remove(OVERLAY_NAME)

    def _draw_lines(self, pos: np.ndarray) -> None:
        yx = pos[:, ::-1]
        vec = np.array([[yx[a], yx[b] - yx[a]] for (a, b), _ in LINES])
        keep = np.isfinite(vec).all(axis=(1, 2))
        colours = [c for (_, c), ok in zip(LINES, keep) if ok]
        if not self.lines_box.isChecked():
            return
        if OVERLAY_NAME in self.viewer.layers:
            lines = self.viewer.layers[OVERLAY_NAME]
            lines.data = vec[keep]
            if not np.array_equal(keep, self._lines_keep):  # colours cost ~4 ms: set them when lines come or go
                lines.edge_color = colours
            self._lines_keep = keep
            return
        current = self.viewer.layers.selection.active
        self._lines_keep = keep
        self.viewer.add_vectors(vec[keep], name=OVERLAY_NAME, edge_color=colours, edge_width=4, length=1.0,
                                vector_style="line", opacity=0.8)
        if current is not None:  # keep the landmarks layer selected, so its points stay draggable
            self.viewer.layers.selection.active = current

    # ------------------------------------------------------------------------ export
    def export(self, path: str | Path) -> tuple[Path, Path]:
        """Write the landmarks (Kaggle layout) to ``path`` and their measurements to
        ``<stem>_measures.csv`` beside it (as ``predict --measures``); returns both paths."""
        from ..io import write_landmarks_csv, write_table_csv

        if self.layer is None:
            raise ValueError("no landmarks to export")
        path = Path(path)
        pos, name = self.positions(), self.image_name()
        write_landmarks_csv(path, [name], pos[None])
        mpath = path.with_name(path.stem + "_measures.csv")
        write_table_csv(mpath, TABLE_COLUMNS, table_rows([name], pos[None], self.spacing()))
        return path, mpath

    def _browse_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export landmarks and measurements", "landmarks.csv",
                                              "CSV (*.csv)")
        if not path:
            return
        try:
            a, b = self.export(path)
        except (OSError, ValueError) as exc:
            status(self.status_label, error_text(exc), error=True)
            return
        status(self.status_label, f"wrote {a.name} and {b.name}")


def _is_landmarks(layer: Any) -> bool:
    """A Points layer with 19 points numbered by an ``index`` feature (our landmark layers)."""
    feats = getattr(layer, "features", None)
    return (type(layer).__name__ == "Points" and feats is not None and "index" in feats
            and len(layer.data) == K)
