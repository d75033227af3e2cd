"""npe2 contributions without Qt: image/DICOM reader, landmarks writer, sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import save_png

from napari_glimpse import _sample_data as sd
from napari_glimpse._reader import get_reader
from napari_glimpse._writer import layer_to_rows, write_landmarks
from napari_glimpse.errors import GlimpseError
from napari_glimpse.io import read_landmarks_csv

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2015"


def test_writer_orders_points_by_landmark_index(tmp_path):
    # a detect layer after edits: points in any order, identified by the 1-based index feature
    data = np.array([[20.0, 10.0], [40.0, 30.0], [60.0, 50.0]])  # (y, x)
    meta = {"name": "151 landmarks", "features": {"index": np.array([3, 1, 2])},
            "metadata": {"image_path": "/somewhere/151.jpg"}}
    out = tmp_path / "o.csv"
    assert write_landmarks(str(out), data, meta) == [str(out)]
    names, coords = read_landmarks_csv(out)
    assert names == ["151.jpg"]
    np.testing.assert_allclose(coords[0], [[30, 40], [50, 60], [10, 20]])  # x, y by landmark


def test_writer_refuses_incomplete_or_duplicate_landmarks():
    data = np.zeros((2, 2))
    with pytest.raises(GlimpseError, match="missing"):
        layer_to_rows(data, {"features": {"index": np.array([1, 3])}})
    with pytest.raises(GlimpseError, match="more than once"):
        layer_to_rows(data, {"features": {"index": np.array([2, 2])}})
    with pytest.raises(GlimpseError):
        layer_to_rows(np.zeros((0, 2)), {})


def test_dicom_reader(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    img = (np.arange(120 * 100).reshape(120, 100) * 37 % 4096).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "ceph.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.PixelData = img.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    reader = get_reader(str(path))
    assert callable(reader)
    data, kw, kind = reader(str(path))[0]
    assert kind == "image" and data.dtype == np.uint8 and data.shape == (120, 100)
    assert kw["metadata"]["pixel_spacing_mm"] == pytest.approx(0.1)
    assert kw["colormap"] == "gray"
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(GlimpseError, match="cannot read DICOM"):
        reader(str(bad))


def test_sample_data_from_local_folder(tmp_path, monkeypatch):
    img = np.random.default_rng(0).integers(0, 256, (80, 70), dtype=np.uint8)
    save_png(tmp_path / "ds" / "images" / "151.png", img)
    save_png(tmp_path / "ds" / "images" / "001.png", img // 2)
    monkeypatch.setenv(sd.ENV_DATA, str(tmp_path / "ds"))
    monkeypatch.setenv(sd.ENV_CONFIG, str(tmp_path / "settings.json"))
    (data, kw, kind), = sd.isbi_cephalogram()
    assert kind == "image" and kw["name"] == "151" and kw["colormap"] == "gray"
    np.testing.assert_array_equal(data, img)


def test_sample_data_from_settings(tmp_path, monkeypatch):
    img = np.full((70, 70), 7, np.uint8)
    save_png(tmp_path / "imgs" / "009.png", img)
    monkeypatch.delenv(sd.ENV_DATA, raising=False)
    monkeypatch.setenv(sd.ENV_CONFIG, str(tmp_path / "cfg" / "settings.json"))
    sd.set_data_dir(tmp_path / "imgs")
    assert sd.sample_path().name == "009.png"
    sd.set_data_dir(None)
    assert "data_dir" not in sd.read_settings()


def test_sample_data_offline_error_is_clear(tmp_path, monkeypatch):
    pytest.importorskip("pooch")
    monkeypatch.setenv(sd.ENV_DATA, str(tmp_path / "nothing-here"))
    monkeypatch.setenv(sd.ENV_CONFIG, str(tmp_path / "settings.json"))
    # a closed port on this machine: the download fails at once, as it does offline
    monkeypatch.setenv(sd.ENV_URL, "http://127.0.0.1:9/151.jpg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(GlimpseError) as err:
        sd.isbi_cephalogram()
    msg = str(err.value)
    assert "downloading" in msg and "failed" in msg and "NAPARI_GLIMPSE_DATA" in msg and "offline" in msg


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="ISBI data not found beside the repo")
def test_sample_data_real_isbi(monkeypatch, tmp_path):
    monkeypatch.setenv(sd.ENV_DATA, str(REAL_DATA))
    monkeypatch.setenv(sd.ENV_CONFIG, str(tmp_path / "settings.json"))
    (data, kw, _), = sd.isbi_cephalogram()
    assert data.shape == (2400, 1935) and data.dtype == np.uint8
    assert Path(kw["metadata"]["path"]).name == "151.jpg"


def test_contributions_import_no_qt_and_no_napari():
    import subprocess
    import sys

    code = ("import sys, napari_glimpse._reader, napari_glimpse._writer, napari_glimpse._sample_data, "
            "napari_glimpse._layer_data\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', "
            "'napari', 'torchvision')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
