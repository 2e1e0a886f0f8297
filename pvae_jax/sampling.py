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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pvae_jax.models.pixelcnn import pixel_sample

METHODS = ("reference",)
FIXED_KEYS = ("latents",)


def sample(
    model: nn.Module,
    variables: Mapping[str, Any],
    key: jax.Array,
    num_samples: int,
    *,
    temperature=1.0,
    fixed: Mapping[str, Any] | None = None,
    method: str = "reference",
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
      method: ``'reference'``: one full decoder pass per sub-pixel (one pass in all
        for a factorised decoder, which gives the same images). The ground truth
        faster samplers are checked against.

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
    return _sample_reference(
        model, variables, key, fixed.get("latents"), jnp.asarray(temperature, jnp.float32),
        num_samples=num_samples, factorised=model.decoder.num_layers == 0)


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

