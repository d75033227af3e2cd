"""``napari-glimpse finetune``: fine-tune a model on reviewed labels."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Sequence

from ..errors import GlimpseError
from ._args import is_main, nonnegative_int, positive_float, positive_int, probability, spacing_text

# finetune's default time budget, minutes (FinetuneConfig.time_budget_s; chosen by benchmarks/adapt.py)
FINETUNE_MINUTES = 4.0
EXTEND_MINUTES = 15.0  # --extend's (napari_glimpse.extend.EXTEND_DEFAULTS)


def add_parser(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a model on reviewed labels (e.g. exported corrections)")
    f.add_argument("--model", help="model to start from: a file, or a packaged model's name (default, glimpse); "
                                   "default: the shipped model")
    f.add_argument("--data", required=True, help="reviewed labels: a Kaggle-layout CSV or a dataset folder")
    f.add_argument("--split", default="train", help="split, when --data is a folder")
    f.add_argument("--mix-data", metavar="DIR",
                   help="also train on --mix-images images of this dataset's --mix-split (e.g. the original training "
                        "set, so that the nets keep what they learned from it)")
    f.add_argument("--mix-split", default="train")
    f.add_argument("--mix-images", type=nonnegative_int, metavar="N",
                   help="how many --mix-data images are replayed, drawn at random (default: as many as --data has)")
    f.add_argument("--spacing", type=spacing_text, metavar="MM",
                   help="pixel spacing of the --data images in mm (default: the model's, 0.1 for the shipped one); "
                        "at another, they are resampled to the model's for training (labels with them)")
    f.add_argument("--out", required=True, help="new model file (records its parent)")
    f.add_argument("--max-steps", type=positive_int, metavar="N",
                   help="steps for each net of every stage tuned that is not given its own below (default: "
                        "coarse 30, fine 100, glimpse 200: about 4 minutes for the shipped model on one CPU thread)")
    f.add_argument("--time-budget", type=positive_float, metavar="MIN",
                   help=f"stop tuning by then (default {FINETUNE_MINUTES:g}, with --extend {EXTEND_MINUTES:g}; the "
                        "stages share it in proportion to their expected time; remaking the int8 graphs comes after "
                        "it, about half a minute)")
    f.add_argument("--extend", action="store_true",
                   help="the data's landmark set (its landmarks.json) holds the model's landmarks and new ones: give "
                        "the model a head for each new landmark, then tune it on the data and the --mix-data replay "
                        "(the model's original training set, the new landmarks absent there) so that the old ones "
                        "keep their skill; defaults: coarse 400, fine 600 steps per net at 0.3x the training rate, "
                        "no offsets (docs/landmark-sets.md)")
    f.add_argument("--lr", type=positive_float, default=1e-4, help="the glimpse net's learning rate")
    f.add_argument("--coarse-steps", type=nonnegative_int, metavar="N",
                   help="steps for each net of the model's coarse stage, fine-tuned first at a tenth of its "
                        "learning rate (default: --max-steps, else 30; 0 keeps it as it is)")
    f.add_argument("--fine-steps", type=nonnegative_int, metavar="N",
                   help="steps for each net of the model's fine stage, fine-tuned after the coarse stage at a tenth "
                        "of its learning rate (default: --max-steps, else 100; 0 keeps it as it is)")
    f.add_argument("--fine-layers", choices=["all", "decoder", "last", "head"], default="all",
                   help="which layers of each fine net learn (default all)")
    f.add_argument("--no-offsets", action="store_true",
                   help="do not learn the per-landmark offsets (a site's systematic difference from the model's "
                        "answers, added to it; learned only where the answer is the coarse and fine stages')")
    f.add_argument("--artefacts", type=probability, metavar="P",
                   help="the nets' training images show another device's artefacts (skull top cut off, a ruler, "
                        "a collimator band) with probability P; default: each net's own (the shipped nets' 0.5)")
    f.add_argument("--batch-size", type=positive_int,
                   help="the glimpse net's batch of one step, when it is tuned; under torchrun the processes share it")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto")
    f.add_argument("--threads", type=positive_int)
    f.add_argument("--no-quantize", action="store_true",
                   help="do not remake the parent's int8 graphs for the tuned nets (they then run float)")
    f.add_argument("--progress-json", action="store_true",
                   help="print one JSON line per step on stdout (for the napari widget): the stage, its step, and over "
                        "the whole run overall_step / overall_total, progress (0-1), elapsed_s and eta_s")
    f.add_argument("--nice", type=nonnegative_int, default=0, metavar="N",
                   help="lower this process's CPU priority by N (the napari widget passes 10, so that the viewer "
                        "stays responsive on a machine with few cores)")
    f.add_argument("--resume", action="store_true",
                   help="continue from OUT.resume (written every minute once the coarse and fine stages are tuned)")


def _finetune_data(a: argparse.Namespace, parent):
    """The reviewed set, the original set to replay (or None), at the parent's spacing, and the
    model to tune: the parent, or with ``--extend`` the parent widened to the data's landmarks."""
    from dataclasses import replace

    from ..extend import relabelled, widen
    from ..io import load_dataset
    from ..landmark_set import check_match
    from ..spacing import at_spacing

    # the parent works at its own spacing: --data at another (--spacing) is resampled to it, labels
    # with it; --mix-data is taken at the parent's (the original training set's)
    ds = load_dataset(a.data, a.split, a.spacing or parent.pixel_spacing)
    if a.spacing:
        ds = at_spacing([ds], parent.pixel_spacing)
    mix = load_dataset(a.mix_data, a.mix_split, parent.pixel_spacing) if a.mix_data else None
    if mix is not None:
        check_match(parent.landmark_set, mix.landmark_set, len(mix.landmark_names), "the replay data")
    if a.extend:
        if ds.landmark_set is None:
            raise GlimpseError("--extend needs a landmarks.json beside the data naming its landmarks: the model's "
                               "and the new ones (docs/landmark-sets.md)")
        if mix is not None and mix.landmark_set is None:  # matched by count above: the model's landmarks
            mix = replace(mix, landmark_names=parent.landmark_set.names, landmark_set=parent.landmark_set)
        parent = widen(parent, ds.landmark_set, ds)
        mix = relabelled(mix, parent.landmark_set) if mix is not None else None
    check_match(parent.landmark_set, ds.landmark_set, len(ds.landmark_names), "the data")
    return ds, mix, parent


