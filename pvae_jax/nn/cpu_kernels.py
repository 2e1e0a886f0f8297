"""Compiled CPU kernels, built from ``cpu_kernels.cc`` on first use.

Two kernels, for an NHWC convolution of any stride: its kernel gradient
(``kernel_gradient``), which XLA:CPU computes several times slower than its forward
pass on the 16- and 32-channel layers of the gated PixelCNNs (3.6x for a 3x5 kernel,
16 -> 32 channels, on a 2-core Zen 3; see ``cpu_kernels.cc``), and its forward pass
(``conv``), which ``nn/conv.py`` takes where it measured faster than XLA's
(``forward_enabled``: AVX-512 builds, for the kernel shapes where it was faster).
Both take ``winograd``: where the kernel is 5 wide, the column stride 1 and the
channels multiples of 16 (AVX-512 builds), Winograd's minimal filtering along the rows,
F(4, 5) forward and F(5, 4) for the kernel gradient, 2.5 times fewer multiply-adds for
about 4 times the rounding error; ``conv2d(winograd=True)`` says when a convolution
may take it.

The source is compiled by ``native.build`` (the machine's C++ compiler, against the XLA
FFI headers of the installed jaxlib, cached in ``$PVAE_JAX_CACHE``) for this CPU
(``-march=native``: AVX-512 register blocks where the CPU has them, AVX2 ones
otherwise). ``registered()`` is False, and callers keep XLA's own
computation, where there is no compiler, the build fails (logged once) or
``PVAE_JAX_CPU_KERNELS=0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from pvae_jax import native

ENABLE_VAR = "PVAE_JAX_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_TARGET = "pvae_kernel_gradient"
_CONV_TARGET = "pvae_conv"
# AVX-512 register blocks where the CPU has them, AVX2 ones otherwise.
_FLAGS = ("-march=native",)

_library: ctypes.CDLL | None = None  # loaded and registered with XLA


@functools.cache
def registered() -> bool:
    """Builds, loads and registers the kernels, once per process; False if that fails
    or ``PVAE_JAX_CPU_KERNELS=0``. Callers then keep XLA's own computation."""
    if os.environ.get(ENABLE_VAR, "1") == "0":
        return False
    global _library
    if _library is not None:  # registered already; XLA takes a target once
        return True
    compiler = native.compiler()
    if compiler is None:
        logging.warning("pvae_jax: no C++ compiler ($CXX or c++) found; the CPU kernels "
                        "are off and XLA's own convolutions are used")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(native.build(_SOURCE, compiler,
                                                           native.cache_dir(), _FLAGS)))
        handlers = {_TARGET: library.PvaeKernelGradient, _CONV_TARGET: library.PvaeConv}
    except (OSError, AttributeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logging.warning("pvae_jax: building the CPU kernels failed, so XLA's own "
                        "convolutions are used: %s", detail)
        return False
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _library = library
    return True


_suspended = False


def enabled() -> bool:
    """Whether ``conv2d`` traced now takes the compiled kernels: ``registered()`` and
    not inside ``suspended()``."""
    return not _suspended and registered()


def forward_enabled(kernel_shape, strides=(1, 1)) -> bool:
    """Whether ``conv2d`` traced now takes the compiled forward pass for a float32
    convolution with this HWIO kernel shape and these strides: ``enabled()`` on a CPU
    with the AVX-512 blocks (the AVX2 ones measured slower than XLA's), for the shapes
    where it measured faster than XLA's (2-core Xeon, 50 images of 28x28). Those are
    output channels a multiple of 32, or of 16 for a kernel 3 or 5 wide at stride 1
    (``TapBlock`` in ``cpu_kernels.cc``: the stacks' input gradients, 0.976x and 0.978x
    the gated_noup step's time in two runs of 40 and 60 alternated rounds)."""
    _, kw, _, F = kernel_shape
    faster = F % 32 == 0 or (F % 16 == 0 and kw in (3, 5) and tuple(strides) == (1, 1))
    return faster and enabled() and wide_blocks()


def wide_blocks() -> bool:
    """Whether the kernels are built with the AVX-512 blocks (``registered()`` first):
    the compiled forward pass and Winograd's paths are only taken there."""
    return registered() and bool(_library.PvaeWideBlocks())


@contextlib.contextmanager
def suspended():
    """Functions traced inside keep XLA's own convolutions: e.g. so that XLA's cost
    analysis, which counts no FLOPs in a custom call, counts them all. Only tracing
    looks at this; an already traced (or cached) function is as it was."""
    global _suspended
    previous, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = previous


def _float32_like(t, shape):
    """The type of a float32 result of ``shape``, unsharded, that varies over the mesh
    axes ``t`` varies over (inside shard_map)."""
    aval = jax.typeof(t)
    return aval.update(shape=tuple(shape), dtype=jnp.float32, weak_type=False,
                       sharding=NamedSharding(aval.sharding.mesh, PartitionSpec()))


def max_chunks() -> int:
    """The most chunks a kernel call splits its rows into: the cores each CPU device has
    to itself (at least 1). With one virtual device per core
    (``runtime.use_cpu_cores_as_devices``) each call runs on its device's thread alone;
    splitting it over the pool's threads too, which the other device's calls also use,
    made a gated_noup train step take 1/0.916 and 1/0.939 the time (2-core Xeon, 40
    alternated rounds each) and more CPU time."""
    return max(1, native.cpu_cores() // len(jax.local_devices(backend="cpu")))


def _attributes(padding, strides, winograd) -> dict:
    (top, _), (left, _) = padding
    return dict(top=np.int64(top), left=np.int64(left), stride_rows=np.int64(strides[0]),
                stride_cols=np.int64(strides[1]), max_chunks=np.int64(max_chunks()),
                winograd=np.int64(winograd))


def _ffi_kernel_gradient(x_BxHxWxC, dy_BxHoxWoxF, kernel_shape, padding, strides, winograd):
    kh, kw, C, F = kernel_shape
    out = _float32_like(dy_BxHoxWoxF, (kh, kw * C, F))
    # vmap runs the call once per mapped element (there is no batched form).
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(
        x_BxHxWxC, dy_BxHoxWoxF, **_attributes(padding, strides, winograd))


def _batch_axes(arg_shapes) -> tuple[str, ...]:
    spec = arg_shapes[0].sharding.spec
    axes = spec[0] if len(spec) else None
    return () if axes is None else (axes if isinstance(axes, tuple) else (axes,))


def _batch_sharding(mesh, arg_shapes) -> NamedSharding:
    """A 4-D array sharded over the batch as the first argument is, nothing else."""
    return NamedSharding(mesh, PartitionSpec(_batch_axes(arg_shapes) or None, None, None, None))


def _partition(kernel_shape, padding, strides, winograd, mesh, arg_shapes, result_shape):
    # Sharded over the batch only: each device sums its own images, then one all-reduce.
    axes = _batch_axes(arg_shapes)
    arg_sharding = _batch_sharding(mesh, arg_shapes)

    def lower(x, dy):
        dk = _ffi_kernel_gradient(x, dy, kernel_shape, padding, strides, winograd)
        return jax.lax.psum(dk, axes) if axes else dk

    return mesh, lower, NamedSharding(mesh, PartitionSpec()), (arg_sharding, arg_sharding)


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4, 5))
def _partitioned_kernel_gradient(x_BxHxWxC, dy_BxHoxWoxF, kernel_shape, padding, strides,
                                 winograd):
    return _ffi_kernel_gradient(x_BxHxWxC, dy_BxHoxWoxF, kernel_shape, padding, strides,
                                winograd)


