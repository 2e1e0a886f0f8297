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

from pvae_jax.models.conv_vae import scale_pixels
from pvae_jax.models.pixelcnn import logits_per_sub_pixel, pixel_sample
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
        repeat one z N times to see only pixel-level variation). They are not scaled
        by ``temperature``. The pixel draws use the same keys whether or not the
        latents are fixed, so fixing them to the prior's own draw changes nothing.
        Paper Fig. 6's "vary the pixel noise only" is therefore fixed latents with
        different keys; "vary the latents only" is different latents with one key.
      method: ``'fast'`` (default): per-layer activation caches, work per step bounded
        by the receptive field (see the module docstring); the same images as
        ``'reference'`` for the same key. ``'reference'``: one full decoder pass per
        sub-pixel, the ground truth the fast sampler is checked against. Both take one
        pass in all for a factorised decoder, which gives the same images.

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
    image_shape(model)  # Fails early, outside jit, on a model without its shape.
    factorised = model.decoder.num_layers == 0
    args = (model, variables, key, fixed.get("latents"), jnp.asarray(temperature, jnp.float32))
    if method == "fast" and not factorised:
        return _sample_fast(*args, num_samples=num_samples)
    return _sample_reference(*args, num_samples=num_samples, factorised=factorised)


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images ``model`` generates: ``model.image_hw`` and
    ``model.decoder.channels``, which every family of ``pvae_jax.models`` carries."""
    hw = getattr(model, "image_hw", None)
    channels = getattr(getattr(model, "decoder", None), "channels", None)
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
    latents = _latents(model, variables, latent_key, fixed_latents, temperature, num_samples)

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


def _latents(model, variables, key, fixed_latents, temperature, num_samples):
    """The prior's draw, or ``fixed_latents`` after checking they could have been it."""

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


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def _sample_fast(model, variables, key, fixed_latents, temperature, *, num_samples):
    """The activation-cache sampler: the reference's images, work per step bounded by
    the receptive field. Mirrors ``PixelDecoder``'s layers; tests hold it to the
    reference bit for bit."""
    N, (H, W, C) = num_samples, image_shape(model)
    dec = model.decoder
    num_levels, K, F = model.num_levels, logits_per_sub_pixel(model.num_levels), dec.features
    latent_key, pixel_key = jax.random.split(key)
    latents = _latents(model, variables, latent_key, fixed_latents, temperature, num_samples)
    cond_vector, cond_map = model.apply(variables, latents, method="decoder_conditioning")
    params = variables["params"]["decoder"]
    trunk = params["trunk"]
    P = max(dec.first_kernel_size, dec.kernel_size) // 2
    common = dict(num_groups=C, weight_norm=dec.weight_norm)
    L = dec.num_layers
    kernels = [dec.first_kernel_size] + [dec.kernel_size] * (L - 1)

    def cond(p):
        return _Cond(p, cond_vector, cond_map)

    # Arrays built here must have the sharding type of those computed from the
    # parameters (explicit-mesh, replicated, when they come from a train state), or
    # dynamic_update_slice refuses to mix them.
    sharding = jax.typeof(jax.tree.leaves(params)[0]).sharding

    def zeros(shape):
        return jnp.zeros(shape, jnp.float32, out_sharding=sharding)

    def cache(channels):
        return zeros((N, H + P, W + 2 * P, channels))

    if dec.gated:
        layers = []
        for li, k in enumerate(kernels):
            p = trunk["first" if li == 0 else f"block_{li - 1}"]["layer_0"]
            conv = dict(features=F, kernel_size=k, gated=True, **common)
            cin = C if li == 0 else F
            layers.append(dict(
                vertical=_Conv(pc.MaskedConv(stack="vertical", **conv), p["vertical"], cin, P),
                horizontal=_Conv(pc.MaskedConv(stack="horizontal", mask_type="A" if li == 0
                                               else "B", **conv), p["horizontal"], cin, P),
                h_out=_Conv(pc.MaskedConv(F, 1, "B", **common), p["h_out"], F, P),
                v_to_h=p["v_to_h"], cond_v=cond(p.get("cond_v")),
                cond_h=cond(p.get("cond_h"))))
        heads = [(_Conv(pc.MaskedConv(F, 1, "B", gated=True, **common), params[f"head_{i}"]
                        ["conv"], F, P), cond(params[f"head_{i}"].get("cond")))
                 for i in range(dec.num_head_layers)]
    else:
        layers = [dict(conv=_Conv(pc.MaskedConv(F, k, "A" if li == 0 else "B", **common),
                                  trunk[f"conv_{li}"], C if li == 0 else F, P),
                       cond=cond(trunk.get(f"cond_{li}")))
                  for li, k in enumerate(kernels)]
        heads = [_Conv(pc.MaskedConv(F, 1, "B", **common), params[f"head_{i}"], F, P)
                 for i in range(dec.num_head_layers)]
    out = _Conv(pc.MaskedConv(C * K, 1, "B", **common), params["out"], F, P)

    def v_to_h(layer, v_pre_NxWx2F):
        return v_pre_NxWx2F @ layer["v_to_h"]["kernel"] + layer["v_to_h"]["bias"]

    def pixel_logits(state, i, j, c):
        """Every layer at (i, j) with the image drawn so far; the logits of colour c."""
        caches = list(state["h"])
        h_cache = state["xs"]
        h = None
        for li, layer in enumerate(layers):
            if dec.gated:
                h_pre = layer["horizontal"].at(h_cache, i, j)
                h_pre = h_pre + jax.lax.dynamic_index_in_dim(state["vh"][li], j, 1, False)
                h_pre = h_pre + layer["cond_h"].at(i, j)
                h_new = layer["h_out"].pointwise(pc.gate(h_pre))
                if li > 0:  # The block's skip (the first block, mask 'A', has none).
                    h_new = h_new + h
            else:
                h_new = jax.nn.relu(layer["conv"].at(h_cache, i, j) + layer["cond"].at(i, j))
            h = h_new
            if li < L - 1:
                caches[li] = h_cache = _set(caches[li], h, i, j, P)
        for head in heads:
            if dec.gated:
                conv, head_cond = head
                h = pc.gate(conv.pointwise(h) + head_cond.at(i, j))
            else:
                h = jax.nn.relu(head.pointwise(h))
        # Only colour c's block of the output is needed: columns c*K .. (c+1)*K - 1.
        kernel_c = jax.lax.dynamic_slice_in_dim(out.kernel[0, 0], c * K, K, axis=1)
        logits = h @ kernel_c + jax.lax.dynamic_slice_in_dim(out.bias, c * K, K)
        return (logits[:, 0] if num_levels == 2 else logits), caches

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

    def step(state, s, i):
        j, c = s // C, s % C
        d = (i * W + j) * C + c
        logits_d, h_caches = pixel_logits(state, i, j, c)
        value = pixel_sample(jax.random.fold_in(pixel_key, d), logits_d, num_levels,
                             temperature).astype(jnp.uint8)
        x = state["x"].at[:, i, j, c].set(value)
        xs = state["xs"].at[:, i + P, j + P, c].set(scale_pixels(value, num_levels))
        return {**state, "x": x, "xs": xs, "h": h_caches}, None

    def row(state, i):
        state, _ = jax.lax.scan(lambda st, s: step(st, s, i), state, jnp.arange(W * C))
        if dec.gated:
            v_caches, vh = vertical_row(state, i)
            state = {**state, "v": v_caches, "vh": vh}
        return state, None

    state = {"x": zeros((N, H, W, C)).astype(jnp.uint8), "xs": cache(C),
             "h": [cache(F) for _ in range(L - 1)]}
    if dec.gated:
        # Row 0 sees shift_down's zeros: v_to_h of a zero row.
        zero_row = zeros((N, W, 2 * F))
        state["v"] = [cache(F) for _ in range(L - 1)]
        state["vh"] = [v_to_h(layer, zero_row) for layer in layers]
    state, _ = jax.lax.scan(row, state, jnp.arange(H))
    return state["x"]


