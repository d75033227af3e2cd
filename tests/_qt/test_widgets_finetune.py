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
