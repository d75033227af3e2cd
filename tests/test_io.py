"""Readers and writers: Kaggle CSVs, the ISBI layout, data sets, images, the real ISBI data."""

from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA, save_png, synthetic_image, write_csv

from napari_glimpse.errors import GlimpseError
from napari_glimpse.io import (
    expand_image_args,
    landmark_columns,
    list_images,
    load_dataset,
    read_image,
    read_isbi_txt,
    read_landmarks_csv,
    write_landmarks_csv,
)
from napari_glimpse.landmarks import ISBI_LANDMARKS


# ----------------------------------------------------------------------------- Kaggle CSV
def test_landmark_columns():
    assert landmark_columns(2) == ["image_path", "1_x", "1_y", "2_x", "2_y"]
    assert len(landmark_columns(19)) == 39 and landmark_columns(19)[-1] == "19_y"


def test_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 2000, size=(4, 19, 2))
    names = [f"{i:03d}.jpg" for i in range(1, 5)]
    p = tmp_path / "sub" / "pred.csv"
    write_landmarks_csv(p, names, coords)
    lines = p.read_text().splitlines()
    assert lines[0] == ",".join(landmark_columns(19))
    assert lines[1].startswith("001.jpg,")
    names2, coords2 = read_landmarks_csv(p)
    assert names2 == names
    assert coords2.shape == (4, 19, 2)
    np.testing.assert_allclose(coords2, coords, atol=0.005 + 1e-9)  # 2 decimals
    assert not [f for f in p.parent.iterdir() if f.name != "pred.csv"]  # no temp files left


def test_csv_reads_x_then_y(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("image_path,1_x,1_y,2_x,2_y\nimg.png,10,20,30,40\n\n")
    names, c = read_landmarks_csv(p)
    assert names == ["img.png"]
    np.testing.assert_array_equal(c, [[[10, 20], [30, 40]]])


def test_write_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError):
        write_landmarks_csv(tmp_path / "x.csv", ["a"], np.zeros((2, 3, 2)))


def test_wrong_column_count_names_the_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("image_path,1_x,1_y,2_x,2_y\na.png,1,2,3,4\nb.png,1,2,3\n")
    with pytest.raises(GlimpseError) as ei:
        read_landmarks_csv(p)
    msg = str(ei.value)
    assert "bad.csv:3" in msg and "expected 5 columns, got 4" in msg


def test_error_line_number_counts_blank_lines(tmp_path):
    # BUG (io.py, read_landmarks_csv, lines 92 and 102): blank rows are dropped before the
    # rows are numbered, so after a blank line the reported line number is too small (here
    # "bad.csv:3" for the short row on line 5), pointing the user at the wrong line.
    p = tmp_path / "bad.csv"
    p.write_text("image_path,1_x,1_y\n\na.png,1,2\n\nb.png,1\n")
    with pytest.raises(GlimpseError, match=r"bad\.csv:5: expected 3 columns, got 2"):
        read_landmarks_csv(p)


def test_image_names_with_commas_round_trip(tmp_path):
    # BUG (io.py, write_landmarks_csv line 142, and write_table_csv line 148): fields are
    # joined with "," without CSV quoting, so `napari-glimpse predict "scan, 1.png"` writes a
    # row with one column too many, which read_landmarks_csv (and any CSV reader) then
    # rejects ("expected 5 columns, got 6"). Expected: the name is quoted and reads back.
    p = tmp_path / "pred.csv"
    write_landmarks_csv(p, ["scan, 1.png"], np.array([[[1.0, 2.0], [3.0, 4.0]]]))
    names, coords = read_landmarks_csv(p)
    assert names == ["scan, 1.png"]
    np.testing.assert_allclose(coords, [[[1, 2], [3, 4]]])


def test_non_numeric_coordinate_names_the_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("image_path,1_x,1_y\na.png,1,2\nb.png,1,two\n")
    with pytest.raises(GlimpseError, match=r"bad\.csv:3: non-numeric"):
        read_landmarks_csv(p)


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "path,1_x,1_y\na,1,2\n", "image_path,1_x\na,1\n", "image_path,1_x,1_y\n"],
    ids=["empty", "blank", "bad-first-column", "odd-columns", "header-only"],
)
def test_bad_csv_files(tmp_path, text):
    p = tmp_path / "x.csv"
    p.write_text(text)
    with pytest.raises(GlimpseError, match="x.csv"):
        read_landmarks_csv(p)


