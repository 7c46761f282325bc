"""The monotone operator equilibrium network (monDEQ)."""

from typing import Any

import equinox as eqx
from jaxtyping import Array, PRNGKeyArray

from ..nn import MonotoneConv, MonotoneLinear
from ..solvers import PeacemanRachford


class MonotoneDEQ(eqx.Module):
    r"""monDEQ: the unique equilibrium $z^* = \mathrm{ReLU}(Wz^* + Ux + b)$ with
    $W = (1-m)I - A^\top A + B - B^\top$ (so $I - W \succeq mI$ for any weights), found
    by operator splitting (`ik.solvers.PeacemanRachford`, converging for every step
    size, or `ik.solvers.ForwardBackward`); the backward pass is the same splitting on
    the transposed operator.

    Build it with `MonotoneDEQ.dense(size, input_size, key=...)` or
    `MonotoneDEQ.conv(channels, input_channels, shape, key=...)`, or from a layer.

    **Arguments:**

    - `layer`: an `ik.nn.MonotoneLinear` or `ik.nn.MonotoneConv`.
    - `solver`: the splitting (default `PeacemanRachford(alpha=1.0)`).
    - `adjoint`: the backward mode (default: `ImplicitAdjoint` = the backward splitting).
    - `max_steps`, `throw`: as for `fixed_point`.
    """

    layer: MonotoneLinear | MonotoneConv
    solver: Any = PeacemanRachford()
    adjoint: Any = None
    max_steps: int = eqx.field(static=True, default=300)
    throw: bool = eqx.field(static=True, default=False)

    @classmethod
    def dense(cls, size: int, input_size: int, m: float = 1.0, *, key: PRNGKeyArray,
              **kwargs):
        """A monotone DEQ on vectors: `MonotoneLinear(size, input_size, m)`, with `kwargs`
        for the model (solver, adjoint, ...)."""
        return cls(MonotoneLinear(size, input_size, m, key=key), **kwargs)

    @classmethod
    def conv(cls, channels: int, input_channels: int, shape: tuple[int, int],
             m: float = 1.0, *, key: PRNGKeyArray, **kwargs):
        """A convolutional monotone DEQ on `(channels, *shape)` states:
        `MonotoneConv(channels, input_channels, shape, m)` (FFT-diagonalised), with `kwargs`
        for the model."""
        return cls(MonotoneConv(channels, input_channels, shape, m, key=key), **kwargs)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.layer.state_shape

    def __call__(self, x: Array, *, return_stats: bool = False, probe=None, key=None,
                 inference: bool = False):
        del key, inference  # no stochastic layers
        sol = self.solver.solve(
            self.layer, x, adjoint=self.adjoint, max_steps=self.max_steps,
            throw=self.throw, probe=probe,
        )
        if not return_stats:
            return sol.value
        return sol.value, {
            "num_steps": sol.stats["num_steps"],
            "residual": sol.stats["residual"],
            "result": sol.result._value,
        }
