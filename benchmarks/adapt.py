#!/usr/bin/env python
"""Adapting to a new site in minutes: ``finetune`` on k reviewed images of a simulated site.

The site is made from ISBI **Train** (Test1 is never read here; the defaults are chosen on this):

* its images are Train 101-150 as another scanner would give them: rescaled by ``--scale``
  (another magnification, the spacing not given: the model sees the anatomy smaller), a gamma,
  a lower contrast, a blur and noise (:func:`site_image`);
* its labels are the **senior** doctor's only (the model learned the mean of the two doctors:
  the senior's conventions differ by a systematic per-landmark amount);
* fine-tune on k = 5, 10, 20 of its images (Train 131-135, 131-140, 131-150), score on its
  other images, Train 101-130 (the same 30 for every k), against the senior's labels, in mm of
  the original anatomy (0.1 mm per original pixel);
* forgetting: plain Train 071-100 (untransformed, the mean of the doctors) before and after;
* the replay of the original training set (``--mix-data``) is drawn from plain Train 001-070.

Caveat: the shipped model's coarse and fine stages were trained on all 150 Train images (its
glimpse net on 001-130), plain and with the mean labels: the "before" figures are those of
images it has seen, under a shift it has not.

Each run records its wall minutes (the whole ``finetune``: reading the images, the offsets,
every net, writing the model; ``cli`` runs also the process start and the int8 graphs, as the
napari widget runs it), the site MRE before/after, SDR 2 mm, points > 10 mm, the plain MRE
after, the machine's load average, and the variant's settings.

Usage::

    python benchmarks/adapt.py --variants offsets default --k 20        # in-process variants
    python benchmarks/adapt.py --cli --k 5 10 20                          # the CLI's defaults
    python benchmarks/adapt.py --reference --k 20                         # the old full-length run
    python benchmarks/adapt.py --offset-scales                            # site gain vs drift, offsets x s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2015"
OUT = ROOT / "benchmarks" / "results" / "adapt.json"

SITE_TUNE = list(range(130, 150))   # Train 131-150 (0-based indices): the reviewed images, first k
SITE_SCORE = list(range(100, 130))  # Train 101-130: the site's other images
PLAIN = list(range(70, 100))        # Train 071-100, plain: forgetting
REPLAY = list(range(0, 70))         # Train 001-070, plain: the original set replayed

# why finetune's defaults are what they are (written into the JSON with them)
CHOICE = ("landmark offsets (most of the gain alone, in seconds: the site's convention), then the coarse net 30 "
          "steps and the four fine nets 100 steps each, all layers, at a tenth of their learning rate, on the "
          "labels minus the offsets: lowest site MRE of the variants within the 5-minute bound (all layers beat "
          "the last block: 0.898 against 0.926 mm at k=20; the coarse net's 30 steps add 0.01 mm for about "
          "half a minute); no glimpse net (the answer takes no glimpse steps); no replay by default (it "
          "changed the site MRE by +0.01 mm and the plain one by -0.04 mm: an option, 'with the original "
          "training set'); a 4-minute budget so that the whole run, int8 graphs included, stays within 5 "
          "minutes on a loaded machine")

# in-process variants: FinetuneConfig fields (plus "mix": replay the original set)
VARIANTS = {
    "offsets": {"coarse_steps": 0, "fine_steps": 0},
    "fine100": {"coarse_steps": 0, "fine_steps": 100, "offsets": False},
    "fine100+offsets": {"coarse_steps": 0, "fine_steps": 100},
    "fine100_last+offsets": {"coarse_steps": 0, "fine_steps": 100, "fine_layers": "last"},
    "fine100_head+offsets": {"coarse_steps": 0, "fine_steps": 100, "fine_layers": "head"},
    "coarse30+fine100+offsets": {"coarse_steps": 30, "fine_steps": 100},
    "coarse30+fine100+offsets+mix": {"coarse_steps": 30, "fine_steps": 100, "mix": True},
    "fine200+offsets+mix": {"coarse_steps": 0, "fine_steps": 200, "mix": True},
    "default": {},
    "default+mix": {"mix": True},
}


def site_image(img: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Another scanner's look: resampled by ``scale``, gamma 1.3, contrast 0.85 (about mid-grey),
    Gaussian blur (sigma 1 px) and noise (sd 4 grey levels); deterministic for ``seed``."""
    import cv2

    h, w = img.shape
    x = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA).astype(np.float32)
    x = 255.0 * (x / 255.0) ** 1.3
    x = (x - 128.0) * 0.85 + 128.0
    x = cv2.GaussianBlur(x, (0, 0), 1.0)
    x = x + np.random.default_rng(seed).normal(0.0, 4.0, x.shape).astype(np.float32)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def build_site(tmp: Path, scale: float) -> dict:
    """The site's images (PNG, for the CLI) and labels; the plain and replay sets."""
    from napari_glimpse.finetune import LoadedDataset, load_images
    from napari_glimpse.io import load_dataset, read_landmarks_csv, write_landmarks_csv

    train = load_dataset(DATA, "train")
    senior = train.ground_truth("senior") * scale
    (tmp / "site").mkdir(parents=True, exist_ok=True)
    arrays, paths = {}, {}
    for i in SITE_TUNE + SITE_SCORE:
        arrays[i] = site_image(train.image(i), scale, seed=i)
        paths[i] = tmp / "site" / train.image_paths[i].name.replace(".jpg", ".png")
    import cv2

    for i in SITE_TUNE:
        cv2.imwrite(str(paths[i]), arrays[i])
    site = {}
    for k in (5, 10, 20):
        idx = SITE_TUNE[:k]
        csv = tmp / "site" / f"reviewed_k{k}.csv"
        write_landmarks_csv(csv, [paths[i].name for i in idx], senior[idx])
        assert np.allclose(read_landmarks_csv(csv)[1], senior[idx], atol=0.01)
        site[k] = (csv, LoadedDataset([paths[i] for i in idx], {"labels": senior[idx]}, train.landmark_names,
                                      train.pixel_spacing / scale, arrays=[arrays[i] for i in idx]))
    score = LoadedDataset([paths[i] for i in SITE_SCORE], {"labels": senior[SITE_SCORE]}, train.landmark_names,
                          train.pixel_spacing / scale, arrays=[arrays[i] for i in SITE_SCORE])
    replay_dir = tmp / "replay"
    (replay_dir / "images").mkdir(parents=True, exist_ok=True)
    for i in REPLAY:
        link = replay_dir / "images" / train.image_paths[i].name
        if not link.exists():
            link.symlink_to(train.image_paths[i])
    for who in ("senior", "junior"):
        write_landmarks_csv(replay_dir / f"train_{who}.csv", [train.image_paths[i].name for i in REPLAY],
                            train.ground_truth(who)[REPLAY])
    plain = load_images(train, PLAIN)
    plain_senior = relabelled(plain, train.ground_truth("senior")[PLAIN])
    return {"tune": site, "score": score, "plain": plain, "plain_senior": plain_senior,
            "replay": train.subset(REPLAY), "replay_dir": replay_dir}


