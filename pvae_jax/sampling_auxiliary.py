"""Samplers for the PixelCNNs with auxiliary variables, inside ``jax.lax.scan``.

The Grayscale PixelCNN draws the 4-bit image x^ from p(x^), embeds it once, then draws
the colour image from p(x | x^). The Pyramid PixelCNN draws the coarsest scale, then
each finer scale given one embedding of the scale below (coarse to fine).

Each autoregressive stage is a scan over pixels in raster order with one full network
pass per pixel: the PixelCNN++ outputs at a pixel read only earlier pixels, and the
mixture draws the pixel's channels R, G, B in order itself, so one pass per pixel
(not per sub-pixel) is exact. Randomness: stage s draws pixel p with
``fold_in(fold_in(key, s), p)``; for the grayscale model stage 0 is x^ and stage 1
the colour image, for the pyramid stage k is scale k (0 the coarsest). The pixel's
value is ``logistic_mixture_sample`` (or ``categorical_sample`` for x^) of the network
output at that pixel with that key, which tests recompute from the finished image.

Options shared by every sampler:
  temperature: multiplies the logistic noise (and divides the logits of the 16-way
    grayscale softmax).
  log_scale_shift: s, subtracted from every predicted log-scale, i.e. the logistic
    noise is multiplied by exp(-s) (Kolesnikov & Lampert's variance reduction).
  map_sampling: draw the mixture component, then take its mode (no logistic noise).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pvae_jax import distributions, viz
from pvae_jax.models.auxiliary import (
    GRAY_LEVELS,
    GrayscalePixelCNN,
    PixelCNNPlusPlus,
    PyramidPixelCNN,
    numpy_init,
)

METHODS = ("reference", "fast")


def _check(num_samples, temperature, log_scale_shift):
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if float(temperature) < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")
    if not math.isfinite(float(log_scale_shift)):
        raise ValueError(f"log_scale_shift must be finite, got {log_scale_shift}")


def noise_scale(temperature, map_sampling: bool, log_scale_shift) -> jax.Array:
    """The factor on the logistic noise: 0 for MAP sampling, else T * exp(-s)."""
    if map_sampling:
        return jnp.float32(0.0)
    return jnp.float32(temperature) * jnp.exp(-jnp.float32(log_scale_shift))


def draw_mixture(key, params_NxP, num_channels, num_mixtures, num_levels, scale):
    """One pixel per row of ``params_NxP``: int32 [N, C]."""
    out = distributions.logistic_mixture_sample(
        key, params_NxP[:, None, None, :], num_channels, num_mixtures, scale,
        num_levels=num_levels)
    return out[:, 0, 0]


def draw_gray(key, logits_NxK, temperature):
    """One grayscale pixel per row of ``logits_NxK``: int32 [N, 1]."""
    return distributions.categorical_sample(key, logits_NxK, temperature)[:, None]


def receptive_rows(num_resnet: int) -> int:
    """How many rows above its own a one-stage PixelCNN++ output can read: 2 for the
    shifted input layers, then at most 2 per gated resnet on any path (u stream up and
    down, then the ul stream's down-pass blocks: 4 * num_resnet blocks in all)."""
    return 2 + 2 * 4 * num_resnet


def _scan_pixels_windowed(out_fn, draw_fn, x_NxHxWxC, key, reach):
    """``_scan_pixels`` for a network whose output at row i reads rows >= i - reach only:
    each step runs ``out_fn(x_window, top)`` on the ``reach + 1`` rows ending at the
    pixel's row (the first rows of the image while i < reach). The window's own top
    padding reaches at most ``reach`` rows down, so row i is exact, and the work per
    pixel no longer grows with the image height."""
    _, H, W, C = x_NxHxWxC.shape
    rows = min(reach + 1, H)

    def step(x, p):
        i, j = p // W, p % W
        top = jnp.clip(i - (rows - 1), 0, H - rows)
        window = jax.lax.dynamic_slice_in_dim(x, top, rows, axis=1)
        value_NxC = draw_fn(jax.random.fold_in(key, p), out_fn(window, top)[:, i - top, j])
        return x.at[:, i, j].set(value_NxC.astype(x.dtype)), None

    x_NxHxWxC, _ = jax.lax.scan(step, x_NxHxWxC, jnp.arange(H * W))
    return x_NxHxWxC


def _scan_pixels(out_fn, draw_fn, x_NxHxWxC, key):
    """Fills ``x`` pixel by pixel: pixel p gets ``draw_fn(fold_in(key, p), out_fn(x)[:, i, j])``."""
    _, H, W, _ = x_NxHxWxC.shape

    def step(x, p):
        i, j = p // W, p % W
        value_NxC = draw_fn(jax.random.fold_in(key, p), out_fn(x)[:, i, j])
        return x.at[:, i, j].set(value_NxC.astype(x.dtype)), None

    x_NxHxWxC, _ = jax.lax.scan(step, x_NxHxWxC, jnp.arange(H * W))
    return x_NxHxWxC


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "map_sampling"))
def _grayscale(model, variables, key, num_samples, temperature, map_sampling, log_scale_shift,
               x_hat):
    H, W = model.image_hw
    if x_hat is None:
        x_hat = _scan_pixels(
            lambda x: model.apply(variables, x, method="aux_logits"),
            lambda k, logits: draw_gray(k, logits, temperature),
            jnp.zeros((num_samples, H, W, 1), jnp.int32), jax.random.fold_in(key, 0))
    cond_maps = model.apply(variables, x_hat, method="embed")  # Once per image.
    scale = noise_scale(temperature, map_sampling, log_scale_shift)
    x = _scan_pixels(
        lambda x: model.apply(variables, x, cond_maps, method="mixture_params"),
        lambda k, p: draw_mixture(k, p, model.channels, model.num_mixtures, model.num_levels,
                                  scale),
        jnp.zeros((num_samples, H, W, model.channels), jnp.int32), jax.random.fold_in(key, 1))
    return x_hat.astype(jnp.uint8), x.astype(jnp.uint8)


