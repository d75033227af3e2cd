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


def test_the_docks_fit_a_laptop_screen(make_napari_viewer):
    """Each dock shrinks to 200 px (then scrolls): the review's five docks together need less than a
    1200-pixel-high screen (they needed 2709 px before, the Review dock alone 655)."""
    from qtpy.QtWidgets import QApplication

    from napari_glimpse._widgets._state import MIN_DOCK_HEIGHT

    viewer = make_napari_viewer()
    for name in ("Detect landmarks", "Review and corrections", "Measurements", "Glimpse explorer", "Fine-tune"):
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-glimpse", name)
        assert widget.minimumSizeHint().height() <= MIN_DOCK_HEIGHT, name
        assert widget.sizeHint().height() > MIN_DOCK_HEIGHT, name  # with room, it opens showing its content
    QApplication.processEvents()
    assert viewer.window._qt_window.minimumSizeHint().height() <= 1200
