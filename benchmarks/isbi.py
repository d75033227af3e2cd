#!/usr/bin/env python
"""ISBI 2015 accuracy benchmark: train under a wall-clock budget, evaluate on Test1.

Protocol (the same for napari-glimpse and the peer):

* Train on ISBI Train 001-130, validate on Train 131-150 (the validation split: every choice,
  e.g. the number of glimpse iterations, is made on it; Test1 is read only for the final
  numbers). Ground truth = mean of the senior and junior doctors.
* ``--budget-min`` minutes of wall time for training (data loading excluded, validation
  included), on ``--threads`` CPU threads; the process CPU time is recorded too.
* Evaluate on Test1 (151-300) against the mean of the doctors: MRE +- SD, SDR at 2/2.5/3/4 mm,
  per-landmark table; the same on every Test1 image mirrored left-right (labels mirrored with
  it: the facing-left check; glimpse only, the peer is not trained for it).
* Speed: seconds per image at inference, model loaded, image already decoded in memory
  (pyramid / resize, network, decoding all included), median over 20 Test1 images, on
  ``--speed-threads`` threads (default 2: the whole machine).

Methods:

* ``glimpse``: napari-glimpse, coarse whole-image stage for ``--coarse-fraction`` of the budget,
  then the glimpse network (``--levels`` pyramid levels) for the rest.
* ``landmarker``: the peer, see ``benchmarks/peer_landmarker.py`` (``pip install
  -c constraints.txt -e ".[benchmark]"``).
* ``--evaluate MODEL``: skip training, evaluate an existing napari-glimpse model file;
  ``--add-coarse OTHER...`` averages its coarse stage with the other files' (an ensemble),
  ``--add-fine OTHER`` takes the other file's fine stage, ``--save-as FILE`` writes the result
  with its inference choice.
* ``--fine-for MODEL``: train a fine stage (``--budget-min`` minutes) after that model's coarse
  stage (``--fine-level``, ``--fine-context``, ``--fine-patch``, ``--fine-jitter``, ``--fine-rotation``,
  ``--fine-log-scale``, ``--fine-sigma``, ``--fine-target``, ``--fine-coord-weight``, ``--fine-erase``).
* ``--train-all --train-only``: refit a recipe already chosen on validation on all of Train
  001-150 (no validation split, so no curve and no choice; ``--coarse-steps`` / ``--fine-steps``
  replay the chosen runs' step counts). ``--evaluate MODEL --coarse-from C --add-fine F
  --keep-choice`` then puts the refit stages into the validated model, keeping its inference
  choice and glimpse net (``--glimpse-json``: the runs that trained that net, whose time adds).
* ``--fine-averages DECAY...``: with ``--fine-for``, also keep exponential moving averages of the
  fine net's weights (each saved beside ``--model-out``, with its validation MRE in the JSON).
* ``--coarse-decode-windows W...``, ``--fine-decode-windows W...``: after the inference choice
  (or ``--keep-choice``), choose the coarse / fine heatmaps' soft-argmax neighbourhood on
  validation (the coarse one first); ``--no-test`` makes and saves a choice
  without reading Test1 (for comparing candidates on validation only).

Inference choice (glimpse): iterations 0-3, flip averaging of the coarse view on/off, the
coarse/glimpse blend weight, the fine stage's steps (0-2) and which coarse nets of an ensemble
to use are chosen on the validation split: the lowest validation MRE among the choices that run
within ``--max-seconds`` per image (default 0.1; the shipped default used 0.12 on a machine
1.3-1.8x slower than the one the bound was set on, see docs/results.md). ``--max-fine-nets N``
and ``--fine-looks K...`` narrow the grid to a cost rule instead (at most N fine nets, those
fine looks; run 22 on: ``--max-fine-nets 3 --fine-looks 1 --max-seconds 0``); ``--flip-average on``
(or ``off``) holds the coarse stage's flip averaging fixed instead of choosing it (run 27 on).

Usage::

    python benchmarks/isbi.py --method glimpse --budget-min 100 --threads 1 \\
        --model-out runs/isbi_glimpse.pt --out benchmarks/results/isbi_glimpse.json
    python benchmarks/isbi.py --method landmarker --budget-min 100 --threads 1 \\
        --out benchmarks/results/isbi_landmarker.json

The shipped default: see the README's "Results" section (two coarse runs side by side, their
pair, the fine stage after it with ``--fine-for``, then ``--evaluate ... --fine-json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "isbi2015"
N_TRAIN = 130  # Train 001-130 train, 131-150 validate


def ready(data, threads: int) -> bool:
    """Whether the ISBI data is at ``data`` (else says so on stderr); torch then runs ``threads``
    threads. The benchmarks' common start: ``if not ready(a.data, a.threads): return 2``."""
    if not Path(data).exists():
        print(f"ISBI data not found at {data}", file=sys.stderr)
        return False
    torch.set_num_threads(threads)
    return True


