"""Foveated glimpse sampling: alignment across levels, bilinear sampling, borders, rotation/scale."""

import math

import numpy as np
import pytest
import torch

from napari_glimpse.glimpse import (
    PyramidStack,
    _bilinear,
    frame_to_image,
    image_to_frame,
    patch_grid,
    rotation,
    sample_glimpses,
)
from napari_glimpse.pyramid import build_pyramid

P = 64
C = (P - 1) / 2  # patch centre, 31.5
DOT = (517, 403)  # (x, y) of the bright square, deliberately not a multiple of 2**l
LEVELS = 6


def dot_image(x=DOT[0], y=DOT[1], h=1000, w=800, half=4):
    img = np.zeros((h, w), np.uint8)
    img[y - half : y + half + 1, x - half : x + half + 1] = 255
    return img


@pytest.fixture(scope="module")
def dot_stack():
    return PyramidStack([build_pyramid(dot_image(), LEVELS, P)])


def centroid(patch: torch.Tensor) -> tuple[float, float]:
    p = patch.double().numpy()
    s = p.sum()
    assert s > 0, "the dot is not in the patch"
    yy, xx = np.mgrid[: p.shape[0], : p.shape[1]]
    return float((p * xx).sum() / s), float((p * yy).sum() / s)


def glimpse(stack, center, angle=None, scale=None):
    c = torch.tensor([center], dtype=torch.float32)
    a = None if angle is None else torch.tensor([angle], dtype=torch.float32)
    s = None if scale is None else torch.tensor([scale], dtype=torch.float32)
    return sample_glimpses(stack, torch.tensor([0]), c, P, a, s)[0]


def test_output_shape_and_value_range(dot_stack):
    g = sample_glimpses(dot_stack, torch.tensor([0, 0, 0]), torch.tensor([[10.0, 20], [500, 400], [790, 990]]), P)
    assert g.shape == (3, LEVELS, P, P)
    assert g.dtype == torch.float32
    assert float(g.min()) >= 0 and float(g.max()) <= 255


def test_patch_grid_is_centred():
    g = patch_grid(P)
    assert g.shape == (P, P, 2)
    assert float(g[0, 0, 0]) == -C and float(g[0, 0, 1]) == -C
    assert float(g[-1, -1, 0]) == C and float(g[-1, -1, 1]) == C
    assert float(g[0, 5, 0]) == 5 - C and float(g[5, 0, 1]) == 5 - C  # x along columns
    assert float(g.mean()) == 0.0


def test_centred_dot_is_at_patch_centre_on_every_level(dot_stack):
    g = glimpse(dot_stack, DOT)
    for lv in range(LEVELS):
        cx, cy = centroid(g[lv])
        assert abs(cx - C) < 0.2 and abs(cy - C) < 0.2, (lv, cx, cy)
        if lv < 2:
            continue  # levels 0-1 have a saturated plateau
        # the brightest sample is at the centre too (2x2 block around 31.5)
        iy, ix = np.unravel_index(int(g[lv].argmax()), (P, P))
        assert abs(ix - C) <= 1.5 and abs(iy - C) <= 1.5, (lv, ix, iy)


def test_level_zero_centred_dot_exact(dot_stack):
    g = glimpse(dot_stack, DOT)
    # level 0 samples at integer + 0.5 offsets: the 9x9 square covers 10x10 samples partially
    cx, cy = centroid(g[0])
    assert cx == pytest.approx(C, abs=1e-3) and cy == pytest.approx(C, abs=1e-3)


@pytest.mark.parametrize("d", [(6, -10), (-20, 13), (25, 25)])
def test_offset_dot_appears_at_offset_over_2_to_the_level(dot_stack, d):
    dx, dy = d
    # glimpse centre at dot - d, i.e. the dot is d from the centre (full-resolution pixels)
    g = glimpse(dot_stack, (DOT[0] - dx, DOT[1] - dy))
    for lv in range(LEVELS):
        cx, cy = centroid(g[lv])
        f = 2**lv
        assert cx == pytest.approx(C + dx / f, abs=0.2), (lv, cx)
        assert cy == pytest.approx(C + dy / f, abs=0.2), (lv, cy)


def test_bilinear_at_integer_coordinates_reproduces_pixels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(200, 160), dtype=np.uint8)
    pyr = build_pyramid(img, 3, P)
    stack = PyramidStack([pyr])
    # a centre at half-integer positions puts every level-0 sample on an integer pixel
    x0, y0 = 37, 52
    g = glimpse(stack, (x0 + C, y0 + C))
    np.testing.assert_array_equal(g[0].numpy(), img[y0 : y0 + P, x0 : x0 + P].astype(np.float32))
    # and level 1 at centre 2 * (x1 + 31.5)
    x1, y1 = 10, 7
    g = glimpse(stack, (2 * (x1 + C), 2 * (y1 + C)))
    lv1 = pyr.levels[1].numpy()
    np.testing.assert_array_equal(g[1].numpy(), lv1[y1 : y1 + P, x1 : x1 + P].astype(np.float32))


def test_bilinear_interpolates_between_pixels():
    level = torch.tensor([[[0, 100], [50, 250]]], dtype=torch.uint8)  # (1, 2, 2)
    sizes = torch.tensor([[2, 2]])
    xy = torch.tensor([[[[0.5, 0.0], [0.0, 0.5], [0.5, 0.5], [0.25, 1.0]]]])  # (1, 1, 4, 2)
    out = _bilinear(level, sizes, torch.tensor([0]), xy)[0, 0]
    np.testing.assert_allclose(out.numpy(), [50.0, 25.0, 100.0, 100.0], atol=1e-4)


