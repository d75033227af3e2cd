"""Training: random starts, augmented glimpses, offset regression, budgeted and resumable."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import distributed, loop
from ._serde import DictConfig
from .checkpoint import atomic_torch_save, read_checkpoint
from .coarse import CoarseConfig, CoarseEnsemble, members_of, train_coarse, view_levels
from .devices import autocast, resolve_device
from .errors import GlimpseError
from .fine import FineConfig, FineEnsemble, fine_levels_by_kind, present_pairs, train_fine
from .glimpse import PyramidStack, frame_to_image, image_to_frame, sample_glimpses
from .inference import GlimpseModel, mirror_points
from .io import Dataset
from .landmark_set import check_match, of_data
from .model import GlimpseModelNet, ModelConfig
from .pyramid import build_pyramid, levels_for


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Optimisation and augmentation.

    ``start_mode``: ``mean`` draws starts from N(mean, std) of the landmark's training positions
    and follows the model for ``train_iterations`` detached steps (the paper); ``mixture`` also
    draws a ``near_fraction`` of starts around the target at a log-uniform radius in
    ``near_sigma_px`` (one independent glimpse each: what later iterations see, at a fraction of
    the cost).
    """

    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | paper (lr, then lr/10 for the second half)
    warmup: float = 0.02
    max_steps: int | None = 20000
    train_iterations: int = 1
    start_mode: str = "mixture"
    near_fraction: float = 0.7
    near_sigma_px: tuple[float, float] = (3.0, 150.0)
    start_std_scale: float = 1.0
    rotation_deg: float = 15.0
    log_scale: float = 0.05
    noise: float = 0.01
    bf16: bool = False
    ground_truth: str = "mean"
    save_every_s: float = 300.0
    seed: int = 0


def presets(name: str, n_train: int = 150, n_landmarks: int = 19) -> tuple[ModelConfig, TrainConfig]:
    """``compact``: the default that trains on 2 CPU cores; ``paper``: as published
    (ResNet-34 trunk, one network per landmark, 10 iterations, Adam 20 epochs at 1e-4 then 20 at
    1e-5, batch of 1 image, an epoch being every training image once per landmark)."""
    if name == "compact":
        return ModelConfig(n_landmarks=n_landmarks), TrainConfig()
    if name == "paper":
        steps = 40 * n_train * n_landmarks
        return (
            ModelConfig(trunk="paper", mode="per_landmark", n_landmarks=n_landmarks),
            TrainConfig(
                batch_size=1, lr=1e-4, schedule="paper", warmup=0.0, max_steps=steps,
                train_iterations=10, start_mode="mean",
            ),
        )
    raise GlimpseError(f"unknown config {name!r} (compact or paper)")


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "paper":
        return cfg.lr if progress < 0.5 else cfg.lr * 0.1
    if progress < cfg.warmup:
        return cfg.lr * (0.1 + 0.9 * progress / cfg.warmup)
    p = (progress - cfg.warmup) / max(1e-9, 1 - cfg.warmup)
    return 1e-2 * cfg.lr + 0.5 * (cfg.lr - 1e-2 * cfg.lr) * (1 + math.cos(math.pi * p))


class TrainingData:
    """Pyramids of all training images plus ground truth, ready for batched sampling."""

    def __init__(self, dataset: Dataset, n_levels: int, patch: int, ground_truth: str = "mean",
                 progress: bool = False, coarse: "CoarseConfig | None" = None,
                 fine: "FineConfig | Sequence[FineConfig] | None" = None):
        from tqdm.auto import tqdm

        if len(dataset) == 0:
            raise GlimpseError("the training set is empty")
        pyramids = []
        for i in tqdm(range(len(dataset)), desc="pyramids", disable=not progress, leave=False):
            img = dataset.image(i)
            dataset.check_inside(i, img.shape)
            pyramids.append(build_pyramid(img, n_levels, patch))
        self.stack = PyramidStack(pyramids)
        self.shapes = np.array([p.shape for p in pyramids])
        self.truth = torch.as_tensor(dataset.ground_truth(ground_truth), dtype=torch.float32)
        self.present = torch.isfinite(self.truth).all(-1)  # (N, K): False where a landmark is absent (NaN)
        # the coarse stage's whole-image views: (N, 1, h, w) float, median size, normalised truth
        self.views = view_levels(pyramids, self.truth.numpy(), coarse) if coarse is not None else None
        # the fine stage's levels for each kind of fine net (level, context levels): one
        # (N, 1, h, w) float stack per context level, and the normalised truth
        fines = [] if fine is None else [fine] if isinstance(fine, FineConfig) else list(fine)
        self.fine_levels = fine_levels_by_kind(pyramids, self.truth.numpy(), fines) if fines else None
        self.n_images, self.n_landmarks = self.truth.shape[:2]


