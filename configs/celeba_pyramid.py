"""Pyramid PixelCNN on CelebA faces (Kolesnikov & Lampert, ICML 2017, section 4.2).

Images: TFDS 'celeb_a', the paper's fixed face crop, area-resized to 128x128. The
pyramid 8 -> 16 -> 32 -> 64 -> 128 (num_scales=5): the 8x8 scale is a plain
PixelCNN++; each finer scale a PixelCNN++ without down/up-sampling and few gated
resnets, conditioned on a deeper embedding network of the scale below that
downsamples once and upsamples twice, every layer 100 filters wide. The block
counts and optimiser numbers did not survive text extraction of the paper; the
values below are our reading of the published settings (2 light resnets per pass;
embedding of 15 blocks, down after 3, up after 8 and 12; Adam 1e-3, batch 16, decay
0.999995 per step) and are fields to change.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "celeb_a"
    config.data.image_size = 128
    model = config.model
    model.name = "pyramid_pixelcnn"
    model.num_scales = 5
    model.features = 100
    # The coarsest scale: a plain PixelCNN++.
    model.base_num_resnet = 5
    model.base_num_stages = 3
    # Every finer scale: a light one-stage PixelCNN++.
    model.scale_num_resnet = 2
    # f_w of the scale below.
    model.embed_num_blocks = 15
    model.embed_down_after = (3,)
    model.embed_up_after = (8, 12)
    model.dropout_rate = 0.5
    model.num_mixtures = 10
    config.batch_size = 16
    config.eval_batch_size = 64
    config.learning_rate = 1e-3
    config.lr_decay_every_steps = 1
    config.lr_decay_factor = 0.999995
    config.ema_decay = 0.9995
    config.num_train_steps = 400_000
    config.eval_every_steps = 10_000
    config.num_eval_batches = 50
    config.checkpoint_every_steps = 5_000
    config.num_image_samples = 0
    return config
