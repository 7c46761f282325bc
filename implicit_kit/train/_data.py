"""The data of a config: normalised splits, and padding of the eval batches."""

from typing import NamedTuple

import numpy as np

from .. import data as ik_data
from ._config import ConfigError, DataConfig


class Splits(NamedTuple):
    """The splits of a config's data: `train` and `test` `(x, y)` pairs, and `val`, the
    `data.val_size` samples held out of the training split (`None` without)."""

    train: tuple
    val: tuple | None
    test: tuple


def load_data(d: DataConfig, dtype: str = "float32"):
    """`(train, test)` of the config's `data` section as normalised numpy arrays of
    `dtype` (statistics of the training split; levels in [0, 1] with
    `normalise: false`); `train` without the validation samples (see `load_splits`)."""
    splits = load_splits(d, dtype)
    return splits.train, splits.test


def load_splits(d: DataConfig, dtype: str = "float32") -> Splits:
    """The `Splits` of the config's `data` section, normalised as `load_data`'s (by the
    statistics of the training samples, the validation ones excluded). The validation
    samples are `data.val_size` of the training split drawn by `data.split_seed`: every
    choice made from results (tolerances, penalty weights, beta) is made on them, never
    on the test split."""
    kw = {"root": d.dir, "seed": d.split_seed, "test_size": d.test_size}
    x, y = ik_data.load(d.name, "train", **kw)
    xt, yt = ik_data.load(d.name, "test", **kw)
    xv = yv = None
    if d.val_size:
        if d.val_size >= x.shape[0]:
            raise ConfigError(f"key 'data.val_size' ({d.val_size}) must be smaller than "
                              f"the training split ({x.shape[0]} samples).")
        order = np.random.default_rng(d.split_seed).permutation(x.shape[0])
        held, kept = np.sort(order[:d.val_size]), np.sort(order[d.val_size:])
        xv, yv, x, y = x[held], y[held], x[kept], y[kept]
    images = [x, xt] + ([] if xv is None else [xv])
    if d.upsample > 1:
        images = [a.repeat(d.upsample, 2).repeat(d.upsample, 3) for a in images]
    if d.downsample > 1:
        images = [_pool(a, d.downsample) for a in images]
    dtype = np.dtype(dtype)
    if d.normalise:
        mean, std = ik_data.normalisation(images[0])
        images = [ik_data.normalise(a, mean, std) for a in images]
    images = [a.astype(dtype) for a in images]
    return Splits((images[0], y), None if xv is None else (images[2], yv), (images[1], yt))


def _pool(x, k):
    """Average pooling by `k` (the image sides must be divisible by it)."""
    n, c, h, w = x.shape
    if h % k or w % k:
        raise ConfigError(f"key 'data.downsample' ({k}) must divide the image size "
                          f"{h}×{w}.")
    return x.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))


def pad_eval(x, y, size):
    """`x`, `y` padded to a multiple of `size` by repeating the first sample, and the
    mask of the real samples (eval steps weight by it, so padding never counts)."""
    n = x.shape[0]
    pad = (-n) % size
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    if pad:
        x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
        y = np.concatenate([y, np.repeat(y[:1], pad, 0)])
    return x, y, mask
