"""The one statistics structure every model returns with `return_stats=True`."""

import dataclasses
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from .._misc import dtype_of
from .._solution import RESULTS, Solution


class ModelStats(eqx.Module):
    """What every model (`DEQ`, `MonotoneDEQ`, `NeuralODE`, `AugmentedNeuralODE`,
    `HomoODE`, `CNF`, `MonotoneDBM`, and `ImageClassifier` around them) returns with
    `return_stats=True`, per sample (batched under `jax.vmap`). Consumers (the training
    loop, the CLI, the benchmarks) read these fields and never branch on the model kind
    or on string keys.

    **Attributes:**

    - `num_steps`: solver steps (equilibrium models) or ODE steps, accepted and
        rejected (ODE models).
    - `nfe`: evaluations of the model's cell or vector field (a JVP counts as one).
    - `residual`: the equilibrium residual norm where the model has one; NaN for the
        ODE models, whose end point is not an equilibrium.
    - `result`: a [`implicit_kit.RESULTS`][] member (diffrax's outcomes promoted, not
        collapsed): `stats.result == ik.RESULTS.successful` per sample.

    Optional, `None` where the model has none (what the training loop reads):

    - `z0`: the start point of the solve (a learned or predicted one, with its
        gradient: `ik.models.init_loss(stats.z0, stats.z_end)` trains it).
    - `z_end`: the block's output, detached (added by `ImageClassifier`).
    - `aux_loss`: a model's own loss term, added to the task loss (`MonotoneDBM`: the
        reconstruction of the unobserved pixels).
    - `error_penalty`: the accumulated error estimate of an `ODESolve` with
        `error_penalty=True`; `local_error_penalty`: of `local_penalty=True`.
    - `iterates`: the saved iterates of a `DEQ` with `save_iterates`.
    - `metrics`: per-sample scalars logged by name (averaged by the training loop).
    - `extras`: other model-specific outputs, never read by the loop (`MonotoneDBM`:
        `pixels`, the marginal mean image, and `observed_mask`).
    """

    num_steps: Array
    nfe: Array
    residual: Array
    result: RESULTS
    z0: Array | None = None
    z_end: Array | None = None
    aux_loss: Array | None = None
    error_penalty: Array | None = None
    local_error_penalty: Array | None = None
    iterates: Array | None = None
    metrics: dict[str, Array] = eqx.field(default_factory=dict)
    extras: dict[str, Any] = eqx.field(default_factory=dict)

    @classmethod
    def from_solution(cls, sol: Solution, **fields) -> "ModelStats":
        """The stats of a model whose block is one `ik.fixed_point`/`homotopy_solve`,
        with the optional `fields` given."""
        return cls(sol.stats["num_steps"], sol.stats["nfe"], sol.stats["residual"],
                   sol.result, **fields)

    def failed(self) -> Array:
        """`True` where the solve did not succeed."""
        return self.result != RESULTS.successful

    def replace(self, **fields) -> "ModelStats":
        """A copy with `fields` replaced."""
        return dataclasses.replace(self, **fields)


def no_residual(like) -> Array:
    """NaN in the floating dtype of `like`: the `residual` of a model that has none."""
    dtype = dtype_of(like)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(float)
    return lax.stop_gradient(jnp.array(jnp.nan, dtype))
