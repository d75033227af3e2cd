"""``napari-glimpse quantize``: int8 graphs of the coarse and fine nets."""

from __future__ import annotations

import argparse
import time

from ._args import positive_int


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="add int8 graphs of the coarse and fine nets to a model (faster on CPUs)",
                       description="Quantize the model's coarse and fine nets to int8 (ONNX Runtime), calibrated on "
                                   "a few typical images (10 or so), and write "
                                   "the model with the graphs beside its float weights. Needs the onnx package: "
                                   "pip install 'napari-glimpse[quantize]'.")
    q.add_argument("model", help="model file")
    q.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="calibration images or folders")
    q.add_argument("--out", required=True, help="model file to write (may be MODEL itself)")
    q.add_argument("--limit", type=positive_int, default=10,
                   help="calibrate on at most this many images, spread over those given (default 10)")
    q.add_argument("--only", choices=["coarse", "fine"],
                   help="quantize this stage's nets only; the other's run float (--only fine: the answers stay "
                        "closer to the float nets', RMS 0.031 against 0.044 mm on ISBI validation, at a cost in speed)")
    # hidden: each net's first and last convolution kept float (a recipe's quantize float_ends); shipped: none
    q.add_argument("--float-ends", action="store_true", help=argparse.SUPPRESS)
    q.add_argument("--threads", type=positive_int)


def run(a: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from ..checkpoint import read_checkpoint
    from ..inference import GlimpseModel, resolve_model
    from ..int8 import quantize
    from ..io import expand_image_args

    paths = expand_image_args(a.images)
    if len(paths) > a.limit:  # spread over the images given
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, a.limit).round().astype(int)]
    half = read_checkpoint(resolve_model(a.model)).get("weights_stored_as") == "float16"
    model = GlimpseModel.load(a.model, "cpu", int8=False)
    bars: dict = {}

    def progress(what: str, done: int, total: int) -> None:
        if what not in bars:
            for b in bars.values():  # the previous step is done
                b.close()
            bars[what] = tqdm(total=total, desc="calibrate" if what == "images" else "quantize", unit=what[:-1],
                               leave=False)
        bars[what].update(done - bars[what].n)

    t = time.perf_counter()
    try:
        n = quantize(model, paths, progress, which=(a.only,) if a.only else ("coarse", "fine"),
                     float_ends=a.float_ends)
    finally:
        for b in bars.values():
            b.close()
    model.save(a.out, half_weights=half)
    print(f"wrote {a.out}: int8 graphs for {n} of {model.int8_nets[1]} nets, calibrated on {len(paths)} image(s) "
          f"in {time.perf_counter() - t:.0f} s")
    return 0
