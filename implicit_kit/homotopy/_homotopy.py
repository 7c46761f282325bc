r"""Homotopy continuation for equilibrium problems, integrated as ODEs with diffrax.

Solve $G(z) = f(z) - z = 0$ by following the zero path of $H(z, \lambda)$ from
$\lambda = 0$ (solved by the start point $z_0$) to $\lambda = 1$ ($H = G$). Differentiating
$H(z(\lambda), \lambda) = 0$ gives the path ODE (Davidenko)
$dz/d\lambda = -H_z^{-1} H_\lambda$, whose linear system is solved matrix-free (JVPs and
a lineax solver) at every vector-field evaluation.
"""

import abc
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree

from .._misc import dtype_of, gmres
from .._solution import RESULTS
from ..solvers.newton_krylov import newton_step


class AbstractHomotopy(eqx.Module):
    """A homotopy: `velocity(f, z, lam, const)` gives $dz/d\\lambda$ at $(z, \\lambda)$."""

    linear_solver: lx.AbstractLinearSolver | None = None
    # Evaluations of f in `constants` (counted in the stats' `nfe`).
    constants_nfe: ClassVar[int] = 0

    def constants(self, f, z0):
        """What the field needs from the start point (computed once per path)."""
        return z0

    @abc.abstractmethod
    def operator_and_rhs(self, f, z, lam, const):
        """`(matvec, rhs)` of the linear system `H_z v = -H_lambda`."""

    def velocity(self, f, z, lam, const):
        """`dz/dλ` at `(z, λ)`: the matrix-free linear solve of `H_z v = −H_λ` (lineax)."""
        matvec, rhs = self.operator_and_rhs(f, z, lam, const)
        op = lx.FunctionLinearOperator(matvec, jax.eval_shape(lambda: rhs))
        solver = self.linear_solver or gmres(dtype_of(rhs))
        sol = lx.linear_solve(op, rhs, solver, throw=False)
        ok = (sol.result == lx.RESULTS.successful) & jnp.all(jnp.isfinite(sol.value))
        # A failed solve (singular H_z: a turning point) poisons the step with NaN, so
        # the ODE solver rejects it and the path is reported lost.
        return jnp.where(ok, sol.value, jnp.nan)


class FixedPointHomotopy(AbstractHomotopy):
    r"""$H(z, \lambda) = \lambda (z - f(z)) + (1 - \lambda)(z - z_0)$: the path ODE is
    $dz/d\lambda = (I - \lambda J_f(z))^{-1}(f(z) - z_0)$. With $z_0 = 0$ this is the
    HomoODE paper's field $(I - \lambda\nabla_z f)^{-1} f$. Probability-one homotopy:
    for almost every $z_0$ the path is smooth (Chow, Mallet-Paret & Yorke; Watson).

    **Arguments:**

    - `linear_solver`: the lineax solver for $I - \lambda J_f$ (default: GMRES at the data's
      precision, `ik._misc.gmres`).
    """

    def operator_and_rhs(self, f, z, lam, z0):
        fz, jvp = jax.linearize(f, z)
        return (lambda v: v - lam * jvp(v)), fz - z0


class NewtonHomotopy(AbstractHomotopy):
    r"""$H(z, \lambda) = G(z) - (1 - \lambda) G(z_0)$, $G = f - I$: the path ODE is
    $dz/d\lambda = -J_G(z)^{-1} G(z_0)$ (the continuous Newton / Branin flow).

    **Arguments:**

    - `linear_solver`: the lineax solver for $J_G$ (default: GMRES at the data's
      precision, `ik._misc.gmres`).
    """

    constants_nfe: ClassVar[int] = 1

    def constants(self, f, z0):
        return f(z0) - z0

    def operator_and_rhs(self, f, z, lam, g0):
        del lam
        _, jvp = jax.linearize(f, z)
        return (lambda v: jvp(v) - v), -g0


class NewtonCorrector(eqx.Module):
    r"""`steps` Newton iterations $z \leftarrow z - J_G(z)^{-1} G(z)$ on the end point
    (matrix-free, lineax GMRES; the library's one Newton step, `newton_step`), to remove
    the drift of path following."""

    steps: int = eqx.field(static=True, default=3)
    linear_solver: lx.AbstractLinearSolver | None = None

    def __call__(self, f, z):
        """`(z', nfe)`: the corrected point and the evaluations of `f` (one per
        linearisation, one per Krylov step)."""
        solver = self.linear_solver or gmres(z.dtype)

        def body(_, carry):
            z, nfe = carry
            z, _, _, steps = newton_step(lambda z: (f(z) - z, None), z, solver)
            return z, nfe + 1 + steps

        return jax.lax.fori_loop(0, self.steps, body, (z, jnp.array(0)))


