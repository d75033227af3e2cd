"""The corrections log: record/replay, undo/redo, accept + export, review queue, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_png, synthetic_coords, synthetic_image

from napari_glimpse.corrections import DEFAULT_EXPORT_NAME, DEFAULT_LOG_NAME, Correction, CorrectionLog
from napari_glimpse.errors import GlimpseError
from napari_glimpse.io import load_dataset, read_landmarks_csv
from napari_glimpse.landmarks import ISBI_LANDMARKS

NAMES = ("Alpha", "Beta", "Gamma")


def lines_of(path: Path) -> list[dict]:
    """Every complete line of the log as JSON (fails if any complete line does not parse)."""
    raw = path.read_bytes()
    body = raw[: raw.rfind(b"\n") + 1]
    return [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]


@pytest.fixture
def folder(tmp_path) -> dict:
    """An image folder with three synthetic images and their true landmark positions."""
    rng = np.random.default_rng(3)
    coords = synthetic_coords(3, rng)
    names = [f"{i:03d}.png" for i in (7, 8, 9)]
    d = tmp_path / "imgs"
    for n, c in zip(names, coords):
        save_png(d / n, synthetic_image(c, rng))
    return {"dir": d, "names": names, "coords": coords}


def proposal(coords: np.ndarray, shift: float = 3.0) -> np.ndarray:
    return coords + shift


# --------------------------------------------------------------------------- record / replay
def test_record_and_replay_round_trip(folder):
    d, names, coords = folder["dir"], folder["names"], folder["coords"]
    log = CorrectionLog(d, NAMES, user="tester")
    assert log.path == d / DEFAULT_LOG_NAME and not log.path.exists()  # created on first append
    assert log.records == [] and log.state.images() == []

    conf = np.array([0.9, 0.2, 0.5])
    p = log.propose(d / names[0], proposal(coords[0]), "tiny.pt", conf)
    assert p.seq == 1 and p.action == "propose" and p.image == names[0]
    m = log.move(names[0], 1, (100.25, 50.5))
    dl = log.delete(names[0], 2)
    a = log.add(names[0], 2, [12.0, 13.0])
    log.propose(names[1], proposal(coords[1]), "tiny.pt")
    assert [r.seq for r in log.records] == [1, 2, 3, 4, 5]

    # what is on disk: one JSON object per line, 1-based landmark numbers, old/new, model, time
    recs = lines_of(log.path)
    assert [r["action"] for r in recs] == ["propose", "move", "delete", "add", "propose"]
    mv = recs[1]
    assert mv["image"] == names[0] and mv["landmark"] == 2 and mv["name"] == "Beta"
    assert mv["old"] == pytest.approx(list(proposal(coords[0])[1])) and mv["new"] == [100.25, 50.5]
    assert mv["model"] == "tiny.pt" and mv["user"] == "tester" and mv["undoes"] is None
    assert mv["time"].endswith("+00:00") and "T" in mv["time"]
    assert recs[2]["new"] is None and recs[3]["old"] is None and recs[3]["new"] == [12.0, 13.0]
    assert recs[0]["confidence"] == [0.9, 0.2, 0.5] and recs[0]["names"] == list(NAMES)
    assert m.k == 1 and m.landmark == 2 and dl.k == 2 and a.k == 2

    expected0 = proposal(coords[0]).copy()
    expected0[1] = (100.25, 50.5)
    expected0[2] = (12.0, 13.0)
    np.testing.assert_array_equal(log.state.positions(names[0]), expected0)

    # reopen (landmark names come from the log itself): identical state
    again = CorrectionLog(d)
    assert again.state.landmark_names == NAMES
    assert again.skipped_lines == []
    assert [r.to_json() for r in again.records] == [r.to_json() for r in log.records]
    for n in names[:2]:
        np.testing.assert_array_equal(again.state.positions(n), log.state.positions(n))
    np.testing.assert_array_equal(again.state.proposed(names[0]), proposal(coords[0]))
    np.testing.assert_array_equal(again.state.confidence(names[0]), conf)
    assert again.state.model(names[0]) == "tiny.pt" and again.state.confidence(names[1]) is None
    assert again.state.corrected(names[0]) == [1, 2]
    assert np.isnan(again.state.positions(names[2])).all() and names[2] not in again.state

    # Correction round trip through JSON
    for r in again.records:
        assert Correction.from_json(json.loads(r.to_line())).to_json() == r.to_json()


def test_log_is_append_only_and_default_names(tmp_path):
    log = CorrectionLog(tmp_path / "custom.jsonl")  # a file path is taken as is
    assert log.path == tmp_path / "custom.jsonl" and log.state.landmark_names == ISBI_LANDMARKS
    log.propose("a.bmp", np.arange(38.0).reshape(19, 2), "m")
    before = log.path.read_bytes()
    log.move("a.bmp", 18, (1, 2))
    log.undo("a.bmp")
    log.accept("a.bmp")
    after = log.path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    assert CorrectionLog(tmp_path / "custom.jsonl").state.landmark_names == ISBI_LANDMARKS


def test_edit_validation(tmp_path):
    log = CorrectionLog(tmp_path, NAMES)
    with pytest.raises(GlimpseError, match=r"no point to move"):
        log.move("x.png", 0, (1, 2))
    with pytest.raises(GlimpseError, match=r"expected \(3, 2\) positions"):
        log.propose("x.png", np.zeros((19, 2)), "m")
    log.propose("x.png", np.zeros((3, 2)), "m", confidence=[0.1, 0.2, 0.3])
    with pytest.raises(GlimpseError, match="already placed"):
        log.add("x.png", 0, (1, 2))
    with pytest.raises(GlimpseError, match="out of range"):
        log.move("x.png", 3, (1, 2))
    with pytest.raises(GlimpseError, match="finite"):
        log.move("x.png", 0, (np.nan, 2))
    log.delete("x.png", 0)
    with pytest.raises(GlimpseError, match="no point to delete"):
        log.delete("x.png", 0)
    assert len(log.records) == 2  # refused edits were not logged
    assert len(lines_of(log.path)) == 2
    with pytest.raises(GlimpseError, match="3 landmarks"):
        CorrectionLog(tmp_path, ISBI_LANDMARKS)  # opened with the wrong landmark set


def test_reopened_with_other_names_of_the_same_count(tmp_path):
    """A log written for one set is not read under another set's names (same count, other order):
    Sella's point would be shown and exported as Gonion."""
    written = ("Sella", "Nasion", "Menton", "Gonion")
    log = CorrectionLog(tmp_path, written)
    log.propose("a.png", np.full((4, 2), np.nan), None)
    log.add("a.png", 0, (10, 20))
    before = log.path.read_bytes()
    with pytest.raises(GlimpseError, match=r"Sella, Nasion, Menton, Gonion.*Gonion, Nasion, Menton, Sella") as err:
        CorrectionLog(tmp_path, ("Gonion", "Nasion", "Menton", "Sella"))
    assert "\n" not in str(err.value)  # one line
    assert log.path.read_bytes() == before  # nothing rewritten
    again = CorrectionLog(tmp_path, written)  # the same names, or the log's own: fine
    assert again.state.positions("a.png")[0].tolist() == [10, 20]
    assert CorrectionLog(tmp_path).state.landmark_names == written

