"""Pixel spacing end to end: read from DICOM and TIFF files, checked, given on the command line,
remembered per folder; images at another spacing than the model's are resampled and answered in
their own pixels (the same landmarks in mm); an assumed spacing comes with a notice."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import REAL_DATA

from napari_glimpse.errors import GlimpseError
from napari_glimpse.spacing import (
    SpacingWarning,
    at_spacing,
    check_spacing,
    model_shape,
    read_spacing,
    remember_spacing,
    remembered_spacing,
    resample,
    size_notice,
    tiff_spacing,
    to_image_pixels,
)

ISBI_151 = REAL_DATA / "images" / "151.jpg"


def _noise(shape=(80, 100), high=255, dtype=np.uint8, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * high).astype(dtype)


def write_dicom(path, arr: np.ndarray, **tags):
    """A minimal 16-bit DX DICOM file with ``tags`` (e.g. PixelSpacing=[0.13, 0.13])."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def shipped():
    from napari_glimpse.inference import GlimpseModel

    if not ISBI_151.is_file():
        pytest.skip(f"ISBI 2015 data not found at {REAL_DATA}")
    return GlimpseModel.load(device="cpu")


# ------------------------------------------------------------------ checking
@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), "nan", 0.005, 1.5, 100, "abc", None])
def test_bad_spacing_is_one_clear_error_line(bad):
    with pytest.raises(GlimpseError) as e:
        check_spacing(bad, "--spacing")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--spacing") and "mm" in msg


@pytest.mark.parametrize("good", [0.01, 0.1, "0.13", 1.0])
def test_good_spacing(good):
    assert check_spacing(good) == float(good)


# ------------------------------------------------------------------ TIFF
@pytest.mark.parametrize("save, expected", [
    ({"dpi": (254, 254)}, 0.1),  # inch
    ({"tiffinfo": {282: 100.0, 283: 100.0, 296: 3}}, 0.1),  # cm
    ({"tiffinfo": {282: 76.923, 283: 76.923, 296: 3}}, 0.13),
    ({"dpi": (72, 72)}, None),  # image software's default
    ({"dpi": (96, 96)}, None),
    ({"tiffinfo": {282: 254.0, 283: 254.0}}, None),  # no unit
    ({"tiffinfo": {282: 254.0, 283: 254.0, 296: 1}}, None),  # unit "none"
    ({"dpi": (10, 10)}, None),  # 2.54 mm per pixel: not a cephalogram's
    ({}, None),
])
def test_tiff_resolution(tmp_path, save, expected):
    from PIL import Image

    from napari_glimpse._reader import read_cephalogram

    path = tmp_path / "ceph.tif"
    Image.fromarray(_noise()).save(path, **save)
    got = tiff_spacing(path)
    assert got == (None if expected is None else pytest.approx(expected, rel=1e-4))
    assert read_spacing(path) == got
    meta = read_cephalogram(str(path))[0][1]["metadata"]  # the napari reader records it too
    assert meta.get("pixel_spacing_mm") == got


def test_formats_without_spacing(tmp_path):
    from PIL import Image

    Image.fromarray(_noise()).save(tmp_path / "a.png")
    Image.fromarray(_noise()).save(tmp_path / "a.jpg", dpi=(300, 300))
    assert read_spacing(tmp_path / "a.png") is None and read_spacing(tmp_path / "a.jpg") is None


