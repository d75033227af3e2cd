"""What a new user gives the command line and must not lose or get wrong: images of the same
name in two folders (one row each, --resume tells them apart), ``--measures`` at each image's
spacing, ``measure`` never over its input, a folder of DICOM files, a model's --out named like
a table, and a bad argument as one line."""

import numpy as np
import pytest
from conftest import save_png, synthetic_image
from test_cli_measure import read_table
from test_spacing import write_dicom

from napari_glimpse.cli import main
from napari_glimpse.inference import DEFAULT_MODEL
from napari_glimpse.io import read_landmarks_csv
from napari_glimpse.measurements import measure_batch


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, [ln.split("\r")[-1] for ln in err.splitlines() if "pixel spacing" not in ln]


def one_error(capsys, *args) -> str:
    rc, out, err = run(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("napari-glimpse: error: "), (rc, out, err)
    return err[0]


def _image(path, seed: int, size: int = 96):
    rng = np.random.default_rng(seed)
    return save_png(path, synthetic_image(rng.uniform(20, size - 20, (3, 2)), rng, size))


def test_images_of_the_same_name_in_two_folders_get_a_row_each(capsys, tiny_model_path, tmp_path):
    a, b = _image(tmp_path / "p1" / "ceph.png", 0), _image(tmp_path / "p2" / "ceph.png", 1)
    other = _image(tmp_path / "p2" / "solo.png", 2)
    out = tmp_path / "r.csv"
    rc, _, _ = run(capsys, "predict", a.parent, b.parent, "--model", tiny_model_path, "--out", out)
    assert rc == 0
    names, coords = read_landmarks_csv(out)
    assert names == ["p1/ceph.png", "p2/ceph.png", "solo.png"]  # a unique name stays bare
    assert not np.allclose(coords[0], coords[1])  # two images, two answers
    # --resume knows both rows
    rc, text, _ = run(capsys, "predict", a.parent, b.parent, "--model", tiny_model_path, "--out", out, "--resume")
    assert rc == 0 and "already holds all 3 image(s)" in text
    # a file written for one folder alone holds a bare 'ceph.png': which of the two, it cannot tell
    single = tmp_path / "s.csv"
    assert run(capsys, "predict", a, other, "--model", tiny_model_path, "--out", single)[0] == 0
    line = one_error(capsys, "predict", a.parent, b.parent, "--model", tiny_model_path, "--out", single, "--resume")
    assert "holds a row for ceph.png" in line and "p1/ceph.png, p2/ceph.png" in line


def test_a_file_given_twice_is_predicted_once(capsys, tiny_model_path, tmp_path):
    a = _image(tmp_path / "p1" / "ceph.png", 0)
    _image(tmp_path / "p1" / "other.png", 1)
    rc, _, _ = run(capsys, "predict", a, a.parent, "--model", tiny_model_path, "--out", tmp_path / "t.csv")
    assert rc == 0 and read_landmarks_csv(tmp_path / "t.csv")[0] == ["ceph.png", "other.png"]


def test_same_names_in_nested_folders_and_through_links(capsys, tiny_model_path, tmp_path):
    top = _image(tmp_path / "d" / "ceph.png", 0)
    _image(tmp_path / "d" / "sub" / "ceph.png", 1)
    out = tmp_path / "n.csv"
    for extra in ([], ["--resume"]):  # the same command resumed finds its rows
        rc, text, err = run(capsys, "predict", top.parent, top.parent / "sub", "--model", tiny_model_path,
                            "--out", out, *extra)
        assert rc == 0, err
    assert "already holds all 2 image(s)" in text
    assert read_landmarks_csv(out)[0] == ["d/ceph.png", "d/sub/ceph.png"]
    # a link is named as given, not by where it points
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "ceph.png").symlink_to(tmp_path / "d" / "sub" / "ceph.png")
    rc, _, _ = run(capsys, "predict", top, tmp_path / "links", "--model", tiny_model_path, "--out", tmp_path / "l.csv")
    assert rc == 0 and read_landmarks_csv(tmp_path / "l.csv")[0] == ["d/ceph.png", "links/ceph.png"]


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason=f"no default model at {DEFAULT_MODEL}")
def test_predict_measures_take_mw_at_each_image_s_spacing(capsys, tmp_path):
    img = _image(tmp_path / "c.png", 3, 320)
    for spacing in (0.13, None):
        out = tmp_path / f"p{spacing}.csv"
        extra = ["--spacing", spacing] if spacing else []
        rc, _, _ = run(capsys, "predict", img, "--out", out, "--iterations", 0, "--measures", *extra)
        assert rc == 0
        _, coords = read_landmarks_csv(out)
        header, rows = read_table(tmp_path / f"p{spacing}_measures.csv")
        mw = float(rows[0][header.index("MW")])
        assert mw == pytest.approx(float(measure_batch(coords, spacing or 0.1)[0, -1]), abs=0.006)
    # a spacing the file records (TIFF resolution, 0.13 mm), also for a row kept by --resume
    from PIL import Image

    tif = tmp_path / "c.tif"
    Image.open(img).save(tif, tiffinfo={282: 76.923, 283: 76.923, 296: 3})
    for extra in ([], ["--resume"]):
        rc, _, _ = run(capsys, "predict", tif, "--out", tmp_path / "t.csv", "--iterations", 0, "--measures", *extra)
        assert rc == 0
        _, coords = read_landmarks_csv(tmp_path / "t.csv")
        header, rows = read_table(tmp_path / "t_measures.csv")
        assert float(rows[0][header.index("MW")]) == pytest.approx(float(measure_batch(coords, 0.13)[0, -1]),
                                                                   abs=0.006)


