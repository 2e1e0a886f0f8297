"""Tests of the causal masks: exact layouts, colour groups, crops, bad input."""

import numpy as np
import pytest

from pvae_jax.nn import masks


def _raster_before(dr, dc):
    return dr < 0 or (dr == 0 and dc < 0)


@pytest.mark.parametrize("mask_type", ["A", "B"])
@pytest.mark.parametrize("kernel_size", [1, 3, (3, 5), 7])
def test_causal_mask_opens_exactly_the_earlier_sub_pixels(mask_type, kernel_size):
    in_ch, out_ch, groups = 6, 9, 3
    mask = masks.causal_mask(kernel_size, in_ch, out_ch, mask_type, groups)
    kh, kw = mask.shape[:2]
    assert mask.shape == (kh, kw, in_ch, out_ch) and mask.dtype == np.float32
    for r in range(kh):
        for c in range(kw):
            dr, dc = r - kh // 2, c - kw // 2
            for i in range(in_ch):
                for o in range(out_ch):
                    g_in, g_out = i // (in_ch // groups), o // (out_ch // groups)
                    if (dr, dc) == (0, 0):
                        want = g_in < g_out if mask_type == "A" else g_in <= g_out
                    else:
                        want = _raster_before(dr, dc)
                    assert mask[r, c, i, o] == float(want), (r, c, i, o)


def test_rgb_centre_tap_follows_r_then_g_then_b():
    a = masks.centre_mask(3, 3, "A", num_groups=3)
    b = masks.centre_mask(3, 3, "B", num_groups=3)
    # Rows: input R, G, B; columns: output R, G, B.
    np.testing.assert_array_equal(a, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(b, [[1, 1, 1], [0, 1, 1], [0, 0, 1]])


def test_single_group_mask_a_hides_the_whole_current_pixel():
    mask = masks.causal_mask(5, 4, 8, "A", num_groups=1)
    assert not mask[2, 2].any()
    assert masks.causal_mask(5, 4, 8, "B", num_groups=1)[2, 2].all()


def test_stack_masks():
    vert = masks.vertical_stack_mask(5, 2, 3)
    assert vert[:3].all() and not vert[3:].any()
    horiz = masks.horizontal_stack_mask(5, 3, 3, "A", num_groups=3)
    assert horiz.shape == (1, 5, 3, 3)
    assert horiz[0, :2].all() and not horiz[0, 3:].any()
    np.testing.assert_array_equal(horiz[0, 2], masks.centre_mask(3, 3, "A", 3))


@pytest.mark.parametrize(
    "mask, box",
    [
        (masks.causal_mask(7, 2, 2, "B"), (0, 3, 0, 6)),
        (masks.vertical_stack_mask(5, 1, 1), (0, 2, 0, 4)),
        (masks.horizontal_stack_mask(5, 1, 1, "B"), (0, 0, 0, 2)),
        # Mask 'A' with one group closes the centre; the box still keeps it.
        (masks.horizontal_stack_mask(3, 1, 1, "A"), (0, 0, 0, 1)),
    ],
)
def test_support_box_holds_every_open_tap_and_the_centre(mask, box):
    assert masks.support_box(mask) == box
    r0, r1, c0, c1 = box
    outside = mask.copy()
    outside[r0 : r1 + 1, c0 : c1 + 1] = 0
    assert not outside.any()


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="mask_type.*'A', 'B'"):
        masks.causal_mask(3, 1, 1, "C")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        masks.causal_mask(4, 1, 1, "A")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        masks.horizontal_stack_mask((3, 2), 1, 1, "A")
    with pytest.raises(ValueError, match="num_groups must be a positive divisor"):
        masks.causal_mask(3, 4, 6, "B", num_groups=3)
    with pytest.raises(ValueError, match="num_groups"):
        masks.centre_mask(3, 3, "B", num_groups=0)
