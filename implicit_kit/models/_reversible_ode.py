"""Reversible Runge–Kutta integration (McCallum & Foster 2024, "Efficient, accurate and
stable gradients for Neural ODEs", arXiv 2410.11648) and its backward pass.

Ported from the authors' diffrax fork (`sammccallum/diffrax`, branch
`AbstractReversibleSolver`, `diffrax/_solver/reversible.py`: `UReversible`; the adjoint of
diffrax PR #727), written for implicit_kit's ODE models: `ODESolve(solver=UReversible(base),
adjoint=ik.ReversibleAdjoint())`.
"""

from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._adjoint import batch_reversal
from .._solution import as_results
from ..homotopy import count_nfe
from ..homotopy._homotopy import nfe_per_step
from ..solvers._base import check_number


def _axpy(a, x, y):
    """`a x + y` leaf by leaf, in `y`'s dtype."""
    return jtu.tree_map(lambda u, v: (a * u + v).astype(v.dtype), x, y)


class UReversible(dfx.AbstractAdaptiveSolver):
    r"""Any explicit diffrax Runge–Kutta solver made algebraically reversible.

    With $\Phi_h(t, u)$ one step of the base solver from $t$ to $t + h$ and the coupling
    $\lambda \in (0, 1]$, the state is a pair $(y, z)$ started at $z_0 = y_0$:

    $$y_{n+1} = \lambda (y_n - z_n) + \Phi_h(t_n, z_n), \qquad
      z_{n+1} = z_n + y_{n+1} - \Phi_{-h}(t_{n+1}, y_{n+1}),$$

    two base steps per step; the solution is $y$ (dense output: linear interpolation).
    Run backwards, $z_n = z_{n+1} - y_{n+1} + \Phi_{-h}(t_{n+1}, y_{n+1})$ and
    $y_n = (y_{n+1} - \Phi_h(t_n, z_n))/\lambda + z_n$ reconstruct every step, which
    [`implicit_kit.ReversibleAdjoint`][] uses for the exact gradient of the
    discretisation at a memory that does not grow with the steps. It keeps the base
    solver's order; on $u' = \mu u$ its two modes are the base method's $R(h\mu)$ and
    the parasitic $y - z$ mode, damped by $\lambda$ per step ($\lambda = 1$: only
    marginally stable, like reversible Heun; $\lambda < 1$ divides the reversal by
    $\lambda$, so errors in that mode grow by $1/\lambda$ per reversed step).

    **Arguments:**

    - `solver`: an explicit Runge–Kutta solver (`dfx.Tsit5()`, `dfx.Dopri5()`,
        `dfx.Bosh3()`, `dfx.Heun()`, ...); adaptive step sizes use its error estimate.
    - `coupling`: $\lambda$ (default 0.999, the authors').
    """

    solver: dfx.AbstractSolver
    coupling: float = 0.999

    def __check_init__(self):
        check_number("UReversible(coupling=...)", self.coupling, low=0.0, low_open=True,
                     high=1.0)
        if not isinstance(self.solver, dfx.AbstractRungeKutta) or getattr(
                self.solver.tableau, "a_diagonal", None) is not None:
            raise ValueError(
                "`UReversible(solver=...)` must be an explicit diffrax Runge-Kutta solver "
                f"(Tsit5, Dopri5, Bosh3, Heun, ...), got {type(self.solver).__name__}.")

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return dfx.LocalLinearInterpolation

    def order(self, terms):
        """The base solver's order."""
        return self.solver.order(terms)

    def error_order(self, terms):
        """The base solver's error order (its embedded estimate drives the steps)."""
        return self.solver.error_order(terms)

    def base_step(self, terms, t0, t1, y0, args):
        """`(Phi(t0 -> t1, y0), error estimate, result)`: one step of the base solver,
        started afresh (no first-same-as-last reuse: the reversal must recompute it)."""
        state = self.solver.init(terms, t0, t1, y0, args)
        y1, err, _, _, result = self.solver.step(terms, t0, t1, y0, args, state, False)
        return y1, err, result

    def init(self, terms, t0, t1, y0, args):
        """The partner sequence starts at `z_0 = y_0`."""
        return y0

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        """One reversible step: `(y1, error, dense_info, z1, result)`."""
        del made_jump
        z0 = solver_state
        forward, err, result = self.base_step(terms, t0, t1, z0, args)
        y1 = _axpy(self.coupling, jtu.tree_map(jnp.subtract, y0, z0), forward)
        back, _, result2 = self.base_step(terms, t1, t0, y1, args)
        z1 = jtu.tree_map(lambda a, b, c: (a + b - c).astype(a.dtype), z0, y1, back)
        result = dfx.RESULTS.where(result == dfx.RESULTS.successful, result2, result)
        return y1, err, dict(y0=y0, y1=y1), z1, result

    def reverse_step(self, terms, t0, t1, y1, z1, args):
        """`(y0, z0)` from `(y1, z1)`: the step from `t0` to `t1` run backwards."""
        back, _, _ = self.base_step(terms, t1, t0, y1, args)
        z0 = jtu.tree_map(lambda a, b, c: (a - b + c).astype(a.dtype), z1, y1, back)
        forward, _, _ = self.base_step(terms, t0, t1, z0, args)
        y0 = jtu.tree_map(lambda a, b, c: ((a - b) / self.coupling + c).astype(a.dtype),
                          y1, forward, z0)
        return y0, z0

    def func(self, terms, t0, y0, args):
        """The vector field, as the base solver evaluates it."""
        return self.solver.func(terms, t0, y0, args)


