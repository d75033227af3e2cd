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
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .._layer_data import STATE_LEGEND, abbreviations, landmark_content
from ..annotate import folder_set, is_from_zero, next_to_place
from ..corrections import DEFAULT_EXPORT_NAME, Correction
from ..errors import GlimpseError
from ..landmark_set import ISBI19
from ._state import (
    EDIT_ACTIONS,
    NUDGE,
    NUDGE_FAST,
    SHORTCUTS,
    Detection,
    camera_of,
    error_text,
    focus_landmark,
    layer_positions,
    log_states,
    real_viewer,
    restyle,
    scroll_body,
    set_layer_content,
    state_for,
    status,
    status_label,
)


def _describe(rec: Correction) -> str:
    a = rec.action
    if a == "propose" and rec.model is None and rec.new is not None and not np.isfinite(rec.new).any():
        return f"#{rec.seq} annotating from zero (no model)"
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
    if a == "absent":
        return f"#{rec.seq} marked {what} absent"
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
        log_box = self._build_log_box()
        pick, ur = self._build_edit_controls()
        self._build_review_controls()
        self._build_layout(log_box, pick, ur)
        self._connect_state()

    def _build_log_box(self) -> QGroupBox:
        log_box = QGroupBox("Corrections log")
        lv = QVBoxLayout(log_box)
        self.log_label = QLabel("opened with the first detection (in the image folder)")
        self.log_label.setWordWrap(True)
        choose = QPushButton("Log file…")
        choose.setToolTip("Choose where corrections are logged (a .jsonl file)")
        choose.clicked.connect(self._browse_log)
        lv.addWidget(self.log_label)
        lv.addWidget(choose)
        return log_box

    def _build_edit_controls(self) -> tuple[QHBoxLayout, QHBoxLayout]:
        """The image label, undo/redo and the landmark picker with Mark absent."""
        self.image_label = QLabel("no landmarks layer yet: run Detect")
        self.image_label.setWordWrap(True)
        self.zero_btn = QPushButton("Annotate from zero")
        self.zero_btn.setToolTip("This image has no landmarks: log it without points and place them by clicking "
                                 "(the landmark set: the Annotate widget's, else the folder's landmarks.json, "
                                 "else the ISBI 19)")
        self.zero_btn.clicked.connect(lambda: self.annotate_from_zero())
        self.zero_btn.setVisible(False)

        self.undo_btn = QPushButton("Undo")
        self.undo_btn.setToolTip("Revert the last edit of this image")
        self.undo_btn.clicked.connect(lambda: self.undo())
        self.redo_btn = QPushButton("Redo")
        self.redo_btn.setToolTip("Re-apply the last undone edit")
        self.redo_btn.clicked.connect(lambda: self.redo())
        ur = QHBoxLayout()
        ur.addWidget(self.undo_btn)
        ur.addWidget(self.redo_btn)

        self.picker = QComboBox()
        self.picker.setToolTip("The landmark a point you add becomes (add mode: P or 2, then click). "
                               "Follows the selected landmark.")
        self.picker.currentIndexChanged.connect(lambda _i: self._set_defaults())
        self.absent_btn = QPushButton("Mark absent")
        self.absent_btn.setToolTip("The picked landmark is not visible on this image (Shift-X): no point, "
                                   "and the image can still be accepted and exported")
        self.absent_btn.clicked.connect(lambda: self.mark_absent())
        pick = QHBoxLayout()
        pick.addWidget(QLabel("Landmark"))
        pick.addWidget(self.picker, 1)
        pick.addWidget(self.absent_btn)
        return pick, ur

    def _build_review_controls(self) -> None:
        """Next least confident, accept, export, the history and the status line."""
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
        self.status_label = status_label()

    def _build_layout(self, log_box: QGroupBox, pick: QHBoxLayout, ur: QHBoxLayout) -> None:
        lay = scroll_body(self)
        lay.addWidget(log_box)
        lay.addWidget(self.image_label)
        lay.addWidget(self.zero_btn)
        lay.addLayout(pick)
        lay.addLayout(ur)
        lay.addWidget(self.next_btn)
        lay.addWidget(self.queue_label)
        lay.addWidget(self.accept_btn)
        lay.addWidget(self.export_btn)
        lay.addWidget(QLabel("History"))
        lay.addWidget(self.history, 1)
        lay.addWidget(self.status_label)
        keys = QLabel("<br>".join(f"<b>{k}</b>: {what}" for k, _a, what in SHORTCUTS)
                      + f"<br><b>arrow keys</b>: move the selected point 1 pixel (Shift: {NUDGE_FAST})"
                      + "<br>" + "<br>".join(f"<i>{s}</i>: {t}" for s, t in STATE_LEGEND))
        keys.setWordWrap(True)
        keys.setToolTip("Keys work with the mouse over the viewer")
        lay.addWidget(keys)

    def _connect_state(self) -> None:
        """Register the review's shortcuts and follow the shared state's detection and log."""
        for _key, action, _what in SHORTCUTS:
            if action not in ("next_image", "previous_image"):
                self.state.register_action(action, self.mark_absent if action == "absent" else getattr(self, action))

        self.state.detection_changed.connect(self.bind)
        self.state.log_changed.connect(self._refresh)
        self.state.landmark_selected.connect(self.pick)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.bind(self.state.current)

    def _layer_removed(self, _event: Any = None) -> None:
        """The bound image's landmarks or image layer deleted: nothing on screen to review or accept."""
        det = self.det
        layers = self.viewer.layers
        if det is not None and ((self.layer is not None and self.layer not in layers)
                                or (det.image_layer is not None and det.image_layer not in layers)):
            self.bind(None)
            status(self.status_label, f"{det.image_name}: its layers were removed; detect again to review it")

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
        if det is None or self.det is None or det.image_path != self.det.image_path:
            status(self.status_label, "")  # the last image's message does not carry over
        self.det = det
        self.layer = det.points_layer if det is not None else None
        self._last_k = None
        self._fill_picker()
        log = self.state.log
        if self.layer is not None and log is not None and self.image is not None and log.state.missing(self.image):
            self.pick(log.state.missing(self.image)[0])
        if self.layer is not None:
            self.layer.events.data.connect(self._on_data)
            self._bind_nudge(self.layer)
            self._set_defaults()
            log = self.state.log
            if log is not None and self.image is not None and log.state.has_proposal(self.image):
                self._sync()  # catch up edits made while no widget was listening
        self._refresh()

    def _bind_nudge(self, layer) -> None:
        """Arrow keys move the selected point(s) of ``layer`` (Shift: further), each press logged as
        a move (the layer's own keys: they work while it is the active layer)."""
        for key, (dx, dy) in NUDGE.items():
            for mod, step in (("", 1), ("Shift-", NUDGE_FAST)):
                def nudge(ly, dx=dx * step, dy=dy * step) -> None:
                    sel = sorted(ly.selected_data)
                    if not sel or ly is not self.layer:
                        return
                    data = np.array(ly.data, dtype=float)
                    data[sel] += (dy, dx)  # napari's (row, column)
                    ly.data = data
                    ly.selected_data = set(sel)
                layer.bind_key(mod + key, nudge, overwrite=True)

    def _fill_picker(self) -> None:
        names = self._names()
        items = [f"{k + 1}. {n} ({a})" for k, (n, a) in enumerate(zip(names, abbreviations(names)))]
        if [self.picker.itemText(i) for i in range(self.picker.count())] != items:
            self.picker.blockSignals(True)
            self.picker.clear()
            self.picker.addItems(items)
            self.picker.blockSignals(False)

    def pick(self, k: int) -> None:
        """Choose landmark ``k`` (0-based) for the next added point (and for Mark absent)."""
        if 0 <= k < self.picker.count():
            self.picker.setCurrentIndex(k)

    def _names(self) -> tuple[str, ...]:
        if self.state.log is not None:
            return self.state.log.state.landmark_names
        return tuple(self.det.landmark_names) if self.det is not None else ()

    # ------------------------------------------------------------------------ events
    def _on_data(self, event) -> None:
        if self.state.is_quiet or str(getattr(event, "action", "changed")) not in EDIT_ACTIONS:
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
        if log is not None and image is not None and not self.state.log_covers(image):
            log = self.state.ensure_log(image, self._names())  # never into another folder's log (a namesake)
        if log is None or layer is None or image is None or not log.state.has_proposal(image):
            if layer is not None and image is None:
                status(self.status_label, "this image has no file: edits are not logged", error=True)
            return []
        K = log.state.n_landmarks
        self._drop_replaced(layer)
        try:
            recs = log.sync(image, layer_positions(layer, K))
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)
            recs = []
        n_valid = int(np.isfinite(layer_positions(layer, K)).all(axis=1).sum())
        if n_valid != len(layer.data):
            status(self.status_label, "pick a landmark first (every landmark is placed): the extra point was "
                   "dropped", error=True)
        for rec in recs:
            if rec.action == "delete" and rec.k is not None:
                self.pick(rec.k)  # a deleted landmark is the one a new point most likely places again
            elif rec.action == "add" and rec.k is not None:  # annotating: on to the next landmark to place
                nxt = next_to_place(log.state.missing(image), rec.k, K)
                if nxt is not None:
                    self.pick(nxt)
                if is_from_zero(log, image):
                    self._show_to_place()
        if recs or n_valid != len(layer.data):
            self.render()  # extra points dropped, edited points restyled (cross), labels re-placed
        if recs:
            status(self.status_label, "logged: " + "; ".join(_describe(r) for r in recs))
            self.recorded.emit(recs)
        if any(r.action == "add" for r in recs):
            QTimer.singleShot(0, self._after_add)
        self._refresh()
        return recs

    def _after_add(self) -> None:
        """After napari added a point: it selects it, and a selected point's features become the layer's
        defaults; in add mode the next click is for the picked landmark, so unselect and set them again."""
        layer = self.layer
        if layer is not None and layer.mode == "add" and layer.selected_data:
            with self.state.quiet():
                layer.selected_data = set()
        self._set_defaults()

    def _drop_replaced(self, layer: Any) -> None:
        """A point added for a landmark that already has one replaces it (the newest wins)."""
        idx = np.asarray(layer.features.get("index", []))
        if len(idx) < 2:
            return
        last = {int(v): r for r, v in enumerate(idx)}
        old = [r for r, v in enumerate(idx) if last.get(int(v)) != r]
        if old:
            with self.state.quiet():
                layer.selected_data = set(old)
                layer.remove_selected()

    def _set_defaults(self) -> None:
        """New points become the picked landmark (or the first missing one if none is picked)."""
        layer = self.layer
        names = self._names()
        if layer is None or not names:
            return
        present = set(int(i) for i in np.asarray(layer.features.get("index", [])))
        missing = [k for k in range(len(names)) if k + 1 not in present]
        k = self.picker.currentIndex() if self.picker.currentIndex() >= 0 else (missing[0] if missing else None)
        abbr = abbreviations(names)[k] if k is not None else ""
        defaults = {
            "landmark": names[k] if k is not None else "",
            "abbr": abbr,
            "index": (k + 1) if k is not None else 0,
            "confidence": np.nan,
            "uncertainty_mm": np.nan,
            "state": "corrected",
            "label": abbr + "*",
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
        shape = tuple(np.shape(self.det.image_layer.data)[:2]) if self.det is not None else (2400, 1935)
        content = landmark_content(st.positions(image), st.landmark_names, st.confidence(image), unc,
                                   log_states(log, image, st.n_landmarks), shape)
        if len(layer.data) == len(content["data"]) and np.allclose(layer.data, content["data"]):
            restyle(self.state, layer, content)  # same points: keep the selection, restyle only
        else:
            set_layer_content(self.state, layer, content)
        self._set_defaults()
        self.state.log_changed.emit()

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
        self.render()
        self.recorded.emit([rec])
        self._refresh()
        return rec

    def mark_absent(self, k: int | None = None) -> Correction | None:
        """Mark landmark ``k`` (default: the selected point's, else the picked one) absent."""
        log, image = self.state.log, self.image
        if log is None or image is None or not log.state.has_proposal(image):
            status(self.status_label, "nothing to mark: detect an image from a file first", error=True)
            return None
        if k is None:
            k = self._selected_k()
        if k is None:
            k = self.picker.currentIndex()
        self._sync()
        rec = log.mark_absent(image, k)
        name = log.state.landmark_names[k]
        status(self.status_label, f"{name} marked absent" if rec is not None else f"{name} was already absent")
        if rec is not None:
            self.render()
            self.recorded.emit([rec])
        self._refresh()
        return rec

    def _selected_k(self) -> int | None:
        layer = self.layer
        if layer is None or len(layer.selected_data) != 1 or "index" not in layer.features:
            return None
        return int(np.asarray(layer.features["index"])[next(iter(layer.selected_data))]) - 1

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

    def _to_place(self, step: int) -> int | None:
        """Annotating from zero: pick the next (``step`` 1) or previous (-1) landmark still to place."""
        log, image = self.state.log, self.image
        if not is_from_zero(log, image):
            return None
        k = next_to_place(log.state.missing(image), self.picker.currentIndex(), log.state.n_landmarks, step)
        if k is not None:
            self.pick(k)
        self._show_to_place()
        return k

    def _show_to_place(self) -> None:
        log, image = self.state.log, self.image
        left = len(log.state.missing(image)) if log is not None and image is not None else 0
        k = self.picker.currentIndex()
        self.queue_label.setText(f"→ place {self.picker.currentText()}: {left} left to place" if left and k >= 0 else
                                 "every landmark placed: accept the image (Shift-Enter)" if left == 0 else "")

    def annotate_from_zero(self) -> Detection | None:
        """The current image has no landmarks: start annotating it from zero (the Annotate widget's set,
        else the folder's, else the ISBI 19)."""
        from ._annotate import start_annotation

        det = self.det
        if det is None or det.image_path is None:
            status(self.status_label, "open an image from a file first", error=True)
            return None
        lset = self.state.landmark_set
        try:
            if lset is None and folder_set(det.image_path.parent) is None:
                lset = ISBI19
            return start_annotation(self.state, det, lset)
        except (GlimpseError, OSError) as exc:
            status(self.status_label, error_text(exc), error=True)
            return None

    def previous_landmark(self) -> int | None:
        """Select and centre the landmark before the current one in review order (least confident first)."""
        log, image = self.state.log, self.image
        if log is None or image is None or not log.state.has_proposal(image):
            return None
        if self._to_place(-1) is not None:
            return self.picker.currentIndex()
        order = [k for k in log.state._order(image) if k not in log.state.absent(image)]
        cur = self._last_k if self._last_k in order else None
        k = order[(order.index(cur) - 1) % len(order)] if cur is not None else order[-1]
        return self._go_to(k)

    def _go_to(self, k: int) -> int:
        self._last_k = k
        zoom = max(camera_of(self.viewer).zoom, 1.0) if self.viewer is not None and self.layer is not None else None
        focus_landmark(self.state, k, zoom)
        self.pick(k)
        st = self.state.log.state if self.state.log is not None else None
        if st is not None and self.image is not None:
            conf = st.confidence(self.image)
            c = f"confidence {conf[k]:.2f}, " if conf is not None and np.isfinite(conf[k]) else ""
            left = len(st.review_queue(self.image))
            self.queue_label.setText(f"→ {st.landmark_names[k]} ({abbreviations(st.landmark_names)[k]}): "
                                     f"{c}{left} left to review")
        return k

    def next_landmark(self) -> int | None:
        """Select and centre the least confident landmark not yet reviewed (after the last one)."""
        log, image = self.state.log, self.image
        if log is None or image is None or not log.state.has_proposal(image):
            return None
        if self._to_place(+1) is not None:
            return self.picker.currentIndex()
        st = log.state
        k = st.next_to_review(image, after=self._last_k)
        if k is None and self._last_k is not None:
            k = st.next_to_review(image)  # wrap around
        if k is None:
            self.queue_label.setText("nothing left to review on this image: accept it")
            return None
        return self._go_to(k)

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
        self.log_label.setText(str(log.path) if log is not None
                               else "opened with the first detection (in the image folder)")
        ok = log is not None and image is not None and log.state.has_proposal(image)
        for b in (self.accept_btn, self.next_btn, self.absent_btn):
            b.setEnabled(ok)
        self.undo_btn.setEnabled(ok and log.state.can_undo(image))
        self.redo_btn.setEnabled(ok and log.state.can_redo(image))
        self.export_btn.setEnabled(log is not None and bool(log.state.accepted()))
        self.history.clear()
        self.zero_btn.setVisible(self.det is not None and self.det.image_path is not None and self.layer is None)
        if not ok:
            self.image_label.setText("no landmarks layer yet: run Detect" if self.det is None else
                                     f"{self.det.image_name}: no landmarks: Detect, or annotate from zero"
                                     if self.layer is None else f"{self.det.image_name}: not in the corrections log")
            return
        st = log.state
        if is_from_zero(log, image):
            bits = [f"<b>{image.name}</b>", "from zero", f"{st.n_landmarks - len(st.missing(image))} placed"]
        else:
            bits = [f"<b>{image.name}</b>", f"model {st.model(image) or '?'}", f"{len(st.corrected(image))} corrected",
                    f"{len(st.review_queue(image))} to review"]
        if st.missing(image):
            bits.append(f"{len(st.missing(image))} missing")
        if st.absent(image):
            bits.append(f"{len(st.absent(image))} absent")
        bits.append("<span style='color:#5fd35f'>accepted ✓</span>" if st.is_accepted(image) else "not accepted")
        self.image_label.setText(" · ".join(bits))
        recs = [r for r in log.records if r.image == image.name][-12:]
        for r in reversed(recs):
            self.history.addItem(_describe(r))