def sample_grayscale(model: GrayscalePixelCNN, variables: Mapping[str, Any], key: jax.Array,
                     num_samples: int, *, temperature=1.0, map_sampling: bool = False,
                     log_scale_shift=0.0, grayscale=None, return_grayscale: bool = False):
    """Draws images from a Grayscale PixelCNN: x^ ~ p(x^), then x ~ p(x | x^).

    Args:
      model: a ``GrayscalePixelCNN``.
      variables: its variables.
      key: PRNG key (see the module docstring for how it is consumed).
      num_samples: N.
      temperature, map_sampling, log_scale_shift: see the module docstring.
      grayscale: optional uint8 [N, H, W, 1] 4-bit images to colour instead of drawing
        x^ (the paper's colourisation of real grayscale images).
      return_grayscale: also return x^.

    Returns:
      uint8 ``[N, H, W, 3]``; with ``return_grayscale`` the pair (x^, x).
    """
    _check(num_samples, temperature, log_scale_shift)
    if grayscale is not None:
        grayscale = jnp.asarray(grayscale, jnp.int32)
        if grayscale.shape != (num_samples, *model.image_hw, 1):
            raise ValueError(f"grayscale must have shape {(num_samples, *model.image_hw, 1)}, "
                             f"got {grayscale.shape}")
    x_hat, x = _grayscale(model, variables, key, num_samples, jnp.float32(temperature),
                          map_sampling, jnp.float32(log_scale_shift), grayscale)
    return (x_hat, x) if return_grayscale else x


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "map_sampling", "method"))
def _pyramid(model, variables, key, num_samples, temperature, map_sampling, log_scale_shift,
             method):
    H, W = model.image_hw
    C, M, L = model.channels, model.num_mixtures, model.num_levels
    scale = noise_scale(temperature, map_sampling, log_scale_shift)
    draw = lambda k, p: draw_mixture(k, p, C, M, L, scale)
    side = 2 ** (model.num_scales - 1)
    x = _scan_pixels(lambda x: model.apply(variables, x, method="base_params"), draw,
                     jnp.zeros((num_samples, H // side, W // side, C), jnp.int32),
                     jax.random.fold_in(key, 0))
    scales = [x]
    for k in range(1, model.num_scales):
        side //= 2
        emb = model.apply(variables, k, x, method="embed")  # Once per image and scale.
        x0 = jnp.zeros((num_samples, H // side, W // side, C), jnp.int32)
        if method == "fast":
            rows = min(receptive_rows(model.scale_num_resnet) + 1, H // side)

            def out_fn(window, top, k=k, emb=emb, rows=rows):
                emb_window = jax.lax.dynamic_slice_in_dim(emb, top, rows, axis=1)
                return model.apply(variables, k, window, emb_window, method="scale_params")

            x = _scan_pixels_windowed(out_fn, draw, x0, jax.random.fold_in(key, k),
                                      receptive_rows(model.scale_num_resnet))
        else:
            x = _scan_pixels(
                lambda x, k=k, emb=emb: model.apply(variables, k, x, emb, method="scale_params"),
                draw, x0, jax.random.fold_in(key, k))
        scales.append(x)
    return [s.astype(jnp.uint8) for s in scales]


def sample_pyramid_scales(model: PyramidPixelCNN, variables: Mapping[str, Any], key: jax.Array,
                          num_samples: int, *, temperature=1.0, map_sampling: bool = False,
                          log_scale_shift=0.0, method: str = "reference") -> list[jax.Array]:
    """Draws images from a Pyramid PixelCNN, coarse to fine, and returns every scale.

    Args:
      model: a ``PyramidPixelCNN``.
      variables: its variables.
      key: PRNG key (see the module docstring).
      num_samples: N.
      temperature, map_sampling, log_scale_shift: see the module docstring.
      method: 'reference' runs every network on its whole scale for each pixel, as
        the paper timed it; 'fast' runs each finer scale's light network only on the
        rows its output can read (``receptive_rows``), which draws the same images.

    Returns:
      A list of uint8 ``[N, H / 2^k, W / 2^k, C]`` arrays, coarsest first, the last
      the image.
    """
    _check(num_samples, temperature, log_scale_shift)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return _pyramid(model, variables, key, num_samples, jnp.float32(temperature), map_sampling,
                    jnp.float32(log_scale_shift), method)


def sample_pyramid(model, variables, key, num_samples, *, temperature=1.0,
                   map_sampling=False, log_scale_shift=0.0, method="reference") -> jax.Array:
    """The finest scale of ``sample_pyramid_scales``: uint8 ``[N, H, W, C]``."""
    return sample_pyramid_scales(model, variables, key, num_samples, temperature=temperature,
                                 map_sampling=map_sampling, log_scale_shift=log_scale_shift,
                                 method=method)[-1]


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "map_sampling"))
def _single_scale(model, variables, key, num_samples, temperature, map_sampling, log_scale_shift):
    H, W = model.image_hw
    scale = noise_scale(temperature, map_sampling, log_scale_shift)
    x = _scan_pixels(
        lambda x: model.apply(variables, x, method="mixture_params"),
        lambda k, p: draw_mixture(k, p, model.channels, model.num_mixtures, model.num_levels,
                                  scale),
        jnp.zeros((num_samples, H, W, model.channels), jnp.int32), jax.random.fold_in(key, 0))
    return x.astype(jnp.uint8)


def sample_pixelcnnpp(model: PixelCNNPlusPlus, variables, key, num_samples, *, temperature=1.0,
                      map_sampling=False, log_scale_shift=0.0) -> jax.Array:
    """uint8 ``[N, H, W, C]`` from a single-scale PixelCNN++ (stage 0 of the module
    docstring's key layout)."""
    _check(num_samples, temperature, log_scale_shift)
    return _single_scale(model, variables, key, num_samples, jnp.float32(temperature),
                         map_sampling, jnp.float32(log_scale_shift))


def sample(model: nn.Module, variables, key, num_samples: int, *, temperature=1.0,
           map_sampling: bool = False, log_scale_shift=0.0) -> jax.Array:
    """uint8 ``[N, H, W, C]`` images from either auxiliary-variable model."""
    fn = {GrayscalePixelCNN: sample_grayscale, PyramidPixelCNN: sample_pyramid,
          PixelCNNPlusPlus: sample_pixelcnnpp}.get(type(model))
    if fn is None:
        raise ValueError(f"sampling_auxiliary.sample takes a GrayscalePixelCNN, "
                         f"PyramidPixelCNN or PixelCNNPlusPlus, got {type(model).__name__}")
    return fn(model, variables, key, num_samples, temperature=temperature,
              map_sampling=map_sampling, log_scale_shift=log_scale_shift)


def scales_grid(scales, num_levels: int = 256, pad: int = 1,
                samples_per_row: int = 1) -> np.ndarray:
    """Each sample's scales side by side, every scale blown up (nearest) to the finest
    size: the coarse-to-fine progression of each image.

    Args:
      scales: list of ``[N, h_k, w_k, C]`` arrays (``sample_pyramid_scales``), or of
        ``[N, H, W, C']`` arrays of equal size (e.g. x^ beside x: a 1-channel image is
        shown gray).
      num_levels: levels of the images (a 16-level x^ goes in as ``x^ * 17``).
      pad: border width.
      samples_per_row: samples in a row of the grid (each taking one cell per scale).

    Returns:
      uint8 grid ``[rows, cols, 3]`` for ``viz.save_png``.
    """
    arrays = [np.asarray(s) for s in scales]
    H, W = arrays[-1].shape[1:3]
    big = []
    for a in arrays:
        a = np.repeat(np.repeat(a, H // a.shape[1], axis=1), W // a.shape[2], axis=2)
        big.append(np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a)
    cells = np.stack(big, axis=1).reshape(-1, H, W, 3)
    return viz.image_grid(cells, num_levels, ncols=len(arrays) * samples_per_row, pad=pad)


def grayscale_to_levels(x_hat) -> np.ndarray:
    """A 16-level x^ as 256-level intensities (bin centres), for grids beside x."""
    step = 256 // GRAY_LEVELS
    return np.asarray(x_hat).astype(np.int32) * step + step // 2


def _num_params(variables) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(variables)))


def _timed_sampler(fn, model, num_samples, seed):
    """(seconds of a compiled call, seconds of the first call incl. compile)."""
    variables = numpy_init(model, jnp.zeros((1, *model.image_hw, model.channels), jnp.uint8),
                           seed=seed)
    start = time.perf_counter()
    jax.block_until_ready(fn(model, variables, jax.random.key(0), num_samples))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(model, variables, jax.random.key(1), num_samples))
    return time.perf_counter() - start, first, _num_params(variables)


def sampling_speed(image_size: int = 32, num_samples: int = 4, num_scales: int = 3,
                   features: int = 32, single_num_resnet: int | None = None) -> dict:
    """Seconds to sample with a Pyramid PixelCNN and a single-scale PixelCNN++.

    The pyramid: a 2-stage PixelCNN++ of 2 resnets at the coarsest scale, then per
    finer scale a light one-stage PixelCNN++ of 1 resnet per pass and a 4-block
    embedding (down after 1, up after 2 and 4). The single-scale PixelCNN++ has 3
    stages and ``single_num_resnet`` resnets per stage, by default the smallest count
    whose parameters reach the pyramid's (a similar likelihood budget). Both use the
    reference sampler (one network pass per pixel), and the pyramid also its 'fast'
    one (finer scales run on their receptive rows only); parameters are drawn by
    ``numpy_init`` (timing does not depend on their values); every sampler is
    compiled before it is timed.

    Args:
      image_size: side of the images generated.
      num_samples: images per call.
      num_scales: pyramid scales.
      features: channels of every network.
      single_num_resnet: resnets per stage of the single-scale model (None: matched).

    Returns:
      A JSON-able dict: seconds per call and per pixel of each model, the speed-up,
      compile-inclusive first-call seconds and parameter counts.
    """
    hw = (image_size, image_size)
    pyramid = PyramidPixelCNN(
        image_hw=hw, num_scales=num_scales, features=features, base_num_resnet=2,
        base_num_stages=2, scale_num_resnet=1, embed_num_blocks=4, embed_down_after=(1,),
        embed_up_after=(2, 4), dropout_rate=0.0, num_mixtures=10)
    pyr_seconds, pyr_first, pyr_params = _timed_sampler(sample_pyramid, pyramid, num_samples, 0)
    fast = functools.partial(sample_pyramid, method="fast")
    fast_seconds, fast_first, _ = _timed_sampler(fast, pyramid, num_samples, 0)

    def single(num_resnet):
        return PixelCNNPlusPlus(image_hw=hw, features=features, num_resnet=num_resnet,
                                num_stages=3, dropout_rate=0.0, num_mixtures=10)

    if single_num_resnet is None:
        single_num_resnet = 1
        example = jnp.zeros((1, *hw, 3), jnp.uint8)
        while _num_params(jax.eval_shape(single(single_num_resnet).init, jax.random.key(0),
                                         example)) < pyr_params:
            single_num_resnet += 1
    one_seconds, one_first, one_params = _timed_sampler(
        sample_pixelcnnpp, single(single_num_resnet), num_samples, 0)
    pixels = image_size * image_size
    return {
        "image_size": image_size, "num_samples": num_samples, "num_scales": num_scales,
        "features": features, "device": str(jax.devices()[0].platform),
        "pyramid_seconds": pyr_seconds, "pyramid_first_call_seconds": pyr_first,
        "pyramid_params": pyr_params,
        "pyramid_ms_per_pixel": 1e3 * pyr_seconds / pixels,
        "pyramid_fast_seconds": fast_seconds, "pyramid_fast_first_call_seconds": fast_first,
        "single_scale_num_resnet": single_num_resnet,
        "single_scale_seconds": one_seconds, "single_scale_first_call_seconds": one_first,
        "single_scale_params": one_params,
        "single_scale_ms_per_pixel": 1e3 * one_seconds / pixels,
        "speedup": one_seconds / pyr_seconds,
        "speedup_fast": one_seconds / fast_seconds,
    }
