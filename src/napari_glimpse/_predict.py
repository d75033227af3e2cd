"""``napari-glimpse predict`` on many images: outputs checked before any work, rows written as
they come, bad images reported one line each (exit 2 at the end unless ``--skip-bad``), and
``--resume`` to continue a partly written output.

A folder is predicted by ``--workers`` threads (default :func:`default_workers`), each reading,
building the pyramid of and predicting one image at a time with one torch/ONNX Runtime thread
(on shared cores, torch's own threads spin and waste most of a second core on these small
operations); the rows are written in the images' order as soon as the earlier ones are, with at
most two images per worker in flight (bounded memory). The answers are the same floats as one at a
time: every operation gives the same result whatever the thread count. ``--shard i/n`` predicts
every n-th image of the list (see :mod:`napari_glimpse._shards`).

Names in the CSVs are the images' file names as Python sees them (``os.fsdecode``): bytes that
are not UTF-8 are written back unchanged (``surrogateescape``), so every name reads back as the
file it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ._files import check_writable
from .errors import GlimpseError, printable
from .io import DICOM_SUFFIXES, IMAGE_SUFFIXES, CsvAppender, expand_image_args, landmark_columns, read_rows_to_resume

# output names that would destroy an image or a model if written over
_NOT_OUTPUTS = IMAGE_SUFFIXES + DICOM_SUFFIXES + (".pt", ".resume")


def _file_id(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(outputs: Sequence[tuple[str, Path]], inputs: Sequence[Path], what: str = "input images",
                  ) -> None:
    """Refuse outputs (``(option, path)``) that are an input (the same path or the same file;
    ``what`` names the inputs in the message), have an image's or model's suffix, are the same file
    as each other, or cannot be written (the folder is made if missing). Done before any work."""
    resolved = {p.resolve() for p in inputs}
    ids = {i for p in inputs if (i := _file_id(p)) is not None}
    seen: dict[Path, str] = {}
    for opt, p in outputs:
        if p.suffix.lower() in _NOT_OUTPUTS:
            raise GlimpseError(f"{opt} {p}: outputs are CSV text; refusing to write them to a {p.suffix} file")
        r = p.resolve()
        if r in resolved or (_file_id(p) is not None and _file_id(p) in ids):
            raise GlimpseError(f"{opt} {p} is one of the {what}; choose another file name")
        other = next((o for q, o in seen.items() if q == r or (_file_id(q) is not None and _file_id(q) == _file_id(p))),
                     None)
        if other is not None:
            raise GlimpseError(f"{other} and {opt} are the same file ({p}); give two different files")
        seen[r] = opt
    for opt, p in outputs:
        try:
            check_writable(p)
        except OSError as exc:
            raise GlimpseError(f"{opt} {p}: cannot write there ({exc.strerror or exc})") from None


def row_keys(paths: Sequence[Path]) -> dict[Path, str]:
    """Each image's ``image_path`` cell: its file name, or, for different files that share a name
    (one ``ceph.jpg`` per patient folder), its path from above the folders they are in
    (``p1/ceph.jpg``, ``p2/ceph.jpg``; ``d/ceph.jpg``, ``d/sub/ceph.jpg``), as given (symlinks are
    not followed), so that no row stands for two images."""
    by_name: dict[str, list[Path]] = {}
    for q in paths:
        by_name.setdefault(q.name, []).append(q)
    keys = {}
    for name, same in by_name.items():
        if len({q.resolve() for q in same}) < 2:  # one file (given twice, or through a link)
            keys.update((q, name) for q in same)
            continue
        given = [Path(os.path.abspath(q)) for q in same]
        try:
            root = Path(os.path.commonpath([str(g.parent) for g in given]))
        except ValueError:  # no common folder (two drives)
            keys.update((q, g.as_posix()) for q, g in zip(same, given))
            continue
        if any(g.parent == root for g in given):
            root = root.parent  # the folder's own name too: no key of the group is bare
        keys.update((q, g.relative_to(root).as_posix()) for q, g in zip(same, given))
    return keys


def _check_resume_keys(kept: dict, keys: dict[Path, str], out: Path) -> None:
    """``--resume``: refuse when OUT holds a row under the bare name of images that now need a
    longer one (it was written for one of them; which, the name cannot tell)."""
    for name in ({q.name for q, k in keys.items() if k != q.name} & set(kept)) - set(keys.values()):
        same = sorted(k for q, k in keys.items() if q.name == name)
        raise GlimpseError(f"--resume: {out} holds a row for {name}, but the images given include "
                           f"{len(same)} named so ({', '.join(same)}): it cannot tell which; write to another file")


def _finite_numbers(cells: Sequence[str]) -> bool:
    try:
        return all(math.isfinite(float(c)) for c in cells)
    except ValueError:
        return False


def resume_rows(out: Path, cpath: Path, lhead: list[str], chead: list[str]) -> dict[str, tuple[list, list]]:
    """The rows to keep from a partly written output: name -> (landmark row, confidence row),
    for the images whose rows are whole and finite in both files."""
    lrows = {r[0]: r for r in read_rows_to_resume(out, lhead) if _finite_numbers(r[1:])}
    crows = {r[0]: r for r in read_rows_to_resume(cpath, chead) if _finite_numbers(r[1:-1])}
    return {n: (r, crows[n]) for n, r in lrows.items() if n in crows}


def _predict_one(model, p: Path, a: argparse.Namespace):
    try:
        tr = model.predict(p, iterations=a.iterations, starts=a.starts, facing=a.facing,
                           spacing=getattr(a, "spacing", None))
    except MemoryError:
        raise GlimpseError(f"{p}: out of memory while predicting") from None
    if not (np.isfinite(tr.final).all() and np.isfinite(tr.confidence).all()):
        raise GlimpseError(f"{p}: the model's answer is not a finite number (NaN); nothing written for it")
    return tr


class _Outputs:
    """The two CSVs, opened at the first row to write (an output is not touched until then)."""

    def __init__(self, out: Path, cpath: Path, lhead: list[str], chead: list[str], kept: dict):
        self.args = (out, cpath, lhead, chead, kept)
        self.files: list[CsvAppender] = []

    def open(self) -> None:
        if not self.files:
            out, cpath, lhead, chead, kept = self.args
            self.files = [CsvAppender(out, lhead, [r for r, _ in kept.values()]),
                          CsvAppender(cpath, chead, [c for _, c in kept.values()])]

    def write(self, name: str, tr) -> None:
        self.open()
        self.files[0].write([name] + [f"{v:.2f}" for v in tr.final.reshape(-1)])
        self.files[1].write([name] + [f"{v:.3f}" for v in tr.confidence] + [tr.facing])

    def close(self) -> None:
        for f in self.files:
            f.close()


def default_workers() -> int:
    """``--workers``' default: 2, or 1 on a single core (more threads than cores only wait)."""
    return max(1, min(2, cores()))


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# a worker thread's held warnings (see _warnings_held); None on other threads
_held = threading.local()


