"""Data-parallel training on ``torch.distributed``: the process group and the few collectives
the training loops use.

Under ``torchrun --nproc_per_node N -m napari_glimpse train ...`` every process runs the whole
command. :func:`session` joins the process group that torchrun's environment describes
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on the CPU,
NCCL on CUDA with one GPU per process (``cuda:LOCAL_RANK``). Without torchrun (or with one
process) every function here is a no-op and training runs exactly as before.

How a run is shared (the training loops call these):

- every rank draws the random numbers of the same **global** batch from the same seeded
  generator and makes (augments, computes on) only its own share of the samples (:func:`share`):
  N processes with a batch of B train on the same samples as one process with a batch of B,
  each process making and computing B / N of them;
- the batch norms of the net being trained take their statistics over the whole global batch
  (:func:`synced_batchnorm`), so the N shares together are the one batch;
- after ``backward()``, :func:`average_gradients` averages the gradients over the ranks before
  the optimizer steps (the same weights everywhere: the same start, :func:`broadcast_state`, and
  the same updates); a loss that is a weighted mean divides by :func:`mean_divisor`;
- what depends on the clock (the schedule's progress, a time budget, a stop request) is rank
  0's (:func:`from_main`), so every rank takes the same number of steps;
- rank 0 alone shows progress and writes files (:func:`is_main`); the others wait at the final
  :func:`barrier`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .devices import resolve_device


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, shows progress and writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def init(device: str = "auto") -> str:
    """Join the process group torchrun describes (when launched by it and not yet joined) and
    return the device this process trains on: ``cuda:LOCAL_RANK`` on CUDA, else ``device``."""
    if not launched() or dist.is_initialized():
        return device
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return str(dev)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[str]:
    """:func:`init`, then (yielding the device) run the command; at the end every rank waits at a
    barrier for the others (rank 0 has written its files) and the group is closed. On an error the
    barrier is skipped: torchrun stops the other processes when one fails."""
    joined = launched() and not dist.is_initialized()
    dev = init(device)
    ok = False
    try:
        yield dev
        ok = True
    finally:
        if joined and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch ``x`` (rank r of N: the r-th of N equal blocks); ``x``
    itself in one process."""
    n, w = x.shape[0], world_size()
    if w == 1:
        return x
    if n % w:
        from .errors import GlimpseError

        raise GlimpseError(f"a batch of {n} cannot be shared equally among {w} processes: give a batch size "
                           f"that is a multiple of {w}")
    r = rank()
    return x[r * n // w:(r + 1) * n // w]


def mean_divisor(count: torch.Tensor) -> torch.Tensor:
    """The divisor of a mean over a batch whose terms are weighted: ``count`` (at least 1) in one
    process; with N, the count over every rank's share (at least 1) divided by N, so that a rank's
    sum divided by it, its gradient averaged over the ranks, is the global batch's mean."""
    if not active():
        return count.clamp_min(1)
    total = count.detach().to(torch.float64).reshape(1).clone()
    dist.all_reduce(total)
    return (total.clamp_min(1) / world_size()).to(count.dtype).reshape(count.shape)


def from_main(*values: float) -> tuple[float, ...]:
    """Rank 0's ``values`` on every rank (as given in one process)."""
    if not active():
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, 0)
    return tuple(t.tolist())


def broadcast_state(net: nn.Module) -> None:
    """Rank 0's weights and buffers (batch-norm statistics) in every rank's ``net``."""
    if active():
        with torch.no_grad():
            for t in net.state_dict().values():
                dist.broadcast(t, 0)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks (one all-reduce); a parameter that no
    rank has a gradient for keeps none (as the optimizer then skips it in one process)."""
    if not active():
        return
    ps = [p for p in params if p.requires_grad]
    if not ps:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in ps]
                     + [torch.tensor([p.grad is not None for p in ps], dtype=torch.float32, device=ps[0].device)])
    dist.all_reduce(flat)
    flat /= world_size()
    had = flat[-len(ps):] > 0
    i = 0
    for p, h in zip(ps, had.tolist()):
        g = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
        if not h:
            p.grad = None
        elif p.grad is None:
            p.grad = g.to(p.dtype).clone()
        else:
            p.grad.copy_(g)


class _Sum(torch.autograd.Function):
    """The sum of a tensor over the ranks, with gradients: the gradient of each rank's input is
    the sum of every rank's output gradient (each rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _Sum.apply(grad.contiguous())


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """A :class:`~torch.nn.BatchNorm2d` whose training statistics are the whole global batch's,
    over every rank (torch's own ``SyncBatchNorm`` runs on GPUs only): the mean and variance come
    through an all-reduce whose backward all-reduces their gradients. In eval mode, or in one
    process, it is a plain batch norm. :func:`synced_batchnorm` makes a net's batch norms these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        sums = _Sum.apply(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _Sum.apply((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), m)
        return y


def synced_batchnorm(net: nn.Module) -> list[nn.Module]:
    """Make ``net``'s batch norms :class:`SyncedBatchNorm2d` (the same modules and tensors, so
    an optimizer's parameters stay valid) when several processes train; returns them, for
    :func:`plain_batchnorm` (none in one process)."""
    if not active():
        return []
    mods = [m for m in net.modules() if type(m) is nn.BatchNorm2d]
    for m in mods:
        m.__class__ = SyncedBatchNorm2d
    return mods


def plain_batchnorm(mods: list[nn.Module]) -> None:
    """Undo :func:`synced_batchnorm` (plain batch norms again, e.g. before a net is exported)."""
    for m in mods:
        m.__class__ = nn.BatchNorm2d
