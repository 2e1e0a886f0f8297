"""Output and latent distributions as pure jax.numpy functions.

Bernoulli and categorical likelihoods over sub-pixels, diagonal Gaussians for
latents, and the discretized logistic mixture of PixelCNN++ (Salimans et al.,
2017) for images with ``num_levels`` intensity levels.

Conventions:
  * Log-probabilities are in nats and elementwise: nothing is summed over pixels
    or channels here; the objectives do that.
  * Integer data (``x``) may arrive as uint8; it is widened before arithmetic.
  * Samples are int32. ``temperature`` scales the noise of a sampler, so 0 gives
    the deterministic limit without ever dividing by it, and it may be traced.
  * Gaussian scales are parameterised by their log standard deviation.

Logistic mixture parameter layout (last axis, length
``num_mixture_params(C, M)``), as four consecutive blocks:

  ``[ logit weights (M) | means (C*M) | log-scales (C*M) | coupling (C*(C-1)/2*M) ]``

Every block after the first is read as ``[C, M]`` (or ``[C*(C-1)/2, M]``),
channel-major: ``means[c * M + m]`` is the mean of channel c in component m.
Coupling rows are ordered (G<-R, B<-R, B<-G) for C = 3, i.e. by target channel,
then source channel, and pass through tanh before use.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# PixelCNN++ clamps log-scales from below: with narrower components a bin's mass
# comes entirely from a sliver of the density and the loss gradient explodes.
MIN_LOG_SCALE = -7.0

# A floor for the width of a bin in units of the logistic scale. Only reached when
# the two bin edges round to the same number (means around 1e7) or exp(-log_scale)
# underflows (log-scales above ~88); it keeps the log finite there instead of -inf.
_MIN_STANDARDISED_BIN_WIDTH = 1e-30


def _float_dtype(*arrays):
    """Compute dtype: at least float32, so uint8 or bf16 inputs do not lose precision."""
    return jnp.result_type(*[jnp.asarray(a).dtype for a in arrays], jnp.float32)


def _noise(sampler, key, shape, dtype):
    """Draws ``sampler(key, shape, dtype)`` as a flat vector, then reshapes it.

    With threefry_partitionable (the default) the values are identical to a direct
    draw, but XLA:CPU compiles the flat draw about 10x faster: a rank-5 draw took
    3-4 s to compile, its flat twin 0.3 s.
    """
    return sampler(key, (math.prod(shape),), dtype).reshape(shape)


# ----------------------------------------------------------------------------
# Bernoulli
# ----------------------------------------------------------------------------


def bernoulli_log_prob(logits, x):
    """Elementwise log p(x) of a Bernoulli with the given logits.

    Args:
      logits: Array of logits, log(p / (1 - p)), any shape.
      x: Integer array in {0, 1}, broadcastable against ``logits``.

    Returns:
      Array of log-probabilities (nats), the broadcast shape of the inputs.
    """
    dtype = _float_dtype(logits)
    # log p(x) = log sigmoid(s * logits) with s = +-1: one expression, so neither
    # branch can produce 0 * inf for extreme logits.
    sign = 2.0 * jnp.asarray(x).astype(dtype) - 1.0
    return jax.nn.log_sigmoid(sign * jnp.asarray(logits, dtype))


def bernoulli_sample(key, logits, temperature=1.0):
    """Samples from a Bernoulli; temperature divides the logits.

    Args:
      key: PRNG key.
      logits: Array of logits, any shape.
      temperature: Non-negative scalar. ``p = sigmoid(logits / temperature)``;
        0 returns ``bernoulli_mode(logits)``.

    Returns:
      int32 array in {0, 1} with the shape of ``logits``.
    """
    logits = jnp.asarray(logits, _float_dtype(logits))
    _check_temperature(temperature)
    # sigmoid(l / T) > u  <=>  l + T * logistic_noise > 0: no division, and T = 0
    # falls out as the mode.
    noise = _noise(jax.random.logistic, key, logits.shape, logits.dtype)
    return (logits + temperature * noise > 0).astype(jnp.int32)


def bernoulli_mode(logits):
    """Most probable value of a Bernoulli (1 where p > 1/2, ties go to 0).

    Args:
      logits: Array of logits, any shape.

    Returns:
      int32 array in {0, 1} with the shape of ``logits``.
    """
    return (jnp.asarray(logits) > 0).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Categorical
# ----------------------------------------------------------------------------


def categorical_log_prob(logits, x):
    """Log-probability of integer ``x`` under a categorical over the last axis.

    Args:
      logits: Array ``[..., K]`` of unnormalised log-probabilities, e.g.
        ``logits_BxHxWxCxK`` for K-way sub-pixels.
      x: Integer array ``[...]`` with values in ``[0, K)``.

    Returns:
      Array ``[...]`` of log-probabilities (nats).
    """
    logits = jnp.asarray(logits, _float_dtype(logits))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    index = jnp.asarray(x).astype(jnp.int32)[..., None]
    return jnp.take_along_axis(log_probs, index, axis=-1)[..., 0]


def categorical_sample(key, logits, temperature=1.0):
    """Samples a categorical over the last axis; temperature divides the logits.

    Args:
      key: PRNG key.
      logits: Array ``[..., K]``.
      temperature: Non-negative scalar. Probabilities are
        ``softmax(logits / temperature)``; 0 returns ``categorical_mode(logits)``.

    Returns:
      int32 array ``[...]`` with values in ``[0, K)``.
    """
    logits = jnp.asarray(logits, _float_dtype(logits))
    _check_temperature(temperature)
    # Gumbel-max with the noise scaled instead of the logits divided: the same
    # distribution for T > 0, the argmax at T = 0, and safe for a traced T.
    noise = _noise(jax.random.gumbel, key, logits.shape, logits.dtype)
    return jnp.argmax(logits + temperature * noise, axis=-1).astype(jnp.int32)


def categorical_mode(logits):
    """Most probable class over the last axis (the first one on ties).

    Args:
      logits: Array ``[..., K]``.

    Returns:
      int32 array ``[...]``.
    """
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Diagonal Gaussian (scales as log standard deviations)
# ----------------------------------------------------------------------------


def gaussian_sample(key, mean, log_std, temperature=1.0):
    """Reparameterised sample ``mean + temperature * exp(log_std) * eps``.

    Args:
      key: PRNG key.
      mean: Array of means.
      log_std: Array of log standard deviations, broadcastable against ``mean``.
      temperature: Scalar multiplying the standard deviation; 0 returns ``mean``.

    Returns:
      Array with the broadcast shape of ``mean`` and ``log_std``; differentiable in
      both.
    """
    dtype = _float_dtype(mean, log_std)
    mean = jnp.asarray(mean, dtype)
    log_std = jnp.asarray(log_std, dtype)
    shape = jnp.broadcast_shapes(mean.shape, log_std.shape)
    eps = _noise(jax.random.normal, key, shape, dtype)
    return mean + (temperature * eps) * jnp.exp(log_std)


def gaussian_log_prob(mean, log_std, z):
    """Elementwise log-density of ``z`` under N(mean, exp(log_std)^2).

    Args:
      mean: Array of means.
      log_std: Array of log standard deviations.
      z: Points, broadcastable against ``mean`` and ``log_std``.

    Returns:
      Array of log-densities (nats), the broadcast shape of the inputs.
    """
    dtype = _float_dtype(mean, log_std, z)
    log_std = jnp.asarray(log_std, dtype)
    # Multiplying by exp(-log_std) rather than dividing by exp(log_std) stays finite
    # when exp(log_std) underflows.
    standardised = (jnp.asarray(z, dtype) - jnp.asarray(mean, dtype)) * jnp.exp(-log_std)
    return -0.5 * jnp.square(standardised) - log_std - 0.5 * math.log(2.0 * math.pi)


def gaussian_kl(mean_q, log_std_q, mean_p, log_std_p):
    """Elementwise KL(q || p) between diagonal Gaussians, in closed form.

    Args:
      mean_q: Means of q.
      log_std_q: Log standard deviations of q.
      mean_p: Means of p.
      log_std_p: Log standard deviations of p.

    Returns:
      Array of KL divergences (nats, >= 0), the broadcast shape of the inputs.
    """
    dtype = _float_dtype(mean_q, log_std_q, mean_p, log_std_p)
    log_ratio = jnp.asarray(log_std_q, dtype) - jnp.asarray(log_std_p, dtype)
    scaled_diff = (jnp.asarray(mean_q, dtype) - jnp.asarray(mean_p, dtype)) * jnp.exp(
        -jnp.asarray(log_std_p, dtype)
    )
    # KL = 0.5 * (r^2 - 1 - log r^2 + d^2) with r = std_q / std_p. Written with
    # expm1, the variance term is a non-negative difference that does not cancel
    # catastrophically when q is close to p.
    return 0.5 * (jnp.expm1(2.0 * log_ratio) - 2.0 * log_ratio) + 0.5 * jnp.square(scaled_diff)


def standard_normal_kl(mean, log_std):
    """Elementwise KL(N(mean, exp(log_std)^2) || N(0, 1)).

    Args:
      mean: Means of q.
      log_std: Log standard deviations of q.

    Returns:
      Array of KL divergences (nats).
    """
    return gaussian_kl(mean, log_std, 0.0, 0.0)


# ----------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------


def nats_to_bits_per_dim(nats, num_dims):
    """Converts a negative log-likelihood in nats to bits per dimension.

    Args:
      nats: NLL in nats (per image, any shape).
      num_dims: Dimensions per image, H * W * C.

    Returns:
      ``nats / (num_dims * ln 2)``.
    """
    return nats / (num_dims * math.log(2.0))


# ----------------------------------------------------------------------------
# Discretized logistic mixture (PixelCNN++)
# ----------------------------------------------------------------------------


class LogisticMixtureParams(NamedTuple):
    """Unpacked mixture parameters; see the module docstring for the packed layout.

    Attributes:
      logit_weights: ``[..., M]`` unnormalised log mixture weights.
      means: ``[..., C, M]`` means on the [-1, 1] scale, before coupling.
      log_scales: ``[..., C, M]`` log-scales, clamped below at ``MIN_LOG_SCALE``.
      coupling: ``[..., C*(C-1)/2, M]`` coupling coefficients after tanh.
    """

    logit_weights: jax.Array
    means: jax.Array
    log_scales: jax.Array
    coupling: jax.Array


def _num_coupling(num_channels):
    return num_channels * (num_channels - 1) // 2


def _coupling_index(target, source):
    """Row of the coupling coefficient of ``source`` in the mean of ``target``."""
    return target * (target - 1) // 2 + source


def num_mixture_params(num_channels, num_mixtures):
    """Length of the last axis of logistic mixture parameters.

    Each component has a weight, a mean and a log-scale per channel, and one
    coupling coefficient per earlier channel of each channel: 10 * M for RGB
    (PixelCNN++), 3 * M for grayscale.

    Args:
      num_channels: Channels per pixel, C.
      num_mixtures: Mixture components, M.

    Returns:
      ``M * (1 + 2 * C + C * (C - 1) / 2)``.
    """
    if num_channels < 1 or num_mixtures < 1:
        raise ValueError(
            f"num_channels and num_mixtures must be positive, got {num_channels} and "
            f"{num_mixtures}."
        )
    return num_mixtures * (1 + 2 * num_channels + _num_coupling(num_channels))


def split_mixture_params(params, num_channels, num_mixtures):
    """Unpacks ``[..., P]`` logistic mixture parameters into their parts.

    Args:
      params: Array ``[..., P]`` with ``P = num_mixture_params(C, M)``.
      num_channels: Channels per pixel, C.
      num_mixtures: Mixture components, M.

    Returns:
      A ``LogisticMixtureParams`` with clamped log-scales and tanh'd coupling.

    Raises:
      ValueError: if the last axis of ``params`` has the wrong length.
    """
    _check_param_count(params, num_channels, num_mixtures)
    params = jnp.asarray(params)
    params = params.astype(_float_dtype(params))
    c, m = num_channels, num_mixtures
    lead = params.shape[:-1]
    k = _num_coupling(c)
    logit_weights = params[..., :m]
    means = params[..., m : m + c * m].reshape(*lead, c, m)
    log_scales = params[..., m + c * m : m + 2 * c * m].reshape(*lead, c, m)
    coupling = params[..., m + 2 * c * m :].reshape(*lead, k, m)
    return LogisticMixtureParams(
        logit_weights=logit_weights,
        means=means,
        # jnp.maximum passes no gradient below the floor, as in PixelCNN++.
        log_scales=jnp.maximum(log_scales, MIN_LOG_SCALE),
        coupling=jnp.tanh(coupling),
    )


def _rescale(x, num_levels, dtype):
    """Maps integer levels [0, L) to [-1, 1]."""
    return jnp.asarray(x).astype(dtype) * (2.0 / (num_levels - 1)) - 1.0


def _coupled_mean(parts, c, x_scaled):
    """Mean ``[..., M]`` of channel c given earlier rescaled values ``x_scaled[..., c']``."""
    mean = parts.means[..., c, :]
    for source in range(c):
        coeff = parts.coupling[..., _coupling_index(c, source), :]
        mean = mean + coeff * x_scaled[..., source, None]
    return mean


def _discretized_logistic_log_prob(x, mean, log_scale, num_levels):
    """log P(bin x) under one discretized logistic; broadcasts x against mean.

    Bin x covers [(2x - 1) / (L - 1) - 1, (2x + 1) / (L - 1) - 1] on the [-1, 1]
    scale; the two edge bins extend to -inf and +inf.
    """
    dtype = mean.dtype
    x = jnp.asarray(x).astype(jnp.int32)
    # Both edges come from the odd integers 2x +- 1 by the same float operations,
    # so bin x's upper edge is bitwise bin x+1's lower edge and the bins tile the
    # line exactly; that keeps the pmf normalised to float precision.
    upper = (2 * x + 1).astype(dtype) / (num_levels - 1) - 1.0
    lower = (2 * x - 1).astype(dtype) / (num_levels - 1) - 1.0
    inv_scale = jnp.exp(-log_scale)
    plus_in = inv_scale * (upper - mean)
    min_in = inv_scale * (lower - mean)
    # log(CDF(upper)) for the bottom bin, log(1 - CDF(lower)) for the top bin.
    log_cdf_upper = jax.nn.log_sigmoid(plus_in)
    log_sf_lower = jax.nn.log_sigmoid(-min_in)
    # Inner bins: sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)),
    # exact for a > b. In log space it neither cancels nor underflows, so the
    # PixelCNN++ fallback to the mid-bin density (an approximation used where the
    # CDF difference underflowed) is never needed. Every term is finite for finite
    # inputs, so the jnp.where below has no inf/NaN branch to poison gradients.
    width = jnp.maximum(plus_in - min_in, _MIN_STANDARDISED_BIN_WIDTH)
    log_inner = log_cdf_upper + log_sf_lower + jnp.log(-jnp.expm1(-width))
    return jnp.where(x <= 0, log_cdf_upper, jnp.where(x >= num_levels - 1, log_sf_lower, log_inner))


def _check_mixture_inputs(params, num_channels, num_mixtures, num_levels):
    if num_levels < 2:
        raise ValueError(f"num_levels must be at least 2, got {num_levels}.")
    _check_param_count(params, num_channels, num_mixtures)


def _check_param_count(params, num_channels, num_mixtures):
    expected = num_mixture_params(num_channels, num_mixtures)
    if jnp.shape(params)[-1] != expected:
        raise ValueError(
            f"Logistic mixture params have {jnp.shape(params)[-1]} entries on the last "
            f"axis; {num_channels} channel(s) with {num_mixtures} component(s) need "
            f"{expected} (see pvae_jax.distributions.num_mixture_params)."
        )


# The mixture functions are jitted internally: called eagerly (samplers, scripts,
# tests) they would otherwise dispatch and compile dozens of small ops one by one;
# inside an outer jit the inner one is simply inlined.
_jit_mixture = functools.partial(jax.jit, static_argnames=("num_mixtures", "num_levels"))
_jit_mixture_c = functools.partial(
    jax.jit, static_argnames=("num_channels", "num_mixtures", "num_levels")
)


def logistic_mixture_log_prob(params_BxHxWxP, x_BxHxWxC, num_mixtures, num_levels=256):
    """Per-sub-pixel conditional log-probabilities under a discretized logistic mixture.

    Channel c of the result is log p(x_c | x_<c) within the same pixel (R, then G
    given R, then B given R and G), so the result sums over channels to the joint
    log p(x) of the pixel and every entry is a normalised distribution over the
    ``num_levels`` values of its sub-pixel. With a mixture this conditional uses the
    posterior component weights given the earlier channels:
    ``logsumexp_m(log w_m + sum_{c'<=c} log p_m(x_c')) -
    logsumexp_m(log w_m + sum_{c'<c} log p_m(x_c'))``.

    Args:
      params_BxHxWxP: Mixture parameters, laid out as in the module docstring, with
        ``P = num_mixture_params(C, num_mixtures)``. Leading axes broadcast against
        those of ``x_BxHxWxC``.
      x_BxHxWxC: Integer image in ``[0, num_levels)`` (uint8 is fine).
      num_mixtures: Mixture components, M.
      num_levels: Intensity levels; values are rescaled to [-1, 1] with bin width
        ``2 / (num_levels - 1)``.

    Returns:
      Array ``[B, H, W, C]`` of log-probabilities (nats).

    Raises:
      ValueError: if P does not match C and M, or ``num_levels < 2``.
    """
    num_channels = jnp.shape(x_BxHxWxC)[-1]
    _check_mixture_inputs(params_BxHxWxP, num_channels, num_mixtures, num_levels)
    return _logistic_mixture_log_prob(
        params_BxHxWxP, x_BxHxWxC, num_mixtures=num_mixtures, num_levels=num_levels
    )


@_jit_mixture
def _logistic_mixture_log_prob(params_BxHxWxP, x_BxHxWxC, num_mixtures, num_levels):
    num_channels = x_BxHxWxC.shape[-1]
    lead = jnp.broadcast_shapes(params_BxHxWxP.shape[:-1], x_BxHxWxC.shape[:-1])
    params_BxHxWxP = jnp.broadcast_to(params_BxHxWxP, (*lead, params_BxHxWxP.shape[-1]))
    x_BxHxWxC = jnp.broadcast_to(x_BxHxWxC, (*lead, num_channels))
    parts = split_mixture_params(params_BxHxWxP, num_channels, num_mixtures)
    dtype = parts.means.dtype
    x_scaled = _rescale(x_BxHxWxC, num_levels, dtype)
    means_CxM = jnp.stack([_coupled_mean(parts, c, x_scaled) for c in range(num_channels)], axis=-2)
    component_lp_CxM = _discretized_logistic_log_prob(
        x_BxHxWxC[..., None], means_CxM, parts.log_scales, num_levels
    )
    # Log-likelihood of the channels before c under each component. An exclusive
    # cumsum built by shifting, not cumsum - lp: the subtraction would leak channel
    # c's own value into its weights through rounding (1e-4 nats at lp ~ -1e3).
    before_CxM = jnp.concatenate(
        [
            jnp.zeros_like(component_lp_CxM[..., :1, :]),
            jnp.cumsum(component_lp_CxM[..., :-1, :], axis=-2),
        ],
        axis=-2,
    )
    # Normalising per channel with log_softmax, rather than differencing two running
    # logsumexps, keeps each conditional normalised even when the joint is tiny.
    log_posterior_CxM = jax.nn.log_softmax(parts.logit_weights[..., None, :] + before_CxM, axis=-1)
    return jax.nn.logsumexp(log_posterior_CxM + component_lp_CxM, axis=-1)


def logistic_mixture_sample(
    key,
    params,
    num_channels,
    num_mixtures,
    temperature=1.0,
    *,
    mixture_temperature=1.0,
    num_levels=256,
):
    """Samples integer pixels from a discretized logistic mixture.

    Per pixel, one component is drawn from the mixture weights; then the channels
    are drawn in order from that component, each channel's mean coupled to the
    already-drawn (discretized) earlier channels, exactly the distribution scored by
    ``logistic_mixture_log_prob`` when both temperatures are 1.

    ``temperature`` T multiplies the logistic scales, i.e. adds 2 log T to every
    component's log-variance: Kolesnikov & Lampert's variance-reduction experiment
    (log-variance lowered by r) is ``T = exp(-r / 2)``. ``mixture_temperature``
    divides the mixture logits. ``temperature=0`` with ``mixture_temperature=1`` is
    their "MAP sampling": a random component, then that component's mode (the bin
    holding its mean). Both 0 picks the heaviest component's mode; for the most
    probable value of the mixture use ``logistic_mixture_mode``.

    Args:
      key: PRNG key.
      params: Array ``[B, H, W, P]`` of mixture parameters (module docstring).
      num_channels: Channels per pixel, C.
      num_mixtures: Mixture components, M.
      temperature: Non-negative scalar scaling the logistic noise.
      mixture_temperature: Non-negative scalar scaling the component choice noise.
      num_levels: Intensity levels.

    Returns:
      int32 array ``[B, H, W, C]`` in ``[0, num_levels)``.
    """
    _check_mixture_inputs(params, num_channels, num_mixtures, num_levels)
    _check_temperature(temperature)
    _check_temperature(mixture_temperature)
    return _logistic_mixture_sample(
        key,
        params,
        temperature,
        mixture_temperature,
        num_channels=num_channels,
        num_mixtures=num_mixtures,
        num_levels=num_levels,
    )


@_jit_mixture_c
def _logistic_mixture_sample(
    key, params, temperature, mixture_temperature, num_channels, num_mixtures, num_levels
):
    parts = split_mixture_params(params, num_channels, num_mixtures)
    dtype = parts.means.dtype
    lead = parts.logit_weights.shape[:-1]
    component_key, noise_key = jax.random.split(key)
    gumbel = _noise(jax.random.gumbel, component_key, parts.logit_weights.shape, dtype)
    component = jnp.argmax(parts.logit_weights + mixture_temperature * gumbel, axis=-1)
    # One-hot selection rather than a gather, so the same code serves every C.
    one_hot_M = jax.nn.one_hot(component, num_mixtures, dtype=dtype)
    noise_C = _noise(jax.random.logistic, noise_key, (*lead, num_channels), dtype)

    x_scaled = jnp.zeros((*lead, num_channels), dtype)
    samples = []
    for c in range(num_channels):
        mean = jnp.sum(_coupled_mean(parts, c, x_scaled) * one_hot_M, axis=-1)
        # Select the log-scale before exponentiating, so that an unchosen component
        # with a huge scale cannot contribute inf * 0.
        scale = jnp.exp(jnp.sum(parts.log_scales[..., c, :] * one_hot_M, axis=-1))
        y = mean + (temperature * noise_C[..., c]) * scale
        # Rounding to the nearest level is exactly the bin assignment of the
        # likelihood, and clipping sends both tails to the edge bins.
        level = jnp.clip(jnp.round((y + 1.0) * (0.5 * (num_levels - 1))), 0, num_levels - 1)
        level = level.astype(jnp.int32)
        samples.append(level)
        x_scaled = x_scaled.at[..., c].set(_rescale(level, num_levels, dtype))
    return jnp.stack(samples, axis=-1)


def logistic_mixture_mode(params, num_channels, num_mixtures, num_levels=256):
    """Most probable value of each sub-pixel, channel by channel (MAP decoding).

    For channel c, with the earlier channels already set to their modes, this
    evaluates the exact conditional pmf p(x_c | x_<c) of the mixture over all
    ``num_levels`` values and takes the argmax (lowest value on ties). This is
    greedy in channel order, not the joint argmax over the pixel, which would need
    ``num_levels ** C`` evaluations. Computing it exactly (rather than rounding a
    mean) matters for mixtures, whose mode need not be near any component mean.
    Memory stays O(B*H*W*M): the levels are scanned, not materialised.

    Args:
      params: Array ``[B, H, W, P]`` of mixture parameters (module docstring).
      num_channels: Channels per pixel, C.
      num_mixtures: Mixture components, M.
      num_levels: Intensity levels.

    Returns:
      int32 array ``[B, H, W, C]`` in ``[0, num_levels)``.
    """
    _check_mixture_inputs(params, num_channels, num_mixtures, num_levels)
    return _logistic_mixture_mode(
        params, num_channels=num_channels, num_mixtures=num_mixtures, num_levels=num_levels
    )


@_jit_mixture_c
def _logistic_mixture_mode(params, num_channels, num_mixtures, num_levels):
    parts = split_mixture_params(params, num_channels, num_mixtures)
    dtype = parts.means.dtype
    lead = parts.logit_weights.shape[:-1]
    x_scaled = jnp.zeros((*lead, num_channels), dtype)
    log_weights_M = parts.logit_weights
    modes = []
    for c in range(num_channels):
        mean_M = _coupled_mean(parts, c, x_scaled)
        log_scale_M = parts.log_scales[..., c, :]
        log_posterior_M = jax.nn.log_softmax(log_weights_M, axis=-1)

        def score(level, mean_M=mean_M, log_scale_M=log_scale_M, log_post=log_posterior_M):
            component_lp = _discretized_logistic_log_prob(level, mean_M, log_scale_M, num_levels)
            return jax.nn.logsumexp(log_post + component_lp, axis=-1)

        def body(level, carry, score=score):
            best_lp, best_level = carry
            lp = score(level)
            better = lp > best_lp
            return jnp.where(better, lp, best_lp), jnp.where(better, level, best_level)

        init = (score(jnp.int32(0)), jnp.zeros(lead, jnp.int32))
        _, mode = jax.lax.fori_loop(1, num_levels, body, init)
        modes.append(mode)
        x_scaled = x_scaled.at[..., c].set(_rescale(mode, num_levels, dtype))
        log_weights_M = log_weights_M + _discretized_logistic_log_prob(
            mode[..., None], mean_M, log_scale_M, num_levels
        )
    return jnp.stack(modes, axis=-1)


def _check_temperature(temperature):
    # A traced temperature cannot be checked; a Python number can.
    if isinstance(temperature, (int, float)) and temperature < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}.")
