"""Fine-tuning in minutes (napari_glimpse.finetune): only the stages the answer uses, the
per-landmark offsets learned and applied, the time bound kept, one overall progress, and what
was tuned recorded. Tiny models (tests/conftest.py): a blob-finding coarse net and two fine nets."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REAL_DATA, add_blob_stages

from napari_glimpse.cli import main
from napari_glimpse.coarse import LAYERS, CoarseNet, training_mode, tune_only
from napari_glimpse.errors import GlimpseError
from napari_glimpse.finetune import (
    FinetuneConfig,
    Progress,
    finetune,
    learn_offsets,
    load_images,
    reading_frame,
    stage_answers,
    used_stages,
)
from napari_glimpse.inference import GlimpseModel, mirror_points
from napari_glimpse.io import load_dataset, read_image

QUICK = FinetuneConfig(coarse_steps=2, fine_steps=2, glimpse_steps=2, time_budget_s=None)


def _weights(net: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def staged(tiny_staged_model_path):
    """The tiny model whose answer is its coarse and fine stages' (meta iterations 0)."""
    return GlimpseModel.load(tiny_staged_model_path, device="cpu")


@pytest.fixture
def reviewed(tiny_data):
    return load_dataset(tiny_data["root"], "train")


# ------------------------------------------------------------------------------ what is tuned
def test_only_the_stages_the_answer_uses_are_tuned(staged, reviewed, tiny_model, tmp_path):
    assert used_stages(staged) == ("coarse", "fine")
    glimpse, coarse, fine = _weights(staged.net), _weights(staged.coarse), _weights(staged.fine)
    model = finetune(staged, reviewed, tmp_path / "ft.pt", QUICK, meta={"parent": "staged.pt"})
    assert _same(glimpse, _weights(model.net))  # the glimpse net is not used, so not tuned
    assert not _same(coarse, _weights(model.coarse)) and not _same(fine, _weights(model.fine))
    assert model.meta["finetuned"]["not_tuned"] == ["glimpse"]
    # a model whose answer takes glimpse steps: the glimpse net is tuned too, and no offsets are
    # learned (the glimpses would move the points they shift)
    add_blob_stages(tiny_model).meta["iterations"] = 2
    assert used_stages(tiny_model) == ("coarse", "fine", "glimpse")
    glimpse = _weights(tiny_model.net)
    model = finetune(tiny_model, reviewed, tmp_path / "g.pt", QUICK)
    assert not _same(glimpse, _weights(model.net))
    assert model.meta["finetuned"]["stages"] == ["coarse", "fine", "glimpse"]
    assert "landmark_offsets_px" not in model.meta and model.meta["train_steps"] == 2


def test_no_steps_keeps_the_nets_and_learns_the_offsets_alone(staged, reviewed, tmp_path):
    coarse, fine = _weights(staged.coarse), _weights(staged.fine)
    model = finetune(staged, reviewed, tmp_path / "ft.pt", replace(QUICK, coarse_steps=0, fine_steps=0))
    assert _same(coarse, _weights(model.coarse)) and _same(fine, _weights(model.fine))
    assert model.meta["finetuned"]["stages"] == ["offsets"]
    assert model.landmark_offsets is not None


def test_a_float16_parent_gives_a_float16_file_that_answers_as_the_tuned_model(staged, reviewed, tiny_data,
                                                                               tmp_path):
    from napari_glimpse.checkpoint import read_checkpoint

    half = tmp_path / "half.pt"  # stored as the shipped model is
    staged.save(half, half_weights=True)
    parent = GlimpseModel.load(half, device="cpu")
    assert parent.half_weights and not staged.half_weights
    for src, name in ((parent, "from_half.pt"), (staged, "from_float.pt")):
        finetune(src, reviewed, tmp_path / name, QUICK)
        stored = read_checkpoint(tmp_path / name).get("weights_stored_as")
        assert stored == ("float16" if src is parent else None)
    # float16 storage: about half the file; the tuned model in memory answers as the file does
    assert (tmp_path / "from_half.pt").stat().st_size < 0.75 * (tmp_path / "from_float.pt").stat().st_size
    tuned = finetune(GlimpseModel.load(half, device="cpu"), reviewed, tmp_path / "again.pt", QUICK)
    image = tiny_data["test1"]["paths"][0]
    np.testing.assert_array_equal(tuned.predict(image).final,
                                  GlimpseModel.load(tmp_path / "again.pt", device="cpu").predict(image).final)


