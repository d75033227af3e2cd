"""benchmarks/isbi.py: the evaluate path that makes the shipped default (coarse ensemble, the
inference choice on the validation split within a speed bound, --save-as). Real ISBI data only;
random tiny networks, so this checks the bookkeeping, not accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_DATA, load_benchmark

from napari_glimpse.coarse import CoarseConfig, CoarseEnsemble, CoarseNet
from napari_glimpse.fine import FineEnsemble
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset
from napari_glimpse.model import GlimpseModelNet, ModelConfig

pytestmark = pytest.mark.skipif(not REAL_DATA.exists(), reason=f"ISBI data not at {REAL_DATA}")



@pytest.fixture(scope="module")
def isbi():
    return load_benchmark("isbi")


def _random_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    ds = load_dataset(REAL_DATA, "train").subset(range(10))
    truth = ds.ground_truth()
    net = GlimpseModelNet(ModelConfig(n_landmarks=19, n_levels=3, width=8, hidden=(64, 32))).eval()
    coarse = CoarseNet(CoarseConfig(n_landmarks=19, input_hw=(64, 48), width=4, seed=seed)).eval()
    GlimpseModel(net, ds.landmark_names, 0.1, truth.mean(0), truth.std(0), coarse=coarse).save(path)
    return path


def _run(isbi, tmp_path: Path, *extra: str) -> dict:
    a, b = _random_model(tmp_path / "a.pt", 1), _random_model(tmp_path / "b.pt", 2)
    out = tmp_path / "r.json"
    rc = isbi.main(["--method", "glimpse", "--data", str(REAL_DATA), "--evaluate", str(a), "--add-coarse", str(b),
                    "--limit", "3", "--threads", "1", "--speed-threads", "1", "--quiet", "--out", str(out),
                    "--save-as", str(tmp_path / "ens.pt"), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_ensemble_choice_and_saved_model(isbi, tmp_path):
    r = _run(isbi, tmp_path, "--max-seconds", "0")
    assert r["coarse_members"] == [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    # the grid: coarse nets (both, first, second) x iterations 0-3 x flip averaging x blend
    # (blend only with iterations); no fine stage, so no fine steps
    assert len(r["val_mre"]) == 3 * 2 * (1 + 3 * 3)
    assert {tuple(v["coarse_nets"]) for v in r["val_mre"]} == {(0, 1), (0,), (1,)}
    best = min(r["val_mre"], key=lambda v: v["mre_mm"])
    assert (r["iterations"], r["coarse_flip_average"], r["coarse_blend"], r["coarse_nets"]) == (
        best["iterations"], best["coarse_flip_average"], best["coarse_blend"], best["coarse_nets"])
    assert len(r["speed_checks"]) == 1  # no bound: the first (most accurate) choice is taken
    saved = GlimpseModel.load(tmp_path / "ens.pt", "cpu")
    if len(r["coarse_nets"]) == 2:
        assert isinstance(saved.coarse, CoarseEnsemble) and len(saved.coarse.members) == 2
    else:  # the chosen net alone is saved
        assert isinstance(saved.coarse, CoarseNet)
        src = GlimpseModel.load(tmp_path / ("a.pt" if r["coarse_nets"] == [0] else "b.pt"), "cpu").coarse
        assert all(torch.equal(v, saved.coarse.state_dict()[k]) for k, v in src.state_dict().items())
    assert saved.meta["iterations"] == r["iterations"] == saved.default_iterations
    assert saved.meta["coarse_flip_average"] == r["coarse_flip_average"]
    assert saved.meta["coarse_blend"] == r["coarse_blend"]
    n_test = r["protocol"]["n_test"]
    assert np.asarray(r["test_predictions"]).shape == (n_test, 19, 2)
    assert r["test"]["overall"]["n"] == n_test * 19 and "overall" in r["test_mirrored"]
    assert r["seconds_per_image"] > 0


def test_speed_bound_that_nothing_meets_keeps_the_most_accurate_and_says_so(isbi, tmp_path):
    r = _run(isbi, tmp_path, "--max-seconds", "1e-6", "--no-glimpse")
    assert r["speed_bound_met"] is False
    assert len(r["val_mre"]) == 3 * 2 and all(v["iterations"] == 0 for v in r["val_mre"])
    assert len(r["speed_checks"]) == len(r["val_mre"])  # every choice was timed
    best = min(r["val_mre"], key=lambda v: v["mre_mm"])
    assert r["coarse_flip_average"] == best["coarse_flip_average"] and r["coarse_nets"] == best["coarse_nets"]


def test_fine_stage_is_trained_for_a_model_then_added_with_its_time(isbi, tmp_path):
    """--fine-for trains a fine stage after a model's coarse stage; --add-fine/--fine-json put it
    into an evaluated model, its training time added to the coarse runs' (it came after them)."""
    a = _random_model(tmp_path / "a.pt", 1)
    common = ["--method", "glimpse", "--data", str(REAL_DATA), "--limit", "3", "--threads", "1",
              "--speed-threads", "1", "--quiet", "--no-glimpse", "--max-seconds", "0"]
    assert isbi.main([*common, "--fine-for", str(a), "--budget-min", "0.05", "--eval-every", "0.02",
                      "--fine-patch", "32", "--fine-width", "4", "--fine-level", "1", "--fine-context", "2",
                      "--model-out", str(tmp_path / "f.pt"), "--out", str(tmp_path / "f.json")]) == 0
    f = json.loads((tmp_path / "f.json").read_text())
    assert f["config"]["fine"]["patch"] == 32 and f["config"]["coarse_from"] == str(a)
    assert f["train"]["fine_steps"] >= 1 and 2.0 < f["train"]["wall_s"] < 30
    assert all("val_mre_mm" in c for c in f["curve"])
    # the choice covers fine steps 0-2 (x flip averaging; one coarse net)
    assert sorted({v["fine_steps"] for v in f["val_mre"]}) == [0, 1, 2] and len(f["val_mre"]) == 6
    fine_model = GlimpseModel.load(tmp_path / "f.pt", "cpu")
    assert fine_model.fine is not None and fine_model.fine.cfg.patch == 32 and fine_model.fine.cfg.context == 2
    coarse_json = tmp_path / "c.json"
    coarse_json.write_text(json.dumps({"train": {"wall_s": 100.0, "cpu_s": 150.0}, "budget_min": 2, "threads": 1,
                                       "seed": 0}))
    out = tmp_path / "r.json"
    assert isbi.main([*common, "--evaluate", str(a), "--add-fine", str(tmp_path / "f.pt"), "--train-json",
                      str(coarse_json), "--fine-json", str(tmp_path / "f.json"), "--out", str(out),
                      "--save-as", str(tmp_path / "s.pt")]) == 0
    r = json.loads(out.read_text())
    assert r["train"]["wall_s"] == pytest.approx(100.0 + f["train"]["wall_s"])
    assert r["train"]["cpu_s"] == pytest.approx(150.0 + f["train"]["cpu_s"])
    assert r["fine_from"] == [str(tmp_path / "f.pt")] and r["fine_config"][0]["fine"]["patch"] == 32
    saved = GlimpseModel.load(tmp_path / "s.pt", "cpu")
    assert saved.fine is not None and saved.meta["fine_steps"] == r["fine_steps"] == saved.fine_steps

    # a second fine net, trained only (--train-only: no choice, Test1 not read), then both: a fine
    # ensemble whose nets are a choice too (both, or either), and whose training times add up
    assert isbi.main([*common, "--fine-for", str(a), "--budget-min", "0.03", "--seed", "1", "--train-only",
                      "--fine-patch", "32", "--fine-width", "4", "--fine-level", "1", "--fine-context", "2",
                      "--model-out", str(tmp_path / "g.pt"), "--out", str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert "test" not in g and "val_mre" not in g and g["config"]["fine"]["seed"] == 1
    out2 = tmp_path / "r2.json"
    assert isbi.main([*common, "--evaluate", str(a), "--add-fine", str(tmp_path / "f.pt"), str(tmp_path / "g.pt"),
                      "--train-json", str(coarse_json),
                      "--fine-json", str(tmp_path / "f.json"), str(tmp_path / "g.json"),
                      "--out", str(out2), "--save-as", str(tmp_path / "s2.pt")]) == 0
    r2 = json.loads(out2.read_text())
    assert r2["train"]["wall_s"] == pytest.approx(100.0 + f["train"]["wall_s"] + g["train"]["wall_s"])
    assert {tuple(v["fine_nets"]) for v in r2["val_mre"] if v["fine_steps"]} == {(0, 1), (0,), (1,)}
    best = min(r2["val_mre"], key=lambda v: v["mre_mm"])
    assert (r2["fine_steps"], r2["fine_nets"]) == (best["fine_steps"], best["fine_nets"])
    saved2 = GlimpseModel.load(tmp_path / "s2.pt", "cpu")
    if r2["fine_steps"] and len(r2["fine_nets"]) == 2:
        assert isinstance(saved2.fine, FineEnsemble)
    elif r2["fine_steps"]:
        src = GlimpseModel.load(tmp_path / ("f.pt" if r2["fine_nets"] == [0] else "g.pt"), "cpu").fine
        assert all(torch.equal(v, saved2.fine.state_dict()[k]) for k, v in src.state_dict().items())


def test_refit_on_all_of_train_keeps_the_choice_made_on_validation(isbi, tmp_path):
    """--train-all refits a recipe on Train 001-150 with capped steps (no validation split, so no
    curve and no choice); --evaluate --coarse-from --add-fine --keep-choice puts the refit stages
    into the model whose choice was made on validation, keeping its glimpse net and choice."""
    base = _random_model(tmp_path / "base.pt", 3)
    m = GlimpseModel.load(base, "cpu")
    m.meta.update({"iterations": 0, "coarse_flip_average": True, "coarse_blend": 0.0, "fine_steps": 1})
    m.save(base)
    common = ["--method", "glimpse", "--data", str(REAL_DATA), "--limit", "3", "--threads", "1",
              "--speed-threads", "1", "--quiet", "--budget-min", "5"]
    with pytest.raises(SystemExit):  # nothing to choose on: refuses rather than choose on training images
        isbi.main([*common, "--train-all", "--coarse-fraction", "1", "--out", str(tmp_path / "x.json")])
    assert isbi.main([*common, "--train-all", "--train-only", "--coarse-fraction", "1", "--coarse-steps", "2",
                      "--coarse-width", "4", "--levels", "3",
                      "--model-out", str(tmp_path / "c.pt"), "--out", str(tmp_path / "c.json")]) == 0
    assert isbi.main([*common, "--train-all", "--train-only", "--fine-for", str(base), "--fine-steps", "2",
                      "--seed", "1", "--fine-patch", "32", "--fine-width", "4", "--fine-context", "2",
                      "--model-out", str(tmp_path / "f.pt"), "--out", str(tmp_path / "f.json")]) == 0
    c, f = (json.loads((tmp_path / n).read_text()) for n in ("c.json", "f.json"))
    assert c["protocol"]["val"] is None and f["protocol"]["val"] is None
    assert "test" not in c and "test" not in f and "val_mre" not in c
    assert [h["step"] for h in c["curve"] if h.get("stage") == "coarse"][-1] == 2 and f["train"]["fine_steps"] == 2
    assert not any("val_mre_mm" in h for h in c["curve"] + f["curve"])  # no validation to read
    assert c["train"]["wall_s"] < 5 * 60  # the step cap ended them, not the 5-minute budget
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"train": {"wall_s": 100.0, "cpu_s": 90.0}}))
    out = tmp_path / "r.json"
    assert isbi.main([*common, "--evaluate", str(base), "--coarse-from", str(tmp_path / "c.pt"), "--add-fine",
                      str(tmp_path / "f.pt"), "--keep-choice", "--train-json", str(tmp_path / "c.json"),
                      str(tmp_path / "f.json"), "--glimpse-json", str(g), "--out", str(out),
                      "--save-as", str(tmp_path / "s.pt")]) == 0
    r = json.loads(out.read_text())
    assert r["choice_kept"] and "val_mre" not in r and "speed_checks" not in r
    assert (r["iterations"], r["coarse_flip_average"], r["fine_steps"]) == (0, True, 1)
    # the two refit runs side by side (wall: the longer), after the glimpse net's run
    assert r["train"]["wall_s"] == pytest.approx(max(c["train"]["wall_s"], f["train"]["wall_s"]) + 100.0)
    assert r["train"]["cpu_s"] == pytest.approx(c["train"]["cpu_s"] + f["train"]["cpu_s"] + 90.0)
    saved = GlimpseModel.load(tmp_path / "s.pt", "cpu")
    refit_c = GlimpseModel.load(tmp_path / "c.pt", "cpu").coarse
    refit_f = GlimpseModel.load(tmp_path / "f.pt", "cpu").fine
    assert all(torch.equal(v, saved.coarse.state_dict()[k]) for k, v in refit_c.state_dict().items())
    assert all(torch.equal(v, saved.fine.state_dict()[k]) for k, v in refit_f.state_dict().items())
    assert all(torch.equal(v, saved.net.state_dict()[k]) for k, v in m.net.state_dict().items())  # glimpse net kept
    assert saved.meta["coarse_flip_average"] is True and saved.fine_steps == 1
    assert saved.meta["coarse_n_train_images"] == [3] and saved.meta["fine_n_train_images"] == [3]


