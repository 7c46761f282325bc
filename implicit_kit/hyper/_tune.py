"""Online hyperparameter tuning (Lorraine et al.'s alternation) and training over a
batch of hyperparameters in one compiled call, the batch spread over devices."""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .._misc import keep_if, tree_allfinite
from .._solution import RESULTS
from ._hypergradient import hypergradient


class TuneResult(eqx.Module):
    """`params`, `hparams` after tuning; `history`: per outer step `inner_loss`,
    `outer_loss`, `hypergrad_norm`, `residual` (of the inverse-HVP), `solve_failed`
    (its `result` was not `ik.RESULTS.successful`), and `skipped` (the hyperparameter
    step was not applied: the solve failed or the hypergradient was not finite)."""

    params: Any
    hparams: Any
    history: dict


def tune(inner_loss, outer_loss, params, hparams, *, inner_optimizer, outer_optimizer,
         num_outer: int, inner_steps: int = 10, inner_args=None, outer_args=None,
         method: str = "neumann", **hypergradient_kwargs) -> TuneResult:
    """Alternate `inner_steps` optax steps of `inner_optimizer` on
    `inner_loss(params, hparams, inner_args)` with one `outer_optimizer` step on the
    hyperparameters along [`implicit_kit.hyper.hypergradient`][] of
    `outer_loss(params, hparams, outer_args)` (Lorraine, Vicol & Duvenaud 2020,
    Algorithm 1), `num_outer` times — one jit-compiled `lax.scan`.

    `params` may be any pytree or Equinox model (only its floating arrays are trained);
    `hypergradient_kwargs` go to `hypergradient` (`k`, `alpha`, `rtol`, ...; `throw`
    defaults to False here: a failed solve is recorded in `history["solve_failed"]` and its
    hyperparameter step is skipped, `history["skipped"]`).
    """
    if num_outer < 1 or inner_steps < 0:
        raise ValueError(
            f"`num_outer` must be >= 1 and `inner_steps` >= 0, got {num_outer}, "
            f"{inner_steps}."
        )
    hypergradient_kwargs.setdefault("throw", False)
    w, static = eqx.partition(params, eqx.is_inexact_array)
    hparams = jtu.tree_map(jnp.asarray, hparams)

    @eqx.filter_jit
    def run(w, hparams, inner_args, outer_args):
        def lt(w_, h_):
            return inner_loss(eqx.combine(w_, static), h_, inner_args)

        def outer_step(carry, _):
            w_, inner_state, h_, outer_state = carry

            def inner_step(c, _):
                w2, s = c
                g = jax.grad(lt)(w2, h_)
                upd, s = inner_optimizer.update(g, s, w2)
                return (optax.apply_updates(w2, upd), s), None

            (w_, inner_state), _ = lax.scan(inner_step, (w_, inner_state), None,
                                            length=inner_steps)
            g, st = hypergradient(
                inner_loss, outer_loss, eqx.combine(w_, static), h_,
                inner_args=inner_args, outer_args=outer_args, method=method,
                return_stats=True, **hypergradient_kwargs,
            )
            upd, new_state = outer_optimizer.update(g, outer_state, h_)
            h_new = optax.apply_updates(h_, upd)
            # A failed inverse-HVP (NaN, or not converged) is never applied: the step is
            # skipped and recorded, so one bad solve cannot poison the hyperparameters.
            ok = (st["result"] == RESULTS.successful) & tree_allfinite(g)
            h_new, outer_state = keep_if(ok, (h_new, new_state), (h_, outer_state))
            row = {
                "inner_loss": lt(w_, h_),
                "outer_loss": outer_loss(eqx.combine(w_, static), h_, outer_args),
                "hypergrad_norm": jnp.sqrt(sum(jnp.sum(jnp.abs(a) ** 2)
                                               for a in jtu.tree_leaves(g))),
                "residual": st["residual"],
                "solve_failed": st["result"] != RESULTS.successful,
                "skipped": ~ok,
            }
            return (w_, inner_state, h_new, outer_state), row

        carry = (w, inner_optimizer.init(w), hparams, outer_optimizer.init(hparams))
        (w, _, hparams, _), history = lax.scan(outer_step, carry, None, length=num_outer)
        return w, hparams, history

    w, hparams, history = run(w, hparams, inner_args, outer_args)
    return TuneResult(eqx.combine(w, static), hparams, history)


