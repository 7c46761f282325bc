"""Small pytree helpers shared by the driver, the solvers and the adjoints."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
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
    """`a - b` leaf by leaf."""
    return jtu.tree_map(lambda x, y: x - y, a, b)


def tree_vdot(a: PyTree, b: PyTree) -> Array:
    """The inner product of two pytrees of the same structure (`jnp.vdot` per leaf)."""
    return sum(jnp.vdot(x, y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b)))


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


def dtype_of(tree: PyTree):
    """The promoted dtype of a pytree's array leaves (the default float if none)."""
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_array_like(x)]
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def working_precision(like):
    """The cast of a pytree shaped like `like` into the one precision a solve of it works
    in: the widest of its inexact leaves and float32. LAPACK (behind lineax's solvers)
    has no float16 or bfloat16 kernels, and lineax's Krylov solvers need one dtype
    across a pytree (a `y0` mixing float32 and float16). `None` where every leaf is
    already in that precision (the common case costs nothing)."""
    leaves = [x for x in jtu.tree_leaves(like) if eqx.is_inexact_array(x)]
    if not leaves:
        return None
    work = jnp.result_type(*[x.dtype for x in leaves], jnp.float32)
    if all(x.dtype == work for x in leaves):
        return None
    return lambda tree: jtu.tree_map(
        lambda x: x.astype(work) if eqx.is_inexact_array(x) else x, tree)


def lowest_precision(tree: PyTree):
    """The dtype of a pytree's array leaves with the largest machine epsilon (the
    default float if none): what tolerances of a solve of mixed dtypes can reach."""
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    if not leaves:
        return dtype_of(tree)
    return max((x.dtype for x in leaves), key=lambda d: float(jnp.finfo(d).eps))


def precision_floor(dtype=None) -> tuple[float, float]:
    """`(rtol, atol)` that a solve in `dtype` can reach: 1e-10 / 1e-12, raised to 100 / 10
    machine epsilons in lower precision (a float32 solve cannot reach 1e-10)."""
    eps = float(jnp.finfo(jnp.float64 if dtype is None else dtype).eps)
    return max(1e-10, 100 * eps), max(1e-12, 10 * eps)


def gmres(dtype=None, *, rtol: float | None = None, atol: float | None = None,
          restart: int = 40, max_steps: int | None = None):
    """The one place GMRES defaults live: `lx.GMRES` with `restart=40` and tolerances
    given, or else the tightest that `dtype` can reach (`precision_floor`). Used by the
    root and minimisation adjoints, the homotopy path and its corrector, the fallback of
    the default adjoint, `ImplicitJVPAdjoint` and the GMRES hypergradient."""
    floor_rtol, floor_atol = precision_floor(dtype)
    return lx.GMRES(
        rtol=floor_rtol if rtol is None else rtol,
        atol=floor_atol if atol is None else atol,
        restart=restart,
        max_steps=max_steps,
    )


def keep_if(ok: Bool[Array, ""], new: PyTree, old: PyTree) -> PyTree:
    """`new` where `ok`, else `old`, leaf by leaf (non-array leaves from `new`): the one
    way a training loop skips an update that failed (a non-finite gradient, a backward
    solve that did not converge), used by `ik.train.fit` and `ik.hyper.tune`."""
    return jtu.tree_map(
        lambda a, b: jnp.where(ok, a, b) if eqx.is_array(a) else a, new, old
    )
