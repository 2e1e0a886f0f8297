"""Ancestral samplers for every model family, inside ``jax.lax.scan``.

``sample`` draws the latents from the prior (or takes them from ``fixed``), then the
image one sub-pixel at a time in the contract's order: raster order over pixels, then
R, G, B within a pixel.

Randomness is laid out so that every sampler draws the same image from the same key:
``key`` is split once into (latent key, pixel key); sub-pixel ``d`` (its position in
the order above) is drawn by ``pixel_sample(fold_in(pixel_key, d), logits_d, ...)``
where ``logits_d`` is the ``[N]`` (binary) or ``[N, K]`` slice of the decoder's logits
at that sub-pixel. A sampler that computes ``logits_d`` another way (an activation
cache, one pass for a factorised decoder) and keeps this rule reproduces the
reference images exactly.

A hierarchical model's latents are drawn top down (``_hierarchical_latents``): the
top level from N(0, I), each map level one position at a time from its PixelCNN
prior, by the same activation-cache machinery as the pixels under ``'fast'`` and by
full prior passes under ``'reference'``, with the same keys.

``method='fast'`` is such a sampler. Inside ``lax.scan`` it keeps, for every masked
layer, a cache of its activations over the image (zeros outside it, as the 'SAME'
padding of the full-image convolutions), and at each step evaluates every layer at the
current pixel only, from the cropped-kernel patch of the layer below: the work per step
is bounded by the receptive field, not the image size. The current pixel's layers are
recomputed once per colour step, since each colour group reads the colours before it.
The vertical stack of a gated decoder reads the whole current row, columns to the right
included, but is used only one row down (``shift_down``): it is computed for a whole
row, every layer, once that row of the image is complete. The conditioning (z's
upsampled map or z itself) is computed once, before the scan. The logits may differ
from the full pass in the last bits, because the sums run in another order; the images
are the same (tests check them bit for bit).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pvae_jax import distributions, sampling_auxiliary
from pvae_jax.models.auxiliary import GrayscalePixelCNN, PixelCNNPlusPlus, PyramidPixelCNN
from pvae_jax.models.conv_vae import scale_pixels
from pvae_jax.models.hierarchical import HierarchicalPixelVAE, LatentPixelCNN
from pvae_jax.models.pixelcnn import logits_per_sub_pixel, pixel_sample
from pvae_jax.models.pixelvae import PixelVAE
from pvae_jax.nn import pixelcnn as pc

METHODS = ("fast", "reference")
FIXED_KEYS = ("latents",)


def sample(
    model: nn.Module,
    variables: Mapping[str, Any],
    key: jax.Array,
    num_samples: int,
    *,
    temperature=1.0,
    fixed: Mapping[str, Any] | None = None,
    method: str = "fast",
    map_sampling: bool = False,
    log_scale_shift=0.0,
) -> jax.Array:
    """Draws ``num_samples`` images from ``model``.

    The function is pure and may itself be wrapped in ``jax.jit`` with ``model``,
    ``num_samples``, ``method`` and ``fixed``'s keys closed over;
    ``variables``, ``key``, ``temperature`` and the arrays in ``fixed`` may be traced.
    The work is one jitted function, compiled once per model, sample count and
    ``fixed`` structure; new keys, variables or temperatures reuse it.

    Args:
      model: a module from ``pvae_jax.models.build``.
      variables: its variables (e.g. ``{'params': ...}``).
      key: PRNG key; see the module docstring for how it is consumed.
      num_samples: N.
      temperature: non-negative scalar applied to every draw: it scales the standard
        deviation of the Gaussian prior and the noise of each sub-pixel draw (logits
        divided by it). 0 gives the prior mean and, given it, the most probable value
        of each sub-pixel in turn (greedy decoding).
      fixed: optional dict of values to hold constant instead of drawing them
        (paper Fig. 6). ``'latents'``: the latents to decode, with exactly the
        structure and shapes the prior would draw (``[N, latent_dim]`` for a PixelVAE;
        repeat one z N times to see only pixel-level variation). For a hierarchical
        model, a tuple (z_1, ..., z_L) in which the lower levels may be None: those
        are drawn given the held ones above (``sample_latents`` shows which). They are
        not scaled by ``temperature``. The pixel draws use the same keys whether or not the
        latents are fixed, so fixing them to the prior's own draw changes nothing.
        Paper Fig. 6's "vary the pixel noise only" is therefore fixed latents with
        different keys; "vary the latents only" is different latents with one key.
      method: ``'fast'`` (default): per-layer activation caches, work per step bounded
        by the receptive field (see the module docstring); the same images as
        ``'reference'`` for the same key. ``'reference'``: one full decoder pass per
        sub-pixel, the ground truth the fast sampler is checked against. Both take one
        pass in all for a factorised decoder, which gives the same images.
      map_sampling: PixelCNN++ models with a logistic-mixture output (Grayscale and
        Pyramid PixelCNN): draw each pixel's mixture component, then take its mode
        instead of adding logistic noise (Kolesnikov & Lampert's MAP sampling).
      log_scale_shift: the same models: subtract this from every predicted log-scale
        (their variance reduction).

    The auxiliary-variable models are drawn by ``sampling_auxiliary`` (see there); for
    the Grayscale PixelCNN ``fixed={'latents': x_hat}`` colours given 4-bit grayscale
    images, and only the Pyramid PixelCNN has a ``'fast'`` path of its own (the
    others run their reference sampler for either method).

    Returns:
      uint8 array ``[N, H, W, C]`` with values in ``[0, model.num_levels)``; the shape
      is the model's own (``image_shape``).

    Raises:
      ValueError: unknown method or ``fixed`` key, latents of the wrong shape, a
        model without latents given latents, or a negative temperature.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(temperature, jax.core.Tracer) and float(temperature) < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(FIXED_KEYS))
    if unknown:
        raise ValueError(f"fixed may only hold {FIXED_KEYS}, got unknown keys {unknown}")
    if isinstance(model, _AUXILIARY):
        return _sample_auxiliary(model, variables, key, num_samples, temperature,
                                 fixed.get("latents"), method, map_sampling, log_scale_shift)
    if map_sampling or (not isinstance(log_scale_shift, jax.core.Tracer)
                        and float(log_scale_shift) != 0.0):
        raise ValueError("map_sampling and log_scale_shift apply to logistic-mixture "
                         f"outputs (Grayscale/Pyramid PixelCNN), not {type(model).__name__}")
    image_shape(model)  # Fails early, outside jit, on a model without its shape.
    factorised = model.decoder.num_layers == 0
    args = (model, variables, key, fixed.get("latents"), jnp.asarray(temperature, jnp.float32))
    if method == "fast" and not factorised:
        return _sample_fast(*args, num_samples=num_samples)
    return _sample_reference(*args, num_samples=num_samples, factorised=factorised)


