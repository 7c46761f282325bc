"""The data of a config: normalised splits, and padding of the eval batches."""

import numpy as np

from .. import data as ik_data
from ._config import ConfigError, DataConfig


def load_data(d: DataConfig, dtype: str = "float32"):
    """`(train, test)` of the config's `data` section as normalised numpy arrays of
    `dtype` (statistics of the training split; levels in [0, 1] with
    `normalise: false`)."""
    kw = {"root": d.dir, "seed": d.split_seed, "test_size": d.test_size}
    x, y = ik_data.load(d.name, "train", **kw)
    xt, yt = ik_data.load(d.name, "test", **kw)
    if d.upsample > 1:
        x = x.repeat(d.upsample, 2).repeat(d.upsample, 3)
        xt = xt.repeat(d.upsample, 2).repeat(d.upsample, 3)
    if d.downsample > 1:
        x, xt = _pool(x, d.downsample), _pool(xt, d.downsample)
    dtype = np.dtype(dtype)
    if not d.normalise:
        return (x.astype(dtype), y), (xt.astype(dtype), yt)
    mean, std = ik_data.normalisation(x)
    return ((ik_data.normalise(x, mean, std).astype(dtype), y),
            (ik_data.normalise(xt, mean, std).astype(dtype), yt))


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
