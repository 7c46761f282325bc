r"""Quadratic programs with equality and inequality constraints, differentiable in every
input through their KKT conditions.

$$\min_x \tfrac12 x^\top Q x + c^\top x \quad\text{s.t.}\quad Ax = b,\quad l \le Gx \le u$$

```python
sol = ik.qp.solve(Q, c, A=A, b=b, G=G, l=l, u=u)   # OSQP's ADMM by default
x, nu, lam = sol.value                              # primal, equality and bound duals
```

- `ik.qp.OSQP()`: the operator-splitting ADMM of Stellato et al. ("OSQP: an operator
  splitting solver for quadratic programs", Math. Prog. Comp. 2020, Algorithm 1, with its
  per-row step sizes, adaptive $\rho$, termination and infeasibility certificates, and
  solution polishing), as jaxopt's `BoxOSQP`/`OSQP` (`jaxopt/_src/osqp.py`) port it to
  JAX. Dense matrices are factorised once per step size (Cholesky); matrix-free
  operators (`matvec_Q`, `matvec_A`, `matvec_G`) use warm-started conjugate gradients,
  and then `x` may be any pytree.
- `ik.qp.BoxCD()`: cyclic coordinate descent for a box on `x` alone ($l \le x \le u$,
  dense `Q`; jaxopt's `BoxCDQP`, `jaxopt/_src/cd_qp.py`).

An infeasible problem ends with `RESULTS.qp_primal_infeasible` (the constraints have no
common point) or `RESULTS.qp_dual_infeasible` (the objective is unbounded below on them):
raised with `throw=True`, and under `throw=False` the solution's gradient is NaN, never a
silent answer.

**Derivatives.** The solution is differentiated implicitly (the shared
`ik.ImplicitAdjoint`: LU of the KKT Jacobian for matrices, GMRES for matrix-free
operators) on the KKT conditions in projection form,
$F(x, \nu, \lambda) = (Qx + c + A^\top\nu + G^\top\lambda,\ Ax - b,\
Gx - \Pi_{[l,u]}(Gx + \lambda))$, zero exactly at a primal–dual solution ($\lambda_i > 0$
where the upper bound is active, $< 0$ at the lower one). Where the solution is
non-degenerate (strict complementarity, independent active constraints) its Jacobian is
OptNet's (Amos & Kolter 2017, eq. 6); unlike the product form $\lambda\odot(Gx - u)$
(jaxopt's `make_kkt_optimality_fun`), it needs no special case for infinite bounds.
The gradient in `Q` is the symmetric one ($\tfrac12(\bar x x^\top + x\bar x^\top)$
terms, as OptNet and jaxopt report).
"""

import math
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoint import AbstractAdjoint, AbstractForward, ImplicitAdjoint
from ._misc import struct_str
from ._solution import RESULTS, Solution
from ._solve import solve as _shared_solve


__all__ = ["BoxCD", "KKTPoint", "OSQP", "solve"]


class KKTPoint(eqx.Module):
    """A primal–dual point of a QP: `x` (the solution), `nu` (the multipliers of
    `Ax = b`, `None` without equalities) and `lam` (of `l <= Gx <= u`: positive where
    the upper bound is active, negative at the lower; `None` without bounds). Unpacks as
    `x, nu, lam = point`."""

    x: PyTree[Array]
    nu: Array | None
    lam: Array | None

    def __iter__(self):
        return iter((self.x, self.nu, self.lam))


