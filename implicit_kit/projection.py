r"""Euclidean projections that `optax.projections` does not ship, each differentiable
(jaxopt's `jaxopt.projection`, `jaxopt/_src/projection.py`, for users moving from it).

The closed-form ones are optax's (`optax.projections.projection_simplex`, `..._l1_ball`,
`..._hyperplane`, `..._halfspace`, `..._non_negative`, ...; they take pytrees). Here:

- `box(x, lower, upper)`: a pytree box with bounds shared or per leaf;
- `l2_ball(x, radius)`: jaxopt's derivative convention on the sphere;
- `affine_set`, `polyhedron`: through `ik.optimality.eq_qp` and `ik.qp.solve` (KKT
  gradients; an empty polyhedron raises, or gives NaN with `throw=False`, under jit);
- `box_section`: $\{p : \alpha \le p \le \beta,\ w^\top p = c\}$ by bisection on the
  dual variable, exact on the final active set, implicitly differentiated;
- `sparse_simplex`: the simplex restricted to `max_nz` non-zeros (Kyrillidis et al. 2013);
- `transport`, `birkhoff`: the exact projections onto the transport polytope (and the
  doubly stochastic matrices), solved as QPs and differentiated through their KKT
  conditions;
- `kl_transport`, `kl_birkhoff`: the entropic (KL) projections, by Sinkhorn's iteration
  in the log domain as an `ik.fixed_point`, implicitly differentiated.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jaxtyping import Array, ArrayLike, PyTree

from . import qp as _qp
from ._fixed_point import fixed_point
from ._root import custom_root
from .optimality import _leafwise, eq_qp
from .solvers import Anderson


__all__ = ["affine_set", "birkhoff", "box", "box_section", "kl_birkhoff",
           "kl_transport", "l2_ball", "polyhedron", "sparse_simplex", "transport"]


def box(x: PyTree[Array], lower: ArrayLike | PyTree, upper: ArrayLike | PyTree
        ) -> PyTree[Array]:
    r"""$\mathrm{clip}(x, \text{lower}, \text{upper})$ on a pytree; each bound a scalar,
    an array broadcasting against every leaf, or a pytree like `x` (per leaf)."""
    return _leafwise(jnp.clip, x, (lower, None), (upper, None))


def l2_ball(x: PyTree[Array], radius: ArrayLike = 1.0) -> PyTree[Array]:
    r"""The projection onto $\{y : \|y\|_2 \le r\}$ ($\|\cdot\|_2$ over the whole pytree):
    $x \min(1, r/\|x\|)$. On the sphere ($\|x\| = r$ exactly) its derivative is the
    inside one, the identity, as jaxopt's `projection_l2_ball` (optax's averages the
    two sides there, $I - \tfrac12\hat x\hat x^\top$)."""
    sq = sum(jnp.sum(leaf ** 2) for leaf in jtu.tree_leaves(x))
    inside = sq <= radius ** 2
    norm = jnp.sqrt(jnp.where(inside, 1.0, sq))
    factor = jnp.where(inside, 1.0, radius / norm)
    return jtu.tree_map(lambda leaf: factor * leaf, x)


def affine_set(x: Array, A: ArrayLike, b: ArrayLike) -> Array:
    r"""The projection onto $\{y : Ay = b\}$: $\min \tfrac12\|y - x\|^2$ s.t. $Ay = b$
    (`ik.optimality.eq_qp`; raises on inconsistent constraints)."""
    x = jnp.asarray(x)
    return eq_qp(jnp.eye(x.shape[-1], dtype=x.dtype), -x, A, b)[0]


def polyhedron(x: Array, A: ArrayLike | None, b: ArrayLike | None, G: ArrayLike,
               h: ArrayLike, *, solver: "_qp.OSQP | None" = None, throw: bool = True
               ) -> Array:
    r"""The projection onto $\{y : Ay = b,\ Gy \le h\}$ (`A`, `b` may be `None`), by
    `ik.qp.solve`; differentiable in every input. An empty polyhedron raises
    (`RESULTS.qp_primal_infeasible`), under jit too; with `throw=False` it gives NaN."""
    x = jnp.asarray(x)
    sol = _qp.solve(jnp.eye(x.shape[-1], dtype=x.dtype), -x, A=A, b=b, G=G, u=h,
                    solver=solver, throw=throw)
    return jnp.where(sol.result == _qp.RESULTS.successful, sol.value.x, jnp.nan)


def box_section(x: Array, alpha: ArrayLike, beta: ArrayLike, w: ArrayLike, c: ArrayLike,
                *, throw: bool = True) -> Array:
    r"""The projection onto $\{p : \alpha \le p \le \beta,\ w^\top p = c\}$ ($w > 0$):
    $p = \mathrm{clip}(x + \tau w, \alpha, \beta)$ with $\tau$ the root of the
    non-decreasing $\phi(\tau) = w^\top\mathrm{clip}(x + \tau w, \alpha, \beta) - c$
    (jaxopt's `projection_box_section`). $\tau$ is bracketed in
    $[\min(\alpha - x)/w, \max(\beta - x)/w]$, bisected, then solved exactly on the
    final free set; it is differentiated implicitly (`ik.custom_root`). An empty set
    ($c$ outside $[w^\top\alpha, w^\top\beta]$) raises, or gives NaN with
    `throw=False`."""
    x = jnp.asarray(x)
    alpha, beta, w = (jnp.broadcast_to(jnp.asarray(v, x.dtype), x.shape)
                      for v in (alpha, beta, w))
    c = jnp.asarray(c, x.dtype)

    def phi(tau, x, alpha, beta, w, c):
        return jnp.vdot(w, jnp.clip(x + tau * w, alpha, beta)) - c

    def find(tau0, x, alpha, beta, w, c):
        lo, hi = jnp.min((alpha - x) / w), jnp.max((beta - x) / w)

        def halve(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            up = phi(mid, x, alpha, beta, w, c) < 0
            return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

        lo, hi = lax.fori_loop(0, 2 * jnp.finfo(x.dtype).nmant, halve, (lo, hi))
        tau = 0.5 * (lo + hi)
        # phi is linear on the free set of tau: solve it there exactly
        p = x + tau * w
        free = (p > alpha) & (p < beta)
        fixed = jnp.vdot(w, jnp.where(p <= alpha, alpha, jnp.where(p >= beta, beta, 0.0)))
        wf = jnp.where(free, w, 0.0)
        exact = (c - fixed - jnp.vdot(wf, x)) / jnp.maximum(jnp.vdot(wf, wf),
                                                            jnp.finfo(x.dtype).tiny)
        return jnp.where(jnp.any(free), exact, tau)

    feasible = (jnp.vdot(w, alpha) <= c) & (c <= jnp.vdot(w, beta))
    if throw:
        x = eqx.error_if(x, ~feasible, "`projection.box_section`: the set is empty (c "
                                       "outside [w.alpha, w.beta]).")
    tau = custom_root(phi)(find)(jnp.zeros((), x.dtype), x, alpha, beta, w, c)
    return jnp.where(feasible, jnp.clip(x + tau * w, alpha, beta), jnp.nan)


def sparse_simplex(x: Array, max_nz: int, value: float = 1.0, *,
                   approximate: bool = False) -> Array:
    r"""The projection onto the simplex $\{p \ge 0, \sum p = \text{value}\}$ restricted to
    at most `max_nz` non-zeros (Kyrillidis et al., "Sparse projections onto the simplex",
    ICML 2013): the simplex projection of the `max_nz` largest entries, zero elsewhere.
    Its Jacobian on the support $S$ is $I_S - \mathbf 1_S\mathbf 1_S^\top/|S|$ (sparsemax's).
    `approximate=True` selects the entries with `lax.approx_max_k` (faster on TPUs;
    jaxopt's `use_approx_max_nz`)."""
    x = jnp.asarray(x)
    if not 1 <= max_nz <= x.shape[-1]:
        raise ValueError(f"`max_nz` must be in [1, {x.shape[-1]}], got {max_nz!r}.")
    top, idx = (lax.approx_max_k if approximate else lax.top_k)(x, max_nz)
    p = optax.projections.projection_simplex(top, value)
    return jnp.zeros_like(x).at[idx].set(p)


def transport(S: Array, a: ArrayLike, b: ArrayLike, *,
              solver: "_qp.OSQP | None" = None, throw: bool = True) -> Array:
    r"""The projection of `S` (n, m) onto the transport polytope
    $\{P \ge 0 : P\mathbf 1 = a,\ P^\top\mathbf 1 = b\}$ ($\sum a = \sum b$), exactly:
    the QP $\min \tfrac12\|P - S\|^2$ by `ik.qp.solve` (one redundant marginal dropped),
    differentiated through its KKT conditions (jaxopt's `projection_transport` solves
    its dual with LBFGS at tol 1e-3)."""
    S = jnp.asarray(S)
    n, m = S.shape
    a, b = jnp.asarray(a, S.dtype), jnp.asarray(b, S.dtype)
    rows = jnp.kron(jnp.eye(n, dtype=S.dtype), jnp.ones((1, m), S.dtype))
    cols = jnp.kron(jnp.ones((1, n), S.dtype), jnp.eye(m, dtype=S.dtype))[:-1]
    sol = _qp.solve(jnp.eye(n * m, dtype=S.dtype), -S.reshape(-1),
                    A=jnp.concatenate([rows, cols]), b=jnp.concatenate([a, b[:-1]]),
                    l=0.0, solver=solver, throw=throw)
    P = sol.value.x.reshape(n, m)
    return jnp.where(sol.result == _qp.RESULTS.successful, P, jnp.nan)


def birkhoff(S: Array, **kwargs) -> Array:
    r"""The projection onto the doubly stochastic matrices (the Birkhoff polytope):
    `transport(S, 1, 1)`."""
    n = jnp.shape(S)[0]
    return transport(S, jnp.ones(n), jnp.ones(n), **kwargs)


def _sinkhorn(g, args):
    """One Sinkhorn sweep in the log domain on the column potential `g`, centred: the
    potentials are defined up to a constant (f + t, g - t), which leaves the plain map
    an eigenvalue 1; the centred map has a unique fixed point when sum a = sum b."""
    S, log_a, log_b = args
    f = log_a - jax.nn.logsumexp(S + g[None, :], axis=1)
    h = log_b - jax.nn.logsumexp(S + f[:, None], axis=0)
    return h - jnp.mean(h)


def kl_transport(S: Array, a: ArrayLike, b: ArrayLike, *, solver=None,
                 max_steps: int = 10_000) -> Array:
    r"""The KL projection $\arg\min_{P > 0} \mathrm{KL}(P \| e^S)$ s.t. $P\mathbf 1 = a$,
    $P^\top\mathbf 1 = b$: entropic optimal transport with cost $-S$ (jaxopt's
    `kl_projection_transport`). The plan is $\mathrm{diag}(e^f)e^S\mathrm{diag}(e^g)$,
    its potentials from Sinkhorn's iteration as an `ik.fixed_point` (default
    `ik.Anderson()` at rtol 1e-10 in float64, 1e-6 in float32), differentiated
    implicitly (memory independent of the iterations)."""
    S = jnp.asarray(S)
    a, b = jnp.asarray(a, S.dtype), jnp.asarray(b, S.dtype)
    if solver is None:
        tol = 1e-10 if S.dtype == jnp.float64 else 1e-6
        solver = Anderson(rtol=tol, atol=tol)
    args = (S, jnp.log(a), jnp.log(b))
    g = fixed_point(_sinkhorn, jnp.zeros(S.shape[1], S.dtype), args, solver,
                    max_steps=max_steps).value
    f = jnp.log(a) - jax.nn.logsumexp(S + g[None, :], axis=1)
    return jnp.exp(S + f[:, None] + g[None, :])


def kl_birkhoff(S: Array, **kwargs) -> Array:
    r"""The KL projection onto the doubly stochastic matrices: `kl_transport(S, 1, 1)`
    (Sinkhorn's normalisation of $e^S$)."""
    n = jnp.shape(S)[0]
    return kl_transport(S, jnp.ones(n), jnp.ones(n), **kwargs)
