"""Importing the widgets and detecting *after* a napari canvas exists must not crash (OpenCV,
which builds the pyramids, is first loaded then too).

Here, importing torchvision (or anything that loads torch._dynamo / triton) once a napari
canvas is up segfaults. The widget path must import none of it. This runs in a subprocess, so
a segfault fails the test instead of killing pytest.
"""

from __future__ import annotations

import textwrap

from ._env import require_gui, run_gui_script

require_gui()

SCRIPT = textwrap.dedent(
    r"""
    import sys, time
    model, image = sys.argv[1], sys.argv[2]
    from qtpy.QtWidgets import QApplication
    app = QApplication.instance() or QApplication([])
    import napari
    import numpy as np
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((64, 64), np.uint8), name="warm-up")
    for _ in range(20):
        app.processEvents(); time.sleep(0.01)
    print("canvas up", flush=True)

    # only now: the plugin's widgets, as napari's Plugins menu would import them
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._explorer import ExplorerWidget
    from napari_glimpse._widgets._corrections import CorrectionsWidget
    from napari_glimpse._widgets._finetune import FinetuneWidget
    from napari_glimpse._widgets._annotate import AnnotateWidget
    from napari_glimpse._widgets._train import TrainWidget
    import torch
    torch.set_num_threads(1)
    detect = DetectWidget(viewer)
    explorer = ExplorerWidget(viewer)
    corrections = CorrectionsWidget(viewer)
    finetune = FinetuneWidget(viewer)
    annotate, train = AnnotateWidget(viewer), TrainWidget(viewer)
    for w in (detect, explorer, corrections, finetune, annotate, train):
        viewer.window.add_dock_widget(w)
    viewer.open(image, plugin="napari-glimpse")
    detect.set_model(model)
    done = []
    detect.detected.connect(done.append)
    detect.set_image_layer(viewer.layers[-1].name)
    detect.detect()
    t0 = time.time()
    while not done and time.time() - t0 < 240:
        app.processEvents(); time.sleep(0.01)
    assert done, "no detection: " + detect.status_label.text()
    assert len(done[0].points_layer.data) == 19
    # the shipped default runs its int8 graphs (ONNX Runtime), here too first loaded after the canvas
    from napari_glimpse.inference import GlimpseModel
    default = GlimpseModel.load(None, "cpu")
    assert default.int8_nets == (5, 5), default.int8_nets
    points = default.predict(image).final
    assert points.shape == (19, 2) and np.isfinite(points).all(), points
    explorer.set_landmark(3); explorer.set_iteration(1)
    for _ in range(20):
        app.processEvents(); time.sleep(0.01)
    bad = [m for m in ("torchvision", "torch._dynamo", "triton", "torch._inductor", "torch.onnx") if m in sys.modules]
    assert not bad, f"the widget path imported {bad}"
    assert "cv2" in sys.modules  # the pyramid (OpenCV) was first loaded after the canvas, too
    viewer.close()
    print("ok", flush=True)
    """
)


def test_widgets_after_canvas_do_not_crash(isbi, isbi_model_path, tmp_path):
    r, tail = run_gui_script(SCRIPT, lambda img: [isbi_model_path, img], tmp_path, isbi, timeout=420)
    assert "ok" in r.stdout, tail
