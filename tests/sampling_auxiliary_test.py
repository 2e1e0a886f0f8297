"""Samplers of the auxiliary-variable PixelCNNs: every pixel is the draw its key makes
from the model's conditional given the finished earlier pixels (and lower scale)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pvae_jax import sampling_auxiliary as sa
from pvae_jax import viz
from pvae_jax.models import auxiliary as aux

N = 3
KEY = jax.random.key(7)


@functools.cache
def grayscale():
    model = aux.GrayscalePixelCNN(
        image_hw=(4, 4), features=4, num_resnet=1, num_stages=2, dropout_rate=0.0,
        aux_features=4, aux_num_resnet=1, embed_features=4, embed_num_blocks=1, num_mixtures=2)
    return model, aux.numpy_init(model, jnp.zeros((1, 4, 4, 3), jnp.uint8), seed=1)


@functools.cache
def pyramid():
    model = aux.PyramidPixelCNN(
        image_hw=(4, 4), num_scales=2, features=4, base_num_resnet=1, base_num_stages=1,
        scale_num_resnet=1, embed_num_blocks=1, embed_down_after=(), embed_up_after=(1,),
        dropout_rate=0.0,
        num_mixtures=2)
    return model, aux.numpy_init(model, jnp.zeros((1, 4, 4, 3), jnp.uint8), seed=2)


def _apply(model, variables, *args, method, scale=()):
    """A jitted teacher-forced pass (eager flax applies dispatch op by op); ``scale``
    holds the pyramid's static scale index."""
    fn = jax.jit(lambda v, *a: model.apply(v, *scale, *a, method=method))
    return fn(variables, *args)


def _redraw(out_BxHxWxP, key, draw):
    """What the sampler's rule draws at every pixel from teacher-forced outputs."""
    _, H, W, _ = out_BxHxWxP.shape
    out_PxBxP = out_BxHxWxP.reshape(out_BxHxWxP.shape[0], H * W, -1).swapaxes(0, 1)
    keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(jnp.arange(H * W))
    values_PxBxC = jax.vmap(draw)(keys, out_PxBxP)
    return np.asarray(values_PxBxC.swapaxes(0, 1).reshape(out_BxHxWxP.shape[0], H, W, -1))


def test_grayscale_sampler_draws_each_pixel_from_its_conditionals():
    model, variables = grayscale()
    x_hat, x = sa.sample_grayscale(model, variables, KEY, N, return_grayscale=True,
                                   temperature=0.8)
    assert x_hat.shape == (N, 4, 4, 1) and x.shape == (N, 4, 4, 3) and x.dtype == jnp.uint8
    assert int(x_hat.max()) < aux.GRAY_LEVELS
    logits = _apply(model, variables, x_hat, method="aux_logits")
    np.testing.assert_array_equal(
        _redraw(logits, jax.random.fold_in(KEY, 0), lambda k, o: sa.draw_gray(k, o, 0.8)), x_hat)
    cond = _apply(model, variables, x_hat, method="embed")
    params = _apply(model, variables, x, cond, method="mixture_params")
    np.testing.assert_array_equal(
        _redraw(params, jax.random.fold_in(KEY, 1),
                lambda k, p: sa.draw_mixture(k, p, 3, 2, 256, 0.8)), x)
    # Colouring given grayscale images reuses them as x^ and draws the same colours.
    again = sa.sample_grayscale(model, variables, KEY, N, grayscale=x_hat, temperature=0.8)
    np.testing.assert_array_equal(again, x)


def test_pyramid_sampler_goes_coarse_to_fine_and_map_takes_component_modes():
    model, variables = pyramid()
    scales = sa.sample_pyramid_scales(model, variables, KEY, N, map_sampling=True)
    assert [s.shape for s in scales] == [(N, 2, 2, 3), (N, 4, 4, 3)]
    draw = lambda k, p: sa.draw_mixture(k, p, 3, 2, 256, 0.0)
    base = _apply(model, variables, scales[0], method="base_params")
    np.testing.assert_array_equal(_redraw(base, jax.random.fold_in(KEY, 0), draw), scales[0])
    emb = _apply(model, variables, scales[0], method="embed", scale=(1,))
    params = _apply(model, variables, scales[1], emb, method="scale_params",
                    scale=(1,))
    np.testing.assert_array_equal(_redraw(params, jax.random.fold_in(KEY, 1), draw), scales[1])
    # Shrinking the logistic scales by e^-40 leaves only the component modes: MAP.
    shrunk = sa.sample_pyramid(model, variables, KEY, N, log_scale_shift=40.0)
    np.testing.assert_array_equal(shrunk, scales[1])


def test_noise_scale_is_temperature_times_exp_minus_shift():
    np.testing.assert_allclose(sa.noise_scale(0.5, False, 1.0), 0.5 * np.exp(-1.0), rtol=1e-6)
    assert float(sa.noise_scale(1.0, True, 0.0)) == 0.0


def test_scales_grid_png(tmp_path):
    scales = [np.full((2, 2, 2, 3), 10, np.uint8), np.full((2, 4, 4, 3), 200, np.uint8)]
    grid = sa.scales_grid(scales, pad=1)
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 6, 0] == 200  # coarse blown up, then fine
    viz.save_png(tmp_path / "g.png", grid)
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == grid.shape


def test_bad_arguments_raise():
    model, variables = grayscale()
    with pytest.raises(ValueError, match="num_samples"):
        sa.sample_grayscale(model, variables, KEY, 0)
    with pytest.raises(ValueError, match="temperature"):
        sa.sample_grayscale(model, variables, KEY, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="grayscale must have shape"):
        sa.sample_grayscale(model, variables, KEY, 2, grayscale=np.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="PyramidPixelCNN or PixelCNNPlusPlus"):
        sa.sample(object(), variables, KEY, 2)


def test_fast_pyramid_sampler_draws_the_reference_images():
    """The finer scale (16 rows) is taller than the fast sampler's window (11 rows)."""
    model = aux.PyramidPixelCNN(
        image_hw=(16, 4), num_scales=2, features=4, base_num_resnet=1, base_num_stages=1,
        scale_num_resnet=1, embed_num_blocks=1, embed_down_after=(), embed_up_after=(1,),
        dropout_rate=0.0, num_mixtures=2)
    assert sa.receptive_rows(1) + 1 < 16
    variables = aux.numpy_init(model, jnp.zeros((1, 16, 4, 3), jnp.uint8), seed=3)
    reference = sa.sample_pyramid_scales(model, variables, KEY, 2)
    fast = sa.sample_pyramid_scales(model, variables, KEY, 2, method="fast")
    for a, b in zip(reference, fast, strict=True):
        np.testing.assert_array_equal(a, b)
