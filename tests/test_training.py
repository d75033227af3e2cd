"""Training: it learns (tiny end-to-end run), and it is budgeted, cancellable and resumable."""

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_CONFIG, make_kaggle_dataset, save_png, write_csv

from napari_glimpse.checkpoint import read_checkpoint
from napari_glimpse.errors import GlimpseError
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset
from napari_glimpse.metrics import radial_errors
from napari_glimpse.model import ModelConfig
from napari_glimpse.training import (
    TrainConfig,
    evaluate_model,
    learning_rate,
    predict_dataset,
    presets,
    resume_path,
    train,
)

FAST = TrainConfig(batch_size=4, max_steps=6, save_every_s=1e9, seed=0)


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory):
    """12 training and 8 held-out synthetic images, one annotator, spacing 1 mm (errors in px)."""
    root = tmp_path_factory.mktemp("learn")
    make_kaggle_dataset(root, n=12, split="train", seed=10, junior_shift=None)
    make_kaggle_dataset(root, n=8, split="test1", seed=11, junior_shift=None, first_id=100)
    return load_dataset(root, "train", pixel_spacing=1.0), load_dataset(root, "test1", pixel_spacing=1.0), root


@pytest.fixture(scope="module")
def learned(learn_data):
    """The tiny end-to-end run: 200 steps of 16 glimpses (about 10 s on one thread)."""
    train_ds, _, root = learn_data
    cfg = TrainConfig(batch_size=16, max_steps=200, lr=1e-3, near_sigma_px=(2.0, 60.0), save_every_s=1e9, seed=0)
    steps = []
    t = time.monotonic()
    model = train(train_ds, root / "model.pt", TINY_MODEL_CONFIG, cfg, device="cpu", progress=False,
                  callback=lambda info: steps.append(info))
    return model, steps, time.monotonic() - t, root / "model.pt"


@pytest.fixture
def small_ds(tiny_data):
    return load_dataset(tiny_data["root"], "train")


# -------------------------------------------------------------------------------- learning
def test_training_beats_the_mean_start_on_held_out_images(learned, learn_data):
    model, _, seconds, _ = learned
    _, test_ds, _ = learn_data
    # synthetic blobs have no face to tell left from right: read them as they are
    res = evaluate_model(model, test_ds, iterations=3, progress=False, facing="right")
    truth = test_ds.ground_truth()
    baseline = radial_errors(np.repeat(model.mean_start[None], len(test_ds), 0), truth, 1.0)
    mre, base = res["overall"]["mre_mm"], float(baseline.mean())
    assert base > 20  # the landmarks really move around (+-40 px)
    assert mre < 0.5 * base, (mre, base)
    # every landmark improves, not just the easy one
    for k, row in enumerate(res["per_landmark"]):
        assert row["mre_mm"] < 0.6 * baseline[:, k].mean(), (k, row["mre_mm"], baseline[:, k].mean())
    assert res["n_images"] == 8 and res["predictions"].shape == (8, 3, 2)
    np.testing.assert_allclose(res["errors_mm"], radial_errors(res["predictions"], truth, 1.0))
    assert seconds < 120


def test_mean_start_is_the_training_mean(learned, learn_data):
    model, *_ = learned
    train_ds = learn_data[0]
    np.testing.assert_allclose(model.mean_start, train_ds.ground_truth().mean(axis=0))
    np.testing.assert_allclose(model.std_start, train_ds.ground_truth().std(axis=0))


def test_training_writes_model_and_metadata(learned):
    model, steps, _, path = learned
    assert path.exists() and resume_path(path).exists()
    assert resume_path(path).name == "model.pt.resume"
    loaded = GlimpseModel.load(path, device="cpu")
    m = loaded.meta
    assert m["train_steps"] == 200 and m["stopped"] == "budget"
    assert m["train_image_shape"] == [256, 256] and m["n_train_images"] == 12
    assert m["train_images"][0] == "001.png"
    assert m["history"][-1]["step"] == 200
    assert loaded.train_config["max_steps"] == 200 and loaded.train_config["near_sigma_px"] == [2.0, 60.0]
    # one callback per step, the loss went down
    assert [s["step"] for s in steps] == list(range(1, 201))
    assert steps[-1]["progress"] == pytest.approx(1.0)
    assert steps[-1]["loss_mm"] < steps[10]["loss_mm"]
    assert steps[-1]["lr"] < steps[100]["lr"] < 1e-3 + 1e-12