class OSQP(eqx.Module):
    r"""The ADMM of OSQP (Stellato et al. 2020, Algorithm 1) for `ik.qp.solve`.

    - `rtol`, `atol`: stop when $\|Kx - z\|_\infty \le$ `atol` $+$ `rtol`
      $\max(\|Kx\|_\infty, \|z\|_\infty)$ and $\|Qx + c + K^\top y\|_\infty \le$ `atol`
      $+$ `rtol` $\max(\|Qx\|_\infty, \|K^\top y\|_\infty, \|c\|_\infty)$ ($K$ the
      stacked $[A; G]$); OSQP's rule. jaxopt's `tol` is `atol` with `rtol=0`.
    - `rho`, `sigma`, `alpha`: the step size, the primal regularisation and the
      relaxation (OSQP's defaults 0.1, 1e-6, 1.6). Equality rows get `rho * 1e3`.
    - `adaptive_rho`: rescale `rho` at each check by OSQP's ratio rule, refactorising
      only when it changes by more than 5x (clipped to [1e-6, 1e6]).
    - `check_every`: iterations between checks of termination, infeasibility and `rho`.
    - `eps_infeasible`: the tolerance of the infeasibility certificates (OSQP's 1e-4).
    - `polish`: after convergence, one or two semismooth Newton steps on the KKT
      conditions with the active set the ADMM found (OSQP's polishing): kept only if
      they reduce the KKT residual. Makes the solution, and so its implicit gradient,
      accurate to rounding where the active set is right. A linear solve of size
      `n + m` (dense LU for matrices, GMRES for matrix-free operators).
    - `max_steps`: the ADMM iterations allowed (OSQP's 4000).
    """

    rtol: float = 1e-6
    atol: float = 1e-6
    rho: float = 0.1
    sigma: float = 1e-6
    alpha: float = 1.6
    adaptive_rho: bool = eqx.field(static=True, default=True)
    check_every: int = eqx.field(static=True, default=10)
    eps_infeasible: float = 1e-4
    polish: bool = eqx.field(static=True, default=True)
    max_steps: int = eqx.field(static=True, default=4000)

    def __check_init__(self):
        if not 0 < self.alpha < 2:
            raise ValueError(f"`OSQP(alpha=...)` must lie in (0, 2), got {self.alpha!r}.")
        for name in ("rho", "sigma", "eps_infeasible"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`OSQP({name}=...)` must be positive, got "
                                 f"{getattr(self, name)!r}.")
        if self.check_every < 1 or self.max_steps < 1:
            raise ValueError("`OSQP` needs `check_every >= 1` and `max_steps >= 1`, got "
                             f"{self.check_every!r}, {self.max_steps!r}.")


class BoxCD(eqx.Module):
    r"""Cyclic coordinate descent for $\min \tfrac12 x^\top Qx + c^\top x$ s.t.
    $l \le x \le u$ (jaxopt's `BoxCDQP`): a sweep sets each coordinate to its exact
    minimiser in the box, $x_i \leftarrow \mathrm{clip}(x_i - (Qx + c)_i / Q_{ii},
    l_i, u_i)$. Stops when a sweep moves $x$ by at most `atol` $+$ `rtol` $\|x\|_1$ in
    the $\ell_1$ norm (jaxopt's `tol` is `atol`, its default 1e-4). Needs a dense `Q`
    with a positive diagonal, no `A`, and no `G` (the box is on `x`)."""

    rtol: float = 0.0
    atol: float = 1e-8
    max_steps: int = eqx.field(static=True, default=500)


# -- the problem, flattened ----------------------------------------------------------------


class _Ops(eqx.Module):
    """The user's operators as functions of their parameters (static): `Q(p, x)`,
    `A(p, x)`, `G(p, x)` on the user's `x`; `None` for an absent one; `box` where `G` is
    the identity (bounds on `x`)."""

    Q: Callable = eqx.field(static=True)
    A: Callable | None = eqx.field(static=True)
    G: Callable | None = eqx.field(static=True)
    dense: bool = eqx.field(static=True)


def _dense(p, x):
    return p @ x


def _identity(p, x):
    del p
    return jfu.ravel_pytree(x)[0]


def _kkt(ops: _Ops):
    """`F((x, nu, lam), (Q, c, A, b, G, l, u))` of the module docstring."""

    def residual(y, args):
        x, nu, lam = y
        Q, c, A, b, G, l, u = args

        def lagrangian(x):
            value = 0.5 * _vdot(x, ops.Q(Q, x)) + _vdot(c, x)
            if nu is not None:
                value = value + _vdot(nu, ops.A(A, x))
            if lam is not None:
                value = value + _vdot(lam, ops.G(G, x))
            return value

        stat = jax.grad(lagrangian)(x)
        eq = None if nu is None else jtu.tree_map(jnp.subtract, ops.A(A, x), b)
        if lam is None:
            return KKTPoint(stat, eq, None)
        comp = jtu.tree_map(lambda g, la, lo, hi: g - jnp.clip(g + la, lo, hi),
                            ops.G(G, x), lam, l, u)
        return KKTPoint(stat, eq, comp)

    return residual