# ---------------------------------------------------------------------------------- offsets
def test_offsets_are_the_shrunk_mean_residual_and_shift_the_answer(staged, reviewed, tiny_data, tmp_path):
    parent = staged
    loaded = load_images(reviewed)
    preds, left = stage_answers(parent, loaded)
    truth = loaded.ground_truth()
    cfg = replace(QUICK, coarse_steps=0, fine_steps=0, offset_prior=2.0)
    test_img = tiny_data["test1"]["paths"][0]
    before = parent.predict(test_img, facing="right").final
    model = finetune(parent, reviewed, tmp_path / "ft.pt", cfg)
    expected = reading_frame(truth - preds, left).sum(0) / (len(truth) + 2.0)
    np.testing.assert_allclose(model.landmark_offsets, expected, atol=1e-3)
    np.testing.assert_allclose(GlimpseModel.load(tmp_path / "ft.pt", device="cpu").landmark_offsets,
                               model.landmark_offsets)
    after = model.predict(test_img, facing="right").final
    np.testing.assert_allclose(after, np.clip(before + model.landmark_offsets, 0, 255), atol=1e-3)
    # a mirrored image (read mirrored): the offsets apply in the model's frame, so the answer is the mirror's
    img = read_image(test_img)
    mirrored = model.predict(np.ascontiguousarray(img[:, ::-1]), facing="left").final
    np.testing.assert_allclose(mirrored, mirror_points(after, img.shape[1]), atol=1e-3)


def test_learn_offsets_and_the_reading_frame():
    truth = np.zeros((3, 2, 2))
    preds = truth - np.array([[1.0, 2.0], [0.0, -3.0]])  # the answers fall short by (1, 2) and (0, -3)
    left = np.array([False, False, True])  # the third image was read mirrored: its x residual flips
    off = learn_offsets(preds, truth, left, prior=1.0)
    np.testing.assert_allclose(off, [[(1 + 1 - 1) / 4, 6 / 4], [0.0, -9 / 4]])
    d = np.random.default_rng(0).normal(size=(3, 2, 2))
    np.testing.assert_allclose(reading_frame(reading_frame(d, left), left), d)


def test_the_offsets_add_up_over_rounds(staged, reviewed, tmp_path):
    cfg = replace(QUICK, coarse_steps=0, fine_steps=0, offset_prior=0.0)
    first = finetune(staged, reviewed, tmp_path / "a.pt", cfg)
    again = finetune(GlimpseModel.load(tmp_path / "a.pt", device="cpu"), reviewed, tmp_path / "b.pt", cfg)
    # the first round's offsets already take the mean residual out: the second adds (almost) nothing
    np.testing.assert_allclose(again.landmark_offsets, first.landmark_offsets, atol=0.05)
    assert again.meta["finetuned"]["parent_finetuned"]["stages"] == ["offsets"]


# ------------------------------------------------------------------------- time, progress
def test_the_defaults_stop_within_their_time_budget(staged, reviewed, tmp_path):
    """The defaults with many more steps than fit: the run ends by its budget (plus writing)."""
    cfg = replace(FinetuneConfig(), coarse_steps=10**6, fine_steps=10**6, time_budget_s=4.0)
    lines = []
    prog = Progress(lines.append)
    t = time.monotonic()
    model = finetune(staged, reviewed, tmp_path / "ft.pt", cfg, progress=prog)
    took = time.monotonic() - t
    assert took < 4.0 + 3.0, took
    steps = model.meta["finetuned"]["steps"]
    assert 1 <= steps["coarse"][0] < 10**6 and all(1 <= s < 10**6 for s in steps["fine"])
    assert lines[-1]["progress"] == pytest.approx(1.0)


def test_one_overall_progress_across_stages_and_nets(staged, reviewed, tmp_path):
    lines = []
    finetune(staged, reviewed, tmp_path / "ft.pt", replace(QUICK, coarse_steps=3, fine_steps=4),
             progress=Progress(lines.append))
    assert [ln["stage"] for ln in lines] == ["read"] * 6 + ["offsets"] * 6 + ["coarse"] * 3 + ["fine"] * 8
    assert [ln.get("member") for ln in lines[-8:]] == [0] * 4 + [1] * 4
    assert {ln["overall_total"] for ln in lines} == {6 + 6 + 3 + 2 * 4}
    assert [ln["overall_step"] for ln in lines] == list(range(1, 24))
    fractions = [ln["progress"] for ln in lines]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert all(ln["eta_s"] >= 0 for ln in lines) and lines[-1]["eta_s"] == pytest.approx(0.0, abs=1e-6)
    assert all("loss" in ln for ln in lines if ln["stage"] in ("coarse", "fine"))


