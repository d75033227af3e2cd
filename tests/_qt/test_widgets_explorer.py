"""Glimpse explorer on a real cephalogram: its three layers at true scale/position and above the
landmarks, the tiles in a scroll area, glimpse steps computed from the proposal without moving it
(until applied, as a logged edit), the stage view, labelled exports."""

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


def _steps(ex, qtbot):
    """The explorer's glimpse steps of its landmark from the current proposal, once computed."""
    qtbot.waitUntil(lambda: ex.glimpse_traj() is not None and not ex.busy(), timeout=60_000)
    return ex.glimpse_traj()


def _viewer_detected(make_napari_viewer, qtbot, isbi, model_path, tmp_path, corrections=False):
    """A shown viewer with 151.jpg, the Detect and explorer widgets docked (and the corrections
    widget, with ``corrections``), and model_path's detection: (viewer, detect widget, explorer, detection)."""
    from napari_glimpse._widgets._corrections import CorrectionsWidget
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._explorer import ExplorerWidget
    from napari_glimpse._widgets._state import state_for

    viewer = make_napari_viewer(show=True)
    viewer.open(str(isbi / "images" / "151.jpg"), plugin="napari-glimpse")
    state_for(viewer).open_log(tmp_path / "log.jsonl", image_dir=isbi / "images")
    detect = DetectWidget(viewer)
    explorer = ExplorerWidget(viewer)
    viewer.window.add_dock_widget(detect)
    if corrections:
        viewer.window.add_dock_widget(CorrectionsWidget(viewer))
    viewer.window.add_dock_widget(explorer)
    detect.set_model(model_path)
    return viewer, detect, explorer, _detect(detect, qtbot)


@pytest.fixture
def detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path):
    viewer, _, explorer, det = _viewer_detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path)
    return viewer, explorer, det


def _explorer_layers(viewer):
    return [layer for layer in viewer.layers if layer.name.startswith("glimpse")]


def _check_layer_order(viewer, ex, det):
    """At most three explorer layers: the patches under the landmarks, outlines, arrows and markers over them."""
    mine = _explorer_layers(viewer)
    assert len(mine) <= 3 and set(mine) == set(ex.layers.values())
    names = list(viewer.layers)
    lm = names.index(det.points_layer)
    assert names.index(ex.layers["shapes"]) > lm and names.index(ex.layers["points"]) > lm
    if "image" in ex.layers:
        assert names.index(ex.layers["image"]) < lm


def test_explorer_draws_every_level_at_true_scale(detected, qtbot):
    from qtpy.QtWidgets import QScrollArea

    from napari_glimpse import _layer_data as ld

    viewer, ex, det = detected
    assert det.trajectory.glimpses is None and det.trajectory.heatmaps is None  # Detect records none
    assert ex.view() == "glimpses"  # the tiny model has no stages
    ex.set_landmark(9)  # Gonion
    traj = _steps(ex, qtbot)
    assert traj.glimpses.shape[:3] == (3, 1, 6) and traj.landmark_names == (det.landmark_names[9],)
    # the steps start from the proposal
    np.testing.assert_allclose(traj.positions[0, 0], ex.proposal()[9], atol=1e-3)
    ex.set_iteration(1)
    t, c = 1, traj.positions[1, 0]
    img = ex.layers["image"]
    assert img.visible and img.rgb and img.data.shape == (64 * 32, 64 * 32, 4)
    np.testing.assert_allclose(img.scale, [1, 1])
    # the overlay's centre sits on the estimate; its middle 64 x 64 pixels are the level-0 patch
    centre = np.asarray(img.translate) + (64 * 32 - 1) / 2 * np.asarray(img.scale)
    np.testing.assert_allclose(centre, c[::-1], atol=1e-6)
    mid = slice(32 * 32 - 32, 32 * 32 + 32)
    assert np.abs(img.data[mid, mid, 0].astype(int) - traj.glimpses[t, 0, 0]).min() == 0
    # one Shapes layer: the six outlines, the path, the step's arrow (shaft and head; none for a
    # step under half a pixel, as the tiny model's often are)
    shp = ex.layers["shapes"]
    vec = ld.offset_vector(traj, 0, t)
    arrow = ld.arrow_shapes(vec)
    assert list(shp.shape_type) == ["rectangle"] * 6 + ["path"] + [typ for _, typ in arrow]
    for lv in range(6):
        np.testing.assert_allclose(np.ptp(shp.data[lv], axis=0), [64 * 2**lv] * 2)
    np.testing.assert_allclose(shp.data[6], traj.positions[:3, 0, ::-1])
    for drawn, (want, _) in zip(shp.data[7:], arrow):
        np.testing.assert_allclose(drawn, want)
    np.testing.assert_allclose(ex.layers["points"].data, traj.positions[:3, 0, ::-1])
    _check_layer_order(viewer, ex, det)
    # the tiles scroll instead of clipping when the dock is short
    assert isinstance(ex.tiles_scroll, QScrollArea) and ex.tiles_scroll.widget() is ex.tiles
    assert not ex.tiles.pixmap().isNull()
    assert ex.tiles_scroll.minimumSizeHint().height() < ex.tiles.pixmap().height()
    # choosing a landmark elsewhere (table, review queue) follows here
    ex.state.select_landmark(2)
    assert ex.landmark_combo.currentIndex() == 2
    assert _steps(ex, qtbot).landmark_names == (det.landmark_names[2],)
    # fewer levels
    ex.max_level.setValue(2)
    assert list(ex.layers["shapes"].shape_type).count("rectangle") == 3
    assert ex.layers["image"].data.shape[0] == 64 * 4
    _check_layer_order(viewer, ex, det)
    # hiding the explorer hides its overlays; showing it draws them again
    ex.hide()
    assert not any(layer.visible for layer in ex.layers.values())
    ex.show()
    qtbot.waitUntil(lambda: ex.layers["shapes"].visible, timeout=3000)