_AUXILIARY = (GrayscalePixelCNN, PyramidPixelCNN, PixelCNNPlusPlus)


def _sample_auxiliary(model, variables, key, num_samples, temperature, fixed_latents, method,
                      map_sampling, log_scale_shift):
    options = dict(temperature=temperature, map_sampling=map_sampling,
                   log_scale_shift=log_scale_shift)
    if isinstance(model, GrayscalePixelCNN):
        return sampling_auxiliary.sample_grayscale(model, variables, key, num_samples,
                                                   grayscale=fixed_latents, **options)
    if fixed_latents is not None:
        raise ValueError(f"fixed['latents'] was given, but {type(model).__name__} has no "
                         "latents to hold")
    if isinstance(model, PyramidPixelCNN):
        return sampling_auxiliary.sample_pyramid(model, variables, key, num_samples,
                                                 method=method, **options)
    return sampling_auxiliary.sample_pixelcnnpp(model, variables, key, num_samples, **options)


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images ``model`` generates: ``model.image_hw`` and
    ``model.decoder.channels``, which every family of ``pvae_jax.models`` carries."""
    hw = getattr(model, "image_hw", None)
    channels = getattr(getattr(model, "decoder", None), "channels",
                       getattr(model, "channels", None))
    if hw is None or channels is None:
        raise ValueError(f"{type(model).__name__} must carry image_hw and decoder.channels "
                         f"for the sampler to know the image shape; build it with "
                         f"pvae_jax.models.build")
    return (*hw, channels)


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "factorised"))
def _sample_reference(model, variables, key, fixed_latents, temperature, *, num_samples,
                      factorised):
    """The reference sampler; ``factorised`` replaces the scan by one decoder pass."""
    data_shape = H, W, C = image_shape(model)
    num_levels = model.num_levels
    latent_key, pixel_key = jax.random.split(key)
    latents = _latents(model, variables, latent_key, fixed_latents, temperature, num_samples,
                       "reference")

    def logits_fn(x_NxHxWxC):
        return model.apply(variables, x_NxHxWxC, latents, method="logits")

    def draw(d, logits_d):
        return pixel_sample(jax.random.fold_in(pixel_key, d), logits_d, num_levels,
                            temperature).astype(jnp.uint8)

    x_NxHxWxC = jnp.zeros((num_samples, *data_shape), jnp.uint8)
    num_sub_pixels = H * W * C
    if factorised:
        # No sub-pixel reads another, so one pass gives every step's logits; vmap over d
        # draws with the very keys the scan would use, hence the same images.
        logits = logits_fn(x_NxHxWxC)
        logits_DxN = jnp.moveaxis(
            logits.reshape(num_samples, num_sub_pixels, *logits.shape[4:]), 1, 0)
        values_DxN = jax.vmap(draw)(jnp.arange(num_sub_pixels), logits_DxN)
        return values_DxN.T.reshape(num_samples, *data_shape)

    def step(x_NxHxWxC, d):
        i, j, c = d // (W * C), (d // C) % W, d % C
        logits_d = logits_fn(x_NxHxWxC)[:, i, j, c]
        return x_NxHxWxC.at[:, i, j, c].set(draw(d, logits_d)), None

    x_NxHxWxC, _ = jax.lax.scan(step, x_NxHxWxC, jnp.arange(num_sub_pixels))
    return x_NxHxWxC


def _latents(model, variables, key, fixed_latents, temperature, num_samples, method):
    """The prior's draw, or ``fixed_latents`` after checking they could have been it."""
    if isinstance(model, HierarchicalPixelVAE):
        return _hierarchical_latents(model, variables, key, fixed_latents, temperature,
                                     num_samples, method)

    def prior(key):
        return model.apply(variables, num_samples, temperature, method="prior_sample",
                           rngs={"sample": key})

    if fixed_latents is None:
        return prior(key)
    expected = jax.eval_shape(prior, key)
    if expected is None:
        raise ValueError(f"fixed['latents'] was given, but {type(model).__name__} has no "
                         f"latents")
    want_leaves, want_tree = jax.tree.flatten(expected)
    got_leaves, got_tree = jax.tree.flatten(fixed_latents)
    want = [tuple(s.shape) for s in want_leaves]
    got = [tuple(jnp.shape(a)) for a in got_leaves]
    if got_tree != want_tree or got != want:
        raise ValueError(
            f"fixed['latents'] must have the prior's structure {want_tree} and shapes "
            f"{want} for num_samples={num_samples}, got {got_tree} with shapes {got}; to "
            f"reuse one z for every sample, repeat it: jnp.repeat(z[None], {num_samples}, "
            f"axis=0)")
    return jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), fixed_latents, expected)