# ------------------------------------------------------------------ DICOM
def test_dicom_spacing_tags(tmp_path):
    pytest.importorskip("pydicom")
    from napari_glimpse._reader import read_cephalogram

    a = _noise(high=4000, dtype=np.uint16)
    assert read_spacing(write_dicom(tmp_path / "a.dcm", a, PixelSpacing=[0.13, 0.13])) == pytest.approx(0.13)
    # the detector's spacing when the calibrated one is missing; PixelSpacing first when both are there
    assert read_spacing(write_dicom(tmp_path / "b.dcm", a, ImagerPixelSpacing=["0.148", "0.148"])) == 0.148
    both = write_dicom(tmp_path / "c.dcm", a, PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.11, 0.11])
    assert read_spacing(both) == pytest.approx(0.1)
    assert read_spacing(write_dicom(tmp_path / "d.dcm", a)) is None
    assert read_cephalogram(str(tmp_path / "a.dcm"))[0][1]["metadata"]["pixel_spacing_mm"] == pytest.approx(0.13)
    with pytest.warns(SpacingWarning, match="not square"):
        assert read_spacing(write_dicom(tmp_path / "e.dcm", a, PixelSpacing=[0.1, 0.12])) == pytest.approx(0.11)


def test_dicom_spacing_is_used_by_predict(tmp_path, tiny_model):
    pytest.importorskip("pydicom")
    a = _noise((200, 180), high=4000, dtype=np.uint16)
    tr = tiny_model.predict(write_dicom(tmp_path / "a.dcm", a, PixelSpacing=[0.13, 0.13]))
    assert tr.spacing_source == "file" and tr.pixel_spacing == pytest.approx(0.13)
    assert tr.image_shape == (200, 180) and tr.model_scale == pytest.approx((234 / 180, 260 / 200))
    given = tiny_model.predict(tmp_path / "a.dcm", spacing=0.1)  # the spacing given wins
    assert given.spacing_source == "given" and given.model_scale == (1.0, 1.0)


def test_dicom_without_spacing_falls_back_with_a_notice(tmp_path, tiny_model):
    pytest.importorskip("pydicom")
    path = write_dicom(tmp_path / "nospacing.dcm", _noise((200, 180), high=4000, dtype=np.uint16))
    with pytest.warns(SpacingWarning, match="nospacing.dcm: the DICOM file records no pixel spacing") as rec:
        tr = tiny_model.predict(path)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert tr.spacing_source == "model" and tr.pixel_spacing == tiny_model.pixel_spacing
    # a DICOM file is expected to record one: the notice comes whatever the image's size
    assert size_notice((2400, 1935), 0.1, "x.dcm", dicom=True) is not None


def test_dicom_with_an_absurd_spacing_is_one_error_line(tmp_path, tiny_model):
    pytest.importorskip("pydicom")
    path = write_dicom(tmp_path / "bad.dcm", _noise((200, 180), high=4000, dtype=np.uint16), PixelSpacing=[5, 5])
    with pytest.raises(GlimpseError, match=r"bad.dcm: the recorded pixel spacing .*--spacing") as e:
        tiny_model.predict(path)
    assert "\n" not in str(e.value)
    assert tiny_model.predict(path, spacing=0.1).spacing_source == "given"


# ------------------------------------------------------------------ the notice
def test_size_notice_only_for_unusual_sizes(tiny_model):
    assert size_notice((2400, 1935), 0.1) is None  # the training images
    note = size_notice((1671, 1340), 0.1, "clinic.png")  # another scanner's at 0.13 mm, read at 0.1
    assert note.startswith("clinic.png: no pixel spacing") and "134 x 167 mm" in note and "\n" not in note
    assert size_notice((1671, 1340), 0.13) is None
    img = np.zeros((1671, 1340), np.uint8)
    with pytest.warns(SpacingWarning, match="134 x 167 mm"):
        assert tiny_model.predict(img).spacing_source == "model"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpacingWarning)
        tiny_model.predict(np.zeros((2400, 1935), np.uint8))  # no notice
        tiny_model.predict(img, spacing=0.13)  # nor with the spacing given


