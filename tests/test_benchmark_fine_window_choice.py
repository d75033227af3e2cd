"""benchmarks/fine_window_choice.py (run 34): fine nets chosen with a decode window each, their
answers averaged. Real ISBI data only; the committed validated nets (run 32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REAL_DATA, load_benchmark

pytestmark = pytest.mark.skipif(not REAL_DATA.exists(), reason=f"ISBI data not at {REAL_DATA}")

VALIDATED = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "validated_run32.pt"


def test_averaged_answers_are_the_ensembles_and_every_choice_is_scored(tmp_path):
    script = load_benchmark("fine_window_choice")
    out = tmp_path / "r.json"
    assert script.main(["--model", str(VALIDATED), "--names", "A", "C", "X5", "--windows", "X5=2,10",
                        "--max-nets", "3", "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    # one look from the same coarse start: the ensemble's answer is the mean of its nets' answers
    assert r["check"]["its_nets_answers_averaged_mre_mm"] == pytest.approx(r["check"]["model_ensemble_mre_mm"],
                                                                         abs=1e-6)
    whole = [c for c in r["choices"] if c["nets"] == ["A", "C", "X5"] and c["windows"] == [10, 10, 10]]
    assert whole and whole[0]["mre_mm"] == pytest.approx(r["check"]["model_ensemble_mre_mm"], abs=1e-6)
    # singles 1 + 1 + 2, pairs 1 + 2 + 2, the triple 2
    assert len(r["choices"]) == 11
    assert [c["mre_mm"] for c in r["choices"]] == sorted(c["mre_mm"] for c in r["choices"])
    assert r["alone"]["X5 w=2"] != r["alone"]["X5 w=10"]
    assert r["best"] == r["choices"][0]


def test_a_name_for_each_net(tmp_path):
    script = load_benchmark("fine_window_choice")
    with pytest.raises(SystemExit) as e:
        script.main(["--model", str(VALIDATED), "--names", "A", "C", "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        script.main(["--model", str(VALIDATED), "--names", "A", "C", "X5", "--windows", "X7=10,31",
                     "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2
