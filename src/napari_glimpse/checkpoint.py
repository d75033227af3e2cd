"""Checkpoints: the model file's format, every version this package reads, and the one place
that writes and reads it (:func:`to_checkpoint`, :func:`save`, :func:`read_checkpoint`,
:func:`from_checkpoint`; :class:`~napari_glimpse.inference.GlimpseModel`'s ``save``, ``load``,
``to_checkpoint`` and ``from_checkpoint`` call these).

A model file is one ``torch.save`` dict, read with ``torch.load(weights_only=True)``:

- ``kind``: ``"napari-glimpse-model"``; ``format_version``: the lowest version that holds the
  file (older readers refuse what they could not read; this one reads up to :data:`FORMAT_VERSION`):
  1 the glimpse net alone; 2 a coarse net; 3 a coarse ensemble; 4 a fine net; 5 a fine ensemble
  (the highest that applies: a coarse ensemble and one fine net is 4).
- ``model_config`` (the glimpse net's :class:`~napari_glimpse.model.ModelConfig` as a dict) and
  ``state_dict`` (its weights): always there, even where the answer does not use the glimpse net.
- ``train_config`` (dict), ``landmark_names`` (K names), ``pixel_spacing`` (mm per pixel),
  ``mean_start`` and ``std_start`` ((K, 2) float64 tensors, pixels; ``std_start`` may be absent:
  zeros), ``meta`` (dict: inference settings, ``landmark_set``, ``recipe``, ``confidence``, ...).
- The coarse stage (optional): ``coarse_members``, a list of ``{"config", "state_dict"}`` (an
  ensemble, version 3), or (version 2, one net) ``coarse_config`` and ``coarse_state_dict``.
- The fine stage (optional): ``fine_members``, a list of ``{"config", "state_dict"}`` (an
  ensemble, version 5), or (version 4, one net) ``fine``, one ``{"config", "state_dict"}``.
- The int8 graphs (optional; readers that do not know the key run the float nets): ``int8_zlib``,
  ``{"coarse": [...], "fine": [...]}``, one zlib-compressed ONNX graph per net as a uint8 tensor
  (``None`` for a net without one); files written before it carry ``int8``, the same uncompressed.
- ``weights_stored_as``: ``"float16"`` when the weights of 2 or more dimensions are stored as
  float16 (:func:`halve_weights`); absent: as the nets hold them (float32).
- ``train_state`` (a training's resume point only: optimizer, step, elapsed time, RNG, history).
"""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ._files import make_temp
from .coarse import CoarseConfig, CoarseEnsemble, CoarseNet
from .devices import resolve_device
from .errors import GlimpseError
from .fine import FineConfig, FineEnsemble, FineNet
from .model import GlimpseModelNet, ModelConfig
from .runtime import attach_graphs, graphs_of

if TYPE_CHECKING:
    from .inference import GlimpseModel

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
    reads the file; the answers move by float16's rounding of the weights (a relative 2**-11;
    measured for the shipped file on validation: ``half_weights_check`` in
    ``benchmarks/results/default_model_assembly.json``). A weight beyond float16's range
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


# ------------------------------------------------------------------------------ the int8 graphs
def _each_graph(graphs: dict, f: Callable[[bytes], bytes]) -> dict[str, list[torch.Tensor | None]]:
    """``graphs`` (stage -> uint8 tensors or None) with ``f`` applied to each graph's bytes."""
    return {name: [None if g is None else torch.frombuffer(bytearray(f(g.numpy().tobytes())), dtype=torch.uint8)
                   for g in gs] for name, gs in graphs.items()}


def pack(graphs: dict[str, list[torch.Tensor | None]]) -> dict[str, list[torch.Tensor | None]]:
    """:func:`~napari_glimpse.runtime.graphs_of`'s graphs compressed for the checkpoint (zlib;
    about a quarter smaller: the int8 weights are mostly small numbers), stored under ``int8_zlib``."""
    return _each_graph(graphs, lambda b: zlib.compress(b, 9))


