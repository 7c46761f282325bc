"""The custom-VJP machinery shared by every implicit entry point.

`implicit_vjp(forward, fn, kind, y0, args, probe, backward, throw)` runs `forward` without
differentiating through it and attaches the implicit-function-theorem VJP. With the
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

from ._misc import tree_add
from ._solution import RESULTS


def adjoint_operators(fn, kind: str, y_star, args):
    """Return `(JT_T, A, vjp)` at `y*`: `JT_T(u) = J_T^T u`, `A(u) = (I - J_T^T) u`, and
    the full VJP `u -> (ybar, fn_bar, args_bar)` of the problem's own function."""
    diff, static = eqx.partition((fn, args), eqx.is_inexact_array)

    def native(y, d):
        f, a = eqx.combine(d, static)
        return f(y, a)[0]

    _, vjp_diff = jax.vjp(native, y_star, diff)

    def vjp(u):
        y_bar, d_bar = vjp_diff(u)
        return (y_bar, *d_bar)

    if kind == "fixed_point":
        JT_T = lambda u: vjp(u)[0]
        A = lambda u: jtu.tree_map(lambda a, b: a - b, u, vjp(u)[0])
    else:
        JT_T = lambda u: tree_add(u, vjp(u)[0])
        A = lambda u: jtu.tree_map(jnp.negative, vjp(u)[0])
    return JT_T, A, vjp


def _unliteral(tree):
    """JAX may hand a known scalar to a custom-VJP rule as a Python-float literal;
    turn those back into arrays so that `fn`'s closure conversion accepts them."""
    return jtu.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, (float, complex)) else x, tree
    )


@eqx.filter_custom_vjp
def _implicit(vjp_arg, forward, backward, kind, throw, tags):
    fn, args, y0, probe = _unliteral(vjp_arg)
    del probe, backward, throw, tags
    return forward(fn, y0, args)


@_implicit.def_fwd
def _implicit_fwd(perturbed, vjp_arg, forward, backward, kind, throw, tags):
    del perturbed
    fn, args, y0, _ = _unliteral(vjp_arg)
    out = forward(fn, y0, args)
    return out, out[0]


def _materialise(ybar, y):
    return jtu.tree_map(
        lambda g, x: jnp.zeros_like(x) if g is None else g, ybar, y,
        is_leaf=lambda z: z is None,
    )


@_implicit.def_bwd
def _implicit_bwd(
    y_star, grad_obj, perturbed, vjp_arg, forward, backward, kind, throw, tags
):
    del forward
    fn, args, y0, probe = _unliteral(vjp_arg)
    ybar = _materialise(grad_obj[0], y_star)
    JT_T, A, vjp = adjoint_operators(fn, kind, y_star, args)
    u, steps, residual, result = backward.solve_adjoint(JT_T, A, ybar, tags)
    _, fn_bar, args_bar = vjp(u)
    failed = result != RESULTS.successful
    cots = (fn_bar, args_bar)
    if throw:
        cots = result.error_if(cots, failed)
    else:
        cots = jtu.tree_map(lambda c: jnp.where(failed, jnp.nan, c), cots)
    fn_bar, args_bar = cots
    probe_bar = None
    if probe is not None:
        probe_bar = jnp.stack(
            [
                jnp.asarray(steps, probe.dtype),
                jnp.asarray(residual, probe.dtype),
                failed.astype(probe.dtype),
            ]
        )
    out = (fn_bar, args_bar, jtu.tree_map(lambda _: None, y0), probe_bar)
    # Only perturbed leaves get a cotangent.
    return jtu.tree_map(
        lambda c, p: c if p else None, out, perturbed, is_leaf=lambda z: z is None
    )


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
    """`forward(fn, y0, args) -> (y, aux, stats, result)` with the implicit VJP attached."""
    # Forward mode (`jax.jvp`) through a custom VJP is refused by JAX itself with
    # "can't apply forward-mode autodiff (jvp) to a custom_vjp function"; the error is
    # raised when the jitted program is lowered, outside this code, so it cannot be
    # reworded here. The docstrings of the adjoints point to `ImplicitJVPAdjoint`.
    return _implicit((fn, args, y0, probe), forward, backward, kind, throw, tags)