def test_set_point_and_sync(tmp_path):
    log = CorrectionLog(tmp_path, NAMES)
    log.propose("x.png", np.array([[1.0, 1], [2, 2], [3, 3]]), "m")
    assert log.set_point("x.png", 0, (1.0, 1.0)) is None  # unchanged: nothing logged
    assert log.set_point("x.png", 0, (5.0, 5.0)).action == "move"
    assert log.set_point("x.png", 0, None).action == "delete"
    assert log.set_point("x.png", 0, (6.0, 6.0)).action == "add"
    new = np.array([[6.0, 6], [np.nan, np.nan], [3.5, 3]])
    recs = log.sync("x.png", new)
    assert [(r.action, r.k) for r in recs] == [("delete", 1), ("move", 2)]
    np.testing.assert_array_equal(log.state.positions("x.png"), new)
    assert log.sync("x.png", new) == []


# --------------------------------------------------------------------------- undo / redo
def test_undo_redo_and_after_reopening(tmp_path):
    log = CorrectionLog(tmp_path, NAMES)
    p0 = np.array([[10.0, 10], [20, 20], [30, 30]])
    log.propose("a.png", p0, "m")
    log.propose("b.png", p0 + 1, "m")
    assert log.undo("a.png") is None and log.redo("a.png") is None  # nothing yet: nothing logged
    n0 = len(log.records)

    m1 = log.move("a.png", 0, (11, 11))
    m2 = log.move("a.png", 0, (12, 12))
    d3 = log.delete("a.png", 1)
    log.move("b.png", 2, (99, 99))  # another image: its own history
    u = log.undo("a.png")
    assert u.action == "undo" and u.undoes == d3.seq and u.k == 1
    np.testing.assert_array_equal(u.new, [20, 20])
    np.testing.assert_array_equal(log.state.positions("a.png")[1], [20, 20])
    assert log.undo("a.png").undoes == m2.seq
    np.testing.assert_array_equal(log.state.positions("a.png")[0], [11, 11])
    np.testing.assert_array_equal(log.state.positions("b.png")[2], [99, 99])  # untouched
    assert log.state.can_redo("a.png") and not log.state.can_redo("b.png")

    # reopen: stacks are rebuilt by replay
    log2 = CorrectionLog(tmp_path)
    assert log2.state.undo_target("a.png").seq == m1.seq
    assert log2.state.redo_target("a.png").seq == m2.seq
    r = log2.redo("a.png")
    assert r.action == "redo" and r.redoes == m2.seq
    np.testing.assert_array_equal(log2.state.positions("a.png")[0], [12, 12])
    assert log2.state.redo_target("a.png").seq == d3.seq

    # a new edit clears the redo stack
    log2.move("a.png", 2, (33, 33))
    assert not log2.state.can_redo("a.png") and log2.redo("a.png") is None
    # undo everything back to the proposal
    while log2.undo("a.png") is not None:
        pass
    np.testing.assert_array_equal(log2.state.positions("a.png"), p0)
    assert log2.state.corrected("a.png") == []

    # the first instance catches up on what the second wrote
    log.refresh()
    np.testing.assert_array_equal(log.state.positions("a.png"), p0)
    log3 = CorrectionLog(tmp_path)
    np.testing.assert_array_equal(log3.state.positions("a.png"), p0)
    assert log3.state.can_redo("a.png") and not log3.state.can_undo("a.png")
    assert len(log3.records) == n0 + 11
    assert [r.seq for r in log3.records] == list(range(1, len(log3.records) + 1))


