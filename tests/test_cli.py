"""The command line: train, predict, evaluate, quantize, and one-line errors (exit code 2) on bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_kaggle_dataset, save_png, synthetic_image, write_csv

from napari_glimpse.checkpoint import read_checkpoint
from napari_glimpse.cli import main
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel
from napari_glimpse.int8 import Int8Net, checkpoint_graphs
from napari_glimpse.io import load_dataset, read_landmarks_csv
from napari_glimpse.metrics import radial_errors


def _cli_command():
    exe = shutil.which("napari-glimpse")
    return [exe] if exe else [sys.executable, "-m", "napari_glimpse.cli"]


def run_ok(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    return out, err


def run_error(capsys, *args):
    """Run a command expected to fail on bad input: exit code 2, one clean error line."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    # One line: a single newline, at the end. A progress bar that was started before the
    # error may precede it on that line, erased with carriage returns (tqdm leave=False), so
    # what a terminal shows is the text after the last '\r'.
    assert err.count("\n") == 1 and err.endswith("\n"), f"expected one line on stderr, got {err!r}"
    line = err[:-1].split("\r")[-1]
    assert line.startswith("napari-glimpse: error: "), err
    return line


# ---------------------------------------------------------------------------------- help
def test_help_in_a_subprocess():
    r = subprocess.run(_cli_command() + ["--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("train", "predict", "evaluate"):
        assert word in r.stdout


def test_bad_input_in_a_subprocess(tmp_path):
    r = subprocess.run(_cli_command() + ["predict", str(tmp_path / "missing.png"), "--out", str(tmp_path / "p.csv")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"napari-glimpse: error: image not found: {tmp_path / 'missing.png'}"]


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["train", "--data", "x", "--out", "y", "--max-steps", "0"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "--max-steps" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as ei:
        main([])
    assert ei.value.code == 2


# --------------------------------------------------------------------------------- train
def test_train(capsys, tiny_data, tmp_path):
    out = tmp_path / "m.pt"
    stdout, _ = run_ok(capsys, "train", "--data", tiny_data["root"], "--out", out, "--max-steps", 2,
                       "--batch-size", 2, "--seed", 3, "--threads", 1)
    assert f"wrote {out}: 2 steps" in stdout
    m = GlimpseModel.load(out, device="cpu")
    assert m.meta["train_steps"] == 2
    assert m.meta["split"] == "train" and m.meta["data"] == str(tiny_data["root"])
    assert m.train_config["seed"] == 3 and m.train_config["batch_size"] == 2
    assert m.config.trunk == "compact" and m.config.n_landmarks == 3
    assert m.landmark_names == ("L1", "L2", "L3")
    assert (tmp_path / "m.pt.resume").exists()


def test_train_with_validation_and_spacing(capsys, tiny_data, tmp_path):
    out = tmp_path / "m.pt"
    stdout, _ = run_ok(capsys, "train", "--data", tiny_data["root"], "--out", out, "--max-steps", 1,
                       "--batch-size", 2, "--val-fraction", 0.34, "--spacing", 0.2, "--lr", 1e-4)
    assert "validation MRE" in stdout
    m = GlimpseModel.load(out, device="cpu")
    assert m.meta["n_train_images"] == 4  # 6 images, 2 held out
    assert m.pixel_spacing == 0.2 and m.train_config["lr"] == 1e-4


# ------------------------------------------------------------------------------- predict
def test_predict(capsys, tiny_data, tiny_model_path, tmp_path):
    paths = tiny_data["test1"]["paths"]
    out = tmp_path / "preds.csv"
    stdout, _ = run_ok(capsys, "predict", paths[0], paths[1].parent, "--model", tiny_model_path, "--out", out,
                       "--iterations", 2)
    assert "wrote" in stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "image_path,1_x,1_y,2_x,2_y,3_x,3_y"
    names, coords = read_landmarks_csv(out)
    # the single file, then the folder's other images (sorted; the folder holds both splits): each file once
    folder = sorted(p.name for p in paths[1].parent.iterdir())
    assert len(folder) == 9 and paths[0].name in folder
    assert names == [paths[0].name] + [n for n in folder if n != paths[0].name]
    model = GlimpseModel.load(tiny_model_path, device="cpu")
    ref = model.predict(paths[0], iterations=2)
    np.testing.assert_allclose(coords[0], ref.final, atol=0.006)
    conf = tmp_path / "preds_confidence.csv"
    clines = conf.read_text().splitlines()
    assert clines[0] == "image_path,1_confidence,2_confidence,3_confidence,facing"
    assert len(clines) == 1 + len(names)
    row = clines[1].split(",")
    assert row[0] == paths[0].name
    vals = np.array(row[1:-1], float)
    assert np.all((vals >= 0) & (vals <= 1))
    np.testing.assert_allclose(vals, ref.confidence, atol=0.0006)
    assert row[-1] == ref.facing


def test_predict_confidence_out_and_starts(capsys, tiny_data, tiny_model_path, tmp_path):
    img = tiny_data["test1"]["paths"][0]
    run_ok(capsys, "predict", img, "--model", tiny_model_path, "--out", tmp_path / "a" / "p.csv",
           "--confidence-out", tmp_path / "c.csv", "--starts", 3)
    assert (tmp_path / "a" / "p.csv").exists() and (tmp_path / "c.csv").exists()
    assert not (tmp_path / "a" / "p_confidence.csv").exists()


def test_predict_with_the_default_model(capsys, tmp_path):
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"no default model shipped yet at {DEFAULT_MODEL}")
    img = save_png(tmp_path / "ceph.png", synthetic_image(np.array([[100.0, 100.0]]), np.random.default_rng(0), 300))
    run_ok(capsys, "predict", img, "--out", tmp_path / "p.csv", "--iterations", 1)
    names, coords = read_landmarks_csv(tmp_path / "p.csv")
    assert names == ["ceph.png"] and coords.shape == (1, 19, 2)
    assert np.all((coords >= 0) & (coords <= 299))


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_json_and_predictions(capsys, tiny_data, tiny_model_path, tmp_path):
    js, pred_csv = tmp_path / "res.json", tmp_path / "pred.csv"
    stdout, _ = run_ok(capsys, "evaluate", "--data", tiny_data["root"], "--split", "test1", "--model",
                       tiny_model_path, "--json", js, "--predictions", pred_csv)
    assert "overall" in stdout and "3 images" in stdout
    res = json.loads(js.read_text())
    assert res["n_images"] == 3 and res["split"] == "test1" and res["ground_truth"] == "mean"
    assert isinstance(res["overall"]["mre_mm"], float)
    assert set(res["overall"]["sdr"]) == {"2", "2.5", "3", "4"}
    assert [r["landmark"] for r in res["per_landmark"]] == ["L1", "L2", "L3"]
    # the reported MRE is that of the written predictions against the mean annotation
    names, preds = read_landmarks_csv(pred_csv)
    assert names == tiny_data["test1"]["names"]
    gt = load_dataset(tiny_data["root"], "test1").ground_truth()
    err = radial_errors(preds, gt, 0.1)
    assert res["overall"]["mre_mm"] == pytest.approx(err.mean(), abs=1e-3)
    assert res["per_landmark"][1]["mre_mm"] == pytest.approx(err[:, 1].mean(), abs=1e-3)


def test_evaluate_json_to_stdout_and_ground_truth(capsys, tiny_data, tiny_model_path):
    stdout, _ = run_ok(capsys, "evaluate", "--data", tiny_data["root"], "--split", "test1", "--model",
                       tiny_model_path, "--json", "-", "--ground-truth", "senior")
    res = json.loads(stdout[stdout.index("{"):])
    assert res["ground_truth"] == "senior" and res["n_images"] == 3


# ---------------------------------------------------------------------------- bad inputs
def test_predict_missing_image(capsys, tiny_model_path, tmp_path):
    line = run_error(capsys, "predict", tmp_path / "nope.jpg", "--model", tiny_model_path, "--out", tmp_path / "p.csv")
    assert "image not found" in line and "nope.jpg" in line
    assert not (tmp_path / "p.csv").exists()


def test_predict_unreadable_image(capsys, tiny_model_path, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage bytes, not really a JPEG" * 20)
    line = run_error(capsys, "predict", bad, "--model", tiny_model_path, "--out", tmp_path / "p.csv")
    assert "cannot read image" in line and "broken.jpg" in line


def test_predict_truncated_jpeg(capsys, tiny_model_path, tmp_path):
    from PIL import Image

    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    line = run_error(capsys, "predict", tmp_path / "cut.jpg", "--model", tiny_model_path, "--out", tmp_path / "p.csv")
    assert "cut.jpg" in line


def test_predict_image_smaller_than_a_glimpse(capsys, tiny_model_path, tmp_path):
    small = save_png(tmp_path / "small.png", np.zeros((40, 40), np.uint8))
    line = run_error(capsys, "predict", small, "--model", tiny_model_path, "--out", tmp_path / "p.csv")
    assert "40x40" in line and "smaller than one 64x64 glimpse" in line


def test_predict_empty_folder(capsys, tiny_model_path, tmp_path):
    (tmp_path / "empty").mkdir()
    line = run_error(capsys, "predict", tmp_path / "empty", "--model", tiny_model_path, "--out", tmp_path / "p.csv")
    assert "no images" in line


def test_predict_model_that_is_not_a_checkpoint(capsys, tiny_data, tmp_path):
    fake = tmp_path / "model.pt"
    fake.write_text("definitely not a model")
    line = run_error(capsys, "predict", tiny_data["test1"]["paths"][0], "--model", fake, "--out", tmp_path / "p.csv")
    assert "not a napari-glimpse model" in line
    line = run_error(capsys, "evaluate", "--data", tiny_data["root"], "--split", "test1", "--model", fake)
    assert "not a napari-glimpse model" in line
    line = run_error(capsys, "predict", tiny_data["test1"]["paths"][0], "--model", tmp_path / "none.pt",
                     "--out", tmp_path / "p.csv")
    assert "model file not found" in line


def test_csv_with_wrong_column_count(capsys, tiny_model_path, tmp_path):
    d = make_kaggle_dataset(tmp_path / "d", n=2, split="test1", junior_shift=None)
    text = d["senior_csv"].read_text().splitlines()
    text[2] = text[2].rsplit(",", 1)[0]  # drop the last value of image 2
    d["senior_csv"].write_text("\n".join(text) + "\n")
    line = run_error(capsys, "evaluate", "--data", d["root"], "--split", "test1", "--model", tiny_model_path)
    assert "test1_senior.csv:3: expected 7 columns, got 6" in line
    line = run_error(capsys, "train", "--data", d["senior_csv"], "--out", tmp_path / "m.pt", "--max-steps", 1)
    assert "expected 7 columns, got 6" in line


def _outside_dataset(root):
    d = make_kaggle_dataset(root, n=2, split="test1", junior_shift=None)
    bad = d["senior"].copy()
    bad[1, 2] = [260.0, 100.0]  # beyond the 256-pixel width
    write_csv(d["senior_csv"], d["names"], bad)
    (root / "train_senior.csv").write_text(d["senior_csv"].read_text())
    return d


def test_evaluate_coordinates_outside_the_image(capsys, tiny_model_path, tmp_path):
    d = _outside_dataset(tmp_path / "d")
    line = run_error(capsys, "evaluate", "--data", d["root"], "--split", "test1", "--model", tiny_model_path)
    assert "002.png: landmark 3" in line and "outside the 256x256 image" in line


def test_train_coordinates_outside_the_image(capsys, tmp_path):
    d = _outside_dataset(tmp_path / "d")
    line = run_error(capsys, "train", "--data", d["root"], "--out", tmp_path / "m.pt", "--max-steps", 1)
    assert "002.png: landmark 3" in line and "outside the 256x256 image" in line
    assert not (tmp_path / "m.pt").exists()


def test_train_image_smaller_than_a_glimpse(capsys, tmp_path):
    save_png(tmp_path / "small.png", np.zeros((40, 40), np.uint8))
    write_csv(tmp_path / "train.csv", ["small.png"], np.array([[[5.0, 5.0], [10, 10]]]))
    line = run_error(capsys, "train", "--data", tmp_path, "--out", tmp_path / "m.pt", "--max-steps", 1)
    assert "smaller than one 64x64 glimpse" in line


def test_train_and_evaluate_on_an_empty_folder(capsys, tiny_model_path, tmp_path):
    (tmp_path / "empty").mkdir()
    line = run_error(capsys, "train", "--data", tmp_path / "empty", "--out", tmp_path / "m.pt", "--max-steps", 1)
    assert "no labels for split 'train'" in line
    line = run_error(capsys, "evaluate", "--data", tmp_path / "empty", "--model", tiny_model_path)
    assert "no labels for split 'test1'" in line
    line = run_error(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "m.pt")
    assert "data not found" in line


def test_evaluate_landmark_count_mismatch(capsys, tiny_model_path, tmp_path):
    rng = np.random.default_rng(0)
    c = np.array([[[50.0, 60.0], [100.0, 120.0]]])
    save_png(tmp_path / "a.png", synthetic_image(c[0], rng, 200))
    write_csv(tmp_path / "test1.csv", ["a.png"], c)
    line = run_error(capsys, "evaluate", "--data", tmp_path, "--model", tiny_model_path)
    assert "model 'unnamed' (3 landmarks) does not match the data (2 landmarks; no landmarks.json" in line


@pytest.mark.parametrize("flag", [["--pretrained"], ["--config", "paper"], ["--fine-target", "annotators"]])
def test_train_refuses_the_flags_of_removed_experiments(capsys, tiny_data, tmp_path, flag):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tiny_data["root"]), "--out", str(tmp_path / "m.pt"), *flag])
    assert e.value.code == 2 and f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_train_option_errors(capsys, tiny_data, tmp_path):
    line = run_error(capsys, "train", "--data", tiny_data["root"], "--out", tmp_path / "m.pt",
                     "--val-fraction", 1.5)
    assert "--val-fraction" in line
    line = run_error(capsys, "train", "--data", tiny_data["root"], "--out", tmp_path / "m.pt", "--resume")
    assert "nothing to resume" in line


def test_cuda_without_gpu(capsys, tiny_data, tiny_model_path, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    line = run_error(capsys, "predict", tiny_data["test1"]["paths"][0], "--model", tiny_model_path,
                     "--out", tmp_path / "p.csv", "--device", "cuda")
    assert "no CUDA GPU" in line


def test_unknown_device(capsys, tiny_data, tiny_model_path, tmp_path):
    line = run_error(capsys, "predict", tiny_data["test1"]["paths"][0], "--model", tiny_model_path,
                     "--out", tmp_path / "p.csv", "--device", "gpu")
    assert "unknown device 'gpu'" in line


def test_resume_honours_a_new_step_limit(capsys, tiny_data, tmp_path):
    # `train --resume --max-steps 4` after a 2-step run trains on to step 4 (the new limit applies)
    out = tmp_path / "m.pt"
    common = ["train", "--data", tiny_data["root"], "--out", out, "--batch-size", 2]
    run_ok(capsys, *common, "--max-steps", 2)
    stdout, _ = run_ok(capsys, *common, "--max-steps", 4, "--resume")
    assert GlimpseModel.load(out, device="cpu").meta["train_steps"] == 4, stdout


def test_finetune(capsys, tiny_data, tiny_model_path, tmp_path):
    out = tmp_path / "ft.pt"
    stdout, _ = run_ok(capsys, "finetune", "--model", tiny_model_path, "--data", tiny_data["root"], "--out", out,
                       "--max-steps", 2, "--batch-size", 2)
    assert "fine-tuned 2 steps" in stdout
    m = GlimpseModel.load(out, device="cpu")
    assert m.meta["train_steps"] == 2 and m.meta["parent"] == str(tiny_model_path)
    assert m.train_config["lr"] == 1e-4
    line = run_error(capsys, "finetune", "--model", tmp_path / "none.pt", "--data", tiny_data["root"],
                     "--out", tmp_path / "x.pt")
    assert "model file not found" in line


# ------------------------------------------------------------------- quantize, --float
def test_quantize_writes_the_graphs_calibrated_on_at_most_limit_images(capsys, tiny_data, tiny_staged_model_path,
                                                                        tmp_path):
    out = tmp_path / "int8.pt"
    paths = tiny_data["test1"]["paths"]
    stdout, _ = run_ok(capsys, "quantize", tiny_staged_model_path, *paths, "--out", out, "--limit", 2)
    assert f"wrote {out}: int8 graphs for 3 of 3 nets, calibrated on 2 image(s)" in stdout
    assert GlimpseModel.load(out, device="cpu").int8_nets == (3, 3)
    assert GlimpseModel.load(tiny_staged_model_path, device="cpu").int8_nets == (0, 3)  # the input is left alone


def test_quantize_only_the_fine_stage_with_float_ends(capsys, monkeypatch, tiny_data, tiny_staged_model_path,
                                                     tmp_path):
    from napari_glimpse import int8

    seen = []
    quantize_net = int8.quantize_net
    monkeypatch.setattr(int8, "quantize_net", lambda *args: seen.append(args[2:]) or quantize_net(*args))
    out = tmp_path / "fine_int8.pt"
    stdout, _ = run_ok(capsys, "quantize", tiny_staged_model_path, *tiny_data["test1"]["paths"][:2], "--out", out,
                       "--only", "fine", "--float-ends")
    assert "int8 graphs for 2 of 3 nets" in stdout
    assert seen == [(True,), (True,)]  # the two fine nets, with float ends
    assert checkpoint_graphs(read_checkpoint(out))["coarse"] == [None]
    assert GlimpseModel.load(out, device="cpu").int8_nets == (2, 3)


def test_finetune_remakes_the_graphs_of_the_stages_that_had_them(capsys, monkeypatch, tiny_data,
                                                                  tiny_staged_model_path, tmp_path):
    """Fine-tuning changes the nets' weights, so their graphs no longer hold; they are made again
    for the stages that ran int8 in the parent (all, or the fine stage only), not for the others,
    with the parent's float ends."""
    from napari_glimpse import int8

    ends = []
    quantize_net = int8.quantize_net
    monkeypatch.setattr(int8, "quantize_net", lambda *args: ends.append(args[2]) or quantize_net(*args))
    for only, nets in ((["--only", "fine", "--float-ends"], (2, 3)), ([], (3, 3))):
        parent = tmp_path / f"parent{len(only)}.pt"
        run_ok(capsys, "quantize", tiny_staged_model_path, *tiny_data["test1"]["paths"][:2], "--out", parent, *only)
        ends.clear()
        out = tmp_path / f"tuned{len(only)}.pt"
        stdout, _ = run_ok(capsys, "finetune", "--model", parent, "--data", tiny_data["root"], "--out", out,
                           "--max-steps", 1, "--batch-size", 2)
        assert f"int8 graphs remade for {nets[0]} nets" in stdout
        assert ends == [bool(only)] * nets[0]  # the parent's float ends kept
        assert GlimpseModel.load(out, device="cpu").int8_nets == nets
        assert GlimpseModel.load(out, device="cpu", int8=False).predict(
            tiny_data["test1"]["paths"][0]).final.shape == (3, 2)


def test_quantize_in_place_keeps_half_weights(capsys, tiny_data, tiny_staged_model_path, tmp_path):
    model = tmp_path / "half.pt"
    GlimpseModel.load(tiny_staged_model_path, device="cpu").save(model, half_weights=True)
    stdout, _ = run_ok(capsys, "quantize", model, tiny_data["test1"]["paths"][0].parent, "--out", model)
    assert "calibrated on 9 image(s)" in stdout  # the folder's 9 images, under the default limit of 10
    assert read_checkpoint(model)["weights_stored_as"] == "float16"
    assert GlimpseModel.load(model, device="cpu").int8_nets == (3, 3)


def test_quantize_without_onnx(capsys, monkeypatch, tiny_data, tiny_staged_model_path, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx fails
    line = run_error(capsys, "quantize", tiny_staged_model_path, tiny_data["test1"]["paths"][0],
                     "--out", tmp_path / "int8.pt")
    assert "napari-glimpse[quantize]" in line
    assert not (tmp_path / "int8.pt").exists()


def test_predict_and_evaluate_float(capsys, monkeypatch, tiny_data, tiny_quantized_model_path, tmp_path):
    runs = []
    call = Int8Net.__call__
    monkeypatch.setattr(Int8Net, "__call__", lambda self, x: runs.append(1) or call(self, x))
    paths = tiny_data["test1"]["paths"]
    out = tmp_path / "float.csv"
    run_ok(capsys, "predict", *paths, "--model", tiny_quantized_model_path, "--out", out, "--float")
    assert not runs  # no int8 graph ran
    names, coords = read_landmarks_csv(out)
    assert names == [p.name for p in paths]
    floats = GlimpseModel.load(tiny_quantized_model_path, device="cpu", int8=False)
    np.testing.assert_allclose(coords, np.stack([floats.predict(p).final for p in paths]), atol=0.006)
    run_ok(capsys, "predict", *paths, "--model", tiny_quantized_model_path, "--out", tmp_path / "int8.csv")
    assert runs  # without --float, they do
    for flag, nets in ((["--float"], [0, 3]), ([], [3, 3])):
        stdout, _ = run_ok(capsys, "evaluate", "--data", tiny_data["root"], "--split", "test1", "--model",
                           tiny_quantized_model_path, "--json", "-", *flag)
        assert json.loads(stdout[stdout.index("{"):])["int8_nets"] == nets