def _vdot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jtu.tree_leaves(a), jtu.tree_leaves(b)))


class _Flat(eqx.Module):
    """The problem on flat vectors: `K = [A; G]`, bounds `lo <= Kx <= hi`."""

    Qmv: Callable
    Kmv: Callable
    KTmv: Callable
    c: Array
    lo: Array
    hi: Array
    Qd: Array | None  # dense matrices, where every operator is one
    Kd: Array | None


def _flatten(ops, args, x_example):
    Q, c, A, b, G, l, u = args
    x_flat, unravel = jfu.ravel_pytree(x_example)
    rows = []  # (K's block, its lower and upper bounds)
    flat = lambda t: jfu.ravel_pytree(t)[0]  # noqa: E731
    if ops.A is not None:
        rows.append((lambda v: flat(ops.A(A, unravel(v))), flat(b), flat(b)))
    if ops.G is not None:
        rows.append((lambda v: flat(ops.G(G, unravel(v))), flat(l), flat(u)))

    def Qmv(v):
        return jfu.ravel_pytree(ops.Q(Q, unravel(v)))[0]

    def Kmv(v):
        return jnp.concatenate([f(v) for f, _, _ in rows]) if rows else v[:0]

    def KTmv(w):
        return jax.linear_transpose(Kmv, x_flat)(w)[0]

    lo = jnp.concatenate([r[1] for r in rows]) if rows else x_flat[:0]
    hi = jnp.concatenate([r[2] for r in rows]) if rows else x_flat[:0]
    Qd = Kd = None
    if ops.dense:
        blocks = ([A] if ops.A is not None else []) + (
            [jnp.eye(x_flat.size, dtype=x_flat.dtype) if G is None else G]
            if ops.G is not None else [])
        Qd = Q
        Kd = jnp.concatenate(blocks) if blocks else jnp.zeros((0, x_flat.size),
                                                               x_flat.dtype)
    return _Flat(Qmv, Kmv, KTmv, jfu.ravel_pytree(c)[0], lo, hi, Qd, Kd), unravel


# -- OSQP's ADMM ----------------------------------------------------------------------------


class _ADMMState(eqx.Module):
    x: Array
    z: Array
    y: Array
    rho: Array  # the scalar step size (equality rows use 1e3 times it)
    factor: Array | None  # the lower Cholesky factor of Q + sigma I + K^T diag(rho) K (dense case)
    dx: Array  # the last iteration's changes (the infeasibility certificates)
    dy: Array
    num_steps: Array
    result: RESULTS
    done: Array


def _inf_norm(v):
    return jnp.max(jnp.abs(v), initial=0.0)


