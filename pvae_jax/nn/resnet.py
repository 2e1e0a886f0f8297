"""Pre-activation residual networks of PixelVAE appendix E.2 (LSUN, 64x64 ImageNet).

Each block is norm -> ELU -> conv1 -> norm -> ELU -> conv2, added to a shortcut.
Downsampling blocks put a 2x2 stride in the second conv; upsampling blocks use a
sub-pixel convolution (conv to 4x the channels, then depth-to-space) as the first
conv, as the paper says. Where the paper is silent we follow the authors' code
(github.com/igul222/PixelVAE): in a 'down' block conv1 keeps the input width and
conv2 changes it; a changed shape takes a 1x1 shortcut resampled like the block
(stride-2 1x1 conv for 'down', sub-pixel 1x1 conv for 'up'), fed the raw input.

The paper uses batch norm in these networks and weight norm in masked layers, so
`WeightNormConv` takes an optional causal mask and `weight_norm_kernel` is a pure
function the masked PixelCNN layers can share. All tensors are NHWC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pvae_jax.nn.conv import Conv, conv_general_dilated

NORMS = ("batch", "weight", "none")
RESAMPLES = (None, "down", "up")

_Padding = str | Sequence[tuple[int, int]]


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {tuple(allowed)}.")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, Sequence) else tuple(value)
    if len(pair) != 2 or not all(_is_positive_int(v) for v in pair):
        raise ValueError(f"{name}={value!r} must be a positive int or a pair of them.")
    return pair


def depth_to_space(x_BxHxWxC: jax.Array, block_size: int) -> jax.Array:
    """Moves channel blocks into space: `[B, H, W, r*r*C] -> [B, H*r, W*r, C]`.

    Same layout as TensorFlow's `depth_to_space` (NHWC, 'DCR'):
    `out[b, h*r + i, w*r + j, c] = x[b, h, w, (i*r + j)*C + c]`.

    Args:
      x_BxHxWxC: input; its channel count must divide by `block_size**2`.
      block_size: the upsampling factor r, a positive int.

    Returns:
      The rearranged array.

    Raises:
      ValueError: if `block_size` is not positive or the channels do not divide.
    """
    r = _check_block_size(block_size)
    b, h, w, c = x_BxHxWxC.shape
    if c % (r * r):
        raise ValueError(
            f"depth_to_space needs channels divisible by block_size**2={r * r}; got {c}."
        )
    c_out = c // (r * r)
    x_BxHxWxrxrxc = x_BxHxWxC.reshape(b, h, w, r, r, c_out)
    x_BxHxrxWxrxc = x_BxHxWxrxrxc.transpose(0, 1, 3, 2, 4, 5)
    return x_BxHxrxWxrxc.reshape(b, h * r, w * r, c_out)


def space_to_depth(x_BxHxWxC: jax.Array, block_size: int) -> jax.Array:
    """Inverse of `depth_to_space`: `[B, H*r, W*r, C] -> [B, H, W, r*r*C]`.

    Args:
      x_BxHxWxC: input; its height and width must divide by `block_size`.
      block_size: the downsampling factor r, a positive int.

    Returns:
      The rearranged array.

    Raises:
      ValueError: if `block_size` is not positive or the spatial size does not divide.
    """
    r = _check_block_size(block_size)
    b, h, w, c = x_BxHxWxC.shape
    if h % r or w % r:
        raise ValueError(
            f"space_to_depth needs height and width divisible by block_size={r}; got {h}x{w}."
        )
    x_Bxhxrxwxrxc = x_BxHxWxC.reshape(b, h // r, r, w // r, r, c)
    x_Bxhxwxrxrxc = x_Bxhxrxwxrxc.transpose(0, 1, 3, 2, 4, 5)
    return x_Bxhxwxrxrxc.reshape(b, h // r, w // r, r * r * c)


def _check_block_size(block_size: int) -> int:
    if not _is_positive_int(block_size):
        raise ValueError(f"block_size={block_size!r} must be a positive int.")
    return block_size


def weight_norm_kernel(
    v: jax.Array, g: jax.Array, mask: np.ndarray | jax.Array | None = None
) -> jax.Array:
    """Weight-normalised kernel `g * (v * mask) / ||v * mask||` (Salimans & Kingma, 2016).

    The norm runs over every axis but the last (output features), so the same
    function serves conv kernels `[kh, kw, in, out]` and dense kernels `[in, out]`.
    The mask is applied before the norm so that masked taps, which never touch the
    output, do not shrink the effective kernel either.

    Args:
      v: kernel direction, `[..., out]`.
      g: per-output gain, `[out]`.
      mask: optional array broadcastable to `v`; zeros remove taps.

    Returns:
      The effective kernel, shaped like `v`; its per-output norm equals `|g|`.
    """
    if mask is not None:
        v = v * jnp.asarray(mask, v.dtype)
    reduce_axes = tuple(range(v.ndim - 1))
    squared_norm = jnp.sum(jnp.square(v), axis=reduce_axes)
    # A fully masked output channel (e.g. a 1x1 mask 'A' conv's first colour) has norm
    # 0; dividing by 1 instead keeps its kernel at 0 and its gradients finite. A
    # clamp like max(norm, eps) would not: rsqrt's slope at eps overflows to inf.
    safe_squared_norm = jnp.where(squared_norm > 0, squared_norm, 1.0)
    return v * (g * jax.lax.rsqrt(safe_squared_norm))


class WeightNormConv(nn.Module):
    """2-D convolution with a weight-normalised, optionally masked kernel.

    Parameters are `v` (`[kh, kw, in, features]`, the direction), `g`
    (`[features]`, the gain) and `bias`. `g` starts at the norm of the masked
    initial `v`, so at init the layer equals a plain conv with kernel `v * mask`;
    no data-dependent init is done.

    Attributes:
      features: output channels.
      kernel_size: int or (kh, kw).
      strides: int or (sh, sw).
      padding: 'SAME', 'VALID' or explicit ((top, bottom), (left, right)).
      use_bias: whether to add a learned bias.
      mask: optional numpy array broadcastable to `[kh, kw, in, features]`
        (e.g. a PixelCNN causal mask). A module holding one is not hashable, so
        do not pass it as a static argument to `jax.jit`.
      kernel_init: initialiser of `v`.
      bias_init: initialiser of `bias`.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: _Padding = "SAME"
    use_bias: bool = True
    mask: np.ndarray | None = None
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Convolves `x_BxHxWxC` and returns `[B, H', W', features]`."""
        if x_BxHxWxC.ndim != 4:
            raise ValueError(f"WeightNormConv expects NHWC input; got shape {x_BxHxWxC.shape}.")
        kernel_shape = (*_pair("kernel_size", self.kernel_size), x_BxHxWxC.shape[-1], self.features)
        mask = self._checked_mask(kernel_shape)
        v = self.param("v", self.kernel_init, kernel_shape)
        g = self.param("g", lambda _: _initial_gain(v, mask))
        kernel = weight_norm_kernel(v, g, mask)
        x_BxHxWxC, kernel = nn.dtypes.promote_dtype(x_BxHxWxC, kernel)
        y_BxHxWxF = conv_general_dilated(
            x_BxHxWxC,
            kernel,
            window_strides=_pair("strides", self.strides),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            y_BxHxWxF = y_BxHxWxF + self.param("bias", self.bias_init, (self.features,))
        return y_BxHxWxF

    def _checked_mask(self, kernel_shape: tuple[int, ...]) -> np.ndarray | None:
        if self.mask is None:
            return None
        mask = np.asarray(self.mask, np.float32)
        try:
            np.broadcast_to(mask, kernel_shape)
        except ValueError:
            raise ValueError(
                f"mask of shape {mask.shape} does not broadcast to the kernel {kernel_shape}."
            ) from None
        return mask


def _initial_gain(v: jax.Array, mask: np.ndarray | None) -> jax.Array:
    if mask is not None:
        v = v * mask
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(v.ndim - 1))))


def make_conv(
    norm: str,
    features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    use_bias: bool = True,
    name: str | None = None,
) -> nn.Module:
    """Picks the conv for a normalisation scheme; call inside a compact method.

    Args:
      norm: 'weight' gives a `WeightNormConv`; 'batch' and 'none' a plain `nn.Conv`
        (batch norm lives between the convs, not inside them).
      features: output channels.
      kernel_size: square kernel side.
      strides: square stride.
      use_bias: whether the conv adds a bias.
      name: submodule name.

    Returns:
      An unbound conv module mapping NHWC to NHWC with 'SAME' padding.

    Raises:
      ValueError: if `norm` is not one of `NORMS`.
    """
    _check_choice("norm", norm, NORMS)
    if norm == "weight":
        return WeightNormConv(features, kernel_size, strides=strides, use_bias=use_bias, name=name)
    return Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding="SAME",
        use_bias=use_bias,
        name=name,
    )


class SubpixelConv(nn.Module):
    """Upsamples 2x by a conv to `4 * features` channels and `depth_to_space`.

    The conv runs at the input resolution and each of the 2x2 output positions gets
    its own quarter of the channels (Shi et al., 2016), as in the authors' code.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
      norm: conv kind, as in `make_conv`.
      use_bias: whether the conv adds a bias.
    """

    features: int
    kernel_size: int = 3
    norm: str = "batch"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Returns `[B, 2H, 2W, features]`."""
        conv = make_conv(
            self.norm, 4 * self.features, self.kernel_size, use_bias=self.use_bias, name="conv"
        )
        return depth_to_space(conv(x_BxHxWxC), 2)


