from collections.abc import Callable

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import optimistix as optx
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import cho_factor, cho_solve
from jaxtyping import Array, Float, Int, PyTree, Scalar

from ._base import AbstractFixedPointSolver, AbstractSolverState, init_residual


class _AndersonState(AbstractSolverState):
    xs: Float[Array, "m n"]  # y_i + damping * g_i: what the step mixes
    gs: Float[Array, "m n"]  # g_i = T(y_i) - y_i
    gram: Float[Array, "m m"]
    count: Int[Array, ""]
    residual: Float[Array, ""]
    scale: Float[Array, ""]


class Anderson(AbstractFixedPointSolver):
    r"""Anderson acceleration (type II) of a fixed-point map `T`.

    Keeps the last `m` iterates $y_i$ and residuals $g_i = T(y_i) - y_i$, finds
    $\alpha = \arg\min \|\sum_i \alpha_i g_i\|$ subject to $\sum_i \alpha_i = 1$ from the
    ridge-regularised normal equations $(GG^\top + \lambda I)a = 1$, $\alpha = a/1^\top a$,
    and steps to $y_{k+1} = \sum_i \alpha_i (y_i + \beta g_i)$.

    The ridge is *relative*: $\lambda = $ `ridge` $\cdot \operatorname{tr}(GG^\top)/m$, so
    it shrinks with the residuals and tight tolerances still converge (an absolute ridge,
    as in the DEQ reference code, stalls once $\|g\|^2 \ll \lambda$). A tiny absolute
    floor keeps the system solvable when every residual vanishes, and a non-finite
    solution of the least-squares system falls back to a damped Picard step.

    References: Anderson (1965); Walker & Ni (2011); Bai, Kolter & Koltun, "Deep
    Equilibrium Models" (NeurIPS 2019).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(T(y) - y) <= atol + rtol * norm(y)`.
    - `m`: the memory (number of past iterates).
    - `ridge`: the relative ridge regularisation.
    - `damping`: the mixing parameter $\beta$.
    - `norm`: the norm of the residual.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    m: int = eqx.field(static=True, default=5)
    ridge: float = 1e-4
    damping: float = 1.0
    norm: Callable[[PyTree], Scalar] = optx.two_norm

    def __check_init__(self):
        if self.m < 1:
            raise ValueError(f"`Anderson(m=...)` must be >= 1, got m={self.m}.")

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        flat, _ = ravel_pytree(y)
        zeros = jnp.zeros((self.m, flat.size), flat.dtype)
        gram = jnp.zeros((self.m, self.m), flat.dtype)
        return _AndersonState(zeros, zeros, gram, jnp.array(0), *init_residual(y))

    def step(self, fn, y, args, options, state, tags):
        fy, aux = fn(y, args)
        flat_y, unravel = ravel_pytree(y)
        flat_f, _ = ravel_pytree(fy)
        g = flat_f - flat_y
        slot = state.count % self.m
        # Selects and small matrix-vector products rather than scatters: under vmap
        # `count` is shared by the batch, the selects vectorise and the products become
        # one batched matmul (a per-sample scatter would be a slow loop on CPU). Only the
        # new row and column of the Gram matrix G G^T are computed: O(m n) per step.
        # The history keeps y_i + damping * g_i, the only use of y_i, so the mixing
        # reads one (m, n) array. Full-precision products: the mixed iterate and the
        # residual norm must not carry TF32 rounding on GPUs.
        index = jnp.arange(self.m)
        at_slot = (index == slot)[:, None]
        xs = jnp.where(at_slot, flat_y + self.damping * g, state.xs)
        gs = jnp.where(at_slot, g, state.gs)
        dots = jnp.einsum("mn,n->m", gs, g, precision=lax.Precision.HIGHEST)
        gram = jnp.where(at_slot, dots[None, :], state.gram)
        gram = jnp.where(at_slot.T, dots[:, None], gram)
        n_valid = jnp.minimum(state.count + 1, self.m)
        valid = index < n_valid
        both = valid[:, None] & valid[None, :]
        # (Rows of slots not yet filled are zero: their gs rows are zero.)
        tiny = jnp.finfo(gram.dtype).tiny ** 0.5
        lam = self.ridge * jnp.trace(gram) / n_valid + tiny
        eye = jnp.eye(self.m, dtype=gram.dtype)
        system = jnp.where(both, gram + lam * eye, eye)
        # A Cholesky solve of the small SPD system: as fast at run time as the system
        # written out entry by entry, and it compiles in about a third of the time.
        a = cho_solve(cho_factor(system, lower=True), valid.astype(gram.dtype))
        alpha = a / jnp.sum(a)
        picard = (index == slot).astype(gram.dtype)
        alpha = jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, picard)
        new_flat = jnp.einsum("m,mn->n", alpha, xs, precision=lax.Precision.HIGHEST)
        if self.norm is optx.two_norm and not jnp.iscomplexobj(g):
            residual = jnp.sqrt(dots[slot])  # ||g||^2 is in the Gram row already
        else:
            residual = self.norm(g)
        new_state = _AndersonState(
            xs, gs, gram, state.count + 1, residual, self.norm(flat_y)
        )
        return unravel(new_flat), new_state, aux
