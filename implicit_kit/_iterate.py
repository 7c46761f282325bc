"""The one shared driver: the solver loop, per-sample masking, stats and result codes.

Every entry point (`fixed_point`, `root_find`, `minimise`, the backward solves of the
implicit adjoints) ends up in `run` below. A problem has a *kind*: `"fixed_point"`
(`fn(y) = y`) or `"root"` (`fn(y) = 0`); a solver has a *native* kind, and `native_fn`
converts between the two with `G(y) = T(y) - y`.
"""

import dataclasses
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, PyTree

from ._misc import struct_str, tree_allfinite, tree_where, zeros_like_struct
from ._solution import as_results, RESULTS
from .solvers._base import (
    AbstractImplicitSolver,
    check_solver_state,
    KINDS,
    native_fn,
    solver_native_kind,
    step_counted,
)


# See `_iterate`: how much a solve stopped by `max_steps` must have grown its residual
# to count as diverged (`RESULTS.nonlinear_divergence`) rather than unconverged.
DIVERGENCE_FACTOR = 1e6


def residual_fn(fn, kind: str):
    """`y, args -> G(y)`: the residual whose norm is reported."""
    g = native_fn(fn, kind, "root")
    return lambda y, args: g(y, args)[0]


class _Carry(eqx.Module):
    """The driver's loop state, one value per sample under vmap."""

    y: PyTree  # the iterate (frozen once its sample stops or goes non-finite)
    state: PyTree  # the array part of the solver's state
    aux: PyTree
    num_steps: Array
    nfe: Array
    done: Array  # this sample has stopped (converged or failed)
    result: RESULTS
    residual: Array  # the residual norm of the last step taken
    residuals: Array  # `residual` after every step (`trace=True`), else empty
    saved: PyTree  # the iterates after the steps in `save_at`, stacked
    first_residual: Array  # the residual of the first step (to tell divergence)


class _Loop(eqx.Module):
    """One solve's fixed ingredients: what `_step` and `_finish` need besides the carry."""

    fn: Any  # the problem's function, of kind `kind`
    kind: str = eqx.field(static=True)
    nfn: Any  # `fn` rewritten for the solver's native kind
    solver: Any
    args: PyTree
    options: dict
    static_state: Any
    real: Any = eqx.field(static=True)  # the real dtype of the residuals
    trace: bool = eqx.field(static=True)
    save_at: tuple[int, ...] = eqx.field(static=True)
    max_steps: int | None = eqx.field(static=True)

    @property
    def ours(self) -> bool:
        return isinstance(self.solver, AbstractImplicitSolver)

    @property
    def freeze_state(self) -> bool:
        # A solver whose `postprocess` reports stats read off its state (Fallback's index,
        # NewtonKrylov's linear steps, the homotopy's ODE steps) has its state frozen once
        # a sample stops (under vmap the loop runs on for the others). Other solvers'
        # states are left unmasked: their histories are large and unused after the stop.
        return self.ours and self.solver.stats_from_state

    @property
    def norm(self):
        return self.solver.norm if hasattr(self.solver, "norm") else optx.two_norm


def _init(loop: _Loop, y0, dynamic_init, aux_struct) -> _Carry:
    n_trace = loop.max_steps if loop.trace else 0
    inf = jnp.array(jnp.inf, loop.real)
    return _Carry(
        y=y0,
        state=dynamic_init,
        aux=zeros_like_struct(aux_struct),
        num_steps=jnp.array(0),
        nfe=jnp.array(0),
        done=jnp.array(False),
        result=RESULTS.successful,
        residual=inf,
        residuals=jnp.full((n_trace,), jnp.nan, loop.real),
        saved=jtu.tree_map(
            lambda x: jnp.broadcast_to(x, (len(loop.save_at),) + x.shape), y0
        ),
        first_residual=inf,
    )


