r"""Optimality conditions as functions $F(x, \theta) = 0$, to differentiate the solution of
an optimisation problem with `ik.custom_root` (Blondel et al., "Efficient and Modular
Implicit Differentiation", NeurIPS 2022, §2; the catalogue of jaxopt's solvers'
`optimality_fun`s, `jaxopt/_src/{proximal_gradient,mirror_descent,eq_qp}.py`).

Each builder returns `F(x, *hyperparameters)`, zero exactly at the solution:

```python
F = ik.optimality.prox_gradient(f, ik.optimality.prox_lasso)
lasso = ik.custom_root(F)(my_lasso_solver)     # my_lasso_solver(x0, theta_f, lam)
w = lasso(w0, (X, y), lam)                     # differentiable in X, y and lam
```

Projections come from `optax.projections` (simplex, box, ℓ1/ℓ2 balls, non-negative,
hypercube, ...): pass e.g. `lambda y, r: optax.projections.projection_simplex(y, r)`.
The proximal operators that optax does not ship are here (`prox_none`, `prox_lasso`,
`prox_non_negative_lasso`, `prox_elastic_net`, `prox_ridge`, `prox_non_negative_ridge`,
`prox_group_lasso`, `prox_non_negative`, `make_prox_from_projection`), with jaxopt's
signature `prox(x, hyperparameters, step)` of $\mathrm{prox}_{\text{step}\cdot g}$: `x`
any pytree, hyperparameters shared or per leaf.

The step $\eta$ of the proximal / projected / mirror residuals does not change the
implicit Jacobian where the solution is non-degenerate (strict complementarity), only the
conditioning of the backward linear solve; the default is 1, as jaxopt's.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree

from ._misc import tree_sub, tree_vdot


__all__ = [
    "fixed_point_condition",
    "kkt",
    "eq_qp",
    "mirror_descent",
    "mirror_descent_map",
    "projected_gradient",
    "projected_gradient_map",
    "make_prox_from_projection",
    "prox_elastic_net",
    "prox_gradient",
    "prox_gradient_map",
    "prox_group_lasso",
    "prox_lasso",
    "prox_non_negative",
    "prox_non_negative_lasso",
    "prox_non_negative_ridge",
    "prox_none",
    "prox_ridge",
    "stationarity",
]


def _step(x, g, step):
    return jtu.tree_map(lambda u, v: u - step * v, x, g)


def stationarity(f: Callable) -> Callable:
    r"""$F(x, \theta) = \nabla_x f(x, \theta)$: an unconstrained minimiser of `f(x, theta)`."""

    def optimality(x, theta):
        return jax.grad(f)(x, theta)

    return optimality


def fixed_point_condition(T: Callable) -> Callable:
    r"""$F(x, \theta) = T(x, \theta) - x$: the optimality condition of a fixed point of
    `T(x, theta)` (a condition for `ik.custom_root`; `ik.fixed_point` is the solve)."""

    def optimality(x, theta):
        return tree_sub(T(x, theta), x)

    return optimality


def _backtracking_step(f, prox, x, theta_f, theta_g, initial, shrink, max_backtracks):
    r"""The step $\eta = $ `initial` $\cdot$ `shrink`$^k$ for the smallest $k$ such that
    $z = \mathrm{prox}_{\eta g}(x - \eta\nabla f(x))$, $d = z - x$, satisfies
    $\langle\nabla f(z) - \nabla f(x), d\rangle \le \|d\|^2/\eta$: the curvature of $f$
    along the step is at most $1/\eta$. For a quadratic $f$ this is exactly Beck &
    Teboulle's sufficient decrease $f(z) \le f(x) + \langle\nabla f(x), d\rangle +
    \|d\|^2/(2\eta)$; unlike that test it has no cancellation of nearly equal function
    values, so it stays meaningful down to steps of rounding size (the function-value
    test accepts any step once $\|d\|^2/\eta$ falls below the rounding of $f$, and the
    iteration stalls there). Piecewise constant in $x$: computed without gradients."""
    x, theta_f, theta_g = jax.lax.stop_gradient((x, theta_f, theta_g))
    grad = jax.grad(f)
    gx = grad(x, theta_f)

    def curvature_too_high(eta):
        d = tree_sub(prox(_step(x, gx, eta), theta_g, eta), x)
        gz = grad(jtu.tree_map(jnp.add, x, d), theta_f)
        return tree_vdot(tree_sub(gz, gx), d) > tree_vdot(d, d) / eta

    def cond(c):
        eta, k = c
        return (k < max_backtracks) & curvature_too_high(eta)

    dtype = jnp.result_type(*jtu.tree_leaves(gx))
    if initial is None:
        # Twice the Cauchy step of f's quadratic model along the gradient, 2 / (the
        # curvature along -grad f): at least 2 / L, so that the search starts above the
        # step a Lipschitz constant would give, whatever the problem's scale (one
        # Hessian-vector product).
        _, hg = jax.jvp(lambda y: grad(y, theta_f), (x,), (gx,))
        curv = tree_vdot(gx, hg) / jnp.maximum(tree_vdot(gx, gx), jnp.finfo(dtype).tiny)
        initial = jnp.where(jnp.isfinite(curv) & (curv > 0), 2.0 / curv, 1.0)
    eta, _ = jax.lax.while_loop(cond, lambda c: (c[0] * shrink, c[1] + 1),
                                (jnp.asarray(initial, dtype), 0))
    return eta


def prox_gradient_map(f: Callable, prox: Callable, step: float | None = None, *,
                      initial_step: float | None = None, shrink: float = 0.5,
                      max_backtracks: int = 60) -> Callable:
    r"""The proximal-gradient map $T(x, (\theta_f, \theta_g)) = \mathrm{prox}_{\eta g}(x -
    \eta\nabla_x f(x, \theta_f), \theta_g)$, as `ik.fixed_point` takes it (`args` the
    pair): solve with `ik.fixed_point(T, x0, (theta_f, theta_g), ik.FISTA())`. Its fixed
    points are the minimisers of $f + g$ for any step, and the implicit backward pass
    differentiates that condition. A projected-gradient map is
    `projected_gradient_map`.

    - `step`: $\eta \le 1/L$ for a known Lipschitz constant $L$ of $\nabla f$; or `None`
      (the default) for backtracking at every evaluation: the largest $\eta$ in
      `initial_step` $\cdot$ `shrink`$^k$ ($k <$ `max_backtracks`) for which $f$'s
      curvature along the step is at most $1/\eta$ (Beck & Teboulle's sufficient
      decrease, in a form that survives rounding), so no $L$ is needed. Each evaluation
      starts again (a map of $x$ alone, as a fixed-point solver needs) from
      `initial_step`, by default twice the Cauchy step along the gradient,
      $2\|\nabla f\|^2/\langle\nabla f, \nabla^2 f\,\nabla f\rangle \ge 2/L$ (one
      Hessian-vector product; on jaxopt's lasso example, where $1/L = 4.2$, a fixed
      start of 1 took 70 FISTA steps and this start 24), at the cost of $k + 1$
      gradient evaluations.
      The step is locally constant in $x$, so derivatives treat it as a constant.
    """
    if isinstance(step, (int, float)) and not step > 0:  # (a traced step is not checked)
        raise ValueError(f"`prox_gradient_map(step=...)` must be positive or None "
                         f"(backtracking), got {step!r}.")
    if not ((initial_step is None or initial_step > 0) and 0 < shrink < 1):
        raise ValueError("`prox_gradient_map` needs `initial_step > 0` and `0 < shrink < "
                         f"1`, got initial_step={initial_step!r}, shrink={shrink!r}.")

    def t(x, args):
        theta_f, theta_g = args
        eta = step if step is not None else _backtracking_step(
            f, prox, x, theta_f, theta_g, initial_step, shrink, max_backtracks)
        return prox(_step(x, jax.grad(f)(x, theta_f), eta), theta_g, eta)

    return t


def projected_gradient_map(f: Callable, projection: Callable, step: float | None = None,
                           **backtracking) -> Callable:
    r"""The projected-gradient map $T(x, (\theta_f, \theta_C)) = P_C(x - \eta\nabla_x
    f(x, \theta_f), \theta_C)$ for `ik.fixed_point` (with `ik.FISTA()`, accelerated
    projected gradient): `prox_gradient_map` with the projection as the proximal
    operator of the indicator of $C$ (e.g. `lambda y, th:
    optax.projections.projection_box(y, 0.0, 1.0)`); `step` and the backtracking
    options as there."""
    return prox_gradient_map(f, lambda y, theta, eta: projection(y, theta), step,
                             **backtracking)


def mirror_descent_map(f: Callable, projection: Callable, mapping: Callable,
                       step: float) -> Callable:
    r"""The mirror-descent map $T(x, (\theta_f, \theta_C)) = P^\phi_C(\nabla\phi(x) -
    \eta\nabla_x f(x, \theta_f), \theta_C)$ for `ik.fixed_point` (with `ik.Picard()`:
    mirror descent; jaxopt's `MirrorDescent`). `mapping` is $\nabla\phi$ and
    `projection(y, theta_C)` the Bregman projection of $\nabla\phi^*(y)$ onto $C$; on
    the simplex with the negative entropy (KL geometry), `mapping = jnp.log` and
    `projection = lambda y, _: jax.nn.softmax(y)`. Its fixed points satisfy
    `mirror_descent`'s condition, which the implicit backward pass differentiates."""
    if isinstance(step, (int, float)) and not step > 0:  # (a traced step is not checked)
        raise ValueError(f"`mirror_descent_map(step=...)` must be positive, got {step!r}.")

    def t(x, args):
        theta_f, theta_c = args
        return projection(_step(mapping(x), jax.grad(f)(x, theta_f), step), theta_c)

    return t


def prox_gradient(f: Callable, prox: Callable, step: float = 1.0) -> Callable:
    r"""$F(x, \theta_f, \theta_g) = \mathrm{prox}_{\eta g}(x - \eta\nabla_x f(x, \theta_f),
    \theta_g) - x$: a minimiser of $f(\cdot, \theta_f) + g(\cdot, \theta_g)$, `f` smooth,
    `prox(y, theta_g, eta)` the proximal operator of $\eta g$."""

    def optimality(x, theta_f, theta_g):
        return tree_sub(prox(_step(x, jax.grad(f)(x, theta_f), step), theta_g, step), x)

    return optimality


def projected_gradient(f: Callable, projection: Callable, step: float = 1.0) -> Callable:
    r"""$F(x, \theta_f, \theta_C) = P_C(x - \eta\nabla_x f(x, \theta_f), \theta_C) - x$: a
    minimiser of `f` over the convex set $C(\theta_C)$, `projection(y, theta_C)` the
    Euclidean projection onto it (e.g. from `optax.projections`)."""

    def optimality(x, theta_f, theta_c):
        return tree_sub(projection(_step(x, jax.grad(f)(x, theta_f), step), theta_c), x)

    return optimality


def mirror_descent(f: Callable, projection: Callable, mapping: Callable,
                   step: float = 1.0) -> Callable:
    r"""$F(x, \theta_f, \theta_C) = P^\phi_C(\nabla\phi(x) - \eta\nabla_x f(x, \theta_f),
    \theta_C) - x$: a minimiser of `f` over $C$ in the geometry of the mirror map
    $\phi$. `mapping` is $\nabla\phi$ and `projection(y, theta_C)` the Bregman projection
    of $\nabla\phi^*(y)$ onto $C$. On the simplex with the negative entropy:
    `mapping = jnp.log`, `projection = lambda y, _: jax.nn.softmax(y)` (the KL
    projection)."""

    def optimality(x, theta_f, theta_c):
        y = _step(mapping(x), jax.grad(f)(x, theta_f), step)
        return tree_sub(projection(y, theta_c), x)

    return optimality


def kkt(objective: Callable, eq: Callable | None = None,
        ineq: Callable | None = None) -> Callable:
    r"""The KKT conditions of $\min_x f(x, \theta_f)$ s.t. $h(x, \theta_h) = 0$,
    $g(x, \theta_g) \le 0$, on the primal–dual point $(x, \nu, \lambda)$ (a tuple; `None`
    for an absent multiplier):
    $F = (\nabla_x f + \partial_x h^\top\nu + \partial_x g^\top\lambda,\ h,\ g\odot\lambda)$.
    Dual feasibility ($\lambda \ge 0$) and the sign of $g$ are the solver's to keep; they
    hold locally around a non-degenerate solution (as in jaxopt's
    `make_kkt_optimality_fun`).

    Returns `F((x, nu, lam), theta_f, theta_h, theta_g)`.
    """

    def optimality(primal_dual, theta_f, theta_h=None, theta_g=None):
        x, nu, lam = primal_dual

        def lagrangian(x):
            value = objective(x, theta_f)
            if eq is not None:
                value = value + jnp.vdot(nu, eq(x, theta_h))
            if ineq is not None:
                value = value + jnp.vdot(lam, ineq(x, theta_g))
            return value

        stat = jax.grad(lagrangian)(x)
        primal = None if eq is None else eq(x, theta_h)
        comp = None if ineq is None else ineq(x, theta_g) * lam
        return stat, primal, comp

    return optimality


def eq_qp(Q: ArrayLike, c: ArrayLike, A: ArrayLike, b: ArrayLike, *,
          solver: lx.AbstractLinearSolver = lx.LU(), throw: bool = True
          ) -> tuple[Array, Array]:
    r"""The equality-constrained QP $\min_x \tfrac12 x^\top Q x + c^\top x$ s.t. $Ax = b$,
    solved directly through its KKT system
    $\begin{pmatrix} Q & A^\top \\ A & 0\end{pmatrix}\begin{pmatrix}x\\ \nu\end{pmatrix}
    = \begin{pmatrix}-c\\ b\end{pmatrix}$ with lineax (jaxopt's
    `EqualityConstrainedQP`). Returns `(x, nu)`. Differentiable in `Q`, `c`, `A`, `b`:
    lineax differentiates the linear solve implicitly, which is the implicit derivative
    of the KKT conditions (`kkt(objective, eq)`, linear here). A system that the solve
    does not satisfy (singular to working precision and inconsistent: dependent
    constraints with an incompatible `b`, or `Q` singular on the null space of `A`)
    raises with `throw=True` and gives NaN with `throw=False`, never a silent answer.
    (With dependent but consistent constraints `x` is still unique and returned; the
    multipliers `nu` are then not unique.)

    - `Q` (n, n) symmetric, `c` (n,), `A` (m, n), `b` (m,).
    - `solver`: a lineax solver for the (indefinite) KKT matrix; `lx.LU()` by default.
    """
    Q, c, A, b = (jnp.asarray(v) for v in (Q, c, A, b))
    n = c.shape[0] if c.ndim == 1 else None
    if n is None or Q.shape != (n, n) or A.ndim != 2 or A.shape[1] != n or \
            b.shape != (A.shape[0],):
        raise ValueError(
            "`eq_qp(Q, c, A, b)` expects Q (n, n), c (n,), A (m, n), b (m,); got "
            f"Q {Q.shape}, c {c.shape}, A {A.shape}, b {b.shape}."
        )
    m = A.shape[0]
    dtype = jnp.result_type(Q, c, A, b)
    kkt_matrix = jnp.block([[Q, A.T], [A, jnp.zeros((m, m), dtype)]]).astype(dtype)
    rhs = jnp.concatenate([-c, b]).astype(dtype)
    sol = lx.linear_solve(lx.MatrixLinearOperator(kkt_matrix), rhs, solver, throw=throw)
    z = sol.value
    # LU does not detect a singular matrix (a rounding-sized pivot gives a huge z whose
    # backward error is small): require the residual to be small against the right-hand
    # side itself, within the square root of the machine epsilon, so that a singular,
    # inconsistent system is never an answer.
    residual = jnp.linalg.norm(kkt_matrix @ z - rhs)
    bound = jnp.sqrt(jnp.finfo(dtype).eps) * jnp.linalg.norm(rhs)
    ok = (sol.result == lx.RESULTS.successful) & jnp.all(jnp.isfinite(z)) & (
        residual <= bound)
    if throw:
        z = eqx.error_if(z, ~ok, "eq_qp: the KKT system is singular or inconsistent "
                                 "(dependent constraints with an incompatible b, or Q "
                                 "singular on the null space of A).")
    z = jnp.where(ok, z, jnp.nan)
    return z[:n], z[n:]


# -- proximal operators that optax does not ship ------------------------------------------
#
# The convention of jaxopt's `jaxopt.prox` (`jaxopt/_src/prox.py`): `prox(x, hyperparams,
# step)` is the proximal operator of `step * g`; `x` is any pytree, and each
# hyperparameter is one value shared by every leaf or a pytree like `x` (per leaf, or per
# coordinate with arrays of the leaves' shapes); `None` is the documented default.


def _per_leaf(hyper, x, default):
    """`hyper` (`None` for `default`) as a list, one entry per leaf of `x`."""
    hyper = default if hyper is None else hyper
    leaves = jtu.tree_leaves(x)
    if not isinstance(x, (jax.Array, jnp.ndarray)) and jtu.tree_structure(
            hyper) == jtu.tree_structure(x):
        return jtu.tree_leaves(hyper)
    return [hyper] * len(leaves)


def _leafwise(fn, x, *hypers):
    """`fn(leaf, *hyper_of_the_leaf)` over `x`'s leaves."""
    leaves, treedef = jtu.tree_flatten(x)
    columns = [_per_leaf(h, x, d) for h, d in hypers]
    return jtu.tree_unflatten(treedef, [fn(leaf, *hs) for leaf, *hs in
                                        zip(leaves, *columns)])


def prox_none(x: PyTree[Array], hyperparams=None, step: float = 1.0) -> PyTree[Array]:
    r"""The proximal operator of $g = 0$: the identity."""
    del hyperparams, step
    return x


def prox_lasso(x: PyTree[Array], lam=None, step: float = 1.0) -> PyTree[Array]:
    r"""$\mathrm{prox}_{\eta\lambda\|\cdot\|_1}(x)$: soft thresholding at $\eta\lambda$
    (`lam` default 1, shared, per leaf or per coordinate)."""
    return _leafwise(lambda v, t: jnp.sign(v) * jnp.maximum(jnp.abs(v) - step * t, 0.0),
                     x, (lam, 1.0))


def prox_non_negative_lasso(x: PyTree[Array], lam=None, step: float = 1.0
                            ) -> PyTree[Array]:
    r"""The prox of $\eta(\lambda\|\cdot\|_1 + \iota_{\ge 0})$: $\max(x - \eta\lambda, 0)$."""
    return _leafwise(lambda v, t: jnp.maximum(v - step * t, 0.0), x, (lam, 1.0))


def prox_elastic_net(x: PyTree[Array], lams=None, step: float = 1.0) -> PyTree[Array]:
    r"""$\mathrm{prox}$ of $\eta(\lambda_1\|\cdot\|_1 + \tfrac{\lambda_2}{2}\|\cdot\|_2^2)$,
    `lams = (l1, l2)` (default (1, 1)): soft thresholding at $\eta\lambda_1$, then
    shrinking by $1/(1 + \eta\lambda_2)$. (jaxopt's `prox_elastic_net(x, (lam, gamma))`
    is $\lambda(\|\cdot\|_1 + \tfrac{\gamma}{2}\|\cdot\|^2)$: `lams = (lam, lam * gamma)`.)"""
    l1, l2 = (1.0, 1.0) if lams is None else lams
    return _leafwise(lambda v, a, g: jnp.sign(v) * jnp.maximum(jnp.abs(v) - step * a, 0.0)
                     / (1.0 + step * g), x, (l1, 1.0), (l2, 1.0))


def prox_ridge(x: PyTree[Array], lam=None, step: float = 1.0) -> PyTree[Array]:
    r"""$\mathrm{prox}$ of $\tfrac{\eta\lambda}{2}\|\cdot\|_2^2$: $x / (1 + \eta\lambda)$."""
    return _leafwise(lambda v, t: v / (1.0 + step * t), x, (lam, 1.0))


def prox_non_negative_ridge(x: PyTree[Array], lam=None, step: float = 1.0
                            ) -> PyTree[Array]:
    r"""$\mathrm{prox}$ of $\tfrac{\eta\lambda}{2}\|\cdot\|_2^2 + \iota_{\ge 0}$:
    $\max(x, 0) / (1 + \eta\lambda)$."""
    return _leafwise(lambda v, t: jnp.maximum(v, 0.0) / (1.0 + step * t), x, (lam, 1.0))


def prox_group_lasso(x: PyTree[Array], lam=None, step: float = 1.0) -> PyTree[Array]:
    r"""$\mathrm{prox}_{\eta\lambda\|\cdot\|_2}$, groups on the last axis of each leaf
    (other groups on the leading axes; one leaf of shape (d,) is one group, as jaxopt's
    `prox_group_lasso` on a vector): $x\,\max(0, 1 - \eta\lambda/\|x\|_2)$. (jaxopt's
    takes the whole pytree as one group: `vmap` this over groups instead.)"""

    def leaf(v, t):
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        safe = jnp.where(norm > 0, norm, 1.0)
        return v * jnp.maximum(0.0, 1.0 - step * jnp.asarray(t)[..., None] / safe)

    return _leafwise(leaf, x, (lam, 1.0))


def prox_non_negative(x: PyTree[Array], hyperparams=None, step: float = 1.0
                      ) -> PyTree[Array]:
    r"""The proximal operator of the indicator of $x \ge 0$: $\max(x, 0)$."""
    del hyperparams, step
    return jtu.tree_map(lambda v: jnp.maximum(v, 0.0), x)


def make_prox_from_projection(projection: Callable) -> Callable:
    r"""The proximal operator of the indicator of a convex set, from its projection
    `projection(x, hyperparams)`: the step does not matter (jaxopt's
    `make_prox_from_projection`)."""

    def prox(x, hyperparams=None, step=1.0):
        del step
        return projection(x, hyperparams)

    return prox
