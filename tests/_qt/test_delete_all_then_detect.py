"""Deleting every layer and detecting again, ten times, does not crash napari.

On software GL (Mesa llvmpipe under Xvfb) napari crashes in ``glDrawArrays`` when text-labelled
points are added after such layers were removed with their text on screen; before the guard in
``GlimpseState`` this sequence crashed by its third round. It runs in a subprocess, so a
segfault fails the test instead of killing pytest.
"""

from __future__ import annotations

import textwrap

from ._env import require_gui, run_gui_script

require_gui()

ROUNDS = 10

SCRIPT = textwrap.dedent(
    r"""
    import sys, time
    model, image, log, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import napari
    from qtpy.QtWidgets import QApplication
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    _dock, detect = viewer.window.add_plugin_dock_widget("napari-glimpse", "Detect landmarks")
    _dock, _review = viewer.window.add_plugin_dock_widget("napari-glimpse", "Review and corrections")
    detect.set_model(model)
    detect.device_combo.setCurrentText("cpu")
    detect.state.open_log(log)

    def pump(n=20):
        for _ in range(n):
            app.processEvents(); time.sleep(0.01)

    for i in range(rounds):
        viewer.open(image, plugin="napari-glimpse"); pump()
        done = []
        detect.detected.connect(done.append)
        detect.detect()
        t0 = time.time()
        while not done and time.time() - t0 < 120:
            app.processEvents(); time.sleep(0.005)
        detect.detected.disconnect()
        assert done, "no detection: " + detect.status_label.text()
        assert done[0].points_layer.text.visible
        pump()
        viewer.layers.select_all(); viewer.layers.remove_selected(); pump()
        assert len(viewer.layers) == 0
        print("round", i, flush=True)
    viewer.close()
    print("ok", flush=True)
    """
)


def test_delete_all_layers_then_detect_ten_times(isbi, isbi_model_path, tmp_path):
    r, tail = run_gui_script(SCRIPT, lambda img: [isbi_model_path, img, tmp_path / "log.jsonl", ROUNDS],
                             tmp_path, isbi, timeout=600)
    assert r.stdout.count("round") == ROUNDS and "ok" in r.stdout, tail
