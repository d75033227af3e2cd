"""Glimpse explorer on a real cephalogram: layers at true scale/position, slider, heatmap, export."""

from __future__ import annotations

import numpy as np
import pytest

from ._env import require_gui

require_gui()


def _detect(detect, qtbot):
    worker = detect.detect(start=False)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        worker.start()
    return blocker.args[0]


def _viewer_detected(make_napari_viewer, qtbot, isbi, model_path, tmp_path):
    """A shown viewer with 151.jpg, the Detect and explorer widgets docked, and model_path's detection:
    (viewer, detect widget, explorer, detection)."""
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
    detect.set_model(model_path)
    return viewer, detect, explorer, _detect(detect, qtbot)


@pytest.fixture
def detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path):
    viewer, _, explorer, det = _viewer_detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path)
    return viewer, explorer, det


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


def test_explorer_exports_nothing_from_a_detection_with_nothing_to_show(make_napari_viewer, qtbot, isbi,
                                                                        isbi_model_path, tmp_path):
    """A coarse-only answer (no fine look, no glimpse steps) after a glimpse detection: the export
    says there is nothing to export and writes no file (not frames of the bare image)."""
    from napari_glimpse import _layer_data as ld

    _, detect, ex, det = _viewer_detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path)
    assert ex.slider.maximum() == det.trajectory.iterations - 1 > 0
    detect.set_model(_with_stages(isbi_model_path, tmp_path / "coarse19.pt", fine=False))
    traj = _detect(detect, qtbot).trajectory
    assert traj.iterations == 0 and not ld.has_stages(traj)
    assert ex.slider.maximum() == 0 and ex.landmark_combo.count() == 0 and not ex.layers
    assert "nothing to explore" in ex.tiles.text()
    for source in ("tiles", "canvas"):
        out = tmp_path / f"{source}.gif"
        assert ex.export(out, fps=4, source=source) is None
        assert "nothing to export" in ex.status_label.text() and not out.exists()


# ------------------------------------------------------------------------ coarse -> fine stages
def _with_stages(isbi_model_path, out, fine=True):
    """The tiny 19-landmark model with a random (fixed) coarse stage and, with ``fine``, fine stage;
    answers with them alone (no glimpse steps). Written to ``out``."""
    import torch

    from napari_glimpse.coarse import CoarseConfig, CoarseNet
    from napari_glimpse.fine import FineConfig, FineNet
    from napari_glimpse.inference import GlimpseModel

    model = GlimpseModel.load(isbi_model_path, device="cpu")
    torch.manual_seed(0)
    model.coarse = CoarseNet(CoarseConfig(n_landmarks=19, input_hw=(80, 64), width=4)).eval()
    if fine:
        model.fine = FineNet(FineConfig(n_landmarks=19, level=1, patch=64, width=4, context=3)).eval()
        with torch.no_grad():
            for v in model.fine.parameters():
                v.mul_(4.0)  # peaked heatmaps
    model.meta["iterations"] = 0
    model.save(out)
    return out


@pytest.fixture(scope="module")
def staged_model_path(isbi_model_path, tmp_path_factory):
    """The tiny 19-landmark model with random (fixed) coarse and fine stages; answers with them alone."""
    return _with_stages(isbi_model_path, tmp_path_factory.mktemp("staged") / "staged19.pt")


@pytest.fixture
def staged(make_napari_viewer, qtbot, isbi, staged_model_path, tmp_path):
    return _viewer_detected(make_napari_viewer, qtbot, isbi, staged_model_path, tmp_path)


def _answer_of(det, k):
    """Landmark k's point in the detection's landmarks layer (y, x)."""
    layer = det.points_layer
    return np.asarray(layer.data)[list(layer.features["index"]).index(k + 1)]


