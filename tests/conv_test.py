"""conv2d: the forward pass and both gradients of lax.conv_general_dilated, in forward
and reverse mode, for the kernel and padding shapes the PixelCNN layers use."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pvae_jax.nn.conv import Conv, conv2d, kernel_gradient

DIMS = ("NHWC", "HWIO", "NHWC")
# (kernel h, w), padding: vertical stack, horizontal stack, 1x1, full, first layers,
# the vertical-to-horizontal row shift (RowAboveDense), crops and padding past the kernel.
CASES = [((3, 5), ((2, 0), (2, 2))), ((1, 3), ((0, 0), (2, 0))), ((1, 1), ((0, 0), (0, 0))),
         ((3, 3), ((1, 1), (1, 1))), ((4, 7), ((3, 0), (3, 3))), ((2, 2), ((0, 1), (1, 0))),
         ((1, 1), ((1, -1), (0, 0))), ((3, 3), ((-1, 3), (3, -2)))]


def _lax_conv(x, k, padding):
    """The definition: lax's convolution of the padded (or cropped) input, unpadded.

    The padding is not handed to lax's convolution, which computes some negative
    paddings wrongly on XLA:CPU (see test_negative_padding_is_a_crop_for_any_channels).
    """
    x_pad = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *(p + (0,) for p in padding),
                                                     (0, 0, 0)])
    return jax.lax.conv_general_dilated(x_pad, k, (1, 1), "VALID", dimension_numbers=DIMS)


def _operands(kernel_hw, seed=0, shape=(3, 6, 5, 4), out=6):
    kx, kk, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, shape)
    k = jax.random.normal(kk, (*kernel_hw, shape[-1], out))
    return x, k, kd


@pytest.mark.parametrize("kernel_hw, padding", CASES)
def test_forward_and_reverse_mode_equal_the_lax_convolution(kernel_hw, padding):
    x, k, kd = _operands(kernel_hw)
    y = jax.jit(conv2d, static_argnums=2)(x, k, padding)
    np.testing.assert_array_equal(y, _lax_conv(x, k, padding))
    dy = jax.random.normal(kd, y.shape)

    def loss(conv):
        return lambda x, k: jnp.sum(conv(x, k, padding) * dy)

    got = jax.jit(jax.grad(loss(conv2d), argnums=(0, 1)))(x, k)
    want = jax.grad(loss(_lax_conv), argnums=(0, 1))(x, k)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(kernel_gradient(x, dy, k.shape, padding), want[1],
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel_hw, padding", CASES[:3])
def test_forward_mode_and_jacobians(kernel_hw, padding):
    x, k, _ = _operands(kernel_hw, seed=1, shape=(1, 3, 4, 2), out=2)
    tangents = (0.3 * x, -0.7 * k)
    _, got = jax.jvp(lambda x, k: conv2d(x, k, padding), (x, k), tangents)
    _, want = jax.jvp(lambda x, k: _lax_conv(x, k, padding), (x, k), tangents)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    fwd = jax.jacfwd(lambda k: conv2d(x, k, padding))(k)
    rev = jax.jacrev(lambda k: conv2d(x, k, padding))(k)
    np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-5)


def test_gradients_under_vmap_and_only_where_asked():
    x, k, _ = _operands((3, 5), shape=(2, 2, 6, 5, 4))
    padding = CASES[0][1]
    grads = jax.vmap(jax.grad(lambda x, k: jnp.sum(conv2d(x, k, padding) ** 2), argnums=1),
                     in_axes=(0, None))(x, k)
    want = jnp.stack([jax.grad(lambda k, xi=xi: jnp.sum(_lax_conv(xi, k, padding) ** 2))(k)
                      for xi in x])
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-3)
    # A gradient of the input alone (the kernel held fixed) is the lax one exactly.
    dx = jax.grad(lambda x: jnp.sum(conv2d(x, k, padding) ** 2))(x[0])
    np.testing.assert_array_equal(dx, jax.grad(
        lambda x: jnp.sum(_lax_conv(x, k, padding) ** 2))(x[0]))


@pytest.mark.parametrize("kernel_hw, padding", CASES[:3])
def test_gradients_under_shard_map_with_a_replicated_kernel(kernel_hw, padding):
    """Data parallelism written with shard_map: the batch split over the devices, the
    kernel replicated. Its gradient (summed over the devices by the transpose of the
    kernel's implicit broadcast) and the input's are lax's."""
    n = jax.device_count()  # Two virtual CPU devices under the tests' conftest.
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, k, kd = _operands(kernel_hw, shape=(2 * n, 6, 5, 4))
    dy = jax.random.normal(kd, _lax_conv(x, k, padding).shape)

    def loss(conv):
        def local(x, k, dy):
            return jax.lax.psum(jnp.sum(conv(x, k, padding) * dy), "data")
        return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                             out_specs=P())

    got = jax.jit(jax.grad(loss(conv2d), argnums=(0, 1)))(x, k, dy)
    want = jax.jit(jax.grad(loss(_lax_conv), argnums=(0, 1)))(x, k, dy)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel_hw, padding, strides", [
    ((3, 3), ((0, 1), (0, 1)), (2, 2)),  # the encoders' stride-2 'SAME' layers
    ((3, 5), ((1, 1), (2, 2)), (2, 1)),
])
def test_strided_gradients_under_shard_map_with_a_replicated_kernel(kernel_hw, padding,
                                                                    strides):
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, k, kd = _operands(kernel_hw, shape=(2 * n, 8, 9, 4))
    lax_conv = functools.partial(jax.lax.conv_general_dilated, window_strides=strides,
                                 padding=padding, dimension_numbers=DIMS)
    dy = jax.random.normal(kd, lax_conv(x, k).shape)

    def loss(conv):
        def local(x, k, dy):
            return jax.lax.psum(jnp.sum(conv(x, k) * dy), "data")
        return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                             out_specs=P())

    got = jax.jit(jax.grad(loss(lambda x, k: conv2d(x, k, padding, strides)),
                           argnums=(0, 1)))(x, k, dy)
    want = jax.jit(jax.grad(loss(lax_conv), argnums=(0, 1)))(x, k, dy)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)


