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
The proximal operators that optax does not ship are here (`prox_lasso`,
`prox_elastic_net`, `prox_group_lasso`, `prox_non_negative`), with the signature
`prox(x, hyperparameters, step)` of $\mathrm{prox}_{\text{step}\cdot g}$.

The step $\eta$ of the proximal / projected / mirror residuals does not change the
implicit Jacobian where the solution is non-degenerate (strict complementarity), only the
conditioning of the backward linear solve; the default is 1, as jaxopt's.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike


__all__ = [
    "fixed_point",
    "kkt",
    "mirror_descent",
    "projected_gradient",
    "prox_elastic_net",
    "prox_gradient",
    "prox_gradient_map",
    "prox_group_lasso",
    "prox_lasso",
    "prox_non_negative",
    "stationarity",
]


def _sub(a, b):
    return jtu.tree_map(lambda u, v: u - v, a, b)


def _step(x, g, step):
    return jtu.tree_map(lambda u, v: u - step * v, x, g)


def stationarity(f: Callable) -> Callable:
    r"""$F(x, \theta) = \nabla_x f(x, \theta)$: an unconstrained minimiser of `f(x, theta)`."""

    def optimality(x, theta):
        return jax.grad(f)(x, theta)

    return optimality


def fixed_point(T: Callable) -> Callable:
    r"""$F(x, \theta) = T(x, \theta) - x$: a fixed point of `T(x, theta)`."""

    def optimality(x, theta):
        return _sub(T(x, theta), x)

    return optimality


def prox_gradient_map(f: Callable, prox: Callable, step: float) -> Callable:
    r"""The proximal-gradient map $T(x, (\theta_f, \theta_g)) = \mathrm{prox}_{\eta g}(x -
    \eta\nabla_x f(x, \theta_f), \theta_g)$, as `ik.fixed_point` takes it (`args` the
    pair): solve with `ik.fixed_point(T, x0, (theta_f, theta_g), ik.FISTA())`, $\eta \le
    1/L$; its fixed points are the minimisers of $f + g$, and the implicit backward pass
    differentiates that condition. A projected-gradient map is `prox` =
    `lambda y, theta, step: projection(y, theta)`."""

    def t(x, args):
        theta_f, theta_g = args
        return prox(_step(x, jax.grad(f)(x, theta_f), step), theta_g, step)

    return t


def prox_gradient(f: Callable, prox: Callable, step: float = 1.0) -> Callable:
    r"""$F(x, \theta_f, \theta_g) = \mathrm{prox}_{\eta g}(x - \eta\nabla_x f(x, \theta_f),
    \theta_g) - x$: a minimiser of $f(\cdot, \theta_f) + g(\cdot, \theta_g)$, `f` smooth,
    `prox(y, theta_g, eta)` the proximal operator of $\eta g$."""

    def optimality(x, theta_f, theta_g):
        return _sub(prox(_step(x, jax.grad(f)(x, theta_f), step), theta_g, step), x)

    return optimality


def projected_gradient(f: Callable, projection: Callable, step: float = 1.0) -> Callable:
    r"""$F(x, \theta_f, \theta_C) = P_C(x - \eta\nabla_x f(x, \theta_f), \theta_C) - x$: a
    minimiser of `f` over the convex set $C(\theta_C)$, `projection(y, theta_C)` the
    Euclidean projection onto it (e.g. from `optax.projections`)."""

    def optimality(x, theta_f, theta_c):
        return _sub(projection(_step(x, jax.grad(f)(x, theta_f), step), theta_c), x)

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
        return _sub(projection(y, theta_c), x)

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


# -- proximal operators that optax does not ship ------------------------------------------


def prox_lasso(x: Array, lam: ArrayLike, step: float = 1.0) -> Array:
    r"""$\mathrm{prox}_{\eta\lambda\|\cdot\|_1}(x)$: soft thresholding at $\eta\lambda$
    (`lam` a scalar or per coordinate)."""
    t = step * lam
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0.0)


def prox_elastic_net(x: Array, lams: tuple[ArrayLike, ArrayLike], step: float = 1.0) -> Array:
    r"""$\mathrm{prox}$ of $\eta(\lambda_1\|\cdot\|_1 + \tfrac{\lambda_2}{2}\|\cdot\|_2^2)$:
    soft thresholding at $\eta\lambda_1$, then shrinking by $1/(1 + \eta\lambda_2)$;
    `lams = (l1, l2)`."""
    l1, l2 = lams
    return prox_lasso(x, l1, step) / (1.0 + step * l2)


def prox_group_lasso(x: Array, lam: ArrayLike, step: float = 1.0) -> Array:
    r"""$\mathrm{prox}_{\eta\lambda\|\cdot\|_2}(x)$ for one group (the last axis; batch
    other groups on the leading axes): $x\,\max(0, 1 - \eta\lambda/\|x\|_2)$."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    safe = jnp.where(norm > 0, norm, 1.0)
    return x * jnp.maximum(0.0, 1.0 - step * jnp.asarray(lam)[..., None] / safe)


def prox_non_negative(x: Array, hyperparams=None, step: float = 1.0) -> Array:
    r"""The proximal operator of the indicator of $x \ge 0$: $\max(x, 0)$."""
    del hyperparams, step
    return jnp.maximum(x, 0.0)
