"""PixelCNN decoders and the PixelCNN / Gated PixelCNN baselines.

``PixelDecoder`` is the autoregressive part every model here shares: a masked trunk
(masked ReLU convolutions or gated stacks) on the image, optionally conditioned on
latent features, then the 1x1 layers of appendix E.1 and a per-sub-pixel output:
one Bernoulli logit for binary data, ``num_levels`` softmax logits otherwise.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pvae_jax import distributions
from pvae_jax.models.conv_vae import scale_pixels
from pvae_jax.nn import pixelcnn as pc
from pvae_jax.nn.conv import Conv


def logits_per_sub_pixel(num_levels: int) -> int:
    """Binary data needs one logit per sub-pixel; K-level data K of them."""
    return 1 if num_levels == 2 else num_levels


def pixel_log_prob(logits, x_BxHxWxC, num_levels: int) -> jax.Array:
    """log p(x_d | ...) per sub-pixel, [B, H, W, C], from ``PixelDecoder`` logits."""
    if num_levels == 2:
        return distributions.bernoulli_log_prob(logits, x_BxHxWxC)
    return distributions.categorical_log_prob(logits, x_BxHxWxC)


def pixel_sample(key, logits, num_levels: int, temperature=1.0) -> jax.Array:
    """Draws sub-pixel values (int32) from ``PixelDecoder`` logits."""
    if num_levels == 2:
        return distributions.bernoulli_sample(key, logits, temperature)
    return distributions.categorical_sample(key, logits, temperature)


class PixelDecoder(nn.Module):
    """p(x | conditioning) as an autoregressive product over sub-pixels.

    Attributes:
      channels: image channels C; with C > 1 the sub-pixels of a pixel are ordered
        by colour (``num_groups = C``), so ``features`` must divide by C.
      num_levels: K; 2 gives Bernoulli outputs, otherwise a K-way softmax.
      gated: gated stacks (Gated PixelCNN) instead of masked ReLU convolutions.
      num_layers: masked layers: a ``first_kernel_size`` mask-'A' layer, then
        ``num_layers - 1`` of ``kernel_size``. 0 gives a factorised decoder that reads
        only the conditioning map (the plain VAE).
      features: channels of the masked layers.
      num_head_layers: the 1x1 masked layers before the output ("PixelCNN gated
        convolution 1x1" twice in appendix E.1).
      weight_norm: weight-normalise the masked convolutions.
      num_convs: gated layers per residual block after the first layer (E.1: 1;
        E.2's "[3x3] x 2": 2). Gated decoders only.
      embed_features: 0 feeds the trunk pixel values scaled to [-1, 1]; E > 0 a
        learned E-dim embedding of each sub-pixel's value (appendix E.2), laid out
        colour by colour so the colour groups stay contiguous.
      condition_all_layers: see ``GatedPixelCNNStack``; False conditions the first
        layer only (gated decoders).

    Returns from ``__call__``: logits ``[B, H, W, C]`` (binary) or ``[B, H, W, C, K]``.
    """

    channels: int
    num_levels: int
    gated: bool
    num_layers: int
    features: int
    first_kernel_size: int = 7
    kernel_size: int = 5
    num_head_layers: int = 2
    weight_norm: bool = False
    num_convs: int = 1
    embed_features: int = 0
    condition_all_layers: bool = True

    @nn.compact
    def __call__(self, x_BxHxWxC, cond_vector_BxD=None, cond_map_BxHxWxD=None):
        C, K = self.channels, logits_per_sub_pixel(self.num_levels)
        groups = C
        if self.num_layers == 0:
            if cond_map_BxHxWxD is None:
                raise ValueError("a decoder with num_layers=0 needs a conditioning map")
            out = Conv(C * K, (1, 1), name="out")(cond_map_BxHxWxD)
            return self._split(out)
        common = dict(num_groups=groups, weight_norm=self.weight_norm)
        x = self._trunk_input(x_BxHxWxC)
        if self.gated:
            h = pc.GatedPixelCNNStack(
                self.features, self.first_kernel_size, self.kernel_size, self.num_layers - 1,
                self.num_convs, condition_all_layers=self.condition_all_layers, name="trunk",
                **common)(x, cond_vector_BxD, cond_map_BxHxWxD)
        else:
            kernels = [self.first_kernel_size] + [self.kernel_size] * (self.num_layers - 1)
            h = pc.MaskedReLUStack(self.features, kernels, name="trunk", **common)(
                x, cond_vector_BxD, cond_map_BxHxWxD)
        for i in range(self.num_head_layers):
            if self.gated:
                h = pc.GatedConv1x1(self.features, name=f"head_{i}", **common)(
                    h, cond_vector_BxD, cond_map_BxHxWxD)
            else:
                h = nn.relu(pc.MaskedConv(self.features, 1, "B", name=f"head_{i}", **common)(h))
        # Output channel blocks follow the colour groups: reshape(C, K) splits them.
        out = pc.MaskedConv(C * K, 1, "B", name="out", **common)(h)
        return self._split(out)

    def _trunk_input(self, x_BxHxWxC):
        if not self.embed_features:
            return scale_pixels(x_BxHxWxC, self.num_levels)
        B, H, W, C = x_BxHxWxC.shape
        e_BxHxWxCxE = nn.Embed(self.num_levels, self.embed_features, name="embed")(x_BxHxWxC)
        return e_BxHxWxCxE.reshape(B, H, W, C * self.embed_features)

    def _split(self, out_BxHxWxCK):
        B, H, W, _ = out_BxHxWxCK.shape
        if self.num_levels == 2:
            return out_BxHxWxCK
        return out_BxHxWxCK.reshape(B, H, W, self.channels, self.num_levels)


class PixelCNN(nn.Module):
    """PixelCNN (masked ReLU convolutions) or Gated PixelCNN: p(x) with no latents."""

    image_hw: tuple[int, int]
    num_levels: int
    decoder: PixelDecoder

    def __call__(self, x_BxHxWxC, train: bool = False, kl_weight=1.0):
        del train, kl_weight  # No latents, no stochastic layers.
        nll_B = -self.conditional_log_prob(x_BxHxWxC).sum(axis=(1, 2, 3))
        return {"loss": nll_B, "recon": nll_B, "kl": jnp.zeros_like(nll_B)}

    def logits(self, x_BxHxWxC, latents=None):
        del latents
        return self.decoder(x_BxHxWxC)

    def conditional_log_prob(self, x_BxHxWxC, latents=None):
        return pixel_log_prob(self.logits(x_BxHxWxC, latents), x_BxHxWxC, self.num_levels)

    def importance_log_weights(self, x_BxHxWxC, num_samples: int):
        """log p(x) repeated S times, [B, S]: with no latents every weight is exact, so
        the importance-weighted NLL of a PixelCNN is its NLL for any S."""
        log_px_B = self.conditional_log_prob(x_BxHxWxC).sum(axis=(1, 2, 3))
        return jnp.broadcast_to(log_px_B[:, None], (log_px_B.shape[0], num_samples))

    def decoder_conditioning(self, latents=None):
        """(cond_vector, cond_map) of the decoder: none without latents."""
        del latents
        return None, None

    def posterior_sample(self, x_BxHxWxC):
        del x_BxHxWxC
        return None

    def prior_sample(self, num_samples: int, temperature=1.0):
        del num_samples, temperature
        return None
