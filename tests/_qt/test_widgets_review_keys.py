"""Review by keyboard, with every state visible: proposed / corrected / absent / accepted.

Widgets come through ``add_plugin_dock_widget``; keys go to the napari canvas as Qt key events.
"""

from __future__ import annotations

import numpy as np
import pytest

from ._env import require_gui

require_gui()


def _key(qtbot, viewer, key, modifier=None):
    from qtpy.QtCore import Qt

    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, key, modifier if modifier is not None else Qt.NoModifier)


def _row(layer, k):
    return int(np.nonzero(np.asarray(layer.features["index"]) == k + 1)[0][0])


def _table_state(detect, k):
    for r in range(detect.table.rowCount()):
        if detect.table.item(r, 0).text() == str(k + 1):
            return detect.table.item(r, 4).text(), detect.table.item(r, 2).text()
    return None


@pytest.fixture
def detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path):
    viewer = make_napari_viewer()
    image = isbi / "images" / "151.jpg"
    viewer.open(str(image), plugin="napari-glimpse")
    _d, detect = viewer.window.add_plugin_dock_widget("napari-glimpse", "Detect landmarks")
    _d, review = viewer.window.add_plugin_dock_widget("napari-glimpse", "Review and corrections")
    detect.state.open_log(tmp_path / "log.jsonl", image_dir=image.parent)
    detect.set_model(isbi_model_path)
    detect.device_combo.setCurrentText("cpu")
    worker = detect.detect(start=False)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        worker.start()
    return viewer, detect, review, blocker.args[0], image


def test_states_and_keys_through_the_log(detected, qtbot, tmp_path):
    from qtpy.QtCore import Qt

    viewer, detect, review, det, image = detected
    layer, log = det.points_layer, detect.state.log
    assert {s.value for s in layer.symbol} == {"ring"}  # proposed: hollow rings
    assert set(layer.features["state"]) == {"proposed"}
    assert layer.size.max() < 30 and layer.opacity < 1  # small, see-through markers

    # N: the least confident landmark is selected and picked
    _key(qtbot, viewer, Qt.Key_N)
    k = detect.state.selected_landmark
    assert k is not None and review.picker.currentIndex() == k
    assert layer.selected_data == {_row(layer, k)}

    # a correction: cross marker, table says corrected and drops the stale confidence
    moved = layer.data.copy()
    moved[_row(layer, k)] += (6.0, -4.0)
    with qtbot.waitSignal(review.recorded, timeout=5000):
        layer.data = moved
    assert layer.symbol[_row(layer, k)].value == "cross"
    qtbot.waitUntil(lambda: _table_state(detect, k) == ("corrected", "–"), timeout=1000)  # refilled next tick
    assert layer.features["label"][_row(layer, k)].endswith("*")

    # Ctrl+Z / Ctrl+Shift+Z go through the log
    _key(qtbot, viewer, Qt.Key_Z, Qt.ControlModifier)
    assert log.records[-1].action == "undo"
    assert layer.symbol[_row(layer, k)].value == "ring"
    qtbot.waitUntil(lambda: _table_state(detect, k)[0] == "proposed", timeout=1000)
    _key(qtbot, viewer, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    assert log.records[-1].action == "redo" and layer.symbol[_row(layer, k)].value == "cross"

    # Shift+X: the picked landmark is absent; it stays in the table as absent
    other = (k + 1) % 19
    review.pick(other)
    layer.selected_data = set()
    _key(qtbot, viewer, Qt.Key_X, Qt.ShiftModifier)
    assert log.records[-1].action == "absent" and log.state.absent(image) == [other]
    assert other + 1 not in set(layer.features["index"]) and len(layer.data) == 18
    qtbot.waitUntil(lambda: _table_state(detect, other) == ("absent", "–"), timeout=1000)

    # Shift+Enter: accepted despite the absent landmark; every marker shows it
    _key(qtbot, viewer, Qt.Key_Return, Qt.ShiftModifier)
    assert log.state.is_accepted(image)
    assert {s.value for s in layer.symbol} == {"disc"} and set(layer.features["state"]) == {"accepted"}
    out = review.export(tmp_path / "reviewed.csv")
    row = out.read_text().splitlines()[1].split(",")
    assert row[1 + 2 * other: 3 + 2 * other] == ["", ""]  # the absent landmark's cells are empty


def test_arrow_keys_move_the_selected_point_and_each_press_is_logged(detected, qtbot):
    from qtpy.QtCore import Qt

    viewer, detect, review, det, image = detected
    layer, log = det.points_layer, detect.state.log
    assert viewer.layers.selection.active is layer
    _key(qtbot, viewer, Qt.Key_N)
    k = detect.state.selected_landmark
    r = _row(layer, k)
    start = layer.data[r].copy()  # (row, column) = (y, x)
    for key, mod in ((Qt.Key_Right, None), (Qt.Key_Right, None), (Qt.Key_Down, Qt.ShiftModifier),
                     (Qt.Key_Left, None)):
        _key(qtbot, viewer, key, mod)
    np.testing.assert_allclose(layer.data[r], start + (10.0, 1.0))
    assert layer.selected_data == {r}  # still selected: the next press moves it on
    moves = [rec for rec in log.records if rec.action == "move" and rec.k == k]
    assert len(moves) == 4
    np.testing.assert_allclose(log.state.positions(image)[k], start[::-1] + (1.0, 10.0))
    # nothing selected: the arrows move nothing
    layer.selected_data = set()
    n = len(log.records)
    _key(qtbot, viewer, Qt.Key_Up)
    assert len(log.records) == n
    np.testing.assert_allclose(layer.data[r], start + (10.0, 1.0))


def test_labels_of_close_landmarks_do_not_collide():
    from napari_glimpse._layer_data import label_texts

    yx = np.array([[1500.0, 1200.0], [1510.0, 1215.0], [1505.0, 1190.0], [400.0, 300.0]])
    out = label_texts(yx, ["LIT", "UIT", "Gn", "S"], (2400, 1935))
    assert out == ["LIT/UIT/Gn", "", "", "S"]  # crowded: one shared label; alone: as is
    far = label_texts(yx * [1, 0] + [[0, 0], [0, 400], [0, 800], [0, 1200]], ["A", "B", "C", "D"], (2400, 1935))
    assert far == ["A", "B", "C", "D"]
