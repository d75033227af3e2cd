"""The one training loop (napari_glimpse.loop): clock, schedule, stop, NaN, hooks, callback."""

from __future__ import annotations

import math

import pytest
import torch

from napari_glimpse import loop
from napari_glimpse.errors import GlimpseError


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_steps_schedule_callback_and_resume_counts():
    seen, lrs = [], []
    opt = _opt()

    def step(frac):
        lrs.append(opt.param_groups[0]["lr"])
        return 2.0

    res = loop.run(step, opt, lambda f: 1.0 - f, stage="s", max_steps=4, progress=False, callback=seen.append,
                   step0=2, loss_key="loss_mm", loss_scale=0.5)
    assert res.step == 4 and res.stopped == "steps" and res.loss == pytest.approx(1.0)
    assert lrs == pytest.approx([0.5, 0.25])  # resumed at step 2 of 4
    assert [i["step"] for i in seen] == [3, 4] and seen[-1]["progress"] == 1.0 and seen[0]["stage"] == "s"
    assert "loss_mm" in seen[0]


def test_stop_request_nan_and_hooks():
    n = [0]
    res = loop.run(lambda f: 1.0, _opt(), lambda f: 0.1, stage="s", max_steps=100, progress=False,
                   should_stop=lambda: n.__setitem__(0, n[0] + 1) or n[0] > 3)
    assert res.stopped == "cancelled" and res.step == 3
    with pytest.raises(GlimpseError, match=r"coarse training stopped at step 2: the loss is nan .*m\.pt was not"):
        vals = iter([1.0, math.nan])
        loop.run(lambda f: next(vals), _opt(), lambda f: 0.1, stage="coarse", max_steps=5, progress=False,
                 writes="m.pt")
    calls = []
    loop.run(lambda f: 1.0, _opt(), lambda f: 0.1, stage="s", max_steps=3, progress=False,
             hooks=[loop.Hook(-1.0, lambda info, bar: calls.append(info["step"]))])
    assert calls == [1, 2, 3]
    with pytest.raises(GlimpseError, match="step limit or a time budget"):
        loop.run(lambda f: 1.0, _opt(), lambda f: 0.1, stage="s", progress=False)


def test_time_budget_stops():
    res = loop.run(lambda f: 1.0, _opt(), lambda f: 0.1, stage="s", time_budget_s=0.05, progress=False)
    assert res.stopped == "budget" and res.step >= 1 and res.elapsed_s >= 0.05
