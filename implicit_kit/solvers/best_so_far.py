from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._misc import tree_where, zeros_like_struct
from ._base import AbstractImplicitSolver, AbstractSolverState, step_counted


class _BestSoFarState(AbstractSolverState):
    residual: Float[Array, ""]  # the wrapped solver's, which drive its termination
    scale: Float[Array, ""]
    nfe: Int[Array, ""]
    best_y: PyTree  # the iterate of the lowest residual so far
    best_aux: PyTree
    best_residual: Float[Array, ""]
    inner: Any  # the wrapped solver's state


class BestSoFar(AbstractImplicitSolver):
    r"""Return the iterate with the lowest residual seen, not the last one (TorchDEQ's
    default; optimistix's `BestSoFarFixedPoint` for implicit_kit's solvers).

    Wraps any implicit_kit solver, which runs unchanged and stops by its own test.
    Each step's residual $\|G(y_k)\|$ belongs to the iterate $y_k$ the step was taken
    from (the solvers' state contract), so the value returned is an iterate whose
    residual was computed, and `stats["residual"]` is that residual (not the last
    step's). A solve that converges returns the iterate that met the tolerance (one
    step before the one the wrapped solver returns); one stopped by `max_steps`
    returns its best iterate, with `RESULTS.nonlinear_max_steps_reached` (or
    `nonlinear_divergence`: the codes describe the run). Every backward mode applies at
    the value returned: the implicit, phantom, JFB and Neumann gradients are those at
    that iterate, and `UnrolledAdjoint` differentiates the selection. Per sample under
    `jax.vmap`. The solver keeps one extra copy of the iterate (and of `aux`: that of
    the step taken from the best iterate, for solvers whose `aux` comes from it).

    For optimistix's own solvers use `optimistix.BestSoFarFixedPoint` /
    `BestSoFarRootFinder`, which also run in `ik.fixed_point` (the residual then is
    computed once more at the end).

    **Arguments:**

    - `solver`: the implicit_kit solver to wrap (its tolerances and norm apply).
    """

    solver: AbstractImplicitSolver
    counts_nfe = True
    stats_from_state = True

    def __check_init__(self):
        if not isinstance(self.solver, AbstractImplicitSolver):
            raise TypeError(
                "BestSoFar(solver) wraps an implicit_kit solver (its state reports the "
                f"residual of each iterate); got {type(self.solver).__name__}. For an "
                "optimistix solver use optimistix.BestSoFarFixedPoint / BestSoFarRootFinder."
            )

    @property
    def native(self) -> str:
        return self.solver.native

    @property
    def rtol(self) -> float:
        return self.solver.rtol

    @property
    def atol(self) -> float:
        return self.solver.atol

    @property
    def norm(self) -> Callable[[PyTree], Scalar]:
        return self.solver.norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        """The wrapped solver's state, and no best iterate yet (residual `inf`)."""
        inner = self.solver.init(fn, y, args, options, f_struct, aux_struct, tags)
        return _BestSoFarState(
            residual=inner.residual, scale=inner.scale, nfe=jnp.array(0), best_y=y,
            best_aux=zeros_like_struct(aux_struct),
            best_residual=jnp.full_like(inner.residual, jnp.inf), inner=inner,
        )

    def step(self, fn, y, args, options, state, tags):
        """A step of the wrapped solver; its input iterate is kept if its residual is
        the lowest so far."""
        new_y, inner, aux, nfe = step_counted(self.solver, fn, y, args, options,
                                              state.inner, tags)
        better = jnp.isfinite(inner.residual) & (inner.residual < state.best_residual)
        new_state = _BestSoFarState(
            residual=inner.residual, scale=inner.scale, nfe=state.nfe + nfe,
            best_y=tree_where(better, y, state.best_y),
            best_aux=tree_where(better, aux, state.best_aux),
            best_residual=jnp.where(better, inner.residual, state.best_residual),
            inner=inner,
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        return self.solver.terminate(fn, y, args, options, state.inner, tags)

    def result_code(self, result, state):
        return self.solver.result_code(result, state.inner)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        """The best iterate through the wrapped solver's own `postprocess` (its stats
        kept), and its residual as `stats["residual"]`."""
        y, aux, stats = self.solver.postprocess(fn, state.best_y, state.best_aux, args,
                                                options, state.inner, tags, result)
        return y, aux, {**stats, "residual": state.best_residual}
