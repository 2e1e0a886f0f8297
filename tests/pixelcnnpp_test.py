"""PixelCNN++ layers: causality by gradients, no blind spot, resampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pvae_jax.models.auxiliary import numpy_init
from pvae_jax.nn import pixelcnnpp as pp

H = W = 8


def _dependencies(net, variables, cond_maps=None):
    """|d out[0, i, j, :] / d x[0, k, l, :]| summed over channels: [H, W, H, W]."""
    x = jax.random.normal(jax.random.key(1), (1, H, W, 3))
    jac = jax.jacrev(lambda x: net.apply(variables, x, cond_maps)[0].sum(-1))(x)
    return np.abs(np.asarray(jac[:, :, 0])).sum(-1)


FUTURE = np.arange(H * W).reshape(H, W, 1, 1) <= np.arange(H * W).reshape(1, 1, H, W)


@pytest.fixture(scope="module", params=[1, 2], ids=["one_stage", "down_up"])
def deps(request):
    net = pp.PixelCNNPP(features=4, num_resnet=1, out_features=5, num_stages=request.param)
    return _dependencies(net, numpy_init(net, jnp.zeros((1, H, W, 3))))


def test_output_depends_only_on_earlier_pixels(deps):
    assert deps[FUTURE].max() == 0.0, "an output reads its own or a later pixel"
    # The nearest earlier pixels do feed it (a constant net would pass the line above).
    for i in range(H):
        assert (deps[i, np.arange(1, W), i, np.arange(W - 1)] > 0).all()
        if i:
            assert (deps[i, np.arange(W), i - 1, np.arange(W)] > 0).all()


def test_no_blind_spot(deps):
    """Pixel (4, 3) sees the pixels up and to the right that masked stacks miss."""
    assert deps[4, 3, 3, 7] > 0 and deps[4, 3, 3, 4] > 0 and deps[4, 3, 4, 0] > 0


def test_conditioning_enters_at_every_pixel_without_breaking_causality():
    net = pp.PixelCNNPP(features=4, num_resnet=1, out_features=2, num_stages=2)
    cond = jax.random.normal(jax.random.key(2), (1, H, W, 3))
    variables = numpy_init(net, jnp.zeros((1, H, W, 3)), pp.pool_pyramid(cond, 2))
    x = jnp.zeros((1, H, W, 3))
    jac = jax.jacrev(lambda x, c: net.apply(variables, x, pp.pool_pyramid(c, 2))[0].sum(-1),
                     argnums=(0, 1))(x, cond)
    deps_x = np.abs(np.asarray(jac[0][:, :, 0])).sum(-1)
    deps_c = np.abs(np.asarray(jac[1][:, :, 0])).sum(-1)
    assert deps_x[FUTURE].max() == 0.0
    # The embedding is no image: each pixel reads it at its own position.
    assert (deps_c[np.arange(H)[:, None], np.arange(W), np.arange(H)[:, None], np.arange(W)]
            > 0).all()


def test_shifted_conv_reads_no_later_row_or_column():
    conv = pp.ShiftedConv(1, (2, 2), "down_right")
    x = jnp.zeros((1, 5, 5, 1))
    variables = conv.init(jax.random.key(0), x)
    g = jax.grad(lambda x: conv.apply(variables, x)[0, 2, 2, 0])(x)[0, ..., 0]
    nonzero = set(zip(*np.nonzero(np.asarray(g)), strict=True))
    assert nonzero == {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_dropout_uses_the_sample_stream_in_training_only():
    block = pp.GatedResnet("down", dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4))
    variables = numpy_init(block, x)
    apply = jax.jit(block.apply, static_argnames="train")
    a = apply(variables, x, train=True, rngs={"sample": jax.random.key(2)})
    b = apply(variables, x, train=True, rngs={"sample": jax.random.key(3)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(apply(variables, x), apply(variables, x))


def test_embedding_resolution_follows_resampling():
    net = pp.EmbeddingNet(features=4, num_blocks=3, down_after=(1,), up_after=(2, 3))
    out, _ = jax.eval_shape(net.init_with_output, jax.random.key(0), jnp.zeros((2, 4, 4, 3)))
    assert out.shape == (2, 8, 8, 4)


def test_bad_sizes_raise_clear_errors():
    net = pp.PixelCNNPP(features=4, num_resnet=1, out_features=2, num_stages=3)
    with pytest.raises(ValueError, match="divide by 2 \\*\\* \\(num_stages - 1\\)"):
        net.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
    with pytest.raises(ValueError, match="odd kernel width"):
        pp.ShiftedConv(1, (2, 2), "down").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
