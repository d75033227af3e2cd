#!/usr/bin/env python
"""GUI speed of the napari plugin, in a real viewer (run under ``xvfb-run -a``).

* **cold click-to-points**: a fresh process opens napari, the Detect widget (through
  ``add_plugin_dock_widget``) and ISBI 151, and clicks Detect at once; seconds until the points
  are on the canvas (imports, model load and first inference included);
* **warm click-to-points**: the same click again on the open viewer (median of ``--rounds``);
* **next image**: PageDown in an open folder until the next image's points are shown;
* **worst event-loop stall** during a detection and during a fine-tune run (a 10 ms QTimer's
  longest gap), and the fine-tune's wall time;
* for scale, the worst stall while the idle window only redraws its canvas (``canvas.update()``;
  on software GL one frame redraws the whole canvas), and the one while the window first shows.

The cold click comes once the window has drawn its first frame (as soon as a user could click),
not before: the window's first show is timed apart (``startup_stall_s``, ``to_first_frame_s``).
The script waits inside a ``QEventLoop`` as napari runs inside ``QApplication.exec`` (with bare
``processEvents()`` calls, napari's "in progress" spinner from ``viewer.open`` never stops and
redraws the whole window 30 times a second, canvas composition included).

Usage::

    xvfb-run -a -s "-screen 0 1920x1200x24" python benchmarks/gui.py --out benchmarks/results/gui.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2015"

CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
t_start = time.perf_counter()
import napari
from qtpy.QtCore import QEventLoop, Qt, QTimer
from qtpy.QtWidgets import QApplication
data, rounds, finetune_steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
viewer = napari.Viewer(show=True)
app = QApplication.instance()
folder = Path(tempfile.mkdtemp())
for n in ("151.jpg", "152.jpg", "153.jpg", "154.jpg"):
    (folder / n).symlink_to(data / "images" / n)

class Watch:
    def __init__(self):
        self.t = QTimer(); self.t.setInterval(10); self.t.timeout.connect(self.tick); self.worst = 0.0
    def tick(self):
        now = time.perf_counter()
        if now - self.last > self.worst:
            self.worst, self.worst_at = now - self.last, self.last - self.t0
        self.last = now
    def start(self):
        self.worst = 0.0; self.t0 = self.last = time.perf_counter(); self.worst_at = 0.0; self.t.start(); return self
    def stop(self):
        self.tick(); self.t.stop(); return self.worst

def run_loop(until, timeout):
    # napari runs inside QApplication.exec; a loop of processEvents() calls is not the same: Qt never
    # deletes objects deleteLater'd outside an event loop, and napari's "in progress" spinner (from
    # viewer.open) then animates for good, redrawing the whole window 30 times a second
    loop = QEventLoop(); poll = QTimer(); poll.setInterval(2)
    poll.timeout.connect(lambda: loop.quit() if until() else None)
    QTimer.singleShot(int(timeout * 1000), loop.quit)
    poll.start(); loop.exec_(); poll.stop()

def wait(flag, timeout=300):
    if not flag:
        run_loop(lambda: bool(flag), timeout)
    assert flag, "timed out"

def pump(seconds):
    t0 = time.perf_counter()
    run_loop(lambda: time.perf_counter() - t0 >= seconds, seconds + 1)

viewer.open(str(folder / "151.jpg"), plugin="napari-glimpse")
_d, detect = viewer.window.add_plugin_dock_widget("napari-glimpse", "Detect landmarks")
_d, review = viewer.window.add_plugin_dock_widget("napari-glimpse", "Review and corrections")
detect.state.open_log(folder / "log.jsonl", image_dir=folder)
detect.device_combo.setCurrentText("cpu")
scene = viewer.window._qt_viewer.canvas._scene_canvas
frames = []
scene.events.draw.connect(lambda e: frames.append(time.perf_counter()))
w = Watch().start(); t_show = time.perf_counter()
wait(frames, timeout=30)  # the window's first frame: a user can click from here
to_first_frame = time.perf_counter() - t_show
startup_stall = w.stop()

def idle_repaints(n=6):
    w = Watch().start()
    for _ in range(n):
        scene.native.update(); pump(0.12)
    return w.stop()

def click():
    done = []
    detect.detected.connect(done.append)
    w = Watch().start(); t0 = time.perf_counter()
    detect.detect()
    wait(done)
    app.processEvents()  # the points drawn
    s = time.perf_counter() - t0
    detect.detected.disconnect()
    return s, w.stop()

out = {"process_start_to_click_s": time.perf_counter() - t_start, "to_first_frame_s": to_first_frame,
       "startup_stall_s": startup_stall}
out["cold_s"], out["cold_stall_s"] = click()
out["idle_repaint_stall_s"] = idle_repaints()
warm = [click() for _ in range(rounds)]
out["warm_s"] = [w[0] for w in warm]
out["detect_stall_s"] = [w[1] for w in warm]

# next image in a folder, by PageDown
done = []
detect.detected.connect(done.append)
detect.open_folder(folder); wait(done)
nexts = []
for _ in range(3):
    done.clear(); t0 = time.perf_counter()
    from qtpy.QtTest import QTest
    QTest.keyClick(viewer.window._qt_viewer.canvas.native, Qt.Key_PageDown)
    wait(done); app.processEvents()
    nexts.append(time.perf_counter() - t0)
out["next_image_s"] = nexts
detect.detected.disconnect()

if finetune_steps:
    review.accept()
    csv = review.export(folder / "reviewed.csv")
    w = Watch().start()
    _d, ft = viewer.window.add_plugin_dock_widget("napari-glimpse", "Fine-tune")
    ft.set_data(str(csv))
    pump(1.0)  # the dock opens and the window lays itself out (a user then fills the form and clicks)
    out["finetune_dock_stall_s"] = w.stop()
    finished = []
    ft.finished.connect(lambda *a: finished.append(a))
    if finetune_steps > 0:
        ft.steps.value = finetune_steps  # else the widget's defaults (its time budget)
    ft.out_edit.value = str(folder / "tuned.pt")
    w = Watch().start(); t0 = time.perf_counter()
    assert ft.start() is not None, "fine-tune did not start: " + ft.status_label.text()
    wait(finished, timeout=1800)
    out["finetune_s"] = time.perf_counter() - t0
    out["finetune_stall_s"] = w.stop()
    out["finetune_stall_at_s"] = w.worst_at  # when the worst stall began, seconds after the click
    out["finetune_result"] = [str(a) for a in finished[0]]
print("RESULT " + json.dumps(out), flush=True)
viewer.close()
"""


