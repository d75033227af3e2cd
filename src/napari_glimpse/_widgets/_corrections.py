"""Corrections widget: log every edit of the landmarks layer, undo/redo, accept, export, queue.

Hooks the data events of the current landmarks Points layer: a drag, an added or a deleted
point is written to the corrections log (:mod:`napari_glimpse.corrections`) as soon as it is
made (a drag once the mouse button is released, not at every mouse move). Undo/redo replay
the log and redraw the layer from it, so the layer always shows what the log holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QApplication,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .._layer_data import abbreviations, landmark_content
from ..corrections import DEFAULT_EXPORT_NAME, Correction
from ..errors import GlimpseError
from ._detect import focus_landmark
from ._state import (
    Detection,
    camera_of,
    error_text,
    layer_positions,
    real_viewer,
    set_layer_content,
    state_for,
    status,
)

_EDIT_ACTIONS = ("changed", "added", "removed")


def _describe(rec: Correction) -> str:
    a = rec.action
    if a == "propose":
        return f"#{rec.seq} proposal by {rec.model or '?'}"
    if a in ("accept", "unaccept"):
        return f"#{rec.seq} {a}ed"
    what = f"{rec.name or ''} ({rec.landmark})"
    if a == "move" and rec.old is not None and rec.new is not None:
        d = float(np.hypot(*(rec.new - rec.old)))
        return f"#{rec.seq} moved {what} by {d:.1f} px"
    if a in ("undo", "redo"):
        return f"#{rec.seq} {a} of #{rec.undoes or rec.redoes} {what}"
    return f"#{rec.seq} {a}d {what}" if a == "delete" else f"#{rec.seq} {a}ed {what}"


class CorrectionsWidget(QWidget):
    """Review the current image: log edits, undo/redo, accept, export, next least confident."""

    recorded = Signal(list)  # the Correction records just appended

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # napari hands each widget its own proxy
        self.state = state_for(self.viewer)
        self.layer = None
        self.det: Detection | None = None
        self._pending = False
        self._last_k: int | None = None
        self._poll = QTimer(self)
        self._poll.setInterval(50)
        self._poll.timeout.connect(self._poll_release)

        log_box = QGroupBox("Corrections log")
        lv = QVBoxLayout(log_box)
        self.log_label = QLabel("opened with the first detection (in the image folder)")
        self.log_label.setWordWrap(True)
        choose = QPushButton("Log file…")
        choose.setToolTip("Choose where corrections are logged (a .jsonl file)")
        choose.clicked.connect(self._browse_log)
        lv.addWidget(self.log_label)
        lv.addWidget(choose)

        self.image_label = QLabel("no landmarks layer yet: run Detect")
        self.image_label.setWordWrap(True)

        self.undo_btn = QPushButton("Undo")
        self.undo_btn.setToolTip("Revert the last edit of this image")
        self.undo_btn.clicked.connect(lambda: self.undo())
        self.redo_btn = QPushButton("Redo")
        self.redo_btn.setToolTip("Re-apply the last undone edit")
        self.redo_btn.clicked.connect(lambda: self.redo())
        ur = QHBoxLayout()
        ur.addWidget(self.undo_btn)
        ur.addWidget(self.redo_btn)

        self.next_btn = QPushButton("Next least confident")
        self.next_btn.setToolTip("Jump to the least confident landmark not yet reviewed")
        self.next_btn.clicked.connect(lambda: self.next_landmark())
        self.queue_label = QLabel("")
        self.queue_label.setWordWrap(True)

        self.accept_btn = QPushButton("Accept image (reviewed)")
        self.accept_btn.setToolTip("Mark this image's landmarks as reviewed: it joins the training export")
        self.accept_btn.clicked.connect(lambda: self.accept())
        self.export_btn = QPushButton("Export reviewed…")
        self.export_btn.setToolTip("Write every accepted image as a training CSV (Kaggle layout)")
        self.export_btn.clicked.connect(self._browse_export)

        self.history = QListWidget()
        self.history.setToolTip("This image's records in the log, newest first")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        lay = QVBoxLayout(self)
        lay.addWidget(log_box)
        lay.addWidget(self.image_label)
        lay.addLayout(ur)
        lay.addWidget(self.next_btn)
        lay.addWidget(self.queue_label)
        lay.addWidget(self.accept_btn)
        lay.addWidget(self.export_btn)
        lay.addWidget(QLabel("History"))
        lay.addWidget(self.history, 1)
        lay.addWidget(self.status_label)

        self.state.detection_changed.connect(self.bind)
        self.state.log_changed.connect(self._refresh)
        self.bind(self.state.current)

    # ------------------------------------------------------------------------ binding
    @property
    def image(self) -> Path | None:
        return self.det.image_path if self.det is not None else None

    def bind(self, det: Detection | None) -> None:
        """Follow ``det``'s landmarks layer (unhooking the previous one)."""
        if self.layer is not None:
            try:
                self.layer.events.data.disconnect(self._on_data)
            except (TypeError, ValueError, RuntimeError):
                pass
        self.det = det
        self.layer = det.points_layer if det is not None else None
        self._last_k = None
        if self.layer is not None:
            self.layer.events.data.connect(self._on_data)
            self._set_defaults()
            log = self.state.log
            if log is not None and self.image is not None and log.state.has_proposal(self.image):
                self._sync()  # catch up edits made while no widget was listening
        self._refresh()

    def _names(self) -> tuple[str, ...]:
        if self.state.log is not None:
            return self.state.log.state.landmark_names
        return tuple(self.det.landmark_names) if self.det is not None else ()

    # ------------------------------------------------------------------------ events
    def _on_data(self, event) -> None:
        if self.state.is_quiet or str(getattr(event, "action", "changed")) not in _EDIT_ACTIONS:
            return
        if QApplication.mouseButtons() != Qt.NoButton:  # a drag in progress: log at release
            self._pending = True
            if not self._poll.isActive():
                self._poll.start()
            return
        self._sync()

    def _poll_release(self) -> None:
        if QApplication.mouseButtons() == Qt.NoButton:
            self._poll.stop()
            if self._pending:
                self._pending = False
                self._sync()

    def _sync(self) -> list[Correction]:
        """Log the differences between the layer and the log; redraw if the layer is off."""
        log, layer, image = self.state.log, self.layer, self.image
        if log is None or layer is None or image is None or not log.state.has_proposal(image):
            if layer is not None and image is None:
                status(self.status_label, "this image has no file: edits are not logged", error=True)
            return []
        K = log.state.n_landmarks
        try:
            recs = log.sync(image, layer_positions(layer, K))
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)
            recs = []
        n_valid = int(np.isfinite(layer_positions(layer, K)).all(axis=1).sum())
        if n_valid != len(layer.data) or any(r.action == "add" for r in recs):
            if n_valid != len(layer.data):
                status(self.status_label, "every landmark is placed: drag one instead of adding a point", error=True)
            self.render()  # extra points dropped, added points restyled
        else:
            self._set_defaults()
        if recs:
            status(self.status_label, "logged: " + "; ".join(_describe(r) for r in recs))
            self.recorded.emit(recs)
        self._refresh()
        return recs

    def _set_defaults(self) -> None:
        """New points become the first missing landmark (index 0 = none missing)."""
        layer = self.layer
        names = self._names()
        if layer is None or not names:
            return
        present = set(int(i) for i in np.asarray(layer.features.get("index", [])))
        missing = [k for k in range(len(names)) if k + 1 not in present]
        k = missing[0] if missing else None
        defaults = {
            "landmark": names[k] if k is not None else "",
            "abbr": abbreviations(names)[k] if k is not None else "",
            "index": (k + 1) if k is not None else 0,
            "confidence": np.nan,
            "uncertainty_mm": np.nan,
        }
        with self.state.quiet():
            try:
                layer.feature_defaults = defaults
            except (ValueError, KeyError):
                pass

    # ------------------------------------------------------------------------ actions
    def render(self) -> None:
        """Redraw the landmarks layer from the log's current positions of this image."""
        log, layer, image = self.state.log, self.layer, self.image
        if log is None or layer is None or image is None:
            return
        st = log.state
        traj = self.det.trajectory if self.det is not None else None
        unc = traj.uncertainty_mm if traj is not None and len(traj.uncertainty_mm) == st.n_landmarks else None
        set_layer_content(self.state, layer, landmark_content(st.positions(image), st.landmark_names,
                                                              st.confidence(image), unc))
        self._set_defaults()

    def undo(self) -> Correction | None:
        return self._undo_redo("undo")

    def redo(self) -> Correction | None:
        return self._undo_redo("redo")

    def _undo_redo(self, which: str) -> Correction | None:
        log, image = self.state.log, self.image
        if log is None or image is None:
            return None
        rec = log.undo(image) if which == "undo" else log.redo(image)
        if rec is None:
            status(self.status_label, f"nothing to {which}")
        else:
            self.render()
            status(self.status_label, _describe(rec))
            self.recorded.emit([rec])
        self._refresh()
        return rec

    def accept(self) -> Correction | None:
        """Mark the image reviewed (after logging any pending edit)."""
        log, image = self.state.log, self.image
        if log is None or image is None:
            status(self.status_label, "nothing to accept: detect an image from a file first", error=True)
            return None
        self._sync()
        try:
            rec = log.accept(image)
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)
            return None
        status(self.status_label, f"{image.name} accepted ({len(log.state.accepted())} reviewed image(s))")
        self.recorded.emit([rec])
        self._refresh()
        return rec

    def default_export_path(self) -> Path | None:
        log = self.state.log
        return log.path.parent / DEFAULT_EXPORT_NAME if log is not None else None

    def _browse_export(self) -> None:
        start = str(self.default_export_path() or "")
        path, _ = QFileDialog.getSaveFileName(self, "Export reviewed landmarks", start, "CSV (*.csv)")
        if path:
            self.export(path)

    def export(self, path: str | Path | None = None) -> Path | None:
        """Write the accepted images as a training CSV; tells the fine-tune widget."""
        log = self.state.log
        if log is None:
            status(self.status_label, "no corrections log open", error=True)
            return None
        try:
            out = log.export_training_csv(path if path is not None else self.default_export_path())
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)
            return None
        status(self.status_label, f"wrote {out} ({len(log.state.accepted())} image(s))")
        self.state.export_written.emit(str(out))
        return out

    def next_landmark(self) -> int | None:
        """Select and centre the least confident landmark not yet reviewed (after the last one)."""
        log, image = self.state.log, self.image
        if log is None or image is None or not log.state.has_proposal(image):
            return None
        st = log.state
        k = st.next_to_review(image, after=self._last_k)
        if k is None and self._last_k is not None:
            k = st.next_to_review(image)  # wrap around
        if k is None:
            self.queue_label.setText("nothing left to review on this image: accept it")
            return None
        self._last_k = k
        zoom = None
        if self.viewer is not None and self.layer is not None:
            zoom = max(camera_of(self.viewer).zoom, 1.0)
        focus_landmark(self.state, k, zoom)
        conf = st.confidence(image)
        c = f"confidence {conf[k]:.2f}, " if conf is not None and np.isfinite(conf[k]) else ""
        left = len(st.review_queue(image))
        self.queue_label.setText(f"→ {st.landmark_names[k]} ({abbreviations(st.landmark_names)[k]}): {c}{left} left to review")
        return k

    # ------------------------------------------------------------------------ display
    def _browse_log(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Corrections log", "", "corrections log (*.jsonl)")
        if path:
            self.open_log(path)

    def open_log(self, path: str | Path, image_dir: str | Path | None = None) -> None:
        try:
            names = tuple(self.det.landmark_names) if self.det is not None and self.det.landmark_names else None
            self.state.open_log(path, image_dir if image_dir is not None else
                                (self.image.parent if self.image is not None else None), names)
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)

    def _refresh(self) -> None:
        log, image = self.state.log, self.image
        self.log_label.setText(str(log.path) if log is not None else "opened with the first detection (in the image folder)")
        ok = log is not None and image is not None and log.state.has_proposal(image)
        for b in (self.accept_btn, self.next_btn):
            b.setEnabled(ok)
        self.undo_btn.setEnabled(ok and log.state.can_undo(image))
        self.redo_btn.setEnabled(ok and log.state.can_redo(image))
        self.export_btn.setEnabled(log is not None and bool(log.state.accepted()))
        self.history.clear()
        if not ok:
            self.image_label.setText("no landmarks layer yet: run Detect" if self.det is None else
                                     f"{self.det.image_name}: not in the corrections log")
            return
        st = log.state
        bits = [f"<b>{image.name}</b>", f"model {st.model(image) or '?'}",
                f"{len(st.corrected(image))} corrected", f"{len(st.review_queue(image))} to review"]
        if st.missing(image):
            bits.append(f"{len(st.missing(image))} missing")
        bits.append("<span style='color:#5fd35f'>accepted ✓</span>" if st.is_accepted(image) else "not accepted")
        self.image_label.setText(" · ".join(bits))
        recs = [r for r in log.records if r.image == image.name][-12:]
        for r in reversed(recs):
            self.history.addItem(_describe(r))
