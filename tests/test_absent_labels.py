"""Absent landmarks (both cells of a landmark empty in a label CSV, as Export reviewed writes a
landmark marked absent): read as NaN, left out of every training loss, of fine-tuning's offsets
and of the metrics. Tiny synthetic data (tests/conftest.py)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_CONFIG, TINY_TRAIN_CONFIG, make_kaggle_dataset, save_png, synthetic_image

from napari_glimpse.coarse import CoarseConfig, train_coarse
from napari_glimpse.corrections import CorrectionLog
from napari_glimpse.errors import GlimpseError
from napari_glimpse.fine import FineConfig, present_pairs, train_fine
from napari_glimpse.finetune import FinetuneConfig, finetune, learn_offsets
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import Dataset, load_dataset, present, read_image, read_landmarks_csv
from napari_glimpse.metrics import format_table, radial_errors, summarize
from napari_glimpse.model import GlimpseModelNet
from napari_glimpse.training import TrainingData, evaluate_model, start_statistics, train, train_step

HEADER = "image_path,1_x,1_y,2_x,2_y,3_x,3_y"
ABSENT = [(0, 1), (2, 0), (4, 2)]  # (image, landmark) pairs marked absent in absent_set
QUICK = FinetuneConfig(coarse_steps=2, fine_steps=2, glimpse_steps=2, time_budget_s=None)


def _write(path, names, coords):
    """A Kaggle-layout CSV with empty cells where ``coords`` is NaN."""
    rows = [HEADER] + [",".join([n] + ["" if math.isnan(v) else f"{v:g}" for v in c.reshape(-1)])
                       for n, c in zip(names, coords)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _finite(*nets) -> bool:
    return all(torch.isfinite(v).all() for net in nets for v in net.state_dict().values() if v.is_floating_point())


@pytest.fixture(scope="module")
def absent_set(tmp_path_factory):
    """Six synthetic images; landmark ``k`` of image ``i`` absent (empty cells) for each of :data:`ABSENT`."""
    d = make_kaggle_dataset(tmp_path_factory.mktemp("absent"), n=6, seed=4, junior_shift=None)
    coords = d["senior"].copy()
    for i, k in ABSENT:
        coords[i, k] = np.nan
    return {**d, "csv": _write(d["root"] / "train_senior.csv", d["names"], coords), "coords": coords}


# ------------------------------------------------------------------------------- reading
def test_a_pair_of_empty_cells_reads_as_absent(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text(f"{HEADER}\na.png,1,2,,,5,6\nb.png, , ,3,4,5,6\n")
    names, coords = read_landmarks_csv(p)
    assert names == ["a.png", "b.png"]
    assert np.isnan(coords[0, 1]).all() and np.isnan(coords[1, 0]).all()
    np.testing.assert_array_equal(present(coords), [[True, False, True], [False, True, True]])
    np.testing.assert_array_equal(coords[0, [0, 2]], [[1, 2], [5, 6]])
    p.write_text(f"{HEADER.replace(',', ';')}\na.png;1;2;;;5;6\n")  # other separators too
    assert np.isnan(read_landmarks_csv(p)[1][0, 1]).all()


@pytest.mark.parametrize("cells, column", [(",4", "2_x"), ("3,", "2_y")])
def test_one_empty_cell_of_a_pair_is_an_error(tmp_path, cells, column):
    p = tmp_path / "l.csv"
    p.write_text(f"{HEADER}\na.png,1,2,3,4,5,6\nb.png,1,2,{cells},5,6\n")
    with pytest.raises(GlimpseError, match=rf"l\.csv:3: non-numeric value '' \(image b\.png, column {column}; "
                                           r"an absent landmark leaves both its cells empty"):
        read_landmarks_csv(p)


@pytest.mark.parametrize("cells, message", [
    ("nan,4", "image b.png, column 2_x: 'nan' is not a finite number"),
    ("nan,", "image b.png, column 2_x: 'nan' is not a finite number"),
    (",inf", "image b.png, column 2_y: 'inf' is not a finite number"),
    ("nan,nan", "image b.png, column 2_x: 'nan' is not a finite number"),
    ("x,", "non-numeric value 'x' (image b.png, column 2_x)"),
])
def test_written_out_nan_or_text_is_still_an_error(tmp_path, cells, message):
    p = tmp_path / "l.csv"
    p.write_text(f"{HEADER}\nb.png,1,2,{cells},5,6\n")
    with pytest.raises(GlimpseError) as ei:
        read_landmarks_csv(p)
    assert "l.csv:2: " in str(ei.value) and message in str(ei.value)


def test_a_row_with_every_landmark_absent_is_an_error(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text(f"{HEADER}\na.png,1,2,3,4,5,6\nb.png,,,,,,\n")
    with pytest.raises(GlimpseError, match=r"l\.csv:3: image b\.png has every landmark absent"):
        read_landmarks_csv(p)


def test_load_dataset_and_checks_skip_absent_landmarks(absent_set, tmp_path):
    ds = load_dataset(absent_set["root"], "train")
    np.testing.assert_array_equal(ds.ground_truth(), absent_set["coords"])
    for i in range(len(ds)):
        ds.check_inside(i, (256, 256))  # absent landmarks are neither outside nor "not finite"
    bad = Dataset([tmp_path / "a.png"], {"labels": np.array([[[np.nan, np.nan], [300.0, 3.0]]])}, ("L1", "L2"))
    with pytest.raises(GlimpseError, match=r"landmark 2 \(labels\) at \(300, 3\) is outside the 256x256 image"):
        bad.check_inside(0, (256, 256))
    two = Dataset([tmp_path / "a.png"], {"s": np.array([[[np.nan, np.nan], [2.0, 2.0]]]),
                                         "j": np.array([[[4.0, 6.0], [np.nan, np.nan]]])}, ("L1", "L2"))
    np.testing.assert_array_equal(two.ground_truth(), [[[4.0, 6.0], [2.0, 2.0]]])  # over those who placed it


def test_mark_absent_export_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    coords = np.array([[[80.0, 80.0], [170.0, 90.0], [128.0, 180.0]]] * 2)
    names = ["a.png", "b.png"]
    for n, c in zip(names, coords):
        save_png(tmp_path / n, synthetic_image(c, rng))
    log = CorrectionLog(tmp_path, ("A", "B", "C"))
    for n, c in zip(names, coords):
        log.propose(n, c, "tiny.pt")
    log.mark_absent("b.png", 2)
    for n in names:
        log.accept(n)
    ds = load_dataset(log.export_training_csv())
    truth = ds.ground_truth()
    assert np.isnan(truth[1, 2]).all()
    np.testing.assert_allclose(truth[0], coords[0])
    np.testing.assert_allclose(truth[1, :2], coords[1, :2])


# ------------------------------------------------------------------------ losses are masked
def test_present_pairs_never_draws_an_absent_pair():
    ok = torch.ones(4, 3, dtype=torch.bool)
    i, j = torch.randint(0, 4, (200,)), torch.randint(0, 3, (200,))
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    same = present_pairs(i, j, ok, gen)
    assert same[0] is i and same[1] is j and torch.equal(gen.get_state(), state)  # all present: as drawn
    ok[0, 1] = ok[3, 0] = False
    i2, j2 = present_pairs(i, j, ok, gen)
    assert ok[i2, j2].all() and ((i2 == i) & (j2 == j)).sum() == ok[i, j].sum()
    with pytest.raises(GlimpseError, match="every landmark of the training set is absent"):
        present_pairs(i, j, torch.zeros(4, 3, dtype=torch.bool), gen)


def _labels(n: int = 4, k: int = 3, seed: int = 0):
    """``(n, k, 2)`` normalised positions, the same with NaN where absent, and the present mask."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(n, k, 2, generator=g) * 1.4 - 0.7
    ok = torch.ones(n, k, dtype=torch.bool)
    ok[0, 1] = ok[2, 0] = ok[3, 2] = False
    return truth, torch.where(ok[..., None], truth, torch.nan), ok


