"""The hierarchical PixelVAE (appendix E.2) and its configs.

Full-size models are checked by ``jax.eval_shape`` only (shapes and parameter counts,
no compile); the properties (causality, normalisation, loss bookkeeping, learning)
on the tiny-width variant at 16x16, where two levels of two 'd' blocks each put z1
at 4x4 and h2 at 1x1.
"""

import functools
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from configs import imagenet64, lsun32, lsun64
from pvae_jax import models, train

_fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TINY_SHAPE = (16, 16, 3)
KEY = jax.random.key(0)


def _init_shapes(model, shape, batch=2):
    x = jnp.zeros((batch, *shape), jnp.uint8)
    return jax.eval_shape(lambda: model.init({"params": KEY, "sample": KEY}, x))


@pytest.mark.parametrize("get_config, shape, latent_shapes, num_params", [
    (imagenet64.get_config, (64, 64, 3), [(16, 16, 64), (512,)], 206_556_800),
    (lsun64.get_config, (64, 64, 3), [(16, 16, 64), (512,)], 206_556_800),
    (lsun32.get_config, (32, 32, 3), [(8, 8, 64), (512,)], 197_113_472),
])
def test_full_size_shapes_and_parameter_counts(get_config, shape, latent_shapes, num_params):
    config = get_config()
    model = models.build(config.model, shape)
    assert model.latent_shapes() == latent_shapes
    variables = _init_shapes(model, shape)
    assert sum(math.prod(a.shape) for a in jax.tree.leaves(variables["params"])) == num_params
    x = jax.ShapeDtypeStruct((2, *shape), jnp.uint8)
    rngs = {"sample": KEY}
    z = jax.eval_shape(lambda v, x: model.apply(v, x, method="posterior_sample", rngs=rngs),
                       variables, x)
    assert [a.shape for a in z] == [(2, *s) for s in latent_shapes]
    logits = jax.eval_shape(lambda v, x, z: model.apply(v, x, z, method="logits"),
                            variables, x, z)
    assert logits.shape == (2, *shape, 256)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, rngs=rngs), variables, x)
    assert {k: a.shape for k, a in out.items()} == {
        "loss": (2,), "recon": (2,), "kl": (2,), "kl_levels": (2, 2)}


@pytest.fixture(scope="module")
def tiny():
    config = imagenet64.get_config("tiny")
    model = models.build(config.model, TINY_SHAPE)
    x = jnp.zeros((2, *TINY_SHAPE), jnp.uint8)
    variables = _fast_jit(lambda: model.init({"params": KEY, "sample": KEY}, x))()
    images = jax.random.randint(jax.random.key(1), (2, *TINY_SHAPE), 0, 256).astype(jnp.uint8)
    latents = _fast_jit(lambda v, x: model.apply(v, x, method="posterior_sample",
                                                 rngs={"sample": KEY}))(variables, images)
    return model, variables, images, latents


def test_loss_is_recon_plus_kl_levels(tiny):
    model, variables, images, _ = tiny

    @_fast_jit
    def run(weight):
        return model.apply(variables, images, kl_weight=weight, rngs={"sample": KEY})

    out = run(jnp.float32(1.0))
    np.testing.assert_allclose(out["loss"], out["recon"] + out["kl_levels"].sum(-1), rtol=1e-6)
    np.testing.assert_allclose(out["kl"], out["kl_levels"].sum(-1), rtol=1e-6)
    assert np.all(np.asarray(out["kl_levels"]) > 0)
    weighted = run(jnp.array([0.25, 0.5], jnp.float32))
    np.testing.assert_allclose(
        weighted["loss"],
        out["recon"] + 0.25 * out["kl_levels"][:, 0] + 0.5 * out["kl_levels"][:, 1], rtol=1e-6)


def test_pixel_conditionals_are_causal_and_normalised(tiny):
    model, variables, images, latents = tiny
    H, W, C = TINY_SHAPE
    logits_fn = _fast_jit(lambda x: model.apply(variables, x, latents, method="logits"))
    base = np.asarray(logits_fn(images))
    flat = base.reshape(2, -1, 256)
    # Every conditional is a distribution over the 256 values.
    np.testing.assert_allclose(jax.scipy.special.logsumexp(
        jax.nn.log_softmax(flat, -1), axis=-1), 0.0, atol=1e-5)
    rng = np.random.default_rng(0)
    for d in sorted(rng.choice(H * W * C - 1, size=6, replace=False)):
        i, j, c = d // (W * C), (d // C) % W, d % C
        changed = images.at[:, i, j, c].set((images[:, i, j, c] + 128) % 256)
        new = np.asarray(logits_fn(changed)).reshape(2, -1, 256)
        np.testing.assert_array_equal(new[:, : d + 1], flat[:, : d + 1], err_msg=f"d={d}")
        assert not np.allclose(new[:, d + 1], flat[:, d + 1]), f"x_{d + 1} ignores x_{d}"