def write_json(path, res: dict) -> None:
    """A benchmark's record: ``res`` as indented JSON (numpy scalars as floats), folders made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=float))


def _summary(pred: np.ndarray, truth: np.ndarray, spacing: float, names) -> dict:
    from napari_glimpse.metrics import radial_errors, summarize

    s = summarize(radial_errors(pred, truth, spacing), names)
    return s


def _speed(fn, images: list[np.ndarray], threads: int) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn(images[0])  # warm-up
        ts = []
        for im in images:
            t = time.perf_counter()
            fn(im)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    finally:
        torch.set_num_threads(old)


def _glimpse_eval(model, test, iterations: int, speed_threads: int, log) -> dict:
    from napari_glimpse.training import evaluate_model

    out: dict = {}
    truth = test.ground_truth("mean")
    r = evaluate_model(model, test, iterations=iterations, progress=False)
    out["test"] = {k: r[k] for k in ("overall", "per_landmark")}
    log(f"Test1: MRE {r['overall']['mre_mm']:.3f} mm, SDR2 {r['overall']['sdr']['2']:.1f} %")
    rm = evaluate_model(model, test, iterations=iterations, progress=False, mirror=True)
    out["test_mirrored"] = {k: rm[k] for k in ("overall", "per_landmark")}
    log(f"Test1 mirrored: MRE {rm['overall']['mre_mm']:.3f} mm")
    out["test_predictions"] = np.asarray(r["predictions"]).round(2).tolist()
    imgs = [test.image(i) for i in range(20)]
    out["seconds_per_image"] = _speed(lambda im: model.predict(im, iterations=iterations), imgs, speed_threads)
    out["speed_threads"] = speed_threads
    log(f"inference {out['seconds_per_image']:.3f} s/image ({speed_threads} threads)")
    assert truth.shape == np.asarray(r["predictions"]).shape
    return out


def _apply_choice(model, choice, nets=None, fine_nets=None) -> None:
    """Write an inference choice (iterations, flip averaging, blend, fine steps, which coarse
    nets, which fine nets) into the model; ``nets`` / ``fine_nets``: every coarse / fine net
    there is to choose from."""
    from napari_glimpse.coarse import CoarseEnsemble
    from napari_glimpse.fine import FineEnsemble

    for k, v in zip(("iterations", "coarse_flip_average", "coarse_blend", "fine_steps"), choice):
        model.meta[k] = v
    for pool, j, kind, attr in ((nets, 4, CoarseEnsemble, "coarse"), (fine_nets, 5, FineEnsemble, "fine")):
        if pool and len(choice) > j:
            chosen = [pool[i] for i in choice[j]]
            setattr(model, attr, kind(chosen) if len(chosen) > 1 else chosen[0])


def _add_runs(res: dict, files, side_by_side: bool) -> list[dict]:
    """Add the training runs recorded in ``files`` (JSON) to ``res["train"]``: their CPU times add
    up; their wall times too, or (run side by side) the longest. Returns the records."""
    before = res.get("train", {})
    runs = [json.loads(Path(f).read_text()) for f in files]
    walls = [r["train"]["wall_s"] for r in runs]
    res["train"] = {"wall_s": (before.get("wall_s") or 0) + (max(walls) if side_by_side else sum(walls)),
                    "cpu_s": (before.get("cpu_s") or 0) + sum(r["train"]["cpu_s"] for r in runs),
                    "stages": [before] + [r["train"] for r in runs]}
    return runs


def _train_fine_for(a, train_ds, val_ds, res: dict, log):
    """Train a fine stage for ``--fine-for MODEL``'s coarse stage (``--budget-min`` minutes)."""
    from napari_glimpse.fine import FineConfig, fine_levels, train_fine
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.io import to_grey_uint8
    from napari_glimpse.pyramid import build_pyramid
    from napari_glimpse.training import evaluate_model

    model = GlimpseModel.load(a.fine_for, "cpu")
    if model.coarse is None:
        raise SystemExit(f"{a.fine_for} has no coarse stage for a fine stage to follow")
    model.meta["iterations"], model.meta["fine_steps"] = 0, 1
    cfg = FineConfig(n_landmarks=len(train_ds.landmark_names), seed=a.seed, pixel_spacing=train_ds.pixel_spacing,
                     level=a.fine_level, patch=a.fine_patch, width=a.fine_width, context=a.fine_context,
                     jitter_mm=tuple(a.fine_jitter), rotation_deg=a.fine_rotation, log_scale=a.fine_log_scale,
                     sigma=a.fine_sigma, target=a.fine_target, coord_weight=a.fine_coord_weight,
                     erase=a.fine_erase)
    pyrs = [build_pyramid(to_grey_uint8(train_ds.image(i)), model.config.n_levels, model.config.patch)
            for i in range(len(train_ds))]
    # each doctor's points (N, 2, K, 2) for a net taught where each would click, else their mean
    truth = train_ds.each_annotator() if a.fine_target == "annotators" else train_ds.ground_truth("mean")
    levels, truth_n = fine_levels(pyrs, truth, cfg)
    del pyrs

    def val_mre(net) -> float:
        model.fine = net
        return evaluate_model(model, val_ds, iterations=0, progress=False)["overall"]["mre_mm"]

    averages = {d: None for d in a.fine_averages or ()}
    t0, c0 = time.monotonic(), time.process_time()
    net, hist = train_fine(levels, truth_n, cfg, a.budget_min * 60, progress=not a.quiet,
                           evaluate=val_mre if val_ds is not None else None, eval_every_s=a.eval_every * 60,
                           max_steps=a.fine_steps, averages=averages or None)
    res["train"] = {"wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0,
                    "fine_wall_s": hist[-1]["elapsed_s"], "fine_steps": hist[-1]["step"]}
    res["config"] = {"fine": cfg.to_dict(), "coarse_from": str(a.fine_for), "fine_averages": list(averages)}
    res["curve"] = hist
    model.meta.update({"fine_train_wall_s": hist[-1]["elapsed_s"], "fine_history": hist,
                       "fine_n_train_images": len(train_ds)})
    out = Path(a.model_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the weight averages, each in a model file of its own beside the net's (same training run)
    res["averages"] = []
    for d, avg in averages.items():
        rec = {"decay": d, "model": str(out.with_name(f"{out.stem}_avg{d:g}{out.suffix}"))}
        if val_ds is not None:
            rec["val_mre_mm"] = val_mre(avg)
        model.fine = avg
        model.meta["fine_average_decay"] = d
        model.save(rec["model"])
        res["averages"].append(rec)
        log(f"weight average {d:g}: " + (f"validation MRE {rec['val_mre_mm']:.3f} mm; " if "val_mre_mm" in rec else "")
            + f"wrote {rec['model']}")
    model.meta.pop("fine_average_decay", None)
    model.fine = net
    model.save(out)
    res["model"] = str(out)
    val_note = f", validation MRE {hist[-1]['val_mre_mm']:.3f} mm" if "val_mre_mm" in hist[-1] else ""
    log(f"fine stage: {hist[-1]['step']} steps{val_note}; wrote {out}")
    return model


def run_glimpse(a, train_ds, val_ds, test_ds, log) -> dict:
    from napari_glimpse.coarse import CoarseConfig
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.model import ModelConfig
    from napari_glimpse.training import TrainConfig, evaluate_model, train

    res: dict = {"method": "glimpse"}
    if a.fine_for:
        model = _train_fine_for(a, train_ds, val_ds, res, log)
        if a.train_only:  # a member of a later ensemble: no choice, no Test1
            return res
    elif a.evaluate:
        model = GlimpseModel.load(a.evaluate, "cpu")
        res["model"] = str(a.evaluate)
        res["train"] = {k: model.meta.get(k) for k in ("train_wall_s", "coarse_train_wall_s", "train_steps")}
        res["curve"] = model.meta.get("coarse_history", []) + model.meta.get("history", [])
        if a.coarse_from:  # the coarse stage replaced by other runs' (e.g. a refit on all of Train)
            from napari_glimpse.coarse import CoarseEnsemble, members_of

            sources = [GlimpseModel.load(f, "cpu") for f in a.coarse_from]
            nets = [n for src in sources for n in members_of(src.coarse)]
            model.meta["coarse_n_train_images"] = [src.meta.get("n_train_images") for src in sources]
            model.coarse = CoarseEnsemble(nets) if len(nets) > 1 else nets[0]
            res["coarse_from"] = [str(f) for f in a.coarse_from]
            log(f"coarse stage from {', '.join(map(str, a.coarse_from))}")
        if a.add_coarse:  # a coarse ensemble: the other runs' coarse nets join this model's
            from napari_glimpse.coarse import CoarseEnsemble, members_of

            nets = members_of(model.coarse)
            for other in a.add_coarse:
                nets += members_of(GlimpseModel.load(other, "cpu").coarse)
            model.coarse = CoarseEnsemble(nets)
            res["coarse_members"] = [str(a.evaluate), *map(str, a.add_coarse)]
            log(f"coarse ensemble of {len(nets)} nets")
        if a.train_json:  # the training runs' own records (CPU time, configuration)
            prev = [json.loads(Path(f).read_text()) for f in a.train_json]
            if len(prev) == 1:
                res.update({k: prev[0][k] for k in ("train", "config", "curve", "budget_min", "threads", "seed")
                            if k in prev[0]})
            else:  # runs side by side: wall time is the longest, CPU time adds up
                res["train"] = {"wall_s": max(p["train"]["wall_s"] for p in prev),
                                "cpu_s": sum(p["train"]["cpu_s"] for p in prev),
                                "runs": [p["train"] for p in prev]}
                res["config"] = {"runs": [p.get("config") for p in prev]}
                res["curve"] = [dict(c, run=i) for i, p in enumerate(prev) for c in p.get("curve", [])]
                res["budget_min"] = max(p["budget_min"] for p in prev)
                res["threads"] = sum(p["threads"] for p in prev)
                res["seed"] = [p["seed"] for p in prev]
            res["train_json"] = [str(f) for f in a.train_json]
        if a.add_fine:  # fine stages of other files (trained after this model's coarse stage): an ensemble
            from napari_glimpse.coarse import members_of
            from napari_glimpse.fine import FineEnsemble

            fnets, counts, decays = [], [], []
            for f in a.add_fine:
                other = GlimpseModel.load(f, "cpu")
                if other.fine is None:
                    raise SystemExit(f"{f} has no fine stage")
                members = members_of(other.fine)
                fnets += members
                # one entry per net (a file's ensemble records a list; None: the net's own weights)
                for record, key in ((counts, "fine_n_train_images"), (decays, "fine_average_decay")):
                    v = other.meta.get(key)
                    record += v if isinstance(v, list) and len(v) == len(members) else [v] * len(members)
            model.fine = FineEnsemble(fnets) if len(fnets) > 1 else fnets[0]
            model.meta["fine_n_train_images"] = counts
            model.meta["fine_average_decay"] = decays
            res["fine_from"] = [str(f) for f in a.add_fine]
        if a.fine_json:  # stages trained one after another, after the runs above: wall and CPU times add up
            fjs = _add_runs(res, a.fine_json, side_by_side=False)
            res["fine_config"] = [fj.get("config") for fj in fjs]
            res["curve"] = res.get("curve", []) + [c for fj in fjs for c in fj.get("curve", [])]
            res["fine_json"] = [str(f) for f in a.fine_json]
        if a.glimpse_json:  # the runs (side by side) that trained the glimpse net kept from --evaluate
            _add_runs(res, a.glimpse_json, side_by_side=True)
            res["glimpse_json"] = [str(f) for f in a.glimpse_json]
    else:
        mcfg = ModelConfig(n_levels=a.levels)
        tcfg = TrainConfig(near_fraction=a.near_fraction, near_sigma_px=(a.near_sigma[0], a.near_sigma[1]),
                           max_steps=None, seed=a.seed, save_every_s=a.eval_every * 60)
        budget = a.budget_min * 60
        cb = a.coarse_fraction * budget if a.coarse_fraction > 0 else None
        ccfg = CoarseConfig(n_landmarks=19, seed=a.seed, width=a.coarse_width)
        out = Path(a.model_out)
        t0, c0 = time.monotonic(), time.process_time()
        model = train(train_ds, out, mcfg, tcfg, device="cpu", time_budget_s=max(budget - (cb or 0), 1.0), val=val_ds,
                      coarse_budget_s=cb, coarse_config=ccfg, coarse_steps=a.coarse_steps, progress=not a.quiet)
        res["train"] = {"wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0,
                        "coarse_wall_s": model.meta.get("coarse_train_wall_s"),
                        "glimpse_wall_s": model.meta.get("train_wall_s"),
                        "glimpse_steps": model.meta.get("train_steps")}
        res["config"] = {"model": mcfg.to_dict(), "train": tcfg.to_dict(),
                         "coarse": ccfg.to_dict() if cb else None, "coarse_fraction": a.coarse_fraction}
        res["curve"] = model.meta.get("coarse_history", []) + model.meta.get("history", [])
        res["model"] = str(out)
        if a.train_only:
            return res
    # inference choices, made on the validation split only: glimpse iterations, (with a coarse
    # stage) whether to average the coarse answers of the image and its mirror, the weight of
    # the coarse answer in the final one (blend), (with a fine stage) its steps, and which
    # coarse nets of an ensemble to use
    from napari_glimpse.metrics import radial_errors

    flips = [False, True] if model.coarse is not None else [False]
    if a.flip_average != "choose" and model.coarse is not None:  # fixed by the rule, not chosen
        flips = [a.flip_average == "on"]
    iters = [0, 1, 2, 3] if model.coarse is not None else [1, 2, 3]
    blends = [0.0, 0.25, 0.5] if model.coarse is not None else [0.0]
    fines = list(a.fine_looks) if model.fine is not None and model.coarse is not None else [0]
    if a.no_glimpse:
        iters, blends = [0], [0.0]
    # with a fine stage the coarse answer only has to be near: one coarse net may do as well as
    # several, in less time, so the coarse nets are a choice too (all of them, or any one); so
    # are the fine nets
    from napari_glimpse.coarse import members_of

    def subsets_of(n: int) -> list[tuple[int, ...]]:  # every non-empty subset, the whole ensemble first
        return [c for r in range(n, 0, -1) for c in itertools.combinations(range(n), r)]

    nets = members_of(model.coarse) if model.coarse is not None else []
    fine_nets = members_of(model.fine) if model.fine is not None else []
    subsets = subsets_of(len(nets))
    fine_subsets = subsets_of(len(fine_nets)) if fine_nets else [()]
    if a.max_fine_nets:  # a cost rule: at most that many fine nets per answer
        fine_subsets = [c for c in fine_subsets if len(c) <= a.max_fine_nets]
    if a.keep_choice:  # the model's own choice, made on validation before (e.g. for a refit on all of Train)
        best = (model.default_iterations, bool(model.meta.get("coarse_flip_average", False)),
                float(model.meta.get("coarse_blend", 0.0)), model.fine_steps,
                tuple(range(len(nets))), tuple(range(len(fine_nets))))
        log(f"kept the model's inference choice {best}")
        res["choice_kept"] = True
        note = "kept by --keep-choice for stages trained later"
        if note not in model.meta.get("inference_choice", ""):
            model.meta["inference_choice"] = f"{model.meta.get('inference_choice', '')}; {note}".lstrip("; ")
        return _finish(a, res, model, best, nets, fine_nets, val_ds, test_ds, log)
    vt = val_ds.ground_truth("mean")
    val = {}
    model.meta["coarse_blend"] = 0.0
    for sub, fsub, fs in ((sub, fsub, fs) for sub in subsets for fsub in fine_subsets for fs in fines):
        if fs == 0 and fsub != fine_subsets[0]:
            continue  # no fine look: which fine nets does not matter
        _apply_choice(model, (0, False, 0.0, fs, sub, fsub), nets, fine_nets)
        for f in flips:
            model.meta["coarse_flip_average"] = f
            preds = {it: evaluate_model(model, val_ds, iterations=it, progress=False)["predictions"] for it in iters}
            for it in iters:
                for b in blends if it > 0 else [0.0]:
                    p = b * preds[0] + (1 - b) * preds[it] if b else preds[it]
                    key = (it, f, b, fs, sub, fsub)
                    val[key] = float(radial_errors(p, vt, val_ds.pixel_spacing).mean())
                    log(f"val: {it} iterations, flip average {f}, coarse blend {b}, fine steps {fs}, "
                        f"coarse nets {sub}, fine nets {fsub}: MRE {val[key]:.3f} mm")
    # the most accurate choice on validation that meets the speed bound (timed on validation images)
    vimgs = [val_ds.image(i) for i in range(min(5, len(val_ds)))]
    res["speed_checks"] = []
    for best in sorted(val, key=val.get):
        _apply_choice(model, best, nets, fine_nets)
        sec = _speed(lambda im: model.predict(im), vimgs, a.speed_threads)
        res["speed_checks"].append({"choice": list(best), "val_mre_mm": val[best], "seconds_per_image": sec})
        log(f"choice {best}: val MRE {val[best]:.3f} mm, {sec:.3f} s/image")
        if not a.max_seconds or sec <= a.max_seconds:
            break
    else:  # nothing meets the bound: keep the most accurate and say so
        best = min(val, key=val.get)
        res["speed_bound_met"] = False
        log(f"no choice runs within {a.max_seconds} s/image; keeping the most accurate {best}")
    res["val_mre"] = [{"iterations": it, "coarse_flip_average": f, "coarse_blend": b, "fine_steps": fs,
                       "coarse_nets": list(sub), "fine_nets": list(fsub), "mre_mm": v}
                      for (it, f, b, fs, sub, fsub), v in val.items()]
    model.meta["inference_choice"] = ("lowest validation MRE (ISBI Train 131-150) within "
                                      f"{a.max_seconds or 'any'} s/image, by benchmarks/isbi.py")
    return _finish(a, res, model, best, nets, fine_nets, val_ds, test_ds, log)


def _choose_decode_window(a, res: dict, model, val_ds, log, stage: str) -> None:
    """``--coarse-decode-windows`` / ``--fine-decode-windows``: that stage's soft-argmax
    neighbourhood around each heatmap peak, chosen on the validation split for the choice already
    made (the rest of it unchanged; the windows cost the same time). The model's current window
    stays unless another is strictly better."""
    from napari_glimpse.training import evaluate_model

    key = f"{stage}_decode_window"
    if val_ds is None:
        raise SystemExit(f"--{stage}-decode-windows chooses on the validation split, which --train-all leaves empty")
    if getattr(model, stage) is None or (stage == "fine" and model.fine_steps == 0):
        log(f"no {stage} stage in this choice: --{stage}-decode-windows ignored")
        return
    val = {}
    for w in dict.fromkeys([getattr(model, key), *getattr(a, f"{stage}_decode_windows")]):
        model.meta[key] = int(w)
        val[int(w)] = evaluate_model(model, val_ds, progress=False)["overall"]["mre_mm"]
        log(f"val: {stage} decode window {w}: MRE {val[int(w)]:.4f} mm")
    best = min(val, key=val.get)  # the first (current) window wins ties
    model.meta[key] = best
    model.meta["inference_choice"] = (f"{model.meta.get('inference_choice', '')}; {stage} decode window "
                                      f"{best} of {sorted(val)}, lowest validation MRE").lstrip("; ")
    res[f"val_{key}"] = [{"window": w, "mre_mm": v} for w, v in val.items()]
    log(f"{stage} decode window {best} (validation MRE {val[best]:.4f} mm)")


def _finish(a, res: dict, model, best: tuple, nets, fine_nets, val_ds, test_ds, log) -> dict:
    """Apply the inference choice ``best`` (and, with ``--coarse-decode-windows`` /
    ``--fine-decode-windows``, choose those decode windows on validation), save the model if asked,
    evaluate it on Test1 (unless ``--no-test``)."""
    res["iterations"], res["coarse_flip_average"], res["coarse_blend"], res["fine_steps"] = best[:4]
    res["coarse_nets"], res["fine_nets"] = list(best[4]), list(best[5])
    _apply_choice(model, best, nets, fine_nets)
    for stage in ("coarse", "fine"):
        if getattr(a, f"{stage}_decode_windows"):
            _choose_decode_window(a, res, model, val_ds, log, stage)
    res["coarse_decode_window"] = model.coarse_decode_window if model.coarse is not None else None
    res["fine_decode_window"] = model.fine_decode_window if model.fine is not None else None
    target = a.save_as or (res["model"] if a.save_choice else None)
    if target:
        if a.half_weights:  # the file's weights in float16: measure what that moves on validation
            from napari_glimpse.inference import GlimpseModel
            from napari_glimpse.metrics import radial_errors
            from napari_glimpse.training import evaluate_model

            vt = val_ds.ground_truth("mean")
            before = evaluate_model(model, val_ds, progress=False)["predictions"]
            model.save(target, half_weights=True)
            model = GlimpseModel.load(target, device="cpu")
            after = evaluate_model(model, val_ds, progress=False)["predictions"]
            res["half_weights_check"] = {
                "val_mre_mm_float32": float(radial_errors(before, vt, val_ds.pixel_spacing).mean()),
                "val_mre_mm_float16": float(radial_errors(after, vt, val_ds.pixel_spacing).mean()),
                "max_answer_move_px": float(np.abs(after - before).max()),
                "file_bytes": Path(target).stat().st_size,
            }
            log(f"float16 weights: {res['half_weights_check']}")
        else:
            model.save(target)
        res["saved_as"] = str(target)
        log(f"saved the model with the choice {best} as {target}")
    res["int8_nets"] = list(model.int8_nets)  # (nets running int8 graphs, coarse and fine nets)
    if a.no_test:
        res["test_read"] = False
        return res
    res.update(_glimpse_eval(model, test_ds, best[0], a.speed_threads, log))
    return res


def run_landmarker(a, train_ds, val_ds, test_ds, log) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from peer_landmarker import inference_speed, train_and_predict

    if a.peer_speed_only:  # time the peer's inference (weights do not matter) on an idle machine
        res = json.loads(Path(a.peer_speed_only).read_text())
        res["seconds_per_image_during_run"] = res.get("seconds_per_image")
        res["seconds_per_image"] = inference_speed([test_ds.image(i) for i in range(20)], a.speed_threads)
        res["speed_threads"] = a.speed_threads
        log(f"peer inference {res['seconds_per_image']:.3f} s/image ({a.speed_threads} threads)")
        return res

    def imgs(ds):
        return [ds.image(i) for i in range(len(ds))]

    # with --train-all there is no validation split: the peer's last weights are its answer
    tr_i, te_i = imgs(train_ds), imgs(test_ds)
    va_i = imgs(val_ds) if val_ds is not None else []
    va_p = val_ds.ground_truth("mean") if val_ds is not None else np.zeros((0, len(train_ds.landmark_names), 2))
    t0, c0 = time.monotonic(), time.process_time()
    r = train_and_predict(tr_i, train_ds.ground_truth("mean"), va_i, va_p, te_i,
                          budget_s=a.budget_min * 60, threads=a.threads, seed=a.seed, log=log)
    res = {"method": "landmarker", "config": r.get("config"), "curve": r.get("curve"),
           "train": {"wall_s": r.get("train_wall_s"), "cpu_s": r.get("train_cpu_s"),
                     "wall_incl_test_s": time.monotonic() - t0, "cpu_incl_test_s": time.process_time() - c0}}
    pred = np.asarray(r["test_pred"], dtype=np.float64)
    s = _summary(pred, test_ds.ground_truth("mean"), test_ds.pixel_spacing, test_ds.landmark_names)
    res["test"] = s
    res["test_predictions"] = pred.round(2).tolist()
    res["seconds_per_image"] = r.get("seconds_per_image")
    res["speed_threads"] = r.get("speed_threads", a.threads)
    log(f"Test1: MRE {s['overall']['mre_mm']:.3f} mm, SDR2 {s['overall']['sdr']['2']:.1f} %")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["glimpse", "landmarker"], default="glimpse")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--budget-min", type=float, default=100.0, help="training wall time, minutes")
    p.add_argument("--threads", type=int, default=2, help="torch threads while training")
    p.add_argument("--speed-threads", type=int, default=2, help="torch threads for the speed measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--model-out", default="runs/isbi_glimpse.pt", help="glimpse: model file to write")
    p.add_argument("--evaluate", metavar="MODEL", help="glimpse: evaluate this model instead of training")
    p.add_argument("--coarse-fraction", type=float, default=0.5)
    p.add_argument("--coarse-width", type=int, default=16)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--near-fraction", type=float, default=0.9)
    p.add_argument("--near-sigma", type=float, nargs=2, default=(2.0, 80.0))
    p.add_argument("--eval-every", type=float, default=10.0, help="validation every N minutes (curve)")
    p.add_argument("--train-json", metavar="JSON", nargs="+",
                   help="with --evaluate: copy train/config/curve from the training runs' JSON "
                        "(several: runs side by side)")
    p.add_argument("--coarse-from", metavar="MODEL", nargs="+",
                   help="with --evaluate: replace the coarse stage with these models' coarse nets")
    p.add_argument("--glimpse-json", metavar="JSON", nargs="+",
                   help="with --evaluate: the runs (side by side) that trained its glimpse net, when it is kept "
                        "beside stages trained later; their wall and CPU times add")
    p.add_argument("--keep-choice", action="store_true",
                   help="with --evaluate: keep the model's inference choice (made on validation before) instead of "
                        "choosing again (required after --train-all)")
    p.add_argument("--add-coarse", metavar="MODEL", nargs="+",
                   help="with --evaluate: average the coarse stage with these models' coarse nets (an ensemble)")
    p.add_argument("--fine-for", metavar="MODEL",
                   help="train a fine stage (--budget-min minutes) after this model's coarse stage; writes --model-out")
    p.add_argument("--fine-level", type=int, default=1, help="fine stage: pyramid level of its windows")
    p.add_argument("--fine-patch", type=int, default=64, help="fine stage: window side, pixels of that level")
    p.add_argument("--fine-width", type=int, default=16, help="fine stage: U-Net width")
    p.add_argument("--fine-context", type=int, default=3, help="fine stage: levels per window (input channels)")
    p.add_argument("--fine-rotation", type=float, default=10.0, metavar="DEG",
                   help="fine stage: training windows rotated uniformly within +-DEG degrees")
    p.add_argument("--fine-log-scale", type=float, default=0.1, metavar="S",
                   help="fine stage: training windows scaled by exp(U(-S, S))")
    p.add_argument("--fine-sigma", type=float, default=1.5, metavar="PX",
                   help="fine stage: the target Gaussian's standard deviation, heatmap pixels")
    p.add_argument("--fine-target", choices=["mean", "annotators"], default="mean",
                   help="fine stage: teach a Gaussian at the doctors' mean point, or one at each doctor's point "
                        "(equal weights)")
    p.add_argument("--fine-coord-weight", type=float, default=0.0, metavar="W",
                   help="fine stage: add W x the distance (heatmap pixels) from each heatmap's mean position to "
                        "the taught point to the loss (0: heatmap cross-entropy only)")
    p.add_argument("--fine-erase", type=float, default=0.0, metavar="P",
                   help="fine stage: with probability P, fill a random rectangle of a training window's finest "
                        "channel with its mean (0: never)")
    p.add_argument("--fine-jitter", type=float, nargs=2, default=(0.5, 4.0), metavar=("LO", "HI"),
                   help="fine stage: training window offset, standard deviation range (mm per axis)")
    p.add_argument("--fine-averages", type=float, nargs="+", metavar="DECAY",
                   help="fine stage: also keep exponential moving averages of its weights with these decays "
                        "(e.g. 0.999 0.9995), each written beside --model-out as NAME_avgDECAY.pt")
    p.add_argument("--train-only", action="store_true",
                   help="stop after training (no inference choice, Test1 not read)")
    p.add_argument("--train-all", action="store_true",
                   help="refit on all of Train 001-150 (no validation split, no curve); with --train-only, for a "
                        "recipe chosen on validation before (see --keep-choice); landmarker: its last weights")
    p.add_argument("--coarse-steps", type=int, help="cap the coarse net's training steps (replay a recipe)")
    p.add_argument("--fine-steps", type=int, help="cap the fine net's training steps (replay a recipe)")
    p.add_argument("--add-fine", metavar="MODEL", nargs="+",
                   help="with --evaluate: take the fine stage from these models (several: an ensemble)")
    p.add_argument("--max-fine-nets", type=int, metavar="N",
                   help="with --add-fine: the choice grid holds only subsets of at most N fine nets")
    p.add_argument("--flip-average", choices=["choose", "on", "off"], default="choose",
                   help="with a coarse stage: choose flip averaging on validation (default), or hold it on / off")
    p.add_argument("--fine-looks", type=int, nargs="+", default=[0, 1, 2], metavar="K",
                   help="with a fine stage: the fine looks the choice grid holds (default 0 1 2)")
    p.add_argument("--fine-json", metavar="JSON", nargs="+",
                   help="with --evaluate: the fine stages' training runs (trained one after another, after the runs "
                        "of --train-json: their wall and CPU times add to theirs)")
    p.add_argument("--coarse-decode-windows", type=int, nargs="+", metavar="W",
                   help="glimpse: after the inference choice, also choose on validation the half-size of the "
                        "neighbourhood whose soft-argmax refines the coarse heatmaps' peaks (e.g. 1 2 3 4)")
    p.add_argument("--fine-decode-windows", type=int, nargs="+", metavar="W",
                   help="glimpse: after the inference choice, also choose on validation the half-size of the "
                        "neighbourhood whose soft-argmax refines the fine heatmaps' peaks (e.g. 1 2 3 4 5 7 10)")
    p.add_argument("--no-test", action="store_true",
                   help="glimpse: make the choice (and save it with --save-as) without reading Test1")
    p.add_argument("--no-glimpse", action="store_true",
                   help="choose among answers without glimpse steps only (faster choice)")
    p.add_argument("--save-as", metavar="MODEL",
                   help="write the model with the inference choice (and any --add-coarse) here")
    p.add_argument("--half-weights", action="store_true",
                   help="with --save-as: store the convolution and linear weights as float16 (about half the file); "
                        "records how far that moves the validation answers, and evaluates the file as written")
    p.add_argument("--save-choice", action="store_true",
                   help="glimpse: write the validation-chosen iterations / flip averaging into the model file")
    p.add_argument("--peer-speed-only", metavar="JSON",
                   help="landmarker: re-time inference (median of 20 Test1 images) and update this run's JSON")
    p.add_argument("--max-seconds", type=float, default=0.1,
                   help="glimpse: the inference choice must run within this many seconds per image (0: no bound)")
    p.add_argument("--limit", type=int, help="smoke test: use only this many train/val/test images")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.half_weights and (a.train_all or not (a.evaluate and a.save_as)):
        p.error("--half-weights goes with --evaluate MODEL --save-as FILE, without --train-all "
                "(it measures what float16 weights move on the validation split)")

    from napari_glimpse.io import load_dataset

    torch.set_num_threads(a.threads)
    root = Path(a.data)
    if not root.exists():
        print(f"ISBI data not found at {root}", file=sys.stderr)
        return 2
    train_all = load_dataset(root, "train")
    test = load_dataset(root, "test1")
    n_train = len(train_all) if a.train_all else N_TRAIN
    tr_idx, va_idx = list(range(n_train)), list(range(n_train, len(train_all)))
    if a.limit:
        tr_idx, va_idx = tr_idx[: a.limit], va_idx[: max(2, a.limit // 4)]
        test = test.subset(range(min(len(test), max(20, a.limit))))
    train_ds = train_all.subset(tr_idx)
    val_ds = train_all.subset(va_idx) if va_idx else None
    if a.fine_averages and not a.fine_for:
        p.error("--fine-averages goes with --fine-for (the averages are kept while a fine stage trains)")
    if a.train_all and a.method == "glimpse" and not (a.train_only or a.keep_choice):
        p.error("--train-all leaves no validation split to choose on: add --train-only or --keep-choice")

    def log(msg: str) -> None:
        print(f"[{_dt.datetime.now():%H:%M:%S}] {msg}", flush=True)

    log(f"{a.method}: train {len(train_ds)}, val {len(val_ds) if val_ds else 0}, test {len(test)}; "
        f"budget {a.budget_min} min, {a.threads} threads")
    run = run_glimpse if a.method == "glimpse" else run_landmarker
    res = run(a, train_ds, val_ds, test, log)
    for k, v in (("budget_min", a.budget_min), ("threads", a.threads), ("seed", a.seed)):
        res.setdefault(k, v)
    res.update({
        "protocol": {"train": f"ISBI Train 001-{n_train:03d}", "val": "ISBI Train 131-150" if val_ds else None,
                     "test": "ISBI Test1 151-300", "ground_truth": "mean of senior and junior", "n_test": len(test),
                     "limit": a.limit},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    })
    write_json(a.out, res)
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
