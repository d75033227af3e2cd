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
