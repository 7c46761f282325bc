from typing import Generic, TypeVar

import equinox as eqx
import optimistix as optx
from jaxtyping import ArrayLike, PyTree


Y = TypeVar("Y")
Aux = TypeVar("Aux")


class RESULTS(optx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """The result codes of every implicit_kit solve.

    Extends `optimistix.RESULTS` (and so `lineax.RESULTS`): a result from an optimistix
    solver can be promoted with `RESULTS.promote(result)`. Index the class with a
    result to get its message: `RESULTS[sol.result]`.
    """

    backward_max_steps_reached = (
        "The backward (adjoint) linear solve of an implicit gradient reached its maximum "
        "number of steps without converging, so the gradient is not trustworthy (it is "
        "set to NaN). Increase the adjoint's `max_steps`, loosen its `rtol`/`atol`, use "
        "a stronger backward solver (e.g. `ImplicitAdjoint(linear_solver=lx.GMRES(...))`"
        "), or stabilise the model (the map may not be contractive at the equilibrium)."
    )
    backward_nonfinite = (
        "Non-finite (inf or nan) values appeared in the backward (adjoint) solve of an "
        "implicit gradient. The gradient is set to NaN. The equilibrium may be unstable "
        "(spectral radius of the Jacobian >= 1): check `ik.spectral_radius`."
    )
    fallback_exhausted = (
        "Every solver of `Fallback(...)` failed on this problem. Increase `max_steps`, "
        "loosen the tolerances, or add a more robust solver (e.g. `NewtonKrylov` or "
        "`HomotopySolver`)."
    )
    homotopy_path_lost = (
        "The homotopy path was lost: the path ODE could not be integrated to lambda = 1 "
        "(a singular Jacobian or turning point on the way makes the linear solves fail "
        "or the step size collapse), or its end point is not finite. Try another start "
        "point `z0`, the other homotopy (`NewtonHomotopy` / `FixedPointHomotopy`), or "
        "a larger `max_steps`."
    )
    homotopy_residual = (
        "The homotopy path was integrated to lambda = 1 but its end point does not "
        "satisfy the equation to the requested tolerance (path-following drift). Tighten "
        "the ODE tolerances or add a corrector (`NewtonCorrector(k)`)."
    )


class Solution(eqx.Module, Generic[Y, Aux]):
    """The solution of an equilibrium problem.

    **Attributes:**

    - `value`: the solution (a pytree of the same structure as the initial guess).
    - `result`: a [`implicit_kit.RESULTS`][] member; `RESULTS[sol.result]` is its
        message. Under `jax.vmap` it is batched: one code per sample.
    - `stats`: a dict of arrays, always with
        - `num_steps`: the number of solver steps taken (per sample under vmap),
        - `max_steps`: the step limit,
        - `residual`: the norm of the residual `fn(y) - y` (fixed points) or `fn(y)`
            (roots) at the last iterate the solver evaluated,
        and, when asked for with `trace=True`, `residual_trace` (one entry per step,
        NaN after the last step). Solvers may add more.
    - `aux`: auxiliary output of `fn` when `has_aux=True`, else `None`.
    """

    value: Y
    result: RESULTS
    stats: dict[str, PyTree[ArrayLike]]
    aux: Aux