def relabelled(ds, labels: np.ndarray):
    """The loaded set ``ds`` (the same image arrays) with other labels."""
    from napari_glimpse.finetune import LoadedDataset

    return LoadedDataset(ds.image_paths, {"labels": labels}, ds.landmark_names, ds.pixel_spacing, arrays=ds.arrays)


def score(model, ds, spacing: float) -> dict:
    """MRE (mm at ``spacing`` per pixel), SD, SDR 2 mm, points > 10 mm, per-landmark MRE."""
    import warnings

    from napari_glimpse.training import predict_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preds, _ = predict_dataset(model, ds, progress=False)
    err = np.linalg.norm(preds - ds.ground_truth(), axis=-1) * spacing
    return {"mre_mm": round(float(err.mean()), 4), "sd_mm": round(float(err.std()), 4),
            "sdr2": round(float((err <= 2.0).mean()), 4), "over10": int((err > 10).sum()),
            "per_landmark_mm": err.mean(0).round(3).tolist()}


def _load() -> dict:
    return {"loadavg": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}


def evaluate_after(model, site: dict, scale: float) -> dict:
    """``site``: the site's other images, senior labels; ``plain``: plain Train 071-100 against the
    mean of the doctors (what the model learned); ``plain_senior``: against the senior's (the
    site's convention on plain images); ``plain_nets``: against the mean, the landmark offsets
    left out (what the nets still know of the original images)."""
    out = {"site": score(model, site["score"], 0.1 / scale), "plain": score(model, site["plain"], 0.1),
           "plain_senior": score(model, site["plain_senior"], 0.1)}
    nets = score_without_offsets(model, site["plain"], 0.1)
    if nets is not None:
        out["plain_nets"] = nets
    return out


