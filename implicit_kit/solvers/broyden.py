from collections.abc import Callable

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import optimistix as optx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree, Scalar

from ._base import AbstractRootSolver, AbstractSolverState, init_residual


class _BroydenState(AbstractSolverState):
    us: Float[Array, "m n"]
    vs: Float[Array, "m n"]
    prev_y: Float[Array, " n"]
    prev_g: Float[Array, " n"]
    count: Int[Array, ""]
    n_pairs: Int[Array, ""]
    residual: Float[Array, ""]
    scale: Float[Array, ""]


class Broyden(AbstractRootSolver):
    r"""Limited-memory "good" Broyden method for `G(y) = 0`.

    Keeps an approximation of the inverse Jacobian $H \approx J_G^{-1}$ as
    $H = -I + \sum_i u_i v_i^\top$ (the start $-I$ is exact for $G = T - y$ with a small
    Jacobian of $T$), updated by the good-Broyden rank-one rule
    $H_+ = H + (\Delta y - H\Delta g)\,\Delta y^\top H / (\Delta y^\top H \Delta g)$,
    and steps $y_{k+1} = y_k - \alpha H G(y_k)$. Only the last `m` rank-one pairs are
    kept: when the buffer is full the approximation restarts from $-I$, so memory is
    `2 m n` whatever `max_steps` is (TorchDEQ's default stores one pair per step; its
    limited variant overwrites the oldest pair, which breaks the recursion). An update
    whose denominator vanishes is skipped.

    Reference: Broyden (1965); Bai, Kolter & Koltun, "Deep Equilibrium Models" (2019).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(G(y)) <= atol + rtol * norm(y)`.
    - `m`: the number of rank-one pairs kept.
    - `step_size`: $\alpha$.
    - `norm`: the norm of the residual.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    m: int = eqx.field(static=True, default=10)
    step_size: float = 1.0
    norm: Callable[[PyTree], Scalar] = optx.two_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        flat, _ = ravel_pytree(y)
        zeros = jnp.zeros((self.m, flat.size), flat.dtype)
        return _BroydenState(
            zeros, zeros, flat, jnp.zeros_like(flat), jnp.array(0), jnp.array(0),
            *init_residual(y),
        )

    def step(self, fn, y, args, options, state, tags):
        g_tree, aux = fn(y, args)
        flat_y, unravel = ravel_pytree(y)
        g, _ = ravel_pytree(g_tree)
        us, vs = state.us, state.vs

        # H = -I + sum_i u_i v_i^T, applied as two matrix-vector products (one batched
        # matmul each under vmap), in full precision (no TF32 rounding on GPUs).
        def apply(a, b, x):  # -x + sum_i a_i (b_i . x)
            c = jnp.einsum("mn,n->m", b, x, precision=lax.Precision.HIGHEST)
            return -x + jnp.einsum("m,mn->n", c, a, precision=lax.Precision.HIGHEST)

        matvec = lambda x: apply(us, vs, x)  # H x
        rmatvec = lambda x: apply(vs, us, x)  # H^T x

        dy = flat_y - state.prev_y
        dg = g - state.prev_g
        v = rmatvec(dy)
        denom = v @ dg
        tiny = jnp.finfo(g.dtype).eps * (jnp.linalg.norm(v) * jnp.linalg.norm(dg))
        ok = (state.count > 0) & (jnp.abs(denom) > tiny) & jnp.isfinite(denom)
        safe = jnp.where(ok, denom, 1)
        u = jnp.where(ok, (dy - matvec(dg)) / safe, 0)
        v = jnp.where(ok, v, 0)
        # When the buffer is full, restart from H = -I rather than overwrite the oldest
        # pair: every v_i was computed with the pairs before it, so overwriting breaks
        # the recursion and diverges (seen on a DEQ with rho(J) = 0.95).
        slot = state.n_pairs % self.m
        restart = ok & (slot == 0) & (state.n_pairs > 0)
        us = jnp.where(restart, 0, us)
        vs = jnp.where(restart, 0, vs)
        at_slot = ok & (jnp.arange(self.m) == slot)[:, None]  # a select, not a scatter
        us = jnp.where(at_slot, u, us)
        vs = jnp.where(at_slot, v, vs)
        n_pairs = state.n_pairs + ok

        new_flat = flat_y - self.step_size * apply(us, vs, g)
        new_state = _BroydenState(
            us, vs, flat_y, g, state.count + 1, n_pairs, self.norm(g),
            self.norm(flat_y),
        )
        return unravel(new_flat), new_state, aux
