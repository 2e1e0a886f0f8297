"""Property tests of every model family built by ``pvae_jax.models.build``.

Each family is built from a tiny config and checked on what DESIGN.md's contract
promises: causality of ``conditional_log_prob`` (by perturbing one sub-pixel at a
time, latents fixed), normalisation of every conditional and of the joint, the
loss/recon/kl bookkeeping, that a few Adam steps learn, the errors of ``build``, and
output shapes with and without jit.

Compilation is nearly all of the cost here, so parameters come from numpy (shapes by
``eval_shape``) rather than a compiled ``init``, each model's ``conditional_log_prob``
is compiled once for one padded batch size, one function returns every output for
the loss and shape tests, and everything compiles with XLA's backend optimisation
off: the properties are of the function, not of how XLA schedules it.
"""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from pvae_jax import models

LATENT_DIM = 3
LATENT_MODELS = ("vae", "pixelvae", "gated_pixelvae", "gated_noup")
PIXELCNN_MODELS = ("pixelcnn", "gated_pixelcnn")
# The one-level families; the hierarchical model has its own tests
# (tests/hierarchical_test.py).
FLAT_MODELS = tuple(n for n in models.MODEL_NAMES if n != "hierarchical")
AUTOREGRESSIVE = tuple(n for n in FLAT_MODELS if n != "vae")

# ((H, W, C), K): binary, 256-level grey and 256-level RGB (not square, so a swap of H
# and W shows).
BINARY = ((4, 4, 1), 2)
GREY = ((4, 4, 1), 256)
RGB = ((3, 4, 3), 256)
DATA = {"binary": BINARY, "grey256": GREY, "rgb256": RGB}
# Every batch given to a compiled conditional_log_prob is padded to this size (the
# largest is 6 sub-pixels x 256 values).
PADDED_BATCH = 1536
# One batch size for the loss, shape and training tests, so they share one compilation.
EVAL_BATCH = 3

_fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _config(name, **overrides):
    config = default.get_config().model
    config.name = name
    config.latent_dim = LATENT_DIM
    config.encoder_features = (4, 8)
    config.pixel_features = 6
    config.num_pixel_layers = 2
    config.first_kernel_size = 3
    config.kernel_size = 3
    config.num_head_layers = 1
    config.update(overrides)
    return config


