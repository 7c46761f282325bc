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
    random unit vector, two more products $w_1 = J^\top v$, $w_2 = J^\top w_1$ give the
    Ritz values of $J^\top$ on $\mathrm{span}\{v, w_1\}$ (two Arnoldi steps with an
    orthonormal basis: the roots of $t^2 - a t - b$ for the least-squares fit
    $w_2 \approx a w_1 + b v$); the larger modulus is returned. This is exact when the
    dominant eigenvalues are one real eigenvalue, a $\pm\lambda$ pair or a
    complex-conjugate pair (where plain power iteration oscillates), in float32 as in
    float64: the error is that of the power iteration (the next eigenvalue's modulus over
    the dominant one's, to the power `num_iters`) plus rounding (on the digits DEQ's
    residual conv cell in float32, radius 0.974: within 1e-3 from 100 iterations on, 1e-5
    at 1000). The DEQ map is contractive near `y` when this is below 1.

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
    # Rayleigh-Ritz on span{v, w1} with an orthonormal basis (two Arnoldi steps): the
    # same Ritz values as fitting w2 = a w1 + b v by least squares, without the normal
    # equations, whose 2x2 Gram matrix is singular to working precision when w1 is
    # nearly parallel to v (in float32 that returned inf near rho = 1).
    along = jnp.vdot(v, w1)
    r = w1 - along * v
    perp = jnp.linalg.norm(r)
    # One real dominant eigenvalue: w1 parallel to v up to the rounding of the
    # orthogonalisation (sqrt(eps) keeps q2's error at sqrt(eps) or less); the Rayleigh
    # quotient's error is then O(perp^2), at rounding level.
    eps = jnp.finfo(flat.dtype).eps
    single = perp <= jnp.sqrt(eps) * jnp.maximum(jnp.linalg.norm(w1),
                                                 jnp.finfo(flat.dtype).tiny)
    safe = jnp.where(single, 1, perp)
    q2 = r / safe
    aq2 = (w2 - along * w1) / safe  # the operator applied to q2
    h00, h01, h10, h11 = along, jnp.vdot(v, aq2), jnp.vdot(q2, w1), jnp.vdot(q2, aq2)
    tr, det = h00 + h11, h00 * h11 - h01 * h10
    disc = tr * tr - 4 * det
    sq = jnp.sqrt(jnp.abs(disc))
    pair = jnp.where(disc >= 0, jnp.maximum(jnp.abs(tr + sq), jnp.abs(tr - sq)) / 2,
                     jnp.sqrt(jnp.abs(det)))
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
