"""Skip decisions come from the resize geometry: exactly the fully padded sub-images."""
import numpy as np
import pytest

from megatron_sphinx.data.geometry import (POSITIONS_PER_VIEW, ImageGeometry, image_geometry)


def test_square_image_has_no_skip():
    g = image_geometry(500, 500, 448, 2)
    assert g.view_valid().tolist() == [True] * 5
    assert g.num_positions() == 5 * POSITIONS_PER_VIEW


def test_wide_2to1_skips_bottom_row():
    g = image_geometry(200, 400, 448, 2)  # resized 224 x 448, top-left in the square
    assert (g.resized_height, g.resized_width) == (224, 448)
    assert g.view_valid().tolist() == [True, True, True, False, False]
    assert g.num_skipped() == 2
    assert g.num_positions() == 3 * POSITIONS_PER_VIEW + 2


def test_tall_1to2_skips_right_column():
    g = image_geometry(400, 200, 448, 2)
    assert g.view_valid().tolist() == [True, True, False, True, False]


def test_3x3_grid_for_2k():
    g = image_geometry(100, 300, 672, 3)  # resized 224 x 672: one row of three
    assert g.view_valid().tolist() == [True] + [True] * 3 + [False] * 6
    assert g.num_skipped() == 6


@pytest.mark.parametrize("h,w", [(1, 1), (60, 4000), (4000, 60), (8000, 50), (50, 8000),
                                 (223, 449), (225, 449), (7, 13)])
def test_valid_iff_overlapping_image_pixels(h, w):
    g = image_geometry(h, w, 448, 2)
    mask = np.zeros((448, 448), bool)
    mask[:g.resized_height, :g.resized_width] = True
    expect = [mask[r * 224:(r + 1) * 224, c * 224:(c + 1) * 224].any()
              for r in range(2) for c in range(2)]
    assert g.view_valid()[1:].tolist() == expect
    assert g.encoded_tiles() == [t for t, ok in enumerate(expect) if ok]
    assert g.num_encoded() == 1 + sum(expect) and g.num_skipped() == 4 - sum(expect)
    assert max(g.resized_height, g.resized_width) == 448


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="positive"):
        image_geometry(0, 10)
    with pytest.raises(ValueError, match="positive"):
        image_geometry(10, 0)
    with pytest.raises(ValueError, match="positive"):
        image_geometry(10, -3)
    with pytest.raises(ValueError, match="divisible"):
        image_geometry(10, 10, 448, 3)
    assert isinstance(image_geometry(3, 4), ImageGeometry)


def test_no_skip_encodes_every_sub_image():
    g = image_geometry(200, 400, 448, 2, skip_padded=False)
    assert g.view_valid().tolist() == [True] * 5 and g.num_skipped() == 0
    assert g.num_positions() == 5 * POSITIONS_PER_VIEW


@pytest.mark.parametrize("h,w,rh,rw", [
    (60, 4000, 7, 448),  # 6.72 rounds up
    (5, 9, 249, 448),  # 248.9 rounds up
    (300, 200, 448, 299),  # 298.7 rounds up
    (100, 300, 149, 448),  # 149.3 rounds down
])
def test_resize_rounds_to_nearest(h, w, rh, rw):
    g = image_geometry(h, w, 448, 2)
    assert (g.resized_height, g.resized_width) == (rh, rw)


@pytest.mark.parametrize("h,w", [(1, 5000), (5000, 1), (2, 20000)])
def test_extreme_aspect_keeps_a_one_pixel_strip(h, w):
    """The short side rounds to 0 here; it is kept at 1 pixel, so the image still lands in the
    global view and sub-image (0, 0) and the other row / column is skipped."""
    g = image_geometry(h, w, 448, 2)
    assert min(g.resized_height, g.resized_width) == 1
    assert max(g.resized_height, g.resized_width) == 448
    skipped = [False, False, True, True] if w > h else [False, True, False, True]
    assert (~g.view_valid()[1:]).tolist() == skipped
    assert g.view_valid()[0]


@pytest.mark.parametrize("image_size,grid", [(448, 2), (672, 3)])
@pytest.mark.parametrize("skip_padded", [True, False])
def test_encoded_count_is_the_valid_views(image_size, grid, skip_padded):
    """num_encoded and encoded_tiles (arithmetic, what the loader counts per image) agree with
    view_valid, at every resized height and width the resize can give (1 .. image_size)."""
    for rh in range(1, image_size + 1):
        for rw in (1, image_size // grid - 1, image_size // grid, image_size // grid + 1,
                   image_size - 1, image_size, rh):
            g = ImageGeometry(rh, rw, image_size, grid, rh, rw, skip_padded)
            assert g.num_encoded() == int(g.view_valid().sum()), (rh, rw)
            assert g.encoded_tiles() == [t for t, ok in enumerate(g.view_valid()[1:]) if ok]
            assert g.num_skipped() == int((~g.view_valid()).sum())