def checkpoint_graphs(ckpt: dict, source: str = "checkpoint") -> dict[str, list[torch.Tensor | None]] | None:
    """The int8 graphs a checkpoint holds, as :func:`~napari_glimpse.runtime.graphs_of` gives them:
    from ``int8_zlib`` (compressed: files written since version 0.1.0's four-net default), or
    ``int8`` (files written before; readers older than ``int8_zlib`` do not know it and run the
    float nets)."""
    if ckpt.get("int8_zlib") is None:
        return ckpt.get("int8")
    try:
        return _each_graph(ckpt["int8_zlib"], zlib.decompress)
    except zlib.error as exc:
        raise GlimpseError(f"{source}: the checkpoint's int8 graphs are damaged ({exc})") from None


# ------------------------------------------------------------------------------ writing
def cpu_state(module: torch.nn.Module) -> dict:
    """A net's weights as a checkpoint holds them (detached, on the CPU)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def member_states(ensemble: torch.nn.Module) -> list[dict]:
    """An ensemble's nets as checkpoint entries (config and weights each)."""
    return [{"config": m.cfg.to_dict(), "state_dict": cpu_state(m)} for m in ensemble.members]


def _coarse_entries(coarse: "CoarseNet | CoarseEnsemble | None") -> dict:
    if coarse is None:
        return {}
    if isinstance(coarse, CoarseEnsemble):
        return {
            "format_version": 3,  # readers before version 3 would not see the ensemble
            "coarse_members": member_states(coarse),
        }
    return {
        "format_version": 2,  # readers before version 2 would ignore the coarse stage
        "coarse_config": coarse.cfg.to_dict(),
        "coarse_state_dict": cpu_state(coarse),
    }


def _fine_entries(fine: "FineNet | FineEnsemble | None") -> dict:
    if fine is None:
        return {}
    if isinstance(fine, FineEnsemble):
        # readers before version 5 would not see the ensemble
        return {"format_version": 5, "fine_members": member_states(fine)}
    # readers before version 4 would ignore the fine stage
    return {"format_version": 4, "fine": {"config": fine.cfg.to_dict(), "state_dict": cpu_state(fine)}}


def _int8_entries(model: "GlimpseModel") -> dict:
    graphs = graphs_of(model)
    # an optional entry: readers that do not know it run the float nets
    return {} if graphs is None else {"int8_zlib": pack(graphs)}


def to_checkpoint(model: "GlimpseModel") -> dict:
    """The model as a checkpoint dict (see the module's doc), at the lowest version that holds it."""
    return {
        "kind": KIND,
        "format_version": 1,
        "model_config": model.config.to_dict(),
        "train_config": model.train_config,
        "landmark_names": list(model.landmark_names),
        "pixel_spacing": model.pixel_spacing,
        "mean_start": torch.as_tensor(model.mean_start, dtype=torch.float64),
        "std_start": torch.as_tensor(model.std_start, dtype=torch.float64),
        "meta": {**model.meta, "landmark_set": model.landmark_set.to_dict()},
        "state_dict": cpu_state(model.net),
        **_coarse_entries(model.coarse),
        **_fine_entries(model.fine),
        **_int8_entries(model),
    }


def round_to_half(model: "GlimpseModel") -> None:
    """Round the weights that a float16 file stores as float16 (see :func:`halve_weights`) in
    place, so that the model in memory (and int8 graphs made from it) answers as the file will.
    A tensor already rounded is not written to (a write marks the weights changed, and int8
    graphs are kept only for the weights they were made from)."""
    with torch.no_grad():
        for net in (model.net, model.coarse, model.fine):
            for t in ([] if net is None else net.state_dict().values()):
                if t.is_floating_point() and t.dim() >= 2:
                    h = t.to(torch.float16).to(t.dtype)
                    if not torch.equal(h, t):  # weights already float16's are left untouched: the int8
                        t.copy_(h)             # graphs made from them still match them


def save(model: "GlimpseModel", path: str | os.PathLike, half_weights: bool = False) -> None:
    """Write ``model`` to ``path`` (atomically). ``half_weights``: store the convolution and
    linear weights as float16, about half the file (see :func:`halve_weights`), the model's own
    rounded alike (:func:`round_to_half`: it answers as the file, and int8 graphs made from it
    hold the file's weights)."""
    if half_weights:
        round_to_half(model)
    ckpt = to_checkpoint(model)
    atomic_torch_save(halve_weights(ckpt) if half_weights else ckpt, path)


# ------------------------------------------------------------------------------ reading into nets
_BAD_STAGE = (AttributeError, KeyError, TypeError, ValueError, RuntimeError)


