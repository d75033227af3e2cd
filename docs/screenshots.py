"""Screenshots of the napari widgets on a real cephalogram (docs/*.png, docs/glimpse.gif).

Run under a display (here: ``xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots.py
--model MODEL``). ``viewer.screenshot(canvas_only=False)`` grabs the whole window; the corrections
log and the fine-tuned model go to a temporary folder. ``--only explorer_fine,explorer`` makes
only those (names: detect, explorer_fine, explorer (with glimpse.gif), corrections, finetune).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "isbi2015"
SHOTS = ("detect", "explorer_fine", "explorer", "corrections", "finetune")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint (default: the shipped model)")
    ap.add_argument("--image", default=str(DATA / "images" / "151.jpg"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--finetune-steps", type=int, default=30)
    ap.add_argument("--only", default=",".join(SHOTS), help=f"comma-separated subset of {', '.join(SHOTS)}")
    a = ap.parse_args()
    only_shots = {x.strip() for x in a.only.split(",") if x.strip()}
    if only_shots - set(SHOTS):
        ap.error(f"unknown screenshots {sorted(only_shots - set(SHOTS))}: choose from {', '.join(SHOTS)}")
    if "finetune" in only_shots:
        only_shots.add("corrections")  # fine-tunes on the reviewed labels the corrections shot exports
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="glimpse-shots-"))
    image = tmp / Path(a.image).name
    image.symlink_to(Path(a.image).resolve())  # the log goes beside the image: keep it out of the data

    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend.*")
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    import napari
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"
    import napari._qt.qt_main_window as qmw

    qmw.SHOW_QT_WARNING = False  # a toast about PyQt5 would cover the canvas
    viewer = napari.Viewer(title="napari-glimpse")
    viewer.window._qt_window.resize(1700, 1050)

    from napari_glimpse._widgets._corrections import CorrectionsWidget
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._explorer import ExplorerWidget
    from napari_glimpse._widgets._finetune import FinetuneWidget
    from napari_glimpse._widgets._state import camera_of

    def pump(seconds: float = 0.3) -> None:
        t = time.time()
        while time.time() - t < seconds:
            app.processEvents()
            time.sleep(0.01)

    def wait(flag: list, timeout: float = 600) -> None:
        t = time.time()
        while not flag and time.time() - t < timeout:
            app.processEvents()
            time.sleep(0.01)
        if not flag:
            raise SystemExit("timed out")

    widgets = {
        "Detect landmarks": DetectWidget(viewer),
        "Glimpse explorer": ExplorerWidget(viewer),
        "Review and corrections": CorrectionsWidget(viewer),
        "Fine-tune": FinetuneWidget(viewer),
    }
    docks = {name: viewer.window.add_dock_widget(w, name=name, area="right", tabify=True)
             for name, w in widgets.items()}
    for d in docks.values():
        d.setMinimumWidth(470)

    def only(name: str) -> None:
        docks[name].raise_()
        viewer.window._qt_window.resize(1700, 1050)
        pump(0.5)

    def close() -> int:
        """Close the viewer and say what was written (the exit when the asked-for shots are done)."""
        viewer.close()
        print("wrote", ", ".join(sorted(f"{n}.png" for n in only_shots)))
        return 0

    detect, explorer, corr, ft = widgets.values()
    viewer.open(str(image), plugin="napari-glimpse")
    detect.set_model(a.model)
    done: list = []
    detect.detected.connect(done.append)
    detect.detect()
    wait(done)
    det = done[0]
    print(f"detect: {det.seconds:.2f} s click to points")
    if "detect" in only_shots:
        only("Detect landmarks")
        viewer.reset_view()
        pump(0.8)
        viewer.screenshot(str(out / "detect.png"), canvas_only=False, flash=False)

    if "explorer_fine" in only_shots:
        # explorer, stage view: what the shipped model's answer is made of (coarse answer, one fine
        # look), for the landmark the fine look moved furthest among those whose window has contrast
        # (on 151.jpg Porion's is burnt out)
        traj = det.trajectory
        moved = np.linalg.norm(traj.fine_positions[0] - traj.coarse_positions, axis=-1)
        contrast = traj.fine_windows[0, :, 0].reshape(len(moved), -1).std(-1)
        k = int(np.argmax(np.where(contrast > 30, moved, 0)))
        only("Glimpse explorer")
        explorer.set_view("stages")
        explorer.set_landmark(k)
        explorer.focus(context=1)
        camera_of(viewer).zoom *= 1.4  # the second window's outline just in view, the move longer
        det.points_layer.visible = False  # its markers would cover the coarse and fine points
        viewer.layers.selection.active = explorer.layers["stage heatmap"]
        pump(0.8)
        viewer.screenshot(str(out / "explorer_fine.png"), canvas_only=False, flash=False)
        det.points_layer.visible = True

    if not only_shots & {"explorer", "corrections", "finetune"}:
        return close()

    # explorer: the glimpse steps (the shipped model answers with its coarse stage alone, so ask
    # for 3 steps), the landmark whose first step is longest, iteration 1
    if det.trajectory.iterations < 1:
        detect.iter_spin.setValue(3)
        done.clear()
        detect.detect()
        wait(done)
        det = done[0]
    traj = det.trajectory
    k = int(np.argmax(np.linalg.norm(traj.positions[1] - traj.positions[0], axis=-1)))
    only("Glimpse explorer")
    explorer.set_view("glimpses")
    explorer.set_landmark(k)
    explorer.set_iteration(0)
    explorer.max_level.setValue(4)
    explorer.hm_level.setValue(1)
    explorer.focus(level=2)
    det.points_layer.opacity = 0.45  # the glimpse under the markers
    pump(0.8)
    if "explorer" in only_shots:
        viewer.screenshot(str(out / "explorer.png"), canvas_only=False, flash=False)
        frames = explorer.frames()
        from PIL import Image

        from napari_glimpse._layer_data import write_animation

        small = []
        for f in frames:
            im = Image.fromarray(np.asarray(f)[..., :3])
            im.thumbnail((560, 560))
            small.append(np.asarray(im))
        write_animation(small, out / "glimpse.gif", fps=1.2, hold_last=2)
    det.points_layer.opacity = 1.0
    if not only_shots & {"corrections", "finetune"}:
        return close()

    # corrections: move the least confident landmark a little, undo, redo, accept, export
    only("Review and corrections")
    kq = corr.next_landmark()
    layer = det.points_layer
    row = int(np.nonzero(np.asarray(layer.features["index"]) == kq + 1)[0][0])
    d = layer.data.copy()
    d[row] += (18.0, -12.0)
    layer.data = d
    corr.undo()
    corr.redo()
    corr.next_landmark()
    corr.accept()
    csv = corr.export(tmp / "reviewed.csv")
    cam = camera_of(viewer)
    cam.center = tuple(layer.data[row])
    cam.zoom = 1.2
    layer.selected_data = {row}
    pump(0.8)
    viewer.screenshot(str(out / "corrections.png"), canvas_only=False, flash=False)
    if "finetune" not in only_shots:
        return close()

    # fine-tune a few steps in the background, then switch detection to the new model
    only("Fine-tune")
    viewer.reset_view()
    ft.set_data(str(csv))
    ft.steps.setValue(a.finetune_steps)
    ft.batch.setValue(16)
    ft.out_edit.setText(str(tmp / "finetuned.pt"))
    fin: list = []
    ft.finished.connect(lambda code, path: fin.append((code, path)))
    ft.start()
    wait(fin)
    print("fine-tune:", fin[0], ft.status_label.text())
    ft.use_new_model()
    pump(0.8)
    viewer.screenshot(str(out / "finetune.png"), canvas_only=False, flash=False)
    viewer.close()
    print("wrote", sorted(p.name for p in out.glob("*.png")), "and glimpse.gif")
    return 0


if __name__ == "__main__":
    sys.exit(main())
