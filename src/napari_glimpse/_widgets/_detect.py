"""Detect widget: propose the landmarks of a cephalogram (or of a folder, image by image).

The model runs in a napari worker thread; only the returned numbers reach the GUI thread,
which makes the layers. A table lists the landmarks, sortable by confidence.

The form is two magicgui :class:`~magicgui.widgets.Container` s (the model: checkpoint, device,
iterations; the image: layer, folder, options, pixel spacing); the Detect button, the progress
bar, the status and the table are plain Qt. The fields' Qt widgets keep their names
(``device_combo``, ``layer_combo``, ``spacing_spin``...) for scripts that drive Qt.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton
from napari.qt.threading import create_worker
from qtpy.QtCore import QEvent, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QGroupBox,
    QHeaderView,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .._layer_data import abbreviations, landmarks_layer, landmarks_layer_from
from .._reader import have_pydicom, read_dicom
from ..errors import GlimpseError
from ..gate import gate_note
from ..inference import Trajectory
from ..io import DICOM_SUFFIXES, IMAGE_SUFFIXES, is_dicom, list_images, read_image, to_grey_uint8
from ..landmarks import ISBI_LANDMARKS, ISBI_PIXEL_SPACING_MM
from ..spacing import remember_spacing, remembered_spacing
from ._state import (
    EDIT_ACTIONS,
    Detection,
    error_text,
    focus_landmark,
    image_path_of,
    load_glyphs,
    log_states,
    prebuild_steps,
    prewarm_labelled_points,
    real_viewer,
    scroll_body,
    set_bar,
    set_layer_content,
    state_for,
    status,
    status_label,
)

STAGES = ("reading image", "loading model", "building pyramid", "glimpsing")
SHOW_PROGRESS_AFTER_S = 0.3  # stages of a detection quicker than this are not shown
STATE_ORDER = {"absent": 0, "proposed": 1, "corrected": 2, "accepted": 3}  # the State column sorts so


@dataclass
class _JobResult:
    image: np.ndarray
    trajectory: Trajectory | None
    image_path: Path | None
    spacing_note: str | None = None  # the spacing was assumed and may be wrong (see spacing.size_notice)
    spacing: float | None = None  # mm per pixel the image is read at (None: unknown)


def _read_any(path: Path) -> np.ndarray:
    if is_dicom(path):
        return read_dicom(path)[0]
    return read_image(path)


def _job_spacing(spacing: float | None, spacing_file: Path | None, shape: tuple[int, int],
                 model_spacing: float) -> tuple[float, str, str | None]:
    """The spacing to detect at: the field's (``spacing``), else the one ``spacing_file`` records (DICOM,
    TIFF), else the model's, with its notice (:func:`napari_glimpse.spacing.resolve_spacing`)."""
    from ..spacing import read_spacing, resolve_spacing

    recorded = read_spacing(spacing_file) if spacing is None and spacing_file is not None else None
    name = spacing_file.name if spacing_file is not None else "image"
    dicom = spacing_file is not None and is_dicom(spacing_file)
    return resolve_spacing(spacing, recorded, shape, model_spacing, name, dicom)


def _detect_job(image_path: Path | None, image: np.ndarray | None, get_model: Callable | None,
                model_key: tuple, iterations: int | None, spacing: float | None = None,
                spacing_file: Path | None = None):
    """Worker body (no Qt, no layers): read, load the model, build the pyramid, predict (at the
    spacing ``spacing``, else the one ``spacing_file`` records, else the model's: see :func:`_job_spacing`)."""
    import pandas  # noqa: F401  napari's first Points layer imports it: here, not in the GUI thread

    yield 0
    img = _read_any(image_path) if image is None else to_grey_uint8(image)
    if get_model is None:  # opened only (its points from the log): the spacing it would be detected at
        try:
            at = _job_spacing(spacing, spacing_file, img.shape, ISBI_PIXEL_SPACING_MM)[0]
        except GlimpseError:  # a bad recorded spacing: said when detecting
            at = None
        return _JobResult(img, None, image_path, spacing=at)
    yield 1
    model = get_model(model_key)
    yield 2
    pyr = model.pyramid(img)
    yield 3
    # the explorer's stage view shows the fine looks (one window stack per landmark, small beside the
    # image); its glimpse view computes its own steps from the proposal when asked: none recorded here
    at, source, note = _job_spacing(spacing, spacing_file, img.shape, model.pixel_spacing)
    traj = model.predict(pyr, iterations=iterations, record_stages=True, spacing=at)
    return _JobResult(img, replace(traj, spacing_source=source), image_path, note, traj.pixel_spacing)


