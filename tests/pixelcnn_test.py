"""Tests of the PixelCNN layers: exact receptive fields by Jacobian, crops, shapes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pvae_jax.nn import cpu_kernels, masks
from pvae_jax.nn import pixelcnn as pc


def _dependency(module, x_HxWxC, *cond):
    """[H, W, C_out, H, W, C_in] booleans: does output sub-pixel depend on input sub-pixel?"""
    variables = module.init(jax.random.key(0), x_HxWxC[None], *cond)
    f = lambda x: module.apply(variables, x[None], *cond)[0]
    return np.asarray(jax.jit(jax.jacfwd(f))(x_HxWxC) != 0)


def _order(H, W, C):
    """Sub-pixel position in the raster-then-colour order, [H, W, C]."""
    return np.arange(H * W * C).reshape(H, W, C)


class _Head(nn.Module):
    """A trunk followed by the usual masked 1x1 output layer back to C channels."""

    trunk: nn.Module
    channels: int
    num_groups: int

    @nn.compact
    def __call__(self, x, *cond):
        h = self.trunk(x, *cond)
        return pc.MaskedConv(self.channels, 1, "B", num_groups=self.num_groups)(h)


def _gated_receptive_field(H, W, C, kernel_sizes, num_groups):
    """The receptive field a Gated PixelCNN must have: the rectangle of rows above of
    half-width P = sum(k // 2) and height P + 1, the P pixels to the left, and the
    earlier colour groups of the current pixel."""
    P = sum(k // 2 for k in kernel_sizes)
    group = masks.channel_groups(C, num_groups)
    want = np.zeros((H, W, C, H, W, C), bool)
    for i in range(H):
        for j in range(W):
            for c in range(C):
                r = want[i, j, c]
                r[max(i - 1 - P, 0) : i, max(j - P, 0) : j + P + 1] = True
                r[i, max(j - P, 0) : j] = True
                r[i, j] = group < group[c]
    return want


@pytest.mark.parametrize("num_layers, kernel", [(1, 5), (2, 3), (2, 5), (5, 3)])
@pytest.mark.parametrize("C, groups", [(3, 3), (1, 1)])
def test_gated_stack_receptive_field_is_exact(num_layers, kernel, C, groups):
    """Causal (nothing at or after the sub-pixel) and no blind spot (everything in the
    expected field counts), for every output sub-pixel and every input sub-pixel."""
    H = W = 7
    trunk = pc.GatedPixelCNNStack(features=6, first_kernel_size=kernel, kernel_size=kernel,
                                  num_blocks=num_layers - 1, num_groups=groups)
    x = jax.random.uniform(jax.random.key(1), (H, W, C))
    got = _dependency(_Head(trunk, C, groups), x)
    want = _gated_receptive_field(H, W, C, [kernel] * num_layers, groups)
    np.testing.assert_array_equal(got, want)


def test_gated_stack_is_causal_where_its_vertical_stack_takes_winograd():
    """With 16 channels and 5-wide kernels the vertical stack's forward convolutions and
    input gradients take Winograd's F(4, 5) (AVX-512 builds), which mixes the columns
    of the rows they read at the rounding level. Nothing at or after a sub-pixel may
    still move its output, to the bit, by perturbation (the forward pass) or by
    gradient (reverse mode); the field is the exact one's plus, at most, rows above."""
    H, W = 4, 16  # wider than the field (half-width 7), so the mixing can show
    trunk = pc.GatedPixelCNNStack(features=16, first_kernel_size=7, kernel_size=5,
                                  num_blocks=2)
    model = _Head(trunk, 1, 1)
    x = jax.random.uniform(jax.random.key(1), (1, H, W, 1))
    variables = model.init(jax.random.key(0), x)
    f = lambda x: model.apply(variables, x)[0, :, :, 0]  # noqa: E731
    grad = jax.jit(jax.grad(lambda x, i, j: f(x)[i, j]))
    winograd = cpu_kernels.wide_blocks()
    if winograd:
        # the two gated layers' vertical stacks, forward and input gradient
        assert grad.lower(x, 0, 0).compile().as_text().count("winograd = 1") >= 4
    order = _order(H, W, 1)[..., 0]
    want = _gated_receptive_field(H, W, 1, [7, 5, 5], 1)[:, :, 0, :, :, 0]
    forward = jax.jit(f)
    y = np.asarray(forward(x))
    beyond = 0  # rounding-level reads outside the exact field, in the rows above
    for i in range(H):
        for j in range(W):
            moved = np.asarray(forward(x.at[0, i, j, 0].add(0.5)))
            np.testing.assert_array_equal(moved[order <= order[i, j]], y[order <= order[i, j]])
            reads = np.asarray(grad(x, i, j))[0, :, :, 0] != 0
            assert not reads[order >= order[i, j]].any()
            assert reads[want[i, j]].all()
            assert not (reads & ~want[i, j])[i:].any()
            beyond += (reads & ~want[i, j]).sum()
    assert (beyond > 0) == winograd  # so the test saw Winograd's mixing


def test_gated_residual_blocks_with_two_convs_keep_the_field():
    H = W = 7
    trunk = pc.GatedPixelCNNStack(features=6, first_kernel_size=5, kernel_size=3,
                                  num_blocks=1, num_convs=2, num_groups=3)
    x = jax.random.uniform(jax.random.key(2), (H, W, 3))
    got = _dependency(_Head(trunk, 3, 3), x)
    np.testing.assert_array_equal(got, _gated_receptive_field(H, W, 3, [5, 3, 3], 3))


@pytest.mark.parametrize("C, groups", [(3, 3), (1, 1)])
@pytest.mark.parametrize("kernel_sizes", [[3], [5, 3], [7, 3, 3, 3]])
def test_masked_relu_stack_is_causal(C, groups, kernel_sizes):
    H = W = 6
    trunk = pc.MaskedReLUStack(features=12, kernel_sizes=kernel_sizes, num_groups=groups)
    # A ReLU unit is off for about half of the inputs, so all 4 units of a colour group
    # in one layer are off for 1/16; a path through 4 layers is cut for at most 1/4 of
    # the inputs, and for all of 32 inputs with probability below 4**-32.
    model = _Head(trunk, C, groups)
    x_NxHxWxC = jax.random.normal(jax.random.key(3), (32, H, W, C))
    variables = model.init(jax.random.key(0), x_NxHxWxC[:1])
    jac = jax.jit(jax.vmap(jax.jacfwd(lambda x: model.apply(variables, x[None])[0])))
    dep = np.asarray(jac(x_NxHxWxC) != 0).any(axis=0)
    order = _order(H, W, C)
    later_or_same = order[None, None, None] >= order[..., None, None, None]
    assert not (dep & later_or_same).any()
    # It must not be trivially causal: the left neighbour and earlier colours count.
    for i, j, c in np.ndindex(H, W, C):
        assert j == 0 or dep[i, j, c, i, j - 1].all()
        assert dep[i, j, c, i, j, :c].all()


def test_conditioning_reaches_every_position_without_breaking_causality():
    H, W, C, D = 5, 5, 3, 4
    trunk = pc.GatedPixelCNNStack(6, 3, 3, num_blocks=1, num_groups=3)
    model = _Head(trunk, C, 3)
    x = jax.random.uniform(jax.random.key(4), (1, H, W, C))
    vec = jax.random.normal(jax.random.key(5), (1, D))
    cmap = jax.random.normal(jax.random.key(6), (1, H, W, D))
    variables = model.init(jax.random.key(0), x, vec, cmap)
    d_vec = jax.jacfwd(lambda v: model.apply(variables, x, v, cmap))(vec)
    assert (np.abs(np.asarray(d_vec)).sum(axis=(-2, -1)) > 0).all()
    d_map = jax.jacfwd(lambda m: model.apply(variables, x, vec, m))(cmap)
    # Output (i, j) reads the map at (i, j) through every layer's 1x1 conditioning.
    diag = np.asarray(d_map)[0, np.arange(H)[:, None], np.arange(W), :, 0,
                             np.arange(H)[:, None], np.arange(W)]
    assert (np.abs(diag).sum(axis=(-2, -1)) > 0).all()
    dep = _dependency(_Head(trunk, C, 3), x[0], vec, cmap)
    np.testing.assert_array_equal(dep, _gated_receptive_field(H, W, C, [3, 3], 3))


@pytest.mark.parametrize("stack, mask_type", [("full", "A"), ("full", "B"),
                                              ("vertical", "B"), ("horizontal", "A"),
                                              ("horizontal", "B")])
@pytest.mark.parametrize("weight_norm", [False, True])
def test_cropped_masked_conv_equals_full_kernel_times_mask(stack, mask_type, weight_norm):
    k, C, F, groups = 5, 3, 6, 3
    conv = pc.MaskedConv(F, k, mask_type, stack=stack, num_groups=groups,
                         weight_norm=weight_norm)
    x = jax.random.normal(jax.random.key(7), (2, 6, 7, C))
    variables = conv.init(jax.random.key(8), x)
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # a non-zero bias, g != ||v||
    params = variables["params"]
    full_mask = pc.layer_mask(stack, k, C, F, mask_type, groups)
    cropped = full_mask.shape[:2]
    if weight_norm:
        from pvae_jax.nn.resnet import weight_norm_kernel

        r0, r1, c0, c1 = masks.support_box(full_mask)
        small = weight_norm_kernel(params["v"], params["g"], full_mask[r0:r1 + 1, c0:c1 + 1])
    else:
        small = params["kernel"]
        r0, r1, c0, c1 = masks.support_box(full_mask)
    kernel = jnp.zeros(cropped + (C, F)).at[r0:r1 + 1, c0:c1 + 1].set(small) * full_mask
    ref = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), [(cropped[0] // 2,) * 2, (cropped[1] // 2,) * 2],
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["bias"]
    np.testing.assert_allclose(conv.apply(variables, x), ref, rtol=1e-5, atol=1e-5)


def test_weight_norm_starts_as_the_plain_masked_conv():
    conv = pc.MaskedConv(4, 3, "B", weight_norm=True)
    x = jax.random.normal(jax.random.key(9), (1, 5, 5, 2))
    variables = conv.init(jax.random.key(0), x)
    p = variables["params"]
    plain = {"params": {"kernel": p["v"], "bias": p["bias"]}}
    np.testing.assert_allclose(conv.apply(variables, x),
                               pc.MaskedConv(4, 3, "B").apply(plain, x), rtol=1e-5, atol=1e-6)


def test_shift_down_and_gate():
    x = jnp.arange(2 * 3 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 4)
    y = pc.shift_down(x)
    np.testing.assert_array_equal(y[:, 0], 0)
    np.testing.assert_array_equal(y[:, 1:], x[:, :-1])
    g = pc.gate(x)
    np.testing.assert_allclose(g, np.tanh(x[..., :2]) / (1 + np.exp(-x[..., 2:])), rtol=1e-6)


def test_row_above_dense_is_dense_of_the_shifted_input():
    x = jax.random.normal(jax.random.key(1), (2, 5, 6, 8))
    dense, row_above = nn.Dense(12), pc.RowAboveDense(12)
    variables = dense.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(row_above.init(jax.random.key(0), x), variables)
    # A non-zero bias: row 0 reads shift_down's zeros, so it must be the bias alone.
    variables["params"]["bias"] = jax.random.normal(jax.random.key(2), (12,))
    want = lambda v, x: dense.apply(v, pc.shift_down(x))
    got = lambda v, x: row_above.apply(v, x)
    np.testing.assert_allclose(got(variables, x), want(variables, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got(variables, x)[:, 0], np.broadcast_to(
        variables["params"]["bias"], (2, 6, 12)), rtol=1e-6)
    loss = lambda f: lambda v, x: jnp.sum(jnp.sin(f(v, x)))
    chex.assert_trees_all_close(jax.grad(loss(got), argnums=(0, 1))(variables, x),
                                jax.grad(loss(want), argnums=(0, 1))(variables, x),
                                rtol=1e-5, atol=1e-5)


def test_gate_matches_tanh_times_sigmoid_for_either_sign_and_its_gradient():
    x = np.random.default_rng(0).normal(scale=4.0, size=(3, 4, 5, 6)).astype(np.float32)
    a, b = np.split(x.astype(np.float64), 2, axis=-1)
    want = np.tanh(a) / (1 + np.exp(-b))
    np.testing.assert_allclose(pc.gate(jnp.asarray(x)), want, atol=2e-7)
    # d/db of tanh(a) sigmoid(b) is tanh(a) sigmoid(b) (1 - sigmoid(b)).
    grad = jax.grad(lambda x: pc.gate(x).sum())(jnp.asarray(x))
    sig = 1 / (1 + np.exp(-b))
    np.testing.assert_allclose(grad[..., 3:], np.tanh(a) * sig * (1 - sig), atol=1e-6)
    np.testing.assert_allclose(grad[..., :3], (1 - np.tanh(a) ** 2) * sig, atol=1e-6)
    with pytest.raises(ValueError, match="even number of channels"):
        pc.gate(jnp.zeros((1, 2, 2, 5)))


@pytest.mark.parametrize("bias_shape", [(6,), (2, 1, 1, 6), (2, 3, 4, 6), (1, 1, 6), ()])
def test_add_bias_is_the_plain_add_forward_and_in_both_modes(bias_shape):
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(2, 3, 4, 6)), jnp.float32)
    b = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    # Two biases on one output, as a gated layer has: they share the sum over pixels.
    ours = lambda y, b: pc.add_bias(pc.add_bias(y, b), 2.0 * b) ** 2  # noqa: E731
    plain = lambda y, b: (y + b + 2.0 * b) ** 2  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(y, b), plain(y, b), rtol=1e-6)
    w = jnp.asarray(rng.normal(size=y.shape), jnp.float32)

    def grad(f):
        return jax.jit(jax.grad(lambda y, b: (f(y, b) * w).sum(), argnums=(0, 1)))(y, b)

    for got, want in zip(grad(ours), grad(plain), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    tangents = (jnp.ones_like(y), jnp.ones_like(b))
    np.testing.assert_allclose(jax.jvp(ours, (y, b), tangents)[1],
                               jax.jvp(plain, (y, b), tangents)[1], rtol=1e-5, atol=1e-5)


_SHAPE_CASES = [
    (pc.MaskedConv(9, 3, "A", num_groups=3), (), 9),
    (pc.MaskedConv(4, 5, "B", stack="horizontal", gated=True, weight_norm=True), (), 8),
    (pc.GatedPixelCNNStack(6, 7, 5, num_blocks=2, num_groups=3), ("vec", "map"), 6),
    (pc.MaskedReLUStack(6, [7, 5], num_groups=3), ("map",), 6),
    (pc.GatedConv1x1(6, num_groups=3), ("vec",), 6),
]


@pytest.mark.parametrize("module, cond, out_channels", _SHAPE_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_shapes(module, cond, out_channels, jit):
    B, H, W, C, D = 2, 8, 6, 6 if isinstance(module, pc.GatedConv1x1) else 3, 5
    x = jnp.ones((B, H, W, C))
    args = [None, None]
    if "vec" in cond:
        args[0] = jnp.ones((B, D))
    if "map" in cond:
        args[1] = jnp.ones((B, H, W, D))
    if isinstance(module, pc.MaskedConv):
        args = []
    variables = module.init(jax.random.key(0), x, *args)
    apply = jax.jit(module.apply) if jit else module.apply
    y = apply(variables, x, *args)
    chex.assert_shape(y, (B, H, W, out_channels))
    chex.assert_tree_all_finite(y)


@pytest.mark.parametrize("jit", [False, True])
def test_gated_layer_shapes(jit):
    layer = pc.GatedStackLayer(4, 3, "B", num_groups=2)
    v = h = jnp.ones((3, 5, 5, 4))
    variables = layer.init(jax.random.key(0), v, h)
    apply = jax.jit(layer.apply) if jit else layer.apply
    v2, h2 = apply(variables, v, h)
    chex.assert_shape([v2, h2], (3, 5, 5, 4))


def test_bad_input():
    x = jnp.ones((1, 4, 4, 3))
    with pytest.raises(ValueError, match="stack must be one of"):
        pc.MaskedConv(3, 3, stack="diagonal").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        pc.MaskedConv(3, 2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="mask_type"):
        pc.MaskedConv(3, 3, "b").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_groups"):
        pc.MaskedConv(4, 3, num_groups=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="residual=True needs"):
        pc.GatedStackLayer(6, 3).init(jax.random.key(0), x, x)