def _admm(solver: OSQP, flat: _Flat, x0, y0):
    dtype = x0.dtype
    n, m = x0.size, flat.lo.size
    eq_rows = flat.lo == flat.hi
    sigma = jnp.asarray(solver.sigma, dtype)
    alpha = jnp.asarray(solver.alpha, dtype)

    def rho_vec(rho):
        return jnp.where(eq_rows, 1e3 * rho, rho)

    def factorise(rho):
        if flat.Qd is None:
            return None
        M = flat.Qd + sigma * jnp.eye(n, dtype=dtype) + \
            flat.Kd.T @ (rho_vec(rho)[:, None] * flat.Kd)
        return jnp.linalg.cholesky(M)

    def linsolve(factor, rho, rhs, guess):
        if factor is not None:
            return jax.scipy.linalg.cho_solve((factor, True), rhs)
        r = rho_vec(rho)

        def mv(v):
            return flat.Qmv(v) + sigma * v + flat.KTmv(r * flat.Kmv(v))

        op = lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((n,), dtype),
                                       tags=(lx.symmetric_tag,
                                             lx.positive_semidefinite_tag))
        tol = max(10 * float(jnp.finfo(dtype).eps), 1e-3 * min(
            solver.atol, solver.rtol if solver.rtol > 0 else solver.atol))
        sol = lx.linear_solve(op, rhs, lx.CG(rtol=tol, atol=tol, max_steps=10 * n + 50),
                              options={"y0": guess}, throw=False)
        return sol.value

    def iteration(s: _ADMMState, _):
        r = rho_vec(s.rho)
        rhs = sigma * s.x - flat.c + flat.KTmv(r * s.z - s.y)
        xt = linsolve(s.factor, s.rho, rhs, s.x)
        zt = flat.Kmv(xt)
        x = alpha * xt + (1 - alpha) * s.x
        zh = alpha * zt + (1 - alpha) * s.z
        z = jnp.clip(zh + s.y / r, flat.lo, flat.hi)
        y = s.y + r * (zh - z)
        return eqx.tree_at(lambda t: (t.x, t.z, t.y, t.dx, t.dy),
                           s, (x, z, y, x - s.x, y - s.y)), None

    def check(s: _ADMMState):
        Kx, Qx, KTy = flat.Kmv(s.x), flat.Qmv(s.x), flat.KTmv(s.y)
        r_prim = _inf_norm(Kx - s.z)
        r_dual = _inf_norm(Qx + flat.c + KTy)
        scale_p = jnp.maximum(_inf_norm(Kx), _inf_norm(s.z))
        scale_d = jnp.maximum(jnp.maximum(_inf_norm(Qx), _inf_norm(KTy)),
                              _inf_norm(flat.c))
        converged = (r_prim <= solver.atol + solver.rtol * scale_p) & (
            r_dual <= solver.atol + solver.rtol * scale_d)
        # Infeasibility certificates (Stellato et al. 2020, §3.4), from the last step.
        eps = solver.eps_infeasible
        ndy = _inf_norm(s.dy)
        support = jnp.sum(jnp.where(s.dy > 0, flat.hi * s.dy, 0.0)
                          + jnp.where(s.dy < 0, flat.lo * s.dy, 0.0))
        primal_inf = (ndy > 0) & (_inf_norm(flat.KTmv(s.dy)) <= eps * ndy) & (
            support < -eps * ndy)
        ndx = _inf_norm(s.dx)
        Kdx = flat.Kmv(s.dx)
        lo_ok = jnp.where(jnp.isfinite(flat.lo), Kdx >= -eps * ndx, True)
        hi_ok = jnp.where(jnp.isfinite(flat.hi), Kdx <= eps * ndx, True)
        dual_inf = (ndx > 0) & (_inf_norm(flat.Qmv(s.dx)) <= eps * ndx) & (
            jnp.vdot(flat.c, s.dx) < -eps * ndx) & jnp.all(lo_ok & hi_ok)
        result = RESULTS.where(converged, RESULTS.successful, s.result)
        result = RESULTS.where(~converged & primal_inf, RESULTS.qp_primal_infeasible,
                               result)
        result = RESULTS.where(~converged & ~primal_inf & dual_inf,
                               RESULTS.qp_dual_infeasible, result)
        done = converged | primal_inf | dual_inf
        rho = s.rho
        if solver.adaptive_rho and m > 0:
            tiny = jnp.finfo(dtype).tiny
            ratio = (r_prim / jnp.maximum(scale_p, tiny)) / jnp.maximum(
                r_dual / jnp.maximum(scale_d, tiny), tiny)
            new = jnp.clip(s.rho * jnp.sqrt(ratio), 1e-6, 1e6)
            change = ((new > 5 * s.rho) | (new < s.rho / 5)) & ~done & jnp.isfinite(new)
            rho = jnp.where(change, new, s.rho)
            if s.factor is not None:
                factor = lax.cond(change, lambda: factorise(rho), lambda: s.factor)
                s = eqx.tree_at(lambda t: t.factor, s, factor)
        return eqx.tree_at(lambda t: (t.rho, t.result, t.done), s, (rho, result, done))

    def block(s: _ADMMState):
        new, _ = lax.scan(iteration, s, None, length=solver.check_every)
        new = eqx.tree_at(lambda t: t.num_steps, new, s.num_steps + solver.check_every)
        new = check(new)
        # A sample that has stopped keeps its state (under vmap the loop runs on).
        return jtu.tree_map(lambda a, b: jnp.where(s.done, a, b) if eqx.is_array(a)
                            else b, s, new)

    rho0 = jnp.asarray(solver.rho, dtype)
    z0 = jnp.clip(flat.Kmv(x0), flat.lo, flat.hi)
    state = _ADMMState(x0, z0, y0, rho0, factorise(rho0), jnp.zeros_like(x0),
                       jnp.zeros_like(y0), jnp.array(0), RESULTS.max_steps_reached,
                       jnp.array(False))
    num_blocks = math.ceil(solver.max_steps / solver.check_every)
    state = lax.while_loop(lambda s: ~s.done & (s.num_steps < num_blocks
                                                * solver.check_every),
                           block, state)
    return state


