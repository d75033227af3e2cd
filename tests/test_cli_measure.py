"""The command line's clinical measurements: ``measure``, ``predict --measures`` and the
classification agreement in ``evaluate``'s JSON."""

import csv
import json

import numpy as np
import pytest
from conftest import save_png, synthetic_image, write_csv
from test_measurements import mirror, patient

from napari_glimpse.cli import main
from napari_glimpse.inference import DEFAULT_MODEL
from napari_glimpse.io import read_landmarks_csv
from napari_glimpse.measurements import (
    MEASUREMENTS,
    TABLE_COLUMNS,
    classification_agreement,
    classify_batch,
    measure_batch,
)

needs_default_model = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason=f"no default model at {DEFAULT_MODEL}")


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_ok(capsys, *args):
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    return out


def run_error(capsys, *args) -> str:
    """Exit code 2 and one clean line on stderr."""
    rc, out, err = run(capsys, *args)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err + out
    line = err[:-1].split("\r")[-1]
    assert err.endswith("\n") and line.startswith("napari-glimpse: error: "), err
    return line


def read_table(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def three_patients():
    """A typical patient, the same mirrored, and one with the upper incisor behind the lower."""
    a = patient()
    return ["a.png", "a_mirrored.png", "b.png"], np.stack([a, mirror(a), patient(UIT=(1300, 1700),
                                                                               LIT=(1330, 1740))])


# ------------------------------------------------------------------------------------ measure
def test_measure_writes_values_and_classes(capsys, tmp_path):
    names, coords = three_patients()
    src = write_csv(tmp_path / "lm.csv", names, coords)
    out = run_ok(capsys, "measure", src, "--out", tmp_path / "m.csv")
    assert "3 image(s)" in out
    header, rows = read_table(tmp_path / "m.csv")
    assert tuple(header) == TABLE_COLUMNS
    assert header[:9] == ["image_path", "ANB", "SNB", "SNA", "ODI", "APDI", "FHI", "FMA", "MW"]
    assert header[9:] == [f"{m}_class" for m in MEASUREMENTS]
    assert [r[0] for r in rows] == names
    values = np.array([[float(v) for v in r[1:9]] for r in rows])
    classes = np.array([[int(v) for v in r[9:]] for r in rows])
    np.testing.assert_allclose(values, measure_batch(coords), atol=1e-3)
    assert (classes == classify_batch(measure_batch(coords))).all()
    # the mirrored patient reads the same; the third has a negative MW (anterior crossbite)
    assert rows[0][1:] == rows[1][1:]
    assert values[2, 7] == pytest.approx(-5.0) and classes[2, 7] == 3


def test_measure_spacing_scales_mw_only(capsys, tmp_path):
    names, coords = three_patients()
    src = write_csv(tmp_path / "lm.csv", names, coords)
    run_ok(capsys, "measure", src, "--out", tmp_path / "a.csv")
    run_ok(capsys, "measure", src, "--out", tmp_path / "b.csv", "--spacing", 0.05)
    (_, a), (_, b) = read_table(tmp_path / "a.csv"), read_table(tmp_path / "b.csv")
    for ra, rb in zip(a, b):
        assert ra[1:8] == rb[1:8]
        assert float(rb[8]) == pytest.approx(float(ra[8]) / 2, abs=1e-3)


def test_measure_not_measurable_is_an_empty_cell_and_class_0(capsys, tmp_path):
    c = patient()
    c[4] = c[1]  # A on N: SNA (and with it ANB) undefined
    src = write_csv(tmp_path / "lm.csv", ["x.png"], c[None])
    out = run_ok(capsys, "measure", src, "--out", tmp_path / "m.csv")
    assert "not measurable" in out
    _, rows = read_table(tmp_path / "m.csv")
    row = dict(zip(TABLE_COLUMNS, rows[0]))
    assert row["SNA"] == "" and row["SNA_class"] == "0" and row["FHI"] != ""


def test_measure_errors(capsys, tmp_path):
    assert "not found" in run_error(capsys, "measure", tmp_path / "missing.csv", "--out", tmp_path / "m.csv")
    three = write_csv(tmp_path / "three.csv", ["x.png"], np.zeros((1, 3, 2)))
    assert "19 ISBI landmarks, got 3" in run_error(capsys, "measure", three, "--out", tmp_path / "m.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(TABLE_COLUMNS[:1] + tuple(f"{i}_{a}" for i in range(1, 20) for a in "xy")) + "\n"
                   + "x.png," + ",".join(["1"] * 37 + ["abc"]) + "\n")
    assert "non-numeric" in run_error(capsys, "measure", bad, "--out", tmp_path / "m.csv")
    nan = write_csv(tmp_path / "nan.csv", ["x.png"], np.full((1, 19, 2), np.nan))
    assert "finite" in run_error(capsys, "measure", nan, "--out", tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()
    try:  # argparse's exit or the CLI's one-line error: exit code 2 either way
        rc = main(["measure", str(three), "--out", str(tmp_path / "m.csv"), "--spacing", "0"])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2 and not (tmp_path / "m.csv").exists()


# ------------------------------------------------------------------------------ predict --measures
@needs_default_model
def test_predict_measures_next_to_the_predictions(capsys, tmp_path):
    rng = np.random.default_rng(0)
    imgs = [save_png(tmp_path / f"c{i}.png", synthetic_image(np.array([[150.0, 150.0]]), rng, 320)) for i in range(2)]
    out = run_ok(capsys, "predict", *imgs, "--out", tmp_path / "p.csv", "--iterations", 0, "--measures")
    assert "p_measures.csv" in out
    names, coords = read_landmarks_csv(tmp_path / "p.csv")
    header, rows = read_table(tmp_path / "p_measures.csv")
    assert tuple(header) == TABLE_COLUMNS and [r[0] for r in rows] == names == ["c0.png", "c1.png"]
    expect = classify_batch(measure_batch(coords))
    assert [[int(v) for v in r[9:]] for r in rows] == expect.tolist()
    # an explicit path
    run_ok(capsys, "predict", imgs[0], "--out", tmp_path / "q.csv", "--iterations", 0,
           "--measures", tmp_path / "mm.csv")
    assert (tmp_path / "mm.csv").exists() and not (tmp_path / "q_measures.csv").exists()


def test_predict_measures_needs_19_landmarks(capsys, tiny_data, tiny_model_path, tmp_path):
    line = run_error(capsys, "predict", tiny_data["test1"]["paths"][0], "--model", tiny_model_path,
                     "--out", tmp_path / "p.csv", "--measures")
    assert "needs a model of the ISBI 19 landmarks" in line
    assert not (tmp_path / "p.csv").exists()


# ------------------------------------------------------------------------------ evaluate
def synthetic_isbi(root, n=3, scale=0.2):
    """``root/images`` and test1 senior/junior CSVs of ``n`` 19-landmark patients (scaled, jittered)."""
    rng = np.random.default_rng(3)
    names = [f"{151 + i}.png" for i in range(n)]
    senior = np.stack([patient() * scale + rng.normal(0, 3, (19, 2)) for _ in range(n)])
    junior = senior + rng.normal(0, 2, senior.shape)
    for name in names:
        save_png(root / "images" / name, synthetic_image(np.array([[200.0, 200.0]]), rng, 480))
    write_csv(root / "test1_senior.csv", names, senior)
    write_csv(root / "test1_junior.csv", names, junior)
    return names, senior, junior


@needs_default_model
def test_evaluate_reports_classification_agreement(capsys, tmp_path):
    _, senior, junior = synthetic_isbi(tmp_path / "data")
    js, pred_csv = tmp_path / "res.json", tmp_path / "pred.csv"
    out = run_ok(capsys, "evaluate", "--data", tmp_path / "data", "--split", "test1", "--iterations", 0,
                 "--json", js, "--predictions", pred_csv)
    assert "mean per-class recall" in out
    res = json.loads(js.read_text())["classification"]
    assert res["ground_truth"] == "mean" and res["integer_pixels"] is True
    for name in MEASUREMENTS:
        m = res["model"][name]
        k = 4 if name == "MW" else 3
        assert np.array(m["confusion"]).shape == (k, k)
        assert 0 <= m["accuracy"] <= 1 and set(m) >= {"mean_recall", "accuracy", "confusion"}
        assert np.array(m["confusion"]).sum() <= 3
    assert set(res["model"]["average"]) == {"mean_recall", "accuracy", "mpa_score"}
    # the doctors against each other, the senior as the reference
    assert res["junior_vs_senior"] == json.loads(json.dumps(classification_agreement(junior, senior)))
    # the model's figures are those of its predictions (written to 2 decimals) against the mean labels
    _, preds = read_landmarks_csv(pred_csv)
    expect = classification_agreement(preds, (senior + junior) / 2)
    assert res["model"]["average"]["accuracy"] == pytest.approx(expect["average"]["accuracy"])


def test_evaluate_without_19_landmarks_has_no_classification(capsys, tiny_data, tiny_model_path, tmp_path):
    js = tmp_path / "res.json"
    run_ok(capsys, "evaluate", "--data", tiny_data["root"], "--split", "test1", "--model", tiny_model_path,
           "--json", js)
    assert "classification" not in json.loads(js.read_text())
