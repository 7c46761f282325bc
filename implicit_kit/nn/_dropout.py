"""Variational dropout: one mask per solve, the same on every iteration."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array

from ._prepare import AbstractPerSolve


class FixedMask(eqx.Module):
    """A dropout mask drawn for one solve (multiply by it). `mask=None`: identity."""

    mask: Array | None

    def __call__(self, x: Array) -> Array:
        return x if self.mask is None else x * self.mask.astype(x.dtype)


class VariationalDropout(AbstractPerSolve):
    r"""Dropout whose mask is sampled once per solve and reused by every iteration of
    the solver (and by the backward solve), so that the map being solved is a fixed
    function. Inverted scaling: kept units are multiplied by $1/(1-p)$.

    Reference: Gal & Ghahramani (2016); Bai et al., DEQ (2019); the HomoODE authors'
    `VariationalHidDropout2d` (one per-channel mask, p = 0.1).

    **Arguments:**

    - `p`: the drop probability.
    - `shape`: the mask shape, broadcast against the activation: `(channels, 1, 1)`
        for a per-channel mask on a `(C, H, W)` feature map, `(size,)` for a vector.
    """

    p: float = eqx.field(static=True)
    shape: tuple[int, ...] = eqx.field(static=True)

    def __check_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"`p` must be in [0, 1), got {self.p}.")

    def prepare(self, key, inference):
        if inference or self.p == 0.0:
            return FixedMask(None)
        if key is None:
            raise ValueError(
                "VariationalDropout needs a `key` (pass `key=` to the model, or "
                "`inference=True`)."
            )
        keep = jr.bernoulli(key, 1.0 - self.p, self.shape)
        return FixedMask(keep.astype(jnp.result_type(float)) / (1.0 - self.p))

    def __call__(self, x: Array) -> Array:
        raise RuntimeError(
            "VariationalDropout must be prepared once per solve with `ik.nn.prepare` "
            "(the implicit_kit models do this); calling it directly would draw a new "
            "mask at every iteration."
        )