@contextlib.contextmanager
def _warnings_held() -> Iterator[Callable]:
    """Inside, a warning shown on a worker thread predicting an image is kept with that image's
    answer (to be shown, in the images' order, when its row is written) instead of shown there.
    Yields the function that shows warnings."""
    show = warnings.showwarning

    def hold(message, category, filename, lineno, file=None, line=None):
        kept = getattr(_held, "warnings", None)
        if kept is None:
            show(message, category, filename, lineno, file, line)
        else:
            kept.append((message, category, filename, lineno))

    warnings.showwarning = hold
    try:
        yield show
    finally:
        warnings.showwarning = show


def _attempt(model, p: Path, a: argparse.Namespace) -> tuple:
    """``(trajectory or None, GlimpseError or None, warnings shown meanwhile)`` for one image;
    other exceptions (KeyboardInterrupt, ...) are raised."""
    _held.warnings = kept = [] if threading.current_thread() is not threading.main_thread() else None
    try:
        return _predict_one(model, p, a), None, kept or []
    except GlimpseError as exc:
        return None, exc, kept or []
    finally:
        _held.warnings = None


def _answers(model, todo: list[Path], a: argparse.Namespace, workers: int) -> Iterator[tuple]:
    """``(path, trajectory or None, GlimpseError or None, held warnings)`` for each image of
    ``todo`` in its order: predicted one by one here, or by ``workers`` threads with at most
    ``2 * workers`` images submitted and not yet handed back."""
    if workers <= 1 or len(todo) < 2:
        for p in todo:
            yield (p, *_attempt(model, p, a))
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="napari-glimpse-predict")
    pending: deque = deque()
    rest = iter(todo)
    try:
        for p in rest:
            pending.append((p, pool.submit(_attempt, model, p, a)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            p, future = pending.popleft()
            answer = future.result()
            nxt = next(rest, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_attempt, model, nxt, a)))
            yield (p, *answer)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _torch_threads(workers: int, threads: int | None) -> Iterator[None]:
    """With several workers and no ``--threads``: each torch (and ONNX Runtime) call runs on one
    thread per worker's share of the cores; torch's count is put back after."""
    if workers <= 1 or threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, cores() // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _loop(model, todo: list[Path], a: argparse.Namespace, outputs: _Outputs, single: bool,
          workers: int = 1, keys: dict[Path, str] | None = None, spacings: dict[str, float] | None = None
          ) -> list[Path]:
    """Predict ``todo`` (``workers`` threads), writing each row as it comes in the images' order
    under its key (:func:`row_keys`; default: the file name) and noting in ``spacings`` the
    spacing each image was read at; returns the images skipped."""
    from tqdm.auto import tqdm

    bad: list[Path] = []
    bar = tqdm(total=len(todo), desc="predict", unit="image", disable=len(todo) < 2, smoothing=0.1)
    try:
        with _warnings_held() as show, contextlib.closing(_answers(model, todo, a, workers)) as answers:
            for p, tr, exc, held in answers:  # (closing: no image is left in the workers' hands on an error)
                for w in held:
                    show(*w)
                bar.update()
                if exc is not None:
                    if single:
                        raise exc
                    bad.append(p)
                    tqdm.write(printable(f"napari-glimpse: skipped: {exc}"), file=sys.stderr)
                    bar.set_postfix_str(f"{len(bad)} skipped")
                    continue
                key = keys[p] if keys else p.name
                outputs.write(key, tr)
                if spacings is not None:
                    spacings[key] = tr.pixel_spacing
    finally:
        bar.close()
        outputs.close()
    return bad


