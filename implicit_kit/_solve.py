"""The shared entry of every solve: checks, closure conversion, adjoint dispatch, the
contract's stats, `throw`."""

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array

from ._adjoint import AbstractAdjoint, AbstractForward, ImplicitAdjoint
from ._custom_vjp import nan_gradient_where
from ._iterate import check_structure, residual_fn, run
from ._misc import (
    inexact_asarray,
    lowest_precision,
    scalars_to_arrays,
    tree_allfinite,
    working_precision,
)
from ._solution import RESULTS, Solution, STATS_KEYS, unusable


def solver_tolerance(solver) -> tuple[float, float] | None:
    """`(rtol, atol)` of a forward solver (implicit_kit's or optimistix's), or `None`."""
    rtol, atol = getattr(solver, "rtol", None), getattr(solver, "atol", None)
    if rtol is None or atol is None:
        return None
    return rtol, atol


class _Prepared(eqx.Module):
    """`fn` as the driver sees it: returns `(out, aux)`, `out` cast to `y`'s dtypes."""

    fn: Any
    has_aux: bool = eqx.field(static=True)
    # The dtypes of `y0`'s leaves where the solve works in a wider precision than they
    # (`working_precision`): `fn` is still called in them.
    native: tuple | None = eqx.field(static=True, default=None)

    def to_native(self, y):
        """`y` in the dtypes `fn` is called in."""
        if self.native is None:
            return y
        leaves, treedef = jtu.tree_flatten(y)
        return jtu.tree_unflatten(
            treedef, [x.astype(d) for x, d in zip(leaves, self.native)])

    def unwrap(self, cls):
        """The wrapper of type `cls` that `solve` put around the user's function (its
        `wrap=` argument), whatever else wraps it: the seam through which a forward
        reaches what it needs of the original problem (an optimistix minimiser's
        scalar loss)."""
        f = self.fn
        while not isinstance(f, cls):
            f = f.fn
        return f

    def __call__(self, y, args):
        out = self.fn(self.to_native(y), args)
        out, aux = out if self.has_aux else (out, None)
        if jtu.tree_structure(out) == jtu.tree_structure(y):
            out = jtu.tree_map(lambda o, x: jnp.asarray(o).astype(x.dtype), out, y)
        return out, aux


def _reachable_tolerance(forward, dtype):
    """`forward` with its solver's `rtol`/`atol` raised to one epsilon of `dtype` where
    that is float16/bfloat16: `fn` rounds in `dtype`, so a residual below its epsilon is
    out of reach (NewtonKrylov's default 1e-5 in float16 ran to `max_steps`)."""
    eps = float(jnp.finfo(dtype).eps)
    solver = getattr(forward, "solver", None)
    if eps <= float(jnp.finfo(jnp.float32).eps) or solver_tolerance(solver) is None:
        return forward
    rtol, atol = solver_tolerance(solver)
    if not all(isinstance(t, (int, float)) for t in (rtol, atol)):
        return forward
    solver = eqx.tree_at(lambda s: (s.rtol, s.atol), solver,
                         (max(float(rtol), eps), max(float(atol), eps)))
    return eqx.tree_at(lambda f: f.solver, forward, solver)


class Forward(AbstractForward):
    """The forward solve by an implicit_kit driver loop (`_iterate.run`): any solver of
    `ik.solvers` or of optimistix's fixed-point and root solvers."""

    kind: str = eqx.field(static=True)
    solver: Any
    options: Any
    max_steps: int | None = eqx.field(static=True)
    trace: bool = eqx.field(static=True)
    save_at: tuple[int, ...] = eqx.field(static=True, default=())
    check_every: int = eqx.field(static=True, default=1)

    def tolerance(self):
        """`(rtol, atol)` of the forward solver, or `None` where it has none."""
        return solver_tolerance(self.solver)

    def __call__(self, fn, y0, args, *, while_kind="lax", checkpoints=None):
        return run(
            fn, self.kind, self.solver, y0, args, self.options,
            max_steps=self.max_steps, trace=self.trace, while_kind=while_kind,
            checkpoints=checkpoints, save_at=self.save_at, check_every=self.check_every,
        )


