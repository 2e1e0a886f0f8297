"""Input pipeline: TFDS array_record sources, shuffled, repeated and batched by grain.

Every batch is a dict of numpy arrays::

    {'image': uint8 [B, H, W, C] in [0, num_levels),
     'label': int32 [B]  (-1 where the dataset has no labels),
     'index': int64 [B]  (example index within the split)}

and evaluation batches also carry ``'mask'`` (float32 [B]: 1 real, 0 padding).

Library functions take a ``data_config`` (`ml_collections.ConfigDict`, see
`default_data_config`); only ``name`` is required.

Resuming training: the iterator from `train_iterator` is a
``grain.DatasetIterator``. Its ``get_state()`` is a small JSON-able dict and
``set_state(state)`` on a fresh iterator built with the same arguments
continues with exactly the batches the old one had not yet yielded. To save it
with the model in one orbax checkpoint::

    import grain
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_train_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))  # restored in place

grain writes one JSON file per process, named by ``jax.process_index()``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import grain
import ml_collections
import numpy as np
from absl import flags

from pvae_jax.data import sources

BINARIZE_MODES = ("none", "threshold", "stochastic")

# Threads that read and assemble batches ahead of the consumer, and how many
# batches they may hold. A batch is one numpy gather (in-memory splits) or one
# `__getitems__` plus per-image crop/resize, where PIL releases the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def default_data_config() -> ml_collections.ConfigDict:
    """Returns a data config with every field at its default.

    Fields:
      name: dataset, a key of `sources.DATASETS` ('fashion_mnist_local',
        'mnist5k_local', 'binarized_mnist', 'mnist', 'fashion_mnist',
        'cifar10', 'downsampled_imagenet/64x64', 'lsun/bedroom', 'celeb_a').
      data_dir: TFDS data directory; None means TFDS's default
        ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
      train_split / eval_split: TFDS split strings; eval_split None means the
        dataset's own ('test', or 'validation' for ImageNet 64x64 and LSUN).
      binarize: 'none', 'threshold' (pixel > binarize_threshold) or
        'stochastic' (1 with probability pixel/255, drawn once per example
        from (binarize_seed, split, index), so every epoch and every
        evaluation sees the same binary image). Ignored for data stored
        binary (binarized_mnist).
      binarize_threshold: int in [0, 255).
      binarize_seed: int >= 0.
      image_size: side of the square images yielded; None means the dataset's
        own (28, 32, 64 or 128). Other sizes are cropped and area-resized.
      random_flip: mirror each training image left-right with probability 1/2
        (a fresh draw every epoch, reproducible from the seed). Evaluation images
        are never flipped.
    """
    return ml_collections.ConfigDict(
        {
            "name": "fashion_mnist_local",
            "data_dir": ml_collections.config_dict.placeholder(str),
            "train_split": "train",
            "eval_split": ml_collections.config_dict.placeholder(str),
            "binarize": "none",
            "binarize_threshold": 127,
            "binarize_seed": 0,
            "image_size": ml_collections.config_dict.placeholder(int),
            "random_flip": False,
        }
    )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about the data.

    Attributes:
      name: dataset name.
      image_shape: (H, W, C) of the images yielded.
      num_levels: K, images take values in [0, K): 2 when binary, else 256.
      num_train: examples in the train split.
      num_eval: examples in the eval split.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_levels: int
    num_train: int
    num_eval: int


@dataclasses.dataclass(frozen=True)
class _Options:
    name: str
    data_dir: str | None
    train_split: str
    eval_split: str
    binarize: str
    binarize_threshold: int
    binarize_seed: int
    image_size: int
    spec: sources.DatasetSpec
    random_flip: bool = False

    @property
    def num_levels(self) -> int:
        binary = self.binarize != "none" or self.spec.native_levels == 2
        return 2 if binary else 256

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.spec.channels)


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _options(data_config: ml_collections.ConfigDict) -> _Options:
    """Validates a data config and fills in defaults; ValueError names the bad field."""
    get = data_config.get
    spec = sources.get_spec(get("name"))
    binarize = get("binarize", "none")
    if binarize not in BINARIZE_MODES:
        raise ValueError(
            f"data_config.binarize={binarize!r} is not a binarisation mode; allowed: "
            f"{list(BINARIZE_MODES)}."
        )
    threshold = get("binarize_threshold", 127)
    if not _is_int(threshold) or not 0 <= threshold < 255:
        raise ValueError(
            f"data_config.binarize_threshold={threshold!r} must be an int in [0, 255) "
            "(pixel > threshold becomes 1)."
        )
    seed = get("binarize_seed", 0)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"data_config.binarize_seed={seed!r} must be an int >= 0.")
    image_size = get("image_size") or spec.image_size
    if not _is_int(image_size) or image_size <= 0:
        raise ValueError(f"data_config.image_size={image_size!r} must be a positive int or None.")
    random_flip = get("random_flip", False)
    if not isinstance(random_flip, bool):
        raise ValueError(f"data_config.random_flip={random_flip!r} must be True or False.")
    return _Options(
        random_flip=random_flip,
        name=spec.tfds_name,
        data_dir=get("data_dir"),
        train_split=get("train_split") or "train",
        eval_split=get("eval_split") or spec.eval_split,
        binarize=binarize,
        binarize_threshold=int(threshold),
        binarize_seed=int(seed),
        image_size=int(image_size),
        spec=spec,
    )


def image_format(data_config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
    """((H, W, C), num_levels) of the images ``data_config`` yields, from the config
    alone (no data files are opened or prepared).

    Raises:
      ValueError: unknown dataset name, binarisation mode or bad field value.
    """
    opts = _options(data_config)
    return opts.image_shape, opts.num_levels


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """Returns shape, number of levels and split sizes; prepares local builders if needed.

    Raises:
      ValueError: unknown dataset name, binarisation mode or bad field value.
      FileNotFoundError: the dataset is not prepared (the message says how).
    """
    opts = _options(data_config)
    return DatasetInfo(
        name=opts.name,
        image_shape=opts.image_shape,
        num_levels=opts.num_levels,
        num_train=len(sources.open_split(opts.name, opts.train_split, opts.data_dir)),
        num_eval=len(sources.open_split(opts.name, opts.eval_split, opts.data_dir)),
    )


# SplitMix64 (Steele et al., 2014): a counter-based generator, so the noise of
# example i is a function of (seed, split, i) alone and costs one vectorised
# pass per batch, whichever process, worker or epoch asks for it.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniform_per_example(seed: int, stream: int, index_B: np.ndarray, size: int) -> np.ndarray:
    """Returns float64 [B, size] uniforms in [0, 1), a fixed function of (seed, stream, index)."""
    key = _mix64(np.array([seed, stream], dtype=np.uint64) + _GOLDEN)
    row_B = _mix64((np.asarray(index_B, dtype=np.int64).view(np.uint64) ^ key[1]) + key[0])
    counter = (np.arange(1, size + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    bits = _mix64(row_B[:, None] + counter)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclasses.dataclass(frozen=True)
class _Binarizer:
    mode: str
    threshold: int
    seed: int
    stream: int
    native_binary: bool

    def __call__(self, images: np.ndarray, index_B: np.ndarray) -> np.ndarray:
        if self.native_binary:
            # Stored {0, 1}; TFDS mock data fills it with 0..254, so map nonzero to 1.
            return (images > 0).astype(np.uint8)
        if self.mode == "threshold":
            return (images > self.threshold).astype(np.uint8)
        if self.mode == "stochastic":
            u = uniform_per_example(self.seed, self.stream, index_B, images[0].size)
            # P(u * 255 < x) = x / 255.
            return (u.reshape(images.shape) * 255.0 < images).astype(np.uint8)
        return images


def _binarizer(opts: _Options, split: str) -> _Binarizer:
    return _Binarizer(
        mode=opts.binarize,
        threshold=opts.binarize_threshold,
        seed=opts.binarize_seed,
        stream=zlib.crc32(f"{opts.name}:{split}".encode()),
        native_binary=opts.spec.native_levels == 2,
    )


@dataclasses.dataclass(frozen=True)
class _MakeTrainBatch:
    """Global batch of example indices -> this process's slice, read and binarised."""

    reader: sources.SplitReader
    binarize: _Binarizer
    start: int
    stop: int

    def __call__(self, global_index_G: np.ndarray) -> dict[str, np.ndarray]:
        index_B = np.asarray(global_index_G[self.start : self.stop], dtype=np.int64)
        images, labels = self.reader.read(index_B)
        return {"image": self.binarize(images, index_B), "label": labels, "index": index_B}


