"""State the napari-glimpse dock widgets of one viewer share, and small Qt helpers.

One :class:`GlimpseState` per viewer (:func:`state_for`): which model detects, the current
image's detection (its trajectory and its landmarks Points layer), the selected landmark and
the corrections log. Widgets talk to each other only through its signals. It holds the loaded
model object so that widgets do not load it twice; all model logic stays in the core.

Nothing here may run in a worker thread except :meth:`GlimpseState.get_model`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QSize, Qt, QTimer, Signal
from qtpy.QtWidgets import QFrame, QLabel, QProgressBar, QScrollArea, QVBoxLayout, QWidget

from .._layer_data import register_labels
from ..annotate import folder_set
from ..corrections import CorrectionLog
from ..errors import GlimpseError
from ..inference import DEFAULT_MODEL, GlimpseModel, Trajectory
from ..landmark_set import LandmarkSet
from ..landmarks import ISBI_ABBREVIATIONS, ISBI_LANDMARKS

ENV_THREADS = "NAPARI_GLIMPSE_THREADS"

# keyboard shortcuts of the review (viewer-wide; napari's own keys are left alone)
SHORTCUTS = (
    ("N", "next_landmark", "next landmark to review (least confident first), or to place (from zero)"),
    ("Shift-N", "previous_landmark", "previous landmark"),
    ("PageDown", "next_image", "next image of the folder"),
    ("PageUp", "previous_image", "previous image of the folder"),
    ("Control-Z", "undo", "undo (through the corrections log)"),
    ("Control-Shift-Z", "redo", "redo"),
    ("Shift-X", "absent", "mark the selected landmark absent (not visible)"),
    ("Shift-Enter", "accept", "accept the image"),
)
# moving the selected point by keyboard (bound on the landmarks layer: napari's own arrow keys stay
# as they are elsewhere): key -> (dx, dy) in image pixels; with Shift, NUDGE_FAST times as far
NUDGE = {"Left": (-1, 0), "Right": (1, 0), "Up": (0, -1), "Down": (0, 1)}
NUDGE_FAST = 10
# a points layer's data events that are an edit (napari's "changing", "adding", ... come before them)
EDIT_ACTIONS = ("changed", "added", "removed")


def inference_threads() -> int:
    """CPU threads for detection: ``$NAPARI_GLIMPSE_THREADS``, else all cores but one (napari's).

    With every core busy (a training running beside napari) more threads are much slower: on
    two busy cores a first detection took 10 s with 2 threads and 0.6 s with 1.
    """
    try:
        n = int(os.environ.get(ENV_THREADS, "0"))
    except ValueError:
        n = 0
    return n if n > 0 else max(1, (os.cpu_count() or 2) - 1)


@dataclass
class Detection:
    """The landmarks shown for one image.

    ``trajectory`` is ``None`` when the points were restored from the corrections log without
    running the model.
    """

    image_name: str
    image_path: Path | None
    image_layer: Any
    points_layer: Any
    trajectory: Trajectory | None
    model_name: str
    landmark_names: tuple[str, ...]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class GlimpseState(QObject):
    """Shared state of one viewer's napari-glimpse widgets (see the module docstring)."""

    model_changed = Signal()
    detection_changed = Signal(object)  # Detection or None
    landmark_selected = Signal(int)     # 0-based landmark index
    log_changed = Signal()              # a log was opened, or records were appended
    export_written = Signal(str)        # path of a reviewed-labels CSV
    landmark_set_changed = Signal(object)  # the LandmarkSet annotated from zero (or None)

    def __init__(self, viewer: Any):
        super().__init__()
        self._viewer = weakref.ref(viewer)
        self.model_path: Path | None = None  # None: the shipped default
        self.device: str = "auto"
        self._model: GlimpseModel | None = None
        self._model_key: tuple | None = None
        self._model_lock = threading.Lock()
        self.current: Detection | None = None
        self.detections: dict[str, Detection] = {}
        self.log: CorrectionLog | None = None
        self.selected_landmark: int | None = None
        self.landmark_set: LandmarkSet | None = None  # the set annotated from zero (the Annotate widget's)
        self.model_names: dict[str | None, tuple[str, ...]] = {}  # model path (None: default) -> its landmarks
        self._quiet = 0
        self.actions: dict[str, Any] = {}  # keyboard actions the widgets offer (see bind_shortcuts)
        layers = getattr(viewer, "layers", None)
        if layers is not None:
            layers.events.removing.connect(self._hide_text_before_removal)

    def register_action(self, name: str, func: Any) -> None:
        """Offer ``func`` for the keyboard shortcut named ``name`` (bound once per viewer)."""
        self.actions[name] = func
        self.bind_shortcuts()

    def bind_shortcuts(self) -> None:
        """Bind the review's keys on the viewer (napari's own keys stay as they are)."""
        viewer = self.viewer
        if viewer is None or getattr(self, "_bound", False):
            return
        for key, action, _what in SHORTCUTS:
            def run(_viewer: Any, action: str = action) -> None:
                func = self.actions.get(action)
                if func is not None:
                    func()
            viewer.bind_key(key, run, overwrite=True)
        self._bound = True

    def _hide_text_before_removal(self, event: Any) -> None:
        """Hide a text-labelled layer's text and redraw once before napari removes it.

        Software GL (Mesa llvmpipe) crashes in ``glDrawArrays`` when text-labelled points are
        added after such layers were removed while their text was on screen (deleting all layers,
        then detecting again). A frame drawn without the text before the removal avoids it.
        """
        viewer = self.viewer
        try:
            layer = viewer.layers[event.index]
        except (AttributeError, IndexError, TypeError):
            return
        text = getattr(layer, "text", None)
        if text is None or not getattr(text, "visible", False) or not len(getattr(layer, "data", ())):
            return
        text.visible = False
        _repaint_now(viewer)

    @contextlib.contextmanager
    def quiet(self):
        """While widgets rewrite a landmarks layer themselves: its data events are not edits."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    @property
    def is_quiet(self) -> bool:
        return self._quiet > 0

    @property
    def viewer(self) -> Any:
        return self._viewer()

    # ------------------------------------------------------------------------ the model
    def model_name(self) -> str:
        return self.model_path.name if self.model_path is not None else "default"

    def set_model(self, path: str | os.PathLike | None, device: str | None = None) -> None:
        """Choose the model (``None`` = shipped default) and device used by the next detection."""
        self.model_path = Path(path) if path else None
        if device is not None:
            self.device = device
        self.model_changed.emit()

    def model_key(self) -> tuple:
        """``(path or None for the default, file mtime, device)``: a new file reloads."""
        try:
            mtime = os.path.getmtime(self.model_path or DEFAULT_MODEL)
        except OSError:
            mtime = None
        return (str(self.model_path) if self.model_path else None, mtime, self.device)

    def get_model(self, key: tuple | None = None) -> GlimpseModel:
        """The loaded model for ``key`` (default: the current choice); loads on first use.

        Safe to call from a worker thread (it touches no Qt object).
        """
        key = key or self.model_key()
        import torch

        n = inference_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        with self._model_lock:
            if self._model is None or self._model_key != key:
                self._model = GlimpseModel.load(key[0], key[2])
                self._model_key = key
                lset = self._model.landmark_set
                self.model_names[key[0]] = lset.names
                register_labels(lset.names, lset.labels, lset.colours)
            return self._model

    def model_fits(self) -> bool:
        """Whether the chosen model finds the open log's landmarks (True when either is unknown): a
        folder annotated with another set is not detected on when moving to an image."""
        key = str(self.model_path) if self.model_path else None
        names = self.model_names.get(key)
        if names is None and key in (None, "default", "glimpse"):  # the shipped models (not loaded yet)
            names = ISBI_LANDMARKS
        return self.log is None or names is None or tuple(names) == self.log.state.landmark_names

    def set_landmark_set(self, lset: LandmarkSet | None) -> None:
        """The set annotated from zero (its labels are drawn on the canvas)."""
        self.landmark_set = lset
        if lset is not None:
            register_labels(lset.names, lset.labels, lset.colours)
        self.landmark_set_changed.emit(lset)

    # ------------------------------------------------------------------- detections
    def set_current(self, det: Detection | None) -> None:
        self.current = det
        if det is not None:
            self.detections[det.image_name] = det
        self.detection_changed.emit(det)

    def select_landmark(self, k: int) -> None:
        self.selected_landmark = int(k)
        self.landmark_selected.emit(int(k))

    # ---------------------------------------------------------------------- the log
    def open_log(self, path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                 landmark_names: tuple[str, ...] | None = None) -> CorrectionLog:
        """Open (or create on first record) the corrections log at ``path`` (a folder or .jsonl).

        A log without records takes the landmarks of the image folder's set (its ``landmarks.json``)
        when it has one, else ``landmark_names``."""
        log = CorrectionLog(path, landmark_names, image_dir=image_dir)
        lset = folder_set(log.image_dir) if not log.records else None
        if lset is not None:
            register_labels(lset.names, lset.labels, lset.colours)
            if lset.names != log.state.landmark_names:
                log = CorrectionLog(path, lset.names, image_dir=image_dir)
        self.log = log
        self.log_changed.emit()
        return self.log

    def log_covers(self, image_path: Path) -> bool:
        """Whether the open log is ``image_path``'s: its image folder (or that folder's ``images/``)."""
        if self.log is None:
            return False
        d = self.log.image_dir.resolve()
        return image_path.parent.resolve() in (d, d / "images")

    def ensure_log(self, image_path: Path, landmark_names: tuple[str, ...]) -> CorrectionLog:
        """The open log if it is ``image_path``'s (:meth:`log_covers`), else the default one in
        ``image_path``'s folder."""
        if not self.log_covers(image_path):
            # records are keyed by file name: each image folder keeps its own log
            self.open_log(image_path.parent, image_path.parent, landmark_names)
        assert self.log is not None
        return self.log

    def record_proposal(self, image_path: Path | None, traj: Trajectory, model_name: str) -> None:
        """Log a fresh model proposal for a file-backed image (nothing without a file)."""
        if image_path is None:
            return
        log = self.ensure_log(image_path, tuple(traj.landmark_names))
        names, theirs = log.state.landmark_names, tuple(traj.landmark_names)
        if theirs != names:
            raise GlimpseError(f"{model_name} finds {len(theirs)} landmarks ({_few(theirs)}), not the {len(names)} of "
                               f"this folder's corrections log ({_few(names)}): choose a model of the folder's "
                               f"landmark set, or train one (Train a model)")
        log.propose(image_path, traj.final, model_name, traj.confidence)
        self.log_changed.emit()


