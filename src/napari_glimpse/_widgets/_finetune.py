"""Fine-tune widget: ``napari-glimpse finetune`` in a separate process, with live progress.

The training runs as ``python -m napari_glimpse.cli finetune ... --progress-json`` in a
:class:`QProcess`: napari's event loop only reads the JSON line the process prints per step,
so the viewer stays responsive, and Cancel terminates the process (killing it if it has not
ended within :data:`KILL_AFTER_MS`). When it finishes, one click makes the detect widget use
the new checkpoint.

The form is a magicgui :class:`~magicgui.widgets.Container` (the reviewed labels, the new model's
file, "with the original training set" and its folder, the time budget, and the rarer settings);
the buttons, the progress bar, the loss plot and the log are plain Qt. The process's progress
lines carry the whole run's step count, fraction and ETA (``napari_glimpse.finetune.Progress``):
one bar goes once across every stage and net, and the loss of each stage tuned is plotted, each
in its own colour. What was tuned is in the new model's ``meta['finetuned']`` and its default
file name (the reviewed images' count, ``-mix`` with the original set).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, SpinBox
from qtpy.QtCore import QPointF, QProcess, QProcessEnvironment, QTimer, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QHBoxLayout,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ._state import real_viewer, scroll_body, set_bar, state_for, status, status_label

KILL_AFTER_MS = 3000
PROGRESS_HZ = 4  # the bar and the status follow the training at most this often



# finetune's default time budget, minutes (as the command's --time-budget)
DEFAULT_MINUTES = 4.0
# each stage's line in the loss plot
STAGE_COLOURS = {"coarse": (255, 170, 60), "fine": (120, 220, 120), "glimpse": (80, 200, 255)}


# the training process's CPU priority below napari's: the viewer stays responsive on a few cores
FINETUNE_NICE = 10


def _text(edit: FileEdit) -> str:
    """A path field's text as typed ('' when empty; its value would be the current folder)."""
    return str(edit.line_edit.value).strip()


def _clock(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 60}:{s % 60:02d}"


def original_set_folder() -> str:
    """The ISBI folder the plugin knows of (``$NAPARI_GLIMPSE_DATA``, else the sample data's
    ``data_dir`` setting), as a data set folder with ``train_*.csv``; '' if none."""
    import os

    from .._sample_data import ENV_DATA, read_settings

    for given in (os.environ.get(ENV_DATA), read_settings().get("data_dir")):
        if not given:
            continue
        for folder in (Path(given), Path(given).parent):
            if any(folder.glob("train*.csv")) or (folder / "RawImage").is_dir():
                return str(folder)
    return ""


