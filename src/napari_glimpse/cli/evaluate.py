"""``napari-glimpse evaluate``: ISBI metrics on a labelled split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._args import nonnegative_int, positive_int, spacing_text


def add_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="ISBI metrics (MRE, SDR) on a labelled split; with the ISBI 19 landmarks "
                                        "also the measurement classes' agreement with the ground truth's (JSON: "
                                        "classification)")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test1")
    e.add_argument("--model", help="model file, or a packaged model's name: default (the shipped model, the "
                                   "default) or glimpse (the glimpse-only model)")
    e.add_argument("--iterations", type=nonnegative_int,
                   help="glimpse steps (default: the model's own choice; 0 = the coarse and fine stages' answer)")
    e.add_argument("--starts", type=positive_int, default=1)
    e.add_argument("--ground-truth", default="mean", help="mean (default), senior or junior")
    e.add_argument("--facing", choices=["auto", "right", "left"], default="auto")
    e.add_argument("--mirror", action="store_true",
                   help="flip every image left-right (labels flipped to match): the facing-left check")
    e.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    e.add_argument("--predictions", metavar="CSV", help="also write the predictions (Kaggle layout)")
    e.add_argument("--spacing", type=spacing_text, metavar="MM",
                   help="pixel spacing of the split's images in mm (default 0.1, the ISBI images'): images at "
                        "another spacing than the model's are resampled to it, and errors are in mm at this spacing")
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=positive_int)
    e.add_argument("--float", action="store_true", help="run the float nets even where the model carries int8 graphs")


def _classification(preds, ds, ground_truth: str) -> dict:
    """Agreement of the measurement classes (docs/measurements.md) from ``preds`` with the ground truth's,
    and of the two doctors with each other where both are in the data."""
    from ..io import present
    from ..measurements import classification_agreement, format_agreement

    truth = ds.ground_truth(ground_truth)
    full = present(truth).all(axis=1)  # the measurements need every landmark: images with one absent are left out
    out = {"ground_truth": ground_truth, "integer_pixels": True, "spacing_mm": ds.pixel_spacing}
    if not full.all():
        out["images_left_out"] = int((~full).sum())
        if not full.any():
            print("measurement classes: no image has every landmark in the ground truth; not compared")
            return out
    out["model"] = classification_agreement(preds[full], truth[full], ds.pixel_spacing)
    if {"senior", "junior"} <= set(ds.annotations):
        jun, sen = ds.annotations["junior"], ds.annotations["senior"]
        both = present(jun).all(axis=1) & present(sen).all(axis=1)
        if both.any():
            out["junior_vs_senior"] = classification_agreement(jun[both], sen[both], ds.pixel_spacing)
    left = f" ({out['images_left_out']} image(s) with an absent landmark left out)" if "images_left_out" in out else ""
    print(f"measurement classes against the {ground_truth} landmarks' (mean per-class recall, accuracy){left}:")
    print(format_agreement(out["model"]))
    return out


def run(a: argparse.Namespace) -> int:
    from ..inference import GlimpseModel
    from ..io import load_dataset, write_landmarks_csv
    from ..landmark_set import check_match
    from ..metrics import format_table
    from ..training import evaluate_model

    ds = load_dataset(a.data, a.split, a.spacing)
    model = GlimpseModel.load(a.model, a.device, int8=not a.float)
    check_match(model.landmark_set, ds.landmark_set, len(ds.landmark_names), "the data")
    res = evaluate_model(model, ds, a.iterations, a.starts, a.ground_truth, facing=a.facing, mirror=a.mirror)
    preds = res.pop("predictions")
    res.pop("errors_mm")
    res.update({"model": a.model or "default", "data": str(a.data), "split": a.split,
                "ground_truth": a.ground_truth, "iterations": a.iterations, "starts": a.starts,
                "facing": a.facing, "mirrored": a.mirror, "int8_nets": list(model.int8_nets)})
    print(format_table(res))
    print(f"{res['n_images']} images, {res['seconds_per_image']:.2f} s per image")
    if model.landmark_set.is_isbi:  # the measurements are made of the ISBI 19
        res["classification"] = _classification(preds, ds, a.ground_truth)
    if a.predictions:
        write_landmarks_csv(a.predictions, [p.name for p in ds.image_paths], preds)
    if a.json:
        text = json.dumps(res, indent=2)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text + "\n")
    return 0