def ode_nfe(solver, num_steps):
    """Vector-field evaluations of an ODE solve with `num_steps` steps: `count_nfe`'s,
    and for `UReversible` two fresh base steps per step (no first-same-as-last reuse)."""
    if isinstance(solver, UReversible):
        per_step, at_init = nfe_per_step(solver.solver)
        return 2 * (per_step + at_init) * num_steps
    return count_nfe(solver, num_steps)


def reversible_solve(vf, solver: UReversible, t0, t1, dt0, y0, args, *, ts, controller,
                     max_steps):
    """Integrate `vf` (diffrax's `f(t, y, args)`) with the reversible `solver`, and
    differentiate the computed steps by running them backwards. Returns
    `(ys, num_steps, result)`: `ys` the state at `t1` (`ts=None`) or at the times `ts`
    (a leading time axis), `num_steps` the steps (accepted and rejected)."""
    if not isinstance(solver, UReversible):
        raise ValueError(
            "`ReversibleAdjoint` runs the steps of a reversible solver backwards: with an "
            "ODE, pass `solver=ik.models.UReversible(dfx.Tsit5())` (or another explicit "
            f"Runge-Kutta base); got {type(solver).__name__}.")
    setup = _Setup(vf, solver, controller, max_steps, dt0)
    ys, num_steps, result = _reversible_ode((y0, args), setup, t0, t1, ts)
    return ys, num_steps, result


class _Setup(eqx.Module):
    vf: Callable = eqx.field(static=True)
    solver: UReversible
    controller: dfx.AbstractStepSizeController
    max_steps: int = eqx.field(static=True)
    dt0: float | None

    def run(self, y0, args, t0, t1, ts):
        subs = [dfx.SubSaveAt(t1=True),
                dfx.SubSaveAt(steps=True, fn=lambda t, y, args: t)]
        if ts is not None:
            subs.append(dfx.SubSaveAt(ts=ts))
        sol = dfx.diffeqsolve(
            dfx.ODETerm(self.vf), self.solver, t0, t1, self.dt0, y0, args,
            saveat=dfx.SaveAt(subs=subs, solver_state=True),
            stepsize_controller=self.controller, max_steps=self.max_steps, throw=False,
            adjoint=dfx.RecursiveCheckpointAdjoint(checkpoints=1),
        )
        y_end = jtu.tree_map(lambda y: y[-1], sol.ys[0])
        out = y_end if ts is None else sol.ys[2]
        z_end = sol.solver_state
        return (out, sol.stats["num_steps"], as_results(sol.result)), (
            y_end, z_end, sol.ys[1], sol.stats["num_accepted_steps"])


@eqx.filter_custom_vjp
def _reversible_ode(inputs, setup, t0, t1, ts):
    y0, args = inputs
    return setup.run(y0, args, t0, t1, ts)[0]


@_reversible_ode.def_fwd
def _reversible_ode_fwd(perturbed, inputs, setup, t0, t1, ts):
    del perturbed
    y0, args = inputs
    return setup.run(y0, args, t0, t1, ts)


@_reversible_ode.def_bwd
def _reversible_ode_bwd(residuals, grad_obj, perturbed, inputs, setup, t0, t1, ts):
    y0, args = inputs
    y_end, z_end, times, accepted = residuals
    out_bar = grad_obj[0]
    out = y_end if ts is None else jtu.tree_map(
        lambda y: jnp.zeros((ts.shape[0],) + y.shape, y.dtype), y_end)
    out_bar = jtu.tree_map(lambda g, x: jnp.zeros_like(x) if g is None else g, out_bar,
                           out, is_leaf=lambda v: v is None)
    dynamic, static = eqx.partition(args, eqx.is_array)
    reverse = batch_reversal(
        lambda axes, dyn, *state: _reverse_ode_batch(static, setup, ts is not None, axes,
                                                      dyn, *state))
    t0 = jnp.asarray(t0, times.dtype)
    ts_arr = jnp.zeros((0,), times.dtype) if ts is None else jnp.asarray(ts, times.dtype)
    gargs, y0_bar, _, _ = reverse(dynamic, y_end, z_end, times, accepted, out_bar, y0,
                                  t0, ts_arr)
    grads = (y0_bar, gargs)
    return jtu.tree_map(lambda c, p: c if p else None, grads, perturbed,
                        is_leaf=lambda v: v is None)