# the glimpse stage's first resume point comes this soon (then every save_every_s)
FIRST_RESUME_S = 30.0


def _save_resume(path: Path, model: GlimpseModel, opt, step: int, elapsed: float, gen: torch.Generator,
                 history: list, pending: str | None = None) -> None:
    """Write the resume point (rank 0 only); ``pending``: a stage still to train (such a point cannot
    be resumed)."""
    if not distributed.is_main():
        return
    ck = model.to_checkpoint()
    ck["train_state"] = {
        "optimizer": opt.state_dict(),
        "step": step,
        "elapsed_s": elapsed,
        "rng": gen.get_state(),
        "history": history,
        "half_weights": model.half_weights,  # the final file's storage, kept across a resume
    }
    if pending:
        ck["train_state"]["pending"] = pending
    atomic_torch_save(ck, path)


def train_step(
    net: GlimpseModelNet,
    opt: torch.optim.Optimizer,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    stack: PyramidStack,
    truth: torch.Tensor,
    shapes: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    gen: torch.Generator,
    present: torch.Tensor | None = None,
) -> float:
    """One optimizer step on a random batch of (image, landmark) samples.

    Starts are drawn per ``tcfg.start_mode``; each sample follows ``tcfg.train_iterations``
    detached glimpse steps, every step's offset error (radial, in ``offset_unit``) adding to the
    loss. ``truth`` is ``(N, K, 2)``, ``shapes`` ``(N, 2)`` (h, w), ``mean``/``std`` ``(K, 2)``
    (std already scaled). ``present``: ``(N, K)`` bool, False where a landmark is absent; such
    (image, landmark) pairs are never drawn (:func:`~napari_glimpse.fine.present_pairs`), so
    their ``truth`` is never read. Returns the batch's mean radial error in offset units.

    Under torchrun, ``tcfg.batch_size`` is the global batch: every rank draws it all (the same
    generator state everywhere) and trains on its share (:func:`~napari_glimpse.distributed.share`),
    the gradients averaged over the ranks; the returned error is this rank's share's.
    """
    img, lm, target, size, c, ang, scl = _draw_samples(tcfg, truth, shapes, mean, std, gen, present)
    dev, b, unit = truth.device, tcfg.batch_size, mcfg.offset_unit
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for _ in range(tcfg.train_iterations):
        patches = sample_glimpses(stack, img, c, mcfg.patch, ang, scl)
        if tcfg.noise > 0:
            noise = distributed.share(torch.randn((b, *patches.shape[1:]), generator=gen))
            patches = patches + noise.to(dev) * (255.0 * tcfg.noise)
        with autocast(dev, tcfg.bf16):
            pred = net(patches, lm).float()
        tgt = image_to_frame(target - c, ang, scl) / unit
        loss = torch.sqrt(((pred - tgt) ** 2).sum(-1) + 1e-8).mean() / tcfg.train_iterations
        loss.backward()
        loss_sum += float(loss.detach())
        c = c + frame_to_image(pred.detach() * unit, ang, scl)
        c = torch.minimum(c.clamp(min=0), size - 1)
    distributed.average_gradients(net.parameters())
    opt.step()
    return loss_sum


def _draw_samples(tcfg: TrainConfig, truth: torch.Tensor, shapes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  gen: torch.Generator, present: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """:func:`train_step`'s batch, drawn from ``gen`` (this rank's share of it): image and landmark
    indices, true positions, image sizes (w, h), starts (inside the image), rotations and scales."""
    dev = truth.device
    n_i, n_k = truth.shape[:2]
    b = tcfg.batch_size
    img = torch.randint(0, n_i, (b,), generator=gen).to(dev)
    lm = torch.randint(0, n_k, (b,), generator=gen).to(dev)
    if present is not None:
        img, lm = present_pairs(img, lm, present, gen)
    target = truth[img, lm]
    size = shapes[img].flip(-1)  # (w, h)
    start = mean[lm] + torch.randn(b, 2, generator=gen).to(dev) * std[lm]
    if tcfg.start_mode == "mixture":
        lo, hi = math.log(tcfg.near_sigma_px[0]), math.log(tcfg.near_sigma_px[1])
        sig = torch.exp(lo + (hi - lo) * torch.rand(b, 1, generator=gen)).to(dev)
        near = target + torch.randn(b, 2, generator=gen).to(dev) * sig
        pick = (torch.rand(b, 1, generator=gen) < tcfg.near_fraction).to(dev)
        start = torch.where(pick, near, start)
    c = torch.minimum(start.clamp(min=0), size - 1)
    ang = ((torch.rand(b, generator=gen) * 2 - 1) * math.radians(tcfg.rotation_deg)).to(dev)
    scl = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * tcfg.log_scale).to(dev)
    return tuple(distributed.share(t) for t in (img, lm, target, size, c, ang, scl))


