"""An archive over several processes or machines: ``predict --shard i/n`` predicts every n-th
image of the list, each process writing its own CSVs, and ``merge`` puts the shards' CSVs together.

The list is the one ``predict`` makes of its arguments (each folder's images sorted by name, in
the order the arguments come), so processes given the same arguments split it the same way, on
one machine or many. ``merge`` checks that the CSVs were written with the same columns, that no
image is in two of them (or twice in one) and that no row was cut short, and writes the rows
sorted by image name: a folder's order, the order one process writes them in. Each CSV's
confidence CSV (``NAME_confidence.csv`` beside it, as ``predict`` writes it) is merged alike.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from ._files import check_writable
from .errors import GlimpseError, printable
from .io import CSV_ENCODING, CSV_ERRORS, write_table_csv


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; anything else is a :class:`GlimpseError`."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise GlimpseError(f"--shard {text}: give i/n with 0 <= i < n, e.g. 0/2 and 1/2 for two processes")
    return i, n


def shard_of(paths: Sequence[Path], i: int, n: int) -> list[Path]:
    """Shard ``i`` of ``n``: images ``i``, ``i + n``, ``i + 2n``, ... of ``paths`` (every shard gets
    images from the whole list: a folder of larger images is shared out too)."""
    return list(paths[i::n])


def confidence_path(path: Path) -> Path:
    """Where ``predict --out PATH`` writes its confidence CSV by default."""
    return path.with_name(path.stem + "_confidence.csv")


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """A CSV ``predict`` wrote: its header and rows, every row whole (a row cut short, or a file
    that is missing or not a CSV, is a :class:`GlimpseError`)."""
    try:
        text = path.read_text(encoding=CSV_ENCODING, errors=CSV_ERRORS)
    except OSError as exc:
        raise GlimpseError(f"cannot read {path}: {exc.strerror or exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [r for r in reader if r]
    except csv.Error as exc:
        raise GlimpseError(f"{path}:{reader.line_num}: not a CSV predict wrote ({exc})") from None
    if not rows or rows[0][0].strip() != "image_path":
        raise GlimpseError(f"{path}: not a CSV predict wrote (its first column is not image_path)")
    header = [c.strip() for c in rows[0]]
    for line, r in enumerate(rows[1:], start=2):
        if len(r) != len(header) or (line == len(rows) and not text.endswith("\n")):
            raise GlimpseError(f"{path}: row {line} is cut short (a run stopped while writing it?); run that "
                               "shard again with --resume, then merge")
    return header, rows[1:]


def merge_tables(paths: Sequence[Path]) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of ``paths`` (all with the same header, no image twice), sorted by name."""
    header: list[str] | None = None
    seen: dict[str, Path] = {}
    rows: list[list[str]] = []
    for p in paths:
        h, rs = read_table(p)
        if header is None:
            header, first = h, p
        elif h != header:
            raise GlimpseError(f"{p} has other columns than {first} ({len(h)} against {len(header)}: "
                               f"{', '.join(h[:3])}, ... against {', '.join(header[:3])}, ...); not merged")
        for r in rs:
            if r[0] in seen:
                where = "twice in " + str(p) if seen[r[0]] == p else f"in both {seen[r[0]]} and {p}"
                raise GlimpseError(f"image {r[0]} is {where}; not merged (were two shards given the same i/n?)")
            seen[r[0]] = p
        rows += rs
    assert header is not None
    return header, sorted(rows, key=lambda r: r[0])


def _check_outputs(outputs: Sequence[tuple[str, Path]], inputs: Sequence[Path]) -> None:
    """An output may be neither an input nor the other output, and must be writable."""
    ins = {p.resolve() for p in inputs}
    for opt, p in outputs:
        if p.resolve() in ins:
            raise GlimpseError(f"{opt} {p} is one of the CSVs to merge; choose another file name")
    if len(outputs) == 2 and outputs[0][1].resolve() == outputs[1][1].resolve():
        raise GlimpseError(f"{outputs[0][0]} and {outputs[1][0]} are the same file ({outputs[0][1]})")
    for opt, p in outputs:
        if p.suffix.lower() != ".csv":
            raise GlimpseError(f"{opt} {p}: the merged table is a CSV file; give a name ending in .csv")
        try:
            check_writable(p)
        except OSError as exc:
            raise GlimpseError(f"{opt} {p}: cannot write there ({exc.strerror or exc})") from None


def run_merge(inputs: Sequence[str], out: str, confidence_out: str | None = None) -> int:
    """The ``merge`` command: ``inputs`` (landmark CSVs of ``predict``) into ``out``, and their
    confidence CSVs into ``confidence_out`` (default: OUT with ``_confidence``) when each has one."""
    paths = [Path(p) for p in inputs]
    seen: set[Path] = set()
    for p in paths:
        if not p.is_file():
            raise GlimpseError(f"{p}: no such CSV file")
        if p.resolve() in seen:
            raise GlimpseError(f"{p} is given twice; not merged")
        seen.add(p.resolve())
    out_p = Path(out)
    conf = [confidence_path(p) for p in paths]
    have = [c.is_file() for c in conf]
    if any(have) and not all(have):
        lacking = next(p for p, h in zip(paths, have) if not h)
        raise GlimpseError(f"{lacking} has no confidence CSV beside it ({confidence_path(lacking).name}) and "
                           "others have; merge them all with or all without")
    cout = (Path(confidence_out) if confidence_out else confidence_path(out_p)) if all(have) else None
    _check_outputs([("--out", out_p)] + ([("--confidence-out", cout)] if cout else []), paths + conf)
    header, rows = merge_tables(paths)
    if cout is not None:
        cheader, crows = merge_tables(conf)
        if [r[0] for r in crows] != [r[0] for r in rows]:
            odd = sorted({r[0] for r in crows} ^ {r[0] for r in rows})[0]
            raise GlimpseError(f"image {odd} is in the landmark CSVs or in their confidence CSVs but not in both "
                               "(a run stopped between the two?); run that shard again with --resume, then merge")
        write_table_csv(cout, cheader, crows)
    write_table_csv(out_p, header, rows)
    print(printable(f"wrote {out_p}" + (f" and {cout}" if cout else "") + f": {len(rows)} image(s) from "
                    f"{len(paths)} CSV(s)"))
    return 0
