"""An NHWC convolution whose kernel gradient is ours, fast on XLA:CPU.

``conv2d(x, kernel, padding, strides)`` is ``lax.conv_general_dilated`` with NHWC
input and HWIO kernel, with the same input gradient and the same forward pass, which on
the CPU is the compiled kernel of ``cpu_kernels.py`` where that measured faster
(``_cpu_forward``). XLA:CPU
lowers a kernel gradient to a convolution whose "kernel" is the whole output gradient
and whose contraction runs over the batch alone, 3-8x slower than the forward pass on
the 16- and 32-channel layers of the gated PixelCNNs. ``conv2d``'s kernel gradient is
instead, on the CPU:

- the compiled kernel of ``cpu_kernels.py`` (float32), where it can be built: a
  gated_noup train step (2-core Zen 3) ran in 0.36-0.48x the time with it;
- else, for 1x1 kernels, ``kernel_gradient``, which stacks the kernel's ``kh`` row
  offsets as channels so that the gradient becomes a 1-D convolution along the
  columns contracting over batch and rows together (28 ms -> 3.7 ms for a 32-channel
  1x1 layer at batch 50); it is written, and tested, for any kernel shape;
- else XLA's own, which measured faster in whole train steps than ``kernel_gradient``
  for the larger kernels (since 2026-12-02).

On other platforms it is XLA's own, except ``kernel_gradient`` for 1x1 kernels.
Forward and reverse mode, and every order of derivative, work, also under ``vmap``
and under ``shard_map`` with a replicated kernel.

With stride 1 any integer padding works, negative (a crop, as in lax) or past the
kernel: XLA's convolution only ever gets padding between 0 and kernel size - 1, the
rest being a pad of its output (``_split_padding``), so that the input gradient is the
same convolution lax's transpose rule makes, without the negative padding that XLA:CPU
gets wrong for some channel counts. A strided convolution (the encoders' stride-2
layers) takes any padding of at least 0; its input gradient is lax's transpose. Its
forward pass and kernel gradient are the compiled kernels' too: XLA:CPU's kernel
gradient of the MNIST encoder's first stride-2 layer began with a copy of its whole
input transposed batch-last (10.8 ms of a 0.65 s gated_noup step, 2-core Xeon), and
its forward pass ran at 24 GFLOP/s. With them ours, the step took 0.963x and 0.973x
the time (two runs of 60 alternated rounds).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from pvae_jax.nn import cpu_kernels

_DIMS_2D = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _split_padding(padding: Padding, kernel_hw, strides=(1, 1)) -> tuple[Padding, Padding]:
    """(the padding XLA's convolution takes, the rest as a pad of its output).

    XLA's convolution gets the padding up to kernel size - 1: padding beyond that adds
    output rows that read zeros alone, and negative padding (a crop) removes output
    rows, so both are a pad of the output. Two reasons: the input gradient is then a
    convolution whose padding, kernel size - 1 minus this one, is never negative
    (XLA:CPU 0.10 computes some convolutions with padding (-1, 1) wrongly, e.g. 1x1
    with 8 -> 12 channels); and a pad of the output fuses into whatever reads it, so
    the row shift of ``RowAboveDense`` (padding (1, -1), 1x1) never materialises a
    shifted copy, forward or backward.

    A strided convolution takes its (non-negative) padding whole: one more row of
    padding moves every output row's window by one input row, not by one output row.
    """
    if tuple(strides) != (1, 1):
        return padding, ((0, 0), (0, 0))
    conv_padding = tuple((min(max(lo, 0), k - 1), min(max(hi, 0), k - 1))
                         for (lo, hi), k in zip(padding, kernel_hw, strict=True))
    rest = tuple((lo - clo, hi - chi)
                 for (lo, hi), (clo, chi) in zip(padding, conv_padding, strict=True))
    return conv_padding, rest


def _pad_hw(x_BxHxWxC, padding: Padding):
    """Zeros added to (or, where negative, rows and columns cropped from) H and W."""
    if not any(p for pair in padding for p in pair):
        return x_BxHxWxC
    return jax.lax.pad(x_BxHxWxC, jnp.zeros((), x_BxHxWxC.dtype),
                       [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)])


def _forward(x_BxHxWxC, kernel_HxWxIxO, padding: Padding, strides=(1, 1)):
    conv_padding, rest = _split_padding(padding, kernel_HxWxIxO.shape[:2], strides)
    y = jax.lax.conv_general_dilated(x_BxHxWxC, kernel_HxWxIxO, strides, conv_padding,
                                     dimension_numbers=_DIMS_2D)
    return _pad_hw(y, rest)


def conv2d(x_BxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, padding: Padding,
           strides: tuple[int, int] = (1, 1), *, winograd: bool = False) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding)`` in NHWC/HWIO/NHWC.

    Forward and reverse mode both work (``jax.jvp``, ``jax.jacfwd``, ``jax.grad``).

    Args:
      x_BxHxWxC: the input.
      kernel_HxWxIxO: the kernel, of the input's dtype.
      padding: ``((top, bottom), (left, right))`` zeros added around the input (ints;
        with stride 1 a negative one crops the input, as in lax; a strided convolution
        takes none below 0).
      strides: over rows and columns, each at least 1.
      winograd: let the compiled kernels compute this convolution, its input gradient
        and its kernel gradient by Winograd's minimal filtering along the rows where
        they can (kernels 5 wide, column stride 1, channels multiples of 16, AVX-512;
        ``cpu_kernels.cc``): about 4 times the direct sums' rounding error, and an
        output may move by a rounding error when a column of its rows beyond its
        kernel's reach does. So only for convolutions whose outputs may depend on every
        column of the rows they read, such as a Gated PixelCNN's vertical stack; never
        for a mask within a row. A gated_noup train step took 0.883x the time with it
        (2-core Xeon, 20 alternated rounds).
    """
    if len(padding) != 2 or any(len(pair) != 2 or any(int(p) != p for p in pair)
                                for pair in padding):
        raise ValueError(f"padding must be ((top, bottom), (left, right)) of ints, got "
                         f"{padding!r}")
    if len(strides) != 2 or any(int(t) != t or t < 1 for t in strides):
        raise ValueError(f"strides must be two ints of at least 1, got {strides!r}")
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    strides = tuple(int(t) for t in strides)
    if strides != (1, 1) and min(p for pair in padding for p in pair) < 0:
        raise ValueError(f"a strided conv2d takes no negative padding, got {padding!r}")
    out_hw = [(n + lo + hi - k) // t + 1 if n + lo + hi >= k else 0 for n, (lo, hi), k, t in
              zip(x_BxHxWxC.shape[1:3], padding, kernel_HxWxIxO.shape[:2], strides,
                  strict=True)]
    if min(out_hw) < 1:
        raise ValueError(f"padding {padding!r} leaves an output of size {out_hw} for an "
                         f"input of {x_BxHxWxC.shape[1:3]} and a kernel of "
                         f"{kernel_HxWxIxO.shape[:2]}")
    return _fast_forward(x_BxHxWxC, kernel_HxWxIxO, padding, strides, bool(winograd))


def _cpu_forward(x_BxHxWxC, kernel_HxWxIxO, *, padding, strides, winograd):
    """On the CPU: the compiled forward pass where it measured faster than XLA's
    (float32, ``cpu_kernels.forward_enabled`` for the kernel's shape), else XLA's.
    With the 32-channel outputs alone, a gated_noup train step took 0.95x the time
    (2-core Xeon, medians of 30 alternated steps): the stacks' forward convolutions,
    the heads' 1x1s and the vertical-to-horizontal 1x1's input gradient."""
    if (x_BxHxWxC.dtype != jnp.float32
            or not cpu_kernels.forward_enabled(kernel_HxWxIxO.shape, strides)):
        return _forward(x_BxHxWxC, kernel_HxWxIxO, padding, strides)
    conv_padding, rest = _split_padding(padding, kernel_HxWxIxO.shape[:2], strides)
    y = cpu_kernels.conv(x_BxHxWxC, kernel_HxWxIxO, conv_padding,
                         partitioned=not _varying(x_BxHxWxC), strides=strides,
                         winograd=winograd)
    return _pad_hw(y, rest)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _fast_forward(x_BxHxWxC, kernel_HxWxIxO, padding, strides, winograd):
    """``_forward``, by the compiled kernel when this runs on the CPU (``conv2d`` once
    its arguments are checked). Its tangent goes through ``_conv_in_kernel_p``, so its
    kernel gradient is ours; under vmap it is ``_forward`` batched."""
    return _by_platform(functools.partial(_cpu_forward, padding=padding, strides=strides,
                                          winograd=winograd),
                        functools.partial(_forward, padding=padding, strides=strides),
                        x_BxHxWxC, kernel_HxWxIxO)


def _by_platform(cpu, default, a, b):
    """``cpu(a, b)`` where this runs on the CPU, else ``default(a, b)``; under vmap
    ``default``, batched (the compiled kernels have no batched form)."""
    @jax.custom_batching.custom_vmap
    def call(a, b):
        return jax.lax.platform_dependent(a, b, cpu=cpu, default=default)

    @call.def_vmap
    def _(axis_size, in_batched, a, b):
        axes = tuple(0 if batched else None for batched in in_batched)
        return jax.vmap(default, in_axes=axes)(a, b), True

    return call(a, b)


def _fast_forward_jvp(padding, strides, winograd, primals, tangents):
    # The tangent is linear in (dx, dk); reverse mode transposes it.
    x, kernel = primals
    dx, dkernel = tangents
    y = _fast_forward(x, kernel, padding, strides, winograd)
    params = dict(padding=padding, strides=strides, winograd=winograd)
    dy = jnp.zeros_like(y)
    # Under shard_map, x (a batch shard) and a replicated kernel (or their tangents)
    # vary over different mesh axes; the primitive needs both typed alike, as lax's own
    # rules do implicitly (reverse mode then sums the kernel's cotangent over them).
    if not isinstance(dx, SymbolicZero):
        vma = _varying(dx) | _varying(kernel)
        dy = dy + _conv_in_kernel_p.bind(_vary(dx, vma), _vary(kernel, vma), **params)
    if not isinstance(dkernel, SymbolicZero):
        vma = _varying(x) | _varying(dkernel)
        dy = dy + _conv_in_kernel_p.bind(_vary(x, vma), _vary(dkernel, vma), **params)
    return y, dy


_fast_forward.defjvp(_fast_forward_jvp, symbolic_zeros=True)


# conv2d's tangent goes through two primitives of its own, so that
# its kernel gradient is ours: _conv_in_kernel_p, conv(x, k) with x or k the tangent
# (lax's convolution), and _kernel_gradient_p (as lax would, but 1x1 kernels by
# kernel_gradient). Both are bilinear and each transposes to the other, so every order
# of derivative works; the first-order kernel gradient, the one training needs, is
# _fast_kernel_gradient, which takes the compiled kernel on the CPU.


def _conv_in_kernel(x_BxHxWxC, dkernel_HxWxIxO, *, padding, strides, winograd):
    # ``winograd`` is for the transposes: the input gradient (``_input_cotangent``) and
    # the kernel gradient (``_fast_kernel_gradient``); XLA's forward pass ignores it.
    del winograd
    return _forward(x_BxHxWxC, dkernel_HxWxIxO, padding, strides)


def _kernel_gradient(x_BxHxWxC, dy_BxHoxWoxO, *, kernel_shape, padding, strides):
    """XLA's own kernel gradient (lax's, transposed), except for stride-1 1x1 kernels,
    which ``kernel_gradient`` computes 7x faster on XLA:CPU (see the module docstring)."""
    if kernel_shape[:2] == (1, 1) and strides == (1, 1):
        return kernel_gradient(x_BxHxWxC, dy_BxHoxWoxO, kernel_shape, padding)
    (dk,) = jax.linear_transpose(lambda k: _forward(x_BxHxWxC, k, padding, strides),
                                 jax.ShapeDtypeStruct(kernel_shape, dy_BxHoxWoxO.dtype))(
        dy_BxHoxWoxO)
    return dk


def _cpu_kernel_gradient(x_BxHxWxC, dy_BxHoxWoxO, *, kernel_shape, padding, strides,
                         winograd):
    """On the CPU: the compiled kernel of ``cpu_kernels.py`` for float32 where it is
    built (3.4x faster than XLA's for a vertical stack's 3x5 kernel), else as above."""
    if dy_BxHoxWoxO.dtype != jnp.float32 or not cpu_kernels.enabled():
        return _kernel_gradient_p.bind(x_BxHxWxC, dy_BxHoxWoxO, kernel_shape=kernel_shape,
                                       padding=padding, strides=strides)
    # Inside shard_map every device computes its own part: no partitioning to do.
    return cpu_kernels.kernel_gradient(x_BxHxWxC, dy_BxHoxWoxO, kernel_shape, padding,
                                       partitioned=not _varying(dy_BxHoxWoxO), strides=strides,
                                       winograd=winograd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _fast_kernel_gradient(x_BxHxWxC, dy_BxHoxWoxO, kernel_shape, padding, strides, winograd):
    """``_kernel_gradient_p``, by the compiled kernel when this runs on the CPU (by
    Winograd's F(5, 4) where ``conv2d(winograd=True)`` asked for it). Its derivatives,
    and its batched form under vmap, are ``_kernel_gradient_p``'s."""
    params = dict(kernel_shape=kernel_shape, padding=padding, strides=strides)
    return _by_platform(functools.partial(_cpu_kernel_gradient, **params, winograd=winograd),
                        functools.partial(_kernel_gradient_p.bind, **params),
                        x_BxHxWxC, dy_BxHoxWoxO)


@_fast_kernel_gradient.defjvp
def _fast_kernel_gradient_jvp(kernel_shape, padding, strides, winograd, primals, tangents):
    x, dy = primals
    dx, ddy = tangents
    params = dict(kernel_shape=kernel_shape, padding=padding, strides=strides)
    out = _fast_kernel_gradient(x, dy, kernel_shape, padding, strides, winograd)
    return out, (_kernel_gradient_p.bind(dx, dy, **params)
                 + _kernel_gradient_p.bind(x, ddy, **params))


def _abstract_like(aval, like, shape):
    # Laid out, sharded and varying (under shard_map) like ``like``.
    return like.update(shape=tuple(shape), dtype=aval.dtype, weak_type=False)


def _conv_in_kernel_abstract(x, dkernel, *, padding, strides, winograd):
    y = jax.eval_shape(functools.partial(_forward, padding=padding, strides=strides),
                       jax.ShapeDtypeStruct(x.shape, x.dtype),
                       jax.ShapeDtypeStruct(dkernel.shape, dkernel.dtype))
    return _abstract_like(y, x, y.shape)


def _kernel_gradient_abstract(x, dy, *, kernel_shape, padding, strides):
    return _abstract_like(dy, dy, kernel_shape)


def _input_cotangent(ct_BxHoxWoxO, kernel_HxWxIxO, padding, strides, x_shape,
                     winograd=False):
    """The transpose of ``_forward`` in x (of ``x_shape``): the convolution with the
    flipped kernel, in and out channels swapped, padded by kernel size - 1 minus
    ``_forward``'s, by ``_fast_forward`` (with strides, lax's transpose, which dilates
    ``ct``), by Winograd's F(4, 5) too where ``conv2d(winograd=True)`` asked for it."""
    if strides != (1, 1):
        # vjp at zeros typed like ct: under shard_map x varies over the mesh axes ct
        # does, which a bare ShapeDtypeStruct (linear_transpose's) would not say.
        x0 = _vary(jnp.zeros(x_shape, ct_BxHoxWoxO.dtype), _varying(ct_BxHoxWoxO))
        _, transpose = jax.vjp(lambda x: _forward(x, kernel_HxWxIxO, padding, strides), x0)
        (dx,) = transpose(ct_BxHoxWoxO)
        return dx
    kernel_hw = kernel_HxWxIxO.shape[:2]
    conv_padding, rest = _split_padding(padding, kernel_hw)
    negated = lambda pads: tuple((-lo, -hi) for lo, hi in pads)  # noqa: E731
    kernel_t = jnp.flip(kernel_HxWxIxO, (0, 1)).swapaxes(2, 3)
    if kernel_hw == (1, 1):
        # Pointwise, so the pad's transpose commutes with it: the product reads ct
        # itself, and the opposite pad fuses into whatever reads dx.
        return _pad_hw(_fast_forward(ct_BxHoxWoxO, kernel_t, ((0, 0), (0, 0)), (1, 1), False),
                       negated(rest))
    transposed = tuple((k - 1 - lo, k - 1 - hi)
                       for (lo, hi), k in zip(conv_padding, kernel_hw, strict=True))
    return _fast_forward(_pad_hw(ct_BxHoxWoxO, negated(rest)), kernel_t, transposed, (1, 1),
                         winograd)


def _vmapped(fn):
    # Under vmap, lax's own convolutions (and their batching rules) take over.
    def rule(args, dims, **params):
        return jax.vmap(functools.partial(fn, **params), in_axes=dims)(*args), 0
    return rule


def _jitted_impl(p, *args, **params):
    """Outside jit (rare for gradients) a primitive runs jitted, so lowered as below;
    one jitted function per primitive and parameters, not one per call."""
    return _jitted_bind(p, tuple(sorted(params.items())))(*args)


@functools.cache
def _jitted_bind(p, params):
    return jax.jit(functools.partial(p.bind, **dict(params)))


_conv_in_kernel_p = Primitive("pvae_conv_in_kernel")
_kernel_gradient_p = Primitive("pvae_kernel_gradient")
for _p, _fn, _abstract in ((_conv_in_kernel_p, _conv_in_kernel, _conv_in_kernel_abstract),
                           (_kernel_gradient_p, _kernel_gradient, _kernel_gradient_abstract)):
    _p.def_impl(functools.partial(_jitted_impl, _p))
    _p.def_abstract_eval(_abstract)
    mlir.register_lowering(_p, mlir.lower_fun(_fn, multiple_results=False))
    batching.primitive_batchers[_p] = _vmapped(_fn)
# conv(x, k): d/dx^T = the input gradient, d/dk^T = the kernel gradient.
ad.defbilinear(
    _conv_in_kernel_p,
    lambda ct, x, k, *, padding, strides, winograd: _input_cotangent(
        ct, k, padding, strides, x.aval.shape, winograd),
    lambda ct, x, k, *, padding, strides, winograd: _fast_kernel_gradient(
        x, ct, tuple(k.aval.shape), padding, strides, winograd))
# kernel_gradient(x, dy) = dk: d/dx^T at dk's cotangent c = the input gradient of
# conv(., c) at dy; d/ddy^T = conv(x, c).
ad.defbilinear(
    _kernel_gradient_p,
    lambda ct, x, dy, *, kernel_shape, padding, strides: _input_cotangent(
        dy, ct, padding, strides, x.aval.shape),
    lambda ct, x, dy, *, kernel_shape, padding, strides: _conv_in_kernel_p.bind(
        x, ct, padding=padding, strides=strides, winograd=False))


def _varying(t) -> frozenset:
    """The mesh axes over which ``t`` varies (inside shard_map; elsewhere none)."""
    aval = jax.typeof(t)
    axis_type = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; before: .vma
    return axis_type.varying if axis_type is not None else frozenset(aval.vma)


def _vary(t, vma: frozenset):
    """``t``, typed as varying over the mesh axes ``vma`` too."""
    missing = tuple(sorted(vma - _varying(t)))
    if not missing:
        return t
    if hasattr(jax.lax, "pcast"):  # jax >= 0.10; before: pvary
        return jax.lax.pcast(t, missing, to="varying")
    return jax.lax.pvary(t, missing)


def kernel_gradient(x_BxHxWxC, dy_BxHoxWoxO, kernel_shape, padding: Padding) -> jax.Array:
    """d/dkernel of ``sum(conv2d(x, kernel, padding) * dy)``, ``kernel_shape`` (HWIO).

    dK[a, b, i, o] = sum_{n, r, c} x_pad[n, r + a, c + b, i] dy[n, r, c, o]. Stacking
    the kh row offsets as channels gives R[n, r, c', (a, i)] = x_pad[n, r + a, c', i],
    and with (n, r) merged into one axis that is a 1-D convolution over c of R (its
    features (a, i) as the batch, (n, r) contracted) by dy (the "kernel" over c).
    """
    kh, kw, C, F = kernel_shape
    (top, bottom), (left, right) = padding
    B, Ho, Wo, _ = dy_BxHoxWoxO.shape
    x_pad = jax.lax.pad(x_BxHxWxC, jnp.zeros((), x_BxHxWxC.dtype),
                        ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    rows = [x_pad[:, a : a + Ho] for a in range(kh)]
    r_BxHoxWpxKC = jnp.concatenate(rows, axis=-1) if kh > 1 else rows[0]
    Wp = r_BxHoxWpxKC.shape[2]
    # As 1-D NWC convolution operands: batch (a, i), width c, features (n, r). Leaving
    # the layouts to XLA ("CWN", "IWO") measured 10% slower than these transposes.
    lhs_KCxWpxBH = r_BxHoxWpxKC.reshape(B * Ho, Wp, kh * C).transpose(2, 1, 0)
    rhs_WoxBHxO = dy_BxHoxWoxO.reshape(B * Ho, Wo, F).transpose(1, 0, 2)
    dk_KCxkwxO = jax.lax.conv_general_dilated(lhs_KCxWpxBH, rhs_WoxBHxO, (1,), ((0, 0),),
                                              dimension_numbers=("NWC", "WIO", "NWC"))
    return dk_KCxkwxO.reshape(kh, C, kw, F).transpose(0, 2, 1, 3).astype(dy_BxHoxWoxO.dtype)


_NHWC = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """A drop-in for ``lax.conv_general_dilated`` (flax: ``nn.Conv(...,
    conv_general_dilated=conv_general_dilated)``) that sends the convolutions ``conv2d``
    takes (2-D NHWC/HWIO, no dilation or groups, one dtype; strided ones with no
    negative padding) to ``conv2d``, and every other one to lax unchanged."""
    plain = (
        lhs.ndim == 4 and rhs.ndim == 4 and lhs.dtype == rhs.dtype
        and all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
        and feature_group_count == 1 and batch_group_count == 1
        and precision is None and preferred_element_type is None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
    )
    if plain:
        strides = tuple(int(t) for t in window_strides)
        pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
                if isinstance(padding, str) else padding)
        pads = tuple((int(lo), int(hi)) for lo, hi in pads)
        # A strided conv2d takes no negative padding.
        if strides == (1, 1) or min(p for pair in pads for p in pair) >= 0:
            return conv2d(lhs, rhs, pads, strides)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)


# flax's nn.Conv with the convolution above: the same module, parameters and names.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