def test_explorer_shows_the_coarse_and_fine_stages(staged, qtbot):
    from napari_glimpse import _layer_data as ld

    viewer, _, ex, det = staged
    traj = det.trajectory
    assert ld.has_stages(traj) and traj.iterations == 0
    # the answer came from the stages alone: only their view is offered
    assert ex.view() == "stages"
    assert not ex.view_combo.model().item(ex.view_combo.findData("glimpses")).isEnabled()
    assert not any(key.startswith("L") for key in ex.layers)
    ex.set_landmark(5)
    k = 5
    coarse, fine = traj.coarse_positions[k], traj.fine_positions[0, k]
    assert not np.allclose(coarse, fine)
    np.testing.assert_allclose(_answer_of(det, k), fine[::-1], atol=1e-6)  # the fine answer is the one shown
    # one window outline per context level, centred on the coarse answer, 64 level-(1 + c) pixels a side
    boxes = ex.layers["stage windows"]
    assert boxes.visible and len(boxes.data) == 3 and list(boxes.shape_type) == ["rectangle"] * 3
    for c, box in enumerate(boxes.data):
        world = np.array([boxes.data_to_world(p) for p in box])
        np.testing.assert_allclose(world.mean(0), coarse[::-1], atol=1e-6)
        np.testing.assert_allclose(np.ptp(world, axis=0), [128 * 2**c] * 2, rtol=2e-3)
    # the arrow runs from the coarse answer to the fine answer; the points sit on both
    arrow = ex.layers["stage arrow"].data[0]
    np.testing.assert_allclose(arrow[0], coarse[::-1], atol=1e-6)
    np.testing.assert_allclose(arrow[0] + arrow[1], fine[::-1], atol=1e-6)
    pts = ex.layers["stage points"]
    np.testing.assert_allclose(pts.data, [coarse[::-1], fine[::-1]], atol=1e-6)
    assert list(pts.features["label"]) == ["coarse", "fine"]
    np.testing.assert_allclose(pts.face_color[:, :3], np.array([ld.COARSE_RGB, ld.FINE_RGB]) / 255, atol=1e-6)
    # the fine heatmap over the image peaks within a cell of the fine answer
    hm = ex.layers["stage heatmap"]
    assert hm.visible and hm.data.shape == (32, 32)
    peak = np.unravel_index(np.argmax(hm.data), hm.data.shape)
    cell = float(hm.scale[0])
    assert np.linalg.norm(np.asarray(hm.data_to_world(peak)) - fine[::-1]) < 1.5 * cell
    assert not ex.tiles.pixmap().isNull() and "moved" in ex.info.text() and "L3" in ex.info.text()
    assert ex.step_name.text() == "Fine look" and ex.slider.maximum() == 0 and ex.channel.isHidden()
    assert viewer.layers[-1] is det.points_layer
    # another landmark, chosen elsewhere: the outlines follow its coarse answer
    ex.state.select_landmark(12)
    np.testing.assert_allclose(ex.layers["stage arrow"].data[0, 0], traj.coarse_positions[12, ::-1], atol=1e-6)
    np.testing.assert_allclose(np.mean(ex.layers["stage windows"].data[0], axis=0), traj.coarse_positions[12, ::-1],
                               atol=1e-6)
    ex.hm_check.setChecked(False)
    assert not hm.visible
    ex.hm_check.setChecked(True)
    # the overlays exist only while the explorer is shown
    ex.hide()
    assert not any(layer.visible for layer in ex.layers.values())
    ex.show()
    qtbot.waitUntil(lambda: ex.layers["stage arrow"].visible, timeout=3000)
    assert ex.layers["stage windows"].visible and ex.layers["stage heatmap"].visible


def test_explorer_switches_between_stages_and_glimpses(staged, qtbot, tmp_path):
    from napari_glimpse import _layer_data as ld

    viewer, detect, ex, _ = staged
    detect.iter_spin.setValue(2)
    det = _detect(detect, qtbot)
    traj = det.trajectory
    assert ld.has_stages(traj) and traj.iterations == 2
    # the glimpses start from the fine answer
    np.testing.assert_allclose(traj.positions[0], traj.fine_positions[-1], atol=1e-3)
    assert ex.view() == "stages" and ex.slider.maximum() == 0
    ex.set_landmark(3)
    stage_keys = {key for key in ex.layers if key.startswith("stage")}
    assert stage_keys == {"stage windows", "stage heatmap", "stage arrow", "stage points"}
    ex.set_view("glimpses")
    assert ex.slider.maximum() == 1 and ex.step_name.text() == "Iteration" and not ex.max_level.isHidden()
    assert ex.layers["L0"].visible and ex.layers["offset"].visible
    assert not any(ex.layers[key].visible for key in stage_keys)
    np.testing.assert_allclose(ex.layers["offset"].data, ld.offset_vector(traj, 3, 0))
    ex.set_view("stages")
    assert ex.max_level.isHidden() and ex.n_rows.isHidden() and ex.slider.maximum() == 0
    assert all(ex.layers[key].visible for key in stage_keys)
    assert not any(layer.visible for key, layer in ex.layers.items() if not key.startswith("stage"))
    # the stage view exports its looks
    imageio = pytest.importorskip("imageio.v2")
    out = ex.export(tmp_path / "fine.gif", fps=2, source="tiles")
    frames = imageio.mimread(out)
    assert len(frames) == traj.fine_looks == 1
    assert np.asarray(frames[0]).shape[:2] == ld.fine_tile_strip(traj, 3, 0).shape[:2]
