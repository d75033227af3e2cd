"""The README's pictures of the napari-glimpse widgets (docs/*.png, explorer.gif): ISBI image 151, shipped model.

All: ``xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots.py``; ``--only explorer,finetune``: some
(names in ``SHOTS``). The image is read through a symlink in a temporary folder, so the corrections log, the
export and the fine-tuned model go there. ``viewer.screenshot(canvas_only=False)`` grabs the whole window;
``review_states.png`` puts crops of two grabs (before and after Accept) side by side. ``glimpse_journey`` (last:
it detects again, with the glimpse-only model of ``--glimpse-model``) shows that model's journey from the mean start
to two landmarks, the doctors' labels of the image loaded (glimpse_journey.gif, .png).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import napari
import napari._qt.qt_main_window as qmw
import numpy as np
from napari.settings import get_settings
from PIL import Image, ImageDraw, ImageFont
from qtpy.QtCore import QPoint, Qt
from qtpy.QtWidgets import QApplication, QLabel, QPushButton

from napari_glimpse import _layer_data as ld
from napari_glimpse._widgets._explorer import MEAN
from napari_glimpse._widgets._state import camera_of, layer_positions
from napari_glimpse.io import read_landmarks_csv, write_landmarks_csv

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "isbi2015"
SHOTS = ("review_proposed", "measurements_panel", "explorer_fine", "explorer", "review_states", "finetune",
         "glimpse_journey")
DETECT, REVIEW, EXPLORER, MEASURE, FINETUNE = ("Detect landmarks", "Review and corrections", "Glimpse explorer",
                                                "Measurements", "Fine-tune")
WINDOW, CROP = (1700, 1050), 540
CHIN = (6, 7, 8, 10, 11, 13)  # Pog, Me, Gn, LIT, UIT, LL (0-based ISBI landmarks; present, B moves)
DRAGGED, ABSENT = 5, 15  # the review drags B point and marks soft-tissue pogonion absent
JOURNEY = ("Sella", "Menton")  # the glimpse journeys shown: one landmark up in the skull base, one at the chin
JOURNEY_STEPS, JOURNEY_TOP, JOURNEY_STILL = 5, 2, 1  # steps; levels 0..2 drawn (the view fits them); still: step 2


class Session:
    """One viewer, the five widgets docked, 151.jpg detected; showing docks, grabbing, waiting."""

    def __init__(self, image: Path, out: Path, model: str | None = None):
        self.app = QApplication.instance() or QApplication([])
        get_settings().application.gui_notification_level = "none"
        qmw.SHOW_QT_WARNING = False  # a toast about PyQt5 would cover the canvas
        self.out, self.viewer, self.det = out, napari.Viewer(title="napari-glimpse"), None
        self.win, self.qt_viewer = self.viewer.window._qt_window, self.viewer.window._qt_viewer
        added = {n: self.viewer.window.add_plugin_dock_widget("napari-glimpse", n)
                 for n in (DETECT, REVIEW, EXPLORER, MEASURE, FINETUNE)}
        self.docks, self.w = {n: d for n, (d, _) in added.items()}, {n: w for n, (_, w) in added.items()}
        self.show(DETECT)
        self.viewer.open(str(image), plugin="napari-glimpse")
        self.model = None  # the shipped model, unless ``model`` (e.g. only the glimpse journey is shot)
        if model is not None:
            self.use_model(model)
        self.det = self.wait(self.w[DETECT].detected, self.w[DETECT].detect)
        self.layer = self.det.points_layer

    def use_model(self, model: str) -> None:
        """Choose Detect's model as a user does: the 'Glimpse' button for the packaged ``glimpse``, else
        the path typed into the checkpoint field."""
        detect = self.w[DETECT]
        if model == "glimpse":
            next(b for b in detect.findChildren(QPushButton) if b.text() == "Glimpse").click()
        else:
            detect.model_edit.setText(model)
            detect.model_edit.editingFinished.emit()
        self.model = model

    def pump(self, seconds: float = 0.5) -> None:
        self.until(lambda end=time.time() + seconds: time.time() >= end)

    def until(self, done, timeout: float = 1800) -> None:
        t = time.time()
        while not done() and time.time() - t < timeout:
            self.app.processEvents()
            time.sleep(0.01)
        if not done():
            raise SystemExit(f"timed out after {timeout:g} s")

    def wait(self, signal, start):
        """Call ``start``, then run the event loop until ``signal`` (of one argument) fires; its argument."""
        got: list = []
        signal.connect(got.append)
        start()
        self.until(lambda: got)
        return got[0]

    def show(self, *names: str, across: bool = False) -> None:
        """Only the docks ``names``: stacked, or ``across`` side by side (napari's layer docks hidden)."""
        for name, dock in self.docks.items():
            dock.setVisible(name in names)
        shown = [self.docks[n] for n in names]
        for dock in shown[1:]:
            self.win.splitDockWidget(shown[0], dock, Qt.Horizontal if across else Qt.Vertical)
        for side in (self.qt_viewer.dockLayerList, self.qt_viewer.dockLayerControls):
            side.setVisible(not across)
        for _ in range(2):  # the window shrinks once the hidden docks have left the layout
            self.win.resize(*WINDOW)
            self.pump(0.3)
        self.win.resizeDocks(shown, [560, 400] if across else [560] * len(shown), Qt.Horizontal)
        if self.det is not None:
            self.viewer.layers.selection.active = self.layer
        self.pump(0.8)

    def grab(self, name: str | None = None) -> np.ndarray:
        """The whole window as RGB (also written to ``name`` in the output folder)."""
        self.pump(0.5)
        path = str(self.out / name) if name else None
        img = np.asarray(self.viewer.screenshot(path, canvas_only=False, flash=False))[..., :3]
        if name:
            print("wrote", path)
        return img

    def rect(self, widget) -> tuple[int, int, int, int]:  # x, y, width, height in the window's grab
        p = widget.mapTo(self.win, QPoint(0, 0))
        return p.x(), p.y(), widget.width(), widget.height()

    def canvas_square(self) -> tuple[int, int, int]:
        """``(x, y, side)``: the middle square of the canvas that review_states crops."""
        x, y, w, h = self.rect(self.qt_viewer.canvas._scene_canvas.native)
        side = min(w, h, CROP)
        return x + (w - side) // 2, y + (h - side) // 2, side


def review_proposed(s: Session) -> None:
    """The proposal, the whole image in view; the Detect table beside the Review widget."""
    s.show(DETECT, REVIEW, across=True)
    s.viewer.reset_view()
    s.grab("review_proposed.png")


def measurements_panel(s: Session) -> None:
    s.show(MEASURE)
    s.w[MEASURE].lines_box.setChecked(True)
    s.viewer.layers.selection.active = s.layer  # the lines layer came on top: the points stay draggable
    camera_of(s.viewer).center, camera_of(s.viewer).zoom = (1250, 1050), 0.42
    s.grab("measurements_panel.png")
    s.w[MEASURE].lines_box.setChecked(False)


def explorer(s: Session, view: str, gif: bool = False) -> None:
    """Stage view (explorer_fine.png): the landmark the fine look moved furthest among those whose window
    has contrast. Glimpse view (explorer.png, .gif): the least confident landmark's 3 steps from the
    proposal, computed in a worker (steps_ready), step 1 shown."""
    ex, traj = s.w[EXPLORER], s.det.trajectory
    s.show(EXPLORER)
    if view == "stages":
        moved = np.linalg.norm(traj.fine_positions[0] - traj.coarse_positions, axis=-1)
        contrast = traj.fine_windows[0, :, 0].reshape(len(moved), -1).std(-1)
        ex.set_view("stages")
        ex.set_landmark(int(np.argmax(np.where(contrast > 30, moved, 0))))
        focus, name = {"context": 1}, "explorer_fine.png"
    else:
        ex.set_landmark(int(np.argmin(traj.confidence)))
        s.wait(ex.steps_ready, lambda: ex.set_view("glimpses"))
        ex.set_iteration(0)
        ex.max_level.setValue(3)
        focus, name = {"level": 1}, "explorer.png"
    s.layer.visible = False  # its rings would cover the answers, the estimates
    s.pump()
    ex.focus(**focus)
    s.grab(name)
    if gif:
        print("wrote", ex.export(s.out / "explorer.gif", fps=1.2))
    s.layer.visible = True


def review_states(s: Session, save: bool, tmp: Path) -> Path:
    """Drag B point and mark Pog' absent (left pane), then accept (right); returns the review's export."""
    corr, detect = s.w[REVIEW], s.w[DETECT]
    s.show(DETECT, REVIEW, across=True)
    row = int(np.nonzero(np.asarray(s.layer.features["index"]) == DRAGGED + 1)[0][0])
    data = s.layer.data.copy()
    data[row] += (11.0, -4.0)  # to the doctors' mean (ISBI labels), as a drag ends: logged
    s.layer.data = data
    s.pump()
    corr.mark_absent(ABSENT)
    detect.table.sortItems(2, Qt.DescendingOrder)  # corrected and absent rows (no confidence) on top
    s.layer.selected_data = set()
    pos = layer_positions(s.layer, len(s.det.landmark_names))[list(CHIN)][:, ::-1]  # y, x
    cam = camera_of(s.viewer)  # the chin region fills the middle square
    cam.center, cam.zoom = tuple((pos.min(0) + pos.max(0)) / 2), s.canvas_square()[2] / (np.ptp(pos, 0).max() * 1.3)
    before = s.grab()
    corr.accept()
    after = s.grab()
    if save:
        keys = next(w for w in corr.findChildren(QLabel) if "Shift-X" in w.text())
        compose(s, [(before, detect.table, 150, "B dragged (B*), Pog' marked absent"),
                    (after, keys, 400, "after Accept image: every marker a dot (ok)")], s.out / "review_states.png")
    return corr.export(tmp / "reviewed.csv")


def compose(s: Session, panes: list, path: Path) -> None:
    """Panes side by side, each a caption, the canvas's middle square and a widget (at most ``h`` high) under it."""
    x0, y0, side = s.canvas_square()
    font = ImageFont.load_default(size=18)
    tiles = []
    for grab, widget, h, caption in panes:
        wx, wy, ww, wh = s.rect(widget)
        wh = min(wh, h)  # the table's top rows
        tile = Image.new("RGB", (max(side, ww), 42 + side + wh), (38, 41, 48))
        ImageDraw.Draw(tile).text((8, 8), caption, fill=(235, 235, 235), font=font)
        tile.paste(Image.fromarray(grab[y0:y0 + side, x0:x0 + side]), (0, 36))
        tile.paste(Image.fromarray(grab[wy:wy + wh, wx:wx + ww]), (0, 42 + side))
        tiles.append(tile)
    out = Image.new("RGB", (sum(t.width + 10 for t in tiles) - 10, max(t.height for t in tiles)), (20, 22, 26))
    for i, t in enumerate(tiles):
        out.paste(t, (sum(u.width + 10 for u in tiles[:i]), 0))
    out.save(path)
    print("wrote", path)


def finetune(s: Session, csv: Path, steps: int, minutes: float, tmp: Path) -> None:
    """A few steps on the review's export, grabbed as the int8 graphs are remade: the overall bar
    with its ETA and each stage's loss, all plotted by then."""
    ft, lines, ended = s.w[FINETUNE], [], []
    s.show(FINETUNE)
    s.viewer.reset_view()
    ft.set_data(str(csv))
    ft.steps.value, ft.minutes.value = steps, minutes
    ft.out_edit.value = str(tmp / "finetuned.pt")
    ft.progressed.connect(lines.append)
    ft.finished.connect(lambda *args: ended.append(args))
    ft.start()
    s.until(lambda: ended or any(ln.get("stage") == "int8" for ln in lines))
    s.grab("finetune.png")
    s.until(lambda: ended)
    print("fine-tune:", ended[0], ft.status_label.text())  # (use_new_model() would load it in a thread)


def open_truth(s: Session, image: Path, tmp: Path) -> Path:
    """The doctors' labels of ``image`` (the mean of the senior's and the junior's, Test1 or Train) as a
    Kaggle-layout CSV in ``tmp``, opened in the viewer (the explorer's error to the truth), hidden."""
    for split in ("test1", "train"):
        both = [read_landmarks_csv(DATA / f"{split}_{who}.csv") for who in ("senior", "junior")]
        rows = [names.index(image.name) for names, _ in both if image.name in names]
        if len(rows) == 2:
            truth = (both[0][1][rows[0]] + both[1][1][rows[1]]) / 2
            break
    else:
        raise SystemExit(f"no labels of {image.name} in {DATA}")
    csv = tmp / f"{image.stem}_truth.csv"
    write_landmarks_csv(csv, [image.name], truth[None])
    (layer,) = s.viewer.open(str(csv), plugin="napari-glimpse")
    layer.visible = False  # the explorer draws the truth of the landmark explored
    s.pump()
    return csv


def frame_journey(s: Session, traj, truth: np.ndarray | None, top: int) -> None:
    """Centre the view on a journey: every estimate, the truth and the level-``top`` windows around them."""
    pos = traj.positions[:, 0].astype(np.float64)
    half = traj.patch * 2**top / 2 / np.asarray(traj.model_scale, dtype=np.float64)
    pts = np.vstack([pos - half, pos + half] + ([truth[None]] if truth is not None else []))
    lo, hi = pts.min(0), pts.max(0)  # x, y in image pixels
    img = s.det.image_layer
    scale, tr = np.asarray(img.scale)[-2:], np.asarray(img.translate)[-2:]
    h, w = s.qt_viewer.canvas.size
    cam = camera_of(s.viewer)
    cam.center = tuple(((lo + hi) / 2)[::-1] * scale + tr)
    cam.zoom = 0.95 * min(h / ((hi - lo)[1] * scale[0]), w / ((hi - lo)[0] * scale[1]))


def journey_frames(s: Session, k: int, steps: int) -> list[np.ndarray]:
    """Landmark ``k``'s glimpse journey from the mean start, one labelled canvas frame per step."""
    ex = s.w[EXPLORER]
    ex.set_landmark(k)
    s.until(lambda: ex.glimpse_traj() is not None and not ex.busy(), timeout=600)
    traj = ex.glimpse_traj()
    if traj.iterations != steps:
        raise SystemExit(f"the explorer computed {traj.iterations} steps of {steps}")
    ex.max_level.setValue(top := min(JOURNEY_TOP, ex.max_level.maximum()))
    truth = ex.truth()
    frame_journey(s, traj, truth[k] if truth is not None and np.isfinite(truth[k]).all() else None, top)
    s.pump()
    frames = ex.frames("canvas")
    for lines in ex.last_captions:
        print("  " + " | ".join(lines))
    return frames


def glimpse_journey(s: Session, model: str, tmp: Path, gif: bool = True) -> None:
    """The glimpse-only model's journey from the mean start to two landmarks (``JOURNEY``), the doctors'
    labels loaded: glimpse_journey.gif (the steps of one, then of the other) and .png (a step of the last)."""
    ex, detect = s.w[EXPLORER], s.w[DETECT]
    if s.model != model:  # the shots before used the shipped model: detect again
        s.use_model(model)
        detect.replace_check.setChecked(True)  # the review shot's corrections are not kept
        s.det = s.wait(detect.detected, detect.detect)
        s.layer = s.det.points_layer
    open_truth(s, Path(s.det.image_name), tmp)
    s.show(EXPLORER)
    ex.set_view("glimpses")
    ex.hm_check.setChecked(False)  # the windows, the arrow and the path; no trunk channel over them
    ex.steps.setValue(JOURNEY_STEPS)
    ex.origin.setCurrentIndex(ex.origin.findData(MEAN))
    s.layer.visible = False  # its rings would cover the journey
    frames = []
    for name in JOURNEY:
        got = journey_frames(s, list(s.det.landmark_names).index(name), JOURNEY_STEPS)
        frames += got + [got[-1]]  # the answer held, then the next landmark
    ex.set_iteration(JOURNEY_STILL)
    s.pump()
    s.grab("glimpse_journey.png")
    if gif:
        print("wrote", ld.write_animation(ld.same_size(frames), s.out / "glimpse_journey.gif", fps=1.0, hold_last=2))
    s.layer.visible = True


def glimpse_model_missing(model: str) -> str | None:
    """Why ``--glimpse-model`` cannot be loaded (its file is missing), or ``None``."""
    from napari_glimpse.errors import GlimpseError
    from napari_glimpse.inference import resolve_model

    try:
        path = resolve_model(model)
    except GlimpseError as exc:
        return str(exc)
    return None if path.is_file() else f"no model file {path}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", type=Path, default=DATA / "images" / "151.jpg")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--only", default=",".join(SHOTS), help=f"comma-separated subset of {', '.join(SHOTS)}")
    ap.add_argument("--no-gif", action="store_true", help="explorer, glimpse_journey: leave the GIFs as they are")
    ap.add_argument("--finetune-steps", type=int, default=5)
    ap.add_argument("--finetune-minutes", type=float, default=4.0)
    ap.add_argument("--glimpse-model", default="glimpse", help="glimpse_journey: the glimpse-only model (a .pt file, "
                    "or the packaged name 'glimpse', chosen with Detect's 'Glimpse' button)")
    a = ap.parse_args()
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    if only - set(SHOTS):
        ap.error(f"unknown shots {sorted(only - set(SHOTS))}: choose from {', '.join(SHOTS)}")
    if "glimpse_journey" in only and (missing := glimpse_model_missing(a.glimpse_model)):
        if a.only != ap.get_default("only"):
            ap.error(missing)
        print(f"glimpse_journey left out: {missing}")
        only.discard("glimpse_journey")
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="glimpse-shots-"))
    (image := tmp / a.image.name).symlink_to(a.image.resolve())  # the corrections log goes beside it
    s = Session(image, a.out.resolve(), a.glimpse_model if only == {"glimpse_journey"} else None)
    try:
        for name, shot in (("review_proposed", review_proposed), ("measurements_panel", measurements_panel),
                           ("explorer_fine", lambda s: explorer(s, "stages")),
                           ("explorer", lambda s: explorer(s, "glimpses", gif=not a.no_gif))):
            if name in only:
                shot(s)
        if only & {"review_states", "finetune"}:  # the fine-tune learns from the review's export
            csv = review_states(s, "review_states" in only, tmp)
            if "finetune" in only:
                finetune(s, csv, a.finetune_steps, a.finetune_minutes, tmp)
        if "glimpse_journey" in only:  # last: it detects again, with the glimpse-only model
            glimpse_journey(s, a.glimpse_model, tmp, gif=not a.no_gif)
    finally:
        s.viewer.close()
        shutil.rmtree(tmp, ignore_errors=True)  # the log, the export, the fine-tuned model
    return 0


if __name__ == "__main__":
    sys.exit(main())
