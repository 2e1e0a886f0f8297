"""Tests of the samplers: shapes and key discipline for every family, fixed latents,
temperature 0 against greedy decoding, the empirical distribution of the draws
against the model's own probabilities on images small enough to enumerate, the fast
sampler against the reference bit for bit, and launch/sample.py end to end."""

import functools
import itertools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import default, tiny
from pvae_jax import models, sampling, train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LATENT_MODELS = ("vae", "pixelvae", "gated_pixelvae", "gated_noup")


def _hierarchical_config(config, data_shape):
    """Two tiny levels; z1 at half the image size where it is even (else the same)."""
    down = "d" if data_shape[0] % 2 == 0 and data_shape[1] % 2 == 0 else ""
    config.update(embed_features=2, stem_features=4, encoder_blocks=(f"4 4{down}", "4"),
                  decoder_blocks=(f"4 4{down and 'u'}", "4"), latent_channels=(2, 3),
                  latent_pixel_features=4, latent_pixel_blocks=1, pixel_embed_features=2,
                  num_convs_per_block=2)


@functools.cache
def _model(name, data_shape, num_levels, param_scale=1.0):
    """A tiny model and its variables; ``param_scale`` multiplies every parameter, which
    sharpens the distributions of a fresh init (near uniform otherwise)."""
    config = default.get_config().model
    config.update(name=name, latent_dim=3, encoder_features=(4, 8), pixel_features=6,
                  num_pixel_layers=2, first_kernel_size=3, kernel_size=3, num_head_layers=1)
    if name == "hierarchical":
        _hierarchical_config(config, data_shape)
    model = models.build(config, data_shape, num_levels)
    x = jnp.zeros((1, *data_shape), jnp.uint8)
    variables = _init(model, x)
    variables = jax.tree.map(lambda p: p * param_scale, variables)
    return model, variables


def _init(model, x):
    # Eager init dispatches (and compiles) op by op: tens of seconds for a PixelVAE;
    # one unoptimised jit takes a few.
    return jax.jit(lambda: model.init({"params": jax.random.key(0), "sample": jax.random.key(1)},
                                      x),
                   compiler_options={"xla_backend_optimization_level": 0})()


def _sample(name, data_shape, num_levels, key, num_samples, param_scale=1.0, **kwargs):
    model, variables = _model(name, data_shape, num_levels, param_scale)
    return np.asarray(sampling.sample(model, variables, jax.random.key(key), num_samples,
                                      **kwargs))


# Every family in binary grayscale and 256-level colour; the mixed pairs once each.
@pytest.mark.parametrize(
    "name, num_levels, channels",
    [(name, *case) for name in models.MODEL_NAMES for case in [(2, 1), (256, 3)]]
    + [("gated_pixelvae", 2, 3), ("pixelcnn", 256, 1)])
def test_images_have_contract_shape_and_depend_only_on_key(name, num_levels, channels):
    # H != W so a swapped height and width would show.
    shape = (4, 5, channels)
    model, _ = _model(name, shape, num_levels)
    assert sampling.image_shape(model) == shape
    x = _sample(name, shape, num_levels, key=0, num_samples=3)
    assert x.dtype == np.uint8
    assert x.shape == (3, *shape)
    assert x.max() < num_levels
    # Not stuck at the zero canvas: the values spread over the levels.
    assert len(np.unique(x)) > min(num_levels, 20) // 2
    np.testing.assert_array_equal(x, _sample(name, shape, num_levels, key=0, num_samples=3))
    assert (x != _sample(name, shape, num_levels, key=1, num_samples=3)).mean() > 0.2


@pytest.mark.parametrize("num_levels", [2, 256])
def test_factorised_decoder_takes_one_pass_with_the_scans_draws(num_levels):
    model, variables = _model("vae", (4, 5, 3), num_levels)
    assert model.decoder.num_layers == 0
    kwargs = dict(num_samples=3)
    one_pass = sampling._sample_reference(model, variables, jax.random.key(7), None,
                                          jnp.float32(1.0), factorised=True, **kwargs)
    scan = sampling._sample_reference(model, variables, jax.random.key(7), None,
                                      jnp.float32(1.0), factorised=False, **kwargs)
    np.testing.assert_array_equal(one_pass, scan)


