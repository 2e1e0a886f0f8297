"""A seconds-long config for tests: a small model on the offline MNIST digits."""

from configs import mnist


def get_config(variant: str = "gated_noup"):
    config = mnist.get_config(variant + ",offline")
    config.model.latent_dim = 4
    config.model.encoder_features = (4, 8)
    config.model.pixel_features = 4
    config.model.num_pixel_layers = 2
    config.model.first_kernel_size = 3
    config.model.kernel_size = 3
    config.model.num_head_layers = 1
    config.batch_size = 8
    config.eval_batch_size = 100
    config.num_train_steps = 6
    config.kl_warmup_steps = 3
    config.log_every_steps = 2
    config.eval_every_steps = 0
    config.num_eval_batches = 2
    config.checkpoint_every_steps = 3
    config.num_image_samples = 4
    return config
