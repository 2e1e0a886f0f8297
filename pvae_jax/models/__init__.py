"""Model families, built from a config by name.

``build(model_config, data_shape, num_levels)`` returns a flax.linen Module that
follows the contract of DESIGN.md: ``apply(variables, x, train=...,
rngs={'sample': key})`` gives per-example ``loss``, ``recon``, ``kl`` (and
``kl_levels`` for latent models) in nats; ``method='conditional_log_prob'``,
``'posterior_sample'``, ``'prior_sample'``, ``'logits'`` and ``'decoder_conditioning'``
serve tests, evaluation and samplers.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import ml_collections

from pvae_jax.models import auxiliary
from pvae_jax.models.pixelcnn import PixelCNN, PixelDecoder
from pvae_jax.models.pixelvae import PixelVAE

# name -> (has latents, gated layers, conditioning of the pixel decoder)
_FAMILIES = {
    "vae": (True, False, "upsample"),
    "pixelcnn": (False, False, None),
    "gated_pixelcnn": (False, True, None),
    "pixelvae": (True, False, "upsample"),
    "gated_pixelvae": (True, True, "upsample"),
    "gated_noup": (True, True, "vector"),
}
MODEL_NAMES = tuple(_FAMILIES)


def build(model_config: ml_collections.ConfigDict, data_shape: Sequence[int],
          num_levels: int = 256) -> nn.Module:
    """Builds the model ``model_config.name`` for images of ``data_shape`` = (H, W, C).

    Raises:
      ValueError: unknown name, or a shape / width the architecture cannot take; the
        message names the config field.
    """
    name = model_config.name
    if name in auxiliary.AUXILIARY_MODELS:  # PixelCNNs with auxiliary variables.
        return auxiliary.build(model_config, data_shape, num_levels)
    if name not in _FAMILIES:
        raise ValueError(f"model.name must be one of {MODEL_NAMES}, got {name!r}")
    if len(data_shape) != 3 or min(data_shape) < 1:
        raise ValueError(f"data_shape must be (H, W, C) with positive sizes, got {data_shape}")
    H, W, C = data_shape
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    has_latents, gated, conditioning = _FAMILIES[name]
    num_layers = 0 if name == "vae" else model_config.num_pixel_layers
    if num_layers < 0 or (not has_latents and num_layers < 1):
        raise ValueError(
            f"model.num_pixel_layers must be >= {0 if has_latents else 1} for {name!r}, "
            f"got {num_layers}")
    if num_layers and model_config.pixel_features % C:
        raise ValueError(
            f"model.pixel_features ({model_config.pixel_features}) must divide by the "
            f"{C} image channels: each colour gets an equal share of the features")
    if conditioning == "vector" and num_layers < 1:
        raise ValueError("model.num_pixel_layers must be >= 1 for 'gated_noup': z enters "
                         "only through the PixelCNN layers")
    decoder = PixelDecoder(
        channels=C, num_levels=num_levels, gated=gated, num_layers=num_layers,
        features=model_config.pixel_features,
        first_kernel_size=model_config.first_kernel_size,
        kernel_size=model_config.kernel_size,
        num_head_layers=model_config.num_head_layers,
        weight_norm=model_config.weight_norm,
    )
    if not has_latents:
        return PixelCNN(image_hw=(H, W), num_levels=num_levels, decoder=decoder)
    return PixelVAE(
        image_hw=(H, W), num_levels=num_levels, latent_dim=model_config.latent_dim,
        encoder_features=tuple(model_config.encoder_features), conditioning=conditioning,
        decoder=decoder,
    )
