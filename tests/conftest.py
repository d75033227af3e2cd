"""Shared fixtures: synthetic cephalogram-like data sets and a tiny trained model.

Everything runs on one CPU thread (the machines have two cores and often train in the
background); models are tiny (3 landmarks, 3 pyramid levels, width 8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
# Loading torch._dynamo (and with it triton) once a napari canvas exists segfaults on machines
# whose OpenGL is Mesa's llvmpipe. Fixtures train in-process, and the first optimizer imports
# torch._dynamo: do it now, before any GUI test opens a canvas, whatever order tests run in
# (without ../shared the real-data fixtures skip, and a canvas comes before the first training).
# The plugin itself trains in a subprocess (tests/_qt/test_no_segfault.py checks its widgets).
import torch._dynamo  # noqa: E402,F401

from napari_glimpse.io import landmark_columns  # noqa: E402
from napari_glimpse.model import ModelConfig  # noqa: E402
from napari_glimpse.training import TrainConfig  # noqa: E402

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2015"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/NAME.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod

# Synthetic landmarks: three bright blobs of different shapes and sizes, each jittered around
# its own mean position (as landmarks are on real cephalograms).
SYN_SIZE = 256
SYN_MEANS = np.array([[80.0, 80.0], [176.0, 96.0], [128.0, 180.0]])
SYN_JITTER = 40.0


def draw_blob(img: np.ndarray, k: int, x: float, y: float) -> None:
    """Draw landmark ``k``'s blob centred on (x, y) (x = column, y = row), in place."""
    h, w = img.shape
    yy, xx = np.mgrid[:h, :w]
    dx, dy = xx - x, yy - y
    if k == 0:  # filled disc, radius 7
        mask = dx**2 + dy**2 <= 7**2
    elif k == 1:  # hollow square, 17 px side, 3 px wall
        a = np.maximum(np.abs(dx), np.abs(dy))
        mask = (a <= 8.5) & (a >= 5.5)
    else:  # plus sign, arms 11 px, 3 px thick
        mask = ((np.abs(dx) <= 1.5) & (np.abs(dy) <= 11.5)) | ((np.abs(dy) <= 1.5) & (np.abs(dx) <= 11.5))
    img[mask] = 230


def synthetic_image(coords: np.ndarray, rng: np.random.Generator, size: int = SYN_SIZE) -> np.ndarray:
    """A dark noisy ``size x size`` uint8 image with one blob per landmark at ``coords`` (K, 2)."""
    img = rng.normal(40, 8, size=(size, size)).clip(0, 255)
    for k, (x, y) in enumerate(coords):
        draw_blob(img, k, x, y)
    return img.astype(np.uint8)