def _few(names: tuple[str, ...]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


_STATES: dict[int, GlimpseState] = {}


def real_viewer(viewer: Any) -> Any:
    """The viewer behind napari's proxies.

    napari gives every plugin widget its own ``PublicOnlyProxy`` of the viewer (``napari -w``,
    the Plugins menu, ``add_plugin_dock_widget``), and the proxy wraps whatever is read through
    it (layers, events) in new proxies. The widgets work on the real objects instead: one shared
    state per viewer, and ``is`` comparisons of layers that hold.
    """
    seen = 0
    while seen < 8:  # proxies of proxies, never a loop
        inner = getattr(type(viewer), "__wrapped__", None) and getattr(viewer, "__wrapped__", None)
        if inner is None:
            return viewer
        viewer, seen = inner, seen + 1
    return viewer


def state_for(viewer: Any) -> GlimpseState:
    """The shared state of ``viewer``'s widgets (created on first use, dropped with the viewer).

    Keyed by the real viewer: widgets given different proxies of one viewer share one state.
    """
    viewer = real_viewer(viewer)
    key = id(viewer)
    st = _STATES.get(key)
    if st is None or st.viewer is not viewer:
        st = _STATES[key] = GlimpseState(viewer)
        weakref.finalize(viewer, _STATES.pop, key, None)
    return st


# ------------------------------------------------------------------------- Qt helpers
def _repaint_now(viewer: Any) -> None:
    """Draw the viewer's canvas at once (napari offers no public call for it)."""
    try:
        canvas = viewer.window._qt_viewer.canvas._scene_canvas
        canvas.native.repaint()
    except Exception:  # noqa: BLE001 a viewer without a window (headless), or napari moved it
        pass


def status_label(lines: int = 2) -> QLabel:
    """A word-wrapped status line with room for ``lines`` lines from the start.

    A label that grows when its text comes lays the dock out again; with docks stacked taller than
    the screen that resizes napari's window, and its canvas is redrawn (a stall of tens of ms on
    software GL, at each detection or when fine-tuning starts).
    """
    label = QLabel("")
    label.setWordWrap(True)
    label.setMinimumHeight(label.fontMetrics().lineSpacing() * lines + 2)
    return label


def status(label: QLabel, text: str, error: bool = False) -> None:
    """Show a one-line status; errors in red (and in the tooltip, for long messages).

    The style sheet is only set when it changes: setting one re-polishes the label and lays the
    dock out again, and each window repaint redraws the canvas on software GL.
    """
    if label.text() != text:
        label.setText(text)
        label.setToolTip(text)
    style = "color: #ff6b6b;" if error else ""
    if label.styleSheet() != style:
        label.setStyleSheet(style)


def set_bar(bar: QProgressBar, value: int | None = None, fmt: str | None = None) -> None:
    """Set a progress bar's value and text with one deferred repaint.

    ``QProgressBar.setValue`` repaints at once, and on software GL each repaint composes the
    whole window, canvas included: a slot that moves a bar then stalls napari for that long.
    """
    bar.setUpdatesEnabled(False)
    try:
        if value is not None and bar.value() != value:
            bar.setValue(value)
        if fmt is not None and bar.format() != fmt:
            bar.setFormat(fmt)
    finally:
        bar.setUpdatesEnabled(True)  # schedules one update() with the event loop


# the characters of the landmarks layer's labels (the ISBI abbreviations, the review marks "*" and
# " ok", shared labels "LIT/UIT") and those vispy measures every label with; others load when drawn
LABEL_CHARACTERS = "".join(sorted(set("".join(ISBI_ABBREVIATIONS)))) + "*/ ok" + "ÅÉÑŐjgpqy"


PREWARM_STEP_MS = 10  # the event loop's turn between two prewarm steps
GLYPHS_PER_TURN_S = 0.02  # glyphs load for at most about this long in one turn
_POINTS_WARM: list = []  # set once napari's Points code has been through its first pass
_NO_GLYPH: set = set()  # characters the font failed to load


def _label_font(viewer: Any) -> Any:
    """napari's font of the canvas' text (its glyph atlas is shared by every text-labelled layer), or None."""
    try:
        info = viewer.window._qt_viewer.canvas._font_info
        return info.font_manager.get_font(info.face, False, False)
    except Exception:  # noqa: BLE001 a headless viewer, or napari moved its font manager
        return None


def load_glyphs(viewer: Any, chars: str, budget_s: float = GLYPHS_PER_TURN_S) -> bool:
    """Load glyphs of ``chars`` that the canvas' font lacks, for about ``budget_s`` (at least one);
    True while some remain (call again in a later turn)."""
    import time

    font = _label_font(viewer)
    if font is None:
        return False
    t0 = time.perf_counter()
    todo = [c for c in dict.fromkeys(chars) if c not in getattr(font, "_glyphs", {}) and c not in _NO_GLYPH]
    for i, c in enumerate(todo):
        if i and time.perf_counter() - t0 > budget_s:
            return True
        try:
            font[c]
        except Exception:  # noqa: BLE001 a glyph the font lacks: vispy does without it
            _NO_GLYPH.add(c)
    return False


def prewarm_labelled_points(viewer: Any, chars: str = LABEL_CHARACTERS) -> None:
    """Do ahead, one step every :data:`PREWARM_STEP_MS`, what napari does in the GUI thread the first
    time a text-labelled Points layer is added and drawn.

    * A Points layer's model, vispy visual and layer controls, built once apart from the viewer:
      Python's first pass through that code (about a third of the first ``add_points``).
    * The labels' glyphs, into napari's shared font atlas, :data:`GLYPHS_PER_TURN_S` at a time:
      napari makes text with signed distance fields computed on the CPU when a text-labelled layer is
      first drawn, for the 19 landmark labels 0.3-0.6 s in one frame. (A detection that comes first
      loads the glyphs its labels lack itself, in turns, before they show.)

    Nothing is added to the viewer or drawn (removing text-labelled layers is what crashes Mesa
    llvmpipe, see :meth:`GlimpseState._hide_text_before_removal`).
    """
    font = _label_font(viewer)
    if font is None:
        return
    todo: list = []
    if not _POINTS_WARM:
        _POINTS_WARM.append(True)
        todo += _points_warmers(viewer.window._qt_viewer.canvas._font_info)
    todo.append(lambda: load_glyphs(viewer, chars))

    def step() -> None:  # each step 10-50 ms
        job = todo[0]
        try:
            more = job()
        except Exception:  # noqa: BLE001 napari moved something: the detection does without the prewarm
            more = False
        if more is not True:
            todo.pop(0)
        if todo:  # a timer, not a posted call: the event loop answers between steps
            QTimer.singleShot(PREWARM_STEP_MS, step)

    QTimer.singleShot(PREWARM_STEP_MS, step)


def prebuild_steps(viewer: Any, layer: Any) -> list:
    """Steps that build a just-added, hidden layer's vispy programs before its first frame, one visual
    (markers, highlight, line, text) a step: the GLSL made from vispy's templates and parsed (Python),
    then compiled and linked by GL. Its first frame then only draws: built there, they stalled napari
    for 0.1-0.2 s in that frame (vispy builds a program when a visual is first drawn).

    Empty when napari's or vispy's internals are not as expected: the first frame builds them then.
    """
    try:
        canvas = viewer.window._qt_viewer.canvas
        node = canvas.layer_to_visual[layer].node
        scene = canvas._scene_canvas
    except Exception:  # noqa: BLE001 a headless viewer, or napari moved its canvas
        return []
    leaves: list = []

    def walk(visual: Any) -> None:
        subs = getattr(visual, "_subvisuals", None)
        if subs:
            for sub in subs:
                walk(sub)
        elif hasattr(getattr(visual, "_program", None), "build_if_needed"):
            leaves.append(visual)

    walk(node)

    def build(visual: Any) -> Any:
        def step() -> None:
            try:
                if visual._prepare_draw(view=visual) is False:  # nothing to draw (an empty highlight)
                    return
                program = visual._program
                program.build_if_needed()
                scene.set_current()  # compile and link now (vispy would when drawing)
                scene.context.glir.associate(program.glir)
                scene.context.flush_commands()
            except Exception:  # noqa: BLE001 vispy moved something: the first frame builds it
                pass
        return step

    return [build(v) for v in leaves]


def _points_warmers(font_info: Any) -> list:
    """Steps that build a text-labelled Points layer's model, vispy visual and layer controls once,
    apart from any viewer (nothing drawn, nothing added): Python's first pass through napari's
    Points code then happens before a detection, not while its points are being added."""
    made: dict = {}

    def model() -> None:
        from napari.layers import Points

        made["layer"] = Points(np.zeros((1, 2)), features={"label": ["S"]},
                               text={"string": "{label}", "visible": False})

    def visual() -> None:
        from napari._vispy.utils.visual import create_vispy_layer

        create_vispy_layer(made["layer"], font_info).close()

    def controls() -> None:
        from napari._qt.layer_controls.qt_layer_controls_container import create_qt_layer_controls

        create_qt_layer_controls(made.pop("layer")).deleteLater()

    return [model, visual, controls]


def error_text(exc: BaseException) -> str:
    if isinstance(exc, GlimpseError):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"


def camera_of(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    cam = getattr(scene, "camera", None) if scene is not None else None
    return cam if cam is not None else viewer.camera


def image_path_of(layer: Any) -> Path | None:
    """The file an image layer was read from (our reader's metadata, or napari's source)."""
    md = getattr(layer, "metadata", None) or {}
    p = md.get("path")
    if not p:
        src = getattr(layer, "source", None)
        p = getattr(src, "path", None)
    return Path(p) if p else None


def set_layer_content(state: GlimpseState, layer: Any, content: dict, **attrs: Any) -> None:
    """Rewrite a landmarks Points layer in place (data, features, colours; ``attrs`` too).

    Quiet: the corrections widget does not take this for an edit.
    """
    # as many points as before: one refresh (slice, thumbnail) at the end, not one per setter (a
    # new count needs the new slice at once: the text follows the sliced points)
    block = getattr(layer, "_block_refresh", None) if len(layer.data) == len(content["data"]) else None
    with state.quiet(), (block() if block is not None else contextlib.nullcontext()):
        layer.selected_data = set()
        layer.data = content["data"]
        layer.features = content["features"]
        if len(content["data"]):
            _set_if_changed(layer, "face_color", content["face_color"])
            layer.border_color = content["border_color"]
            if "symbol" in content:
                _set_if_changed(layer, "symbol", content["symbol"])
        for k, v in attrs.items():
            _set_if_changed(layer, k, v)
    with state.quiet():
        layer.refresh()


def _set_if_changed(layer: Any, name: str, value: Any) -> None:
    """``setattr`` unless the layer already holds ``value`` (each Points setter redraws the markers)."""
    try:
        cur = getattr(layer, name)
        if name == "symbol":
            same = [str(getattr(s, "value", s)) for s in np.atleast_1d(cur)] == [str(v) for v in np.atleast_1d(value)]
        elif isinstance(value, (np.ndarray, float, int)):
            a, b = np.asarray(cur, dtype=np.float64), np.asarray(value, dtype=np.float64)
            same = (a.shape == b.shape or b.ndim == 0) and bool(np.allclose(a, b))
        else:
            same = cur == value
    except Exception:  # noqa: BLE001 values that do not compare: set them
        same = False
    if not same:
        setattr(layer, name, value)


def restyle(state: GlimpseState, layer: Any, content: dict) -> None:
    """Rewrite a landmarks layer's features and look (not its points, so the selection stays)."""
    with state.quiet():
        layer.features = content["features"]
        if len(content["data"]):
            layer.face_color = content["face_color"]
            layer.border_color = content["border_color"]
            layer.symbol = content["symbol"]


def log_states(log: CorrectionLog | None, image: Path | None, n_landmarks: int) -> np.ndarray:
    """``(K,)`` review state of each landmark of ``image`` in ``log`` (all proposed without one)."""
    from .._layer_data import review_states

    if log is None or image is None or not log.state.has_proposal(image):
        return review_states(n_landmarks)
    st = log.state
    return review_states(n_landmarks, st.corrected(image), st.absent(image), st.is_accepted(image))


def layer_positions(layer: Any, n_landmarks: int) -> np.ndarray:
    """``(K, 2)`` x, y of a landmarks Points layer by its ``index`` feature; NaN where missing.

    Points without a usable index, or repeating one, are ignored.
    """
    out = np.full((n_landmarks, 2), np.nan)
    data = np.asarray(layer.data, dtype=np.float64)
    feats = layer.features
    if "index" not in feats or len(data) == 0:
        return out
    seen = set()
    for row, idx in zip(data, np.asarray(feats["index"])):
        try:
            k = int(idx) - 1
        except (TypeError, ValueError):
            continue
        if 0 <= k < n_landmarks and k not in seen:
            seen.add(k)
            out[k] = row[-2:][::-1]
    return out


def focus_landmark(state: GlimpseState, k: int, zoom: float | None = None) -> bool:
    """Select landmark ``k`` (0-based) in the current points layer and centre the view on it."""
    det = state.current
    viewer = state.viewer
    if det is None or viewer is None or det.points_layer not in viewer.layers:
        return False
    layer = det.points_layer
    rows = np.nonzero(np.asarray(layer.features["index"]) == k + 1)[0] if "index" in layer.features else []
    if len(rows):
        r = int(rows[0])
        layer.selected_data = {r}
        cam = camera_of(viewer)
        cam.center = tuple(layer.data_to_world(layer.data[r]))
        if zoom is not None:
            cam.zoom = zoom
    state.select_landmark(k)
    return True


# a dock of ours shrinks to this height (then scrolls) so that several fit a laptop's screen
MIN_DOCK_HEIGHT = 200


class _DockScroll(QScrollArea):
    """Scrolls a dock's content up and down, never sideways: as wide as the content needs, as tall
    as it asks when there is room, down to :data:`MIN_DOCK_HEIGHT` when there is not."""

    def _bar(self) -> int:
        return self.verticalScrollBar().sizeHint().width()

    def minimumSizeHint(self) -> QSize:
        body = self.widget()
        if body is None:
            return super().minimumSizeHint()
        return QSize(body.minimumSizeHint().width() + self._bar(), min(body.sizeHint().height(), MIN_DOCK_HEIGHT))

    def sizeHint(self) -> QSize:
        body = self.widget()
        return super().sizeHint() if body is None else QSize(body.sizeHint().width() + self._bar(),
                                                              body.sizeHint().height())


def scroll_body(widget: QWidget) -> QVBoxLayout:
    """The layout for ``widget``'s content, inside a scroll area that fills it (its
    ``body_layout``): docks that do not fit the screen's height scroll instead of pushing napari's
    window past the screen's bottom."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = _DockScroll(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    body = QWidget()
    area.setWidget(body)
    outer.addWidget(area)
    widget.body_layout = QVBoxLayout(body)
    return widget.body_layout
