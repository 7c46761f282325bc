"""The one statistics structure every model returns with `return_stats=True`."""

from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from .._misc import dtype_of
from .._solution import RESULTS, Solution


class ModelStats(eqx.Module):
    """What every model (`DEQ`, `MonotoneDEQ`, `NeuralODE`, `AugmentedNeuralODE`,
    `HomoODE`, and `ImageClassifier` around them) returns with `return_stats=True`, per
    sample (batched under `jax.vmap`). Consumers read these fields and never branch on
    the model kind.

    **Attributes:**

    - `num_steps`: solver steps (equilibrium models) or ODE steps, accepted and
        rejected (ODE models).
    - `nfe`: evaluations of the model's cell or vector field (a JVP counts as one).
    - `residual`: the equilibrium residual norm where the model has one; NaN for the
        ODE models, whose end point is not an equilibrium.
    - `result`: a [`implicit_kit.RESULTS`][] member (diffrax's outcomes promoted, not
        collapsed): `stats.result == ik.RESULTS.successful` per sample.
    - `extras`: model-specific values, by name: `z0` (a learned initial point, with its
        gradient), `iterates`, `error_penalty`, `local_error_penalty`, `z_end` (the
        detached block output, added by `ImageClassifier`).
    """

    num_steps: Array
    nfe: Array
    residual: Array
    result: RESULTS
    extras: dict[str, Any]

    @classmethod
    def from_solution(cls, sol: Solution, **extras) -> "ModelStats":
        """The stats of a model whose block is one `ik.fixed_point`/`homotopy_solve`."""
        return cls(sol.stats["num_steps"], sol.stats["nfe"], sol.stats["residual"],
                   sol.result, extras)

    def failed(self) -> Array:
        """`True` where the solve did not succeed."""
        return self.result != RESULTS.successful

    def with_extras(self, **extras) -> "ModelStats":
        """A copy with `extras` added."""
        return ModelStats(self.num_steps, self.nfe, self.residual, self.result,
                          {**self.extras, **extras})


def no_residual(like) -> Array:
    """NaN in the floating dtype of `like`: the `residual` of a model that has none."""
    dtype = dtype_of(like)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(float)
    return lax.stop_gradient(jnp.array(jnp.nan, dtype))
