"""napari-glimpse: cephalometric landmarks with a foveated pyramid glimpse CNN.

The core (this package minus ``_widgets``) imports no Qt::

    from napari_glimpse import GlimpseModel
    model = GlimpseModel.load()              # the default model shipped in the package
    traj = model.predict("151.jpg")          # the whole trajectory
    traj.final                               # (19, 2) x, y in pixels
"""

from .corrections import Correction, CorrectionLog, ReviewState
from .errors import GlimpseError
from .inference import GlimpseModel, Trajectory
from .io import Dataset, load_dataset, read_image, read_landmarks_csv, write_landmarks_csv
from .landmarks import ISBI_LANDMARKS
from .metrics import radial_errors, summarize
from .model import ModelConfig
from .pyramid import Pyramid, build_pyramid
from .training import TrainConfig, evaluate_model, presets, train

__version__ = "0.1.0"

__all__ = [
    "GlimpseError", "GlimpseModel", "Trajectory", "Dataset", "load_dataset", "read_image",
    "read_landmarks_csv", "write_landmarks_csv", "ISBI_LANDMARKS", "radial_errors", "summarize",
    "ModelConfig", "Pyramid", "build_pyramid", "TrainConfig", "evaluate_model", "presets", "train",
    "Correction", "CorrectionLog", "ReviewState", "__version__",
]
