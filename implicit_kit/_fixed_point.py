from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint, default_adjoint
from ._iterate import check_structure, run
from ._misc import inexact_asarray, scalars_to_arrays
from ._solution import RESULTS, Solution


class _Prepared(eqx.Module):
    """`fn` as the driver sees it: returns `(out, aux)`, `out` cast to `y`'s dtypes."""

    fn: Any
    has_aux: bool = eqx.field(static=True)

    def __call__(self, y, args):
        out = self.fn(y, args)
        out, aux = out if self.has_aux else (out, None)
        if jtu.tree_structure(out) == jtu.tree_structure(y):
            out = jtu.tree_map(lambda o, x: jnp.asarray(o).astype(x.dtype), out, y)
        return out, aux


class Forward(eqx.Module):
    """The forward solve of a problem, as handed to an adjoint: `forward(fn, y0, args)`
    returns `(y, aux, stats, result)`."""

    kind: str = eqx.field(static=True)
    solver: Any
    options: Any
    max_steps: int | None = eqx.field(static=True)
    trace: bool = eqx.field(static=True)
    save_at: tuple[int, ...] = eqx.field(static=True, default=())

    def __call__(self, fn, y0, args, while_kind="lax", checkpoints=None):
        if while_kind != "lax" and self.max_steps is None:
            raise ValueError("`UnrolledAdjoint` needs an integer `max_steps`.")
        return run(
            fn, self.kind, self.solver, y0, args, self.options,
            max_steps=self.max_steps, trace=self.trace, while_kind=while_kind,
            checkpoints=checkpoints, save_at=self.save_at,
        )


def solve(
    fn,
    y0,
    args,
    kind: str,
    forward_factory,
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
    fn = _Prepared(fn, has_aux)
    check_structure(fn, y0, args, name)
    if adjoint is None:
        adjoint = default_adjoint(kind)
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            "`adjoint` must be an implicit_kit adjoint (ImplicitAdjoint, "
            "ImplicitJVPAdjoint, NeumannAdjoint, PhantomAdjoint, JFBAdjoint, "
            f"UnrolledAdjoint); got {type(adjoint).__name__}."
        )
    if probe is not None:
        probe = jnp.asarray(probe)
        if probe.shape != (3,) or not jnp.issubdtype(probe.dtype, jnp.floating):
            raise ValueError(
                "`probe` must be a float array of shape (3,) (see `ik.backward_probe`); "
                f"got {probe.dtype}{list(probe.shape)}."
            )
    forward = forward_factory(kind)
    y, aux, stats, result = adjoint.apply(
        forward, fn, kind, y0, args, probe=probe, throw=throw, tags=tags
    )
    # Result codes and stats carry no derivative (an integer array that reaches
    # `error_if` with a tangent attached fails to differentiate).
    result, stats = jtu.tree_map(lax.stop_gradient, (result, stats))
    max_steps = getattr(forward, "max_steps", None)
    stats = {**stats, "max_steps": jnp.array(-1 if max_steps is None else max_steps)}
    sol = Solution(value=y, result=result, stats=stats, aux=aux if has_aux else None)
    if throw:
        sol = result.error_if(sol, result != RESULTS.successful)
    return sol


@eqx.filter_jit
def fixed_point(
    fn,
    y0: PyTree[Array],
    args: PyTree = None,
    solver=None,
    *,
    adjoint: AbstractAdjoint | None = None,
    max_steps: int | None = 256,
    has_aux: bool = False,
    throw: bool = True,
    trace: bool = False,
    save_iterates: tuple[int, ...] = (),
    options: dict[str, Any] | None = None,
    probe: Array | None = None,
) -> Solution:
    r"""Find a fixed point `y = fn(y, args)`.

    The solution is differentiable with respect to `args` and anything `fn` closes over;
    `adjoint` chooses how (exact implicit differentiation by default). A batch of
    problems is `jax.vmap` of this function: each sample stops when it has converged
    and reports its own `num_steps` and `residual`.

    **Arguments:**

    - `fn`: the map, `fn(y, args) -> y'` with `y'` of the same structure and shapes as
        `y` (or `(y', aux)` with `has_aux=True`). Output dtypes are cast to `y0`'s.
    - `y0`: the initial guess, any pytree of arrays.
    - `args`: passed as the second argument of `fn`; differentiable.
    - `solver`: a forward solver: `Picard`, `Anderson` (default `Anderson()`),
        `Broyden`, `NewtonKrylov`, `Halpern`, `Fallback(...)`, or any optimistix
        fixed-point solver or root finder.
    - `adjoint`: the backward mode: `ImplicitAdjoint()` (default), `NeumannAdjoint(k)`,
        `PhantomAdjoint(k, damping)`, `JFBAdjoint()`, `UnrolledAdjoint()`,
        `ImplicitJVPAdjoint()` (for forward mode).
    - `max_steps`: the step limit of the forward solve.
    - `has_aux`: whether `fn` returns `(y', aux)`.
    - `throw`: raise on failure (`True`), or report it in `sol.result` (`False`: the
        mode for vmap and training loops; a failed implicit backward solve then gives
        NaN gradients instead of an error).
    - `trace`: store the residual of every step in `sol.stats["residual_trace"]`.
    - `save_iterates`: step numbers `k` whose iterates `y_k` are returned (detached)
        in `sol.stats["iterates"]`, stacked on a leading axis; a solve that stops
        earlier reports its final iterate there. For trajectory supervision
        ([`implicit_kit.regularizers.fixed_point_correction`][]).
    - `options`: passed to the solver (optimistix convention).
    - `probe`: a `(3,)` float array (`ik.backward_probe()`); its gradient reports the
        implicit backward solve's total steps, residual and number of failures (see
        `ik.backward_stats`).

    **Returns:**

    A [`implicit_kit.Solution`][].
    """
    if solver is None:
        from .solvers import Anderson

        solver = Anderson()

    def factory(kind):
        return Forward(kind, solver, options, max_steps, trace, tuple(save_iterates))

    return solve(
        fn, y0, args, "fixed_point", factory, has_aux=has_aux, adjoint=adjoint,
        throw=throw, probe=probe,
    )


def backward_probe(dtype=None) -> Array:
    """A zero `(3,)` array to pass as `probe=` and differentiate with respect to.

    Its gradient is `[backward steps, backward residual, backward failures]`, summed
    over every solve (and every vmapped sample) that used it. Read it with
    [`implicit_kit.backward_stats`][].
    """
    return jnp.zeros((3,), dtype if dtype is not None else jnp.result_type(float))


def backward_stats(probe_grad: Array) -> dict[str, Array]:
    """Unpack the gradient of a `backward_probe()` into named statistics."""
    return {
        "num_steps": probe_grad[0],
        "residual": probe_grad[1],
        "num_failed": probe_grad[2],
    }
