from collections.abc import Callable

import optimistix as optx
from jaxtyping import Array, Float, PyTree, Scalar

from .._misc import tree_add, tree_sub
from ._base import AbstractFixedPointSolver, AbstractSolverState, init_residual


class _PicardState(AbstractSolverState):
    residual: Float[Array, ""]
    scale: Float[Array, ""]


class Picard(AbstractFixedPointSolver):
    r"""Damped fixed-point (Picard / Krasnosel'skii–Mann) iteration.

    $y_{k+1} = y_k + \beta (T(y_k) - y_k)$ with damping $\beta \in (0, 1]$
    ($\beta = 1$: plain Picard). Converges when `T` is a contraction; with
    $\beta < 1$ also for averaged (nonexpansive) maps.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(T(y) - y) <= atol + rtol * norm(y)`.
    - `damping`: the step $\beta$.
    - `norm`: the norm of the residual (default the 2-norm over all leaves).
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    damping: float = 1.0
    norm: Callable[[PyTree], Scalar] = optx.two_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return _PicardState(*init_residual(y))

    def step(self, fn, y, args, options, state, tags):
        fy, aux = fn(y, args)
        g = tree_sub(fy, y)
        new_y = tree_add(y, g, self.damping)
        return new_y, _PicardState(self.norm(g), self.norm(y)), aux