def synthetic_coords(n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 3, 2)`` integer landmark positions around :data:`SYN_MEANS`."""
    c = SYN_MEANS[None] + rng.uniform(-SYN_JITTER, SYN_JITTER, size=(n, len(SYN_MEANS), 2))
    return np.round(c)


def save_png(path: Path, img: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def write_csv(path: Path, names, coords: np.ndarray, fmt: str = "{:g}") -> Path:
    """Write a Kaggle-layout CSV by hand (independently of the package's writer)."""
    coords = np.asarray(coords)
    lines = [",".join(landmark_columns(coords.shape[1]))]
    for name, c in zip(names, coords):
        lines.append(",".join([name] + [fmt.format(v) for v in c.reshape(-1)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_kaggle_dataset(root: Path, n: int = 6, split: str = "train", seed: int = 0,
                        size: int = SYN_SIZE, junior_shift: float | None = 2.0,
                        first_id: int = 1) -> dict:
    """Write ``root/images/NNN.png`` and ``root/{split}_senior.csv`` (+ ``_junior.csv``).

    The junior annotator is the senior one shifted by ``junior_shift`` pixels in x (so the
    mean ground truth is the senior + shift / 2). Returns the paths and the coordinates.
    """
    rng = np.random.default_rng(seed)
    coords = synthetic_coords(n, rng)
    names = [f"{first_id + i:03d}.png" for i in range(n)]
    for name, c in zip(names, coords):
        save_png(root / "images" / name, synthetic_image(c, rng, size))
    senior = write_csv(root / f"{split}_senior.csv", names, coords)
    out = {"root": root, "names": names, "senior": coords, "senior_csv": senior,
           "paths": [root / "images" / nm for nm in names]}
    if junior_shift is not None:
        junior = coords + np.array([junior_shift, 0.0])
        out["junior"] = junior
        out["junior_csv"] = write_csv(root / f"{split}_junior.csv", names, junior)
        out["mean"] = (coords + junior) / 2
    else:
        out["mean"] = coords
    return out


@pytest.fixture
def kaggle_dataset(tmp_path):
    """Factory: ``kaggle_dataset(n=6, split='train', seed=0, ...)`` -> dict (see make_kaggle_dataset)."""

    def make(n: int = 6, split: str = "train", seed: int = 0, subdir: str = "data", **kw) -> dict:
        return make_kaggle_dataset(tmp_path / subdir, n=n, split=split, seed=seed, **kw)

    return make


TINY_MODEL_CONFIG = ModelConfig(n_landmarks=3, n_levels=3, width=8, hidden=(64, 32))
TINY_TRAIN_CONFIG = TrainConfig(batch_size=8, max_steps=8, save_every_s=1e9, seed=0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small Kaggle-layout synthetic data set (train: 6 images, test1: 3 images)."""
    root = tmp_path_factory.mktemp("tinydata")
    train = make_kaggle_dataset(root, n=6, split="train", seed=1)
    test = make_kaggle_dataset(root, n=3, split="test1", seed=2, first_id=101)
    return {"root": root, "train": train, "test1": test}


@pytest.fixture(scope="session")
def tiny_model_path(tiny_data, tmp_path_factory):
    """A checkpoint of a tiny model trained for a few steps (accuracy irrelevant)."""
    from napari_glimpse.io import load_dataset
    from napari_glimpse.training import train

    out = tmp_path_factory.mktemp("tinymodel") / "tiny.pt"
    ds = load_dataset(tiny_data["root"], "train")
    train(ds, out, TINY_MODEL_CONFIG, TINY_TRAIN_CONFIG, device="cpu", progress=False)
    return out


@pytest.fixture
def tiny_model(tiny_model_path):
    """A fresh :class:`GlimpseModel` loaded from the tiny checkpoint (safe to modify)."""
    from napari_glimpse.inference import GlimpseModel

    return GlimpseModel.load(tiny_model_path, device="cpu")


# A coarse stage and a fine ensemble with hand-set weights (tests/test_int8.py, the CLI's quantize).
TINY_COARSE_CONFIG = {"n_landmarks": 3, "input_hw": (64, 48), "width": 4, "batch_size": 4}
TINY_FINE_CONFIG = {"n_landmarks": 3, "level": 1, "patch": 32, "width": 4, "batch_size": 8, "context": 2,
                    "jitter_mm": (0.5, 2.0)}


def blob_finder(net: torch.nn.Module, gain: float = 3.0) -> torch.nn.Module:
    """Set a coarse or fine U-Net's weights by hand so that it finds the brightest blob: every
    landmark's logits are ``gain`` times the (first) input channel's brightness above a threshold,
    box-blurred (one path through the net: stem, first up block, head; every other weight 0,
    batch norms the identity). Random weights would do for the nets' outputs, but their heatmaps
    are flat enough that tiny changes of the logits move the answers by the whole image; these
    nets' answers are well posed: on an image with one bright disc, every landmark goes to it."""
    from torch import nn

    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
        box = torch.full((3, 3), 1 / 9)
        net.stem[0][0].weight[0, 0] = box
        net.stem[0][1].bias[0] = 1.0  # the threshold: background (-1.4 once normalised) stays below 0
        net.stem[1][0].weight[0, 0] = box
        up = net.up[0][0][0]  # reads the upsampled deeper features, then the stem's
        up.weight[0, up.in_channels - net.stem[1][0].out_channels] = box
        net.up[0][1][0].weight[0, 0] = box
        net.head.weight[:, 0] = gain
    return net.eval()


def add_blob_stages(model):
    """Give ``model`` a blob-finding coarse net and a fine ensemble of two (3 nets); returns it."""
    from napari_glimpse.coarse import CoarseConfig, CoarseNet
    from napari_glimpse.fine import FineConfig, FineEnsemble, FineNet

    model.coarse = blob_finder(CoarseNet(CoarseConfig(**TINY_COARSE_CONFIG)))
    fine = FineConfig(**TINY_FINE_CONFIG)
    model.fine = FineEnsemble([blob_finder(FineNet(fine)), blob_finder(FineNet(fine), gain=2.0)])
    model.meta["iterations"] = 0  # the coarse and fine stages' answer
    return model


@pytest.fixture(scope="session")
def tiny_staged_model_path(tiny_model_path, tmp_path_factory):
    """The tiny model with a blob-finding coarse stage and fine ensemble (3 nets), no int8 graphs."""
    from napari_glimpse.inference import GlimpseModel

    out = tmp_path_factory.mktemp("tinystaged") / "staged.pt"
    add_blob_stages(GlimpseModel.load(tiny_model_path, device="cpu", int8=False)).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_quantized_model_path(tiny_staged_model_path, tiny_data, tmp_path_factory):
    """:func:`tiny_staged_model_path` with int8 graphs for its 3 nets (calibrated on 2 training images)."""
    from napari_glimpse.inference import GlimpseModel
    from napari_glimpse.int8 import quantize

    out = tmp_path_factory.mktemp("tinyint8") / "int8.pt"
    model = GlimpseModel.load(tiny_staged_model_path, device="cpu", int8=False)
    assert quantize(model, tiny_data["train"]["paths"][:2]) == 3
    model.save(out)
    return out


def randomise_weights(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights (batch-norm variances positive), in eval mode: nets whose outputs vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                r = torch.randn(v.shape, generator=g)
                v.copy_(r.abs() + 0.5 if k.endswith("running_var") else r * 0.3)
    return net.eval()