class ResidualBlock(nn.Module):
    """Pre-activation residual block with ELU (PixelVAE appendix E.2).

    `y = shortcut(x) + conv2(ELU(norm2(conv1(ELU(norm1(x))))))`. With norm='batch'
    the norms are `nn.BatchNorm` layers; with 'weight' the convs are
    weight-normalised and the norms are identities; with 'none' both are plain.

    Batch norm normalises with the batch's statistics when `train=True` (and then
    updates the `batch_stats` collection, which must be passed as mutable) and with
    running averages when `train=False`, so eval outputs of an example do not depend
    on the rest of its batch. The momentum defaults to 0.9 rather than flax's 0.99:
    the running averages then forget their (0, 1) start within a few dozen steps
    instead of a few hundred, so short runs and early evaluations use sensible
    statistics. The price is that they follow only the last ~10 batches; long runs
    that want steadier eval statistics can set 0.99.

    Attributes:
      features: output channels.
      resample: None keeps the size; 'down' halves it (stride 2 in conv2; height and
        width must be even); 'up' doubles it (sub-pixel conv as conv1).
      norm: 'batch', 'weight' or 'none'.
      kernel_size: odd side of both convs (an even one would shift the features).
      bn_momentum: running-average momentum of batch norm.
      bn_epsilon: variance epsilon of batch norm.
      bn_axis_name: mesh axis to average batch statistics over when the block runs
        per device (inside `shard_map`); None under plain `jit`, where the batch
        statistics already span the global batch.
    """

    features: int
    resample: str | None = None
    norm: str = "batch"
    kernel_size: int = 3
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None

    def __post_init__(self) -> None:
        _check_choice("norm", self.norm, NORMS)
        _check_choice("resample", self.resample, RESAMPLES)
        if not _is_positive_int(self.kernel_size) or self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size={self.kernel_size!r} is not supported; use a positive odd int "
                "(1, 3, 5, ...)."
            )
        if not _is_positive_int(self.features):
            raise ValueError(f"features={self.features!r} must be a positive int.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
        """Applies the block.

        Args:
          x_BxHxWxC: NHWC input.
          train: batch statistics and their update (True) or running averages (False).

        Returns:
          `[B, H', W', features]`, H' = H/2, H or 2H for 'down', None or 'up'.
        """
        self._check_input(x_BxHxWxC)
        h_BxHxWxC = nn.elu(self._norm(train, "norm1")(x_BxHxWxC))
        h_BxHxWxD = self._conv1(x_BxHxWxC.shape[-1])(h_BxHxWxC)
        h_BxHxWxD = nn.elu(self._norm(train, "norm2")(h_BxHxWxD))
        residual_BxHxWxF = self._conv2()(h_BxHxWxD)
        return self._shortcut(x_BxHxWxC) + residual_BxHxWxF

    def _check_input(self, x_BxHxWxC: jax.Array) -> None:
        if x_BxHxWxC.ndim != 4:
            raise ValueError(f"ResidualBlock expects NHWC input; got shape {x_BxHxWxC.shape}.")
        _, h, w, _ = x_BxHxWxC.shape
        if self.resample == "down" and (h % 2 or w % 2):
            raise ValueError(
                f"resample='down' needs an even height and width; got {h}x{w}. "
                "Use an image size divisible by 2 per downsampling block."
            )

    def _norm(self, train: bool, name: str) -> Callable[[jax.Array], jax.Array]:
        if self.norm != "batch":
            return lambda x: x
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.bn_axis_name,
            name=name,
        )

    def _conv1(self, in_features: int) -> nn.Module:
        # A batch norm follows conv1 and cancels any bias it had.
        use_bias = self.norm != "batch"
        if self.resample == "up":
            return SubpixelConv(
                self.features, self.kernel_size, self.norm, use_bias=use_bias, name="conv1"
            )
        # The authors' 'down' blocks keep the input width until the strided conv2.
        features = in_features if self.resample == "down" else self.features
        return make_conv(self.norm, features, self.kernel_size, use_bias=use_bias, name="conv1")

    def _conv2(self) -> nn.Module:
        strides = 2 if self.resample == "down" else 1
        return make_conv(self.norm, self.features, self.kernel_size, strides=strides, name="conv2")

    def _shortcut(self, x_BxHxWxC: jax.Array) -> jax.Array:
        if self.resample is None and x_BxHxWxC.shape[-1] == self.features:
            return x_BxHxWxC
        if self.resample == "up":
            return SubpixelConv(self.features, 1, self.norm, name="shortcut")(x_BxHxWxC)
        strides = 2 if self.resample == "down" else 1
        conv = make_conv(self.norm, self.features, 1, strides=strides, name="shortcut")
        return conv(x_BxHxWxC)