def test_measure_never_writes_over_its_input(capsys, tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("image_path," + ",".join(f"{k}_x,{k}_y" for k in range(1, 20)) + "\n"
                   "a.png," + ",".join(str(v) for v in range(38)) + "\n")
    before = csv.read_bytes()
    line = one_error(capsys, "measure", csv, "--out", csv)
    assert "is one of the inputs" in line and csv.read_bytes() == before
    assert "refusing to write" in one_error(capsys, "measure", csv, "--out", tmp_path / "m.jpg")


def test_a_folder_of_dicom_files_is_predicted(capsys, tiny_model_path, tmp_path):
    pytest.importorskip("pydicom")
    rng = np.random.default_rng(4)
    arr = synthetic_image(rng.uniform(20, 76, (3, 2)), rng, 96).astype(np.uint16) * 16
    (tmp_path / "scans").mkdir()
    write_dicom(tmp_path / "scans" / "a.dcm", arr, PixelSpacing=[0.1, 0.1])
    save_png(tmp_path / "scans" / "b.png", synthetic_image(rng.uniform(20, 76, (3, 2)), rng, 96))
    # as PACS exports name them: no suffix, or a UID
    for name in ("IM0001", "1.2.840.113619.2.5"):
        write_dicom(tmp_path / "scans" / (name + ".dcm"), arr, PixelSpacing=[0.11, 0.11])
        (tmp_path / "scans" / (name + ".dcm")).rename(tmp_path / "scans" / name)
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    rc, _, err = run(capsys, "predict", tmp_path / "scans", "--model", tiny_model_path, "--out", tmp_path / "d.csv")
    assert rc == 0, err
    assert read_landmarks_csv(tmp_path / "d.csv")[0] == ["1.2.840.113619.2.5", "IM0001", "a.dcm", "b.png"]
    from napari_glimpse.spacing import read_spacing

    assert read_spacing(tmp_path / "scans" / "IM0001") == pytest.approx(0.11)  # its recorded spacing is used


@pytest.mark.parametrize("cmd", ["finetune", "train", "quantize"])
def test_a_model_out_named_like_a_table_or_an_image_is_refused(capsys, tiny_model_path, tiny_data, tmp_path, cmd):
    target = tmp_path / ("t.csv" if cmd != "train" else "t.png")
    args = {"finetune": ["--model", tiny_model_path, "--data", tiny_data["root"]],
            "train": ["--data", tiny_data["root"], "--max-steps", 1],
            "quantize": [tiny_model_path, tiny_data["train"]["paths"][0]]}[cmd]
    line = one_error(capsys, cmd, *args, "--out", target)
    assert f"--out {target}: a model file" in line and not target.exists()


def test_a_bad_argument_is_one_line_naming_the_help(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "x.png", "--out", str(tmp_path / "p.csv"), "--threads", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith("napari-glimpse predict: error: argument --threads") and "--help" in err
