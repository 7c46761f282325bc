"""The objective that trains a learned initial point (DEQ `learned`/`skip`, HomoODE)."""

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def init_loss(z0: PyTree[Array], z_star: PyTree[Array], beta: float = 1.0) -> Array:
    r"""Smooth-L1 (Huber with threshold `beta`, PyTorch's `smooth_l1_loss`) between an
    initial point and the *detached* end point, averaged over elements.

    The implicit gradient of a solution with respect to its start point is zero, so a
    learned start point is trained by this objective alone: add it to the loss (Skip
    DEQ) or step it with its own optimiser every few steps (HomoODE).
    """
    total, count = 0.0, 0
    for a, b in zip(jtu.tree_leaves(z0), jtu.tree_leaves(z_star)):
        d = jnp.abs(a - lax.stop_gradient(b))
        total = total + jnp.sum(jnp.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta))
        count += d.size
    return total / count