def test_missing_csv(tmp_path):
    with pytest.raises(GlimpseError, match="not found"):
        read_landmarks_csv(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------- ISBI txt
def _isbi_txt(path: Path, pts, classes=(1, 2, 1, 3, 2, 1, 1, 2)):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{int(x)},{int(y)}" for x, y in pts] + [str(c) for c in classes]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_isbi_txt(tmp_path):
    pts = [(10 + i, 200 - i) for i in range(19)]
    p = _isbi_txt(tmp_path / "001.txt", pts)
    np.testing.assert_array_equal(read_isbi_txt(p), np.array(pts, float))


def test_read_isbi_txt_errors(tmp_path):
    p = _isbi_txt(tmp_path / "short.txt", [(1, 2)] * 5, classes=())
    with pytest.raises(GlimpseError, match="expected 19 landmark lines, found 5"):
        read_isbi_txt(p)
    p = tmp_path / "bad.txt"
    p.write_text("1,2\n3;4\n" + "5,6\n" * 17)
    with pytest.raises(GlimpseError, match=r"bad\.txt:2"):
        read_isbi_txt(p)


# ---------------------------------------------------------------------------- load_dataset
def test_kaggle_layout_senior_and_junior(kaggle_dataset):
    d = kaggle_dataset(n=4, split="train", seed=3, junior_shift=4.0)
    ds = load_dataset(d["root"], "train")
    assert len(ds) == 4
    assert [p.name for p in ds.image_paths] == d["names"]
    assert all(p.parent == d["root"] / "images" for p in ds.image_paths)
    assert set(ds.annotations) == {"senior", "junior"}
    np.testing.assert_array_equal(ds.ground_truth("senior"), d["senior"])
    np.testing.assert_array_equal(ds.ground_truth("junior"), d["senior"] + [4.0, 0.0])
    np.testing.assert_allclose(ds.ground_truth(), d["senior"] + [2.0, 0.0])  # mean
    assert ds.landmark_names == ("L1", "L2", "L3")
    assert ds.pixel_spacing == 0.1
    with pytest.raises(GlimpseError, match="annotator 'expert'"):
        ds.ground_truth("expert")
    assert load_dataset(d["root"], "train", pixel_spacing=0.25).pixel_spacing == 0.25


def test_kaggle_layout_junior_rows_in_another_order(kaggle_dataset):
    d = kaggle_dataset(n=3, junior_shift=None)
    order = [2, 0, 1]
    write_csv(d["root"] / "train_junior.csv", [d["names"][i] for i in order], d["senior"][order] + 10)
    ds = load_dataset(d["root"], "train")
    np.testing.assert_array_equal(ds.ground_truth("junior"), d["senior"] + 10)


def test_kaggle_layout_single_annotator_and_plain_split_csv(kaggle_dataset, tmp_path):
    d = kaggle_dataset(n=3, junior_shift=None)
    ds = load_dataset(d["root"], "train")
    assert set(ds.annotations) == {"senior"}
    np.testing.assert_array_equal(ds.ground_truth(), d["senior"])
    # DIR/{split}.csv with images beside it
    (d["root"] / "train_senior.csv").rename(d["root"] / "val.csv")
    ds = load_dataset(d["root"], "val")
    assert set(ds.annotations) == {"labels"}
    np.testing.assert_array_equal(ds.ground_truth(), d["senior"])


def test_single_csv_file_as_data(tmp_path):
    rng = np.random.default_rng(5)
    c = np.array([[[30.0, 40.0], [100.0, 60.0], [70.0, 120.0]]])
    save_png(tmp_path / "x.png", synthetic_image(c[0], rng, 160))
    csv = write_csv(tmp_path / "labels.csv", ["x.png"], c)
    ds = load_dataset(csv)
    assert ds.image_paths == [tmp_path / "x.png"]
    np.testing.assert_array_equal(ds.ground_truth(), c)
    # images may also sit in an images/ folder next to the CSV
    sub = tmp_path / "b"
    save_png(sub / "images" / "y.png", synthetic_image(c[0], rng, 160))
    ds = load_dataset(write_csv(sub / "labels.csv", ["y.png"], c))
    assert ds.image_paths == [sub / "images" / "y.png"]


def test_missing_image_listed_in_csv(kaggle_dataset):
    d = kaggle_dataset(n=2, junior_shift=None)
    d["paths"][1].unlink()
    with pytest.raises(GlimpseError, match="002.png"):
        load_dataset(d["root"], "train")


def test_no_labels_for_split(kaggle_dataset, tmp_path):
    d = kaggle_dataset(n=2)
    with pytest.raises(GlimpseError, match="no labels for split 'test1'"):
        load_dataset(d["root"], "test1")
    with pytest.raises(GlimpseError, match="not found"):
        load_dataset(tmp_path / "nowhere")


def _isbi_layout(root: Path, n: int = 3, folder: str = "TrainingData", seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    truth = {"senior": [], "junior": []}
    for i in range(1, n + 1):
        img = rng.integers(0, 256, size=(150, 120), dtype=np.uint8)
        p = root / "RawImage" / folder / f"{i:03d}.bmp"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)
        pts = rng.integers(5, 110, size=(19, 2))
        for who, shift in (("senior", 0), ("junior", 6)):
            _isbi_txt(root / "AnnotationsByMD" / f"400_{who}" / f"{i:03d}.txt", pts + shift)
            truth[who].append(pts + shift)
    return {k: np.array(v, float) for k, v in truth.items()}


def test_isbi_layout(tmp_path):
    truth = _isbi_layout(tmp_path, n=3)
    ds = load_dataset(tmp_path, "train")
    assert len(ds) == 3
    assert [p.name for p in ds.image_paths] == ["001.bmp", "002.bmp", "003.bmp"]
    assert ds.landmark_names == ISBI_LANDMARKS
    np.testing.assert_array_equal(ds.ground_truth("senior"), truth["senior"])
    np.testing.assert_array_equal(ds.ground_truth("junior"), truth["junior"])
    np.testing.assert_allclose(ds.ground_truth(), truth["senior"] + 3)
    img = ds.image(0)
    assert img.shape == (150, 120) and img.dtype == np.uint8
    with pytest.raises(GlimpseError, match="Test1Data"):
        load_dataset(tmp_path, "test1")


def test_isbi_layout_test1_split_and_missing_annotation(tmp_path):
    _isbi_layout(tmp_path, n=2, folder="Test1Data")
    assert len(load_dataset(tmp_path, "test1")) == 2
    (tmp_path / "AnnotationsByMD" / "400_junior" / "002.txt").unlink()
    with pytest.raises(GlimpseError, match="002.txt"):
        load_dataset(tmp_path, "test1")


def test_check_inside(kaggle_dataset):
    d = kaggle_dataset(n=2, junior_shift=None)
    ds = load_dataset(d["root"], "train")
    ds.check_inside(0, (256, 256))  # fine
    ds.annotations["senior"][1, 2] = [255.0, 300.0]  # y beyond the 256 rows
    with pytest.raises(GlimpseError) as ei:
        ds.check_inside(1, (256, 256))
    msg = str(ei.value)
    assert "002.png" in msg and "landmark 3" in msg and "outside the 256x256 image" in msg
    ds.annotations["senior"][1, 2] = [255.0, 255.0]  # the last pixel is inside
    ds.check_inside(1, (256, 256))
    ds.annotations["senior"][1, 0] = [-0.5, 10.0]
    with pytest.raises(GlimpseError, match="landmark 1"):
        ds.check_inside(1, (256, 256))


def test_subset(kaggle_dataset):
    d = kaggle_dataset(n=4)
    ds = load_dataset(d["root"], "train")
    sub = ds.subset([3, 1])
    assert [p.name for p in sub.image_paths] == ["004.png", "002.png"]
    np.testing.assert_array_equal(sub.ground_truth("senior"), d["senior"][[3, 1]])
    assert sub.landmark_names == ds.landmark_names


# ---------------------------------------------------------------------------------- images
def test_read_image_errors(tmp_path):
    with pytest.raises(GlimpseError, match="image not found"):
        read_image(tmp_path / "none.png")
    with pytest.raises(GlimpseError, match="folder"):
        read_image(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00garbage, not a JPEG" * 10)
    with pytest.raises(GlimpseError, match="cannot read image"):
        read_image(bad)


def test_read_image_keeps_8bit_grey(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, size=(70, 90), dtype=np.uint8)
    np.testing.assert_array_equal(read_image(save_png(tmp_path / "g.png", img)), img)


def test_list_and_expand_images(tmp_path):
    img = np.zeros((70, 70), np.uint8)
    for n in ("b.png", "a.PNG", "c.bmp"):
        save_png(tmp_path / "imgs" / n, img)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path / "imgs")] == ["a.PNG", "b.png", "c.bmp"]
    single = save_png(tmp_path / "z.png", img)
    got = expand_image_args([single, tmp_path / "imgs"])
    assert [p.name for p in got] == ["z.png", "a.PNG", "b.png", "c.bmp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlimpseError, match="no images"):
        expand_image_args([tmp_path / "empty"])
    with pytest.raises(GlimpseError, match="image not found"):
        expand_image_args([tmp_path / "missing.png"])
    with pytest.raises(GlimpseError):
        expand_image_args([])


# ------------------------------------------------------------------------- the real data
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"ISBI 2015 data not at {REAL_DATA}")
def test_real_isbi_data_loads():
    ds = load_dataset(REAL_DATA, "train")
    assert len(ds) == 150
    assert ds.landmark_names == ISBI_LANDMARKS and len(ds.landmark_names) == 19
    assert set(ds.annotations) == {"senior", "junior"}
    gt = ds.ground_truth()
    assert gt.shape == (150, 19, 2)
    np.testing.assert_allclose(gt, (ds.annotations["senior"] + ds.annotations["junior"]) / 2)
    assert ds.image_paths[0].name == "001.jpg"
    np.testing.assert_array_equal(ds.ground_truth("senior")[0, 0], [835, 996])  # Sella of 001
    img = ds.image(0)
    assert img.shape == (2400, 1935) and img.dtype == np.uint8
    ds.check_inside(0, img.shape)
    # all labels within the 1935 x 2400 frame
    assert gt[..., 0].max() < 1935 and gt[..., 1].max() < 2400 and gt.min() >= 0
    test1 = load_dataset(REAL_DATA, "test1")
    assert len(test1) == 150 and test1.image_paths[0].name == "151.jpg"