def test_fine_weight_averages_and_the_decode_window_chosen_on_validation(isbi, tmp_path):
    """--fine-averages writes each average beside the net with its validation MRE; --keep-choice
    --fine-decode-windows chooses the decode window on validation, --no-test leaves Test1 unread;
    with --train-all there is no validation to choose the window on."""
    base = _random_model(tmp_path / "base.pt", 3)
    m = GlimpseModel.load(base, "cpu")
    m.meta.update({"iterations": 0, "coarse_flip_average": False, "fine_steps": 1})
    m.save(base)
    common = ["--method", "glimpse", "--data", str(REAL_DATA), "--limit", "3", "--threads", "1",
              "--speed-threads", "1", "--quiet", "--budget-min", "5"]
    fine = ["--fine-for", str(base), "--fine-steps", "3", "--fine-patch", "32", "--fine-width", "4",
            "--fine-context", "2", "--train-only"]
    assert isbi.main([*common, *fine, "--fine-averages", "0.9", "0.99", "--fine-rotation", "15",
                      "--fine-log-scale", "0.15", "--fine-sigma", "2.5", "--fine-coord-weight", "0.5",
                      "--fine-erase", "0.25", "--model-out", str(tmp_path / "f.pt"),
                      "--out", str(tmp_path / "f.json")]) == 0
    f = json.loads((tmp_path / "f.json").read_text())
    assert [a["decay"] for a in f["averages"]] == [0.9, 0.99] and f["config"]["fine_averages"] == [0.9, 0.99]
    assert all(a["val_mre_mm"] > 0 for a in f["averages"])
    raw = GlimpseModel.load(tmp_path / "f.pt", "cpu")
    avg = GlimpseModel.load(tmp_path / "f_avg0.9.pt", "cpu")
    assert avg.meta["fine_average_decay"] == 0.9 and "fine_average_decay" not in raw.meta
    assert (raw.fine.cfg.rotation_deg, raw.fine.cfg.log_scale) == (15.0, 0.15)  # the augmentation asked for
    assert raw.fine.cfg.sigma == avg.fine.cfg.sigma == 2.5 == f["config"]["fine"]["sigma"]  # and the target's width
    assert (avg.fine.cfg.coord_weight, avg.fine.cfg.erase) == (0.5, 0.25) == (f["config"]["fine"]["coord_weight"],
                                                                            f["config"]["fine"]["erase"])
    assert not all(torch.equal(v, avg.fine.state_dict()[k]) for k, v in raw.fine.state_dict().items())

    out = tmp_path / "c.json"
    assert isbi.main([*common, "--evaluate", str(base), "--add-fine", str(tmp_path / "f_avg0.9.pt"), "--keep-choice",
                      "--coarse-decode-windows", "3", "--fine-decode-windows", "1", "5", "--no-test",
                      "--save-as", str(tmp_path / "s.pt"),
                      "--out", str(out)]) == 0
    c = json.loads(out.read_text())
    assert c["test_read"] is False and "test" not in c and "seconds_per_image" not in c
    tried = {v["window"]: v["mre_mm"] for v in c["val_fine_decode_window"]}
    assert sorted(tried) == [1, 2, 5]  # the model's own window (2) is a candidate too
    assert c["fine_decode_window"] == min(tried, key=tried.get)
    coarse_tried = {v["window"]: v["mre_mm"] for v in c["val_coarse_decode_window"]}
    assert sorted(coarse_tried) == [2, 3] and c["coarse_decode_window"] == min(coarse_tried, key=coarse_tried.get)
    saved = GlimpseModel.load(tmp_path / "s.pt", "cpu")
    assert saved.meta["coarse_decode_window"] == c["coarse_decode_window"]
    assert saved.fine_decode_window == c["fine_decode_window"]
    assert saved.meta["fine_average_decay"] == [0.9]  # which weights the fine net carries
    assert f"fine decode window {c['fine_decode_window']} of [1, 2, 5]" in saved.meta["inference_choice"]
    with pytest.raises(SystemExit):  # averages are kept while a fine stage trains, so only with --fine-for
        isbi.main([*common, "--fine-averages", "0.9", "--train-only", "--out", str(tmp_path / "y.json")])
    with pytest.raises(SystemExit, match="validation"):
        isbi.main([*common, "--train-all", "--evaluate", str(tmp_path / "s.pt"), "--keep-choice",
                   "--fine-decode-windows", "3", "--no-test", "--out", str(tmp_path / "x.json")])


