"""Gaussian pyramid: level count, shapes, dtype, alignment, and image conversion to grey uint8."""

import numpy as np
import pytest
import torch

from napari_glimpse.errors import GlimpseError
from napari_glimpse.io import read_image, to_grey_uint8
from napari_glimpse.pyramid import build_pyramid, deepen, levels_for, pyramid_from_file


# ------------------------------------------------------------------------------ levels_for
def test_levels_for_isbi_cephalogram():
    # 2400 / 32 = 75 <= 1.25 * 64 = 80 < 2400 / 16 = 150
    assert levels_for((2400, 1935), 64) == 6
    assert levels_for((1935, 2400), 64) == 6  # only the longer side matters


def test_levels_for_single_glimpse_image():
    assert levels_for((64, 64), 64) == 1
    assert levels_for((80, 80), 64) == 1  # exactly the slack limit
    assert levels_for((81, 40), 64) == 2


def test_levels_for_top_level_fits_about_one_glimpse():
    for side in (100, 300, 1000, 2400, 5000):
        n = levels_for((side, side // 2), 64)
        top = side / 2 ** (n - 1)
        assert top <= 1.25 * 64
        assert side / 2 ** (n - 2) > 1.25 * 64 if n > 1 else True


# --------------------------------------------------------------------------- build_pyramid
@pytest.mark.parametrize("shape", [(300, 200), (257, 129), (64, 64), (100, 65)])
def test_level_shapes_halve_rounding_up(shape):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    pyr = build_pyramid(img, 5)
    assert len(pyr) == 5
    h, w = shape
    for lv in pyr.levels:
        assert tuple(lv.shape) == (h, w)
        assert lv.dtype == torch.uint8
        h, w = (h + 1) // 2, (w + 1) // 2
    assert pyr.shape == shape


def test_many_levels_down_to_one_pixel():
    pyr = build_pyramid(np.full((64, 1000), 9, np.uint8), 9)
    assert [tuple(lv.shape) for lv in pyr.levels][-4:] == [(2, 32), (1, 16), (1, 8), (1, 4)]
    assert all(int(lv.min()) == 9 == int(lv.max()) for lv in pyr.levels)


def test_level_zero_is_the_image():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(90, 70), dtype=np.uint8)
    pyr = build_pyramid(img, 3)
    np.testing.assert_array_equal(pyr.levels[0].numpy(), img)


def test_constant_image_stays_constant():
    img = np.full((200, 150), 137, dtype=np.uint8)
    pyr = build_pyramid(img, 6)
    for lv in pyr.levels:
        assert int(lv.min()) == 137 and int(lv.max()) == 137


def test_levels_are_blurred_not_just_subsampled():
    # a checkerboard of 0/255 averages to mid-grey after the binomial blur
    img = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)
    pyr = build_pyramid(img, 3)
    lv1 = pyr.levels[1].numpy().astype(float)
    inner = lv1[2:-2, 2:-2]
    assert abs(inner.mean() - 127.5) < 2
    assert inner.std() < 1.0


def test_level_pixel_j_sits_at_full_resolution_2j():
    # a bright dot at an even full-resolution position peaks at half that position
    img = np.zeros((128, 128), dtype=np.uint8)
    img[40, 90] = 255
    pyr = build_pyramid(img, 3)
    l1 = pyr.levels[1].numpy()
    assert np.unravel_index(l1.argmax(), l1.shape) == (20, 45)
    l2 = pyr.levels[2].numpy()
    assert np.unravel_index(l2.argmax(), l2.shape) == (10, 22) or np.unravel_index(
        l2.argmax(), l2.shape
    ) == (10, 23)


def test_image_smaller_than_a_glimpse_raises():
    with pytest.raises(GlimpseError, match="smaller than one 64x64 glimpse"):
        build_pyramid(np.zeros((40, 40), np.uint8), 3)
    with pytest.raises(GlimpseError):
        build_pyramid(np.zeros((63, 500), np.uint8), 3)
    with pytest.raises(GlimpseError):
        build_pyramid(np.zeros((500, 63), np.uint8), 3)


def test_non_2d_image_raises():
    with pytest.raises(GlimpseError):
        build_pyramid(np.zeros((100, 100, 3), np.uint8), 3)


def test_pyramid_from_file_matches_build(tmp_path):
    from conftest import save_png

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(120, 100), dtype=np.uint8)
    p = save_png(tmp_path / "a.png", img)
    pyr = pyramid_from_file(p, 3)
    ref = build_pyramid(img, 3)
    for a, b in zip(pyr.levels, ref.levels):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- to_grey_uint8
def test_uint8_grey_is_kept():
    img = np.arange(0, 200, dtype=np.uint8).reshape(10, 20)
    out = to_grey_uint8(img)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, img)


def test_16bit_is_windowed_to_full_uint8_range():
    ramp = np.tile(np.linspace(1000, 4000, 256), (64, 1)).astype(np.uint16)
    out = to_grey_uint8(ramp)
    assert out.dtype == np.uint8 and out.shape == ramp.shape
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # monotone
    # the middle of the ramp maps to the middle grey
    assert abs(int(out[0, 128]) - 128) <= 2