def _run(fn, *args, **kw):
    losses = []
    net, _ = fn(*args, progress=False, max_steps=3, callback=lambda info: losses.append(info["loss"]), **kw)
    return losses, net


def test_the_coarse_loss_is_unchanged_whatever_an_absent_label_holds():
    truth, nan, ok = _labels()
    levels = torch.rand(4, 1, 64, 48, generator=torch.Generator().manual_seed(1)) * 255
    cfg = CoarseConfig(n_landmarks=3, input_hw=(32, 24), width=4, batch_size=4, flip=0.5, rotation_deg=20.0, seed=1)
    a_loss, a = _run(train_coarse, levels, (64, 48), nan, cfg, 1e9)  # absent: read off the NaN
    b_loss, b = _run(train_coarse, levels, (64, 48), truth, cfg, 1e9, present=ok)  # any value, with the mask
    assert a_loss == b_loss and all(map(math.isfinite, a_loss)) and _finite(a)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c_loss, _ = _run(train_coarse, levels, (64, 48), truth, cfg, 1e9)  # taught when present
    assert c_loss != a_loss


def test_the_fine_loss_is_unchanged_whatever_an_absent_label_holds():
    truth, nan, ok = _labels(seed=2)
    levels = [torch.rand(4, 1, 64, 48, generator=torch.Generator().manual_seed(1)) * 255,
              torch.rand(4, 1, 32, 24, generator=torch.Generator().manual_seed(2)) * 255]
    cfg = FineConfig(n_landmarks=3, patch=16, width=4, batch_size=8, context=2, jitter_mm=(0.5, 2.0), seed=2)
    a_loss, a = _run(train_fine, levels, nan, cfg, 1e9)  # absent: read off the NaN
    b_loss, b = _run(train_fine, levels, truth, cfg, 1e9, present=ok)  # any value, with the mask
    assert a_loss == b_loss and all(map(math.isfinite, a_loss)) and _finite(a)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c_loss, _ = _run(train_fine, levels, truth, cfg, 1e9)  # taught when present
    assert c_loss != a_loss