def test_two_writers_share_one_log(tmp_path):
    a, b = CorrectionLog(tmp_path, NAMES), CorrectionLog(tmp_path, NAMES)
    a.propose("x.png", np.zeros((3, 2)), "m")
    b.move("x.png", 0, (1, 1))  # b sees a's proposal before validating the move
    a.move("x.png", 0, (2, 2))
    assert [r.seq for r in a.records] == [1, 2, 3] == [r.seq for r in CorrectionLog(tmp_path).records]
    np.testing.assert_array_equal(a.records[-1].old, [1, 1])
    b.refresh()
    np.testing.assert_array_equal(b.state.positions("x.png")[0], [2, 2])


def test_new_proposal_restarts_review(tmp_path):
    log = CorrectionLog(tmp_path, NAMES)
    log.propose("x.png", np.zeros((3, 2)), "m1")
    log.move("x.png", 0, (5, 5))
    log.accept("x.png")
    rec = log.propose("x.png", np.ones((3, 2)), "m2")
    np.testing.assert_array_equal(rec.old[0], [5, 5])
    st = log.state
    assert not st.is_accepted("x.png") and not st.can_undo("x.png") and st.model("x.png") == "m2"
    np.testing.assert_array_equal(st.positions("x.png"), np.ones((3, 2)))
    assert log.move("x.png", 1, (2, 2)).model == "m2"


