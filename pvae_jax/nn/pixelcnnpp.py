"""PixelCNN++ layers (Salimans et al., 2017): shifted convolutions, gated resnets.

Causality comes from shifting, not masking. Two streams run side by side:

* ``u`` (down stream): at pixel (i, j) it sees the input rows above i, every column.
* ``ul`` (down-right stream): it also sees row i left of j. Together they cover the
  whole causal past, so there is no blind spot.

A down-shifted convolution pads only at the top (and symmetrically left/right), a
down-right-shifted one only at the top and left; both read the current pixel of
their input stream, which is safe because the streams start strictly shifted
(``down_shift`` / ``right_shift`` of the first layers). Stride-2 versions of the same
convolutions downsample; nearest-neighbour doubling followed by a shifted
convolution upsamples. Both keep each stream's dependency set (a low-resolution
pixel sees no more than the top-left full-resolution pixel of its 2x2 block).

``EmbeddingNet`` is the unshifted twin used for f_w of Kolesnikov & Lampert (2017):
one flow of gated resnets with 3x3 convolutions and optional resampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pvae_jax.nn.conv import Conv

SHIFTS = ("down", "down_right", "none")


def concat_elu(x: jax.Array) -> jax.Array:
    """ELU of ``[x, -x]`` along channels, so no sign of the input is lost."""
    return nn.elu(jnp.concatenate([x, -x], axis=-1))


def down_shift(x_BxHxWxC: jax.Array) -> jax.Array:
    """Moves every row one down (zeros on top): pixel (i, j) now holds row i - 1."""
    return jnp.pad(x_BxHxWxC[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))


def right_shift(x_BxHxWxC: jax.Array) -> jax.Array:
    """Moves every column one right (zeros on the left)."""
    return jnp.pad(x_BxHxWxC[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))


def upsample2(x_BxHxWxC: jax.Array) -> jax.Array:
    """Nearest-neighbour doubling of height and width."""
    return jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)


def _padding(shift: str, kernel_size: tuple[int, int]):
    kh, kw = kernel_size
    if shift == "down":
        return ((kh - 1, 0), ((kw - 1) // 2, (kw - 1) // 2))
    if shift == "down_right":
        return ((kh - 1, 0), (kw - 1, 0))
    return ((kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2))


class ShiftedConv(nn.Module):
    """Convolution padded so that no output reads a row below (or, for 'down_right',
    a column right of) its own position.

    Attributes:
      features: output channels.
      kernel_size: (height, width); 'down' needs an odd width.
      shift: 'down', 'down_right' or 'none' (an ordinary centred 'SAME' conv).
      strides: 1, or 2 to halve height and width (they must be even).
    """

    features: int
    kernel_size: tuple[int, int] = (2, 3)
    shift: str = "down"
    strides: int = 1

    @nn.compact
    def __call__(self, x_BxHxWxC):
        if self.shift not in SHIFTS:
            raise ValueError(f"shift={self.shift!r} is not supported; use one of {SHIFTS}.")
        if self.shift == "down" and self.kernel_size[1] % 2 == 0:
            raise ValueError(f"a 'down' shifted conv needs an odd kernel width, got "
                             f"{self.kernel_size}; use 'down_right' for even widths.")
        if self.strides == 2 and (x_BxHxWxC.shape[1] % 2 or x_BxHxWxC.shape[2] % 2):
            raise ValueError(f"a stride-2 conv needs even height and width, got "
                             f"{x_BxHxWxC.shape[1:3]}; use an image size divisible by "
                             "2 ** (num_stages - 1).")
        return Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=_padding(self.shift, self.kernel_size))(x_BxHxWxC)


def _kernel(shift: str) -> tuple[int, int]:
    return {"down": (2, 3), "down_right": (2, 2), "none": (3, 3)}[shift]


class GatedResnet(nn.Module):
    """PixelCNN++'s gated residual block, optionally conditioned.

    ``x + a * sigmoid(b)`` with ``[a, b] = conv(dropout(concat_elu(conv(concat_elu(x))
    + nin(concat_elu(skip)))) + nin(cond)``: ``skip`` is the other stream (or the
    matching layer of the upward pass), ``cond`` a spatial embedding added to the
    second convolution of every block (Kolesnikov & Lampert, 2017).

    Attributes:
      shift: the convolutions' shift, 'down', 'down_right' or 'none'.
      dropout_rate: dropout after the first convolution, in training only; its
        randomness comes from the 'sample' rng stream.
    """

    shift: str = "down"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x_BxHxWxF, skip_BxHxWxS=None, cond_BxHxWxD=None, train: bool = False):
        features = x_BxHxWxF.shape[-1]
        kernel = _kernel(self.shift)
        h = ShiftedConv(features, kernel, self.shift)(concat_elu(x_BxHxWxF))
        if skip_BxHxWxS is not None:
            h = h + nn.Dense(features, name="skip")(concat_elu(skip_BxHxWxS))
        h = concat_elu(h)
        if self.dropout_rate:
            h = nn.Dropout(self.dropout_rate, rng_collection="sample")(h, deterministic=not train)
        h = ShiftedConv(2 * features, kernel, self.shift)(h)
        if cond_BxHxWxD is not None:
            h = h + nn.Dense(2 * features, name="cond")(cond_BxHxWxD)
        a, b = jnp.split(h, 2, axis=-1)
        return x_BxHxWxF + a * nn.sigmoid(b)


def pool_pyramid(cond_BxHxWxD, num_stages: int) -> tuple[jax.Array, ...] | None:
    """The conditioning map at each stage's resolution (full, /2, /4, ...), by 2x2
    average pooling; computed once per image, before any autoregressive pass."""
    if cond_BxHxWxD is None:
        return None
    maps = [cond_BxHxWxD]
    for _ in range(num_stages - 1):
        maps.append(nn.avg_pool(maps[-1], (2, 2), strides=(2, 2)))
    return tuple(maps)


class PixelCNNPP(nn.Module):
    """The PixelCNN++ network: per-pixel outputs that see only earlier pixels.

    ``num_stages`` resolutions (1: no down/up-sampling; 3: PixelCNN++'s 32-16-8), each
    with ``num_resnet`` gated resnets in the upward pass and ``num_resnet`` (first
    stage) or ``num_resnet + 1`` in the downward pass, which also reads the upward
    pass's activations as skips.

    Attributes:
      features: channels of both streams.
      num_resnet: gated resnets per stage and pass.
      num_stages: resolutions; height and width must divide by 2 ** (num_stages - 1).
      out_features: channels of the output (e.g. mixture parameters per pixel).
      dropout_rate: dropout in every gated resnet (training only).

    Call: ``x_BxHxWxC`` scaled to [-1, 1]; ``cond_maps``: None or one
    ``[B, H/2^s, W/2^s, D]`` map per stage (``pool_pyramid``). Returns
    ``[B, H, W, out_features]``; the output at pixel (i, j) depends only on pixels
    before (i, j) in raster order.
    """

    features: int
    num_resnet: int
    out_features: int
    num_stages: int = 1
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x_BxHxWxC, cond_maps: Sequence[jax.Array] | None = None,
                 train: bool = False):
        _check_sizes(x_BxHxWxC.shape[1:3], self.num_stages)
        if cond_maps is not None and len(cond_maps) != self.num_stages:
            raise ValueError(f"cond_maps holds {len(cond_maps)} maps; the network has "
                             f"{self.num_stages} stages (use pool_pyramid).")
        F = self.features
        cond = (lambda s: None) if cond_maps is None else (lambda s: cond_maps[s])
        block = lambda shift: GatedResnet(shift, self.dropout_rate)
        # A constant channel lets the first convolutions tell zero padding from black.
        x = jnp.concatenate([x_BxHxWxC, jnp.ones_like(x_BxHxWxC[..., :1])], axis=-1)
        u = down_shift(ShiftedConv(F, (2, 3), "down")(x))
        ul = (down_shift(ShiftedConv(F, (1, 3), "down")(x))
              + right_shift(ShiftedConv(F, (2, 1), "down_right")(x)))
        us, uls = [u], [ul]
        for s in range(self.num_stages):
            for _ in range(self.num_resnet):
                u = block("down")(u, None, cond(s), train)
                ul = block("down_right")(ul, u, cond(s), train)
                us.append(u)
                uls.append(ul)
            if s < self.num_stages - 1:
                u = ShiftedConv(F, (2, 3), "down", strides=2)(u)
                ul = ShiftedConv(F, (2, 2), "down_right", strides=2)(ul)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        for s in reversed(range(self.num_stages)):
            for _ in range(self.num_resnet + (s < self.num_stages - 1)):
                u = block("down")(u, us.pop(), cond(s), train)
                ul = block("down_right")(ul, jnp.concatenate([u, uls.pop()], -1), cond(s), train)
            if s > 0:
                u = ShiftedConv(F, (2, 3), "down")(upsample2(u))
                ul = ShiftedConv(F, (2, 2), "down_right")(upsample2(ul))
        assert not us and not uls  # Every upward activation feeds the downward pass once.
        return nn.Dense(self.out_features, name="out")(nn.elu(ul))


def _check_sizes(hw: Sequence[int], num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}.")
    factor = 2 ** (num_stages - 1)
    if hw[0] % factor or hw[1] % factor:
        raise ValueError(f"image size {tuple(hw)} must divide by 2 ** (num_stages - 1) = "
                         f"{factor}; lower num_stages or change the image size.")


class EmbeddingNet(nn.Module):
    """f_w: an unshifted conv net of gated resnets that embeds an auxiliary image.

    Its output resolution is the input's times 2 ** (len(up_after) -
    len(down_after)): equal for the grayscale image, twice for the lower pyramid
    scale (the paper's embedding downsamples once and upsamples twice).

    Attributes:
      features: channels.
      num_blocks: gated resnets.
      down_after: block numbers (1-based) followed by a stride-2 convolution.
      up_after: block numbers followed by doubling and a 3x3 convolution.
      dropout_rate: dropout in the resnets (training only).
    """

    features: int
    num_blocks: int
    down_after: tuple[int, ...] = ()
    up_after: tuple[int, ...] = ()
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool = False):
        h = Conv(self.features, (3, 3))(x_BxHxWxC)
        for b in range(1, self.num_blocks + 1):
            h = GatedResnet("none", self.dropout_rate)(h, train=train)
            if b in self.down_after:
                if h.shape[1] % 2 or h.shape[2] % 2:
                    raise ValueError(f"embedding downsampling after block {b} needs an even "
                                     f"size, got {h.shape[1:3]}; change down_after.")
                h = Conv(self.features, (3, 3), strides=2)(h)
            if b in self.up_after:
                h = Conv(self.features, (3, 3))(upsample2(h))
        return h
