"""Offline CPU demos of both auxiliary-variable PixelCNNs on bundled photo crops.

Variants, by config string ``configs/photo_auxiliary.py:<variant>``:
  grayscale: Grayscale PixelCNN on 16x16 crops, random flips.
  pyramid: Pyramid PixelCNN 4 -> 8 -> 16 on 16x16 crops.
  tiny_grayscale, tiny_pyramid: seconds-long versions for tests.

Data: 'photo_crops_local' (crops of photos that scikit-learn and matplotlib ship;
train and test from different photos). Widths are small so a run fits in minutes
on a 2-core CPU shared with other work; the architectures are those of
configs/cifar10_grayscale.py and configs/celeba_pyramid.py.
"""

from configs import celeba_pyramid, cifar10_grayscale

VARIANTS = ("grayscale", "pyramid", "tiny_grayscale", "tiny_pyramid")


def get_config(variant: str = "grayscale"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/photo_auxiliary.py variant must be one of {VARIANTS}, "
                         f"got {variant!r}")
    tiny = variant.startswith("tiny_")
    if variant.endswith("grayscale"):
        config = cifar10_grayscale.get_config()
        m = config.model
        m.features = m.aux_features = m.embed_features = 4 if tiny else 16
        m.num_resnet = m.aux_num_resnet = 1
        m.num_stages = 2
        m.embed_num_blocks = 1 if tiny else 2
    else:
        config = celeba_pyramid.get_config()
        m = config.model
        m.num_scales = 3
        m.features = 4 if tiny else 16
        m.base_num_resnet = 1
        m.base_num_stages = 2
        m.scale_num_resnet = 1
        m.embed_num_blocks = 2 if tiny else 3
        m.embed_down_after = () if tiny else (1,)
        m.embed_up_after = (2,) if tiny else (2, 3)
    config.data.name = "photo_crops_local"
    config.data.image_size = 8 if tiny else 16
    config.data.random_flip = True
    m.num_mixtures = 2 if tiny else 5
    m.dropout_rate = 0.0 if tiny else 0.1
    config.batch_size = 8 if tiny else 16
    config.eval_batch_size = 100 if tiny else 500
    config.learning_rate = 2e-3
    config.lr_decay_factor = 0.9995
    config.ema_decay = 0.99
    config.num_train_steps = 4 if tiny else 600
    config.log_every_steps = 2 if tiny else 25
    config.eval_every_steps = 0
    config.num_eval_batches = 1 if tiny else -1
    config.checkpoint_every_steps = 4 if tiny else 200
    return config