def score_without_offsets(model, ds, spacing: float) -> dict | None:
    """:func:`score` with the model's landmark offsets left out (what its nets know); None without offsets."""
    off = model.meta.pop("landmark_offsets_px", None)
    if off is None:
        return None
    try:
        return score(model, ds, spacing)
    finally:
        model.meta["landmark_offsets_px"] = off


def run_variant(name: str, site: dict, k: int, scale: float, tmp: Path) -> dict:
    """One in-process ``finetune`` with the variant's settings (1 thread)."""
    from napari_glimpse.finetune import FinetuneConfig, finetune
    from napari_glimpse.inference import GlimpseModel

    over = dict(VARIANTS[name])
    mix = over.pop("mix", False)
    # steps decide (the figures do not depend on the machine's load); the CLI runs keep the budget
    cfg = FinetuneConfig(**{"time_budget_s": None, **over})
    parent = GlimpseModel.load(None, "cpu")
    load0 = _load()
    t = time.monotonic()
    model = finetune(parent, site["tune"][k][1], tmp / f"{name}_k{k}.pt", cfg, mix=site["replay"] if mix else None,
                     meta={"parent": "default.pt"})
    minutes = (time.monotonic() - t) / 60
    out = {"variant": name, "k": k, "how": "in-process, 1 thread", "minutes": round(minutes, 2),
           "config": cfg.to_dict(), "mix": mix, "load_before": load0, "load_after": _load()}
    out.update(evaluate_after(model, site, scale))
    out["finetuned"] = {key: model.meta["finetuned"][key] for key in ("stages", "steps", "nets")}
    return out


_TEST1: dict = {}  # plain Test1 (read with --test1 only), loaded once


def test1_scores(model) -> dict:
    """Plain ISBI Test1 (151-300, untransformed): against the mean of the doctors (what the shipped
    model learned), against the senior's labels (the simulated site's convention) and, for an
    adapted model, against the mean without the landmark offsets (what the nets still know)."""
    from napari_glimpse.finetune import load_images
    from napari_glimpse.io import load_dataset

    if "mean" not in _TEST1:
        raw = load_dataset(DATA, "test1")
        _TEST1["mean"] = load_images(raw)
        _TEST1["senior"] = relabelled(_TEST1["mean"], raw.ground_truth("senior"))
    out = {"mean": score(model, _TEST1["mean"], 0.1), "senior": score(model, _TEST1["senior"], 0.1)}
    nets = score_without_offsets(model, _TEST1["mean"], 0.1)
    if nets is not None:
        out["mean_nets"] = nets
    return out


