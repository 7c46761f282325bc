"""The custom-VJP machinery shared by every implicit entry point.

`implicit_vjp(forward, fn, kind, y0, args, probe, backward, throw)` runs `forward`
without differentiating through it and attaches the implicit-function-theorem VJP. With the
problem written as a fixed-point map `T` (`T = fn` for fixed points, `T = y + fn` for
roots), the cotangent `u` of the solution solves the adjoint equation

    (I - J_T(y*)^T) u = ybar        (fixed points: u = ybar + J_f^T u;  roots: -J_G^T u = ybar)

matrix-free, with VJPs only, and the parameters receive `(dT/dtheta)^T u`. `backward`
decides how the adjoint equation is solved (exactly, or by a truncated Neumann series).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._iterate import native_fn
from ._misc import scalars_to_arrays, tree_add, tree_sub
from ._solution import RESULTS


def adjoint_operators(fn, kind: str, y_star, args):
    """Return `(JT_T, A)` at `y*`: `JT_T(u) = J_T^T u` and `A(u) = (I - J_T^T) u`, by
    VJPs in `y` only (no parameter cotangent is formed inside the backward solve)."""
    _, vjp = jax.vjp(lambda y: fn(y, args)[0], y_star)

    if kind == "fixed_point":
        JT_T = lambda u: vjp(u)[0]
        A = lambda u: tree_sub(u, vjp(u)[0])
    else:
        JT_T = lambda u: tree_add(u, vjp(u)[0])
        A = lambda u: jtu.tree_map(jnp.negative, vjp(u)[0])
    return JT_T, A


@eqx.filter_custom_vjp
def _adjoint_hook(vjp_arg, y_star, fn, args, backward, kind, throw, tags):
    """Identity on `vjp_arg = (y, probe)`; its VJP maps `ybar` to the solution `u` of the
    adjoint equation (and writes the backward statistics into the probe's cotangent)."""
    y, _ = vjp_arg
    return y


@_adjoint_hook.def_fwd
def _adjoint_hook_fwd(perturbed, vjp_arg, y_star, fn, args, backward, kind, throw, tags):
    del perturbed
    return vjp_arg[0], None


@_adjoint_hook.def_bwd
def _adjoint_hook_bwd(
    _, grad_obj, perturbed, vjp_arg, y_star, fn, args, backward, kind, throw, tags
):
    y, probe = vjp_arg
    fn, args, y_star = scalars_to_arrays((fn, args, y_star))
    ybar = _materialise(grad_obj, y_star)
    JT_T, A = adjoint_operators(fn, kind, y_star, args)
    u, steps, residual, result = backward.solve_adjoint(JT_T, A, ybar, tags)
    failed = result != RESULTS.successful
    if throw:
        u = result.error_if(u, failed)
    else:
        u = jtu.tree_map(lambda c: jnp.where(failed, jnp.nan, c), u)
    probe_bar = None
    if probe is not None:
        probe_bar = jnp.stack(
            [
                jnp.asarray(steps, probe.dtype),
                jnp.asarray(residual, probe.dtype),
                failed.astype(probe.dtype),
            ]
        )
    return jtu.tree_map(
        lambda c, p: c if p else None, (u, probe_bar), perturbed,
        is_leaf=lambda z: z is None,
    )


def _materialise(ybar, y):
    # (`y` may hold None where a partitioned model has no array: nothing to fill there.)
    return jtu.tree_map(
        lambda g, x: jnp.zeros_like(x) if g is None and x is not None else g, ybar, y,
        is_leaf=lambda z: z is None,
    )


@jax.custom_jvp
def _tangent_only(x):
    """Value zero, derivative the identity: a term that changes no value and only
    carries a derivative (its value may be `0 * nan` where its derivative is NaN)."""
    # (`0 * nan_to_num(x)`, not `zeros_like(x)`: the value keeps `x`'s batching under
    # vmap, as its tangent does.)
    return 0 * jnp.nan_to_num(x)


@_tangent_only.defjvp
def _tangent_only_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _tangent_only(x), t


def nan_gradient_where(bad, y, inputs):
    """`y` unchanged in value; its derivative with respect to every inexact array of
    `inputs` (and to `y`'s own inputs) is NaN where `bad` (per sample under vmap), and
    unchanged elsewhere.

    Used after a solve that failed with a non-finite value or a divergence under
    `throw=False`: whatever the backward mode (a custom VJP, a JVP, unrolling), and even
    where the user's function masks its derivative there (`jnp.where(..., nan, ...)` has
    a zero derivative in the masked branch), the gradient of such a sample is NaN,
    never zero nor a finite wrong number. The added term is
    `where(bad, nan, 0) * sum(x - stop_gradient(x))` over the inputs' leaves (a scalar
    per sample): its reverse-mode cost is one scalar broadcast per leaf, not one
    parameter-sized array per sample.
    """
    leaves = [x for x in jtu.tree_leaves(inputs) if eqx.is_inexact_array(x)]
    if not leaves:
        return y
    real = jnp.result_type(*[jnp.real(x).dtype for x in leaves], jnp.float32)
    total = sum(jnp.sum(jnp.real(x - jax.lax.stop_gradient(x))).astype(real)
                for x in leaves)
    term = _tangent_only(jnp.where(bad, jnp.nan, 0.0).astype(real) * total)
    return jtu.tree_map(
        lambda a: a + term.astype(a.dtype) if eqx.is_inexact_array(a) else a, y
    )


def stop_gradient(tree):
    # stop_gradient of a traced Python scalar can return its literal value: re-array it.
    return scalars_to_arrays(jtu.tree_map(
        lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, tree
    ))


def implicit_vjp(
    forward: Callable,
    fn,
    kind: str,
    y0,
    args,
    probe,
    backward,
    throw: bool,
    tags: frozenset = frozenset(),
):
    """`forward(fn, y0, args) -> (y, aux, stats, result)` with the implicit VJP attached.

    The solve runs on stopped inputs (nothing is stored for the backward pass). The
    solution is then re-attached to the parameters as `y* + (T(y*) - stop_grad(T(y*)))`
    (value exactly `y*`, derivative `dT/dtheta`), so that parameter cotangents come from
    ordinary autodiff of one map application: under `jax.vmap` they are formed batched,
    as one matmul, never as one parameter-sized array per sample. The hook in front
    turns the incoming cotangent `ybar` into `u = (I - J_T^T)^{-1} ybar`.
    """
    # Forward mode (`jax.jvp`) through the custom VJP is refused by JAX itself with
    # "can't apply forward-mode autodiff (jvp) to a custom_vjp function"; the error is
    # raised when the jitted program is lowered, outside this code, so it cannot be
    # reworded here. The docstrings of the adjoints point to `ImplicitJVPAdjoint`.
    fn_s, y0_s, args_s = stop_gradient((fn, y0, args))
    y, aux, stats, result = forward(fn_s, y0_s, args_s)
    T = native_fn(fn, kind, "fixed_point")
    ty, _ = T(y, args)
    # (The guard keeps the value finite when a failed solve ends where T overflows.)
    y_attached = jtu.tree_map(
        lambda a, t: a + jnp.where(jnp.isfinite(t), t - jax.lax.stop_gradient(t), 0),
        y, ty,
    )
    y_out = _adjoint_hook(
        (y_attached, probe), y, fn_s, args_s, backward, kind, throw, tags
    )
    return y_out, aux, stats, result