def _hierarchical_latents(model, variables, key, fixed_latents, temperature, num_samples,
                          method):
    """(z_1, ..., z_L): the fixed levels as given, the others drawn top down given the
    levels above, level i with the i-th key of ``split(key, L)``."""
    L = model.num_latent_levels
    shapes = [(num_samples, *s) for s in model.latent_shapes()]
    fixed = (None,) * L if fixed_latents is None else tuple(fixed_latents)
    given = [z is not None for z in fixed]
    if len(fixed) != L or any(g and not all(given[i:]) for i, g in enumerate(given)):
        raise ValueError(
            f"fixed['latents'] of a {L}-level model must be a tuple of {L} entries, bottom "
            "first, each an array or None (drawn); a level can be held only with every level "
            f"above it held too, got {[None if z is None else 'array' for z in fixed]}")
    for level, (z, shape) in enumerate(zip(fixed, shapes, strict=True)):
        if z is not None and tuple(jnp.shape(z)) != shape:
            raise ValueError(f"fixed['latents'][{level}] must have shape {shape} for "
                             f"num_samples={num_samples}, got {tuple(jnp.shape(z))}")
    keys = jax.random.split(key, L)
    z = [None if a is None else jnp.asarray(a, jnp.float32) for a in fixed]
    if z[-1] is None:
        z[-1] = model.apply(variables, keys[-1], num_samples, temperature, method="sample_top")
    for level in reversed(range(L - 1)):
        if z[level] is None:
            if method == "fast":
                z[level] = _latent_level_fast(model, variables, level, z[level + 1], keys[level],
                                              temperature)
            else:
                z[level] = model.apply(variables, level, z[level + 1], keys[level], temperature,
                                       method="sample_map_level")
    return tuple(z)


