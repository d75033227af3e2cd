"""benchmarks/int8_fidelity.py (run 29): int8 variants of a model, each answer's distance from
the float nets' answers, and interleaved timings. Real ISBI data only (calibration images); the
shipped default, so the graphs are real."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REAL_DATA, load_benchmark

from napari_glimpse.checkpoint import read_checkpoint
from napari_glimpse.int8 import checkpoint_graphs
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel
from napari_glimpse.io import load_dataset

pytestmark = pytest.mark.skipif(not REAL_DATA.exists(), reason=f"ISBI data not at {REAL_DATA}")


def test_variants_their_moves_from_the_float_answers_and_their_times(tmp_path, monkeypatch):
    script = load_benchmark("int8_fidelity")
    calibrate = slice(0, 4, 2)  # Train 001, 003
    monkeypatch.setattr(script, "VARIANTS", {
        "V0": dict(calibrate=calibrate, which=("coarse", "fine"), float_ends=False),
        "V1": dict(calibrate=calibrate, which=("fine",), float_ends=False),
    })
    out, work = tmp_path / "r.json", tmp_path / "variants"
    assert script.main(["--fidelity", "--limit", "2", "--workdir", str(work), "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["variants"]["V1"] == {"calibrate": "0:4:2", "which": ["fine"], "float_ends": False}
    assert r["fidelity"]["images"] == ["002", "004"]  # the first two that no variant calibrates on
    v0, v1 = r["fidelity"]["variants"]["V0"], r["fidelity"]["variants"]["V1"]
    assert v0["int8_nets"] == [5, 5] and v1["int8_nets"] == [4, 5]
    assert checkpoint_graphs(read_checkpoint(work / "V1.pt"))["coarse"] == [None]

    # the moves are the distances between the variant's answers and the float nets' (mm)
    train = load_dataset(REAL_DATA, "train")
    ref = GlimpseModel.load(DEFAULT_MODEL, "cpu", int8=False)
    q = GlimpseModel.load(work / "V0.pt", "cpu")
    d = np.stack([np.linalg.norm(q.predict(train.image(i)).final - ref.predict(train.image(i)).final, axis=-1)
                  for i in (1, 3)]) * ref.pixel_spacing
    assert v0["rms_mm"] == pytest.approx(float(np.sqrt((d ** 2).mean())))
    assert v0["max_mm"] == pytest.approx(float(d.max())) and v0["points"] == d.size == 38
    assert 0 < v0["rms_mm"] < 0.5

    # a later --timing run reuses the saved variants and keeps the fidelity record
    assert script.main(["--timing", "--rounds", "2", "--workdir", str(work), "--threads", "1", "--out", str(out)]) == 0
    r2 = json.loads(out.read_text())
    assert r2["fidelity"] == r["fidelity"]
    t = r2["timing"]
    assert sorted(t["seconds_per_image"]) == ["V0", "V1"] and all(len(v) == 2 for v in t["seconds_per_image"].values())
    assert t["minus_V0_ms"]["V0"] == 0