def run_predict(a: argparse.Namespace, cpath: Path, mpath: Path | None = None) -> int:
    """The ``predict`` command (see the module's docstring); ``cpath``: the confidence CSV;
    ``mpath``: the measurements' CSV (``--measures``), written from every row of OUT at the end."""
    from .inference import GlimpseModel

    once: dict[Path, Path] = {}  # each file once (a folder and a file in it, a link beside its target)
    for q in expand_image_args(a.images):
        once.setdefault(q.resolve(), q)
    paths = list(once.values())
    out = Path(a.out)
    check_outputs([("--out", out), ("--confidence-out", cpath)] + ([("--measures", mpath)] if mpath else []), paths)
    keys = row_keys(paths)  # of every image given, so that the shards of one run agree
    if getattr(a, "shard", None):
        from ._shards import parse_shard, shard_of

        paths = shard_of(paths, *parse_shard(a.shard))
    model = GlimpseModel.load(a.model, a.device, int8=not a.float)
    k = len(model.landmark_names)
    if mpath is not None and not model.landmark_set.is_isbi:
        raise GlimpseError(f"--measures needs a model of the ISBI 19 landmarks; this one's landmark set is "
                           f"{model.landmark_set.describe()}")
    lhead = landmark_columns(k)
    chead = ["image_path"] + [f"{i + 1}_confidence" for i in range(k)] + ["facing"]
    kept = resume_rows(out, cpath, lhead, chead) if a.resume else {}
    _check_resume_keys(kept, keys, out)
    todo = [p for p in paths if keys[p] not in kept]
    if not paths:  # a shard of more shards than images: its outputs hold the header alone (for merge)
        empty = _Outputs(out, cpath, lhead, chead, {})
        empty.open()
        empty.close()
        print(printable(f"--shard {a.shard}: no image falls to this shard; wrote {out} and {cpath} with no rows"))
        return 0
    if not todo:
        print(printable(f"{out} already holds all {len(paths)} image(s); nothing to do"))
        _measures(out, mpath, paths, keys, a, model, {})
        return 0
    t = time.perf_counter()
    workers = min(getattr(a, "workers", None) or default_workers(), len(todo))  # one image: torch's threads
    with _torch_threads(workers, getattr(a, "threads", None)):
        read_at: dict[str, float] = {}
        bad = _loop(model, todo, a, _Outputs(out, cpath, lhead, chead, kept), single=len(paths) == 1,
                    workers=workers, keys=keys, spacings=read_at)
    done = len(todo) - len(bad)
    if done == 0:
        raise GlimpseError(f"none of the {len(todo)} image(s) could be read or predicted (listed above); "
                           f"{out} not written")
    dt = (time.perf_counter() - t) / done
    extra = (f", {len(kept)} kept from before" if kept else "") + (f", {len(bad)} skipped" if bad else "")
    print(printable(f"wrote {out} and {cpath}: {done} image(s){extra}, {dt:.2f} s per image"))
    _measures(out, mpath, paths, keys, a, model, read_at)
    if bad and not a.skip_bad:
        print(printable(f"napari-glimpse: error: {len(bad)} of {len(todo)} image(s) skipped (listed above); the "
                        f"other {done} are in {out} (--skip-bad: exit 0 all the same)"), file=sys.stderr)
        return 2
    return 0