def test_progress_shares_the_budget_by_expected_time():
    prog = Progress()
    a = prog.add("coarse", 10)  # 10 s expected
    b = prog.add("fine", 10)  # 1.6 s
    late = prog.add("int8", 1, later=True)
    c = prog.add("fine", 10)
    assert prog.phases == [a, b, c, late]  # the later phase stays last
    share = prog.share(a, 100.0)
    assert share == pytest.approx(100.0 * 10 / (10 + 1.6 + 1.6 + 5.0), rel=0.01)
    assert prog.share(a, None) is None
    prog.report(a, 10)
    assert prog.fraction() == pytest.approx(10 / 18.2, rel=0.01)


def test_the_eta_follows_each_stage_s_own_rate(monkeypatch):
    """Before a stage runs, its expected time is scaled by how the run compares with the
    expectation so far; once it runs, its own rate counts."""
    import napari_glimpse.finetune as ft

    clock = [0.0]
    monkeypatch.setattr(ft.time, "monotonic", lambda: clock[0])
    lines = []
    prog = Progress(lines.append, t0=0.0, last=0.0)
    coarse, fine1, fine2 = prog.add("coarse", 10), prog.add("fine", 10), prog.add("fine", 10)
    for step in range(1, 11):  # 2 s a step: twice the expected 1 s
        clock[0] += 2.0
        prog.report(coarse, step)
    assert lines[-1]["eta_s"] == pytest.approx(2 * 10 * 0.16 * 2.0)
    for step in range(1, 11):  # 0.5 s a step
        clock[0] += 0.5
        prog.report(fine1, step)
    assert lines[-1]["eta_s"] == pytest.approx(10 * 0.5)
    assert lines[-1]["elapsed_s"] == pytest.approx(25.0)
    assert fine2.done == 0 and lines[-1]["overall_step"] == 20


# ------------------------------------------------------------------------------- metadata
def test_what_was_tuned_is_recorded(staged, reviewed, tiny_data, tmp_path):
    mix = load_dataset(tiny_data["root"], "test1")
    finetune(staged, reviewed, tmp_path / "ft.pt", replace(QUICK, mix_images=2), mix=mix,
             meta={"parent": "staged.pt"})
    m = GlimpseModel.load(tmp_path / "ft.pt", device="cpu").meta
    rec = m["finetuned"]
    assert rec["parent"] == "staged.pt" and rec["stages"] == ["offsets", "coarse", "fine"]
    assert rec["steps"] == {"coarse": [2], "fine": [2, 2]} and rec["images"] == 6 and rec["mix_images"] == 2
    assert rec["image_names"] == [f"{i:03d}.png" for i in range(1, 7)]
    assert rec["seconds"] > 0 and rec["config"]["coarse_steps"] == 2 and rec["stopped"] == "done"
    assert all(n["loss"] is not None and n["first_loss"] is not None for n in rec["nets"]["fine"])
    assert m["coarse_finetune_steps"] == 2 and m["fine_finetune_steps"] == 2
    assert len(m["landmark_offsets_px"]) == 3


def test_bad_inputs(staged, reviewed, tmp_path):
    with pytest.raises(GlimpseError, match="no reviewed images"):
        finetune(staged, reviewed.subset([]), tmp_path / "x.pt", QUICK)
    with pytest.raises(GlimpseError, match="layers to tune"):
        tune_only(CoarseNet(staged.coarse.cfg), "middle")


# -------------------------------------------------------------------- layers, the command
def test_tune_only_freezes_the_rest_with_its_statistics(staged):
    net = CoarseNet(staged.coarse.cfg)
    for layers in LAYERS:
        tune_only(net, layers)
        learn = {n for n, p in net.named_parameters() if p.requires_grad}
        if layers == "all":
            assert len(learn) == len(list(net.parameters()))
        elif layers == "head":
            assert learn == {"head.weight", "head.bias"}
        else:
            assert "head.weight" in learn and not any(n.startswith(("stem", "down")) for n in learn)
    tune_only(net, "head")
    training_mode(net)
    # frozen batch norms keep their statistics
    assert net.training and net.head.training and not net.stem[0][1].training