@dataclasses.dataclass(frozen=True)
class _RandomFlip:
    """Mirrors each image left-right with probability 1/2.

    grain seeds ``rng`` by the batch's position in the repeated stream, so each epoch
    draws anew and a resumed iterator draws what an uninterrupted one would. The
    draws cover the global batch, of which this process keeps its slice.
    """

    global_batch_size: int
    start: int
    stop: int

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        flip_B = (rng.random(self.global_batch_size) < 0.5)[self.start : self.stop]
        image = np.where(flip_B[:, None, None, None], batch["image"][:, :, ::-1], batch["image"])
        return {**batch, "image": image}


def _check_process(global_batch_size: int, process_index: int, process_count: int) -> int:
    if not _is_int(global_batch_size) or global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size!r} must be a positive int.")
    if not _is_int(process_count) or process_count <= 0:
        raise ValueError(f"process_count={process_count!r} must be a positive int.")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r} must be in [0, {process_count}).")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} does not divide by process_count="
            f"{process_count}; pick a batch size that is a multiple of the number of processes."
        )
    return global_batch_size // process_count


def train_iterator(
    data_config: ml_collections.ConfigDict,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator over training batches.

    Examples are shuffled, then repeated: each epoch is a fresh permutation
    (seeded by `seed` and the epoch number) and consecutive global batches run
    across epoch boundaries. Every process computes the same global batch of
    example indices and reads only its own contiguous slice of it, so slices
    are disjoint and their union, in process order, is the global batch.

    Args:
      data_config: see `default_data_config`.
      global_batch_size: examples per step over all processes.
      seed: shuffling seed (int >= 0); same seed, same stream.
      process_index: this process, in [0, process_count) (`jax.process_index()`).
      process_count: number of processes (`jax.process_count()`).
      worker_count: grain worker processes reading ahead; 0 reads in threads of
        this process. The stream does not depend on it.

    Returns:
      A ``grain.DatasetIterator`` of dicts 'image' (uint8 [B, H, W, C]),
      'label' (int32 [B]) and 'index' (int64 [B]), B = global_batch_size //
      process_count, with ``get_state()`` / ``set_state()``.

    Raises:
      ValueError: bad config field, or global_batch_size not divisible by
        process_count.
    """
    opts = _options(data_config)
    local = _check_process(global_batch_size, process_index, process_count)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0.")
    if not _is_int(worker_count) or worker_count < 0:
        raise ValueError(f"worker_count={worker_count!r} must be an int >= 0.")
    reader = sources.SplitReader(opts.name, opts.train_split, opts.data_dir, opts.image_size)
    if reader.num_examples == 0:
        raise ValueError(f"Split {opts.train_split!r} of {opts.name!r} has no examples.")
    # grain reseeds each epoch with seed + epoch; hashing the user's seed first
    # keeps run `seed` from replaying run `seed + 1` one epoch late.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    dataset = (
        grain.MapDataset.range(reader.num_examples)
        .shuffle(seed=shuffle_seed)
        .repeat()
        .batch(global_batch_size)
        .map(
            _MakeTrainBatch(
                reader=reader,
                binarize=_binarizer(opts, opts.train_split),
                start=process_index * local,
                stop=(process_index + 1) * local,
            )
        )
    )
    if opts.random_flip:
        # A seed of its own, so flips do not follow the shuffle.
        flip = _RandomFlip(global_batch_size, process_index * local, (process_index + 1) * local)
        dataset = dataset.random_map(flip, seed=(shuffle_seed + 1) % 2**32)
    dataset = dataset.to_iter_dataset(_READ_OPTIONS)
    if worker_count:
        if not flags.FLAGS.is_parsed():
            # grain <= 0.2.18 reads one of its absl flags when starting workers and
            # fails if flags are unparsed, as in scripts without absl.app and in
            # tests (google/grain#1355). Defaults are what we want there.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(dataset)


@dataclasses.dataclass(frozen=True)
class _MakeEvalBatch:
    reader: sources.SplitReader
    binarize: _Binarizer
    batch_size: int
    start: int
    stop: int

    def __call__(self, batch_number: int) -> dict[str, np.ndarray]:
        first = batch_number * self.batch_size
        index_B = np.arange(first + self.start, first + self.stop, dtype=np.int64)
        real_B = index_B < self.reader.num_examples
        images = np.zeros((index_B.size, *self.reader.image_shape), np.uint8)
        labels = np.full((index_B.size,), -1, np.int32)
        if real_B.any():
            real_index = index_B[real_B]
            real_images, real_labels = self.reader.read(real_index)
            images[real_B] = self.binarize(real_images, real_index)
            labels[real_B] = real_labels
        return {
            "image": images,
            "label": labels,
            "index": np.where(real_B, index_B, -1),
            "mask": real_B.astype(np.float32),
        }


class EvalBatches:
    """Re-iterable evaluation batches over one split; the split is read once, here.

    Iterating yields the split in order, exactly once, in `len(self)` batches
    of `batch_size` examples (over all processes); the last batch is padded
    with zero images, label -1 and index -1. Every batch carries 'mask'
    (float32 [B]: 1 for real examples, 0 for padding), so
    ``sum(mask * x) / sum(mask)`` is the exact split average.
    """

    def __init__(
        self,
        data_config: ml_collections.ConfigDict,
        batch_size: int,
        split: str | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        opts = _options(data_config)
        local = _check_process(batch_size, process_index, process_count)
        split = split or opts.eval_split
        self.split = split
        self.batch_size = batch_size
        self.reader = sources.SplitReader(opts.name, split, opts.data_dir, opts.image_size)
        self.num_examples = self.reader.num_examples
        self._dataset = grain.MapDataset.range(len(self)).map(
            _MakeEvalBatch(
                reader=self.reader,
                binarize=_binarizer(opts, split),
                batch_size=batch_size,
                start=process_index * local,
                stop=(process_index + 1) * local,
            )
        )

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self):
        return iter(self._dataset.to_iter_dataset(_READ_OPTIONS))


def eval_batches(
    data_config: ml_collections.ConfigDict,
    batch_size: int,
    split: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> EvalBatches:
    """Returns deterministic, in-order evaluation batches covering a split once.

    Build it once and iterate it at every evaluation: the split is read (and,
    when small, loaded into memory) here, not per pass.

    Args:
      data_config: see `default_data_config`.
      batch_size: examples per batch over all processes.
      split: TFDS split; None means data_config.eval_split.
      process_index: this process, in [0, process_count).
      process_count: number of processes; each yields its contiguous slice of
        every batch, and all yield the same number of batches.

    Returns:
      An `EvalBatches`: dicts 'image', 'label', 'index' (-1 on padding) and
      'mask', with batch size batch_size // process_count.
    """
    return EvalBatches(data_config, batch_size, split, process_index, process_count)
