"""Tests of the importance-weighted NLL, the evaluation summary and the k-NN classifier.

The IWAE properties are checked against the exact -log p(x) of a model with a 1-D
latent, integrated over z by quadrature: the bound of Burda et al. must lie between
it and the ELBO, tighten with more samples and reach it. To make those gaps large
enough to see, q(z|x) is pushed away from the true posterior (a shifted, narrow
Gaussian) and the decoder is made to depend strongly on z.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import tiny as tiny_config
from pvae_jax import distributions, evaluation, models, train

IMAGE_SHAPE = (4, 4, 1)
BATCH = 4


def _model_config(name, latent_dim=1):
    config = default.get_config().model
    config.name = name
    config.latent_dim = latent_dim
    config.encoder_features = (4, 8)
    config.pixel_features = 4
    config.num_pixel_layers = 1
    config.first_kernel_size = 3
    config.kernel_size = 3
    config.num_head_layers = 1
    return config


def _images(seed=0, batch=BATCH):
    return jax.random.bernoulli(jax.random.key(seed), 0.4, (batch, *IMAGE_SHAPE)).astype(
        jnp.uint8)


@functools.cache
def _built(name):
    model = models.build(_model_config(name), IMAGE_SHAPE, num_levels=2)
    variables = jax.jit(lambda k: model.init({"params": k, "sample": k}, _images()[:1]))(
        jax.random.key(42))
    if name != "pixelvae":
        return model, variables
    params = jax.tree.map(lambda a: a, variables["params"])
    # q(z|x) = N(2, 1) for every x, two standard deviations from the prior, so the
    # ELBO is about 2 nats loose; the weights' variance stays finite (q is as wide as
    # the posterior), so the bound converges within a few hundred samples.
    params["encoder"]["out"]["kernel"] = params["encoder"]["out"]["kernel"] * 0.0
    params["encoder"]["out"]["bias"] = jnp.array([2.0, 0.0])
    params["upsampler"]["in"]["kernel"] = params["upsampler"]["in"]["kernel"] * 4.0
    return model, {"params": params}


def _exact_nll(model, variables, x_BxHxWxC):
    """-log p(x) = -log int p(x|z) N(z; 0, 1) dz by the trapezoid rule on [-10, 10]."""
    z_Z = jnp.linspace(-10.0, 10.0, 4001)
    log_px_given_z = jax.jit(lambda v, x, z: model.apply(
        v, jnp.broadcast_to(x, (len(z), *x.shape)), z[:, None],
        method="conditional_log_prob").sum(axis=(1, 2, 3)))
    out = []
    for x in x_BxHxWxC:
        log_joint_Z = log_px_given_z(variables, x, z_Z) + distributions.gaussian_log_prob(
            0.0, 0.0, z_Z)
        log_dz = math.log(float(z_Z[1] - z_Z[0]))
        weights = jnp.ones_like(z_Z).at[0].set(0.5).at[-1].set(0.5)
        out.append(-(jax.nn.logsumexp(log_joint_Z, b=weights) + log_dz))
    return np.asarray(out)


def _log_weights(model, variables, x, key, num_samples):
    return model.apply(variables, x, num_samples, method="importance_log_weights",
                       rngs={"sample": key})


def test_one_sample_weight_is_the_elbo_of_the_same_z():
    model, variables = _built("pixelvae")
    x, key = _images(), jax.random.key(3)
    log_w_B = _log_weights(model, variables, x, key, 1)[:, 0]
    out = model.apply(variables, x, rngs={"sample": key})
    z_BxD = model.apply(variables, x, method="posterior_sample", rngs={"sample": key})
    mean, log_std = model.apply(variables, x, method="posterior")
    log_ratio_B = (distributions.gaussian_log_prob(0.0, 0.0, z_BxD)
                   - distributions.gaussian_log_prob(mean, log_std, z_BxD)).sum(-1)
    # Same key, same z: the one-sample log weight is -recon of __call__ plus the
    # single-sample estimate of -KL at that z.
    np.testing.assert_allclose(log_w_B, -out["recon"] + log_ratio_B, rtol=1e-5, atol=1e-4)
    # And iwae_nll with S = 1 is minus that weight (its chunk 0 uses fold_in(key, 0)).
    nll_B = evaluation.iwae_nll(model, variables, x, key, num_samples=1)
    expected = -_log_weights(model, variables, x, jax.random.fold_in(key, 0), 1)[:, 0]
    np.testing.assert_allclose(nll_B, expected, rtol=1e-6)


def test_one_sample_iwae_equals_the_closed_form_elbo_in_expectation():
    model, variables = _built("pixelvae")
    x = _images()
    neg_log_w_BxS = -_log_weights(model, variables, x, jax.random.key(5), 4000)
    # __call__'s loss has the KL in closed form; it is exact given z, so average it too.
    loss_B = np.mean([model.apply(variables, x, rngs={"sample": jax.random.key(i)})["loss"]
                      for i in range(50)], axis=0)
    mc_mean_B = neg_log_w_BxS.mean(1)
    stderr_B = neg_log_w_BxS.std(1) / math.sqrt(neg_log_w_BxS.shape[1])
    assert np.all(np.abs(mc_mean_B - loss_B) < 4 * stderr_B + 0.05), (mc_mean_B, loss_B)


def test_iwae_lies_between_exact_nll_and_elbo_and_tightens_with_more_samples():
    model, variables = _built("pixelvae")
    x = _images()
    exact_B = _exact_nll(model, variables, x)
    elbo_B = -np.asarray(_log_weights(model, variables, x, jax.random.key(7), 4000)).mean(1)
    # The construction must leave a real gap, or the ordering below says nothing.
    assert np.all(elbo_B - exact_B > 1.0), (elbo_B, exact_B)
    repeats = 50
    means, stderrs = {}, {}
    for k in (1, 10, 100, 1000):
        runs = np.stack([evaluation.iwae_nll(model, variables, x, jax.random.key(100 + r),
                                             num_samples=k, chunk_size=100)
                         for r in range(repeats)])
        means[k], stderrs[k] = runs.mean(0), runs.std(0) / math.sqrt(repeats)
        # Never above the ELBO beyond Monte Carlo noise, never below the exact NLL.
        assert np.all(means[k] <= elbo_B + 4 * stderrs[k] + 0.05), (k, means[k], elbo_B)
        assert np.all(means[k] >= exact_B - 4 * stderrs[k] - 0.05), (k, means[k], exact_B)
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        noise = 4 * np.hypot(stderrs[small], stderrs[large]) + 0.01
        assert np.all(means[large] <= means[small] + noise), (small, large, means)
    # Strictly tighter than the ELBO already at k = 10, and exact at k = 1000 up to its
    # bias (about Var(w) / (2 k E[w]^2) = (e^4 - 1) / 2000 < 0.03 nats here).
    assert np.all(means[10] < elbo_B - 0.5 - 4 * stderrs[10]), (means[10], elbo_B)
    np.testing.assert_allclose(means[1000], exact_B, atol=0.1)


def test_chunks_are_combined_by_log_sum_exp():
    model, variables = _built("pixelvae")
    x, key = _images(), jax.random.key(11)
    chunked_B = evaluation.iwae_nll(model, variables, x, key, num_samples=10, chunk_size=4)
    # Chunks of 4, 4 and 2 samples, drawn with fold_in(key, chunk index).
    log_w_BxS = jnp.concatenate(
        [_log_weights(model, variables, x, jax.random.fold_in(key, i), n)
         for i, n in enumerate((4, 4, 2))], axis=1)
    expected_B = math.log(10) - jax.nn.logsumexp(log_w_BxS, axis=1)
    np.testing.assert_allclose(chunked_B, expected_B, rtol=1e-6)
    unchunked_B = evaluation.iwae_nll(model, variables, x, key, num_samples=10,
                                      chunk_size=None)
    expected_B = math.log(10) - jax.nn.logsumexp(
        _log_weights(model, variables, x, jax.random.fold_in(key, 0), 10), axis=1)
    np.testing.assert_allclose(unchunked_B, expected_B, rtol=1e-6)


def test_chunked_and_unchunked_agree_in_distribution():
    model, variables = _built("pixelvae")
    x = _images()
    runs = {c: np.stack([evaluation.iwae_nll(model, variables, x, jax.random.key(r),
                                             num_samples=40, chunk_size=c)
                         for r in range(20)]) for c in (40, 8)}
    diff = runs[40].mean(0) - runs[8].mean(0)
    noise = 4 * np.hypot(runs[40].std(0), runs[8].std(0)) / math.sqrt(20) + 0.01
    assert np.all(np.abs(diff) < noise), (diff, noise)


def test_pixelcnn_iwae_is_its_exact_nll_for_any_sample_count():
    model, variables = _built("pixelcnn")
    x, key = _images(), jax.random.key(0)
    nll_B = model.apply(variables, x)["loss"]
    for num_samples, chunk in ((1, 1), (7, 3)):
        np.testing.assert_allclose(
            evaluation.iwae_nll(model, variables, x, key, num_samples, chunk), nll_B,
            rtol=1e-5)


@pytest.mark.parametrize("num_samples, chunk_size", [(0, 1), (5, 0), (2.5, 1)])
def test_iwae_rejects_bad_counts(num_samples, chunk_size):
    model, variables = _built("pixelcnn")
    with pytest.raises(ValueError, match="must be a positive int"):
        evaluation.iwae_nll(model, variables, _images(), jax.random.key(0), num_samples,
                            chunk_size)


def test_evaluate_reports_the_bound_split_and_iwae_on_the_requested_images():
    config = tiny_config.get_config("pixelvae")
    trainer = train.Trainer(config)
    state = trainer.init_state(jax.random.key(0))
    variables = {"params": state.ema_params, **state.model_state}
    result = evaluation.evaluate(trainer, variables, jax.random.key(1), iwae_samples=(1, 4),
                                 chunk_size=2, iwae_batch_size=6, num_images=13,
                                 progress=False)
    assert result["num_images"] == 13 and result["iwae_samples"] == 4
    np.testing.assert_allclose(result["recon_nats"] + result["kl_nats"],
                               result["nll_bound_nats"], rtol=1e-5)
    np.testing.assert_allclose(result["kl_level_0_nats"], result["kl_nats"], rtol=1e-6)
    assert result["iwae_nll_nats"] == result["iwae_nll_s4_nats"]
    dims = math.prod(trainer.info.image_shape)
    np.testing.assert_allclose(result["iwae_nll_bits_per_dim"],
                               result["iwae_nll_nats"] / (dims * math.log(2)), rtol=1e-9)
    np.testing.assert_allclose(result["bound_minus_iwae_nats"],
                               result["nll_bound_nats"] - result["iwae_nll_nats"], rtol=1e-6)
    assert "iwae_nll (S=4)" in evaluation.format_table(result)
    with pytest.raises(ValueError, match="num_images"):
        evaluation.evaluate(trainer, variables, jax.random.key(1), num_images=0)


def _knn_brute_force(train, labels, query, k):
    out = []
    for q in query:
        order = np.argsort(np.square(train - q).sum(1), kind="stable")[:k]
        counts = np.bincount(labels[order], minlength=labels.max() + 1)
        best = np.flatnonzero(counts == counts.max())
        # Tie: the class of the nearest neighbour among the tied classes.
        out.append(next(labels[i] for i in order if labels[i] in best))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_knn_matches_brute_force(k):
    rng = np.random.default_rng(k)
    train_pts, query = rng.normal(size=(300, 2)), rng.normal(size=(50, 2))
    labels = rng.integers(0, 5, 300)
    np.testing.assert_array_equal(
        evaluation.knn_predict(train_pts, labels, query, k, chunk_size=16),
        _knn_brute_force(train_pts, labels, query, k))


def test_knn_error_of_separated_clusters_and_bad_k():
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    points = centres[labels] + rng.normal(size=(120, 2))
    assert evaluation.knn_error(points, labels, points[::2] + 0.1, labels[::2], 5) == 0.0
    assert evaluation.knn_error(points, labels, points, (labels + 1) % 3, 1) == 1.0
    with pytest.raises(ValueError, match="k must be in"):
        evaluation.knn_predict(points, labels, points, 0)


def test_benchmark_iwae_reports_throughput_and_memory():
    config = tiny_config.get_config("pixelvae")
    result = evaluation.benchmark_iwae(config, num_images=2, chunk_size=4, num_samples=8,
                                       memory_num_samples=16, repeats=1)
    assert result["iwae_samples_per_sec"] > 0 and result["forward_images_per_sec"] > 0
    assert result["peak_rss_bytes_after"] >= result["peak_rss_bytes_before"] > 0
    assert result["chunk_temp_bytes"] is None or result["chunk_temp_bytes"] > 0