def test_cli_finetune_defaults_within_the_budget_and_records(capsys, tiny_data, tiny_staged_model_path, tmp_path):
    out = tmp_path / "ft.pt"
    t = time.monotonic()
    parent_args = ["finetune", "--model", str(tiny_staged_model_path), "--data", str(tiny_data["root"]), "--out",
                   str(out)]
    assert main([*parent_args, "--time-budget", "0.05", "--max-steps", "1000000", "--fine-layers", "head",
                 "--progress-json", "--mix-data", str(tiny_data["root"]), "--mix-split", "test1",
                 "--mix-images", "2"]) == 0
    assert time.monotonic() - t < 3.0 + 6.0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    done = lines[-1]
    assert done["done"] is True and "landmark offsets" in done["tuned"]
    assert "2 original images replayed" in done["tuned"]
    assert all("overall_total" in ln for ln in lines[:-1])
    tuned, parent = GlimpseModel.load(out, device="cpu"), GlimpseModel.load(tiny_staged_model_path, device="cpu")
    rec = tuned.meta["finetuned"]
    assert rec["mix_images"] == 2 and rec["config"]["fine_layers"] == "head" and rec["config"]["time_budget_s"] == 3.0
    for a, b in zip(parent.fine.members, tuned.fine.members):  # head only: the rest of each fine net is the parent's
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa if not k.startswith("head."))
    # --no-offsets, and 0 steps for both stages: nothing is tuned
    assert main([*parent_args, "--no-offsets", "--coarse-steps", "0", "--fine-steps", "0"]) == 0
    assert "fine-tuned 0 steps" in capsys.readouterr().out
    assert GlimpseModel.load(out, device="cpu").landmark_offsets is None


@pytest.mark.skipif(not REAL_DATA.exists(), reason=f"ISBI data not at {REAL_DATA}")
def test_offsets_move_the_answer_not_its_confidence():
    """The shipped model's confidence (shape check, calibrated probability) was fitted on answers
    without a site's offsets: with offsets the points move, their probability and plausibility do
    not (and where the other landmarks imply a point moves with it); a mirrored image alike."""
    model = GlimpseModel.load(None, device="cpu")
    img = read_image(REAL_DATA / "images" / "131.jpg")  # ISBI Train (validation of the shipped choice)
    before = model.predict(img)
    off = np.zeros((19, 2))
    off[3] = [40.0, -20.0]  # Porion 4.5 mm further on
    model.meta["landmark_offsets_px"] = off.tolist()
    after = model.predict(img)
    np.testing.assert_allclose(after.final, before.final + off, atol=1e-6)
    np.testing.assert_allclose(after.confidence, before.confidence, atol=1e-9)
    np.testing.assert_allclose(after.shape_z, before.shape_z, atol=1e-9)
    np.testing.assert_allclose(after.implied_positions, before.implied_positions + off, atol=1e-6)
    mirrored = model.predict(np.ascontiguousarray(img[:, ::-1]))
    assert mirrored.facing == "left"
    np.testing.assert_allclose(mirrored.final, mirror_points(after.final, img.shape[1]), atol=1e-3)
    np.testing.assert_allclose(mirrored.confidence, after.confidence, atol=1e-3)


def test_artefacts_are_trained_with_and_recorded_in_the_tuned_fine_nets(staged, reviewed, tmp_path, monkeypatch,
                                                                       capsys, tiny_data, tiny_staged_model_path):
    """``artefacts`` reaches the fine nets' training windows (they are painted) and each tuned
    net's config keeps it; None keeps the nets' own (0: nothing painted); the CLI's ``--artefacts``."""
    from napari_glimpse import fine

    painted = []
    real = fine.paint_artefacts
    monkeypatch.setattr(fine, "paint_artefacts", lambda x, t, p, *a: painted.append(p) or real(x, t, p, *a))
    model = finetune(staged, reviewed, tmp_path / "ft.pt", replace(QUICK, coarse_steps=0))
    assert painted == [] and all(m.cfg.artefacts == 0.0 for m in model.fine.members)
    model = finetune(staged, reviewed, tmp_path / "ft.pt", replace(QUICK, coarse_steps=0, artefacts=0.5))
    assert painted == [0.5] * 4  # two fine nets, two steps each
    assert [m.cfg.artefacts for m in GlimpseModel.load(tmp_path / "ft.pt", device="cpu").fine.members] == [0.5, 0.5]
    out = tmp_path / "cli.pt"
    assert main(["finetune", "--model", str(tiny_staged_model_path), "--data", str(tiny_data["root"]), "--out",
                 str(out), "--coarse-steps", "0", "--fine-steps", "1", "--artefacts", "0.25", "--no-quantize"]) == 0
    assert [m.cfg.artefacts for m in GlimpseModel.load(out, device="cpu").fine.members] == [0.25, 0.25]
    with pytest.raises(SystemExit) as e:  # argparse: one error line, exit 2
        main(["finetune", "--data", str(tiny_data["root"]), "--out", str(out), "--artefacts", "2"])
    assert e.value.code == 2 and "must be a probability" in capsys.readouterr().err
