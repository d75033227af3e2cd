#!/usr/bin/env python
"""Your own landmark set, trained from scratch and added to a model (issue 24's acceptance 1-2).

From the ISBI data (``../shared/data/isbi2015``), in ``--work`` (symlinked images, CSVs of the
chosen columns, a ``landmarks.json``):

* **lab5**: Sella, Nasion, Menton, Gonion, Pogonion (ISBI 1, 2, 8, 10, 7) renumbered 1-5, Train
  001-150; ``train --recipe default --time-budget 15``; Test1 MRE / SDR of the 5, beside the
  shipped model's on the same 5 (``lab5``).
* **extension**: a base of the ISBI 19 without Gonion, Articulare and soft-tissue pogonion
  (``isbi16``), ``train --recipe default --max-steps 800`` on Train 001-130; then
  ``finetune --extend`` on 30 images labelled with all 19 (Train 001-030) with the base's
  training set replayed (``--mix-data``; the new landmarks absent there). Test1: the 3 new
  landmarks' MRE, and the 16 others' before (base) and after (extended). Validation (the choice
  of the extension's defaults): Train 131-150, neither model's training images.

Each step is skipped when its model file exists in ``--work`` (re-run to score again). Every run
writes its figures, wall minutes and the machine's load to ``benchmarks/results/landmark_sets.json``.

Usage::

    python benchmarks/landmark_sets.py --work /tmp/sets              # everything (about 1.5 h)
    python benchmarks/landmark_sets.py --work /tmp/sets --only lab5
    python benchmarks/landmark_sets.py --work /tmp/sets --only extension --split val
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2015"
OUT = ROOT / "benchmarks" / "results" / "landmark_sets.json"

LAB5 = [1, 2, 8, 10, 7]  # ISBI numbers: Sella, Nasion, Menton, Gonion, Pogonion
LEFT_OUT = [10, 19, 16]  # Gonion, Articulare, Soft tissue pogonion: what the extension adds
BASE16 = [i for i in range(1, 20) if i not in LEFT_OUT]
# split -> (ISBI file, first and last image number)
SPLITS = {"train": ("train", 1, 150), "val": ("train", 131, 150), "test1": ("test1", 151, 300)}


def make_folder(folder: Path, columns: list[int], name: str | None, description: str,
                splits: dict[str, tuple[str, int, int]]) -> Path:
    """A data folder of the ISBI ``columns`` (1-based, in this order), both doctors, with a
    ``landmarks.json`` named ``name`` (none: read as the ISBI 19)."""
    from napari_glimpse.landmark_set import ISBI19

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "images").exists():
        os.symlink(DATA / "images", folder / "images")
    for split, (src, lo, hi) in splits.items():
        for who in ("senior", "junior"):
            rows = list(csv.reader(open(DATA / f"{src}_{who}.csv")))
            out = [["image_path"] + [f"{j + 1}_{c}" for j in range(len(columns)) for c in "xy"]]
            out += [[r[0]] + [r[2 * (i - 1) + 1 + c] for i in columns for c in (0, 1)]
                    for r in rows[1:] if lo <= int(Path(r[0]).stem) <= hi]
            with open(folder / f"{split}_{who}.csv", "w", newline="") as f:
                csv.writer(f).writerows(out)
    if name:
        marks = [ISBI19.landmarks[i - 1].to_dict() for i in columns]
        (folder / "landmarks.json").write_text(json.dumps({"name": name, "description": description,
                                                           "landmarks": marks}, indent=1))
    return folder


def cli(*args, log: Path) -> float:
    """Run ``napari-glimpse ARGS`` (its output to ``log``); returns its wall minutes."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "napari_glimpse", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    return (time.monotonic() - t0) / 60


def score(model: str | Path, data: Path, split: str, columns: list[int] | None = None) -> dict:
    """MRE, SDR and points > 10 mm of ``model`` on ``data``'s split against the mean of the doctors,
    per landmark too; ``columns``: the model's landmarks (1-based) to score, in the data's order."""
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import load_dataset

    ds = load_dataset(data, split)
    m = GlimpseModel.load(model, "cpu")
    cols = [c - 1 for c in columns] if columns else list(range(len(m.landmark_names)))
    pred = np.stack([m.predict(p, spacing=ds.pixel_spacing).final[cols] for p in ds.image_paths])
    d = np.linalg.norm(pred - ds.ground_truth(), axis=-1) * ds.pixel_spacing
    return {"images": len(ds), "mre_mm": round(float(d.mean()), 3), "sd_mm": round(float(d.std()), 3),
            **{f"sdr_{t}mm": round(float((d <= t).mean() * 100), 1) for t in (2, 2.5, 3, 4)},
            "over_10mm": int((d > 10).sum()),
            "per_landmark_mm": {n: round(float(v), 3) for n, v in zip(ds.landmark_names, d.mean(0))}}


