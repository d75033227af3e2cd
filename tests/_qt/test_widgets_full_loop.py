"""The annotator's whole loop, as users do it: widgets from ``add_plugin_dock_widget`` (what
``napari -w`` and the Plugins menu call), in both orders; a real mouse drag on the canvas; keys.

open a folder -> detect -> drag a point -> logged -> Ctrl+Z / Ctrl+Shift+Z -> mark absent ->
accept -> next image (PageDown) -> export -> fine-tune -> detect with the new model.
"""

from __future__ import annotations

import numpy as np
import pytest

from ._env import drag_point, require_gui

require_gui()

ORDERS = {
    "detect first": ("Detect landmarks", "Review and corrections", "Fine-tune", "Glimpse explorer"),
    "fine-tune first": ("Fine-tune", "Glimpse explorer", "Review and corrections", "Detect landmarks"),
}


def _key(qtbot, viewer, key, modifier=None):
    from qtpy.QtCore import Qt

    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, key, modifier if modifier is not None else Qt.NoModifier)


def _row(layer, k):
    return int(np.nonzero(np.asarray(layer.features["index"]) == k + 1)[0][0])


@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
def test_full_review_loop(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path, order):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    w = {}
    for name in ORDERS[order]:
        _dock, w[name] = viewer.window.add_plugin_dock_widget("napari-glimpse", name)
    detect, review, ft = w["Detect landmarks"], w["Review and corrections"], w["Fine-tune"]
    assert detect.state is review.state is ft.state
    folder = tmp_path / "clinic"
    folder.mkdir()
    for n in ("151.jpg", "152.jpg"):
        (folder / n).symlink_to(isbi / "images" / n)
    detect.set_model(isbi_model_path)
    detect.device_combo.setCurrentText("cpu")

    # ---- open the folder: the first image is detected
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        detect.open_folder(folder)
    det = blocker.args[0]
    layer, log = det.points_layer, detect.state.log
    assert det.image_path == folder / "151.jpg" and len(layer.data) == 19
    assert log.path.parent == folder

    # ---- a real drag of landmark 5 on the canvas: one move in the log, a cross on the canvas
    k = 4
    start = layer.data[_row(layer, k)].copy()
    target = start + (25.0, -15.0)
    drag_point(viewer, layer, _row(layer, k), target, qtbot)
    moves = [r for r in log.records if r.action == "move"]
    assert moves and moves[-1].k == k
    # a screen pixel is ~2.5 image pixels
    np.testing.assert_allclose(log.state.positions(det.image_path)[k], target[::-1], atol=4.0)
    assert layer.symbol[_row(layer, k)].value == "cross"

    # ---- undo / redo by keyboard
    _key(qtbot, viewer, Qt.Key_Z, Qt.ControlModifier)
    np.testing.assert_allclose(log.state.positions(det.image_path)[k], start[::-1], atol=0.01)
    _key(qtbot, viewer, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    # a screen pixel is ~2.5 image pixels
    np.testing.assert_allclose(log.state.positions(det.image_path)[k], target[::-1], atol=4.0)

    # ---- Gonion not visible: absent; then accept by keyboard
    review.pick(9)
    layer.selected_data = set()
    _key(qtbot, viewer, Qt.Key_X, Qt.ShiftModifier)
    assert log.state.absent(det.image_path) == [9]
    _key(qtbot, viewer, Qt.Key_Return, Qt.ShiftModifier)
    assert log.state.is_accepted(det.image_path)

    # ---- next image by keyboard (detected on arrival), accept it too
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        _key(qtbot, viewer, Qt.Key_PageDown)
    det2 = blocker.args[0]
    assert det2.image_path == folder / "152.jpg" and detect.folder_index == 1
    assert review.accept() is not None

    # ---- export: the absent landmark's cells are empty, the moved point is there
    out = review.export(tmp_path / "reviewed.csv")
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    row151 = next(ln.split(",") for ln in lines[1:] if ln.split(",")[0].endswith("151.jpg"))
    assert row151[19:21] == ["", ""]
    assert abs(float(row151[9]) - target[1]) < 4.0

    # ---- fine-tune on the export (a separate process; a few steps), then detect with the new model
    assert str(ft.data_edit.value) == str(out)  # the export reached the fine-tune widget
    ft.steps.value = 2
    ft.batch.value = 4
    ft.out_edit.value = str(tmp_path / "tuned.pt")
    with qtbot.waitSignal(ft.finished, timeout=300_000) as fin:
        assert ft.start() is not None
    assert fin.args == [0, str(tmp_path / "tuned.pt")], ft.log.toPlainText()
    ft.use_new_model()
    assert detect.state.model_path == tmp_path / "tuned.pt"
    detect.replace_check.setChecked(True)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        detect.detect()
    assert blocker.args[0].model_name == "tuned.pt" and len(blocker.args[0].points_layer.data) == 19