def test_exploring_leaves_the_proposal_alone_until_applied(make_napari_viewer, qtbot, isbi, isbi_model_path,
                                                           tmp_path):
    viewer, _, ex, det = _viewer_detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path,
                                          corrections=True)
    layer, log, image = det.points_layer, ex.state.log, det.image_path
    before, n_records = np.array(layer.data), len(log.records)
    ex.set_landmark(5)
    ex.steps.setValue(5)
    traj = _steps(ex, qtbot)
    assert traj.iterations == 5 and ex.slider.maximum() == 4
    for t in range(5):  # stepping through the glimpses (and exporting them) moves nothing
        ex.set_iteration(t)
    ex.frames("tiles")
    np.testing.assert_array_equal(layer.data, before)
    assert len(log.records) == n_records and not log.state.corrected(image)
    # apply the first three steps: landmark 6 moves there, as one logged edit
    ex.set_iteration(2)
    assert ex.apply_btn.isEnabled()
    ex.apply_steps()
    row = list(layer.features["index"]).index(6)
    np.testing.assert_allclose(layer.data[row], traj.positions[3, 0, ::-1], atol=1e-6)
    others = [r for r in range(len(before)) if r != row]
    np.testing.assert_array_equal(layer.data[others], before[others])
    moves = [r for r in log.records[n_records:] if r.action == "move"]
    assert len(moves) == 1 and moves[0].k == 5 and moves[0].name == det.landmark_names[5]
    np.testing.assert_allclose(log.state.positions(image)[5], traj.positions[3, 0], atol=1e-6)
    assert log.state.corrected(image) == [5]
    assert "logged" in ex.status_label.text()
    # from now on the steps start from the applied position
    again = _steps(ex, qtbot)
    np.testing.assert_allclose(again.positions[0, 0], traj.positions[3, 0], atol=1e-3)


