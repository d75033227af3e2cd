"""The ``napari-glimpse`` command line: train, predict, evaluate."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from .errors import GlimpseError

# finetune's default time budget, minutes (FinetuneConfig.time_budget_s; chosen by benchmarks/adapt.py)
FINETUNE_MINUTES = 4.0


def _positive_float(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _spacing_text(s: str) -> str:
    """``--spacing``: checked in :func:`main` (one error line, exit 2; see ``spacing.check_spacing``)."""
    return s


def _nonnegative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="napari-glimpse",
        description="Cephalometric landmarks with a foveated pyramid glimpse CNN.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a labelled split")
    t.add_argument("--data", required=True, help="dataset folder (Kaggle CSV or ISBI layout) or a CSV file")
    t.add_argument("--split", default="train", help="split to train on (default: train)")
    t.add_argument("--out", required=True, help="model file to write")
    t.add_argument("--recipe", metavar="NAME_OR_PATH",
                   help="train the kind of model a recipe describes: 'default' (the shipped model's: a coarse net and "
                        "four fine nets, int8; 238 min in full, about 4 h on 2 CPU cores) or a recipe file; "
                        "--time-budget then scales every stage's minutes, --max-steps caps every stage's steps")
    t.add_argument("--config", choices=["compact", "paper"], default="compact",
                   help="compact (default; trains on a CPU) or paper (ResNet-34 as published)")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    t.add_argument("--time-budget", type=_positive_float, metavar="MIN",
                   help="stop after this many minutes of training; the schedule fits the budget")
    t.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps")
    t.add_argument("--resume", action="store_true", help="continue from OUT.resume")
    t.add_argument("--init", metavar="MODEL", help="start from this model's weights (fine-tuning)")
    t.add_argument("--pretrained", nargs="?", const=True, metavar="PATH",
                   help="paper trunk: ImageNet weights from torchvision, or a local ResNet-34 state dict")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=_positive_int,
                   help="the glimpse net's batch of one step; under torchrun the processes share it (docs/scale.md)")
    t.add_argument("--lr", type=_positive_float)
    t.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the split as validation, reported as training goes")
    t.add_argument("--spacing", type=_spacing_text, metavar="MM",
                   help="pixel spacing of the images in mm (default 0.1); the new model works at it (images at "
                        "another spacing are resampled to it when predicted)")
    t.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    t.add_argument("--coarse-minutes", type=_positive_float, metavar="MIN",
                   help="first train the coarse whole-image stage for MIN minutes (its answer is the "
                        "glimpses' start and tells which way the patient faces); --time-budget follows")
    t.add_argument("--fine-minutes", type=_positive_float, metavar="MIN",
                   help="then train the fine stage for MIN minutes (a closer look around each coarse answer, "
                        "at 0.2 mm per pixel for ISBI images); needs --coarse-minutes")
    t.add_argument("--fine-target", choices=["mean", "annotators"], default="mean",
                   help="what the fine net is taught where the data has several annotators: a point at their "
                        "mean (default), or each annotator's point (equal weights; its answer lands between "
                        "them where they are less than about 4 mm apart); needs --fine-minutes")
    t.add_argument("--levels", type=_positive_int, help="pyramid levels seen by each glimpse (default 6)")

    f = sub.add_parser("finetune", help="fine-tune a model on reviewed labels (e.g. exported corrections)")
    f.add_argument("--model", help="model to start from: a file, or a packaged model's name (default, glimpse); "
                                   "default: the shipped model")
    f.add_argument("--data", required=True, help="reviewed labels: a Kaggle-layout CSV or a dataset folder")
    f.add_argument("--split", default="train", help="split, when --data is a folder")
    f.add_argument("--mix-data", metavar="DIR",
                   help="also train on --mix-images images of this dataset's --mix-split (e.g. the original training "
                        "set, so that the nets keep what they learned from it)")
    f.add_argument("--mix-split", default="train")
    f.add_argument("--mix-images", type=_nonnegative_int, metavar="N",
                   help="how many --mix-data images are replayed, drawn at random (default: as many as --data has)")
    f.add_argument("--spacing", type=_spacing_text, metavar="MM",
                   help="pixel spacing of the --data images in mm (default: the model's, 0.1 for the shipped one); "
                        "at another, they are resampled to the model's for training (labels with them)")
    f.add_argument("--out", required=True, help="new model file (records its parent)")
    f.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help="steps for each net of every stage tuned that is not given its own below (default: "
                        "coarse 30, fine 100, glimpse 200: about 4 minutes for the shipped model on one CPU thread)")
    f.add_argument("--time-budget", type=_positive_float, metavar="MIN", default=FINETUNE_MINUTES,
                   help=f"stop tuning by then (default {FINETUNE_MINUTES:g}; the stages share it in proportion to "
                        "their expected time; remaking the int8 graphs comes after it, about half a minute)")
    f.add_argument("--lr", type=_positive_float, default=1e-4, help="the glimpse net's learning rate")
    f.add_argument("--coarse-steps", type=_nonnegative_int, metavar="N",
                   help="steps for each net of the model's coarse stage, fine-tuned first at a tenth of its "
                        "learning rate (default: --max-steps, else 30; 0 keeps it as it is)")
    f.add_argument("--fine-steps", type=_nonnegative_int, metavar="N",
                   help="steps for each net of the model's fine stage, fine-tuned after the coarse stage at a tenth "
                        "of its learning rate (default: --max-steps, else 100; 0 keeps it as it is)")
    f.add_argument("--fine-layers", choices=["all", "decoder", "last", "head"], default="all",
                   help="which layers of each fine net learn (default all)")
    f.add_argument("--no-offsets", action="store_true",
                   help="do not learn the per-landmark offsets (a site's systematic difference from the model's "
                        "answers, added to it; learned only where the answer is the coarse and fine stages')")
    f.add_argument("--batch-size", type=_positive_int,
                   help="the glimpse net's batch of one step, when it is tuned; under torchrun the processes share it")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto")
    f.add_argument("--threads", type=_positive_int)
    f.add_argument("--no-quantize", action="store_true",
                   help="do not remake the parent's int8 graphs for the tuned nets (they then run float)")
    f.add_argument("--progress-json", action="store_true",
                   help="print one JSON line per step on stdout (for the napari widget): the stage, its step, and over "
                        "the whole run overall_step / overall_total, progress (0-1), elapsed_s and eta_s")
    f.add_argument("--resume", action="store_true",
                   help="continue from OUT.resume (written every minute once the coarse and fine stages are tuned)")

    pr = sub.add_parser("predict", help="predict landmarks on images or folders")
    pr.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--model", help="model file, or a packaged model's name: default (the shipped model, the "
                                    "default) or glimpse (the glimpse-only model)")
    pr.add_argument("--out", required=True, help="CSV to write (Kaggle layout)")
    pr.add_argument("--confidence-out", help="CSV of per-landmark confidence (default: OUT with _confidence)")
    pr.add_argument("--iterations", type=_nonnegative_int,
                    help="glimpse steps (default: the model's own choice; 0 = the coarse and fine stages' answer)")
    pr.add_argument("--starts", type=_positive_int, default=1, help="perturbed starts averaged per landmark")
    pr.add_argument("--facing", choices=["auto", "right", "left"], default="auto",
                    help="which way the patient faces (auto: try both, keep the one that settles)")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--threads", type=_positive_int)
    pr.add_argument("--float", action="store_true",
                    help="run the float nets even where the model carries int8 graphs (slower; see 'quantize')")
    pr.add_argument("--spacing", type=_spacing_text, metavar="MM",
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
    pr.add_argument("--workers", type=_positive_int, metavar="N",
                    help="images predicted at once, each by its own thread (default: 2, or 1 on one core); with more "
                         "than 1 and no --threads, torch runs one thread per worker's share of the cores")
    pr.add_argument("--shard", metavar="I/N",
                    help="predict only shard I of N (images I, I+N, I+2N, ... of the sorted list; 0 <= I < N): run N "
                         "processes or machines with the same images, one --shard and --out each, then 'merge'")

    mg = sub.add_parser("merge", help="merge the CSVs of 'predict --shard' runs (and their confidence CSVs) into one")
    mg.add_argument("csvs", nargs="+", metavar="CSV", help="landmark CSVs written by predict (e.g. one per shard)")
    mg.add_argument("--out", required=True, help="merged CSV, rows sorted by image name (as one predict run's)")
    mg.add_argument("--confidence-out", help="merged confidence CSV (default: OUT with _confidence); written when "
                                             "every CSV has its NAME_confidence.csv beside it")

    ms = sub.add_parser("measure", help="clinical measurements (ANB, SNB, SNA, ODI, APDI, FHI, FMA, MW) and classes "
                                        "from a 19-landmark CSV (docs/measurements.md)")
    ms.add_argument("landmarks", metavar="LANDMARKS.csv", help="Kaggle-layout CSV of the 19 ISBI landmarks, pixels")
    ms.add_argument("--out", required=True, help="CSV to write: image_path, the 8 values, then the 8 classes")
    ms.add_argument("--spacing", type=_spacing_text, default=0.1, help="pixel spacing in mm (default 0.1; MW only)")

    e = sub.add_parser("evaluate", help="ISBI metrics (MRE, SDR) on a labelled split; with 19 landmarks also the "
                                        "measurement classes' agreement with the ground truth's (JSON: classification)")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test1")
    e.add_argument("--model", help="model file, or a packaged model's name: default (the shipped model, the "
                                   "default) or glimpse (the glimpse-only model)")
    e.add_argument("--iterations", type=_nonnegative_int,
                   help="glimpse steps (default: the model's own choice; 0 = the coarse and fine stages' answer)")
    e.add_argument("--starts", type=_positive_int, default=1)
    e.add_argument("--ground-truth", default="mean", help="mean (default), senior or junior")
    e.add_argument("--facing", choices=["auto", "right", "left"], default="auto")
    e.add_argument("--mirror", action="store_true",
                   help="flip every image left-right (labels flipped to match): the facing-left check")
    e.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    e.add_argument("--predictions", metavar="CSV", help="also write the predictions (Kaggle layout)")
    e.add_argument("--spacing", type=_spacing_text, metavar="MM",
                   help="pixel spacing of the split's images in mm (default 0.1, the ISBI images'): images at "
                        "another spacing than the model's are resampled to it, and errors are in mm at this spacing")
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=_positive_int)
    e.add_argument("--float", action="store_true", help="run the float nets even where the model carries int8 graphs")

    q = sub.add_parser("quantize", help="add int8 graphs of the coarse and fine nets to a model (faster on CPUs)",
                       description="Quantize the model's coarse and fine nets to int8 (ONNX Runtime), calibrated on "
                                   "a few typical images (10 or so), and write "
                                   "the model with the graphs beside its float weights. Needs the onnx package: "
                                   "pip install 'napari-glimpse[quantize]'.")
    q.add_argument("model", help="model file")
    q.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="calibration images or folders")
    q.add_argument("--out", required=True, help="model file to write (may be MODEL itself)")
    q.add_argument("--limit", type=_positive_int, default=10,
                   help="calibrate on at most this many images, spread over those given (default 10)")
    q.add_argument("--only", choices=["coarse", "fine"],
                   help="quantize this stage's nets only; the other's run float (--only fine: the answers stay "
                        "closer to the float nets', RMS 0.031 against 0.044 mm on ISBI validation, at a cost in speed)")
    q.add_argument("--float-ends", action="store_true",
                   help="keep each net's first and last convolution float (logits not stepped to 8 bits)")
    q.add_argument("--threads", type=_positive_int)
    return p


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_train(a: argparse.Namespace) -> int:
    if a.recipe:  # the recipe sets the stages; napari_glimpse.recipe refuses the flags that would too
        from .recipe import cmd_train_recipe

        return cmd_train_recipe(a, vars(build_parser().parse_args(["train", "--data", "-", "--out", "-"])))
    from .fine import FineConfig
    from .inference import GlimpseModel
    from .io import load_dataset
    from .training import presets, train

    ds = load_dataset(a.data, a.split, a.spacing)
    mcfg, tcfg = presets(a.config, len(ds), len(ds.landmark_names))
    if a.levels:
        mcfg = replace(mcfg, n_levels=a.levels)
    over = {"seed": a.seed}
    if a.batch_size:
        over["batch_size"] = a.batch_size
    if a.lr:
        over["lr"] = a.lr
    if a.max_steps:
        over["max_steps"] = a.max_steps
    elif a.time_budget:
        over["max_steps"] = None
    tcfg = replace(tcfg, **over)
    val = None
    if a.val_fraction:
        if not 0 < a.val_fraction < 1:
            raise GlimpseError("--val-fraction must be between 0 and 1")
        import numpy as np

        order = np.random.default_rng(a.seed).permutation(len(ds))
        n_val = max(1, int(round(a.val_fraction * len(ds))))
        val, ds = ds.subset(sorted(order[:n_val])), ds.subset(sorted(order[n_val:]))
    init = GlimpseModel.load(a.init, a.device) if a.init else None
    if a.pretrained and a.config != "paper":
        raise GlimpseError("--pretrained applies to --config paper (the ResNet-34 trunk)")
    cmd = "napari-glimpse " + " ".join(sys.argv[1:]) if sys.argv else ""
    meta = {"command": cmd, "data": str(a.data), "split": a.split}
    if a.init:
        meta["parent"] = str(a.init)
    if a.fine_target != "mean" and (not a.fine_minutes or a.resume or (init is not None and init.fine is not None)):
        raise GlimpseError("--fine-target applies to a new fine stage: give --fine-minutes, without --resume "
                           "or an --init model that has a fine stage (its own target is kept)")
    model = train(
        ds, a.out, mcfg, tcfg, device=a.device,
        time_budget_s=a.time_budget * 60 if a.time_budget else None,
        resume=a.resume, init=init, pretrained=a.pretrained, val=val, meta=meta,
        max_steps=a.max_steps, coarse_budget_s=a.coarse_minutes * 60 if a.coarse_minutes else None,
        fine_budget_s=a.fine_minutes * 60 if a.fine_minutes else None,
        fine_config=None if a.fine_target == "mean" else FineConfig(
            n_landmarks=len(ds.landmark_names), seed=tcfg.seed, pixel_spacing=ds.pixel_spacing, target=a.fine_target),
    )
    if not _is_main():  # rank 0 of a torchrun job reports
        return 0
    m = model.meta
    msg = f"wrote {a.out}: {m['train_steps']} steps in {m['train_wall_s'] / 60:.1f} min"
    last = m["history"][-1] if m.get("history") else {}
    if "val_mre_mm" in last:
        msg += f", validation MRE {last['val_mre_mm']:.2f} mm"
    print(msg)
    return 0


def _finetune_data(a: argparse.Namespace, parent):
    """The reviewed set and the original set to replay (or None), at the parent's spacing."""
    from .io import load_dataset
    from .spacing import at_spacing

    # the parent works at its own spacing: --data at another (--spacing) is resampled to it, labels
    # with it; --mix-data is taken at the parent's (the original training set's)
    ds = load_dataset(a.data, a.split, a.spacing or parent.pixel_spacing)
    if a.spacing:
        ds = at_spacing([ds], parent.pixel_spacing)
    mix = None
    if a.mix_data:
        mix = load_dataset(a.mix_data, a.mix_split, parent.pixel_spacing)
        if len(mix.landmark_names) != len(parent.landmark_names):
            raise GlimpseError(f"model has {len(parent.landmark_names)} landmarks, --mix-data has "
                               f"{len(mix.landmark_names)}")
    if len(ds.landmark_names) != len(parent.landmark_names):
        raise GlimpseError(f"model has {len(parent.landmark_names)} landmarks, data has {len(ds.landmark_names)}")
    return ds, mix


