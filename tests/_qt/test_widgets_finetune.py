"""Fine-tune widget: wrong inputs are reported, and a failing training process too; one overall
progress bar with an ETA across stages, each stage's loss, the original set option, and a
finished run's model records what was tuned."""

from __future__ import annotations

from pathlib import Path

from ._env import require_gui

require_gui()


def test_bad_inputs_and_a_failing_process(make_napari_viewer, qtbot, tmp_path, isbi_model_path):
    from napari_glimpse._widgets._finetune import FinetuneWidget
    from napari_glimpse._widgets._state import state_for

    viewer = make_napari_viewer()
    ft = FinetuneWidget(viewer)
    assert ft.start() is None and "CSV first" in ft.status_label.text()
    bad = tmp_path / "bad.csv"
    bad.write_text("image_path,1_x\nnot,a,row\n")
    state_for(viewer).export_written.emit(str(bad))  # as the corrections widget's export does
    assert str(ft.data_edit.value) == str(bad)
    ft.lr.value = "0"
    assert ft.start() is None and "learning rate" in ft.status_label.text()
    ft.lr.value = "1e-4"
    ft.mix_check.value = True  # with the original set, but no folder for it
    ft.mix_edit.line_edit.value = ""
    assert ft.start() is None and "original training set" in ft.status_label.text()
    ft.mix_check.value = False
    state_for(viewer).set_model(isbi_model_path)
    assert ft.base_label.value == isbi_model_path.name
    args = ft.command()
    assert args[:3] == ["-m", "napari_glimpse.cli", "finetune"] and "--progress-json" in args
    assert args[args.index("--model") + 1] == str(isbi_model_path)
    assert args[args.index("--time-budget") + 1] == "4" and "--max-steps" not in args  # the defaults
    assert "--mix-data" not in args
    name = Path(args[args.index("--out") + 1]).name  # the parent and the reviewed images' count
    assert name.startswith("tiny19-ft1-") and name.endswith(".pt")
    ft.out_edit.line_edit.value = ""
    ft.mix_check.value = True
    ft.mix_edit.value = str(tmp_path)
    args = ft.command()
    assert args[args.index("--mix-data") + 1] == str(tmp_path)
    assert Path(args[args.index("--out") + 1]).name.startswith("tiny19-ft1-mix-")
    ft.mix_check.value = False
    with qtbot.waitSignal(ft.finished, timeout=120_000) as fin:
        ft.start()
    assert fin.args[0] not in (0, -1), ft.log.toPlainText()
    assert "failed" in ft.status_label.text() and "error" in ft.status_label.text()
    assert not ft.use_btn.isEnabled() and ft.start_btn.isEnabled()


def test_progress_of_the_coarse_stage_then_the_glimpses(make_napari_viewer, qtbot):
    """Progress lines from ``finetune --progress-json``: the coarse stage (per net) first, the
    fine stage, then glimpse steps; the bar and the status follow each, each stage's loss is kept."""
    from napari_glimpse._widgets._finetune import FinetuneWidget

    ft = FinetuneWidget(make_napari_viewer())
    ft.steps.value = 10
    seen = []
    ft.progressed.connect(seen.append)
    ft._on_progress({"stage": "coarse", "member": 1, "step": 4, "progress": 0.7, "elapsed_s": 3.0, "loss": 3.7})
    assert ft.progress.format() == "coarse stage, net 2: step 4"
    assert ft.progress.value() == 700 and "coarse stage, net 2" in ft.status_label.text()
    assert ft.losses == {"coarse": [3.7]}  # each stage's loss, for the plot
    ft._on_progress({"stage": "fine", "step": 3, "progress": 0.8, "elapsed_s": 4.0})
    assert ft.progress.format() == "fine stage: step 3"
    assert ft.progress.value() == 800 and "fine stage: step 3" in ft.status_label.text()
    ft._on_progress({"stage": "fine", "member": 1, "step": 5, "progress": 0.9, "elapsed_s": 4.5})  # a fine ensemble
    assert ft.progress.format() == "fine stage, net 2: step 5"
    ft._on_progress({"step": 2, "progress": 0.2, "loss_mm": 3.5, "elapsed_s": 5.0})
    assert ft.progress.format() == "glimpse net: step 2/10" and ft.progress.value() == 200
    assert ft.losses == {"coarse": [3.7], "glimpse": [3.5]} and "3.50 mm" in ft.status_label.text()
    assert ft.plot.series == ft.losses
    assert len(seen) == 4


