"""Glimpse explorer, the paper's journey: glimpse steps from the mean start (not the proposal), the
error to the truth when labels are loaded, the labelled GIF of it; the gate's note."""

from __future__ import annotations

import numpy as np

from ._env import require_gui

require_gui()


def test_the_journey_from_the_mean_start(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path):
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._explorer import MEAN, ExplorerWidget, mean_start
    from napari_glimpse.inference import GlimpseModel

    viewer = make_napari_viewer(show=True)
    viewer.open(str(isbi / "images" / "151.jpg"), plugin="napari-glimpse")
    detect, ex = DetectWidget(viewer), ExplorerWidget(viewer)
    viewer.window.add_dock_widget(detect)
    viewer.window.add_dock_widget(ex)
    detect.set_model(isbi_model_path)
    worker = detect.detect(start=False)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        worker.start()
    det = blocker.args[0]
    before = np.array(det.points_layer.data)
    ex.set_landmark(9)
    ex.origin.setCurrentIndex(ex.origin.findData(MEAN))
    ex.steps.setValue(3)
    qtbot.waitUntil(lambda: ex.glimpse_traj() is not None and not ex.busy(), timeout=60_000)
    traj = ex.glimpse_traj()
    model = GlimpseModel.load(isbi_model_path, "cpu")
    np.testing.assert_allclose(traj.positions[0, 0], mean_start(model, (2400, 1935), traj.facing)[9], atol=0.01)
    assert traj.iterations == 3 and traj.glimpses.shape[:3] == (3, 1, model.config.n_levels)
    np.testing.assert_array_equal(np.array(det.points_layer.data), before)  # exploring moves nothing
    assert ex.truth() is None and "error to the truth" not in ex.info.text()
    truth = np.array([[1000.0 + 10 * k, 800.0] for k in range(19)])  # (y, x) of a label layer
    viewer.add_points(truth, name="labels", features={"index": np.arange(1, 20)})
    np.testing.assert_allclose(ex.truth()[9], [800.0, 1090.0])
    ex.update_layers()
    assert "From the mean start; error to the truth" in ex.info.text()
    out = ex.export(tmp_path / "journey.gif", source="tiles")
    assert out is not None and out.stat().st_size > 0 and len(ex.last_captions) == 3
    assert any("from the mean start" in line for line in ex.last_captions[0])
    assert any(line.startswith("error to the truth") for line in ex.last_captions[-1])
