"""Faults a real archive throws at the library (issue 23): non-finite labels, pixels, losses and
weights; label CSVs from spreadsheets; huge images; output files' permissions and temp files."""

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_CONFIG, TINY_TRAIN_CONFIG, make_kaggle_dataset, save_png, synthetic_image

from napari_glimpse import io as gio
from napari_glimpse import training
from napari_glimpse._files import current_umask, make_temp, remove_stale_temps
from napari_glimpse.checkpoint import atomic_torch_save, read_checkpoint
from napari_glimpse.coarse import CoarseConfig, CoarseNet, fit_heatmaps
from napari_glimpse.errors import GlimpseError, GlimpseWarning
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import (
    CsvAppender,
    Dataset,
    load_dataset,
    read_image,
    read_isbi_txt,
    read_landmarks_csv,
    read_rows_to_resume,
    to_grey_uint8,
    write_landmarks_csv,
    write_table_csv,
)

HEADER = "image_path,1_x,1_y,2_x,2_y"


# ------------------------------------------------------------------------- label CSVs
@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_non_finite_label_names_file_line_image_and_column(tmp_path, cell):
    p = tmp_path / "labels.csv"
    p.write_text(f"{HEADER}\na.png,1,2,3,4\nb.png,1,2,{cell},4\n")
    with pytest.raises(GlimpseError) as ei:
        read_landmarks_csv(p)
    msg = str(ei.value)
    assert "labels.csv:3" in msg and "b.png" in msg and "column 2_x" in msg and "not a finite number" in msg


