from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint, AbstractForward
from ._iterate import residual_fn
from ._misc import dtype_of
from ._solution import as_results, Solution
from ._solve import Forward, GivenForward, solve, solver_tolerance
from .solvers import NewtonKrylov


@eqx.filter_jit
def root_find(
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
    options: dict[str, Any] | None = None,
    probe: Array | None = None,
    check_every: int = 1,
) -> Solution:
    r"""Find a root `fn(y, args) = 0`.

    The same driver, solvers and backward modes as [`implicit_kit.fixed_point`][]. A
    fixed-point solver (Picard, Anderson, Halpern) iterates `y <- y + fn(y, args)`. The
    default solver is `NewtonKrylov()`; the default adjoint (`ImplicitAdjoint()`) solves
    the adjoint equation `-J^T u = ybar` with GMRES at the forward solve's tolerances
    (fixed-point iteration on it would need `I + J` contractive).

    **Arguments:** as [`implicit_kit.fixed_point`][], with `fn(y, args)` returning a
    pytree of the structure and shapes of `y`.

    **Returns:** a [`implicit_kit.Solution`][].
    """
    if solver is None:
        solver = NewtonKrylov()

    forward = Forward("root", solver, options, max_steps, trace, (), check_every)
    return solve(
        fn, y0, args, forward, has_aux=has_aux, adjoint=adjoint, throw=throw,
        probe=probe,
    )


class _NegGrad(eqx.Module):
    """`G(y) = -grad loss(y)`: the root function of a minimisation (so that the
    fixed-point form `y + G` is a gradient step and the adjoint operator is the
    Hessian, positive definite at a strict minimum)."""

    loss: Any

    def __call__(self, y, args):
        grad, aux = jax.grad(lambda _y: self.loss(_y, args), has_aux=True)(y)
        return jtu.tree_map(jnp.negative, grad), aux


class _OptxMinimiseForward(AbstractForward):
    kind: str = eqx.field(static=True)
    solver: Any
    options: Any
    max_steps: int | None = eqx.field(static=True)
    not_unrollable: ClassVar[str] = (
        "an optimistix minimiser's loop (it unrolls implicit_kit's own): use "
        "`ImplicitAdjoint`, or unroll optimistix yourself with "
        "`optx.RecursiveCheckpointAdjoint`")

    def tolerance(self):
        return solver_tolerance(self.solver)

    def __call__(self, fn, y0, args, *, while_kind="lax", checkpoints=None):
        del while_kind, checkpoints  # (always "lax": `not_unrollable`)
        def loss(y, a):  # the loss inside `fn` (`solve(..., wrap=_NegGrad)`)
            value, aux = fn.unwrap(_NegGrad).loss(fn.to_native(y), a)
            if fn.native is not None:  # the solve's working precision: `_solve.solve`
                value = jnp.asarray(value).astype(dtype_of(y))
            return value, aux

        sol = optx.minimise(
            loss, self.solver, y0, args, self.options, has_aux=True,
            max_steps=self.max_steps, throw=False,
        )
        g = residual_fn(fn, "root")(sol.value, args)
        # optimistix does not count evaluations: a minimiser's step evaluates the loss
        # and its gradient once (one VJP), plus the residual above.
        num_steps = sol.stats["num_steps"]
        stats = {"num_steps": num_steps, "nfe": num_steps + 1,
                 "residual": optx.two_norm(g)}
        return sol.value, sol.aux, stats, as_results(sol.result)