def test_same_seed_same_weights(small_ds, tmp_path):
    a = train(small_ds, tmp_path / "a.pt", TINY_MODEL_CONFIG, FAST, device="cpu", progress=False)
    b = train(small_ds, tmp_path / "b.pt", TINY_MODEL_CONFIG, FAST, device="cpu", progress=False)
    c = train(small_ds, tmp_path / "c.pt", TINY_MODEL_CONFIG, replace(FAST, seed=1), device="cpu", progress=False)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ------------------------------------------------------------------ budget, cancel, resume
def test_should_stop_cancels(small_ds, tmp_path):
    calls = []
    model = train(small_ds, tmp_path / "m.pt", TINY_MODEL_CONFIG, replace(FAST, max_steps=1000), device="cpu",
                  progress=False, callback=calls.append, should_stop=lambda: len(calls) >= 3)
    assert model.meta["train_steps"] == 3 and model.meta["stopped"] == "cancelled"
    assert (tmp_path / "m.pt").exists()  # what was learned so far is kept
    assert GlimpseModel.load(tmp_path / "m.pt", device="cpu").meta["stopped"] == "cancelled"


def test_time_budget_stops_early(small_ds, tmp_path):
    cfg = replace(FAST, max_steps=None)
    t = time.monotonic()
    model = train(small_ds, tmp_path / "m.pt", TINY_MODEL_CONFIG, cfg, device="cpu", time_budget_s=1.0,
                  progress=False)
    took = time.monotonic() - t
    assert model.meta["stopped"] == "budget"
    assert 1 <= model.meta["train_steps"] < 10000
    assert 1.0 <= model.meta["train_wall_s"] < 5.0
    assert took < 15
    # a step limit reached first wins over a long budget
    model = train(small_ds, tmp_path / "n.pt", TINY_MODEL_CONFIG, replace(FAST, max_steps=4), device="cpu",
                  time_budget_s=3600.0, progress=False)
    assert model.meta["train_steps"] == 4


def test_no_limit_at_all_is_an_error(small_ds, tmp_path):
    with pytest.raises(GlimpseError, match="step limit or a time budget"):
        train(small_ds, tmp_path / "m.pt", TINY_MODEL_CONFIG, replace(FAST, max_steps=None), device="cpu",
              progress=False)


def test_resume_continues_the_step_count(small_ds, tmp_path):
    out = tmp_path / "m.pt"
    cfg = replace(FAST, max_steps=10)
    seen = []
    first = train(small_ds, out, TINY_MODEL_CONFIG, cfg, device="cpu", progress=False,
                  callback=lambda i: seen.append(i["step"]), should_stop=lambda: len(seen) >= 4)
    assert first.meta["train_steps"] == 4
    state = read_checkpoint(resume_path(out))["train_state"]
    assert state["step"] == 4
    resumed_steps = []
    second = train(small_ds, out, device="cpu", resume=True, progress=False,
                   callback=lambda i: resumed_steps.append(i["step"]))
    assert resumed_steps == [5, 6, 7, 8, 9, 10]
    assert second.meta["train_steps"] == 10 and second.meta["stopped"] == "budget"
    assert [h["step"] for h in second.meta["history"]] == [4, 10]
    assert second.train_config["max_steps"] == 10
    # resuming from step 4 lands exactly where an uninterrupted run does
    straight = train(small_ds, tmp_path / "s.pt", TINY_MODEL_CONFIG, cfg, device="cpu", progress=False)
    sa, sb = straight.net.state_dict(), second.net.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_resume_without_state_is_an_error(small_ds, tmp_path):
    with pytest.raises(GlimpseError, match="nothing to resume"):
        train(small_ds, tmp_path / "m.pt", device="cpu", resume=True, progress=False)