def run_child(rounds: int, finetune_steps: int) -> dict:
    env = dict(os.environ, NAPARI_GLIMPSE_CONFIG_DIR=tempfile.mkdtemp())
    r = subprocess.run([sys.executable, "-c", CHILD, str(DATA), str(rounds), str(finetune_steps)],
                       capture_output=True, text=True, timeout=3600, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"benchmark child failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gui.json")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes (cold clicks)")
    ap.add_argument("--rounds", type=int, default=5, help="warm clicks per process")
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="also fine-tune (the widget's defaults when 0 is not given) in the last process")
    ap.add_argument("--finetune", action="store_true", help="fine-tune with the widget's defaults in the last process")
    a = ap.parse_args(argv)
    runs = []
    for i in range(a.processes):
        last = i == a.processes - 1
        runs.append(run_child(a.rounds, (a.finetune_steps or -1) if (last and a.finetune) else 0))
        print(json.dumps(runs[-1]), flush=True)
    warm = [s for r in runs for s in r["warm_s"]]
    res = {
        "cold_s": [r["cold_s"] for r in runs],
        "warm_s_median": statistics.median(warm), "warm_s_max": max(warm),
        "next_image_s_median": statistics.median([s for r in runs for s in r["next_image_s"]]),
        "worst_stall_detect_s": max(max(r["detect_stall_s"]) for r in runs),
        "worst_stall_detect_cold_s": max(r["cold_stall_s"] for r in runs),
        "worst_stall_idle_repaint_s": max(r["idle_repaint_stall_s"] for r in runs),
        "worst_stall_startup_s": max(r["startup_stall_s"] for r in runs),
        **{k: v for r in runs for k, v in r.items() if k.startswith("finetune")},
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
