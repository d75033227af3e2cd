"""Recipes: a kind of model as a file, and :func:`build`, which trains one from a data folder.

A recipe (``recipes/NAME.json`` in the package, or any file of the same form) states the model's
stages in the order they are trained (a coarse net, fine nets, optionally ``tune`` stages that train
those further, and the glimpse net), each
with its config, its minutes and its step count; the weight averaging; the inference settings the
model is saved with; and whether its nets get int8 graphs. ``default`` is the shipped model's
kind (``models/default.pt``): a coarse net and four fine nets, then both tuned on another device's
artefacts, 257 minutes of training in full
(the shipped nets' own times, one thread each on 2-core CPU machines)::

    napari-glimpse train --recipe default --data DIR --out model.pt [--time-budget MIN]

``--time-budget MIN`` scales every stage's minutes alike (each stage still stops at its step
count). The recipe's name, its whole content and the budget used go into the model's
``meta['recipe']``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed
from ._serde import DictConfig
from .artefacts import with_artefacts
from .coarse import CoarseConfig, CoarseEnsemble, members_of, train_coarse, view_levels
from .errors import GlimpseError
from .fine import FineConfig, FineEnsemble, fine_levels_by_kind, train_fine
from .glimpse_only import GlimpseOnlyConfig
from .inference import GlimpseModel, resolve_device
from .io import Dataset, load_dataset
from .landmark_set import of_data
from .model import GlimpseModelNet, ModelConfig
from .pyramid import build_pyramid, levels_for
from .spacing import SpacingWarning
from .training import TrainConfig, start_statistics, train

RECIPES = Path(__file__).with_name("recipes")
FORMAT = 1


@dataclass(frozen=True)
class TuneConfig(DictConfig):
    """A ``tune`` stage: every net of stage ``nets`` (``coarse`` or ``fine``) trained before it
    learns ``max_steps`` more steps at ``lr_scale`` times its own learning rate, its training images
    showing another device's artefacts with probability ``artefacts`` (:mod:`napari_glimpse.artefacts`;
    None: each net's own setting)."""

    nets: str = "fine"
    lr_scale: float = 0.1
    artefacts: float | None = None


KINDS = {"coarse": CoarseConfig, "fine": FineConfig, "tune": TuneConfig, "glimpse": TrainConfig,
         "glimpse_only": GlimpseOnlyConfig}
# train flags that go with --recipe; the others set what the recipe sets
CLI_FLAGS = ("command", "recipe", "data", "split", "out", "device", "time_budget", "max_steps", "threads", "spacing",
             "progress_json", "nice", "init")

StageConfig = CoarseConfig | FineConfig | TuneConfig | TrainConfig | GlimpseOnlyConfig


@dataclass(frozen=True)
class RecipeStage:
    """One net to train. ``kind``: ``coarse``, ``fine``, ``tune`` (the coarse or fine nets trained
    so far, trained further) or ``glimpse``; ``config``: its :class:`CoarseConfig`, :class:`FineConfig`,
    :class:`TuneConfig` or (the glimpse net's) :class:`TrainConfig`;
    ``minutes``: its wall-time budget and ``max_steps``: its step count (it stops at the nearer;
    None: minutes only); ``average_decay``: a fine net is kept as the moving average of its
    weights with this decay (None: its last weights)."""

    kind: str
    name: str
    minutes: float
    max_steps: int | None
    config: StageConfig
    average_decay: float | None = None
    notes: str = ""


@dataclass(frozen=True)
class InferenceSettings:
    """How the model reads an image (saved in its meta under these keys, see :class:`GlimpseModel`)."""

    iterations: int
    fine_steps: int
    coarse_flip_average: bool
    coarse_blend: float
    coarse_decode_window: int
    fine_decode_window: int
    notes: str = ""

    def to_meta(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "notes"}


@dataclass(frozen=True)
class QuantizeSettings:
    """``int8``: make int8 graphs of the ``stages``' nets, calibrated on ``calibration_images``
    training images spread evenly (needs the ``onnx`` package); ``half_weights``: store the
    weights as float16 (rounded before the graphs are made)."""

    int8: bool
    stages: tuple[str, ...]
    float_ends: bool
    calibration_images: int
    half_weights: bool
    notes: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    ground_truth: str
    model: ModelConfig
    stages: tuple[RecipeStage, ...]
    inference: InferenceSettings
    quantize: QuantizeSettings
    notes: tuple[str, ...] = ()
    content: dict = field(default_factory=dict, compare=False, repr=False)  # the file as read
    source: str = ""
    validation: dict | None = None  # a glimpse-only recipe's held-out images (see glimpse_only_build)

    @property
    def minutes(self) -> float:
        """The full budget: every stage's minutes."""
        return float(sum(s.minutes for s in self.stages))