def _finetune_config(a: argparse.Namespace):
    """:class:`~napari_glimpse.finetune.FinetuneConfig` from the options (its defaults where none)."""
    from .finetune import FinetuneConfig

    base = FinetuneConfig()

    def steps(given: int | None, default: int) -> int:
        return given if given is not None else a.max_steps if a.max_steps is not None else default

    return FinetuneConfig(coarse_steps=steps(a.coarse_steps, base.coarse_steps),
                          fine_steps=steps(a.fine_steps, base.fine_steps),
                          glimpse_steps=a.max_steps if a.max_steps is not None else base.glimpse_steps,
                          fine_layers=a.fine_layers, glimpse_lr=a.lr, offsets=not a.no_offsets,
                          mix_images=a.mix_images, time_budget_s=a.time_budget * 60, seed=a.seed)


def _progress_line(info: dict) -> None:
    """One ``--progress-json`` line (a glimpse step's carries no ``stage``, as before stages were named)."""
    keys = ("stage", "member", "step", "steps", "overall_step", "overall_total", "progress", "eta_s", "elapsed_s",
            "loss", "loss_mm")
    line = {k: info[k] for k in keys if k in info and info[k] is not None}
    if line.get("stage") == "glimpse":
        del line["stage"]
    print(json.dumps(line), flush=True)


