"""LSUN bedrooms at 32x32: the quantitative setting of section 4.2, a two-level
PixelVAE with latents at 8x8 and 1x1 (a vector), the blocks of configs/imagenet64.py.

Variants: ``configs/lsun32.py[:tiny]`` as in configs/imagenet64.py.

With 32x32 inputs the same two 'd' blocks per level put z1 at 8x8 and h2 at 2x2,
from which the top level reads its 512-dim vector z2 ("1x1").
"""

from configs import imagenet64


def get_config(variant: str = ""):
    config = imagenet64.get_config(variant)
    config.data.name = "lsun/bedroom"
    config.data.image_size = 32
    return config