def test_outside_the_image_is_black():
    img = np.full((300, 300), 200, np.uint8)
    stack = PyramidStack([build_pyramid(img, 2, P)])
    g = glimpse(stack, (0.0, 0.0))[0].numpy()  # level 0, samples at -31.5 ... 31.5
    assert np.all(g[:31, :] == 0) and np.all(g[:, :31] == 0)  # samples at <= -1.5
    assert np.all(g[32:, 32:] == 200)  # samples at >= 0.5
    assert g[31, 40] == pytest.approx(100.0)  # y = -0.5: half outside
    assert g[31, 31] == pytest.approx(50.0)  # x = y = -0.5
    # far away: nothing at all
    assert float(glimpse(stack, (5000.0, -3000.0)).max()) == 0.0
    # beyond the right/bottom edges too (the clamped index must not leak edge pixels)
    g = glimpse(stack, (299.0, 299.0))[0].numpy()
    assert np.all(g[33:, :] == 0) and np.all(g[:, 33:] == 0)
    assert np.all(g[:31, :31] == 200)


def test_stack_of_different_sizes_samples_the_right_image():
    a = np.full((100, 120), 10, np.uint8)
    b = np.full((200, 90), 250, np.uint8)
    stack = PyramidStack([build_pyramid(a, 2, P), build_pyramid(b, 2, P)])
    assert stack.levels[0].shape == (2, 200, 120)
    assert stack.sizes[0, 0].tolist() == [100, 120] and stack.sizes[1, 1].tolist() == [100, 45]
    c = torch.tensor([[50.0, 50.0], [45.0, 100.0]])
    g = sample_glimpses(stack, torch.tensor([0, 1]), c, P)
    assert float(g[0, 0, 31, 31]) == pytest.approx(10.0)
    assert float(g[1, 0, 31, 31]) == pytest.approx(250.0)
    # image 0 is 120 wide, image 1 is 90: beyond x = 90 image 1 is black, though padded to 120
    g = sample_glimpses(stack, torch.tensor([1]), torch.tensor([[100.0, 100.0]]), P)[0, 0]
    assert float(g[31, 0]) == pytest.approx(250.0)  # x = 68.5
    assert float(g[31, 63]) == 0.0  # x = 131.5
    xs = 100.0 - C + np.arange(P)  # sample x positions of the row
    inside = xs <= 89.0
    assert np.all(g[31].numpy()[inside] == 250.0)
    assert np.all(g[31].numpy()[xs >= 90.0] == 0.0)
    assert float(g[31, 21]) == pytest.approx(125.0)  # x = 89.5: half on the last column


# -------------------------------------------------------------------------- rotation / scale
def test_rotation_matrix_acts_on_column_vectors():
    r = rotation(torch.tensor([math.pi / 2]))[0]
    v = r @ torch.tensor([1.0, 0.0])
    np.testing.assert_allclose(v.numpy(), [0.0, 1.0], atol=1e-6)


def test_frame_image_round_trip():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 2, generator=g) * 30
    ang = (torch.rand(50, generator=g) * 2 - 1) * math.pi
    scl = torch.exp(torch.randn(50, generator=g) * 0.3)
    back = frame_to_image(image_to_frame(v, ang, scl), ang, scl)
    torch.testing.assert_close(back, v, atol=1e-4, rtol=1e-5)
    back2 = image_to_frame(frame_to_image(v, ang, scl), ang, scl)
    torch.testing.assert_close(back2, v, atol=1e-4, rtol=1e-5)
    # identity without augmentation; pure scaling
    z, o = torch.zeros(50), torch.ones(50)
    torch.testing.assert_close(image_to_frame(v, z, o), v)
    torch.testing.assert_close(frame_to_image(v, z, 2 * o), 2 * v)
    # lengths scale by 1/scale, angles are preserved
    f = image_to_frame(v, ang, scl)
    torch.testing.assert_close(f.norm(dim=-1), v.norm(dim=-1) / scl, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("angle,scale", [(0.4, 1.2), (-0.25, 0.9), (math.pi / 2, 1.0)])
def test_rotated_scaled_glimpse_shows_dot_at_image_to_frame_offset(dot_stack, angle, scale):
    d = torch.tensor([[18.0, -11.0]])  # dot - centre, in image axes (full-resolution pixels)
    centre = (DOT[0] - float(d[0, 0]), DOT[1] - float(d[0, 1]))
    a, s = torch.tensor([angle]), torch.tensor([scale])
    expect = image_to_frame(d, a, s)[0]  # where the dot is in the glimpse frame
    g = glimpse(dot_stack, centre, angle, scale)
    for lv in range(4):
        cx, cy = centroid(g[lv])
        f = 2**lv
        assert cx == pytest.approx(C + float(expect[0]) / f, abs=0.2), (lv, cx)
        assert cy == pytest.approx(C + float(expect[1]) / f, abs=0.2), (lv, cy)
    # the training target for this glimpse is expect; undoing the augmentation recovers d
    torch.testing.assert_close(frame_to_image(expect[None], a, s), d, atol=1e-4, rtol=1e-5)


def test_rotation_moves_the_dot_differently_from_no_rotation(dot_stack):
    # guards against the angle being ignored: a quarter turn maps offset (20, 0) to (0, -20)
    centre = (DOT[0] - 20, DOT[1])
    cx0, cy0 = centroid(glimpse(dot_stack, centre)[0])
    cx1, cy1 = centroid(glimpse(dot_stack, centre, math.pi / 2, 1.0)[0])
    assert (cx0, cy0) == pytest.approx((C + 20, C), abs=0.3)
    assert (cx1, cy1) == pytest.approx((C, C - 20), abs=0.3)