_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


class _Conv:
    """A masked convolution of the decoder, evaluated at one position or one row of a
    cache that holds its input with ``pad`` zeros above, left and right of the image."""

    def __init__(self, conv: pc.MaskedConv, params, in_channels: int, pad: int):
        self.kernel, ((self.top, bottom), (self.left, right)), self.bias = (
            pc.masked_conv_kernel(conv, params, in_channels))
        # Causal kernels never read below the current row; the caches have no padding there.
        assert bottom == 0 and max(self.top, self.left, right) <= pad, (self.top, bottom,
                                                                         self.left, right)
        self.right, self.pad = right, pad

    def _add_bias(self, y):
        return y if self.bias is None else y + self.bias

    def at(self, cache_NxHxWxC, i, j):
        """Output ``[N, out]`` at image position (i, j)."""
        kh, kw, cin, _ = self.kernel.shape
        patch = jax.lax.dynamic_slice(
            cache_NxHxWxC, (0, i + self.pad - self.top, j + self.pad - self.left, 0),
            (cache_NxHxWxC.shape[0], kh, kw, cin))
        return self._add_bias(jnp.einsum("nhwc,hwcf->nf", patch, self.kernel))

    def row(self, cache_NxHxWxC, i):
        """Output ``[N, W, out]`` on image row i."""
        kh, _, cin, _ = self.kernel.shape
        n, _, padded_w, _ = cache_NxHxWxC.shape
        width = padded_w - 2 * self.pad
        window = jax.lax.dynamic_slice(
            cache_NxHxWxC, (0, i + self.pad - self.top, self.pad - self.left, 0),
            (n, kh, width + self.left + self.right, cin))
        y = jax.lax.conv_general_dilated(window, self.kernel, (1, 1), "VALID",
                                         dimension_numbers=_CONV_DIMS)
        return self._add_bias(y[:, 0])

    def pointwise(self, h_NxC):
        """A 1x1 convolution on per-position features ``[N, in]``."""
        assert self.kernel.shape[:2] == (1, 1)
        return self._add_bias(h_NxC @ self.kernel[0, 0])


