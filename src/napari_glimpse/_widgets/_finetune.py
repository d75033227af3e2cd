"""Fine-tune widget: ``napari-glimpse finetune`` in a separate process, with live progress.

The training runs as ``python -m napari_glimpse.cli finetune ... --progress-json`` in a
:class:`QProcess`: napari's event loop only reads the JSON line the process prints per step,
so the viewer stays responsive, and Cancel terminates the process (killing it if it has not
ended within :data:`KILL_AFTER_MS`). When it finishes, one click makes the detect widget use
the new checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from qtpy.QtCore import QPointF, QProcess, QProcessEnvironment, QTimer, Signal
from qtpy.QtGui import QColor, QDoubleValidator, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._state import real_viewer, state_for, status

KILL_AFTER_MS = 3000



def _path_row(placeholder: str, browse) -> tuple[QLineEdit, QHBoxLayout]:
    """A path field with a "…" browse button beside it."""
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    btn = QPushButton("…")
    btn.setFixedWidth(28)
    btn.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(edit, 1)
    row.addWidget(btn)
    return edit, row

class LossPlot(QWidget):
    """A small line plot of the training loss (mm) per step."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(90)
        self.setToolTip("Training loss (mean radial error of the batch, mm; smoothed) per step")

    def set_values(self, values: list[float]) -> None:
        self.values = list(values)
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor(30, 33, 40))
        p.setPen(QColor(180, 180, 180))
        vals = [v for v in self.values if v == v]  # drop NaN
        if len(vals) < 2:
            p.drawText(8, h // 2, "loss (mm) appears here while training")
            p.end()
            return
        lo, hi = min(vals), max(vals)
        span = hi - lo or 1.0
        left, right, top, bottom = 44, 8, 8, 16
        p.drawText(2, top + 10, f"{hi:.1f}")
        p.drawText(2, h - bottom, f"{lo:.1f}")
        p.drawText(w // 2 - 30, h - 2, f"step {len(self.values)}")
        poly = QPolygonF()
        n = len(vals)
        for i, v in enumerate(vals):
            x = left + (w - left - right) * i / (n - 1)
            y = top + (h - top - bottom) * (1 - (v - lo) / span)
            poly.append(QPointF(x, y))
        p.setPen(QPen(QColor(80, 200, 255), 2))
        p.drawPolyline(poly)
        p.end()


class FinetuneWidget(QWidget):
    """Fine-tune the detection model on the reviewed (exported) landmarks."""

    progressed = Signal(dict)      # each JSON progress line
    finished = Signal(int, str)    # exit code (-1: cancelled/crashed), output model path

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # napari hands each widget its own proxy
        self.state = state_for(self.viewer)
        self.proc: QProcess | None = None
        self._buf = b""
        self._cancelled = False
        self._losses: list[float] = []
        self._t0 = 0.0
        self.last_step = 0
        self.output: Path | None = None

        self.data_edit, drow = _path_row("reviewed labels CSV (Export reviewed… fills this in)",
                                         self._browse_data)
        self.base_label = QLabel()
        self.base_label.setToolTip("Fine-tuning starts from the model the Detect widget uses")
        self.out_edit, orow = _path_row("new checkpoint (default: next to the CSV)", self._browse_out)
        self.steps = QSpinBox()
        self.steps.setRange(1, 100000)
        self.steps.setValue(200)
        self.steps.setToolTip("Optimizer steps")
        self.batch = QSpinBox()
        self.batch.setRange(0, 1024)
        self.batch.setValue(0)
        self.batch.setSpecialValueText("model's")
        self.batch.setToolTip("Batch size (default: the model's training batch size)")
        self.lr = QLineEdit("1e-4")
        self.lr.setValidator(QDoubleValidator(1e-8, 1.0, 8))
        self.lr.setMaximumWidth(80)
        self.lr.setToolTip("Learning rate (Adam)")
        self.threads = QSpinBox()
        self.threads.setRange(1, 64)
        self.threads.setValue(1)
        self.threads.setToolTip("CPU threads of the training process (leave cores to napari)")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        srow = QHBoxLayout()
        srow.addWidget(QLabel("steps"))
        srow.addWidget(self.steps)
        srow.addWidget(QLabel("batch"))
        srow.addWidget(self.batch)
        lrow = QHBoxLayout()
        lrow.addWidget(QLabel("lr"))
        lrow.addWidget(self.lr)
        lrow.addWidget(QLabel("threads"))
        lrow.addWidget(self.threads)
        lrow.addWidget(self.device)

        form = QFormLayout()
        form.addRow("Data", drow)
        form.addRow("From", self.base_label)
        form.addRow("Output", orow)
        form.addRow(srow)
        form.addRow(lrow)

        self.start_btn = QPushButton("Start fine-tuning")
        self.start_btn.clicked.connect(lambda: self.start())
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        brow = QHBoxLayout()
        brow.addWidget(self.start_btn)
        brow.addWidget(self.cancel_btn)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFormat("idle")
        self.progress.setValue(0)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.plot = LossPlot()
        self.use_btn = QPushButton("Use new model for detection")
        self.use_btn.setEnabled(False)
        self.use_btn.setToolTip("Switch the Detect widget to the fine-tuned checkpoint")
        self.use_btn.clicked.connect(self.use_new_model)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(200)
        self.log.setPlaceholderText("messages of the training process")
        self.log.setMaximumHeight(90)

        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(brow)
        lay.addWidget(self.progress)
        lay.addWidget(self.status_label)
        lay.addWidget(self.plot)
        lay.addWidget(self.use_btn)
        lay.addWidget(self.log)
        lay.addStretch(1)

        self.state.export_written.connect(self.set_data)
        self.state.model_changed.connect(self._show_base)
        self._show_base()

    # ------------------------------------------------------------------------ inputs
    def _show_base(self) -> None:
        p = self.state.model_path
        self.base_label.setText(p.name if p else "shipped default model")
        self.base_label.setToolTip(str(p) if p else "the model shipped with napari-glimpse")

    def set_data(self, path: str) -> None:
        self.data_edit.setText(str(path))

    def _browse_data(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Reviewed landmarks", "", "CSV (*.csv)")
        if path:
            self.set_data(path)

    def _browse_out(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "New checkpoint", "", "napari-glimpse model (*.pt)")
        if path:
            self.out_edit.setText(path)

    def command(self) -> list[str]:
        """The argument list of the training process (after the Python executable)."""
        data = self.data_edit.text().strip()
        out = self.out_edit.text().strip()
        if not out:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = str(Path(data).resolve().parent / f"finetuned-{stamp}.pt")
            self.out_edit.setText(out)
        args = ["-m", "napari_glimpse.cli", "finetune", "--data", data, "--out", out,
                "--max-steps", str(self.steps.value()), "--lr", self.lr.text().strip() or "1e-4",
                "--threads", str(self.threads.value()), "--device", self.device.currentText(),
                "--progress-json"]
        if self.state.model_path is not None:
            args += ["--model", str(self.state.model_path)]
        if self.batch.value() > 0:
            args += ["--batch-size", str(self.batch.value())]
        from ..spacing import remembered_spacing

        # the spacing the Detect widget remembers for the labels' images (resampled to the model's)
        folder = Path(data).expanduser().resolve().parent
        spacing = remembered_spacing(folder) or remembered_spacing(folder / "images")
        if spacing:
            args += ["--spacing", f"{spacing:g}"]
        return args

    # ------------------------------------------------------------------------ process
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.state() != QProcess.NotRunning

    def start(self) -> QProcess | None:
        """Start the training process; returns it (``None`` if the inputs are wrong)."""
        if self.running:
            return None
        data = self.data_edit.text().strip()
        if not data or not Path(data).is_file():
            status(self.status_label, "choose the reviewed labels CSV first (Corrections → Export reviewed…)", error=True)
            return None
        try:
            lr = float(self.lr.text())
        except ValueError:
            lr = -1.0
        if not 0 < lr <= 1:
            status(self.status_label, f"learning rate {self.lr.text()!r}: expected a number in (0, 1]", error=True)
            return None
        args = self.command()
        self.output = Path(self.out_edit.text().strip())
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        env.insert("TQDM_DISABLE", "1")
        env.insert("OMP_NUM_THREADS", str(self.threads.value()))
        proc.setProcessEnvironment(env)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        self.proc = proc
        self._buf = b""
        self._cancelled = False
        self._losses = []
        self.last_step = 0
        self._t0 = time.monotonic()
        self.plot.set_values([])
        self.log.clear()
        self.log.appendPlainText("$ python " + " ".join(args))
        self.use_btn.setEnabled(False)
        self.start_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.progress.setFormat("starting (loading model and images)…")
        status(self.status_label, f"fine-tuning {self.base_label.text()} on {Path(data).name}…")
        proc.start(sys.executable, args)
        return proc

    def cancel(self) -> None:
        """Terminate the training process; kill it if it is still there after a few seconds."""
        if not self.running:
            return
        self._cancelled = True
        self.cancel_btn.setEnabled(False)
        status(self.status_label, "cancelling…")
        assert self.proc is not None
        self.proc.terminate()
        proc = self.proc
        QTimer.singleShot(KILL_AFTER_MS, lambda: proc.kill() if proc.state() != QProcess.NotRunning else None)

    def _read_stdout(self) -> None:
        if self.proc is None:
            return
        self._buf += bytes(self.proc.readAllStandardOutput())
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                info = json.loads(line)
            except ValueError:
                self.log.appendPlainText(line)
                continue
            if isinstance(info, dict):
                self._on_progress(info)

    def _read_stderr(self) -> None:
        if self.proc is None:
            return
        text = bytes(self.proc.readAllStandardError()).decode("utf-8", "replace").rstrip()
        if text:
            self.log.appendPlainText(text)

    def _on_progress(self, info: dict) -> None:
        if info.get("done"):
            self.last_step = int(info.get("steps", self.last_step))
            return
        self.last_step = int(info.get("step", 0))
        frac = float(info.get("progress", 0.0))
        loss = info.get("loss_mm")
        if loss is not None:
            self._losses.append(float(loss))
            self.plot.set_values(self._losses)
        self.progress.setValue(int(min(1.0, frac) * 1000))
        el = float(info.get("elapsed_s", 0.0))
        if info.get("stage") == "int8":  # then their int8 graphs are made again
            what = f"int8 graphs: net {self.last_step}"
            self.progress.setFormat(what)
            status(self.status_label, what)
            self.progressed.emit(info)
            return
        if info.get("stage") in ("coarse", "fine"):  # the model's coarse and fine stages are fine-tuned first
            net = f", net {int(info['member']) + 1}" if "member" in info else ""
            what = f"{info['stage']} stage{net}: step {self.last_step}"
            self.progress.setFormat(what)
            status(self.status_label, f"{what}, {el:.0f} s")
            self.progressed.emit(info)
            return
        self.progress.setFormat(f"step {self.last_step}/{self.steps.value()}")
        status(self.status_label, f"step {self.last_step}: loss {loss:.2f} mm, {el:.0f} s" if loss is not None
               else f"step {self.last_step}")
        self.progressed.emit(info)

    def _on_error(self, err) -> None:
        if err == QProcess.FailedToStart:
            status(self.status_label, f"could not start {sys.executable}", error=True)
            self._reset_buttons()
            self.finished.emit(-1, "")

    def _reset_buttons(self) -> None:
        self.start_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def _on_finished(self, code: int, exit_status) -> None:
        self._read_stdout()
        self._read_stderr()
        self._reset_buttons()
        secs = time.monotonic() - self._t0
        out = self.output
        if self._cancelled:
            self.progress.setFormat("cancelled")
            status(self.status_label, f"cancelled after {self.last_step} step(s), {secs:.0f} s; no model written")
            self.finished.emit(-1, "")
            return
        if code == 0 and out is not None and out.is_file():
            self.progress.setValue(1000)
            self.progress.setFormat("done")
            loss = f", loss {self._losses[-1]:.2f} mm" if self._losses else ""
            status(self.status_label, f"wrote {out.name}: {self.last_step} steps in {secs:.0f} s{loss}")
            self.use_btn.setEnabled(True)
            self.finished.emit(0, str(out))
            return
        last = self.log.toPlainText().strip().splitlines()
        msg = next((ln for ln in reversed(last) if "error" in ln.lower()), last[-1] if last else "")
        self.progress.setFormat("failed")
        status(self.status_label, f"fine-tuning failed (exit {code}): {msg}", error=True)
        self.finished.emit(int(code) if code else -1, "")

    def use_new_model(self) -> None:
        """Make the detect widget use the fine-tuned checkpoint."""
        if self.output is not None and self.output.is_file():
            self.state.set_model(self.output)
            status(self.status_label, f"detection now uses {self.output.name}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        if self.running:
            self.cancel()
        super().closeEvent(event)
