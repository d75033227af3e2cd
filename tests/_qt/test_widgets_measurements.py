"""Measurements widget: values and classes of the current landmarks, live during a real mouse
drag (Qt mouse events into napari's canvas) within 50 ms, likely ranges, lines, export."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from ._env import require_gui

require_gui()

from napari_glimpse.io import read_landmarks_csv  # noqa: E402
from napari_glimpse.landmarks import ISBI_LANDMARKS  # noqa: E402
from napari_glimpse.measurements import MEASUREMENTS, TABLE_COLUMNS, classify_batch, measure, measure_batch  # noqa: E402

MAX_LATENCY_S = 0.050  # the issue: the panel follows a drag within 50 ms
LINES_EVERY_MS = 30
B = 5  # 0-based index of the B point


def ground_truth_151(isbi) -> np.ndarray:
    _, senior = read_landmarks_csv(isbi / "test1_senior.csv")
    _, junior = read_landmarks_csv(isbi / "test1_junior.csv")
    return (senior[0] + junior[0]) / 2


def add_landmarks(viewer, pos, uncertainty=None, name="landmarks"):
    from napari_glimpse._layer_data import landmarks_layer_from

    data, kw, _ = landmarks_layer_from(pos, ISBI_LANDMARKS, uncertainty_mm=uncertainty, name=name,
                                       image_path="151.jpg", pixel_spacing=0.1)
    return viewer.add_points(data, **kw)


@pytest.fixture
def panel(make_napari_viewer, qtbot, isbi):
    """A shown viewer with image 151, the doctors' mean landmarks as the current detection, the
    widget docked."""
    from napari_glimpse._widgets._measurements import MeasurementsWidget
    from napari_glimpse._widgets._state import Detection, state_for
    from napari_glimpse.io import read_image

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)  # room for the canvas beside the dock
    image = viewer.add_image(read_image(isbi / "images" / "151.jpg"), name="151")
    gt = ground_truth_151(isbi)
    unc = np.zeros(19)
    unc[B] = 1.5  # only B is uncertain (mm)
    layer = add_landmarks(viewer, gt, unc)
    widget = MeasurementsWidget(viewer)
    viewer.window.add_dock_widget(widget)
    qtbot.wait(100)
    state_for(viewer).set_current(Detection("151.jpg", isbi / "images" / "151.jpg", image, layer, None, "test",
                                            ISBI_LANDMARKS))
    qtbot.waitUntil(lambda: widget.layer is layer, timeout=2000)
    return viewer, widget, layer, gt


def shown_value(widget, name) -> float:
    return float(widget.table.item(MEASUREMENTS.index(name), 1).text())


def test_values_classes_and_highlights(panel):
    viewer, widget, layer, gt = panel
    expect = measure(gt)
    cls = classify_batch(list(expect.values()))[0]
    for i, name in enumerate(MEASUREMENTS):
        assert shown_value(widget, name) == pytest.approx(expect[name], abs=0.051 if name != "FHI" else 5e-4)
        assert widget.table.item(i, 2).text().startswith(f"{cls[i]}: ")
        highlighted = widget.table.item(i, 1).background().style() != 0
        assert highlighted == (cls[i] != 1), name
    assert widget.table.item(MEASUREMENTS.index("ANB"), 3).text() == "3.2–5.7 °"
    assert "151.jpg" in widget.info.text()


def test_likely_ranges_from_the_uncertainty_and_a_moved_point_is_certain(panel):
    viewer, widget, layer, gt = panel
    # only B is uncertain: SNB, ANB, ODI, APDI have a range, SNA and FHI do not
    has_range = {m: widget.table.item(i, 4).text() != "" for i, m in enumerate(MEASUREMENTS)}
    assert has_range == {"ANB": True, "SNB": True, "SNA": False, "ODI": True, "APDI": True, "FHI": False,
                         "FMA": False, "MW": False}
    lo, hi = widget.ranges[MEASUREMENTS.index("SNB")]
    assert lo < widget.values[MEASUREMENTS.index("SNB")] < hi and hi - lo < 3
    row = int(np.nonzero(np.asarray(layer.features["index"]) == B + 1)[0][0])
    data = layer.data.copy()
    data[row] += [0, 30]
    layer.data = data
    assert all(widget.table.item(i, 4).text() == "" for i in range(8))


def _drag(viewer, widget, layer, row, steps, dx_canvas, qtbot):
    """Press on ``row``'s point, move the mouse ``steps`` times by ``dx_canvas`` pixels, release:
    real Qt mouse events into napari's canvas. Yields, per move, the seconds from the mouse event
    to the panel's update and to the event loop being free again (canvas repainted)."""
    from qtpy.QtCore import QEvent, QPointF, Qt, QTimer
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    canvas = viewer.window._qt_viewer.canvas
    native = canvas._scene_canvas.native
    tr = canvas.layer_to_visual[layer].node.get_transform(map_from="visual", map_to="canvas")
    y, x = layer.data[row]
    p = tr.map([x, y])
    p0 = QPointF(p[0] / p[3], p[1] / p[3])

    def send(kind, pt, buttons):
        ev = QMouseEvent(kind, pt, native.mapToGlobal(pt.toPoint()), Qt.LeftButton, buttons, Qt.NoModifier)
        QApplication.sendEvent(native, ev)

    stamps: dict[str, float] = {}
    widget.updated.connect(lambda: stamps.setdefault("panel", time.perf_counter()))
    layer.mode = "select"
    send(QEvent.MouseButtonPress, p0, Qt.LeftButton)
    qtbot.wait(50)
    for i in range(1, steps + 1):
        stamps.clear()
        t0 = time.perf_counter()
        send(QEvent.MouseMove, QPointF(p0.x() + dx_canvas * i, p0.y()), Qt.LeftButton)
        QTimer.singleShot(0, lambda: stamps.setdefault("loop", time.perf_counter()))
        qtbot.waitUntil(lambda: "loop" in stamps, timeout=2000)
        assert "panel" in stamps, "the panel did not update during the drag"
        yield stamps["panel"] - t0, stamps["loop"] - t0
        qtbot.wait(LINES_EVERY_MS + 10)  # the pace of a hand: the overlay's timer fires between moves
    send(QEvent.MouseButtonRelease, QPointF(p0.x() + dx_canvas * steps, p0.y()), Qt.NoButton)
    qtbot.wait(50)


