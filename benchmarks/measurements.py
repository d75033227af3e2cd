#!/usr/bin/env python
"""Clinical measurement classes on ISBI 2015 Test1: the shipped model against the doctors.

For each of the 8 measurements of the challenge's second task (ANB, SNB, SNA, ODI, APDI, FHI, FMA,
MW; ``napari_glimpse.measurements``, docs/measurements.md), the classes read off

* the shipped default model's landmarks (``GlimpseModel.load()``, its own default settings),
* the senior doctor's, the junior doctor's and their mean landmarks (the challenge's ground truth),

are compared as the challenge's evaluation code compares them: coordinates cast to int, the
classes of the mean landmarks as the truth, the mean per-class recall (the challenge's "SCR")
and the accuracy. Beside them: the two doctors against each other (junior's classes scored
against the senior's), and Lindner et al. 2016's 83.4 % average classification accuracy from
automatic landmarks on this data (Sci. Rep. 6:33581; 400 images, their own protocol).

Writes ``benchmarks/results/measurements_test1.json`` and prints a table. About 30 s.

Usage::

    python benchmarks/measurements.py [--data ../shared/data/isbi2015] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from napari_glimpse.measurements import MEASUREMENTS, agreement_table, classify_batch, measure_batch

HERE = Path(__file__).resolve()
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "isbi2015"
DEFAULT_OUT = HERE.parent / "results" / "measurements_test1.json"
LITERATURE = {
    "lindner_2016_average_accuracy": 0.834,
    "lindner_2016_note": "Lindner et al., Sci. Rep. 6 (2016), FALA: 83.4 % average classification accuracy over "
                         "the 8 measurements from automatic landmarks (400 ISBI images, their protocol)",
    "lindner_cootes_2015_challenge": "77-79 % (ISBI 2015 challenge entry)",
    "arik_2017_average_accuracy": 0.76,
}


def classes_of(landmarks: np.ndarray, spacing: float, integer_pixels: bool) -> np.ndarray:
    return classify_batch(measure_batch(landmarks, spacing, integer_pixels=integer_pixels))


def compare(classes: dict[str, np.ndarray]) -> dict[str, dict]:
    """The pairs reported: (prediction, reference) -> agreement table."""
    pairs = {
        "model_vs_mean": ("model", "mean"),
        "junior_vs_senior": ("junior", "senior"),
        "senior_vs_junior": ("senior", "junior"),
        "senior_vs_mean": ("senior", "mean"),
        "junior_vs_mean": ("junior", "mean"),
        "model_vs_senior": ("model", "senior"),
        "model_vs_junior": ("model", "junior"),
    }
    return {key: agreement_table(classes[ref], classes[pred]) for key, (pred, ref) in pairs.items()}


def summary_table(res: dict) -> str:
    main = res["integer_pixels"]
    lines = ["measure   model vs doctors' mean    junior vs senior",
             "          recall     accuracy       recall     accuracy"]
    for name in (*MEASUREMENTS, "average"):
        m, d = main["model_vs_mean"][name], main["junior_vs_senior"][name]
        lines.append(f"{name:<8}  {100 * m['mean_recall']:5.1f} %   {100 * m['accuracy']:5.1f} %"
                     f"        {100 * d['mean_recall']:5.1f} %   {100 * d['accuracy']:5.1f} %")
    lines.append(f"Lindner et al. 2016: {100 * LITERATURE['lindner_2016_average_accuracy']:.1f} % average accuracy")
    return "\n".join(lines)


def predict_test1(data: Path, threads: int):
    import torch

    from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel
    from napari_glimpse.io import load_dataset
    from napari_glimpse.metrics import radial_errors
    from napari_glimpse.training import predict_dataset

    torch.set_num_threads(threads)
    ds = load_dataset(data, "test1")
    model = GlimpseModel.load()
    t = time.perf_counter()
    preds, _ = predict_dataset(model, ds, progress=False)
    seconds = (time.perf_counter() - t) / len(ds)
    mre = float(radial_errors(preds, ds.ground_truth("mean"), ds.pixel_spacing).mean())
    info = {"model": str(DEFAULT_MODEL.name), "model_sha256": hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest(),
            "int8_nets": list(model.int8_nets), "seconds_per_image": seconds, "threads": threads,
            "mre_mm_vs_mean": mre, "n_images": len(ds), "images": [p.name for p in ds.image_paths]}
    return ds, preds, info


def run(data: Path, threads: int) -> dict:
    ds, preds, info = predict_test1(data, threads)
    sets = {"model": preds, "senior": ds.annotations["senior"], "junior": ds.annotations["junior"],
            "mean": ds.ground_truth("mean")}
    res = {"benchmark": "measurements_test1", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "data": str(data), "split": "test1", "spacing_mm": ds.pixel_spacing, **info,
           "protocol": "classes from the mean of senior and junior landmarks are the truth; coordinates cast to "
                       "int first as in the challenge code (integer_pixels); mean_recall = mean per-class recall "
                       "over the classes present in the truth (the challenge's SCR); mpa_score = the mpa port's "
                       "sum of recalls / 3", "literature": LITERATURE}
    for integer_pixels in (True, False):
        classes = {k: classes_of(v, ds.pixel_spacing, integer_pixels) for k, v in sets.items()}
        key = "integer_pixels" if integer_pixels else "float_pixels"
        res[key] = compare(classes)
        if integer_pixels:
            res["classes_note"] = "per image (images order), one digit per measurement in MEASUREMENTS order"
            res["classes"] = {k: ["".join(map(str, row)) for row in v] for k, v in classes.items()}
            res["class_counts_mean"] = {m: np.bincount(classes["mean"][:, j], minlength=5)[1:].tolist()
                                        for j, m in enumerate(MEASUREMENTS)}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    res = run(a.data, a.threads)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(summary_table(res))
    print(f"model MRE {res['mre_mm_vs_mean']:.3f} mm, {res['seconds_per_image']:.3f} s per image; wrote {a.out}")


if __name__ == "__main__":
    main()
