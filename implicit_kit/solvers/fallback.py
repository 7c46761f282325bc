from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._misc import tree_allfinite, tree_where, zeros_like_struct
from .._solution import as_results, RESULTS
from ._base import (
    AbstractFixedPointSolver,
    AbstractImplicitSolver,
    AbstractSolverState,
    init_residual,
    native_fn,
    solver_native_kind,
    step_counted,
)


class _FallbackState(AbstractSolverState):
    index: Int[Array, ""]  # the solver running now
    count: Int[Array, ""]  # its steps so far
    y0: PyTree  # where each later solver restarts
    states: tuple  # the array parts of every solver's state
    aux: PyTree
    done: Bool[Array, ""]
    exhausted: Bool[Array, ""]
    residual: Float[Array, ""]
    scale: Float[Array, ""]
    nfe: Int[Array, ""]


class Fallback(AbstractFixedPointSolver):
    """Try solvers in turn: each later solver runs only where the previous ones failed.

    A wrapper solver of the protocol (like optimistix's `BestSoFar...` wrappers), so it
    runs wherever a solver does (`ik.fixed_point`, `ik.root_find`, `optimistix.fixed_point`).
    `Fallback(Anderson(), NewtonKrylov())` runs Anderson; where it fails (its result is
    not successful, its iterate is not finite, or it has taken `max_steps` steps without
    converging), NewtonKrylov restarts from the initial guess. Under `jax.vmap` this is
    decided per sample, and a solver's steps run only while some sample uses it.
    `stats["solver_index"]` says which solver produced each result; `num_steps` and `nfe`
    add up over the solvers tried (so the entry point's `max_steps` bounds the total).
    If every solver fails, `result` is `RESULTS.fallback_exhausted`.

    **Arguments:**

    - `*solvers`: two or more forward solvers (implicit_kit's or optimistix's).
    - `max_steps`: the steps each solver may take before the next one is tried.
    """

    solvers: tuple
    max_steps: int = eqx.field(static=True)
    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    counts_nfe: ClassVar[bool] = True
    stats_from_state: ClassVar[bool] = True

    def __init__(self, *solvers, max_steps: int = 256):
        if len(solvers) < 2:
            raise ValueError(
                f"`Fallback(...)` needs at least two solvers, got {len(solvers)}."
            )
        for s in solvers:
            solver_native_kind(s)  # a clear error for anything that is not a solver
        if max_steps < 1:
            raise ValueError(f"`Fallback(max_steps=...)` must be >= 1, got {max_steps}.")
        self.solvers = tuple(solvers)
        self.max_steps = max_steps
        # Only for the protocol's fields: convergence is each solver's own test.
        self.rtol = min(getattr(s, "rtol", jnp.inf) for s in solvers)
        self.atol = min(getattr(s, "atol", jnp.inf) for s in solvers)
        self.norm = getattr(solvers[0], "norm", optx.two_norm)

    def _fns(self, fn):
        return [native_fn(fn, "fixed_point", solver_native_kind(s)) for s in self.solvers]

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        states = []
        for s, sfn in zip(self.solvers, self._fns(fn)):
            sf_struct = f_struct  # the same shapes whichever the kind
            st = s.init(sfn, y, args, options, sf_struct, aux_struct, tags)
            states.append(eqx.filter(st, eqx.is_array))
        residual, scale = init_residual(y)
        false = jnp.array(False)
        return _FallbackState(
            jnp.array(0), jnp.array(0), y, tuple(states), zeros_like_struct(aux_struct),
            false, false, residual, scale, jnp.array(0),
        )

    def step(self, fn, y, args, options, state, tags):
        fns = self._fns(fn)
        new_y, aux, nfe = y, state.aux, jnp.array(0)
        states = list(state.states)
        done_i, ok_i, residual = jnp.array(False), jnp.array(True), state.residual
        for i, (s, sfn) in enumerate(zip(self.solvers, fns)):
            active = state.index == i
            init_static = eqx.filter(
                s.init(sfn, y, args, options, jax.eval_shape(lambda: y),
                       jax.eval_shape(lambda: state.aux), tags),
                eqx.is_array, inverse=True,
            )

            def run(operands, s=s, sfn=sfn, init_static=init_static):
                y, dyn = operands
                st = eqx.combine(dyn, init_static)
                y1, st1, aux1, n = step_counted(s, sfn, y, args, options, st, tags)
                done, result = s.terminate(sfn, y1, args, options, st1, tags)
                ok = as_results(result) == RESULTS.successful
                if isinstance(s, AbstractImplicitSolver):
                    res = st1.residual.astype(state.residual.dtype)
                else:  # evaluate the residual (one more evaluation)
                    g = native_fn(fn, "fixed_point", "root")(y1, args)[0]
                    res = self.norm(g).astype(state.residual.dtype)
                    n = n + 1
                return (y1, eqx.filter(st1, eqx.is_array), aux1, jnp.asarray(n), done, ok,
                        res)

            def skip(operands):
                y, dyn = operands
                return (y, dyn, state.aux, jnp.array(0), jnp.array(False),
                        jnp.array(True), state.residual)

            out = lax.cond(eqxi.unvmap_any(active), run, skip, (y, states[i]))
            y1, dyn1, aux1, n1, d1, ok1, res1 = out
            new_y = tree_where(active, y1, new_y)
            states[i] = tree_where(active, dyn1, states[i])
            aux = tree_where(active, aux1, aux)
            nfe = jnp.where(active, n1, nfe)
            done_i = jnp.where(active, d1, done_i)
            ok_i = jnp.where(active, ok1, ok_i)
            residual = jnp.where(active, res1, residual)
        count = state.count + 1
        failed = jnp.invert(ok_i) | jnp.invert(tree_allfinite(new_y)) | (
            jnp.invert(done_i) & (count >= self.max_steps)
        )
        last = state.index == len(self.solvers) - 1
        switch = failed & jnp.invert(last)
        new_y = tree_where(switch, state.y0, new_y)
        new_state = _FallbackState(
            index=jnp.where(switch, state.index + 1, state.index),
            count=jnp.where(switch, 0, count),
            y0=state.y0,
            states=tuple(states),
            aux=aux,
            done=done_i & ok_i & jnp.invert(failed),
            exhausted=failed & last,
            residual=residual,
            scale=self.norm(y).astype(state.scale.dtype),
            nfe=state.nfe + nfe,
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        result = optx.RESULTS.where(
            state.exhausted, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        return state.done | state.exhausted, result

    def result_code(self, result, state) -> RESULTS:
        return RESULTS.where(
            state.exhausted, RESULTS.fallback_exhausted, as_results(result)
        )

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {"solver_index": state.index}