def run_cli(site: dict, k: int, scale: float, tmp: Path, mix: bool, extra: list[str]) -> dict:
    """``napari-glimpse finetune`` as the napari widget runs it (its defaults, 1 thread, int8 graphs remade)."""
    from napari_glimpse.inference import GlimpseModel

    out = tmp / f"cli_k{k}{'_mix' if mix else ''}.pt"
    cmd = [sys.executable, "-m", "napari_glimpse.cli", "finetune", "--data", str(site["tune"][k][0]), "--out", str(out),
           "--threads", "1", "--device", "cpu", "--progress-json", *extra]
    if mix:
        cmd += ["--mix-data", str(site["replay_dir"])]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    load0 = _load()
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    minutes = (time.monotonic() - t) / 60
    if proc.returncode != 0:
        raise SystemExit(f"finetune failed: {proc.stderr[-2000:]}")
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    model = GlimpseModel.load(out, "cpu")
    res = {"variant": "cli defaults" + (" + mix" if mix else ""), "k": k, "how": "napari-glimpse finetune, --threads 1",
           "command": " ".join(cmd[1:]).replace(str(tmp), "TMP"), "minutes": round(minutes, 2),
           "load_before": load0, "load_after": _load(), "int8_nets": list(model.int8_nets),
           "progress_lines": len(lines), "eta_at_half": _eta_at_half(lines, minutes * 60)}
    res.update(evaluate_after(model, site, scale))
    res["finetuned"] = {key: model.meta["finetuned"][key] for key in ("stages", "steps", "nets", "config", "seconds")}
    if _TEST1.get("wanted"):
        res["test1"] = test1_scores(model)
    return res


def _eta_at_half(lines: list[dict], total_s: float) -> dict | None:
    """How good the widget's ETA was halfway: predicted vs actual seconds to go."""
    half = next((ln for ln in lines if ln.get("progress", 0) >= 0.5 and ln.get("eta_s") is not None), None)
    if half is None:
        return None
    return {"elapsed_s": round(half["elapsed_s"], 1), "eta_s": round(half["eta_s"], 1),
            "actual_left_s": round(total_s - half["elapsed_s"], 1)}


def run_reference(site: dict, k: int, scale: float, tmp: Path) -> dict:
    """Today's full-length fine-tune (before this benchmark's defaults): ``finetune``'s old
    defaults, 200 steps for the coarse net, each of the four fine nets and the glimpse net,
    through ``training.train`` as the old command did (in-process, 1 thread; the old command
    then also remade the int8 graphs, about half a minute more)."""
    from dataclasses import replace

    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.training import TrainConfig, train

    parent = GlimpseModel.load(None, "cpu")
    tcfg = replace(TrainConfig.from_dict(parent.train_config), lr=1e-4, seed=0, warmup=0.0, max_steps=200,
                   save_every_s=60.0)
    load0 = _load()
    t = time.monotonic()
    model = train(site["tune"][k][1], tmp / f"reference_k{k}.pt", train_config=tcfg, device="cpu", init=parent,
                  coarse_steps=200, fine_steps=200, progress=False)
    minutes = (time.monotonic() - t) / 60
    res = {"variant": "reference: old defaults (coarse 200, fine 4 x 200, glimpse 200 steps)", "k": k,
           "how": "in-process training.train, 1 thread", "minutes": round(minutes, 2), "load_before": load0,
           "load_after": _load(), "stage_minutes": {
               "coarse": round(model.meta["coarse_finetune_wall_s"] / 60, 2),
               "fine": round(model.meta["fine_finetune_wall_s"] / 60, 2),
               "glimpse": round(model.meta["train_wall_s"] / 60, 2)}}
    res.update(evaluate_after(model, site, scale))
    return res


