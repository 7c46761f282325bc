"""The protocol shared by implicit_kit's forward solvers.

Every solver is an `eqx.Module` holding hyperparameters only and implementing the
optimistix solver protocol (`init`, `step`, `terminate`, `postprocess`), so that it also
works inside `optimistix.fixed_point` / `optimistix.root_find`: `terminate` returns
optimistix's result codes, which implicit_kit's driver promotes (with
`result_code`, where a solver has a code of its own). A solver works natively on either
a fixed-point map `T(y) = y` (subclass of `AbstractFixedPointSolver`) or a root function
`G(y) = 0` (subclass of `AbstractRootSolver`); `native_fn` converts between the two with
`G(y) = T(y) - y`.

The rules a solver of implicit_kit follows are declared on `AbstractImplicitSolver` and
checked once, when the driver first initialises it (`check_solver_state`):

- its state is an `AbstractSolverState`: `residual`, the norm of `G` at the iterate the last
  `step` was taken from, and `scale`, the norm of that iterate (the termination test is
  `residual <= atol + rtol * scale`);
- `counts_nfe = True` declares that the state carries `nfe`, a running count of the
  evaluations of `fn` (a JVP through it counts as one); otherwise the evaluations are
  counted as the calls of `fn` in one traced `step` (`step_counted`);
- `stats_from_state = True` declares that `postprocess` reads stats off the final state,
  so the driver freezes the state of a sample once it stops (under vmap the loop runs on
  for the others); a class that overrides `postprocess` must say which it is;
- a `postprocess` that returns another iterate than the last (`BestSoFar`) reports that
  iterate's residual as `stats["residual"]`, which the driver then reports.
"""

import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from equinox import AbstractClassVar, AbstractVar
from jaxtyping import Array, Float, PyTree, Scalar

from .._misc import dtype_of, tree_sub
from .._solution import as_results, RESULTS