_partitioned_kernel_gradient.def_partition(
    _partition,
    infer_sharding_from_operands=lambda kernel_shape, padding, strides, winograd, mesh,
                                        arg_shapes, result_shape:
        NamedSharding(mesh, PartitionSpec()),
    sharding_rule="b h w c, b ho wo f -> kh kc f",
    reduction_factors=("b",),
    need_replication_factors=("h", "w", "c", "ho", "wo"),
)


def _ffi_conv(x_BxHxWxC, kernel_KHxKWCxF, padding, strides, winograd):
    (top, bottom), (left, right) = padding
    B, H, W, C = x_BxHxWxC.shape
    kh, kwc, F = kernel_KHxKWCxF.shape
    out_shape = (B, (H + top + bottom - kh) // strides[0] + 1,
                 (W + left + right - kwc // C) // strides[1] + 1, F)
    return jax.ffi.ffi_call(_CONV_TARGET, _float32_like(x_BxHxWxC, out_shape),
                            vmap_method="sequential")(
        x_BxHxWxC, kernel_KHxKWCxF, **_attributes(padding, strides, winograd))


def _conv_partition(padding, strides, winograd, mesh, arg_shapes, result_shape):
    # Each device convolves its own images with the whole kernel: nothing to reduce.
    batch = _batch_sharding(mesh, arg_shapes)
    lower = functools.partial(_ffi_conv, padding=padding, strides=strides, winograd=winograd)
    return mesh, lower, batch, (batch, NamedSharding(mesh, PartitionSpec()))


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
def _partitioned_conv(x_BxHxWxC, kernel_KHxKWCxF, padding, strides, winograd):
    return _ffi_conv(x_BxHxWxC, kernel_KHxKWCxF, padding, strides, winograd)


_partitioned_conv.def_partition(
    _conv_partition,
    infer_sharding_from_operands=lambda padding, strides, winograd, mesh, arg_shapes,
                                        result_shape: _batch_sharding(mesh, arg_shapes),
    sharding_rule="b h w c, kh kc f -> b ho wo f",
    need_replication_factors=("h", "w", "c", "kh", "kc", "f", "ho", "wo"),
)


def _static(padding, strides):
    """Padding and strides as hashable ints, for the static arguments; ValueError for a
    stride below 1."""
    if len(strides) != 2 or any(int(t) != t or t < 1 for t in strides):
        raise ValueError(f"strides must be two ints of at least 1, got {strides!r}")
    return tuple((int(lo), int(hi)) for lo, hi in padding), tuple(int(t) for t in strides)


def conv(x_BxHxWxC, kernel_HxWxIxO, padding, partitioned: bool = True,
         strides: tuple[int, int] = (1, 1), winograd: bool = False) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding)`` (NHWC, HWIO, any
    integer padding) in float32 by the compiled kernel; RuntimeError where the kernels
    are unavailable.

    With ``partitioned`` (for ``jit`` over sharded arrays) each device convolves its
    own images; without it (inside ``shard_map``) the call is on the arrays as they are.
    With ``winograd``, Winograd's F(4, 5) where it applies (module docstring): it mixes
    the columns of a row at the rounding level (``conv2d``'s ``winograd``).
    """
    if not registered():
        raise RuntimeError(f"the compiled CPU kernels are unavailable ({ENABLE_VAR}=0, no "
                           "C++ compiler, or a failed build: see the log)")
    padding, strides = _static(padding, strides)
    kh, kw, C, F = kernel_HxWxIxO.shape
    kernel = kernel_HxWxIxO.astype(jnp.float32).reshape(kh, kw * C, F)
    call = _partitioned_conv if partitioned else _ffi_conv
    return call(x_BxHxWxC.astype(jnp.float32), kernel, padding, strides, bool(winograd))


def kernel_gradient(x_BxHxWxC, dy_BxHoxWoxF, kernel_shape, padding,
                    partitioned: bool = True, strides: tuple[int, int] = (1, 1),
                    winograd: bool = False) -> jax.Array:
    """d/dkernel of ``sum(conv(x, kernel, padding, strides=strides) * dy)`` (NHWC, HWIO), in
    float32, by the compiled kernel, which this builds and registers if no call has yet
    (RuntimeError if it cannot be: ``conv2d`` then keeps XLA's gradients instead).

    With ``partitioned`` (for ``jit`` over sharded arrays) a batch sharded over devices
    is summed by each device for its own images, then added by one all-reduce; without
    it (inside ``shard_map``) the call is on the arrays as they are. With ``winograd``,
    Winograd's F(5, 4) where it applies (module docstring).
    """
    if not registered():
        raise RuntimeError(f"the compiled CPU kernels are unavailable ({ENABLE_VAR}=0, no "
                           "C++ compiler, or a failed build: see the log)")
    padding, strides = _static(padding, strides)
    kernel_shape = tuple(int(d) for d in kernel_shape)
    call = _partitioned_kernel_gradient if partitioned else _ffi_kernel_gradient
    dk = call(x_BxHxWxC.astype(jnp.float32), dy_BxHoxWoxF.astype(jnp.float32),
              kernel_shape, padding, strides, bool(winograd))
    return dk.reshape(kernel_shape)