def test_a_non_numeric_label_names_the_column_and_hints_at_a_decimal_comma(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text(f"{HEADER.replace(',', ';')}\na.png;1;2;3,5;4\n")
    with pytest.raises(GlimpseError, match=r"labels\.csv:2: non-numeric value '3,5' \(image a\.png, column 2_x; "
                                           r"a decimal comma"):
        read_landmarks_csv(p)


def test_a_byte_order_mark_is_skipped(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes(("\ufeff" + f"{HEADER}\na.png,1,2,3,4\n").encode("utf-8"))
    names, coords = read_landmarks_csv(p)
    assert names == ["a.png"] and coords.shape == (1, 2, 2)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_separators_are_read(tmp_path, sep):
    p = tmp_path / "labels.csv"
    p.write_text(f"{HEADER.replace(',', sep)}\n" + sep.join(["a.png", "1", "2.5", "3", "4"]) + "\n")
    names, coords = read_landmarks_csv(p)
    assert names == ["a.png"]
    np.testing.assert_allclose(coords, [[[1, 2.5], [3, 4]]])


def test_a_short_row_names_the_missing_column(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text(f"{HEADER}\na.png,1,2,3\n")
    with pytest.raises(GlimpseError, match=r"labels\.csv:2: expected 5 columns, got 4 \(image a\.png: no value "
                                           r"for column 2_y\)"):
        read_landmarks_csv(p)


def test_a_bad_header_says_what_it_found(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("filename,1_x,1_y\na.png,1,2\n")
    with pytest.raises(GlimpseError, match="first column must be image_path, found 'filename'"):
        read_landmarks_csv(p)


def test_duplicate_image_rows_are_refused_in_labels(tmp_path):
    d = make_kaggle_dataset(tmp_path / "d", n=3, junior_shift=None)
    lines = d["senior_csv"].read_text().splitlines()
    d["senior_csv"].write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(GlimpseError, match=r"train_senior\.csv:5: image 001\.png has a second row \(the first on "
                                           r"line 2\)"):
        load_dataset(d["root"], "train")
    with pytest.raises(GlimpseError, match="second row"):
        load_dataset(d["senior_csv"])
    assert read_landmarks_csv(d["senior_csv"])[0].count("001.png") == 2  # predictions may repeat a name


def test_non_finite_isbi_txt_and_dataset_labels(tmp_path):
    p = tmp_path / "001.txt"
    p.write_text("\n".join(["1,2"] * 18 + ["nan,3"]) + "\n")
    with pytest.raises(GlimpseError, match=r"001\.txt:19: coordinate 'nan,3' is not a finite number"):
        read_isbi_txt(p)
    ds = Dataset([tmp_path / "a.png"], {"labels": np.array([[[1.0, 2.0], [np.nan, 3.0]]])}, ("L1", "L2"))
    with pytest.raises(GlimpseError, match=r"landmark 2 \(labels\) at \(nan, 3\) is not a finite position"):
        ds.check_inside(0, (100, 100))


# ----------------------------------------------------------------------------- images
def _float_tiff(path, img):
    from PIL import Image

    Image.fromarray(img.astype(np.float32), mode="F").save(path)
    return path


def test_nan_pixels_are_set_to_the_lowest_value_with_one_warning(tmp_path):
    img = synthetic_image(np.array([[80.0, 80.0], [176.0, 96.0], [128.0, 180.0]]), np.random.default_rng(0))
    ref = to_grey_uint8(img.astype(np.float32))
    bad = img.astype(np.float32)
    bad[5, 7] = np.nan
    bad[9, 9] = np.inf
    p = _float_tiff(tmp_path / "scan.tif", bad)
    match = r"scan\.tif: 2 NaN or infinite pixel\(s\) set to the image's lowest"
    with pytest.warns(GlimpseWarning, match=match) as rec:
        out = read_image(p)
    assert len(rec) == 1
    fixed = img.astype(np.float32)
    fixed[5, 7] = fixed[9, 9] = img.min()
    np.testing.assert_array_equal(out, to_grey_uint8(fixed))
    keep = np.ones(img.shape, bool)
    keep[5, 7] = keep[9, 9] = False
    assert np.abs(out[keep].astype(int) - ref[keep].astype(int)).max() <= 1  # not a black image
    with pytest.warns(GlimpseWarning):
        to_grey_uint8(bad)
    with pytest.raises(GlimpseError, match="no finite pixel values"):
        read_image(_float_tiff(tmp_path / "nan.tif", np.full((8, 8), np.nan)))


def test_finite_images_are_read_as_before_without_warnings(tmp_path):
    img = np.random.default_rng(1).uniform(0, 4000, (70, 90))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_image(_float_tiff(tmp_path / "ok.tif", img))
    lo, hi = np.percentile(img.astype(np.float32), [0.5, 99.5])
    ref = (np.clip((img.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)


def test_our_pixel_limit_is_a_clear_error_and_pil_does_not_warn_below_it(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # PIL's limit would warn above it, fail above twice it
    monkeypatch.setattr(gio, "MAX_PIXELS", 30_000)
    small = save_png(tmp_path / "small.png", np.zeros((100, 120), np.uint8))  # 12 000 pixels
    big = save_png(tmp_path / "big.png", np.zeros((200, 200), np.uint8))  # 40 000: PIL would warn
    huge = save_png(tmp_path / "huge.png", np.zeros((300, 300), np.uint8))  # 90 000: PIL would raise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(small).shape == (100, 120)
        with pytest.raises(GlimpseError, match=r"big\.png is too large \(200x200 pixels, 0 megapixels\); "
                                               r"napari-glimpse reads images of up to 0 megapixels"):
            read_image(big)
        with pytest.raises(GlimpseError, match=r"huge\.png is too large"):
            read_image(huge)


def test_pil_is_told_our_limit(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's default
    read_image(save_png(tmp_path / "a.png", np.zeros((70, 70), np.uint8)))
    assert Image.MAX_IMAGE_PIXELS == gio.MAX_PIXELS == 500_000_000


# ------------------------------------------------------------------- weights and losses
def test_a_checkpoint_with_nan_weights_is_refused_at_load_and_at_save(tiny_model, tmp_path):
    ck = tiny_model.to_checkpoint()
    name = next(k for k, v in ck["state_dict"].items() if v.is_floating_point() and v.dim() >= 2)
    ck["state_dict"][name][0] = float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    with pytest.raises(GlimpseError, match=rf"nan\.pt: state_dict\.{name} holds NaN or infinite values"):
        read_checkpoint(tmp_path / "nan.pt")
    with pytest.raises(GlimpseError, match="holds NaN"):
        GlimpseModel.load(tmp_path / "nan.pt", device="cpu")
    with torch.no_grad():
        dict(tiny_model.net.named_parameters())[name][0] = float("inf")
    with pytest.raises(GlimpseError, match=rf"refusing to write .*m\.pt: state_dict\.{name} holds NaN"):
        tiny_model.save(tmp_path / "out" / "m.pt")
    assert not (tmp_path / "out").exists()


def test_unpickling_errors_come_without_torch_warnings(tmp_path):
    p = tmp_path / "p4.pt"
    with open(p, "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(GlimpseError, match="not a napari-glimpse model"):
            read_checkpoint(p)
    assert [str(w.message) for w in rec] == []


def test_a_non_finite_glimpse_loss_stops_training_before_anything_is_written(tiny_data, tmp_path, monkeypatch):
    ds = load_dataset(tiny_data["root"], "train")
    monkeypatch.setattr(training, "train_step", lambda *a, **k: float("nan"))
    out = tmp_path / "m.pt"
    with pytest.raises(GlimpseError, match=r"glimpse training stopped at step 1: the loss is nan .*m\.pt was not "
                                           r"written"):
        training.train(ds, out, TINY_MODEL_CONFIG, TINY_TRAIN_CONFIG, device="cpu", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_heatmap_loss_stops_the_coarse_and_fine_loops():
    net = CoarseNet(CoarseConfig(n_landmarks=2, input_hw=(32, 32), width=4))
    target = torch.full((2, 2, 16, 16), 1 / 256)
    target[0, 0, 0, 0] = float("nan")

    def batch():
        return torch.rand(2, 1, 32, 32) * 255, target, torch.ones(2, 2)

    with pytest.raises(GlimpseError, match=r"coarse training stopped at step 1: the loss is nan"):
        fit_heatmaps(net, "coarse", 1e-3, batch, 60.0, progress=False, max_steps=3)


def test_the_first_resume_point_comes_early(tiny_data, tmp_path, monkeypatch):
    ds = load_dataset(tiny_data["root"], "train")
    out = tmp_path / "m.pt"
    seen = []
    monkeypatch.setattr(training, "FIRST_RESUME_S", 0.0)  # (30 s in use; save_every_s is 1e9 here)
    training.train(ds, out, TINY_MODEL_CONFIG, TINY_TRAIN_CONFIG, device="cpu", progress=False,
                   callback=lambda info: seen.append(training.resume_path(out).exists()))
    assert seen[:2] == [False, True]
    ck = read_checkpoint(training.resume_path(out))
    assert ck["train_state"]["step"] == 8 and len(ck["meta"]["history"]) == 1  # no extra history record


def test_a_resume_point_written_before_a_pending_stage_is_refused(tiny_data, tiny_model, tmp_path):
    ds = load_dataset(tiny_data["root"], "train")
    out = tmp_path / "m.pt"
    ck = tiny_model.to_checkpoint()
    ck["train_state"] = {"optimizer": {}, "step": 0, "elapsed_s": 0.0, "rng": torch.Generator().get_state(),
                         "history": [], "pending": "fine"}
    atomic_torch_save(ck, training.resume_path(out))
    with pytest.raises(GlimpseError, match="written before the fine stage was trained and cannot be resumed"):
        training.train(ds, out, device="cpu", resume=True, progress=False)


# ------------------------------------------------------------------------ output files
def test_outputs_have_the_umask_permissions_and_leave_no_temp_files(tmp_path, tiny_model):
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        write_table_csv(tmp_path / "t.csv", ["a"], [["1"]])
        tiny_model.save(tmp_path / "m.pt")
    finally:
        os.umask(old)
    for name in ("t.csv", "m.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "t.csv"]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "p.csv"
    dead = 2**22 + 12345  # above pid_max's default: no such process
    stale = tmp_path / f".p.csv.{dead}.abcd_123.tmp"
    live = tmp_path / f".p.csv.{os.getpid()}.zzzz_999.tmp"
    old = tmp_path / ".p.csv.k2j4h5g6.tmp"  # an older version's name: stale after an hour
    recent = tmp_path / ".p.csv.a1b2c3d4.tmp"
    other = tmp_path / ".p.csv.backup.tmp"
    for p in (stale, live, old, recent, other):
        p.write_text("x")
    os.utime(old, (1, 1))
    assert set(remove_stale_temps(target)) == {stale, old}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, recent, other))
    fd, tmp = make_temp(target)
    os.close(fd)
    assert os.path.basename(tmp).startswith(f".p.csv.{os.getpid()}.")


def test_no_nan_is_ever_written_to_a_landmark_csv(tmp_path):
    coords = np.zeros((2, 2, 2))
    coords[1, 0, 1] = np.nan
    with pytest.raises(GlimpseError, match=r"refusing to write .*p\.csv: the coordinates of b\.png"):
        write_landmarks_csv(tmp_path / "p.csv", ["a.png", "b.png"], coords)
    assert list(tmp_path.iterdir()) == []


def test_an_appended_csv_resumes_from_its_whole_rows(tmp_path):
    p = tmp_path / "p.csv"
    w = CsvAppender(p, ["image_path", "v"], [["a.png", "1"]])
    w.write(["b, c.png", "2"])
    w.close()
    with open(p, "a") as f:
        f.write("d.png,")  # a row cut short
    assert read_rows_to_resume(p, ["image_path", "v"]) == [["a.png", "1"], ["b, c.png", "2"]]
    assert read_rows_to_resume(tmp_path / "none.csv", ["image_path", "v"]) == []
    with pytest.raises(GlimpseError, match="other columns"):
        read_rows_to_resume(p, ["image_path", "w"])
