"""benchmarks/isbi.py: the ISBI 2015 protocol for a model file (Test1 or the validation split,
mirrored, speed) and the peer's run, each writing the record of benchmarks/results. Real ISBI
data only; random tiny networks (and a stand-in for the peer), so this checks the bookkeeping,
not accuracy."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BENCHMARKS, REAL_DATA, load_benchmark

from napari_glimpse.coarse import CoarseConfig, CoarseNet
from napari_glimpse.fine import FineConfig, FineNet
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset
from napari_glimpse.model import GlimpseModelNet, ModelConfig
from napari_glimpse.training import evaluate_model

pytestmark = pytest.mark.skipif(not REAL_DATA.exists(), reason=f"ISBI data not at {REAL_DATA}")

COMMON = ["--data", str(REAL_DATA), "--threads", "1", "--speed-threads", "1"]
# the keys of the shipped model's record that this script still writes (the others recorded how
# the file was assembled: --train-json, --fine-json, --keep-choice and the runs' budget and seeds)
ASSEMBLY_ONLY = {"budget_min", "seed", "train_json", "fine_config", "fine_json", "choice_kept"}


@pytest.fixture(scope="module")
def isbi():
    return load_benchmark("isbi")


def _random_model(path: Path, seed: int = 1) -> Path:
    """A tiny model with a coarse and a fine net and inference settings of its own."""
    torch.manual_seed(seed)
    ds = load_dataset(REAL_DATA, "train").subset(range(10))
    truth = ds.ground_truth()
    net = GlimpseModelNet(ModelConfig(n_landmarks=19, n_levels=3, width=8, hidden=(64, 32))).eval()
    coarse = CoarseNet(CoarseConfig(n_landmarks=19, input_hw=(64, 48), width=4, seed=seed)).eval()
    fine = FineNet(FineConfig(n_landmarks=19, level=1, patch=32, width=4, context=2, seed=seed)).eval()
    meta = {"iterations": 0, "coarse_flip_average": True, "fine_steps": 1, "fine_decode_window": 3,
            "coarse_history": [{"stage": "coarse", "step": 5}], "n_train_images": 10}
    GlimpseModel(net, ds.landmark_names, 0.1, truth.mean(0), truth.std(0), meta=meta, coarse=coarse,
                 fine=fine).save(path)
    return path


def _run(isbi, out: Path, *args: str) -> dict:
    assert isbi.main([*COMMON, *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_model_file_is_evaluated_on_test1_with_its_own_settings(isbi, tmp_path):
    path = _random_model(tmp_path / "m.pt")
    r = _run(isbi, tmp_path / "r.json", "--model", str(path), "--limit", "3")
    model = GlimpseModel.load(path, "cpu")
    test = load_dataset(REAL_DATA, "test1").subset(range(3))
    assert r["method"] == "glimpse" and r["model"] == str(path)
    # the settings it answers with, as the file carries them
    assert (r["iterations"], r["coarse_flip_average"], r["coarse_blend"], r["fine_steps"]) == (0, True, 0.0, 1)
    assert (r["coarse_nets"], r["fine_nets"]) == ([0], [0])
    assert (r["coarse_decode_window"], r["fine_decode_window"]) == (2, 3)
    assert r["config"]["fine"][0]["patch"] == 32 and r["config"]["coarse"][0]["input_hw"] == [64, 48]
    assert r["curve"] == [{"stage": "coarse", "step": 5}] and r["protocol"]["train"]["n_train_images"] == 10
    # its answers on the first three Test1 images, as napari-glimpse evaluate gives them
    want = evaluate_model(model, test, progress=False)
    np.testing.assert_allclose(r["test_predictions"], np.asarray(want["predictions"]).round(2), atol=1e-9)
    for k in ("mre_mm", "sd_mm", "n"):
        assert r["test"]["overall"][k] == pytest.approx(want["overall"][k]), k
    assert r["test"]["overall"]["sdr"] == pytest.approx(want["overall"]["sdr"]) and r["test"]["overall"]["n"] == 3 * 19
    assert len(r["test"]["per_landmark"]) == 19
    mirrored = evaluate_model(model, test, progress=False, mirror=True)
    assert r["test_mirrored"]["overall"]["mre_mm"] == pytest.approx(mirrored["overall"]["mre_mm"])
    assert r["seconds_per_image"] > 0 and r["speed_threads"] == 1
    assert r["protocol"]["test"] == "ISBI Test1 151-300" and r["protocol"]["n_test"] == 3
    assert r["protocol"]["limit"] == 3 and r["protocol"]["ground_truth"] == "mean of senior and junior"


def test_the_validation_split_is_train_131_to_150(isbi, tmp_path):
    path = _random_model(tmp_path / "m.pt")
    r = _run(isbi, tmp_path / "r.json", "--model", str(path), "--split", "val", "--limit", "2")
    val = load_dataset(REAL_DATA, "train").subset([130, 131])  # images 131 and 132
    want = evaluate_model(GlimpseModel.load(path, "cpu"), val, progress=False)
    np.testing.assert_allclose(r["test_predictions"], np.asarray(want["predictions"]).round(2), atol=1e-9)
    assert r["protocol"]["test"] == "ISBI Train 131-150 (the validation split)" and r["protocol"]["n_test"] == 2


def test_the_shipped_models_record_keeps_the_layout_of_the_headline_record(isbi, tmp_path):
    headline = json.loads((BENCHMARKS / "results" / "isbi_test1.json").read_text())
    r = _run(isbi, tmp_path / "r.json", "--limit", "2")  # the default --model: the shipped file
    assert set(r) == set(headline) - ASSEMBLY_ONLY
    assert set(r["test"]) == set(headline["test"]) and set(r["test_mirrored"]) == set(headline["test_mirrored"])
    assert set(headline["test"]["overall"]) <= set(r["test"]["overall"])  # (metrics.summarize now adds n_absent)
    assert set(r["protocol"]) == set(headline["protocol"]) and set(r["machine"]) == set(headline["machine"])
    # the shipped file answers with the settings the headline record chose for it
    for k in ("iterations", "coarse_flip_average", "coarse_blend", "fine_steps", "coarse_nets", "fine_nets",
              "coarse_decode_window", "fine_decode_window", "int8_nets"):
        assert r[k] == headline[k], k
    assert np.asarray(r["test_predictions"]).shape == (2, 19, 2)


def _fake_peer(monkeypatch) -> dict:
    """A stand-in for benchmarks/peer_landmarker.py whose answers are the test truth plus 1 px."""
    seen: dict = {}

    def train_and_predict(train_images, train_points, val_images, val_points, test_images, budget_s, threads,
                          seed, log):
        seen.update(n=(len(train_images), len(val_images), len(test_images)), budget_s=budget_s, seed=seed,
                    threads=threads, train_points=train_points)
        truth = load_dataset(REAL_DATA, "test1").subset(range(len(test_images))).ground_truth("mean")
        return {"test_pred": truth + [1.0, 0.0], "seconds_per_image": 0.5, "config": {"peer": True},
                "train_wall_s": 12.0, "train_cpu_s": 20.0, "curve": [{"elapsed_s": 1.0, "val_mre_mm": 3.0}]}

    monkeypatch.setitem(sys.modules, "peer_landmarker", types.SimpleNamespace(train_and_predict=train_and_predict))
    return seen


def test_the_peer_is_trained_on_train_001_130_and_read_on_test1(isbi, tmp_path, monkeypatch):
    seen = _fake_peer(monkeypatch)
    r = _run(isbi, tmp_path / "p.json", "--method", "landmarker", "--budget-min", "2", "--seed", "3",
             "--limit", "2")
    assert seen["n"] == (2, 2, 2) and seen["budget_s"] == 120.0 and seen["seed"] == 3 and seen["threads"] == 1
    np.testing.assert_allclose(seen["train_points"], load_dataset(REAL_DATA, "train").subset([0, 1]).ground_truth())
    assert r["method"] == "landmarker" and (r["budget_min"], r["threads"], r["seed"]) == (2.0, 1, 3)
    assert r["test"]["overall"]["mre_mm"] == pytest.approx(0.1)  # 1 px at 0.1 mm
    assert r["train"]["wall_s"] == 12.0 and r["train"]["cpu_s"] == 20.0 and r["config"] == {"peer": True}
    assert r["seconds_per_image"] == 0.5 and np.asarray(r["test_predictions"]).shape == (2, 19, 2)
    assert r["protocol"]["train"] == "ISBI Train 001-130" and r["protocol"]["val"] == "ISBI Train 131-150"
    peer = json.loads((BENCHMARKS / "results" / "peer_landmarker_test1.json").read_text())
    assert set(r) == set(peer) and set(r["protocol"]) == set(peer["protocol"])


def test_the_peer_refit_on_all_of_train_has_no_validation_split(isbi, tmp_path, monkeypatch):
    seen = _fake_peer(monkeypatch)
    r = _run(isbi, tmp_path / "p.json", "--method", "landmarker", "--train-all", "--budget-min", "1", "--limit", "3")
    assert seen["n"] == (3, 0, 3) and seen["seed"] == 0
    assert r["protocol"]["train"] == "ISBI Train 001-150" and r["protocol"]["val"] is None
    assert r["seed"] == 0 and r["protocol"]["n_test"] == 3


@pytest.mark.parametrize("args", [["--budget-min", "5"], ["--train-all"], ["--seed", "1"],
                                  ["--method", "landmarker", "--split", "val"],
                                  ["--method", "landmarker", "--model", "x.pt"]])
def test_flags_of_the_other_method_are_refused(isbi, tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        isbi.main([*COMMON, *args, "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("flag", ["--evaluate", "--fine-for", "--add-coarse", "--add-fine", "--save-as",
                                  "--fine-target", "--fine-erase", "--max-seconds", "--keep-choice"])
def test_the_training_and_assembly_flags_are_gone(isbi, tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        isbi.main([*COMMON, flag, "x", "--out", str(tmp_path / "x.json")])
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