def _finetune_config(a: argparse.Namespace):
    """:class:`~napari_glimpse.finetune.FinetuneConfig` from the options (its defaults where none)."""
    from ..extend import EXTEND_DEFAULTS
    from ..finetune import FinetuneConfig

    base = FinetuneConfig(**EXTEND_DEFAULTS) if a.extend else FinetuneConfig()

    def steps(given: int | None, default: int) -> int:
        return given if given is not None else a.max_steps if a.max_steps is not None else default

    return FinetuneConfig(coarse_steps=steps(a.coarse_steps, base.coarse_steps),
                          fine_steps=steps(a.fine_steps, base.fine_steps),
                          glimpse_steps=a.max_steps if a.max_steps is not None else base.glimpse_steps,
                          fine_layers=a.fine_layers, glimpse_lr=a.lr, offsets=base.offsets and not a.no_offsets,
                          lr_scale=base.lr_scale, mix_images=a.mix_images,
                          time_budget_s=a.time_budget * 60 if a.time_budget else base.time_budget_s,
                          artefacts=a.artefacts, seed=a.seed)


def _progress_line(info: dict) -> None:
    """One ``--progress-json`` line (a glimpse step's carries no ``stage``, as before stages were named)."""
    keys = ("stage", "member", "step", "steps", "overall_step", "overall_total", "progress", "eta_s", "elapsed_s",
            "loss", "loss_mm")
    line = {k: info[k] for k in keys if k in info and info[k] is not None}
    if line.get("stage") == "glimpse":
        del line["stage"]
    print(json.dumps(line), flush=True)


