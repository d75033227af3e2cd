"""Glimpse explorer on a real cephalogram: layers at true scale/position, slider, heatmap, export."""

from __future__ import annotations

import numpy as np
import pytest

from ._env import require_gui

require_gui()


@pytest.fixture
def detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path):
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._explorer import ExplorerWidget
    from napari_glimpse._widgets._state import state_for

    viewer = make_napari_viewer(show=True)
    viewer.open(str(isbi / "images" / "151.jpg"), plugin="napari-glimpse")
    state_for(viewer).open_log(tmp_path / "log.jsonl", image_dir=isbi / "images")
    detect = DetectWidget(viewer)
    explorer = ExplorerWidget(viewer)
    viewer.window.add_dock_widget(detect)
    viewer.window.add_dock_widget(explorer)
    detect.set_model(isbi_model_path)
    worker = detect.detect(start=False)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        worker.start()
    return viewer, explorer, blocker.args[0]


def test_explorer_draws_every_level_at_true_scale(detected, qtbot):
    from napari_glimpse import _layer_data as ld

    viewer, ex, det = detected
    traj = det.trajectory
    assert traj.glimpses.shape[:3] == (3, 19, 6)
    ex.set_landmark(9)  # Gonion
    ex.set_iteration(1)
    k, t = 9, 1
    c = traj.positions[t, k]
    for lv in range(6):
        layer = ex.layers[f"L{lv}"]
        assert layer in viewer.layers
        np.testing.assert_array_equal(layer.data, traj.glimpses[t, k, lv])
        np.testing.assert_allclose(layer.scale, [2**lv, 2**lv])
        # the patch's centre pixel sits on the estimate; the patch covers 64 * 2**l pixels
        centre = np.asarray(layer.translate) + 31.5 * np.asarray(layer.scale)
        np.testing.assert_allclose(centre, c[::-1], atol=1e-6)
        assert layer.data.shape[0] * layer.scale[0] == 64 * 2**lv
    np.testing.assert_allclose(ex.layers["offset"].data, ld.offset_vector(traj, k, t))
    np.testing.assert_allclose(ex.layers["path"].data[0], traj.positions[:3, k, ::-1])
    hm = ex.layers["heatmap"]
    assert hm.visible and hm.data.shape == (8, 8)
    assert not ex.tiles.pixmap().isNull()
    # the landmarks stay on top of the glimpse layers
    assert viewer.layers[-1] is det.points_layer
    # choosing a landmark elsewhere (table, review queue) follows here
    ex.state.select_landmark(2)
    assert ex.landmark_combo.currentIndex() == 2
    # fewer levels
    ex.max_level.setValue(2)
    assert [ex.layers[f"L{lv}"].visible for lv in range(6)] == [True] * 3 + [False] * 3
    assert len(ex.layers["boxes"].data) == 3
    # hiding the explorer hides its overlays; showing it draws them again
    ex.hide()
    assert not any(layer.visible for layer in ex.layers.values())
    ex.show()
    qtbot.waitUntil(lambda: ex.layers["offset"].visible, timeout=3000)


def test_explorer_exports_an_animation(detected, tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    viewer, ex, det = detected
    ex.set_landmark(0)
    ex.focus()
    out = ex.export(tmp_path / "tiles.gif", fps=4, source="tiles")
    assert out is not None and len(imageio.mimread(out)) == det.trajectory.iterations
    out = ex.export(tmp_path / "canvas.gif", fps=4)
    frames = imageio.mimread(out)
    assert len(frames) == det.trajectory.iterations
    assert np.asarray(frames[0]).std() > 5  # the canvas rendered, not a black frame
    assert ex.export(tmp_path / "bad.avi") is None and "gif or .mp4" in ex.status_label.text()
