#!/usr/bin/env python
"""Print a Markdown table of the ISBI benchmark runs (``benchmarks/results/isbi_*.json``).

Usage: ``python benchmarks/results_table.py [JSON ...]`` (default: every ``isbi_*.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def row(path: Path, r: dict) -> str:
    """The table row of record ``r`` (read from ``path``)."""
    t = r["test"]["overall"]
    tr = r.get("train") or {}
    wall = tr.get("wall_s") or ((tr.get("train_wall_s") or 0) + (tr.get("coarse_train_wall_s") or 0))
    cpu = tr.get("cpu_s")
    mir = r.get("test_mirrored", {}).get("overall", {}).get("mre_mm")
    what = r["method"]
    if what == "glimpse":
        cfg = r.get("config") or {}
        if "coarse_members" in r:
            what += f" ({len(r['coarse_members'])} coarse nets averaged, {r.get('iterations')} it"
        else:
            what += f" (coarse {cfg.get('coarse_fraction', '?')}, {r.get('iterations')} it"
        what += ", flip avg" if r.get("coarse_flip_average") else ""
        what += f", blend {r['coarse_blend']})" if r.get("coarse_blend") else ")"
    return (f"| {path.name} | {what} | {r.get('budget_min', '?')} min × {r.get('threads', '?')} thr | "
            f"{wall / 60:.1f} | {cpu / 60 if cpu else float('nan'):.1f} | "
            f"{t['mre_mm']:.2f} ± {t['sd_mm']:.2f} | {t['sdr']['2']:.1f} | {t['sdr']['2.5']:.1f} | "
            f"{t['sdr']['3']:.1f} | {t['sdr']['4']:.1f} | {'' if mir is None else f'{mir:.2f}'} | "
            f"{r.get('seconds_per_image', float('nan')):.3f} ({r.get('speed_threads', '?')} thr) |")


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted(RESULTS.glob("isbi_*.json"))
    print("| run | method | budget | train wall (min) | train CPU (min) | Test1 MRE ± SD (mm) | SDR 2 | 2.5 | 3 | 4 mm "
          "| mirrored MRE | s / image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    untested = []
    for f in files:
        r = json.loads(f.read_text())
        if "test" in r:
            print(row(f, r))
        else:  # a training-only or validation-only record (--train-only, --no-test): no Test1 row
            untested.append(f.name)
    if untested:
        print(f"\nwithout Test1 figures (training or validation records): {', '.join(untested)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
