"""Tests of the image grids and the PNG writer."""

import os

import numpy as np
import pytest
from PIL import Image

from pvae_jax import viz


def _constant_images(values, H=3, W=4, C=1):
    """One [H, W, C] image per value, every sub-pixel equal to it."""
    return np.array(values, np.uint8)[:, None, None, None] * np.ones((H, W, C), np.uint8)


def test_grid_places_images_row_by_row_with_padding():
    images = _constant_images([10, 20, 30, 40, 50])
    grid = viz.image_grid(images, 256, ncols=3, pad=1, pad_value=255)
    # 2 rows of 3 cells: (H + pad) per row plus the outer border.
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 1, 1)
    assert grid.dtype == np.uint8
    for n, value in enumerate([10, 20, 30, 40, 50]):
        top, left = 1 + (n // 3) * 4, 1 + (n % 3) * 5
        np.testing.assert_array_equal(grid[top:top + 3, left:left + 4], value)
    # Border lines and the empty sixth cell are pad_value.
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all() and (grid[4] == 255).all()
    np.testing.assert_array_equal(grid[5:8, 11:15], 255)
    assert (grid != 255).sum() == 5 * 3 * 4


def test_grid_defaults_to_a_square_and_keeps_channels():
    rgb = np.random.default_rng(0).integers(0, 256, (9, 2, 2, 3), dtype=np.uint8)
    grid = viz.image_grid(rgb, 256, pad=0)
    assert grid.shape == (6, 6, 3)
    np.testing.assert_array_equal(grid[2:4, 4:6], rgb[5])
    assert viz.image_grid(rgb[..., :1], 256).shape[-1] == 1


def test_levels_are_scaled_to_full_range():
    binary = np.array([0, 1, 1, 0], np.uint8).reshape(1, 2, 2, 1)
    grid = viz.image_grid(binary, 2, pad=0)
    np.testing.assert_array_equal(grid[..., 0], [[0, 255], [255, 0]])
    np.testing.assert_array_equal(viz.to_uint8(np.arange(4), 4), [0, 85, 170, 255])
    np.testing.assert_array_equal(viz.to_uint8(np.arange(256), 256), np.arange(256))
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\)"):
        viz.image_grid(binary * 2, 2)


def test_reconstructions_alternate_with_their_originals_by_column():
    originals = _constant_images([0, 2, 4, 6, 8, 10])
    reconstructions = _constant_images([1, 3, 5, 7, 9, 11])
    grid = viz.reconstruction_grid(originals, reconstructions, 256, pairs_per_row=3, pad=0)
    assert grid.shape == (2 * 3, 6 * 4, 1)
    cells = grid[::3, ::4, 0]  # One pixel per cell: [rows, columns].
    # Row r, column 2k: original of pair 3r + k; column 2k + 1: its reconstruction.
    np.testing.assert_array_equal(cells, [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    with pytest.raises(ValueError, match="same shape"):
        viz.reconstruction_grid(originals, reconstructions[:5], 256)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_png_round_trips(tmp_path, channels, mode):
    image = np.random.default_rng(1).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    path = tmp_path / "sub" / "grid.png"
    viz.save_png(path, image)
    with Image.open(path) as png:
        assert png.mode == mode
        np.testing.assert_array_equal(np.asarray(png).reshape(image.shape), image)
    # Only the PNG: no temporary file left beside it.
    assert os.listdir(path.parent) == ["grid.png"]


def test_failed_save_keeps_the_old_png_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    old = np.full((2, 2, 3), 7, np.uint8)
    viz.save_png(path, old)

    def crash(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")  # Some bytes reach the disk, then the writer dies.
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        viz.save_png(path, np.zeros((2, 2, 3), np.uint8))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["grid.png"]
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.asarray(png), old)


def test_save_png_rejects_what_png_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        viz.save_png(tmp_path / "a.png", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="C in"):
        viz.save_png(tmp_path / "a.png", np.zeros((2, 2, 5), np.uint8))
    assert os.listdir(tmp_path) == []
