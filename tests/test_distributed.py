"""Training on torch.distributed (napari_glimpse.distributed): 2 processes on the CPU (gloo).

Two processes that each take half of a global batch of 2b compute the gradient of one process
with that batch of 2b, for each stage: the coarse and fine nets (the shipped model's kind) and
the glimpse net. Batch norms take their statistics over the whole global batch when several
processes train (``SyncedBatchNorm2d``), so the comparison is with the nets in training mode,
batch-norm statistics included; the 2b samples are the same ones (every rank draws the global
batch and keeps its share). ``torchrun`` itself then trains (``train --recipe``, tiny nets) and
fine-tunes a model that records ``world_size`` 2 and predicts. Everything here is synthetic.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from napari_glimpse.coarse import CoarseConfig
from napari_glimpse.fine import FineConfig
from napari_glimpse.model import ModelConfig
from napari_glimpse.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "src" / "napari_glimpse" / "recipes"
BATCH = 8  # the global batch of every stage: 4 per process with 2
STAGES = ("coarse", "fine", "glimpse")  # the order train() trains them in


def first_step_gradients(data: Path, out: Path, batch: int = BATCH) -> dict[str, list[torch.Tensor]]:
    """Train a tiny coarse, fine (with every random augmentation) and glimpse
    net for one step each (:func:`train`) and return each optimizer's gradients as it steps (after
    the all-reduce, under torch.distributed)."""
    from napari_glimpse.io import load_dataset
    from napari_glimpse.training import train

    grads: list[list[torch.Tensor]] = []

    def hook(opt, args, kwargs) -> None:
        grads.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None])

    ds = load_dataset(data, "train")
    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(ds, out, ModelConfig(n_landmarks=3, n_levels=3, width=8, hidden=(32, 16)),
              TrainConfig(batch_size=batch, save_every_s=1e9), device="cpu", progress=False, max_steps=1,
              coarse_steps=1, coarse_config=CoarseConfig(n_landmarks=3, input_hw=(64, 48), width=4, batch_size=batch),
              fine_steps=1, fine_config=FineConfig(n_landmarks=3, patch=32, width=4, batch_size=batch, context=2,
                                                   jitter_mm=(0.5, 2.0)))
    finally:
        handle.remove()
    assert len(grads) == len(STAGES)
    return dict(zip(STAGES, grads))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, data: str, out: str) -> None:
    """One of ``world`` processes (torch.multiprocessing.spawn): what torchrun would set, then train."""
    from napari_glimpse import distributed
    from napari_glimpse.errors import GlimpseError
    from napari_glimpse.recipe import build

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    with distributed.session("cpu"):
        assert distributed.world_size() == world and distributed.rank() == rank
        grads = first_step_gradients(Path(data), Path(out) / f"model_{rank}.pt")  # rank 1 must write nothing
        try:  # a glimpse-only recipe's loop is not data-parallel: refused, not trained N times over
            build("glimpse", Path(data), Path(out) / "glimpse.pt", progress=False)
        except GlimpseError as exc:
            grads["refused"] = str(exc)
    torch.save(grads, Path(out) / f"grads_{rank}.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import make_kaggle_dataset

    root = tmp_path_factory.mktemp("distdata")
    make_kaggle_dataset(root, n=4, split="train", seed=3)
    return root


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> dict:
    """Each rank's first-step gradients with 2 processes x batch 4 (a global batch of 8)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist2")
    mp.spawn(_rank, args=(2, _free_port(), str(data), str(out)), nprocs=2, join=True)
    return {r: torch.load(out / f"grads_{r}.pt") for r in range(2)} | {"written": sorted(p.name for p in out.iterdir())}


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> dict:
    """One process, a batch of 8 (the same samples), and of 4 (rank 0's share alone)."""
    tmp = tmp_path_factory.mktemp("dist1")
    return {8: first_step_gradients(data, tmp / "m8.pt"), 4: first_step_gradients(data, tmp / "m4.pt", batch=4)}


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest difference of two gradients, per tensor, relative to the tensor's norm plus a
    hundredth of the largest tensor's (a heatmap head's bias has a gradient of 0, a softmax being
    blind to a constant: float rounding alone moves it)."""
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    floor = 0.01 * max(float(y.norm()) for y in b)
    return max(float((x - y).norm()) / (float(y.norm()) + floor) for x, y in zip(a, b))


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_give_the_one_process_gradient(stage, two_processes, one_process):
    g2, g1 = two_processes[0][stage], one_process[8][stage]
    assert all(torch.equal(x, y) for x, y in zip(g2, two_processes[1][stage]))  # one all-reduced gradient
    assert sum(float(x.norm()) for x in g1) > 0
    assert _relative(g2, g1) < 1e-4
    # the tolerance means something: half the batch (rank 0's share alone) is far from it
    assert _relative(one_process[4][stage], g1) > 1e-2


def test_only_rank_0_writes(two_processes):
    assert two_processes["written"] == ["grads_0.pt", "grads_1.pt", "model_0.pt", "model_0.pt.resume"]


def test_a_glimpse_only_recipe_is_refused(two_processes):
    assert "trains in one process" in two_processes[0]["refused"] and "refused" in two_processes[1]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_glimpse", *args]
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_torchrun_trains_and_finetunes_a_model_that_predicts(data, tmp_path):
    """``torchrun --standalone --nproc_per_node 2 -m napari_glimpse train --recipe R --max-steps 2``
    (tiny coarse and fine nets), then ``finetune`` the same way; each model says world_size 2, and
    the tuned one predicts; rank 0 alone reports."""
    from napari_glimpse.inference import GlimpseModel

    content = json.loads((RECIPES / "default.json").read_text())
    coarse, fine = content["stages"][0], content["stages"][1]
    coarse["config"].update(input_hw=[64, 48], width=4, batch_size=4)
    fine["config"].update(patch=32, width=4, batch_size=8, context=2)
    content.update(name="tiny", stages=[coarse, fine])
    content["model"].update(n_levels=3, width=8, hidden=[32, 16])
    content["quantize"].update(int8=False, half_weights=False)
    (tmp_path / "tiny.json").write_text(json.dumps(content))
    run = _torchrun("train", "--recipe", "tiny.json", "--data", str(data), "--out", "m.pt", "--max-steps", "2",
                    cwd=tmp_path)
    assert run.stdout.count("wrote m.pt") == 1
    model = GlimpseModel.load(tmp_path / "m.pt", "cpu")
    assert model.meta["world_size"] == 2
    assert [s["steps"] for s in model.meta["recipe"]["stages"]] == [2, 2]
    csv = data / "train_senior.csv"
    run = _torchrun("finetune", "--model", "m.pt", "--data", str(csv), "--out", "t.pt", "--max-steps", "2",
                    "--spacing", "0.1", cwd=tmp_path)
    assert run.stdout.count("wrote t.pt") == 1
    tuned = GlimpseModel.load(tmp_path / "t.pt", "cpu")
    assert tuned.meta["finetuned"]["world_size"] == 2 and tuned.meta["finetuned"]["steps"]["fine"] == [2]
    image = sorted((data / "images").iterdir())[0]
    assert np.isfinite(tuned.predict(str(image), spacing=0.1).final).all()