def test_explorer_exports_labelled_frames(detected, qtbot, tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    viewer, ex, det = detected
    ex.set_landmark(0)
    traj = _steps(ex, qtbot)
    ex.focus()
    plain = ex.frames("tiles", labels=False)
    labelled = ex.frames("tiles")
    assert len(plain) == len(labelled) == traj.iterations == 3
    assert labelled[0].shape[0] > plain[0].shape[0] + 40 and labelled[0].shape[1] == plain[0].shape[1]
    caps = ex.last_captions
    assert caps[1][0].startswith(f"{det.landmark_names[0]} (S) · glimpse step 2/3 · 151.jpg")
    assert "mm" in caps[1][1]
    top = labelled[0].shape[0] - plain[0].shape[0]
    assert (labelled[0][:top] > 200).all(-1).sum() > 100  # white title text in the band above
    out = ex.export(tmp_path / "tiles.gif", fps=4, source="tiles")
    assert out is not None and len(imageio.mimread(out)) == traj.iterations
    out = ex.export(tmp_path / "canvas.gif", fps=4)
    frames = imageio.mimread(out)
    assert len(frames) == traj.iterations
    assert np.asarray(frames[0]).std() > 5  # the canvas rendered, not a black frame
    assert ex.export(tmp_path / "bad.avi") is None and "gif or .mp4" in ex.status_label.text()


def test_explorer_explores_a_coarse_only_answer_from_its_proposal(make_napari_viewer, qtbot, isbi,
                                                                  isbi_model_path, tmp_path):
    """A coarse-only answer (no fine look, no glimpse steps): no stage view, but its proposal can
    still be explored with glimpse steps (and exported)."""
    from napari_glimpse import _layer_data as ld

    _, detect, ex, det = _viewer_detected(make_napari_viewer, qtbot, isbi, isbi_model_path, tmp_path)
    detect.set_model(_with_stages(isbi_model_path, tmp_path / "coarse19.pt", fine=False))
    det = _detect(detect, qtbot)
    traj = det.trajectory
    assert traj.iterations == 0 and not ld.has_stages(traj)
    assert ex.view() == "glimpses" and not ex.view_combo.model().item(ex.view_combo.findData("stages")).isEnabled()
    steps = _steps(ex, qtbot)
    np.testing.assert_allclose(steps.positions[0, 0], traj.final[ex.landmark_combo.currentIndex()], atol=1e-3)
    assert ex.export(tmp_path / "tiles.gif", fps=4, source="tiles") is not None


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
    assert ex.view() == "stages"  # what made the answer comes first
    ex.set_landmark(5)
    k = 5
    coarse, fine = traj.coarse_positions[k], traj.fine_positions[0, k]
    assert not np.allclose(coarse, fine)
    np.testing.assert_allclose(_answer_of(det, k), fine[::-1], atol=1e-6)  # the fine answer is the one shown
    # one window outline per context level, centred on the coarse answer, 64 level-(1 + c) pixels a side
    shp = ex.layers["shapes"]
    assert shp.visible and list(shp.shape_type) == ["rectangle"] * 3 + ["path", "polygon"]
    for c in range(3):
        world = np.array([shp.data_to_world(p) for p in shp.data[c]])
        np.testing.assert_allclose(world.mean(0), coarse[::-1], atol=1e-6)
        np.testing.assert_allclose(np.ptp(world, axis=0), [128 * 2**c] * 2, rtol=2e-3)
    # the arrow runs from the coarse answer to the fine answer; the points sit on both
    np.testing.assert_allclose(shp.data[3][0], coarse[::-1], atol=1e-6)
    np.testing.assert_allclose(shp.data[4][0], fine[::-1], atol=1e-6)
    pts = ex.layers["points"]
    np.testing.assert_allclose(pts.data, [coarse[::-1], fine[::-1]], atol=1e-6)
    np.testing.assert_allclose(pts.face_color[:, :3], np.array([ld.COARSE_RGB, ld.FINE_RGB]) / 255, atol=1e-6)
    # the fine heatmap over the image (RGBA, transparent where low) peaks within a cell of the fine answer
    hm = ex.layers["image"]
    assert hm.visible and hm.data.shape == (32, 32, 4)
    peak = np.unravel_index(np.argmax(hm.data[..., 3]), hm.data.shape[:2])
    cell = float(hm.scale[0])
    assert np.linalg.norm(np.asarray(hm.data_to_world(peak)) - fine[::-1]) < 1.5 * cell
    assert not ex.tiles.pixmap().isNull() and "moved" in ex.info.text() and "L3" in ex.info.text()
    assert ex.step_name.text() == "Fine look" and ex.slider.maximum() == 0 and ex.channel.isHidden()
    assert ex.apply_btn.isHidden()
    _check_layer_order(viewer, ex, det)
    # another landmark, chosen elsewhere: the outlines follow its coarse answer
    ex.state.select_landmark(12)
    np.testing.assert_allclose(ex.layers["shapes"].data[3][0], traj.coarse_positions[12, ::-1], atol=1e-6)
    np.testing.assert_allclose(np.mean(ex.layers["shapes"].data[0], axis=0), traj.coarse_positions[12, ::-1],
                               atol=1e-6)
    ex.hm_check.setChecked(False)
    assert not hm.visible
    ex.hm_check.setChecked(True)
    # the overlays exist only while the explorer is shown
    ex.hide()
    assert not any(layer.visible for layer in ex.layers.values())
    ex.show()
    qtbot.waitUntil(lambda: ex.layers["shapes"].visible, timeout=3000)
    assert ex.layers["image"].visible and ex.layers["points"].visible


def test_explorer_switches_between_stages_and_glimpses(staged, qtbot, tmp_path):
    from napari_glimpse import _layer_data as ld

    viewer, detect, ex, det = staged
    traj = det.trajectory
    assert ex.view() == "stages" and ex.slider.maximum() == 0
    ex.set_landmark(3)
    ex.set_view("glimpses")
    assert ex.slider.maximum() == 2 and ex.step_name.text() == "Step" and not ex.max_level.isHidden()
    steps = _steps(ex, qtbot)
    # the glimpses start from the proposal: the fine answer
    np.testing.assert_allclose(steps.positions[0, 0], traj.fine_positions[-1, 3], atol=1e-3)
    assert list(ex.layers["shapes"].shape_type).count("rectangle") == 6
    arrow = ld.arrow_shapes(ld.offset_vector(steps, 0, 0))
    assert len(ex.layers["shapes"].data) == 6 + 1 + len(arrow)
    _check_layer_order(viewer, ex, det)
    assert len(_explorer_layers(viewer)) == 3
    ex.set_view("stages")
    assert ex.max_level.isHidden() and ex.n_rows.isHidden() and ex.slider.maximum() == 0
    assert list(ex.layers["shapes"].shape_type) == ["rectangle"] * 3 + ["path", "polygon"]
    assert len(_explorer_layers(viewer)) == 3  # the same three layers, redrawn
    # the stage view exports its looks, labelled
    imageio = pytest.importorskip("imageio.v2")
    out = ex.export(tmp_path / "fine.gif", fps=2, source="tiles")
    frames = imageio.mimread(out)
    assert len(frames) == traj.fine_looks == 1
    strip = ld.fine_tile_strip(traj, 3, 0)
    assert np.asarray(frames[0]).shape[1] == 2 * strip.shape[1] and np.asarray(frames[0]).shape[0] > 2 * strip.shape[0]
    assert ex.last_captions[0][0].startswith(f"{det.landmark_names[3]} (") and "fine look 1/1" in ex.last_captions[0][0]