def test_the_glimpse_loss_is_unchanged_whatever_an_absent_label_holds(absent_set):
    ds = load_dataset(absent_set["root"], "train")
    data = TrainingData(ds, TINY_MODEL_CONFIG.n_levels, TINY_MODEL_CONFIG.patch)
    assert (~data.present).sum() == len(ABSENT)
    mean, std = (torch.as_tensor(v, dtype=torch.float32)
                 for v in start_statistics(data.truth.numpy().astype(np.float64), ds.landmark_names))
    shapes = torch.as_tensor(data.shapes, dtype=torch.float32)
    tcfg = replace(TINY_TRAIN_CONFIG, batch_size=32)
    torch.manual_seed(0)
    net0 = GlimpseModelNet(TINY_MODEL_CONFIG)

    def step(truth, ok):
        net = copy.deepcopy(net0)
        loss = train_step(net, torch.optim.Adam(net.parameters(), 1e-3), TINY_MODEL_CONFIG, tcfg, data.stack, truth,
                          shapes, mean, std, torch.Generator().manual_seed(0), ok)
        return loss, net

    a_loss, a = step(data.truth, data.present)
    b_loss, b = step(torch.where(data.present[..., None], data.truth, 77.0), data.present)
    assert a_loss == b_loss and math.isfinite(a_loss) and _finite(a)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert math.isnan(step(data.truth, None)[0])  # unmasked, a drawn absent label would make it NaN


# --------------------------------------------------------------- training, fine-tuning, metrics
def test_train_with_absent_landmarks_gives_finite_weights_and_answers(absent_set, tmp_path):
    ds = load_dataset(absent_set["root"], "train")
    coarse = CoarseConfig(n_landmarks=3, input_hw=(64, 48), width=4, batch_size=4)
    fine = FineConfig(n_landmarks=3, patch=32, width=4, batch_size=8, context=2, jitter_mm=(0.5, 2.0))
    model = train(ds, tmp_path / "m.pt", TINY_MODEL_CONFIG, replace(TINY_TRAIN_CONFIG, max_steps=3), device="cpu",
                  progress=False, coarse_steps=2, coarse_config=coarse, fine_steps=2, fine_config=fine)
    assert np.isfinite(model.mean_start).all() and np.isfinite(model.std_start).all()
    assert _finite(model.net, model.coarse, model.fine)
    loaded = GlimpseModel.load(tmp_path / "m.pt", device="cpu")
    assert np.isfinite(loaded.predict(read_image(absent_set["paths"][0]), iterations=1).final).all()
    res = evaluate_model(loaded, ds, iterations=1, progress=False)
    n_points = 6 * 3 - len(ABSENT)
    assert res["overall"]["n"] == n_points and res["overall"]["n_absent"] == len(ABSENT)
    assert math.isfinite(res["overall"]["mre_mm"]) and np.isnan(res["errors_mm"]).sum() == len(ABSENT)
    assert [r["n"] for r in res["per_landmark"]] == [5, 5, 5]
    assert f"({n_points} points; {len(ABSENT)} absent" in format_table(res)


def test_a_landmark_absent_on_every_training_image_cannot_be_learned_anew():
    truth = np.array([[[1.0, 2.0], [np.nan, np.nan]], [[3.0, 4.0], [np.nan, np.nan]]])
    with pytest.raises(GlimpseError, match=r"landmark 2 \(B\) is absent on every training image"):
        start_statistics(truth, ("A", "B"))
    mean, std = start_statistics(np.array([[[1.0, 2.0], [5.0, 5.0]], [[3.0, 4.0], [np.nan, np.nan]]]), ("A", "B"))
    np.testing.assert_array_equal(mean, [[2.0, 3.0], [5.0, 5.0]])
    np.testing.assert_array_equal(std, [[1.0, 1.0], [0.0, 0.0]])