def solve(
    fn,
    y0,
    args,
    forward: AbstractForward,
    *,
    has_aux: bool,
    adjoint: AbstractAdjoint | None,
    throw: bool,
    probe: Array | None,
    tags: frozenset = frozenset(),
    name: str = "fn",
    wrap=None,
) -> Solution:
    """The shared entry: checks, closure conversion, adjoint dispatch, `throw`."""
    if not callable(fn):
        raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}.")
    y0 = jtu.tree_map(inexact_asarray, y0)
    # Python floats become (weakly typed) arrays: differentiable like any other input.
    args = scalars_to_arrays(args)
    if not jtu.tree_leaves(y0):
        raise ValueError("`y0` must contain at least one array.")
    # Hoist closed-over arrays and tracers into `fn`'s leaves so that they are
    # differentiated like `args` (a custom VJP must never close over a traced value).
    fn = eqx.filter_closure_convert(fn, y0, args)
    if wrap is not None:
        fn = wrap(fn)
    check_structure(_Prepared(fn, has_aux), y0, args, name)
    # In float16/bfloat16, or with a `y0` mixing dtypes, the solve works in float32 (the
    # widest of y0's dtypes and float32): the solver's state, its linear algebra (LAPACK
    # and lineax's Krylov solvers have no half-precision kernels and need one dtype) and
    # the backward solve, while `fn` is still evaluated in y0's own dtypes. The solution
    # is cast back. (Backward tolerances follow the lowest precision of y0.)
    native_y0, up = y0, working_precision(y0)
    if up is None:
        fn = _Prepared(fn, has_aux)
    else:
        fn = _Prepared(fn, has_aux, tuple(x.dtype for x in jtu.tree_leaves(y0)))
        y0 = up(y0)
    if adjoint is None:
        adjoint = ImplicitAdjoint()
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            "`adjoint` must be an implicit_kit adjoint (ImplicitAdjoint, "
            "ImplicitJVPAdjoint, NeumannAdjoint, PhantomAdjoint, JFBAdjoint, "
            f"UnrolledAdjoint, ReversibleAdjoint); got {type(adjoint).__name__}."
        )
    if probe is not None:
        probe = jnp.asarray(probe)
        if probe.shape != (3,) or not jnp.issubdtype(probe.dtype, jnp.floating):
            raise ValueError(
                "`probe` must be a float array of shape (3,) (see `ik.backward_probe`); "
                f"got {probe.dtype}{list(probe.shape)}."
            )
    kind = forward.kind
    if up is not None:
        forward = _reachable_tolerance(forward, lowest_precision(native_y0))
    # Unset tolerances of the backward solve follow the forward solve's and the dtype.
    adjoint = adjoint.with_defaults(forward.tolerance(), lowest_precision(native_y0),
                                    kind, tags)
    y, aux, stats, result = adjoint.apply(
        forward, fn, kind, y0, args, probe=probe, throw=throw, tags=tags
    )
    if up is not None:
        y, y0 = fn.to_native(y), native_y0
    # A solve that went non-finite or diverged has no meaningful derivative: under
    # `throw=False` its gradient is NaN (per sample), whatever the adjoint. (Under
    # `throw=True` the failure raises below.)
    if not throw:
        bad = lax.stop_gradient(unusable(result))
        y = nan_gradient_where(bad, y, (fn, y0, args))
    # Result codes and stats carry no derivative (an integer array that reaches
    # `error_if` with a tangent attached fails to differentiate).
    result, stats = jtu.tree_map(lax.stop_gradient, (result, stats))
    # A solve that failed on non-finite values names the non-finite input that caused
    # it, instead of the generic `nonfinite` (per sample under vmap). A successful solve
    # keeps its code: an unused non-finite value (an -inf mask) is not an error.
    poisoned = result == RESULTS.nonfinite
    result = RESULTS.where(poisoned & jnp.invert(tree_allfinite(args)),
                           RESULTS.nonfinite_args, result)
    result = RESULTS.where(poisoned & jnp.invert(tree_allfinite(y0)),
                           RESULTS.nonfinite_y0, result)
    max_steps = forward.max_steps
    stats = {**stats, "max_steps": jnp.array(-1 if max_steps is None else max_steps)}
    missing = [k for k in STATS_KEYS if k not in stats]
    assert not missing, f"a forward solve did not report {missing}"
    sol = Solution(value=y, result=result, stats=stats, aux=aux if has_aux else None)
    if throw:
        sol = result.error_if(sol, result != RESULTS.successful)
    return sol


class GivenForward(AbstractForward):
    """A forward solve by a user's function `solver_fn(y0, *args) -> y` (any code, not
    differentiated): `custom_root`'s, and `ik.hyper.hypergradient`'s (whose solution is
    given). Its steps are unknown (0)."""

    kind: str = eqx.field(static=True)
    solver_fn: Callable = eqx.field(static=True)
    max_steps: None = None
    not_unrollable: ClassVar[str] = "a given solution (`custom_root`, `hypergradient`)"

    def tolerance(self):
        return None

    def __call__(self, fn, y0, args, *, while_kind="lax", checkpoints=None):
        del while_kind, checkpoints  # (always "lax": `not_unrollable`)
        # (the user's solver starts from y0 in its own dtypes, not the working precision)
        y = self.solver_fn(fn.to_native(y0), *args)
        y = jtu.tree_map(lambda a, b: jnp.asarray(a, b.dtype), y, y0)
        g = residual_fn(fn, "root")(y, args)
        # The user's solver is opaque: its steps and evaluations are unknown (0); `nfe`
        # counts the one evaluation of the optimality condition for the residual.
        stats = {"num_steps": jnp.array(0), "nfe": jnp.array(1),
                 "residual": optx.two_norm(g)}
        return y, None, stats, RESULTS.successful
