import warnings
from typing import Generic, TypeVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree


Y = TypeVar("Y")
Aux = TypeVar("Aux")


# `successful` is redefined below with a message (the dependencies' is "", which reads
# like a missing value); equinox warns that it replaces the message, as intended.
_replaced_message = warnings.catch_warnings()
_replaced_message.__enter__()
warnings.filterwarnings("ignore", "Enumeration has duplicate incompatible values for "
                        "successful")


class RESULTS(dfx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """The result codes of every implicit_kit solve and model.

    Extends `diffrax.RESULTS` (and so `optimistix.RESULTS` and `lineax.RESULTS`): an
    outcome of a dependency is promoted with `RESULTS.promote(result)`, keeping its own
    code and message (a diffrax `max_steps_reached` stays `max_steps_reached`, a lineax
    `breakdown` stays `breakdown`). Index the class with a result to get its message:
    `RESULTS[sol.result]` (on success: "The solve succeeded.").
    """

    successful = "The solve succeeded."

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
    nonfinite_y0 = (
        "The solve produced non-finite values and its start point `y0` contains a "
        "non-finite value (nan or inf). Check where `y0` comes from (a previous solve "
        "that failed, the data, an initialiser)."
    )
    nonfinite_args = (
        "The solve produced non-finite values and its arguments `args` contain a "
        "non-finite value (nan or inf). Check the inputs (the data, or parameters after "
        "a diverged optimiser step)."
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
    qp_primal_infeasible = (
        "The quadratic program is primal infeasible: its constraints have no common "
        "point (OSQP's certificate: a direction y with K^T y = 0 along which the bounds' "
        "support function is negative). Check A, b, G, l, u (l <= u, compatible "
        "equalities); the solution is not usable and its gradient is NaN."
    )
    qp_dual_infeasible = (
        "The quadratic program is dual infeasible: the objective is unbounded below on "
        "the constraints (a direction d with Qd = 0, c^T d < 0 that the constraints "
        "allow). Check that Q is positive definite on the feasible directions or bound "
        "x; the solution is not usable and its gradient is NaN."
    )


_replaced_message.__exit__(None, None, None)


# The outcomes after which the solution is not a usable point at all (non-finite
# iterates, a diverged solve, a lost homotopy path): a gradient through such a solution
# is NaN under `throw=False` (never zero, never a finite wrong number). Stopping at
# `max_steps` is not among them: the last iterate is a usable approximation, and its
# implicit gradient is finite (the training layer's `train.on_unconverged` decides).
UNUSABLE = ("nonfinite", "nonfinite_y0", "nonfinite_args", "nonlinear_divergence",
            "homotopy_path_lost", "backward_nonfinite", "qp_primal_infeasible",
            "qp_dual_infeasible")


def unusable(result) -> "Array":
    """`True` where `result` is one of the outcomes after which a solution has no
    meaningful gradient (`UNUSABLE`), per sample under vmap."""
    out = result == RESULTS.nonfinite
    for name in UNUSABLE[1:]:
        out = out | (result == getattr(RESULTS, name))
    return out


# For each dependency's RESULTS (by id), its codes' members of ours, by name: `{}`
# where equinox's enumerations no longer name their members (then `promote` does it).
_PROMOTED: dict = {}


def _promotions(enum) -> dict:
    if id(enum) not in _PROMOTED:
        names = getattr(enum, "_name_to_item", {})
        _PROMOTED[id(enum)] = {int(item._value): getattr(RESULTS, name)
                               for name, item in names.items()}
    return _PROMOTED[id(enum)]


def as_results(result) -> RESULTS:
    """`result` as an implicit_kit `RESULTS` member: a member of a dependency's RESULTS
    (diffrax, optimistix, lineax) is promoted, keeping its code; one of ours is kept."""
    if getattr(result, "_enumeration", None) is RESULTS:
        return result
    if not isinstance(result._value, jax.core.Tracer):
        # A code known at trace time (the solvers' `terminate` returns the constant
        # `optx.RESULTS.successful` every step) is our member of the same name:
        # `promote` would compute it eagerly, eight XLA compilations the first time.
        ours = _promotions(result._enumeration).get(int(result._value))
        if ours is not None:
            return ours
    return RESULTS.promote(result)


class Solution(eqx.Module, Generic[Y, Aux]):
    """The solution of an equilibrium problem.

    **Attributes:**

    - `value`: the solution (a pytree of the same structure as the initial guess).
    - `result`: a [`implicit_kit.RESULTS`][] member; `RESULTS[sol.result]` is its
        message. Under `jax.vmap` it is batched: one code per sample.
    - `stats`: a dict of arrays (per sample under vmap), the same keys for every entry
        point (`fixed_point`, `root_find`, `minimise`, `homotopy_solve`):
        - `num_steps`: the iterations of the solve's outer loop (solver steps; ODE
            steps for `homotopy_solve`, which follows one path),
        - `max_steps`: its limit (`-1` for none),
        - `nfe`: the evaluations of the user's function (a JVP or VJP through it counts
            as one),
        - `residual`: the norm of the residual `fn(y) - y` (fixed points) or `fn(y)`
            (roots; the gradient for `minimise`) at the last iterate the solver
            evaluated,
        and documented extras: `residual_trace` (with `trace=True`, one entry per step,
        NaN after the last step), `iterates` (with `save_iterates`), `linear_steps`
        (Krylov steps of `NewtonKrylov`), `solver_index` (`Fallback`),
        `ode_rejected_steps` (homotopy), `path_lambda`/`path_z` (homotopy with
        `save_path=True`).
    - `aux`: auxiliary output of `fn` when `has_aux=True`, else `None`.
    """

    value: Y
    result: RESULTS
    stats: dict[str, PyTree[ArrayLike]]
    aux: Aux


STATS_KEYS = ("num_steps", "max_steps", "nfe", "residual")


class BackwardStats(eqx.Module):
    """Statistics of the implicit backward (adjoint) solves that used one
    `ik.backward_probe()`, summed over every solve and vmapped sample.

    **Attributes:**

    - `num_steps`: the steps of the backward solves (fixed-point or Krylov iterations).
    - `residual`: the final residual norms of the backward solves.
    - `num_failed`: how many backward solves failed (their gradients are NaN).
    """

    num_steps: Array
    residual: Array
    num_failed: Array


def backward_probe(dtype=None) -> Array:
    """A zero `(3,)` array to pass as `probe=` and differentiate with respect to.

    Its gradient holds the statistics of every implicit backward solve that used it;
    read them with [`implicit_kit.backward_stats`][], which names them.
    """
    return jnp.zeros((3,), dtype if dtype is not None else jnp.result_type(float))


def backward_stats(probe_grad: Array) -> BackwardStats:
    """The gradient of a `backward_probe()` as a [`implicit_kit.BackwardStats`][]."""
    probe_grad = jnp.asarray(probe_grad)
    if probe_grad.shape[-1:] != (3,):
        raise ValueError(
            "`probe_grad` must be the gradient of `ik.backward_probe()` (shape (3,)); got "
            f"shape {probe_grad.shape}."
        )
    return BackwardStats(probe_grad[..., 0], probe_grad[..., 1], probe_grad[..., 2])
