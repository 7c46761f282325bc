"""Batching and normalisation."""

from collections.abc import Iterator

import numpy as np


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0,
            epoch: int = 0, shuffle: bool = True,
            drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(x, y)` minibatches for one epoch.

    The order is a permutation drawn from `(seed, epoch)` only, so an epoch replays
    exactly (what a resumed run needs). `drop_last=True` (default) drops the final
    short batch, so every batch has one shape and a jitted step never retraces.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"`x` and `y` must have the same length, got {x.shape[0]} and {y.shape[0]}."
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    n = x.shape[0]
    if drop_last and n < batch_size:
        raise ValueError(
            f"`batch_size`={batch_size} exceeds the {n} samples and `drop_last=True` "
            "would yield nothing."
        )
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
             else np.arange(n))
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """The number of batches of `batch_size` in `n` samples (the last partial one
    counted only without `drop_last`)."""
    return n // batch_size if drop_last else -(-n // batch_size)


def normalisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of images `(N, C, H, W)` (computed on
    the training split and applied to every split with [`implicit_kit.data.normalise`][])."""
    if x.ndim != 4:
        raise ValueError(f"`x` must be images (N, C, H, W), got shape {x.shape}.")
    mean = x.mean(axis=(0, 2, 3), keepdims=True)[0]
    std = x.std(axis=(0, 2, 3), keepdims=True)[0]
    return mean, np.maximum(std, 1e-8)


def normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """`(x − mean) / std` in `x`'s dtype (the statistics of `normalisation`)."""
    return ((x - mean) / std).astype(x.dtype)