def _spacing_text(traj: Trajectory) -> str:
    """``0.13 mm/px (set)``: the spacing a detection was made at and where it came from."""
    source = {"given": "set", "file": "from the file", "model": "the model's"}.get(traj.spacing_source, "")
    return f"{traj.pixel_spacing:g} mm/px" + (f" ({source})" if source else "")


def _table_rows(det: Detection, log: Any) -> list[tuple[int, str, float, float, str]]:
    """``(k, "name (abbr)", confidence, ±mm, state)`` per landmark: the layer's points, plus the
    landmarks the log marks absent."""
    rows = []
    layer = det.points_layer
    names = list(det.landmark_names)
    if layer is not None and len(layer.data) and "index" in layer.features:
        f = layer.features
        states = f["state"] if "state" in f else ["proposed"] * len(f)
        abbr = abbreviations(list(f["landmark"]))
        for r, k in enumerate(np.asarray(f["index"], dtype=int) - 1):
            rows.append((int(k), f"{f['landmark'].iloc[r]} ({abbr[r]})", float(f["confidence"].iloc[r]),
                         float(f["uncertainty_mm"].iloc[r]), str(states.iloc[r] if hasattr(states, "iloc")
                                                                 else states[r])))
    if log is not None and det.image_path is not None and names and log.state.has_proposal(det.image_path):
        have = {r[0] for r in rows}
        abbr_all = abbreviations(names)
        for k in log.state.absent(det.image_path):
            if k not in have and k < len(names):
                rows.append((k, f"{names[k]} ({abbr_all[k]})", np.nan, np.nan, "absent"))
    return rows


def _collect_before_detecting() -> None:
    """Import what loading a model imports, then run a full garbage collection, now.

    Loading a model (imports, unpickling) leaves enough new objects that Python's next full
    collection of napari's and torch's heap came while the first landmarks layer was added: a
    0.15-0.3 s pause in the GUI thread during the first detection. Collected while the widget is
    being made (napari waits for it anyway), the next full collection is far off.
    """
    import gc
    import importlib

    for name in ("pandas", "cv2", "onnxruntime", "napari_glimpse.shape", "napari_glimpse.confidence"):
        try:
            importlib.import_module(name)
        except ImportError:  # an optional backend: the loader does without it as well
            pass
    gc.collect()


class _SortItem(QTableWidgetItem):
    """A table cell showing text but sorting by a number."""

    def __init__(self, text: str, key: float):
        super().__init__(text)
        self.key = float(key)
        self.setFlags(self.flags() & ~Qt.ItemIsEditable)

    def __lt__(self, other):  # noqa: D105
        if isinstance(other, _SortItem):
            return bool(self.key < other.key)
        return super().__lt__(other)


