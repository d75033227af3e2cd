"""Annotate widget: label a folder of images from zero, with a landmark set of your own.

Choose a landmark set (the built-in ISBI 19, a ``landmarks.json`` file, or a new one typed in: one
landmark a line, ``name, label``) and open a folder (no model needed): the set is saved as the
folder's ``landmarks.json`` (a folder that has one uses its own). Each image of the folder without
landmarks then enters the corrections log with none (:func:`napari_glimpse.annotate.start_from_zero`)
and gets an empty landmarks layer in add mode: the Review and corrections widget's picker says which
landmark a click places, and moves on to the next one to place after each click. The keys, the log,
accept and the export are the review's.

The form is magicgui; the set logic is :mod:`napari_glimpse.annotate` (no Qt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, Container, Label, LineEdit, PushButton, TextEdit
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QFileDialog, QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

from .._layer_data import landmarks_layer_from
from ..annotate import check_log_set, folder_set, is_from_zero, save_folder_set, set_from_text, set_to_text
from ..annotate import start_from_zero as log_from_zero
from ..errors import GlimpseError
from ..landmark_set import ISBI19, SET_FILE, LandmarkSet, load_landmark_set
from ._state import Detection, GlimpseState, error_text, log_states, real_viewer, state_for, status

DETECT = "Detect landmarks"
HELP = (
    "<b>Annotate from zero</b> (no model needed): 1. choose the landmark set: <i>ISBI 19</i>, <i>Load…</i> a "
    "landmarks.json, or <i>New set…</i> (one landmark a line: <tt>Sella, S</tt>; a folder with a landmarks.json "
    "uses its own). 2. <i>Open folder…</i>: the set is saved there as landmarks.json. 3. Click on the image: each "
    "click places the landmark picked in "
    "<i>Review and corrections</i>, which then moves on to the next one (<b>N</b> / <b>Shift-N</b>: next / "
    "previous landmark; add mode: <b>P</b> or <b>2</b>). 4. <b>Shift-Enter</b> accepts the image, "
    "<b>PageDown</b> goes to the next one. 5. <i>Export reviewed…</i> writes the CSV of the set, and "
    "<i>Train a model</i> trains one on it. Picture: docs/annotate.png (docs/landmark-sets.md, In napari)."
)


def start_annotation(state: GlimpseState, det: Detection, lset: LandmarkSet | None = None) -> Detection | None:
    """Annotate ``det``'s image from zero: log it without points (with the log's landmarks: the folder's
    set, else ``lset``) and give it an empty landmarks layer in add mode; it becomes the current
    detection. ``None`` when the image has no file. Raises :class:`GlimpseError` for a log of other
    landmarks."""
    path, viewer = det.image_path, state.viewer
    if path is None or viewer is None:
        return None
    log = state.log
    if log is None or log.image_dir.resolve() != path.parent.resolve():
        log = state.open_log(path.parent, path.parent)  # under its own names (a log of another set is refused
        # below, not read under lset's: with as many landmarks, its points would become other landmarks)
    if lset is not None:
        check_log_set(log, lset)  # no record of other landmarks (before landmarks.json is written)
        if folder_set(path.parent) != lset:
            save_folder_set(lset, path.parent)  # the set travels with the images (and the export beside them)
        if log.state.landmark_names != lset.names:  # an empty log opened for other landmarks
            log = state.open_log(log.path, log.image_dir, lset.names)
    log_from_zero(log, path)
    names = log.state.landmark_names
    shape = tuple(np.shape(det.image_layer.data)[:2])
    data, kw, _ = landmarks_layer_from(log.state.positions(path), names, log.state.confidence(path),
                                       image_shape=shape, name=f"{path.stem} landmarks", image_path=path,
                                       states=log_states(log, path, len(names)))
    layer = det.points_layer
    if layer is None or layer not in viewer.layers:  # else the image's empty layer (no removal: see
        # GlimpseState._hide_text_before_removal for what removing text-labelled layers risks)
        layer = viewer.add_points(data, **kw, scale=det.image_layer.scale, translate=det.image_layer.translate)
    layer.mode = "add"
    new = Detection(image_name=det.image_name, image_path=path, image_layer=det.image_layer, points_layer=layer,
                    trajectory=None, model_name="none", landmark_names=names, extra=dict(det.extra))
    state.log_changed.emit()
    state.set_current(new)
    viewer.layers.selection.active = layer
    return new


class AnnotateWidget(QWidget):
    """Choose or create a landmark set for a folder and annotate its images from zero."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # napari hands each widget its own proxy
        self.state = state_for(self.viewer)
        self.form = self._build_form()
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        help_label = QLabel(HELP)
        help_label.setWordWrap(True)
        inner = QWidget()  # in a scroll area: a short dock scrolls instead of squeezing the rows
        lay = QVBoxLayout(inner)
        lay.addWidget(self.form.native)
        lay.addWidget(self.editor.native)  # apart from the form: its rows do not grow
        lay.addWidget(self.annotate_form.native)
        lay.addWidget(self.status_label)
        lay.addWidget(help_label)
        lay.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setWidget(inner)
        scroll.setMinimumHeight(min(inner.sizeHint().height(), 400))  # the dock opens with room for the form
        scroll.setMinimumWidth(max(440, inner.minimumSizeHint().width()))
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.state.detection_changed.connect(self._on_detection)
        self.state.landmark_set_changed.connect(lambda _s: self._show_set())
        self.state.log_changed.connect(self._show_set)
        self._show_set()

    # ------------------------------------------------------------------------ the form
    def _build_form(self) -> Container:
        open_btn = PushButton(text="Open folder…", tooltip="A folder of images to annotate (shown in Detect landmarks; "
                                                            "PageDown / PageUp: next / previous image)")
        open_btn.changed.connect(self._browse_folder)
        self.folder_info = Label(value="no folder open", label="Folder")
        self.set_info = Label(value="none chosen", label="Landmark set")
        isbi = PushButton(text="ISBI 19", tooltip="The 19 landmarks of the ISBI 2015 challenge (built in)")
        isbi.changed.connect(lambda: self.use_set(ISBI19))
        load = PushButton(text="Load…", tooltip="A landmarks.json file (docs/landmark-sets.md)")
        load.changed.connect(self._browse_set)
        new = PushButton(text="New set…", tooltip="Type the landmarks of a new set")
        new.changed.connect(lambda: self._show_editor(True))
        choose = Container(widgets=[isbi, load, new], layout="horizontal", labels=False, label="Choose")
        choose.margins = (0, 0, 0, 0)
        self.set_name = LineEdit(value="", label="Set name", tooltip="e.g. lab4: models trained on it carry it")
        self.set_text = TextEdit(value="", label="Landmarks",
                                 tooltip="One landmark a line, in the order of the CSV columns: a name and an optional "
                                         "short label drawn on the image, e.g. 'Sella, S'")
        self.set_text.native.setPlaceholderText("Sella, S\nNasion, N\nMenton, Me\nGonion, Go")
        self.set_text.native.setMinimumHeight(95)  # four lines
        self.set_text.native.setMaximumHeight(140)
        save = PushButton(text="Save set",
                          tooltip=f"Use this set for the folder: saved as {SET_FILE} beside the images")
        save.changed.connect(lambda: self.create_set())
        self.editor = Container(widgets=[self.set_name, self.set_text, save], labels=True)
        self.editor.margins = (0, 0, 0, 0)
        self.editor.visible = False
        self.auto = CheckBox(text="Annotate each image without landmarks", value=True,
                             tooltip="An image of the folder that has no landmarks gets an empty landmarks layer in "
                                     "add mode (logged with no point): click to place the picked landmark")
        here = PushButton(text="Annotate this image", tooltip="Start annotating the current image from zero")
        here.changed.connect(lambda: self.annotate_current())
        # the Qt buttons, for scripts and tests that drive Qt
        self.open_btn, self.here_btn = open_btn.native, here.native
        self.new_btn, self.save_btn = new.native, save.native
        for label in (self.folder_info, self.set_info):  # long paths and sets wrap, not widen the dock
            label.native.setWordWrap(True)
        self.annotate_form = Container(widgets=[open_btn, self.folder_info, self.auto, here], labels=True)
        return Container(widgets=[self.set_info, choose], labels=True)  # the set first, then the folder

    def _show_editor(self, on: bool) -> None:
        lset = self.state.landmark_set
        if on and lset is not None and not self.set_text.value.strip() and lset is not ISBI19:
            self.set_name.value, self.set_text.value = lset.name, set_to_text(lset)
        self.editor.visible = on

    def _show_set(self) -> None:
        lset, folder = self.state.landmark_set, self.folder()
        self.folder_info.value = str(folder) if folder is not None else "no folder open"
        if lset is None:
            self.set_info.value = "none chosen"
            return
        labels = ", ".join(lset.labels[:8]) + (", …" if len(lset) > 8 else "")
        self.set_info.value = f"{lset.name}: {len(lset)} landmarks ({labels})"

    # ------------------------------------------------------------------------ folder and set
    def folder(self) -> Path | None:
        """The folder annotated: the open log's image folder, else the current image's."""
        if self.state.log is not None:
            return self.state.log.image_dir
        det = self.state.current
        return det.image_path.parent if det is not None and det.image_path is not None else None

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of images to annotate")
        if path:
            self.open_folder(path)

    def detect_widget(self) -> Any:
        """The Detect widget (docked if it is not yet): it shows the folder's images and moves along them."""
        _dock, widget = self.viewer.window.add_plugin_dock_widget("napari-glimpse", DETECT)
        return widget

    def open_folder(self, folder: str | Path, start: bool = True):
        """Open ``folder`` in the Detect widget; its set (``landmarks.json``) or the one chosen here is
        the folder's. Returns the Detect widget's worker for the first image."""
        folder = Path(folder)
        if (folder / "images").is_dir():
            folder = folder / "images"
        try:
            own = folder_set(folder)
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)
            return None
        chosen = self.state.landmark_set
        if own is None and chosen is None:  # else the shipped model would propose the ISBI 19 there
            status(self.status_label, f"{folder} has no {SET_FILE}: choose its landmark set first (ISBI 19, Load…, "
                                      f"New set…)", error=True)
            return None
        if own is None:
            try:
                save_folder_set(chosen, folder)  # before the log opens: it takes the folder's landmarks
            except OSError as exc:
                status(self.status_label, f"cannot write {SET_FILE} in {folder}: {exc.strerror or exc}", error=True)
                return None
        else:
            self.state.set_landmark_set(own)
        detect = self.detect_widget()
        worker = detect.open_folder(folder, start=start)
        self._show_set()
        lset = self.state.landmark_set
        status(self.status_label, f"{folder}: landmark set {lset.describe()}" if lset is not None else
               f"{folder}: choose its landmark set")
        return worker

    def _browse_set(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Landmark set", str(self.folder() or ""),
                                              "landmark set (*.json);;All files (*)")
        if path:
            self.load_set(path)

    def load_set(self, path: str | Path) -> LandmarkSet | None:
        try:
            lset = load_landmark_set(path)
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)
            return None
        return self.use_set(lset)

    def _reported(self, call, cannot_write: str) -> tuple[bool, Any]:
        """``(True, call())``, or ``(False, None)`` with its error in the status line: a
        :class:`GlimpseError` as it is, an ``OSError`` after ``cannot_write``."""
        try:
            return True, call()
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)
        except OSError as exc:
            status(self.status_label, f"{cannot_write}: {exc.strerror or exc}", error=True)
        return False, None

    def create_set(self) -> LandmarkSet | None:
        """The set typed in the editor, used for the folder."""
        try:
            lset = set_from_text(self.set_name.value or "", self.set_text.value or "")
        except GlimpseError as exc:
            status(self.status_label, error_text(exc), error=True)
            return None
        out = self.use_set(lset)
        if out is not None:
            self.editor.visible = False
        return out

    def use_set(self, lset: LandmarkSet) -> LandmarkSet | None:
        """Annotate the folder with ``lset``: saved as its ``landmarks.json`` (refused when its log holds
        records of other landmarks); the current image starts from zero if it has no landmarks."""
        folder = self.folder()
        log = self.state.log

        def save() -> Path | None:
            if log is not None:
                check_log_set(log, lset)
            if folder is None:
                return None
            out = save_folder_set(lset, folder)
            if log is not None and log.state.landmark_names != lset.names:
                self.state.open_log(log.path, log.image_dir, lset.names)
            return out

        done, path = self._reported(save, f"cannot write {SET_FILE} in {folder}")
        if not done:
            return None
        self.state.set_landmark_set(lset)
        status(self.status_label, f"landmark set {lset.describe()}" + (f", saved as {path}" if folder else
                                                                       ": open a folder to annotate"))
        det = self.state.current
        if self.auto.value and det is not None and det.points_layer is None:
            self.annotate_current()
        return lset

    # ------------------------------------------------------------------------ annotating
    def annotate_current(self) -> Detection | None:
        """Start annotating the current image from zero (it has no landmarks yet)."""
        det = self.state.current or self._opened_image()
        if det is None or det.image_path is None:
            status(self.status_label, "open a folder (or an image file) first", error=True)
            return None
        if det.points_layer is not None and det.points_layer in self.viewer.layers and len(det.points_layer.data):
            status(self.status_label, f"{det.image_name} has landmarks already: edit them in Review and corrections")
            return None
        done, new = self._reported(lambda: start_annotation(self.state, det, self.state.landmark_set),
                                   f"cannot write in {det.image_path.parent}")
        if done and new is not None:
            status(self.status_label, f"{det.image_name}: click to place each landmark ({len(new.landmark_names)})")
        return new

    def _opened_image(self) -> Detection | None:
        """An image opened from a file (File ▸ Open) that no widget shows yet: the selected one, else the last."""
        from napari.layers import Image

        from ._state import image_path_of

        layers = [ly for ly in self.viewer.layers if isinstance(ly, Image) and image_path_of(ly) is not None]
        active = self.viewer.layers.selection.active
        layer = active if active in layers else (layers[-1] if layers else None)
        if layer is None:
            return None
        path = image_path_of(layer)
        return Detection(image_name=path.name, image_path=path, image_layer=layer, points_layer=None, trajectory=None,
                         model_name="none", landmark_names=())

    def _on_detection(self, det: Detection | None) -> None:
        """A folder image without landmarks starts from zero (a turn later: the other widgets first see
        the detection as it came); a from-zero image still missing points is in add mode."""
        if det is None or det.image_path is None or not self.auto.value:
            return
        if self.state.landmark_set is None:  # a folder opened in Detect: its own set, if it has one
            try:
                own = folder_set(det.image_path.parent)
            except GlimpseError:
                own = None
            if own is None:
                return
            self.state.set_landmark_set(own)
        if det.points_layer is None and det.trajectory is None:
            QTimer.singleShot(0, lambda: self._start_if_current(det))
        elif is_from_zero(self.state.log, det.image_path) and self.state.log.state.missing(det.image_path):
            if det.points_layer.mode != "add":
                det.points_layer.mode = "add"

    def _start_if_current(self, det: Detection) -> None:
        if self.state.current is det and det.points_layer is None:
            self.annotate_current()
