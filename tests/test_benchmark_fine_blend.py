"""benchmarks/fine_blend.py (run 30): the coarse answer blended into the fine one, scored on the
validation split. Real ISBI data only; the shipped default (a coarse stage and one fine look)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REAL_DATA, load_benchmark

from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel
from napari_glimpse.io import load_dataset
from napari_glimpse.metrics import radial_errors

pytestmark = pytest.mark.skipif(not REAL_DATA.exists(), reason=f"ISBI data not at {REAL_DATA}")


def test_blends_run_from_the_fine_answer_to_the_coarse_one(tmp_path):
    script = load_benchmark("fine_blend")
    out = tmp_path / "r.json"
    assert script.main(["--model", str(DEFAULT_MODEL), "--blends", "0", "0.5", "1", "--threads", "1",
                        "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == 20 and sorted(r["blends"]) == ["0", "0.5", "1"]

    val = load_dataset(REAL_DATA, "train").subset(range(130, 150))
    model = GlimpseModel.load(DEFAULT_MODEL, "cpu", int8=False)
    truth = val.ground_truth("mean")
    fine = np.stack([model.predict(val.image(i)).final for i in range(20)])
    coarse = np.stack([model.locate_coarse(val.image(i), fine_steps=0)[0] for i in range(20)])
    assert r["blends"]["0"]["mre_mm"] == pytest.approx(float(radial_errors(fine, truth).mean()))
    assert r["blends"]["1"]["mre_mm"] == pytest.approx(float(radial_errors(coarse, truth).mean()))
    half = radial_errors((coarse + fine) / 2, truth)
    assert r["blends"]["0.5"]["mre_mm"] == pytest.approx(float(half.mean()))
    assert r["best"] in (0.5, 1.0)
    assert r["gain_mm"] == pytest.approx(r["blends"]["0"]["mre_mm"] - r["blends"][f"{r['best']:g}"]["mre_mm"])
