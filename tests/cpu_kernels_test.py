"""The compiled CPU kernels (kernel gradient, forward pass): against lax, sharded, summed
in a fixed order, and the fallback when they cannot be built."""

import ctypes
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pvae_jax import native
from pvae_jax.nn import conv, cpu_kernels

# (x shape, kernel shape, padding): the gated stacks' kernels, and shapes that leave
# remainders in every register block. Kernel gradient: rows of kw*C 5 with AVX2, 12
# with AVX-512, then 4, then 1; columns of F 16 and 8 with AVX2, 32, 16 and 8 with
# AVX-512, then 1. Forward pass: the same columns, then pixels of a row 12, 6, 4, 2, 1
# (AVX-512, by 32 columns), 24, 12, 4, 2, 1 (by 16), 14, 8, 4, 1 (by 16, kernels 3 or
# 5 wide) or 6, 4, 2, 1 (AVX2, by 16); the 31- and 27-pixel rows below take most of
# these.
CASES = [
    ((3, 9, 8, 16), (3, 5, 16, 32), ((2, 0), (2, 2))),  # vertical stack
    ((3, 9, 8, 16), (1, 3, 16, 32), ((0, 0), (2, 0))),  # horizontal stack
    ((3, 9, 8, 32), (1, 1, 32, 32), ((0, 0), (0, 0))),  # vertical-to-horizontal 1x1
    ((2, 7, 7, 1), (7, 7, 1, 10), ((3, 3), (3, 3))),  # first layer on the image
    ((2, 6, 5, 3), (2, 3, 3, 27), ((1, 0), (1, 1))),
    ((2, 6, 5, 3), (3, 2, 3, 5), ((0, 0), (0, 0))),  # valid, output smaller than x
    ((2, 6, 5, 3), (2, 3, 3, 16), ((2, 3), (4, 1))),  # border pixels reading only padding
    ((2, 5, 6, 8), (1, 1, 8, 12), ((1, -1), (0, 0))),  # the row shift of RowAboveDense
    ((2, 6, 5, 3), (3, 3, 3, 16), ((-1, 2), (3, -1))),  # crops
    ((2, 3, 31, 4), (2, 3, 4, 59), ((1, 0), (2, 0))),  # F = 32 + 16 + 8 + 3
    ((2, 4, 31, 8), (3, 5, 8, 16), ((0, 2), (2, 2))),  # a vertical input gradient's form
    ((2, 3, 27, 6), (1, 3, 6, 48), ((0, 0), (0, 2))),  # horizontal, F = 32 + 16
]
# (x shape, kernel shape, padding, strides): the encoders' stride-2 layers ('SAME' on
# even and odd sizes), unequal strides, padding past the kernel, and a stride larger
# than the kernel (pixels no window reads).
STRIDED_CASES = [
    ((3, 28, 28, 8), (3, 3, 8, 32), ((0, 1), (0, 1)), (2, 2)),
    ((2, 7, 7, 16), (3, 3, 16, 64), ((1, 1), (1, 1)), (2, 2)),
    ((2, 9, 11, 3), (3, 5, 3, 37), ((2, 3), (0, 4)), (2, 3)),
    ((2, 10, 10, 4), (1, 2, 4, 32), ((0, 0), (1, 0)), (3, 1)),
    ((2, 8, 9, 5), (2, 2, 5, 16), ((0, 0), (0, 0)), (3, 4)),
]


def _lax_conv(x, k, padding, strides=(1, 1)):
    # The padding (or crop) applied to x, then an unpadded convolution: lax's own
    # convolution gets some negative paddings wrong on XLA:CPU (see conv_test).
    x_pad = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *(p + (0,) for p in padding),
                                                     (0, 0, 0)])
    return jax.lax.conv_general_dilated(x_pad, k, strides, "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _lax_kernel_gradient(x, dy, kernel_shape, padding, strides=(1, 1)):
    (dk,) = jax.linear_transpose(lambda k: _lax_conv(x, k, padding, strides),
                                 jax.ShapeDtypeStruct(kernel_shape, jnp.float32))(dy)
    return dk


def _operands(x_shape, kernel_shape, padding, seed=0, strides=(1, 1)):
    kx, kd = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, x_shape)
    y_shape = jax.eval_shape(lambda x: _lax_conv(x, jnp.zeros(kernel_shape), padding, strides),
                             x).shape
    return x, jax.random.normal(kd, y_shape)


