"""Regularisers and monitors for implicit models: pure functions returning scalars.

Add the returned scalar (times a weight) to the training loss.
"""

from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._diagnostics import spectral_radius as spectral_radius


def jacobian_frobenius(
    fn: Callable,
    z: PyTree[Array],
    args: PyTree = None,
    *,
    key: PRNGKeyArray,
    num_probes: int = 1,
) -> Array:
    r"""Hutchinson estimate of $\|J_f(z)\|_F^2 / d$, $J_f = \partial f(z, \text{args})/\partial z$,
    $d$ the number of elements of $z$ (normalised per element, as Bai, Koltun & Kolter,
    "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021).

    $\|J\|_F^2 = \mathbb{E}_{\varepsilon\sim N(0, I)}\|\varepsilon^\top J\|^2$: each probe
    costs one vector–Jacobian product; no Jacobian is formed. Unbiased, relative standard
    deviation $\propto$ `num_probes`$^{-1/2}$; differentiable with respect to `z`, `args`
    and whatever `fn` closes over (evaluate it at the equilibrium $z^*$ returned by a
    solve). Under `jax.vmap` the probes are drawn per sample if `key` is split per sample.
    """
    if num_probes < 1:
        raise ValueError(f"`num_probes` must be >= 1, got {num_probes}.")
    out, vjp = jax.vjp(lambda y: fn(y, args), z)
    flat_out, unravel = ravel_pytree(out)
    flat_z, _ = ravel_pytree(z)
    eps = jr.normal(key, (num_probes,) + flat_out.shape, flat_out.dtype)

    def one(e):
        (g,) = vjp(unravel(e))
        return jnp.sum(ravel_pytree(g)[0] ** 2)

    return jnp.mean(jax.vmap(one)(eps)) / flat_z.size


def fixed_point_correction(
    fn: Callable,
    iterates: PyTree[Array],
    args: PyTree,
    loss_fn: Callable[[PyTree[Array]], Array],
    gamma: float = 0.8,
) -> Array:
    r"""Fixed-point correction (trajectory supervision, Bai, Geng, Kolter, "Deep
    Equilibrium Optical Flow Estimation", CVPR 2022): the task loss applied to one step
    of the map from each sampled solver iterate,

    $\sum_k w_k\, \ell(f(\mathrm{sg}(z_k), x)) / \sum_k w_k$, $w_k = \gamma^{K-1-k}$,

    so that intermediate iterates are pushed towards good outputs (later ones weigh
    more). `iterates` are stacked on a leading axis of size K, as returned by
    `fixed_point(..., save_iterates=...)` / `DEQ(save_iterates=...)`.
    """
    leaves = jtu.tree_leaves(iterates)
    if not leaves:
        raise ValueError("`iterates` is empty (pass `save_iterates=` to the solve).")
    k = leaves[0].shape[0]
    weights = gamma ** jnp.arange(k - 1, -1, -1, dtype=leaves[0].dtype)

    def one(z):
        return loss_fn(fn(lax.stop_gradient(z), args))

    losses = jax.vmap(one)(iterates)
    return jnp.sum(weights * losses) / jnp.sum(weights)
