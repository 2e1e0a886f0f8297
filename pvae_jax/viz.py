"""Image grids of samples and reconstructions, written as PNG with Pillow."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from pvae_jax import fileio


def to_uint8(images, num_levels: int) -> np.ndarray:
    """Integer levels in ``[0, num_levels)`` to 0..255 (binary {0, 1} -> {0, 255}).

    Raises:
      ValueError: ``num_levels`` outside [2, 256], or values outside its range.
    """
    if not 2 <= num_levels <= 256:
        raise ValueError(f"num_levels must be in [2, 256], got {num_levels}")
    images = np.asarray(images)
    if images.size and (images.min() < 0 or images.max() >= num_levels):
        raise ValueError(f"image values must be in [0, {num_levels}), got "
                         f"[{images.min()}, {images.max()}]")
    if num_levels == 256:
        return images.astype(np.uint8)
    return np.round(images.astype(np.float64) * (255.0 / (num_levels - 1))).astype(np.uint8)


def image_grid(images_NxHxWxC, num_levels: int, ncols: int | None = None, pad: int = 1,
               pad_value: int = 255) -> np.ndarray:
    """Tiles N images into one, row by row, with ``pad`` pixels between and around them.

    Args:
      images_NxHxWxC: integer images with values in ``[0, num_levels)`` (numpy or jax).
      num_levels: K of the images; values are scaled to 0..255.
      ncols: images per row; default ``ceil(sqrt(N))``. Cells after the last image
        are left at ``pad_value``.
      pad: width of the border lines in pixels.
      pad_value: 0..255 intensity of the border lines and empty cells.

    Returns:
      uint8 array ``[rows * (H + pad) + pad, ncols * (W + pad) + pad, C]``; one channel
      stays one channel (grayscale).
    """
    images = to_uint8(images_NxHxWxC, num_levels)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be [N, H, W, C] with N >= 1, got shape {images.shape}")
    if pad < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"pad must be >= 0 and pad_value in [0, 255], got {pad}, {pad_value}")
    N, H, W, C = images.shape
    ncols = ncols or math.ceil(math.sqrt(N))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(N / ncols)
    grid = np.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, C), pad_value, np.uint8)
    for n in range(N):
        top = pad + (n // ncols) * (H + pad)
        left = pad + (n % ncols) * (W + pad)
        grid[top:top + H, left:left + W] = images[n]
    return grid


def reconstruction_grid(originals_NxHxWxC, reconstructions_NxHxWxC, num_levels: int,
                        pairs_per_row: int | None = None, pad: int = 1,
                        pad_value: int = 255) -> np.ndarray:
    """Originals and their reconstructions in alternate columns, as the PixelVAE paper's
    Fig. 10: even columns hold originals, the column to the right of each its
    reconstruction.

    Args:
      originals_NxHxWxC: integer images in ``[0, num_levels)``.
      reconstructions_NxHxWxC: the same shape, reconstruction n of original n.
      num_levels: K of the images.
      pairs_per_row: (original, reconstruction) pairs per row; default
        ``ceil(sqrt(N))``.
      pad, pad_value: as in ``image_grid``.

    Returns:
      uint8 array ``[H', W', C]`` from ``image_grid`` with ``2 * pairs_per_row`` columns.
    """
    originals = np.asarray(originals_NxHxWxC)
    reconstructions = np.asarray(reconstructions_NxHxWxC)
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {originals.shape} and reconstructions "
                         f"{reconstructions.shape} must have the same shape")
    pairs_per_row = pairs_per_row or math.ceil(math.sqrt(max(len(originals), 1)))
    # [o0, r0, o1, r1, ...] laid out 2 * pairs_per_row to a row puts every original
    # in an even column with its reconstruction beside it.
    interleaved = np.stack([originals, reconstructions], axis=1).reshape(
        -1, *originals.shape[1:])
    return image_grid(interleaved, num_levels, ncols=2 * pairs_per_row, pad=pad,
                      pad_value=pad_value)


def save_png(path: str | os.PathLike, image_HxWxC) -> None:
    """Writes a uint8 ``[H, W, C]`` (C = 1, 3 or 4) or ``[H, W]`` image as PNG.

    The PNG is written to a temporary file in the same directory and renamed over
    ``path``, so a crash leaves either the old file or the new one, never half of it.
    Missing parent directories are created.
    """
    image = np.asarray(image_HxWxC)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}; see to_uint8")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(f"image must be [H, W] or [H, W, C] with C in (1, 3, 4), got "
                         f"shape {np.shape(image_HxWxC)}")
    with fileio.atomic_write(path, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