def test_latent_prior_is_causal_over_positions(tiny):
    model, variables, _, latents = tiny
    z1, z2 = latents
    _, h, w, _ = z1.shape
    prior = _fast_jit(lambda z: jnp.concatenate(model.apply(
        variables, 0, z, z2, method="latent_prior"), axis=-1))
    base = np.asarray(prior(z1)).reshape(2, h * w, -1)
    for p in (0, 5, h * w - 2):
        i, j = p // w, p % w
        new = np.asarray(prior(z1.at[:, i, j].add(3.0))).reshape(2, h * w, -1)
        np.testing.assert_array_equal(new[:, : p + 1], base[:, : p + 1], err_msg=f"p={p}")
        assert not np.allclose(new[:, p + 1], base[:, p + 1]), f"z1[{p + 1}] ignores z1[{p}]"
    # And the prior does read the level above.
    moved = model.apply(variables, 0, z1, z2 + 1.0, method="latent_prior")[0]
    assert not np.allclose(moved, base.reshape(2, h, w, -1)[..., : z1.shape[-1]])


def test_importance_weights_estimate_the_same_bound_as_the_loss(tiny):
    model, variables, images, _ = tiny
    S = 48
    log_w = _fast_jit(lambda k: model.apply(variables, images, S, rngs={"sample": k},
                                            method="importance_log_weights"))(KEY)
    assert log_w.shape == (2, S) and np.all(np.isfinite(log_w))
    losses = _fast_jit(jax.vmap(lambda k: model.apply(
        variables, images, rngs={"sample": k})["loss"]))(jax.random.split(KEY, S))
    # Both -log w and the loss are unbiased estimates of -ELBO: compare their means
    # within 4 standard errors of the difference.
    neg_log_w = -np.asarray(log_w)
    diff = neg_log_w.mean(1) - np.asarray(losses).mean(0)
    stderr = np.sqrt(neg_log_w.var(1) / S + np.asarray(losses).var(0) / S)
    assert np.all(np.abs(diff) < 4 * stderr + 1e-3), (diff, stderr)


def test_adam_steps_on_a_fixed_batch_lower_the_loss(tiny):
    model, variables, images, _ = tiny
    tx = optax.adam(3e-3)
    params, batch_stats = variables["params"], variables["batch_stats"]

    @_fast_jit
    def step(params, batch_stats, opt_state, key):
        def loss_fn(p):
            out, state = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                     train=True, rngs={"sample": key}, mutable=["batch_stats"])
            return out["loss"].mean(), state["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for i in range(8):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                    jax.random.fold_in(KEY, i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses


@pytest.mark.parametrize("overrides, shape, match", [
    ({}, (28, 28, 3), "cannot go through"),
    ({}, (64, 64, 1), "model.image_channels=3 but the data has 1"),
    ({"decoder_blocks": ("16 16u", "16 16u 16u")}, TINY_SHAPE, "as many 'u' as 'd'"),
    ({"latent_channels": (4,)}, TINY_SHAPE, "one entry per latent level"),
    ({"encoder_blocks": ("8 8x 16d", "16 16d 16d")}, TINY_SHAPE, "bad residual block '8x'"),
])
def test_bad_structure_stops_before_compiling(overrides, shape, match):
    config = imagenet64.get_config("tiny")
    config.model.update(overrides)
    with pytest.raises(ValueError, match=match):
        models.build(config.model, shape)


def _fixed_mock_getitems(record_keys, generator, serialized=False):
    del serialized
    return [generator[key] for key in record_keys]


@pytest.mark.parametrize("get_config", [imagenet64.get_config, lsun64.get_config,
                                        lsun32.get_config])
def test_configs_train_end_to_end_on_mock_data(tmp_path, get_config):
    config = get_config("tiny")
    config.data.data_dir = str(tmp_path / "tfds")
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.num_eval_batches = 1
    config.num_image_samples = 0
    # tfds 4.9.10's mock sets `__getitems__` on a MagicMock instance, where it is
    # called without `self`; patch the helper it wraps (as tests/data_test.py does).
    with (mock.patch.object(mocking, "_getitems", _fixed_mock_getitems),
          tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE)):
        final = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(final["eval/nll_bound"])
    assert final["eval/nll_bound"] == pytest.approx(
        final["eval/recon"] + final["eval/kl_level_0"] + final["eval/kl_level_1"], rel=1e-5)