def test_three_fine_nets_every_subset_is_a_choice_and_half_weights_are_measured(isbi, tmp_path):
    """With three fine nets the choice grid holds every non-empty subset of them; --half-weights
    writes the chosen model with float16 weights and records what that moved on validation."""
    from napari_glimpse.fine import FineConfig, FineNet

    base = _random_model(tmp_path / "base.pt", 4)
    fines = []
    for seed in (5, 6, 7):
        m = GlimpseModel.load(base, "cpu")
        torch.manual_seed(seed)
        m.fine = FineNet(FineConfig(n_landmarks=19, level=1, patch=32, width=4, context=2, seed=seed)).eval()
        m.save(tmp_path / f"f{seed}.pt")
        fines.append(str(tmp_path / f"f{seed}.pt"))
    common = ["--method", "glimpse", "--data", str(REAL_DATA), "--limit", "3", "--threads", "1",
              "--speed-threads", "1", "--quiet", "--no-glimpse", "--max-seconds", "0", "--no-test"]
    out = tmp_path / "r.json"
    assert isbi.main([*common, "--evaluate", str(base), "--add-fine", *fines, "--save-as", str(tmp_path / "s.pt"),
                      "--half-weights", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    subsets = [tuple(v["fine_nets"]) for v in r["val_mre"] if v["fine_steps"] == 1 and v["coarse_flip_average"]]
    assert subsets == [(0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)]
    assert len(r["val_mre"]) == 2 * (1 + 2 * 7)  # flip x (no fine look + looks 1, 2 x subsets)
    check = r["half_weights_check"]
    assert check["file_bytes"] == (tmp_path / "s.pt").stat().st_size
    assert 0 <= check["max_answer_move_px"] < 5
    # the float32 side of the check is the chosen model as the grid scored it
    chosen = min(r["val_mre"], key=lambda v: v["mre_mm"])
    assert check["val_mre_mm_float32"] == pytest.approx(chosen["mre_mm"], abs=1e-9)
    assert check["val_mre_mm_float16"] == pytest.approx(chosen["mre_mm"], abs=0.05)
    ck = torch.load(tmp_path / "s.pt", map_location="cpu", weights_only=True)
    fine_sds = ([m["state_dict"] for m in ck.get("fine_members") or []]
                + ([ck["fine"]["state_dict"]] if "fine" in ck else []))
    assert ck["coarse_state_dict"]["stem.0.0.weight"].dtype == torch.float16
    assert all(sd["stem.0.0.weight"].dtype == torch.float16 for sd in fine_sds) and ck["weights_stored_as"] == "float16"
    with pytest.raises(SystemExit):  # it measures on validation: only for --evaluate ... --save-as
        isbi.main([*common, "--evaluate", str(base), "--half-weights", "--out", str(tmp_path / "x.json")])

    # a cost rule narrows the grid: at most two nets, one look
    out2 = tmp_path / "r2.json"
    assert isbi.main([*common, "--evaluate", str(base), "--add-fine", *fines, "--max-fine-nets", "2",
                      "--fine-looks", "1", "--out", str(out2)]) == 0
    r2 = json.loads(out2.read_text())
    assert {v["fine_steps"] for v in r2["val_mre"]} == {1}
    assert [tuple(v["fine_nets"]) for v in r2["val_mre"] if v["coarse_flip_average"]] == subsets[1:]
    assert r2["fine_steps"] == 1 and len(r2["fine_nets"]) <= 2
    # flip averaging held on instead of chosen: the same cells, only with it
    out3 = tmp_path / "r3.json"
    assert isbi.main([*common, "--evaluate", str(base), "--add-fine", *fines, "--max-fine-nets", "2",
                      "--fine-looks", "1", "--flip-average", "on", "--out", str(out3)]) == 0
    r3 = json.loads(out3.read_text())
    assert {v["coarse_flip_average"] for v in r3["val_mre"]} == {True} and r3["coarse_flip_average"] is True
    assert {tuple(v["fine_nets"]): v["mre_mm"] for v in r3["val_mre"]} == \
        {tuple(v["fine_nets"]): v["mre_mm"] for v in r2["val_mre"] if v["coarse_flip_average"]}
