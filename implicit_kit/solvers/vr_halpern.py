r"""Variance-reduced Halpern iteration for finite-sum root problems
$F(x) = \frac1n\sum_{i=1}^n F_i(x) = 0$ (Cai, Alacaoglu & Diakonikolas, "Variance
Reduced Halpern Iteration for Finite-Sum Monotone Inclusions", ICLR 2024, Alg. 1, the
cocoercive case)."""

import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Scalar

from .._misc import dtype_of
from ._base import AbstractRootSolver, AbstractSolverState


def finite_sum(component: Callable, n: int) -> Callable:
    """The full operator `fn(y, args) = (1/n) Σ_i component(y, args, i)` of a finite sum
    (the `fn` to pass to `ik.root_find` with `VRHalpern(component, n)`, so that the
    implicit backward pass differentiates the same operator)."""
    if n < 1:
        raise ValueError(f"`n` must be a positive number of components, got {n}.")

    def fn(y, args):
        out = jax.vmap(lambda i: component(y, args, i))(jnp.arange(n))
        return jtu.tree_map(lambda a: jnp.mean(a, axis=0), out)

    return fn


class _VRHalpernState(AbstractSolverState):
    anchor: PyTree
    count: Int[Array, ""]
    anchor_residual: Float[Array, ""]
    estimate: PyTree  # F~ at `previous`
    previous: PyTree
    key: PRNGKeyArray
    small: Bool[Array, ""]  # the last estimate passed the tolerance: refresh to verify
    exact: Bool[Array, ""]  # the estimate of the last step was a full evaluation
    residual: Float[Array, ""]
    scale: Float[Array, ""]
    nfe: Int[Array, ""]  # component evaluations


