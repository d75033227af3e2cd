"""``napari-glimpse measure``: clinical measurements from a landmark CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import GlimpseError
from ._args import spacing_text


def add_parser(sub) -> None:
    ms = sub.add_parser("measure", help="clinical measurements (ANB, SNB, SNA, ODI, APDI, FHI, FMA, MW) and classes "
                                        "from a 19-landmark CSV (docs/measurements.md)")
    ms.add_argument("landmarks", metavar="LANDMARKS.csv", help="Kaggle-layout CSV of the 19 ISBI landmarks, pixels")
    ms.add_argument("--out", required=True, help="CSV to write: image_path, the 8 values, then the 8 classes")
    ms.add_argument("--spacing", type=spacing_text, default=0.1, help="pixel spacing in mm (default 0.1; MW only)")


def run(a: argparse.Namespace) -> int:
    import numpy as np

    from ..io import read_landmarks_csv
    from ..landmark_set import find_landmark_set

    lset = find_landmark_set(Path(a.landmarks).parent)  # the set a landmarks.json beside the CSV declares
    if lset is not None and not lset.is_isbi:
        raise GlimpseError(f"{a.landmarks}: measurements need the ISBI 19 landmarks; the landmark set of this "
                           f"folder is {lset.describe()}")
    names, coords = read_landmarks_csv(a.landmarks, landmark_set=lset)
    if coords.shape[1] != 19:
        raise GlimpseError(f"{a.landmarks}: measurements need the 19 ISBI landmarks, got {coords.shape[1]}")
    if not np.isfinite(coords).all():  # read_landmarks_csv lets only absent landmarks (empty cells) through
        i, k = (int(v[0]) for v in np.nonzero(~np.isfinite(coords).all(-1)))
        raise GlimpseError(f"{a.landmarks}: image {names[i]} has landmark {k + 1} absent (empty cells); "
                           f"the measurements need all 19 landmarks")
    from .._predict import check_outputs, write_measures

    check_outputs([("--out", Path(a.out))], [Path(a.landmarks)], "inputs")  # not over its input, an image, a model
    write_measures(Path(a.out), names, coords, a.spacing)
    return 0
