"""Detect widget's pixel spacing field: remembered per folder (in the config folder), passed to the
model (the detection is at that spacing, in the image's pixels), a notice shown when the spacing is
assumed for an image of unusual size, a bad value shown as an error; the fine-tune widget passes
the remembered spacing of the labels' images on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ._env import require_gui

require_gui()


@pytest.fixture
def config(tmp_path, monkeypatch):
    d = tmp_path / "config"
    monkeypatch.setenv("NAPARI_GLIMPSE_CONFIG_DIR", str(d))
    return d


@pytest.fixture
def folders(isbi, tmp_path):
    """Two folders of two ISBI images each (linked, not copied)."""
    out = []
    for name, imgs in (("clinic_a", ("151.jpg", "152.jpg")), ("clinic_b", ("153.jpg", "154.jpg"))):
        d = tmp_path / name
        d.mkdir()
        for n in imgs:
            (d / n).symlink_to(isbi / "images" / n)
        out.append(d)
    return out


def _detect(qtbot, detect, worker):
    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        worker.start()
    return b.args[0]


def test_spacing_field_is_remembered_per_folder_and_used(make_napari_viewer, qtbot, config, folders,
                                                          isbi_model_path):
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse.inference import GlimpseModel

    a, b = folders
    viewer = make_napari_viewer()
    detect = DetectWidget(viewer)
    detect.set_model(isbi_model_path)
    detect.auto_check.setChecked(False)
    det = _detect(qtbot, detect, detect.open_folder(a, start=False))
    assert detect.spacing_spin.value() == 0 and det.trajectory is None
    detect.spacing_spin.setValue(0.13)  # as typed (keyboard tracking off: once, when done)
    assert json.loads((config / "spacing.json").read_text()) == {str(a.resolve()): 0.13}
    det = _detect(qtbot, detect, detect.detect(start=False))
    tr = det.trajectory
    assert tr.pixel_spacing == 0.13 and tr.spacing_source == "given" and tr.image_shape == (2400, 1935)
    assert "0.13 mm/px (set)" in detect.status_label.text()
    want = GlimpseModel.load(isbi_model_path, device="cpu").predict(a / "151.jpg", spacing=0.13)
    np.testing.assert_allclose(tr.final, want.final, atol=1e-3)
    # another folder has its own (none yet); coming back shows this one's again, also in a new widget
    _detect(qtbot, detect, detect.open_folder(b, start=False))
    assert detect.spacing_spin.value() == 0
    det = _detect(qtbot, detect, detect.detect(start=False))
    assert det.trajectory.spacing_source == "model" and "0.1 mm/px (the model's)" in detect.status_label.text()
    _detect(qtbot, detect, detect.open_folder(a, start=False))
    assert detect.spacing_spin.value() == pytest.approx(0.13)
    other = DetectWidget(make_napari_viewer())
    other.auto_check.setChecked(False)
    _detect(qtbot, other, other.open_folder(a, start=False))
    assert other.spacing_spin.value() == pytest.approx(0.13)
    # 0 forgets it
    detect.spacing_spin.setValue(0)
    assert json.loads((config / "spacing.json").read_text()) == {}


def test_notice_and_bad_value(make_napari_viewer, qtbot, config, tmp_path, isbi_model_path):
    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._finetune import FinetuneWidget

    d = tmp_path / "small"
    d.mkdir()
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((600, 500)) * 255).astype(np.uint8)).save(d / "s.png")
    viewer = make_napari_viewer()
    detect = DetectWidget(viewer)
    detect.set_model(isbi_model_path)
    det = _detect(qtbot, detect, detect.open_folder(d, start=False))
    text = detect.status_label.text()
    assert det.trajectory.spacing_source == "model"
    assert "Note: s.png: no pixel spacing given or recorded" in text and "50 x 60 mm" in text
    # a value the model cannot use: one clear line, not saved, not run
    detect.spacing_spin.setValue(0.005)
    assert "outside 0.01-1 mm" in detect.status_label.text()
    assert not (config / "spacing.json").exists()
    worker = detect.detect(start=False)
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        worker.start()
    assert "outside 0.01-1 mm" in detect.status_label.text() and detect.progress.format() == "failed"
    # the fine-tune widget passes the spacing remembered for the labels' images on
    detect.spacing_spin.setValue(0.125)
    ft = FinetuneWidget(viewer)
    labels = d / "reviewed.csv"
    labels.write_text("image_path,1_x,1_y\n")
    ft.set_data(str(labels))
    args = ft.command()
    assert args[args.index("--spacing") + 1] == "0.125"
