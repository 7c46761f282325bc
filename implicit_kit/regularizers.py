"""Regularisers and monitors for implicit models: pure functions returning scalars.

Add the returned scalar (times a weight) to the training loss.
"""

from collections.abc import Callable

import diffrax as dfx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._diagnostics import spectral_radius as spectral_radius


__all__ = ["ErrorEstimatePenalty", "fixed_point_correction", "jacobian_frobenius",
           "kinetic_jacobian_field", "local_error_penalty", "spectral_radius"]


def jacobian_frobenius(
    fn: Callable,
    z: PyTree[Array],
    args: PyTree = None,
    *,
    key: PRNGKeyArray,
    num_probes: int = 1,
) -> Array:
    r"""Hutchinson estimate of $\|J_f(z)\|_F^2 / d$, $J_f = \partial f(z, \text{args})/\partial z$,
    $d$ the number of elements of $z$ (normalised per element, as Bai, Koltun & Kolter,
    "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021).

    $\|J\|_F^2 = \mathbb{E}_{\varepsilon\sim N(0, I)}\|\varepsilon^\top J\|^2$: each probe
    costs one vector–Jacobian product; no Jacobian is formed. Unbiased, relative standard
    deviation $\propto$ `num_probes`$^{-1/2}$; differentiable with respect to `z`, `args`
    and whatever `fn` closes over (evaluate it at the equilibrium $z^*$ returned by a
    solve). Under `jax.vmap` the probes are drawn per sample if `key` is split per sample.
    """
    if num_probes < 1:
        raise ValueError(f"`num_probes` must be >= 1, got {num_probes}.")
    out, vjp = jax.vjp(lambda y: fn(y, args), z)
    flat_out, unravel = ravel_pytree(out)
    flat_z, _ = ravel_pytree(z)
    eps = jr.normal(key, (num_probes,) + flat_out.shape, flat_out.dtype)

    def one(e):
        (g,) = vjp(unravel(e))
        return jnp.sum(ravel_pytree(g)[0] ** 2)

    return jnp.mean(jax.vmap(one)(eps)) / flat_z.size


def fixed_point_correction(
    fn: Callable,
    iterates: PyTree[Array],
    args: PyTree,
    loss_fn: Callable[[PyTree[Array]], Array],
    gamma: float = 0.8,
) -> Array:
    r"""Fixed-point correction (trajectory supervision, Bai, Geng, Kolter, "Deep
    Equilibrium Optical Flow Estimation", CVPR 2022): the task loss applied to one step
    of the map from each sampled solver iterate,

    $\sum_k w_k\, \ell(f(\mathrm{sg}(z_k), x)) / \sum_k w_k$, $w_k = \gamma^{K-1-k}$,

    so that intermediate iterates are pushed towards good outputs (later ones weigh
    more). `iterates` are stacked on a leading axis of size K, as returned by
    `fixed_point(..., save_iterates=...)` / `DEQ(save_iterates=...)`.
    """
    leaves = jtu.tree_leaves(iterates)
    if not leaves:
        raise ValueError("`iterates` is empty (pass `save_iterates=` to the solve).")
    k = leaves[0].shape[0]
    weights = gamma ** jnp.arange(k - 1, -1, -1, dtype=leaves[0].dtype)

    def one(z):
        return loss_fn(fn(lax.stop_gradient(z), args))

    losses = jax.vmap(one)(iterates)
    return jnp.sum(weights * losses) / jnp.sum(weights)


# --------------------------------------------------------------------------------------
# Neural ODE regularisers


def _scaled_error(y0, y1, y_error, rtol, atol):
    """RMS of the local error estimate scaled by `atol + rtol max(|y0|, |y1|)` (the
    quantity the step-size controller compares with 1; OrdinaryDiffEq's `EEst`)."""
    flat0, _ = ravel_pytree(y0)
    flat1, _ = ravel_pytree(y1)
    err, _ = ravel_pytree(y_error)
    scale = atol + rtol * jnp.maximum(jnp.abs(flat0), jnp.abs(flat1))
    ms = jnp.mean((err / scale) ** 2)
    # sqrt has an infinite slope at 0, and a zero error estimate is common (a step of
    # size 0, taken by samples that finished early under vmap): the gradient would be
    # 0 * inf = NaN. The double `where` keeps both the value and the gradient finite.
    pos = ms > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, ms, 1.0)), 0.0)


