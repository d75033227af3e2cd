"""The glimpse gate (napari_glimpse.gate): steps behind the coarse/fine answer only where validation
shows they help; packaged models by name."""

from __future__ import annotations

import numpy as np
import pytest

from napari_glimpse.errors import GlimpseError
from napari_glimpse.gate import fit_gate, gate_note, gate_off
from napari_glimpse.inference import MODELS, GlimpseModel, resolve_model
from napari_glimpse.io import load_dataset, read_image


@pytest.fixture
def staged(tiny_staged_model_path):
    return GlimpseModel.load(tiny_staged_model_path, "cpu", int8=False)


def test_gate_off_gives_the_0_step_answer_for_any_steps(staged, tiny_data):
    img = read_image(tiny_data["train"]["paths"][0])
    moved = staged.predict(img, iterations=3, facing="right", spacing=0.1)
    zero = staged.predict(img, iterations=0, facing="right", spacing=0.1)
    assert not np.allclose(moved.final, zero.final)  # ungated, the untrained steps move the answer
    gate_off(staged, "no held-out images")
    for n in (0, 1, 3):
        tr = staged.predict(img, iterations=n, facing="right", spacing=0.1)
        np.testing.assert_array_equal(tr.final, zero.final)
        np.testing.assert_array_equal(tr.uncertainty_mm, zero.uncertainty_mm)
        assert (tr.steps_gated is None) == (n == 0)
    assert gate_note(tr).startswith("glimpse steps off") and gate_note(zero) == ""
    # the explorer's steps from a given start are not gated
    st = zero.final
    assert not np.allclose(staged.predict(img, iterations=2, start=st, facing="right", spacing=0.1).final, st)


def test_a_fitted_gate_applies_steps_only_where_they_helped(staged, tiny_data):
    val = load_dataset(tiny_data["root"], "train")
    errors = np.ones((4, len(val), 3))  # (T + 1, N, K): 0 .. 3 steps
    errors[1:, :, 0] = 0.5  # landmark 0: every step count helps
    errors[1:, :, 1] = 2.0  # landmark 1: steps hurt
    errors[[1, 3], :, 2] = 0.5  # landmark 2: helps after 1 and 3 steps, not after 2
    gate = fit_gate(staged, val, steps=(1, 2, 3), errors=errors)
    assert gate["apply"] == [True, False, False] and staged.meta["glimpse_gate"] is gate
    assert fit_gate(staged, val, steps=(1, 3), errors=errors)["apply"] == [True, False, True]
    img = read_image(tiny_data["train"]["paths"][0])
    zero = staged.predict(img, iterations=0, facing="right", spacing=0.1).final
    staged.meta["glimpse_gate"] = gate
    tr = staged.predict(img, iterations=2, facing="right", spacing=0.1)
    np.testing.assert_array_equal(tr.final[1:], zero[1:])
    assert not np.allclose(tr.final[0], zero[0])
    assert list(tr.steps_gated) == [False, True, True] and "1 of 3" in gate_note(tr)


def test_fit_gate_on_a_validation_set(staged, tiny_data):
    val = load_dataset(tiny_data["root"], "train").subset([0, 1])
    gate = fit_gate(staged, val, steps=(1,))
    assert len(gate["apply"]) == 3 and sorted(gate["mre_mm"]) == [0, 1]
    assert gate["images"] == ["001.png", "002.png"]


def test_the_shipped_default_keeps_its_answer():
    model = GlimpseModel.load(None, "cpu")
    assert model.glimpse_gate is not None and not model.glimpse_gate.any()


def test_packaged_models_by_name(tmp_path, monkeypatch):
    assert resolve_model(None) == MODELS / "default.pt" == resolve_model("default")
    assert resolve_model(tmp_path / "x.pt") == tmp_path / "x.pt"
    monkeypatch.setattr("napari_glimpse.inference.MODELS", tmp_path)
    with pytest.raises(GlimpseError, match=r"no model 'glimpse' in the package: .*glimpse\.pt is missing"):
        resolve_model("glimpse")
    (tmp_path / "glimpse.pt").write_bytes(b"")
    assert resolve_model("glimpse") == tmp_path / "glimpse.pt"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "glimpse").mkdir()  # a folder of that name where the command runs does not hide the model
    assert resolve_model("glimpse") == tmp_path / "glimpse.pt"
