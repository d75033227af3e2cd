#!/usr/bin/env python
"""The image operations behind every prediction, by library: why OpenCV does them, not scikit-image.

Two operations, on one ISBI image (1935 x 2400, float32 for the pyramid, uint8 for resampling):

* **pyramid step**: one Gaussian x2 reduction (5-tap binomial blur, keep every second pixel), as
  ``napari_glimpse.pyramid`` does 5 times per image: OpenCV ``pyrDown`` (used), the package's own
  torch passes (the fallback), scikit-image ``transform.pyramid_reduce``.
* **resample**: an image at 0.125 mm per pixel to the model's 0.1 (``napari_glimpse.spacing.resample``):
  OpenCV ``resize`` (used; area when shrinking, linear when enlarging), scikit-image
  ``transform.resize`` (linear, anti-aliased when shrinking).

Rounds interleave the libraries (``--rounds``, one call each per round) so that load drifts hit
them alike; the record gives medians and each library's time as a ratio to OpenCV's. One thread.

Usage::

    python benchmarks/image_ops.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT.parent / "shared" / "data" / "isbi2015" / "images" / "151.jpg"
OUT = ROOT / "benchmarks" / "results" / "image_ops.json"


def _ops(img: np.ndarray) -> dict:
    import cv2
    import torch
    from skimage.transform import pyramid_reduce, resize

    from napari_glimpse.pyramid import _down2
    from napari_glimpse.spacing import model_shape

    x = img.astype(np.float32)
    h, w = img.shape
    up = model_shape((h, w), 0.125 / 0.1)  # a 0.125 mm image enlarged to 0.1 mm pixels
    down = model_shape((h, w), 0.08 / 0.1)  # a 0.08 mm image shrunk
    t = torch.from_numpy(x)[None, None]
    return {
        "pyramid step": {
            "opencv": lambda: cv2.pyrDown(x, dstsize=((w + 1) // 2, (h + 1) // 2)),
            "torch": lambda: _down2(t),
            "scikit-image": lambda: pyramid_reduce(x, downscale=2, sigma=1.0, order=1, preserve_range=True),
        },
        "resample up (0.125 -> 0.1 mm)": {
            "opencv": lambda: cv2.resize(img, (up[1], up[0]), interpolation=cv2.INTER_LINEAR),
            "scikit-image": lambda: resize(img, up, order=1, preserve_range=True, anti_aliasing=False),
        },
        "resample down (0.08 -> 0.1 mm)": {
            "opencv": lambda: cv2.resize(img, (down[1], down[0]), interpolation=cv2.INTER_AREA),
            "scikit-image": lambda: resize(img, down, order=1, preserve_range=True, anti_aliasing=True),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    import cv2
    import skimage
    import torch

    from napari_glimpse.io import read_image, to_grey_uint8

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    img = to_grey_uint8(read_image(IMAGE))
    ops = _ops(img)
    times = {op: {lib: [] for lib in libs} for op, libs in ops.items()}
    for _ in range(a.rounds + 1):  # the first round warms up and is dropped
        for op, libs in ops.items():
            for lib, f in libs.items():
                t0 = time.perf_counter()
                f()
                times[op][lib].append(time.perf_counter() - t0)
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "loadavg": [round(v, 2) for v in os.getloadavg()], "image": IMAGE.name, "shape": list(img.shape),
           "rounds": a.rounds, "threads": 1,
           "versions": {"opencv": cv2.__version__, "scikit-image": skimage.__version__, "torch": torch.__version__},
           "ops": {}}
    for op, libs in times.items():
        med = {lib: float(np.median(v[1:])) for lib, v in libs.items()}
        res["ops"][op] = {lib: {"median_ms": round(m * 1e3, 2), "vs_opencv": round(m / med["opencv"], 2)}
                          for lib, m in med.items()}
        print(op + ": " + ", ".join(f"{lib} {r['median_ms']:.1f} ms (x{r['vs_opencv']})"
                                    for lib, r in res["ops"][op].items()))
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