def _measures(out: Path, mpath: Path | None, paths: Sequence[Path], keys: dict[Path, str],
              a: argparse.Namespace, model, read_at: dict[str, float]) -> None:
    """``--measures``: the measurements of every row of ``out``, MW at the spacing each image was
    read at (``read_at``, this run's rows); a row kept from before: ``--spacing``, else the one
    its file records, else the model's (as :meth:`GlimpseModel.predict` chooses)."""
    if mpath is None:
        return
    from .io import read_landmarks_csv
    from .spacing import read_spacing, resolve_spacing

    given = getattr(a, "spacing", None)
    spacing = dict(read_at)
    with warnings.catch_warnings():  # the file was read (and any notice shown) when predicted
        warnings.simplefilter("ignore")
        for p in paths:
            if keys[p] not in spacing:
                try:
                    recorded = None if given is not None else read_spacing(p)
                    spacing[keys[p]] = resolve_spacing(given, recorded, None, model.pixel_spacing)[0]
                except GlimpseError:  # an unreadable file or spacing: it has no row
                    continue
    names, coords = read_landmarks_csv(out)
    write_measures(mpath, names, coords, np.array([spacing.get(n, given or model.pixel_spacing) for n in names]))


def write_measures(path: Path, names, coords, spacing) -> None:
    """Write the 8 measurements and classes of ``(N, 19, 2)`` landmarks (``measure``, ``predict
    --measures``); ``spacing``: mm per pixel, one for all or ``(N,)``, one per image (MW only)."""
    from .io import write_table_csv
    from .measurements import TABLE_COLUMNS, table_rows

    if coords.shape[1] != 19:
        raise GlimpseError(f"measurements need the 19 ISBI landmarks, got {coords.shape[1]} per image")
    rows = table_rows(names, coords, spacing)
    write_table_csv(path, TABLE_COLUMNS, rows)
    blank = sum(1 for r in rows if "" in r)
    print(f"wrote {path}: measurements of {len(rows)} image(s)"
          + (f", {blank} with some not measurable (landmarks on top of each other)" if blank else ""))