def _stage_error(source: str, stage: str, exc: BaseException) -> GlimpseError:
    """One line for a checkpoint stage that does not load (the tensor at fault, if named)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines()] or [repr(exc)]
    return GlimpseError(f"{source}: bad {stage} stage ({lines[1] if len(lines) > 1 else lines[0]})")


def _load_stage(source: str, stage: str, members: list[dict] | None, ensemble: bool,
                make: Callable[[dict], torch.nn.Module], ensemble_cls: type,
                device: str | torch.device | None) -> torch.nn.Module | None:
    """A coarse or fine stage from its checkpoint entries (``None`` without any): one net, or
    (``ensemble``) an ``ensemble_cls`` of them; a clear error on anything that does not fit."""
    if members is None:
        return None
    try:
        nets = []
        for m in members:
            nets.append(make(m["config"]))
            nets[-1].load_state_dict(m["state_dict"])
        out = ensemble_cls(nets) if ensemble else nets[0]
    except _BAD_STAGE as exc:
        raise _stage_error(source, stage, exc) from None
    return out.eval().to(resolve_device(device))


def _stages(ckpt: dict, device: str | torch.device | None, source: str) -> tuple:
    """The coarse and fine stages of a checkpoint (either ``None`` when it has none), every layout."""
    members = ckpt.get("coarse_members")
    if members is None and ckpt.get("coarse_state_dict") is not None:
        members = [{"config": ckpt.get("coarse_config"), "state_dict": ckpt["coarse_state_dict"]}]
    coarse = _load_stage(source, "coarse", members, "coarse_members" in ckpt,
                         lambda c: CoarseNet(CoarseConfig.from_dict(c)), CoarseEnsemble, device)
    members = ckpt.get("fine_members")
    if members is None and ckpt.get("fine") is not None:
        members = [ckpt["fine"]]
    fine = _load_stage(source, "fine", members, "fine_members" in ckpt,
                       lambda c: FineNet(FineConfig.from_dict(c)), FineEnsemble, device)
    return coarse, fine


def _glimpse_net(ckpt: dict, source: str) -> tuple[GlimpseModelNet, np.ndarray]:
    """The glimpse net with its weights and the ``(K, 2)`` mean start, checked against each other."""
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
        net = GlimpseModelNet(cfg)
    except (TypeError, ValueError) as exc:
        raise GlimpseError(f"{source}: bad model configuration: {exc}") from None
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise GlimpseError(f"{source}: weights do not fit the model configuration ({detail})") from None
    mean_start = np.asarray(ckpt["mean_start"], dtype=np.float64)
    if mean_start.shape != (cfg.n_landmarks, 2) or len(ckpt["landmark_names"]) != cfg.n_landmarks:
        raise GlimpseError(f"{source}: start positions or landmark names do not match {cfg.n_landmarks} landmarks")
    return net, mean_start


def from_checkpoint(cls: "type[GlimpseModel]", ckpt: dict, device: str | torch.device | None = "cpu",
                    source: str = "checkpoint", int8: bool = True) -> "GlimpseModel":
    """A ``cls`` (:class:`~napari_glimpse.inference.GlimpseModel`) from a checkpoint dict of any
    version this package reads (:func:`read_checkpoint` checks the file first), its nets on
    ``device``, with its int8 graphs attached (run if ``int8``); ``source`` names it in errors."""
    net, mean_start = _glimpse_net(ckpt, source)
    coarse, fine = _stages(ckpt, device, source)
    # a fine net reads levels level .. level + context - 1; those below the model's pyramid
    # are made from its last level when read (pyramid.deepen), so any depth loads
    net.eval().to(resolve_device(device))
    model = cls(
        net,
        ckpt["landmark_names"],
        ckpt["pixel_spacing"],
        mean_start,
        ckpt.get("std_start"),
        ckpt.get("train_config"),
        ckpt.get("meta"),
        coarse,
        fine,
    )
    attach_graphs(model, checkpoint_graphs(ckpt, source), int8, source)
    # saving it again keeps the storage (a resume point records the final file's)
    model.half_weights = ckpt.get("weights_stored_as") == "float16" or bool(
        (ckpt.get("train_state") or {}).get("half_weights"))
    return model
