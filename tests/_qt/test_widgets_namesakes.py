"""A review stays with its image (widgets opened as users open them, ``add_plugin_dock_widget``):
an accepted image opened by hand in a new session and detected again keeps its reviewed points; a
different patient's image of the same file name in another folder neither shows nor edits them;
points restored from the log carry the image's spacing (the measurements' MW); a folder move
while a detection runs changes nothing; without the review widget an edit says it is not logged."""

from __future__ import annotations

import numpy as np
import pytest

from ._env import require_gui

require_gui()


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_GLIMPSE_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def folders(isbi, tmp_path):
    """``clinic/151.jpg``, ``clinic/152.jpg`` and ``other/151.jpg`` (another patient: ISBI 153), linked."""
    for name, pairs in (("clinic", (("151.jpg", "151.jpg"), ("152.jpg", "152.jpg"))),
                        ("other", (("151.jpg", "153.jpg"),))):
        (tmp_path / name).mkdir()
        for link, target in pairs:
            (tmp_path / name / link).symlink_to(isbi / "images" / target)
    return tmp_path / "clinic", tmp_path / "other"


def _widgets(viewer, model, review: bool = True):
    _, detect = viewer.window.add_plugin_dock_widget("napari-glimpse", "Detect landmarks")
    corr = viewer.window.add_plugin_dock_widget("napari-glimpse", "Review and corrections")[1] if review else None
    detect.set_model(model)
    detect.device_combo.setCurrentText("cpu")
    return detect, corr


def _open(make_napari_viewer, qtbot, folder, model, review: bool = True):
    """A new viewer with the widgets, ``folder`` opened and its first image detected."""
    viewer = make_napari_viewer()
    detect, corr = _widgets(viewer, model, review)
    return viewer, detect, corr, _detect(qtbot, detect, detect.open_folder(folder, start=False))


def _detect(qtbot, detect, worker):
    assert worker is not None
    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        worker.start()
    return b.args[0]


def _move_first_point(layer, by=(30.0, -20.0)):
    data = np.array(layer.data)
    data[0] += by
    layer.data = data  # as a drag ends: the review widget logs it


def _log(folder):
    from napari_glimpse.corrections import CorrectionLog

    return CorrectionLog(folder)


def test_a_reviewed_image_opened_by_hand_keeps_its_review(make_napari_viewer, qtbot, config, folders,
                                                          isbi_model_path):
    clinic, _ = folders
    viewer, detect, corr, det = _open(make_napari_viewer, qtbot, clinic, isbi_model_path)
    _move_first_point(det.points_layer)
    corr.accept()
    image = clinic / "151.jpg"
    reviewed = _log(clinic).state.positions(image)
    assert _log(clinic).state.is_accepted(image) and _log(clinic).state.corrected(image)

    # a new session: the image opened by hand (File > Open), the spacing typed, Detect pressed
    viewer2 = make_napari_viewer()
    viewer2.open(str(image), plugin="napari-glimpse")
    detect2, _ = _widgets(viewer2, isbi_model_path)
    detect2.spacing_spin.setValue(0.13)
    det2 = _detect(qtbot, detect2, detect2.detect(start=False))
    assert "kept the reviewed points" in detect2.status_label.text()
    after = _log(clinic).state
    assert after.is_accepted(image) and after.corrected(image)  # no new proposal over the review
    np.testing.assert_allclose(after.positions(image), reviewed)
    # the points shown are the reviewed ones, at the spacing the image is read at (the measurements' MW)
    assert det2.points_layer.metadata["pixel_spacing"] == pytest.approx(0.13)


def test_a_namesake_in_another_folder_neither_shows_nor_edits_the_review(make_napari_viewer, qtbot, config,
                                                                         folders, isbi_model_path):
    clinic, other = folders
    viewer, detect, corr, det = _open(make_napari_viewer, qtbot, clinic, isbi_model_path)
    _move_first_point(det.points_layer)
    corr.accept()
    clinic_records = len(_log(clinic).records)

    viewer.open(str(other / "151.jpg"), plugin="napari-glimpse")  # another patient, the same file name
    det = _detect(qtbot, detect, detect.detect(start=False))
    assert det.image_path == other / "151.jpg" and det.trajectory is not None  # its own detection
    assert "kept the reviewed points" not in detect.status_label.text()
    _move_first_point(det.points_layer)
    assert len(_log(clinic).records) == clinic_records  # the clinic's review untouched
    theirs = _log(other).state
    assert theirs.has_proposal(other / "151.jpg") and theirs.corrected(other / "151.jpg") == [0]


def test_a_folder_move_while_detecting_changes_nothing(make_napari_viewer, qtbot, config, folders,
                                                       isbi_model_path):
    clinic, _ = folders
    viewer = make_napari_viewer()
    detect, _ = _widgets(viewer, isbi_model_path)
    worker = detect.open_folder(clinic, start=False)
    assert detect.busy and detect.show_image(1) is None  # PageDown pressed again meanwhile
    assert detect.folder_index == 0
    det = _detect(qtbot, detect, worker)
    assert det.image_path == clinic / "151.jpg" and "1/2: 151.jpg" in detect.folder_info.value


def test_an_edit_without_the_review_widget_says_it_is_not_logged(make_napari_viewer, qtbot, config, folders,
                                                                 isbi_model_path):
    clinic, _ = folders
    viewer, detect, _, det = _open(make_napari_viewer, qtbot, clinic, isbi_model_path, review=False)
    assert "open it" in detect.status_label.text()
    _move_first_point(det.points_layer)
    assert "NOT logged" in detect.status_label.text()
    # with the review widget open, the next image's edits are logged and nothing warns
    corr = viewer.window.add_plugin_dock_widget("napari-glimpse", "Review and corrections")[1]
    det = _detect(qtbot, detect, detect.go(+1, start=False))
    _move_first_point(det.points_layer)
    assert "NOT logged" not in detect.status_label.text()
    assert _log(clinic).state.corrected(clinic / "152.jpg") == [0] and corr is not None


def test_the_review_lets_go_of_an_image_whose_layers_are_deleted(make_napari_viewer, qtbot, config, folders,
                                                                 isbi_model_path):
    clinic, _ = folders
    viewer, detect, corr, det = _open(make_napari_viewer, qtbot, clinic, isbi_model_path)
    _move_first_point(det.points_layer)
    assert "logged" in corr.status_label.text()
    det = _detect(qtbot, detect, detect.go(+1, start=False))
    assert "logged" not in corr.status_label.text()  # the last image's message does not carry over
    viewer.layers.select_all()
    viewer.layers.remove_selected()
    assert "layers were removed" in corr.status_label.text()
    assert corr.accept() is None and not _log(clinic).state.is_accepted(clinic / "152.jpg")


def test_page_down_in_the_landmark_table_moves_along_the_folder(make_napari_viewer, qtbot, config, folders,
                                                                isbi_model_path):
    from qtpy.QtCore import Qt

    clinic, _ = folders
    _viewer, detect, _, _det = _open(make_napari_viewer, qtbot, clinic, isbi_model_path)
    detect.table.setFocus()
    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        qtbot.keyClick(detect.table, Qt.Key_PageDown)
    assert b.args[0].image_path == clinic / "152.jpg" and detect.folder_index == 1
