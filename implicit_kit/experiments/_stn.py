"""`implicit-kit stn`: dropout rates and weight decay tuned by Self-Tuning Networks
(MacKay et al. 2019) against the best of a vmapped grid and against hypergradient tuning
of the decay, at the same budget of training steps, over several seeds; then a model
retrained from scratch with the schedule STN discovered."""

import itertools
import json
import math
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ..hyper import format_table, stn, StnLinear, tune, vmap_hparams
from ..train._checkpoint import atomic_write
from ..train._step import make_optimiser
from ._config import check_stn_config, StnConfig
from ._tune import split_validation


HPARAMS = ("dropout_in", "dropout_hidden", "weight_decay")
METRICS = ("val_loss", "val_acc", "test_loss", "test_acc")


def _values(h):
    """Unconstrained hyperparameters `(..., 3)` to (input rate, hidden rate, decay)."""
    return jax.nn.sigmoid(h[..., 0]), jax.nn.sigmoid(h[..., 1]), jnp.exp(h[..., 2])


def _unconstrained(p_in, p_hid, wd):
    return np.array([math.log(p_in / (1 - p_in)), math.log(p_hid / (1 - p_hid)),
                     math.log(wd)])


def _mlp(sizes, key, dtype, hyper: bool):
    keys = jr.split(key, len(sizes) - 1)
    layers = [StnLinear(a, b, len(HPARAMS), key=k) if hyper else eqx.nn.Linear(a, b, key=k)
              for a, b, k in zip(sizes[:-1], sizes[1:], keys)]
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, layers)


def _dropout(x, rate, key):
    keep = jr.bernoulli(key, 1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0)


def _apply(layers, x, h, rates, key):
    """One example through the MLP: `h` is the hypernetwork input (STN layers) or None,
    `rates` (input, hidden) dropout rates or None (no dropout)."""
    def linear(layer, x):
        return layer(x, h) if isinstance(layer, StnLinear) else layer(x)

    keys = None if rates is None else jr.split(key, len(layers))
    if rates is not None:
        x = _dropout(x, rates[0], keys[0])
    for i, layer in enumerate(layers[:-1]):
        x = jax.nn.relu(linear(layer, x))
        if rates is not None:
            x = _dropout(x, rates[1], keys[i + 1])
    return linear(layers[-1], x)


def _squares(layers):
    """Σ‖W‖² over the weight matrices (the STN layers' elementary and hyper weights)."""
    mats = [m for layer in layers for m in
            ((layer.elem_weight, layer.hyper_weight) if isinstance(layer, StnLinear)
             else (layer.weight,))]
    return sum(jnp.sum(m ** 2) for m in mats)


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _metrics(layers, h, xv, yv, xt, yt):
    def logits(x):
        return jax.vmap(lambda xi: _apply(layers, xi, h, None, None))(x)

    lv, lt = logits(xv), logits(xt)
    return {"val_loss": _ce(lv, yv), "val_acc": jnp.mean(jnp.argmax(lv, -1) == yv),
            "test_loss": _ce(lt, yt), "test_acc": jnp.mean(jnp.argmax(lt, -1) == yt)}


def _summary(rows):
    return {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))]
            for k in METRICS}