class VRHalpern(AbstractRootSolver):
    r"""Halpern's anchored iteration on $T(x) = x - \eta F(x)$ for a finite sum
    $F = \frac1n\sum_i F_i$, with $F$ replaced by the recursive variance-reduced
    (PAGE/SARAH) estimator of Cai, Alacaoglu & Diakonikolas (ICLR 2024, Alg. 1):

    $\tilde F_k = F(x_k)$ (a full pass, $n$ component evaluations) with probability
    $p$, else $\tilde F_k = \tilde F_{k-1} + \frac1b\sum_{i\in S_k}(F_i(x_k) -
    F_i(x_{k-1}))$ ($2b$ evaluations, $S_k$ uniform with replacement);
    $x_{k+1} = \beta_k a + (1-\beta_k)(x_k - \eta\tilde F_k)$, $\beta_k = 1/(k+2)$.

    For a $1/L$-cocoercive $F$ (e.g. the gradient of an $L$-smooth convex finite sum)
    and $\eta = 1/L$, $T$ is averaged, and the oracle complexity to $\|F(x)\| \le
    \epsilon$ is $\tilde O(n + \sqrt n L/\epsilon)$ with $b = \lceil\sqrt n\rceil$ and
    $p = b/(n + b)$ (the defaults), against $O(nL/\epsilon)$ for full-batch Halpern.
    As `ik.Halpern`, the anchor restarts at $x_k - \eta F(x_k)$ when an exact residual
    has fallen by `restart` since the anchor was set (linear convergence where $F$ is
    strongly monotone).

    The solver only ever stops on an exact residual: once the estimate passes the
    tolerance, the next step is a full pass, which either confirms it (and the point
    evaluated is returned: its residual is the one reported) or continues. `stats["nfe"]`
    counts **component** evaluations $F_i$ (a full pass counts $n$).

    Use it with `ik.root_find(ik.solvers.finite_sum(component, n), y0, args,
    VRHalpern(component, n, step_size=1 / L))`.

    **Arguments:**

    - `component`: `component(y, args, i) -> F_i(y)` for one integer index `i`.
    - `n`: the number of components.
    - `step_size`: $\eta$ ($1/L$ for a $1/L$-cocoercive $F$; required: no default can
        know $L$).
    - `batch`: $b$ (default $\lceil\sqrt n\rceil$); `prob`: $p$ (default $b/(n+b)$).
    - `rtol`, `atol`: stop when `norm(F(y)) <= atol + rtol * norm(y)`, `F` exact.
    - `restart`: as `ik.Halpern` (default 0.9; `None`: a fixed anchor).
    - `seed`: the seed of the component sampling.
    """

    component: Callable
    n: int = eqx.field(static=True)
    step_size: float
    batch: int | None = eqx.field(static=True, default=None)
    prob: float | None = None
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.two_norm
    counts_nfe: ClassVar[bool] = True
    restart: float | None = eqx.field(static=True, default=0.9)
    seed: int = eqx.field(static=True, default=0)

    def __check_init__(self):
        if self.n < 1:
            raise ValueError(f"`n` must be a positive number of components, got {self.n}.")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"`batch` must be positive, got {self.batch}.")
        if self.prob is not None and not 0.0 < self.prob <= 1.0:
            raise ValueError(f"`prob` must be in (0, 1], got {self.prob}.")
        if self.restart is not None and not 0.0 < self.restart < 1.0:
            raise ValueError(f"`restart` must be in (0, 1) or None, got {self.restart}.")

    @property
    def _b(self) -> int:
        return self.batch if self.batch is not None else math.ceil(math.sqrt(self.n))

    @property
    def _p(self) -> float:
        return self.prob if self.prob is not None else self._b / (self.n + self._b)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        real = jnp.finfo(dtype_of(y)).dtype
        inf = jnp.array(jnp.inf, real)
        zeros = jtu.tree_map(jnp.zeros_like, y)
        return _VRHalpernState(y, jnp.array(0), inf, zeros, y, jr.key(self.seed),
                               jnp.array(False), jnp.array(False), inf,
                               jnp.array(0.0, real), jnp.array(0))

    def _tolerance(self, residual, y):
        return jnp.isfinite(residual) & (residual <= self.atol + self.rtol * self.norm(y))

    def step(self, fn, y, args, options, state, tags):
        key, k_coin, k_idx = jr.split(state.key, 3)
        b = self._b
        refresh = (state.count == 0) | state.small | jr.bernoulli(k_coin, self._p)
        idx = jr.randint(k_idx, (b,), 0, self.n)

        def full(_):
            return fn(y, args)[0]

        def recursive(_):
            now = jax.vmap(lambda i: self.component(y, args, i))(idx)
            before = jax.vmap(lambda i: self.component(state.previous, args, i))(idx)
            return jtu.tree_map(lambda e, a, c: e + jnp.mean(a - c, axis=0),
                                state.estimate, now, before)

        est = lax.cond(refresh, full, recursive, None)
        residual = self.norm(est)
        passed = self._tolerance(residual, y)
        done = refresh & passed
        first = state.count == 0
        anchor_residual = jnp.where(first, residual, state.anchor_residual)
        ty = jtu.tree_map(lambda a, e: a - self.step_size * e, y, est)
        if self.restart is None:
            restart = jnp.array(False)
        else:
            restart = refresh & jnp.invert(first) & (
                residual <= self.restart * anchor_residual)
        anchor_residual = jnp.where(restart, residual, anchor_residual)
        beta = 1.0 / (state.count + 2.0)
        new_y = jtu.tree_map(
            lambda a, t, v: jnp.where(done, v, jnp.where(restart, t, beta * a + (1 - beta) * t)
                                      ).astype(v.dtype),
            state.anchor, ty, y)
        new_state = _VRHalpernState(
            jtu.tree_map(lambda a, t: jnp.where(restart, t, a).astype(a.dtype),
                         state.anchor, ty),
            jnp.where(restart, 0, state.count + 1),
            anchor_residual,
            est,
            y,
            key,
            passed & jnp.invert(refresh),
            refresh,
            residual,
            self.norm(y),
            state.nfe + jnp.where(refresh, self.n, 2 * b),
        )
        return new_y, new_state, None

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        # Only an exact residual (a full pass) ends the solve.
        done = state.exact & jnp.isfinite(state.residual) & (
            state.residual <= self.atol + self.rtol * state.scale)
        return done, optx.RESULTS.successful