def test_one_overall_bar_with_an_eta_across_stages(make_napari_viewer, qtbot):
    """The bar follows the whole run's progress (it never goes back when a stage or net starts)
    and shows the overall step count and the ETA; the plot keeps one line per stage."""
    from napari_glimpse._widgets._finetune import FinetuneWidget

    ft = FinetuneWidget(make_napari_viewer())
    lines = [
        {"stage": "offsets", "step": 5, "steps": 5, "overall_step": 5, "overall_total": 135, "progress": 0.02,
         "elapsed_s": 2.0, "eta_s": 98.0},
        {"stage": "coarse", "step": 30, "steps": 30, "overall_step": 35, "overall_total": 135, "progress": 0.5,
         "elapsed_s": 40.0, "eta_s": 40.0, "loss": 3.5},
        {"stage": "fine", "member": 0, "step": 1, "steps": 25, "overall_step": 36, "overall_total": 135,
         "progress": 0.51, "elapsed_s": 41.0, "eta_s": 39.4, "loss": 4.1},
        {"stage": "fine", "member": 3, "step": 25, "steps": 25, "overall_step": 135, "overall_total": 135,
         "progress": 1.0, "elapsed_s": 80.0, "eta_s": 0.0, "loss": 3.9},
    ]
    ft._on_progress({"stage": "read", "step": 2, "steps": 20, "overall_step": 2, "overall_total": 155,
                     "progress": 0.01, "elapsed_s": 1.0, "eta_s": 99.0})
    assert ft.progress.format() == "reading images: 2/20 · 2/155 · ETA 1:39"
    values = []
    for ln in lines:
        ft._on_progress(ln)
        values.append(ft.progress.value())
    assert values == sorted(values) and values[-1] == 1000  # one bar, never restarting per stage or net
    assert ft.progress.format() == "fine stage, net 4: step 25/25 · 135/135 · ETA 0:00"
    ft._on_progress(lines[2])
    assert ft.progress.format() == "fine stage, net 1: step 1/25 · 36/135 · ETA 0:39"
    assert "ETA 0:39" in ft.status_label.text() and "loss 4.10" in ft.status_label.text()
    assert set(ft.losses) == {"coarse", "fine"} and ft.plot.series["fine"] == [4.1, 3.9, 4.1]
    assert ft.plot.runs("fine") == [[4.1], [3.9], [4.1]]  # each net its own stretch of the stage's line
    ft._on_progress({**lines[3], "loss": 3.8})
    assert ft.plot.runs("fine") == [[4.1], [3.9], [4.1], [3.8]]
    assert not ft.plot.grab().isNull()  # it paints
    ft._on_progress({"done": True, "out": "x.pt", "steps": 130, "tuned": "landmark offsets, coarse 30 steps"})
    assert ft.last_step == 130 and ft.tuned == "landmark offsets, coarse 30 steps"


def test_a_run_records_what_it_tuned_with_one_rising_bar(make_napari_viewer, qtbot, tiny_data, tiny_staged_model_path,
                                                         tmp_path):
    """A real run on a model whose answer is its coarse and fine stages' (0 glimpse steps): the
    progress lines rise once from 0 to 1 across the offsets, the coarse net and both fine nets; the
    new model's metadata and the status say what was tuned; its glimpse net is the parent's."""
    import torch

    from napari_glimpse._widgets._finetune import FinetuneWidget
    from napari_glimpse._widgets._state import state_for
    from napari_glimpse.inference import GlimpseModel

    viewer = make_napari_viewer()
    ft = FinetuneWidget(viewer)
    state_for(viewer).set_model(tiny_staged_model_path)
    ft.set_data(str(tiny_data["train"]["senior_csv"]))
    ft.steps.value = 5
    out = tmp_path / "tuned.pt"
    ft.out_edit.value = str(out)
    seen = []
    ft.progressed.connect(seen.append)
    with qtbot.waitSignal(ft.finished, timeout=180_000) as fin:
        assert ft.start() is not None
    assert fin.args == [0, str(out)], ft.log.toPlainText()
    fractions = [ln["progress"] for ln in seen]
    assert fractions == sorted(fractions) and fractions[-1] > 0.99
    # 6 images read, their offsets, 1 coarse and 2 fine nets of 5 steps
    assert {ln["overall_total"] for ln in seen} == {6 + 6 + 5 + 2 * 5}
    stages = [ln.get("stage") for ln in seen]
    assert sorted(set(stages), key=stages.index) == ["read", "offsets", "coarse", "fine"]
    rec = GlimpseModel.load(out, device="cpu").meta["finetuned"]
    assert rec["stages"] == ["offsets", "coarse", "fine"] and rec["not_tuned"] == ["glimpse"]
    assert rec["steps"] == {"coarse": [5], "fine": [5, 5]} and rec["images"] == 6
    assert rec["parent"] == str(tiny_staged_model_path) and rec["seconds"] > 0
    assert "landmark offsets, coarse 5 steps, fine 2 nets x 5 steps" in ft.status_label.text()
    assert set(ft.losses) == {"coarse", "fine"}
    parent, tuned = GlimpseModel.load(tiny_staged_model_path, device="cpu"), GlimpseModel.load(out, device="cpu")
    for k, v in parent.net.state_dict().items():
        assert torch.equal(v, tuned.net.state_dict()[k]), k