def lab5(work: Path, a: argparse.Namespace) -> dict:
    data = make_folder(work / "lab5", LAB5, "lab5", "ISBI 1, 2, 8, 10, 7 renumbered 1-5",
                       {"train": SPLITS["train"], "test1": SPLITS["test1"]})
    model, rec = work / "lab5.pt", {"columns_isbi": LAB5, "minutes_budget": a.lab5_minutes}
    if not model.exists():
        rec["train_wall_min"] = round(cli("train", "--recipe", "default", "--data", data, "--out", model,
                                          "--time-budget", a.lab5_minutes, log=work / "lab5.log"), 1)
        rec["load_after_training"] = os.getloadavg()[0]
    rec["lab5_model"] = score(model, data, a.split)
    rec["shipped_model_same_5"] = score("default", data, a.split, LAB5)
    return rec


def extension(work: Path, a: argparse.Namespace) -> dict:
    base_data = make_folder(work / "isbi16", BASE16, "isbi16", "the ISBI 19 without Gonion, Articulare and "
                            "soft-tissue pogonion", {"train": ("train", 1, 130), "val": SPLITS["val"],
                                                     "test1": SPLITS["test1"]})
    ext_data = make_folder(work / "ext19", list(range(1, 20)), "isbi19", "the ISBI 19 (finetune --extend reads "
                           "the larger set from this file)",
                           {"train": ("train", 1, a.extend_images), "val": SPLITS["val"], "test1": SPLITS["test1"]})
    base, ext = work / "base16.pt", work / "extended.pt"
    rec: dict = {"left_out_isbi": LEFT_OUT, "base_minutes_budget": a.base_minutes, "base_steps": a.base_steps,
                 "extend_images": a.extend_images}
    if not base.exists():
        budget = ["--time-budget", a.base_minutes] + (["--max-steps", a.base_steps] if a.base_steps else [])
        rec["base_train_wall_min"] = round(cli("train", "--recipe", "default", "--data", base_data, "--out", base,
                                               *budget, log=work / "base16.log"), 1)
    if not ext.exists():
        rec["extend_wall_min"] = round(cli("finetune", "--extend", "--model", base, "--data", ext_data,
                                           "--mix-data", base_data, "--out", ext, log=work / "extend.log"), 1)
        rec["load_after_extending"] = os.getloadavg()[0]
    rec["extend_log_tail"] = (work / "extend.log").read_text().strip().splitlines()[-1][-300:] \
        if (work / "extend.log").exists() else None
    rec["base_16"] = score(base, base_data, a.split)
    after = score(ext, ext_data, a.split)
    new = [n for n in after["per_landmark_mm"] if n not in rec["base_16"]["per_landmark_mm"]]
    old16 = [after["per_landmark_mm"][n] for n in rec["base_16"]["per_landmark_mm"]]
    rec["extended_19"] = after
    rec["extended_old_16_mre_mm"] = round(float(np.mean(old16)), 3)
    rec["extended_new_3_mre_mm"] = round(float(np.mean([after["per_landmark_mm"][n] for n in new])), 3)
    rec["old_16_change_mm"] = round(rec["extended_old_16_mre_mm"] - rec["base_16"]["mre_mm"], 3)
    rec["shipped_model_new_3_mm"] = {n: v for n, v in score("default", ext_data, a.split)["per_landmark_mm"].items()
                                     if n in new}
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the data folders, models and logs")
    p.add_argument("--only", choices=["lab5", "extension"], help="one of the two runs (default both)")
    p.add_argument("--split", default="test1", choices=["val", "test1"],
                   help="what is scored: test1 (once per shipped figure) or val (Train 131-150; extension only)")
    p.add_argument("--lab5-minutes", type=float, default=15.0)
    p.add_argument("--base-minutes", type=float, default=238.0, help="the base's budget in minutes (the recipe's full "
                   "238 by default: --base-steps stops every net first)")
    p.add_argument("--base-steps", type=int, default=800,
                   help="the base's steps per net (the same model whatever the machine's load; 0: minutes only)")
    p.add_argument("--extend-images", type=int, default=30)
    a = p.parse_args(argv)
    if not DATA.is_dir():
        p.error(f"no ISBI data at {DATA}")
    a.work.mkdir(parents=True, exist_ok=True)
    for name, fn in (("lab5", lab5), ("extension", extension)):
        if a.only in (None, name):
            t0 = time.monotonic()
            rec = fn(a.work, a)
            rec.update(split=a.split, minutes=round((time.monotonic() - t0) / 60, 1), load=os.getloadavg()[0],
                       date=time.strftime("%Y-%m-%d %H:%M"))
            results = json.loads(OUT.read_text()) if OUT.exists() else {}  # another run may have written
            results[f"{name}_{a.split}"] = rec
            OUT.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
