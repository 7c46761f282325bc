from typing import Any

import equinox as eqx
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint
from ._solution import Solution
from ._solve import Forward, solve
from .solvers import Anderson


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
    check_every: int = 1,
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
        `Broyden`, `NewtonKrylov`, `Halpern`, `Reversible`, `Fallback(...)`, or any optimistix
        fixed-point solver or root finder.
    - `adjoint`: the backward mode: `ImplicitAdjoint()` (default), `NeumannAdjoint(k)`,
        `PhantomAdjoint(k, damping)`, `JFBAdjoint()`, `UnrolledAdjoint()`,
        `ReversibleAdjoint()` (with `solver=Reversible()`),
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
    - `check_every`: run this many solver steps between convergence tests (on an
        accelerator each test of a data-dependent loop is a device-to-host round trip).
        A sample that converges or reaches `max_steps` in between is frozen, so the
        result, `num_steps` and every stat equal those of `check_every=1`; only wasted
        work (at most `check_every - 1` frozen steps) differs.
    - `probe`: a `(3,)` float array (`ik.backward_probe()`); its gradient reports the
        implicit backward solve's total steps, residual and number of failures (read it
        with `ik.backward_stats`, which returns a [`implicit_kit.BackwardStats`][]).

    **Returns:**

    A [`implicit_kit.Solution`][].
    """
    if solver is None:
        solver = Anderson()

    forward = Forward("fixed_point", solver, options, max_steps, trace,
                      tuple(save_iterates), check_every)
    return solve(
        fn, y0, args, forward, has_aux=has_aux, adjoint=adjoint,
        throw=throw, probe=probe,
    )
