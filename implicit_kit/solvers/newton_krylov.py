from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._misc import gmres, tree_add
from ._base import AbstractRootSolver, AbstractSolverState, init_residual


def newton_step(g_fn, y, linear_solver, damping=1.0):
    """One inexact Newton step on `G = g_fn` (`g_fn(y) -> (G(y), aux)`): linearise `G` at
    `y` (JVPs only), solve `J_G(y) delta = -G(y)` with the lineax `linear_solver`, and
    step `y + damping * delta` (a non-finite `delta` is no step). Returns
    `(y_new, G(y), aux, linear_steps)`. The one Newton step of the library: `NewtonKrylov`
    and the homotopy's `NewtonCorrector` are built on it."""
    g, lin, aux = jax.linearize(g_fn, y, has_aux=True)
    operator = lx.FunctionLinearOperator(lin, jax.eval_shape(lambda: y))
    rhs = jtu.tree_map(jnp.negative, g)
    sol = lx.linear_solve(operator, rhs, linear_solver, throw=False)
    delta = jtu.tree_map(lambda d: jnp.where(jnp.all(jnp.isfinite(d)), d, 0), sol.value)
    steps = jnp.asarray(sol.stats.get("num_steps", 0))
    return tree_add(y, delta, damping), g, aux, steps


class _NewtonKrylovState(AbstractSolverState):
    linear_steps: Int[Array, ""]
    nfe: Int[Array, ""]
    residual: Float[Array, ""]
    scale: Float[Array, ""]


class NewtonKrylov(AbstractRootSolver):
    r"""Inexact Newton's method with a matrix-free Krylov linear solve.

    Each step linearises `G` at $y_k$ (JVPs only, no Jacobian is materialised) and solves
    $J_G(y_k)\,\delta = -G(y_k)$ with a lineax Krylov solver (GMRES by default), then
    steps $y_{k+1} = y_k + \beta\delta$. Converges quadratically near a regular root, and
    where plain iteration diverges (a map with Jacobian eigenvalues outside the unit disc).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(G(y)) <= atol + rtol * norm(y)`.
    - `linear_solver`: any lineax solver; defaults to `lx.GMRES(rtol=1e-4, atol=1e-8,
        restart=20, max_steps=100)`. Its failure does not stop the Newton iteration
        (an inexact step is still a step); the total linear steps appear in the stats.
    - `damping`: $\beta$.
    - `norm`: the norm of the residual.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    # A loose inner tolerance (the forcing term of inexact Newton), not the defaults.
    linear_solver: lx.AbstractLinearSolver = gmres(
        rtol=1e-4, atol=1e-8, restart=20, max_steps=100
    )
    damping: float = 1.0
    norm: Callable[[PyTree], Scalar] = optx.two_norm
    counts_nfe: ClassVar[bool] = True
    stats_from_state: ClassVar[bool] = True

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        zero = jnp.array(0)
        return _NewtonKrylovState(zero, zero, *init_residual(y))

    def step(self, fn, y, args, options, state, tags):
        new_y, g, aux, steps = newton_step(
            lambda _y: fn(_y, args), y, self.linear_solver, self.damping
        )
        new_state = _NewtonKrylovState(
            state.linear_steps + steps,
            state.nfe + 1 + steps,  # the linearisation, and one JVP per Krylov step
            self.norm(g),
            self.norm(y),
        )
        return new_y, new_state, aux

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {"linear_steps": state.linear_steps}
