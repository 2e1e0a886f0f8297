"""The README's first command: a gated PixelVAE on offline Fashion-MNIST (256 levels)
that trains, evaluates and draws samples and reconstructions on a 2-core CPU in
about ten minutes: ``configs/fashion_mnist.py:gated_pixelvae`` with two PixelCNN
layers of 16 channels, the paper's point that upsampled latents carry the global
structure so that few PixelCNN layers suffice (its section 4.1.1)."""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config("gated_pixelvae")
    config.model.pixel_features = 16
    config.model.num_pixel_layers = 2
    config.model.num_head_layers = 1
    config.batch_size = 64
    config.num_train_steps = 1300
    config.kl_warmup_steps = 500
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.num_eval_batches = 4
    config.checkpoint_every_steps = 500
    config.num_image_samples = 36
    return config
