"""Faults a real archive throws at the command line (issue 23): nothing lost (batches keep every
good image's row, --resume), nothing poisoned (no NaN read or written), no input overwritten."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_kaggle_dataset, save_png, synthetic_image

from napari_glimpse import training
from napari_glimpse.cli import main
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import read_landmarks_csv

MISSING_MODEL = "/nonexistent/model.pt"  # outputs are checked before the model is even loaded


def run(capsys, *args):
    """Exit code, stdout and the napari-glimpse lines of stderr (progress bars and the notes on the
    tiny test images' pixel spacing aside)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    lines = [ln.split("\r")[-1] for ln in err.splitlines()]
    return rc, out, [ln for ln in lines if ln.startswith("napari-glimpse: ") and "pixel spacing" not in ln]


def run_error(capsys, *args):
    rc, out, err = run(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("napari-glimpse: error: "), (rc, out, err)
    return err[0]


@pytest.fixture
def folder(tmp_path):
    """Three good images and a truncated one (``c_bad.png``) in one folder."""
    d = make_kaggle_dataset(tmp_path / "d", n=3, junior_shift=None)
    good = d["paths"][0].read_bytes()
    (d["root"] / "images" / "c_bad.png").write_bytes(good[: len(good) // 3])
    return d


# ------------------------------------------------------------------------------ labels
def test_finetune_refuses_a_nan_label(capsys, tiny_model_path, tmp_path):
    d = make_kaggle_dataset(tmp_path / "d", n=2, junior_shift=None)
    text = d["senior_csv"].read_text().splitlines()
    cells = text[2].split(",")
    cells[3] = "nan"
    text[2] = ",".join(cells)
    d["senior_csv"].write_text("\n".join(text) + "\n")
    line = run_error(capsys, "finetune", "--model", tiny_model_path, "--data", d["senior_csv"], "--out",
                     tmp_path / "ft.pt", "--max-steps", 1)
    assert "train_senior.csv:3: image 002.png, column 2_x: 'nan' is not a finite number" in line
    assert not (tmp_path / "ft.pt").exists()


def test_evaluate_reads_excel_csvs_and_refuses_duplicates(capsys, tiny_model_path, tmp_path):
    d = make_kaggle_dataset(tmp_path / "d", n=2, split="test1", junior_shift=None)
    text = d["senior_csv"].read_text().replace(",", ";")
    d["senior_csv"].write_bytes(("\ufeff" + text).encode())  # Excel's "CSV UTF-8", a European list separator
    rc, out, err = run(capsys, "evaluate", "--data", d["root"], "--split", "test1", "--model", tiny_model_path)
    assert rc == 0 and "2 images" in out, err
    d["senior_csv"].write_text(text + text.splitlines()[1] + "\n")
    line = run_error(capsys, "evaluate", "--data", d["root"], "--split", "test1", "--model", tiny_model_path)
    assert "image 001.png has a second row" in line


# ----------------------------------------------------------------------- models, NaN
def test_a_model_with_nan_weights_is_refused(capsys, tiny_model_path, tiny_data, tmp_path):
    ck = torch.load(tiny_model_path, weights_only=True)
    next(v for v in ck["state_dict"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(ck, tmp_path / "nan.pt")
    line = run_error(capsys, "predict", tiny_data["test1"]["paths"][0], "--model", tmp_path / "nan.pt",
                     "--out", tmp_path / "p.csv")
    assert "holds NaN or infinite values" in line
    assert not (tmp_path / "p.csv").exists()


def test_predict_never_writes_nan(capsys, monkeypatch, tiny_model_path, folder, tmp_path):
    real = GlimpseModel.predict

    def poisoned(self, image, *a, **k):
        tr = real(self, image, *a, **k)
        if str(image).endswith("002.png"):
            tr.positions[-1, 0, 0] = np.nan
        return tr

    monkeypatch.setattr(GlimpseModel, "predict", poisoned)
    out = tmp_path / "p.csv"
    rc, _, err = run(capsys, "predict", folder["root"] / "images", "--model", tiny_model_path, "--out", out,
                     "--skip-bad")
    assert rc == 0
    assert any("002.png: the model's answer is not a finite number" in ln for ln in err)
    names, coords = read_landmarks_csv(out)
    assert names == ["001.png", "003.png"] and np.isfinite(coords).all()


def test_a_float_tiff_with_a_nan_pixel_is_predicted_with_one_warning(capsys, tiny_model_path, tmp_path):
    from PIL import Image

    img = synthetic_image(np.array([[80.0, 80.0], [176.0, 96.0], [128.0, 180.0]]), np.random.default_rng(0))
    f = img.astype(np.float32)
    f[10, 10] = np.nan
    Image.fromarray(f, mode="F").save(tmp_path / "scan.tif")
    rc, _, err = run(capsys, "predict", tmp_path / "scan.tif", "--model", tiny_model_path, "--out", tmp_path / "p.csv")
    assert rc == 0
    assert err == [f"napari-glimpse: warning: {tmp_path / 'scan.tif'}: 1 NaN or infinite pixel(s) set to the "
                   f"image's lowest value ({img.min():g})"]  # once
    assert np.isfinite(read_landmarks_csv(tmp_path / "p.csv")[1]).all()


# --------------------------------------------------------------------------- outputs
def test_out_may_not_be_an_input_image(capsys, folder):
    img = folder["paths"][0]
    before = img.read_bytes()
    line = run_error(capsys, "predict", img.parent, "--model", MISSING_MODEL, "--out", img)
    assert "refusing to write them to a .png file" in line
    link = img.parent / "preds.csv"
    os.symlink(img, link)  # the same file under another name
    line = run_error(capsys, "predict", img.parent, "--model", MISSING_MODEL, "--out", link)
    assert line == f"napari-glimpse: error: --out {link} is one of the input images; choose another file name"
    assert img.read_bytes() == before


def test_out_and_confidence_out_must_differ_and_be_writable(capsys, folder, tmp_path):
    img = folder["paths"][0]
    line = run_error(capsys, "predict", img, "--model", MISSING_MODEL, "--out", tmp_path / "a.csv",
                     "--confidence-out", tmp_path / "." / "a.csv")
    assert "--out and --confidence-out are the same file" in line
    (tmp_path / "file").write_text("x")
    line = run_error(capsys, "predict", img, "--model", MISSING_MODEL, "--out", tmp_path / "file" / "p.csv")
    assert line.startswith(f"napari-glimpse: error: --out {tmp_path / 'file' / 'p.csv'}: cannot write there")
    (tmp_path / "dir.csv").mkdir()
    line = run_error(capsys, "predict", img, "--model", MISSING_MODEL, "--out", tmp_path / "dir.csv")
    assert "cannot write there (is a folder)" in line


def _without_root_override() -> None:
    """(In the child) drop the capabilities that let root write anywhere, before exec."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def test_a_read_only_folder_is_refused_before_any_work(folder, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = subprocess.run([sys.executable, "-m", "napari_glimpse.cli", "predict", str(folder["paths"][0]), "--model",
                        MISSING_MODEL, "--out", str(ro / "p.csv")], capture_output=True, text=True, timeout=300,
                       preexec_fn=_without_root_override if os.geteuid() == 0 else None)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"napari-glimpse: error: --out {ro / 'p.csv'}: cannot write there "
                                     f"(Permission denied)"]


def test_outputs_follow_the_umask(capsys, tiny_model_path, tiny_data, tmp_path):
    old = os.umask(0o022)
    try:
        rc, _, _ = run(capsys, "predict", tiny_data["test1"]["paths"][0], "--model", tiny_model_path,
                       "--out", tmp_path / "p.csv")
    finally:
        os.umask(old)
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p_confidence.csv"]
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- batches
def test_a_bad_image_in_a_folder_keeps_the_others(capsys, tiny_model_path, folder, tmp_path):
    out = tmp_path / "p.csv"
    rc, stdout, err = run(capsys, "predict", folder["root"] / "images", "--model", tiny_model_path, "--out", out)
    assert rc == 2
    assert len(err) == 2 and err[0].startswith("napari-glimpse: skipped: cannot read image ") and "c_bad.png" in err[0]
    assert err[1].startswith("napari-glimpse: error: 1 of 4 image(s) skipped (listed above); the other 3 are in ")
    assert read_landmarks_csv(out)[0] == ["001.png", "002.png", "003.png"]
    assert len((tmp_path / "p_confidence.csv").read_text().splitlines()) == 4
    rc, stdout, err = run(capsys, "predict", folder["root"] / "images", "--model", tiny_model_path, "--out", out,
                          "--skip-bad")
    assert rc == 0 and len(err) == 1 and "1 skipped" in stdout


def test_a_batch_of_bad_images_writes_nothing(capsys, tiny_model_path, tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"")  # zero bytes
    rc, _, err = run(capsys, "predict", tmp_path, "--model", tiny_model_path, "--out", tmp_path / "p.csv",
                     "--skip-bad")
    assert rc == 2 and err[-1].startswith("napari-glimpse: error: none of the 2 image(s) could be read")
    assert not (tmp_path / "p.csv").exists()


def test_rows_are_written_as_they_come(capsys, monkeypatch, tiny_model_path, folder, tmp_path):
    real, calls = GlimpseModel.predict, []

    def interrupted(self, image, *a, **k):
        calls.append(image)
        if str(image).endswith("003.png"):  # the third image (workers may start it before the second)
            raise KeyboardInterrupt
        return real(self, image, *a, **k)

    monkeypatch.setattr(GlimpseModel, "predict", interrupted)
    out = tmp_path / "p.csv"
    rc, _, _ = run(capsys, "predict", folder["root"] / "images", "--model", tiny_model_path, "--out", out)
    assert rc == 130
    assert read_landmarks_csv(out)[0] == ["001.png", "002.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_predicts_only_the_missing_images(capsys, monkeypatch, tiny_model_path, folder, tmp_path):
    (folder["root"] / "images" / "c_bad.png").unlink()
    out = tmp_path / "p.csv"
    assert run(capsys, "predict", folder["paths"][0], "--model", tiny_model_path, "--out", out)[0] == 0
    first = out.read_text()
    with open(out, "a") as f:
        f.write("002.png,1.0,")  # a row cut short by a kill
    real, calls = GlimpseModel.predict, []
    monkeypatch.setattr(GlimpseModel, "predict", lambda self, image, *a, **k: calls.append(image) or
                        real(self, image, *a, **k))
    rc, stdout, _ = run(capsys, "predict", folder["root"] / "images", "--model", tiny_model_path, "--out", out,
                        "--resume")
    assert rc == 0 and "2 image(s), 1 kept from before" in stdout
    assert sorted(p.name for p in calls) == ["002.png", "003.png"]  # (workers may start them in either order)
    assert out.read_text().startswith(first)
    assert read_landmarks_csv(out)[0] == ["001.png", "002.png", "003.png"]
    rc, stdout, _ = run(capsys, "predict", folder["root"] / "images", "--model", tiny_model_path, "--out", out,
                        "--resume")
    assert rc == 0 and "already holds all 3 image(s)" in stdout and len(calls) == 2


def test_a_file_name_that_is_not_utf8_is_written_back_as_it_is(capsys, tiny_model_path, tiny_data, tmp_path):
    raw = os.fsencode(tmp_path) + b"/scan_\xe9\xff.png"
    with open(raw, "wb") as f:
        f.write(tiny_data["test1"]["paths"][0].read_bytes())
    out = tmp_path / "p.csv"
    rc, _, err = run(capsys, "predict", tmp_path, "--model", tiny_model_path, "--out", out)
    assert rc == 0, err
    assert b"\nscan_\xe9\xff.png," in out.read_bytes()
    names, _ = read_landmarks_csv(out)
    assert [os.fsencode(n) for n in names] == [b"scan_\xe9\xff.png"]
    rc, stdout, _ = run(capsys, "predict", tmp_path, "--model", tiny_model_path, "--out", out, "--resume")
    assert rc == 0 and "nothing to do" in stdout


# ---------------------------------------------------------------------- finetune --resume
def test_finetune_resumes_after_a_kill(capsys, monkeypatch, tiny_model_path, tiny_data, tmp_path):
    monkeypatch.setattr(training, "FIRST_RESUME_S", 0.0)  # the first resume point after step 1
    real, calls = training.train_step, []

    def killed_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_step", killed_at_step_3)
    out = tmp_path / "ft.pt"
    common = ["finetune", "--model", tiny_model_path, "--data", tiny_data["root"], "--out", out,
              "--max-steps", 4, "--batch-size", 2]
    assert run(capsys, *common)[0] == 130
    assert not out.exists() and training.resume_path(out).exists()
    calls.clear()
    monkeypatch.setattr(training, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc, stdout, _ = run(capsys, *common, "--resume")
    assert rc == 0 and "fine-tuned 4 steps" in stdout
    assert len(calls) == 3  # steps 2 to 4


# ------------------------------------------------------------------------ in a process
def test_a_pickle_of_another_protocol_is_one_error_line(tmp_path, tiny_data):
    p = tmp_path / "p4.pt"
    with open(p, "wb") as f:
        pickle.dump({"weights": [1, 2]}, f, protocol=4)
    r = subprocess.run([sys.executable, "-m", "napari_glimpse.cli", "predict", str(tiny_data["test1"]["paths"][0]),
                        "--model", str(p), "--out", str(tmp_path / "p.csv")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"napari-glimpse: error: {p} is not a napari-glimpse model checkpoint "
                                     f"(UnpicklingError)"]


def test_an_image_above_the_pixel_limit_is_one_error_line(capsys, monkeypatch, tiny_model_path, tmp_path):
    from napari_glimpse import io as gio

    monkeypatch.setattr(gio, "MAX_PIXELS", 60_000)
    save_png(tmp_path / "big.png", np.zeros((300, 300), np.uint8))
    line = run_error(capsys, "predict", tmp_path / "big.png", "--model", tiny_model_path, "--out", tmp_path / "p.csv")
    assert "big.png is too large (300x300 pixels" in line
