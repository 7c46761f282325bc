r"""The monotone operator equilibrium network (monDEQ) and its operator splittings.

The equilibrium $z = \mathrm{ReLU}(Wz + c)$ of a monotone layer ($I - W \succeq mI$,
$c = Ux + b$) is the zero of $F + G$ with $F(z) = (I - W)z - c$ and $G$ the normal cone
of the nonnegative orthant, whose resolvent (proximal operator) is ReLU for every step
size. Both splittings are run as fixed-point iterations by the shared driver, so the
backward pass of `ImplicitAdjoint` (fixed-point iteration on the transposed Jacobian of
the splitting map) is the same splitting applied to the transposed operator, as in the
monDEQ paper (Winston & Kolter, NeurIPS 2020, Thm. 3).
"""

from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._adjoint import ImplicitAdjoint
from .._fixed_point import fixed_point
from .._solution import Solution
from ..nn import MonotoneConv, MonotoneLinear
from ..solvers import Picard
from ._base import AbstractImplicitModel, with_fixed_point_settings
from ._shapes import check_input
from ._stats import ModelStats


def _fb_map(z, args):
    op, c, alpha = args
    return jax.nn.relu((1 - alpha) * z + alpha * (op.W(z) + c))


def _pr_map(u, args):
    op, c, alpha = args
    r = 2 * jax.nn.relu(u) - u  # reflected resolvent of G
    return 2 * op.V(r + alpha * c) - r  # reflected resolvent of F


def auto_alpha(kind: str, op, m: float):
    r"""The step size of a splitting from the operator's strong-monotonicity margin $m$
    and $L = \|I - W\|_2$ (by power iteration, once per solve; not differentiated: the
    equilibrium does not depend on it):

    - Peaceman–Rachford: $\alpha = 1/\sqrt{mL}$, the step that minimises the linear rate
      of Douglas–Rachford / Peaceman–Rachford for an $m$-strongly monotone,
      $L$-Lipschitz operator (Giselsson & Boyd, IEEE TAC 2017, "Linear convergence
      and metric selection for Douglas–Rachford splitting and ADMM", for the symmetric
      case; on trained digits monDEQs it took 14.5 and 19.5 steps where the best of
      α ∈ {1, 1/2, ..., 1/16, 1/L} took 16.1 and 19.1);
    - forward–backward: $\alpha = m/L^2$, the minimiser of its rate bound
      $\sqrt{1 - 2\alpha m + \alpha^2L^2}$ (inside its convergence range $2m/L^2$).

    As the network trains, $L$ grows (30 after 3 epochs on the digits), and a fixed
    step slows the splitting down: α = 1 took 47 steps to 1e-3 where this one took 15.
    """
    lip = lax.stop_gradient(op.lipschitz())
    if kind == "pr":
        return 1.0 / jnp.sqrt(m * lip)
    return m / lip**2


class _Splitting(eqx.Module):
    def _alpha(self, layer, op, dtype):
        if self.alpha is None:
            return auto_alpha(self.KIND, op, layer.m).astype(dtype)
        return jnp.asarray(self.alpha, dtype)

    def _solve(self, fn, op, c, alpha, y0, adjoint, max_steps, throw, probe):
        if adjoint is None:
            adjoint = ImplicitAdjoint(max_steps=max_steps)
        y0 = jnp.zeros_like(c) if y0 is None else y0
        solver = Picard(rtol=self.rtol, atol=self.atol) if self.solver is None else self.solver
        return fixed_point(
            fn, y0, (op, c, alpha), solver,
            adjoint=adjoint, max_steps=max_steps, throw=throw, probe=probe,
        )


class ForwardBackward(_Splitting):
    r"""Forward–backward splitting $z^+ = \mathrm{ReLU}((1-\alpha)z + \alpha(Wz + c))$.

    Converges linearly for $\alpha \le 2m/L^2$, $L = \|I - W\|_2$ (with $\alpha = 1$ it is
    the plain network iteration, which can diverge).

    **Arguments:**

    - `alpha`: the step size, or `None` (default): $m/L^2$ from the layer's margin
        and $\|I - W\|_2$ computed per solve.
    - `rtol`, `atol`: stopping rule on $\|z^+ - z\|$ relative to $\|z\|$.
    - `solver`: the fixed-point solver that iterates the splitting map (default
        `ik.Picard(rtol, atol)`, the plain splitting); e.g. `ik.Halpern()` for its
        certified residual (the map is averaged for $\alpha \le 2m/L^2$), or
        `ik.Anderson()`. Its own tolerances apply.
    """

    alpha: float | None = None
    rtol: float = 1e-6
    atol: float = 1e-8
    solver: Any = None
    KIND = "fb"

    def solve(self, layer, x, *, y0=None, adjoint=None, max_steps=256, throw=True,
              probe=None) -> Solution:
        """Solve the equilibrium of the monotone `layer` at input `x`; differentiable."""
        op = layer.operator()
        c = layer.bias(x)
        alpha = self._alpha(layer, op, c.dtype)
        return self._solve(_fb_map, op, c, alpha, y0, adjoint, max_steps, throw, probe)