@pytest.mark.parametrize("name", ["pixelvae", "gated_noup"])
def test_fixed_latents_are_decoded_and_leave_the_pixel_noise_alone(name):
    # At init the tiny upsampling decoder's ReLU stack shrinks z's signal to ~1e-3 of
    # the logits; doubling the parameters restores an O(1) effect that the greedy
    # images can show.
    shape, num_levels, n, scale = (4, 5, 3), 256, 3, 2.0
    model, variables = _model(name, shape, num_levels, scale)
    run = functools.partial(_sample, name, shape, num_levels, num_samples=n, param_scale=scale)
    # Fixing the latents to the prior's own draw for this key changes nothing: the
    # pixel keys do not depend on where the latents came from.
    latent_key, _ = jax.random.split(jax.random.key(3))
    z = model.apply(variables, n, 1.0, method="prior_sample", rngs={"sample": latent_key})
    np.testing.assert_array_equal(run(key=3, fixed={"latents": z}), run(key=3))
    # Same latents, other key: only the pixel noise changes.
    assert (run(key=3, fixed={"latents": z}) != run(key=4, fixed={"latents": z})).any()
    # Without pixel noise the latents alone decide the image...
    greedy = run(key=3, fixed={"latents": z}, temperature=0.0)
    np.testing.assert_array_equal(greedy, run(key=4, fixed={"latents": z}, temperature=0.0))
    # ...and they are used.
    assert (greedy != run(key=3, fixed={"latents": z + 3.0}, temperature=0.0)).any()