def run(a: argparse.Namespace) -> int:
    from ..finetune import Progress, finetune
    from ..inference import GlimpseModel, resolve_model

    main = is_main()  # rank 0 of a torchrun job reports, requantizes and writes
    progress = Progress(_progress_line if a.progress_json and main else None)  # the time budget counts from here
    parent = GlimpseModel.load(a.model, a.device)
    # the stages whose nets ran int8 graphs in the parent get them again after tuning
    had_int8 = sorted(name for name, rts in parent.runtimes.items()
                      if any(rt.graph() is not None for rt in rts))
    float_ends = bool((parent.meta.get("int8") or {}).get("float_ends", False))  # before --extend widens it
    ds, mix, parent = _finetune_data(a, parent)
    parent_path = str(resolve_model(a.model))
    meta = {"parent": parent_path, "parent_meta": {k: parent.meta.get(k) for k in ("command", "train_steps")},
            "finetune_data": str(a.data), "command": "napari-glimpse " + " ".join(sys.argv[1:])}
    if a.mix_data:
        meta["finetune_mix_data"] = str(a.mix_data)
    requantize = bool(had_int8) and not a.no_quantize
    if requantize:
        n_nets = sum(len(parent.runtimes[name]) for name in had_int8)
        int8_phase = progress.add("int8", n_nets, later=True)
    if a.resume:
        model = _resume_finetune(a, ds, progress)
    else:
        model = finetune(parent, ds, a.out, _finetune_config(a), mix=mix, progress=progress, meta=meta,
                         device=parent.device, batch_size=a.batch_size, verbose=not a.progress_json and main)
    if not main:
        return 0
    if requantize:
        _requantize(a, ds, had_int8, float_ends,
                    report=lambda done: progress.report(int8_phase, done), mix=mix)
    rec = model.meta.get("finetuned", {})
    steps = sum(sum(v) for v in rec["steps"].values()) if "steps" in rec else model.meta.get("train_steps", 0)
    what = _tuned_text(rec)
    seconds = time.monotonic() - progress.t0
    print(json.dumps({"done": True, "out": str(a.out), "steps": steps, "tuned": what, "seconds": round(seconds, 1)})
          if a.progress_json else f"wrote {a.out}: fine-tuned {steps} steps from {parent_path} ({what}; "
                                  f"{seconds / 60:.1f} min)")
    return 0


def _tuned_text(rec: dict) -> str:
    """What ``meta['finetuned']`` says was tuned, in a few words."""
    parts = []
    for stage in rec.get("stages", []):
        steps = rec.get("steps", {}).get(stage)
        if stage == "offsets":
            parts.append("landmark offsets")
        elif steps:
            nets = f"{len(steps)} nets x " if len(steps) > 1 else ""
            parts.append(f"{stage} {nets}{max(steps)} steps")
    if rec.get("mix_images"):
        parts.append(f"{rec['mix_images']} original images replayed")
    return ", ".join(parts) or "nothing"


def _resume_finetune(a: argparse.Namespace, ds, progress):
    """``--resume``: the glimpse net's tuning goes on from OUT.resume (the offsets, coarse and
    fine stages were tuned before it was written)."""
    from ..training import train

    ph = progress.add("glimpse", a.max_steps or 200)
    model = train(ds, a.out, device=a.device, resume=True, max_steps=a.max_steps, progress=not a.progress_json,
                  callback=progress.reporter(ph))
    model.meta.setdefault("finetuned", {})["resumed"] = True
    if is_main():
        model.save(a.out)
    return model


def _requantize(a: argparse.Namespace, ds, which: Sequence[str], float_ends: bool,
                report: Callable[[int], None] | None = None, mix=None) -> None:
    """After fine-tuning a model that ran int8 graphs: make them again for every net of the
    stages ``which`` that had them (a graph holds the weights it was made from), with the
    parent's ``float_ends``, calibrated on up to 10 of the fine-tuning images, and write the model
    again. The float model is already written: without the onnx package, or on any failure, it
    stays as it is (its nets run float). ``report(nets done)``: progress (else, with
    ``--progress-json``, a line per net). ``mix``: the original set replayed; then half the
    calibration images are its (the graphs' ranges then cover both kinds of image)."""
    import numpy as np

    from ..inference import GlimpseModel
    from ..int8 import quantize

    model = GlimpseModel.load(a.out, "cpu")
    if all(rt.usable() is not None for name in which for rt in model.runtimes[name]):
        return
    def spread(d, n: int) -> list:
        return [d.image(int(i)) for i in np.unique(np.linspace(0, len(d) - 1, min(n, len(d))).round().astype(int))]

    images = spread(ds, 5) + spread(mix, 5) if mix is not None and len(mix) else spread(ds, 10)

    def progress(what: str, done: int, n: int) -> None:
        if what == "nets" and report is not None:
            report(done)
        elif a.progress_json and what == "nets":
            print(json.dumps({"stage": "int8", "step": done, "progress": done / n}), flush=True)

    try:
        n = quantize(model, images, progress, which=which, float_ends=float_ends)
    except GlimpseError as exc:
        print(f"napari-glimpse: note: {a.out} runs its float nets ({exc})", file=sys.stderr)
        return
    model.save(a.out)
    if not a.progress_json:
        print(f"int8 graphs remade for {n} nets (calibrated on {len(images)} image(s))")
