"""Fine-tune widget: wrong inputs are reported, and a failing training process too."""

from __future__ import annotations

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
    assert ft.data_edit.text() == str(bad)
    ft.lr.setText("0")
    assert ft.start() is None and "learning rate" in ft.status_label.text()
    ft.lr.setText("1e-4")
    state_for(viewer).set_model(isbi_model_path)
    assert ft.base_label.text() == isbi_model_path.name
    args = ft.command()
    assert args[:3] == ["-m", "napari_glimpse.cli", "finetune"] and "--progress-json" in args
    assert args[args.index("--model") + 1] == str(isbi_model_path)
    with qtbot.waitSignal(ft.finished, timeout=120_000) as fin:
        ft.start()
    assert fin.args[0] not in (0, -1), ft.log.toPlainText()
    assert "failed" in ft.status_label.text() and "error" in ft.status_label.text()
    assert not ft.use_btn.isEnabled() and ft.start_btn.isEnabled()


def test_progress_of_the_coarse_stage_then_the_glimpses(make_napari_viewer, qtbot):
    """Progress lines from ``finetune --progress-json``: the coarse stage (per net) first, the
    fine stage, then glimpse steps with their loss; the bar and the status follow each."""
    from napari_glimpse._widgets._finetune import FinetuneWidget

    ft = FinetuneWidget(make_napari_viewer())
    ft.steps.setValue(10)
    seen = []
    ft.progressed.connect(seen.append)
    ft._on_progress({"stage": "coarse", "member": 1, "step": 4, "progress": 0.7, "elapsed_s": 3.0})
    assert ft.progress.format() == "coarse stage, net 2: step 4"
    assert ft.progress.value() == 700 and "coarse stage, net 2" in ft.status_label.text()
    assert ft._losses == []  # nothing to plot for the coarse stage
    ft._on_progress({"stage": "fine", "step": 3, "progress": 0.8, "elapsed_s": 4.0})
    assert ft.progress.format() == "fine stage: step 3"
    assert ft.progress.value() == 800 and "fine stage: step 3" in ft.status_label.text()
    assert ft._losses == []
    ft._on_progress({"stage": "fine", "member": 1, "step": 5, "progress": 0.9, "elapsed_s": 4.5})  # a fine ensemble
    assert ft.progress.format() == "fine stage, net 2: step 5"
    ft._on_progress({"step": 2, "progress": 0.2, "loss_mm": 3.5, "elapsed_s": 5.0})
    assert ft.progress.format() == "step 2/10" and ft.progress.value() == 200
    assert ft._losses == [3.5] and "3.50 mm" in ft.status_label.text()
    assert len(seen) == 4
