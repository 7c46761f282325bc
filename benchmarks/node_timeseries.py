"""Neural ODE time-series fit, train step side by side: implicit_kit vs plain diffrax.

The workload is diffrax's own example `docs/examples/neural_ode.ipynb` (HEAD of
patrick-kidger/diffrax): 2-D trajectories of `dy/dt = (y₁/(1+y₁), −y₀/(1+y₀))` at 100
times on [0, 10], a field `out_scale · tanh(MLP(y))` (width 64, depth 2, softplus), Tsit5,
`PIDController(rtol=1e-3, atol=1e-6)`, `dt0 = ts[1] − ts[0]`, `SaveAt(ts=ts)`, the
default `RecursiveCheckpointAdjoint`, batch 32, `optax.adabelief(3e-3)`, MSE on the whole
trajectory. Both rows use the same field module and the same data; the only difference
is who calls `diffeqsolve`: diffrax's example `NeuralODE` class (`throw=True`, its
default) or `ik.models.NeuralODE(dfx.ODETerm(func), ODESolve(...))`.

Rows, for the two lengths of diffrax's length schedule (10 % of each series, then all of
it): milliseconds per train step over paired rounds (the order alternating; the minimum
and the median per row, and the median of the per-round ratio, see `paired`), and the
loss of both on the same batch (equal to the solver tolerance: the same solve). Run:

    python benchmarks/node_timeseries.py [--rounds N] [--json PATH]
"""

import argparse
import json
import os
import platform
import sys
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.nn as jnn
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import implicit_kit as ik


class Func(eqx.Module):
    """diffrax's example field, `(t, y, args)`."""

    out_scale: jax.Array
    mlp: eqx.nn.MLP

    def __init__(self, data_size, width_size, depth, *, key):
        self.out_scale = jnp.array(1.0)
        self.mlp = eqx.nn.MLP(data_size, data_size, width_size, depth,
                              activation=jnn.softplus, final_activation=jnn.tanh, key=key)

    def __call__(self, t, y, args):
        return self.out_scale * self.mlp(y)


class DiffraxNeuralODE(eqx.Module):
    """diffrax's example model, verbatim in its solve."""

    func: Func

    def __call__(self, ts, y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(self.func), dfx.Tsit5(), t0=ts[0], t1=ts[-1], dt0=ts[1] - ts[0],
            y0=y0, stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-6),
            saveat=dfx.SaveAt(ts=ts),
        ).ys


def get_data(dataset_size, *, key):
    """diffrax's example data (the true field integrated by Tsit5 at dt0 = 0.1)."""
    ts = jnp.linspace(0, 10, 100)

    def one(key):
        y0 = jr.uniform(key, (2,), minval=-0.6, maxval=1)

        def f(t, y, args):
            x = y / (1 + y)
            return jnp.stack([x[1], -x[0]], axis=-1)

        return dfx.diffeqsolve(dfx.ODETerm(f), dfx.Tsit5(), ts[0], ts[-1], 0.1, y0,
                               saveat=dfx.SaveAt(ts=ts)).ys

    return ts, jax.vmap(one)(jr.split(key, dataset_size))


def implicit_kit_model(func, ts):
    """The same model in implicit_kit: the field as a diffrax term, the example's solver
    settings in `ODESolve`, called as `model(y0, ts)`."""
    ode = ik.models.ODESolve(dfx.Tsit5(), rtol=1e-3, atol=1e-6, dt0=float(ts[1] - ts[0]))
    return ik.models.NeuralODE(dfx.ODETerm(func), ode)


def make_step(optim, predict):
    """One train step as diffrax's example writes it; `predict(model, ts, y0)`."""

    @eqx.filter_jit
    def step(ti, yi, model, opt_state):
        def loss(model):
            y_pred = jax.vmap(lambda y0: predict(model, ti, y0))(yi[:, 0])
            return jnp.mean((yi - y_pred) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt_state = optim.update(grads, opt_state)
        return value, eqx.apply_updates(model, updates), opt_state

    return step


def paired(runs, rounds):
    """Milliseconds of each call over `rounds` rounds, the order rotating each round so
    that no row always runs in the same place. On these shared 2-core machines the
    minimum of a few-millisecond step drifts by ±5 % between identical rows; the median
    of the per-round ratio to the first row is the statistic that repeats (the rows'
    minima are kept too)."""
    for run in runs:
        for _ in range(3):
            run()
    n = len(runs)
    out = np.zeros((n, rounds))
    for r in range(rounds):
        for k in range(n):
            i = (k + r) % n
            t0 = time.perf_counter()
            runs[i]()
            out[i, r] = 1e3 * (time.perf_counter() - t0)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    a = p.parse_args()
    data_key, model_key = jr.split(jr.PRNGKey(5678))
    ts, ys = get_data(256, key=data_key)
    func = Func(2, 64, 2, key=model_key)
    optim = optax.adabelief(3e-3)
    rows = []
    for length in (0.1, 1.0):
        n = int(ys.shape[1] * length)
        ti, yi = ts[:n], ys[:32, :n]
        models = {
            "diffrax (its example's NeuralODE)": (
                DiffraxNeuralODE(func), make_step(optim, lambda m, t, y0: m(t, y0))),
            "implicit_kit NeuralODE": (
                implicit_kit_model(func, ts), make_step(optim, lambda m, t, y0: m(y0, t))),
            # The control: a second copy of the diffrax row (its ratio is the noise).
            "diffrax again (control)": (
                DiffraxNeuralODE(func), make_step(optim, lambda m, t, y0: m(t, y0))),
        }
        losses, runs = {}, []
        for name, (model, step) in models.items():
            state = optim.init(eqx.filter(model, eqx.is_inexact_array))
            losses[name] = float(step(ti, yi, model, state)[0])
            runs.append(lambda model=model, step=step, state=state:
                        jax.block_until_ready(step(ti, yi, model, state)))
        times = paired(runs, a.rounds)
        for (name, _), t in zip(models.items(), times):
            rows.append({"row": name, "length": n, "ms": float(t.min()),
                         "median_ms": float(np.median(t)), "loss": losses[name],
                         "paired_ratio": float(np.median(t / times[0]))})
    meta = {"device": str(jax.devices()[0]), "platform": platform.platform(),
            "jax": jax.__version__, "diffrax": dfx.__version__,
            "command": " ".join(["python"] + sys.argv), "cpus": os.cpu_count()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"# Neural ODE time-series train step ({meta['device']}; {meta['command']})")
    print("| row | series length | ms / step (min) | ms / step (median) | loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['length']} | {r['ms']:.2f} | {r['median_ms']:.2f} | "
              f"{r['loss']:.6g} |")
    for r in rows:
        if r["row"] != "diffrax (its example's NeuralODE)":
            print(f"\nlength {r['length']}: {r['row']} / diffrax, median of the paired "
                  f"rounds = {r['paired_ratio']:.3f}x")


if __name__ == "__main__":
    main()