def test_live_update_during_a_real_drag_within_50_ms(panel, qtbot):
    viewer, widget, layer, gt = panel
    widget.lines_box.setChecked(True)  # the overlay follows too
    qtbot.wait(100)
    row = int(np.nonzero(np.asarray(layer.features["index"]) == B + 1)[0][0])
    start = layer.data[row].copy()
    panel_s, loop_s, own_s, moved = [], [], [], []
    for to_panel, to_loop in _drag(viewer, widget, layer, row, 20, 2.0, qtbot):
        panel_s.append(to_panel)
        loop_s.append(to_loop)
        own_s.append(widget.last_update_s)
        pos = np.asarray(layer.data)[:, ::-1]
        # the panel shows the values of the point where it is now (not only at the release)
        moved.append(float(layer.data[row][1] - start[1]))
        assert shown_value(widget, "SNB") == pytest.approx(measure_batch(pos)[0, 1], abs=0.051)
    assert moved[-1] > moved[0] > 0  # the point moved at every step
    qtbot.wait(LINES_EVERY_MS + 50)
    lines = viewer.layers["measurement lines"].data
    np.testing.assert_allclose(lines[2, 0] + lines[2, 1], layer.data[row])  # the N-B line ends at B
    print(f"[timing] measurements panel after a drag step: median {1000 * statistics.median(panel_s):.1f} ms, "
          f"worst {1000 * max(panel_s):.1f} ms; event loop free again (canvas repainted): median "
          f"{1000 * statistics.median(loop_s):.1f} ms, worst {1000 * max(loop_s):.1f} ms; the panel's own "
          f"recomputation: median {1000 * statistics.median(own_s):.1f} ms, worst {1000 * max(own_s):.1f} ms")
    # medians: the machine is shared (load 3-5 on two cores while this ran), single steps can stall
    assert statistics.median(panel_s) < MAX_LATENCY_S
    assert statistics.median(loop_s) < MAX_LATENCY_S
    assert max(panel_s) < 5 * MAX_LATENCY_S


def test_lines_toggle_export_and_a_layer_without_detection(make_napari_viewer, qtbot, isbi, tmp_path):
    from napari_glimpse._widgets._measurements import OVERLAY_NAME, MeasurementsWidget

    viewer = make_napari_viewer()
    widget = MeasurementsWidget(viewer)
    assert widget.layer is None and widget.table.item(0, 1).text() == "—"
    gt = ground_truth_151(isbi)
    layer = add_landmarks(viewer, gt)  # selected on adding: followed without a detection
    qtbot.waitUntil(lambda: widget.layer is layer, timeout=2000)
    assert shown_value(widget, "SNA") == pytest.approx(measure(gt)["SNA"], abs=0.051)

    widget.lines_box.setChecked(True)
    assert len(viewer.layers[OVERLAY_NAME].data) == 12
    assert viewer.layers.selection.active is layer  # still draggable
    widget.lines_box.setChecked(False)
    assert OVERLAY_NAME not in viewer.layers

    a, b = widget.export(tmp_path / "reviewed.csv")
    names, coords = read_landmarks_csv(a)
    assert names == ["151.jpg"] and np.allclose(coords[0], gt, atol=0.01)
    assert b == tmp_path / "reviewed_measures.csv"
    header, row = b.read_text().splitlines()
    assert header.split(",") == list(TABLE_COLUMNS) and row.startswith("151.jpg,")

    # a missing landmark: the measurements that need it are not measurable, the others stay
    layer.selected_data = {int(np.nonzero(np.asarray(layer.features["index"]) == 5)[0][0])}  # A point
    layer.remove_selected()
    assert widget.table.item(MEASUREMENTS.index("SNA"), 2).text() == "not measurable"
    assert widget.table.item(MEASUREMENTS.index("FHI"), 2).text() != "not measurable"
    assert "1 landmark(s) missing" in widget.info.text()
