"""PixelVAE (Gulrajani et al., 2017) with one level of latents, and the conv VAE.

q(z|x) is a diagonal Gaussian from the appendix E.1 encoder; p(z) = N(0, I); p(x|z)
is a ``PixelDecoder`` conditioned either on z upsampled to feature maps by the E.1
decoder (``conditioning='upsample'``: PixelVAE, Gated PixelVAE, and with zero
PixelCNN layers the convolutional VAE) or on z itself as a learned bias in every
gated layer (``conditioning='vector'``: "Gated PixelVAE without upsampling").
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from pvae_jax import distributions
from pvae_jax.models.conv_vae import Decoder, Encoder, scale_pixels
from pvae_jax.models.pixelcnn import PixelDecoder, pixel_log_prob

CONDITIONINGS = ("upsample", "vector")


class PixelVAE(nn.Module):
    """A one-level PixelVAE.

    Attributes:
      image_hw: (H, W) of the images.
      num_levels: K of the pixel distribution.
      latent_dim: size of z.
      encoder_features: the two widths of the E.1 tables (32, 64).
      conditioning: 'upsample' or 'vector' (see the module docstring).
      decoder: the autoregressive (or, with 0 layers, factorised) pixel decoder.
    """

    image_hw: tuple[int, int]
    num_levels: int
    latent_dim: int
    encoder_features: tuple[int, int]
    conditioning: str
    decoder: PixelDecoder

    def setup(self):
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(
                f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        self.encoder = Encoder(self.latent_dim, self.encoder_features)
        if self.conditioning == "upsample":
            self.upsampler = Decoder(self.image_hw, self.encoder_features)

    def __call__(self, x_BxHxWxC, train: bool = False, kl_weight=1.0):
        """Per-example -ELBO terms in nats, with one z ~ q(z|x) from the 'sample' stream."""
        del train
        mean_BxD, log_std_BxD = self.posterior(x_BxHxWxC)
        z_BxD = distributions.gaussian_sample(self.make_rng("sample"), mean_BxD, log_std_BxD)
        recon_B = -self.conditional_log_prob(x_BxHxWxC, z_BxD).sum(axis=(1, 2, 3))
        kl_B = distributions.standard_normal_kl(mean_BxD, log_std_BxD).sum(axis=-1)
        return {"loss": recon_B + kl_weight * kl_B, "recon": recon_B, "kl": kl_B,
                "kl_levels": kl_B[:, None]}

    def posterior(self, x_BxHxWxC):
        """(mean, log_std) of q(z|x), each [B, latent_dim]."""
        return self.encoder(scale_pixels(x_BxHxWxC, self.num_levels))

    def posterior_sample(self, x_BxHxWxC):
        return distributions.gaussian_sample(self.make_rng("sample"), *self.posterior(x_BxHxWxC))

    def prior_sample(self, num_samples: int, temperature=1.0):
        zeros = jnp.zeros((num_samples, self.latent_dim))
        return distributions.gaussian_sample(self.make_rng("sample"), zeros, zeros, temperature)

    def logits(self, x_BxHxWxC, z_BxD):
        if self.conditioning == "vector":
            return self.decoder(x_BxHxWxC, cond_vector_BxD=z_BxD)
        return self.decoder(x_BxHxWxC, cond_map_BxHxWxD=self.upsampler(z_BxD))

    def decoder_conditioning(self, z_BxD):
        """(cond_vector, cond_map) the decoder reads for latents z, one of them None:
        ``logits(x, z) == decoder(x, *decoder_conditioning(z))``. They do not depend
        on x, so a sampler computes them once."""
        if self.conditioning == "vector":
            return z_BxD, None
        return None, self.upsampler(z_BxD)

    def conditional_log_prob(self, x_BxHxWxC, z_BxD):
        return pixel_log_prob(self.logits(x_BxHxWxC, z_BxD), x_BxHxWxC, self.num_levels)

    def importance_log_weights(self, x_BxHxWxC, num_samples: int):
        """log w_s = log p(x, z_s) - log q(z_s | x) for S draws z_s ~ q(z|x), [B, S].

        The encoder runs once per image, the decoder on B * S images. With S = 1 the
        draw is the z that ``__call__`` uses for the same 'sample' key.
        """
        mean_BxD, log_std_BxD = self.posterior(x_BxHxWxC)
        (B, D), S = mean_BxD.shape, num_samples
        mean_BxSxD = jnp.broadcast_to(mean_BxD[:, None], (B, S, D))
        log_std_BxSxD = jnp.broadcast_to(log_std_BxD[:, None], (B, S, D))
        z_BxSxD = distributions.gaussian_sample(self.make_rng("sample"), mean_BxSxD,
                                                log_std_BxSxD)
        log_q_BxS = distributions.gaussian_log_prob(mean_BxSxD, log_std_BxSxD, z_BxSxD).sum(-1)
        log_prior_BxS = distributions.gaussian_log_prob(0.0, 0.0, z_BxSxD).sum(-1)
        # Sample-major within each image: rows b*S .. b*S+S-1 are image b's draws.
        x_BSxHxWxC = jnp.repeat(x_BxHxWxC, S, axis=0)
        log_px_BS = self.conditional_log_prob(x_BSxHxWxC, z_BxSxD.reshape(B * S, D)).sum(
            axis=(1, 2, 3))
        return log_px_BS.reshape(B, S) + log_prior_BxS - log_q_BxS
