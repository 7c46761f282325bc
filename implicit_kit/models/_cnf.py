"""Continuous normalising flows (FFJORD) on the ODE models' solve."""

import math
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray

from .._solution import RESULTS
from ..nn import prepare
from ._base import with_ode_settings
from ._ode import call_field, ODESolve
from ._shapes import check_cell
from ._stats import ModelStats


CNF_TRACES = ("exact", "hutchinson")


def _standard_normal_log_prob(z: Array) -> Array:
    return -0.5 * (z.size * math.log(2 * math.pi) + jnp.sum(z ** 2))


class _LogDetField(eqx.Module):
    """The augmented field of FFJORD: `(f(t, y), tr ∂f/∂y)` on the state `(y, Δ)`, the
    trace exact (one VJP per dimension) or Hutchinson's `εᵀ(∂f/∂y)ε` with one fixed
    probe `ε` for the whole solve (Grathwohl et al. 2019, as diffrax's
    `docs/examples/continuous_normalising_flow.ipynb`, `exact_logp_wrapper` and
    `approx_logp_wrapper`). A diffrax term: time-dependent, args `(field_args, ε)`."""

    field: Any
    trace: str = eqx.field(static=True)

    def __call__(self, t, state, args):
        y, _ = state
        field_args, eps = args
        f, vjp = jax.vjp(lambda y: call_field(self.field, t, y, field_args), y)
        if self.trace == "exact":
            eye = jnp.eye(y.size, dtype=y.dtype).reshape((y.size,) + y.shape)
            (rows,) = jax.vmap(vjp)(eye)
            tr = jnp.trace(rows.reshape(y.size, y.size))
        else:
            (eps_j,) = vjp(eps)
            tr = jnp.sum(eps_j * eps)
        return f, tr


class CNF(eqx.Module):
    r"""A continuous normalising flow (FFJORD: Grathwohl, Chen, Bettencourt, Sutskever &
    Duvenaud, ICLR 2019): data $x = z(t_1)$ is the end of $dz/dt = f(t, z)$ from a base
    sample $z(t_0) \sim \mathcal N(0, I)$, and by the instantaneous change of variables
    $\log p(x) = \log \mathcal N(z(t_0)) - \int_{t_0}^{t_1} \operatorname{tr}
    \frac{\partial f}{\partial z}\,dt$, integrated backwards from $x$ with the state
    augmented by the log-determinant (a pytree state `(z, Δ)`).

    **Arguments:**

    - `field`: the vector field, or a sequence of them (blocks applied one after the
        other, each over `[t0, t1]`, as diffrax's CNF example's `num_blocks`); each under
        the rule of [`implicit_kit.models.ODESolve`][] (a diffrax term, `dfx.ODETerm(f)`
        with `f(t, y, args)`, or an autonomous module `g(y, args)`). The state is one
        array of any shape (a 2-D point, an image).
    - `ode`: an [`implicit_kit.models.ODESolve`][] (diffrax's example: `Tsit5()` with
        `stepsize_controller=dfx.ConstantStepSize()` and `dt0=0.05`; give `dt0` positive,
        the backward solve of `log_prob` flips its sign).
    - `trace`: `"exact"` (one VJP per dimension: small dimensions) or `"hutchinson"`
        (one VJP with a Gaussian probe drawn from `log_prob`'s `key`, fixed for the
        solve: an unbiased estimate for larger dimensions).
    - `t0`, `t1`: the interval of each block (0 and 0.5, diffrax's example).
    """

    field: Any
    ode: ODESolve = eqx.field(default_factory=ODESolve)
    trace: str = eqx.field(static=True, default="exact")
    t0: float = 0.0
    t1: float = 0.5

    def __check_init__(self):
        if self.trace not in CNF_TRACES:
            raise ValueError(f"`trace` must be one of {CNF_TRACES}, got {self.trace!r}.")
        if self.ode.error_penalty or self.ode.local_penalty:
            raise ValueError("`CNF` does not take `ode.error_penalty` / `ode.local_penalty` "
                             "(they would mix the log-determinant into the error norm).")
        if self.ode.dt0 is not None and not self.ode.dt0 > 0:
            raise ValueError(f"`ode.dt0` must be positive (the backward solve of "
                             f"`log_prob` flips it), got {self.ode.dt0}.")

    def _blocks(self, key, inference):
        fields = list(self.field) if isinstance(self.field, (list, tuple)) else [self.field]
        return [prepare(f, key=k, inference=inference) for f, k in
                zip(fields, [None] * len(fields) if key is None else
                    list(jr.split(key, len(fields))))]

    def _check(self, field, x, args):
        check_cell("CNF", "field", lambda y, a: call_field(field, self.t0, y, a), x, args)

    def with_solver(self, **settings):
        """A copy with other `ode` settings (any field of its `ODESolve`), every array
        kept: see [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        return with_ode_settings(self, settings)

    def log_prob(self, x: Array, *, args: Any = None, key: PRNGKeyArray | None = None,
                 inference: bool = False, return_stats: bool = False):
        """$\\log p(x)$ of one sample `x` (`jax.vmap` over a batch). `key`: the
        Hutchinson probe (required with `trace="hutchinson"`; also the dropout key of
        the fields, if they have any). With `return_stats=True`: `(log p, stats)`, the
        stats of all blocks' solves summed (`num_steps`, `nfe` of the augmented
        field)."""
        kp, kd = (None, None) if key is None else jr.split(key)
        if self.trace == "hutchinson":
            if key is None:
                raise ValueError("`CNF(trace='hutchinson').log_prob` needs a `key` for "
                                 "its probe.")
            eps = jr.normal(kp, jnp.shape(x), jnp.result_type(x))
        else:
            eps = None
        x = jnp.asarray(x)
        blocks = self._blocks(kd, inference)
        ode = self.ode if self.ode.dt0 is None else eqx.tree_at(
            lambda o: o.dt0, self.ode, -self.ode.dt0)
        y, delta, stats = x, jnp.zeros((), x.dtype), None
        for field in reversed(blocks):
            self._check(field, y, args)
            aug = dfx.ODETerm(_LogDetField(field, self.trace))
            (y, delta), st = ode(aug, (y, delta), (args, eps), self.t0, None, t0=self.t1)
            stats = st if stats is None else _add(stats, st)
        logp = delta + _standard_normal_log_prob(y)
        return (logp, stats) if return_stats else logp

    def sample(self, z: Array, *, args: Any = None, key: PRNGKeyArray | None = None,
               inference: bool = False, return_stats: bool = False):
        """The data point of a base sample `z` (draw `z = jr.normal(key, shape)`),
        integrating forwards through every block."""
        blocks = self._blocks(key, inference)
        stats = None
        for field in blocks:
            self._check(field, z, args)
            z, st = self.ode(field, z, args, self.t1, None, t0=self.t0)
            stats = st if stats is None else _add(stats, st)
        return (z, stats) if return_stats else z


def _add(a: ModelStats, b: ModelStats) -> ModelStats:
    """The stats of two solves in sequence: steps and evaluations add up, the outcome is
    the first failure. (A CNF's solves carry no penalties: `CNF` refuses them.)"""
    result = RESULTS.where(a.result == RESULTS.successful, b.result, a.result)
    return a.replace(num_steps=a.num_steps + b.num_steps, nfe=a.nfe + b.nfe,
                     result=result)
