from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._misc import tree_sub
from ._base import AbstractFixedPointSolver, AbstractSolverState, init_residual


class _HalpernState(AbstractSolverState):
    anchor: PyTree
    count: Int[Array, ""]  # steps since the anchor was set
    anchor_residual: Float[Array, ""]  # ||T(anchor) - anchor||
    residual: Float[Array, ""]
    scale: Float[Array, ""]


class Halpern(AbstractFixedPointSolver):
    r"""Halpern's anchored iteration $y_{k+1} = \beta_k a + (1-\beta_k) T(y_k)$,
    $\beta_k = 1/(k+2)$, with the anchor $a$ restarted when the residual has fallen by
    the factor `restart`.

    Within a run from an anchor $a$ (the start point $y_0$ at first), for a merely
    nonexpansive `T` (where Picard may cycle, e.g. a rotation), the last-iterate
    guarantee $\|y_k - T(y_k)\| \le 2\|a - y^*\|/(k+1)$ holds (Lieder 2021), faster than
    the $o(1/\sqrt{k})$ of Krasnosel'skii–Mann. A fixed anchor (`restart=None`) then
    converges to the fixed point nearest $y_0$, but only at that $O(1/k)$ rate, even on
    a contraction. A restart sets the anchor to $T(y_k)$ once
    $\|y_k - T(y_k)\| \le$ `restart` $\cdot \|a - T(a)\|$: every run keeps the bound
    (with $\|a - y^*\| \le \|y_0 - y^*\|$), the residual falls geometrically over the
    runs, and on a contraction the restarted iteration converges linearly.

    References: Halpern (1967); Lieder, "On the convergence rate of the Halpern
    iteration" (2021); Cai, Alacaoglu & Diakonikolas (ICLR 2024); restarts as in Lu &
    Yang's restarted Halpern PDHG (2024).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(T(y) - y) <= atol + rtol * norm(y)`.
    - `norm`: the norm of the residual.
    - `restart`: the factor in (0, 1) by which the residual must fall before the anchor
        is restarted (default 0.9); `None` keeps the anchor $y_0$ throughout.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.two_norm
    restart: float | None = eqx.field(static=True, default=0.9)

    def __check_init__(self):
        if self.restart is not None and not 0.0 < self.restart < 1.0:
            raise ValueError(f"`restart` must be in (0, 1) or None, got {self.restart}.")

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        residual, scale = init_residual(y)
        return _HalpernState(y, jnp.array(0), residual, residual, scale)

    def step(self, fn, y, args, options, state, tags):
        fy, aux = fn(y, args)
        g = tree_sub(fy, y)
        residual = self.norm(g)
        first = state.count == 0  # y is the anchor
        anchor_residual = jnp.where(first, residual, state.anchor_residual)
        if self.restart is None:
            restart = jnp.array(False)
        else:
            restart = jnp.invert(first) & (residual <= self.restart * anchor_residual)
        new_state = _HalpernState(
            jtu.tree_map(lambda a, f: jnp.where(restart, f, a).astype(a.dtype),
                         state.anchor, fy),
            jnp.where(restart, 0, state.count + 1),
            anchor_residual,
            residual,
            self.norm(y),
        )
        # When `y` passes the tolerance test (this step ends the solve), return T(y),
        # whose residual is at most y's for a nonexpansive T, not the anchored point
        # (pulled back towards the anchor, its residual can be several times the
        # tolerance).
        done, _ = self.terminate(fn, y, args, options, new_state, tags)
        beta = 1.0 / (state.count + 2.0)
        new_y = jtu.tree_map(
            lambda a, f: jnp.where(done | restart, f, beta * a + (1 - beta) * f).astype(
                f.dtype),
            state.anchor, fy,
        )
        return new_y, new_state, aux
