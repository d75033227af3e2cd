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
    assert kw["text"]["string"] == "{abbr}"
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


def test_write_animation_gif_and_mp4(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    frames = [np.full((40, 50, 3), v, np.uint8) for v in (0, 120, 250)]
    out = ld.write_animation(frames, tmp_path / "a.gif", fps=4)
    back = imageio.mimread(out)
    assert len(back) == 3 and back[0].shape[:2] == (40, 50)
    with pytest.raises(ValueError):
        ld.write_animation(frames, tmp_path / "a.avi")
    pytest.importorskip("imageio_ffmpeg")
    mp4 = ld.write_animation([np.full((41, 51, 4), 9, np.uint8)] * 3, tmp_path / "a.mp4")
    assert mp4.stat().st_size > 0
