"""GUI tests of the napari widgets (skipped without napari, pytest-qt or a display)."""
