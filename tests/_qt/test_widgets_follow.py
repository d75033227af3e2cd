"""Detect runs on the image the user is looking at: the newly opened one, or the selected one."""

from __future__ import annotations

from ._env import require_gui

require_gui()


def test_detect_follows_the_newly_opened_and_the_selected_image(make_napari_viewer, qtbot, isbi,
                                                                isbi_model_path, tmp_path):
    from napari_glimpse._widgets._state import image_path_of

    viewer = make_napari_viewer()
    _dock, detect = viewer.window.add_plugin_dock_widget("napari-glimpse", "Detect landmarks")
    detect.set_model(isbi_model_path)
    detect.device_combo.setCurrentText("cpu")
    detect.state.open_log(tmp_path / "log.jsonl", image_dir=isbi / "images")
    first, second = isbi / "images" / "151.jpg", isbi / "images" / "152.jpg"
    viewer.open(str(first), plugin="napari-glimpse")
    viewer.open(str(second), plugin="napari-glimpse")
    assert detect.layer_combo.currentText() == "152"

    worker = detect.detect(start=False)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        worker.start()
    assert image_path_of(blocker.args[0].image_layer) == second

    viewer.layers.selection.active = viewer.layers["151"]
    assert detect.layer_combo.currentText() == "151"
    worker = detect.detect(start=False)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        worker.start()
    assert image_path_of(blocker.args[0].image_layer) == first


def test_an_image_opened_by_hand_leaves_the_folder(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path):
    viewer = make_napari_viewer()
    _dock, detect = viewer.window.add_plugin_dock_widget("napari-glimpse", "Detect landmarks")
    detect.set_model(isbi_model_path)
    folder = tmp_path / "site"
    folder.mkdir()
    for n in ("151.jpg", "152.jpg"):
        (folder / n).symlink_to(isbi / "images" / n)
    detect.auto_check.setChecked(False)
    worker = detect.open_folder(folder, start=False)
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        worker.start()
    assert len(detect.folder_images) == 2
    viewer.open(str(isbi / "images" / "153.jpg"), plugin="napari-glimpse")
    assert detect.folder_images == [] and detect.layer_combo.currentText() == "153"
    assert detect.layer_combo.isEnabled()