# ------------------------------------------------------------------ the shipped model on ISBI
def test_model_spacing_gives_todays_answers_bit_for_bit(shipped):
    none = shipped.predict(ISBI_151)
    given = shipped.predict(ISBI_151, spacing=0.1)
    assert none.spacing_source == "model" and given.spacing_source == "given"
    np.testing.assert_array_equal(none.positions, given.positions)
    np.testing.assert_array_equal(none.uncertainty_mm, given.uncertainty_mm)
    assert none.pixel_spacing == given.pixel_spacing == 0.1 and none.model_scale == (1.0, 1.0)
    # within 1 % of the model's: not resampled, the same pixels, mm at the image's spacing
    near = shipped.predict(ISBI_151, spacing=0.1005)
    np.testing.assert_array_equal(near.positions, none.positions)
    assert near.pixel_spacing == 0.1005
    np.testing.assert_allclose(near.uncertainty_mm, none.uncertainty_mm * 1.005)


def test_resampled_image_gives_the_same_landmarks_in_mm(shipped):
    from napari_glimpse.io import read_image

    img = read_image(ISBI_151)
    h, w = img.shape
    nh, nw = model_shape((h, w), 0.1 / 0.13)  # the same head at 0.13 mm per pixel
    small = resample(img, (nh, nw))
    orig = shipped.predict(img, record_stages=True)
    tr = shipped.predict(small, spacing=0.13, record_stages=True)
    assert tr.image_shape == (nh, nw) and tr.pixel_spacing == 0.13 and tr.spacing_source == "given"
    assert tr.model_scale == pytest.approx((1.3, 1.3), rel=1e-3)  # model pixels per image pixel
    # both answers in the original image's mm
    back = to_image_pixels(tr.final, (nw / w, nh / h)) * 0.1
    mre = np.linalg.norm(back - orig.final * 0.1, axis=-1).mean()
    print(f"MRE between the original and the resampled image's answers: {mre:.3f} mm")
    assert mre <= 0.2, mre
    assert abs(tr.uncertainty_mm.mean() - orig.uncertainty_mm.mean()) < 0.3  # mm, not pixels
    # the stages' records are in the small image's pixels too
    np.testing.assert_allclose(tr.fine_window_scale, orig.fine_window_scale * [nw / w, nh / h], rtol=2e-3)
    assert tr.coarse_positions.max() < max(nh, nw) and (tr.positions >= 0).all()
    # a start given in the image's pixels comes back as it went in
    start = tr.final + 3.0
    again = shipped.predict(small, spacing=0.13, iterations=0, start=start)
    np.testing.assert_allclose(again.final, start, atol=1e-9)


def test_a_huge_resampled_image_is_refused(tiny_model):
    with pytest.raises(GlimpseError, match="check the pixel spacing"):
        tiny_model.predict(np.zeros((3000, 2500), np.uint8), spacing=1.0)


# ------------------------------------------------------------------ labelled sets
def test_labelled_set_at_another_spacing(kaggle_dataset):
    from napari_glimpse.io import load_dataset

    data = kaggle_dataset(n=4)
    ds = load_dataset(data["root"], "train", 0.13)
    assert at_spacing([ds], 0.13) is ds  # nothing to do
    seen = at_spacing([ds], 0.1)
    assert seen.pixel_spacing == 0.1 and set(seen.annotations) == {"senior", "junior"}
    assert seen.image(0).shape == (333, 333)
    np.testing.assert_allclose(seen.annotations["senior"], (data["senior"] + 0.5) * 333 / 256 - 0.5)
    sub = seen.subset([1, 3])
    assert sub.image(1).shape == (333, 333) and len(sub) == 2
    np.testing.assert_allclose(sub.ground_truth(), seen.ground_truth()[[1, 3]])
    # with a set at the target spacing (the original training set, say): one set, mean labels
    mixed = at_spacing([ds, load_dataset(data["root"], "train", 0.1)], 0.1)
    assert len(mixed) == 8 and list(mixed.annotations) == ["labels"]
    assert mixed.image(0).shape == (333, 333) and mixed.image(4).shape == (256, 256)
    np.testing.assert_allclose(mixed.ground_truth()[4:], data["mean"])
    for i in range(len(mixed)):
        mixed.check_inside(i, mixed.image(i).shape)


