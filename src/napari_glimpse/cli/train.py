"""``napari-glimpse train``: train a model on a labelled split (or a recipe)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..errors import GlimpseError
from ._args import is_main, nonnegative_int, positive_float, positive_int, spacing_text


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model on a labelled split")
    t.add_argument("--data", required=True, help="dataset folder (Kaggle CSV or ISBI layout) or a CSV file")
    t.add_argument("--split", default="train", help="split to train on (default: train)")
    t.add_argument("--out", required=True, help="model file to write")
    t.add_argument("--recipe", metavar="NAME_OR_PATH",
                   help="train the kind of model a recipe describes: 'default' (the shipped model's: a coarse net and "
                        "four fine nets, int8; 257 min in full, about 4 h on 2 CPU cores) or a recipe file; "
                        "--time-budget then scales every stage's minutes, --max-steps caps every stage's steps")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    t.add_argument("--time-budget", type=positive_float, metavar="MIN",
                   help="stop after this many minutes of training; the schedule fits the budget")
    t.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    t.add_argument("--resume", action="store_true", help="continue from OUT.resume")
    t.add_argument("--init", metavar="MODEL", help="start from this model's weights (fine-tuning)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=positive_int,
                   help="the glimpse net's batch of one step; under torchrun the processes share it (docs/scale.md)")
    t.add_argument("--lr", type=positive_float)
    t.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the split as validation, reported as training goes")
    t.add_argument("--spacing", type=spacing_text, metavar="MM",
                   help="pixel spacing of the images in mm (default 0.1); the new model works at it (images at "
                        "another spacing are resampled to it when predicted)")
    t.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    t.add_argument("--coarse-minutes", type=positive_float, metavar="MIN",
                   help="first train the coarse whole-image stage for MIN minutes (its answer is the "
                        "glimpses' start and tells which way the patient faces); --time-budget follows")
    t.add_argument("--fine-minutes", type=positive_float, metavar="MIN",
                   help="then train the fine stage for MIN minutes (a closer look around each coarse answer, "
                        "at 0.2 mm per pixel for ISBI images); needs --coarse-minutes")
    t.add_argument("--levels", type=positive_int, help="pyramid levels seen by each glimpse (default 6)")
    t.add_argument("--progress-json", action="store_true",
                   help="print one JSON line per step on stdout (for the napari widget): the stage, its step, "
                        "progress (0-1; with --recipe over the whole run, with elapsed_s and eta_s) and the loss")
    t.add_argument("--nice", type=nonnegative_int, default=0, metavar="N",
                   help="lower this process's CPU priority by N (the napari widget passes 10)")


def run(a: argparse.Namespace) -> int:
    if a.recipe:  # the recipe sets the stages; napari_glimpse.recipe refuses the flags that would too
        from ..recipe import cmd_train_recipe

        return cmd_train_recipe(a, _defaults())
    from ..inference import GlimpseModel
    from ..io import load_dataset
    from ..training import train

    ds = load_dataset(a.data, a.split, a.spacing)
    mcfg, tcfg = _configs(a, ds)
    val, ds = _validation_split(a, ds)
    init = GlimpseModel.load(a.init, a.device) if a.init else None
    cmd = "napari-glimpse " + " ".join(sys.argv[1:]) if sys.argv else ""
    meta = {"command": cmd, "data": str(a.data), "split": a.split}
    if a.init:
        meta["parent"] = str(a.init)
    model = train(
        ds, a.out, mcfg, tcfg, device=a.device,
        time_budget_s=a.time_budget * 60 if a.time_budget else None,
        resume=a.resume, init=init, val=val, meta=meta,
        progress=not a.progress_json, callback=_json_line if a.progress_json and is_main() else None,
        max_steps=a.max_steps, coarse_budget_s=a.coarse_minutes * 60 if a.coarse_minutes else None,
        fine_budget_s=a.fine_minutes * 60 if a.fine_minutes else None,
    )
    if is_main():  # rank 0 of a torchrun job reports
        _report(a.out, model.meta)
    return 0


def _configs(a: argparse.Namespace, ds):
    """The model and training configs: the compact preset with the flags that change it."""
    from ..training import presets

    mcfg, tcfg = presets("compact", len(ds), len(ds.landmark_names))
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
    return mcfg, replace(tcfg, **over)


def _validation_split(a: argparse.Namespace, ds):
    """``(val, train)``: ``--val-fraction`` of the images drawn for validation (``--seed``), else none."""
    if not a.val_fraction:
        return None, ds
    if not 0 < a.val_fraction < 1:
        raise GlimpseError("--val-fraction must be between 0 and 1")
    import numpy as np

    order = np.random.default_rng(a.seed).permutation(len(ds))
    n_val = max(1, int(round(a.val_fraction * len(ds))))
    return ds.subset(sorted(order[:n_val])), ds.subset(sorted(order[n_val:]))


def _report(out: str, m: dict) -> None:
    msg = f"wrote {out}: {m['train_steps']} steps in {m['train_wall_s'] / 60:.1f} min"
    last = m["history"][-1] if m.get("history") else {}
    if "val_mre_mm" in last:
        msg += f", validation MRE {last['val_mre_mm']:.2f} mm"
    print(msg)


def _json_line(info: dict) -> None:
    """A ``--progress-json`` line of a step (without --recipe: the stage's own progress)."""
    import json

    keys = ("stage", "member", "step", "progress", "elapsed_s", "loss", "loss_mm")
    print(json.dumps({k: info[k] for k in keys if info.get(k) is not None}), flush=True)


def _defaults() -> dict:
    """The train command's flag values when none is given (the recipe refuses the others)."""
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    return vars(p.parse_args(["train", "--data", "-", "--out", "-"]))
