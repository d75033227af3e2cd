"""Detect widget: a folder of real cephalograms with next/previous, the log restoring reviewed
images, the confidence table, and errors shown instead of raised."""

from __future__ import annotations

import numpy as np
import pytest

from ._env import require_gui

require_gui()


@pytest.fixture
def folder(isbi, tmp_path):
    """Three ISBI images, linked (not copied) into a folder of their own."""
    d = tmp_path / "ceph"
    d.mkdir()
    for n in ("151.jpg", "152.jpg", "153.jpg"):
        (d / n).symlink_to(isbi / "images" / n)
    return d


def test_folder_navigation_and_restore_from_log(make_napari_viewer, qtbot, folder, isbi_model_path):
    from napari_glimpse._widgets._corrections import CorrectionsWidget
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._state import state_for

    viewer = make_napari_viewer()
    detect = DetectWidget(viewer)
    corr = CorrectionsWidget(viewer)
    state = state_for(viewer)
    detect.set_model(isbi_model_path)

    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        detect.open_folder(folder, start=False).start()
    det = b.args[0]
    assert det.image_name == "151.jpg" and len(det.points_layer.data) == 19
    assert detect.folder_label.text().startswith("1/3: 151.jpg")
    assert not detect.prev_btn.isEnabled() and detect.next_btn.isEnabled()
    log = state.log
    assert log is not None and log.path.parent == folder  # the default log lives with the images
    image_layer = det.image_layer
    assert image_layer.data.shape == (2400, 1935)

    # the table lists the landmarks by confidence; a click selects the point
    conf = [float(detect.table.item(r, 2).text()) for r in range(19)]
    assert conf == sorted(conf)
    detect.table.selectRow(0)
    k = int(detect.table.item(0, 0).text()) - 1
    assert state.selected_landmark == k
    sel = list(det.points_layer.selected_data)
    assert len(sel) == 1 and det.points_layer.features["index"][sel[0]] == k + 1

    # correct one landmark, then move on and come back: the correction is still there
    layer = det.points_layer
    moved = layer.data.copy()
    moved[0] += (25.0, 25.0)
    with qtbot.waitSignal(corr.recorded, timeout=5000):
        layer.data = moved
    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        detect.go(+1, start=False).start()
    det2 = b.args[0]
    assert det2.image_name == "152.jpg" and det2.image_layer is image_layer  # one image layer, reused
    assert image_layer.metadata["path"].endswith("152.jpg")
    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        detect.go(-1, start=False).start()
    det3 = b.args[0]
    assert det3.image_name == "151.jpg" and det3.trajectory is None  # from the log, no model run
    np.testing.assert_allclose(det3.points_layer.data[0], moved[0])
    assert [r.action for r in log.records].count("propose") == 2  # 151 and 152, once each
    assert len(viewer.layers) == 2  # one image, one landmarks layer


def test_errors_are_shown_not_raised(make_napari_viewer, qtbot, isbi, tmp_path):
    import torch

    from napari_glimpse._widgets._detect import DetectWidget

    viewer = make_napari_viewer()
    detect = DetectWidget(viewer)
    assert detect.detect() is None and "open a cephalogram" in detect.status_label.text()
    viewer.open(str(isbi / "images" / "151.jpg"), plugin="napari-glimpse")
    bad = tmp_path / "not-a-model.pt"
    bad.write_bytes(b"junk")
    detect.set_model(bad)
    worker = detect.detect(start=False)
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        worker.start()
    assert "not a napari-glimpse model" in detect.status_label.text()
    assert detect.run_btn.isEnabled()
    if not torch.cuda.is_available():
        detect.set_model(None)
        detect.device_combo.setCurrentText("cuda")
        worker = detect.detect(start=False)
        with qtbot.waitSignal(worker.finished, timeout=60_000):
            worker.start()
        text = detect.status_label.text()
        assert "CUDA" in text or "default model is missing" in text
