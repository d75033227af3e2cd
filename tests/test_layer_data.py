"""What the widgets draw (napari_glimpse._layer_data): geometry against the sampler, styling,
tiles and animation files. Headless: no Qt, no napari."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_glimpse import _layer_data as ld
from napari_glimpse.glimpse import PyramidStack, sample_glimpses
from napari_glimpse.inference import Trajectory
from napari_glimpse.pyramid import build_pyramid


def world_of_pixel(j_row, j_col, scale, translate):
    """napari: pixel (r, c) of an image layer sits at translate + (r, c) * scale (y, x)."""
    return translate[0] + j_row * scale[0], translate[1] + j_col * scale[1]


@pytest.mark.parametrize("level", [0, 1, 2])
def test_glimpse_layer_placement_matches_the_sampler(level):
    # image whose value encodes the column (x) at level 0: bilinear sampling of a linear ramp is exact
    h, w, p = 256, 256, 16
    xx = np.tile(np.arange(w, dtype=np.float64), (h, 1))
    img = (xx % 256).astype(np.uint8)
    pyr = build_pyramid(img, 3, p)
    stack = PyramidStack([pyr])
    c = torch.tensor([[120.0, 100.0]])
    g = sample_glimpses(stack, torch.zeros(1, dtype=torch.long), c, p)[0, level].numpy()
    scale, tr = ld.glimpse_placement((120.0, 100.0), level, p)
    assert scale == (2.0**level, 2.0**level)
    # level-l pixel j sits at j * 2**l at full resolution: the pyramid of a ramp x is ~ the ramp
    # itself away from the borders, so patch pixel (r, col) must hold ~ its world x
    for r, col in [(0, 0), (p // 2, p // 2), (p - 1, 3), (5, p - 1)]:
        y, x = world_of_pixel(r, col, scale, tr)
        assert abs(g[r, col] - x) < 1.01, (level, r, col, g[r, col], x)
    # and the patch centre is the glimpse centre
    y0, x0 = world_of_pixel((p - 1) / 2, (p - 1) / 2, scale, tr)
    assert (x0, y0) == pytest.approx((120.0, 100.0))


def test_heatmap_and_box_cover_the_patch():
    c, lv, p, cells = (500.0, 700.0), 2, 64, 8
    (sy, sx), (ty, tx) = ld.heatmap_placement(c, lv, p, cells)
    assert sy == sx == p / cells * 4
    # cell centres span the patch symmetrically around the glimpse centre
    first_x, last_x = tx, tx + (cells - 1) * sx
    assert (first_x + last_x) / 2 == pytest.approx(c[0])
    assert (ty + ty + (cells - 1) * sy) / 2 == pytest.approx(c[1])
    # the cells tile the patch's square exactly: half a cell from each edge
    box = ld.glimpse_box(c, lv, p)
    assert box[:, 1].min() == pytest.approx(first_x - sx / 2)
    assert box[:, 1].max() == pytest.approx(last_x + sx / 2)
    assert box[:, 1].max() - box[:, 1].min() == pytest.approx(p * 2**lv)


def make_traj(k=3, t=2, levels=3, p=16, channels=4):
    rng = np.random.default_rng(0)
    pos = np.cumsum(rng.normal(size=(t + 1, k, 2)) * 10, axis=0) + 100
    return Trajectory(
        positions=pos,
        uncertainty_mm=np.array([0.5, 3.0, 10.0])[:k],
        landmark_names=("Sella", "Nasion", "Foo")[:k],
        pixel_spacing=0.1,
        image_shape=(300, 400),
        patch=p,
        glimpses=rng.integers(0, 256, size=(t, k, levels, p, p), dtype=np.uint8),
        heatmaps=rng.random(size=(t, k, levels, channels, 4, 4)).astype(np.float16),
    )


def test_offset_vector_and_path():
    tr = make_traj()
    v = ld.offset_vector(tr, 1, 1)
    assert v.shape == (1, 2, 2)
    start, step = v[0]
    np.testing.assert_allclose(start, tr.positions[1, 1, ::-1])
    np.testing.assert_allclose(start + step, tr.positions[2, 1, ::-1])
    path = ld.trajectory_path(tr, 1, 0)
    np.testing.assert_allclose(path, tr.positions[:2, 1, ::-1])


def test_landmarks_layer_styling_and_missing_points():
    tr = make_traj()
    data, kw, kind = ld.landmarks_layer(tr, "x", "/a/b/151.jpg")
    assert kind == "points" and data.shape == (3, 2)
    np.testing.assert_allclose(data, tr.final[:, ::-1])
    f = kw["features"]
    assert list(f["landmark"]) == ["Sella", "Nasion", "Foo"]
    assert list(f["abbr"]) == ["S", "N", "Foo"]
    assert list(f["index"]) == [1, 2, 3]
    # confident = green border, unsure = red border
    conf = tr.confidence
    assert conf[0] > conf[2]
    assert kw["border_color"][0][1] > kw["border_color"][0][0]
    assert kw["border_color"][2][0] > kw["border_color"][2][1]
    assert len({tuple(c) for c in kw["face_color"]}) == 3  # one colour per landmark
    assert kw["metadata"]["image_path"] == "/a/b/151.jpg"
    assert kw["text"]["string"] == "{label}"  # the abbreviation, placed clear of its neighbours
    assert sorted("/".join(lb for lb in f["label"] if lb).split("/")) == ["Foo", "N", "S"]  # each named once
    assert list(f["state"]) == ["proposed"] * 3 and [s for s in kw["symbol"]] == ["ring"] * 3
    # a missing landmark (NaN) is left out, the others keep their index and colour
    pos = tr.final.copy()
    pos[1] = np.nan
    c = ld.landmark_content(pos, tr.landmark_names, conf)
    assert list(c["features"]["index"]) == [1, 3]
    np.testing.assert_allclose(c["face_color"], ld.landmark_colors(3)[[0, 2]])


def test_top_channels_and_tile_strip():
    tr = make_traj()
    hm = tr.heatmaps.astype(np.float32).copy()
    hm[0, 0, 1, 2] = 0
    hm[0, 0, 1, 2, 1, 1] = 1.0  # channel 2 of level 1: one peak
    tr = Trajectory(**{**tr.__dict__, "heatmaps": hm.astype(np.float16)})
    assert ld.top_channels(tr, 0, 0, 1, 1) == [2]
    strip = ld.tile_strip(tr, 0, 0, [2], gap=4)
    assert strip.dtype == np.uint8 and strip.shape == (2 * 16 + 4, 3 * 16 + 2 * 4, 3)
    # the glimpse row holds the level-0 patch (grey) except the centre mark
    np.testing.assert_array_equal(strip[0, :16, 0], tr.glimpses[0, 0, 0, 0])


def test_stretch_maps_the_range_to_0_1():
    a = np.array([[2.0, 4.0], [3.0, 6.0]], np.float16)
    out = ld.stretch(a)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.5], [0.25, 1.0]])
    assert a[0, 0] == 2.0  # the input is left as it was
    flat = ld.stretch(np.full((3, 3), 7, np.uint8))
    assert flat.dtype == np.float32 and np.all(flat == 0)


def make_staged(k=3, looks=1, ctx=3, p=16, cells=8):
    """A trajectory with coarse -> fine stage records (windows of pixel scale 2, 4, 8)."""
    rng = np.random.default_rng(1)
    coarse = rng.uniform(100, 200, size=(k, 2))
    fine = coarse[None] + np.cumsum(rng.normal(size=(looks, k, 2)) * 5, axis=0)
    return Trajectory(
        positions=fine[-1:].copy(), uncertainty_mm=np.ones(k), landmark_names=("Sella", "Nasion", "Foo")[:k],
        pixel_spacing=0.1, image_shape=(300, 400), patch=64, coarse_positions=coarse, fine_positions=fine,
        fine_windows=rng.integers(0, 256, size=(looks, k, ctx, p, p), dtype=np.uint8),
        fine_heatmaps=rng.random(size=(looks, k, cells, cells)).astype(np.float16),
        fine_window_scale=np.array([[2.0, 2.0], [4.0, 4.0], [8.0, 8.0]])[:ctx], fine_level=1,
    )


def test_stage_geometry_outlines_arrow_and_points():
    tr = make_staged(looks=2)
    assert ld.has_stages(tr) and not ld.has_stages(make_traj()) and not ld.has_stages(None)
    c0, c1 = tr.coarse_positions[1], tr.fine_positions[0, 1]
    for c, side in enumerate((32, 64, 128)):
        box = ld.fine_window_box(tr, 1, 0, c)
        assert box[:, 1].max() - box[:, 1].min() == pytest.approx(side)
        assert box[:, 0].max() - box[:, 0].min() == pytest.approx(side)
        np.testing.assert_allclose(box.mean(0), c0[::-1])
    # the second look is centred on the first answer
    np.testing.assert_allclose(ld.fine_window_box(tr, 1, 1, 0).mean(0), c1[::-1])
    v = ld.stage_vector(tr, 1, 0)
    np.testing.assert_allclose(v[0, 0], c0[::-1])
    np.testing.assert_allclose(v[0, 0] + v[0, 1], c1[::-1])
    pts, feats = ld.stage_points(tr, 1, 1)
    np.testing.assert_allclose(pts, [c0[::-1], c1[::-1], tr.fine_positions[1, 1, ::-1]])
    assert feats["label"] == ["coarse", "fine 1", "fine 2"]
    assert feats["color"] == ["#ff5050", "#3ce678", "#3ce678"]
    assert ld.stage_points(make_staged(), 0, 0)[1]["label"] == ["coarse", "fine"]
    with pytest.raises(ValueError, match="record_stages"):
        ld.stage_vector(make_traj(), 0, 0)


def test_fine_look_caption_says_where_the_look_moved_and_whose_maps_are_shown():
    tr = make_staged(looks=2)
    c0, f0 = tr.coarse_positions[1], tr.fine_positions[0, 1]
    text = ld.fine_look_caption(tr, 1, 0)
    assert text.startswith("<b>Nasion</b> coarse answer (red)") and "fine look 1 answer" in text
    assert f"moved {np.hypot(*(f0 - c0)) * 0.1:.1f} mm" in text
    assert "windows L1 3.2 mm, L2 6.4 mm, L3 12.8 mm" in text  # 16 window pixels of 2, 4, 8 px at 0.1 mm
    assert "fine look 1 answer (green)" in ld.fine_look_caption(tr, 1, 1) and "fine nets" not in text
    three = Trajectory(**{**tr.__dict__, "fine_nets": (3, 3)})
    assert ld.fine_look_caption(three, 1, 0).endswith("; heatmap: mean of 3 fine nets")
    mixed = Trajectory(**{**tr.__dict__, "fine_nets": (1, 3)})
    assert ld.fine_look_caption(mixed, 1, 0).endswith(
        "; heatmap: mean of 1 of 3 fine nets (the other 2 read other levels; the answer is all 3 nets')")


def test_fine_heatmap_cells_tile_the_finest_window():
    tr = make_staged()
    (sy, sx), (ty, tx) = ld.fine_heatmap_placement(tr, 2, 0)
    assert sy == sx == 16 / 8 * 2.0
    box = ld.fine_window_box(tr, 2, 0, 0)
    assert tx - sx / 2 == pytest.approx(box[:, 1].min()) and ty - sy / 2 == pytest.approx(box[:, 0].min())
    assert tx + 7.5 * sx == pytest.approx(box[:, 1].max())


def test_fine_tile_strip_shows_the_windows_the_heatmap_and_both_answers():
    tr = make_staged(k=1, looks=1)
    hm = np.zeros((1, 1, 8, 8), np.float16)
    hm[0, 0, 1, 6] = 1.0  # the heatmap's peak: top right of the finest window
    coarse = np.array([[150.0, 150.0]])
    tr = Trajectory(**{**tr.__dict__, "fine_heatmaps": hm, "fine_windows": np.full((1, 1, 3, 16, 16), 100, np.uint8),
                       "coarse_positions": coarse, "fine_positions": (coarse + [-8.0, 8.0])[None]})
    strip = ld.fine_tile_strip(tr, 0, 0, gap=4)
    assert strip.dtype == np.uint8 and strip.shape == (2 * 16 + 4, 3 * 16 + 2 * 4, 3)
    grey, over = strip[:16, :16].astype(int), strip[20:, :16].astype(int)
    # row 0: the window itself; row 1: the heatmap's peak cell (window pixels 12-13, 2-3) lit
    assert (grey[0, 0] == 100).all() and (over[0, 0] == 100).all() and (grey[2:4, 12:14] == 100).all()
    assert over[2:4, 12:14].sum(-1).min() > 3 * 100 + 150
    # red cross: the window centre (where the look started); green: the answer, (fine - coarse) / scale
    # window pixels from the centre: (-4, 4) in the finest window, (-2, 2) in the next
    assert tuple(strip[8, 7]) == ld.COARSE_RGB and tuple(strip[8 + 20, 7]) == (100, 100, 100)
    assert tuple(strip[round(7.5 + 4), round(7.5 - 4)]) == ld.FINE_RGB
    assert tuple(strip[round(7.5 + 2), 20 + round(7.5 - 2)]) == ld.FINE_RGB
    # a coarser context: the heatmap covers only the central half (8 x 8 of the 16 x 16 pixels)
    ctx = strip[20:, 20:36].astype(int)
    assert (ctx[0, 0] == 100).all() and ctx[4:12, 4:12].sum(-1).max() > 450 and ctx[:3].sum(-1).max() == 300


def test_fine_heatmap_placement_decodes_to_the_fine_answer(tiny_model, tiny_data):
    """The heatmap drawn where fine_heatmap_placement puts it peaks on the fine stage's answer."""
    import torch

    from napari_glimpse.coarse import CoarseConfig, CoarseNet, decode
    from napari_glimpse.fine import FineConfig, FineNet
    from napari_glimpse.io import read_image

    torch.manual_seed(0)
    nets = [CoarseNet(CoarseConfig(n_landmarks=3, input_hw=(64, 48), width=4)),
            FineNet(FineConfig(n_landmarks=3, level=1, patch=32, width=4, context=2))]
    with torch.no_grad():
        for net in nets:
            for v in net.parameters():
                v.mul_(4.0)  # sharper heatmaps than the default initialisation
    tiny_model.coarse, tiny_model.fine = (n.eval() for n in nets)
    tr = tiny_model.predict(read_image(tiny_data["test1"]["paths"][0]), iterations=0, record_stages=True)
    assert ld.has_stages(tr)
    for k in range(3):
        hm = torch.as_tensor(tr.fine_heatmaps[0, k].astype(np.float32))
        xy = decode(hm.log()[None, None], tiny_model.fine_decode_window)[0][0, 0].numpy()
        scale, trans = ld.fine_heatmap_placement(tr, k, 0)
        np.testing.assert_allclose(world_of_pixel(xy[1], xy[0], scale, trans), tr.final[k, ::-1], atol=0.1)


