"""Corrections widget: delete/add through the layer, a drag logged once, undo, accept refusing
missing landmarks, the review queue."""

from __future__ import annotations

import numpy as np
import pytest

from ._env import require_gui

require_gui()


@pytest.fixture
def reviewed(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path):
    from napari_glimpse._widgets._corrections import CorrectionsWidget
    from napari_glimpse._widgets._detect import DetectWidget

    (tmp_path / "151.jpg").symlink_to(isbi / "images" / "151.jpg")
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "151.jpg"), plugin="napari-glimpse")
    detect = DetectWidget(viewer)
    corr = CorrectionsWidget(viewer)
    detect.set_model(isbi_model_path)
    worker = detect.detect(start=False)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        worker.start()
    return viewer, corr, b.args[0], tmp_path / "151.jpg"


def row_of(layer, k):
    return int(np.nonzero(np.asarray(layer.features["index"]) == k + 1)[0][0])


def test_delete_add_undo_and_accept(reviewed, qtbot):
    from napari_glimpse._layer_data import landmark_colors

    viewer, corr, det, image = reviewed
    log, layer = corr.state.log, det.points_layer
    assert log.path.parent == image.parent
    original = layer.data[row_of(layer, 2)].copy()

    layer.selected_data = {row_of(layer, 2)}
    with qtbot.waitSignal(corr.recorded, timeout=5000) as sig:
        layer.remove_selected()
    assert [(r.action, r.k) for r in sig.args[0]] == [("delete", 2)]
    assert log.state.missing(image) == [2] and len(layer.data) == 18

    assert corr.accept() is None and "missing" in corr.status_label.text()
    assert not log.state.is_accepted(image)

    # a new point becomes the missing landmark, in its colour
    with qtbot.waitSignal(corr.recorded, timeout=5000) as sig:
        layer.add([1200.0, 1300.0])
    assert [(r.action, r.k) for r in sig.args[0]] == [("add", 2)]
    r = row_of(layer, 2)
    np.testing.assert_allclose(layer.data[r], [1200.0, 1300.0])
    np.testing.assert_allclose(layer.face_color[r], landmark_colors(19)[2])
    assert layer.features["landmark"][r] == "Orbitale"

    # all 19 placed: a new point places the picked landmark again (it moves there)
    corr.pick(4)
    with qtbot.waitSignal(corr.recorded, timeout=5000) as sig:
        layer.add([100.0, 120.0])
    assert [(r.action, r.k) for r in sig.args[0]] == [("move", 4)]
    assert len(layer.data) == 19
    np.testing.assert_allclose(log.state.positions(image)[4], [120.0, 100.0])
    np.testing.assert_allclose(layer.data[row_of(layer, 4)], [100.0, 120.0])
    assert layer.features["state"][row_of(layer, 4)] == "corrected"
    assert layer.symbol[row_of(layer, 4)].value == "cross"

    corr.undo()  # the move of the picked landmark
    assert layer.symbol[row_of(layer, 4)].value == "ring"
    corr.undo()  # the add
    assert len(layer.data) == 18
    corr.undo()  # the delete
    assert len(layer.data) == 19
    np.testing.assert_allclose(layer.data[row_of(layer, 2)], original)
    assert corr.accept() is not None and log.state.is_accepted(image)


def test_a_drag_is_logged_once_at_release(reviewed, qtbot, monkeypatch):
    from qtpy.QtCore import Qt

    from napari_glimpse._widgets import _corrections

    viewer, corr, det, image = reviewed
    log, layer = corr.state.log, det.points_layer
    buttons = {"now": Qt.LeftButton}
    monkeypatch.setattr(_corrections.QApplication, "mouseButtons", staticmethod(lambda: buttons["now"]))
    n = len(log.records)
    start = layer.data[0].copy()
    for step in range(1, 6):  # mouse moves while the button is held
        d = layer.data.copy()
        d[0] = start + step * 4.0
        layer.data = d
    qtbot.wait(120)
    assert len(log.records) == n  # nothing yet: the button is still down
    with qtbot.waitSignal(corr.recorded, timeout=5000) as sig:
        buttons["now"] = Qt.NoButton
    assert [(r.action, r.k) for r in sig.args[0]] == [("move", 0)]
    np.testing.assert_allclose(sig.args[0][0].new, (start + 20.0)[::-1])
    np.testing.assert_allclose(sig.args[0][0].old, start[::-1])


def test_next_least_confident_walks_the_queue(reviewed):
    viewer, corr, det, image = reviewed
    st = corr.state.log.state
    queue = st.review_queue(image)
    seen = [corr.next_landmark() for _ in range(3)]
    assert seen == queue[:3]
    assert corr.state.selected_landmark == queue[2]
    layer = det.points_layer
    assert layer.selected_data == {row_of(layer, queue[2])}
    assert st.landmark_names[queue[2]] in corr.queue_label.text()