def nfe_per_step(solver) -> tuple[int, int]:
    """`(evaluations per step, evaluations at init)` of a diffrax Runge–Kutta solver:
    `num_stages` per step, one fewer with first-same-as-last and one at the start."""
    tableau = getattr(solver, "tableau", None)
    if tableau is None:
        inner = getattr(solver, "solver", None)
        if inner is not None:
            return nfe_per_step(inner)
        if isinstance(solver, dfx.Euler):
            return 1, 0
        raise TypeError(
            f"cannot count function evaluations of {type(solver).__name__}: use an "
            "explicit Runge–Kutta solver (Euler, Heun, Bosh3, Tsit5, Dopri5, Dopri8)."
        )
    if tableau.fsal:
        return tableau.num_stages - 1, 1
    return tableau.num_stages, 0


def count_nfe(solver, num_steps):
    """Vector-field evaluations of a diffrax solve with `num_steps` (accepted plus
    rejected) steps; checked against a runtime counter in the tests."""
    per_step, at_init = nfe_per_step(solver)
    return per_step * num_steps + at_init


def integrate_path(
    f,
    z0,
    homotopy: AbstractHomotopy,
    *,
    solver,
    stepsize_controller,
    dt0,
    max_steps: int,
    adjoint,
    corrector,
    save_path: bool,
):
    """Integrate the path ODE of `homotopy` for `f` (a function of a flat vector) from
    `z0` over lambda in [0, 1]. Returns `(z1, stats, result)`, `stats` with `num_steps`
    (ODE steps, accepted and rejected), `ode_rejected_steps` and `nfe` (path-field
    evaluations, each one linearisation of `f` plus a matrix-free linear solve whose JVPs
    are not counted, and the corrector's evaluations); differentiable through the path
    with the diffrax `adjoint`."""
    const = homotopy.constants(f, z0)

    def field(lam, z, const):
        return homotopy.velocity(f, z, lam, const)

    # With `steps=True` the last accepted step is the end point (t1 is not repeated).
    saveat = dfx.SaveAt(steps=True) if save_path else dfx.SaveAt(t1=True)
    sol = dfx.diffeqsolve(
        # lambda in z's dtype: diffrax promotes the state to the time dtype, so float64
        # times (x64 on) would turn a float32 path into float64.
        dfx.ODETerm(field), solver, jnp.zeros((), z0.dtype), jnp.ones((), z0.dtype),
        None if dt0 is None else jnp.asarray(dt0, z0.dtype), z0, const, saveat=saveat,
        stepsize_controller=stepsize_controller, max_steps=max_steps, adjoint=adjoint,
        throw=False,
    )
    if save_path:
        z1 = sol.ys[jnp.maximum(sol.stats["num_accepted_steps"] - 1, 0)]
    else:
        z1 = sol.ys[-1]
    lost = (sol.result != dfx.RESULTS.successful) | jnp.invert(jnp.all(jnp.isfinite(z1)))
    z1 = jnp.where(lost, z0, z1)  # never hand NaN on
    num_steps = sol.stats["num_steps"]
    nfe = count_nfe(solver, num_steps) + homotopy.constants_nfe
    if corrector is not None:
        z1, corrector_nfe = corrector(f, z1)
        nfe = nfe + corrector_nfe
    stats = {
        "num_steps": num_steps,
        "ode_rejected_steps": sol.stats["num_rejected_steps"],
        "nfe": nfe,
    }
    if save_path:
        stats["path_lambda"] = sol.ts
        stats["path_z"] = sol.ys
    result = RESULTS.where(lost, RESULTS.homotopy_path_lost, RESULTS.successful)
    return z1, stats, result


def flat_fn(fn, y, args):
    """`fn(y, args)` as a function of the flat vector of `y`, and the unravel map."""
    flat, unravel = ravel_pytree(y)

    def f(z):
        out = fn(unravel(z), args)
        return ravel_pytree(out)[0].astype(flat.dtype)

    return f, flat, unravel