def test_bad_arguments_stop_with_a_message():
    model, variables = _model("pixelvae", (4, 5, 3), 256)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"fixed\['latents'\] must have .*\(2, 3\)"):
        sampling.sample(model, variables, key, 2, fixed={"latents": jnp.zeros((3,))})
    with pytest.raises(ValueError, match="unknown keys \\['noise'\\]"):
        sampling.sample(model, variables, key, 2, fixed={"noise": 0})
    with pytest.raises(ValueError, match=r"method must be one of \('fast', 'reference'\)"):
        sampling.sample(model, variables, key, 2, method="slow")
    with pytest.raises(ValueError, match="temperature must be non-negative"):
        sampling.sample(model, variables, key, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        sampling.sample(model, variables, key, 0)
    cnn, cnn_variables = _model("pixelcnn", (4, 5, 3), 256)
    with pytest.raises(ValueError, match="has no latents"):
        sampling.sample(cnn, cnn_variables, key, 2, fixed={"latents": jnp.zeros((2, 3))})


def test_sampler_runs_under_an_outer_jit():
    model, variables = _model("gated_pixelcnn", (4, 5, 3), 256)

    @jax.jit
    def draw(variables, key, temperature):
        return sampling.sample(model, variables, key, 3, temperature=temperature)

    np.testing.assert_array_equal(
        draw(variables, jax.random.key(0), 1.0),
        _sample("gated_pixelcnn", (4, 5, 3), 256, key=0, num_samples=3))


def _all_images(data_shape, num_levels):
    """Every image, [K ** D, H, W, C], index = the sub-pixels read as a base-K number."""
    values = itertools.product(range(num_levels), repeat=math.prod(data_shape))
    return np.array(list(values), np.uint8).reshape(-1, *data_shape)


def _image_index(x_NxHxWxC, num_levels):
    digits = x_NxHxWxC.reshape(len(x_NxHxWxC), -1).astype(np.int64)
    return digits @ num_levels ** np.arange(digits.shape[1])[::-1]


def _bernstein_tolerance(p, n, delta):
    """t with P(|count - n p| >= t) <= delta for a Binomial(n, p) count.

    Bernstein: P(|S - np| >= t) <= 2 exp(-t^2 / (2 (n p (1 - p) + t / 3))); solving
    for t at the bound delta gives t = L / 3 + sqrt(L^2 / 9 + 2 n p (1 - p) L) with
    L = log(2 / delta). Unlike a normal approximation it holds for rare images too.
    """
    L = math.log(2.0 / delta)
    return L / 3.0 + np.sqrt(L**2 / 9.0 + 2.0 * n * p * (1.0 - p) * L)


@pytest.mark.parametrize(
    "name, data_shape, num_levels",
    [("pixelcnn", (2, 2, 1), 2),  # Bernoulli path, dependence across pixels
     ("gated_pixelcnn", (1, 1, 3), 3),  # softmax path, R -> G -> B within a pixel
     ("gated_noup", (2, 2, 1), 2)])  # latents entering every layer
def test_draws_follow_the_models_probabilities(name, data_shape, num_levels):
    n, param_scale = 4000, 3.0
    model, variables = _model(name, data_shape, num_levels, param_scale)
    latents = fixed = None
    if name in LATENT_MODELS:
        # One z for all draws, so the draws share one distribution, p(x | z).
        z = jnp.array([[1.0, -0.5, 2.0]])
        latents, fixed = z, {"latents": jnp.repeat(z, n, axis=0)}
    images = _all_images(data_shape, num_levels)
    lp = model.apply(variables, images,
                     None if latents is None else jnp.repeat(latents, len(images), axis=0),
                     method="conditional_log_prob")
    p = np.exp(np.asarray(lp, np.float64).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-4)

    x = _sample(name, data_shape, num_levels, key=11, num_samples=n,
                param_scale=param_scale, fixed=fixed)
    counts = np.bincount(_image_index(x, num_levels), minlength=len(images))
    # A false alarm in any of the cells has probability <= 1e-6 (union bound).
    tolerance = _bernstein_tolerance(p, n, 1e-6 / len(images))
    np.testing.assert_array_less(np.abs(counts - n * p), tolerance)

    # The test has power: the bound would reject a sampler that drew every sub-pixel
    # from its marginal (one that ignored the context).
    marginals = [p.reshape((num_levels,) * images[0].size).sum(
        axis=tuple(a for a in range(images[0].size) if a != d)) for d in range(images[0].size)]
    independent = functools.reduce(np.multiply.outer, marginals).reshape(-1)
    assert (np.abs(n * independent - n * p) > 2 * tolerance).any()


@pytest.mark.parametrize(
    "name, data_shape, num_levels",
    [("pixelcnn", (3, 3, 1), 2), ("gated_pixelcnn", (2, 2, 3), 256),
     ("gated_noup", (2, 2, 3), 256)])
def test_temperature_zero_is_greedy_decoding(name, data_shape, num_levels):
    n = 2
    model, variables = _model(name, data_shape, num_levels, 3.0)
    fixed = latents = None
    if name in LATENT_MODELS:
        latents = jax.random.normal(jax.random.key(5), (n, 3))
        fixed = {"latents": latents}
    x = _sample(name, data_shape, num_levels, key=0, num_samples=n, param_scale=3.0,
                temperature=0.0, fixed=fixed)

    # Greedy decoding from conditional_log_prob alone: at each sub-pixel, score every
    # value given the choices so far and keep the best.
    score = jax.jit(lambda x, z: model.apply(variables, x, z, method="conditional_log_prob"))
    z_rep = None if latents is None else jnp.repeat(latents, num_levels, axis=0)
    want = np.zeros((n, *data_shape), np.uint8)
    for i, j, c in np.ndindex(*data_shape):
        candidates = np.repeat(want, num_levels, axis=0)
        candidates[:, i, j, c] = np.tile(np.arange(num_levels), n)
        lp = np.asarray(score(candidates, z_rep))[:, i, j, c].reshape(n, num_levels)
        want[:, i, j, c] = lp.argmax(axis=1)
    np.testing.assert_array_equal(x, want)


# Every family in binary grayscale and 256-level colour, with weight norm on and off and
# 0, 1, 2 head layers spread over the cases; 3 layers of two kernel sizes, so residual
# blocks and a first layer wider than the rest are covered; H != W.
_FAST_CASES = [(name, *case) for name in models.MODEL_NAMES for case in [(2, 1), (256, 3)]]


@functools.cache
def _fast_model(index):
    name, num_levels, channels = _FAST_CASES[index]
    config = default.get_config().model
    config.update(name=name, latent_dim=3, encoder_features=(4, 8), pixel_features=6,
                  num_pixel_layers=3, first_kernel_size=5, kernel_size=3,
                  num_head_layers=index % 3, weight_norm=index % 4 < 2)
    shape = (6, 4, channels)
    if name == "hierarchical":
        _hierarchical_config(config, shape)
    model = models.build(config, shape, num_levels)

    variables = _init(model, jnp.zeros((1, *shape), jnp.uint8))
    # Scale every parameter by its own factor: sharper distributions than a fresh init,
    # and weight-norm gains that differ from ||v||, so g and v both matter.
    return model, jax.tree.map(
        lambda p: p * (2.0 + 0.5 * np.sin(1.7 * np.arange(p.size) + p.size)
                       ).reshape(p.shape).astype(np.float32), variables)


@pytest.mark.parametrize("index", range(len(_FAST_CASES)),
                         ids=[f"{n}-K{k}-C{c}" for n, k, c in _FAST_CASES])
def test_fast_sampler_draws_the_reference_images(index):
    model, variables = _fast_model(index)
    n = 3
    fixed = None
    if isinstance(model, models.PixelVAE):
        fixed = {"latents": jax.random.normal(jax.random.key(9), (n, 3))}
    if isinstance(model, models.HierarchicalPixelVAE):
        # The latent prior's draws too: fast and reference give the same z1 for a given
        # top level, to float32 rounding (the sums run in another order, and each
        # position's draw feeds the next: 1e-4 of the values' scale allows for that).
        z2 = jax.random.normal(jax.random.key(9), (n, 3))
        fixed = {"latents": (None, z2)}
        z = [np.asarray(sampling.sample_latents(model, variables, jax.random.key(2), n,
                                                method=m, fixed=(None, z2))[0])
             for m in ("fast", "reference")]
        np.testing.assert_allclose(z[0], z[1], rtol=0, atol=1e-4 * np.abs(z[1]).max())
        assert np.abs(z[1]).max() > 0.1  # Not a trivial agreement at zero.

    def both(key, temperature, fixed):
        return [np.asarray(sampling.sample(model, variables, jax.random.key(key), n,
                                           temperature=temperature, fixed=fixed, method=m))
                for m in ("fast", "reference")]

    drawn = []
    for key, temperature in [(0, 1.0), (1, 0.0), (2, 0.7)]:
        fast, reference = both(key, temperature, None)
        np.testing.assert_array_equal(fast, reference)
        drawn.append(fast)
    if model.decoder.num_layers:  # (A factorised decoder takes the same path in both.)
        # Not a trivial agreement: the images use many levels.
        assert len(np.unique(np.stack(drawn))) >= min(model.num_levels, 10)
    if fixed is not None:
        fast, reference = both(3, 1.0, fixed)
        np.testing.assert_array_equal(fast, reference)
    # 'fast' is the default.
    np.testing.assert_array_equal(
        sampling.sample(model, variables, jax.random.key(0), n), both(0, 1.0, None)[1])


def test_launcher_samples_from_a_trained_workdir(tmp_path):
    workdir = tmp_path / "run"
    config = tiny.get_config()
    config.num_train_steps = 2
    config.num_image_samples = 0
    config.checkpoint_every_steps = 2
    train.train_and_evaluate(config, str(workdir))
    env = dict(os.environ)
    # Only the plumbing is checked; compile cheaply.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    common = [sys.executable, os.path.join(_ROOT, "launch", "sample.py"),
              "--config=" + os.path.join(_ROOT, "configs", "tiny.py"), f"--workdir={workdir}",
              "--config.num_train_steps=2", "--config.num_image_samples=0",
              "--config.checkpoint_every_steps=2", "--num_samples=4"]
    for vary in ("none", "top", "pixel"):
        output = tmp_path / f"{vary}.png"
        proc = subprocess.run(common + [f"--vary={vary}", f"--output={output}"], cwd=_ROOT,
                              env=env, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        image = np.asarray(Image.open(output))
        # 4 images of 28x28 in a 2x2 grid with 1-pixel borders, grayscale.
        assert image.shape == (2 * 29 + 1, 2 * 29 + 1)
    proc = subprocess.run(common + ["--vary=middle", f"--output={tmp_path / 'm.png'}"],
                          cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode != 0 and "--vary=middle needs a hierarchical model" in proc.stderr


def test_grid_vary_modes_say_what_they_need():
    draw = functools.partial(sampling.sample_grid, temperature=1.0, method="fast")
    cnn, cnn_variables = _model("pixelcnn", (4, 5, 3), 256)
    for vary in ("top", "pixel"):
        with pytest.raises(ValueError, match=f"--vary={vary} needs a model with latents"):
            draw(cnn, cnn_variables, jax.random.key(0), 2, vary=vary)
    with pytest.raises(ValueError, match="--vary=middle needs a hierarchical model"):
        draw(cnn, cnn_variables, jax.random.key(0), 2, vary="middle")
    # 'pixel': one z for the grid, so at temperature 0 every image is the same.
    vae, vae_variables = _model("gated_noup", (4, 5, 3), 256, 2.0)
    greedy = np.asarray(sampling.sample_grid(vae, vae_variables, jax.random.key(0), 3,
                                             temperature=0.0, method="fast", vary="pixel"))
    assert (greedy == greedy[:1]).all()


def test_hierarchical_levels_can_be_held_while_the_others_vary():
    shape, n = (4, 4, 3), 3
    model, variables = _model("hierarchical", shape, 256, 2.0)
    key = jax.random.key(6)
    z2 = jnp.repeat(jax.random.normal(jax.random.key(1), (1, 3)), n, axis=0)
    z = sampling.sample_latents(model, variables, jax.random.split(key)[0], n,
                                fixed=(None, z2))
    np.testing.assert_array_equal(z[1], z2)  # The held level is the same for every image...
    assert not np.allclose(z[0][0], z[0][1])  # ...the level below is drawn per image.
    # The documented key relation: holding the top decodes what sample_latents drew.
    np.testing.assert_array_equal(
        sampling.sample(model, variables, key, n, fixed={"latents": (None, z2)}),
        sampling.sample(model, variables, key, n, fixed={"latents": z}))
    with pytest.raises(ValueError, match="every level above it held too"):
        sampling.sample(model, variables, key, n, fixed={"latents": (z[0], None)})
    with pytest.raises(ValueError, match=r"fixed\['latents'\]\[1\] must have shape \(3, 3\)"):
        sampling.sample(model, variables, key, n, fixed={"latents": (None, z2[:1])})
    grid = functools.partial(sampling.sample_grid, model, variables, key, n)
    # 'pixel' at temperature 0: one draw of every level and no pixel noise, one image.
    greedy = np.asarray(grid(temperature=0.0, vary="pixel"))
    assert (greedy == greedy[:1]).all()
    for vary in ("top", "middle"):
        images = np.asarray(grid(vary=vary))
        assert images.shape == (n, *shape) and (images != images[:1]).any(), vary


def test_auxiliary_models_share_the_entry_point():
    from configs import photo_auxiliary
    from pvae_jax import sampling_auxiliary
    from pvae_jax.models import auxiliary

    config = photo_auxiliary.get_config("tiny_pyramid")
    model = models.build(config.model, (8, 8, 3))
    variables = auxiliary.numpy_init(model, np.zeros((1, 8, 8, 3), np.uint8))
    key = jax.random.key(0)
    got = sampling.sample(model, variables, key, 2, map_sampling=True, log_scale_shift=0.5)
    want = sampling_auxiliary.sample_pyramid(model, variables, key, 2, map_sampling=True,
                                             log_scale_shift=0.5, method="fast")
    np.testing.assert_array_equal(got, want)
    assert got.shape == (2, 8, 8, 3) and got.dtype == np.uint8
    vae, vae_variables = _model("gated_noup", (4, 5, 3), 256)
    with pytest.raises(ValueError, match="map_sampling and log_scale_shift apply"):
        sampling.sample(vae, vae_variables, key, 2, map_sampling=True)