# --------------------------------------------------------------------------- accept + export
def test_accept_and_export_round_trip(folder, tmp_path):
    d, names, coords = folder["dir"], folder["names"], folder["coords"]
    log = CorrectionLog(d, NAMES)
    for n, c in zip(names, coords):
        log.propose(n, proposal(c), "tiny.pt", [0.5, 0.5, 0.5])
    with pytest.raises(GlimpseError, match="no accepted images"):
        log.export_training_csv()
    for k in range(3):  # the annotator fixes image 0 completely
        log.move(names[0], k, coords[0][k] + np.array([0.126, -0.5]))
    log.accept(names[0])
    log.accept(names[2])
    assert log.state.accepted() == [names[0], names[2]]
    assert log.unaccept(names[1]) is None  # not accepted: nothing logged

    out = log.export_training_csv()
    assert out == d / DEFAULT_EXPORT_NAME
    ds = load_dataset(out)
    assert [p.name for p in ds.image_paths] == [names[0], names[2]]
    assert ds.landmark_names == ("L1", "L2", "L3")  # io names non-ISBI sets generically
    gt = ds.ground_truth()
    np.testing.assert_allclose(gt[0], coords[0] + np.array([0.126, -0.5]), atol=0.005)
    np.testing.assert_allclose(gt[1], proposal(coords[2]), atol=0.005)
    names_csv, _ = read_landmarks_csv(out)
    assert names_csv == [names[0], names[2]]  # bare names: images sit beside the CSV

    # a CSV elsewhere still loads: image_path is relative to the CSV's folder
    other = tmp_path / "exports" / "reviewed.csv"
    log.export_training_csv(other, images=[names[2]])
    ds2 = load_dataset(other)
    assert [p.resolve() for p in ds2.image_paths] == [(d / names[2]).resolve()]
    np.testing.assert_allclose(ds2.ground_truth()[0], proposal(coords[2]), atol=0.005)
    # in-memory dataset
    mem = log.reviewed_dataset()
    assert mem.landmark_names == NAMES and mem.ground_truth("reviewed").shape == (2, 3, 2)

    with pytest.raises(GlimpseError, match="not accepted"):
        log.export_training_csv(other, images=[names[1]])

    # a deleted landmark in an accepted image: a clear error naming image and landmark
    log.delete(names[2], 1)
    assert log.state.is_accepted(names[2])  # edits keep acceptance
    with pytest.raises(GlimpseError, match=rf"{names[2]}: landmark 2 \(Beta\) is missing"):
        log.export_training_csv()
    assert load_dataset(out).ground_truth().shape == (2, 3, 2)  # the old export is intact
    # accept refuses incomplete images unless told otherwise
    log.unaccept(names[2])
    with pytest.raises(GlimpseError, match=r"landmark 2 \(Beta\) is missing"):
        log.accept(names[2])
    log.accept(names[2], allow_missing=True)
    with pytest.raises(GlimpseError, match="Beta"):
        log.export_training_csv()
    log.undo(names[2])
    assert load_dataset(log.export_training_csv()).ground_truth().shape == (2, 3, 2)


def test_export_with_images_subfolder(tmp_path):
    """Kaggle layout: images in DIR/images, the CSV in DIR -> bare names, loads via DIR too."""
    rng = np.random.default_rng(0)
    c = synthetic_coords(1, rng)[0]
    save_png(tmp_path / "images" / "001.png", synthetic_image(c, rng))
    log = CorrectionLog(tmp_path / "images", NAMES)
    log.propose("001.png", c, "m")
    log.accept("001.png")
    out = log.export_training_csv(tmp_path / "reviewed.csv")
    assert read_landmarks_csv(out)[0] == ["001.png"]
    np.testing.assert_allclose(load_dataset(tmp_path, split="reviewed").ground_truth()[0], c)
    # an accepted image whose file is gone: clear error
    log.propose("gone.png", c, "m")
    log.accept("gone.png")
    with pytest.raises(GlimpseError, match="gone.png"):
        log.export_training_csv(tmp_path / "reviewed.csv")


