"""benchmarks/fine_error_correlation.py: how alike fine nets err on validation. Real ISBI data
only; random tiny networks, so this checks the bookkeeping, not accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REAL_DATA, load_benchmark

from napari_glimpse.coarse import CoarseConfig, CoarseNet
from napari_glimpse.fine import FineConfig, FineEnsemble, FineNet
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset
from napari_glimpse.model import GlimpseModelNet, ModelConfig

pytestmark = pytest.mark.skipif(not REAL_DATA.exists(), reason=f"ISBI data not at {REAL_DATA}")

FINE = FineConfig(patch=16, width=4, context=2)


@pytest.fixture(scope="module")
def script():
    return load_benchmark("fine_error_correlation")


def _model(path: Path, fines: list) -> Path:
    ds = load_dataset(REAL_DATA, "train").subset(range(10))
    truth = ds.ground_truth()
    torch.manual_seed(0)
    net = GlimpseModelNet(ModelConfig(n_landmarks=19, n_levels=3, width=8, hidden=(64, 32))).eval()
    coarse = CoarseNet(CoarseConfig(n_landmarks=19, input_hw=(64, 48), width=4)).eval()
    fine = FineEnsemble(fines) if len(fines) > 1 else fines[0]
    GlimpseModel(net, ds.landmark_names, 0.1, truth.mean(0), truth.std(0), coarse=coarse, fine=fine.eval()).save(path)
    return path


def test_a_net_errs_like_itself_and_the_models_own_stage_is_reported(script, tmp_path):
    torch.manual_seed(1)
    a, b = FineNet(FINE), FineNet(FINE)
    with torch.no_grad():  # b's heatmaps follow its (random) features: it errs its own way
        b.head.weight.mul_(50.0)
    twin = FineNet(FINE)
    twin.load_state_dict(a.state_dict())
    model = _model(tmp_path / "m.pt", [a, b])
    other = _model(tmp_path / "o.pt", [twin])
    out = tmp_path / "c.json"
    assert script.main(["--model", str(model), "--add-fine", str(other), "--names", "a", "b", "twin",
                        "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == "val" and r["n_images"] == 20 and r["image_names"][0] == "131.jpg"
    c = r["error_correlation_per_coordinate"]
    # (a random coarse stage errs by far more than the fine nets differ, so a-b is near 1 too)
    assert set(c) == {"a-b", "a-twin", "b-twin"} and c["a-twin"] == 1.0
    assert r["mre_mm"]["a"] == r["mre_mm"]["twin"] != r["mre_mm"]["b"]
    assert len(r["model_fine_stage_mean_error_mm"]) == 19
    # the model's own stage is the mean of its nets (a and b), not of every net compared
    assert r["model_fine_stage_mre_mm"] <= max(r["mre_mm"]["a"], r["mre_mm"]["b"]) + 1e-3
    with pytest.raises(SystemExit, match="2 names for 3 fine nets"):
        script.main(["--model", str(model), "--add-fine", str(other), "--names", "a", "b", "--out", str(out)])


def test_training_images_are_the_odd_numbers_up_to_129(script, tmp_path):
    model = _model(tmp_path / "m.pt", [FineNet(FINE)])
    out = tmp_path / "t.json"
    assert script.main(["--model", str(model), "--images", "train-odd", "--threads", "1", "--out", str(out)]) == 0
    names = json.loads(out.read_text())["image_names"]
    assert names[:2] == ["001.jpg", "003.jpg"] and names[-1] == "129.jpg" and len(names) == 65
