"""Annotate from zero, train, detect (issue 24, acceptance 3), as users do it: widgets from
``add_plugin_dock_widget``, a landmark set typed in the GUI, points placed by real clicks on the
canvas, the picker and keys; a tiny model trained from the GUI in a separate process; detection with it.

``NAPARI_GLIMPSE_SHOTS=DIR`` also saves the window while annotating (docs/annotate.png:
``NAPARI_GLIMPSE_SHOTS=docs xvfb-run -a -s "-screen 0 1920x1600x24" python -m pytest THIS_FILE``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ._env import click_at, require_gui

require_gui()

SET_TEXT = "Sella, S\nNasion, N\nMenton, Me\nGonion, Go"
ISBI_K = (0, 1, 7, 9)  # the ISBI columns of these four


def _key(qtbot, viewer, key, modifier=None):
    from qtpy.QtCore import Qt

    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, key, modifier if modifier is not None else Qt.NoModifier)


def _truth(isbi, name):
    from napari_glimpse.io import read_landmarks_csv

    names, coords = read_landmarks_csv(isbi / "test1_senior.csv")
    return coords[names.index(name)][list(ISBI_K)]  # (4, 2) x, y


def _wait_for_empty_layer(qtbot, state, name):
    qtbot.waitUntil(lambda: state.current is not None and state.current.image_name == name
                    and state.current.points_layer is not None, timeout=30_000)
    return state.current.points_layer


def _shot(viewer, ann, qtbot, layer):
    """The window while annotating: the set as typed beside the points being placed (Annotate and Review
    docked, the others hidden; the view on the placed points)."""
    out = os.environ.get("NAPARI_GLIMPSE_SHOTS")
    if not out:
        return
    from qtpy.QtCore import Qt

    from napari_glimpse._widgets._state import camera_of

    ann._show_editor(True)
    hidden = [d for n, d in viewer.window._wrapped_dock_widgets.items()
              if n.startswith(("Detect", "Train", "Measurements"))]
    for d in hidden:
        d.hide()
    win = viewer.window._qt_window
    win.resize(1700, 1400)
    docks = [d for n, d in viewer.window._wrapped_dock_widgets.items() if n.startswith(("Annotate", "Review"))]
    qtbot.wait(100)
    win.resizeDocks(docks, [700, 600], Qt.Vertical)
    win.resizeDocks(docks[:1], [560], Qt.Horizontal)
    cam = camera_of(viewer)
    cam.center, cam.zoom = tuple(np.mean(layer.data, axis=0) + (-150, 0)), 0.55
    qtbot.wait(400)
    viewer.screenshot(str(Path(out) / "annotate.png"), canvas_only=False, flash=False)
    for d in hidden:
        d.show()
    ann._show_editor(False)


def test_a_new_set_annotated_trained_and_detected(make_napari_viewer, qtbot, isbi, tmp_path):
    from qtpy.QtCore import Qt

    from napari_glimpse.landmark_set import load_landmark_set

    viewer = make_napari_viewer()
    w = {n: viewer.window.add_plugin_dock_widget("napari-glimpse", n)[1]
         for n in ("Annotate", "Review and corrections", "Train a model", "Measurements")}
    ann, review, train = w["Annotate"], w["Review and corrections"], w["Train a model"]
    state = ann.state
    folder = tmp_path / "clinic"
    folder.mkdir()
    for n in ("151.jpg", "152.jpg", "153.jpg"):
        (folder / n).symlink_to(isbi / "images" / n)

    # ---- a set of 4 points typed in the GUI (New set…, typing, Save set); the folder gets it as landmarks.json
    qtbot.mouseClick(ann.new_btn, Qt.LeftButton)
    assert not ann.editor.native.isHidden()
    qtbot.keyClicks(ann.set_name.native, "lab4")
    for line in SET_TEXT.splitlines():
        qtbot.keyClicks(ann.set_text.native, line)
        qtbot.keyClick(ann.set_text.native, Qt.Key_Return)
    qtbot.mouseClick(ann.save_btn, Qt.LeftButton)
    assert state.landmark_set is not None and state.landmark_set.labels == ("S", "N", "Me", "Go")
    assert "lab4: 4 landmarks" in ann.set_info.value and ann.editor.native.isHidden()
    detect = ann.detect_widget()  # Annotate docks Detect: it shows the folder's images
    detect.device_combo.setCurrentText("cpu")
    with qtbot.waitSignal(detect.detected, timeout=120_000):
        ann.open_folder(folder)
    assert load_landmark_set(folder / "landmarks.json").labels == ("S", "N", "Me", "Go")

    # ---- 151: no model, an empty landmarks layer in add mode; clicks place the picked landmark
    layer = _wait_for_empty_layer(qtbot, state, "151.jpg")
    log = state.log
    assert len(layer.data) == 0 and layer.mode == "add" and log.state.landmark_names[2] == "Menton"
    assert review.picker.currentIndex() == 0 and review.picker.count() == 4
    assert w["Measurements"].layer is None and "not the ISBI 19" in w["Measurements"].info.text()
    truth = _truth(isbi, "151.jpg")
    click_at(viewer, layer, truth[0][::-1], qtbot)  # Sella; the picker moves on to Nasion
    assert [r.action for r in log.records][-1] == "add" and log.records[-1].k == 0
    assert review.picker.currentIndex() == 1
    _key(qtbot, viewer, Qt.Key_N)  # next landmark: Menton (Nasion left for later)
    assert review.picker.currentIndex() == 2
    click_at(viewer, layer, truth[2][::-1], qtbot)
    click_at(viewer, layer, truth[3][::-1], qtbot)  # Gonion (the picker moved on by itself)
    assert review.picker.currentIndex() == 1  # back to the one left: Nasion
    _shot(viewer, ann, qtbot, layer)
    click_at(viewer, layer, truth[1][::-1], qtbot)
    assert log.state.missing(folder / "151.jpg") == []
    np.testing.assert_allclose(log.state.positions(folder / "151.jpg"), truth, atol=4.0)  # a screen px ~ 2.5 px
    assert sorted(layer.features["abbr"]) == sorted(["S", "N", "Me", "Go"])  # the set's labels on the canvas
    _key(qtbot, viewer, Qt.Key_Return, Qt.ShiftModifier)  # accept
    assert log.state.is_accepted(folder / "151.jpg")

    # ---- 152 by keyboard: PageDown, then the picker and clicks
    with qtbot.waitSignal(detect.detected, timeout=120_000):
        _key(qtbot, viewer, Qt.Key_PageDown)
    layer = _wait_for_empty_layer(qtbot, state, "152.jpg")
    truth = _truth(isbi, "152.jpg")
    for k in (3, 2, 1, 0):  # in any order: pick, click
        review.pick(k)
        click_at(viewer, layer, truth[k][::-1], qtbot)
    _key(qtbot, viewer, Qt.Key_Return, Qt.ShiftModifier)
    assert log.state.accepted() == ["151.jpg", "152.jpg"]
    assert [r.action for r in log.records].count("add") == 8 and log.state.model(folder / "152.jpg") is None

    # ---- export: the set's CSV, 4 column pairs
    out = review.export()
    assert out.read_text().splitlines()[0] == "image_path,1_x,1_y,2_x,2_y,3_x,3_y,4_x,4_y"
    assert str(train.data_edit.value) == str(out) and "lab4: 4 landmarks; 2 labelled images" in train.set_label.value

    # ---- train from the GUI: a separate process, few steps
    train.steps.value = 2
    train.minutes.value = 5
    train.out_edit.value = str(tmp_path / "lab4.pt")
    seen = []
    train.progressed.connect(seen.append)
    with qtbot.waitSignal(train.finished, timeout=300_000) as fin:
        assert train.start() is not None
    assert fin.args == [0, str(tmp_path / "lab4.pt")], train.log.toPlainText()
    assert {ln["stage"] for ln in seen} == {"coarse", "fine"} and seen[-1]["progress"] > 0.99
    assert "recipe default" in train.status_label.text()

    # ---- detect with it: the next image gets the set's 4 points
    train.use_new_model()
    assert state.model_path == tmp_path / "lab4.pt"
    with qtbot.waitSignal(detect.detected, timeout=120_000) as blocker:
        _key(qtbot, viewer, Qt.Key_PageDown)
    det = blocker.args[0]
    assert det.image_name == "153.jpg" and det.model_name == "lab4.pt" and det.trajectory is not None
    assert len(det.points_layer.data) == 4 and np.isfinite(det.points_layer.data).all()
    assert list(det.points_layer.features["landmark"]) == ["Sella", "Nasion", "Menton", "Gonion"]
    assert json.loads((folder / "landmarks.json").read_text())["name"] == "lab4"
    assert log.state.model(folder / "153.jpg") == "lab4.pt"  # its proposal is logged, ready for review


def test_a_folder_of_another_set_is_not_detected_on_with_the_isbi_model(make_napari_viewer, tmp_path):
    """The Annotate widget wants a set before a folder; a folder annotated with a set of 4 is not detected on
    when moving to an image with the shipped (ISBI 19) model, and its proposal would be refused, naming both."""
    from types import SimpleNamespace

    import pytest

    from napari_glimpse.annotate import save_folder_set, set_from_text
    from napari_glimpse.errors import GlimpseError
    from napari_glimpse.landmarks import ISBI_LANDMARKS

    viewer = make_napari_viewer()
    _d, ann = viewer.window.add_plugin_dock_widget("napari-glimpse", "Annotate")
    assert ann.open_folder(tmp_path) is None and "choose its landmark set first" in ann.status_label.text()
    save_folder_set(set_from_text("lab4", SET_TEXT), tmp_path)
    state = ann.state
    log = state.open_log(tmp_path, tmp_path)  # no record yet: the folder's set names its landmarks
    assert log.state.landmark_names == ("Sella", "Nasion", "Menton", "Gonion")
    assert state.model_path is None and not state.model_fits()
    traj = SimpleNamespace(landmark_names=ISBI_LANDMARKS, final=np.zeros((19, 2)), confidence=None)
    with pytest.raises(GlimpseError, match="finds 19 landmarks .* not the 4 .* train one"):
        state.record_proposal(tmp_path / "151.jpg", traj, "default")
    assert not log.records


def test_an_opened_image_from_zero_and_a_cancelled_training(make_napari_viewer, qtbot, isbi, tmp_path):
    """An image opened by hand (File ▸ Open) annotated with a set loaded from a file (its own colours on the
    canvas); Train a model exports the accepted image itself and reports a training that cannot run (a landmark
    absent everywhere); then Cancel stops one."""
    from napari_glimpse.landmark_set import Landmark, LandmarkSet, find_landmark_set, save_landmark_set

    lset = LandmarkSet("lab3", (Landmark("Sella", "S", "#00ff00"), Landmark("Nasion", "N", "#ff00ff"),
                                Landmark("Menton", "Me", "#0000ff")))
    save_landmark_set(lset, tmp_path / "lab3.json")
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "151.jpg").symlink_to(isbi / "images" / "151.jpg")
    viewer = make_napari_viewer()
    viewer.open(str(folder / "151.jpg"), plugin="napari-glimpse")
    w = {n: viewer.window.add_plugin_dock_widget("napari-glimpse", n)[1]
         for n in ("Annotate", "Review and corrections", "Train a model")}
    ann, review, train = w["Annotate"], w["Review and corrections"], w["Train a model"]
    assert ann.load_set(tmp_path / "lab3.json") == lset and "open a folder" in ann.status_label.text()
    det = ann.annotate_current()  # the opened image: logged with no point, the set saved beside it
    assert det is not None and det.image_path == folder / "151.jpg" and len(det.points_layer.data) == 0
    assert find_landmark_set(folder) == lset and ann.state.log.image_dir == folder
    qtbot.wait(50)
    layer, truth = det.points_layer, _truth(isbi, "151.jpg")
    click_at(viewer, layer, truth[0][::-1], qtbot)
    assert list(layer.features["landmark"]) == ["Sella"] and review.picker.currentIndex() == 1
    np.testing.assert_allclose(layer.face_color[0, :3], (0, 1, 0))  # the set's own colour
    assert review.accept() is None and "missing" in review.status_label.text()
    click_at(viewer, layer, truth[1][::-1], qtbot)
    review.mark_absent(2)
    assert review.accept() is not None

    # Train a model: no CSV chosen, the log's accepted image is exported first; Menton is absent everywhere
    assert "lab3: 3 landmarks; 1 accepted images" in train.set_label.value
    with qtbot.waitSignal(train.finished, timeout=120_000) as fin:
        assert train.start() is not None
    csv = folder / "napari-glimpse-reviewed.csv"
    assert str(train.data_edit.value) == str(csv) and csv.read_text().splitlines()[1].endswith(",,")
    assert fin.args[0] not in (0, -1) and "training failed" in train.status_label.text()
    assert "landmark 3 (Menton) is absent on every training image" in train.status_label.text()
    args = train.command()
    assert args[args.index("--recipe") + 1] == "default" and args[args.index("--time-budget") + 1] == "30"
    assert "--max-steps" not in args and args[args.index("--nice") + 1] == "10"
    assert Path(train.out_edit.value).name.startswith("lab3-1img-")

    # Menton placed after all (undo the absent, click), exported again; a training started, then cancelled
    review.undo()
    review.pick(2)
    click_at(viewer, layer, truth[2][::-1], qtbot)
    assert review.export() == csv and ",," not in csv.read_text()
    train.out_edit.value = str(tmp_path / "never.pt")
    seen = []
    train.progressed.connect(seen.append)
    assert train.start() is not None
    qtbot.waitUntil(lambda: bool(seen) or not train.running, timeout=240_000)  # a first step (a niced process)
    assert seen, train.log.toPlainText()
    with qtbot.waitSignal(train.finished, timeout=30_000) as fin:
        train.cancel()
    assert fin.args == [-1, ""] and "cancelled" in train.status_label.text()
    assert not (tmp_path / "never.pt").exists() and train.start_btn.isEnabled()


def test_review_annotates_an_image_without_landmarks_from_zero(make_napari_viewer, qtbot, isbi, tmp_path):
    """What Review did with a folder image shown without detection: every button off, no way to place a point.
    Now it offers Annotate from zero (no set chosen, no landmarks.json: the ISBI 19)."""
    from qtpy.QtCore import Qt

    from napari_glimpse.landmark_set import ISBI19, find_landmark_set

    (tmp_path / "151.jpg").symlink_to(isbi / "images" / "151.jpg")
    viewer = make_napari_viewer()
    _d, detect = viewer.window.add_plugin_dock_widget("napari-glimpse", "Detect landmarks")
    _d, review = viewer.window.add_plugin_dock_widget("napari-glimpse", "Review and corrections")
    detect.auto_check.setChecked(False)  # shown, not detected
    with qtbot.waitSignal(detect.detected, timeout=60_000) as blocker:
        detect.open_folder(tmp_path)
    assert blocker.args[0].points_layer is None and not review.zero_btn.isHidden()
    assert "no landmarks" in review.image_label.text() and not review.accept_btn.isEnabled()
    qtbot.mouseClick(review.zero_btn, Qt.LeftButton)
    det = review.det
    assert det.points_layer is not None and len(det.points_layer.data) == 0 and det.points_layer.mode == "add"
    assert review.picker.count() == 19 and review.zero_btn.isHidden() and find_landmark_set(tmp_path) == ISBI19
    assert "from zero" in review.image_label.text() and review.absent_btn.isEnabled()


def test_a_folder_annotated_with_another_set_of_as_many_landmarks_is_refused(make_napari_viewer, qtbot, isbi,
                                                                             tmp_path):
    """File ▸ Open an image of a folder annotated with set A, load set B (the same 4 in another order), Annotate
    this image: refused naming both sets; the folder's landmarks.json and log untouched (before: the log was read
    under B's names, Sella's point shown as Gonion, and landmarks.json replaced by B)."""
    from qtpy.QtCore import Qt

    from napari_glimpse.annotate import save_folder_set, set_from_text, start_from_zero
    from napari_glimpse.corrections import CorrectionLog
    from napari_glimpse.landmark_set import find_landmark_set, save_landmark_set

    folder = tmp_path / "clinic"
    folder.mkdir()
    (folder / "151.jpg").symlink_to(isbi / "images" / "151.jpg")
    a = set_from_text("lab4", SET_TEXT)
    save_folder_set(a, folder)
    log = CorrectionLog(folder, a.names)
    start_from_zero(log, folder / "151.jpg")
    log.add(folder / "151.jpg", 0, (800.0, 900.0))  # Sella
    before = (log.path.read_bytes(), (folder / "landmarks.json").read_bytes())
    b = set_from_text("lab4b", "Gonion, Go\nNasion, N\nMenton, Me\nSella, S")
    save_landmark_set(b, tmp_path / "lab4b.json")

    viewer = make_napari_viewer()
    viewer.open(str(folder / "151.jpg"), plugin="napari-glimpse")
    _d, ann = viewer.window.add_plugin_dock_widget("napari-glimpse", "Annotate")
    ann.auto.value = False
    assert ann.load_set(tmp_path / "lab4b.json") == b
    qtbot.mouseClick(ann.here_btn, Qt.LeftButton)  # Annotate this image
    text = ann.status_label.text()
    assert "Sella, Nasion, Menton, Gonion" in text and "'lab4b'" in text and "Gonion, Nasion, Menton, Sella" in text
    assert (log.path.read_bytes(), (folder / "landmarks.json").read_bytes()) == before
    assert find_landmark_set(folder) == a
    opened = ann.state.log  # the folder's log, under its own names
    assert opened is None or opened.state.landmark_names == a.names
    assert not [ly for ly in viewer.layers if ly.name.endswith("landmarks")]


def test_train_refuses_a_csv_of_another_count_without_landmarks_json(make_napari_viewer, tmp_path):
    """Annotating a set of 4, Train a model on a 19-landmark CSV whose folder has no landmarks.json (e.g.
    isbi2015/train_senior.csv): an error line, no training, no landmarks.json written there (before: a 4-landmark
    one, breaking every later load of that dataset)."""
    from napari_glimpse.annotate import set_from_text
    from napari_glimpse.io import write_landmarks_csv

    data = tmp_path / "isbi2015"
    data.mkdir()
    write_landmarks_csv(data / "train_senior.csv", ["001.bmp"], np.arange(38, dtype=float).reshape(1, 19, 2))
    viewer = make_napari_viewer()
    _d, train = viewer.window.add_plugin_dock_widget("napari-glimpse", "Train a model")
    train.state.set_landmark_set(set_from_text("lab4", SET_TEXT))
    train.data_edit.value = str(data / "train_senior.csv")
    train.out_edit.value = str(tmp_path / "never.pt")
    assert train.start() is None and not train.running
    text = train.status_label.text()
    assert "train_senior.csv has 19 landmarks" in text and "'lab4' (4 landmarks)" in text
    assert not (data / "landmarks.json").exists() and not (tmp_path / "never.pt").exists()
