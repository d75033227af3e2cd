"""How a net runs at inference: its int8 graph (ONNX Runtime) when it has a usable one, else a
fused float copy.

The runtime backends of the coarse and fine nets. A net's int8 graph (made by
:func:`napari_glimpse.int8.quantize`) travels in the model file; here it is attached to the net
(:func:`attach`), checked against the net's current weights (:func:`weights_key`: a graph holds
the weights it was made from, so fine-tuned weights fall back to the float net) and run
(:class:`Int8Net`). :func:`inference_net` is what every stage calls to run a net.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .errors import GlimpseError

if TYPE_CHECKING:
    from .inference import GlimpseModel

__all__ = [
    "INPUT", "available", "weights_key", "Int8Net", "attached", "attach", "stages", "graphs_of", "attach_graphs",
    "set_enabled", "status", "usable", "members_of", "inference_net",
]


def members_of(net: nn.Module) -> list:
    """The nets of an ensemble (a module with a ``members`` ModuleList), or ``[net]``."""
    members = getattr(net, "members", None)
    return list(members) if isinstance(members, nn.ModuleList) else [net]


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


def inference_net(net: nn.Module, int8: bool = True) -> "nn.Module | Callable[[torch.Tensor], torch.Tensor]":
    """``net`` as used for inference: in eval mode, its int8 graph when it has a usable one
    (``int8``; see :func:`usable`), else a copy with every convolution + batch-norm
    pair folded into one convolution (the same answers to float rounding, one pass fewer over
    each layer's activations) and its weights in channels-last layout like the activations (so
    no convolution re-lays its input out first). The copy is
    made on first use and again whenever the weights change (training steps, loading weights,
    moving the net); in training mode, ``net`` itself."""
    if net.training:
        return net
    key = weights_key(net)
    if int8 and (q := usable(net, key)) is not None:
        return q
    cached = net.__dict__.pop("_inference_copy", None)  # (not copied along)
    if cached is None or cached[0] != key:
        fused = copy.deepcopy(net)
        for mod in fused.modules():
            if isinstance(mod, nn.Sequential):
                for a in range(len(mod) - 1):
                    if isinstance(mod[a], nn.Conv2d) and isinstance(mod[a + 1], nn.BatchNorm2d):
                        mod[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(mod[a], mod[a + 1])
                        mod[a + 1] = nn.Identity()
        fused.to(memory_format=torch.channels_last)
        cached = (key, fused)
    net.__dict__["_inference_copy"] = cached  # a plain attribute: not a submodule, not in state_dict
    return cached[1]
