"""Widgets opened as users open them share one state.

``napari -w napari-glimpse`` and the Plugins menu both go through
``viewer.window.add_plugin_dock_widget``, which hands every widget its own ``PublicOnlyProxy`` of
the viewer. Whichever widget comes first, a detection made in Detect reaches Review and
corrections and the Glimpse explorer, and a moved point reaches the corrections log.
"""

from __future__ import annotations

import numpy as np
import pytest

from ._env import require_gui

require_gui()

DETECT, EXPLORER, REVIEW, FINETUNE = ("Detect landmarks", "Glimpse explorer", "Review and corrections", "Fine-tune")
ORDERS = {
    "detect first": (DETECT, EXPLORER, REVIEW, FINETUNE),
    "detect last": (FINETUNE, REVIEW, EXPLORER, DETECT),
}


def _open_all(viewer, order):
    widgets = {}
    for name in order:
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-glimpse", name)
        widgets[name] = widget
    return widgets


def test_napari_hands_each_widget_a_proxy(make_napari_viewer):
    """The premise of the bug: what napari passes is a proxy, and not the same one twice."""
    from napari.utils._proxies import PublicOnlyProxy

    from napari_glimpse._widgets._state import real_viewer, state_for

    viewer = make_napari_viewer()
    a, b = PublicOnlyProxy(viewer), PublicOnlyProxy(viewer)
    assert a is not b and id(a) != id(b)
    assert real_viewer(a) is viewer and real_viewer(viewer) is viewer
    assert state_for(a) is state_for(b) is state_for(viewer)


@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
def test_widgets_from_add_plugin_dock_widget_share_one_state(make_napari_viewer, qtbot, isbi,
                                                             isbi_model_path, tmp_path, order):
    from napari_glimpse._widgets._state import state_for

    viewer = make_napari_viewer()
    image = isbi / "images" / "151.jpg"
    if order == "detect last":  # the image is already open when the widgets come
        viewer.open(str(image), plugin="napari-glimpse")
    w = _open_all(viewer, ORDERS[order])
    if order == "detect first":
        viewer.open(str(image), plugin="napari-glimpse")
    state = state_for(viewer)
    for widget in w.values():
        assert widget.viewer is viewer  # the real viewer, not napari's proxy
        assert widget.state is state
    detect, review, explorer = w[DETECT], w[REVIEW], w[EXPLORER]
    log = state.open_log(tmp_path / "corrections.jsonl", image_dir=image.parent)
    detect.set_model(isbi_model_path)
    detect.device_combo.setCurrentText("cpu")
    review_before = review.image_label.text()

    worker = detect.detect(start=False)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        worker.start()
    det = blocker.args[0]
    assert state.current is det and det.points_layer in viewer.layers
    assert review.image_label.text() != review_before  # Review saw the detection
    assert "151.jpg" in review.image_label.text()
    assert explorer.state.current is det

    layer = det.points_layer
    moved = layer.data.copy()
    moved[0] += (5.0, 9.0)
    with qtbot.waitSignal(review.recorded, timeout=5000):
        layer.data = moved
    assert log.records[-1].action == "move" and log.records[-1].k == 0
    np.testing.assert_allclose(log.state.positions(image)[0], moved[0][::-1])
