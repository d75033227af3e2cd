"""Int8 inference: the coarse and fine nets as statically quantized ONNX graphs, run by ONNX Runtime.

On CPUs the convolutions are most of the inference time, and int8 convolutions run faster than
float32 ones (on this project's AVX2 hosts, 1.7-1.8x for these nets). :func:`quantize` turns
every coarse and fine net of a :class:`~napari_glimpse.inference.GlimpseModel` into an int8
graph: batch norm folded into the convolutions, exported to ONNX, weights quantized per channel
to 7-bit integers (``reduce_range``: AVX2's 8-bit products of uint8 and int8 saturate in pairs,
which moved the coarse net's logits by up to their whole range with full 8-bit weights) and
activations to uint8 with ranges calibrated (min-max) on the inputs each net sees when the float
model runs on a few images. The graphs are saved in the model file beside the
float weights; a loaded model runs them on the CPU when ONNX Runtime is installed (see
:func:`napari_glimpse.coarse.inference_net`), and the float nets otherwise: on CUDA, with
``int8=False``, or once the net's weights have changed (fine-tuning), since a graph holds the
weights it was made from.

Making graphs (:func:`quantize`) needs the ``onnx`` package (``pip install
napari-glimpse[quantize]``) and imports ``torch.onnx``; running them needs only ``onnxruntime``.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import GlimpseError

if TYPE_CHECKING:
    from .inference import GlimpseModel

INPUT = "x"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether ONNX Runtime can be imported (int8 graphs run only then)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def weights_key(net: nn.Module) -> tuple:
    """Identifies ``net``'s weights as they are now: changes when any parameter or buffer is
    replaced or modified in place (training steps, ``load_state_dict``, moving the net). Writes
    through ``param.data`` bypass torch's version counter and are not seen (nothing here does
    that; call :func:`quantize` again after such surgery).

    Walks the modules' own tables rather than ``parameters()``'s generators: 0.17 against 0.44 ms
    for a fine net, and it runs for every net of every prediction."""
    out = []
    todo = [net]
    while todo:
        mod = todo.pop()
        for tensors in (mod._parameters, mod._buffers):
            out.extend((t.data_ptr(), t._version) for t in tensors.values() if t is not None)
        todo.extend(m for m in mod._modules.values() if m is not None)
    return tuple(out)


class Int8Net:
    """One net's int8 ONNX graph, called like the net: ``(B, C, H, W)`` float tensor in, logits
    out (CPU, inference only). ``key``: the :func:`weights_key` of the float net it was made from
    or loaded beside; ``enabled``: whether inference uses it."""

    def __init__(self, graph: bytes, key: tuple, enabled: bool = True):
        self.graph = bytes(graph)
        self.key = key
        self.enabled = enabled
        self._session = None
        self._threads = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None  # made again on first use
        return state

    def session(self):
        """The ONNX Runtime session, made on first use and again when torch's thread count changes
        (it runs with as many threads as torch would)."""
        threads = torch.get_num_threads()
        if self._session is None or self._threads != threads:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # no busy-waiting between runs: torch works on the same cores in between
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(self.graph, so, providers=["CPUExecutionProvider"])
            self._threads = threads
        return self._session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session().run(None, {INPUT: x.numpy()})[0])


def attached(net: nn.Module, key: tuple | None = None) -> Int8Net | None:
    """``net``'s int8 graph if it still matches its weights (``key``: their :func:`weights_key`,
    if known), else ``None`` (and a graph that no longer does is dropped)."""
    q = net.__dict__.get("_int8")
    if q is None:
        return None
    if q.key != (weights_key(net) if key is None else key):
        net.__dict__.pop("_int8", None)
        return None
    return q


def attach(net: nn.Module, graph: bytes, enabled: bool = True) -> None:
    """Give ``net`` (in its final place and device) an int8 graph made from its current weights."""
    net.__dict__["_int8"] = Int8Net(graph, weights_key(net), enabled)


def stages(model: "GlimpseModel") -> dict[str, list[nn.Module]]:
    """The model's coarse and fine nets, by stage (the checkpoint's ``int8`` entry's layout)."""
    from .coarse import members_of

    return {name: members_of(stage) for name, stage in (("coarse", model.coarse), ("fine", model.fine))
            if stage is not None}