def check_number(
    what: str, value, *, low=None, low_open=False, high=None, allow_inf=False
) -> None:
    """Raise a `ValueError` naming `what` unless the Python number `value` is finite (or
    `+inf`, with `allow_inf`) and in the range (`low` excluded with `low_open`, `high`
    included). Arrays are not checked (a tolerance vmapped over as a hyperparameter is
    traced)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if allow_inf and value == math.inf:
        return
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}, "
    hi = ("inf]" if allow_inf else "inf)") if high is None else f"{high:g}]"
    ok = math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or value <= high)
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        expected = f"{kind} in {lo}{hi}" if lo else kind
        raise ValueError(f"`{what}` must be {expected}, got {value!r}.")


class AbstractSolverState(eqx.Module):
    """The state of an implicit_kit solver: what the driver reads after every step.

    - `residual`: the norm of `G` at the iterate the last `step` was taken from (`inf`
      before the first step, see `init_residual`).
    - `scale`: the norm of that iterate.

    A solver with `counts_nfe = True` also carries `nfe`, its running count of evaluations.
    """

    residual: AbstractVar[Float[Array, ""]]
    scale: AbstractVar[Float[Array, ""]]


class AbstractImplicitSolver(eqx.Module):
    """Base of the solvers of implicit_kit: a tolerance test on `state.residual`.

    A subclass defines `rtol`, `atol`, `norm`, the optimistix methods `init` and `step`
    (returning an `AbstractSolverState`), and inherits `native` from
    `AbstractFixedPointSolver` or `AbstractRootSolver`. Class variables it may set:

    - `counts_nfe` (default `False`): its state carries `nfe`, a running count of
      evaluations of `fn`, which the driver reports; otherwise the driver counts the calls
      of `fn` in one traced step.
    - `stats_from_state` (default `False`): its `postprocess` reports stats read off the
      final state, which the driver then freezes per sample once the sample stops. A class
      that overrides `postprocess` must set it (to `True` or `False`) in its own body.
    """

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Callable[[PyTree], Scalar]]
    native: AbstractClassVar[str]
    counts_nfe: ClassVar[bool] = False
    stats_from_state: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "postprocess" in cls.__dict__ and "stats_from_state" not in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides `postprocess`: set the class variable "
                "`stats_from_state` in its body (True if `postprocess` reads stats off the "
                "final state, so the driver freezes it per sample once a sample stops)."
            )

    def __check_init__(self):
        # Run for every subclass (equinox calls each class's `__check_init__`).
        name = type(self).__name__
        for field in ("rtol", "atol"):
            # `inf` is allowed: "accept any iterate" (e.g. a homotopy end point taken as
            # it is, `homotopy_solve(..., rtol=jnp.inf)`).
            check_number(
                f"{name}({field}=...)", getattr(self, field), low=0.0, allow_inf=True
            )
        damping = getattr(self, "damping", None)
        if damping is not None:
            check_number(f"{name}(damping=...)", damping, low=0.0, low_open=True, high=1.0)

    def terminate(self, fn, y, args, options, state, tags):
        """`(done, result)`: done when the residual is finite and at most
        `atol + rtol * scale`; a non-finite residual is never convergence (the driver
        reports it). `result` is an `optimistix.RESULTS` member (so that the solver runs
        inside optimistix's own loop)."""
        del fn, y, args, options, tags
        # A non-finite residual is never convergence (even if the scale overflowed too).
        done = jnp.isfinite(state.residual) & (
            state.residual <= self.atol + self.rtol * state.scale
        )
        return done, optx.RESULTS.successful

    def result_code(self, result, state) -> RESULTS:
        """`result` (from `terminate`) as an implicit_kit `RESULTS` member; solvers with
        codes of their own (a lost homotopy path, an exhausted fallback) refine it."""
        del state
        return as_results(result)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        """`(y, aux, stats)` returned by the solve; these solvers add no extra stats."""
        return y, aux, {}


class AbstractFixedPointSolver(AbstractImplicitSolver, optx.AbstractFixedPointSolver):
    """A solver that iterates a fixed-point map `y <- T(y)`."""

    native: ClassVar[str] = "fixed_point"


class AbstractRootSolver(AbstractImplicitSolver, optx.AbstractRootFinder):
    """A solver that finds a root `G(y) = 0`."""

    native: ClassVar[str] = "root"


def init_residual(y: PyTree) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Residual `inf` and scale `0` in the dtype of `y` (so the state never changes dtype)."""
    real = jnp.finfo(dtype_of(y)).dtype
    return jnp.array(jnp.inf, real), jnp.array(0.0, real)


KINDS = ("fixed_point", "root")


def solver_native_kind(solver) -> str:
    """`"fixed_point"` or `"root"`: the kind of problem `solver` iterates on."""
    if isinstance(solver, AbstractImplicitSolver):
        return solver.native
    if isinstance(solver, optx.AbstractFixedPointSolver):
        return "fixed_point"
    if isinstance(solver, optx.AbstractRootFinder):
        return "root"
    raise TypeError(
        "`solver` must be an implicit_kit solver (Picard, Anderson, Broyden, "
        "NewtonKrylov, Halpern, Fallback, HomotopySolver, ...) or an optimistix "
        f"fixed-point solver or root finder; got {type(solver).__name__}. (For an "
        "optimistix least-squares solver or minimiser, use `ik.minimise` or optimistix "
        "directly.)"
    )


def native_fn(fn, kind: str, native: str):
    """`fn(y, args) -> (out, aux)` of problem `kind`, rewritten for a solver of `native`."""
    if kind == native:
        return fn
    if kind == "fixed_point":  # solver wants G = T - y

        def root_fn(y, args):
            out, aux = fn(y, args)
            return tree_sub(out, y), aux

        return root_fn

    def fixed_point_fn(y, args):  # solver wants T = y + G
        out, aux = fn(y, args)
        return jtu.tree_map(lambda a, b: a + b, y, out), aux

    return fixed_point_fn


def check_solver_state(solver, state) -> None:
    """Raise a `TypeError` naming the solver if its `init` broke the rules declared on
    `AbstractImplicitSolver` (run once per solve, at trace time)."""
    if not isinstance(solver, AbstractImplicitSolver):
        return
    name = type(solver).__name__
    if not isinstance(state, AbstractSolverState):
        raise TypeError(
            f"`{name}.init` must return an `implicit_kit.solvers.AbstractSolverState` "
            f"(with `residual` and `scale`), got {type(state).__name__}."
        )
    has_nfe = hasattr(state, "nfe")
    if has_nfe != solver.counts_nfe:
        raise TypeError(
            f"{name}'s state {'carries' if has_nfe else 'has no'} `nfe` but the solver "
            f"declares `counts_nfe = {solver.counts_nfe}`; they must agree."
        )


def step_counted(solver, fn, y, args, options, state, tags):
    """`solver.step(...)` and the number of evaluations of `fn` it made: the change of
    the state's `nfe` counter if the solver keeps one (`counts_nfe`), else the calls of
    `fn` in the traced step (exact for solvers that call `fn` outside inner loops; a
    lower bound otherwise)."""
    calls = [0]

    def counted(y, args):
        calls[0] += 1
        return fn(y, args)

    new_y, new_state, aux = solver.step(counted, y, args, options, state, tags)
    if isinstance(solver, AbstractImplicitSolver) and solver.counts_nfe:
        nfe = new_state.nfe - state.nfe
    else:
        nfe = jnp.array(calls[0])
    return new_y, new_state, aux, nfe
