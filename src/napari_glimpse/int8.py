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
:class:`napari_glimpse.runtime.NetRuntime`), and the float nets otherwise: on CUDA, with
``int8=False``, or once the net's weights have changed (fine-tuning), since a graph holds the
weights it was made from.

Making graphs (:func:`quantize`) needs the ``onnx`` package (``pip install
napari-glimpse[quantize]``) and imports ``torch.onnx``; running them needs only ``onnxruntime``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import checkpoint_graphs, pack  # noqa: F401  re-exported where they used to live
from .errors import GlimpseError
from .runtime import (  # noqa: F401  the runtime half, re-exported where it used to live
    INPUT,
    Int8Net,
    attach_graphs,
    available,
    fused_copy,
    graphs_of,
    members_of,
    set_enabled,
    status,
    weights_key,
)

if TYPE_CHECKING:
    from .inference import GlimpseModel



# ------------------------------------------------------------------------------ making graphs
def record_inputs(model: "GlimpseModel", images: Sequence, progress: Callable[[int], None] | None
                  ) -> dict[int, list[np.ndarray]]:
    """The inputs every coarse and fine net sees when the float model reads ``images`` (its
    coarse and fine answer, left-facing images mirrored first as ``predict`` does)."""
    rts = [rt for r in model.runtimes.values() for rt in r]
    seen: dict[int, list[np.ndarray]] = {id(rt.net): [] for rt in rts}
    hooks = []
    for rt in rts:
        fused = rt.backend(int8=False)
        hooks.append(fused.register_forward_pre_hook(
            lambda mod, args, key=id(rt.net): seen[key].append(args[0].detach().cpu().float().contiguous().numpy())))
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
    fused = fused_copy(net).cpu().to(memory_format=torch.contiguous_format)
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
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
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
    by_stage = model.runtimes
    if missing := [name for name in which if name not in by_stage]:
        raise GlimpseError(f"this model has no {' or '.join(missing)} stage to quantize")
    _require_tools()
    rts = [rt for r in by_stage.values() for rt in r]
    chosen = [rt for name, r in by_stage.items() if name in which for rt in r]
    was = [(q.enabled if (q := rt.graph()) is not None else None) for rt in rts]
    try:
        set_enabled(model, False)  # calibrate on the float nets' inputs
        seen = record_inputs(model, images, None if progress is None else lambda i: progress("images", i, len(images)))
        graphs = []
        for i, rt in enumerate(chosen):
            graphs.append(quantize_net(rt.net, seen[id(rt.net)], float_ends))
            if progress is not None:
                progress("nets", i + 1, len(chosen))
    except BaseException:
        for rt, e in zip(rts, was):  # as it was: graphs that still match, used as before
            if e is not None and (q := rt.graph()) is not None:
                q.enabled = e
        raise
    for rt in rts:  # all chosen nets or none; the others run float
        rt.int8 = None
    for rt, g in zip(chosen, graphs):
        rt.give_graph(g)
    model.meta["int8"] = {"stages": sorted(which), "float_ends": bool(float_ends), "calibration_images": len(images)}
    return len(chosen)
