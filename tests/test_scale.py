"""A folder at the speed of the nets (issue 25): predict's worker threads give the one-by-one
answers, rows in the images' order, bounded work in flight; --shard over processes and merge."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA

from napari_glimpse import _predict
from napari_glimpse._shards import parse_shard, shard_of
from napari_glimpse.cli import main
from napari_glimpse.errors import GlimpseError
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel
from napari_glimpse.io import read_landmarks_csv


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return rc, out, [ln.split("\r")[-1] for ln in err.splitlines() if "napari-glimpse: " in ln]


@pytest.fixture(scope="module")
def images(tiny_data):
    """The tiny data set's 9 images (001-006, 101-103) in one folder."""
    return tiny_data["root"] / "images"


def test_workers_give_the_one_by_one_csv(capsys, tiny_quantized_model_path, images, tmp_path):
    for w in (1, 2, 3):
        assert run(capsys, "predict", images, "--model", tiny_quantized_model_path, "--out", tmp_path / f"w{w}.csv",
                   "--workers", w)[0] == 0
    for name in ("w{}.csv", "w{}_confidence.csv"):
        one = (tmp_path / name.format(1)).read_bytes()
        assert (tmp_path / name.format(2)).read_bytes() == one and (tmp_path / name.format(3)).read_bytes() == one
    assert read_landmarks_csv(tmp_path / "w2.csv")[0] == sorted(p.name for p in images.iterdir())


def test_rows_keep_the_images_order_and_work_in_flight_is_bounded(capsys, monkeypatch, tiny_model_path, images,
                                                                   tmp_path):
    real, lock = GlimpseModel.predict, threading.Lock()
    state = {"running": 0, "most": 0, "started": 0, "started_before_first_row": None}
    written = []

    def slow_first(self, image, *a, **k):
        with lock:
            state["running"] += 1
            state["started"] += 1
            state["most"] = max(state["most"], state["running"])
        try:
            if Path(image).name == "001.png":  # the first image finishes last of its batch
                time.sleep(0.3)
            return real(self, image, *a, **k)
        finally:
            with lock:
                state["running"] -= 1

    class Rows(_predict._Outputs):
        def write(self, name, tr):
            if not written:
                state["started_before_first_row"] = state["started"]
            written.append(name)
            super().write(name, tr)

    monkeypatch.setattr(GlimpseModel, "predict", slow_first)
    monkeypatch.setattr(_predict, "_Outputs", Rows)
    rc, _, _ = run(capsys, "predict", images, "--model", tiny_model_path, "--out", tmp_path / "p.csv", "--workers", 2)
    assert rc == 0
    assert written == sorted(p.name for p in images.iterdir()) == read_landmarks_csv(tmp_path / "p.csv")[0]
    assert state["most"] == 2  # two at once, never more
    assert state["started_before_first_row"] <= 4  # at most 2 per worker in flight


def test_skipped_images_and_warnings_come_in_the_images_order(capsys, tiny_model_path, tiny_data, tmp_path):
    from PIL import Image

    d = tmp_path / "d"
    d.mkdir()
    for i, p in enumerate(tiny_data["test1"]["paths"]):
        img = np.asarray(Image.open(p)).astype(np.float32)
        img[3, 3] = np.nan  # one warning each
        Image.fromarray(img, mode="F").save(d / f"{i}a.tif")
        (d / f"{i}b.png").write_bytes(b"not an image")
    rc, _, err = run(capsys, "predict", d, "--model", tiny_model_path, "--out", tmp_path / "p.csv", "--workers", 2)
    assert rc == 2
    lines = [ln for ln in err if "pixel spacing" not in ln]
    expect = []
    for i in range(3):
        expect += [("warning", f"{i}a.tif"), ("skipped", f"{i}b.png")]
    assert [(ln.split(": ")[1], Path(ln.split(": ")[2].split()[-1]).name) for ln in lines[:-1]] == expect, lines
    assert read_landmarks_csv(tmp_path / "p.csv")[0] == ["0a.tif", "1a.tif", "2a.tif"]


