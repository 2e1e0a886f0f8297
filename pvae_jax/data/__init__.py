"""Input pipeline and offline dataset builders.

Importing this package registers the offline TFDS builders 'fashion_mnist_local'
and 'mnist5k_local'. See `pipeline` for the batch format and checkpointing.
"""

from pvae_jax.data.builders import FashionMnistLocal, Mnist5kLocal
from pvae_jax.data.pipeline import (
    BINARIZE_MODES,
    DatasetInfo,
    EvalBatches,
    dataset_info,
    default_data_config,
    eval_batches,
    train_iterator,
    uniform_per_example,
)
from pvae_jax.data.sources import DATASETS, MANUAL_FILES, DatasetSpec, prepare

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "MANUAL_FILES",
    "DatasetInfo",
    "DatasetSpec",
    "EvalBatches",
    "FashionMnistLocal",
    "Mnist5kLocal",
    "dataset_info",
    "default_data_config",
    "eval_batches",
    "prepare",
    "train_iterator",
    "uniform_per_example",
]