class LossPlot(QWidget):
    """The training loss of each stage tuned, per step: one line per stage, each net of the stage
    its own stretch of it (``nets``: the net of each point), each stage scaled to its own range (the
    coarse and fine nets' heatmap cross-entropy and the glimpse net's error in mm do not share a
    scale; a range under 5 % of the values is not stretched further); the legend gives each stage's
    first and last loss (the mean over its nets)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.series: dict[str, list[float]] = {}
        self.nets: dict[str, list[int]] = {}
        self.setMinimumHeight(90)
        self.setToolTip("Training loss per step of each stage tuned (coarse and fine: heatmap cross-entropy; "
                        "glimpse: mean radial error of the batch, mm; smoothed), each on its own scale")

    def set_series(self, series: dict[str, list[float]], nets: dict[str, list[int]] | None = None) -> None:
        self.series = {k: list(v) for k, v in series.items()}
        self.nets = {k: list(v) for k, v in (nets or {}).items()}
        self.update()

    def set_values(self, values: list[float]) -> None:
        """One series (the glimpse net's)."""
        self.set_series({"glimpse": values} if values else {})

    def runs(self, stage: str) -> list[list[float]]:
        """The stage's losses, net by net."""
        vals, nets = self.series.get(stage, []), self.nets.get(stage, [])
        if len(nets) != len(vals):
            nets = [0] * len(vals)
        out: list[list[float]] = []
        for i, v in enumerate(vals):
            if i == 0 or nets[i] != nets[i - 1]:
                out.append([])
            out[-1].append(v)
        return out

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor(30, 33, 40))
        p.setPen(QColor(180, 180, 180))
        stages = [k for k, v in self.series.items() if len([x for x in v if x == x]) >= 2]  # NaN dropped
        if not stages:
            p.drawText(8, h // 2, "the loss of each stage appears here while training")
            p.end()
            return
        left, right, top, bottom = 8, 8, 8, 8
        for row, stage in enumerate(stages):
            vals = self.series[stage]
            finite = [v for v in vals if v == v]
            lo, hi = min(finite), max(finite)
            span = max(hi - lo, 0.05 * max(abs(hi), abs(lo), 1e-9))
            mid = (hi + lo) / 2
            colour = QColor(*STAGE_COLOURS.get(stage, (200, 200, 200)))
            p.setPen(QPen(colour, 2))
            x0, runs = 0, self.runs(stage)
            for run in runs:
                poly = QPolygonF()
                for i, v in enumerate(run):
                    if v == v:
                        poly.append(QPointF(left + (w - left - right) * (x0 + i) / max(1, len(vals) - 1),
                                            top + (h - top - bottom) * (0.5 - (v - mid) / span)))
                p.drawPolyline(poly)
                x0 += len(run)
            first = sum(r[0] for r in runs) / len(runs)
            last = sum(r[-1] for r in runs) / len(runs)
            nets = f", {len(runs)} nets" if len(runs) > 1 else ""
            p.drawText(left + 4, top + 12 + 14 * row, f"{stage}{nets}: {first:.2f} → {last:.2f} ({len(vals)} steps)")
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
        self.losses: dict[str, list[float]] = {}  # each stage's loss per step (its nets one after another)
        self.loss_nets: dict[str, list[int]] = {}  # the net of each of them
        self.tuned = ""  # what the finished run tuned, in a few words
        self._t0 = 0.0
        self._painted = 0.0  # when the loss plot was last repainted
        self.last_step = 0
        self.output: Path | None = None
        self._pending: dict | None = None  # the latest progress line, shown at most PROGRESS_HZ a second
        self._shown_at = 0.0
        self._pending_timer = QTimer(self)
        self._pending_timer.setSingleShot(True)
        self._pending_timer.timeout.connect(self._show_pending)
        self.form = self._build_form()

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
        self.status_label = status_label()
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

        lay = scroll_body(self)
        lay.addWidget(self.form.native)
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
    def _build_form(self) -> Container:
        """The form (magicgui): what to tune on, where to write it, with what, for how long."""
        self.data_edit = FileEdit(mode="r", filter="*.csv", label="Reviewed labels",
                                  tooltip="the reviewed labels CSV (Corrections → Export reviewed… fills this in)")
        self.base_label = Label(label="From", tooltip="Fine-tuning starts from the model the Detect widget uses")
        self.out_edit = FileEdit(mode="w", filter="*.pt", label="New model",
                                 tooltip="default: next to the CSV, named after the model, the number of reviewed "
                                         "images (-mix: with the original set) and the time")
        self.mix_check = CheckBox(text="with the original training set", value=False,
                                  tooltip="also replay as many images of the original training set (e.g. ISBI) as "
                                          "there are reviewed ones, so the model keeps what it learned there")
        self.mix_edit = FileEdit(mode="d", label="Original set", value=original_set_folder() or "",
                                 tooltip="the original training set's folder (with train_senior.csv / "
                                         "train_junior.csv and images/)")
        self.minutes = FloatSpinBox(value=DEFAULT_MINUTES, min=0.5, max=600.0, step=0.5, label="Minutes",
                                    tooltip="time budget of the tuning (the int8 graphs are remade after it, about "
                                            "half a minute); the stages share it")
        self.steps = SpinBox(value=0, min=0, max=100000, label="Steps (0: defaults)",
                             tooltip="optimizer steps of each net (0: the defaults, coarse 30, fine 100 per net, "
                                     "glimpse 200 where the answer uses it)")
        self.batch = SpinBox(value=0, min=0, max=1024, label="Batch (0: model's)",
                             tooltip="the glimpse net's batch size (0: the model's)")
        self.lr = LineEdit(value="1e-4", label="Learning rate",
                           tooltip="the glimpse net's (Adam); the coarse and fine nets learn at a tenth of their own")
        self.threads = SpinBox(value=1, min=1, max=64, label="Threads",
                               tooltip="CPU threads of the training process (leave cores to napari)")
        self.device = ComboBox(choices=["auto", "cpu", "cuda"], value="auto", label="Device")
        self.mix_edit.enabled = False
        self.mix_check.changed.connect(lambda on: setattr(self.mix_edit, "enabled", bool(on)))
        return Container(widgets=[self.data_edit, self.base_label, self.out_edit, self.mix_check, self.mix_edit,
                                  self.minutes, self.steps, self.batch, self.lr, self.threads, self.device],
                         labels=True)

    def _show_base(self) -> None:
        p = self.state.model_path
        self.base_label.value = p.name if p else "shipped default model"
        self.base_label.tooltip = str(p) if p else "the model shipped with napari-glimpse"

    def set_data(self, path: str) -> None:
        self.data_edit.value = str(path)

    def default_output(self, data: str) -> str:
        """The new model's default file: next to the CSV, ``PARENT-ftN[-mix]-TIME.pt`` (N reviewed images)."""
        try:
            n = max(0, sum(1 for line in Path(data).read_text().splitlines() if line.strip()) - 1)
        except (OSError, UnicodeDecodeError):
            n = 0
        parent = self.state.model_path.stem if self.state.model_path else "default"
        mix = "-mix" if self.mix_check.value else ""
        return str(Path(data).resolve().parent / f"{parent}-ft{n}{mix}-{time.strftime('%Y%m%d-%H%M%S')}.pt")

    def _data_out_spacing(self) -> tuple[str, str, float | None]:
        """The labels' CSV, the new model's file (the default output filled in when empty) and the
        spacing the Detect widget remembers for the labels' images (resampled to the model's; None:
        none remembered), for :meth:`command`."""
        from ..spacing import remembered_spacing

        data = _text(self.data_edit)
        out = _text(self.out_edit)
        if not out:
            out = self.default_output(data)
            self.out_edit.value = out
        folder = Path(data).expanduser().resolve().parent
        return data, out, remembered_spacing(folder) or remembered_spacing(folder / "images")

    def command(self) -> list[str]:
        """The argument list of the training process (after the Python executable)."""
        data, out, spacing = self._data_out_spacing()
        args = ["-m", "napari_glimpse.cli", "finetune", "--data", data, "--out", out,
                "--time-budget", f"{self.minutes.value:g}", "--lr", self.lr.value.strip() or "1e-4",
                "--threads", str(self.threads.value), "--device", self.device.value, "--progress-json",
                "--nice", str(FINETUNE_NICE)]
        if self.steps.value > 0:
            args += ["--max-steps", str(self.steps.value)]
        if self.mix_check.value and _text(self.mix_edit):
            args += ["--mix-data", _text(self.mix_edit)]
        if self.state.model_path is not None:
            args += ["--model", str(self.state.model_path)]
        if self.batch.value > 0:
            args += ["--batch-size", str(self.batch.value)]
        if spacing:
            args += ["--spacing", f"{spacing:g}"]
        return args

    # ------------------------------------------------------------------------ process
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.state() != QProcess.NotRunning

    task = "fine-tuning"  # what the process does, in the status lines

    def check_inputs(self) -> str | None:
        """What is wrong with the form's inputs (one line), or None."""
        data = _text(self.data_edit)
        if not data or not Path(data).is_file():
            return "choose the reviewed labels CSV first (Corrections → Export reviewed…)"
        try:
            lr = float(self.lr.value)
        except ValueError:
            lr = -1.0
        if not 0 < lr <= 1:
            return f"learning rate {self.lr.value!r}: expected a number in (0, 1]"
        mix = _text(self.mix_edit)
        if self.mix_check.value and not (mix and Path(mix).is_dir()):
            return ("choose the original training set's folder (with train_senior.csv / train_junior.csv), or untick "
                    "“with the original training set”")
        return None

    def start_text(self) -> str:
        return f"fine-tuning {self.base_label.value} on {Path(_text(self.data_edit)).name}…"

    def start(self) -> QProcess | None:
        """Start the training process; returns it (``None`` if the inputs are wrong)."""
        if self.running:
            return None
        problem = self.check_inputs()
        if problem:
            status(self.status_label, problem, error=True)
            return None
        args = self.command()
        self.output = Path(_text(self.out_edit))
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        env.insert("TQDM_DISABLE", "1")
        env.insert("OMP_NUM_THREADS", str(self.threads.value))
        proc.setProcessEnvironment(env)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        self.proc = proc
        self._buf = b""
        self._cancelled = False
        self._pending = None
        self.losses, self.loss_nets = {}, {}
        self.tuned = ""
        self.last_step = 0
        self._t0 = time.monotonic()
        self.plot.set_series({})
        self.log.clear()
        self.log.appendPlainText("$ python " + " ".join(args))
        self.use_btn.setEnabled(False)
        self.start_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        set_bar(self.progress, 0, "starting (loading model and images)…")
        status(self.status_label, self.start_text())
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
        kill = QTimer(proc)  # goes with the process object (a closed widget deletes it)
        kill.setSingleShot(True)
        kill.timeout.connect(lambda: proc.kill() if proc.state() != QProcess.NotRunning else None)
        kill.start(KILL_AFTER_MS)

    def _read_stdout(self) -> None:
        if self.proc is None:
            return
        self._buf += bytes(self.proc.readAllStandardOutput())
        *lines, self._buf = self._buf.split(b"\n")
        infos = []
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
                infos.append(info)
        # the bar, the status and the plot follow at most PROGRESS_HZ times a second (the last line
        # of a burst): on software GL every window repaint redraws the canvas too
        steps = [i for i in infos if not i.get("done")]
        for info in ([self._pending] if steps and self._pending else []) + steps[:-1]:
            self._record_loss(info)
            self.progressed.emit(info)
        if steps:
            self._pending = steps[-1]
        done = [i for i in infos if i.get("done")]
        if done:
            self._show_pending()
            for info in done:
                self._on_progress(info)
        elif steps:
            wait_s = 1.0 / PROGRESS_HZ - (time.monotonic() - self._shown_at)
            if wait_s <= 0:
                self._show_pending()
            elif not self._pending_timer.isActive():
                self._pending_timer.start(int(wait_s * 1000) + 1)

    def _show_pending(self) -> None:
        """Show the latest progress line not shown yet."""
        self._pending_timer.stop()
        info, self._pending = self._pending, None
        if info is not None:
            self._shown_at = time.monotonic()
            self._on_progress(info)

    def _record_loss(self, info: dict) -> None:
        loss = info.get("loss_mm", info.get("loss"))
        if loss is not None:
            stage = info.get("stage", "glimpse")
            self.losses.setdefault(stage, []).append(float(loss))
            self.loss_nets.setdefault(stage, []).append(int(info.get("member", 0)))

    def _read_stderr(self) -> None:
        if self.proc is None:
            return
        text = bytes(self.proc.readAllStandardError()).decode("utf-8", "replace").rstrip()
        if text:
            self.log.appendPlainText(text)

    def _on_progress(self, info: dict) -> None:
        """One progress line: the bar shows the whole run (``progress``, ``overall_step`` of
        ``overall_total``, ``eta_s``), the status the current stage and net, the plot each stage's loss."""
        if info.get("done"):
            self.last_step = int(info.get("steps", self.last_step))
            self.tuned = str(info.get("tuned", info.get("summary", "")))
            return
        self.last_step = int(info.get("step", 0))
        stage = info.get("stage", "glimpse")  # a glimpse step's line names no stage
        loss = info.get("loss_mm", info.get("loss"))
        if loss is not None:
            self._record_loss(info)
            self.plot.series, self.plot.nets = self.losses, self.loss_nets
            if time.monotonic() - self._painted > 0.25:  # a repaint per step would crowd the event loop
                self._painted = time.monotonic()
                self.plot.update()
        what = self._step_text(stage, info)
        bar = what
        if "overall_total" in info:
            bar += f" · {info['overall_step']}/{info['overall_total']}"
        eta = f"ETA {_clock(info['eta_s'])}" if info.get("eta_s") is not None else ""
        set_bar(self.progress, int(min(1.0, float(info.get("progress", 0.0))) * 1000), f"{bar} · {eta}" if eta else bar)
        el = float(info.get("elapsed_s", 0.0))
        loss_text = f", loss {loss:.2f}{' mm' if 'loss_mm' in info else ''}" if loss is not None else ""
        status(self.status_label, f"{what}{loss_text}, {el:.0f} s" + (f", {eta}" if eta else ""))
        self.progressed.emit(info)

    def _step_text(self, stage: str, info: dict) -> str:
        step = self.last_step
        of = f"/{info['steps']}" if "steps" in info else ""
        if stage == "int8":  # the int8 graphs are made again at the end
            return f"int8 graphs: net {step}{of}"
        if stage == "offsets":
            return f"landmark offsets: image {step}{of}"
        if stage == "read":
            return f"reading images: {step}{of}"
        if stage in ("coarse", "fine"):
            net = f", net {int(info['member']) + 1}" if "member" in info else ""
            return f"{stage} stage{net}: step {step}{of}"
        return f"glimpse net: step {step}{of or (f'/{self.steps.value}' if self.steps.value else '')}"

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
        self._show_pending()
        self._read_stderr()
        self._reset_buttons()
        secs = time.monotonic() - self._t0
        out = self.output
        if self._cancelled:
            set_bar(self.progress, fmt="cancelled")
            status(self.status_label, f"cancelled after {self.last_step} step(s), {secs:.0f} s; no model written")
            self.finished.emit(-1, "")
            return
        self.plot.update()
        if code == 0 and out is not None and out.is_file():
            set_bar(self.progress, 1000, "done")
            what = self.tuned or f"{self.last_step} steps"
            status(self.status_label, f"wrote {out.name}: {what}, in {secs:.0f} s")
            self.use_btn.setEnabled(True)
            self.finished.emit(0, str(out))
            return
        last = self.log.toPlainText().strip().splitlines()
        msg = next((ln for ln in reversed(last) if "error" in ln.lower()), last[-1] if last else "")
        set_bar(self.progress, fmt="failed")
        status(self.status_label, f"{self.task} failed (exit {code}): {msg}", error=True)
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