def test_16bit_png_file_read_as_windowed_grey(tmp_path):
    from PIL import Image

    ramp = np.tile(np.linspace(0, 60000, 128), (70, 1)).astype(np.uint16)
    p = tmp_path / "sixteen.png"
    Image.fromarray(ramp).save(p)
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (70, 128)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)


def test_rgb_is_averaged_to_grey():
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0, 255, 255  # mean 170
    rgb[0, 0] = (0, 0, 0)
    out = to_grey_uint8(rgb)
    assert out.shape == (10, 12) and out.dtype == np.uint8
    assert out[0, 0] < out[5, 5] and len(np.unique(out)) == 2
    # channel-first layout is understood too
    out_cf = to_grey_uint8(np.moveaxis(rgb, -1, 0))
    np.testing.assert_array_equal(out, out_cf)


def test_rgb_uint8_with_equal_channels_equals_its_grey_image():
    # BUG (io.py, to_grey_uint8, lines 53-57 then 62-72): an 8-bit RGB array is averaged to float32
    # and then falls through to the 16-bit/float branch, i.e. it is contrast-stretched to
    # its 0.5-99.5 percentile range. The docstring of read_image says "8-bit images are kept
    # as they are; RGB is averaged to grey", and read_image itself (PIL convert("L")) keeps
    # the values. So GlimpseModel.predict(rgb_array) (e.g. a napari RGB layer of the ISBI
    # JPEGs, which are RGB with three equal channels) sees different pixels than
    # predict(path) and than training. Expected: the grey values unchanged.
    rng = np.random.default_rng(3)
    grey = rng.integers(60, 180, size=(50, 40), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(to_grey_uint8(rgb), grey)


def test_rgb_jpeg_file_equals_grey(tmp_path):
    from PIL import Image

    grey = np.tile(np.arange(40, 200, dtype=np.uint8), (64, 1))
    p = tmp_path / "rgb.png"
    Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(p)
    np.testing.assert_array_equal(read_image(p), grey)


def test_bool_and_bad_shapes():
    out = to_grey_uint8(np.eye(4, dtype=bool))
    np.testing.assert_array_equal(out, np.eye(4, dtype=np.uint8) * 255)
    with pytest.raises(GlimpseError):
        to_grey_uint8(np.zeros((5, 6, 7)))
    with pytest.raises(GlimpseError):
        to_grey_uint8(np.zeros(10))


@pytest.mark.parametrize("shape", [(2400, 1935), (67, 129), (3, 5), (2, 9), (9, 1)])
def test_levels_are_the_rounded_chain_of_float_binomial_blurs(shape):
    """Every level (OpenCV's pyrDown on most sides, torch's passes on sides of 1-2 pixels) must
    equal the plain chain of float blurs the shipped models were trained on, rounded."""
    from napari_glimpse.pyramid import _down2

    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    pyr = build_pyramid(img, 4, patch=1)
    x = torch.as_tensor(img).float()[None, None]
    for lv in pyr.levels[1:]:
        x = _down2(x)
        assert torch.equal(lv, x[0, 0].round().clamp(0, 255).to(torch.uint8))


def test_the_blur_is_the_binomial_kernel_with_reflected_borders():
    """The reference chain itself: a 5-tap binomial blur, borders reflected (not repeated),
    every second pixel kept, computed here by a plain 2-D convolution."""
    from napari_glimpse.pyramid import _down2

    img = torch.as_tensor(np.random.default_rng(3).uniform(0, 255, (23, 18)), dtype=torch.float32)
    k1 = torch.tensor([1.0, 4, 6, 4, 1]) / 16
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(img[None, None], (2, 2, 2, 2), mode="reflect"),
                                     (k1[:, None] * k1[None, :])[None, None])[..., ::2, ::2]
    torch.testing.assert_close(_down2(img[None, None]), ref, atol=1e-4, rtol=0)


def test_deepen_adds_levels_close_to_natively_built_ones():
    rng = np.random.default_rng(3)
    img = (rng.random((300, 241)) * 255).astype(np.uint8)
    full = build_pyramid(img, 6)
    deep = deepen(full.levels[:3], 6)
    assert [tuple(x.shape) for x in deep] == [tuple(x.shape) for x in full.levels]
    assert all(a is b for a, b in zip(deep[:3], full.levels[:3]))  # the given levels, untouched
    for made, native in zip(deep[3:], full.levels[3:]):
        assert made.dtype == torch.uint8
        assert (made.int() - native.int()).abs().max() <= 1  # made from the rounded level, not the float chain
    assert deepen(full.levels, 4) == list(full.levels)  # deep enough already: nothing added or cut


def test_rgb_becomes_grey_as_the_reader_makes_it(tmp_path):
    """An RGB(A) array (a napari RGB layer of a colour file) is as grey as the file read with
    read_image (PIL's convert("L")), to the bit; alpha is ignored."""
    from PIL import Image

    rgb = np.random.default_rng(5).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    p = tmp_path / "colour.png"
    Image.fromarray(rgb).save(p)
    np.testing.assert_array_equal(to_grey_uint8(rgb), read_image(p))
    rgba = np.concatenate([rgb, np.full((30, 40, 1), 7, dtype=np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_grey_uint8(rgba), read_image(p))
