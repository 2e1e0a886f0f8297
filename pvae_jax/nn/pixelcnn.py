"""PixelCNN layers: masked convolutions, gated vertical/horizontal stacks, conditioning.

Every convolution here is causal in the sub-pixel order of ``masks.py`` (raster order
over pixels, then colour groups). Masked kernels are cropped to the box where the
mask is open (``masks.support_box``) and padded so the output stays aligned: the
same function as a full kernel times a zero mask with a third to a half fewer FLOPs.

Gated stacks follow van den Oord et al. (2016b): a vertical stack that sees the rows
above and a horizontal stack that sees the pixels to the left. Vertical feeds
horizontal (after a one-row shift), never the reverse, so a stack has no blind spot.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pvae_jax.nn import masks
from pvae_jax.nn.conv import Conv, conv2d
from pvae_jax.nn.resnet import weight_norm_kernel

STACKS = ("full", "vertical", "horizontal")


def shift_down(x_BxHxWxC: jax.Array) -> jax.Array:
    """Moves every row one down (zeros enter at the top): row i then holds row i-1."""
    return jnp.pad(x_BxHxWxC, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def gate(x_BxHxWx2F: jax.Array) -> jax.Array:
    """The gated activation tanh(a) * sigmoid(b) of the two halves of the channels."""
    # sigmoid(b) = (1 + tanh(b / 2)) / 2, so one tanh over all channels does both
    # halves: on XLA:CPU a quarter less time forward and backward than tanh and the
    # exp-and-divide sigmoid on split halves. Where sigmoid(b) < 1e-7 it rounds to 0,
    # an absolute error below 1e-7 on the product.
    features, odd = divmod(x_BxHxWx2F.shape[-1], 2)
    if odd:
        raise ValueError(f"gate needs an even number of channels, got {x_BxHxWx2F.shape[-1]}")
    scale = np.repeat(np.array([1.0, 0.5], np.float32), features)
    t_BxHxWx2F = jnp.tanh(x_BxHxWx2F * scale.astype(x_BxHxWx2F.dtype))
    return t_BxHxWx2F[..., :features] * (0.5 + 0.5 * t_BxHxWx2F[..., features:])


def add_bias(y_BxHxWxF: jax.Array, bias) -> jax.Array:
    """``y + bias``, where a bias of shape ``[F]`` or ``[B, 1, 1, F]`` takes its cotangent
    from one sum of y's cotangent over the pixels, which every such bias on y shares.

    An ``[F]`` bias's cotangent is the sum of y's over B, H and W, a per-image one's over
    H and W. With plain adds XLA's simplifier turns the sum over B of the per-image sum
    into one more sum over B, H and W: a second pass over the 2F-channel cotangent of
    every gated layer (the z bias of "without upsampling" PixelVAEs beside the layer's
    own). Here the bias is added as ``[B, F]`` behind an optimisation barrier, whose
    transpose puts the per-image sum behind one too, so the layer's biases all come from
    it; on gated_noup, 57 sums over a [50, 28, 28, 32] cotangent per step became 29, and
    a train step took 0.984x the time (2-core Xeon, 40 alternated rounds).
    """
    bias = jnp.asarray(bias)
    B, F = y_BxHxWxF.shape[0], y_BxHxWxF.shape[-1]
    if y_BxHxWxF.ndim != 4 or bias.shape not in ((F,), (B, 1, 1, F)):
        return y_BxHxWxF + bias
    bias_BxF = jax.lax.optimization_barrier(jnp.broadcast_to(bias.reshape(-1, F), (B, F)))
    return y_BxHxWxF + bias_BxF[:, None, None, :]


def layer_mask(
    stack: str,
    kernel_size: int | tuple[int, int],
    in_channels: int,
    out_channels: int,
    mask_type: str,
    num_groups: int,
) -> np.ndarray:
    """The full-size mask of one masked convolution (see ``masks.py``)."""
    if stack == "full":
        return masks.causal_mask(kernel_size, in_channels, out_channels, mask_type, num_groups)
    if stack == "vertical":
        return masks.vertical_stack_mask(kernel_size, in_channels, out_channels)
    if stack == "horizontal":
        return masks.horizontal_stack_mask(
            kernel_size, in_channels, out_channels, mask_type, num_groups
        )
    raise ValueError(f"stack must be one of {STACKS}, got {stack!r}")


class MaskedConv(nn.Module):
    """A causal convolution with stride 1 and 'SAME' output size.

    Attributes:
      features: output channels (per half when ``gated``).
      kernel_size: odd int or (h, w).
      mask_type: 'A' (the centre tap excludes the current sub-pixel) or 'B' (includes it).
        Ignored by the vertical stack, which never sees the current row after its shift.
      stack: 'full' (PixelCNN mask), 'vertical' or 'horizontal' (Gated PixelCNN stacks).
      num_groups: colour groups (3 for RGB sub-pixel order, 1 for one channel); it must
        divide the input channels and ``features``.
      gated: output ``2 * features`` channels, two halves with the same colour layout,
        for ``gate``.
      weight_norm: parameterise the kernel as g * v / ||v|| (Salimans & Kingma, 2016),
        the norm taken over the masked kernel.
      use_bias: add a bias.
    """

    features: int
    kernel_size: int | tuple[int, int]
    mask_type: str = "B"
    stack: str = "full"
    num_groups: int = 1
    gated: bool = False
    weight_norm: bool = False
    use_bias: bool = True

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        in_channels = x_BxHxWxC.shape[-1]
        mask, _ = cropped_mask(self, in_channels)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        if self.weight_norm:
            v = self.param("v", init, mask.shape)
            # g starts at ||v * mask||, so the layer starts as the plain masked conv.
            params = {"v": v, "g": self.param("g", lambda _: jnp.linalg.norm(
                (v * mask).reshape(-1, mask.shape[-1]), axis=0))}
        else:
            params = {"kernel": self.param("kernel", init, mask.shape)}
        if self.use_bias:
            params["bias"] = self.param("bias", nn.initializers.zeros, mask.shape[-1:])
        kernel, padding, bias = masked_conv_kernel(self, params, in_channels)
        # The vertical stack's outputs read whole rows above them, so Winograd's mixing
        # of a row's columns cannot reach across the causal boundary (conv2d).
        y = conv2d(x_BxHxWxC, kernel.astype(x_BxHxWxC.dtype), padding,
                   winograd=self.stack == "vertical")
        return y if bias is None else add_bias(y, bias)


def cropped_mask(conv: MaskedConv, in_channels: int):
    """The mask of ``conv`` cropped to its support box, and the conv padding that keeps
    the output aligned with the input.

    Returns:
      (mask ``[kh', kw', in_channels, out]``, ``((top, bottom), (left, right))``): output
      position (i, j) reads input rows ``i - top .. i + bottom`` and columns
      ``j - left .. j + right``, zeros outside the image.
    """
    kh, kw = masks.kernel_shape(conv.kernel_size)
    mask = layer_mask(conv.stack, (kh, kw), in_channels, conv.features, conv.mask_type,
                      conv.num_groups)
    if conv.gated:
        mask = np.concatenate([mask, mask], axis=-1)
    # Vertical/horizontal masks may be shorter than the kernel; centre them the same way.
    ch, cw = mask.shape[0] // 2, mask.shape[1] // 2
    r0, r1, c0, c1 = masks.support_box(mask)
    mask = mask[r0 : r1 + 1, c0 : c1 + 1]
    return mask, ((int(ch - r0), int(r1 - ch)), (int(cw - c0), int(c1 - cw)))


def masked_conv_kernel(conv: MaskedConv, params, in_channels: int):
    """The kernel ``conv`` convolves with, from its parameters, for per-position use.

    Args:
      conv: a (possibly unbound) ``MaskedConv`` with the attributes it was built with.
      params: its parameters (``kernel`` or weight-norm ``v``, ``g``; ``bias``).
      in_channels: channels of its input.

    Returns:
      (kernel ``[kh', kw', in_channels, out]`` cropped and masked, padding as in
      ``cropped_mask``, bias ``[out]`` or None). ``conv(x)`` equals a convolution of the
      zero-padded ``x`` with this kernel plus the bias.
    """
    mask, padding = cropped_mask(conv, in_channels)
    if conv.weight_norm:
        kernel = weight_norm_kernel(params["v"], params["g"], mask)
    else:
        kernel = params["kernel"]
        if not mask.all():
            kernel = kernel * mask
    return kernel, padding, params.get("bias") if conv.use_bias else None


class Conditioning(nn.Module):
    """A learned bias from conditioning inputs that do not depend on the pixels.

    ``vector_BxD`` (e.g. z, the "without upsampling" PixelVAE) gives a per-image bias
    through a linear map; ``map_BxHxWxD`` (e.g. upsampled z features) a per-position
    bias through a ``map_kernel_size`` convolution, which for the first layer is the
    same as concatenating the map to the input of a masked convolution. Returns 0.0
    when neither is given, so callers can add it unconditionally.
    """

    features: int
    map_kernel_size: int = 1

    @nn.compact
    def __call__(self, vector_BxD: jax.Array | None = None,
                 map_BxHxWxD: jax.Array | None = None) -> jax.Array | float:
        bias = 0.0
        if vector_BxD is not None:
            bias = bias + nn.Dense(self.features, name="vector")(vector_BxD)[:, None, None, :]
        if map_BxHxWxD is not None:
            k = masks.kernel_shape(self.map_kernel_size)
            bias = bias + Conv(self.features, k, padding="SAME", name="map")(map_BxHxWxD)
        return bias


class RowAboveDense(nn.Module):
    """``nn.Dense(features)(shift_down(x))``: the same parameters (``kernel``, ``bias``)
    and the same values, row 0 included (it reads zeros, so it is the bias).

    Computed as a 1x1 ``conv2d`` with padding (1, -1) (a zero row above, the last row
    cropped), plus the bias. ``conv2d`` applies that padding to the product's output,
    so neither the forward pass nor either gradient makes a shifted copy of ``x`` or
    of the incoming gradient, and the kernel gradient is the one of ``nn/conv.py``.
    History of the speed-ups, gated_noup train steps alternated in one process:
    ``shift_down(Dense(x))`` against ``Dense(shift_down(x))`` 0.89-0.94x the time; a
    1x1 ``conv2d`` against the matmul 0.85x (2-core Zen 3), where XLA:CPU formed the
    matmul's kernel gradient from a transposed copy of the incoming gradient; the
    padding against ``shift_down(conv2d(x))`` 0.92-0.94x (2-core Xeon, 2026-12-06).
    """

    features: int

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (x_BxHxWxC.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = conv2d(x_BxHxWxC, kernel.astype(x_BxHxWxC.dtype)[None, None], ((1, -1), (0, 0)))
        return add_bias(y, bias.astype(x_BxHxWxC.dtype))


class GatedStackLayer(nn.Module):
    """One layer of Gated PixelCNN: (v, h) -> (v, h), with optional conditioning.

    v_pre = vertical(v) + c_v;  h_pre = horizontal(h) + 1x1(shift_down(v_pre)) + c_h;
    v' = gate(v_pre);  h' = 1x1_B(gate(h_pre)) (+ h when ``residual``).

    Attributes:
      features: channels of both stacks' outputs.
      kernel_size: odd; the vertical stack reads ``kernel_size // 2 + 1`` rows.
      mask_type: 'A' for the first layer on the image, 'B' after.
      num_groups: colour groups (see ``masks.py``).
      residual: add h to the horizontal output (needs ``h.shape[-1] == features``).
      weight_norm: weight-normalise the masked convolutions.
      cond_map_kernel_size: kernel of the convolution that reads a conditioning map.
    """

    features: int
    kernel_size: int
    mask_type: str = "B"
    num_groups: int = 1
    residual: bool = True
    weight_norm: bool = False
    cond_map_kernel_size: int = 1

    @nn.compact
    def __call__(self, v_BxHxWxC, h_BxHxWxC, cond_vector_BxD=None, cond_map_BxHxWxD=None):
        if self.residual and h_BxHxWxC.shape[-1] != self.features:
            raise ValueError(
                f"residual=True needs the horizontal stack to have features={self.features} "
                f"channels, got {h_BxHxWxC.shape[-1]}; use residual=False for the first layer"
            )
        conv = dict(features=self.features, kernel_size=self.kernel_size, gated=True,
                    num_groups=self.num_groups, weight_norm=self.weight_norm)
        cond = dict(features=2 * self.features, map_kernel_size=self.cond_map_kernel_size)
        v_pre = MaskedConv(stack="vertical", name="vertical", **conv)(v_BxHxWxC)
        c_v = Conditioning(name="cond_v", **cond)(cond_vector_BxD, cond_map_BxHxWxD)
        v_pre = add_bias(v_pre, c_v)
        h_pre = MaskedConv(stack="horizontal", mask_type=self.mask_type, name="horizontal",
                           **conv)(h_BxHxWxC)
        # Any horizontal channel may read the rows above, whatever its colour group.
        h_pre = h_pre + RowAboveDense(2 * self.features, name="v_to_h")(v_pre)
        c_h = Conditioning(name="cond_h", **cond)(cond_vector_BxD, cond_map_BxHxWxD)
        h_pre = add_bias(h_pre, c_h)
        h_out = MaskedConv(self.features, 1, "B", num_groups=self.num_groups,
                           weight_norm=self.weight_norm, name="h_out")(gate(h_pre))
        if self.residual:
            h_out = h_out + h_BxHxWxC
        return gate(v_pre), h_out


class GatedResidualBlock(nn.Module):
    """The "PixelCNN gated residual block" of PixelVAE's appendix E tables.

    ``num_convs`` gated stack layers of ``kernel_size`` ([5x5] in E.1, [3x3] x 2 in E.2)
    with one skip connection around the block on the horizontal stack, as in van den
    Oord et al. (2016b), which has none on the vertical stack. With ``num_convs=1`` this
    is ``GatedStackLayer(residual=True)``. The first block on the image uses
    ``mask_type='A'`` and no skip, since the channel counts differ.
    """

    features: int
    kernel_size: int
    num_convs: int = 1
    mask_type: str = "B"
    num_groups: int = 1
    weight_norm: bool = False
    cond_map_kernel_size: int = 1

    @nn.compact
    def __call__(self, v_BxHxWxC, h_BxHxWxC, cond_vector_BxD=None, cond_map_BxHxWxD=None):
        if self.num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {self.num_convs}")
        skip = self.mask_type == "B"
        v, h = v_BxHxWxC, h_BxHxWxC
        for i in range(self.num_convs):
            v, h = GatedStackLayer(
                self.features, self.kernel_size, self.mask_type if i == 0 else "B",
                self.num_groups, residual=False, weight_norm=self.weight_norm,
                cond_map_kernel_size=self.cond_map_kernel_size, name=f"layer_{i}",
            )(v, h, cond_vector_BxD, cond_map_BxHxWxD)
        if skip:
            if h_BxHxWxC.shape[-1] != self.features:
                raise ValueError(
                    f"a mask 'B' block adds its input to its output: it needs "
                    f"{self.features} input channels, got {h_BxHxWxC.shape[-1]}"
                )
            h = h + h_BxHxWxC
        return v, h


class GatedConv1x1(nn.Module):
    """The "PixelCNN gated convolution 1x1" of appendix E.1: masked 'B' 1x1, gate."""

    features: int
    num_groups: int = 1
    weight_norm: bool = False

    @nn.compact
    def __call__(self, h_BxHxWxC, cond_vector_BxD=None, cond_map_BxHxWxD=None):
        h_pre = MaskedConv(self.features, 1, "B", num_groups=self.num_groups, gated=True,
                           weight_norm=self.weight_norm, name="conv")(h_BxHxWxC)
        h_pre = add_bias(h_pre, Conditioning(2 * self.features, name="cond")(
            cond_vector_BxD, cond_map_BxHxWxD))
        return gate(h_pre)


class GatedPixelCNNStack(nn.Module):
    """A Gated PixelCNN trunk: one mask-'A' gated layer on the image, then
    ``num_blocks`` mask-'B' gated residual blocks; returns the horizontal stack.

    Attributes:
      features: channels of every layer.
      first_kernel_size: kernel of the first layer (7 in appendix E.1).
      kernel_size: kernel of the residual blocks.
      num_blocks: residual blocks after the first layer (0 allowed).
      num_convs: gated layers per residual block.
      condition_all_layers: every layer reads the conditioning (True), or only the
        first one (False: the same as concatenating the conditioning map to the input,
        as PixelVAE's section 3 describes, at a fraction of the cost).
    """

    features: int
    first_kernel_size: int
    kernel_size: int
    num_blocks: int
    num_convs: int = 1
    num_groups: int = 1
    weight_norm: bool = False
    cond_map_kernel_size: int = 1
    condition_all_layers: bool = True

    @nn.compact
    def __call__(self, x_BxHxWxC, cond_vector_BxD=None, cond_map_BxHxWxD=None):
        common = dict(num_groups=self.num_groups, weight_norm=self.weight_norm,
                      cond_map_kernel_size=self.cond_map_kernel_size)
        v, h = GatedResidualBlock(self.features, self.first_kernel_size, mask_type="A",
                                  name="first", **common)(
            x_BxHxWxC, x_BxHxWxC, cond_vector_BxD, cond_map_BxHxWxD)
        if not self.condition_all_layers:
            cond_vector_BxD = cond_map_BxHxWxD = None
        for i in range(self.num_blocks):
            v, h = GatedResidualBlock(self.features, self.kernel_size, self.num_convs,
                                      name=f"block_{i}", **common)(
                v, h, cond_vector_BxD, cond_map_BxHxWxD)
        return h


class MaskedReLUStack(nn.Module):
    """A PixelCNN trunk of masked ReLU convolutions (van den Oord et al., 2016a style):
    a mask-'A' convolution on the image, then ``len(kernel_sizes) - 1`` mask-'B' ones,
    each followed by ReLU, every layer biased by the conditioning. This stack has the
    PixelCNN blind spot; it is the paper's non-gated baseline."""

    features: int
    kernel_sizes: Sequence[int]
    num_groups: int = 1
    weight_norm: bool = False
    cond_map_kernel_size: int = 1

    @nn.compact
    def __call__(self, x_BxHxWxC, cond_vector_BxD=None, cond_map_BxHxWxD=None):
        h = x_BxHxWxC
        for i, k in enumerate(self.kernel_sizes):
            h = MaskedConv(self.features, k, "A" if i == 0 else "B",
                           num_groups=self.num_groups, weight_norm=self.weight_norm,
                           name=f"conv_{i}")(h)
            h = add_bias(h, Conditioning(self.features, self.cond_map_kernel_size,
                                         name=f"cond_{i}")(cond_vector_BxD, cond_map_BxHxWxD))
            h = nn.relu(h)
        return h