# ------------------------------------------------------------------ command line
@pytest.mark.parametrize("command", [
    ["predict", "x.png", "--out", "p.csv"],
    ["evaluate", "--data", "d"],
    ["finetune", "--data", "d", "--out", "m.pt"],
    ["train", "--data", "d", "--out", "m.pt"],
])
@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "abc", "5"])
def test_cli_bad_spacing_is_one_line_exit_2(capsys, command, bad):
    from napari_glimpse.cli import main

    assert main(command + ["--spacing", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("napari-glimpse: error: --spacing"), err


def test_cli_evaluate_uses_the_spacing(tiny_data, tiny_model_path, tmp_path):
    from napari_glimpse.cli import main
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import read_landmarks_csv

    preds, out = tmp_path / "preds.csv", tmp_path / "res.json"
    assert main(["evaluate", "--data", str(tiny_data["root"]), "--split", "test1", "--model", str(tiny_model_path),
                 "--spacing", "0.13", "--predictions", str(preds), "--json", str(out), "--device", "cpu"]) == 0
    _, got = read_landmarks_csv(preds)
    model = GlimpseModel.load(tiny_model_path, device="cpu")
    want = np.stack([model.predict(p, spacing=0.13).final for p in tiny_data["test1"]["paths"]])
    np.testing.assert_allclose(got, want, atol=0.006)  # written with 2 decimals
    res = json.loads(out.read_text())
    truth = tiny_data["test1"]["mean"]
    assert res["overall"]["mre_mm"] == pytest.approx(np.linalg.norm(got - truth, axis=-1).mean() * 0.13, abs=1e-3)


def test_cli_predict_uses_the_spacing(tiny_data, tiny_model_path, tmp_path):
    from napari_glimpse.cli import main
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import read_landmarks_csv

    paths = tiny_data["test1"]["paths"]
    out = tmp_path / "preds.csv"
    assert main(["predict", *map(str, paths), "--model", str(tiny_model_path), "--out", str(out),
                 "--spacing", "0.13", "--device", "cpu"]) == 0
    _, got = read_landmarks_csv(out)
    model = GlimpseModel.load(tiny_model_path, device="cpu")
    want = np.stack([model.predict(p, spacing=0.13).final for p in paths])
    plain = np.stack([model.predict(p, spacing=0.1).final for p in paths])
    np.testing.assert_allclose(got, want, atol=0.006)
    assert np.abs(want - plain).max() > 0.01  # the flag made a difference


def test_cli_predict_notice_is_one_line(tiny_model_path, tmp_path, capsys):
    from conftest import save_png

    from napari_glimpse.cli import main
    from napari_glimpse.io import read_landmarks_csv

    img = save_png(tmp_path / "small.png", _noise((300, 260)))
    assert main(["predict", str(img), "--model", str(tiny_model_path), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu"]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "no pixel spacing" in ln]
    assert len(notes) == 1 and notes[0].startswith("napari-glimpse: warning: small.png: no pixel spacing"), notes
    assert read_landmarks_csv(tmp_path / "p.csv")[1].shape == (1, 3, 2)


# ------------------------------------------------------------------ remembered per folder
def test_remembered_per_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_GLIMPSE_CONFIG_DIR", str(tmp_path / "config"))
    a, b = tmp_path / "clinic_a", tmp_path / "clinic_b"
    assert remembered_spacing(a) is None
    assert remember_spacing(a, 0.13) and remember_spacing(b, 0.1)
    assert remembered_spacing(a) == 0.13 and remembered_spacing(str(b) + "/") == 0.1
    assert remember_spacing(a, None) and remembered_spacing(a) is None and remembered_spacing(b) == 0.1
    with pytest.raises(GlimpseError):
        remember_spacing(a, float("nan"))
    (tmp_path / "config" / "spacing.json").write_text("{not json")
    assert remembered_spacing(b) is None  # a damaged file is as good as none
    assert remember_spacing(b, 0.12) and remembered_spacing(b) == 0.12
