"""Where the nets run: the torch device asked for (``auto``, ``cpu``, ``cuda``) and bfloat16 autocast."""

from __future__ import annotations

import contextlib

import torch

from .errors import GlimpseError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise GlimpseError(f"unknown device {device!r} (auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GlimpseError("--device cuda asked for, but no CUDA GPU is available")
    return dev


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
