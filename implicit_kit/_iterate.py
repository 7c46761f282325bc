"""The one shared driver: the solver loop, per-sample masking, stats and result codes.

Every entry point (`fixed_point`, `root_find`, `minimise`, the backward solves of the
implicit adjoints) ends up in `run` below. A problem has a *kind*: `"fixed_point"`
(`fn(y) = y`) or `"root"` (`fn(y) = 0`); a solver has a *native* kind, and `native_fn`
converts between the two with `G(y) = T(y) - y`.
"""

from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from ._misc import struct_str, tree_allfinite, tree_where, zeros_like_struct
from ._solution import as_results, RESULTS
from .solvers._base import (
    AbstractImplicitSolver,
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


def _iterate(
    fn, kind, solver, y0, args, options, max_steps, trace, while_kind, checkpoints,
    save_at, check_every=1,
):
    native = solver_native_kind(solver)
    nfn = native_fn(fn, kind, native)
    f_struct, aux_struct = eqx.filter_eval_shape(nfn, y0, args)
    tags = frozenset()
    init_state = solver.init(nfn, y0, args, options, f_struct, aux_struct, tags)
    ours = isinstance(solver, AbstractImplicitSolver)
    norm = solver.norm if hasattr(solver, "norm") else optx.two_norm
    real = jnp.finfo(jnp.result_type(*jtu.tree_leaves(y0))).dtype
    dynamic_init, static_state = eqx.partition(init_state, eqx.is_array)
    # A solver whose `postprocess` reports stats read off its state (Fallback's index,
    # NewtonKrylov's linear steps, the homotopy's ODE steps) has its state frozen once a
    # sample stops (under vmap the loop runs on for the others). Other solvers' states
    # are left unmasked: their histories are large and unused after the stop.
    freeze_state = ours and (type(solver).postprocess
                             is not AbstractImplicitSolver.postprocess)
    n_trace = max_steps if trace else 0
    init_carry = (
        y0,
        dynamic_init,
        zeros_like_struct(aux_struct),
        jnp.array(0),
        jnp.array(0),
        jnp.array(False),
        RESULTS.successful,
        jnp.array(jnp.inf, real),
        jnp.full((n_trace,), jnp.nan, real),
        jtu.tree_map(lambda x: jnp.broadcast_to(x, (len(save_at),) + x.shape), y0),
        jnp.array(jnp.inf, real),
    )
    save_idx = jnp.array(save_at, dtype=int)

    def cond_fun(carry):
        _, _, _, num_steps, _, done, *_ = carry
        keep_going = jnp.invert(done)
        if max_steps is not None and while_kind == "lax":
            keep_going = keep_going & (num_steps < max_steps)
        # Unbatched under vmap (any sample still running): the body masks the stopped
        # samples itself, so JAX need not select every carried array per sample (the
        # solver histories are large and their state of a stopped sample is unused).
        return eqxi.unvmap_any(keep_going)

    def body_fun(carry):
        (y, dynamic_state, aux, num_steps, nfe, done, result, residual, residuals, saved,
         first_residual) = carry
        state = eqx.combine(static_state, dynamic_state)
        new_y, new_state, new_aux, step_nfe = step_counted(
            solver, nfn, y, args, options, state, tags
        )
        terminate, step_result = solver.terminate(nfn, y, args, options, new_state, tags)
        if ours:
            step_result = solver.result_code(step_result, new_state)
            new_residual = new_state.residual.astype(real)
        else:
            step_result = as_results(step_result)
            if trace:
                new_residual = norm(residual_fn(fn, kind)(new_y, args)).astype(real)
                step_nfe = step_nfe + 1
            else:
                new_residual = residual
        finite = tree_allfinite(new_y)
        step_result = RESULTS.where(finite, step_result, RESULTS.nonfinite)
        stop = terminate | (step_result != RESULTS.successful)
        # Per-sample semantics: a sample that has stopped keeps its value and stats.
        # (Outside vmap `done` is False here; under vmap it freezes converged samples.)
        keep = done | jnp.invert(finite)
        y = tree_where(keep, y, new_y)
        aux = tree_where(done, aux, new_aux)
        if trace:
            residuals = jnp.where(
                done, residuals, residuals.at[num_steps].set(new_residual)
            )
        if save_at:
            hit = (save_idx == num_steps + 1) & jnp.invert(done)
            saved = jtu.tree_map(
                lambda s, v: jnp.where(hit.reshape((-1,) + (1,) * v.ndim), v[None], s),
                saved,
                y,
            )
        first_residual = jnp.where(num_steps == 0, new_residual, first_residual)
        residual = jnp.where(done, residual, new_residual)
        result = RESULTS.where(done, result, step_result)
        num_steps = jnp.where(done, num_steps, num_steps + 1)
        nfe = jnp.where(done, nfe, nfe + step_nfe)
        new_dynamic, _ = eqx.partition(new_state, eqx.is_array)
        if freeze_state:  # its stats come from the state: a stopped sample's must not move
            new_dynamic = tree_where(done, dynamic_state, new_dynamic)
        return (
            y, new_dynamic, aux, num_steps, nfe, done | stop, result, residual, residuals,
            saved, first_residual,
        )

    loop_body, loop_steps = body_fun, max_steps
    if check_every > 1:
        # k solver steps per loop iteration, one loop test (one device-to-host round trip
        # on an accelerator) per k steps. A sample that has converged or reached
        # `max_steps` is frozen for the remaining sub-steps (its solver state too where
        # stats are read off it), so values, step counts and stats equal those of
        # `check_every=1`.
        def loop_body(carry):
            def sub(_, c):
                frozen = c[5]
                if max_steps is not None:
                    frozen = frozen | (c[3] >= max_steps)
                new = body_fun(c)
                # (the solver state, index 1, only where its stats come from it)
                return tuple(n if i == 1 and not freeze_state else tree_where(frozen, o, n)
                             for i, (o, n) in enumerate(zip(c, new)))

            return lax.fori_loop(0, check_every, sub, carry)

        if max_steps is not None:
            loop_steps = -(-max_steps // check_every)
    if while_kind == "lax":
        carry = lax.while_loop(cond_fun, loop_body, init_carry)
    else:
        carry = eqxi.while_loop(
            cond_fun,
            loop_body,
            init_carry,
            max_steps=loop_steps,
            kind=while_kind,
            checkpoints=checkpoints,
        )
    (y, dynamic_state, aux, num_steps, nfe, done, result, residual, residuals, saved,
     first_residual) = carry
    # A solve stopped by `max_steps` whose residual grew by DIVERGENCE_FACTOR over its
    # first step's has diverged (its last iterate is no approximation of a solution).
    diverged = residual > DIVERGENCE_FACTOR * first_residual
    result = RESULTS.where(
        jnp.invert(done) & (result == RESULTS.successful),
        RESULTS.where(diverged, RESULTS.nonlinear_divergence,
                      RESULTS.nonlinear_max_steps_reached),
        result,
    )
    final_state = eqx.combine(static_state, dynamic_state)
    y, aux, extra = solver.postprocess(
        nfn, y, aux, args, options, final_state, tags, result
    )
    if not ours and not trace:
        residual = norm(residual_fn(fn, kind)(y, args)).astype(real)
        nfe = nfe + 1
    stats = {**extra, "num_steps": num_steps, "nfe": nfe, "residual": residual}
    if trace:
        stats["residual_trace"] = residuals
    if save_at:
        # A solve that stopped before a requested step reports its final iterate there.
        late = save_idx > num_steps
        stats["iterates"] = jtu.tree_map(
            lambda s, v: jnp.where(late.reshape((-1,) + (1,) * v.ndim), v[None], s),
            saved,
            y,
        )
    return y, aux, stats, result


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
