"""`HomotopySolver` (a forward solver for the shared driver) and `homotopy_solve`."""

from collections.abc import Callable
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._adjoint import AbstractAdjoint, ImplicitAdjoint
from .._fixed_point import fixed_point
from .._misc import dtype_of, gmres, lowest_precision
from .._solution import as_results, RESULTS, Solution
from ..solvers._base import AbstractFixedPointSolver, AbstractSolverState, init_residual
from ._homotopy import (
    AbstractHomotopy,
    FixedPointHomotopy,
    flat_fn,
    integrate_path,
    NewtonCorrector,
)


def _default_controller():
    return dfx.PIDController(rtol=1e-6, atol=1e-8)


class _HomotopyState(AbstractSolverState):
    residual: Float[Array, ""]
    scale: Float[Array, ""]
    nfe: Int[Array, ""]
    ode_steps: Int[Array, ""]
    ode_rejected_steps: Int[Array, ""]
    lost: Array
    path_lambda: Array | None
    path_z: Array | None


class HomotopySolver(AbstractFixedPointSolver):
    r"""Solve an equilibrium by homotopy continuation: one `step` integrates the path
    ODE of `homotopy` from the current iterate (as $z_0$) to $\lambda = 1$ with diffrax,
    then applies the optional `corrector`. The iterate is accepted when
    `norm(f(z) - z) <= atol + rtol * norm(z)`; otherwise the next step restarts the
    path from it. A lost path ends the solve with `RESULTS.homotopy_path_lost`.

    Usable wherever a forward solver is: `ik.fixed_point(fn, y0, args,
    HomotopySolver())`, or as the last resort `ik.Fallback(ik.Anderson(),
    ik.HomotopySolver())` (it reaches equilibria where fixed-point iteration diverges).

    **Arguments:**

    - `homotopy`: `FixedPointHomotopy()` (default) or `NewtonHomotopy()`.
    - `ode_solver`: any explicit diffrax solver (default `Tsit5()`).
    - `stepsize_controller`: default `PIDController(rtol=1e-6, atol=1e-8)`.
    - `dt0`: the initial step (`None`: chosen by the controller).
    - `ode_max_steps`: the step limit of one path.
    - `corrector`: `None` or `NewtonCorrector(k)`.
    - `save_path`: keep the accepted path points in the stats (`path_lambda`, `path_z`).
    - `rtol`, `atol`, `norm`: the acceptance test on the end point.
    """

    homotopy: AbstractHomotopy = eqx.field(default_factory=FixedPointHomotopy)
    ode_solver: dfx.AbstractSolver = eqx.field(default_factory=dfx.Tsit5)
    stepsize_controller: dfx.AbstractStepSizeController = eqx.field(
        default_factory=_default_controller
    )
    dt0: float | None = None
    ode_max_steps: int = eqx.field(static=True, default=4096)
    corrector: NewtonCorrector | None = None
    save_path: bool = eqx.field(static=True, default=False)
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.two_norm
    counts_nfe: ClassVar[bool] = True
    stats_from_state: ClassVar[bool] = True

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        residual, scale = init_residual(y)
        n = sum(x.size for x in jtu.tree_leaves(y))
        dtype = residual.dtype
        path = (
            (jnp.full((self.ode_max_steps,), jnp.inf, dtype),
             jnp.zeros((self.ode_max_steps, n), dtype))
            if self.save_path
            else (None, None)
        )
        zero = jnp.array(0)
        return _HomotopyState(residual, scale, zero, zero, zero, jnp.array(False), *path)

    def step(self, fn, y, args, options, state, tags):
        f, flat, unravel = flat_fn(lambda z, a: fn(z, a)[0], y, args)
        z1, stats, result = integrate_path(
            f, flat, self.homotopy, solver=self.ode_solver,
            stepsize_controller=self.stepsize_controller, dt0=self.dt0,
            max_steps=self.ode_max_steps, adjoint=dfx.RecursiveCheckpointAdjoint(),
            corrector=self.corrector, save_path=self.save_path,
        )
        y1 = unravel(z1)
        fy, aux = fn(y1, args)
        residual = self.norm(jtu.tree_map(jnp.subtract, fy, y1))
        new_state = _HomotopyState(
            residual.astype(state.residual.dtype),
            self.norm(y1).astype(state.scale.dtype),
            state.nfe + stats["nfe"] + 1,  # the path, and fn at its end point
            state.ode_steps + stats["num_steps"],
            state.ode_rejected_steps + stats["ode_rejected_steps"],
            result == RESULTS.homotopy_path_lost,
            stats.get("path_lambda"),
            stats.get("path_z"),
        )
        return y1, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        done, _ = super().terminate(fn, y, args, options, state, tags)
        # optimistix's code inside optimistix; `result_code` refines it here.
        result = optx.RESULTS.where(
            state.lost, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        return done | state.lost, result

    def result_code(self, result, state) -> RESULTS:
        return RESULTS.where(
            state.lost, RESULTS.homotopy_path_lost, as_results(result)
        )

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        extra = {"ode_steps": state.ode_steps,
                 "ode_rejected_steps": state.ode_rejected_steps}
        if self.save_path:
            extra["path_lambda"] = state.path_lambda
            extra["path_z"] = state.path_z
        return y, aux, extra


def homotopy_solve(
    fn,
    z0: PyTree[Array],
    args: PyTree = None,
    homotopy: AbstractHomotopy | None = None,
    *,
    ode_solver: dfx.AbstractSolver | None = None,
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    corrector: NewtonCorrector | None = None,
    adjoint=None,
    save_path: bool = False,
    max_steps: int = 4096,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    throw: bool = True,
    probe: Array | None = None,
) -> Solution:
    r"""Find $z = f(z)$ by following a homotopy path from `z0` (one path, no restart).

    **Arguments:** (named as [`implicit_kit.homotopy.HomotopySolver`][]'s)

    - `fn`: the map `fn(z, args) -> z'` (same structure as `z0`).
    - `z0`: the start point; `args`: differentiable arguments.
    - `homotopy`: `FixedPointHomotopy()` (default) or `NewtonHomotopy()`.
    - `ode_solver`, `stepsize_controller`, `dt0`, `max_steps`: for diffrax (defaults
        `Tsit5()`, `PIDController(rtol=1e-6, atol=1e-8)`, 4096 ODE steps).
    - `corrector`: optional `NewtonCorrector(k)` at the end point.
    - `adjoint`: `None` or an implicit_kit adjoint: gradients by the implicit function
        theorem at the end point (default `ImplicitAdjoint` with GMRES at the data's
        precision: exact whenever the end point is an equilibrium, whatever path reached
        it, and memory-flat); or a diffrax adjoint (`dfx.RecursiveCheckpointAdjoint()`,
        ...) to differentiate through the path itself.
    - `save_path`: return the accepted path points in `stats["path_lambda"]`,
        `stats["path_z"]` (flattened states; unused slots have lambda = inf).
    - `rtol`, `atol`: the end point must satisfy `|f(z) - z| <= atol + rtol |z|`, or
        the result is `RESULTS.homotopy_residual`.
    - `throw`: raise on failure (else read `sol.result`).
    - `probe`: an `ik.backward_probe()` reading the implicit backward solve (the
        implicit_kit adjoints; unused with a diffrax adjoint).

    **Returns:** a `Solution` whose stats follow the contract: `num_steps` (ODE steps of
    the path, accepted and rejected), `max_steps`, `nfe` (path-field evaluations, each
    also a matrix-free linear solve, plus the corrector's and the end point's) and
    `residual`; extras `ode_rejected_steps` and the saved path.
    """
    low = lowest_precision(z0)
    if float(jnp.finfo(low).eps) > float(jnp.finfo(jnp.float32).eps):
        # Measured: in float16 and bfloat16 the adaptive steps of the path ODE collapse
        # on the rounding noise of the path field (PIDController at rtol 1e-2 to 1e-6:
        # the path was lost, or not reached in 4096 steps), so refuse up front.
        raise ValueError(
            f"`homotopy_solve` needs `z0` in float32 or float64, got {jnp.dtype(low).name}: "
            "the path ODE's adaptive step-size control cannot work at that precision. "
            "Cast `z0` (and the arrays in `fn`/`args`) to float32, e.g. "
            "`jax.tree.map(lambda a: a.astype(jnp.float32), z0)`, and the solution back."
        )
    hs = HomotopySolver(
        homotopy=FixedPointHomotopy() if homotopy is None else homotopy,
        ode_solver=dfx.Tsit5() if ode_solver is None else ode_solver,
        stepsize_controller=(
            _default_controller() if stepsize_controller is None else stepsize_controller
        ),
        dt0=dt0, ode_max_steps=max_steps, corrector=corrector, save_path=save_path,
        rtol=rtol, atol=atol,
    )
    if adjoint is None or isinstance(adjoint, AbstractAdjoint):
        if adjoint is None:
            adjoint = ImplicitAdjoint(gmres(dtype_of(z0)))
        sol = fixed_point(fn, z0, args, hs, adjoint=adjoint, max_steps=1, throw=False,
                          probe=probe)
        result = RESULTS.where(
            sol.result == RESULTS.nonlinear_max_steps_reached, RESULTS.homotopy_residual,
            sol.result,
        )
        stats = dict(sol.stats)
        stats["num_steps"] = stats.pop("ode_steps")
        stats["max_steps"] = jnp.array(max_steps)
        sol = Solution(value=sol.value, result=result, stats=stats, aux=None)
    elif isinstance(adjoint, dfx.AbstractAdjoint):
        f, flat, unravel = flat_fn(fn, z0, args)
        z1, stats, result = integrate_path(
            f, flat, hs.homotopy, solver=hs.ode_solver,
            stepsize_controller=hs.stepsize_controller, dt0=dt0, max_steps=max_steps,
            adjoint=adjoint, corrector=corrector, save_path=save_path,
        )
        residual = hs.norm(f(z1) - z1)
        ok = residual <= atol + rtol * hs.norm(z1)
        result = RESULTS.where(
            (result == RESULTS.successful) & jnp.invert(ok), RESULTS.homotopy_residual,
            result,
        )
        stats = {**stats, "nfe": stats["nfe"] + 1, "residual": residual,
                 "max_steps": jnp.array(max_steps)}
        stats = jtu.tree_map(lax.stop_gradient, stats)
        sol = Solution(value=unravel(z1), result=result, stats=stats, aux=None)
    else:
        raise TypeError(
            "`adjoint` must be None, an implicit_kit adjoint (gradient at the end point) "
            f"or a diffrax adjoint (through the path); got {type(adjoint).__name__}."
        )
    if throw:
        sol = sol.result.error_if(sol, sol.result != RESULTS.successful)
    return sol
