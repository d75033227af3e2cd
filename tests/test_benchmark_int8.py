"""benchmarks/int8.py: quantize a model, compare int8 with float, record each net's time. Real ISBI
data only (the calibration images come from it); the shipped default, so the graphs are real."""

from __future__ import annotations

import json

import pytest
from conftest import REAL_DATA, load_benchmark

from napari_glimpse.checkpoint import read_checkpoint
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel

pytestmark = pytest.mark.skipif(not REAL_DATA.exists(), reason=f"ISBI data not at {REAL_DATA}")


def test_quantizes_records_and_saves_with_the_weights_as_they_were(tmp_path):
    script = load_benchmark("int8")
    out, saved = tmp_path / "r.json", tmp_path / "q.pt"
    assert script.main(["--model", str(DEFAULT_MODEL), "--calibrate", "0:2:1", "--split", "none", "--rounds", "1",
                        "--threads", "1", "--save-as", str(saved), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["calibration_images"] == ["001.jpg", "002.jpg"]
    assert r["nets_quantized"] == 5 and r["int8_nets"] == [5, 5]
    per = r["per_net_ms"]
    assert [k.split()[0] for k in per] == ["coarse0", "fine0", "fine1", "fine2", "fine3"]
    assert all(v["float"] > 0 and v["int8"] > 0 for v in per.values())
    assert read_checkpoint(saved)["weights_stored_as"] == "float16"  # as the default's were
    assert GlimpseModel.load(saved, "cpu").int8_nets == (5, 5)
    assert r["bytes"] == saved.stat().st_size


def test_refuses_to_calibrate_on_the_images_it_reads(tmp_path, capsys):
    script = load_benchmark("int8")
    with pytest.raises(SystemExit):
        script.main(["--model", str(DEFAULT_MODEL), "--calibrate", "125:135:5", "--split", "val",
                     "--out", str(tmp_path / "r.json")])
    assert "validation" in capsys.readouterr().err