@eqx.filter_jit
def minimise(
    loss,
    y0: PyTree[Array],
    args: PyTree = None,
    solver=None,
    *,
    adjoint: AbstractAdjoint | None = None,
    max_steps: int | None = 256,
    has_aux: bool = False,
    throw: bool = True,
    trace: bool = False,
    options: dict[str, Any] | None = None,
    probe: Array | None = None,
) -> Solution:
    r"""Find `argmin_y loss(y, args)`, differentiable by the implicit function theorem on
    the stationarity condition `grad_y loss(y*, args) = 0`.

    **Arguments:**

    - `loss`: `loss(y, args) -> scalar` (or `(scalar, aux)` with `has_aux=True`).
    - `y0`, `args`: as [`implicit_kit.fixed_point`][].
    - `solver`: an optimistix minimiser (`optx.LBFGS(...)`, `optx.BFGS`,
        `optx.NonlinearCG`, an optax optimiser through
        `optx.OptaxMinimiser(optax.adam(...), rtol, atol)`, ...; default
        `optx.LBFGS(rtol=1e-8, atol=1e-8)` (`optx.BFGS` for parameters below float64
        under `jax_enable_x64`, where optimistix's LBFGS fails): its steps cost O(p),
        where BFGS's dense
        inverse Hessian costs O(p^2) and made a 640-parameter logistic regression
        (jaxopt's dataset distillation) 16x slower than jaxopt's gradient descent), or
        an implicit_kit solver applied
        to the stationarity condition (`NewtonKrylov()` is Newton's method with
        Hessian-vector products; a fixed-point solver iterates gradient steps
        `y <- y - grad loss(y)`).
    - `adjoint`: default `ImplicitAdjoint()`, which solves with CG on the Hessian
        (symmetric positive definite at a strict minimum), matrix-free, at the forward
        solve's tolerances.
    - the rest: as [`implicit_kit.fixed_point`][].

    **Returns:** a [`implicit_kit.Solution`][]; `stats["residual"]` is the norm of the
    gradient at the solution.
    """
    if solver is None:
        solver = optx.LBFGS(rtol=1e-8, atol=1e-8)
        if jax.config.jax_enable_x64 and any(
                jnp.result_type(leaf) != jnp.float64 for leaf in jtu.tree_leaves(y0)):
            # optimistix 0.1.0's LBFGS keeps its history in float64 under x64 whatever
            # y's dtype, and its scan then fails ("carry input and carry output must
            # have equal types") for float32 or lower: BFGS there.
            # (tests/test_optimality.py checks that the workaround is still needed)
            solver = optx.BFGS(rtol=1e-8, atol=1e-8)
    if not callable(loss):
        raise TypeError(f"`loss` must be callable, got {type(loss).__name__}.")
    scalar_loss = loss if has_aux else (lambda y, a: (loss(y, a), None))
    if isinstance(solver, optx.AbstractMinimiser):
        if trace:
            raise ValueError("`trace=True` is not available with optimistix minimisers.")

        forward = _OptxMinimiseForward("root", solver, options, max_steps)
    else:
        forward = Forward("root", solver, options, max_steps, trace)

    tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
    return solve(
        scalar_loss, y0, args, forward, has_aux=True, adjoint=adjoint,
        throw=throw, probe=probe, tags=tags, name="grad(loss)", wrap=_NegGrad,
    )


def custom_root(
    optimality_fn: Callable[..., PyTree],
    *,
    adjoint: AbstractAdjoint | None = None,
    throw: bool = True,
):
    r"""Make any solver implicitly differentiable from its optimality condition.

    ```python
    @ik.custom_root(lambda y, a: y**3 - a)   # y* solves optimality_fn(y*, *args) = 0
    def cube_root(y0, a):
        return some_solver(y0, a)            # any code: a Python loop, a pure_callback
    ```

    The decorated `solver(y_init, *args)` is run without being differentiated (it may be
    a non-JAX loop wrapped in `jax.pure_callback`); gradients with respect to `args` come
    from the implicit function theorem on `optimality_fn(y, *args) = 0`, whose Jacobian in
    `y` must be square and invertible at the solution.

    **Arguments:**

    - `optimality_fn`: `optimality_fn(y, *args)`, zero at the solution, same structure
        as `y`.
    - `adjoint`: default `ImplicitAdjoint()` (GMRES on the adjoint equation, at 1e-10 in
        float64: the user's solver has no tolerance to follow).
    - `throw`: as in [`implicit_kit.fixed_point`][] (for the backward solve).

    **Returns:** a decorator; the decorated function returns the solution `y`.
    """

    def decorator(solver_fn):
        def wrapped(y_init, *args):
            sol = solve(
                lambda y, a: optimality_fn(y, *a),
                y_init,
                tuple(args),
                GivenForward("root", solver_fn),
                has_aux=False,
                adjoint=adjoint,
                throw=throw,
                probe=None,
                name="optimality_fn",
            )
            return sol.value

        wrapped.__name__ = getattr(solver_fn, "__name__", "custom_root_solver")
        wrapped.__doc__ = solver_fn.__doc__
        return wrapped

    return decorator