def test_fine_tune_from_a_model(small_ds, tiny_model, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    model = train(small_ds, tmp_path / "ft.pt", train_config=FAST, device="cpu", init=tiny_model, progress=False,
                  meta={"parent": "tiny"})
    assert model.meta["train_steps"] == 6 and model.meta["parent"] == "tiny"
    after = model.net.state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_tuning_a_float16_model_writes_float16_also_after_a_resume(small_ds, tiny_model, tmp_path):
    from napari_glimpse.checkpoint import read_checkpoint

    tiny_model.save(tmp_path / "half.pt", half_weights=True)
    parent = GlimpseModel.load(tmp_path / "half.pt", device="cpu")
    model = train(small_ds, tmp_path / "ft.pt", train_config=FAST, device="cpu", init=parent, progress=False)
    assert read_checkpoint(tmp_path / "ft.pt").get("weights_stored_as") == "float16"
    w = next(iter(model.net.parameters()))
    assert torch.equal(w, w.half().float())  # rounded in memory as the file holds it
    # a resume point carries the final file's storage: resumed, the run still writes float16
    resumed = train(small_ds, tmp_path / "ft.pt", device="cpu", resume=True, max_steps=8, progress=False)
    assert resumed.half_weights and read_checkpoint(tmp_path / "ft.pt").get("weights_stored_as") == "float16"


# ------------------------------------------------------------------------------ bad data
def test_labels_outside_the_image(tmp_path):
    d = make_kaggle_dataset(tmp_path, n=2, junior_shift=None)
    bad = d["senior"].copy()
    bad[1, 0] = [300.0, 10.0]
    write_csv(tmp_path / "train_senior.csv", d["names"], bad)
    with pytest.raises(GlimpseError, match="002.png: landmark 1 .* outside the 256x256 image"):
        train(load_dataset(tmp_path, "train"), tmp_path / "m.pt", TINY_MODEL_CONFIG, FAST, device="cpu",
              progress=False)


def test_image_smaller_than_a_glimpse(tmp_path):
    save_png(tmp_path / "small.png", np.zeros((40, 40), np.uint8))
    write_csv(tmp_path / "train.csv", ["small.png"], np.array([[[5.0, 5.0], [10, 10], [20, 20]]]))
    with pytest.raises(GlimpseError, match="smaller than one 64x64 glimpse"):
        train(load_dataset(tmp_path, "train"), tmp_path / "m.pt", TINY_MODEL_CONFIG, FAST, device="cpu",
              progress=False)


def test_model_config_follows_the_data(small_ds, tmp_path):
    # n_landmarks in the config is replaced by the data's
    cfg = replace(TINY_MODEL_CONFIG, n_landmarks=19)
    model = train(small_ds, tmp_path / "m.pt", cfg, replace(FAST, max_steps=1), device="cpu", progress=False)
    assert model.config.n_landmarks == 3 and model.mean_start.shape == (3, 2)


# ------------------------------------------------------------------- schedule and presets
def test_cosine_schedule():
    cfg = TrainConfig(lr=1e-3, warmup=0.1)
    assert learning_rate(cfg, 0.0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 0.05) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert learning_rate(cfg, 0.1) == pytest.approx(1e-3)
    assert learning_rate(cfg, 0.55) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert learning_rate(cfg, 1.0) == pytest.approx(1e-5)
    assert learning_rate(cfg, 2.0) == pytest.approx(1e-5)  # clamped


def test_paper_schedule():
    cfg = TrainConfig(lr=1e-4, schedule="paper")
    assert learning_rate(cfg, 0.0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 0.49) == pytest.approx(1e-4)
    assert learning_rate(cfg, 0.5) == pytest.approx(1e-5)


def test_presets():
    m, t = presets("compact", 150, 19)
    assert m == ModelConfig(n_landmarks=19) and m.trunk == "compact" and t == TrainConfig()
    m, t = presets("paper", 150, 19)
    assert m.trunk == "paper" and m.mode == "per_landmark"
    assert t.batch_size == 1 and t.lr == 1e-4 and t.schedule == "paper" and t.train_iterations == 10
    assert t.max_steps == 40 * 150 * 19
    with pytest.raises(GlimpseError, match="unknown config"):
        presets("huge")


def test_train_config_round_trip():
    cfg = TrainConfig(batch_size=3, near_sigma_px=(1.0, 9.0), max_steps=None)
    d = cfg.to_dict()
    assert d["near_sigma_px"] == [1.0, 9.0]
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict({**d, "future_option": 3}) == cfg


def test_predict_dataset_shapes(tiny_model, tiny_data):
    ds = load_dataset(tiny_data["root"], "test1")
    preds, unc = predict_dataset(tiny_model, ds, iterations=2, progress=False)
    assert preds.shape == (3, 3, 2) and unc.shape == (3, 3)
    assert np.all(unc >= 0)
    assert math.isfinite(float(preds.sum()))
