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

from pvae_jax.models import auxiliary, hierarchical
from pvae_jax.models.hierarchical import HierarchicalPixelVAE
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
    "hierarchical": (True, True, "upsample"),
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
    expected_channels = model_config.get("image_channels")
    if expected_channels and expected_channels != C:
        raise ValueError(
            f"model.image_channels={expected_channels} but the data has {C} channels; use "
            f"a dataset with {expected_channels} channels or set model.image_channels")
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
        num_convs=model_config.get("num_convs_per_block", 1),
        embed_features=model_config.get("pixel_embed_features", 0),
        condition_all_layers=name != "hierarchical",
    )
    if name == "hierarchical":
        return _build_hierarchical(model_config, (H, W), num_levels, decoder)
    if not has_latents:
        return PixelCNN(image_hw=(H, W), num_levels=num_levels, decoder=decoder)
    return PixelVAE(
        image_hw=(H, W), num_levels=num_levels, latent_dim=model_config.latent_dim,
        encoder_features=tuple(model_config.encoder_features), conditioning=conditioning,
        decoder=decoder,
    )


def _build_hierarchical(model_config, image_hw, num_levels, decoder) -> HierarchicalPixelVAE:
    """Checks the level structure before any compile, then builds the model."""
    encoders = tuple(hierarchical.parse_blocks(b, f"model.encoder_blocks[{i}]")
                     for i, b in enumerate(model_config.encoder_blocks))
    decoders = tuple(hierarchical.parse_blocks(b, f"model.decoder_blocks[{i}]")
                     for i, b in enumerate(model_config.decoder_blocks))
    channels = tuple(model_config.latent_channels)
    if not len(encoders) == len(decoders) == len(channels) >= 1:
        raise ValueError(
            f"model.encoder_blocks ({len(encoders)}), model.decoder_blocks ({len(decoders)}) "
            f"and model.latent_channels ({len(channels)}) need one entry per latent level")
    if min(channels) < 1:
        raise ValueError(f"model.latent_channels must be positive, got {channels}")
    hierarchical.level_sizes(image_hw, encoders)  # Raises on sizes the blocks cannot take.
    for i, (enc, dec) in enumerate(zip(encoders, decoders, strict=True)):
        downs = sum(r == "down" for _, r in enc)
        ups = sum(r == "up" for _, r in dec)
        if downs != ups or any(r == "up" for _, r in enc) or any(r == "down" for _, r in dec):
            raise ValueError(
                f"level {i}: model.encoder_blocks[{i}] has {downs} 'd' blocks and "
                f"model.decoder_blocks[{i}] {ups} 'u' blocks; the decoder must bring z_{i + 1} "
                "back to the size the encoder started from (as many 'u' as 'd', no 'u' in "
                "an encoder, no 'd' in a decoder)")
    return HierarchicalPixelVAE(
        image_hw=image_hw, num_levels=num_levels,
        embed_features=model_config.embed_features,
        stem_features=model_config.stem_features,
        encoder_blocks=encoders, decoder_blocks=decoders, latent_channels=channels,
        latent_pixel_features=model_config.latent_pixel_features,
        latent_pixel_blocks=model_config.latent_pixel_blocks,
        decoder=decoder, norm=model_config.norm,
    )
