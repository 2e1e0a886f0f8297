"""Which TFDS datasets we read, how to prepare them, and how to read a split's images.

Adding a dataset is one `DATASETS` entry, plus a crop function if its images need
one. Every dataset is read the same way: `tfds.data_source` over array_record
files, no TensorFlow. Splits that fit in `IN_MEMORY_MAX_BYTES` after preprocessing
are read once into numpy; larger ones are read batch by batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

try:
    import fcntl
except ImportError:  # Not POSIX: preparation is not locked.
    fcntl = None

from pvae_jax.data import builders

# Splits at most this large (after crop/resize, uint8) are held in memory as numpy.
IN_MEMORY_MAX_BYTES = 1 << 30
# Examples per `__getitems__` call while loading a split into memory.
_LOAD_CHUNK = 10_000

CropFn = Callable[[np.ndarray], np.ndarray]


def center_square(image_HxWxC: np.ndarray) -> np.ndarray:
    """Crops the largest centred square (LSUN: the usual preprocessing before resizing)."""
    h, w = image_HxWxC.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image_HxWxC[top : top + side, left : left + side]


def celeb_a_face(image_HxWxC: np.ndarray) -> np.ndarray:
    """The fixed 128x128 face crop of Kolesnikov & Lampert (2017) on 218x178 CelebA.

    Images of another size (TFDS mock data) get the same margins scaled to their size.
    """
    h, w = image_HxWxC.shape[:2]
    top, left = round(45 * h / 218), round(25 * w / 178)
    return image_HxWxC[top : h - top, left : w - left]


def resize(image_HxWxC: np.ndarray, size: int) -> np.ndarray:
    """Resizes to size x size with an area (box) filter, which averages when shrinking."""
    if image_HxWxC.shape[:2] == (size, size):
        return image_HxWxC
    channels = image_HxWxC.shape[2]
    pil = Image.fromarray(image_HxWxC[..., 0] if channels == 1 else image_HxWxC)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BOX))
    return out.reshape(size, size, channels)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset.

    Attributes:
      tfds_name: TFDS name, with config where the dataset has several.
      image_size: default side of the square images the pipeline yields.
      channels: 1 or 3.
      native_levels: 2 for data stored binary, else 256.
      eval_split: default evaluation split.
      crop: applied to each raw image before resizing to the image size; None
        means the raw image is used as is (and resized if its size differs).
      local: one of our offline builders, prepared on first use without TF.
      has_labels: whether examples carry a class 'label'.
    """

    tfds_name: str
    image_size: int
    channels: int
    native_levels: int = 256
    eval_split: str = "test"
    crop: CropFn | None = None
    local: bool = False
    has_labels: bool = True


DATASETS: dict[str, DatasetSpec] = {
    spec.tfds_name: spec
    for spec in [
        DatasetSpec("fashion_mnist_local", 28, 1, local=True),
        DatasetSpec("mnist5k_local", 28, 1, local=True),
        DatasetSpec("photo_crops_local", 32, 3, local=True),
        DatasetSpec("binarized_mnist", 28, 1, native_levels=2, has_labels=False),
        DatasetSpec("mnist", 28, 1),
        DatasetSpec("fashion_mnist", 28, 1),
        DatasetSpec("cifar10", 32, 3),
        DatasetSpec("downsampled_imagenet/64x64", 64, 3, eval_split="validation", has_labels=False),
        DatasetSpec("lsun/bedroom", 64, 3, eval_split="validation", crop=center_square,
                    has_labels=False),
        DatasetSpec("celeb_a", 128, 3, crop=celeb_a_face, has_labels=False),
    ]
}  # fmt: skip

# What `prepare` needs beyond TensorFlow, and the manual_dir files, per official dataset.
_EXTRA_MODULES = {"lsun/bedroom": ("tensorflow_io", "tensorflow-io")}
MANUAL_FILES = {
    "downsampled_imagenet/64x64": ("train_64x64.tar", "valid_64x64.tar"),
    "lsun/bedroom": ("bedroom_train_lmdb.zip", "bedroom_val_lmdb.zip"),
}


def get_spec(name: str) -> DatasetSpec:
    """Returns the spec of a dataset name; ValueError naming the allowed names otherwise."""
    if name not in DATASETS:
        raise ValueError(
            f"data_config.name={name!r} is not a known dataset; allowed: {sorted(DATASETS)}."
        )
    return DATASETS[name]