class _Cond:
    """A ``pc.Conditioning`` bias at one position or one row (0.0 when it has none)."""

    def __init__(self, params, cond_vector_NxD, cond_map_NxHxWxD):
        params = params or {}
        self.vector = self.map = None
        if "vector" in params:
            p = params["vector"]
            self.vector = cond_vector_NxD @ p["kernel"] + p["bias"]
        if "map" in params:
            p = params["map"]
            self.map_kernel, self.map_bias = p["kernel"], p["bias"]
            kh, kw = self.map_kernel.shape[:2]
            self.map = jnp.pad(cond_map_NxHxWxD,
                               ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))

    def at(self, i, j):
        bias = 0.0
        if self.vector is not None:
            bias = bias + self.vector
        if self.map is not None:
            kh, kw, d, _ = self.map_kernel.shape
            patch = jax.lax.dynamic_slice(self.map, (0, i, j, 0), (self.map.shape[0], kh, kw, d))
            bias = bias + (jnp.einsum("nhwd,hwdf->nf", patch, self.map_kernel) + self.map_bias)
        return bias

    def row(self, i):
        bias = 0.0
        if self.vector is not None:
            bias = bias + self.vector[:, None]
        if self.map is not None:
            kh, _, d, _ = self.map_kernel.shape
            n, _, padded_w, _ = self.map.shape
            window = jax.lax.dynamic_slice(self.map, (0, i, 0, 0), (n, kh, padded_w, d))
            y = jax.lax.conv_general_dilated(window, self.map_kernel, (1, 1), "VALID",
                                             dimension_numbers=_CONV_DIMS)
            bias = bias + (y[:, 0] + self.map_bias)
        return bias


def _set(cache_NxHxWxC, value_NxC, i, j, pad):
    return jax.lax.dynamic_update_slice(
        cache_NxHxWxC, value_NxC[:, None, None, :].astype(cache_NxHxWxC.dtype),
        (0, i + pad, j + pad, 0))


def _set_row(cache_NxHxWxC, row_NxWxC, i, pad):
    return jax.lax.dynamic_update_slice(cache_NxHxWxC, row_NxWxC[:, None], (0, i + pad, pad, 0))


def _gated_layers(stack_params, *, first_kernel_size, kernel_size, num_blocks, num_convs,
                  in_channels, features, num_groups, weight_norm, pad, cond):
    """The layers of a ``GatedPixelCNNStack`` as ``_Conv``s over its params, in order;
    ``block_end`` marks the last layer of a mask-'B' block, which adds the block's input."""
    names = [("first", 0, "A", first_kernel_size)] + [
        (f"block_{b}", i, "B", kernel_size) for b in range(num_blocks) for i in range(num_convs)]
    common = dict(num_groups=num_groups, weight_norm=weight_norm)
    layers = []
    for li, (block, i, mask_type, k) in enumerate(names):
        p = stack_params[block][f"layer_{i}"]
        conv = dict(features=features, kernel_size=k, gated=True, **common)
        cin = in_channels if li == 0 else features
        layers.append(dict(
            vertical=_Conv(pc.MaskedConv(stack="vertical", **conv), p["vertical"], cin, pad),
            horizontal=_Conv(pc.MaskedConv(stack="horizontal", mask_type=mask_type, **conv),
                             p["horizontal"], cin, pad),
            h_out=_Conv(pc.MaskedConv(features, 1, "B", **common), p["h_out"], features, pad),
            v_to_h=p["v_to_h"], cond_v=cond(p.get("cond_v")), cond_h=cond(p.get("cond_h")),
            block_start=mask_type == "B" and i == 0,
            block_end=mask_type == "B" and i == num_convs - 1))
    return layers


def _relu_layers(stack_params, *, kernels, in_channels, features, num_groups, weight_norm,
                 pad, cond):
    """The layers of a ``MaskedReLUStack`` as ``_Conv``s over its params."""
    common = dict(num_groups=num_groups, weight_norm=weight_norm)
    return [dict(conv=_Conv(pc.MaskedConv(features, k, "A" if li == 0 else "B", **common),
                            stack_params[f"conv_{li}"], in_channels if li == 0 else features,
                            pad),
                 cond=cond(stack_params.get(f"cond_{li}")))
            for li, k in enumerate(kernels)]


