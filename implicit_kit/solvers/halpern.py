from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree, Scalar

from ._base import AbstractFixedPointSolver, init_residual


class _HalpernState(eqx.Module):
    anchor: PyTree
    count: Int[Array, ""]
    residual: Float[Array, ""]
    scale: Float[Array, ""]


class Halpern(AbstractFixedPointSolver):
    r"""Halpern's anchored iteration $y_{k+1} = \beta_k y_0 + (1-\beta_k) T(y_k)$,
    $\beta_k = 1/(k+2)$.

    For a merely nonexpansive `T` (where Picard may cycle, e.g. a rotation) it converges
    to the fixed point nearest the anchor $y_0$, with the last-iterate guarantee
    $\|y_k - T(y_k)\| \le 2\|y_0 - y^*\|/(k+1)$ (Lieder 2021), faster than the
    $o(1/\sqrt{k})$ of Krasnosel'skii–Mann.

    References: Halpern (1967); Lieder, "On the convergence rate of the Halpern
    iteration" (2021); Cai, Alacaoglu & Diakonikolas (ICLR 2024).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(T(y) - y) <= atol + rtol * norm(y)`.
    - `norm`: the norm of the residual.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.two_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return _HalpernState(y, jnp.array(0), *init_residual(y))

    def step(self, fn, y, args, options, state, tags):
        fy, aux = fn(y, args)
        g = jtu.tree_map(lambda a, b: a - b, fy, y)
        beta = 1.0 / (state.count + 2.0)
        new_state = _HalpernState(
            state.anchor, state.count + 1, self.norm(g), self.norm(y)
        )
        # When `y` passes the tolerance test (this step ends the solve), return T(y),
        # whose residual is at most y's for a nonexpansive T, not the anchored point
        # (pulled back towards y0, its residual can be several times the tolerance).
        done, _ = self.terminate(fn, y, args, options, new_state, tags)
        new_y = jtu.tree_map(
            lambda a, f: jnp.where(done, f, beta * a + (1 - beta) * f).astype(f.dtype),
            state.anchor, fy,
        )
        return new_y, new_state, aux