def vmap_hparams(fn, hparams_batch, *args, devices=None):
    """`fn(hparams, *args)` for every entry along the leading axis of `hparams_batch`
    (a pytree of arrays, e.g. `{"weight_decay": (K,), "lr": (K,)}`), as one compiled,
    vmapped call; the hyperparameter axis is sharded over `devices` (default: all
    visible ones; K must be divisible by their number), `args` are replicated.

    Everything `fn` varies must be an argument: learning rates, weight decay, damping,
    solver tolerances given as arrays trace as data, so one compilation serves every K.
    """
    leaves = jtu.tree_leaves(hparams_batch)
    if not leaves:
        raise ValueError("`hparams_batch` has no arrays.")
    k = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
    if k is None or any(jnp.ndim(a) == 0 or jnp.shape(a)[0] != k for a in leaves):
        raise ValueError(
            "every leaf of `hparams_batch` needs the same leading (hyperparameter) axis; "
            f"got shapes {[jnp.shape(a) for a in leaves]}."
        )
    devices = list(jax.devices() if devices is None else devices)
    if k % len(devices):
        raise ValueError(
            f"the {k} hyperparameter settings must divide evenly over the {len(devices)} "
            "devices (pass `devices=` to use fewer)."
        )
    mesh = Mesh(np.array(devices), ("hparams",))
    hparams_batch = jax.device_put(hparams_batch, NamedSharding(mesh, P("hparams")))
    args = jax.device_put(args, NamedSharding(mesh, P()))
    return _vmapped(fn, len(args))(hparams_batch, *args)


@functools.lru_cache(maxsize=64)
def _vmapped(fn, nargs):  # cached: repeated calls with the same `fn` do not recompile
    return eqx.filter_jit(jax.vmap(fn, in_axes=(0,) + (None,) * nargs))


def metrics_table(hparams_batch, metrics) -> list[dict]:
    """One row per hyperparameter setting: its values and its metrics (scalars per
    setting), as a list of dicts (print it with `format_table`)."""
    flat_h = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
              for path, v in jtu.tree_flatten_with_path(hparams_batch)[0]}
    flat_m = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
              for path, v in jtu.tree_flatten_with_path(metrics)[0]}
    cols = {**{k or "hparam": np.asarray(v) for k, v in flat_h.items()},
            **{k or "metric": np.asarray(v) for k, v in flat_m.items()}}
    n = len(next(iter(cols.values())))
    return [{c: v[i].item() if v[i].size == 1 else v[i].tolist() for c, v in cols.items()}
            for i in range(n)]


def format_table(rows: list[dict], formats: dict[str, str] | None = None) -> str:
    """Plain-text table of dict rows (`metrics_table`'s, or a training summary's);
    `formats` maps a column to a format spec (default `.6g` for floats)."""
    if not rows:
        return ""
    formats = {} if formats is None else formats
    cols = list(rows[0])

    def cell(c, v):
        if isinstance(v, float) and v != v:
            return "nan"
        if c in formats and isinstance(v, (int, float)) and not isinstance(v, bool):
            return format(v, formats[c])
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    fmt = [[cell(c, r[c]) for c in cols] for r in rows]
    w = [max(len(c), *(len(f[i]) for f in fmt)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(x) for c, x in zip(cols, w)),
             "  ".join("-" * x for x in w)]
    lines += ["  ".join(f[i].ljust(w[i]) for i in range(len(cols))) for f in fmt]
    return "\n".join(lines)
