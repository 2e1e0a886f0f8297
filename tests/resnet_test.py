"""Tests of pvae_jax.nn.resnet: shapes, resampling layout, weight norm, batch norm, errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pvae_jax.nn import resnet

RESAMPLES = [None, "down", "up"]
NORMS = ["batch", "weight", "none"]


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def _apply_block(block, variables, x, train):
    """Runs a block; in train mode returns the updated batch_stats too."""
    if train:
        return block.apply(variables, x, train=True, mutable=["batch_stats"])
    return block.apply(variables, x, train=False), {}


# --- depth_to_space / space_to_depth ---------------------------------------------------


def test_depth_to_space_matches_index_formula():
    r, c = 2, 3
    x = np.arange(2 * 3 * 4 * r * r * c, dtype=np.float32).reshape(2, 3, 4, r * r * c)
    y = np.asarray(resnet.depth_to_space(jnp.asarray(x), r))
    chex.assert_shape(y, (2, 3 * r, 4 * r, c))
    for b, h, w, i, j, k in np.ndindex(2, 3, 4, r, r, c):
        assert y[b, h * r + i, w * r + j, k] == x[b, h, w, (i * r + j) * c + k]


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_depth_and_space_are_inverse(block_size):
    r = block_size
    deep = _normal(0, (2, 3, 5, r * r * 4))
    wide = _normal(1, (2, 3 * r, 5 * r, 4))
    np.testing.assert_array_equal(resnet.space_to_depth(resnet.depth_to_space(deep, r), r), deep)
    np.testing.assert_array_equal(resnet.depth_to_space(resnet.space_to_depth(wide, r), r), wide)


def test_depth_to_space_jits():
    x = _normal(0, (1, 2, 2, 8))
    chex.assert_shape(jax.jit(resnet.depth_to_space, static_argnums=1)(x, 2), (1, 4, 4, 2))
    chex.assert_shape(jax.jit(resnet.space_to_depth, static_argnums=1)(x, 2), (1, 1, 1, 32))


# --- weight norm ----------------------------------------------------------------------


def _causal_mask_3x3(in_features, out_features):
    """Mask 'A' without colour groups: only rows above and the left of the centre."""
    mask = np.zeros((3, 3, in_features, out_features), np.float32)
    mask[0, :] = 1.0
    mask[1, 0] = 1.0
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_weight_norm_kernel_norm_equals_gain(masked):
    v = _normal(0, (3, 3, 4, 5))
    g = jnp.array([0.5, 1.0, 2.0, 3.0, 7.0])
    mask = _causal_mask_3x3(4, 5) if masked else None
    kernel = resnet.weight_norm_kernel(v, g, mask)
    np.testing.assert_allclose(jnp.linalg.norm(kernel.reshape(-1, 5), axis=0), g, rtol=1e-5)
    if masked:
        np.testing.assert_array_equal(kernel * (1 - mask), 0.0)


def test_weight_norm_kernel_of_fully_masked_channel_is_zero_not_nan():
    v = _normal(0, (1, 1, 3, 2))
    mask = np.ones((1, 1, 3, 2), np.float32)
    mask[..., 0] = 0.0  # e.g. a 1x1 mask 'A' output channel of the first colour

    def loss(v, g):
        return jnp.sum(resnet.weight_norm_kernel(v, g, mask) ** 2)

    kernel = resnet.weight_norm_kernel(v, jnp.ones(2), mask)
    np.testing.assert_array_equal(kernel[..., 0], 0.0)
    grads = jax.grad(loss, argnums=(0, 1))(v, jnp.ones(2))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize("masked", [False, True])
def test_weight_norm_conv_starts_as_plain_conv_with_init_kernel(masked):
    mask = _causal_mask_3x3(3, 4) if masked else None
    conv = resnet.WeightNormConv(4, mask=mask)
    x = _normal(0, (2, 6, 6, 3))
    params = conv.init(jax.random.key(1), x)["params"]
    kernel = params["v"] if mask is None else params["v"] * mask
    expected = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


def test_weight_norm_conv_is_invariant_to_scaling_v():
    conv = resnet.WeightNormConv(4, bias_init=jax.nn.initializers.normal(1.0))
    x = _normal(0, (2, 5, 5, 3))
    params = conv.init(jax.random.key(1), x)["params"]
    scaled = {**params, "v": 3.7 * params["v"]}
    np.testing.assert_allclose(
        conv.apply({"params": scaled}, x), conv.apply({"params": params}, x), rtol=1e-5, atol=1e-6
    )
    doubled_g = {**params, "g": 2.0 * params["g"]}
    np.testing.assert_allclose(
        conv.apply({"params": doubled_g}, x) - params["bias"],
        2.0 * (conv.apply({"params": params}, x) - params["bias"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_masked_weight_norm_conv_ignores_masked_taps():
    conv = resnet.WeightNormConv(4, mask=_causal_mask_3x3(3, 4))
    x = _normal(0, (1, 5, 5, 3))
    params = conv.init(jax.random.key(1), x)["params"]
    grad = jax.grad(lambda x: conv.apply({"params": params}, x)[0, 2, 2].sum())(x)
    taps = np.abs(np.asarray(grad[0])).sum(-1)  # [5, 5] influence on pixel (2, 2)
    allowed = np.zeros((5, 5), bool)
    allowed[1, 1:4] = True
    allowed[2, 1] = True
    assert np.all(taps[~allowed] == 0.0)
    assert np.all(taps[allowed] > 0.0)


def test_weight_norm_conv_rejects_mask_of_wrong_shape():
    conv = resnet.WeightNormConv(4, mask=np.ones((5, 5), np.float32))
    with pytest.raises(ValueError, match="mask"):
        conv.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "kwargs, expected_hw",
    [({}, 6), ({"strides": 2}, 3), ({"padding": "VALID"}, 4), ({"kernel_size": (1, 1)}, 6)],
)
def test_weight_norm_conv_shapes(kwargs, expected_hw, jit):
    conv = resnet.WeightNormConv(5, **kwargs)
    x = jnp.ones((2, 6, 6, 3))
    variables = conv.init(jax.random.key(0), x)
    y = _maybe_jit(conv.apply, jit)(variables, x)
    chex.assert_shape(y, (2, expected_hw, expected_hw, 5))
    chex.assert_tree_all_finite(y)


# --- sub-pixel conv and conv selection ------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("norm", NORMS)
def test_subpixel_conv_doubles_spatial_size(norm, jit):
    up = resnet.SubpixelConv(5, norm=norm)
    x = jnp.ones((2, 3, 4, 6))
    variables = up.init(jax.random.key(0), x)
    chex.assert_shape(_maybe_jit(up.apply, jit)(variables, x), (2, 6, 8, 5))


def test_make_conv_picks_weight_norm_only_for_weight():
    x = jnp.ones((1, 4, 4, 2))

    class Wrap(nn.Module):
        norm: str

        @nn.compact
        def __call__(self, x):
            return resnet.make_conv(self.norm, 3, name="conv")(x)

    for norm, names in [("weight", {"v", "g", "bias"}), ("batch", {"kernel", "bias"})]:
        params = Wrap(norm).init(jax.random.key(0), x)["params"]
        assert set(params["conv"]) == names


# --- residual block -------------------------------------------------------------------


# train only changes batch norm, so the other norms run in one mode.
NORM_TRAIN = [("batch", False), ("batch", True), ("weight", True), ("none", False)]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("norm, train", NORM_TRAIN)
@pytest.mark.parametrize("resample", RESAMPLES)
def test_residual_block_shapes(resample, norm, train, jit):
    # 4 -> 6 channels, so every resample mode takes its projection shortcut.
    block = resnet.ResidualBlock(6, resample=resample, norm=norm)
    x = _normal(0, (2, 8, 8, 4))
    variables = block.init(jax.random.key(1), x, train=False)
    run = _maybe_jit(functools.partial(_apply_block, block, train=train), jit)
    y, updates = run(variables, x)
    hw = {None: 8, "down": 4, "up": 16}[resample]
    chex.assert_shape(y, (2, hw, hw, 6))
    chex.assert_tree_all_finite(y)
    assert ("batch_stats" in variables) == (norm == "batch")
    if train and norm == "batch":
        chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])


@pytest.mark.parametrize("norm", NORMS)
def test_identity_shortcut_when_last_conv_is_zero(norm):
    block = resnet.ResidualBlock(5, norm=norm)
    x = _normal(0, (3, 6, 6, 5))
    variables = block.init(jax.random.key(1), x, train=False)
    assert "shortcut" not in variables["params"]
    params = dict(variables["params"])
    params["conv2"] = jax.tree.map(jnp.zeros_like, params["conv2"])
    variables = {**variables, "params": params}
    for train in (False, True):
        y, _ = _apply_block(block, variables, x, train)
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resample", RESAMPLES)
def test_shortcut_is_a_projection_when_shape_changes(resample):
    features = 4 if resample else 7
    block = resnet.ResidualBlock(features, resample=resample, norm="none")
    params = block.init(jax.random.key(0), jnp.ones((1, 4, 4, 4)), train=False)["params"]
    shortcut = params["shortcut"]
    kernel = shortcut["conv"]["kernel"] if resample == "up" else shortcut["kernel"]
    width = 4 * features if resample == "up" else features
    chex.assert_shape(kernel, (1, 1, 4, width))


def test_down_block_keeps_input_width_until_strided_conv2():
    block = resnet.ResidualBlock(8, resample="down", norm="none")
    params = block.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)), train=False)["params"]
    chex.assert_shape(params["conv1"]["kernel"], (3, 3, 3, 3))
    chex.assert_shape(params["conv2"]["kernel"], (3, 3, 3, 8))


def test_batch_norm_train_mode_updates_running_stats():
    block = resnet.ResidualBlock(4, norm="batch")
    x = 3.0 + 2.0 * _normal(0, (4, 6, 6, 4))
    variables = block.init(jax.random.key(1), x, train=False)
    _, updates = _apply_block(block, variables, x, train=True)
    before = variables["batch_stats"]["norm1"]
    after = updates["batch_stats"]["norm1"]
    # momentum 0.9 moves the running mean a tenth of the way to the batch mean (about 3)
    np.testing.assert_allclose(after["mean"], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-4)
    assert not np.allclose(after["var"], before["var"])
    assert set(updates["batch_stats"]) == {"norm1", "norm2"}


def test_batch_norm_eval_uses_running_stats():
    # With momentum 0 the running stats after one step are that batch's stats, so eval
    # on the same batch must reproduce the train output exactly.
    block = resnet.ResidualBlock(4, norm="batch", bn_momentum=0.0)
    x = 3.0 + 2.0 * _normal(0, (4, 6, 6, 4))
    variables = block.init(jax.random.key(1), x, train=False)
    y_train, updates = _apply_block(block, variables, x, train=True)
    y_eval, _ = _apply_block(block, {**variables, **updates}, x, train=False)
    y_eval_init, _ = _apply_block(block, variables, x, train=False)
    np.testing.assert_allclose(y_eval, y_train, rtol=1e-4, atol=1e-4)
    assert not np.allclose(y_eval_init, y_train, atol=1e-2)


def test_batch_norm_couples_examples_only_in_train_mode():
    block = resnet.ResidualBlock(4, norm="batch")
    x = _normal(0, (4, 6, 6, 4))
    other = x.at[1:].set(5.0 * _normal(1, (3, 6, 6, 4)))
    variables = block.init(jax.random.key(2), x, train=False)
    for train, coupled in ((False, False), (True, True)):
        y, _ = _apply_block(block, variables, x, train)
        y_other, _ = _apply_block(block, variables, other, train)
        assert np.allclose(y[0], y_other[0], atol=1e-6) != coupled


def test_block_gradients_are_finite():
    block = resnet.ResidualBlock(4, resample="up", norm="weight")
    x = _normal(0, (2, 4, 4, 3))
    params = block.init(jax.random.key(1), x, train=False)["params"]
    loss = lambda p: jnp.sum(block.apply({"params": p}, x, train=True) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    chex.assert_tree_all_finite(grads)
    assert float(jnp.abs(grads["conv1"]["conv"]["g"]).sum()) > 0


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "layer"}, r"norm='layer'.*'batch', 'weight', 'none'"),
        ({"resample": "left"}, r"resample='left'.*None, 'down', 'up'"),
        ({"kernel_size": 4}, r"kernel_size=4.*odd"),
        ({"kernel_size": 0}, r"kernel_size=0.*odd"),
        ({"features": 0}, r"features=0"),
    ],
)
def test_residual_block_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resnet.ResidualBlock(**{"features": 4, **kwargs})


def test_down_block_rejects_odd_spatial_size():
    block = resnet.ResidualBlock(4, resample="down")
    with pytest.raises(ValueError, match=r"resample='down'.*even.*7x8"):
        block.init(jax.random.key(0), jnp.ones((1, 7, 8, 4)), train=False)


def test_make_conv_rejects_unknown_norm():
    with pytest.raises(ValueError, match=r"norm='group'.*'batch', 'weight', 'none'"):
        resnet.make_conv("group", 4)


def test_depth_space_reject_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="block_size\\*\\*2=4"):
        resnet.depth_to_space(jnp.ones((1, 2, 2, 6)), 2)
    with pytest.raises(ValueError, match="block_size=2.*3x4"):
        resnet.space_to_depth(jnp.ones((1, 3, 4, 2)), 2)
    with pytest.raises(ValueError, match="block_size=0"):
        resnet.depth_to_space(jnp.ones((1, 2, 2, 4)), 0)


@pytest.mark.parametrize("kernel_size", [0, (3, 0), (3, 3, 3)])
def test_weight_norm_conv_rejects_bad_kernel_size(kernel_size):
    conv = resnet.WeightNormConv(4, kernel_size=kernel_size)
    with pytest.raises(ValueError, match="kernel_size=.*positive int or a pair"):
        conv.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
