"""The first landmarks layer of a viewer shows without napari building in one frame what can be built
ahead: its labels' glyphs load a few per event-loop turn, and its visuals' shaders are built one a
turn while it is hidden, so the frame that shows it builds no shader program."""

from __future__ import annotations

from ._env import require_gui

require_gui()


def test_load_glyphs_in_turns(make_napari_viewer):
    from napari_glimpse._widgets._state import _label_font, load_glyphs

    viewer = make_napari_viewer(show=True)
    font = _label_font(viewer)
    assert font is not None
    chars = "".join(c for c in "QXZqxz#%" if c not in font._glyphs)
    assert len(chars) >= 2
    assert load_glyphs(viewer, chars, budget_s=0.0)  # one glyph a call: some remain
    assert sum(c in font._glyphs for c in chars) == 1
    while load_glyphs(viewer, chars, budget_s=0.0):
        pass
    assert all(c in font._glyphs for c in chars)
    assert not load_glyphs(viewer, chars)  # nothing left to load


def test_first_points_frame_builds_no_shader(make_napari_viewer, qtbot, isbi, isbi_model_path, monkeypatch):
    from vispy.visuals.shaders.program import ModularProgram

    from napari_glimpse._widgets._detect import DetectWidget
    from napari_glimpse._widgets._state import _label_font

    viewer = make_napari_viewer(show=True)
    viewer.open(str(isbi / "images" / "151.jpg"), plugin="napari-glimpse")
    detect = DetectWidget(viewer)
    detect.set_model(isbi_model_path)
    detect.device_combo.setCurrentText("cpu")

    shown: list = []  # set once the new layer is made visible
    builds_after: list = []
    build = ModularProgram._build

    def counting_build(self):
        if shown:
            builds_after.append(self)
        return build(self)

    monkeypatch.setattr(ModularProgram, "_build", counting_build)
    show = DetectWidget._show_new_points

    def showing(self, job):
        font = _label_font(self.viewer)
        labels = "".join(job["new_layer"].features["label"])
        assert all(c in font._glyphs for c in labels), "labels shown before their glyphs loaded"
        shown.append(True)
        show(self, job)

    monkeypatch.setattr(DetectWidget, "_show_new_points", showing)
    with qtbot.waitSignal(detect.detected, timeout=120_000) as b:
        detect.detect(start=False).start()
    det = b.args[0]
    qtbot.wait(200)  # its first frames drawn
    assert shown and det.points_layer.visible and det.points_layer.text.visible
    assert len(det.points_layer.data) == 19
    assert builds_after == []
