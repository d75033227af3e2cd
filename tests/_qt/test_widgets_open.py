"""`napari -w napari-glimpse`: every widget in the manifest opens in a real viewer."""

from __future__ import annotations

from ._env import require_gui

require_gui()

WIDGETS = ("Detect landmarks", "Glimpse explorer", "Review and corrections", "Fine-tune", "Measurements", "Annotate",
           "Train a model")


def test_manifest_lists_the_four_widgets():
    from npe2 import PluginManifest

    mf = PluginManifest.from_distribution("napari-glimpse")
    assert tuple(w.display_name for w in mf.contributions.widgets) == WIDGETS


def test_every_widget_opens_from_the_plugin_menu(make_napari_viewer):
    viewer = make_napari_viewer()
    for name in WIDGETS:
        dock, widget = viewer.window.add_plugin_dock_widget("napari-glimpse", name)
        assert widget is not None
        assert dock.name.startswith(name)
    assert len(viewer.window.dock_widgets) >= len(WIDGETS)