def _box_cd(solver: BoxCD, Q, c, lo, hi, x0):
    diag = jnp.diag(Q)

    def sweep(x):
        def coordinate(i, x):
            g = Q[i] @ x + c[i]
            xi = jnp.where(diag[i] > 0, jnp.clip(x[i] - g / diag[i], lo[i], hi[i]), x[i])
            return x.at[i].set(xi)

        return lax.fori_loop(0, x.size, coordinate, x)

    def body(carry):
        x, _, k = carry
        new = sweep(x)
        return new, jnp.sum(jnp.abs(new - x)), k + 1

    def cond(carry):
        x, err, k = carry
        return (err > solver.atol + solver.rtol * jnp.sum(jnp.abs(x))) & (
            k < solver.max_steps)

    x, err, k = lax.while_loop(cond, body, (x0, jnp.array(jnp.inf, x0.dtype),
                                            jnp.array(0)))
    ok = err <= solver.atol + solver.rtol * jnp.sum(jnp.abs(x))
    return x, k, RESULTS.where(ok, RESULTS.successful, RESULTS.max_steps_reached)


# -- the forward solve handed to the shared implicit adjoint -------------------------------


class _QPForward(AbstractForward):
    kind: str = eqx.field(static=True)
    solver: Any
    ops: _Ops
    max_steps: int | None = eqx.field(static=True)
    not_unrollable: ClassVar[str] = (
        "a QP solve (`ik.qp.solve`): it is differentiated through its KKT conditions")

    def tolerance(self):
        # A polished solution is exact to rounding where its active set is right: the
        # backward solve then goes to the precision floor (as `custom_root`'s).
        if isinstance(self.solver, OSQP) and self.solver.polish:
            return None
        return self.solver.rtol, self.solver.atol

    def __call__(self, fn, y0, args, *, while_kind="lax", checkpoints=None):
        del while_kind, checkpoints
        x0, nu0, lam0 = y0
        flat, unravel = _flatten(self.ops, args, x0)
        x_flat = jfu.ravel_pytree(x0)[0]
        y_flat, unravel_duals = jfu.ravel_pytree((nu0, lam0))
        y_flat = y_flat.astype(x_flat.dtype)  # (float32[0] without constraints)

        def split(y):
            return unravel_duals(y)

        if isinstance(self.solver, BoxCD):
            x, num_steps, result = _box_cd(self.solver, flat.Qd, flat.c, flat.lo,
                                           flat.hi, x_flat)
            lam = -(flat.Qd @ x + flat.c)  # the multiplier of x in [l, u]
            y = KKTPoint(unravel(x), None, unravel_duals(lam)[1])
            nfe = num_steps
        else:
            s = _admm(self.solver, flat, x_flat, y_flat)
            num_steps, result, nfe = s.num_steps, s.result, s.num_steps
            if self.solver.polish and self.ops.dense:
                x, duals = _polish_dense(flat, s.x, s.y, result)
                y = KKTPoint(unravel(x), *split(duals))
            else:
                y = KKTPoint(unravel(s.x), *split(s.y))
                if self.solver.polish:
                    y = _polish(fn, y, args, result)
            nfe = nfe + 2 * self.solver.polish
        g = fn(y, args)[0]
        # A Q that is not positive semidefinite can break the factorisation or make the
        # iterates diverge: NaN or inf at the end is reported as such, not as a step cap.
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in jtu.tree_leaves(y)]))
        result = RESULTS.where(finite, result, RESULTS.nonfinite)
        return y, None, {"num_steps": num_steps, "nfe": nfe,
                         "residual": optx.two_norm(g)}, result