class PeacemanRachford(_Splitting):
    r"""Peaceman–Rachford splitting, converging for every $\alpha > 0$:

    $u^{1/2} = 2z - u$, $z^{1/2} = V(u^{1/2} + \alpha c)$, $u = 2z^{1/2} - u^{1/2}$,
    $z = \mathrm{ReLU}(u)$, with $V = (I + \alpha(I - W))^{-1}$ computed once per solve
    (dense inverse, or per-frequency blocks by FFT for convolutions). The iteration runs
    on $u$; the returned value is $z = \mathrm{ReLU}(u^*)$ (and `y0`, if given, is a
    start for $u$).

    **Arguments:**

    - `alpha`: the step size, or `None` (default): $1/\sqrt{mL}$ from the layer's
        margin $m$ and $L = \|I - W\|_2$, computed per solve (see `auto_alpha`;
        the paper tunes a fixed α over {1, 1/2, 1/4, ...} during training).
    - `rtol`, `atol`: stopping rule on the change of $u$.
    - `solver`: the fixed-point solver that iterates the map on $u$ (default
        `ik.Picard(rtol, atol)`; the map is nonexpansive, so `ik.Halpern()` applies).
    """

    alpha: float | None = None
    rtol: float = 1e-6
    atol: float = 1e-8
    solver: Any = None
    KIND = "pr"

    def solve(self, layer, x, *, y0=None, adjoint=None, max_steps=256, throw=True,
              probe=None) -> Solution:
        """Solve the equilibrium of the monotone `layer` at input `x`; differentiable."""
        op = layer.operator()
        c = layer.bias(x)
        alpha = self._alpha(layer, op, c.dtype)
        op = op.with_resolvent(alpha)
        sol = self._solve(_pr_map, op, c, alpha, y0, adjoint, max_steps, throw, probe)
        return eqx.tree_at(lambda s: s.value, sol, jax.nn.relu(sol.value))


class MonotoneDEQ(AbstractImplicitModel):
    r"""monDEQ: the unique equilibrium $z^* = \mathrm{ReLU}(Wz^* + Ux + b)$ with
    $W = (1-m)I - A^\top A + B - B^\top$ (so $I - W \succeq mI$ for any weights), found
    by operator splitting (`ik.models.PeacemanRachford`, converging for every step
    size, or `ik.models.ForwardBackward`); the backward pass is the same splitting on
    the transposed operator.

    Build it with `MonotoneDEQ.dense(size, input_size, key=...)` or
    `MonotoneDEQ.conv(channels, input_channels, shape, key=...)`, or from a layer.

    **Arguments:**

    - `layer`: an `ik.nn.MonotoneLinear` or `ik.nn.MonotoneConv`.
    - `solver`: the splitting (default `PeacemanRachford(alpha=1.0)`).
    - `adjoint`: the backward mode (default: `ImplicitAdjoint` = the backward splitting).
    - `max_steps`, `throw`: as for `fixed_point` (256 steps; `throw=False`, the rule for
        every model).
    """

    layer: MonotoneLinear | MonotoneConv
    solver: Any = PeacemanRachford()
    adjoint: Any = None
    max_steps: int = eqx.field(static=True, default=256)
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

    def with_solver(self, **settings):
        """A copy with other solver settings (`solver`, `adjoint`, `max_steps`, `throw`,
        `rtol`, `atol`), every array kept: see
        [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        return with_fixed_point_settings(self, settings)

    def __call__(self, x: Array, *, key=None, inference: bool = False,
                 return_stats: bool = False, probe=None):
        del key, inference  # no stochastic layers
        check_input("MonotoneDEQ", x, self.layer.input_shape)
        sol = self.solver.solve(
            self.layer, x, adjoint=self.adjoint, max_steps=self.max_steps,
            throw=self.throw, probe=probe,
        )
        if not return_stats:
            return sol.value
        return sol.value, ModelStats.from_solution(sol)
