"""What the GUI tests need, and helpers they share."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "isbi2015"


def gui_missing() -> str | None:
    """Why the GUI tests cannot run here, or None."""
    for mod, pkg in (("napari", "napari"), ("pytestqt", "pytest-qt"), ("qtpy", "qtpy")):
        if importlib.util.find_spec(mod) is None:
            return f"{pkg} is not installed"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (run under xvfb-run -a)"
    return None


def require_gui() -> None:
    """Skip the calling test module when napari, pytest-qt or a display is missing."""
    why = gui_missing()
    if why:
        pytest.skip(why, allow_module_level=True)


def require_isbi() -> Path:
    if not (REAL_DATA / "images" / "151.jpg").is_file():
        pytest.skip(f"ISBI 2015 data not found at {REAL_DATA}")
    return REAL_DATA


class LoopWatch:
    """Measures how long the Qt event loop goes without running a 10 ms timer."""

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.worst = 0.0
        self.ticks = 0
        self._last = 0.0

    def _tick(self) -> None:
        now = time.perf_counter()
        self.worst = max(self.worst, now - self._last)
        self._last = now
        self.ticks += 1

    def start(self) -> "LoopWatch":
        self.worst, self.ticks = 0.0, 0
        self._last = time.perf_counter()
        self.timer.start()
        return self

    def stop(self) -> float:
        self._tick()
        self.timer.stop()
        return self.worst


def idle_repaint_stall(viewer, qtbot, repaints: int = 6) -> float:
    """The worst event-loop stall while napari only redraws its canvas ``repaints`` times: what one
    frame of this window costs on this machine now (software GL redraws it all, and a busy machine
    makes that slower). Stall bounds scale with it instead of being raw timings."""
    canvas = viewer.window._qt_viewer.canvas._scene_canvas.native
    watch = LoopWatch().start()
    for _ in range(repaints):
        canvas.update()
        qtbot.wait(120)
    return watch.stop()


def drag_point(viewer, layer, row: int, to_yx, qtbot, steps: int = 8) -> None:
    """Drag point ``row`` of ``layer`` to data position ``to_yx`` with real Qt mouse events on
    napari's canvas (press on the point, move in ``steps``, release), as a hand does."""
    import numpy as np
    from qtpy.QtCore import QEvent, QPointF, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    canvas = viewer.window._qt_viewer.canvas
    native = canvas._scene_canvas.native
    tr = canvas.layer_to_visual[layer].node.get_transform(map_from="visual", map_to="canvas")

    def at(yx):
        p = tr.map([yx[1], yx[0]])
        return QPointF(p[0] / p[3], p[1] / p[3])

    def send(kind, pt, buttons):
        ev = QMouseEvent(kind, pt, native.mapToGlobal(pt.toPoint()), Qt.LeftButton, buttons, Qt.NoModifier)
        QApplication.sendEvent(native, ev)

    layer.mode = "select"
    start, end = np.asarray(layer.data[row], dtype=float), np.asarray(to_yx, dtype=float)
    send(QEvent.MouseButtonPress, at(start), Qt.LeftButton)
    qtbot.wait(30)
    for i in range(1, steps + 1):
        send(QEvent.MouseMove, at(start + (end - start) * i / steps), Qt.LeftButton)
        qtbot.wait(15)
    send(QEvent.MouseButtonRelease, at(end), Qt.NoButton)
    qtbot.wait(120)  # the review widget logs a drag once the button is up (50 ms poll)


def run_gui_script(script: str, args, tmp_path: Path, isbi: Path, timeout: float):
    """Run ``script`` in a fresh Python with ISBI 151 linked into ``tmp_path`` (so the default
    corrections log stays out of the data), one OpenMP thread and a private settings file: a
    segfault fails the calling test instead of killing pytest. ``args`` is called with the image's
    path and returns the script's arguments. Returns ``(completed process, output tail)`` after
    checking the exit code."""
    import subprocess

    env = dict(os.environ, NAPARI_GLIMPSE_CONFIG=str(tmp_path / "settings.json"), OMP_NUM_THREADS="1")
    img = tmp_path / "151.jpg"
    img.symlink_to(isbi / "images" / "151.jpg")
    r = subprocess.run([sys.executable, "-c", script, *map(str, args(img))],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, f"exit {r.returncode} (negative = killed by signal {-r.returncode})\n{tail}"
    return r, tail


def click_at(viewer, layer, yx, qtbot) -> None:
    """A left click at data position ``yx`` of ``layer`` with real Qt mouse events on napari's canvas
    (press, release), as a hand does: in add mode it places a point there."""
    from qtpy.QtCore import QEvent, QPointF, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    canvas = viewer.window._qt_viewer.canvas
    native = canvas._scene_canvas.native
    tr = canvas.layer_to_visual[layer].node.get_transform(map_from="visual", map_to="canvas")
    p = tr.map([yx[1], yx[0]])
    pt = QPointF(p[0] / p[3], p[1] / p[3])
    for kind, buttons in ((QEvent.MouseButtonPress, Qt.LeftButton), (QEvent.MouseButtonRelease, Qt.NoButton)):
        ev = QMouseEvent(kind, pt, native.mapToGlobal(pt.toPoint()), Qt.LeftButton, buttons, Qt.NoModifier)
        QApplication.sendEvent(native, ev)
        qtbot.wait(30)
    qtbot.wait(120)  # the review widget logs an edit once the button is up (50 ms poll)
