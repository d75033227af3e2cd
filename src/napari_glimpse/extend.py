"""Extending a model with new landmarks: a set that holds the model's landmarks and more.

:func:`widen` gives every net of the model (coarse, fine and glimpse) an output channel per new
landmark, started as the mean of its existing ones; the existing channels and every other weight
are kept, so the widened model answers exactly as before for its own landmarks. Fine-tuning it
(:func:`napari_glimpse.finetune.finetune`, ``napari-glimpse finetune --extend``) on images labelled
with the new set, beside a replay of the original training set (:func:`relabelled`: its labels in
the new set, the new landmarks absent), teaches the new channels and keeps the old ones' skill.

Landmarks are matched by name; the new set may put them in any order.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from .errors import GlimpseError
from .io import Dataset
from .landmark_set import LandmarkSet, of_data

# what an extension tunes by default (finetune --extend): the new channels start from nothing,
# so they need more steps and a larger rate than a site's fine-tuning; the landmark offsets are
# off (the new labels follow the same conventions as the old)
EXTEND_DEFAULTS = {"coarse_steps": 400, "fine_steps": 600, "lr_scale": 0.3, "offsets": False,
                   "time_budget_s": 15 * 60.0}


def name_index(old: Sequence[str], new: Sequence[str]) -> list[int | None]:
    """For each name of ``new``: its index in ``old`` (compared without case), or None."""
    where = {n.casefold(): i for i, n in enumerate(old)}
    return [where.get(n.casefold()) for n in new]


def by_index(values: Sequence, index: Sequence[int | None], fill) -> list:
    """``values`` in the order of ``index`` (from :func:`name_index`), ``fill`` where it is None."""
    return [values[i] if i is not None else fill for i in index]


def landmark_map(old: LandmarkSet, new: LandmarkSet) -> list[int | None]:
    """For each landmark of ``new``: its index in ``old``, or None for a new one. Every landmark
    of ``old`` must be in ``new`` (names compared without case), and ``new`` must add at least one."""
    index = name_index(old.names, new.names)
    missing = sorted(set(range(len(old))) - {i for i in index if i is not None})
    if missing:
        names = ", ".join(old.names[i] for i in missing)
        raise GlimpseError(f"cannot extend model {old.describe()} with {new.describe()}: the new set lacks {names} "
                           "(an extension keeps every landmark of the model)")
    if all(i is not None for i in index):
        raise GlimpseError(f"{new.describe()} adds no landmark to model {old.describe()}: nothing to extend")
    return index


def relabelled(ds: Dataset, new: LandmarkSet) -> Dataset:
    """``ds`` with its labels in the landmarks of ``new`` (matched by name): a landmark ``ds``
    does not have is absent (NaN) in every image. Every landmark of ``ds`` must be in ``new``."""
    if len(of_data(ds)) != len(new):
        index = landmark_map(of_data(ds), new)
    else:  # the same landmarks, perhaps in another order
        index = name_index(ds.landmark_names, new.names)
        if None in index:
            raise GlimpseError(f"the data's landmarks ({', '.join(ds.landmark_names)}) are not those of "
                               f"{new.describe()}")
    ann = {}
    for who, a in ds.annotations.items():
        out = np.full((a.shape[0], len(new), 2), np.nan)
        for j, i in enumerate(index):
            if i is not None:
                out[:, j] = a[:, i]
        ann[who] = out
    return Dataset(list(ds.image_paths), ann, new.names, ds.pixel_spacing, landmark_set=new)


def widened_state(old: dict, template: dict, index: Sequence[int | None]) -> dict:
    """``old`` state dict in the shapes of ``template`` (the same net with ``len(index)``
    landmarks): along the landmark dimension, channel ``j`` is ``old``'s ``index[j]``, or the mean
    of ``old``'s channels where ``index[j]`` is None. Other tensors are kept as they are."""
    k_old, k_new = sum(i is not None for i in index), len(index)
    out = {}
    for key, t in template.items():
        if key not in old:
            raise GlimpseError(f"cannot widen this model: its nets have no {key} (an extension needs the same "
                               "layers with more landmarks)")
        o = old[key]
        if o.shape == t.shape:
            out[key] = o
            continue
        dims = [d for d in range(o.dim()) if o.shape[d] == k_old and t.shape[d] == k_new]
        if len(dims) != 1 or o.dim() != t.dim():
            raise GlimpseError(f"cannot widen {key}: {tuple(o.shape)} -> {tuple(t.shape)}")
        d = dims[0]
        fill = o.float().mean(d, keepdim=True).to(o.dtype)
        out[key] = torch.cat([o.narrow(d, i, 1) if i is not None else fill for i in index], d)
    return out


