"""``napari-glimpse predict``: landmarks of images or folders, written as a CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import nonnegative_int, positive_int, spacing_text


def add_parser(sub) -> None:
    pr = sub.add_parser("predict", help="predict landmarks on images or folders")
    pr.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--model", help="model file, or a packaged model's name: default (the shipped model, the "
                                    "default) or glimpse (the glimpse-only model)")
    pr.add_argument("--out", required=True, help="CSV to write (Kaggle layout)")
    pr.add_argument("--confidence-out", help="CSV of per-landmark confidence (default: OUT with _confidence)")
    pr.add_argument("--iterations", type=nonnegative_int,
                    help="glimpse steps (default: the model's own choice; 0 = the coarse and fine stages' answer)")
    pr.add_argument("--starts", type=positive_int, default=1, help="perturbed starts averaged per landmark")
    pr.add_argument("--facing", choices=["auto", "right", "left"], default="auto",
                    help="which way the patient faces (auto: try both, keep the one that settles)")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--threads", type=positive_int)
    pr.add_argument("--float", action="store_true",
                    help="run the float nets even where the model carries int8 graphs (slower; see 'quantize')")
    pr.add_argument("--spacing", type=spacing_text, metavar="MM",
                    help="pixel spacing of every image in mm (default: each file's own, from DICOM or TIFF tags, "
                         "else the model's, 0.1 mm, with a note when an image's size is unlike the training "
                         "images'); images are resampled to the model's spacing and answered in their own pixels")
    pr.add_argument("--skip-bad", action="store_true",
                    help="images that cannot be read or predicted are reported (one line each) and skipped, and "
                         "the exit code is 0 (default: 2 once the other images are written)")
    pr.add_argument("--resume", action="store_true",
                    help="keep the rows already in OUT (and its confidence CSV) and predict only the other images")
    pr.add_argument("--measures", nargs="?", const=True, metavar="CSV",
                    help="also write the 8 clinical measurements and their classes (as 'measure' does, at the "
                         "model's pixel spacing) to CSV (default: OUT with _measures, e.g. preds_measures.csv)")
    pr.add_argument("--workers", type=positive_int, metavar="N",
                    help="images predicted at once, each by its own thread (default: 2, or 1 on one core); with more "
                         "than 1 and no --threads, torch runs one thread per worker's share of the cores")
    pr.add_argument("--shard", metavar="I/N",
                    help="predict only shard I of N (images I, I+N, I+2N, ... of the sorted list; 0 <= I < N): run N "
                         "processes or machines with the same images, one --shard and --out each, then 'merge'")


def _confidence_path(out: Path, given: str | None) -> Path:
    return Path(given) if given else out.with_name(out.stem + "_confidence.csv")


def run(a: argparse.Namespace) -> int:
    from .._predict import run_predict

    out = Path(a.out)
    mpath = None
    if a.measures:
        mpath = out.with_name(out.stem + "_measures.csv") if a.measures is True else Path(a.measures)
    return run_predict(a, _confidence_path(out, a.confidence_out), mpath)