def start_statistics(truth: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(K, 2)`` mean and standard deviation of each landmark's ``(N, K, 2)`` training positions,
    over the images where it is present (absent: NaN); a landmark absent on every image is an error."""
    if np.isfinite(truth).all():
        return truth.mean(axis=0), truth.std(axis=0)
    placed = np.isfinite(truth).all(-1)  # (N, K)
    never = np.nonzero(~placed.any(axis=0))[0]
    if never.size:
        raise GlimpseError(f"landmark {never[0] + 1} ({names[never[0]]}) is absent on every training image; "
                           f"a new model cannot learn it")
    return np.nanmean(truth, axis=0), np.nanstd(truth, axis=0)


def resume_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".resume")


def _tune_each(members: list, callback: Callable[[dict], None] | None, dev: torch.device, budget_s: float,
               fit: Callable) -> tuple[list, list[dict], float]:
    """Fine-tune an ensemble's nets one after another, each for its share of ``budget_s``:
    ``fit(net, budget_s, callback) -> (net, history)``. Progress counts over all of them; with
    several, the progress and history entries say which ``member``. Returns the nets, the history
    and the wall time."""
    tuned, hist, wall = [], [], 0.0
    n = len(members)
    for j, m in enumerate(members):
        tag = {"member": j} if n > 1 else {}

        def cb(info: dict, j: int = j, tag: dict = tag) -> None:
            if callback is not None:
                callback({**info, **tag, "progress": (j + info["progress"]) / n})

        net, h = fit(m, budget_s / n, cb)
        tuned.append(net.to(dev))
        hist += [dict(x, **tag) for x in h]
        wall += h[-1]["elapsed_s"]
    return tuned, hist, wall


@dataclass(frozen=True)
class _Run:
    """What every stage of one :func:`train` call shares."""

    progress: bool
    callback: Callable[[dict], None] | None
    should_stop: Callable[[], bool] | None
    dev: torch.device
    eval_every_s: float


def _heatmap_stage(kind: str, model: GlimpseModel, data: "TrainingData", tune: torch.nn.Module | None,
                   cfg: CoarseConfig | FineConfig | None, budget_s: float | None, steps: int | None,
                   val: Dataset | None, run: _Run) -> None:
    """Train the ``coarse`` or ``fine`` stage (``cfg``) and attach it to ``model``, or fine-tune the
    given stage ``tune`` member by member at a tenth of its learning rate; its history and wall
    time go into the model's meta (``{kind}_history`` / ``{kind}_finetune_history``, ...)."""
    if kind == "coarse":
        views, view_hw, truth_n = data.views

        def fit(c, b, **kw):
            return train_coarse(views, view_hw, truth_n, c, b, **kw)
    else:
        flevels = data.fine_levels

        def fit(c, b, **kw):
            return train_fine(*flevels[c.level, c.context], c, b, **kw)
    common = {"progress": run.progress, "should_stop": run.should_stop, "max_steps": steps, "device": run.dev}
    budget_s = budget_s or 1e12
    if tune is not None:
        tuned, hist, wall = _tune_each(members_of(tune), run.callback, run.dev, budget_s,
                                       lambda m, b, cb: fit(m.cfg, b, callback=cb, init=m, lr_scale=0.1, **common))
        ensemble = CoarseEnsemble if kind == "coarse" else FineEnsemble
        setattr(model, kind, ensemble(tuned) if len(tuned) > 1 else tuned[0])
        model.meta.update({f"{kind}_finetune_steps": steps, f"{kind}_finetune_history": hist,
                           f"{kind}_finetune_wall_s": wall})
        return

    def validate(net) -> float:
        setattr(model, kind, net)
        return evaluate_model(model, val, iterations=0, progress=False)["overall"]["mre_mm"]

    net, hist = fit(cfg, budget_s, callback=run.callback, evaluate=validate if val is not None else None,
                    eval_every_s=run.eval_every_s, **common)
    setattr(model, kind, net)
    model.meta.update({f"{kind}_train_wall_s": hist[-1]["elapsed_s"], f"{kind}_history": hist})


def _begin(dataset: Dataset, rpath: Path, model_config: ModelConfig | None, tcfg: TrainConfig, dev: torch.device,
           resume: bool, init: GlimpseModel | None
           ) -> tuple[GlimpseModel | None, torch.nn.Module | None, ModelConfig, TrainConfig, dict | None]:
    """Where training starts: the resume point (its model, config and training state), ``init``'s
    model, or a new glimpse net (the model is built once the data's statistics are known: None).
    Returns ``(model, new net, model config, train config, training state)``."""
    net = None
    state = None
    if resume:
        if not rpath.exists():
            raise GlimpseError(f"nothing to resume: {rpath} does not exist")
        ck = read_checkpoint(rpath)
        state = ck.get("train_state")
        if state is None:
            raise GlimpseError(f"{rpath} holds no training state")
        if state.get("pending"):
            raise GlimpseError(f"{rpath} was written before the {state['pending']} stage was trained and cannot be "
                               f"resumed; start again without --resume")
        model = GlimpseModel.from_checkpoint(ck, dev, source=str(rpath))
        tcfg = TrainConfig.from_dict(ck.get("train_config", {}))
        mcfg = model.config
    elif init is not None:
        model = init
        model.net.to(dev)
        if model.coarse is not None:
            model.coarse.to(dev)
        if model.fine is not None:
            model.fine.to(dev)
        mcfg = model.config
    else:
        mcfg = model_config or ModelConfig(n_landmarks=len(dataset.landmark_names))
        if mcfg.n_landmarks != len(dataset.landmark_names):
            mcfg = replace(mcfg, n_landmarks=len(dataset.landmark_names))
        torch.manual_seed(tcfg.seed)
        net = GlimpseModelNet(mcfg)
        model = None  # built once the data's statistics are known
    return model, net, mcfg, tcfg, state


def _glimpse_stage(model: GlimpseModel, data: "TrainingData", tcfg: TrainConfig, opt, gen: torch.Generator,
                   step: int, elapsed0: float, history: list, rpath: Path, out: Path, val: Dataset | None, run: _Run,
                   time_budget_s: float | None, max_steps: int | None) -> tuple[int, float, str]:
    """The glimpse net's training (from ``step`` / ``elapsed0`` on resume) with resume points every
    ``save_every_s`` (validated when there is a set) and an early first one; ``history`` gets the
    records. Returns the steps, the seconds and why it stopped (``budget`` or ``cancelled``)."""
    dev, net, mcfg = run.dev, model.net, model.config
    stack = data.stack.to(dev)
    truth = data.truth.to(dev)
    present = None if bool(data.present.all()) else data.present.to(dev)
    shapes = torch.as_tensor(data.shapes, dtype=torch.float32, device=dev)
    mean = torch.as_tensor(model.mean_start, dtype=torch.float32, device=dev)
    std = torch.as_tensor(model.std_start, dtype=torch.float32, device=dev) * tcfg.start_std_scale
    if max_steps is not None:
        tcfg = replace(tcfg, max_steps=max_steps)
        model.train_config = tcfg.to_dict()
    max_steps = tcfg.max_steps
    if max_steps is None and time_budget_s is None:
        raise GlimpseError("give a step limit or a time budget")

    saved = [False]

    def save_point(info: dict, bar) -> None:  # a resume point, with validation when there is a set
        rec = dict(info)
        if val is not None:
            net.eval()
            rec["val_mre_mm"] = evaluate_model(model, val, progress=False)["overall"]["mre_mm"]
            net.train()
            bar.write(f"step {info['step']}: val MRE {rec['val_mre_mm']:.2f} mm")
        history.append(rec)
        _save_resume(rpath, model, opt, info["step"], info["elapsed_s"], gen, history)
        saved[0] = True

    def early_point(info: dict, bar) -> None:  # a first resume point early (no validation, no history record)
        if not saved[0]:
            _save_resume(rpath, model, opt, info["step"], info["elapsed_s"], gen, history)
            saved[0] = True

    distributed.broadcast_state(net)
    synced = distributed.synced_batchnorm(net)
    try:
        res = loop.run(lambda frac: train_step(net, opt, mcfg, tcfg, stack, truth, shapes, mean, std, gen, present),
                       opt, lambda frac: learning_rate(tcfg, frac), stage="glimpse", time_budget_s=time_budget_s,
                       max_steps=max_steps, progress=run.progress, callback=run.callback, should_stop=run.should_stop,
                       hooks=[loop.Hook(tcfg.save_every_s, save_point), loop.Hook(FIRST_RESUME_S, early_point)],
                       loss_key="loss_mm", loss_scale=mcfg.offset_unit * model.pixel_spacing, loss_unit=" mm",
                       step0=step, elapsed0=elapsed0, writes=str(out), stage_key=False)
    finally:
        distributed.plain_batchnorm(synced)
    step, elapsed, stopped = res.step, res.elapsed_s, "cancelled" if res.stopped == "cancelled" else "budget"
    net.eval()
    rec = {"step": step, "elapsed_s": elapsed, "loss_mm": res.loss, "stopped": stopped}
    if val is not None:
        rec["val_mre_mm"] = evaluate_model(model, val, progress=False)["overall"]["mre_mm"]
    history.append(rec)
    return step, elapsed, stopped


@dataclass(frozen=True)
class _Plan:
    """Which heatmap stages one :func:`train` call trains (``want_*``) or fine-tunes in ``init``
    (``tune_*``), with their configurations (``fine_kinds``: the windows the fine nets read)."""

    want_coarse: bool
    tune_coarse: bool
    coarse_config: CoarseConfig | None
    want_fine: bool
    tune_fine: bool
    fine_config: FineConfig | None
    fine_kinds: list


def _plan_stages(dataset: Dataset, tcfg: TrainConfig, init: GlimpseModel | None, state: dict | None, coarse: Any,
                 coarse_config: CoarseConfig | None, fine: Any, fine_config: FineConfig | None) -> _Plan:
    """:func:`train`'s heatmap stages: ``coarse`` / ``fine`` are truthy when a budget or steps were
    given; none on resume (``state``); a stage ``init`` has is fine-tuned rather than trained anew."""
    want_coarse = bool(coarse) and state is None
    tune_coarse = want_coarse and init is not None and init.coarse is not None
    if tune_coarse:
        coarse_config = members_of(init.coarse)[0].cfg
    elif want_coarse:
        coarse_config = coarse_config or CoarseConfig(n_landmarks=len(dataset.landmark_names), seed=tcfg.seed)
    want_fine = bool(fine) and state is None
    tune_fine = want_fine and init is not None and init.fine is not None
    if want_fine and not (want_coarse or (init is not None and init.coarse is not None)):
        raise GlimpseError("a fine stage needs a coarse stage: give a coarse budget too")
    fine_kinds: list[FineConfig] = []  # the windows the fine nets to train read
    if tune_fine:
        fine_kinds = [m.cfg for m in members_of(init.fine)]
    elif want_fine:
        fine_config = fine_config or FineConfig(n_landmarks=len(dataset.landmark_names), seed=tcfg.seed,
                                                pixel_spacing=dataset.pixel_spacing)
        fine_kinds = [fine_config]
    return _Plan(want_coarse, tune_coarse, coarse_config, want_fine, tune_fine, fine_config, fine_kinds)


def _the_model(model: GlimpseModel | None, net: GlimpseModelNet, mcfg: ModelConfig, dataset: Dataset,
               data: "TrainingData", tcfg: TrainConfig, meta: dict | None, dev: torch.device) -> GlimpseModel:
    """The model :func:`train` trains: ``_begin``'s (resumed, or ``init``'s), its train config and
    meta brought up to date, or a new one around ``net`` with the data's start statistics."""
    if model is not None:
        model.train_config = tcfg.to_dict()
        if meta:
            model.meta.update(meta)
        return model
    truth = data.truth.numpy().astype(np.float64)
    shape = tuple(int(v) for v in np.median(data.shapes, axis=0))
    auto = levels_for(shape, mcfg.patch)
    m = dict(meta or {})
    m.update({"train_image_shape": list(shape), "auto_levels": auto, "n_train_images": len(dataset),
              "train_images": [p.name for p in dataset.image_paths],
              "landmark_set": of_data(dataset).to_dict()})
    return GlimpseModel(net.to(dev), dataset.landmark_names, dataset.pixel_spacing,
                        *start_statistics(truth, dataset.landmark_names), tcfg.to_dict(), m)


def train(
    dataset: Dataset, out: str | os.PathLike, model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None, device: str = "auto", time_budget_s: float | None = None,
    resume: bool = False, init: GlimpseModel | None = None,
    val: Dataset | None = None, progress: bool = True, callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None, meta: dict | None = None, max_steps: int | None = None,
    coarse_budget_s: float | None = None, coarse_config: CoarseConfig | None = None, coarse_steps: int | None = None,
    fine_budget_s: float | None = None, fine_config: FineConfig | None = None, fine_steps: int | None = None,
) -> GlimpseModel:
    """Train a glimpse model on ``dataset`` and write it to ``out``.

    Training stops at ``train_config.max_steps`` or after ``time_budget_s`` seconds of wall time
    (whichever comes first; the learning-rate schedule follows the nearer one), or when
    ``should_stop()`` returns True. Every ``save_every_s`` a resumable state is written to
    ``out + '.resume'``; ``resume=True`` continues from it. ``init`` starts from an existing model
    (fine-tuning); ``max_steps`` overrides the step limit (also on resume). ``callback`` receives
    a dict per step.

    ``coarse_budget_s``: first train a coarse stage (:mod:`napari_glimpse.coarse`, all landmarks
    from a whole-image view) for that many seconds and attach it, so the glimpses start from its
    answer; the glimpse budget ``time_budget_s`` comes after it. Not repeated on resume.
    ``coarse_steps`` caps its steps (with no ``coarse_budget_s``, the cap alone). When ``init``
    has a coarse stage, that stage is fine-tuned instead (each net of an ensemble for its share
    of the budget and ``coarse_steps`` steps, at a tenth of its learning rate).

    ``fine_budget_s`` / ``fine_steps``: then train the fine stage (:mod:`napari_glimpse.fine`,
    a closer look around each coarse answer) the same way, or fine-tune ``init``'s. A fine stage
    needs a coarse stage (trained here or in ``init``).

    Under torchrun every process calls this alike (:mod:`napari_glimpse.distributed`): each trains
    on its share of every batch (the batch sizes are the global batches), rank 0 alone shows
    progress, validates and writes ``out`` and the resume points, and the others wait for it
    before returning. ``meta['world_size']`` records how many processes trained.
    """
    if not distributed.is_main():
        progress, val = False, None
    out, rpath, dev, tcfg = Path(out), resume_path(out), resolve_device(device), train_config or TrainConfig()
    model, net, mcfg, tcfg, state = _begin(dataset, rpath, model_config, tcfg, dev, resume, init)
    plan = _plan_stages(dataset, tcfg, init, state, coarse_budget_s or coarse_steps, coarse_config,
                        fine_budget_s or fine_steps, fine_config)
    data = TrainingData(dataset, mcfg.n_levels, mcfg.patch, tcfg.ground_truth, progress=progress,
                        coarse=plan.coarse_config if plan.want_coarse else None, fine=plan.fine_kinds or None)
    if min(data.shapes.min(axis=0)) < mcfg.patch:
        raise GlimpseError("an image is smaller than one glimpse")
    model = _the_model(model, net, mcfg, dataset, data, tcfg, meta, dev)
    check_match(model.landmark_set, dataset.landmark_set, len(dataset.landmark_names), "the training data")
    model.net.train()
    opt, gen = torch.optim.Adam(model.net.parameters(), lr=tcfg.lr), torch.Generator().manual_seed(tcfg.seed)
    run = _Run(progress, callback, should_stop, dev, tcfg.save_every_s)
    _heatmap_stages(plan, model, data, init, (coarse_budget_s, coarse_steps), (fine_budget_s, fine_steps), val, run,
                    lambda pending=None: _save_resume(rpath, model, opt, 0, 0.0, gen, [], pending=pending))
    step, elapsed0, history = _resumed_glimpse_state(state, opt, gen)
    step, elapsed, stopped = _glimpse_stage(model, data, tcfg, opt, gen, step, elapsed0, history, rpath, out, val,
                                            run, time_budget_s, max_steps)
    model.meta.update({"train_steps": step, "train_wall_s": elapsed, "history": history,
                       "train_device": str(dev), "torch": str(torch.__version__), "stopped": stopped,
                       "world_size": distributed.world_size()})
    _write(model, out, rpath, opt, gen, step, elapsed, history)
    return model


def _write(model: GlimpseModel, out: Path, rpath: Path, opt, gen: torch.Generator, step: int, elapsed: float,
           history: list) -> None:
    """The last resume point, then ``out`` (rank 0), every rank waiting for it. A model tuned from
    a float16 file (``train --init`` the shipped model) is written so too (:meth:`GlimpseModel.save`)."""
    _save_resume(rpath, model, opt, step, elapsed, gen, history)
    if distributed.is_main():
        model.save(out)
    distributed.barrier()


def _heatmap_stages(plan: _Plan, model: GlimpseModel, data: "TrainingData", init: GlimpseModel | None,
                    coarse: tuple, fine: tuple, val: Dataset | None, run: _Run, save_point: Callable) -> None:
    """:func:`train`'s coarse then fine stage as ``plan`` says, each with its ``(budget_s, steps)``
    and followed by a resume point (``save_point(pending)``; the fine stage pending after the coarse)."""
    if plan.want_coarse:
        _heatmap_stage("coarse", model, data, init.coarse if plan.tune_coarse else None, plan.coarse_config,
                       *coarse, val, run)
        data.views = None
        save_point(pending="fine" if plan.want_fine else None)
    if plan.want_fine:
        _heatmap_stage("fine", model, data, init.fine if plan.tune_fine else None, plan.fine_config, *fine, val, run)
        data.fine_levels = None
        save_point()


def _resumed_glimpse_state(state: dict | None, opt, gen: torch.Generator) -> tuple[int, float, list]:
    """The glimpse stage's step, elapsed time and history from a resume point's ``state`` (its
    optimiser and generator restored), or a fresh start's."""
    if state is None:
        return 0, 0.0, []
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["rng"])
    return int(state["step"]), float(state["elapsed_s"]), list(state.get("history", []))