class ErrorEstimatePenalty(dfx.AbstractAdaptiveSolver, dfx.AbstractWrappedSolver):
    r"""A diffrax solver wrapper accumulating the solver-heuristic regulariser of Pal,
    Ma, Shah & Rackauckas, "Opening the Blackbox" (ICML 2021):
    $R_E = \sum_j E_j\, h_j$ over the accepted steps, $E_j$ the scaled local error
    estimate of step $j$ and $h_j$ its size.

    The running sum travels in the solver state: read it with
    `SaveAt(t1=True, solver_state=True)` as `sol.solver_state[1]`. It is differentiable
    only through a discrete adjoint (`dfx.RecursiveCheckpointAdjoint`,
    `dfx.DirectAdjoint`): other adjoints treat the solver state as constant (use
    [`implicit_kit.regularizers.local_error_penalty`][] with those).
    `ik.models.NeuralODE(error_penalty=True)` does all this.

    **Arguments:** `solver` (an adaptive diffrax solver), `rtol`, `atol` (those of the
    step-size controller).
    """

    solver: dfx.AbstractSolver
    rtol: float
    atol: float

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)

    def init(self, terms, t0, t1, y0, args):
        dtype = jnp.result_type(*jtu.tree_leaves(y0))
        return self.solver.init(terms, t0, t1, y0, args), jnp.zeros((), dtype)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner, penalty = solver_state
        y1, y_error, dense, inner, result = self.solver.step(
            terms, t0, t1, y0, args, inner, made_jump
        )
        e = _scaled_error(y0, y1, y_error, self.rtol, self.atol)
        # Rejected steps are dropped by diffrax's loop (it keeps the old solver state).
        penalty = penalty + jnp.where(jnp.isfinite(e), e * (t1 - t0), 0.0)
        return y1, y_error, dense, (inner, penalty), result


def local_error_penalty(
    vector_field: Callable,
    solver,
    t_s,
    y_s: PyTree[Array],
    args: PyTree,
    *,
    rtol: float,
    atol: float,
    t_end,
    dt=None,
) -> Array:
    r"""The local solver-heuristic regulariser of Pal, Edelman & Rackauckas, "Locally
    Regularized Neural Differential Equations" (ICML 2023): one differentiable step of
    `solver` from the state $y(t_s)$ at a sampled time $t_s$, with the initial step size
    $h$ the controller would choose (not differentiated), returning $E\,h$ ($E$ the
    scaled local error estimate). Works with any adjoint, since it needs only $y(t_s)$.

    **Arguments:** `vector_field(t, y, args)`; `solver` (adaptive diffrax solver); `t_s`,
    `y_s`; `args`; `rtol`, `atol` of the controller; `t_end` (the step is clipped to it);
    `dt`: a fixed step instead of the controller's choice.
    """
    term = dfx.ODETerm(vector_field)
    if dt is None:
        controller = dfx.PIDController(rtol=rtol, atol=atol)
        t_next, _ = controller.init(term, t_s, t_end, y_s, None, args, solver.func,
                                    solver.error_order(term))
    else:
        t_next = t_s + dt
    t_next = lax.stop_gradient(jnp.minimum(t_next, t_end))
    t_next = jnp.maximum(t_next, t_s + 1e-6 * (t_end - t_s))
    state = solver.init(term, t_s, t_next, y_s, args)
    y1, y_error, _, _, _ = solver.step(term, t_s, t_next, y_s, args, state, False)
    return _scaled_error(y_s, y1, y_error, rtol, atol) * (t_next - t_s)


def kinetic_jacobian_field(vector_field: Callable, eps: PyTree[Array] | None = None):
    r"""The RNODE augmented field (Finlay et al., "How to train your neural ODE", ICML
    2020): integrates $(y, \int\|f\|^2 dt, \int\|\varepsilon^\top \partial f/\partial y\|^2
    dt)$; the second channel is the kinetic energy, the third a Hutchinson estimate of
    the integrated squared Jacobian Frobenius norm (one VJP per evaluation; `eps`
    drawn once per solve, `None` to skip it).

    Returns `field(t, (y, kinetic, jacobian), args)` for diffrax; start the two extra
    channels at zero. Both are normalised per element of $y$.
    """

    def field(t, state, args):
        y, _, _ = state
        if eps is None:
            dy = vector_field(t, y, args)
            jac = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(y)))
        else:
            dy, vjp = jax.vjp(lambda yy: vector_field(t, yy, args), y)
            (g,) = vjp(eps)
            jac = jnp.mean(ravel_pytree(g)[0] ** 2)
        kinetic = jnp.mean(ravel_pytree(dy)[0] ** 2)
        return dy, kinetic, jac

    return field
