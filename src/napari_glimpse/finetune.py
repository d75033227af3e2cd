"""Fine-tuning on a few reviewed images, in minutes: only what the model's answer uses.

A new site differs from the training set in two ways: how its images look (scanner, exposure,
noise) and how its annotators place some landmarks (a systematic per-landmark difference, e.g.
Porion a few millimetres off on most images). :func:`finetune` learns the second as a
per-landmark offset: the mean difference between the reviewed labels and the model's answers
(shrunk towards 0 for a handful of images), added to the coarse and fine stages' answer at
inference (``meta['landmark_offsets_px']``, see :attr:`GlimpseModel.landmark_offsets`). It
learns the first by tuning the stages the answer uses, briefly and at a tenth of their learning
rate: the coarse net(s), the fine nets, and the glimpse net only when the model's answer takes
glimpse steps (``meta['iterations'] > 0``). The nets are tuned on the labels minus the offsets,
so that they keep the training set's conventions and the offsets carry the site's; a replay of
the original training set (``mix``) keeps what they knew.

Progress is reported over the whole run (:class:`Progress`): one overall fraction, step count
and ETA across every stage and net. What was tuned is recorded in ``meta['finetuned']``.
The defaults of :class:`FinetuneConfig` are those chosen by ``benchmarks/adapt.py``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._serde import DictConfig
from .errors import GlimpseError
from .io import Dataset

# rough seconds per step on one CPU thread (the ETA and the time shares are scaled by what the
# run measures; these only weigh the phases against each other before it has)
COST_S = {"read": 0.2, "offsets": 0.3, "coarse": 1.0, "fine": 0.16, "glimpse": 0.3, "int8": 5.0}


@dataclass(frozen=True)
class FinetuneConfig(DictConfig):
    """What :func:`finetune` tunes, and for how long.

    ``coarse_steps`` / ``fine_steps``: optimizer steps for each net of the coarse / fine stage
    (0 keeps it as it is), its ``*_layers`` (:func:`~napari_glimpse.coarse.tune_only`) learning at
    ``lr_scale`` times the net's training rate; ``glimpse_steps`` at ``glimpse_lr``, only when the
    answer takes glimpse steps. ``offsets``: learn the per-landmark offsets; ``offset_prior``: they
    are the residuals' sum over (images + this), a mean shrunk towards 0 for a few images.
    ``mix_images``: how many images of the original set (``mix``) are replayed beside the reviewed
    ones (None: as many as there are reviewed images; 0: none). ``time_budget_s``: the whole run
    stops by then (the stages share it in proportion to their expected time); None: steps only.
    ``artefacts``: the coarse nets' training views and the fine nets' windows show another device's
    field of view, ruler or dark band with this probability (:mod:`napari_glimpse.artefacts`;
    recorded in each tuned net's config); None keeps each net's own (0 for nets made before the option).
    """

    coarse_steps: int = 30
    fine_steps: int = 100
    glimpse_steps: int = 200
    coarse_layers: str = "all"
    fine_layers: str = "all"
    lr_scale: float = 0.1
    glimpse_lr: float = 1e-4
    offsets: bool = True
    offset_prior: float = 1.0
    mix_images: int | None = None
    time_budget_s: float | None = 240.0
    artefacts: float | None = None
    seed: int = 0


def used_stages(model) -> tuple[str, ...]:
    """The stages the model's default answer uses, in the order they run: ``coarse``, ``fine``
    (when it looks: :attr:`~GlimpseModel.fine_steps` > 0) and ``glimpse`` (when the answer takes
    glimpse steps, :attr:`~GlimpseModel.default_iterations` > 0, or there is no coarse stage)."""
    out = []
    if model.coarse is not None:
        out.append("coarse")
    if model.fine is not None and model.fine_steps > 0:
        out.append("fine")
    if model.coarse is None or model.default_iterations > 0:
        out.append("glimpse")
    return tuple(out)


# ------------------------------------------------------------------------------ progress
@dataclass
class _Phase:
    stage: str
    member: int | None
    steps: int
    cost: float  # expected seconds per step
    done: float = 0.0  # fraction
    seconds: float = 0.0  # wall time spent in it so far


@dataclass
class Progress:
    """Overall progress of a run made of phases (offsets, each net of each stage, int8 graphs).

    ``callback`` receives one dict per step of any phase: its ``stage`` (and ``member``: which net
    of an ensemble), the phase's ``step`` of ``steps``, and over the whole run ``overall_step`` of
    ``overall_total`` steps, ``progress`` (0-1, each phase weighted by its expected time), the
    wall ``elapsed_s`` since the start and ``eta_s`` (the time still to go at the rate so far);
    plus the phase's ``loss`` where it has one."""

    callback: Callable[[dict], None] | None = None
    phases: list[_Phase] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    later: int = 0  # phases appended by add(..., later=True) stay at the end
    last: float = field(default_factory=time.monotonic)  # the time of the last report (a phase's start)

    def add(self, stage: str, steps: int, cost: float | None = None, member: int | None = None,
            later: bool = False) -> _Phase:
        ph = _Phase(stage, member, max(1, int(steps)), COST_S.get(stage, 1.0) if cost is None else cost)
        if later:
            self.phases.append(ph)
            self.later += 1
        else:
            self.phases.insert(len(self.phases) - self.later, ph)
        return ph

    def fraction(self) -> float:
        total = sum(p.steps * p.cost for p in self.phases) or 1.0
        return min(1.0, sum(p.done * p.steps * p.cost for p in self.phases) / total)

    def share(self, ph: _Phase, budget_s: float | None) -> float | None:
        """``ph``'s share of what is left of ``budget_s``: in proportion to its expected time among
        the phases still to run (None without a budget)."""
        if budget_s is None:
            return None
        rest = [p for p in self.phases[self.phases.index(ph):] if p.done < 1.0]
        left = budget_s - (time.monotonic() - self.t0)
        return max(0.0, left) * ph.steps * ph.cost / max(1e-9, sum(p.steps * p.cost for p in rest))

    def report(self, ph: _Phase, step: int, frac: float | None = None, **extra) -> None:
        """Phase ``ph`` reached ``step`` (its fraction done ``frac``, default step / steps)."""
        now = time.monotonic()
        ph.done = min(1.0, step / ph.steps if frac is None else frac)
        ph.seconds += now - self.last
        self.last = now
        if self.callback is None:
            return
        p = self.fraction()
        el = now - self.t0
        info = {"stage": ph.stage, "step": int(step), "steps": ph.steps,
                "overall_step": int(sum(min(q.steps, round(q.done * q.steps)) for q in self.phases)),
                "overall_total": sum(q.steps for q in self.phases), "progress": p, "elapsed_s": el,
                "eta_s": self.eta(el)}
        if ph.member is not None:
            info["member"] = ph.member
        info.update(extra)
        self.callback(info)

    def eta(self, elapsed: float) -> float | None:
        """Seconds still to go: each unfinished phase's steps at the rate its stage has run so far,
        or (a stage not yet seen) at its expected rate scaled by how the run compares with it."""
        seen = [q for q in self.phases if q.done > 0]
        if not seen:
            return None
        expected = sum(q.done * q.steps * q.cost for q in seen)
        speed = elapsed / expected if expected > 0 else 1.0
        rate: dict[str, float] = {}
        for stage in {q.stage for q in seen}:
            qs = [q for q in seen if q.stage == stage]
            rate[stage] = sum(q.seconds for q in qs) / max(1e-9, sum(q.done * q.steps for q in qs))
        return sum((1 - q.done) * q.steps * rate.get(q.stage, q.cost * speed) for q in self.phases)

    def reporter(self, ph: _Phase) -> Callable[[dict], None]:
        """A per-step callback for a training loop (``step``, ``progress``, ``loss``/``loss_mm``)."""
        def cb(info: dict) -> None:
            extra = {k: info[k] for k in ("loss", "loss_mm") if k in info}
            self.report(ph, info["step"], info.get("progress"), **extra)
        return cb

    def finish(self, ph: _Phase) -> None:
        if ph.done < 1.0:
            self.report(ph, ph.steps, 1.0)


# -------------------------------------------------------------------------------- data
@dataclass
class LoadedDataset(Dataset):
    """A labelled set whose images are read once and kept (``arrays``: grey uint8, in order)."""

    arrays: list = field(default_factory=list)

    def image(self, i: int) -> np.ndarray:
        return self.arrays[i]

    def subset(self, idx: Sequence[int]) -> "LoadedDataset":
        idx = list(idx)
        return LoadedDataset([self.image_paths[i] for i in idx], {k: v[idx] for k, v in self.annotations.items()},
                             self.landmark_names, self.pixel_spacing, arrays=[self.arrays[i] for i in idx],
                             landmark_set=self.landmark_set)


def load_images(ds: Dataset, idx: Sequence[int] | None = None,
                report: Callable[[], None] | None = None) -> LoadedDataset:
    """``ds`` (or its images ``idx``) with every image read once, labels the mean of its annotators;
    ``report()`` after each image."""
    from .io import to_grey_uint8

    idx = list(range(len(ds))) if idx is None else [int(i) for i in idx]
    arrays = []
    for i in idx:
        img = to_grey_uint8(ds.image(i))
        ds.check_inside(i, img.shape)
        arrays.append(img)
        if report is not None:
            report()
    return LoadedDataset([ds.image_paths[i] for i in idx], {"labels": ds.ground_truth("mean")[idx]},
                         ds.landmark_names, ds.pixel_spacing, arrays=arrays, landmark_set=ds.landmark_set)


def joined(parts: Sequence[LoadedDataset]) -> LoadedDataset:
    """Loaded sets as one (labels as they are)."""
    return LoadedDataset([p for d in parts for p in d.image_paths],
                         {"labels": np.concatenate([d.ground_truth() for d in parts])},
                         parts[0].landmark_names, parts[0].pixel_spacing, arrays=[a for d in parts for a in d.arrays],
                         landmark_set=parts[0].landmark_set)


# ----------------------------------------------------------------------------- offsets
def stage_answers(model, ds: LoadedDataset, progress: Progress | None = None,
                  phase: _Phase | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's default answer on every image: ``(N, K, 2)`` positions and ``(N,)`` True where
    the image was read mirrored (the patient facing left)."""
    preds, left = [], []
    for i in range(len(ds)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a notice about the image's size is not for here
            tr = model.predict(ds.image(i))
        preds.append(tr.final)
        left.append(tr.facing == "left")
        if progress is not None and phase is not None:
            progress.report(phase, i + 1)
    return np.stack(preds), np.asarray(left, dtype=bool)


def reading_frame(d: np.ndarray, left: np.ndarray) -> np.ndarray:
    """``(N, K, 2)`` displacements of each image as the model reads it (x mirrored where ``left``);
    its own inverse."""
    d = np.array(d, dtype=np.float64)
    d[left, :, 0] *= -1
    return d


def learn_offsets(preds: np.ndarray, truth: np.ndarray, left: np.ndarray, prior: float) -> np.ndarray:
    """``(K, 2)`` per-landmark offsets (the model's pixels, its reading frame): the residuals'
    (truth - answer) sum over ``N + prior`` images, a mean shrunk towards 0 for few images. ``N``
    counts the images where the landmark is present: an absent one (NaN truth) is left out (0 for
    a landmark absent on every image)."""
    r = reading_frame(truth - preds, left)
    ok = np.isfinite(r).all(-1, keepdims=True)  # (N, K, 1)
    return np.where(ok, r, 0.0).sum(0) / np.maximum(ok.sum(0) + float(prior), 1.0)


# ------------------------------------------------------------------------------ tuning
def _plan(parent, cfg: FinetuneConfig, stages: Sequence[str], n_images: int, n_read: int, prog: Progress) -> dict:
    """The run's phases in ``prog``, by stage: ``read`` (``n_read`` images read), ``offsets`` (one
    step per reviewed image), each net
    of the coarse and fine stages, ``glimpse``. Stages with 0 steps are left out; the offsets are
    learned only where the answer is the coarse and fine stages' (no glimpse steps after them)."""
    from .runtime import members_of

    plan: dict[str, list[_Phase]] = {"read": [prog.add("read", n_read)]}
    if cfg.offsets and "glimpse" not in stages:
        plan["offsets"] = [prog.add("offsets", n_images)]
    for stage, steps in (("coarse", cfg.coarse_steps), ("fine", cfg.fine_steps)):
        if stage in stages and steps > 0:
            nets = members_of(parent.coarse if stage == "coarse" else parent.fine)
            plan[stage] = [prog.add(stage, steps, member=j if len(nets) > 1 else None) for j in range(len(nets))]
    if "glimpse" in stages and cfg.glimpse_steps > 0:
        plan["glimpse"] = [prog.add("glimpse", cfg.glimpse_steps)]
    return plan


def _tune_stage(model, stage: str, data, cfg: FinetuneConfig, prog: Progress, phases: list[_Phase],
                should_stop: Callable[[], bool] | None, device, verbose: bool) -> list[dict]:
    """Tune each net of the model's coarse or fine stage for its phase's steps (or its share of
    the time budget); the model gets the tuned nets. Returns each net's last history record."""
    from .artefacts import with_artefacts
    from .coarse import CoarseEnsemble, members_of, train_coarse
    from .fine import FineEnsemble, train_fine

    nets = members_of(model.coarse if stage == "coarse" else model.fine)
    tuned, last = [], []
    for m, ph in zip(nets, phases):
        losses: list[float] = []
        report = prog.reporter(ph)

        def cb(info: dict, losses: list = losses, report: Callable = report) -> None:
            losses.append(info["loss"])
            report(info)

        kw = dict(progress=verbose, callback=cb, should_stop=should_stop, max_steps=ph.steps, init=m,
                  lr_scale=cfg.lr_scale, device=device, layers=getattr(cfg, f"{stage}_layers"))
        budget = max(1e-3, prog.share(ph, cfg.time_budget_s) or 1e12)
        with_artefacts(m, cfg.artefacts)  # the tuned copy trains (and keeps) this setting
        if stage == "coarse":
            net, hist = train_coarse(*data.views, m.cfg, budget, **kw)
        else:
            net, hist = train_fine(*data.fine_levels[m.cfg.level, m.cfg.context], m.cfg, budget, **kw)
        prog.finish(ph)
        tuned.append(net)
        last.append({"step": hist[-1]["step"], "seconds": round(hist[-1]["elapsed_s"], 1),
                     "first_loss": losses[0] if losses else None, "loss": losses[-1] if losses else None})
    if stage == "coarse":
        model.coarse = CoarseEnsemble(tuned) if len(tuned) > 1 else tuned[0]
    else:
        model.fine = FineEnsemble(tuned) if len(tuned) > 1 else tuned[0]
    return last


def _tune_glimpse(model, ds: Dataset, out: Path, cfg: FinetuneConfig, prog: Progress, ph: _Phase,
                  should_stop: Callable[[], bool] | None, device, verbose: bool, batch_size: int | None) -> list[dict]:
    """Tune the glimpse net (only run when the model's answer takes glimpse steps)."""
    from dataclasses import replace

    from .training import TrainConfig, train

    over = {"lr": cfg.glimpse_lr, "warmup": 0.0, "max_steps": ph.steps, "save_every_s": 60.0, "seed": cfg.seed}
    if batch_size:
        over["batch_size"] = batch_size
    tcfg = replace(TrainConfig.from_dict(model.train_config), **over)
    budget = prog.share(ph, cfg.time_budget_s)
    train(ds, out, train_config=tcfg, device=device, init=model, time_budget_s=max(1e-3, budget) if budget else None,
          progress=verbose, callback=prog.reporter(ph), should_stop=should_stop)
    prog.finish(ph)
    return [{"step": model.meta.get("train_steps"), "seconds": round(model.meta.get("train_wall_s", 0.0), 1)}]


def _replay(mix: Dataset | None, n: int, seed: int, report: Callable[[], None] | None = None) -> LoadedDataset | None:
    """``n`` images of the original set, drawn at random (``seed``), read once."""
    if mix is None or n <= 0 or len(mix) == 0:
        return None
    idx = np.sort(np.random.default_rng(seed).choice(len(mix), size=min(n, len(mix)), replace=False))
    return load_images(mix, idx, report)


def _offsets(model, rev: LoadedDataset, cfg: FinetuneConfig, prog: Progress,
             ph: _Phase) -> tuple[np.ndarray, LoadedDataset]:
    """Learn the per-landmark offsets on the reviewed images (added to the model's own, if any);
    returns them and the reviewed set with the labels the nets are then tuned on (labels minus
    the offsets, in each image's frame)."""
    preds, left = stage_answers(model, rev, prog, ph)
    truth = rev.ground_truth()
    old = model.landmark_offsets
    off = (np.zeros((truth.shape[1], 2)) if old is None else old) + learn_offsets(preds, truth, left, cfg.offset_prior)
    return off, minus_offsets(rev, off, left)


def minus_offsets(rev: LoadedDataset, off: np.ndarray, left: np.ndarray) -> LoadedDataset:
    """``rev`` with the labels the nets are tuned on: its labels minus the per-landmark offsets
    ``off`` (which the model adds to its nets' answer), in each image's frame (``left``: mirrored)."""
    truth = rev.ground_truth()
    shifted = truth - reading_frame(np.broadcast_to(off, truth.shape), left)
    for i, a in enumerate(rev.arrays):  # a label near the border stays inside its image
        shifted[i] = np.clip(shifted[i], 0.0, [a.shape[1] - 1.0, a.shape[0] - 1.0])
    return LoadedDataset(rev.image_paths, {"labels": shifted}, rev.landmark_names, rev.pixel_spacing,
                         arrays=rev.arrays, landmark_set=rev.landmark_set)


def labels_facing_left(rev: Dataset, mean_start: np.ndarray) -> np.ndarray:
    """``(N,)`` True where an image's labels are laid out mirrored against the training set's mean
    (the patient facing left), read from the landmarks each image places."""
    from .coarse import facing_of

    out = []
    for t in rev.ground_truth():
        ok = np.isfinite(t).all(-1)
        out.append(ok.sum() >= 2 and facing_of(t[ok], mean_start[ok]) == "left")
    return np.asarray(out, dtype=bool)


def finetune(parent, reviewed: Dataset, out: str | Path, cfg: FinetuneConfig | None = None,
             mix: Dataset | None = None, progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None, meta: dict | None = None, device: str = "cpu",
             batch_size: int | None = None, verbose: bool = False):
    """Fine-tune ``parent`` (a :class:`~napari_glimpse.inference.GlimpseModel`, changed in place and
    returned) on the ``reviewed`` images and write it to ``out``.

    In order: the per-landmark offsets (``cfg.offsets``), then each net of the stages the answer
    uses (:func:`used_stages`) on the reviewed images (labels minus the offsets) and
    ``cfg.mix_images`` of ``mix`` (the original training set, its own labels). ``progress``: the
    run's :class:`Progress` (its clock is the time budget's; phases added to it with
    ``later=True``, e.g. the int8 graphs, stay after these). ``should_stop()``: stop tuning (what
    is tuned so far is written). ``meta``: merged into the model's metadata;
    ``meta['finetuned']`` records what was tuned (stages, steps, images, parent, seconds).

    Under torchrun every process calls this alike: the nets train data-parallel
    (:mod:`napari_glimpse.distributed`), rank 0 alone writes ``out`` (the others wait for it), and
    ``meta['finetuned']['world_size']`` records how many processes tuned.
    """
    from .landmark_set import check_match

    cfg = cfg or FinetuneConfig()
    prog = progress or Progress()
    if len(reviewed) == 0:
        raise GlimpseError("no reviewed images to fine-tune on")
    check_match(parent.landmark_set, reviewed.landmark_set, len(reviewed.landmark_names), "the reviewed data")
    stages = used_stages(parent)
    parent_record = parent.meta.get("finetuned")
    n_mix = 0 if mix is None else min(len(mix), len(reviewed) if cfg.mix_images is None else cfg.mix_images)
    plan = _plan(parent, cfg, stages, len(reviewed), len(reviewed) + n_mix, prog)
    rev, replay = _read_all(reviewed, mix, n_mix, cfg.seed, prog, plan["read"][0])
    model = parent
    offsets = None
    if "offsets" in plan:
        offsets, rev = _offsets(model, rev, cfg, prog, plan["offsets"][0])
        model.meta["landmark_offsets_px"] = offsets.round(3).tolist()
    elif model.landmark_offsets is not None and "glimpse" not in stages:  # kept, not learned: the nets
        rev = minus_offsets(rev, model.landmark_offsets, labels_facing_left(rev, model.mean_start))  # learn without
    train_ds = joined([rev] + ([replay] if replay is not None else []))
    record = _tune_nets(model, train_ds, cfg, prog, plan, should_stop, device, verbose)
    if "glimpse" in plan and not (should_stop is not None and should_stop()):
        record["glimpse"] = _tune_glimpse(model, train_ds, Path(out), cfg, prog, plan["glimpse"][0], should_stop,
                                          device, verbose, batch_size)
    model.meta.update(meta or {})
    for stage in set(record) & {"coarse", "fine"}:  # as training.train records a stage's fine-tuning
        model.meta[f"{stage}_finetune_steps"] = getattr(cfg, f"{stage}_steps")
    model.meta["finetuned"] = _record(model, cfg, record, offsets is not None, rev, replay, prog, parent_record,
                                      cancelled=should_stop is not None and should_stop())
    _write(model, out)
    return model


def _read_all(reviewed: Dataset, mix: Dataset | None, n_mix: int, seed: int, prog: Progress, read: _Phase
              ) -> tuple[LoadedDataset, LoadedDataset | None]:
    """The reviewed images and ``n_mix`` replayed ones of ``mix``, read and counted in the ``read`` phase."""
    count = iter(range(1, 1 + len(reviewed) + n_mix))

    def one_read() -> None:
        prog.report(read, next(count))

    rev = load_images(reviewed, report=one_read)
    replay = _replay(mix, n_mix, seed, one_read)
    prog.finish(read)
    return rev, replay


def _tune_nets(model, train_ds: LoadedDataset, cfg: FinetuneConfig, prog: Progress, plan: dict,
               should_stop: Callable[[], bool] | None, device: str, verbose: bool) -> dict[str, Any]:
    """Tune the coarse then the fine nets that ``plan`` has, until ``should_stop()``; their records."""
    from .runtime import members_of
    from .training import TrainingData

    record: dict[str, Any] = {}
    nets_to_tune = [s for s in ("coarse", "fine") if s in plan]
    if not nets_to_tune:
        return record
    data = TrainingData(train_ds, model.config.n_levels, model.config.patch, "mean",
                        coarse=members_of(model.coarse)[0].cfg if "coarse" in plan else None,
                        fine=[m.cfg for m in members_of(model.fine)] if "fine" in plan else None)
    for stage in nets_to_tune:
        if should_stop is not None and should_stop():
            break
        record[stage] = _tune_stage(model, stage, data, cfg, prog, plan[stage], should_stop, device, verbose)
    del data
    return record


def _write(model, out: str | Path) -> None:
    """Record how many processes tuned, write ``out`` (rank 0) and wait for it on every rank. A
    parent stored with float16 weights (the shipped model) gives a tuned file stored so too
    (:meth:`GlimpseModel.save`)."""
    from . import distributed

    model.meta["finetuned"]["world_size"] = distributed.world_size()
    if distributed.is_main():
        model.save(out)
    distributed.barrier()


def _record(model, cfg: FinetuneConfig, record: dict, offsets: bool, rev: LoadedDataset,
            replay: LoadedDataset | None, prog: Progress, parent_record: dict | None, cancelled: bool) -> dict:
    """``meta['finetuned']``: what was tuned (stages, each net's steps and loss), on what (images,
    replayed images), from which parent, in how many seconds, with which settings."""
    return {
        "parent": model.meta.get("parent"), "stages": (["offsets"] if offsets else []) + list(record),
        "steps": {s: [r["step"] for r in rs] for s, rs in record.items()}, "images": len(rev),
        "image_names": [p.name for p in rev.image_paths], "mix_images": 0 if replay is None else len(replay),
        "seconds": round(time.monotonic() - prog.t0, 1), "nets": record, "config": cfg.to_dict(),
        "stopped": "cancelled" if cancelled else "done",
        "not_tuned": [s for s in ("coarse", "fine", "glimpse") if s not in record
                      and getattr(model, "net" if s == "glimpse" else s) is not None],
        **({"parent_finetuned": parent_record} if parent_record else {}),
    }
