"""Importing the package, its reader, writer or sample data does not import torch (nor Qt)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import napari_glimpse


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("code", [
    "import napari_glimpse",
    "from napari_glimpse import _reader, _writer, _sample_data",
    "from napari_glimpse import GlimpseError, ISBI_LANDMARKS, read_landmarks_csv",
])
def test_light_imports_do_not_load_torch(code):
    mods = _modules_after(code)
    assert "napari_glimpse" in mods
    assert "torch" not in mods
    assert not any(m.startswith(("qtpy", "PyQt5")) for m in mods)


def test_public_names_resolve_lazily():
    for name in napari_glimpse.__all__:
        assert getattr(napari_glimpse, name) is not None
    assert "GlimpseModel" in dir(napari_glimpse)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        napari_glimpse.nope  # noqa: B018


def test_python_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "napari_glimpse", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "predict" in out.stdout