def _step(loop: _Loop, c: _Carry) -> _Carry:
    """One solver step, with per-sample semantics: a sample that has stopped keeps its
    value and stats (outside vmap `done` is False here; under vmap it freezes the samples
    that have stopped)."""
    solver, tags = loop.solver, frozenset()
    state = eqx.combine(loop.static_state, c.state)
    new_y, new_state, new_aux, step_nfe = step_counted(
        solver, loop.nfn, c.y, loop.args, loop.options, state, tags
    )
    terminate, step_result = solver.terminate(
        loop.nfn, c.y, loop.args, loop.options, new_state, tags
    )
    if loop.ours:
        step_result = solver.result_code(step_result, new_state)
        new_residual = new_state.residual.astype(loop.real)
    else:
        step_result = as_results(step_result)
        if loop.trace:
            new_residual = loop.norm(residual_fn(loop.fn, loop.kind)(new_y, loop.args))
            new_residual = new_residual.astype(loop.real)
            step_nfe = step_nfe + 1
        else:
            new_residual = c.residual
    finite = tree_allfinite(new_y)
    step_result = RESULTS.where(finite, step_result, RESULTS.nonfinite)
    stop = terminate | (step_result != RESULTS.successful)
    done = c.done
    y = tree_where(done | jnp.invert(finite), c.y, new_y)
    residuals, saved = c.residuals, c.saved
    if loop.trace:
        residuals = jnp.where(done, residuals, residuals.at[c.num_steps].set(new_residual))
    if loop.save_at:
        hit = (jnp.array(loop.save_at, dtype=int) == c.num_steps + 1) & jnp.invert(done)
        saved = jtu.tree_map(
            lambda s, v: jnp.where(hit.reshape((-1,) + (1,) * v.ndim), v[None], s),
            saved,
            y,
        )
    new_dynamic, _ = eqx.partition(new_state, eqx.is_array)
    if loop.freeze_state:  # its stats come from the state: a stopped sample's must not move
        new_dynamic = tree_where(done, c.state, new_dynamic)
    return _Carry(
        y=y,
        state=new_dynamic,
        aux=tree_where(done, c.aux, new_aux),
        num_steps=jnp.where(done, c.num_steps, c.num_steps + 1),
        nfe=jnp.where(done, c.nfe, c.nfe + step_nfe),
        done=done | stop,
        result=RESULTS.where(done, c.result, step_result),
        residual=jnp.where(done, c.residual, new_residual),
        residuals=residuals,
        saved=saved,
        first_residual=jnp.where(c.num_steps == 0, new_residual, c.first_residual),
    )


def _steps(loop: _Loop, check_every: int):
    """The loop body: `check_every` solver steps per loop test (one device-to-host round
    trip on an accelerator per `check_every` steps). A sample that has converged or
    reached `max_steps` is frozen for the remaining sub-steps (its solver state too where
    stats are read off it), so values, step counts and stats equal those of
    `check_every=1`."""
    if check_every == 1:
        return lambda c: _step(loop, c)

    def sub(_, c: _Carry) -> _Carry:
        frozen = c.done
        if loop.max_steps is not None:
            frozen = frozen | (c.num_steps >= loop.max_steps)
        new = _step(loop, c)
        kept = tree_where(frozen, c, new)
        # (the solver state only where its stats come from it)
        return kept if loop.freeze_state else dataclasses.replace(kept, state=new.state)

    return lambda c: lax.fori_loop(0, check_every, sub, c)


def _finish(loop: _Loop, c: _Carry):
    """`(y, aux, stats, result)` from the final carry."""
    # A solve stopped by `max_steps` whose residual grew by DIVERGENCE_FACTOR over its
    # first step's has diverged (its last iterate is no approximation of a solution).
    diverged = c.residual > DIVERGENCE_FACTOR * c.first_residual
    result = RESULTS.where(
        jnp.invert(c.done) & (c.result == RESULTS.successful),
        RESULTS.where(diverged, RESULTS.nonlinear_divergence,
                      RESULTS.nonlinear_max_steps_reached),
        c.result,
    )
    final_state = eqx.combine(loop.static_state, c.state)
    y, aux, extra = loop.solver.postprocess(
        loop.nfn, c.y, c.aux, loop.args, loop.options, final_state, frozenset(), result
    )
    # A solver that returns another iterate than the last (`BestSoFar`) reports its
    # residual in its stats.
    extra = dict(extra)
    residual, nfe = extra.pop("residual", c.residual), c.nfe
    if not loop.ours and not loop.trace:
        residual = loop.norm(residual_fn(loop.fn, loop.kind)(y, loop.args)).astype(loop.real)
        nfe = nfe + 1
    stats = {**extra, "num_steps": c.num_steps, "nfe": nfe, "residual": residual}
    if loop.trace:
        stats["residual_trace"] = c.residuals
    if loop.save_at:
        # A solve that stopped before a requested step reports its final iterate there.
        late = jnp.array(loop.save_at, dtype=int) > c.num_steps
        stats["iterates"] = jtu.tree_map(
            lambda s, v: jnp.where(late.reshape((-1,) + (1,) * v.ndim), v[None], s),
            c.saved,
            y,
        )
    return y, aux, stats, result