def _widen_net(net: torch.nn.Module, make, index: Sequence[int | None]) -> torch.nn.Module:
    new = make()
    new.load_state_dict(widened_state(net.state_dict(), new.state_dict(), index))
    return new.to(next(net.parameters()).device).eval()


def _widen_stage(stage, index: Sequence[int | None]):
    """The coarse or fine stage (a net or an ensemble of nets) with ``len(index)`` landmarks."""
    if stage is None:
        return None
    from .runtime import members_of

    nets = [_widen_net(m, lambda m=m: type(m)(replace(m.cfg, n_landmarks=len(index))), index)
            for m in members_of(stage)]
    return type(stage)(nets) if hasattr(stage, "members") else nets[0]


def _start(ds: Dataset, model_spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of every landmark's labelled positions, in pixels at the model's spacing."""
    truth = ds.ground_truth() * (ds.pixel_spacing / model_spacing)
    with warnings.catch_warnings():  # a landmark no image places: NaN, refused by widen
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(truth, 0), np.nan_to_num(np.nanstd(truth, 0))


def _widen_meta(meta: dict, index: Sequence[int | None], old: LandmarkSet, new: LandmarkSet) -> dict:
    """The metadata for the widened model: its set, the per-landmark entries widened (a new
    landmark: no offset, no glimpse steps), no calibration (it was fitted on the old landmarks)."""
    out = dict(meta)
    out["landmark_set"] = new.to_dict()
    for key in ("confidence", "int8"):
        out.pop(key, None)
    if out.get("landmark_offsets_px") is not None:
        out["landmark_offsets_px"] = by_index(np.asarray(out["landmark_offsets_px"], float).tolist(), index, [0.0, 0.0])
    gate = out.get("glimpse_gate")
    if isinstance(gate, dict) and isinstance(gate.get("apply"), list):
        out["glimpse_gate"] = {**gate, "apply": by_index([bool(a) for a in gate["apply"]], index, False)}
    out["extended"] = {"from": old.to_dict(), "added": [n for n, i in zip(new.names, index) if i is None],
                       **({"previous": meta["extended"]} if "extended" in meta else {})}
    return out


def widen(model, new: LandmarkSet, data: Dataset):
    """A copy of ``model`` (a :class:`~napari_glimpse.inference.GlimpseModel`) that finds the
    landmarks of ``new``: its own (same weights, same answers) and the new ones, whose channels
    start as the mean of the others' and whose glimpse start is their mean position in ``data``
    (labelled with ``new``). Its nets run float until int8 graphs are made again."""
    from .inference import GlimpseModel
    from .model import GlimpseModelNet

    old = model.landmark_set
    if model.coarse is None or model.config.mode != "shared":
        raise GlimpseError("--extend needs a model with a coarse stage and one shared glimpse net (such as the "
                           "default recipe's); this one is a glimpse-only model or has a glimpse net per landmark")
    index = landmark_map(old, new)
    net = _widen_net(model.net, lambda: GlimpseModelNet(replace(model.config, n_landmarks=len(new))), index)
    mean, std = _start(relabelled(data, new), model.pixel_spacing)
    have = np.isfinite(mean).all(-1)
    for j, i in enumerate(index):
        if i is not None:
            mean[j], std[j] = model.mean_start[i], model.std_start[i]
        elif not have[j]:
            raise GlimpseError(f"the data labels no image with {new.names[j]!r}: an extension learns new "
                               "landmarks from images where they are placed")
    out = GlimpseModel(net, new.names, model.pixel_spacing, mean, std, model.train_config,
                       _widen_meta(model.meta, index, old, new), _widen_stage(model.coarse, index),
                       _widen_stage(model.fine, index))
    out.half_weights = model.half_weights  # written as its parent's file stores weights
    return out
