"""Checkpoints: one file with format version, configs, landmark names, spacing, start
positions and weights, loaded with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ._files import make_temp
from .errors import GlimpseError

# 2: optional coarse stage; 3: coarse ensemble; 4: fine stage; 5: fine ensemble;
# files are written at the lowest version that holds them
FORMAT_VERSION = 5
KIND = "napari-glimpse-model"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``. A model
    checkpoint with NaN or infinite weights is refused (:func:`nonfinite_tensor`); the temporary
    file has the umask's permissions, and stale ones of killed writers are removed first."""
    path = Path(path)
    if isinstance(obj, dict) and obj.get("kind") == KIND and (bad := nonfinite_tensor(obj)) is not None:
        raise GlimpseError(f"refusing to write {path}: {bad} holds NaN or infinite values")
    fd, tmp = make_temp(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def nonfinite_tensor(obj: Any, name: str = "") -> str | None:
    """The name of the first floating-point tensor in a checkpoint (nested dicts and lists; its
    resume state aside) holding a NaN or an infinity, else ``None``."""
    if isinstance(obj, torch.Tensor):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return (name or "a tensor") if bad else None
    if isinstance(obj, dict):
        items = ((k, v) for k, v in obj.items() if k != "train_state")
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        if (bad := nonfinite_tensor(v, f"{name}.{k}" if name else str(k))) is not None:
            return bad
    return None


def halve_weights(ckpt: dict) -> dict:
    """A copy of ``ckpt`` with its floating tensors of 2 or more dimensions (the convolution and
    linear weights, and the glimpse net's (K, 2) output bias) stored as float16: about half the
    file. One-dimensional ones (biases, batch-norm statistics) stay as they are. Reading puts
    them back into the float32 networks (``load_state_dict`` casts), so every reader, old or new,
    reads the file; the answers move by float16's rounding of the weights (a relative 2**-11),
    which ``benchmarks/isbi.py --half-weights`` measures. A weight beyond float16's range
    (65504) is an error rather than an infinity."""

    def half(sd: dict) -> dict:
        out = {}
        for k, v in sd.items():
            if v.is_floating_point() and v.dim() >= 2:
                h = v.to(torch.float16)
                if not torch.isfinite(h).all() and torch.isfinite(v).all():
                    raise GlimpseError(f"{k}: weights beyond float16's range; save them as float32")
                v = h
            out[k] = v
        return out

    out = dict(ckpt)
    for key in ("state_dict", "coarse_state_dict"):
        if out.get(key) is not None:
            out[key] = half(out[key])
    if out.get("fine") is not None:
        out["fine"] = {**out["fine"], "state_dict": half(out["fine"]["state_dict"])}
    for key in ("coarse_members", "fine_members"):
        if out.get(key) is not None:
            out[key] = [{**m, "state_dict": half(m["state_dict"])} for m in out[key]]
    out["weights_stored_as"] = "float16"
    return out


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint file; clear :class:`GlimpseError` on anything wrong."""
    path = Path(path)
    if not path.exists():
        raise GlimpseError(f"model file not found: {path}")
    if path.is_dir():
        raise GlimpseError(f"expected a model file, got a folder: {path}")
    try:
        # TorchVersion (a str subclass) sits in the metadata of files written by older trainings
        # torch's UserWarnings (pickle protocol, ...) would precede the one error line
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors vary by version
        raise GlimpseError(
            f"{path} is not a napari-glimpse model checkpoint ({exc.__class__.__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise GlimpseError(f"{path} is not a napari-glimpse model checkpoint")
    version = ckpt.get("format_version")
    if not isinstance(version, int):
        raise GlimpseError(f"{path}: checkpoint has no format version")
    if version > FORMAT_VERSION:
        raise GlimpseError(
            f"{path} was written by a newer napari-glimpse (checkpoint format {version}, this "
            f"version reads up to {FORMAT_VERSION}); upgrade napari-glimpse"
        )
    for key in ("model_config", "landmark_names", "pixel_spacing", "mean_start", "state_dict"):
        if key not in ckpt:
            raise GlimpseError(f"{path}: checkpoint lacks {key!r}")
    if (bad := nonfinite_tensor(ckpt)) is not None:
        raise GlimpseError(f"{path}: {bad} holds NaN or infinite values (a training that diverged?); "
                           f"the model cannot be used")
    return ckpt
