"""Weight and spectral normalisation, computed once per solve (see `prepare`)."""

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray

from ._prepare import AbstractPerSolve


def _get(layer, name):
    return getattr(layer, name)


def _set(layer, name, value):
    return eqx.tree_at(lambda lay: getattr(lay, name), layer, value)


class WeightNorm(AbstractPerSolve):
    r"""Weight normalisation $W = g \odot V / \|V\|$ (norm over every axis but the
    first, i.e. per output unit), applied to the `weight` of `layer` once per solve.

    Reference: Salimans & Kingma (2016); used by the DEQ and monDEQ papers.

    **Arguments:**

    - `layer`: an Equinox layer with a `weight` (`eqx.nn.Linear`, `eqx.nn.Conv2d`, ...).
    - `weight_name`: the name of the weight field.
    """

    layer: eqx.Module
    g: Array
    weight_name: str = eqx.field(static=True)

    def __init__(self, layer: eqx.Module, weight_name: str = "weight"):
        self.layer = layer
        self.weight_name = weight_name
        w = _get(layer, weight_name)
        self.g = jnp.sqrt(jnp.sum(w**2, axis=tuple(range(1, w.ndim)), keepdims=True))

    def weight(self) -> Array:
        """The normalised weight `g · v / ‖v‖` (norm per output row)."""
        v = _get(self.layer, self.weight_name)
        norm = jnp.sqrt(jnp.sum(v**2, axis=tuple(range(1, v.ndim)), keepdims=True))
        return self.g * v / norm

    def prepare(self, key, inference):
        return _set(self.layer, self.weight_name, self.weight())

    def __call__(self, *args, **kwargs):
        # Outside a solve, still correct (computed per call).
        return self.prepare(None, True)(*args, **kwargs)


class SpectralNorm(AbstractPerSolve):
    r"""Spectral normalisation $W = \gamma\, V / \sigma_{\max}(V)$, once per solve.

    $\sigma_{\max}$ of the weight reshaped to (out, rest) is estimated by `num_iters`
    power iterations from a fixed start vector (no mutable state: the same estimate on
    every call with the same weight); as in Miyato et al. (2018) the singular vectors
    are not differentiated through. `scale` $\gamma$ sets the target norm (e.g. 0.9 to
    make a DEQ cell contractive in that layer).

    **Arguments:**

    - `layer`: an Equinox layer with a `weight`.
    - `scale`: the spectral norm of the normalised weight.
    - `num_iters`: power iterations per solve.
    - `key`: for the start vector.
    """

    layer: eqx.Module
    u0: Array
    scale: float = eqx.field(static=True)
    num_iters: int = eqx.field(static=True)
    weight_name: str = eqx.field(static=True)

    def __init__(
        self,
        layer: eqx.Module,
        scale: float = 1.0,
        num_iters: int = 20,
        weight_name: str = "weight",
        *,
        key: PRNGKeyArray,
    ):
        self.layer = layer
        self.scale = scale
        self.num_iters = num_iters
        self.weight_name = weight_name
        w = _get(layer, weight_name)
        self.u0 = jr.normal(key, (w.shape[0],), w.dtype)

    def sigma(self) -> Array:
        """The spectral norm estimate of the weight (power iteration from the stored
        vector, gradients stopped through the vectors)."""
        w = _get(self.layer, self.weight_name)
        mat = w.reshape(w.shape[0], -1)
        msg = lax.stop_gradient(mat)

        def body(_, u):
            v = msg.T @ u
            v = v / jnp.linalg.norm(v)
            u = msg @ v
            return u / jnp.linalg.norm(u)

        u0 = lax.stop_gradient(self.u0)
        u = lax.fori_loop(0, self.num_iters, body, u0 / jnp.linalg.norm(u0))
        v = msg.T @ u
        v = lax.stop_gradient(v / jnp.linalg.norm(v))
        return u @ mat @ v

    def weight(self) -> Array:
        """The weight divided by its spectral norm, times `scale`."""
        w = _get(self.layer, self.weight_name)
        return self.scale * w / self.sigma()

    def prepare(self, key, inference):
        return _set(self.layer, self.weight_name, self.weight())

    def __call__(self, *args, **kwargs):
        return self.prepare(None, True)(*args, **kwargs)

