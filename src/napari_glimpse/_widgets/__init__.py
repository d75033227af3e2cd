"""napari dock widgets (the only Qt code of napari-glimpse): one module per widget."""