def test_the_kernels_build_here():
    # CI installs a C++ compiler: if this fails, every other test here ran XLA's path.
    assert cpu_kernels.registered()


@pytest.mark.parametrize("x_shape, kernel_shape, padding", CASES)
def test_kernel_gradient_equals_lax(x_shape, kernel_shape, padding):
    x, dy = _operands(x_shape, kernel_shape, padding)
    got = jax.jit(cpu_kernels.kernel_gradient, static_argnums=(2, 3))(x, dy, kernel_shape,
                                                                      padding)
    want = _lax_kernel_gradient(x, dy, kernel_shape, padding)
    assert got.shape == kernel_shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x_shape, kernel_shape, padding, strides", STRIDED_CASES)
def test_strided_kernel_gradient_and_forward_equal_lax(x_shape, kernel_shape, padding,
                                                       strides):
    x, dy = _operands(x_shape, kernel_shape, padding, strides=strides)
    got = jax.jit(cpu_kernels.kernel_gradient, static_argnums=(2, 3, 4, 5))(
        x, dy, kernel_shape, padding, True, strides)
    np.testing.assert_allclose(got, _lax_kernel_gradient(x, dy, kernel_shape, padding, strides),
                               rtol=1e-5, atol=1e-4)
    k = jax.random.normal(jax.random.key(1), kernel_shape)
    got = jax.jit(cpu_kernels.conv, static_argnums=(2, 3, 4))(x, k, padding, True, strides)
    assert got.shape == dy.shape
    np.testing.assert_allclose(got, _lax_conv(x, k, padding, strides), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides", [(0, 1), (1, -2), (2,), (1.5, 1)])
def test_bad_strides_are_refused(strides):
    x, dy = _operands(*CASES[0])
    with pytest.raises(ValueError, match="strides"):
        cpu_kernels.conv(x, jnp.zeros(CASES[0][1]), CASES[0][2], strides=strides)
    with pytest.raises(ValueError, match="strides"):
        cpu_kernels.kernel_gradient(x, dy, CASES[0][1], CASES[0][2], strides=strides)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="-mno-avx512f is an x86 flag")
def test_the_avx2_blocks_equal_lax_on_any_x86_cpu(monkeypatch, tmp_path):
    # The other tests run the blocks -march=native picks: on an AVX-512 CPU the AVX2
    # ones only run here.
    # The native library is registered first, under its own targets: registered()
    # would otherwise run under the patched ones below, if no test ran it before.
    assert cpu_kernels.registered()
    library = ctypes.cdll.LoadLibrary(str(native.build(
        cpu_kernels._SOURCE, native.compiler(), tmp_path, ("-march=native", "-mno-avx512f"))))
    target = "pvae_kernel_gradient_avx2"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.PvaeKernelGradient),
                                platform="cpu")
    jax.ffi.register_ffi_target("pvae_conv_avx2", jax.ffi.pycapsule(library.PvaeConv),
                                platform="cpu")
    monkeypatch.setattr(cpu_kernels, "_TARGET", target)
    monkeypatch.setattr(cpu_kernels, "_CONV_TARGET", "pvae_conv_avx2")
    assert library.PvaeWideBlocks() == 0
    for x_shape, kernel_shape, padding, strides in [(*c, (1, 1)) for c in CASES] + STRIDED_CASES:
        x, dy = _operands(x_shape, kernel_shape, padding, strides=strides)
        got = jax.jit(cpu_kernels._ffi_kernel_gradient, static_argnums=(2, 3, 4, 5))(
            x, dy, kernel_shape, padding, strides, True)  # no Winograd without AVX-512
        want = _lax_kernel_gradient(x, dy, kernel_shape, padding, strides)
        np.testing.assert_allclose(got.reshape(kernel_shape), want, rtol=1e-5, atol=1e-4)
        k = jax.random.normal(jax.random.key(1), kernel_shape)
        got = jax.jit(cpu_kernels.conv, static_argnums=(2, 3, 4))(x, k, padding, False, strides)
        np.testing.assert_allclose(got, _lax_conv(x, k, padding, strides), rtol=1e-5, atol=1e-5)


