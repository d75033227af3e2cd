"""napari-glimpse: cephalometric landmarks with a foveated pyramid glimpse CNN.

The core (this package minus ``_widgets``) imports no Qt::

    from napari_glimpse import GlimpseModel
    model = GlimpseModel.load()              # the default model shipped in the package
    traj = model.predict("151.jpg")          # the whole trajectory
    traj.final                               # (19, 2) x, y in pixels

Importing the package (or its napari reader, writer and sample data) does not import torch:
the names below are loaded from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "GlimpseError": "errors",
    "GlimpseModel": "inference",
    "Trajectory": "inference",
    "Dataset": "io",
    "load_dataset": "io",
    "read_image": "io",
    "read_landmarks_csv": "io",
    "write_landmarks_csv": "io",
    "ISBI_LANDMARKS": "landmarks",
    "radial_errors": "metrics",
    "summarize": "metrics",
    "ModelConfig": "model",
    "Pyramid": "pyramid",
    "build_pyramid": "pyramid",
    "TrainConfig": "training",
    "evaluate_model": "training",
    "presets": "training",
    "train": "training",
    "Correction": "corrections",
    "CorrectionLog": "corrections",
    "ReviewState": "corrections",
}

__all__ = [
    "GlimpseError",
    "GlimpseModel",
    "Trajectory",
    "Dataset",
    "load_dataset",
    "read_image",
    "read_landmarks_csv",
    "write_landmarks_csv",
    "ISBI_LANDMARKS",
    "radial_errors",
    "summarize",
    "ModelConfig",
    "Pyramid",
    "build_pyramid",
    "TrainConfig",
    "evaluate_model",
    "presets",
    "train",
    "Correction",
    "CorrectionLog",
    "ReviewState",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_glimpse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the real imports
    from .corrections import Correction, CorrectionLog, ReviewState
    from .errors import GlimpseError
    from .inference import GlimpseModel, Trajectory
    from .io import Dataset, load_dataset, read_image, read_landmarks_csv, write_landmarks_csv
    from .landmarks import ISBI_LANDMARKS
    from .metrics import radial_errors, summarize
    from .model import ModelConfig
    from .pyramid import Pyramid, build_pyramid
    from .training import TrainConfig, evaluate_model, presets, train
