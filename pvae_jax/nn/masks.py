"""Causal masks for autoregressive convolutions, as numpy arrays.

Sub-pixels are ordered in raster order over pixels, then by colour within a pixel
(R < G < B). A kernel tap reads the input at (row + dr, col + dc); a mask says which
(tap, input channel, output channel) triples may carry information.

Colour groups. The channels of every layer are split into ``num_groups`` contiguous
blocks of equal size: channel ``c`` of a layer with ``n`` channels is in group
``c // (n // num_groups)``. For an RGB image with ``num_groups=3`` that makes channel 0
(R) group 0, G group 1, B group 2; hidden layers hold their R features first, then G,
then B. Output logits laid out as ``[C, K]`` and flattened keep the same blocks, so
``reshape(..., C, K)`` recovers them. At the centre tap, output group ``g`` may read
input groups ``< g`` (mask 'A', first layer: R sees nothing of its own pixel) or
``<= g`` (mask 'B', later layers, whose group-g features already exclude x_g itself).

Kernel layout is flax/lax HWIO: ``[kernel_h, kernel_w, in_channels, out_channels]``.
"""

from __future__ import annotations

import numpy as np

MASK_TYPES = ("A", "B")


def _check_mask_type(mask_type: str) -> None:
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")


def kernel_shape(kernel_size: int | tuple[int, int]) -> tuple[int, int]:
    """Returns (kernel_h, kernel_w) for an odd kernel size; raises ValueError otherwise."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if kh < 1 or kw < 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd and positive in both dimensions (1, 3, 5, ...) so the "
            f"centre tap is the current pixel, got {kernel_size!r}"
        )
    return kh, kw


def channel_groups(num_channels: int, num_groups: int) -> np.ndarray:
    """Colour group of each channel: contiguous blocks of ``num_channels // num_groups``."""
    if num_groups < 1 or num_channels < 1 or num_channels % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of the channel count {num_channels}, "
            f"got num_groups={num_groups}"
        )
    return np.arange(num_channels) // (num_channels // num_groups)


def centre_mask(
    in_channels: int, out_channels: int, mask_type: str, num_groups: int = 1
) -> np.ndarray:
    """[in, out] mask of the centre tap: which input channels of the current pixel each
    output channel may read."""
    _check_mask_type(mask_type)
    g_in = channel_groups(in_channels, num_groups)[:, None]
    g_out = channel_groups(out_channels, num_groups)[None, :]
    allowed = g_in < g_out if mask_type == "A" else g_in <= g_out
    return allowed.astype(np.float32)


def causal_mask(
    kernel_size: int | tuple[int, int],
    in_channels: int,
    out_channels: int,
    mask_type: str,
    num_groups: int = 1,
) -> np.ndarray:
    """Mask of a PixelCNN convolution (van den Oord et al., 2016a).

    Rows above the centre are open, the centre row is open left of the centre, and
    the centre tap follows ``centre_mask``. The receptive field of a stack of these
    has a blind spot to the upper right; the gated stacks below do not.

    Returns:
      float32 ``[kh, kw, in_channels, out_channels]`` of zeros and ones.
    """
    kh, kw = kernel_shape(kernel_size)
    mask = np.zeros((kh, kw, in_channels, out_channels), np.float32)
    mask[: kh // 2] = 1.0
    mask[kh // 2, : kw // 2] = 1.0
    mask[kh // 2, kw // 2] = centre_mask(in_channels, out_channels, mask_type, num_groups)
    return mask


def vertical_stack_mask(
    kernel_size: int | tuple[int, int], in_channels: int, out_channels: int
) -> np.ndarray:
    """Mask of the Gated PixelCNN's vertical stack (van den Oord et al., 2016b).

    The rows above and the centre row, every column. The vertical stack's output at
    row ``i`` thus depends on input rows ``<= i``; it becomes causal by being shifted
    down one row before it feeds the horizontal stack (``shift_down``), which is why
    it may read the whole centre row here and still leave no blind spot.
    """
    kh, kw = kernel_shape(kernel_size)
    mask = np.zeros((kh, kw, in_channels, out_channels), np.float32)
    mask[: kh // 2 + 1] = 1.0
    return mask


def horizontal_stack_mask(
    kernel_size: int | tuple[int, int],
    in_channels: int,
    out_channels: int,
    mask_type: str,
    num_groups: int = 1,
) -> np.ndarray:
    """Mask of the Gated PixelCNN's horizontal stack: the centre row, left of the
    centre, plus the centre tap per ``centre_mask``. Only the kernel width is used;
    the mask is one row high."""
    _, kw = kernel_shape(kernel_size)
    return causal_mask((1, kw), in_channels, out_channels, mask_type, num_groups)


def support_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Smallest (row0, row1, col0, col1), inclusive, holding every open tap and the centre.

    A masked kernel cropped to this box computes the same convolution with fewer
    FLOPs (the causal masks above are zero over almost half of the kernel). The
    centre is always kept so that the crop's padding is never negative.
    """
    kh, kw = mask.shape[:2]
    rows, cols = np.nonzero(mask.reshape(kh, kw, -1).any(axis=-1))
    rows = np.append(rows, kh // 2)
    cols = np.append(cols, kw // 2)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