# ------------------------------------------------------------------------------ reading
def packaged() -> list[str]:
    """The names of the recipes in the package."""
    return sorted(p.stem for p in RECIPES.glob("*.json"))


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A packaged recipe's file (a name: no suffix, no folder part, no such file here; a folder of
    that name here does not hide it), or the path given."""
    p = Path(name_or_path)
    packaged_file = RECIPES / f"{p.name}.json"
    if (p.suffix or p.is_file() or os.sep in str(name_or_path) or "/" in str(name_or_path)
            or (p.is_dir() and not packaged_file.is_file())):
        if not p.is_file():
            raise GlimpseError(f"recipe file not found: {p}")
        return p
    if not packaged_file.is_file():
        raise GlimpseError(f"no recipe {str(name_or_path)!r} in the package (it has: {', '.join(packaged())}); "
                           f"or give a recipe file's path")
    return packaged_file


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Read a recipe: a packaged one by name (``default``) or a file; a clear error on anything wrong."""
    path = recipe_path(name_or_path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GlimpseError(f"{path}: not a readable recipe ({exc})") from None
    try:
        return parse_recipe(content, str(path))
    except (TypeError, ValueError) as exc:
        raise GlimpseError(f"{path}: {exc}") from None


def _keys(d: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object")
    if missing := sorted(required - set(d)):
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    if unknown := sorted(set(d) - required - set(optional)):
        raise ValueError(f"{where} has unknown keys {', '.join(unknown)}")
    return d


def _config(cls, d: Any, where: str):
    """A config dataclass from its dict, every key known (a typo is an error, not a default)."""
    names = {f.name for f in fields(cls)}
    d = _keys(d, where, set(), names)
    return cls.from_dict(d)


def _stage(d: Any, i: int) -> RecipeStage:
    where = f"stage {i + 1}"
    _keys(d, where, {"kind", "name", "minutes", "max_steps", "config"}, {"average_decay", "notes"})
    if d["kind"] not in KINDS:
        raise ValueError(f"{where}: kind {d['kind']!r}, expected one of {', '.join(KINDS)}")
    minutes, steps, decay = d["minutes"], d["max_steps"], d.get("average_decay")
    if not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or not minutes > 0:
        raise ValueError(f"{where}: minutes must be a number above 0, not {minutes!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"{where}: max_steps must be a whole number of 1 or more, or null, not {steps!r}")
    if decay is not None and (d["kind"] != "fine" or not isinstance(decay, float) or not 0 < decay < 1):
        raise ValueError(f"{where}: average_decay is for fine stages, a number between 0 and 1 (or null)")
    return RecipeStage(d["kind"], str(d["name"]), float(minutes), steps,
                       _config(KINDS[d["kind"]], d["config"], f"{where} config"), decay, str(d.get("notes", "")))


def parse_recipe(content: dict, source: str = "") -> Recipe:
    """A :class:`Recipe` from a recipe file's content (``ValueError`` on anything wrong)."""
    stages = content.get("stages", []) if isinstance(content, dict) else []
    kinds = [s.get("kind") for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []
    if kinds and set(kinds) == {"glimpse_only"}:
        return _parse_glimpse_only(content, source)
    _keys(content, "the recipe", {"format", "name", "ground_truth", "model", "stages", "inference", "quantize"},
          {"description", "notes"})
    if content["format"] != FORMAT:
        raise ValueError(f"recipe format {content['format']!r}; this version reads format {FORMAT}")
    stages = tuple(_stage(s, i) for i, s in enumerate(content["stages"]))
    kinds = [s.kind for s in stages]
    if kinds.count("coarse") != 1 or kinds.count("glimpse") > 1 or kinds[0] != "coarse":
        raise ValueError("a recipe trains one coarse stage first, then fine stages and at most one glimpse stage")
    for i, st in enumerate(stages):
        if st.kind == "tune" and (st.config.nets not in ("coarse", "fine") or st.config.nets not in kinds[:i]
                                  or st.config.nets in kinds[i:]):
            raise ValueError(f"stage {i + 1}: a tune stage tunes the coarse or fine nets, after all of them")
    inf = _keys(content["inference"], "inference", {f.name for f in fields(InferenceSettings)} - {"notes"}, {"notes"})
    q = _keys(content["quantize"], "quantize", {f.name for f in fields(QuantizeSettings)} - {"notes"}, {"notes"})
    quant = QuantizeSettings(**{**q, "stages": tuple(q["stages"])})
    if not set(quant.stages) <= {"coarse", "fine"} or quant.calibration_images < 1:
        raise ValueError("quantize: stages are coarse and/or fine, with 1 or more calibration images")
    model = dict(content["model"])
    model.pop("notes", None)
    return Recipe(str(content["name"]), str(content.get("description", "")), str(content["ground_truth"]),
                  _config(ModelConfig, model, "model"), stages, InferenceSettings(**inf), quant,
                  tuple(content.get("notes", ())), content, source)


def _parse_glimpse_only(content: dict, source: str) -> Recipe:
    """A glimpse-only recipe: ``glimpse_only`` stages (each goes on from the net the one before it
    left, with its own schedule and curriculum), the held-out images (``validation``:
    ``train_ids`` and ``val_ids`` as inclusive ``[first, last]`` image numbers, ``eval_steps``),
    ``inference.iterations`` (null: chosen on validation) and ``quantize.half_weights``."""
    _keys(content, "the recipe", {"format", "name", "ground_truth", "model", "stages", "inference", "quantize",
                                  "validation"}, {"description", "notes"})
    if content["format"] != FORMAT:
        raise ValueError(f"recipe format {content['format']!r}; this version reads format {FORMAT}")
    stages = tuple(_stage(s, i) for i, s in enumerate(content["stages"]))
    val = _keys(content["validation"], "validation", {"train_ids", "val_ids", "eval_steps"}, {"notes"})
    for k in ("train_ids", "val_ids"):
        if not (isinstance(val[k], list) and len(val[k]) == 2 and all(isinstance(v, int) for v in val[k])):
            raise ValueError(f"validation: {k} must be [first, last] image numbers")
    inf = _keys(content["inference"], "inference", {"iterations"}, {"notes"})
    q = _keys(content["quantize"], "quantize", {"half_weights"}, {"notes"})
    model = {k: v for k, v in content["model"].items() if k != "notes"}
    it = inf["iterations"]
    return Recipe(str(content["name"]), str(content.get("description", "")), str(content["ground_truth"]),
                  _config(ModelConfig, model, "model"), stages,
                  InferenceSettings(-1 if it is None else int(it), 0, False, 0.0, 2, 2, str(inf.get("notes", ""))),
                  QuantizeSettings(False, (), False, 1, bool(q["half_weights"])),
                  tuple(content.get("notes", ())), content, source,
                  {k: v for k, v in val.items() if k != "notes"})


# ------------------------------------------------------------------------------ building
def _for_data(stage: RecipeStage, ds: Dataset) -> StageConfig:
    """The stage's config for this data: its landmarks and (fine) pixel spacing."""
    cfg = stage.config
    if isinstance(cfg, CoarseConfig):
        return replace(cfg, n_landmarks=len(ds.landmark_names))
    if isinstance(cfg, FineConfig):
        return replace(cfg, n_landmarks=len(ds.landmark_names), pixel_spacing=ds.pixel_spacing)
    return cfg


def _training_views(ds: Dataset, recipe: Recipe, cfgs: list[StageConfig], progress: bool) -> dict:
    """Every image's pyramid, made once, turned into the coarse view stack and the fine levels
    (the pyramids are not kept)."""
    from tqdm.auto import tqdm

    pyramids = []
    for i in tqdm(range(len(ds)), desc="pyramids", disable=not progress, leave=False):
        img = ds.image(i)
        ds.check_inside(i, img.shape)
        pyramids.append(build_pyramid(img, recipe.model.n_levels, recipe.model.patch))
    truth = ds.ground_truth(recipe.ground_truth).astype(np.float32)
    fines = [c for c in cfgs if isinstance(c, FineConfig)]
    coarse = next(c for c in cfgs if isinstance(c, CoarseConfig))
    shapes = np.array([p.shape for p in pyramids])
    return {"views": view_levels(pyramids, truth, coarse),
            "fine": fine_levels_by_kind(pyramids, truth, fines) if fines else {},
            "shape": tuple(int(v) for v in np.median(shapes, axis=0))}


def _new_model(recipe: Recipe, ds: Dataset, shape: tuple[int, int], dev: torch.device) -> GlimpseModel:
    names = ds.landmark_names
    mcfg = replace(recipe.model, n_landmarks=len(names))
    glimpse = [s.config for s in recipe.stages if s.kind == "glimpse"]
    torch.manual_seed(glimpse[0].seed if glimpse else 0)
    truth = ds.ground_truth(recipe.ground_truth).astype(np.float64)
    meta = {"train_image_shape": list(shape), "auto_levels": levels_for(shape, mcfg.patch),
            "n_train_images": len(ds), "train_images": [p.name for p in ds.image_paths],
            "glimpse_net": "trained" if glimpse else "untrained: the recipe has no glimpse stage",
            "landmark_set": of_data(ds).to_dict()}
    if not glimpse:  # an untrained glimpse net's steps never reach the answer (napari_glimpse.gate)
        meta["glimpse_gate"] = {"apply": [False] * len(names), "reason": "the recipe trains no glimpse net"}
    return GlimpseModel(GlimpseModelNet(mcfg).to(dev), names, ds.pixel_spacing, *start_statistics(truth, names),
                        glimpse[0].to_dict() if glimpse else {}, meta)


def _glimpse(model: GlimpseModel, ds: Dataset, cfg: TrainConfig, budget_s: float, steps: int | None,
             dev: torch.device, bars: bool, callback) -> list[dict]:
    """Train the glimpse net of ``model`` (its coarse and fine stages as they are) with
    :func:`napari_glimpse.training.train`, into a scratch file that is then removed."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="napari-glimpse-recipe-") as tmp:
        train(ds, Path(tmp) / "glimpse.pt", train_config=replace(cfg, max_steps=steps), device=str(dev),
              time_budget_s=budget_s, init=model, progress=bars, callback=callback)
    return model.meta["history"]


def _run_stage(stage: RecipeStage, cfg: StageConfig, model: GlimpseModel, ds: Dataset, views: dict,
               budget_s: float, steps: int | None, dev: torch.device, bars: bool, callback):
    """Train one stage; returns its net (None for the glimpse net, trained in place) and history."""
    if stage.kind == "coarse":
        v, hw, truth_n = views["views"]
        return train_coarse(v, hw, truth_n, cfg, budget_s, progress=bars, callback=callback, max_steps=steps,
                            device=dev)
    if stage.kind == "fine":
        averages = {stage.average_decay: None} if stage.average_decay else None
        net, hist = train_fine(*views["fine"][cfg.level, cfg.context], cfg, budget_s, progress=bars,
                               callback=callback, max_steps=steps, averages=averages, device=dev)
        return (averages[stage.average_decay] if averages else net), hist
    return None, _glimpse(model, ds, cfg, budget_s, steps, dev, bars, callback)


def _tune(nets: list, cfg: TuneConfig, views: dict, budget_s: float, steps: int | None,
          dev: torch.device, bars: bool, callback) -> tuple[list, list[dict]]:
    """A ``tune`` stage: each of ``nets`` (the stage ``cfg.nets``'s) tuned from where it is (its
    share of the budget), with ``cfg.artefacts`` recorded in its config; the tuned nets and their
    histories, one after another (``elapsed_s`` counted from the stage's start)."""
    tuned, history, before = [], [], 0.0
    for member, net in enumerate(nets):
        ncfg = with_artefacts(net, cfg.artefacts)
        cb = None if callback is None else (lambda info, m=member: callback({**info, "member": m}))
        kw = dict(progress=bars, callback=cb, max_steps=steps, init=net, lr_scale=cfg.lr_scale, device=dev)
        if cfg.nets == "coarse":
            new, hist = train_coarse(*views["views"], ncfg, budget_s / len(nets), **kw)
        else:
            new, hist = train_fine(*views["fine"][ncfg.level, ncfg.context], ncfg, budget_s / len(nets), **kw)
        tuned.append(new)
        history.extend({**h, "elapsed_s": before + h.get("elapsed_s", 0.0)} for h in hist)
        before = history[-1]["elapsed_s"] if history else before
    return tuned, history


def _train_into(model: GlimpseModel, fine_nets: list, recipe: Recipe, stage: RecipeStage, cfg: StageConfig,
                ds: Dataset, views: dict, budget_s: float, steps: int | None, dev: torch.device, bars: bool,
                callback) -> list[dict]:
    """Train one stage of :func:`build` into ``model`` (and the ``fine_nets`` list so far); its history."""
    if stage.kind == "tune" and cfg.nets == "fine":
        fine_nets[:], hist = _tune(fine_nets, cfg, views, budget_s, steps, dev, bars, callback)
        model.fine = FineEnsemble(fine_nets) if len(fine_nets) > 1 else fine_nets[0]
        return hist
    if stage.kind == "tune":
        nets, hist = _tune(members_of(model.coarse), cfg, views, budget_s, steps, dev, bars, callback)
        model.coarse = CoarseEnsemble(nets) if len(nets) > 1 else nets[0]
        return hist
    net, hist = _run_stage(stage, cfg, model, ds, views, budget_s, steps, dev, bars, callback)
    if stage.kind == "coarse":
        keep = any(s.kind == "tune" and s.config.nets == "coarse" for s in recipe.stages)  # else freed
        model.coarse, views["views"] = net, (views["views"] if keep else None)
    elif stage.kind == "fine":
        fine_nets.append(net)
        model.fine = FineEnsemble(fine_nets) if len(fine_nets) > 1 else net
    return hist


def _cap(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _reporter(progress: bool | Callable[[dict], None], recipe: Recipe):
    """(show bars, the per-step callback maker, a line printer) for :func:`build`."""
    bars = progress is True
    report = progress if callable(progress) else None
    total = recipe.minutes

    def callback_for(i: int, stage: RecipeStage):
        before = sum(s.minutes for s in recipe.stages[:i]) / total

        def cb(info: dict) -> None:
            if report is not None:
                frac = float(info.get("progress", 0.0))
                report({**info, "recipe_stage": stage.name, "stage_index": i, "stages": len(recipe.stages),
                        "overall_progress": before + frac * stage.minutes / total})
        return cb

    def say(text: str) -> None:
        if bars:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)

    return bars, callback_for, say


def build(recipe: Recipe | str | os.PathLike, data: Dataset | str | os.PathLike, out: str | os.PathLike,
          time_budget: float | None = None, device: str = "auto", progress: bool | Callable[[dict], None] = True,
          split: str = "train", spacing: float | None = None, max_steps: int | None = None,
          meta: dict | None = None, init: GlimpseModel | None = None) -> GlimpseModel:
    """Train the model ``recipe`` describes on ``data`` and write it to ``out`` (atomically).

    ``recipe``: a :class:`Recipe`, a packaged recipe's name or a recipe file; ``data``: a
    :class:`Dataset` or a dataset folder (its ``split``, at ``spacing`` mm per pixel).
    The stages are trained one after another (:func:`~napari_glimpse.coarse.train_coarse`,
    :func:`~napari_glimpse.fine.train_fine`, the glimpse net with
    :func:`~napari_glimpse.training.train` only if the recipe has a glimpse stage), each for its
    minutes or its steps, whichever comes first. ``time_budget`` (minutes) scales every stage's
    minutes alike: the ``default`` recipe is 257 minutes in full (about 4 hours on 2 CPU cores;
    a faster machine reaches the step counts sooner). ``max_steps`` caps every stage's steps
    (tests). The nets are assembled into one :class:`GlimpseModel` with the recipe's inference
    settings, written with float16 weights if it says so, then given int8 graphs if it asks and
    the ``onnx`` package is installed (else one line says so and the nets stay float; the float
    model is written first, so a failure there loses nothing). ``meta['recipe']`` records the
    recipe's name, content and source, the budget used and what each stage did.

    ``progress``: True shows progress bars and a line per stage (stderr); a callable instead gets
    each step's dict with ``recipe_stage`` and ``overall_progress`` (0-1); False: nothing.

    Under torchrun every process calls this alike: the stages train data-parallel
    (:mod:`napari_glimpse.distributed`; the configs' batch sizes are the global batches), rank 0
    alone shows progress and writes ``out`` (the others wait for it), and ``meta['world_size']``
    records how many processes trained.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    ds = data if isinstance(data, Dataset) else load_dataset(data, split, spacing)
    if recipe.validation is not None or init is not None:
        return glimpse_only_build(recipe, ds, out, time_budget, device, progress, max_steps, meta, init)
    dev = resolve_device(device)
    scale = 1.0 if time_budget is None else float(time_budget) / recipe.minutes
    bars, callback_for, say = _reporter(progress, recipe)
    cfgs = [_for_data(s, ds) for s in recipe.stages]
    views = _training_views(ds, recipe, cfgs, bars)
    model = _new_model(recipe, ds, views.pop("shape"), dev)
    records, fine_nets = [], []
    t0 = time.monotonic()
    for i, (stage, cfg) in enumerate(zip(recipe.stages, cfgs)):
        budget_s, steps = stage.minutes * scale * 60.0, _cap(stage.max_steps, max_steps)
        hist = _train_into(model, fine_nets, recipe, stage, cfg, ds, views, budget_s, steps, dev, bars,
                           callback_for(i, stage))
        rec = _stage_record(stage, hist, steps, budget_s)
        records.append(rec)
        say(f"{stage.name}: {rec['steps']} steps in {rec['wall_s'] / 60:.1f} min (stopped on {rec['stopped']})")
    _finish_meta(model, recipe, records, scale, max_steps, time.monotonic() - t0, dev, len(ds), meta)
    if distributed.is_main():
        _save(model, recipe, ds, out, say)
    distributed.barrier()
    return model


def glimpse_only_build(recipe: Recipe, ds: Dataset, out: str | os.PathLike, time_budget: float | None = None,
                       device: str = "auto", progress: bool | Callable[[dict], None] = True,
                       max_steps: int | None = None, meta: dict | None = None,
                       init: GlimpseModel | None = None) -> GlimpseModel:
    """:func:`build` for a glimpse-only recipe (:mod:`napari_glimpse.glimpse_only`): train on the
    images numbered ``validation.train_ids``, stage after stage (each from the net the one before
    left), validate on ``val_ids`` after 1 .. ``max(eval_steps)`` steps (the default step count
    chosen there unless ``inference.iterations`` fixes it), write ``out`` (float16 weights if the
    recipe says so) and print the validation figures. ``init``: a model this recipe made up to
    some stage (its ``meta['recipe']`` lists the stages done); the build goes on from there."""
    from .glimpse_only import split_by_ids, train_glimpse_only

    if recipe.validation is None:
        raise GlimpseError(f"--init goes on from an earlier stage of a glimpse-only recipe; recipe {recipe.name!r} "
                           f"trains all its stages in one run")
    if distributed.world_size() > 1:  # its loop (napari_glimpse.glimpse_only) is not data-parallel
        raise GlimpseError("a glimpse-only recipe trains in one process: run it without torchrun")
    scale = 1.0 if time_budget is None else float(time_budget) / recipe.minutes
    train_ds, val_ds = split_by_ids(ds, recipe.validation["train_ids"], recipe.validation["val_ids"])
    bars, callback_for, say = _reporter(progress, recipe)
    mcfg = replace(recipe.model, n_landmarks=len(ds.landmark_names))
    records = _stages_done(recipe, init)
    model, t0 = init, time.monotonic()
    for i, stage in enumerate(recipe.stages[len(records):], start=len(records)):
        steps, budget_s = _cap(stage.max_steps, max_steps), stage.minutes * scale * 60.0
        model = train_glimpse_only(train_ds, val_ds, mcfg, stage.config, budget_s, steps, device,
                                   bars, callback_for(i, stage), meta, max(recipe.validation["eval_steps"]), model)
        records.append(_stage_record(stage, model.meta["history"], steps, budget_s))
        say(f"{stage.name}: {records[-1]['steps']} steps in {records[-1]['wall_s'] / 60:.1f} min "
            f"(stopped on {records[-1]['stopped']})")
    if recipe.inference.iterations >= 1:
        model.meta["iterations"] = recipe.inference.iterations
    model.meta.update({
        "recipe": {"name": recipe.name, "source": recipe.source, "content": recipe.content,
                   "full_budget_min": recipe.minutes, "budget_min": round(recipe.minutes * scale, 4),
                   "scale": scale, "max_steps_cap": max_steps, "stages": records, "wall_s": time.monotonic() - t0},
        "train_steps": sum(r["steps"] for r in records), "train_wall_s": sum(r["wall_s"] for r in records),
        "train_device": str(model.device),
        "torch": str(torch.__version__)})
    model.net.cpu().eval()
    model.save(out, half_weights=recipe.quantize.half_weights)
    _say_validation(model, recipe, say)
    return model


def _stages_done(recipe: Recipe, init: GlimpseModel | None) -> list[dict]:
    """The records of the stages ``init`` went through (none without it); a model made by another
    recipe, or one with every stage done, is a :class:`GlimpseError`."""
    if init is None:
        return []
    done = init.meta.get("recipe", {})
    names = [r["name"] for r in done.get("stages", [])]
    if done.get("name") != recipe.name or names != [s.name for s in recipe.stages[:len(names)]]:
        raise GlimpseError(f"--init: that model was not made by the first stages of recipe {recipe.name!r} "
                           f"(it records recipe {done.get('name')!r}, stages {names})")
    if len(names) >= len(recipe.stages):
        raise GlimpseError(f"--init: that model has every stage of recipe {recipe.name!r} done already")
    return [dict(r) for r in done["stages"]]


def _say_validation(model: GlimpseModel, recipe: Recipe, say) -> None:
    from .glimpse_only import validation_line

    if "validation" in model.meta:
        v = model.meta["validation"]
        msg = (f"{validation_line(v, recipe.validation['eval_steps'])} on {v['n_images']} held-out images; "
               f"default steps {model.meta['iterations']} ({model.meta['weights']} weights; "
               f"{v['read_as_left_facing']} read as left-facing)")
        say(msg)
        model.meta["validation_line"] = msg


def _stage_record(stage: RecipeStage, hist: list[dict], steps: int | None, budget_s: float) -> dict:
    last = hist[-1] if hist else {}
    done = int(last.get("step", 0))
    return {"name": stage.name, "kind": stage.kind, "steps": done, "max_steps": steps,
            "minutes": round(budget_s / 60.0, 4), "wall_s": float(last.get("elapsed_s", 0.0)),
            "stopped": "steps" if steps is not None and done >= steps else "minutes",
            "loss": last.get("loss", last.get("loss_mm")),
            "average_decay": stage.average_decay}


def _finish_meta(model: GlimpseModel, recipe: Recipe, records: list[dict], scale: float, max_steps: int | None,
                 wall_s: float, dev: torch.device, n_images: int, meta: dict | None) -> None:
    fines = [r for r in records if r["kind"] == "fine"]
    model.meta.update(meta or {})
    model.meta.update(recipe.inference.to_meta())
    model.meta.update({
        "recipe": {"name": recipe.name, "source": recipe.source, "content": recipe.content,
                   "full_budget_min": recipe.minutes, "budget_min": round(recipe.minutes * scale, 4),
                   "scale": scale, "max_steps_cap": max_steps, "stages": records, "wall_s": wall_s},
        "coarse_n_train_images": [n_images], "fine_n_train_images": [n_images] * len(fines),
        "fine_average_decay": [r["average_decay"] for r in fines],
        "train_device": str(dev), "torch": str(torch.__version__), "world_size": distributed.world_size()})


def _save(model: GlimpseModel, recipe: Recipe, ds: Dataset, out: str | os.PathLike, say) -> None:
    """Write the float model, then (if asked and possible) make int8 graphs and write it again."""
    from .int8 import quantize

    for net in (model.net, model.coarse, model.fine):
        if net is not None:
            net.cpu().eval()
    q = recipe.quantize
    model.save(out, half_weights=q.half_weights)
    if not q.int8:
        return
    if importlib.util.find_spec("onnx") is None:
        print(f"napari-glimpse: note: onnx is not installed, so {out} keeps its float nets (no int8 graphs): "
              f"pip install 'napari-glimpse[quantize]' and run napari-glimpse quantize", file=sys.stderr)
        return
    step = max(1, math.ceil(len(ds) / q.calibration_images))
    idx = list(range(0, len(ds), step))[: q.calibration_images]
    try:
        with warnings.catch_warnings():  # the training images are at the model's spacing
            warnings.simplefilter("ignore", SpacingWarning)
            n = quantize(model, [ds.image(i) for i in idx], which=q.stages, float_ends=q.float_ends)
    except GlimpseError as exc:
        print(f"napari-glimpse: note: {out} keeps its float nets ({exc})", file=sys.stderr)
        return
    model.save(out, half_weights=q.half_weights)
    say(f"int8 graphs for {n} nets, calibrated on {len(idx)} training image(s)")


# ------------------------------------------------------------------------------ command line
def progress_lines(recipe: Recipe, max_steps: int | None, t0: float) -> Callable[[dict], None]:
    """``train --recipe ... --progress-json``: one JSON line per step on stdout, as ``finetune
    --progress-json`` prints them (the napari widgets read both): the stage's kind (a ``tune``
    stage's: the kind of nets it tunes; ``member``: which fine net), its ``step`` of ``steps``,
    the whole run's ``progress`` (0-1, the stages weighted by
    their minutes), ``elapsed_s``, ``eta_s`` and the ``loss``."""
    def line(info: dict) -> None:
        i = int(info.get("stage_index", 0))
        stage = recipe.stages[i]
        p = float(info.get("overall_progress", 0.0))
        el = time.monotonic() - t0
        kind = stage.config.nets if stage.kind == "tune" else stage.kind  # a tune stage: the nets it tunes
        out = {"stage": "glimpse" if kind in ("glimpse", "glimpse_only") else kind,
               "step": int(info.get("step", 0)), "progress": p, "elapsed_s": el,
               "eta_s": el * (1 - p) / p if p > 0 else None}
        if stage.kind == "fine" and sum(s.kind == "fine" for s in recipe.stages) > 1:
            out["member"] = sum(s.kind == "fine" for s in recipe.stages[:i])
        elif stage.kind == "tune" and kind == "fine":
            out["member"] = info.get("member")
        steps = _cap(stage.max_steps, max_steps)
        if steps:
            out["steps"] = steps
        for k in ("loss", "loss_mm"):
            if info.get(k) is not None:
                out[k] = float(info[k])
        print(json.dumps({k: v for k, v in out.items() if v is not None}), flush=True)
    return line


def cmd_train_recipe(a: argparse.Namespace, defaults: dict[str, Any]) -> int:
    """``napari-glimpse train --recipe NAME_OR_PATH``; ``defaults``: the train command's flag
    defaults (a flag that differs and is not one of :data:`CLI_FLAGS` is refused)."""
    given = [k for k, v in vars(a).items() if k not in CLI_FLAGS and k in defaults and v != defaults[k]]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise GlimpseError(f"--recipe sets the stages and their configs: {flags} cannot be given with it "
                           f"(with --recipe: --data, --split, --out, --time-budget, --max-steps, --device, "
                           f"--threads, --spacing; --init for a glimpse-only recipe)")
    recipe = load_recipe(a.recipe)
    init = GlimpseModel.load(a.init, a.device) if getattr(a, "init", None) else None
    meta = {"command": "napari-glimpse " + " ".join(sys.argv[1:]) if sys.argv else "", "data": str(a.data),
            "split": a.split}
    json_lines = getattr(a, "progress_json", False) and distributed.is_main()
    t0 = time.monotonic()
    model = build(recipe, a.data, a.out, a.time_budget, a.device,
                  progress_lines(recipe, a.max_steps, t0) if json_lines else distributed.is_main(), a.split,
                  a.spacing, a.max_steps, meta, init)
    if not distributed.is_main():
        return 0
    r = model.meta["recipe"]
    steps = ", ".join(f"{s['name']} {s['steps']}" for s in r["stages"])
    if json_lines:
        print(json.dumps({"done": True, "out": str(a.out), "steps": sum(s["steps"] for s in r["stages"]),
                          "summary": f"recipe {recipe.name}: {steps}", "seconds": round(time.monotonic() - t0, 1)}),
              flush=True)
        return 0
    print(f"wrote {a.out}: recipe {recipe.name}, {len(r['stages'])} stages in {r['wall_s'] / 60:.1f} min "
          f"(budget {r['budget_min']:.4g} of {r['full_budget_min']:.4g} min; steps: {steps}); "
          f"int8 graphs for {model.int8_nets[0]} of {model.int8_nets[1]} nets")
    if "validation_line" in model.meta:
        print(model.meta["validation_line"])
    return 0
