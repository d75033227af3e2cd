"""ISBI metrics: radial error, MRE/SD, SDR, per-landmark rows and the text table."""

import numpy as np
import pytest

from napari_glimpse.metrics import SDR_THRESHOLDS_MM, format_table, radial_errors, summarize


def test_radial_errors_in_mm():
    pred = np.array([[[0.0, 0.0], [10.0, 0.0]], [[3.0, 4.0], [1.0, 1.0]]])
    truth = np.array([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [4.0, 5.0]]])
    err = radial_errors(pred, truth, pixel_spacing=0.1)
    np.testing.assert_allclose(err, [[0.0, 1.0], [0.5, 0.5]])
    np.testing.assert_allclose(radial_errors(pred, truth, pixel_spacing=1.0), [[0, 10], [5, 5]])


def test_radial_errors_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        radial_errors(np.zeros((2, 3, 2)), np.zeros((2, 4, 2)))


def test_summarize_hand_computed():
    # 2 images x 2 landmarks: errors 1, 2, 3, 5 mm
    err = np.array([[1.0, 2.0], [3.0, 5.0]])
    s = summarize(err)
    o = s["overall"]
    assert o["mre_mm"] == pytest.approx(2.75)
    assert o["sd_mm"] == pytest.approx(np.sqrt(((np.array([1, 2, 3, 5]) - 2.75) ** 2).mean()))
    assert o["sd_mm"] == pytest.approx(1.479019945774904)
    assert o["n"] == 4
    assert o["sdr"] == {"2": pytest.approx(50.0), "2.5": pytest.approx(50.0),
                        "3": pytest.approx(75.0), "4": pytest.approx(75.0)}
    assert tuple(SDR_THRESHOLDS_MM) == (2.0, 2.5, 3.0, 4.0)


def test_sdr_threshold_is_inclusive():
    s = summarize(np.array([[2.0, 2.5, 3.0, 4.0]]))
    assert s["overall"]["sdr"] == {"2": 25.0, "2.5": 50.0, "3": 75.0, "4": 100.0}


def test_per_landmark_rows():
    err = np.array([[1.0, 2.0], [3.0, 5.0]])
    s = summarize(err, ["Sella", "Nasion"])
    rows = s["per_landmark"]
    assert [r["landmark"] for r in rows] == ["Sella", "Nasion"]
    assert [r["index"] for r in rows] == [1, 2]
    assert rows[0]["mre_mm"] == pytest.approx(2.0) and rows[1]["mre_mm"] == pytest.approx(3.5)
    assert rows[0]["sd_mm"] == pytest.approx(1.0) and rows[1]["sd_mm"] == pytest.approx(1.5)
    assert rows[0]["sdr"]["2"] == 50.0 and rows[0]["sdr"]["3"] == 100.0
    assert rows[1]["sdr"]["2"] == 50.0 and rows[1]["sdr"]["4"] == 50.0
    assert rows[0]["n"] == 2
    # default names
    assert [r["landmark"] for r in summarize(err)["per_landmark"]] == ["L1", "L2"]


def test_custom_thresholds():
    s = summarize(np.array([[0.5, 1.5]]), thresholds=(1.0,))
    assert s["overall"]["sdr"] == {"1": 50.0}


def test_format_table():
    s = summarize(np.array([[1.0, 2.0], [3.0, 5.0]]), ["Sella", "Nasion"])
    text = format_table(s)
    lines = text.splitlines()
    assert "overall" in text
    assert "SDR2" in lines[0] and "SDR2.5" in lines[0] and "SDR4" in lines[0]
    row = next(ln for ln in lines if "overall" in ln)
    assert "2.75" in row and "50.0%" in row and "75.0%" in row
    assert any(ln.split()[:2] == ["1", "Sella"] for ln in lines)
    assert any("Nasion" in ln and "3.50" in ln for ln in lines)
