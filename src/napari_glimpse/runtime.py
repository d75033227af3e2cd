"""How a net runs at inference: the runtime backends a stage holds for each of its nets.

Two backends: :class:`TorchBackend`, a float copy of the net with every convolution + batch-norm
pair folded into one convolution (made on first use and again whenever the weights change), and
:class:`Int8Backend`, the net's int8 ONNX graph run by ONNX Runtime (made by
:func:`napari_glimpse.int8.quantize`, carried in the model file). A :class:`NetRuntime` holds one
net's backends and picks one per call: the int8 graph when it is usable (enabled, on the CPU,
ONNX Runtime installed, and made from the net's current weights: :func:`weights_key`; fine-tuned
weights fall back to the float copy), else the float copy; in training mode the net itself.
The coarse and fine stages (:mod:`napari_glimpse.stages`) hold a runtime per net; nothing is
stored on the nets themselves.
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
    "INPUT", "available", "weights_key", "TorchBackend", "Int8Backend", "Int8Net", "NetRuntime", "fused_copy",
    "members_of", "runtimes_of", "graphs_of", "attach_graphs", "set_enabled",
    "status",
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


class Int8Backend:
    """One net's int8 ONNX graph, called like the net: ``(B, C, H, W)`` float tensor in, logits
    out (CPU, inference only). ``key``: the :func:`weights_key` of the float net it was made from
    or loaded beside; ``enabled``: whether inference uses it."""

    kind = "onnx-int8"

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


Int8Net = Int8Backend  # the name it had


def fused_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (eval mode) with every convolution + batch-norm pair folded into one
    convolution (the same answers to float rounding, one pass fewer over each layer's
    activations) and its weights in channels-last layout like the activations (so no
    convolution re-lays its input out first)."""
    fused = copy.deepcopy(net).eval()
    for mod in fused.modules():
        if isinstance(mod, nn.Sequential):
            for a in range(len(mod) - 1):
                if isinstance(mod[a], nn.Conv2d) and isinstance(mod[a + 1], nn.BatchNorm2d):
                    mod[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(mod[a], mod[a + 1])
                    mod[a + 1] = nn.Identity()
    return fused.to(memory_format=torch.channels_last)


class TorchBackend:
    """A net's float inference: :func:`fused_copy` of it, made on first use and again whenever
    its weights change (training steps, loading weights, moving the net)."""

    kind = "torch"

    def __init__(self, net: nn.Module):
        self.net = net
        self._copy: tuple[tuple, nn.Module] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_copy": None}  # a copy of the runtime makes its own

    def module(self, key: tuple | None = None) -> nn.Module:
        key = weights_key(self.net) if key is None else key
        if self._copy is None or self._copy[0] != key:
            self._copy = (key, fused_copy(self.net))
        return self._copy[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module()(x)


class NetRuntime:
    """How one net of a stage runs: its :class:`Int8Backend` (``int8``) when usable, else its
    :class:`TorchBackend`; the net itself in training mode."""

    def __init__(self, net: nn.Module, int8: Int8Backend | None = None):
        self.net = net
        self.torch = TorchBackend(net)
        self.int8 = int8

    def give_graph(self, graph: bytes, enabled: bool = True) -> None:
        """An int8 graph made from the net's current weights (in its final place and device)."""
        self.int8 = Int8Backend(graph, weights_key(self.net), enabled)

    def graph(self, key: tuple | None = None) -> Int8Backend | None:
        """The int8 backend if it still matches the net's weights (``key``: their :func:`weights_key`,
        if known), else ``None`` (and a graph that no longer does is dropped)."""
        if self.int8 is not None and self.int8.key != (weights_key(self.net) if key is None else key):
            self.int8 = None
        return self.int8

    def usable(self, key: tuple | None = None) -> Int8Backend | None:
        """The int8 backend inference runs (in eval mode): matching the weights, enabled, the net
        on the CPU and ONNX Runtime installed; else ``None``."""
        q = self.graph(key)
        if q is None or not q.enabled or next(self.net.parameters()).device.type != "cpu" or not available():
            return None
        return q

    def backend(self, int8: bool = True) -> "nn.Module | Callable[[torch.Tensor], torch.Tensor]":
        """What runs the net now (see the class)."""
        if self.net.training:
            return self.net
        key = weights_key(self.net)
        if int8 and (q := self.usable(key)) is not None:
            return q
        return self.torch.module(key)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend()(x)


def runtimes_of(net: nn.Module) -> list[NetRuntime]:
    """Fresh runtimes (no int8 graph) for a net's members: how a net runs outside a model's stages."""
    return [NetRuntime(m) for m in members_of(net)]


# ------------------------------------------------------------------------------ a model's nets
def graphs_of(model: "GlimpseModel") -> dict[str, list[torch.Tensor | None]] | None:
    """The model's int8 graphs that still match their nets' weights, for the checkpoint: ONNX
    bytes as uint8 tensors (pickled ``bytes`` would grow by half), ``None`` for a net without
    one; ``None`` if no net has one."""
    out = {name: [(torch.frombuffer(bytearray(q.graph), dtype=torch.uint8) if (q := rt.graph()) is not None
                   else None) for rt in rts]
           for name, rts in model.runtimes.items()}
    return out if any(g is not None for gs in out.values() for g in gs) else None


def attach_graphs(model: "GlimpseModel", graphs: dict | None, enabled: bool, source: str = "checkpoint") -> None:
    """Give the model's stages a checkpoint's ``int8`` entry (just loaded: the nets' weights are
    the ones the graphs were made from)."""
    if not graphs:
        return
    rts = model.runtimes
    for name, gs in graphs.items():
        if name not in rts or len(gs) != len(rts[name]):
            raise GlimpseError(f"{source}: its int8 graphs do not match the {name} stage's nets")
        for rt, g in zip(rts[name], gs):
            if g is not None:
                rt.give_graph(g.numpy().tobytes() if isinstance(g, torch.Tensor) else bytes(g), enabled)


def set_enabled(model: "GlimpseModel", enabled: bool) -> None:
    """Use (or not) the model's int8 graphs (see :func:`status` for how many run)."""
    for rts in model.runtimes.values():
        for rt in rts:
            if (q := rt.graph()) is not None:
                q.enabled = enabled


def status(model: "GlimpseModel") -> tuple[int, int]:
    """(nets whose int8 graph inference uses now, coarse and fine nets)."""
    rts = [rt for r in model.runtimes.values() for rt in r]
    return sum(1 for rt in rts if rt.usable()), len(rts)
