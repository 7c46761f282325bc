"""From a config to an `ik.models.ImageClassifier` (shared stem and head)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._config import Config
from ._models import ModelConfig


def build_model(m: ModelConfig, *, in_channels: int, classes: int, spatial: int, key,
                error_penalty: bool = False):
    """The model of section `m` (`m.build`): for the classifier kinds, the
    `ik.models.ImageClassifier` on `(in_channels, spatial, spatial)` images (the stem
    halves the spatial size); for kind `mondbm`, the `ik.models.MonotoneDBM` of the
    images."""
    return m.build(in_channels=in_channels, classes=classes, spatial=spatial, key=key,
                   error_penalty=error_penalty)


def make_model(cfg: Config, in_channels: int, spatial: int, classes: int = 10):
    model = build_model(cfg.model, in_channels=in_channels, classes=classes,
                        spatial=spatial, key=jr.key(cfg.train.seed),
                        error_penalty=cfg.regularizers.error_penalty > 0)
    dtype = jnp.dtype(cfg.train.dtype)
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


def count_params(model) -> int:
    """The number of trainable (floating-point) parameters of `model`."""
    return int(sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(model,
                                                                        eqx.is_inexact_array))))