def test_offsets_are_the_mean_residual_over_the_images_where_the_landmark_is_present():
    preds = np.zeros((3, 2, 2))
    truth = np.array([[[2.0, 0.0], [np.nan, np.nan]], [[4.0, 0.0], [1.0, 1.0]], [[np.nan, np.nan], [3.0, 3.0]]])
    left = np.array([False, False, True])
    off = learn_offsets(preds, truth, left, prior=0.0)
    np.testing.assert_allclose(off, [[3.0, 0.0], [-1.0, 2.0]])  # image 3 is read mirrored: its x residual is -3
    np.testing.assert_allclose(learn_offsets(preds, truth, left, prior=1.0), [[2.0, 0.0], [-2 / 3, 4 / 3]])
    never = truth.copy()
    never[:, 1] = np.nan
    assert np.isfinite(learn_offsets(preds, never, left, prior=0.0)).all()


@pytest.mark.parametrize("which", ["staged", "glimpse"])
def test_finetune_with_absent_landmarks_gives_finite_weights_and_answers(absent_set, tiny_model,
                                                                         tiny_staged_model_path, tmp_path, which):
    parent = GlimpseModel.load(tiny_staged_model_path, device="cpu") if which == "staged" else tiny_model
    ds = load_dataset(absent_set["root"], "train")
    model = finetune(parent, ds, tmp_path / "ft.pt", QUICK)
    nets = [model.net] + ([model.coarse, model.fine] if which == "staged" else [])
    assert _finite(*nets)
    if which == "staged":
        assert np.isfinite(model.meta["landmark_offsets_px"]).all()
        assert model.meta["finetuned"]["stages"] == ["offsets", "coarse", "fine"]
    else:
        assert model.meta["finetuned"]["stages"] == ["glimpse"]
    again = GlimpseModel.load(tmp_path / "ft.pt", device="cpu")
    assert np.isfinite(again.predict(read_image(absent_set["paths"][2])).final).all()


def test_metrics_leave_absent_ground_truth_out():
    truth = np.array([[[0.0, 0.0], [np.nan, np.nan]], [[0.0, 0.0], [np.nan, np.nan]], [[0.0, 0.0], [0.0, 0.0]]])
    pred = np.array([[[10.0, 0.0], [5.0, 5.0]], [[30.0, 0.0], [1.0, 1.0]], [[0.0, 40.0], [0.0, 50.0]]])
    err = radial_errors(pred, truth, 0.1)
    assert np.isnan(err[:2, 1]).all()
    s = summarize(err, ["A", "B"])
    assert s["overall"]["n"] == 4 and s["overall"]["n_absent"] == 2
    assert s["overall"]["mre_mm"] == pytest.approx((1 + 3 + 4 + 5) / 4)
    assert s["overall"]["sdr"]["2"] == 25.0 and s["overall"]["sdr"]["4"] == 75.0
    assert s["per_landmark"][1]["n"] == 1 and s["per_landmark"][1]["mre_mm"] == pytest.approx(5.0)
    none = summarize(np.array([[1.0, np.nan]]), ["A", "B"])
    assert none["per_landmark"][1]["mre_mm"] is None and none["per_landmark"][1]["n_absent"] == 1
    table = format_table(none)
    assert any(ln.split()[:3] == ["2", "B", "-"] for ln in table.splitlines())
    assert "(1 points; 1 absent in the ground truth, not counted)" in table
    assert "absent" not in format_table(summarize(np.array([[1.0, 2.0]])))  # no note when none is absent


def test_the_napari_reader_shows_no_point_for_an_absent_landmark(tmp_path):
    from napari_glimpse._reader import read_landmarks

    p = tmp_path / "l.csv"
    p.write_text(f"{HEADER}\na.png,1,2,,,5,6\nb.png,1,2,3,4,5,6\n")
    data, kwargs, kind = read_landmarks(str(p))[0]
    assert kind == "points" and data.shape == (5, 3) and np.isfinite(data).all()
    assert list(kwargs["features"]["index"]) == [1, 3, 1, 2, 3]
    assert list(kwargs["features"]["image"]) == ["a.png", "a.png", "b.png", "b.png", "b.png"]


def test_evaluate_compares_measurement_classes_on_the_images_with_every_landmark(tmp_path, capsys):
    from napari_glimpse.cli import _classification

    rng = np.random.default_rng(0)
    truth = rng.uniform(200, 1800, (3, 19, 2))
    truth[1, 4] = np.nan
    ds = Dataset([tmp_path / f"{i}.png" for i in range(3)], {"labels": truth})
    out = _classification(np.nan_to_num(truth, nan=500.0), ds, "mean")
    assert out["images_left_out"] == 1 and out["model"]["average"]["accuracy"] == 1.0
    assert "(1 image(s) with an absent landmark left out)" in capsys.readouterr().out
    ds.annotations["labels"][:, 4] = np.nan
    assert "model" not in _classification(truth, ds, "mean")
