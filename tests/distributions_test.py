"""Tests for pvae_jax.distributions: normalisation, sampling, closed forms, gradients."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pvae_jax import distributions as dist

TRANSFORMS = {"eager": lambda f: f, "jit": jax.jit}


def _chi_square_bound_ok(counts, probs):
    """Pearson chi-square goodness of fit of sample counts against probabilities.

    Cells expected to hold fewer than 5 samples are pooled (the chi-square
    approximation needs about 5 per cell). A correct sampler gives a statistic with
    mean dof and sd sqrt(2 dof); the bound dof + 6 sd + 5 is exceeded with
    probability below 2e-4 for every dof >= 1, while an off-by-one bin or a wrong
    temperature moves the statistic by thousands at these sample counts.
    """
    counts = np.asarray(counts, np.float64).ravel()
    probs = np.asarray(probs, np.float64).ravel()
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])
    dof = keep.sum() - 1
    bound = dof + 6 * math.sqrt(2 * dof) + 5
    return stat <= bound, f"chi2={stat:.1f} > {bound:.1f} (dof={dof})"


# ----------------------------------------------------------------------------
# Bernoulli
# ----------------------------------------------------------------------------


def test_bernoulli_normalised_and_finite_for_extreme_logits():
    logits = jnp.array([-1e4, -30.0, -2.0, 0.0, 0.7, 30.0, 1e4])
    lp0 = dist.bernoulli_log_prob(logits, jnp.zeros(logits.shape, jnp.int32))
    lp1 = dist.bernoulli_log_prob(logits, jnp.ones(logits.shape, jnp.uint8))
    chex.assert_tree_all_finite((lp0, lp1))
    np.testing.assert_allclose(jnp.exp(lp0) + jnp.exp(lp1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(lp1, -np.logaddexp(0.0, -np.asarray(logits)), rtol=1e-6)
    # The saturated side must be exactly -|logit|, not -inf or NaN.
    np.testing.assert_allclose(lp0[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(lp1[0], -1e4, rtol=1e-6)
    grads = jax.grad(lambda lg: dist.bernoulli_log_prob(lg, jnp.ones(7, jnp.int32)).sum())(logits)
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_bernoulli_sample_frequencies_match_probabilities(temperature):
    logits = jnp.array([-3.0, -0.5, 0.0, 1.0, 2.5])
    num = 100_000
    samples = dist.bernoulli_sample(
        jax.random.key(0), jnp.broadcast_to(logits, (num, 5)), temperature
    )
    chex.assert_type(samples, jnp.int32)
    assert set(np.unique(samples)) <= {0, 1}
    p = jax.nn.sigmoid(logits / temperature)
    freq = samples.mean(axis=0)
    # Binomial standard error sqrt(p(1-p)/n) <= 1.6e-3; 6 of them is a 1e-9 event.
    np.testing.assert_array_less(np.abs(freq - p), 6 * np.sqrt(p * (1 - p) / num) + 1e-9)


def test_bernoulli_temperature_zero_is_mode():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)) * 3, jnp.float32)
    np.testing.assert_array_equal(
        dist.bernoulli_sample(jax.random.key(2), logits, 0.0), dist.bernoulli_mode(logits)
    )
    np.testing.assert_array_equal(dist.bernoulli_mode(logits), np.asarray(logits) > 0)


# ----------------------------------------------------------------------------
# Categorical
# ----------------------------------------------------------------------------


def test_categorical_normalised_matches_reference_and_finite_for_extreme_logits():
    k = 6
    logits = np.array(
        [
            [0.3, -1.2, 2.0, 0.0, 0.5, -0.7],
            [1e4, -1e4, 0.0, 1e4, -3.0, 2.0],
            [-1e4, -1e4, -1e4, -1e4, -1e4, 1e4],
        ],
        np.float32,
    )
    values = jnp.broadcast_to(jnp.arange(k), (3, k))
    # Evaluate every class for every row: the layout of a [..., K] logits tensor.
    lp = dist.categorical_log_prob(jnp.asarray(logits)[:, None, :].repeat(k, 1), values)
    chex.assert_shape(lp, (3, k))
    chex.assert_tree_all_finite(lp)
    np.testing.assert_allclose(jnp.exp(lp).sum(-1), 1.0, rtol=1e-6)
    ref = logits - np.logaddexp.reduce(logits.astype(np.float64), axis=-1, keepdims=True)
    np.testing.assert_allclose(lp, ref, rtol=1e-6, atol=1e-5)
    grads = jax.grad(lambda lg: dist.categorical_log_prob(lg, jnp.array([1, 1, 0])).sum())(
        jnp.asarray(logits)
    )
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_categorical_sample_frequencies_match_probabilities(temperature):
    logits = jnp.array([0.0, 1.0, -1.0, 2.0, 0.5])
    num = 100_000
    samples = dist.categorical_sample(
        jax.random.key(3), jnp.broadcast_to(logits, (num, 5)), temperature
    )
    chex.assert_shape(samples, (num,))
    chex.assert_type(samples, jnp.int32)
    counts = np.bincount(np.asarray(samples), minlength=5)
    ok, msg = _chi_square_bound_ok(counts, jax.nn.softmax(logits / temperature))
    assert ok, msg


def test_categorical_temperature_zero_is_mode():
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4, 16)) * 2, jnp.float32)
    mode = dist.categorical_mode(logits)
    np.testing.assert_array_equal(dist.categorical_sample(jax.random.key(5), logits, 0.0), mode)
    np.testing.assert_array_equal(mode, np.argmax(np.asarray(logits), -1))


def test_negative_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        dist.categorical_sample(jax.random.key(0), jnp.zeros(3), -1.0)


# ----------------------------------------------------------------------------
# Diagonal Gaussian
# ----------------------------------------------------------------------------


def test_gaussian_log_prob_matches_density_formula_and_integrates_to_one():
    mean = np.array([0.0, 1.5, -2.0, 0.3], np.float32)
    log_std = np.array([0.0, -1.0, 0.7, -3.0], np.float32)
    z = np.array([0.4, 1.0, 3.0, 0.31], np.float32)
    std = np.exp(log_std.astype(np.float64))
    ref = np.log(np.exp(-0.5 * ((z - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi)))
    np.testing.assert_allclose(dist.gaussian_log_prob(mean, log_std, z), ref, rtol=1e-5)
    # Density over a fine grid, per dimension, must integrate to one.
    grid = np.linspace(-12.0, 12.0, 200_001)
    dens = np.exp(
        np.asarray(
            dist.gaussian_log_prob(mean, log_std, grid[:, None].astype(np.float32)), np.float64
        )
    )
    np.testing.assert_allclose(dens.sum(0) * (grid[1] - grid[0]), 1.0, rtol=1e-5)


def test_gaussian_sample_moments_temperature_and_reparameterisation():
    mean = jnp.array([0.5, -2.0, 10.0])
    log_std = jnp.array([0.0, -2.0, 1.0])
    num = 200_000
    for temperature in (1.0, 0.3):
        z = dist.gaussian_sample(
            jax.random.key(6), jnp.broadcast_to(mean, (num, 3)), log_std, temperature
        )
        chex.assert_shape(z, (num, 3))
        std = temperature * np.exp(log_std)
        # Standard errors: std/sqrt(n) for the mean, about std/sqrt(2n) for the std.
        np.testing.assert_array_less(np.abs(z.mean(0) - mean), 6 * std / np.sqrt(num))
        np.testing.assert_array_less(np.abs(z.std(0) - std), 6 * std / np.sqrt(2 * num))
    np.testing.assert_array_equal(dist.gaussian_sample(jax.random.key(7), mean, log_std, 0.0), mean)
    key = jax.random.key(8)
    eps = dist.gaussian_sample(key, jnp.zeros(3), jnp.zeros(3))
    d_mean, d_log_std = jax.grad(
        lambda m, s: dist.gaussian_sample(key, m, s).sum(), argnums=(0, 1)
    )(mean, log_std)
    np.testing.assert_allclose(d_mean, 1.0)
    np.testing.assert_allclose(d_log_std, eps * jnp.exp(log_std), rtol=1e-6)


def test_gaussian_kl_matches_monte_carlo():
    mean_q = jnp.array([0.0, 1.0, -0.5, 2.0])
    log_std_q = jnp.array([0.0, -0.5, 0.3, -1.0])
    mean_p = jnp.array([0.5, 0.0, -0.5, 1.0])
    log_std_p = jnp.array([0.2, 0.0, -0.4, 0.5])
    num = 200_000
    z = dist.gaussian_sample(jax.random.key(9), jnp.broadcast_to(mean_q, (num, 4)), log_std_q)
    log_ratio = np.asarray(
        dist.gaussian_log_prob(mean_q, log_std_q, z) - dist.gaussian_log_prob(mean_p, log_std_p, z),
        np.float64,
    )
    mc = log_ratio.mean(0)
    # Monte Carlo standard error = sample std of log q/p over sqrt(n), here ~2e-3
    # per dimension; 6 standard errors fail by chance with probability ~1e-9.
    std_err = log_ratio.std(0) / np.sqrt(num)
    kl = dist.gaussian_kl(mean_q, log_std_q, mean_p, log_std_p)
    chex.assert_shape(kl, (4,))
    np.testing.assert_array_less(np.abs(mc - np.asarray(kl)), 6 * std_err)


def test_gaussian_kl_zero_on_equal_and_nonnegative():
    shape = (1000,)
    mean_q, log_std_q, mean_p, log_std_p = jnp.asarray(
        np.random.default_rng(10).normal(size=(4, *shape)) * [[5], [3], [5], [3]], jnp.float32
    )
    np.testing.assert_array_equal(dist.gaussian_kl(mean_q, log_std_q, mean_q, log_std_q), 0.0)
    kl = dist.gaussian_kl(mean_q, log_std_q, mean_p, log_std_p)
    chex.assert_tree_all_finite(kl)
    assert np.all(np.asarray(kl) >= 0)
    # Reference: the textbook formula in float64.
    sq, sp = np.exp(np.asarray(log_std_q, np.float64)), np.exp(np.asarray(log_std_p, np.float64))
    dm = np.asarray(mean_q, np.float64) - np.asarray(mean_p, np.float64)
    ref = np.log(sp / sq) + (sq**2 + dm**2) / (2 * sp**2) - 0.5
    np.testing.assert_allclose(kl, ref, rtol=1e-4, atol=1e-5)
    # Nearly equal scales: KL ~ delta^2, which the textbook form in float32 loses to
    # rounding (absolute error ~6e-8) and can even make negative.
    delta = jnp.logspace(-6, -2, 50, dtype=jnp.float32)
    for sign in (1.0, -1.0):
        near = np.asarray(dist.gaussian_kl(0.0, sign * delta, 0.0, 0.0), np.float64)
        assert np.all(near >= 0)
        # Error allowance: a few float32 ulps of the O(delta) terms, plus the
        # O(delta^3) term that delta^2 leaves out.
        eps = np.finfo(np.float32).eps
        np.testing.assert_array_less(np.abs(near - delta**2), 4 * eps * delta + 2 * delta**3)
    np.testing.assert_allclose(
        dist.standard_normal_kl(mean_q, log_std_q),
        dist.gaussian_kl(mean_q, log_std_q, jnp.zeros(shape), jnp.zeros(shape)),
    )


def test_nats_to_bits_per_dim():
    # A uniform distribution over 256 levels costs exactly 8 bits per dimension.
    num_dims = 32 * 32 * 3
    np.testing.assert_allclose(
        dist.nats_to_bits_per_dim(num_dims * math.log(256), num_dims), 8.0, rtol=1e-12
    )


# ----------------------------------------------------------------------------
# Discretized logistic mixture
# ----------------------------------------------------------------------------


def _pack(logits_M, means_CxM, log_scales_CxM, coupling_KxM):
    """Packs per-part arrays into the layout documented in the module docstring."""
    lead = logits_M.shape[:-1]
    return np.concatenate(
        [
            logits_M,
            means_CxM.reshape(*lead, -1),
            log_scales_CxM.reshape(*lead, -1),
            coupling_KxM.reshape(*lead, -1),
        ],
        axis=-1,
    ).astype(np.float32)


def _random_params(rng, lead, num_channels, num_mixtures, mean=None, log_scale=None):
    c, m = num_channels, num_mixtures
    k = c * (c - 1) // 2
    means = (
        rng.uniform(-1.2, 1.2, (*lead, c, m))
        if mean is None
        else (mean + 0.05 * rng.normal(size=(*lead, c, m)))
    )
    log_scales = (
        rng.uniform(-4.5, -0.5, (*lead, c, m))
        if log_scale is None
        else np.full((*lead, c, m), log_scale)
    )
    return _pack(
        rng.normal(size=(*lead, m)) * 2,
        means,
        log_scales,
        rng.normal(size=(*lead, k, m)) * 2,
    )


# Means far outside [-1, 1] and log-scales far below the clamp and well above 0.
EXTREME_CASES = list(itertools.product([-30.0, -1.5, 0.0, 0.997, 30.0], [-20.0, -7.0, -3.0, 5.0]))


def _reference_log_probs(params, x, num_mixtures, num_levels=256):
    """Float64 textbook PixelCNN++ likelihood, written from the documented layout.

    Returns per-channel conditionals [..., C] and the joint [...].
    """
    params = np.asarray(params, np.float64)
    x = np.asarray(x, np.int64)
    c_num, m = x.shape[-1], num_mixtures
    lead = x.shape[:-1]
    log_w = params[..., :m]
    log_w = log_w - np.logaddexp.reduce(log_w, axis=-1, keepdims=True)
    means = params[..., m : m + c_num * m].reshape(*lead, c_num, m)
    log_s = np.maximum(params[..., m + c_num * m : m + 2 * c_num * m], -7.0)
    log_s = log_s.reshape(*lead, c_num, m)
    coupling = np.tanh(params[..., m + 2 * c_num * m :]).reshape(*lead, -1, m)
    xs = 2.0 * x / (num_levels - 1) - 1.0
    half = 1.0 / (num_levels - 1)
    sigmoid = lambda t: 1.0 / (1.0 + np.exp(-t))
    row = 0
    cum = log_w
    prev_lse = np.zeros(lead)
    conditionals = []
    for c in range(c_num):
        mean = means[..., c, :].copy()
        for source in range(c):  # rows ordered by target, then source: (G<-R, B<-R, B<-G)
            mean += coupling[..., row, :] * xs[..., source, None]
            row += 1
        s = np.exp(log_s[..., c, :])
        xc = x[..., c, None]
        t_up = (xs[..., c, None] + half - mean) / s
        t_lo = (xs[..., c, None] - half - mean) / s
        # Right of the mean, difference survival functions: 1 - F would round to 0.
        right = t_lo > 0
        mass = np.where(right, sigmoid(-t_lo) - sigmoid(-t_up), sigmoid(t_up) - sigmoid(t_lo))
        mass = np.where(xc == 0, sigmoid(t_up), mass)
        mass = np.where(xc == num_levels - 1, sigmoid(-t_lo), mass)
        cum = cum + np.log(mass)
        lse = np.logaddexp.reduce(cum, axis=-1)
        conditionals.append(lse - prev_lse)
        prev_lse = lse
    return np.stack(conditionals, -1), prev_lse


def test_num_mixture_params():
    for m in (1, 5, 10):
        assert dist.num_mixture_params(3, m) == 10 * m
        assert dist.num_mixture_params(1, m) == 3 * m
    with pytest.raises(ValueError):
        dist.num_mixture_params(0, 3)


@pytest.mark.parametrize("num_channels,num_mixtures", [(1, 1), (1, 4), (3, 1), (3, 5)])
def test_logistic_mixture_matches_float64_reference(num_channels, num_mixtures):
    rng = np.random.default_rng(11)
    params = _random_params(rng, (4, 3, 2), num_channels, num_mixtures)
    x = rng.integers(0, 256, (4, 3, 2, num_channels))
    x[0, 0, 0] = 0  # both edge bins, in every channel
    x[0, 0, 1] = 255
    lp = dist.logistic_mixture_log_prob(params, x, num_mixtures)
    chex.assert_shape(lp, x.shape)
    ref_cond, ref_joint = _reference_log_probs(params, x, num_mixtures)
    np.testing.assert_allclose(lp, ref_cond, rtol=1e-4, atol=2e-4)
    # The conditionals telescope to the joint log-probability of each pixel.
    np.testing.assert_allclose(lp.sum(-1), ref_joint, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("num_channels,num_mixtures", [(1, 1), (1, 3), (3, 1), (3, 4)])
def test_logistic_mixture_conditionals_normalised_even_for_extreme_params(
    num_channels, num_mixtures
):
    rng = np.random.default_rng(12)
    params = np.stack(
        [
            _random_params(rng, (), num_channels, num_mixtures, mean=mu, log_scale=ls)
            for mu, ls in EXTREME_CASES
        ]
        + [_random_params(rng, (), num_channels, num_mixtures) for _ in range(6)]
    )  # [G, P]
    g = params.shape[0]
    levels = np.arange(256)
    for c in range(num_channels):
        # Other channels fixed at random values, channel c swept over all levels.
        x = np.broadcast_to(rng.integers(0, 256, (g, 1, num_channels)), (g, 256, num_channels))
        x = x.copy()
        x[..., c] = levels
        lp = dist.logistic_mixture_log_prob(params[:, None, :], x, num_mixtures)
        chex.assert_tree_all_finite(lp)
        np.testing.assert_allclose(jnp.exp(lp[..., c]).sum(-1), 1.0, atol=1e-5)
        # Within a pixel, channel c's conditional ignores every later channel.
        later = x.copy()
        later[..., c + 1 :] = 255 - later[..., c + 1 :]
        lp_later = dist.logistic_mixture_log_prob(params[:, None, :], later, num_mixtures)
        np.testing.assert_array_equal(lp_later[..., : c + 1], lp[..., : c + 1])


def test_logistic_mixture_joint_normalised_over_all_pixels_few_levels():
    # With 4 levels an RGB pixel has 64 values: the joint (sum of conditionals)
    # must sum to one over all of them, which checks the coupling as a whole.
    num_levels, m = 4, 3
    rng = np.random.default_rng(13)
    params = _random_params(rng, (5,), 3, m)
    pixels = np.array(list(itertools.product(range(num_levels), repeat=3)))  # [64, 3]
    lp = dist.logistic_mixture_log_prob(params[:, None, :], pixels[None], m, num_levels)
    np.testing.assert_allclose(jnp.exp(lp.sum(-1)).sum(-1), 1.0, atol=1e-5)
    _, ref_joint = _reference_log_probs(
        np.broadcast_to(params[:, None, :], (5, 64, params.shape[-1])),
        np.broadcast_to(pixels, (5, 64, 3)),
        m,
        num_levels,
    )
    np.testing.assert_allclose(lp.sum(-1), ref_joint, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("num_channels", [1, 3])
def test_logistic_mixture_gradients_finite_at_edges_and_extremes(num_channels):
    m = 3
    rng = np.random.default_rng(14)
    params = np.stack(
        [
            _random_params(rng, (), num_channels, m, mean=mu, log_scale=ls)
            for mu, ls in EXTREME_CASES
        ]
    )
    # Weight logits of +-50 too: a component with vanishing weight.
    params[::2, 0] = 50.0
    params[1::2, 1] = -50.0
    x = np.stack(
        [np.zeros(num_channels), np.full(num_channels, 255), rng.integers(0, 256, num_channels)]
    ).astype(np.int32)  # [3, C]
    loss = lambda p: dist.logistic_mixture_log_prob(p[:, None, :], x[None], m).sum()
    value, grads = jax.value_and_grad(loss)(jnp.asarray(params))
    chex.assert_tree_all_finite((value, grads))
    assert np.abs(np.asarray(grads)).sum() > 0


def test_logistic_mixture_uint8_input_matches_int32():
    rng = np.random.default_rng(15)
    params = _random_params(rng, (2, 3), 3, 2)
    x = rng.integers(0, 256, (2, 3, 3))
    x[0, 0] = 255  # 2 * 255 + 1 overflows uint8 arithmetic
    np.testing.assert_array_equal(
        dist.logistic_mixture_log_prob(params, x.astype(np.uint8), 2),
        dist.logistic_mixture_log_prob(params, x.astype(np.int32), 2),
    )


def test_logistic_mixture_rejects_wrong_param_count():
    with pytest.raises(ValueError, match="num_mixture_params"):
        dist.logistic_mixture_log_prob(jnp.zeros((1, 2, 2, 29)), jnp.zeros((1, 2, 2, 3)), 3)
    with pytest.raises(ValueError, match="num_levels"):
        dist.logistic_mixture_log_prob(jnp.zeros((1, 3)), jnp.zeros((1, 1)), 1, num_levels=1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logistic_sample_histogram_matches_pmf_single_component(temperature):
    # Mean near the top edge so the tail bin 255 holds real mass.
    mean, log_scale = 0.93, -3.5
    params = jnp.array([0.0, mean, log_scale])
    num = 200_000
    samples = dist.logistic_mixture_sample(
        jax.random.key(16), jnp.broadcast_to(params, (num, 1, 1, 3)), 1, 1, temperature
    )
    chex.assert_shape(samples, (num, 1, 1, 1))
    counts = np.bincount(np.asarray(samples).ravel(), minlength=256)
    assert counts[255] > 1000
    # Temperature T multiplies the logistic scale: log-scale + log T.
    scaled = jnp.array([0.0, mean, log_scale + math.log(temperature)])
    pmf = jnp.exp(dist.logistic_mixture_log_prob(scaled[None], jnp.arange(256)[:, None], 1))
    ok, msg = _chi_square_bound_ok(counts, pmf)
    assert ok, msg


def test_logistic_sample_joint_histogram_matches_pmf_rgb_mixture():
    # 4 levels: 64 RGB values, so the coupled joint can be checked cell by cell.
    num_levels, m = 4, 3
    params = _random_params(np.random.default_rng(17), (), 3, m)
    num = 200_000
    samples = dist.logistic_mixture_sample(
        jax.random.key(18),
        jnp.broadcast_to(params, (num, 1, 1, params.shape[-1])),
        3,
        m,
        num_levels=num_levels,
    )
    assert samples.min() >= 0 and samples.max() < num_levels
    flat = np.asarray(samples).reshape(num, 3) @ np.array([16, 4, 1])
    counts = np.bincount(flat, minlength=64)
    pixels = np.array(list(itertools.product(range(num_levels), repeat=3)))
    pmf = jnp.exp(dist.logistic_mixture_log_prob(params[None], pixels, m, num_levels).sum(-1))
    ok, msg = _chi_square_bound_ok(counts, pmf)
    assert ok, msg


def test_logistic_sample_zero_temperature():
    rng = np.random.default_rng(19)
    m = 4
    params = jnp.asarray(_random_params(rng, (2, 3, 3), 3, m))
    parts = dist.split_mixture_params(params, 3, m)
    # Both temperatures 0: the heaviest component's coupled mean, rounded.
    greedy = dist.logistic_mixture_sample(
        jax.random.key(0), params, 3, m, 0.0, mixture_temperature=0.0
    )
    np.testing.assert_array_equal(
        greedy,
        dist.logistic_mixture_sample(jax.random.key(1), params, 3, m, 0.0, mixture_temperature=0.0),
    )
    best = np.argmax(np.asarray(parts.logit_weights), -1)
    pick = lambda a: np.take_along_axis(np.asarray(a), best[..., None, None], -1)[..., 0]
    means, coupling = pick(parts.means), pick(parts.coupling)
    xs = 2.0 * np.asarray(greedy) / 255 - 1
    coupled = means + np.stack(
        [
            np.zeros_like(xs[..., 0]),
            coupling[..., 0] * xs[..., 0],
            coupling[..., 1] * xs[..., 0] + coupling[..., 2] * xs[..., 1],
        ],
        -1,
    )
    np.testing.assert_array_equal(greedy, np.clip(np.round((coupled + 1) * 127.5), 0, 255))
    # MAP sampling of Kolesnikov & Lampert: random component, then its mode.
    map_samples = dist.logistic_mixture_sample(jax.random.key(2), params, 3, m, 0.0)
    chex.assert_type(map_samples, jnp.int32)


@pytest.mark.parametrize("num_channels,num_mixtures", [(1, 3), (3, 1), (3, 4)])
def test_logistic_mode_is_argmax_of_exact_conditional_pmf(num_channels, num_mixtures):
    rng = np.random.default_rng(20)
    params = np.concatenate(
        [
            _random_params(rng, (8,), num_channels, num_mixtures),
            np.stack(
                [
                    _random_params(rng, (), num_channels, num_mixtures, mean=mu, log_scale=ls)
                    for mu, ls in EXTREME_CASES
                ]
            ),
        ]
    )  # [G, P]
    mode = np.asarray(dist.logistic_mixture_mode(params, num_channels, num_mixtures))
    g = params.shape[0]
    chex.assert_shape(mode, (g, num_channels))
    for c in range(num_channels):
        # Earlier channels at their modes, channel c swept over every level.
        x = np.broadcast_to(mode[:, None, :], (g, 256, num_channels)).copy()
        x[..., c] = np.arange(256)
        lp = np.asarray(dist.logistic_mixture_log_prob(params[:, None, :], x, num_mixtures))[..., c]
        chosen = lp[np.arange(g), mode[:, c]]
        # Ties or float noise between equally likely levels may pick either.
        np.testing.assert_array_less(lp.max(-1) - chosen, 1e-5)


# ----------------------------------------------------------------------------
# Shapes and dtypes, eager and jitted
# ----------------------------------------------------------------------------


B, H, W, C, K, M = 2, 3, 4, 3, 5, 2


def _call_everything(key, logits_BxHxWxC, logits_BxHxWxCxK, x_BxHxWxC, z_Bxd, params_BxHxWxP):
    """Every public function once, so one jit compiles them all together."""
    return {
        "bernoulli_log_prob": dist.bernoulli_log_prob(logits_BxHxWxC, x_BxHxWxC),
        "categorical_log_prob": dist.categorical_log_prob(logits_BxHxWxCxK, x_BxHxWxC),
        "logistic_mixture_log_prob": dist.logistic_mixture_log_prob(params_BxHxWxP, x_BxHxWxC, M),
        "bernoulli_sample": dist.bernoulli_sample(key, logits_BxHxWxC, 0.7),
        "bernoulli_mode": dist.bernoulli_mode(logits_BxHxWxC),
        "categorical_sample": dist.categorical_sample(key, logits_BxHxWxCxK, 0.7),
        "categorical_mode": dist.categorical_mode(logits_BxHxWxCxK),
        "logistic_mixture_sample": dist.logistic_mixture_sample(key, params_BxHxWxP, C, M, 0.8),
        "logistic_mixture_mode": dist.logistic_mixture_mode(params_BxHxWxP, C, M),
        "gaussian_sample": dist.gaussian_sample(key, z_Bxd, z_Bxd, 0.5),
        "gaussian_log_prob": dist.gaussian_log_prob(z_Bxd, z_Bxd, z_Bxd),
        "gaussian_kl": dist.gaussian_kl(z_Bxd, z_Bxd, z_Bxd, z_Bxd),
        "standard_normal_kl": dist.standard_normal_kl(z_Bxd, z_Bxd),
    }


@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=list(TRANSFORMS))
def test_shapes_and_dtypes(transform):
    rng = np.random.default_rng(21)
    out = TRANSFORMS[transform](_call_everything)(
        jax.random.key(21),
        jnp.zeros((B, H, W, C)),
        jnp.asarray(rng.normal(size=(B, H, W, C, K)), jnp.float32),
        jnp.asarray(rng.integers(0, 2, (B, H, W, C)), jnp.uint8),
        jnp.zeros((B, 7)),
        jnp.asarray(rng.normal(size=(B, H, W, dist.num_mixture_params(C, M))), jnp.float32),
    )
    assert set(out) == {
        name
        for name in dir(dist)
        if name.startswith(
            ("bernoulli_", "categorical_", "gaussian_", "standard_", "logistic_mixture_")
        )
    }
    for name in ("bernoulli_log_prob", "categorical_log_prob", "logistic_mixture_log_prob"):
        chex.assert_shape(out[name], (B, H, W, C))
        chex.assert_type(out[name], jnp.float32)
    for name in ("gaussian_sample", "gaussian_log_prob", "gaussian_kl", "standard_normal_kl"):
        chex.assert_shape(out[name], (B, 7))
        chex.assert_type(out[name], jnp.float32)
    for name in (
        "bernoulli_sample",
        "bernoulli_mode",
        "categorical_sample",
        "categorical_mode",
        "logistic_mixture_sample",
        "logistic_mixture_mode",
    ):
        chex.assert_shape(out[name], (B, H, W, C))
        chex.assert_type(out[name], jnp.int32)
    chex.assert_tree_all_finite(out)
    assert (
        0
        <= int(out["logistic_mixture_sample"].min())
        <= int(out["logistic_mixture_sample"].max())
        <= 255
    )
    assert int(out["categorical_sample"].max()) < K
