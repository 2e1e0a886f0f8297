"""Grayscale PixelCNN on CIFAR-10 (Kolesnikov & Lampert, ICML 2017, section 4.1).

p(x, x^) = p(x | x^) p(x^) with x^ the 4-bit grayscale image: p(x^) a PixelCNN++
with a 16-way softmax, p(x | x^) a PixelCNN++ whose every gated resnet is biased by
an embedding f_w(x^). TFDS 'cifar10' with random horizontal flips; Adam with the
learning rate decayed exponentially after every step.

The paper uses PixelCNN++'s hyperparameters (160 channels, 3 stages of 5 gated
resnets, dropout 0.5, 10 logistic components), except that p(x | x^) and f_w get a
different number of resnets per stage; that number, the learning rate, batch size
and decay factor were lost from the paper's text as extracted here, so those below
are PixelCNN++'s published ones (lr 1e-3, decay 0.999995 per step; batch 64 for a
single host). Evaluation reports the bound; ``models.auxiliary.bits_per_dim``
splits it into the grayscale and colour factors.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    model = config.model
    model.name = "grayscale_pixelcnn"
    # p(x | x^): PixelCNN++ widths, num_stages resolutions of num_resnet blocks each.
    model.features = 160
    model.num_resnet = 5
    model.num_stages = 3
    model.dropout_rate = 0.5
    model.num_mixtures = 10
    # p(x^): the same architecture with a 16-way softmax.
    model.aux_features = 160
    model.aux_num_resnet = 5
    # f_w(x^): one unshifted flow of gated resnets at full resolution.
    model.embed_features = 160
    model.embed_num_blocks = 5
    config.batch_size = 64
    config.eval_batch_size = 500
    config.learning_rate = 1e-3
    # lr * 0.999995 ** step: the decay applied after every iteration.
    config.lr_decay_every_steps = 1
    config.lr_decay_factor = 0.999995
    config.ema_decay = 0.9995
    config.num_train_steps = 500_000
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 5_000
    config.log_every_steps = 100
    # The trainer's image writer is for the PixelVAE family; sample with
    # pvae_jax.sampling_auxiliary.
    config.num_image_samples = 0
    return config