def _polish_dense(flat: _Flat, x, y, result):
    """`_polish` with dense matrices: the KKT Jacobian of the active set the ADMM found
    is assembled directly, `[[Q, K^T], [diag(a) K, -diag(1 - a)]]` (`a` the rows whose
    bound is active, the equalities among them), and solved by LU."""
    n = x.size

    def residual(x, y):
        kx = flat.Kd @ x
        return jnp.concatenate([flat.Qd @ x + flat.c + flat.Kd.T @ y,
                                kx - jnp.clip(kx + y, flat.lo, flat.hi)])

    def step(xy):
        x, y = xy
        v = flat.Kd @ x + y
        active = (v < flat.lo) | (v > flat.hi) | (flat.lo == flat.hi)
        J = jnp.block([[flat.Qd, flat.Kd.T],
                       [jnp.where(active[:, None], flat.Kd, 0.0),
                        -jnp.diag(jnp.where(active, 0.0, 1.0))]])
        r = residual(x, y)
        d = jnp.linalg.solve(J, -r)
        new = (x + d[:n], y + d[n:])
        rn = residual(*new)
        better = (_inf_norm(rn) < _inf_norm(r)) & jnp.all(jnp.isfinite(d)) & (
            result == RESULTS.successful)
        return jtu.tree_map(lambda a, b: jnp.where(better, a, b), new, (x, y))

    return step(step((x, y)))


def _polish(fn, y, args, result):
    """Two semismooth Newton steps on the KKT conditions `fn` (piecewise linear: one
    step is exact once the active set is right), each kept only if it lowers the KKT
    residual; only after a converged ADMM. Matrix-free (GMRES); OSQP's polishing."""

    def residual(p):
        return fn(p, args)[0]

    def step(p):
        r = residual(p)
        op = lx.JacobianLinearOperator(lambda q, _: residual(q), p)
        solver = lx.GMRES(rtol=1e-12, atol=1e-12, restart=50, max_steps=500)
        d = lx.linear_solve(op, jtu.tree_map(jnp.negative, r), solver, throw=False).value
        new = jtu.tree_map(jnp.add, p, d)
        better = (optx.max_norm(residual(new)) < optx.max_norm(r)) & (
            result == RESULTS.successful)
        better = better & jnp.all(jnp.array([jnp.all(jnp.isfinite(v))
                                             for v in jtu.tree_leaves(new)]))
        return jtu.tree_map(lambda a, b: jnp.where(better, a, b), new, p)

    return step(step(y))


# -- the entry point ------------------------------------------------------------------------


def _is_matrix(m):
    return m is None or isinstance(m, (jax.Array, jnp.ndarray)) or hasattr(m, "__array__")


