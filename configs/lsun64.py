"""LSUN bedrooms at 64x64: the hierarchical PixelVAE of section 4.2 (paper Figs. 1, 6),
the architecture of configs/imagenet64.py.

Variants: ``configs/lsun64.py[:tiny]`` as in configs/imagenet64.py.

The data: TFDS 'lsun/bedroom' (needs tensorflow-io to prepare; see launch/prepare.py),
centre-cropped to a square and area-resized to 64x64 in the pipeline; evaluation on
its real 'validation' split. The paper removes near-duplicate images as Radford et
al. (2015) did; that list is not part of TFDS and we do not apply it.
"""

from configs import imagenet64


def get_config(variant: str = ""):
    config = imagenet64.get_config(variant)
    config.data.name = "lsun/bedroom"
    config.data.image_size = 64
    return config
