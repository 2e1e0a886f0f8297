"""Hierarchical PixelVAE (Gulrajani et al., 2017, section 3.1 and appendix E.2).

Inference goes up, generation down. The encoder embeds each sub-pixel's value,
maps it with a 1x1 convolution and then, level by level, with residual networks:
x -> h_1 -> ... -> h_L. q(z_i | x) is a diagonal Gaussian read from h_i by a 1x1
convolution (feature-map latents) or, at the top, by a linear map of the flattened
h_L (a vector: E.2's "Linear 4x4x512" decoder input, section 4.2's "1x1" latents).
The posterior factorises over levels, q(z_1..z_L | x) = prod_i q(z_i | x).

The generator: p(z_L) = N(0, I); p(z_i | z_{i+1}) is a gated PixelCNN over z_i's
positions conditioned on the decoder of level i+1 (z_{i+1} upsampled to z_i's size),
with a diagonal Gaussian per position whose channels are independent given the
positions before (the paper's simplification); p(x | z_1) is a ``PixelDecoder``
with learned pixel embeddings conditioned on z_1 upsampled to the image size.

The loss is section 3.1's bound: -log p(x | z_1) + sum_i KL_i with every z drawn
from q, where KL_i = KL(q(z_i | x) || p(z_i | z_{i+1})) is computed in closed form
position by position from the prior's output on the drawn z_i (an unbiased estimate
of the expected KL), and KL_L = KL(q(z_L | x) || N(0, I)) exactly.

Layers as E.2: pre-activation ELU residual blocks with batch norm (``norm``), stride-2
down, sub-pixel up; weight norm in the masked convolutions. Batch norm uses the batch's
statistics when ``train=True`` and running averages (momentum 0.9) otherwise, so the
evaluation, sampling and reconstructions of an image do not depend on its batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pvae_jax import distributions
from pvae_jax.models.pixelcnn import PixelDecoder, pixel_log_prob
from pvae_jax.nn import pixelcnn as pc
from pvae_jax.nn.conv import Conv
from pvae_jax.nn.resnet import ResidualBlock

_BLOCK = re.compile(r"^(\d+)([du]?)$")
_RESAMPLE = {"": None, "d": "down", "u": "up"}

Blocks = tuple[tuple[int, str | None], ...]


def parse_blocks(spec: str, field: str) -> Blocks:
    """'192 256d 256' -> ((192, None), (256, 'down'), (256, None)); 'u' marks 'up'.

    Raises:
      ValueError: naming ``field`` when the spec is empty or a token is not ``<int>[d|u]``.
    """
    tokens = spec.split()
    blocks = []
    for token in tokens:
        match = _BLOCK.match(token)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"{field}: bad residual block {token!r} in {spec!r}; write each "
                             "block as its width, followed by 'd' (down x2) or 'u' (up x2)")
        blocks.append((int(match.group(1)), _RESAMPLE[match.group(2)]))
    if not blocks:
        raise ValueError(f"{field}: every level needs at least one residual block, got {spec!r}")
    return tuple(blocks)


def level_sizes(image_hw: Sequence[int], encoder_blocks: Sequence[Blocks]) -> list[tuple[int, int]]:
    """(h, w) of h_i for every level, bottom first.

    Raises:
      ValueError: a 'down' block meets an odd size.
    """
    h, w = image_hw
    sizes = []
    for level, blocks in enumerate(encoder_blocks):
        for _, resample in blocks:
            if resample == "down":
                if h % 2 or w % 2:
                    raise ValueError(
                        f"model.encoder_blocks[{level}] halves a {h}x{w} map, which is odd: "
                        f"images of {image_hw[0]}x{image_hw[1]} cannot go through "
                        f"{_num_resamples(encoder_blocks, 'down')} down-sampling blocks; "
                        "change data.image_size or the blocks")
                h, w = h // 2, w // 2
        sizes.append((h, w))
    return sizes


def _num_resamples(blocks_per_level: Sequence[Blocks], kind: str) -> int:
    return sum(r == kind for blocks in blocks_per_level for _, r in blocks)


class ResNet(nn.Module):
    """A chain of E.2 residual blocks."""

    blocks: Blocks
    norm: str = "batch"

    @nn.compact
    def __call__(self, h_BxHxWxC, train: bool):
        for i, (features, resample) in enumerate(self.blocks):
            h_BxHxWxC = ResidualBlock(features, resample, self.norm, name=f"block_{i}")(
                h_BxHxWxC, train)
        return h_BxHxWxC


class LatentPixelCNN(nn.Module):
    """The prior p(z_i | z_{i+1}): a gated PixelCNN over z_i's positions.

    Every channel of a position reads the positions before it (raster order) and the
    conditioning map, never its own position (one colour group, mask 'A' first), and
    gets a Gaussian (mean, log_std): channels are independent given the past.
    """

    channels: int
    features: int
    num_blocks: int = 3
    first_kernel_size: int = 5
    kernel_size: int = 3
    num_convs: int = 2
    weight_norm: bool = True

    @nn.compact
    def __call__(self, z_BxHxWxC, cond_map_BxHxWxD):
        h = pc.GatedPixelCNNStack(
            self.features, self.first_kernel_size, self.kernel_size, self.num_blocks,
            self.num_convs, num_groups=1, weight_norm=self.weight_norm,
            condition_all_layers=False, name="trunk")(z_BxHxWxC, None, cond_map_BxHxWxD)
        stats = nn.Dense(2 * self.channels, name="out")(h)
        mean, log_std = jnp.split(stats, 2, axis=-1)
        return mean, log_std


class HierarchicalPixelVAE(nn.Module):
    """L levels of latents (any L >= 1), bottom level first in every list.

    Attributes:
      image_hw: (H, W) of the images.
      num_levels: K of the pixel distribution.
      embed_features: width of the encoder's embedding of each sub-pixel value.
      stem_features: the 1x1 convolution after the embedding.
      encoder_blocks: per level, the residual blocks from h_{i-1} to h_i.
      decoder_blocks: per level, the residual blocks from z_i to the conditioning map
        of the level below (the image for level 1); as many 'up' blocks as the
        encoder of that level has 'down' blocks. The first block's width is also
        the width of the map z_i is projected to.
      latent_channels: per level, channels of z_i; the top level's is the size of
        its vector.
      latent_pixel_features: width of the latent PixelCNN priors.
      latent_pixel_blocks: their gated residual blocks after the first layer.
      decoder: the pixel-level PixelCNN p(x | z_1).
      norm: normalisation of the residual blocks ('batch' as in E.2, 'weight', 'none').
    """

    image_hw: tuple[int, int]
    num_levels: int
    embed_features: int
    stem_features: int
    encoder_blocks: tuple[Blocks, ...]
    decoder_blocks: tuple[Blocks, ...]
    latent_channels: tuple[int, ...]
    latent_pixel_features: int
    latent_pixel_blocks: int
    decoder: PixelDecoder
    norm: str = "batch"

    @property
    def num_latent_levels(self) -> int:
        return len(self.latent_channels)

    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Shape of one image's z_i per level: (h, w, c) for maps, (c,) at the top."""
        sizes = level_sizes(self.image_hw, self.encoder_blocks)
        shapes = [(*hw, c) for hw, c in zip(sizes, self.latent_channels, strict=True)]
        shapes[-1] = (self.latent_channels[-1],)
        return shapes

    def setup(self):
        sizes = level_sizes(self.image_hw, self.encoder_blocks)
        self.top_hw = sizes[-1]
        self.embed = nn.Embed(self.num_levels, self.embed_features)
        self.stem = Conv(self.stem_features, (1, 1))
        self.encoders = [ResNet(b, self.norm) for b in self.encoder_blocks]
        self.decoders = [ResNet(b, self.norm) for b in self.decoder_blocks]
        self.posterior_heads = [Conv(2 * c, (1, 1)) for c in self.latent_channels[:-1]] + [
            nn.Dense(2 * self.latent_channels[-1])]
        top_width = self.decoder_blocks[-1][0][0]
        self.decoder_inputs = [Conv(b[0][0], (1, 1)) for b in self.decoder_blocks[:-1]] + [
            nn.Dense(math.prod(self.top_hw) * top_width)]
        self.priors = [LatentPixelCNN(**self.prior_fields(level))
                       for level in range(self.num_latent_levels - 1)]

    def prior_fields(self, level: int) -> dict:
        """The fields of map level ``level``'s ``LatentPixelCNN``, for samplers to read."""
        return dict(channels=self.latent_channels[level], features=self.latent_pixel_features,
                    num_blocks=self.latent_pixel_blocks, weight_norm=self.decoder.weight_norm)

    # -- inference ------------------------------------------------------------------

    def posterior(self, x_BxHxWxC, train: bool = False):
        """[(mean, log_std)] of q(z_i | x) per level, bottom first."""
        B, H, W, C = x_BxHxWxC.shape
        h = self.embed(x_BxHxWxC).reshape(B, H, W, C * self.embed_features)
        h = self.stem(h)
        stats = []
        for level, (encoder, head) in enumerate(zip(self.encoders, self.posterior_heads,
                                                    strict=True)):
            h = encoder(h, train)
            top = level == self.num_latent_levels - 1
            s = head(h.reshape(B, -1) if top else h)
            stats.append(tuple(jnp.split(s, 2, axis=-1)))
        return stats

    def posterior_sample(self, x_BxHxWxC, train: bool = False):
        """A tuple (z_1, ..., z_L) drawn from q(z | x)."""
        return tuple(distributions.gaussian_sample(self.make_rng("sample"), m, s)
                     for m, s in self.posterior(x_BxHxWxC, train))

    # -- generation -----------------------------------------------------------------

    def decode_level(self, level: int, z, train: bool = False):
        """z_{level+1} (0-based ``level``) to the conditioning map of the level below."""
        h = self.decoder_inputs[level](z)
        if level == self.num_latent_levels - 1:
            h = h.reshape(z.shape[0], *self.top_hw, -1)
        return self.decoders[level](h, train)

    def latent_prior(self, level: int, z_BxHxWxC, z_above, train: bool = False):
        """(mean, log_std) of p(z_level | z_level+1) at every position of ``z_BxHxWxC``."""
        cond = self.decode_level(level + 1, z_above, train)
        return self.priors[level](z_BxHxWxC, cond)

    def prior_sample(self, num_samples: int, temperature=1.0):
        """(z_1, ..., z_L) from the prior, top down, one position of a map level at a time.

        One key from the 'sample' stream is split into one per level (``sampling``
        splits its own key the same way, and draws the map levels with activation
        caches instead of ``sample_map_level``'s full passes).
        """
        keys = jax.random.split(self.make_rng("sample"), self.num_latent_levels)
        z_above = self.sample_top(keys[-1], num_samples, temperature)
        latents = [z_above]
        for level in reversed(range(self.num_latent_levels - 1)):
            z_above = self.sample_map_level(level, z_above, keys[level], temperature)
            latents.insert(0, z_above)
        return tuple(latents)

    def sample_top(self, key, num_samples: int, temperature=1.0):
        """z_L ~ N(0, temperature^2 I), [N, c_L]."""
        zeros = jnp.zeros((num_samples, *self.latent_shapes()[-1]))
        return distributions.gaussian_sample(key, zeros, zeros, temperature)

    def sample_map_level(self, level: int, z_above, key, temperature=1.0):
        """z_level ~ p(z_level | z_above) with one full prior pass per position: position
        p (raster order) is drawn with ``fold_in(key, p)``. The reference sampler."""
        shape = (z_above.shape[0], *self.latent_shapes()[level])
        _, h, w, _ = shape
        cond = self.decode_level(level + 1, z_above)
        prior = self.priors[level]

        def step(z, p):
            mean, log_std = prior(z, cond)
            i, j = p // w, p % w
            draw = distributions.gaussian_sample(jax.random.fold_in(key, p), mean[:, i, j],
                                                 log_std[:, i, j], temperature)
            return z.at[:, i, j].set(draw), None

        z, _ = jax.lax.scan(step, jnp.zeros(shape), jnp.arange(h * w))
        return z

    def logits(self, x_BxHxWxC, latents, train: bool = False):
        return self.decoder(x_BxHxWxC, cond_map_BxHxWxD=self.decode_level(0, latents[0], train))

    def decoder_conditioning(self, latents):
        """(None, the upsampled z_1 map): what the pixel decoder reads besides x."""
        return None, self.decode_level(0, latents[0])

    def conditional_log_prob(self, x_BxHxWxC, latents, train: bool = False):
        return pixel_log_prob(self.logits(x_BxHxWxC, latents, train), x_BxHxWxC,
                              self.num_levels)

    # -- objectives -----------------------------------------------------------------

    def __call__(self, x_BxHxWxC, train: bool = False, kl_weight=1.0):
        """Per-example -ELBO terms in nats; ``kl_weight`` is a scalar or one per level."""
        stats = self.posterior(x_BxHxWxC, train)
        zs = [distributions.gaussian_sample(self.make_rng("sample"), m, s) for m, s in stats]
        kls = []
        for level, (mean, log_std) in enumerate(stats):
            if level == self.num_latent_levels - 1:
                kl = distributions.standard_normal_kl(mean, log_std)
            else:
                p_mean, p_log_std = self.latent_prior(level, zs[level], zs[level + 1], train)
                kl = distributions.gaussian_kl(mean, log_std, p_mean, p_log_std)
            kls.append(kl.reshape(kl.shape[0], -1).sum(axis=-1))
        kl_BxL = jnp.stack(kls, axis=-1)
        recon_B = -self.conditional_log_prob(x_BxHxWxC, zs, train).sum(axis=(1, 2, 3))
        weighted_kl_B = (kl_BxL * jnp.asarray(kl_weight)).sum(axis=-1)
        return {"loss": recon_B + weighted_kl_B, "recon": recon_B, "kl": kl_BxL.sum(axis=-1),
                "kl_levels": kl_BxL}

    def importance_log_weights(self, x_BxHxWxC, num_samples: int):
        """[B, S]: log p(x, z_s) - log q(z_s | x) for S draws z_s ~ q(z | x).

        The encoder runs once per image, the priors and the pixel decoder on B*S inputs.
        """
        B = x_BxHxWxC.shape[0]
        S = num_samples
        stats = self.posterior(x_BxHxWxC)

        def tile(a):  # [B, ...] -> [S*B, ...], sample-major.
            return jnp.broadcast_to(a[None], (S, *a.shape)).reshape(S * B, *a.shape[1:])

        stats = [(tile(m), tile(s)) for m, s in stats]
        zs = [distributions.gaussian_sample(self.make_rng("sample"), m, s) for m, s in stats]

        def total(a):
            return a.reshape(a.shape[0], -1).sum(axis=-1)

        log_w = total(self.conditional_log_prob(tile(x_BxHxWxC), zs))
        for level, ((mean, log_std), z) in enumerate(zip(stats, zs, strict=True)):
            log_w -= total(distributions.gaussian_log_prob(mean, log_std, z))
            if level == self.num_latent_levels - 1:
                log_w += total(distributions.gaussian_log_prob(0.0, 0.0, z))
            else:
                p_mean, p_log_std = self.latent_prior(level, z, zs[level + 1])
                log_w += total(distributions.gaussian_log_prob(p_mean, p_log_std, z))
        return log_w.reshape(S, B).T