class DetectWidget(QWidget):
    """Model, device and iterations; Detect on the chosen image layer or a folder of images."""

    detected = Signal(object)  # Detection, once its layers are in the viewer

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # napari hands each widget its own proxy
        self.state = state_for(self.viewer)
        self._worker = None
        self._showing = False  # a finished job's layers are being shown (see _on_result)
        self._t_click = 0.0
        self.folder_images: list[Path] = []
        self.folder_index = -1
        self.last_seconds: float | None = None
        self.model_form = self._build_model_form()
        self.image_form = self._build_image_form()

        self.run_btn = QPushButton("Detect landmarks")
        self.run_btn.clicked.connect(lambda: self.detect())
        self.progress = QProgressBar()
        self.progress.setRange(0, len(STAGES))
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        self.status_label = status_label()
        self.table = self._build_table()

        lay = scroll_body(self)
        for title, form in (("Model", self.model_form), ("Image", self.image_form)):
            box = QGroupBox(title)
            QVBoxLayout(box).addWidget(form.native)
            lay.addWidget(box)
        for w in (self.run_btn, self.progress, self.status_label):
            lay.addWidget(w)
        lay.addWidget(self.table, 1)
        self._connect()
        self._refresh_layers()
        self._update_nav()
        self._sync_model_edit()
        _collect_before_detecting()
        self.preload_model()
        prewarm_labelled_points(self.viewer)  # the first detection's points then appear without a long stall

    # ------------------------------------------------------------------------ the form
    def _build_model_form(self) -> Container:
        """The model's fields (magicgui): checkpoint, device, glimpse iterations."""
        self.model_field = LineEdit(label="Checkpoint",
                                    tooltip="Checkpoint file (.pt); empty = the model shipped with napari-glimpse")
        self.model_field.native.setPlaceholderText("shipped default model")
        self.model_field.native.editingFinished.connect(self._model_edited)
        browse = PushButton(text="…", tooltip="Choose a checkpoint file")
        browse.native.setFixedWidth(28)
        browse.changed.connect(self._browse_model)
        default = PushButton(text="Default", tooltip="Use the model shipped with napari-glimpse")
        default.changed.connect(lambda: self.set_model(None))
        glimpse = PushButton(text="Glimpse", tooltip="Use the glimpse-only model shipped with napari-glimpse (the "
                                                     "paper's method: from the mean start, glimpse steps alone)")
        glimpse.changed.connect(lambda: self.set_model("glimpse"))
        checkpoint = Container(widgets=[self.model_field, browse, default, glimpse], layout="horizontal",
                               labels=False, label="Checkpoint")
        checkpoint.margins = (0, 0, 0, 0)
        self.device = ComboBox(choices=["auto", "cpu", "cuda"], value="auto", label="Device",
                               tooltip="auto: CUDA when available, else CPU")
        self.device.changed.connect(self._device_changed)
        # a ComboBox, not a SpinBox: magicgui's SpinBox (superqt's) shows no special text for "model's"
        self.iterations = ComboBox(choices=[("model's", 0)] + [(str(i), i) for i in range(1, 21)], value=0,
                                   label="Iterations",
                                   tooltip="Glimpse steps per landmark (model's: the number chosen on validation "
                                           "when the model was trained)")
        # the Qt widgets under the fields, for scripts and tests that drive Qt
        self.model_edit, self.device_combo = self.model_field.native, self.device.native
        return Container(widgets=[checkpoint, self.device, self.iterations], labels=True)

    def _build_image_form(self) -> Container:
        """The image's fields (magicgui): the layer, the folder and its moves, options, spacing."""
        self.image = ComboBox(choices=[], label="Layer", tooltip="Image layer to detect on (when no folder is open)")
        self.image.changed.connect(lambda _name: self.load_spacing())
        folder = PushButton(text="Open folder…", tooltip="Review a folder of cephalograms one by one")
        folder.changed.connect(self._browse_folder)
        prev = PushButton(text="◀", tooltip="Previous image of the folder")
        prev.changed.connect(lambda: self.go(-1))
        nxt = PushButton(text="▶", tooltip="Next image of the folder")
        nxt.changed.connect(lambda: self.go(+1))
        for b in (prev, nxt):
            b.native.setFixedWidth(32)
        moves = Container(widgets=[folder, prev, nxt], layout="horizontal", labels=False, label="Folder")
        moves.margins = (0, 0, 0, 0)
        self.folder_info = Label(value="no folder open", label="")
        self.auto = CheckBox(text="Detect when moving to an image", value=True,
                             tooltip="Images already in the corrections log show their logged landmarks instead")
        self.replace = CheckBox(text="Replace reviewed points", value=False,
                                tooltip="Off: an image with corrections or accepted stays as reviewed when Detect "
                                        "runs again")
        self.spacing = FloatSpinBox(value=0.0, min=0.0, max=1.0, step=0.005, label="Pixel spacing",
                                    tooltip="Pixel spacing of the images (mm per pixel), remembered for their folder. "
                                            "0: the file's own (DICOM, TIFF), else the model's (0.1 mm), with a note "
                                            "when the image's size looks unlike that")
        spin = self.spacing.native
        spin.setDecimals(4)
        spin.setSuffix(" mm")
        spin.setSpecialValueText("from the file, else the model's")
        spin.setKeyboardTracking(False)
        self.spacing.changed.connect(self._spacing_changed)
        # the Qt widgets under the fields, for scripts and tests that drive Qt
        self.layer_combo, self.folder_btn, self.prev_btn, self.next_btn = (
            self.image.native, folder.native, prev.native, nxt.native)
        self.folder_label, self.auto_check, self.replace_check, self.spacing_spin = (
            self.folder_info.native, self.auto.native, self.replace.native, spin)
        return Container(widgets=[self.image, moves, self.folder_info, self.auto, self.replace, self.spacing],
                         labels=True)

    def _build_table(self) -> QTableWidget:
        table = QTableWidget(0, 5)
        table.setHorizontalHeaderLabels(["#", "Landmark", "Confidence", "±mm", "State"])
        table.verticalHeader().setVisible(False)
        table.setSelectionBehavior(QAbstractItemView.SelectRows)
        table.setSelectionMode(QAbstractItemView.SingleSelection)
        table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        hh = table.horizontalHeader()
        hh.setSectionResizeMode(1, QHeaderView.Stretch)
        for c in (0, 2, 3, 4):
            hh.setSectionResizeMode(c, QHeaderView.ResizeToContents)
        table.setSortingEnabled(True)
        table.setToolTip("Click a landmark to select it and centre the view on it; click a header to sort")
        table.itemSelectionChanged.connect(self._row_selected)
        table.installEventFilter(self)  # PageDown / PageUp move along the folder, as over the viewer
        return table

    def eventFilter(self, obj: Any, event: Any) -> bool:
        if (obj is getattr(self, "table", None) and event.type() == QEvent.KeyPress and self.folder_images
                and event.key() in (Qt.Key_PageDown, Qt.Key_PageUp)):
            self.go(+1 if event.key() == Qt.Key_PageDown else -1)
            return True
        return super().eventFilter(obj, event)

    def _connect(self) -> None:
        self.viewer.layers.events.inserted.connect(self._layer_inserted)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._active_changed)
        self.state.model_changed.connect(self._sync_model_edit)
        self.state.model_changed.connect(self.preload_model)
        self.state.log_changed.connect(self._refill_table_soon)
        self._watched: set[int] = set()  # landmarks layers whose edits warn while no review widget logs them
        self._table_timer = QTimer(self)
        self._table_timer.setSingleShot(True)
        self._table_timer.setInterval(0)
        self._table_timer.timeout.connect(self._refill_table)
        self.state.register_action("next_image", lambda: self.go(+1))
        self.state.register_action("previous_image", lambda: self.go(-1))

    @property
    def busy(self) -> bool:
        """A detection runs, or its result is being shown."""
        return self._worker is not None or self._showing

    def preload_model(self) -> threading.Thread:
        """Load the chosen model in the background (no Qt in the thread), so the first click is quick."""
        key = self.state.model_key()

        def load() -> None:
            try:
                self.state.get_model(key)
            except Exception:  # noqa: BLE001 the click that needs it reports the error
                pass

        # not a daemon: closing napari waits the second or two for it (an interpreter ending under a
        # loading ONNX Runtime / torch aborts the process)
        t = threading.Thread(target=load, name="napari-glimpse model preload", daemon=False)
        t.start()
        return t

    # ------------------------------------------------------------------------ inputs
    def set_model(self, path: str | Path | None) -> None:
        self.state.set_model(path, self.device.value)

    def _sync_model_edit(self) -> None:
        text = str(self.state.model_path) if self.state.model_path else ""
        if self.model_field.value != text:
            self.model_field.value = text

    def _model_edited(self) -> None:
        text = self.model_field.value.strip()
        cur = str(self.state.model_path) if self.state.model_path else ""
        if text != cur:
            self.set_model(text or None)

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model checkpoint", "",
                                              "napari-glimpse model (*.pt);;All files (*)")
        if path:
            self.set_model(path)

    def _device_changed(self, dev: str) -> None:
        self.state.device = dev

    def _image_layers(self) -> list:
        from napari.layers import Image

        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and not ly.name.startswith("glimpse")]

    def _refresh_layers(self, event=None) -> None:
        cur = self.image.value
        names = [ly.name for ly in self._image_layers()]
        with self.image.changed.blocked():
            self.image.choices = names
            if cur in names:
                self.image.value = cur

    def _choose_layer(self, name: str) -> None:
        """Make image layer ``name`` the one Detect runs on (the spacing field follows)."""
        if name in self.image.choices and self.image.value != name:
            self.image.value = name

    def _layer_inserted(self, event=None) -> None:
        """A newly opened image becomes the one Detect runs on (a folder's own layer aside)."""
        self._refresh_layers()
        layer = getattr(event, "value", None)
        if layer is None or layer.name not in [ly.name for ly in self._image_layers()]:
            return
        path = image_path_of(layer)
        folder_image = self.folder_images[self.folder_index] if self.folder_images and self.folder_index >= 0 else None
        if folder_image is not None and path is not None and path == folder_image:
            return  # the widget's own layer for the folder's current image
        if self._worker is None and folder_image is not None and layer is not self._folder_layer():
            self.close_folder()  # an image opened by hand: leave the folder for it
        self._choose_layer(layer.name)

    def _active_changed(self, event=None) -> None:
        """Selecting an image layer in the layer list makes it the one Detect runs on."""
        layer = self.viewer.layers.selection.active
        if layer is not None and layer.name in [ly.name for ly in self._image_layers()]:
            if not self.folder_images:
                self._choose_layer(layer.name)

    def _folder_layer(self) -> Any:
        cur = self.state.current
        return cur.image_layer if cur is not None and cur.extra.get("from_folder") else None

    def close_folder(self) -> None:
        """Stop reviewing the open folder (Detect then runs on the chosen image layer)."""
        self.folder_images = []
        self.folder_index = -1
        self.folder_info.value = "no folder open"
        self._update_nav()

    # ------------------------------------------------------------------------ spacing
    def spacing_folder(self) -> Path | None:
        """The folder the spacing field is for: the open folder's, else the chosen layer's file's."""
        if self.folder_images:
            return self.folder_images[0].parent
        layer = next((ly for ly in self._image_layers() if ly.name == self.image.value), None)
        path = image_path_of(layer) if layer is not None else None
        return path.parent if path is not None else None

    def load_spacing(self) -> None:
        """Show the spacing remembered for :meth:`spacing_folder` (0 when none)."""
        folder = self.spacing_folder()
        value = remembered_spacing(folder) if folder is not None else None
        with self.spacing.changed.blocked():
            self.spacing.value = value or 0.0

    def _spacing_changed(self, value: float) -> None:
        folder = self.spacing_folder()
        try:
            if folder is not None and not remember_spacing(folder, value or None):
                status(self.status_label, "the spacing is used, but could not be saved for the folder", error=True)
        except GlimpseError as exc:  # e.g. 0.005 mm
            status(self.status_label, str(exc), error=True)

    def set_image_layer(self, name: str) -> None:
        self._refresh_layers()
        self._choose_layer(name)

    # ------------------------------------------------------------------------ folder
    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of cephalograms")
        if path:
            self.open_folder(path)

    def open_folder(self, folder: str | Path, start: bool = True):
        """List the images of ``folder`` and show the first one (detecting if so set)."""
        folder = Path(folder)
        if (folder / "images").is_dir():
            folder = folder / "images"
        suffixes = IMAGE_SUFFIXES + (DICOM_SUFFIXES if have_pydicom() else ())
        try:
            imgs = list_images(folder, dicom=have_pydicom())  # DICOM files without a suffix too
        except OSError as exc:
            status(self.status_label, f"cannot list {folder}: {exc}", error=True)
            return None
        if not imgs:
            status(self.status_label, f"no images ({', '.join(suffixes)}) in {folder}", error=True)
            return None
        self.folder_images = imgs
        self.folder_index = -1
        self.load_spacing()
        log = self.state.log
        if log is None or log.image_dir.resolve() != folder.resolve():
            self.state.open_log(folder, folder)  # this folder's own log, before anything is shown
        return self.show_image(0, start=start)

    def go(self, step: int, start: bool = True):
        """Move ``step`` images along the folder."""
        if not self.folder_images:
            return None
        i = min(max(self.folder_index + step, 0), len(self.folder_images) - 1)
        if i == self.folder_index:
            return None
        return self.show_image(i, start=start)

    def _update_nav(self) -> None:
        n = len(self.folder_images)
        busy = self.busy
        self.prev_btn.setEnabled(n > 0 and self.folder_index > 0 and not busy)
        self.next_btn.setEnabled(n > 0 and self.folder_index < n - 1 and not busy)
        self.run_btn.setEnabled(not busy)
        if n:
            p = self.folder_images[self.folder_index] if self.folder_index >= 0 else None
            self.folder_info.value = f"{self.folder_index + 1}/{n}: {p.name if p else ''}  ({p.parent if p else ''})"
        self.image.enabled = not n

    def show_image(self, i: int, start: bool = True):
        """Show folder image ``i``: its logged landmarks if it has any, else detect (if set). While a
        detection runs, nothing changes (the folder's position stays the image shown)."""
        if self.busy:
            status(self.status_label, "busy: wait for the running detection", error=True)
            return None
        self.folder_index = i
        path = self.folder_images[i]
        log = self.state.log
        logged = log is not None and log.state.has_proposal(path)
        predict = self.auto.value and not logged and self.state.model_fits()  # not on a folder of another set
        return self._run(path, None, None, predict, start)

    # ------------------------------------------------------------------------ detect
    def detect(self, start: bool = True):
        """Detect on the folder's current image or the chosen image layer; returns the worker.

        With ``start=False`` the caller starts it (``worker.start()``), e.g. inside
        ``qtbot.waitSignal``.
        """
        if self.folder_images and self.folder_index >= 0:
            return self._run(self.folder_images[self.folder_index], None, None, True, start)
        layers = self._image_layers()
        layer = next((ly for ly in layers if ly.name == self.image.value), None)
        if layer is None:
            layer = next((ly for ly in layers), None)
        if layer is None:
            status(self.status_label, "open a cephalogram (or a folder) first", error=True)
            return None
        if layer.rgb or np.asarray(layer.data).ndim == 2:
            data = np.asarray(layer.data)
        else:
            status(self.status_label, f"{layer.name}: expected a 2-D grey or RGB image", error=True)
            return None
        return self._run(image_path_of(layer), data, layer, True, start)

    def _run(self, path: Path | None, data: np.ndarray | None, layer: Any, predict: bool, start: bool):
        if self.busy:
            status(self.status_label, "busy: wait for the running detection", error=True)
            return None
        self._t_click = time.perf_counter()
        self.state.device = self.device.value
        key = self.state.model_key()
        worker = create_worker(
            _detect_job, path if data is None else None, data,
            self.state.get_model if predict else None, key, self.iterations.value or None,
            spacing=self.spacing.value or None, spacing_file=path,
            _start_thread=False, _ignore_errors=True,
        )
        worker.yielded.connect(self._on_stage)
        worker.returned.connect(lambda res: self._on_result(res, path, layer))
        worker.errored.connect(self._on_error)
        worker.finished.connect(lambda: self._on_finished(worker))
        self._worker = worker
        set_bar(self.progress, fmt="detecting…" if predict else "opening…")
        status(self.status_label, f"detecting on {path.name if path else (layer.name if layer else '')}…"
               if predict else f"opening {path.name if path else ''}…")
        self._update_nav()
        if start:
            worker.start()
        return worker

    def _on_stage(self, i: int) -> None:
        # a progress bar repaints at once (and the canvas with it): a quick detection shows none
        if time.perf_counter() - self._t_click < SHOW_PROGRESS_AFTER_S:
            return
        set_bar(self.progress, i, STAGES[i])

    def _on_error(self, exc: BaseException) -> None:
        status(self.status_label, error_text(exc), error=True)
        set_bar(self.progress, fmt="failed")

    def _on_finished(self, worker: Any) -> None:
        if self._worker is worker:
            self._worker = None
        self._update_nav()

    def _on_result(self, res: _JobResult, path: Path | None, layer: Any) -> None:
        """Show a finished job, one piece per event-loop turn (image, points, the rest), each piece's
        frame drawn before the next piece.

        On software GL every frame redraws the canvas, and napari's setters, the layer list and the
        table each cost tens of ms: done in one slot with the frame after it they stalled napari
        past 100 ms. Between the pieces the event loop draws and answers the user.
        """
        self._worker = None
        self._showing = True  # busy until the last piece: no second job meanwhile
        job = {"res": res, "path": path, "layer": layer}
        steps = [self._show_image_layer, self._prepare_points, self._show_points, self._show_rest]
        job["steps"] = steps

        def run_next() -> None:
            try:
                steps.pop(0)(job)
            except Exception as exc:  # noqa: BLE001 a layer removed meanwhile, say: report, do not hang
                steps.clear()
                self._on_error(exc)
            if steps:  # a timer, not a posted call: the frame the step asked for is drawn first
                QTimer.singleShot(1, run_next)
            else:
                self._showing = False
                self._update_nav()
                if "det" in job:
                    self.detected.emit(job["det"])

        run_next()

    def _show_image_layer(self, job: dict) -> None:
        """The image layer: the chosen one, or the folder's one (reused for its next image)."""
        res, path, layer = job["res"], job["path"], job["layer"]
        old = self.state.current
        job["old"] = old
        if layer is not None:
            job["image_layer"] = layer
            return
        viewer = self.viewer
        name = path.stem if path else "cephalogram"
        image_layer = old.image_layer if old is not None and old.image_layer in viewer.layers else None
        if image_layer is not None and old.extra.get("from_folder"):
            image_layer.data = res.image
            image_layer.name = name
            image_layer.metadata = {"path": str(path)}
            image_layer.reset_contrast_limits()
        else:
            image_layer = viewer.add_image(res.image, name=name, colormap="gray", metadata={"path": str(path)})
        job["image_layer"] = image_layer

    def _points_content(self, job: dict) -> tuple[Trajectory | None, tuple[str, ...], Any, str]:
        """``(trajectory, names, layer data, warning)``: the new proposal (logged), or the log's points."""
        res, path, image_layer = job["res"], job["path"], job["image_layer"]
        image_name = path.name if path is not None else image_layer.name
        traj = res.trajectory
        log = self.state.log
        if path is not None:  # the image's own folder's log: its reviewed work, not a namesake's elsewhere
            names = (tuple(traj.landmark_names) if traj is not None
                     else log.state.landmark_names if log is not None else ISBI_LANDMARKS)
            log = self.state.ensure_log(path, names)
        if (traj is not None and path is not None and log is not None and log.state.has_proposal(path)
                and (log.state.corrected(path) or log.state.is_accepted(path))
                and not self.replace.value):
            # never replace an annotator's work silently
            traj = None
            warn = " (kept the reviewed points: tick 'Replace reviewed points' to use the new detection)"
        else:
            warn = ""
        if traj is not None:
            try:  # before the layer changes: the corrections widget compares the layer with the log
                self.state.record_proposal(path, traj, self.state.model_name())
            except GlimpseError as exc:  # e.g. a model of another landmark set: its points are not shown
                traj, warn = None, f" (not shown: {exc})"
        if traj is not None:
            if path is None:
                warn = " (image has no file: corrections are not logged)"
            return traj, tuple(traj.landmark_names), landmarks_layer(traj, f"{Path(image_name).stem} landmarks",
                                                                     path), warn
        if path is not None and log is not None and log.state.has_proposal(path):
            names = log.state.landmark_names
            return None, names, landmarks_layer_from(
                log.state.positions(path), names, log.state.confidence(path),
                image_shape=res.image.shape, name=f"{path.stem} landmarks", image_path=path,
                states=log_states(log, path, len(names)), pixel_spacing=res.spacing), warn
        return None, (), None, warn

    def _prepare_points(self, job: dict) -> None:
        """The landmarks layer's content, and the proposal written to the log (a file write and fsync:
        a turn of its own, before the layer changes)."""
        job["content"] = self._points_content(job)

    def _show_points(self, job: dict) -> None:
        """The landmarks layer: the previous one rewritten (same image), else a new one (made here,
        added to the viewer a turn later)."""
        viewer, old, image_layer = self.viewer, job["old"], job["image_layer"]
        reuse = old.points_layer if (old is not None and old.image_layer is image_layer
                                     and old.points_layer in viewer.layers) else None
        traj, names, layer_data, warn = job.pop("content")
        points_layer = None
        if layer_data is not None:
            data, kw, _ = layer_data
            if reuse is not None:  # same image: rewrite the layer (removing one costs napari a gc pass)
                content = {"data": data, **{k: kw[k] for k in ("features", "face_color", "border_color", "symbol")}}
                set_layer_content(self.state, reuse, content, name=kw["name"], metadata=kw["metadata"], size=kw["size"])
                points_layer = reuse
            else:
                # a new layer is made; a turn later it is added hidden; then its labels' glyphs load (those
                # the prewarm has not), its visuals' shaders are built one a turn, and it shows: napari
                # makes a layer, adds it, and vispy builds each new visual's shaders in one go (tens of ms)
                from napari.layers import Points

                kw = {**kw, "scale": image_layer.scale, "translate": image_layer.translate, "visible": False}
                points_layer = Points(data, **kw)
                job["new_layer"] = points_layer
                job["steps"][:0] = [self._add_new_points, self._load_glyphs, self._prebuild, self._show_new_points]
            if points_layer.mode != "select":
                points_layer.mode = "select"
        elif reuse is not None:
            viewer.layers.remove(reuse)
        path = job["path"]
        job["det"] = Detection(
            image_name=path.name if path is not None else image_layer.name, image_path=path,
            image_layer=image_layer, points_layer=points_layer, trajectory=traj,
            model_name=self.state.model_name(), landmark_names=names,
            seconds=time.perf_counter() - self._t_click, extra={"from_folder": job["layer"] is None},
        )
        job["warn"] = warn

    def _add_new_points(self, job: dict) -> None:
        """A new landmarks layer, hidden, into the viewer (its vispy visual, controls, row)."""
        self.viewer.add_layer(job["new_layer"])
        job["prebuild"] = prebuild_steps(self.viewer, job["new_layer"])

    def _prebuild(self, job: dict) -> None:
        """One of the new layer's visuals' shaders built (see :func:`~._state.prebuild_steps`)."""
        todo = job["prebuild"]
        if todo and job["new_layer"] in self.viewer.layers:
            todo.pop(0)()
        if todo:
            job["steps"].insert(0, self._prebuild)

    def _show_new_points(self, job: dict) -> None:
        """A new landmarks layer, its shaders built: its points and labels show."""
        layer = job["new_layer"]
        if layer in self.viewer.layers:
            layer.visible = True

    def _load_glyphs(self, job: dict) -> None:
        """The glyphs of a new layer's labels that the font lacks, a few per turn (see
        :func:`~._state.load_glyphs`): the labels' first frame then draws none of them."""
        layer = job["new_layer"]
        text = "".join(str(t) for t in layer.features["label"]) if "label" in layer.features else ""
        if load_glyphs(self.viewer, text):
            job["steps"].insert(0, self._load_glyphs)  # more next turn

    def _show_rest(self, job: dict) -> None:
        """The shared state (the other widgets follow it), the table, the status, the selection."""
        det, res, viewer = job["det"], job["res"], self.viewer
        self.state.set_current(det)
        self._table_timer.stop()
        self._fill_table(det)
        if det.trajectory is not None:
            traj = det.trajectory
            self.last_seconds = det.seconds
            set_bar(self.progress, len(STAGES), "done")
            status(self.status_label, f"{len(traj.final)} landmarks on {det.image_name} in {det.seconds:.2f} s "
                   f"({self.state.model_name()}; {_spacing_text(traj)}){job['warn']}"
                   + (f". Note: {res.spacing_note}" if res.spacing_note else "")
                   + (f". {gate_note(traj)}" if gate_note(traj) else ""))
        else:
            set_bar(self.progress, len(STAGES), "shown")
            status(self.status_label, f"{det.image_name}: " + ("landmarks from the corrections log"
                                                                if det.points_layer else "press Detect")
                   + job["warn"], error=bool(job["warn"]))
        points_layer = det.points_layer
        if points_layer is not None and viewer.layers.selection.active is not points_layer:
            viewer.layers.selection.active = points_layer
        if job["layer"] is None:
            viewer.reset_view()
        if det.image_path is not None and points_layer is not None and not self._review_open():
            self.status_label.setText(self.status_label.text()
                                      + ". Edits are logged by 'Review and corrections' (Plugins menu): open it")
            if id(points_layer) not in self._watched:  # a drag without it is said at once, not lost unseen
                self._watched.add(id(points_layer))
                points_layer.events.data.connect(self._edit_without_review)

    def _review_open(self) -> bool:
        """Whether the review widget (which logs the edits) is open in this viewer."""
        return "accept" in self.state.actions

    def _edit_without_review(self, event: Any) -> None:
        if self.state.is_quiet or self._review_open() or str(getattr(event, "action", "changed")) not in EDIT_ACTIONS:
            return
        status(self.status_label, "this edit is NOT logged: open 'Review and corrections' (Plugins menu) before "
               "editing, so that corrections are kept", error=True)

    # ------------------------------------------------------------------------ table
    def _refill_table_soon(self) -> None:
        self._table_timer.start()  # several log changes in one event: one refill

    def _refill_table(self) -> None:
        """The log changed (an edit, accept, absent): the table shows the layer's new states."""
        if self.state.current is not None:
            self._fill_table(self.state.current)

    def _fill_table(self, det: Detection) -> None:
        sort = self.table.horizontalHeader().sortIndicatorSection() if self.table.rowCount() else 2
        order = self.table.horizontalHeader().sortIndicatorOrder() if self.table.rowCount() else Qt.AscendingOrder
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        rows = _table_rows(det, self.state.log)
        self.table.setRowCount(len(rows))
        for r, (k, name, conf, unc, state) in enumerate(rows):
            self.table.setItem(r, 0, _SortItem(str(k + 1), float(k)))
            self.table.setItem(r, 1, _SortItem(name, float(k)))
            # a corrected or absent point's model confidence no longer applies
            shown = conf if state in ("proposed", "accepted") else np.nan
            self.table.setItem(r, 2, _SortItem(f"{shown:.2f}" if np.isfinite(shown) else "–",
                                               shown if np.isfinite(shown) else 2.0))
            self.table.setItem(r, 3, _SortItem(f"{unc:.1f}" if np.isfinite(unc) else "–",
                                               unc if np.isfinite(unc) else -1.0))
            self.table.setItem(r, 4, _SortItem(state, STATE_ORDER.get(state, 9) + k / 100.0))
        self.table.setSortingEnabled(True)
        self.table.sortItems(sort, order)

    def _row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return
        item = self.table.item(rows[0].row(), 0)
        if item is None:
            return
        focus_landmark(self.state, int(item.text()) - 1)