def offset_scale_sweep(site: dict, k: int, scale: float, tmp: Path, results: dict) -> dict:
    """What the site gains against what the plain images drift when the learned landmark offsets
    are scaled by s = 0, 0.1, ... 1 (the defaults' fine-tune, in-process, steps only; the answers
    are the nets' plus s times the offsets, so two predictions per set give every s). The share
    of gain is of the reference run's (``reference k=20``); the drift is the plain Train 071-100
    MRE against the mean of the doctors, after minus before. Test1 is not read."""
    import warnings

    from napari_glimpse.finetune import FinetuneConfig, finetune
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.training import predict_dataset

    model = finetune(GlimpseModel.load(None, "cpu"), site["tune"][k][1], tmp / f"sweep_k{k}.pt",
                     FinetuneConfig(time_budget_s=None), meta={"parent": "default.pt"})

    def answers(ds) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return predict_dataset(model, ds, progress=False)[0]

    sets = {"site": (site["score"], 0.1 / scale), "plain": (site["plain"], 0.1)}
    with_off = {name: answers(ds) for name, (ds, _) in sets.items()}
    off = model.meta.pop("landmark_offsets_px")
    nets = {name: answers(ds) for name, (ds, _) in sets.items()}
    model.meta["landmark_offsets_px"] = off
    before = results["before"]
    ref = results.get("runs", {}).get(f"reference k={k}")
    ref_gain = before["site"]["mre_mm"] - ref["site"]["mre_mm"] if ref else None
    rows = []
    for s in np.round(np.arange(0.0, 1.001, 0.1), 1):
        mre = {}
        for name, (ds, spacing) in sets.items():
            p = nets[name] + s * (with_off[name] - nets[name])
            mre[name] = float((np.linalg.norm(p - ds.ground_truth(), axis=-1) * spacing).mean())
        gain = before["site"]["mre_mm"] - mre["site"]
        rows.append({"offset_scale": float(s), "site_mre_mm": round(mre["site"], 4),
                     "share_of_reference_gain": round(gain / ref_gain, 3) if ref_gain else None,
                     "plain_mre_mm": round(mre["plain"], 4),
                     "plain_drift_mm": round(mre["plain"] - before["plain"]["mre_mm"], 4)})
    return {"k": k, "how": offset_scale_sweep.__doc__.split("(")[0].strip(), "rows": rows}


def _run_of(name: str, site: dict, k: int, scale: float, tmp: Path):
    """The run ``name`` (a variant, ``cli``, ``cli_mix`` or ``reference``) on k reviewed images, to call."""
    if name in ("cli", "cli_mix"):
        return lambda: run_cli(site, k, scale, tmp, name == "cli_mix", [])
    if name == "reference":
        return lambda: run_reference(site, k, scale, tmp)
    if name not in VARIANTS:
        raise SystemExit(f"unknown run {name!r}: one of {', '.join(sorted(VARIANTS))}, cli, cli_mix, reference")
    return lambda: run_variant(name, site, k, scale, tmp)


def summarize(results: dict) -> dict:
    """Per run: minutes, site MRE before -> after, the share of the reference's gain it keeps, and
    the plain figures (the defaults are the ``cli`` runs)."""
    before = results["before"]["site"]["mre_mm"]
    runs = results.get("runs", {})
    ref = runs.get("reference k=20")
    ref_gain = before - ref["site"]["mre_mm"] if ref else None
    rows = {}
    for name, r in runs.items():
        gain = before - r["site"]["mre_mm"]
        rows[name] = {"minutes": r["minutes"], "site_mre_mm": [before, r["site"]["mre_mm"]],
                      "site_sdr2": [results["before"]["site"]["sdr2"], r["site"]["sdr2"]],
                      "gain_mm": round(gain, 4),
                      "share_of_reference_gain": round(gain / ref_gain, 3) if ref_gain else None,
                      "plain_mre_mm": [results["before"]["plain"]["mre_mm"], r["plain"]["mre_mm"]],
                      "plain_senior_mre_mm": [results["before"]["plain_senior"]["mre_mm"], r["plain_senior"]["mre_mm"]],
                      "plain_nets_mre_mm": r.get("plain_nets", {}).get("mre_mm"),
                      **_test1_row(results["before"].get("test1"), r.get("test1")),
                      "load": r["load_before"]["loadavg"][0]}
    return rows


