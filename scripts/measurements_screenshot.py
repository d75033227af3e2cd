#!/usr/bin/env python
"""Screenshot of the Measurements panel with its lines on a real cephalogram (docs/measurements_panel.png).

Run under a display: ``xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/measurements_screenshot.py``.
The shipped model detects the landmarks of image 151; the panel shows their measurements, the
likely ranges from the model's per-landmark uncertainty, and draws the lines.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2015"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", type=Path, default=DATA / "images" / "151.jpg")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements_panel.png")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*PyQt5 backend.*")
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    import napari
    import napari._qt.qt_main_window as qmw
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"
    qmw.SHOW_QT_WARNING = False
    from napari_glimpse._layer_data import landmarks_layer
    from napari_glimpse._widgets._measurements import MeasurementsWidget
    from napari_glimpse._widgets._state import Detection, camera_of, state_for
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import read_image

    viewer = napari.Viewer(title="napari-glimpse")
    viewer.window._qt_window.resize(1700, 1050)
    img = read_image(a.image)
    image_layer = viewer.add_image(img, name=a.image.stem)
    traj = GlimpseModel.load().predict(img)
    data, kw, _ = landmarks_layer(traj, image_path=a.image)
    points = viewer.add_points(data, **kw)
    widget = MeasurementsWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Measurements", area="right")
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([dock], [560], Qt.Horizontal)
    state_for(viewer).set_current(Detection(a.image.name, a.image, image_layer, points, traj, "default",
                                            tuple(traj.landmark_names)))
    widget.lines_box.setChecked(True)
    viewer.layers.selection.active = points
    cam = camera_of(viewer)
    cam.center = (1450, 1050)
    cam.zoom = 0.42
    for _ in range(30):
        app.processEvents()
        time.sleep(0.05)
    viewer.screenshot(str(a.out), canvas_only=False)
    print(f"wrote {a.out}")
    viewer.close()


if __name__ == "__main__":
    main()