def graphs_of(model: "GlimpseModel") -> dict[str, list[torch.Tensor | None]] | None:
    """The model's int8 graphs that still match their nets' weights, for the checkpoint: ONNX
    bytes as uint8 tensors (pickled ``bytes`` would grow by half), ``None`` for a net without
    one; ``None`` if no net has one."""
    out = {name: [(torch.frombuffer(bytearray(q.graph), dtype=torch.uint8) if (q := attached(n)) is not None
                   else None) for n in nets]
           for name, nets in stages(model).items()}
    return out if any(g is not None for gs in out.values() for g in gs) else None


def _each_graph(graphs: dict, f: Callable[[bytes], bytes]) -> dict[str, list[torch.Tensor | None]]:
    """``graphs`` (stage -> uint8 tensors or None) with ``f`` applied to each graph's bytes."""
    return {name: [None if g is None else torch.frombuffer(bytearray(f(g.numpy().tobytes())), dtype=torch.uint8)
                   for g in gs] for name, gs in graphs.items()}


def pack(graphs: dict[str, list[torch.Tensor | None]]) -> dict[str, list[torch.Tensor | None]]:
    """:func:`graphs_of`'s graphs compressed for the checkpoint (zlib; about a quarter smaller:
    the int8 weights are mostly small numbers), stored under ``int8_zlib``."""
    return _each_graph(graphs, lambda b: zlib.compress(b, 9))


def checkpoint_graphs(ckpt: dict, source: str = "checkpoint") -> dict[str, list[torch.Tensor | None]] | None:
    """The int8 graphs a checkpoint holds, as :func:`graphs_of` gives them: from ``int8_zlib``
    (compressed: files written since version 0.1.0's four-net default), or ``int8`` (files written before; readers older
    than ``int8_zlib`` do not know it and run the float nets)."""
    if ckpt.get("int8_zlib") is None:
        return ckpt.get("int8")
    try:
        return _each_graph(ckpt["int8_zlib"], zlib.decompress)
    except zlib.error as exc:
        raise GlimpseError(f"{source}: the checkpoint's int8 graphs are damaged ({exc})") from None


def attach_graphs(model: "GlimpseModel", graphs: dict | None, enabled: bool, source: str = "checkpoint") -> None:
    """Attach a checkpoint's ``int8`` entry to the model's nets (just loaded: their weights are
    the ones the graphs were made from)."""
    if not graphs:
        return
    nets = stages(model)
    for name, gs in graphs.items():
        if name not in nets or len(gs) != len(nets[name]):
            raise GlimpseError(f"{source}: its int8 graphs do not match the {name} stage's nets")
        for net, g in zip(nets[name], gs):
            if g is not None:
                attach(net, g.numpy().tobytes() if isinstance(g, torch.Tensor) else bytes(g), enabled)


def set_enabled(model: "GlimpseModel", enabled: bool) -> None:
    """Use (or not) the model's int8 graphs (see :func:`status` for how many run)."""
    for nets in stages(model).values():
        for net in nets:
            if (q := attached(net)) is not None:
                q.enabled = enabled


def status(model: "GlimpseModel") -> tuple[int, int]:
    """(nets whose int8 graph inference uses now, coarse and fine nets)."""
    nets = [n for ns in stages(model).values() for n in ns]
    return sum(1 for n in nets if usable(n)), len(nets)


def usable(net: nn.Module, key: tuple | None = None) -> Int8Net | None:
    """The int8 graph inference runs for ``net`` (in eval mode): attached, matching its weights,
    enabled, the net on the CPU and ONNX Runtime installed; else ``None``."""
    q = attached(net, key)
    if q is None or not q.enabled or next(net.parameters()).device.type != "cpu" or not available():
        return None
    return q


# ------------------------------------------------------------------------------ making graphs
def record_inputs(model: "GlimpseModel", images: Sequence, progress: Callable[[int], None] | None
                  ) -> dict[int, list[np.ndarray]]:
    """The inputs every coarse and fine net sees when the float model reads ``images`` (its
    coarse and fine answer, left-facing images mirrored first as ``predict`` does)."""
    from .coarse import inference_net

    nets = [n for ns in stages(model).values() for n in ns]
    seen: dict[int, list[np.ndarray]] = {id(n): [] for n in nets}
    hooks = []
    for n in nets:
        fused = inference_net(n, int8=False)
        hooks.append(fused.register_forward_pre_hook(
            lambda mod, args, key=id(n): seen[key].append(args[0].detach().cpu().float().contiguous().numpy())))
    try:
        for i, im in enumerate(images):
            model.predict(im, iterations=0)
            if progress is not None:
                progress(i + 1)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _export(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    from .coarse import inference_net

    fused = copy.deepcopy(inference_net(net, int8=False)).cpu().to(memory_format=torch.contiguous_format)
    from torch.onnx import export  # the TorchScript exporter (dynamo=False)

    with warnings.catch_warnings():  # torch announces the exporter's retirement on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        export(fused, (example,), str(path), dynamo=False, opset_version=17, input_names=[INPUT],
               output_names=["logits"], dynamic_axes={INPUT: {0: "batch"}, "logits": {0: "batch"}})