def predict_dataset(model: GlimpseModel, dataset: Dataset, iterations: int | None = None, starts: int = 1,
                    progress: bool = True, facing: str = "auto", mirror: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Predict every image of a dataset: ``(N, K, 2)`` positions and ``(N, K)`` uncertainty (mm),
    each image at the set's ``pixel_spacing``.

    ``mirror`` flips each image left-right before predicting and maps the answer back to the
    unflipped image, so it compares with the original labels (the facing-left check).
    """
    from tqdm.auto import tqdm

    preds, unc = [], []
    for i in tqdm(range(len(dataset)), desc="predict", disable=not progress, leave=False):
        img = dataset.image(i)
        dataset.check_inside(i, img.shape)
        if mirror:
            img = np.ascontiguousarray(img[:, ::-1])
        # at the set's spacing (resampled to the model's when they differ; answers in the image's pixels)
        tr = model.predict(img, iterations=iterations, starts=starts, facing=facing, spacing=dataset.pixel_spacing)
        final = mirror_points(tr.final, img.shape[1]) if mirror else tr.final
        if not np.isfinite(final).all():  # no NaN in predictions or metrics
            raise GlimpseError(f"{dataset.image_paths[i].name}: the model's answer is not a finite number (NaN)")
        preds.append(final)
        unc.append(tr.uncertainty_mm)
    return np.stack(preds), np.stack(unc)


def evaluate_model(model: GlimpseModel, dataset: Dataset, iterations: int | None = None, starts: int = 1,
                   ground_truth: str = "mean", progress: bool = True, facing: str = "auto",
                   mirror: bool = False) -> dict:
    """Predict a labelled dataset and summarise errors (see :func:`metrics.summarize`).

    Absent ground-truth landmarks (NaN) are left out of the statistics: MRE and SDR are over the
    present points (``n``), the absent ones counted in ``n_absent`` (``errors_mm`` is NaN there).
    ``mirror`` flips every image left-right and the labels with it (the facing-left check).
    """
    from .metrics import radial_errors, summarize

    t = time.perf_counter()
    preds, _ = predict_dataset(model, dataset, iterations, starts, progress, facing, mirror)
    dt = time.perf_counter() - t
    err = radial_errors(preds, dataset.ground_truth(ground_truth), dataset.pixel_spacing)
    out = summarize(err, model.landmark_names)
    out["seconds_per_image"] = dt / len(dataset)
    out["n_images"] = len(dataset)
    out["predictions"] = preds
    out["errors_mm"] = err
    return out