def test_negative_padding_is_a_crop_for_any_channels():
    """XLA:CPU (jax 0.10) gets a convolution with padding (-1, 1) wrong for some channel
    counts (here 8 -> 12, rows past the input read garbage), and such a convolution is
    the input gradient of padding (1, -1). conv2d never hands XLA a negative padding."""
    x, k, kd = _operands((1, 1), shape=(2, 5, 6, 8), out=12)
    for padding in (((-1, 1), (0, 0)), ((1, -1), (0, 0))):
        y = jax.jit(conv2d, static_argnums=2)(x, k, padding)
        np.testing.assert_allclose(y, _lax_conv(x, k, padding), rtol=1e-6, atol=1e-6)
        dy = jax.random.normal(kd, y.shape)

        def loss(conv, padding=padding, dy=dy):
            return lambda x, k: jnp.sum(conv(x, k, padding) * dy)

        got = jax.jit(jax.grad(loss(conv2d), argnums=(0, 1)))(x, k)
        want = jax.grad(loss(_lax_conv), argnums=(0, 1))(x, k)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [((-6, 0), (0, 0)), ((0, 0),), ((0.5, 0), (0, 0))])
def test_bad_padding_is_refused(padding):
    x, k, _ = _operands((1, 1))
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, k, padding)


@pytest.mark.parametrize("strides, padding, match", [
    ((0, 1), ((0, 0), (0, 0)), "strides"), ((2,), ((0, 0), (0, 0)), "strides"),
    ((1.5, 1), ((0, 0), (0, 0)), "strides"), ((2, 2), ((-1, 0), (0, 0)), "negative")])
def test_bad_strides_are_refused(strides, padding, match):
    x, k, _ = _operands((3, 3))
    with pytest.raises(ValueError, match=match):
        conv2d(x, k, padding, strides)


# (kernel h, w), padding, strides: the encoders' stride-2 layers ('SAME' on even and
# odd sizes), unequal strides with padding past the kernel, a stride past the kernel.
STRIDED_CASES = [((3, 3), ((0, 1), (0, 1)), (2, 2)), ((3, 3), ((1, 1), (1, 1)), (2, 2)),
                 ((3, 5), ((2, 3), (0, 5)), (2, 3)), ((1, 1), ((0, 0), (1, 0)), (3, 1)),
                 ((2, 2), ((0, 0), (0, 0)), (3, 2))]


@pytest.mark.parametrize("kernel_hw, padding, strides", STRIDED_CASES)
def test_strided_forward_and_gradients_equal_lax(kernel_hw, padding, strides):
    """Both gradients, and the gradient of the kernel gradient (second order), are
    lax's; with 32 output channels the forward and kernel gradient are the compiled
    kernels'."""
    x, k, kd = _operands(kernel_hw, shape=(3, 8, 7, 4), out=32)

    def lax_conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DIMS)

    def ours(x, k):
        return conv2d(x, k, padding, strides)

    y = jax.jit(ours)(x, k)
    np.testing.assert_allclose(y, lax_conv(x, k), rtol=1e-5, atol=1e-5)
    dy = jax.random.normal(kd, y.shape)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)) * dy)

    def second(conv):
        return lambda x, k: jnp.sum(jax.grad(loss(conv), argnums=1)(x, k) ** 2)

    for fn in (loss, second):
        got = jax.jit(jax.grad(fn(ours), argnums=(0, 1)))(x, k)
        want = jax.grad(fn(lax_conv), argnums=(0, 1))(x, k)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(abs(w))))
    _, got = jax.jvp(ours, (x, k), (0.3 * x, -0.7 * k))
    _, want = jax.jvp(lax_conv, (x, k), (0.3 * x, -0.7 * k))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=(3, 3)), dict(kernel_size=(1, 1)),
                                    dict(kernel_size=(3, 3), strides=2),
                                    dict(kernel_size=(3, 3), strides=(1, 2), padding="VALID"),
                                    dict(kernel_size=(3, 3), strides=2,
                                         padding=((-1, 1), (1, 1))),
                                    dict(kernel_size=(2, 3), padding="VALID"),
                                    dict(kernel_size=(3, 3), kernel_dilation=2)])
def test_flax_conv_with_the_drop_in_equals_flax_conv(kwargs):
    """Conv (our convolution inside flax's nn.Conv) has nn.Conv's parameters, outputs
    and gradients, whether the call goes to conv2d (strided or not) or on to lax (a
    dilated kernel, a strided one with negative padding)."""
    x = jax.random.normal(jax.random.key(2), (2, 7, 6, 3))
    ours, theirs = Conv(5, **kwargs), nn.Conv(5, **kwargs)
    params = theirs.init(jax.random.key(3), x)
    assert jax.tree.structure(ours.init(jax.random.key(3), x)) == jax.tree.structure(params)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    np.testing.assert_array_equal(ours.apply(params, x), theirs.apply(params, x))
    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
