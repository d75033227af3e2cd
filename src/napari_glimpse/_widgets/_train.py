"""Train a model widget: a new model, from scratch, for the landmark set of the labelled images.

Once some images are labelled (accepted in the corrections log; annotated from zero or reviewed),
``napari-glimpse train --recipe default`` runs on their exported CSV in a separate process, as the
Fine-tune widget runs ``finetune``: the same process handling, one progress bar with an ETA across
the stages, each stage's loss, Cancel, and "Use new model for detection" at the end. The CSV's folder
holds the set (``landmarks.json``), which the new model carries: the Detect widget then finds that
set's points. The form is magicgui; the command line is :func:`napari_glimpse.annotate.train_command`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, SpinBox
from qtpy.QtWidgets import QLabel

from ..annotate import (
    DEFAULT_TRAIN_MINUTES,
    csv_rows,
    labels_csv_set,
    save_folder_set,
    set_beside_labels,
    train_command,
)
from ..errors import GlimpseError
from ._finetune import FinetuneWidget, _text
from ._state import error_text

HELP = ("Trains a new model from scratch on the labelled images (accepted in Review and corrections, exported as a "
        "CSV with the folder's landmarks.json beside it): the default recipe (a coarse net and four fine nets) in the "
        "minutes given, each stage capped at Steps (0: the recipe's). It runs in a separate process; the new model "
        "finds the set's landmarks.")


class TrainWidget(FinetuneWidget):
    """Train a model for the labelled images' landmark set (see the module's doc)."""

    task = "training"

    def __init__(self, napari_viewer: Any):
        super().__init__(napari_viewer)
        self.start_btn.setText("Start training")
        self.use_btn.setToolTip("Switch the Detect widget to the new model")
        help_label = QLabel(HELP)
        help_label.setWordWrap(True)
        self.body_layout.insertWidget(1, help_label)
        self.state.log_changed.connect(self._show_base)

    def _build_form(self) -> Container:
        """The form (magicgui): the labels, the set beside them, the new model's file, time and steps."""
        self.data_edit = FileEdit(mode="r", filter="*.csv", label="Labels",
                                  tooltip="the labelled images' CSV (Review and corrections → Export reviewed… fills "
                                          "this in; empty: the accepted images of the open log are exported first)")
        self.data_edit.changed.connect(lambda _v: self._show_base())
        self.set_label = Label(label="Landmark set", tooltip="the set beside the CSV (its landmarks.json)")
        self.out_edit = FileEdit(mode="w", filter="*.pt", label="New model",
                                 tooltip="default: next to the CSV, named after the set, the number of images and "
                                         "the time")
        self.minutes = FloatSpinBox(value=DEFAULT_TRAIN_MINUTES, min=0.1, max=600.0, step=5.0, label="Minutes",
                                    tooltip="time budget of the training (every stage of the recipe gets its share); "
                                            "the int8 graphs are made after it")
        self.steps = SpinBox(value=0, min=0, max=100000, label="Steps (0: recipe's)",
                             tooltip="cap on the optimizer steps of each stage (0: the recipe's, thousands)")
        self.threads = SpinBox(value=1, min=1, max=64, label="Threads",
                               tooltip="CPU threads of the training process (leave cores to napari)")
        self.device = ComboBox(choices=["auto", "cpu", "cuda"], value="auto", label="Device")
        return Container(widgets=[self.data_edit, self.set_label, self.out_edit, self.minutes, self.steps,
                                  self.threads, self.device], labels=True)

    def _show_base(self) -> None:
        """Show the set beside the CSV (or the log's, before an export) and how many images it has."""
        data = _text(self.data_edit)
        try:
            lset = labels_csv_set(data) if data else None
        except GlimpseError as exc:
            self.set_label.value = error_text(exc)
            return
        log = self.state.log
        if data and Path(data).is_file():
            n = f"{csv_rows(data)} labelled images"
        elif log is not None:
            n = f"{len(log.state.accepted())} accepted images in the log (exported when training starts)"
        else:
            n = "no labels yet"
        lset = lset or self.state.landmark_set
        self.set_label.value = (f"{lset.name}: {len(lset)} landmarks; " if lset is not None else "") + n

    def default_output(self, data: str) -> str:
        """``SET-NimgTIME.pt`` next to the CSV."""
        lset = labels_csv_set(data) or self.state.landmark_set
        name = lset.name if lset is not None else "model"
        return str(Path(data).resolve().parent / f"{name}-{csv_rows(data)}img-{time.strftime('%Y%m%d-%H%M%S')}.pt")

    def _export_first(self) -> str | None:
        """No CSV chosen: export the open log's accepted images (the review's default file)."""
        log = self.state.log
        if log is None or not log.state.accepted():
            return None
        out = log.export_training_csv()
        self.state.export_written.emit(str(out))
        return str(out)

    def check_inputs(self) -> str | None:
        data = _text(self.data_edit)
        try:
            if not data:
                data = self._export_first() or ""
            if not data or not Path(data).is_file():
                return "label some images first (accept them in Review and corrections, then Export reviewed…)"
            if csv_rows(data) < 1:
                return f"{Path(data).name} holds no labelled image"
            folder = Path(data).resolve().parent
            if labels_csv_set(data) is None and self.state.landmark_set is not None:
                # the set must travel with the labels: written only beside a CSV of as many landmarks
                save_folder_set(set_beside_labels(data, self.state.landmark_set), folder)
        except GlimpseError as exc:
            return error_text(exc)
        except OSError as exc:
            return f"cannot write the landmark set beside {data}: {exc.strerror or exc}"
        return None

    def start_text(self) -> str:
        data = _text(self.data_edit)
        lset = labels_csv_set(data)
        what = lset.describe() if lset is not None else "its landmarks"
        return f"training a model for {what} on {csv_rows(data)} images of {Path(data).name}…"

    def command(self) -> list[str]:
        """The argument list of the training process (after the Python executable)."""
        data, out, spacing = self._data_out_spacing()
        return train_command(data, out, self.minutes.value, self.steps.value, self.threads.value, self.device.value,
                             spacing)

    def use_new_model(self) -> None:
        """Make the Detect widget use the new model (its landmarks are known: no detection on another set's
        folder waits for it to load)."""
        if self.output is not None and self.output.is_file():
            lset = labels_csv_set(_text(self.data_edit))
            if lset is not None:
                self.state.model_names[str(self.output)] = lset.names
        super().use_new_model()