def _autoregress(layers, *, gated, shape, groups, unit_size, in_size, encode, readout,
                 features, pad, value_dtype, sharding):
    """Draws ``[N, H, W, groups * unit_size]`` one unit at a time with activation caches.

    A unit is what one draw gives: one sub-pixel of the image (``unit_size`` 1), or all
    channels of one latent position (one group). ``encode(value_NxU, g)`` gives the
    ``[N, in_size]`` trunk input of group g; ``readout(h_NxF, i, j, g)`` draws the
    unit from the top layer's output at (i, j).
    """
    N, H, W = shape
    F, P, L = features, pad, len(layers)

    def zeros(shape):
        return jnp.zeros(shape, jnp.float32, out_sharding=sharding)

    def cache(channels):
        return zeros((N, H + P, W + 2 * P, channels))

    def v_to_h(layer, v_pre_NxWx2F):
        return v_pre_NxWx2F @ layer["v_to_h"]["kernel"] + layer["v_to_h"]["bias"]

    def top_features(state, i, j):
        """Every layer at (i, j) given the units drawn so far."""
        caches = list(state["h"])
        h_cache = state["xs"]
        h = block_input = None
        for li, layer in enumerate(layers):
            if gated:
                if layer["block_start"]:
                    block_input = h
                h_pre = layer["horizontal"].at(h_cache, i, j)
                h_pre = h_pre + jax.lax.dynamic_index_in_dim(state["vh"][li], j, 1, False)
                h_pre = h_pre + layer["cond_h"].at(i, j)
                h = layer["h_out"].pointwise(pc.gate(h_pre))
                if layer["block_end"]:
                    h = h + block_input
            else:
                h = jax.nn.relu(layer["conv"].at(h_cache, i, j) + layer["cond"].at(i, j))
            if li < L - 1:
                caches[li] = h_cache = _set(caches[li], h, i, j, P)
        return h, caches

    def vertical_row(state, i):
        """Every layer's vertical stack on the completed row i, for row i + 1."""
        v_caches, vh = list(state["v"]), list(state["vh"])
        v_cache = state["xs"]
        for li, layer in enumerate(layers):
            v_pre = layer["vertical"].row(v_cache, i) + layer["cond_v"].row(i)
            vh[li] = v_to_h(layer, v_pre)
            if li < L - 1:
                v_caches[li] = v_cache = _set_row(v_caches[li], pc.gate(v_pre), i, P)
        return v_caches, vh

    def step(state, g, i, j):
        h, caches = top_features(state, i, j)
        value = readout(h, i, j, g).astype(value_dtype)
        x = jax.lax.dynamic_update_slice(state["x"], value[:, None, None, :],
                                         (0, i, j, g * unit_size))
        xs = jax.lax.dynamic_update_slice(
            state["xs"], encode(value, g)[:, None, None, :].astype(jnp.float32),
            (0, i + P, j + P, g * in_size))
        return {**state, "x": x, "xs": xs, "h": caches}

    def row(state, i):
        def unit(state, s):
            return step(state, s % groups, i, s // groups), None

        state, _ = jax.lax.scan(unit, state, jnp.arange(W * groups))
        if gated:
            v_caches, vh = vertical_row(state, i)
            state = {**state, "v": v_caches, "vh": vh}
        return state, None

    state = {"x": zeros((N, H, W, groups * unit_size)).astype(value_dtype),
             "xs": cache(groups * in_size), "h": [cache(F) for _ in range(L - 1)]}
    if gated:
        # Row 0 sees shift_down's zeros: v_to_h of a zero row.
        zero_row = zeros((N, W, 2 * F))
        state["v"] = [cache(F) for _ in range(L - 1)]
        state["vh"] = [v_to_h(layer, zero_row) for layer in layers]
    state, _ = jax.lax.scan(row, state, jnp.arange(H))
    return state["x"]


def _sharding_of(params):
    # Arrays built inside the samplers must have the sharding type of those computed
    # from the parameters (replicated on a mesh when they come from a train state), or
    # dynamic_update_slice refuses to mix them.
    return jax.typeof(jax.tree.leaves(params)[0]).sharding


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def _sample_fast(model, variables, key, fixed_latents, temperature, *, num_samples):
    """The activation-cache sampler: the reference's images, work per step bounded by
    the receptive field. Mirrors ``PixelDecoder``'s layers; tests hold it to the
    reference bit for bit."""
    N, (H, W, C) = num_samples, image_shape(model)
    dec = model.decoder
    num_levels, K, F = model.num_levels, logits_per_sub_pixel(model.num_levels), dec.features
    latent_key, pixel_key = jax.random.split(key)
    latents = _latents(model, variables, latent_key, fixed_latents, temperature, num_samples,
                       "fast")
    cond_vector, cond_map = model.apply(variables, latents, method="decoder_conditioning")
    params = variables["params"]["decoder"]
    P = max(dec.first_kernel_size, dec.kernel_size) // 2
    common = dict(num_groups=C, weight_norm=dec.weight_norm)
    in_size = dec.embed_features or 1

    def cond(p):
        return _Cond(p, cond_vector, cond_map)

    stack = dict(in_channels=C * in_size, features=F, pad=P, cond=cond, **common)
    if dec.gated:
        layers = _gated_layers(params["trunk"], first_kernel_size=dec.first_kernel_size,
                               kernel_size=dec.kernel_size, num_blocks=dec.num_layers - 1,
                               num_convs=dec.num_convs, **stack)
        heads = [(_Conv(pc.MaskedConv(F, 1, "B", gated=True, **common), params[f"head_{i}"]
                        ["conv"], F, P), cond(params[f"head_{i}"].get("cond")))
                 for i in range(dec.num_head_layers)]
    else:
        kernels = [dec.first_kernel_size] + [dec.kernel_size] * (dec.num_layers - 1)
        layers = _relu_layers(params["trunk"], kernels=kernels, **stack)
        heads = [_Conv(pc.MaskedConv(F, 1, "B", **common), params[f"head_{i}"], F, P)
                 for i in range(dec.num_head_layers)]
    out = _Conv(pc.MaskedConv(C * K, 1, "B", **common), params["out"], F, P)

    def encode(value_Nx1, c):
        if dec.embed_features:
            return params["embed"]["embedding"][value_Nx1[:, 0]]
        return scale_pixels(value_Nx1, num_levels)

    def readout(h, i, j, c):
        for head in heads:
            if dec.gated:
                conv, head_cond = head
                h = pc.gate(conv.pointwise(h) + head_cond.at(i, j))
            else:
                h = jax.nn.relu(head.pointwise(h))
        # Only colour c's block of the output is needed: columns c*K .. (c+1)*K - 1.
        kernel_c = jax.lax.dynamic_slice_in_dim(out.kernel[0, 0], c * K, K, axis=1)
        logits = h @ kernel_c + jax.lax.dynamic_slice_in_dim(out.bias, c * K, K)
        d = (i * W + j) * C + c
        value = pixel_sample(jax.random.fold_in(pixel_key, d),
                             logits[:, 0] if num_levels == 2 else logits, num_levels,
                             temperature)
        return value[:, None]

    return _autoregress(layers, gated=dec.gated, shape=(N, H, W), groups=C, unit_size=1,
                        in_size=in_size, encode=encode, readout=readout, features=F, pad=P,
                        value_dtype=jnp.uint8, sharding=_sharding_of(params))


def _latent_level_fast(model, variables, level, z_above, key, temperature):
    """``model.sample_map_level`` with activation caches: the same draws, one latent
    position at a time, work per position bounded by the prior's receptive field."""
    prior = LatentPixelCNN(**model.prior_fields(level), parent=None)
    N = z_above.shape[0]
    h, w, c = model.latent_shapes()[level]
    cond_map = model.apply(variables, level + 1, z_above, method="decode_level")
    params = variables["params"][f"priors_{level}"]
    P = max(prior.first_kernel_size, prior.kernel_size) // 2
    layers = _gated_layers(
        params["trunk"], first_kernel_size=prior.first_kernel_size,
        kernel_size=prior.kernel_size, num_blocks=prior.num_blocks, num_convs=prior.num_convs,
        in_channels=c, features=prior.features, num_groups=1, weight_norm=prior.weight_norm,
        pad=P, cond=lambda p: _Cond(p, None, cond_map))
    out = params["out"]

    def readout(h_NxF, i, j, g):
        del g
        mean, log_std = jnp.split(h_NxF @ out["kernel"] + out["bias"], 2, axis=-1)
        return distributions.gaussian_sample(jax.random.fold_in(key, i * w + j), mean, log_std,
                                             temperature)

    return _autoregress(layers, gated=True, shape=(N, h, w), groups=1, unit_size=c, in_size=c,
                        encode=lambda z, g: z, readout=readout, features=prior.features,
                        pad=P, value_dtype=jnp.float32, sharding=_sharding_of(params))


GRID_VARY = ("none", "top", "middle", "pixel")


def check_vary(vary: str) -> None:
    """Raises ValueError unless ``vary`` is one of ``GRID_VARY``."""
    if vary not in GRID_VARY:
        raise ValueError(f"--vary must be one of {GRID_VARY}, got {vary!r}")


def sample_latents(model, variables, key, num_samples, *, temperature=1.0, fixed=None,
                   method="fast"):
    """The latents ``sample(model, variables, k, ...)`` decodes when ``key`` is the first
    half of ``jax.random.split(k)``: a pytree, or None for a model without latents.
    ``fixed`` holds levels as ``sample``'s ``fixed['latents']`` does."""
    return _latents(model, variables, key, fixed, jnp.asarray(temperature, jnp.float32),
                    num_samples, method)


def _num_latent_levels(model) -> int:
    if isinstance(model, HierarchicalPixelVAE):
        return model.num_latent_levels
    return 1 if isinstance(model, PixelVAE) else 0


def sample_grid(model, variables, key, num_samples, *, temperature=1.0, method="fast",
                vary="none"):
    """``num_samples`` images, ``vary`` choosing what changes across them (paper Fig. 6).

    ``vary``: 'none', independent samples; 'top', only the top level's latents vary
    (the noise of every level below, pixels included, is the same for every image);
    'middle', the top level is held and the level below it varies, the pixel noise
    (and that of any lower level) held (hierarchical models); 'pixel', one draw of
    every latent level for the grid and only the pixel noise varies. 'top' and
    'pixel' need a model with latents, 'middle' one with two levels or more.
    """
    check_vary(vary)
    if vary == "none":
        return sample(model, variables, key, num_samples, temperature=temperature,
                      method=method)
    levels = _num_latent_levels(model)
    if vary == "middle" and levels < 2:
        raise ValueError("--vary=middle needs a hierarchical model with a middle level of "
                         f"latents; {type(model).__name__} has {levels}, use one of "
                         "none, top, pixel")
    if levels == 0:
        raise ValueError(f"--vary={vary} needs a model with latents; "
                         f"{type(model).__name__} has none, use --vary=none")
    latent_key, pixel_key = jax.random.split(key)
    draw = functools.partial(sample_latents, model, variables, temperature=temperature,
                             method=method)

    def repeat(z):
        return jax.tree.map(lambda a: jnp.repeat(a, num_samples, axis=0), z)

    if vary == "pixel":
        return sample(model, variables, pixel_key, num_samples, temperature=temperature,
                      fixed={"latents": repeat(draw(latent_key, 1))}, method=method)
    if vary == "top":
        held = draw(latent_key, num_samples)
        if levels > 1:  # Only the top is given; the levels below are drawn in `one`.
            held = (None,) * (levels - 1) + (held[-1],)
    else:  # 'middle': one top for the grid, the level below drawn per image.
        top = repeat(draw(latent_key, 1))[-1]
        z = draw(jax.random.fold_in(latent_key, 1), num_samples,
                 fixed=(None,) * (levels - 1) + (top,))
        held = (None,) * (levels - 2) + z[-2:]

    def one(z_1):  # The same key for every image: the same noise wherever z is not held.
        return sample(model, variables, pixel_key, 1, temperature=temperature,
                      fixed={"latents": z_1}, method=method)[0]

    return jax.vmap(one)(jax.tree.map(lambda a: a[:, None], held))