def _test1_row(before: dict | None, after: dict | None) -> dict:
    """Plain Test1 MRE before -> after adapting (against the mean, the senior; the nets alone)."""
    if not before or not after:
        return {}
    return {"test1_mre_mm": [before["mean"]["mre_mm"], after["mean"]["mre_mm"]],
            "test1_senior_mre_mm": [before["senior"]["mre_mm"], after["senior"]["mre_mm"]],
            "test1_nets_mre_mm": after.get("mean_nets", {}).get("mre_mm"),
            "test1_over10": [before["mean"]["over10"], after["mean"]["over10"]]}


def _save(results: dict, path: Path) -> None:
    if results.get("runs"):
        results["summary"] = summarize(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS))
    p.add_argument("--cli", action="store_true", help="run the CLI with its defaults (as the widget does)")
    p.add_argument("--cli-mix", action="store_true", help="the CLI with --mix-data (the replay set)")
    p.add_argument("--reference", action="store_true", help="the old full-length fine-tune")
    p.add_argument("--k", nargs="+", type=int, default=[20], choices=[5, 10, 20])
    p.add_argument("--runs", nargs="*", default=[], metavar="NAME@K",
                   help="runs one by one, e.g. offsets@5 cli@20 cli_mix@20 reference@20 (NAME: a variant, cli, "
                        "cli_mix or reference)")
    p.add_argument("--offset-scales", action="store_true",
                   help="the site gain against the plain drift with the offsets scaled by 0 ... 1 (k=20)")
    p.add_argument("--scale", type=float, default=0.9)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--test1", action="store_true",
                   help="also score the CLI runs' models on plain ISBI Test1 (read once per shipped result)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from napari_glimpse.inference import GlimpseModel

    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    results["protocol"] = __doc__.split("Usage::")[0].strip()
    results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": 1}
    from napari_glimpse.finetune import FinetuneConfig

    results["defaults"] = {"config": FinetuneConfig().to_dict(), "why": CHOICE}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        site = build_site(tmp, a.scale)
        if "plain_senior" not in results.get("before", {}) or results["before"].get("scale") != a.scale:
            results["before"] = {"scale": a.scale, **evaluate_after(GlimpseModel.load(None, "cpu"), site, a.scale)}
            _save(results, a.out)
        if a.test1:
            _TEST1["wanted"] = True
            results["before"]["test1"] = test1_scores(GlimpseModel.load(None, "cpu"))
        runs = results.setdefault("runs", {})
        todo = [(v, k, lambda v=v, k=k: run_variant(v, site, k, a.scale, tmp)) for v in a.variants for k in a.k]
        if a.cli or a.cli_mix:
            todo += [("cli" + ("_mix" if mix else ""), k, lambda k=k, mix=mix: run_cli(site, k, a.scale, tmp, mix, []))
                     for mix in [False] * a.cli + [True] * a.cli_mix for k in a.k]
        if a.reference:
            todo += [("reference", k, lambda k=k: run_reference(site, k, a.scale, tmp)) for k in a.k]
        for spec in a.runs:
            name, k = spec.split("@")
            todo.append((name, int(k), _run_of(name, site, int(k), a.scale, tmp)))
        for name, k, run in todo:
            res = run()
            runs[f"{name} k={k}"] = res
            print(f"{name} k={k}: {res['minutes']:.2f} min, site MRE {results['before']['site']['mre_mm']:.3f} -> "
                  f"{res['site']['mre_mm']:.3f} mm, plain {results['before']['plain']['mre_mm']:.3f} -> "
                  f"{res['plain']['mre_mm']:.3f} mm, load {res['load_before']['loadavg'][0]}", flush=True)
            _save(results, a.out)
        if a.offset_scales:
            results["offset_scale_sweep"] = sweep = offset_scale_sweep(site, 20, a.scale, tmp, results)
            for r in sweep["rows"]:
                print(f"offsets x {r['offset_scale']:.1f}: site {r['site_mre_mm']:.3f} mm "
                      f"({r['share_of_reference_gain']} of the reference's gain), plain drift "
                      f"{r['plain_drift_mm']:+.3f} mm", flush=True)
            _save(results, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