# Winograd along the rows (winograd=True): whole tiles of 4 output columns (Wo = 8),
# tiles then columns by the direct sums (Wo = 31, 11, 13), 7 tiles then 7 then 2 (Wo =
# 64), F = 32 + 16, C = 48, a kernel row cropped at the top, the vertical stack's input
# gradient (32 -> 16), and a row stride (the columns' must be 1).
WINOGRAD_CASES = [
    ((3, 9, 8, 16), (3, 5, 16, 32), ((2, 0), (2, 2)), (1, 1)),  # vertical stack
    ((2, 4, 31, 32), (3, 5, 32, 16), ((0, 2), (2, 2)), (1, 1)),  # its input gradient
    ((2, 5, 11, 16), (3, 5, 16, 48), ((2, 0), (2, 2)), (1, 1)),
    ((2, 3, 64, 48), (2, 5, 48, 32), ((1, 0), (2, 2)), (1, 1)),
    ((2, 6, 13, 16), (3, 5, 16, 16), ((-1, 2), (0, 0)), (1, 1)),
    ((2, 9, 12, 16), (3, 5, 16, 32), ((1, 1), (2, 2)), (2, 1)),
]
# Within 8 float32 epsilons of the sum of the terms' magnitudes (measured on these
# cases: at most 5.2 by Winograd, 2.2 by the direct sums).
WINOGRAD_BOUND = 8 * np.finfo(np.float32).eps


def _float64_windows(x, padding, kernel_hw, strides):
    """x_pad's window of every kernel tap (a, b), [B, Ho, Wo, C], in float64."""
    x = np.asarray(x, np.float64)
    x_pad = np.pad(x, [(0, 0), *((max(lo, 0), max(hi, 0)) for lo, hi in padding), (0, 0)])
    (top, bottom), (left, right) = padding
    x_pad = x_pad[:, max(-top, 0): x_pad.shape[1] - max(-bottom, 0),
                  max(-left, 0): x_pad.shape[2] - max(-right, 0)]
    (kh, kw), (sh, sw) = kernel_hw, strides
    Ho, Wo = (x_pad.shape[1] - kh) // sh + 1, (x_pad.shape[2] - kw) // sw + 1
    return {(a, b): x_pad[:, a: a + (Ho - 1) * sh + 1: sh, b: b + (Wo - 1) * sw + 1: sw]
            for a in range(kh) for b in range(kw)}


def _float64_conv(x, k, padding, strides=(1, 1)):
    """The convolution in float64, and the sum of its terms' magnitudes, per output."""
    k = np.asarray(k, np.float64)
    windows = _float64_windows(x, padding, k.shape[:2], strides)
    y = sum(w @ k[a, b] for (a, b), w in windows.items())
    return y, sum(np.abs(w) @ np.abs(k[a, b]) for (a, b), w in windows.items())


def _float64_kernel_gradient(x, dy, kernel_shape, padding, strides=(1, 1)):
    """The kernel gradient in float64, and the sum of its terms' magnitudes."""
    dy = np.asarray(dy, np.float64).reshape(-1, kernel_shape[3])
    dk, magnitude = np.zeros(kernel_shape), np.zeros(kernel_shape)
    for (a, b), w in _float64_windows(x, padding, kernel_shape[:2], strides).items():
        w = w.reshape(-1, kernel_shape[2])
        dk[a, b], magnitude[a, b] = w.T @ dy, np.abs(w).T @ np.abs(dy)
    return dk, magnitude


@pytest.mark.parametrize("x_shape, kernel_shape, padding, strides", WINOGRAD_CASES)
def test_winograd_forward_is_within_its_bound_in_its_tiles_and_direct_after(
        x_shape, kernel_shape, padding, strides):
    x, _ = _operands(x_shape, kernel_shape, padding, strides=strides)
    k = jax.random.normal(jax.random.key(1), kernel_shape)
    conv_fn = jax.jit(cpu_kernels.conv, static_argnums=(2, 3, 4, 5))
    direct = np.asarray(conv_fn(x, k, padding, True, strides, False))
    got = np.asarray(conv_fn(x, k, padding, True, strides, True))
    if not cpu_kernels.wide_blocks():  # AVX2 builds have no Winograd
        np.testing.assert_array_equal(got, direct)
        return
    tiled = direct.shape[2] // 4 * 4
    # Past the last whole tile of 4 columns, the direct sums, to the bit.
    np.testing.assert_array_equal(got[:, :, tiled:], direct[:, :, tiled:])
    # In the tiles, Winograd's own rounding (so it ran).
    assert not np.array_equal(got[:, :, :tiled], direct[:, :, :tiled])
    want, magnitude = _float64_conv(x, k, padding, strides)
    assert np.all(np.abs(got - want) <= WINOGRAD_BOUND * magnitude)


