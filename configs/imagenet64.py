"""64x64 ImageNet: the hierarchical PixelVAE of the PixelVAE paper (section 4.3,
Table 2; architecture of appendix E.2, shared with LSUN bedrooms).

Variants, chosen by the config string ``configs/imagenet64.py[:tiny]``:
  (none)  the paper's model: two levels of latents, z1 of 64 channels at 16x16 and
          z2 a 512-dim vector (encoder h2 at 4x4); pixel PixelCNN of width 384 with a
          gated 5x5 input layer and 3 gated residual blocks of two 3x3 layers each,
          on 48-dim pixel embeddings; latent PixelCNN prior of width 512, same shape.
          Adam 1e-3, batch 48, 400k steps, learning rate halved every 180k steps.
  tiny    the same structure with widths small enough for a CPU (tests, smoke runs).

Appendix E.2 lists the widths of the encoders and decoders but not every number
the model needs; where it is silent we follow the authors' released setup for
64x64 images: the z1 channel count (64; the table's last 1x1 convolution of the
latent PixelCNN shows 256 outputs, which would be 128 channels of mean and
log-std, and we keep the 64 of the released setup), the z2 size (512), the learning-rate
halving, and the gated 5x5 input layer of both PixelCNNs (the table lists a plain
5x5 "PixelCNN convolution" for the latent prior and none for the pixel decoder).
The paper gives no KL warm-up for this model; we ramp each level's KL weight over
10k steps, as the MNIST setup does (our choice).

The data: TFDS 'downsampled_imagenet/64x64', whose download URL is dead: put
train_64x64.tar and valid_64x64.tar in the TFDS manual_dir and run
``python launch/prepare.py --dataset=downsampled_imagenet/64x64 --manual_dir=...``
(see launch/prepare.py). Evaluation uses its 'validation' split.
"""

from configs import default


def get_config(variant: str = ""):
    if variant not in ("", "tiny"):
        raise ValueError(f"configs/imagenet64.py variant must be '' or 'tiny', got {variant!r}")
    config = default.get_config()
    config.data.name = "downsampled_imagenet/64x64"
    config.data.image_size = 64
    m = config.model
    m.name = "hierarchical"
    m.image_channels = 3
    # The encoders, decoders, latent sizes and latent PixelCNN are configs/default.py's
    # hierarchical fields, which hold appendix E.2's values.
    m.pixel_embed_features = 48
    m.pixel_features = 384
    m.num_pixel_layers = 4  # The gated 5x5 input layer and 3 residual blocks.
    m.first_kernel_size = 5
    m.kernel_size = 3
    m.num_convs_per_block = 2
    m.num_head_layers = 0
    m.weight_norm = True
    config.batch_size = 48
    config.eval_batch_size = 48
    config.learning_rate = 1e-3
    config.lr_decay_every_steps = 180_000
    config.lr_decay_factor = 0.5
    # One warm-up per level (a tuple: the default's field is an int, so retype it).
    del config.kl_warmup_steps
    config.kl_warmup_steps = (10_000, 10_000)
    config.num_train_steps = 400_000
    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.num_eval_batches = 100
    config.checkpoint_every_steps = 2_000
    config.image_every_steps = 20_000
    config.num_image_samples = 16
    if variant == "tiny":
        shrink(config)
    return config


def shrink(config) -> None:
    """CPU-sized widths with the paper's structure (two levels, 2 + 2 down blocks)."""
    m = config.model
    m.embed_features = 4
    m.stem_features = 8
    m.encoder_blocks = ("8 8d 16d", "16 16d 16d")
    m.decoder_blocks = ("16 16u 8u", "16 16u 16u")
    m.latent_channels = (4, 8)
    m.latent_pixel_features = 8
    m.latent_pixel_blocks = 1
    m.pixel_embed_features = 4
    m.pixel_features = 12
    m.num_pixel_layers = 2
    config.batch_size = 8
    config.eval_batch_size = 8
    config.kl_warmup_steps = (100, 100)
    config.num_train_steps = 200
    config.eval_every_steps = 0
    config.num_eval_batches = 4
    config.checkpoint_every_steps = 100
    config.image_every_steps = 0
    config.num_image_samples = 4