def test_write_animation_gif_and_mp4(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    frames = [np.full((40, 50, 3), v, np.uint8) for v in (0, 120, 250)]
    out = ld.write_animation(frames, tmp_path / "a.gif", fps=4)
    back = imageio.mimread(out)
    assert len(back) == 3 and back[0].shape[:2] == (40, 50)
    one = imageio.mimread(ld.write_animation(frames[:1], tmp_path / "one.gif", hold_last=2))
    assert len(one) == 1 and int(np.asarray(one[0])[..., :3].mean()) == 0
    with pytest.raises(ValueError):
        ld.write_animation(frames, tmp_path / "a.avi")
    pytest.importorskip("imageio_ffmpeg")
    mp4 = ld.write_animation([np.full((41, 51, 4), 9, np.uint8)] * 3, tmp_path / "a.mp4")
    assert mp4.stat().st_size > 0


def test_most_peaked_channel_ignores_a_spike_on_the_border():
    """Zero padding can pile a channel's softmax on the patch's edge: that channel points nowhere,
    and the one peaked inside the patch is the one to show."""
    tr = make_traj(channels=3)
    hm = np.full((2, 3, 3, 3, 8, 8), 1 / 64, np.float32)
    hm[0, 0, 1, 0] = 0.1 / 63
    hm[0, 0, 1, 0, 0, 3] = 0.9    # channel 0: a spike on the top border
    hm[0, 0, 1, 1] = 0.5 / 63
    hm[0, 0, 1, 1, 4, 5] = 0.5    # channel 1: a peak inside
    hm[0, 0, 1, 2, 7, 7] = 0.95   # channel 2: a spike in a corner
    tr = Trajectory(**{**tr.__dict__, "heatmaps": hm.astype(np.float16)})
    assert ld.top_channels(tr, 0, 0, 1, 1) == [1]
    assert ld.top_channels(tr, 0, 0, 1, 3)[0] == 1
    assert ld.border_margin(8) == 1 and ld.border_margin(16) == 2 and ld.border_margin(2) == 0


def test_glimpse_overlay_puts_every_level_where_the_sampler_took_it():
    tr = make_traj(levels=3, p=16)
    k, t, top = 1, 1, 2
    rgba, scale, trans = ld.glimpse_overlay(tr, k, t, top)
    assert rgba.shape == (64, 64, 4) and rgba.dtype == np.uint8 and scale == (1.0, 1.0)
    assert (rgba[..., 3] > 0).all()  # the top level covers it all
    c = tr.positions[t, k]
    for lv in range(top + 1):
        ls, lt = ld.glimpse_placement(c, lv, 16)
        # a level's corner pixels (no finer level covers them): the overlay pixel under their centre holds them
        for r, q in [(0, 0), (15, 15), (0, 15)]:
            y, x = world_of_pixel(r, q, ls, lt)
            i, j = int(np.floor(y - trans[0] + 0.5)), int(np.floor(x - trans[1] + 0.5))
            assert rgba[i, j, 0] == tr.glimpses[t, k, lv, r, q], (lv, r, q)
    # the finest level sits in the middle, unscaled
    np.testing.assert_array_equal(rgba[24:40, 24:40, 0], tr.glimpses[t, k, 0])
    # a heatmap adds colour over its level's square only
    heat = np.zeros((4, 4), np.float32)
    heat[1, 2] = 1.0
    hot, _, _ = ld.glimpse_overlay(tr, k, t, 0, heat, heat_level=1)
    assert hot.shape == (32, 32, 4) and (hot[:8, :, 3] > 0).all()
    np.testing.assert_array_equal(hot[8:24, 8:24, 0] >= tr.glimpses[t, k, 0, :, :], True)
    assert (hot[8:16, 16:24].astype(int) - np.repeat(tr.glimpses[t, k, 0, :8, 8:16, None], 4, -1)).max() > 100


def test_arrow_shapes_end_at_the_step():
    vec = ld.offset_vector(make_traj(), 0, 0)
    shapes = ld.arrow_shapes(vec)
    assert [typ for _, typ in shapes] == ["path", "polygon"]
    start, step = vec[0]
    np.testing.assert_allclose(shapes[0][0][0], start)
    np.testing.assert_allclose(shapes[1][0][0], start + step)  # the head's tip
    assert ld.arrow_shapes(np.zeros((1, 2, 2))) == []


def test_label_frame_writes_title_scale_bar_and_legend():
    pytest.importorskip("PIL")
    frame = np.full((120, 300, 3), 90, np.uint8)
    tr = make_traj()
    lines = ld.glimpse_caption(tr, 1, 0, "151.jpg")
    assert lines[0].startswith("Nasion (N) · glimpse step 1/2 · 151.jpg") and "mm" in lines[1]
    legend = ld.explorer_legend("glimpses", "canvas", [0, 1], heat=True)
    assert [t for t, _ in legend] == ["L0 patch", "L1 patch", "estimates", "step", "heatmap"]
    out = ld.label_frame(frame, lines, px_per_mm=10.0, legend=legend)
    assert out.shape[1] == 300 and out.shape[0] > 120 + 40
    bright = (out > 200).all(-1)
    assert bright[:20].sum() > 50                      # white title text above the frame
    assert bright[-25:].sum() > 50                     # the scale bar and the legend's text below
    assert (np.abs(out[:, :, 0].astype(int) - out[:, :, 2]) > 150).any()  # the legend's colours
    assert ld.scale_bar_mm(10.0, 300) == 5 and ld.scale_bar_mm(10.0, 8) is None
    same = ld.same_size([out, frame])
    assert same[0].shape == same[1].shape == out.shape


def test_gif_frames_keep_greys_and_small_coloured_areas(tmp_path):
    from PIL import Image

    grey = np.tile(np.linspace(0, 255, 300).astype(np.uint8), (100, 1))
    frame = np.repeat(grey[..., None], 3, axis=-1)
    frame = ld.label_frame(frame, ["a title"], 10.0, ld.explorer_legend("stages", "canvas", [1, 2, 3]))
    out = ld.write_animation([frame, frame], tmp_path / "a.gif", fps=2)
    with Image.open(out) as im:
        back = np.asarray(im.convert("RGB")).astype(int)
    err = np.abs(back - frame).max(-1)
    assert err.max() <= 16  # legend keys keep their colour, the grey ramp shows no bands