# --------------------------------------------------------------------------- review queue
def test_review_queue_order(tmp_path):
    names = tuple(f"L{i}" for i in range(5))
    log = CorrectionLog(tmp_path, names)
    conf = np.array([0.8, 0.1, 0.6, 0.3, 0.95])
    log.propose("a.png", np.zeros((5, 2)), "m", conf)
    log.propose("b.png", np.zeros((5, 2)), "m", [0.9, 0.9, 0.05, 0.9, 0.9])
    st = log.state
    assert st.review_queue("a.png") == [1, 3, 2, 0, 4]
    assert st.next_to_review("a.png") == 1
    assert st.next_to_review("a.png", after=1) == 3  # landmark 1 judged fine, not moved
    assert st.next_to_review("a.png", after=4) is None
    log.move("a.png", 1, (1, 1))  # corrected: leaves the queue
    assert st.review_queue("a.png") == [3, 2, 0, 4] and st.next_to_review("a.png") == 3
    log.delete("a.png", 3)
    assert st.review_queue("a.png") == [2, 0, 4]
    log.undo("a.png")  # landmark 3 back, uncorrected
    assert st.review_queue("a.png") == [3, 2, 0, 4]
    assert st.global_queue()[:3] == [("b.png", 2), ("a.png", 3), ("a.png", 2)]
    log.accept("b.png")
    assert all(img == "a.png" for img, _ in st.global_queue())
    # reopened: same queue
    assert CorrectionLog(tmp_path).state.review_queue("a.png") == [3, 2, 0, 4]
    # without confidences: landmark order
    log.propose("c.png", np.zeros((5, 2)), "m")
    assert st.review_queue("c.png") == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- crash safety
def test_torn_last_line_is_tolerated(tmp_path):
    log = CorrectionLog(tmp_path, NAMES)
    log.propose("x.png", np.zeros((3, 2)), "m")
    for i in range(5):
        log.move("x.png", i % 3, (i, i))
    raw = log.path.read_bytes()
    last_start = raw.rstrip(b"\n").rfind(b"\n") + 1
    cut = last_start + (len(raw) - last_start) // 2
    with open(log.path, "r+b") as f:  # a crash mid-write of the last record
        f.truncate(cut)

    torn = CorrectionLog(tmp_path)
    assert [r.seq for r in torn.records] == [1, 2, 3, 4, 5] and torn.skipped_lines == []
    np.testing.assert_array_equal(torn.state.positions("x.png")[0], [3, 3])  # move 5 is lost
    rec = torn.move("x.png", 2, (42, 42))  # the next append terminates the torn line first
    assert rec.seq == 6
    assert torn.path.read_bytes().startswith(raw[:cut] + b"\n")

    again = CorrectionLog(tmp_path)
    assert [r.seq for r in again.records] == [1, 2, 3, 4, 5, 6]
    assert again.skipped_lines == [6]  # the terminated torn line, skipped, not fatal
    np.testing.assert_array_equal(again.state.positions("x.png")[2], [42, 42])
    assert again.move("x.png", 2, (43, 43)).seq == 7

    # garbage lines in the middle are skipped too
    with open(tmp_path / DEFAULT_LOG_NAME, "ab") as f:
        f.write(b"not json\n{\"seq\": 99}\n")
    assert CorrectionLog(tmp_path).records[-1].seq == 7
    assert CorrectionLog(tmp_path).move("x.png", 0, (1, 1)).seq == 8