GRID_VARY = ("none", "top", "pixel")


def check_vary(vary: str) -> None:
    """Raises ValueError unless ``vary`` is one of ``GRID_VARY``."""
    if vary == "middle":
        raise ValueError("--vary=middle needs a hierarchical model with a middle level of "
                         f"latents, which this version does not have; use one of {GRID_VARY}")
    if vary not in GRID_VARY:
        raise ValueError(f"--vary must be one of {GRID_VARY}, got {vary!r}")


def sample_grid(model, variables, key, num_samples, *, temperature=1.0, method="fast",
                vary="none"):
    """``num_samples`` images, ``vary`` choosing what changes across them (paper Fig. 6).

    ``vary``: 'none', independent samples (latents and pixel noise both vary); 'top',
    the latents vary and every image gets the same pixel noise; 'pixel', one latent
    draw for the whole grid and only the pixel noise varies. 'top' and 'pixel' need a
    model with latents.
    """
    check_vary(vary)
    if vary == "none":
        return sample(model, variables, key, num_samples, temperature=temperature,
                               method=method)

    def prior(n, k):
        return model.apply(variables, n, temperature, method="prior_sample",
                           rngs={"sample": k})

    if jax.eval_shape(lambda k: prior(1, k), key) is None:
        raise ValueError(f"--vary={vary} needs a model with latents; "
                         f"{type(model).__name__} has none, use --vary=none")
    latent_key, pixel_key = jax.random.split(key)
    if vary == "pixel":
        z = jax.tree.map(lambda a: jnp.repeat(a, num_samples, axis=0), prior(1, latent_key))
        return sample(model, variables, pixel_key, num_samples,
                               temperature=temperature, fixed={"latents": z}, method=method)
    # 'top': one image per latent draw, each with the same key, hence the same pixel noise.
    z = prior(num_samples, latent_key)

    def one(z_1):
        return sample(model, variables, pixel_key, 1, temperature=temperature,
                               fixed={"latents": z_1}, method=method)[0]

    return jax.vmap(one)(jax.tree.map(lambda a: a[:, None], z))
