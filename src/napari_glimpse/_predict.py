"""``napari-glimpse predict`` on many images: outputs checked before any work, rows written as
they come, bad images reported one line each (exit 2 at the end unless ``--skip-bad``), and
``--resume`` to continue a partly written output.

Names in the CSVs are the images' file names as Python sees them (``os.fsdecode``): bytes that
are not UTF-8 are written back unchanged (``surrogateescape``), so every name reads back as the
file it came from.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ._files import check_writable
from .errors import GlimpseError, printable
from .io import IMAGE_SUFFIXES, CsvAppender, expand_image_args, landmark_columns, read_rows_to_resume

# output names that would destroy an image or a model if written over
_NOT_OUTPUTS = IMAGE_SUFFIXES + (".pt", ".resume")


def _file_id(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(outputs: Sequence[tuple[str, Path]], inputs: Sequence[Path]) -> None:
    """Refuse outputs (``(option, path)``) that are an input image (the same path or the same
    file), have an image's or model's suffix, are the same file as each other, or cannot be
    written (the folder is made if missing). Done before any prediction work."""
    resolved = {p.resolve() for p in inputs}
    ids = {i for p in inputs if (i := _file_id(p)) is not None}
    seen: dict[Path, str] = {}
    for opt, p in outputs:
        if p.suffix.lower() in _NOT_OUTPUTS:
            raise GlimpseError(f"{opt} {p}: predictions are CSV text; refusing to write them to a {p.suffix} file")
        r = p.resolve()
        if r in resolved or (_file_id(p) is not None and _file_id(p) in ids):
            raise GlimpseError(f"{opt} {p} is one of the input images; choose another file name")
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

    def write(self, name: str, tr) -> None:
        if not self.files:
            out, cpath, lhead, chead, kept = self.args
            self.files = [CsvAppender(out, lhead, [r for r, _ in kept.values()]),
                          CsvAppender(cpath, chead, [c for _, c in kept.values()])]
        self.files[0].write([name] + [f"{v:.2f}" for v in tr.final.reshape(-1)])
        self.files[1].write([name] + [f"{v:.3f}" for v in tr.confidence] + [tr.facing])

    def close(self) -> None:
        for f in self.files:
            f.close()


def _loop(model, todo: list[Path], a: argparse.Namespace, outputs: _Outputs, single: bool) -> list[Path]:
    """Predict ``todo``, writing each row as it comes; returns the images skipped."""
    from tqdm.auto import tqdm

    bad: list[Path] = []
    bar = tqdm(todo, desc="predict", unit="image", disable=len(todo) < 2)
    try:
        for p in bar:
            try:
                tr = _predict_one(model, p, a)
            except GlimpseError as exc:
                if single:
                    raise
                bad.append(p)
                tqdm.write(printable(f"napari-glimpse: skipped: {exc}"), file=sys.stderr)
                bar.set_postfix_str(f"{len(bad)} skipped")
                continue
            outputs.write(p.name, tr)
    finally:
        bar.close()
        outputs.close()
    return bad


def run_predict(a: argparse.Namespace, cpath: Path, mpath: Path | None = None) -> int:
    """The ``predict`` command (see the module's docstring); ``cpath``: the confidence CSV;
    ``mpath``: the measurements' CSV (``--measures``), written from every row of OUT at the end."""
    from .inference import GlimpseModel

    paths = expand_image_args(a.images)
    out = Path(a.out)
    check_outputs([("--out", out), ("--confidence-out", cpath)] + ([("--measures", mpath)] if mpath else []), paths)
    model = GlimpseModel.load(a.model, a.device, int8=not a.float)
    k = len(model.landmark_names)
    if mpath is not None and k != 19:
        raise GlimpseError(f"--measures needs a 19-landmark ISBI model, this one has {k}")
    lhead = landmark_columns(k)
    chead = ["image_path"] + [f"{i + 1}_confidence" for i in range(k)] + ["facing"]
    kept = resume_rows(out, cpath, lhead, chead) if a.resume else {}
    todo = [p for p in paths if p.name not in kept]
    if not todo:
        print(printable(f"{out} already holds all {len(paths)} image(s); nothing to do"))
        _measures(out, mpath, model.pixel_spacing)
        return 0
    t = time.perf_counter()
    bad = _loop(model, todo, a, _Outputs(out, cpath, lhead, chead, kept), single=len(paths) == 1)
    done = len(todo) - len(bad)
    if done == 0:
        raise GlimpseError(f"none of the {len(todo)} image(s) could be read or predicted (listed above); "
                           f"{out} not written")
    dt = (time.perf_counter() - t) / done
    extra = (f", {len(kept)} kept from before" if kept else "") + (f", {len(bad)} skipped" if bad else "")
    print(printable(f"wrote {out} and {cpath}: {done} image(s){extra}, {dt:.2f} s per image"))
    _measures(out, mpath, model.pixel_spacing)
    if bad and not a.skip_bad:
        print(printable(f"napari-glimpse: error: {len(bad)} of {len(todo)} image(s) skipped (listed above); the "
                        f"other {done} are in {out} (--skip-bad: exit 0 all the same)"), file=sys.stderr)
        return 2
    return 0



def _measures(out: Path, mpath: Path | None, spacing: float) -> None:
    if mpath is not None:
        from .cli import _write_measures
        from .io import read_landmarks_csv

        names, coords = read_landmarks_csv(out)
        _write_measures(mpath, names, coords, spacing)
