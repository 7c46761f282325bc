"""Small pytree helpers shared by the driver, the solvers and the adjoints."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree


def tree_where(pred: Bool[Array, ""], true: PyTree, false: PyTree) -> PyTree:
    """`jnp.where(pred, true, false)` leaf by leaf (`pred` is a scalar per sample)."""
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), true, false)


def tree_allfinite(tree: PyTree) -> Bool[Array, ""]:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree) if eqx.is_array(x)]
    if not leaves:
        return jnp.array(True)
    return jnp.stack(leaves).all()


def tree_add(a: PyTree, b: PyTree, scale=1.0) -> PyTree:
    """`a + scale * b` leaf by leaf."""
    return jtu.tree_map(lambda x, y: x + scale * y, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda x, y: x - y, a, b)


def inexact_asarray(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def scalars_to_arrays(tree: PyTree) -> PyTree:
    """Python floats (and the float literals JAX may hand to custom-derivative rules or
    return from `stop_gradient`) become arrays: differentiable, and accepted by a
    closure-converted function."""
    return jtu.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, (float, complex)) else x, tree
    )


def zeros_like_struct(struct: PyTree) -> PyTree:
    return jtu.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s,
        struct,
    )


def struct_str(tree: PyTree) -> str:
    """A readable description of a pytree's structure and leaf shapes."""
    shapes = jtu.tree_map(
        lambda x: f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") else repr(x), tree
    )
    return str(shapes)