def test_the_torch_thread_count_is_put_back(capsys, tiny_model_path, images, tmp_path):
    import torch

    before = torch.get_num_threads()
    rc, _, _ = run(capsys, "predict", images, "--model", tiny_model_path, "--out", tmp_path / "p.csv", "--workers", 2)
    assert rc == 0
    assert torch.get_num_threads() == before


def test_default_workers():
    assert 1 <= _predict.default_workers() <= 2
    assert _predict.default_workers() == min(2, len(os.sched_getaffinity(0)))


# ------------------------------------------------------------------------------ shards
def test_shards_split_the_list_deterministically():
    paths = [Path(f"{i:03d}.png") for i in range(7)]
    parts = [shard_of(paths, i, 3) for i in range(3)]
    assert sorted(p for part in parts for p in part) == paths
    assert [len(p) for p in parts] == [3, 2, 2] and parts[1] == [paths[1], paths[4]]
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "-1/2", "0/0", "1", "a/b", "1/2/3"):
        with pytest.raises(GlimpseError, match="give i/n"):
            parse_shard(bad)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "napari_glimpse", *map(str, args)]


def _shard_runs_match_one_run(model, images, tmp_path, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen(_cli("predict", images, "--model", model, "--out", tmp_path / f"s{i}.csv", "--shard",
                                  f"{i}/2", "--workers", 1, *extra), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    for r in runs:
        out, err = r.communicate(timeout=600)
        assert r.returncode == 0, err
    r = subprocess.run(_cli("merge", tmp_path / "s1.csv", tmp_path / "s0.csv", "--out", tmp_path / "all.csv"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "all_confidence.csv" in r.stdout
    assert main([str(a) for a in ("predict", images, "--model", model, "--out", tmp_path / "one.csv", *extra)]) == 0
    for name in ("{}.csv", "{}_confidence.csv"):
        assert (tmp_path / name.format("all")).read_bytes() == (tmp_path / name.format("one")).read_bytes()
    return read_landmarks_csv(tmp_path / "s0.csv")[0], read_landmarks_csv(tmp_path / "s1.csv")[0]


def test_two_shard_processes_and_merge_give_the_one_process_csv(tiny_quantized_model_path, images, tmp_path):
    s0, s1 = _shard_runs_match_one_run(tiny_quantized_model_path, images, tmp_path)
    names = sorted(p.name for p in images.iterdir())
    assert s0 == names[0::2] and s1 == names[1::2]


@pytest.mark.skipif(not REAL_DATA.exists(), reason="needs the ISBI 2015 images in ../shared")
def test_shards_and_merge_with_the_shipped_model_on_isbi(tmp_path):
    d = tmp_path / "isbi"
    d.mkdir()
    for i in (151, 152, 153, 154):
        (d / f"{i}.jpg").symlink_to(REAL_DATA / "images" / f"{i}.jpg")
    s0, s1 = _shard_runs_match_one_run(DEFAULT_MODEL, d, tmp_path)
    assert s0 == ["151.jpg", "153.jpg"] and s1 == ["152.jpg", "154.jpg"]


def test_a_shard_without_images_writes_headers_alone(capsys, tiny_model_path, tiny_data, tmp_path):
    img = tiny_data["test1"]["paths"][0]
    rc, out, _ = run(capsys, "predict", img, "--model", tiny_model_path, "--out", tmp_path / "s1.csv", "--shard", "1/2")
    assert rc == 0 and "no image falls to this shard" in out
    assert (tmp_path / "s1.csv").read_text().count("\n") == 1
    rc, _, _ = run(capsys, "predict", img, "--model", tiny_model_path, "--out", tmp_path / "s0.csv", "--shard", "0/2")
    assert rc == 0
    assert run(capsys, "merge", tmp_path / "s0.csv", tmp_path / "s1.csv", "--out", tmp_path / "m.csv")[0] == 0
    assert (tmp_path / "m.csv").read_text() == (tmp_path / "s0.csv").read_text()


def test_a_bad_shard_is_one_error_line(capsys, tiny_model_path, images, tmp_path):
    rc, _, err = run(capsys, "predict", images, "--model", tiny_model_path, "--out", tmp_path / "p.csv", "--shard",
                     "2/2")
    assert rc == 2 and err == ["napari-glimpse: error: --shard 2/2: give i/n with 0 <= i < n, e.g. 0/2 and 1/2 for "
                               "two processes"]


# ------------------------------------------------------------------------------- merge
@pytest.fixture
def shards(capsys, tiny_model_path, images, tmp_path):
    for i in range(2):
        assert run(capsys, "predict", images, "--model", tiny_model_path, "--out", tmp_path / f"s{i}.csv", "--shard",
                   f"{i}/2")[0] == 0
    return [tmp_path / "s0.csv", tmp_path / "s1.csv"]


def _merge_error(capsys, *args):
    rc, _, err = run(capsys, "merge", *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("napari-glimpse: error: "), err
    return err[0]


def test_merge_refuses_an_image_twice(capsys, shards, tmp_path):
    assert "is given twice" in _merge_error(capsys, shards[0], shards[1], shards[0], "--out", tmp_path / "m.csv")
    copy = tmp_path / "copy.csv"
    copy.write_text(shards[0].read_text())
    (tmp_path / "copy_confidence.csv").write_text((tmp_path / "s0_confidence.csv").read_text())
    assert "001.png is in both" in _merge_error(capsys, shards[0], shards[1], copy, "--out", tmp_path / "m.csv")
    text = shards[1].read_text()
    shards[1].write_text(text + text.splitlines()[1] + "\n")
    assert "twice in" in _merge_error(capsys, *shards, "--out", tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_merge_refuses_other_columns_and_rows_cut_short(capsys, shards, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("image_path,1_x,1_y\nz.png,1.00,2.00\n")
    (tmp_path / "other_confidence.csv").write_text("image_path,1_confidence,facing\nz.png,0.500,right\n")
    assert "has other columns than" in _merge_error(capsys, shards[0], other, "--out", tmp_path / "m.csv")
    shards[1].write_text(shards[1].read_text() + "zz.png,1.0,")  # a row cut short by a kill
    assert "is cut short" in _merge_error(capsys, *shards, "--out", tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_merge_checks_the_confidence_csvs(capsys, shards, tmp_path):
    c1 = tmp_path / "s1_confidence.csv"
    lines = c1.read_text().splitlines(keepends=True)
    c1.write_text("".join(lines[:-1]))  # a run stopped between its two CSVs
    assert "not in both" in _merge_error(capsys, *shards, "--out", tmp_path / "m.csv")
    c1.unlink()
    assert "has no confidence CSV beside it" in _merge_error(capsys, *shards, "--out", tmp_path / "m.csv")


def test_merge_outputs(capsys, shards, tmp_path):
    assert "one of the CSVs to merge" in _merge_error(capsys, *shards, "--out", shards[0])
    assert "ending in .csv" in _merge_error(capsys, *shards, "--out", tmp_path / "m.jpg")
    rc, out, _ = run(capsys, "merge", *shards, "--out", tmp_path / "m.csv", "--confidence-out", tmp_path / "c.csv")
    assert rc == 0 and "9 image(s) from 2 CSV(s)" in out
    assert (tmp_path / "c.csv").read_text().count("\n") == 10
    for c in (tmp_path / "s0_confidence.csv", tmp_path / "s1_confidence.csv"):
        c.unlink()
    rc, out, _ = run(capsys, "merge", *shards, "--out", tmp_path / "n.csv")
    assert rc == 0 and "confidence" not in out and not (tmp_path / "n_confidence.csv").exists()
