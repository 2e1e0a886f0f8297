"""Grayscale and Pyramid PixelCNN: causality and normalisation of every factor by
perturbation, the pyramid's conditioning path, the bound's decomposition, training."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import photo_auxiliary
from pvae_jax import models
from pvae_jax.models import auxiliary as aux

B = 8  # Images per batched call; every call below has this batch, so each compiles once.


@functools.cache
def grayscale():
    model = aux.GrayscalePixelCNN(
        image_hw=(4, 4), features=4, num_resnet=1, num_stages=2, dropout_rate=0.0,
        aux_features=4, aux_num_resnet=1, embed_features=4, embed_num_blocks=1, num_mixtures=2)
    return model, aux.numpy_init(model, jnp.zeros((1, 4, 4, 3), jnp.uint8), seed=1)


@functools.cache
def pyramid():
    model = aux.PyramidPixelCNN(
        image_hw=(8, 8), num_scales=3, features=4, base_num_resnet=1, base_num_stages=1,
        scale_num_resnet=1, embed_num_blocks=3, embed_down_after=(1,), embed_up_after=(2, 3),
        dropout_rate=0.0, num_mixtures=2)
    return model


def _images(key, shape, levels):
    return jax.random.randint(jax.random.key(key), (B, *shape), 0, levels)


def _perturbed(x_HxWxC, levels, positions):
    """A batch of B copies of x, copy n with sub-pixel positions[n] set to another level."""
    batch = np.repeat(np.asarray(x_HxWxC)[None], B, axis=0)
    for n, (i, j, c) in enumerate(positions):
        batch[n, i, j, c] = (batch[n, i, j, c] + levels // 2) % levels
    return jnp.asarray(batch)


def _assert_causal(log_prob_fn, x_HxWxC, levels, positions):
    """Changing sub-pixel e leaves log p(x_d | x_<d) unchanged for every d before e and
    changes some later one (raster order, then channel).

    Copy n of the perturbed batch is compared with copy n of the unperturbed batch:
    XLA may vectorise batch rows differently, so two rows of one batch can differ in
    the last bit for equal images, while one row of two equal-shape batches cannot.
    """
    H, W, C = x_HxWxC.shape
    base = np.asarray(log_prob_fn(jnp.repeat(x_HxWxC[None], B, axis=0)))
    changed = np.asarray(log_prob_fn(_perturbed(x_HxWxC, levels, positions)))
    order = np.arange(H * W * C).reshape(H, W, C)
    for n, (i, j, c) in enumerate(positions):
        before = order < order[i, j, c]
        np.testing.assert_array_equal(changed[n][before], base[n][before])
        if order[i, j, c] < order.max():
            after = order > order[i, j, c]
            assert np.abs(changed[n][after] - base[n][after]).max() > 0, (
                "a later sub-pixel ignores an earlier one")


def _assert_normalised(log_prob_fn, x_HxWxC, levels, position):
    """Summed over every value of one sub-pixel, p(x_d | x_<d) is 1."""
    i, j, c = position
    total = 0.0
    for start in range(0, levels, B):
        batch = np.repeat(np.asarray(x_HxWxC)[None], B, axis=0)
        batch[:, i, j, c] = np.arange(start, start + B) % levels
        lp = np.asarray(log_prob_fn(jnp.asarray(batch)), np.float64)[:, i, j, c]
        total += np.exp(lp[: min(B, levels - start)]).sum()
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


POSITIONS_3 = [(0, 0, 0), (0, 0, 2), (1, 2, 1), (2, 0, 0), (2, 3, 2), (3, 3, 0), (3, 3, 2),
               (0, 3, 1)]


def _running_sum_log_prob(levels, future=False):
    """A categorical model of each sub-pixel d (raster order, then channel) with logits
    k * s_d, s_d a tenth of the sum of the sub-pixels before d (of those after it where
    ``future``): normalised, and causal unless ``future``."""
    def log_prob(x_BxHxWxC):
        flat = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1).astype(jnp.float32)
        seq = flat[:, ::-1] if future else flat
        before = jnp.cumsum(seq, axis=1) - seq  # the sum of those strictly before
        s_d = 0.1 * (before[:, ::-1] if future else before)
        logits = s_d[..., None] * jnp.arange(levels)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                 flat.astype(jnp.int32)[..., None], -1)[..., 0]
        return lp.reshape(x_BxHxWxC.shape)
    return jax.jit(log_prob)


def test_the_causality_and_normalisation_checks_can_fail():
    # The checks the model tests below rely on: each rejects a model that breaks its
    # property, and passes one that has both.
    levels = 5
    x = _images(7, (4, 4, 3), levels)[0]
    _assert_causal(_running_sum_log_prob(levels), x, levels, POSITIONS_3)
    _assert_normalised(_running_sum_log_prob(levels), x, levels, (2, 1, 1))
    with pytest.raises(AssertionError):  # reads the sub-pixels after each one
        _assert_causal(_running_sum_log_prob(levels, future=True), x, levels, POSITIONS_3)
    with pytest.raises(AssertionError, match="ignores an earlier one"):
        _assert_causal(jax.jit(lambda x: jnp.full(x.shape, -np.log(levels))), x, levels,
                      POSITIONS_3)
    with pytest.raises(AssertionError):  # sums to e^0.1
        _assert_normalised(jax.jit(lambda x: jnp.full(x.shape, 0.1 - np.log(levels))), x,
                          levels, (2, 1, 1))


def test_grayscale_conditional_is_causal_and_normalised_with_x_hat_fixed():
    model, variables = grayscale()
    x = _images(0, (4, 4, 3), 256)[0]
    x_hat = aux.grayscale_4bit(x[None])
    log_prob = jax.jit(lambda x: model.apply(variables, x, jnp.repeat(x_hat, B, 0),
                                             method="conditional_log_prob"))
    _assert_causal(log_prob, x, 256, POSITIONS_3)
    for position in [(0, 0, 0), (2, 1, 1), (3, 3, 2)]:
        _assert_normalised(log_prob, x, 256, position)


def test_grayscale_prior_is_causal_and_normalised():
    model, variables = grayscale()
    x_hat = _images(1, (4, 4, 1), aux.GRAY_LEVELS)[0]
    log_prob = jax.jit(lambda x: model.apply(variables, x, method="aux_log_prob"))
    _assert_causal(log_prob, x_hat, aux.GRAY_LEVELS, [(i, j, 0) for i, j in
                                                     [(0, 0), (0, 3), (1, 1), (2, 0), (2, 2),
                                                      (3, 0), (3, 2), (3, 3)]])
    for position in [(0, 0, 0), (3, 1, 0)]:
        _assert_normalised(log_prob, x_hat, aux.GRAY_LEVELS, position)


def test_grayscale_is_4bit_luma():
    x = jnp.asarray([[[[0, 0, 0], [255, 255, 255], [255, 0, 0], [16, 16, 16]]]], jnp.uint8)
    np.testing.assert_array_equal(aux.grayscale_4bit(x)[0, 0, :, 0], [0, 15, 4, 1])


def test_bound_is_the_sum_of_the_factors():
    model, variables = grayscale()
    x = _images(2, (4, 4, 3), 256)
    apply = jax.jit(model.apply, static_argnames="method")
    out = apply(variables, x)
    x_hat = aux.grayscale_4bit(x)
    nll_gray = -apply(variables, x_hat, method="aux_log_prob").sum((1, 2, 3))
    nll_color = -apply(variables, x, method="conditional_log_prob").sum((1, 2, 3))
    np.testing.assert_allclose(out["nll_grayscale"], nll_gray, rtol=1e-6)
    np.testing.assert_allclose(out["nll_color"], nll_color, rtol=1e-6)
    np.testing.assert_allclose(out["loss"], nll_gray + nll_color, rtol=1e-6)
    np.testing.assert_array_equal(out["recon"], out["loss"])
    np.testing.assert_array_equal(out["kl"], 0.0)
    bpd = aux.bits_per_dim(out, (4, 4, 3))
    np.testing.assert_allclose(bpd["bits_per_dim/grayscale"] + bpd["bits_per_dim/color"],
                               bpd["bits_per_dim"], rtol=1e-6)


@functools.cache
def pyramid_variables():
    return aux.numpy_init(pyramid(), jnp.zeros((1, 8, 8, 3), jnp.uint8), seed=2)


def test_pyramid_total_is_the_sum_of_its_scales_and_the_scales_are_area_means():
    model, variables = pyramid(), pyramid_variables()
    x = _images(3, (8, 8, 3), 256)
    out = jax.jit(model.apply)(variables, x)
    scales = model.apply(variables, x, method="pyramid")
    assert [s.shape[1] for s in scales] == [2, 4, 8]
    np.testing.assert_array_equal(
        scales[1], np.floor(np.asarray(x, np.float64).reshape(B, 4, 2, 4, 2, 3).mean((2, 4))
                            + 0.5))
    terms = [out[f"nll_scale_{k}"] for k in range(3)]
    np.testing.assert_allclose(out["loss"], sum(terms), rtol=1e-6)
    bpd = aux.bits_per_dim(out, (8, 8, 3))
    np.testing.assert_allclose(bpd["bits_per_dim/resolution_8"], bpd["bits_per_dim"], rtol=1e-6)


def test_pyramid_scale_sees_the_lower_scale_only_through_its_embedding():
    model, variables = pyramid(), pyramid_variables()
    x = _images(4, (8, 8, 3), 256)
    scales = model.apply(variables, x, method="pyramid")
    out = jax.jit(model.apply)(variables, x)
    apply = jax.jit(model.apply, static_argnums=1, static_argnames="method")
    for k in (1, 2):
        emb = apply(variables, k, scales[k - 1], method="embed")
        via_embedding = apply(variables, k, scales[k], emb, method="scale_log_prob")
        np.testing.assert_allclose(-via_embedding.sum((1, 2, 3)), out[f"nll_scale_{k}"],
                                   rtol=1e-6)
    # And through the embedding every pixel has the whole lower scale: the top-left
    # pixel of the finest scale depends on the bottom-right pixel of the scale below.
    lower = aux.scale_levels(scales[1][:1], 256)

    def top_left(lower):
        emb = model.apply(variables, 2, lower, method="embed")
        return model.apply(variables, 2, scales[2][:1], emb, method="scale_params")[0, 0, 0].sum()

    assert np.abs(np.asarray(jax.jit(jax.grad(top_left))(lower)[0, 3, 3])).sum() > 0


def test_pyramid_conditional_is_causal_and_normalised_with_the_lower_scale_fixed():
    model, variables = pyramid(), pyramid_variables()
    x = _images(5, (8, 8, 3), 256)[0]
    lower = jnp.repeat(aux.downsample2(x[None]), B, 0)
    log_prob = jax.jit(lambda x: model.apply(variables, x, lower,
                                             method="conditional_log_prob"))
    positions = [(0, 0, 0), (0, 7, 2), (3, 4, 1), (4, 0, 0), (5, 5, 2), (7, 0, 1), (7, 7, 0),
                 (6, 2, 2)]
    _assert_causal(log_prob, x, 256, positions)
    _assert_normalised(log_prob, x, 256, (5, 3, 1))
    # The coarsest scale is a plain PixelCNN++.
    base = jax.jit(lambda x: model.apply(variables, x, method="base_log_prob"))
    x0 = _images(6, (2, 2, 3), 256)[0]
    _assert_causal(base, x0, 256, [(i, j, c) for i in range(2) for j in range(2) for c in (0, 2)])
    _assert_normalised(base, x0, 256, (1, 1, 2))


def test_a_few_training_steps_lower_the_loss():
    config = photo_auxiliary.get_config("tiny_pyramid")
    config.model.num_scales = 2  # Two factors suffice here and compile a third faster.
    model = models.build(config.model, (8, 8, 3), 256)
    x = _images(7, (8, 8, 3), 256)
    variables = aux.numpy_init(model, x[:1], seed=3)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(params):
            return model.apply({"params": params}, x, train=True,
                               rngs={"sample": key})["loss"].mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = variables["params"], tx.init(variables["params"])
    losses = []
    for i in range(6):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_bad_configurations_raise_clear_errors():
    config = ml_collections.ConfigDict(photo_auxiliary.get_config("tiny_pyramid").model)
    with pytest.raises(ValueError, match="divide by 2 \\*\\* \\(num_scales - 1\\)"):
        models.build(config, (10, 10, 3), 256)
    config.embed_down_after = (1,)
    with pytest.raises(ValueError, match="upsample once more than it downsamples"):
        models.build(config, (8, 8, 3), 256)
    gray = ml_collections.ConfigDict(photo_auxiliary.get_config("tiny_grayscale").model)
    with pytest.raises(ValueError, match="3-channel images"):
        models.build(gray, (8, 8, 1), 256)
    with pytest.raises(ValueError, match="256-level"):
        models.build(gray, (8, 8, 3), 2)
