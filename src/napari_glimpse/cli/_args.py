"""Argument types and helpers shared by the commands."""

from __future__ import annotations

import argparse


def positive_float(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def probability(s: str) -> float:
    v = float(s)
    if not 0 <= v <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError("must be a probability, 0 to 1")
    return v


def spacing_text(s: str) -> str:
    """``--spacing``: checked in :func:`main` (one error line, exit 2; see ``spacing.check_spacing``)."""
    return s


def nonnegative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def is_main() -> bool:
    """Rank 0 of a torchrun job (or the only process)."""
    from ..distributed import is_main as main_rank

    return main_rank()


def check_model_out(path) -> None:
    """A model's ``--out`` (train, finetune, quantize) named like an image, a table or a text file
    is refused (one error line) before any work: it would hold a model under a misleading name, or
    write over that file."""
    from pathlib import Path

    from ..errors import GlimpseError
    from ..io import DICOM_SUFFIXES, IMAGE_SUFFIXES

    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES + DICOM_SUFFIXES + (".csv", ".json", ".txt", ".md"):
        raise GlimpseError(f"--out {path}: a model file (e.g. model.pt), not a {suffix} file")