def cmd_finetune(a: argparse.Namespace) -> int:
    from .finetune import Progress, finetune
    from .inference import GlimpseModel, resolve_model
    from .int8 import attached, stages

    main = _is_main()  # rank 0 of a torchrun job reports, requantizes and writes
    progress = Progress(_progress_line if a.progress_json and main else None)  # the time budget counts from here
    parent = GlimpseModel.load(a.model, a.device)
    # the stages whose nets ran int8 graphs in the parent get them again after tuning
    had_int8 = sorted(name for name, nets in stages(parent).items() if any(attached(n) is not None for n in nets))
    ds, mix = _finetune_data(a, parent)
    parent_path = str(resolve_model(a.model))
    meta = {"parent": parent_path, "parent_meta": {k: parent.meta.get(k) for k in ("command", "train_steps")},
            "finetune_data": str(a.data), "command": "napari-glimpse " + " ".join(sys.argv[1:])}
    if a.mix_data:
        meta["finetune_mix_data"] = str(a.mix_data)
    requantize = bool(had_int8) and not a.no_quantize
    if requantize:
        n_nets = sum(len(stages(parent)[name]) for name in had_int8)
        int8_phase = progress.add("int8", n_nets, later=True)
    if a.resume:
        model = _resume_finetune(a, ds, progress)
    else:
        model = finetune(parent, ds, a.out, _finetune_config(a), mix=mix, progress=progress, meta=meta,
                         device=parent.device, batch_size=a.batch_size, verbose=not a.progress_json and main)
    if not main:
        return 0
    if requantize:
        _requantize(a, ds, had_int8, bool((parent.meta.get("int8") or {}).get("float_ends", False)),
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
    from .training import train

    ph = progress.add("glimpse", a.max_steps or 200)
    model = train(ds, a.out, device=a.device, resume=True, max_steps=a.max_steps, progress=not a.progress_json,
                  callback=progress.reporter(ph))
    model.meta.setdefault("finetuned", {})["resumed"] = True
    if _is_main():
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

    from .inference import GlimpseModel
    from .int8 import quantize, stages, usable

    model = GlimpseModel.load(a.out, "cpu")
    if all(usable(n) is not None for name in which for n in stages(model)[name]):
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


def _confidence_path(out: Path, given: str | None) -> Path:
    return Path(given) if given else out.with_name(out.stem + "_confidence.csv")


def cmd_predict(a: argparse.Namespace) -> int:
    from ._predict import run_predict

    out = Path(a.out)
    mpath = None
    if a.measures:
        mpath = out.with_name(out.stem + "_measures.csv") if a.measures is True else Path(a.measures)
    return run_predict(a, _confidence_path(out, a.confidence_out), mpath)


def cmd_merge(a: argparse.Namespace) -> int:
    from ._shards import run_merge

    return run_merge(a.csvs, a.out, a.confidence_out)


def cmd_measure(a: argparse.Namespace) -> int:
    import numpy as np

    from .io import read_landmarks_csv

    names, coords = read_landmarks_csv(a.landmarks)
    if coords.shape[1] != 19:
        raise GlimpseError(f"{a.landmarks}: measurements need the 19 ISBI landmarks, got {coords.shape[1]}")
    if not np.isfinite(coords).all():  # read_landmarks_csv lets only absent landmarks (empty cells) through
        i, k = (int(v[0]) for v in np.nonzero(~np.isfinite(coords).all(-1)))
        raise GlimpseError(f"{a.landmarks}: image {names[i]} has landmark {k + 1} absent (empty cells); "
                           f"the measurements need all 19 landmarks")
    from ._predict import write_measures

    write_measures(Path(a.out), names, coords, a.spacing)
    return 0


def _classification(preds, ds, ground_truth: str) -> dict:
    """Agreement of the measurement classes (docs/measurements.md) from ``preds`` with the ground truth's,
    and of the two doctors with each other where both are in the data."""
    from .io import present
    from .measurements import classification_agreement, format_agreement

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


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .inference import GlimpseModel
    from .io import load_dataset, write_landmarks_csv
    from .metrics import format_table
    from .training import evaluate_model

    ds = load_dataset(a.data, a.split, a.spacing)
    model = GlimpseModel.load(a.model, a.device, int8=not a.float)
    if len(model.landmark_names) != len(ds.landmark_names):
        raise GlimpseError(f"model has {len(model.landmark_names)} landmarks, data has {len(ds.landmark_names)}")
    res = evaluate_model(model, ds, a.iterations, a.starts, a.ground_truth, facing=a.facing, mirror=a.mirror)
    preds = res.pop("predictions")
    res.pop("errors_mm")
    res.update({"model": a.model or "default", "data": str(a.data), "split": a.split,
                "ground_truth": a.ground_truth, "iterations": a.iterations, "starts": a.starts,
                "facing": a.facing, "mirrored": a.mirror, "int8_nets": list(model.int8_nets)})
    print(format_table(res))
    print(f"{res['n_images']} images, {res['seconds_per_image']:.2f} s per image")
    if len(ds.landmark_names) == 19:
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


def cmd_quantize(a: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .checkpoint import read_checkpoint
    from .inference import GlimpseModel, resolve_model
    from .int8 import quantize
    from .io import expand_image_args

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


@contextlib.contextmanager
def _warning_lines():
    """Show :class:`GlimpseWarning` (a repaired input, e.g. NaN pixels) as one
    ``napari-glimpse: warning: ...`` line on stderr, beside any progress bar."""
    from .errors import GlimpseWarning, printable

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GlimpseWarning):
            from tqdm.auto import tqdm

            tqdm.write(printable(f"napari-glimpse: warning: {message}"), file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _is_main() -> bool:
    from .distributed import is_main

    return is_main()


@contextlib.contextmanager
def _processes(a: argparse.Namespace):
    """``train`` and ``finetune`` under torchrun: join the process group (gloo, or NCCL with
    ``--device`` this process's GPU), and at the end wait for every rank before leaving it
    (:func:`napari_glimpse.distributed.session`). Anything else, or one process: nothing."""
    if a.command not in ("train", "finetune"):
        yield
        return
    from .distributed import launched, session

    with session(a.device) as dev:
        if launched():
            a.device = dev
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        _threads(getattr(a, "threads", None))
        if getattr(a, "spacing", None) is not None:
            from .spacing import check_spacing

            a.spacing = check_spacing(a.spacing, "--spacing")
        with _warning_lines(), _processes(a):
            return {"train": cmd_train, "finetune": cmd_finetune, "predict": cmd_predict, "evaluate": cmd_evaluate,
                    "quantize": cmd_quantize, "measure": cmd_measure, "merge": cmd_merge}[a.command](a)
    except GlimpseError as exc:
        from .errors import printable

        print(printable(f"napari-glimpse: error: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-glimpse: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied on the output, ...
        print(f"napari-glimpse: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