@eqx.filter_jit
def solve(
    Q: ArrayLike | PyTree,
    c: ArrayLike | PyTree,
    *,
    A: ArrayLike | PyTree | None = None,
    b: ArrayLike | None = None,
    G: ArrayLike | PyTree | None = None,
    l: ArrayLike | None = None,
    u: ArrayLike | None = None,
    matvec_Q: Callable | None = None,
    matvec_A: Callable | None = None,
    matvec_G: Callable | None = None,
    solver: OSQP | BoxCD | None = None,
    init: KKTPoint | PyTree | None = None,
    adjoint: AbstractAdjoint | None = None,
    throw: bool = True,
) -> Solution:
    r"""Solve $\min_x \tfrac12 x^\top Qx + c^\top x$ s.t. $Ax = b$, $l \le Gx \le u$.

    **Arguments:**

    - `Q` (n, n) positive semidefinite (as a matrix only its symmetric part counts;
      `matvec_Q` must be symmetric), `c` (n,).
    - `A` (m_eq, n), `b` (m_eq,): equalities (optional).
    - `G` (m, n), `l`, `u` (m,) or scalars: two-sided bounds, `-inf`/`inf` for a
      missing side (optional; `l = u` rows are equalities too). Without `G`, `l`/`u`
      bound `x` itself ($G = I$).
    - `matvec_Q(Q, x)`, `matvec_A(A, x)`, `matvec_G(G, x)`: matrix-free operators, with
      `Q`, `A`, `G` then their parameters (any pytrees: differentiable like the
      matrices). With them `x` and `c` may be pytrees of one structure, and `A x`,
      `G x` pytrees too (then `b`, `l`, `u` and the multipliers share their structure;
      `l`, `u` may also be scalars).
    - `solver`: `ik.qp.OSQP()` (default) or `ik.qp.BoxCD()`.
    - `init`: a warm start: a previous `sol.value` (a `KKTPoint`) or `x` alone.
    - `adjoint`: the backward mode on the KKT conditions. Default: with matrices,
      `ik.ImplicitAdjoint(linear_solver=lx.LU())` (the KKT Jacobian, of size n + m,
      materialised and factorised: exact); with matrix-free operators,
      `ik.ImplicitAdjoint()` (GMRES, at the precision floor after polishing, else at
      the solver's tolerances). A degenerate solution (dependent active constraints,
      `Q` singular on the free directions) has no derivative: NaN, or an error.
    - `throw`: raise if the solve fails (infeasible, or out of steps); else report it
      in `sol.result` with a NaN gradient for an infeasible problem.

    **Returns:** a `Solution` whose `value` is a `KKTPoint(x, nu, lam)`; `stats` as every
    solve's (`num_steps` the ADMM iterations or CD sweeps, `residual` the KKT
    residual's norm). jit, vmap (per-sample stopping) and grad in every input.
    """
    solver = OSQP() if solver is None else solver
    if not isinstance(solver, (OSQP, BoxCD)):
        raise TypeError("`solver` must be `ik.qp.OSQP()` or `ik.qp.BoxCD()`, got "
                        f"{type(solver).__name__}.")
    has_eq = A is not None or matvec_A is not None
    if has_eq != (b is not None):
        raise ValueError("`A` (or `matvec_A`) and `b` go together: give both or neither.")
    has_bounds = l is not None or u is not None
    if G is not None and not has_bounds:
        raise ValueError("`G` needs `l` and/or `u` (the bounds l <= Gx <= u).")
    dense = all(f is None for f in (matvec_Q, matvec_A, matvec_G))
    if Q is None and matvec_Q is None:
        raise ValueError("`Q` is needed: a matrix, or the parameters of `matvec_Q` (which "
                         "may be `None` when `matvec_Q` is given).")
    for name, mat, mv in (("Q", Q, matvec_Q), ("A", A, matvec_A), ("G", G, matvec_G)):
        if mv is None and mat is not None and not _is_matrix(mat):
            raise TypeError(f"`{name}` must be a matrix, or the parameters of "
                            f"`matvec_{name}`; got {type(mat).__name__}.")
    c = jtu.tree_map(jnp.asarray, c)
    if dense:
        Q, c = jnp.asarray(Q), jnp.asarray(c)
        n = c.shape[0] if c.ndim == 1 else -1
        bad = [f"{k} {tuple(v.shape)}" for k, v, want in (
            ("Q", Q, (n, n)),
            ("A", None if A is None else jnp.asarray(A), None if A is None else
             (jnp.shape(b)[0] if jnp.ndim(b) == 1 else -1, n)),
            ("G", None if G is None else jnp.asarray(G), None if G is None else
             (jnp.shape(G)[0], n)))
            if v is not None and (v.ndim != 2 or v.shape != want)]
        if c.ndim != 1 or bad:
            raise ValueError("`ik.qp.solve` expects Q (n, n), c (n,), A (m_eq, n), "
                             f"b (m_eq,), G (m, n); got c {tuple(c.shape)} and "
                             f"{', '.join(bad) or 'matching matrices'}.")
    dtype = jnp.result_type(*jtu.tree_leaves(c), float)
    if dense:  # (an integer matrix would not factorise)
        Q, c, A, G = (None if v is None else jnp.asarray(v, dtype) for v in (Q, c, A, G))
        # The objective only sees Q's symmetric part; the Cholesky factor reads one
        # triangle and the KKT conditions the symmetric part, so a non-symmetric Q
        # would make the two disagree (a wrong solution that looks converged).
        Q = 0.5 * (Q + Q.T)
    x_like = jtu.tree_map(lambda v: jnp.zeros(jnp.shape(v), dtype), c)
    ops = _Ops(
        Q=_dense if matvec_Q is None else matvec_Q,
        A=None if not has_eq else (_dense if matvec_A is None else matvec_A),
        G=None if not has_bounds else (
            matvec_G if matvec_G is not None else (_identity if G is None else _dense)),
        dense=dense)
    def bounds(name, value, like, fill):
        value = fill if value is None else value
        leaves, treedef = jtu.tree_flatten(like)
        if not isinstance(value, (dict, list, tuple)) and jnp.ndim(value) == 0:
            value = jtu.tree_unflatten(treedef, [value] * len(leaves))
        try:
            return jtu.tree_map(lambda v, s: jnp.broadcast_to(jnp.asarray(v, dtype),
                                                              s.shape), value, like)
        except (TypeError, ValueError):
            raise ValueError(
                f"`{name}` must be a scalar or match the output of "
                f"{'A x' if name == 'b' else 'G x'} ({struct_str(like)}); got "
                f"{struct_str(value)}.") from None

    lam0 = nu0 = None
    if has_bounds:
        gx = jax.eval_shape(lambda: ops.G(G, x_like))
        l, u = bounds("l", l, gx, -jnp.inf), bounds("u", u, gx, jnp.inf)
        lam0 = jtu.tree_map(lambda s: jnp.zeros(s.shape, dtype), gx)
    if has_eq:
        ax = jax.eval_shape(lambda: ops.A(A, x_like))
        if jtu.tree_structure(b) != jtu.tree_structure(ax) or any(
                jnp.shape(v) != s.shape for v, s in zip(jtu.tree_leaves(b),
                                                        jtu.tree_leaves(ax))):
            raise ValueError(f"`b` must match the output of A x ({struct_str(ax)}); "
                             f"got {struct_str(b)}.")
        b = jtu.tree_map(lambda v: jnp.asarray(v, dtype), b)
        nu0 = jtu.tree_map(lambda s: jnp.zeros(s.shape, dtype), ax)
    if isinstance(solver, BoxCD) and (not dense or has_eq or G is not None
                                      or not has_bounds):
        raise ValueError("`ik.qp.BoxCD()` solves a box on x alone: it needs a dense `Q`, "
                         "`l`/`u` and no `A` or `G`; use `ik.qp.OSQP()` otherwise.")
    if init is None:
        y0 = KKTPoint(x_like, nu0, lam0)
    elif isinstance(init, KKTPoint):
        y0 = init
    else:
        y0 = KKTPoint(init, nu0, lam0)
    y0 = jtu.tree_map(lambda v: jnp.asarray(v, dtype), y0)
    args = (Q, c, A, b, G, l, u)
    args = jtu.tree_map(lambda v: jnp.asarray(v) if eqx.is_array_like(v) else v, args)
    if adjoint is None and dense:
        # The user gave matrices: the KKT Jacobian (n + m square) is materialised and
        # factorised once, exact and far cheaper than GMRES on an indefinite system
        # (random 200-variable QP: 7.6 ms against 80 ms for value and gradient).
        adjoint = ImplicitAdjoint(linear_solver=lx.LU())
    forward = _QPForward("root", solver, ops, solver.max_steps)
    return _shared_solve(_kkt(ops), y0, args, forward, has_aux=False, adjoint=adjoint,
                         throw=throw, probe=None, name="the KKT conditions")