@pytest.mark.parametrize("x_shape, kernel_shape, padding, strides", WINOGRAD_CASES)
def test_winograd_kernel_gradient_is_within_its_bound(x_shape, kernel_shape, padding,
                                                      strides):
    x, dy = _operands(x_shape, kernel_shape, padding, strides=strides)
    fn = jax.jit(cpu_kernels.kernel_gradient, static_argnums=(2, 3, 4, 5, 6))
    direct = np.asarray(fn(x, dy, kernel_shape, padding, True, strides, False))
    got = np.asarray(fn(x, dy, kernel_shape, padding, True, strides, True))
    if not cpu_kernels.wide_blocks():
        np.testing.assert_array_equal(got, direct)
        return
    assert not np.array_equal(got, direct)
    want, magnitude = _float64_kernel_gradient(x, dy, kernel_shape, padding, strides)
    assert np.all(np.abs(got - want) <= WINOGRAD_BOUND * magnitude)


@pytest.mark.parametrize("x_shape, kernel_shape, padding, strides", [
    ((2, 6, 12, 16), (3, 3, 16, 32), ((1, 1), (1, 1)), (1, 1)),  # 3 wide
    ((2, 6, 12, 8), (3, 5, 8, 32), ((1, 1), (2, 2)), (1, 1)),  # 8 input channels
    ((2, 6, 12, 16), (3, 5, 16, 24), ((1, 1), (2, 2)), (1, 1)),  # 24 output channels
    ((2, 8, 12, 16), (3, 5, 16, 32), ((1, 1), (2, 2)), (1, 2)),  # strided columns
    ((2, 6, 7, 16), (3, 5, 16, 32), ((1, 1), (0, 0)), (1, 1)),  # 3 columns, no tile
])
def test_winograd_leaves_the_other_convolutions_to_the_direct_sums(x_shape, kernel_shape,
                                                                  padding, strides):
    x, dy = _operands(x_shape, kernel_shape, padding, strides=strides)
    k = jax.random.normal(jax.random.key(1), kernel_shape)
    conv_fn = jax.jit(cpu_kernels.conv, static_argnums=(2, 3, 4, 5))
    np.testing.assert_array_equal(conv_fn(x, k, padding, True, strides, True),
                                  conv_fn(x, k, padding, True, strides, False))
    fn = jax.jit(cpu_kernels.kernel_gradient, static_argnums=(2, 3, 4, 5, 6))
    np.testing.assert_array_equal(fn(x, dy, kernel_shape, padding, True, strides, True),
                                  fn(x, dy, kernel_shape, padding, True, strides, False))


def test_conv2d_winograd_is_its_forward_pass_and_both_gradients():
    x_shape, kernel_shape, padding, _ = WINOGRAD_CASES[0]
    x, dy = _operands(x_shape, kernel_shape, padding)
    k = jax.random.normal(jax.random.key(1), kernel_shape)

    def forward_and_gradients(winograd):
        def fn(x, k):
            y, vjp = jax.vjp(lambda x, k: conv.conv2d(x, k, padding, winograd=winograd), x, k)
            return (y, *vjp(dy))
        return jax.jit(fn)

    fn = forward_and_gradients(True)
    hlo = fn.lower(x, k).compile().as_text()
    assert hlo.count("winograd = 1") == (3 if cpu_kernels.wide_blocks() else 0)
    y, dx, dk = fn(x, k)
    # The input gradient: the convolution of dy with the flipped kernel, channels swapped.
    kernel_t = np.flip(np.asarray(k), (0, 1)).swapaxes(2, 3)
    for got, (want, magnitude) in [
            (y, _float64_conv(x, k, padding)), (dx, _float64_conv(dy, kernel_t, ((0, 2), (2, 2)))),
            (dk, _float64_kernel_gradient(x, dy, kernel_shape, padding))]:
        assert np.all(np.abs(got - want) <= WINOGRAD_BOUND * magnitude)
    if cpu_kernels.wide_blocks():  # by Winograd: not the direct sums' rounding
        for got, direct in zip((y, dx, dk), forward_and_gradients(False)(x, k), strict=True):
            assert not np.array_equal(got, direct)


