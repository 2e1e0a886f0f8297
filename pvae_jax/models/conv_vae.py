"""The convolutional encoder and decoder of PixelVAE's appendix E.1 (MNIST).

The tables are written for 28x28: three stride-2 stages 28 -> 14 -> 7 -> 4 (with the
7x7 maps padded to 8x8) and a decoder that mirrors them (cropping 8x8 to 7x7). Here
every stride-2 convolution uses 'SAME' padding, which gives ceil(n / 2) and so pads
odd sizes exactly as the table does, and the decoder crops each upsampled map to the
size the encoder had at that stage. Any image size >= 1 therefore works, 28x28 giving
the table's shapes.

All convolutions use ReLU, as the appendix says, with He initialisation so that z's
signal keeps its scale through the decoder's ReLU stack at initialisation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pvae_jax.nn.conv import Conv

_he_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def stage_sizes(size: int, num_stages: int = 3) -> list[int]:
    """Spatial sizes after each stride-2 stage: [size, ceil(size/2), ...]."""
    sizes = [size]
    for _ in range(num_stages):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def scale_pixels(x_BxHxWxC: jax.Array, num_levels: int) -> jax.Array:
    """Integer pixels in [0, num_levels) to floats in [-1, 1]."""
    return x_BxHxWxC.astype(jnp.float32) * (2.0 / (num_levels - 1)) - 1.0


class Encoder(nn.Module):
    """x -> (mean, log_std) of q(z|x): the appendix E.1 encoder table."""

    latent_dim: int
    features: tuple[int, int] = (32, 64)

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        f1, f2 = self.features
        # (features, stride) of each row of the table.
        layers = [(f1, 1), (f1, 2), (f1, 1), (f2, 2), (f2, 1), (f2, 2), (f2, 1), (f2, 1), (f2, 1)]
        h = x_BxHxWxC
        for i, (features, stride) in enumerate(layers):
            h = nn.relu(Conv(features, (3, 3), (stride, stride), "SAME", kernel_init=_he_init,
                             name=f"conv_{i}")(h))
        stats = nn.Dense(2 * self.latent_dim, name="out")(h.reshape(h.shape[0], -1))
        mean, log_std = jnp.split(stats, 2, axis=-1)
        return mean, log_std


class Decoder(nn.Module):
    """z -> feature maps at the image resolution: the appendix E.1 decoder table up to
    its PixelCNN layers (Linear, 3x3 convs, three stride-2 transposed convs)."""

    image_hw: tuple[int, int]
    features: tuple[int, int] = (32, 64)

    @nn.compact
    def __call__(self, z_BxD: jax.Array) -> jax.Array:
        f1, f2 = self.features
        hs, ws = stage_sizes(self.image_hw[0]), stage_sizes(self.image_hw[1])
        h = nn.relu(nn.Dense(hs[3] * ws[3] * f2, kernel_init=_he_init, name="in")(z_BxD))
        h = h.reshape(-1, hs[3], ws[3], f2)
        # (transposed?, features) of each row of the table; each transposed conv doubles
        # the size and is cropped to the encoder's size at that stage.
        layers = [(False, f2), (False, f2), (True, f2), (False, f2),
                  (True, f1), (False, f1), (True, f1), (False, f1)]
        stage = 3
        for i, (transposed, features) in enumerate(layers):
            if transposed:
                stage -= 1
                h = nn.ConvTranspose(features, (3, 3), (2, 2), "SAME", kernel_init=_he_init,
                                     name=f"conv_{i}")(h)
                h = h[:, : hs[stage], : ws[stage]]
            else:
                h = Conv(features, (3, 3), padding="SAME", kernel_init=_he_init,
                         name=f"conv_{i}")(h)
            h = nn.relu(h)
        return h
