"""Fashion-MNIST at 256 levels, offline (Debian's dataset-fashion-mnist by default).

Variants as in ``configs/mnist.py`` (``configs/fashion_mnist.py:gated_pixelvae``);
``tfds`` selects TFDS's own 'fashion_mnist' for users who can download it. Results
are reported in bits/dim.
"""

from configs import mnist


def get_config(variant: str = "gated_noup"):
    model, *options = variant.split(",")
    config = mnist.get_config(model)
    unknown = set(options) - {"tfds"}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} in {variant!r}; only 'tfds'")
    config.data.name = "fashion_mnist" if "tfds" in options else "fashion_mnist_local"
    config.data.binarize = "none"
    return config
