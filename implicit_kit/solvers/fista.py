from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Float, PyTree, Scalar

from .._misc import tree_sub, tree_vdot
from ._base import AbstractFixedPointSolver, AbstractSolverState, init_residual


class _FISTAState(AbstractSolverState):
    previous: PyTree  # x_{k-1} = T(y_{k-1})
    t: Float[Array, ""]
    residual: Float[Array, ""]
    scale: Float[Array, ""]


class FISTA(AbstractFixedPointSolver):
    r"""Nesterov-accelerated fixed-point iteration (FISTA, Beck & Teboulle 2009) with
    adaptive restart (O'Donoghue & Candès 2015), for the proximal-gradient map
    $T(y) = \mathrm{prox}_{\eta g}(y - \eta\nabla f(y))$ of a convex $f + g$ with
    $\eta \le 1/L$ (`ik.optimality.prox_gradient_map`; projected gradient is the case
    $g$ = the indicator of a convex set):

    $x_k = T(y_k)$, $t_{k+1} = (1 + \sqrt{1 + 4t_k^2})/2$,
    $y_{k+1} = x_k + \frac{t_k - 1}{t_{k+1}}(x_k - x_{k-1})$, with $t$ reset to 1 when
    $\langle y_k - x_k, x_k - x_{k-1}\rangle > 0$ (the momentum points uphill) or the
    residual grew (a safeguard that also makes it converge on contractions that are not
    averaged, tested on the library's test problems).

    Run by `ik.fixed_point(T, ...)`, so the implicit backward pass differentiates the
    proximal-gradient fixed point, the problem's optimality condition. The residual is
    $\|T(y_k) - y_k\|$; the returned point is $T(y_k)$ of the step that passed the test
    (its residual is no larger for the averaged maps FISTA is for).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(T(y) - y) <= atol + rtol * norm(y)`.
    - `restart`: adaptive restart (default True).
    - `norm`: the norm of the residual.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    restart: bool = eqx.field(static=True, default=True)
    norm: Callable[[PyTree], Scalar] = optx.two_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        residual, scale = init_residual(y)
        return _FISTAState(y, jnp.array(1.0, residual.dtype), residual, scale)

    def step(self, fn, y, args, options, state, tags):
        x, aux = fn(y, args)
        g = tree_sub(x, y)
        residual = self.norm(g)
        t = state.t
        if self.restart:
            uphill = tree_vdot(tree_sub(y, x), tree_sub(x, state.previous)) > 0
            # also when the residual grew: a safeguard for maps that are contractions
            # without being averaged, where momentum alone can diverge
            t = jnp.where(uphill | (residual > state.residual), jnp.ones_like(t), t)
        t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
        beta = (t - 1) / t_next
        new_state = _FISTAState(x, t_next, residual, self.norm(y))
        done, _ = self.terminate(fn, y, args, options, new_state, tags)
        new_y = jtu.tree_map(
            lambda a, b: jnp.where(done, a, a + beta * (a - b)).astype(a.dtype),
            x, state.previous)
        return new_y, new_state, aux