def _linear_loss_grad(conv_fn, x, dy):
    # Linear in the output, so the kernel gradient does not depend on how the forward
    # pass rounded (which differs where conv2d takes the compiled forward pass too).
    return jax.jit(jax.grad(lambda k: jnp.sum(conv_fn(x, k) * dy)))


def test_conv2d_takes_the_compiled_kernels():
    x_shape, kernel_shape, padding = CASES[0]
    x, dy = _operands(x_shape, kernel_shape, padding)
    k = jax.random.normal(jax.random.key(1), kernel_shape)
    grad = _linear_loss_grad(lambda x, k: conv.conv2d(x, k, padding), x, dy)
    assert "pvae_kernel_gradient" in grad.lower(k).compile().as_text()
    # The forward pass (32 output channels) is ours where it measured faster.
    forward = jax.jit(lambda x, k: conv.conv2d(x, k, padding))
    assert ("pvae_conv" in forward.lower(x, k).compile().as_text()
            ) == cpu_kernels.forward_enabled(kernel_shape)
    np.testing.assert_allclose(forward(x, k), _lax_conv(x, k, padding), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad(k), _lax_kernel_gradient(x, dy, kernel_shape, padding),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel_shape,strides,faster", [
    ((3, 5, 8, 16), (1, 1), True),    # TapBlock: 16 outputs, 5 wide
    ((1, 3, 8, 16), (1, 1), True),
    ((1, 1, 8, 16), (1, 1), False),   # 16 outputs, 1 wide: XLA's
    ((3, 3, 8, 16), (2, 2), False),   # 16 outputs, strided: XLA's
    ((3, 3, 8, 32), (2, 2), True),
    ((2, 2, 8, 24), (1, 1), False),
])
def test_forward_pass_is_compiled_for_the_shapes_where_it_was_faster(kernel_shape, strides,
                                                                      faster):
    x = jax.random.normal(jax.random.key(0), (2, 9, 11, 8))
    k = jax.random.normal(jax.random.key(1), kernel_shape)
    padding = ((1, 1), (1, 1))
    forward = jax.jit(lambda x, k: conv.conv2d(x, k, padding, strides))
    compiled = "pvae_conv" in forward.lower(x, k).compile().as_text()
    assert cpu_kernels.forward_enabled(kernel_shape, strides) == (
        faster and bool(cpu_kernels._library.PvaeWideBlocks()))
    assert compiled == cpu_kernels.forward_enabled(kernel_shape, strides)
    np.testing.assert_allclose(
        forward(x, k), jax.lax.conv_general_dilated(x, k, strides, padding,
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")),
        rtol=1e-5, atol=1e-5)


def test_suspended_traces_keep_xla_gradients():
    x_shape, kernel_shape, padding = CASES[0]
    x, dy = _operands(x_shape, kernel_shape, padding)
    k = jax.random.normal(jax.random.key(1), kernel_shape)

    def grad():  # a new function each call, so traced afresh
        return _linear_loss_grad(lambda x, k: conv.conv2d(x, k, padding), x, dy)

    with cpu_kernels.suspended():
        assert not cpu_kernels.enabled() and not cpu_kernels.forward_enabled(kernel_shape)
        xla = grad()
        hlo = xla.lower(k).compile().as_text()
        assert "pvae_kernel_gradient" not in hlo and "pvae_conv" not in hlo
    assert cpu_kernels.enabled()
    ours = grad()
    assert "pvae_kernel_gradient" in ours.lower(k).compile().as_text()
    np.testing.assert_allclose(xla(k), ours(k), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x_shape, kernel_shape, padding", CASES)
def test_forward_equals_lax(x_shape, kernel_shape, padding):
    x, _ = _operands(x_shape, kernel_shape, padding)
    k = jax.random.normal(jax.random.key(1), kernel_shape)
    got = jax.jit(cpu_kernels.conv, static_argnums=2)(x, k, padding)
    np.testing.assert_allclose(got, _lax_conv(x, k, padding), rtol=1e-5, atol=1e-5)


def test_a_sharded_batch_is_convolved_per_device():
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x_shape, kernel_shape, padding = CASES[0]
    x, _ = _operands((2 * n, *x_shape[1:]), kernel_shape, padding)
    k = jax.random.normal(jax.random.key(1), kernel_shape)
    fn = jax.jit(cpu_kernels.conv, static_argnums=2)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    hlo = fn.lower(xs, k, padding).compile().as_text()
    # Each device convolves its own images: no collective at all.
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    y = fn(xs, k, padding)
    assert y.sharding.spec[0] == "data"
    np.testing.assert_allclose(y, _lax_conv(x, k, padding), rtol=1e-5, atol=1e-5)


def test_a_sharded_batch_is_summed_per_device_then_all_reduced():
    n = jax.device_count()  # Two virtual CPU devices under the tests' conftest.
    assert n > 1
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x_shape, kernel_shape, padding = CASES[0]
    x, dy = _operands((2 * n, *x_shape[1:]), kernel_shape, padding)
    batch = NamedSharding(mesh, P("data"))
    fn = jax.jit(cpu_kernels.kernel_gradient, static_argnums=(2, 3))
    xs, dys = jax.device_put(x, batch), jax.device_put(dy, batch)
    hlo = fn.lower(xs, dys, kernel_shape, padding).compile().as_text()
    # Each device reads its own images: no all-gather of x or dy, one all-reduce.
    assert "all-gather" not in hlo and hlo.count("all-reduce(") == 1
    np.testing.assert_allclose(fn(xs, dys, kernel_shape, padding),
                               _lax_kernel_gradient(x, dy, kernel_shape, padding),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cores, want", [(1, 1), (2, 1), (3, 1), (8, 4)])
def test_a_call_takes_at_most_the_cores_of_its_device(monkeypatch, cores, want):
    # The tests run on two virtual CPU devices (conftest).
    assert len(jax.local_devices(backend="cpu")) == 2
    monkeypatch.setattr(native, "cpu_cores", lambda: cores)
    assert cpu_kernels.max_chunks() == want


@pytest.mark.parametrize("winograd", [False, True])
@pytest.mark.parametrize("max_chunks", [1, 2, 4])
def test_a_large_batch_is_split_into_chunks_and_summed_in_a_fixed_order(monkeypatch,
                                                                        max_chunks, winograd):
    # 40 images of 28 rows: 1120 output rows, enough for one chunk per pool thread. The
    # tests' two virtual devices on a 2-core machine have one core each, so one chunk
    # unless a device is said to have more cores.
    monkeypatch.setattr(cpu_kernels, "max_chunks", lambda: max_chunks)
    x_shape, kernel_shape, padding = (40, 28, 28, 16), (3, 5, 16, 32), ((2, 0), (2, 2))
    x, dy = _operands(x_shape, kernel_shape, padding, seed=3)
    # Unpartitioned, so that the attribute is in the traced call (and its cache key).
    fn = jax.jit(functools.partial(cpu_kernels.kernel_gradient, partitioned=False,
                                   winograd=winograd), static_argnums=(2, 3))
    hlo = fn.lower(x, dy, kernel_shape, padding).compile().as_text()
    assert f"max_chunks = {max_chunks} : i64" in hlo
    first = np.asarray(fn(x, dy, kernel_shape, padding))
    for _ in range(3):
        np.testing.assert_array_equal(fn(x, dy, kernel_shape, padding), first)
    want, _ = _float64_kernel_gradient(x, dy, kernel_shape, padding)
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=2e-3)


def test_off_by_the_environment_or_without_a_compiler(monkeypatch, tmp_path):
    x_shape, kernel_shape, padding = CASES[1]
    x, dy = _operands(x_shape, kernel_shape, padding)
    k = jax.random.normal(jax.random.key(1), kernel_shape)

    def loss(k):
        return jnp.sum(jnp.sin(conv.conv2d(x, k, padding)))

    want = jax.jit(jax.grad(loss))(k)
    try:
        for var, value in ((cpu_kernels.ENABLE_VAR, "0"), ("CXX", str(tmp_path / "no-cc"))):
            with monkeypatch.context() as m:
                m.setenv(var, value)
                m.setenv(native.CACHE_VAR, str(tmp_path))
                m.setattr(cpu_kernels, "_library", None)  # as in a fresh process
                cpu_kernels.registered.cache_clear()
                assert not cpu_kernels.registered()
                with pytest.raises(RuntimeError, match="unavailable"):
                    cpu_kernels.kernel_gradient(x, dy, kernel_shape, padding)
                grad = jax.jit(jax.grad(loss))
                assert "pvae_kernel_gradient" not in grad.lower(k).compile().as_text()
                np.testing.assert_allclose(grad(k), want, rtol=1e-5, atol=1e-4)
    finally:
        cpu_kernels.registered.cache_clear()
    assert cpu_kernels.registered()
