"""The glimpse gate: glimpse steps behind the coarse/fine answer only where validation shows they help.

A model with a coarse and a fine stage can take glimpse steps after their answer
(:meth:`GlimpseModel.predict <napari_glimpse.inference.GlimpseModel.predict>` ``iterations``).
Its ``meta['glimpse_gate']`` says for which landmarks those steps are applied:

``{"apply": [K bools], "reason": str, ...}``: a landmark whose ``apply`` is False keeps the
0-step answer however many steps are asked for (the trajectory's ``steps_gated`` says so);
with every landmark off the steps are not even computed. The explorer still computes and shows
the steps from a proposal on request (that is not gated), and applies them only when told to.

:func:`gate_off` turns every landmark off (a model without held-out images to fit a gate on:
the shipped default, trained on all of ISBI Train); :func:`fit_gate` fits one on a labelled
validation set.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import GlimpseError
from .inference import GlimpseModel
from .io import Dataset
from .metrics import radial_errors


def gate_off(model: GlimpseModel, reason: str) -> dict:
    """Keep every landmark at the 0-step answer; returns (and stores) the gate."""
    gate = {"apply": [False] * model.config.n_landmarks, "reason": reason}
    model.meta["glimpse_gate"] = gate
    return gate


def _errors(model: GlimpseModel, ds: Dataset, steps: int, ground_truth: str) -> np.ndarray:
    """``(T + 1, N, K)`` errors (mm) after 0 .. ``steps`` ungated glimpse steps from the coarse/fine answer."""
    saved = model.meta.pop("glimpse_gate", None)
    try:
        pos = [model.predict(ds.image(i), iterations=steps, spacing=ds.pixel_spacing).positions
               for i in range(len(ds))]
    finally:
        if saved is not None:
            model.meta["glimpse_gate"] = saved
    truth = ds.ground_truth(ground_truth)
    return np.stack([radial_errors(p, np.broadcast_to(truth[i], p.shape), ds.pixel_spacing)
                     for i, p in enumerate(pos)], axis=1)


def fit_gate(model: GlimpseModel, val: Dataset, steps: Sequence[int] = (1, 2, 3), margin_mm: float = 0.0,
             ground_truth: str = "mean", errors: np.ndarray | None = None) -> dict:
    """Fit the gate on the labelled validation set ``val`` (images the model was not trained on).

    A landmark's steps are applied when, for every step count in ``steps``, its validation MRE
    after them is below its 0-step MRE by more than ``margin_mm`` (so asking for any of those step
    counts never makes it worse on validation). ``errors``: ``(T + 1, N, K)`` errors in mm after
    0 .. T steps (computed with the model when not given: tests). Stores the gate in
    ``model.meta['glimpse_gate']`` with the per-landmark MRE and returns it."""
    if model.coarse is None:
        raise GlimpseError("the gate is for glimpse steps after a coarse stage; this model has none")
    if errors is None:
        errors = _errors(model, val, max(steps), ground_truth)
    mre = np.nanmean(errors, axis=1)  # (T + 1, K)
    gain = mre[0][None] - mre[list(steps)]  # (S, K): > 0 where the steps help
    apply = (gain > margin_mm).all(axis=0)
    gate = {"apply": [bool(a) for a in apply], "reason": f"fitted on {errors.shape[1]} validation images",
            "steps": [int(s) for s in steps], "margin_mm": float(margin_mm),
            "mre_mm": {int(t): [float(v) for v in mre[t]] for t in [0, *steps]},
            "images": [p.name for p in val.image_paths]}
    model.meta["glimpse_gate"] = gate
    return gate


def gate_note(traj) -> str:
    """One short line for the widgets when the gate kept glimpse steps off ``traj``'s answer ("" otherwise)."""
    off = getattr(traj, "steps_gated", None)
    if off is None or not np.any(off):
        return ""
    if np.all(off):
        return "glimpse steps off: the model's gate keeps its 0-step answer (no validation showed they help)"
    return (f"glimpse steps applied to {int((~off).sum())} of {len(off)} landmarks (the model's gate: only "
            f"where validation showed they help)")
