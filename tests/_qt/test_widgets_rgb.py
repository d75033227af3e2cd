"""Detect on an RGB(A) image layer: a JPEG dropped on napari with its builtins reader preselected
becomes an RGB layer; Detect reads it as grey exactly as the plugin's reader reads the file."""

from __future__ import annotations

import numpy as np

from ._env import require_gui

require_gui()


def _detect_on(detect, qtbot, name: str):
    detect.set_image_layer(name)
    assert detect.layer_combo.currentText() == name
    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        detect.detect(start=False).start()
    return b.args[0]


def test_detect_on_an_rgb_and_an_rgba_layer_as_on_the_grey_file(make_napari_viewer, qtbot, isbi, isbi_model_path,
                                                                  tmp_path):
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._state import state_for

    viewer = make_napari_viewer()
    image = tmp_path / "151.jpg"
    image.symlink_to(isbi / "images" / "151.jpg")  # the default log stays out of the data
    detect = DetectWidget(viewer)
    viewer.window.add_dock_widget(detect)
    state_for(viewer).open_log(tmp_path / "log.jsonl", image_dir=tmp_path)
    detect.set_model(isbi_model_path)
    detect.device_combo.setCurrentText("cpu")

    grey_layer = viewer.open(str(image), plugin="napari-glimpse")[0]
    assert grey_layer.data.ndim == 2 and not grey_layer.rgb
    grey = _detect_on(detect, qtbot, grey_layer.name)

    rgb_layer = viewer.open(str(image), plugin="napari")[0]  # napari's builtins reader
    assert rgb_layer.rgb and rgb_layer.data.shape == (2400, 1935, 3)
    rgb_layer.name = "151 rgb"
    rgb = _detect_on(detect, qtbot, "151 rgb")
    assert rgb.image_layer is rgb_layer and len(rgb.points_layer.data) == 19
    np.testing.assert_array_equal(rgb.trajectory.final, grey.trajectory.final)
    assert "19 landmarks on 151.jpg" in detect.status_label.text()
    assert detect.progress.format() == "done"

    alpha = np.full(rgb_layer.data.shape[:2] + (1,), 255, dtype=np.uint8)
    viewer.add_image(np.concatenate([np.asarray(rgb_layer.data), alpha], axis=-1), rgb=True, name="151 rgba")
    rgba = _detect_on(detect, qtbot, "151 rgba")
    assert rgba.image_path is None and rgba.points_layer.data.shape == (19, 2)
    np.testing.assert_array_equal(rgba.trajectory.final, grey.trajectory.final)