CHILD = r"""
import sys
import numpy as np
from napari_glimpse.corrections import CorrectionLog

log = CorrectionLog(sys.argv[1], ["A", "B", "C"])
rec = log.propose("img.png", np.full((3, 2), 10.0), "m")
print("ack", rec.seq, flush=True)
for i in range(int(sys.argv[2])):
    rec = log.move("img.png", i % 3, (float(i), i + 0.5))
    print("ack", rec.seq, flush=True)
"""


def test_sigkill_mid_burst_loses_no_acknowledged_correction(tmp_path):
    """A writer is SIGKILLed while appending as fast as it can: acked records all survive."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    watchdog = threading.Timer(120, proc.kill)  # never hang the test suite
    watchdog.start()
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        t0 = time.monotonic()
        for line in proc.stdout:
            acked.append(int(line.split()[1]))
            if len(acked) == 300:
                os.kill(proc.pid, signal.SIGKILL)
                break
        # acks already in the pipe were printed after their append returned: they count too
        acked += [int(line.split()[1]) for line in proc.stdout]
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert len(acked) >= 300, f"child died early: {err}"
    assert proc.returncode == -signal.SIGKILL, err  # killed mid-burst, not finished
    assert acked == list(range(1, len(acked) + 1))

    path = tmp_path / DEFAULT_LOG_NAME
    # every complete line parses; at most the last one is torn
    complete = lines_of(path)
    on_disk = [r["seq"] for r in complete]
    assert on_disk == list(range(1, len(on_disk) + 1))
    assert set(acked) <= set(on_disk)
    log = CorrectionLog(tmp_path)
    assert log.skipped_lines == []
    assert [r.seq for r in log.records] == on_disk
    last = complete[-1]
    np.testing.assert_array_equal(log.state.positions("img.png")[last["landmark"] - 1], last["new"])
    # and the log goes on
    rec = log.move("img.png", 0, (1.0, 2.0))
    assert rec.seq == on_disk[-1] + 1
    assert CorrectionLog(tmp_path).records[-1].seq == rec.seq
    print(f"SIGKILL test: {len(acked)} acked, {len(on_disk)} on disk, {time.monotonic() - t0:.1f} s")


def test_no_qt_import():
    code = (
        "import sys, napari_glimpse.corrections, napari_glimpse; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_absent_landmark_is_logged_accepted_undone_and_exported_empty(folder):
    d, names, coords = folder["dir"], folder["names"], folder["coords"]
    log = CorrectionLog(d, NAMES)
    log.propose(names[0], proposal(coords[0]), "tiny.pt", [0.2, 0.5, 0.9])
    rec = log.mark_absent(names[0], 1)
    assert rec is not None and rec.action == "absent" and rec.k == 1
    assert log.mark_absent(names[0], 1) is None  # already absent: nothing logged
    st = log.state
    assert st.absent(names[0]) == [1] and st.missing(names[0]) == []
    assert 1 not in st.review_queue(names[0])
    assert np.isnan(st.positions(names[0])[1]).all()
    assert lines_of(log.path)[-1]["action"] == "absent"

    log.undo(names[0])  # the point comes back, no longer absent
    assert st.absent(names[0]) == [] and np.isfinite(st.positions(names[0])[1]).all()
    log.redo(names[0])
    assert st.absent(names[0]) == [1]
    # placing the point again clears the flag; undoing that placement restores it
    log.add(names[0], 1, coords[0][1])
    assert st.absent(names[0]) == []
    log.undo(names[0])
    assert st.absent(names[0]) == [1]

    log.accept(names[0])  # absent does not block accepting (a deleted point would)
    out = log.export_training_csv()
    row = out.read_text().splitlines()[1].split(",")
    assert row[0] == names[0] and row[3:5] == ["", ""]  # landmark 2's cells are empty
    assert all(v for v in row[1:3] + row[5:7])

    again = CorrectionLog(d, NAMES)  # the flag survives replay
    assert again.state.absent(names[0]) == [1] and again.state.is_accepted(names[0])
    again.propose(names[0], proposal(coords[0]), "tiny.pt")  # a new proposal clears it
    assert again.state.absent(names[0]) == []