def _require_tools() -> None:
    """A clear error unless the packages that make graphs are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError as exc:
        raise GlimpseError(f"making int8 graphs needs onnx and onnxruntime ({exc.name} is missing): "
                           "pip install 'napari-glimpse[quantize]'") from None


def quantize_net(net: nn.Module, inputs: Sequence[np.ndarray], float_ends: bool = False) -> bytes:
    """``net``'s int8 graph (ONNX bytes), activation ranges calibrated on ``inputs`` (arrays of
    the shape the net reads, any batch size). ``float_ends``: the first and the last convolution
    stay float (the input is read and the logits are written without 8-bit steps)."""
    _require_tools()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not inputs:
        raise GlimpseError("no calibration inputs")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(inputs)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {INPUT: x}

    with tempfile.TemporaryDirectory(prefix="napari-glimpse-int8-") as tmp:
        t = Path(tmp)
        _export(net, torch.from_numpy(inputs[0]), t / "float.onnx")
        quant_pre_process(str(t / "float.onnx"), str(t / "pre.onnx"), skip_symbolic_shape=True)
        exclude = []
        if float_ends:
            import onnx

            convs = [n.name for n in onnx.load(str(t / "pre.onnx")).graph.node if n.op_type == "Conv"]
            exclude = sorted({convs[0], convs[-1]})
        quantize_static(str(t / "pre.onnx"), str(t / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=True, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)
        return (t / "int8.onnx").read_bytes()


def quantize(model: "GlimpseModel", images: Sequence, progress: Callable[[str, int, int], None] | None = None,
             which: Sequence[str] = ("coarse", "fine"), float_ends: bool = False) -> int:
    """Make and attach int8 graphs for the coarse and fine nets of ``model`` (on the CPU; the
    stages ``which``), calibrated on ``images`` (arrays, paths or pyramids; 10 or so is enough).
    Returns the number of nets quantized; save the model to keep them. Every chosen net gets its
    graph or, on any error, none does (the model's graphs stay as they were).

    ``which``: the stages whose nets get graphs (``"coarse"``, ``"fine"`` or both); the other
    stage's nets lose theirs and run float. ``float_ends``: see :func:`quantize_net`. Both are
    recorded in ``model.meta["int8"]`` (``finetune`` makes the graphs again alike).
    ``progress(what, done, total)`` is called as images are read and nets quantized."""
    if model.coarse is None:
        raise GlimpseError("int8 graphs are made for the coarse and fine stages; this model has none")
    if model.device.type != "cpu":
        raise GlimpseError("quantize a model loaded on the CPU (device='cpu')")
    if not images:
        raise GlimpseError("quantizing needs calibration images")
    which = (which,) if isinstance(which, str) else tuple(which)
    unknown = set(which) - {"coarse", "fine"}
    if unknown or not which:
        raise GlimpseError(f"stages to quantize: coarse and/or fine, not {sorted(unknown) or 'none'}")
    by_stage = stages(model)
    if missing := [name for name in which if name not in by_stage]:
        raise GlimpseError(f"this model has no {' or '.join(missing)} stage to quantize")
    _require_tools()
    nets = [n for ns in by_stage.values() for n in ns]
    chosen = [n for name, ns in by_stage.items() if name in which for n in ns]
    was = [(q.enabled if (q := attached(n)) is not None else None) for n in nets]
    try:
        set_enabled(model, False)  # calibrate on the float nets' inputs
        seen = record_inputs(model, images, None if progress is None else lambda i: progress("images", i, len(images)))
        graphs = []
        for i, n in enumerate(chosen):
            graphs.append(quantize_net(n, seen[id(n)], float_ends))
            if progress is not None:
                progress("nets", i + 1, len(chosen))
    except BaseException:
        for n, e in zip(nets, was):  # as it was: graphs that still match, used as before
            if e is not None and (q := attached(n)) is not None:
                q.enabled = e
        raise
    for n in nets:  # all chosen nets or none; the others run float
        n.__dict__.pop("_int8", None)
    for n, g in zip(chosen, graphs):
        attach(n, g)
    model.meta["int8"] = {"stages": sorted(which), "float_ends": bool(float_ends), "calibration_images": len(images)}
    return len(chosen)
