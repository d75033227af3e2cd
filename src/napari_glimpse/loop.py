"""The training loop: one for every stage (coarse, fine, glimpse, glimpse-only) and for fine-tuning.

A stage gives :func:`run` its step (``step(progress) -> loss``: draw a batch, forward, backward,
optimiser step; the loss as a float) and its learning-rate schedule (``lr_at(progress)``); the
loop owns the rest:

* the **clock**: progress is the larger of ``elapsed / time_budget_s`` and ``step / max_steps``
  (either may be absent, not both), counted from ``elapsed0`` / ``step0`` on resume; training
  stops at 1 or when ``should_stop()`` says so (``stopped``: ``budget``, ``steps`` or
  ``cancelled``);
* under torchrun (:mod:`napari_glimpse.distributed`) the clock and the stop request are rank 0's,
  so that every process takes as many steps (gradients are averaged by the stage's step);
* the learning rate of every parameter group, set before each step;
* a **NaN or infinite loss** stops training with one clear error before anything is written;
* the smoothed loss (``0.98`` exponential average, times ``loss_scale``: e.g. pixels to mm), a
  progress bar (``desc`` = the stage), and the ``callback`` with one dict per step (``stage``,
  ``step``, the loss under ``loss_key``, ``lr``, ``elapsed_s``, ``progress``);
* **hooks** every so many seconds (validation, resume points), each given that step's dict (to
  which it may add, e.g. ``val_mre_mm``) and the bar (to write a line beside it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from . import distributed
from .errors import GlimpseError


@dataclass
class Hook:
    """``fn(info, bar)`` every ``every_s`` seconds of training (first after ``every_s``)."""

    every_s: float
    fn: Callable[[dict, object], None]


@dataclass(frozen=True)
class LoopResult:
    """Where the loop stopped: steps taken (``step0`` included), seconds (``elapsed0`` included),
    the last smoothed loss (None without a step) and why (``budget``, ``steps`` or ``cancelled``)."""

    step: int
    elapsed_s: float
    loss: float | None
    stopped: str


def progress_of(step: int, elapsed_s: float, time_budget_s: float | None, max_steps: int | None) -> float:
    """The larger of the time and the step fractions."""
    p = elapsed_s / time_budget_s if time_budget_s else 0.0
    return max(p, step / max_steps) if max_steps else p


def run(step: Callable[[float], float], opt, lr_at: Callable[[float], float], *, stage: str,
        time_budget_s: float | None = None, max_steps: int | None = None, progress: bool = True,
        callback: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
        hooks: Sequence[Hook] = (), loss_key: str = "loss", loss_scale: float = 1.0, loss_unit: str = "",
        step0: int = 0, elapsed0: float = 0.0, writes: str = "the model", stage_key: bool = True) -> LoopResult:
    """Train until the clock says so (see the module's docstring); ``writes`` names what is not
    written when the loss goes bad; ``stage_key=False`` leaves ``stage`` out of the step's dict
    (the glimpse stages' records and progress lines, as their readers expect)."""
    from tqdm.auto import tqdm

    if not time_budget_s and not max_steps:
        raise GlimpseError("give a step limit or a time budget")
    bar = tqdm(total=1000, desc=stage, unit="‰", disable=not progress,
               bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    t0 = time.monotonic()
    last = [t0] * len(hooks)
    n, ema, stopped = step0, None, "budget"
    digits = 2 if loss_unit else 3

    def elapsed() -> float:
        return elapsed0 + time.monotonic() - t0

    try:
        while True:
            frac, stop = distributed.from_main(progress_of(n, elapsed(), time_budget_s, max_steps),
                                               should_stop is not None and should_stop())
            if frac >= 1.0:
                stopped = "steps" if max_steps and n >= max_steps else "budget"
                break
            if stop:
                stopped = "cancelled"
                break
            lr = lr_at(frac)
            for g in opt.param_groups:
                g["lr"] = lr
            value = step(frac)
            n += 1
            if not math.isfinite(value):  # never go on to write NaN weights
                raise GlimpseError(f"{stage} training stopped at step {n}: the loss is {value} (check the labels "
                                   f"and images for NaN or infinite values); {writes} was not written")
            ema = value * loss_scale if ema is None else 0.98 * ema + 0.02 * value * loss_scale
            done = min(1.0, progress_of(n, elapsed(), time_budget_s, max_steps))
            bar.n = int(1000 * done)
            bar.set_postfix_str(f"step {n} loss {ema:.{digits}f}{loss_unit} lr {lr:.1e}", refresh=False)
            bar.refresh()
            info = {"stage": stage} if stage_key else {}
            info.update({"step": n, loss_key: ema, "lr": lr, "elapsed_s": elapsed(), "progress": done})
            if callback is not None:
                callback(info)
            for i, hook in enumerate(hooks):
                if time.monotonic() - last[i] > hook.every_s:
                    hook.fn(info, bar)
                    last[i] = time.monotonic()
    finally:
        bar.close()
    return LoopResult(n, elapsed(), ema, stopped)