def _iterate(
    fn, kind, solver, y0, args, options, max_steps, trace, while_kind, checkpoints,
    save_at, check_every=1,
):
    nfn = native_fn(fn, kind, solver_native_kind(solver))
    f_struct, aux_struct = eqx.filter_eval_shape(nfn, y0, args)
    init_state = solver.init(nfn, y0, args, options, f_struct, aux_struct, frozenset())
    check_solver_state(solver, init_state)
    dynamic_init, static_state = eqx.partition(init_state, eqx.is_array)
    loop = _Loop(
        fn=fn, kind=kind, nfn=nfn, solver=solver, args=args, options=options,
        static_state=static_state,
        real=jnp.finfo(jnp.result_type(*jtu.tree_leaves(y0))).dtype,
        trace=trace, save_at=save_at, max_steps=max_steps,
    )

    def cond_fun(c: _Carry):
        keep_going = jnp.invert(c.done)
        if max_steps is not None and while_kind == "lax":
            keep_going = keep_going & (c.num_steps < max_steps)
        # Unbatched under vmap (any sample still running): the body masks the stopped
        # samples itself, so JAX need not select every carried array per sample (the
        # solver histories are large and their state of a stopped sample is unused).
        return eqxi.unvmap_any(keep_going)

    body = _steps(loop, check_every)
    init = _init(loop, y0, dynamic_init, aux_struct)
    if while_kind == "lax":
        carry = lax.while_loop(cond_fun, body, init)
    else:
        loop_steps = max_steps
        if check_every > 1 and max_steps is not None:
            loop_steps = -(-max_steps // check_every)
        carry = eqxi.while_loop(
            cond_fun, body, init, max_steps=loop_steps, kind=while_kind,
            checkpoints=checkpoints,
        )
    return _finish(loop, carry)


def run(
    fn,
    kind: str,
    solver,
    y0,
    args,
    options: dict[str, Any] | None = None,
    *,
    max_steps: int | None,
    trace: bool = False,
    while_kind: str = "lax",
    checkpoints: int | None = None,
    save_at: tuple[int, ...] = (),
    check_every: int = 1,
):
    """Solve without any autodiff rewrite: returns `(y, aux, stats, result)`.

    `stats` holds `num_steps`, `nfe`, `residual` (and `residual_trace` when `trace`; `iterates`,
    the iterates after the steps listed in `save_at`, stacked on a leading axis, when
    `save_at` is not empty), per sample under vmap.
    """
    check_max_steps(max_steps)
    save_at = tuple(int(i) for i in save_at)
    if any(i < 0 for i in save_at):
        raise ValueError(f"`save_iterates` must list step numbers >= 0, got {save_at}.")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if trace and max_steps is None:
        raise ValueError("`trace=True` needs an integer `max_steps`.")
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"`check_every` must be a positive integer, got {check_every!r}.")
    options = {} if options is None else options
    return _iterate(
        fn, kind, solver, y0, args, options, max_steps, trace, while_kind, checkpoints,
        save_at, check_every,
    )


def check_max_steps(max_steps, name: str = "max_steps") -> None:
    """Raise a `ValueError` naming `name` unless it is `None` or an integer in
    [1, 2**31 - 1] (the driver counts steps in int32)."""
    if max_steps is None:
        return
    if (not isinstance(max_steps, int) or isinstance(max_steps, bool)
            or not 1 <= max_steps <= 2**31 - 1):
        raise ValueError(
            f"`{name}` must be None or an integer in [1, 2**31 - 1], got {max_steps!r}."
        )


def check_structure(fn, y0, args, name: str = "fn"):
    """Raise a `ValueError` at trace time if `fn(y0, args)` does not match `y0`."""
    out_struct, _ = eqx.filter_eval_shape(fn, y0, args)
    in_struct = jax.eval_shape(lambda: y0)
    same_tree = jtu.tree_structure(out_struct) == jtu.tree_structure(in_struct)
    same_shapes = same_tree and all(
        a.shape == b.shape
        for a, b in zip(jtu.tree_leaves(out_struct), jtu.tree_leaves(in_struct))
    )
    if not same_shapes:
        raise ValueError(
            f"`{name}(y0, args)` must return a pytree with the same structure and shapes "
            f"as `y0`; got `{name}(y0, args)` = {struct_str(out_struct)} but "
            f"`y0` = {struct_str(in_struct)}."
        )
    return out_struct
