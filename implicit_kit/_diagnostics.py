from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint
from ._fixed_point import fixed_point
from ._misc import tree_vdot
from ._root import root_find


def spectral_radius(
    fn,
    y: PyTree[Array],
    args: PyTree = None,
    *,
    num_iters: int = 100,
    key: Array | None = None,
) -> Array:
    r"""Estimate the spectral radius of $J = \partial \text{fn}/\partial y$ at `y` by
    power iteration with VJPs (the Jacobian is never materialised).

    After `num_iters` normalised steps $v \leftarrow J^\top v / \|J^\top v\|$ from a
    random unit vector, two more products $w_1 = J^\top v$, $w_2 = J^\top w_1$ are fitted
    as $w_2 = a w_1 + b v$ (least squares); the larger modulus of the roots of
    $t^2 - a t - b$ is returned. This is exact when the dominant eigenvalues are one real
    eigenvalue, a $\pm\lambda$ pair or a complex-conjugate pair (where plain power
    iteration oscillates). The DEQ map is contractive near `y` when this is below 1.

    **Arguments:**

    - `fn`: `fn(y, args)`, the fixed-point map.
    - `y`, `args`: the point (typically the equilibrium) and the arguments.
    - `num_iters`: the number of power iterations.
    - `key`: PRNG key of the start vector (default `jr.key(0)`).
    """
    key = jr.key(0) if key is None else key
    flat, unravel = ravel_pytree(y)
    _, vjp = jax.vjp(lambda _y: fn(_y, args), y)
    v = jr.normal(key, flat.shape, flat.dtype)
    v = v / jnp.linalg.norm(v)

    def body(_, carry):
        v, _ = carry
        w, _ = ravel_pytree(vjp(unravel(v))[0])
        norm = jnp.linalg.norm(w)
        return w / jnp.where(norm > 0, norm, 1), norm

    v, _ = jax.lax.fori_loop(0, num_iters, body, (v, jnp.zeros((), flat.dtype)))
    w1, _ = ravel_pytree(vjp(unravel(v))[0])
    w2, _ = ravel_pytree(vjp(unravel(w1))[0])
    # One real dominant eigenvalue: w1 is (nearly) parallel to v.
    along = jnp.vdot(v, w1)
    perp = jnp.linalg.norm(w1 - along * v)
    single = perp <= 1e-6 * jnp.maximum(jnp.linalg.norm(w1), jnp.finfo(flat.dtype).tiny)
    # Otherwise a 2-dimensional dominant invariant subspace: w2 = a w1 + b v.
    gram = jnp.array([[w1 @ w1, w1 @ v], [v @ w1, v @ v]])
    rhs = jnp.array([w1 @ w2, v @ w2])
    gram = gram + 1e-30 * jnp.eye(2, dtype=flat.dtype)
    a, b = jnp.linalg.solve(jnp.where(single, jnp.eye(2, dtype=flat.dtype), gram), rhs)
    disc = a * a + 4 * b
    sq = jnp.sqrt(jnp.abs(disc))
    pair = jnp.where(
        disc >= 0, jnp.maximum(jnp.abs(a + sq), jnp.abs(a - sq)) / 2, jnp.sqrt(jnp.abs(b))
    )
    return jnp.where(single, jnp.abs(along), pair)


def check_grad(
    fn,
    y0: PyTree[Array],
    args: PyTree,
    solver,
    *,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    kind: str = "fixed_point",
    max_steps: int = 256,
    eps: float | None = None,
    key: Array | None = None,
) -> dict[str, Any]:
    r"""Compare the gradient of a solve under `adjoint` with the unrolled gradient and
    central finite differences.

    The scalar tested is $L = \langle c, y^*(\text{args})\rangle$ for a random fixed
    direction `c`; the gradient with respect to every floating leaf of `args` is
    computed three ways. Finite differences are taken along one random direction of
    `args` (a directional derivative), so the check costs two extra solves. Run it in
    float64 (`jax.config.update("jax_enable_x64", True)`) for meaningful digits.

    **Returns:** a dict with `implicit_vs_unrolled` and `implicit_vs_fd` (relative
    errors of the directional derivative), `unrolled_vs_fd`, and the three directional
    derivatives.
    """
    entry = {"fixed_point": fixed_point, "root": root_find}[kind]
    key = jr.key(0) if key is None else key
    k1, k2 = jr.split(key)
    flat_y, unravel_y = ravel_pytree(jtu.tree_map(jnp.asarray, y0))
    c = unravel_y(jr.normal(k1, flat_y.shape, flat_y.dtype))

    def loss(a, adj):
        y = entry(fn, y0, a, solver, adjoint=adj, max_steps=max_steps).value
        return tree_vdot(c, y)

    flat_a, unravel_a = ravel_pytree(args)
    direction = jr.normal(k2, flat_a.shape, flat_a.dtype)
    direction = direction / jnp.linalg.norm(direction)

    def directional(adj):
        g = jax.grad(lambda a: loss(a, adj))(args)
        return jnp.vdot(ravel_pytree(g)[0], direction)

    d_impl = directional(adjoint)
    d_unroll = directional(UnrolledAdjoint())
    if eps is None:
        eps = float(np.finfo(flat_a.dtype).eps ** (1 / 3))
    plus = loss(unravel_a(flat_a + eps * direction), adjoint)
    minus = loss(unravel_a(flat_a - eps * direction), adjoint)
    d_fd = (plus - minus) / (2 * eps)

    def rel(a, b):
        return float(jnp.abs(a - b) / jnp.maximum(jnp.abs(b), jnp.finfo(flat_a.dtype).tiny))

    return {
        "implicit_vs_unrolled": rel(d_impl, d_unroll),
        "implicit_vs_fd": rel(d_impl, d_fd),
        "unrolled_vs_fd": rel(d_unroll, d_fd),
        "implicit": float(d_impl),
        "unrolled": float(d_unroll),
        "finite_difference": float(d_fd),
    }
