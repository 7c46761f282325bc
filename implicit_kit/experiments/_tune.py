"""`implicit-kit tune`: weight decay tuned by hypergradients (one value per weight, per
weight array, or shared) against a vmapped grid search over one shared decay."""

import json
import math
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax

from ..hyper import format_table, metrics_table, tune, vmap_hparams
from ..train import ConfigError, load_data
from ..train._checkpoint import atomic_write
from ..train._step import make_optimiser
from ._config import check_tune_config, TuneConfig


def split_validation(data_cfg, dtype: str, n_val: int, seed: int, section: str):
    """The flattened images: the training split cut into a training part and `n_val`
    validation images (a permutation fixed by `seed`), and the test split."""
    (x, y), (xt, yt) = load_data(data_cfg, dtype)
    x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    if n_val >= len(x):
        raise ConfigError(f"key '{section}.validation' ({n_val}) must be smaller than the "
                          f"training split ({len(x)} images).")
    perm = np.random.default_rng(seed).permutation(len(x))
    val, tr = perm[:n_val], perm[n_val:]
    return tuple(jnp.asarray(a) for a in (x[tr], y[tr], x[val], y[val], xt, yt))


def run_tune(cfg: TuneConfig, *, log=print) -> dict:
    """Run the experiment of a `TuneConfig`; write `results.json`, `history.jsonl` and
    `tune.png` to `cfg.tune.out_dir` and return the results.

    Both arms start from the same initialisation and take the same number of inner
    optimiser steps; the grid's best decay is chosen by validation loss, and the test
    split is reported for both (tuning thousands of hyperparameters on one validation
    set can overfit it: the test columns tell).
    """
    check_tune_config(cfg)
    t = cfg.tune
    xtr, ytr, xv, yv, xt, yt = split_validation(cfg.data, t.dtype, t.validation, t.seed,
                                                "tune")
    dtype = jnp.dtype(t.dtype)
    mlp = eqx.nn.MLP(xtr.shape[1], 10, cfg.model.width, cfg.model.depth,
                     activation=jax.nn.relu, key=jr.key(t.seed))
    mlp = jtu.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, mlp)
    w0, static = eqx.partition(mlp, eqx.is_inexact_array)
    total = t.outer_steps * t.inner_steps
    optimiser = make_optimiser(cfg.optim, total)

    def ce(w, x, y):
        logits = jax.vmap(eqx.combine(w, static))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def acc(w, x, y):
        return jnp.mean(jnp.argmax(jax.vmap(eqx.combine(w, static))(x), -1) == y)

    def decay(w, h):  # ½ Σ λ_i w_i², λ = exp(h): a scalar, or one per array or weight
        ws = jtu.tree_leaves(eqx.filter(w, eqx.is_inexact_array))
        hs = jtu.tree_leaves(h)
        hs = hs * len(ws) if len(hs) == 1 else hs  # one shared decay
        return 0.5 * sum(jnp.sum(jnp.exp(hi) * wi**2) for hi, wi in zip(hs, ws))

    def inner(w, h, data):
        return ce(w, *data) + decay(w, h)

    def outer(w, h, data):
        return ce(eqx.filter(w, eqx.is_inexact_array), *data)

    def metrics(w, xtr, ytr, xv, yv, xt, yt):
        return {"train_loss": ce(w, xtr, ytr), "val_loss": ce(w, xv, yv),
                "val_acc": acc(w, xv, yv), "test_loss": ce(w, xt, yt),
                "test_acc": acc(w, xt, yt)}

    def train_shared(hp, xtr, ytr, xv, yv, xt, yt):
        h = jnp.log(hp["weight_decay"])

        def step(carry, _):
            w, s = carry
            g = jax.grad(lambda w_: inner(w_, h, (xtr, ytr)))(w)
            u, s = optimiser.update(g, s, w)
            return (optax.apply_updates(w, u), s), None

        (w, _), _ = jax.lax.scan(step, (w0, optimiser.init(w0)), None, length=total)
        return metrics(w, xtr, ytr, xv, yv, xt, yt)

    data = (xtr, ytr, xv, yv, xt, yt)
    log(f"== {cfg.name}: MLP {xtr.shape[1]}-{cfg.model.width}x{cfg.model.depth}-10, "
        f"{len(ytr)} train / {len(yv)} validation / {len(yt)} test, {total} inner "
        f"{cfg.optim.name} steps per arm")
    grid = {"weight_decay": jnp.logspace(math.log10(t.grid_min), math.log10(t.grid_max),
                                         t.grid_points, dtype=dtype)}
    t0 = time.perf_counter()
    devices = jax.devices()  # the grid is sharded over the devices when it divides
    devices = devices if t.grid_points % len(devices) == 0 else devices[:1]
    grid_metrics = jax.block_until_ready(vmap_hparams(train_shared, grid, *data,
                                                      devices=devices))
    grid_s = time.perf_counter() - t0
    rows = metrics_table(grid, grid_metrics)
    best = min(rows, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"])
               else math.inf)
    log(f"grid search ({t.grid_points} shared decays, one vmapped call, {grid_s:.1f} s "
        "with compilation):")
    log(format_table(rows))

    if t.per == "parameter":
        h0 = jtu.tree_map(lambda a: jnp.full_like(a, math.log(t.init)), w0)
    elif t.per == "tensor":
        h0 = jtu.tree_map(lambda a: jnp.asarray(math.log(t.init), dtype), w0)
    else:
        h0 = jnp.asarray(math.log(t.init), dtype)
    kw = ({"k": t.k, "alpha": t.alpha} if t.method == "neumann"
          else {"rtol": t.rtol, "atol": 0.0, "max_steps": t.max_steps})
    t0 = time.perf_counter()
    res = tune(inner, outer, mlp, h0, inner_optimizer=optimiser,
               outer_optimizer=optax.adam(t.outer_lr), num_outer=t.outer_steps,
               inner_steps=t.inner_steps, inner_args=(xtr, ytr), outer_args=(xv, yv),
               method=t.method, **kw)
    w = eqx.filter(jax.block_until_ready(res.params), eqx.is_inexact_array)
    tune_s = time.perf_counter() - t0
    tuned = {k: float(v) for k, v in metrics(w, *data).items()}
    lam = np.concatenate([np.exp(np.ravel(a)) for a in jtu.tree_leaves(res.hparams)])
    hist = {k: np.asarray(v) for k, v in res.history.items()}
    tuned.update(num_hparams=int(lam.size), lambda_min=float(lam.min()),
                 lambda_median=float(np.median(lam)), lambda_max=float(lam.max()),
                 skipped_steps=int(hist["skipped"].sum()), seconds=tune_s)
    results = {
        "name": cfg.name, "config": cfg.to_dict(),
        "grid": rows, "grid_best": best, "grid_seconds": grid_s, "tuned": tuned,
        "tuned_beats_grid": bool(tuned["val_loss"] < best["val_loss"]),
    }
    comparison = [
        {"arm": f"grid best (shared {best['weight_decay']:.3g})",
         **{k: best[k] for k in ("val_loss", "val_acc", "test_loss", "test_acc")},
         "hparams": 1},
        {"arm": f"tuned ({t.per}, {t.method})",
         **{k: tuned[k] for k in ("val_loss", "val_acc", "test_loss", "test_acc")},
         "hparams": tuned["num_hparams"]},
    ]
    log(f"tuning ({t.outer_steps} hypergradient steps, {tune_s:.1f} s with compilation; "
        f"{tuned['skipped_steps']} skipped; λ from {tuned['lambda_min']:.3g} to "
        f"{tuned['lambda_max']:.3g}, median {tuned['lambda_median']:.3g}):")
    log(format_table(comparison))
    log("tuned validation loss is " + ("below" if results["tuned_beats_grid"] else
                                        "NOT below") + " the grid's best.")
    if tuned["skipped_steps"]:
        log(f"warning: {tuned['skipped_steps']} of {t.outer_steps} hypergradient steps were "
            f"skipped because the {t.method} solve did not converge or was not finite"
            + (" (none was applied: the decay stayed at tune.init)"
               if tuned["skipped_steps"] == t.outer_steps else "")
            + "; raise tune.max_steps, loosen tune.rtol, or use tune.method=neumann.")

    out = pathlib.Path(t.out_dir)
    lines = [json.dumps({"outer_step": i + 1, **{k: v[i].item() for k, v in hist.items()}})
             for i in range(t.outer_steps)]
    atomic_write(out / "history.jsonl", ("\n".join(lines) + "\n").encode())
    atomic_write(out / "results.json", json.dumps(results, indent=1).encode())
    _plot(out / "tune.png", cfg.name, hist, rows, best, tuned)
    log(f"results, history and plot: {out.resolve()}")
    return results


def _plot(path, name, hist, rows, best, tuned) -> None:
    from matplotlib.figure import Figure  # no pyplot state, no backend switch

    fig = Figure(figsize=(9, 3.5))
    a1, a2 = fig.subplots(1, 2)
    a1.plot(np.arange(1, len(hist["outer_loss"]) + 1), hist["outer_loss"],
            label="tuned (during tuning)")
    a1.axhline(best["val_loss"], color="k", ls="--", label="grid best")
    a1.set(xlabel="hypergradient step", ylabel="validation cross-entropy",
           yscale="log", title=f"{name}: tuning")
    a1.legend()
    a2.semilogx([r["weight_decay"] for r in rows], [r["val_loss"] for r in rows],
                marker="o", label="grid (shared decay)")
    a2.axhline(tuned["val_loss"], color="C1", label="tuned")
    a2.set(xlabel="shared weight decay", ylabel="validation cross-entropy",
           yscale="log", title="grid search")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