def _reverse_ode_batch(static, setup, saves_ts, params_axes, dynamic, y_end, z_end, times,
                       accepted, out_bar, y0, t0, ts):
    """The reversal of a batch (leading axis) of reversible integrations, each over its
    own accepted steps; the shared parameters' cotangents are summed at every step."""
    solver = setup.solver
    lam = solver.coupling
    terms = dfx.ODETerm(setup.vf)

    def phi(dyn, ta, tb, state):
        a = eqx.combine(dyn, static)
        return solver.base_step(terms, ta, tb, state, a)[0]

    phiB = jax.vmap(phi, in_axes=(params_axes, 0, 0, 0))

    def vjp_at(ta, tb, state, cot):
        out, vjp = eqx.filter_vjp(lambda d, s: phiB(d, ta, tb, s), dynamic, state)
        pdyn, pstate = vjp(cot)
        return out, pdyn, pstate

    def bcast(mask, x):
        return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))

    def where(mask, a, b):
        return jtu.tree_map(lambda u, v: jnp.where(bcast(mask, u), u, v), a, b)

    def add(a, b):
        return jtu.tree_map(jnp.add, a, b)

    def scale(c, tree):
        return jtu.tree_map(lambda t: (bcast(jnp.asarray(c), t) * t).astype(t.dtype)
                            if jnp.ndim(c) else (c * t).astype(t.dtype), tree)

    if not saves_ts:
        gy_init, save_bar = out_bar, None
    else:
        gy_init, save_bar = jtu.tree_map(jnp.zeros_like, y_end), out_bar

    def saved_weights(n, ta, tb):
        """Per sample, the weights of the saved times in (ta, tb] (and t0 at n = 0) on
        y_{n+1} and on y_n: diffrax's linear interpolation."""
        tau = ts
        ta_, tb_ = ta[:, None], tb[:, None]
        inside = (tau > ta_) & (tau <= tb_) | ((n[:, None] == 0) & (tau == ta_))
        w = jnp.where(inside, (tau - ta_) / jnp.where(tb_ == ta_, 1, tb_ - ta_), 0.0)
        return jnp.where(inside, w, 0.0), jnp.where(inside, 1 - w, 0.0)

    def contract(weights, bar):
        # (B, n_ts) x (B, n_ts, ...) -> (B, ...)
        return jtu.tree_map(
            lambda g: jnp.einsum("bt,bt...->b...", weights.astype(g.dtype), g), bar)

    def body(carry):
        i, y, z, gy, gz, gdyn = carry
        active = i > 0
        n = jnp.maximum(i - 1, 0)
        tb = jax.vmap(lambda t, k: t[k])(times, n)
        ta = jnp.where(n == 0, t0,
                       jax.vmap(lambda t, k: t[k])(times, jnp.maximum(n - 1, 0)))
        pending = None
        if save_bar is not None:
            w1, w0 = saved_weights(n, ta, tb)
            w1, w0 = jnp.where(active[:, None], w1, 0), jnp.where(active[:, None], w0, 0)
            gy = add(gy, contract(w1, save_bar))
            pending = contract(w0, save_bar)
        zero = jnp.zeros((), times.dtype)
        # z_{n+1} = z_n + y_{n+1} - Phi(tb -> ta, y_{n+1})
        neg_gz = where(active, jtu.tree_map(jnp.negative, gz), scale(zero, gz))
        back, pdyn, py = vjp_at(tb, ta, y, neg_gz)
        z_prev = jtu.tree_map(lambda a, b, c: (a - b + c).astype(a.dtype), z, y, back)
        gy_new = add(add(gy, gz), py)
        gdyn = add(gdyn, pdyn)
        # y_{n+1} = lam (y_n - z_n) + Phi(ta -> tb, z_n)
        fwd, pdyn, pz = vjp_at(ta, tb, z_prev, where(active, gy_new, scale(zero, gy_new)))
        y_prev = jtu.tree_map(lambda a, b, c: ((a - b) / lam + c).astype(a.dtype), y, fwd,
                              z_prev)
        gdyn = add(gdyn, pdyn)
        gz_prev = add(add(gz, scale(-lam, gy_new)), pz)
        gy_prev = scale(lam, gy_new)
        if pending is not None:
            gy_prev = add(gy_prev, pending)
        return (jnp.where(active, i - 1, i), where(active, y_prev, y),
                where(active, z_prev, z), where(active, gy_prev, gy),
                where(active, gz_prev, gz), gdyn)

    gdyn0 = jtu.tree_map(jnp.zeros_like, eqx.filter(dynamic, eqx.is_inexact_array))
    init = (accepted, y_end, z_end, gy_init, jtu.tree_map(jnp.zeros_like, gy_init), gdyn0)
    _, y_rec, z_rec, gy, gz, gdyn = lax.while_loop(lambda c: jnp.any(c[0] > 0), body, init)
    if save_bar is not None:  # a saved time t0 with no step taken
        none = accepted == 0
        at_t0 = jnp.where(none[:, None] & (ts == t0[:, None]), 1.0, 0.0)
        gy = add(gy, contract(at_t0, save_bar))
    drift = jax.vmap(lambda a, b: optx.two_norm(jtu.tree_map(jnp.subtract, a, b)))(
        y_rec, y0)
    return gdyn, add(gy, gz), accepted, drift
