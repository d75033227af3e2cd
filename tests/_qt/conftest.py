"""Fixtures of the GUI tests: a tiny 19-landmark model trained for two steps on two ISBI images."""

from __future__ import annotations

import pytest

from ._env import gui_missing, require_isbi


@pytest.fixture(scope="session")
def isbi():
    return require_isbi()


@pytest.fixture(scope="session")
def isbi_model_path(isbi, tmp_path_factory):
    """A checkpoint for the real images: 19 landmarks, 6 levels, width 8 (accuracy irrelevant)."""
    if gui_missing():
        pytest.skip(gui_missing())
    import torch

    torch.set_num_threads(1)
    from napari_glimpse.io import load_dataset
    from napari_glimpse.model import ModelConfig
    from napari_glimpse.training import TrainConfig, train

    out = tmp_path_factory.mktemp("isbimodel") / "tiny19.pt"
    ds = load_dataset(isbi, "train").subset([0, 1])
    train(ds, out, ModelConfig(n_landmarks=19, n_levels=6, width=8, hidden=(64, 32)),
          TrainConfig(batch_size=8, max_steps=2, save_every_s=1e9, seed=0), device="cpu", progress=False)
    return out