def _random_variables(model, shape, seed=0):
    """Variables of ``model``'s shapes: He-scaled normal kernels (the upsampler is a
    deep ReLU stack), weight-norm scales near 1, and non-zero biases, so the
    conditionals are far from uniform."""
    x = jnp.zeros((1, *shape), jnp.uint8)
    shapes = jax.eval_shape(
        functools.partial(model.init, {"params": jax.random.key(0),
                                       "sample": jax.random.key(1)}), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if getattr(path[-1], "key", None) == "g":
            return jnp.asarray(1.0 + 0.3 * noise)
        if len(leaf.shape) == 1:
            return jnp.asarray(0.3 * noise)
        return jnp.asarray(noise * np.sqrt(2.0 / np.prod(leaf.shape[:-1])))

    return jax.tree_util.tree_map_with_path(draw, shapes)


class _Built:
    """A model with random parameters and its compiled ``conditional_log_prob``."""

    def __init__(self, name, shape, num_levels):
        self.name, self.shape, self.num_levels = name, shape, num_levels
        self.has_latents = name in LATENT_MODELS
        self.model = models.build(_config(name), shape, num_levels)
        self.variables = _random_variables(self.model, shape)
        self._clp = _fast_jit(functools.partial(self.model.apply, method="conditional_log_prob"))

    def log_prob(self, x_BxHxWxC, z_BxD=None):
        """[B, H*W*C] float64 log p(x_d | x_<d, z) in the sub-pixel order (the C-order
        flattening). z defaults to one fixed draw shared by every image."""
        B = x_BxHxWxC.shape[0]
        assert B <= PADDED_BATCH
        x = np.zeros((PADDED_BATCH, *self.shape), np.uint8)
        x[:B] = x_BxHxWxC
        z = None
        if self.has_latents:
            if z_BxD is None:
                z_BxD = np.random.default_rng(3).standard_normal((1, LATENT_DIM))
            z = np.zeros((PADDED_BATCH, LATENT_DIM), np.float32)
            z[:B] = z_BxD
        lp = self._clp(self.variables, jnp.asarray(x), z)
        chex.assert_shape(lp, x.shape)
        return np.asarray(lp, np.float64)[:B].reshape(B, -1)


@functools.cache
def _built(name, shape, num_levels):
    return _Built(name, shape, num_levels)


def _random_images(shape, num_levels, batch_size, seed=0):
    return np.random.default_rng(seed).integers(0, num_levels, (batch_size, *shape), np.uint8)


def _logsumexp(a, axis=None):
    top = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def test_families_are_the_papers_table():
    assert set(FLAT_MODELS) == set(LATENT_MODELS) | set(PIXELCNN_MODELS)


# ----------------------------------------------------------------------------
# Causality and normalisation of conditional_log_prob, latents fixed.


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("name", FLAT_MODELS)
def test_changing_one_sub_pixel_leaves_earlier_conditionals_unchanged(name, data):
    """For each of a few images, row 0 is the image and row d + 1 the image with
    sub-pixel d set to another value. Earlier conditionals must not move; for
    autoregressive models every sub-pixel but the last must move some later one (in
    one image at least: a ReLU can switch a path off); for the factorised VAE, log p at
    sub-pixel e reads x_e alone."""
    shape, num_levels = DATA[data]
    built = _built(name, shape, num_levels)
    num_images, n = 3, int(np.prod(shape))
    rng = np.random.default_rng(1)
    x = _random_images(shape, num_levels, num_images).reshape(num_images, 1, n)
    batch = np.repeat(x, n + 1, axis=1)
    d = np.arange(n)
    shift = 1 + rng.integers(0, num_levels - 1, (num_images, n))
    batch[:, d + 1, d] = (batch[:, d + 1, d].astype(int) + shift) % num_levels
    lp = built.log_prob(batch.reshape(-1, *shape)).reshape(num_images, n + 1, n)
    # changed[i, d, e]: did log p at sub-pixel e of image i move when d was changed?
    changed = np.abs(lp[:, 1:] - lp[:, :1]) > 1e-6
    earlier = np.argwhere(np.tril(np.ones((n, n), bool), -1) & changed)
    assert earlier.size == 0, f"(image, changed d, moved earlier e): {earlier.tolist()}"
    if name in AUTOREGRESSIVE:
        read_later = (np.triu(np.ones((n, n), bool), 1) & changed).any(axis=(0, 2))
        unread = np.flatnonzero(~read_later[:-1])
        assert unread.size == 0, f"sub-pixels no later conditional reads: {unread.tolist()}"
    else:
        others = np.argwhere(~np.eye(n, dtype=bool) & changed)
        assert others.size == 0, f"(image, changed d, moved e != d): {others.tolist()}"
        assert changed[:, d, d].any(axis=0).all()


@pytest.mark.parametrize("name", LATENT_MODELS)
def test_conditionals_depend_on_the_latents(name):
    """Identical inputs give identical bits, so any difference means z is read."""
    built = _built(name, *BINARY)
    x = _random_images(BINARY[0], 2, 4)
    z1, z2 = np.random.default_rng(4).standard_normal((2, 4, LATENT_DIM))
    moved = np.abs(built.log_prob(x, z1) - built.log_prob(x, z2)).sum(axis=1)
    assert np.all(moved > 0), moved


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("name", FLAT_MODELS)
def test_every_conditional_sums_to_one(name, data):
    """For sub-pixel d, set x_d to each of the K values, all else fixed: the
    probabilities of those values at d sum to 1."""
    shape, num_levels = DATA[data]
    built = _built(name, shape, num_levels)
    x = _random_images(shape, num_levels, 1, seed=2).reshape(-1)
    n = x.size
    # First, second, middle and last; with colour, also the last pixel's R and G.
    subs = sorted({0, 1, n // 2, n - 1} | ({n - 2, n - 3} if shape[-1] > 1 else set()))
    batch = np.tile(x, (len(subs), num_levels, 1))
    for i, d in enumerate(subs):
        batch[i, :, d] = np.arange(num_levels)
    lp = built.log_prob(batch.reshape(-1, *shape)).reshape(len(subs), num_levels, n)
    totals = np.exp(_logsumexp(lp[np.arange(len(subs)), :, subs], axis=-1))
    np.testing.assert_allclose(totals, np.ones(len(subs)), rtol=0, atol=1e-5,
                               err_msg=f"sub-pixels {subs}")


@pytest.mark.parametrize("name", FLAT_MODELS)
def test_probabilities_of_all_2x2_binary_images_sum_to_one(name):
    """exp(sum_d log p(x_d | x_<d, z)) over the 16 images sums to 1."""
    shape = (2, 2, 1)
    built = _built(name, shape, 2)
    images = np.array(list(itertools.product((0, 1), repeat=4)), np.uint8)
    total = np.exp(_logsumexp(built.log_prob(images.reshape(-1, *shape)).sum(axis=1)))
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------
# The loss contract and output shapes.


def _everything(model, variables, x, key, kl_weight=1.0, train=False):
    """Every public output of ``model`` for images ``x`` and one 'sample' key."""
    apply = functools.partial(model.apply, variables, rngs={"sample": key})
    z = apply(x, method="posterior_sample")
    got = {
        "out": apply(x, train=train, kl_weight=kl_weight),
        "z": z,
        "prior": apply(4, method="prior_sample"),
        "logits": model.apply(variables, x, z, method="logits"),
        "log_prob": model.apply(variables, x, z, method="conditional_log_prob"),
    }
    if z is not None:
        got["posterior"] = model.apply(variables, x, method="posterior")
    return got


@functools.cache
def _jitted_everything(name, shape, num_levels):
    model = _built(name, shape, num_levels).model
    return _fast_jit(functools.partial(_everything, model), static_argnames="train")


@pytest.mark.parametrize("name", LATENT_MODELS)
def test_latent_loss_is_recon_plus_kl(name):
    built = _built(name, *BINARY)
    everything = _jitted_everything(name, *BINARY)
    x = jnp.asarray(_random_images(BINARY[0], 2, EVAL_BATCH, seed=3))
    got = jax.device_get(everything(built.variables, x, jax.random.key(5)))
    out = got["out"]
    np.testing.assert_array_equal(out["loss"], out["recon"] + out["kl"])
    np.testing.assert_array_equal(out["kl_levels"].sum(-1), out["kl"])
    assert np.all(out["kl"] >= 0)
    # The KL is the closed form of the model's own q(z|x) against N(0, I).
    mean, log_std = got["posterior"]
    kl = 0.5 * (mean**2 + np.exp(2 * log_std) - 1 - 2 * log_std).sum(-1)
    np.testing.assert_allclose(out["kl"], kl, rtol=1e-5, atol=1e-6)
    # One 'sample' draw: posterior_sample with the same key gives the z of the loss.
    np.testing.assert_allclose(out["recon"], -got["log_prob"].sum(axis=(1, 2, 3)),
                               rtol=1e-6, atol=1e-5)
    # A KL weight scales the KL in the loss only.
    half = jax.device_get(everything(built.variables, x, jax.random.key(5), 0.5))["out"]
    np.testing.assert_allclose(half["loss"], out["recon"] + 0.5 * out["kl"], rtol=1e-6)
    np.testing.assert_array_equal(half["recon"], out["recon"])
    # Another key draws another z; q(z|x) and so the KL stay.
    other = jax.device_get(everything(built.variables, x, jax.random.key(6)))
    assert np.all(other["out"]["recon"] != out["recon"])
    assert np.all(other["z"] != got["z"])
    np.testing.assert_array_equal(other["out"]["kl"], out["kl"])


@pytest.mark.parametrize("name", PIXELCNN_MODELS)
def test_pixelcnn_loss_is_the_exact_nll(name):
    built = _built(name, *BINARY)
    everything = _jitted_everything(name, *BINARY)
    x = jnp.asarray(_random_images(BINARY[0], 2, EVAL_BATCH, seed=3))
    got = jax.device_get(everything(built.variables, x, jax.random.key(5)))
    out = got["out"]
    assert "kl_levels" not in out
    np.testing.assert_array_equal(out["kl"], np.zeros(EVAL_BATCH))
    np.testing.assert_array_equal(out["loss"], out["recon"])
    np.testing.assert_allclose(out["recon"], -got["log_prob"].sum(axis=(1, 2, 3)),
                               rtol=1e-6, atol=1e-5)
    half = jax.device_get(everything(built.variables, x, jax.random.key(5), 0.5))["out"]
    np.testing.assert_array_equal(half["loss"], out["loss"])
    other = jax.device_get(everything(built.variables, x, jax.random.key(6)))
    np.testing.assert_array_equal(other["out"]["loss"], out["loss"])


# Jit on binary data (the compiled function the loss tests use), eager on RGB with
# train=True: each way of calling and each output layout once per family.
@pytest.mark.parametrize("transform, data", [("jit", "binary"), ("eager", "rgb256")])
@pytest.mark.parametrize("name", FLAT_MODELS)
def test_output_shapes(name, transform, data):
    shape, num_levels = DATA[data]
    built = _built(name, shape, num_levels)
    B = EVAL_BATCH
    x = jnp.asarray(_random_images(shape, num_levels, B, seed=4))
    if transform == "jit":
        everything = _jitted_everything(name, shape, num_levels)
        got = everything(built.variables, x, jax.random.key(9))
    else:
        got = _everything(built.model, built.variables, x, jax.random.key(9), train=True)

    out = got["out"]
    assert set(out) == {"loss", "recon", "kl"} | ({"kl_levels"} if built.has_latents else set())
    chex.assert_shape([out["loss"], out["recon"], out["kl"]], (B,))
    chex.assert_type([out["loss"], out["recon"], out["kl"]], jnp.float32)
    if built.has_latents:
        chex.assert_shape(out["kl_levels"], (B, 1))
    chex.assert_tree_all_finite(out)
    if built.has_latents:
        chex.assert_shape(got["z"], (B, LATENT_DIM))
        chex.assert_shape(got["prior"], (4, LATENT_DIM))
        chex.assert_tree_all_finite((got["z"], got["prior"]))
    else:
        assert got["z"] is None and got["prior"] is None
    want_logits = (B, *shape) if num_levels == 2 else (B, *shape, num_levels)
    chex.assert_shape(got["logits"], want_logits)
    chex.assert_shape(got["log_prob"], (B, *shape))
    chex.assert_type(got["log_prob"], jnp.float32)
    assert np.all(np.asarray(got["log_prob"]) <= 0)


# ----------------------------------------------------------------------------
# Training.


def _bars(num_images):
    """Binary 4x4 images, each one full row or column of ones: easy to learn."""
    images = np.zeros((num_images, 4, 4, 1), np.uint8)
    for i in range(num_images):
        if i % 2:
            images[i, (i // 2) % 4, :] = 1
        else:
            images[i, :, (i // 2) % 4] = 1
    return images


@pytest.mark.parametrize("name", FLAT_MODELS)
def test_adam_steps_lower_the_loss(name):
    built = _built(name, *BINARY)
    model, tx = built.model, optax.adam(1e-2)
    x = jnp.asarray(_bars(EVAL_BATCH))
    everything = _jitted_everything(name, *BINARY)

    def evaluate(variables):
        # The same key before and after: the latent models' one-sample losses are
        # compared on common random numbers.
        return float(everything(variables, x, jax.random.key(7))["out"]["loss"].mean())

    def loss_fn(variables, key):
        return model.apply(variables, x, rngs={"sample": key})["loss"].mean()

    @_fast_jit
    def train(variables):
        def step(carry, key):
            variables, opt_state = carry
            grads = jax.grad(loss_fn)(variables, key)
            updates, opt_state = tx.update(grads, opt_state, variables)
            return (optax.apply_updates(variables, updates), opt_state), None

        keys = jax.random.split(jax.random.key(8), 10)
        (trained, _), _ = jax.lax.scan(step, (variables, tx.init(variables)), keys)
        return trained

    before = evaluate(built.variables)
    after = evaluate(train(built.variables))
    assert np.isfinite(after)
    assert after < 0.9 * before, f"loss {before:.3f} -> {after:.3f} nats after 10 steps"


# ----------------------------------------------------------------------------
# build's errors.


@pytest.mark.parametrize("name, shape, overrides, field", [
    ("pixel_vae", (4, 4, 1), {}, "model.name"),
    ("pixelcnn", (4, 4, 3), {"pixel_features": 8}, "model.pixel_features"),
    ("gated_pixelcnn", (4, 4, 3), {"pixel_features": 4}, "model.pixel_features"),
    ("pixelvae", (4, 4, 3), {"pixel_features": 4}, "model.pixel_features"),
    ("gated_noup", (4, 4, 3), {"pixel_features": 4}, "model.pixel_features"),
    ("pixelcnn", (4, 4, 1), {"num_pixel_layers": 0}, "model.num_pixel_layers"),
    ("gated_pixelcnn", (4, 4, 1), {"num_pixel_layers": 0}, "model.num_pixel_layers"),
    ("gated_noup", (4, 4, 1), {"num_pixel_layers": 0}, "model.num_pixel_layers"),
    ("pixelvae", (4, 4, 1), {"num_pixel_layers": -1}, "model.num_pixel_layers"),
    ("pixelcnn", (4, 4), {}, "data_shape"),
    ("vae", (4, 4, 1, 1), {}, "data_shape"),
    ("gated_pixelvae", (0, 4, 1), {}, "data_shape"),
    ("gated_pixelcnn", (4, 4, 0), {}, "data_shape"),
])
def test_build_names_the_bad_field(name, shape, overrides, field):
    with pytest.raises(ValueError, match=field):
        models.build(_config(name, **overrides), shape, 256)


def test_build_rejects_fewer_than_two_levels():
    with pytest.raises(ValueError, match="num_levels"):
        models.build(_config("pixelcnn"), (4, 4, 1), 1)


def test_build_allows_a_factorised_pixelvae_and_any_width_for_the_vae():
    factorised = models.build(_config("pixelvae", num_pixel_layers=0), (4, 4, 1), 2)
    assert isinstance(factorised, models.PixelVAE) and factorised.decoder.num_layers == 0
    # The VAE has no PixelCNN layers, so pixel_features need not divide by 3.
    vae = models.build(_config("vae", pixel_features=4), (4, 4, 3), 256)
    assert vae.decoder.num_layers == 0 and vae.decoder.channels == 3