def run_stn(cfg: StnConfig, *, log=print) -> dict:
    """Run the experiment of a `StnConfig` (see `StnSettings`), write `results.json` and
    `stn.png` to `cfg.stn.out_dir` and return the results: per seed and arm the
    validation and test loss and accuracy, and their mean and standard deviation."""
    check_stn_config(cfg)
    t = cfg.stn
    dtype = jnp.dtype(t.dtype)
    xtr, ytr, xv, yv, xt, yt = split_validation(cfg.data, t.dtype, t.validation, t.seed,
                                                "stn")
    sizes = [xtr.shape[1]] + [cfg.model.width] * cfg.model.depth + [10]
    total = t.outer_steps * t.train_steps
    optimiser = make_optimiser(cfg.optim, total)
    init = jnp.asarray(_unconstrained(t.dropout_in, t.dropout_hidden, t.weight_decay),
                       dtype)
    log(f"== {cfg.name}: MLP {'-'.join(map(str, sizes))}, {len(ytr)} train / {len(yv)} "
        f"validation / {len(yt)} test, {total} full-batch {cfg.optim.name} steps per arm, "
        f"{t.seeds} seeds")

    def train_plain(schedule, key, layers):
        """Train the plain MLP with per-step (input rate, hidden rate, decay)."""
        w0, static = eqx.partition(layers, eqx.is_inexact_array)

        def step(carry, inputs):
            w, s = carry
            (p_in, p_hid, wd), k = inputs

            def loss(w):
                net = eqx.combine(w, static)
                keys = jr.split(k, len(xtr))
                logits = jax.vmap(lambda xi, ki: _apply(net, xi, None, (p_in, p_hid), ki))(
                    xtr, keys)
                return _ce(logits, ytr) + 0.5 * wd * _squares(net)

            u, s = optimiser.update(jax.grad(loss)(w), s, w)
            return (optax.apply_updates(w, u), s), None

        (w, _), _ = jax.lax.scan(step, (w0, optimiser.init(w0)),
                                 (schedule, jr.split(key, total)))
        return _metrics(eqx.combine(w, static), None, xv, yv, xt, yt)

    train_plain_jit = eqx.filter_jit(train_plain)

    def grid_arm(hp, key, layers):
        values = tuple(jnp.full((total,), hp[name], dtype) for name in HPARAMS)
        return train_plain(values, key, layers)

    rates = np.linspace(0.0, t.dropout_max, t.grid_points)
    decays = np.logspace(math.log10(t.wd_min), math.log10(t.wd_max), t.grid_points)
    combos = list(itertools.product(rates, rates, decays))
    grid = {name: jnp.asarray([c[i] for c in combos], dtype)
            for i, name in enumerate(HPARAMS)}
    devices = jax.devices()
    devices = devices if len(combos) % len(devices) == 0 else devices[:1]

    def train_loss(net, h, x, y, key):
        p_in, p_hid, wd = _values(h)
        keys = jr.split(key, x.shape[0])
        logits = jax.vmap(lambda xi, hi, a, b, ki: _apply(net, xi, hi, (a, b), ki))(
            x, h, p_in, p_hid, keys)
        return _ce(logits, y) + 0.5 * jnp.mean(wd) * _squares(net)

    def val_loss(net, h, x, y):
        return _ce(jax.vmap(lambda xi, hi: _apply(net, xi, hi, None, None))(x, h), y)

    n_decays = len(sizes) - 1

    def tune_inner(net, h, data):
        x, y = data
        logits = jax.vmap(lambda xi: _apply(net, xi, None, None, None))(x)
        return _ce(logits, y) + 0.5 * sum(jnp.exp(hi) * jnp.sum(layer.weight ** 2)
                                          for hi, layer in zip(h, net))

    def tune_outer(net, h, data):
        x, y = data
        return _ce(jax.vmap(lambda xi: _apply(net, xi, None, None, None))(x), y)

    per_seed, grids, schedules = [], [], []
    timings = {"grid": [], "hypergradient": [], "stn": []}
    for i in range(t.seeds):
        seed = t.seed + i
        k_plain, k_hyper, k_grid, k_stn, k_retrain = jr.split(jr.key(seed), 5)
        plain = _mlp(sizes, k_plain, dtype, hyper=False)
        rows = {}

        t0 = time.perf_counter()
        grid_metrics = jax.block_until_ready(vmap_hparams(
            grid_arm, grid, k_grid, plain, devices=devices))
        timings["grid"].append(time.perf_counter() - t0)
        grid_rows = [{**dict(zip(HPARAMS, map(float, c))),
                      **{k: float(v[j]) for k, v in grid_metrics.items()}}
                     for j, c in enumerate(combos)]
        best = min(grid_rows, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"])
                   else math.inf)
        rows["grid best"] = best
        grids.append(grid_rows)

        t0 = time.perf_counter()
        h0 = [jnp.asarray(math.log(t.weight_decay), dtype)] * n_decays
        res = tune(tune_inner, tune_outer, plain, h0, inner_optimizer=optimiser,
                   outer_optimizer=optax.adam(t.tune_lr),
                   num_outer=total // t.tune_inner_steps, inner_steps=t.tune_inner_steps,
                   inner_args=(xtr, ytr), outer_args=(xv, yv), method="neumann",
                   k=t.tune_k, alpha=t.tune_alpha)
        tuned = {k: float(v) for k, v in _metrics(res.params, None, xv, yv, xt, yt).items()}
        timings["hypergradient"].append(time.perf_counter() - t0)
        tuned["weight_decay"] = [float(jnp.exp(h)) for h in res.hparams]
        tuned["skipped_steps"] = int(np.sum(res.history["skipped"]))
        rows["hypergradient"] = tuned

        t0 = time.perf_counter()
        out = stn(train_loss, val_loss, _mlp(sizes, k_stn, dtype, hyper=True), init,
                  key=k_stn, train_data=(xtr, ytr), val_data=(xv, yv),
                  optimizer=optimiser, hparam_optimizer=optax.adam(t.hparam_lr),
                  num_outer=t.outer_steps, train_steps=t.train_steps,
                  val_steps=t.val_steps, scale=t.scale, tune_scales=t.tune_scales,
                  entropy_weight=t.entropy_weight, warmup=t.warmup)
        final = _metrics(out.params, out.hparams, xv, yv, xt, yt)
        timings["stn"].append(time.perf_counter() - t0)
        lam = np.asarray(out.history["hparams"])
        # the hyperparameters each round trained at: the initial ones, then each round's
        before = np.concatenate([np.asarray(init)[None], lam[:-1]])
        sched = np.stack(_values(jnp.asarray(before)), -1)  # (outer_steps, 3)
        schedules.append({"values": sched.tolist(),
                          "val_loss": np.asarray(out.history["val_loss"]).tolist(),
                          "scale": np.asarray(out.history["scale"]).tolist()})
        final_values = [float(v) for v in _values(out.hparams)]
        rows["STN"] = {**{k: float(v) for k, v in final.items()},
                       **dict(zip(HPARAMS, final_values))}

        per_step = jnp.asarray(np.repeat(sched, t.train_steps, axis=0), dtype)
        rows["retrained, STN schedule"] = {k: float(v) for k, v in train_plain_jit(
            tuple(per_step.T), k_retrain, plain).items()}
        fixed = tuple(jnp.full((total,), v, dtype) for v in final_values)
        rows["retrained, STN final values"] = {
            **{k: float(v) for k, v in train_plain_jit(fixed, k_retrain, plain).items()},
            **dict(zip(HPARAMS, final_values))}
        per_seed.append(rows)
        log(f"seed {seed}: grid best {best['val_loss']:.4f} "
            f"(p_in {best['dropout_in']:.2f}, p_hid {best['dropout_hidden']:.2f}, "
            f"wd {best['weight_decay']:.2g}); hypergradient {tuned['val_loss']:.4f}; STN "
            f"{rows['STN']['val_loss']:.4f} (p_in {final_values[0]:.2f}, p_hid "
            f"{final_values[1]:.2f}, wd {final_values[2]:.2g}) validation loss")

    arms = list(per_seed[0])
    summary = {arm: _summary([r[arm] for r in per_seed]) for arm in arms}
    table = [{"arm": arm, **{k: f"{v[0]:.4f} ± {v[1]:.4f}" for k, v in summary[arm].items()}}
             for arm in arms]
    log(format_table(table))
    results = {"name": cfg.name, "config": cfg.to_dict(), "train_steps": total,
               "grid_size": len(combos), "seeds": [t.seed + i for i in range(t.seeds)],
               "per_seed": per_seed, "summary": summary, "grids": grids,
               "schedules": schedules,
               "seconds": timings}
    out_dir = pathlib.Path(t.out_dir)
    atomic_write(out_dir / "results.json", json.dumps(results, indent=1).encode())
    plot_schedules(out_dir / "stn.png", results)
    log(f"results and schedule plot: {out_dir.resolve()}")
    return results


def plot_schedules(path, results) -> None:
    """The schedule STN discovered for each hyperparameter (one line per seed, against
    the training step) beside the grid's best values, and STN's validation loss."""
    from matplotlib.figure import Figure  # no pyplot state, no backend switch

    fig = Figure(figsize=(13, 3.2))
    axes = fig.subplots(1, 4)
    steps_per_round = results["config"]["stn"]["train_steps"]
    for s, (sched, rows) in enumerate(zip(results["schedules"], results["per_seed"])):
        values = np.asarray(sched["values"])
        x = np.arange(len(values)) * steps_per_round
        for j, name in enumerate(HPARAMS):
            axes[j].plot(x, values[:, j], color=f"C{s}", label=f"STN, seed {results['seeds'][s]}")
            axes[j].axhline(rows["grid best"][name], color=f"C{s}", ls=":", lw=1)
        axes[3].plot(x, sched["val_loss"], color=f"C{s}")
    for j, name in enumerate(HPARAMS):
        axes[j].set(xlabel="training step", title=name.replace("_", " ")
                    + " (dotted: grid best)")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[3].set(xlabel="training step", ylabel="cross-entropy", yscale="log",
                title="STN validation loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