@contextlib.contextmanager
def _file_lock(path: str):
    """Serialises preparation between processes of one host sharing a data_dir."""
    if fcntl is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _default_data_dir(data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> str:
    """Writes a dataset as array_record files under data_dir, unless already there.

    Our offline builders ('fashion_mnist_local', 'mnist5k_local') need no
    TensorFlow and no network; `manual_dir` overrides where they read their
    source files. Official TFDS names need TensorFlow (`pip install -e
    '.[prepare]'`) and download their files, or find them in `manual_dir`
    under the file names TFDS expects (see `MANUAL_FILES`). A prepared dataset
    is never rebuilt, so a second call returns at once.

    Args:
      name: a key of `DATASETS`.
      data_dir: TFDS data directory; None means TFDS's default
        ($TFDS_DATA_DIR or ~/tensorflow_datasets).
      manual_dir: directory with source files placed by hand.

    Returns:
      The directory holding the prepared files.
    """
    spec = get_spec(name)
    data_dir = _default_data_dir(data_dir)
    if spec.local:
        builder = builders.LOCAL_BUILDERS[name](data_dir=data_dir, source_dir=manual_dir)
        if not builder.is_prepared():
            with _file_lock(os.path.join(data_dir, f".{name}.prepare.lock")):
                builder.download_and_prepare(
                    file_format="array_record", download_config=tfds.download.DownloadConfig()
                )
        return str(builder.data_dir)

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return str(builder.data_dir)
    needs = [("tensorflow", "tensorflow-cpu")]
    if name in _EXTRA_MODULES:
        needs.append(_EXTRA_MODULES[name])
    missing = [pip for module, pip in needs if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"Preparing the TFDS dataset {name!r} needs {' and '.join(missing)}, which is "
            "not installed. Run `pip install -e '.[prepare]'`"
            + (" and `pip install tensorflow-io`" if name in _EXTRA_MODULES else "")
            + ". Training reads the prepared files without TensorFlow."
        )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
    return str(builder.data_dir)


def open_split(name: str, split: str, data_dir: str | None) -> Sequence[dict]:
    """Returns the TFDS random-access source of a split, preparing local builders first."""
    spec = get_spec(name)
    if spec.local:
        prepare(name, data_dir)
    try:
        return tfds.data_source(
            name, split=split, data_dir=_default_data_dir(data_dir), download=False
        )
    except Exception as e:
        # TFDS raises several types here; only "not prepared" gets our advice.
        if tfds.builder(name, data_dir=_default_data_dir(data_dir)).is_prepared():
            raise
        raise FileNotFoundError(
            f"{name!r} is not prepared as array_record files in "
            f"{_default_data_dir(data_dir)!r}. Prepare it once with "
            f"`python launch/prepare.py --dataset={name} --data_dir=<dir>` "
            "(official TFDS datasets need `pip install -e '.[prepare]'` for that step)."
        ) from e


class SplitReader:
    """Reads preprocessed images and labels of one split by example index.

    Small splits are loaded once into numpy (`in_memory`), so a batch is one
    fancy-indexing op; large ones are fetched with one `__getitems__` call per
    batch and cropped/resized per example. Picklable, for grain worker processes.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, image_size: int | None):
        self.spec = get_spec(name)
        self.split = split
        self.image_size = image_size or self.spec.image_size
        self.image_shape = (self.image_size, self.image_size, self.spec.channels)
        self._source = open_split(name, split, data_dir)
        self.num_examples = len(self._source)
        nbytes = self.num_examples * int(np.prod(self.image_shape))
        self.in_memory = nbytes <= IN_MEMORY_MAX_BYTES
        self._images = self._labels = None
        if self.in_memory:
            images, labels = [], []
            for start in range(0, self.num_examples, _LOAD_CHUNK):
                stop = min(start + _LOAD_CHUNK, self.num_examples)
                chunk_images, chunk_labels = self._fetch(range(start, stop))
                images.append(chunk_images)
                labels.append(chunk_labels)
            self._images = np.concatenate(images) if images else np.zeros((0, *self.image_shape))
            self._labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
            self._images = self._images.astype(np.uint8, copy=False)
            self._source = None  # Nothing left to read; keeps pickles small.

    def _preprocess(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        if self.spec.crop is not None:
            image = self.spec.crop(image)
        return resize(image, self.image_size)

    def _fetch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        examples = self._source.__getitems__([int(i) for i in indices])
        images = np.stack([self._preprocess(ex["image"]) for ex in examples]).astype(np.uint8)
        if self.spec.has_labels:
            labels = np.asarray([ex["label"] for ex in examples], dtype=np.int32)
        else:
            labels = np.full((len(examples),), -1, np.int32)
        return images, labels

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (uint8 [B, H, W, C] images, int32 [B] labels) for example indices."""
        if self.in_memory:
            return self._images[indices], self._labels[indices]
        return self._fetch(indices)
