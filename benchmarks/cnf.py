"""Continuous normalising flow: train step side by side with diffrax's own CNF code, and a
2-D density fitted with `ik.models.CNF` (figure).

The peer is diffrax's example `docs/examples/continuous_normalising_flow.ipynb` (HEAD of
patrick-kidger/diffrax), its model ported as it is written there (`Func` of
`ConcatSquash` layers, `CNF.train`: each block integrated backwards from t1 = 0.5 to
t0 = 0 by Tsit5 at the constant step dt0 = 0.05, the state `(y, Δ log p)`, exact trace
or Hutchinson with one probe per sample) with its defaults: 2 blocks, width 64, depth 3,
batch 500, `optax.adamw(1e-3, weight_decay=1e-5)`. implicit_kit's row is
`ik.models.CNF([dfx.ODETerm(f) for f in funcs], ODESolve(Tsit5(), stepsize_controller=
dfx.ConstantStepSize(), dt0=0.05))` with the same `Func` modules. Both rows train on the
same batch from the same weights; the negative log-likelihoods agree (the same solve).

The data is synthetic (no download): two interleaved half-moons with Gaussian noise 0.1,
standardised. Timing: milliseconds per train step, the minimum over interleaved rounds.
With `--train N` the implicit_kit model is then trained for N steps and the figure
(learned density and samples drawn by integrating forwards) is written to `--figure`.

    python benchmarks/cnf.py [--rounds N] [--train N] [--json PATH] [--figure PATH]
"""

import argparse
import json
import math
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
from _common import interleaved

import implicit_kit as ik


# diffrax's example (Credit there: the layer and defaults from the FFJORD repository).
class ConcatSquash(eqx.Module):
    lin1: eqx.nn.Linear
    lin2: eqx.nn.Linear
    lin3: eqx.nn.Linear

    def __init__(self, *, in_size, out_size, key):
        key1, key2, key3 = jr.split(key, 3)
        self.lin1 = eqx.nn.Linear(in_size, out_size, key=key1)
        self.lin2 = eqx.nn.Linear(1, out_size, key=key2)
        self.lin3 = eqx.nn.Linear(1, out_size, use_bias=False, key=key3)

    def __call__(self, t, y):
        return self.lin1(y) * jnn.sigmoid(self.lin2(t)) + self.lin3(t)


class Func(eqx.Module):
    layers: list

    def __init__(self, *, data_size, width_size, depth, key):
        keys = jr.split(key, depth + 1)
        sizes = [data_size] + [width_size] * depth + [data_size]
        self.layers = [ConcatSquash(in_size=i, out_size=o, key=k)
                       for i, o, k in zip(sizes[:-1], sizes[1:], keys)]

    def __call__(self, t, y, args):
        t = jnp.asarray(t)[None]
        for layer in self.layers[:-1]:
            y = jnn.tanh(layer(t, y))
        return self.layers[-1](t, y)


def approx_logp_wrapper(t, y, args):
    y, _ = y
    *args, eps, func = args
    f, vjp_fn = jax.vjp(lambda y: func(t, y, args), y)
    (eps_dfdy,) = vjp_fn(eps)
    return f, jnp.sum(eps_dfdy * eps)


def exact_logp_wrapper(t, y, args):
    y, _ = y
    *args, _, func = args
    f, vjp_fn = jax.vjp(lambda y: func(t, y, args), y)
    (size,) = y.shape
    (dfdy,) = jax.vmap(vjp_fn)(jnp.eye(size))
    return f, jnp.trace(dfdy)


def normal_log_likelihood(y):
    return -0.5 * (y.size * math.log(2 * math.pi) + jnp.sum(y ** 2))


class DiffraxCNF(eqx.Module):
    funcs: list
    exact_logp: bool = eqx.field(static=True)
    t0: float = 0.0
    t1: float = 0.5
    dt0: float = 0.05

    def train(self, y, *, key):
        term = dfx.ODETerm(exact_logp_wrapper if self.exact_logp else approx_logp_wrapper)
        eps = jr.normal(key, y.shape)
        delta_log_likelihood = 0.0
        for func in reversed(self.funcs):
            y = (y, delta_log_likelihood)
            sol = dfx.diffeqsolve(term, dfx.Tsit5(), self.t1, self.t0, -self.dt0, y,
                                  (eps, func))
            (y,), (delta_log_likelihood,) = sol.ys
        return delta_log_likelihood + normal_log_likelihood(y)


def implicit_kit_cnf(funcs, exact_logp):
    ode = ik.models.ODESolve(dfx.Tsit5(), stepsize_controller=dfx.ConstantStepSize(),
                             dt0=0.05)
    return ik.models.CNF([dfx.ODETerm(f) for f in funcs], ode,
                         trace="exact" if exact_logp else "hutchinson")


def moons(n, *, seed):
    """Two interleaved half-moons, noise 0.1, standardised (scikit-learn's recipe)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, np.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(a), 1 - np.cos(a))
    y = np.where(upper, np.sin(a), 0.5 - np.sin(a))
    pts = np.stack([x, y], 1) + 0.1 * rng.normal(size=(n, 2))
    return jnp.asarray((pts - pts.mean(0)) / pts.std(0), jnp.float32)


def make_step(optim, log_prob):
    @eqx.filter_jit
    def step(model, opt_state, data, key):
        def loss(model):
            keys = jr.split(key, data.shape[0])
            return -jnp.mean(jax.vmap(lambda x, k: log_prob(model, x, k))(data, keys))

        value, grads = eqx.filter_value_and_grad(loss)(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optim.update(grads, opt_state, params)
        return value, eqx.apply_updates(model, updates), opt_state

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--train", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None)
    a = p.parse_args()
    keys = jr.split(jr.PRNGKey(5678), 2)
    funcs = [Func(data_size=2, width_size=64, depth=3, key=k) for k in keys]
    data = moons(20_000, seed=0)
    batch = data[:500]
    optim = optax.adamw(1e-3, weight_decay=1e-5)
    rows = []
    for exact in (True, False):
        models = {
            "diffrax (its example's CNF)": (
                DiffraxCNF(funcs, exact), lambda m, x, k: m.train(x, key=k)),
            "implicit_kit CNF": (
                implicit_kit_cnf(funcs, exact), lambda m, x, k: m.log_prob(x, key=k)),
        }
        runs, nll = [], {}
        for name, (model, log_prob) in models.items():
            step = make_step(optim, log_prob)
            state = optim.init(eqx.filter(model, eqx.is_inexact_array))
            nll[name] = float(step(model, state, batch, jr.key(0))[0])
            runs.append(lambda model=model, step=step, state=state: jax.block_until_ready(
                step(model, state, batch, jr.key(0))))
        for (name, _), ms in zip(models.items(), interleaved(runs, a.rounds)):
            rows.append({"row": name, "trace": "exact" if exact else "hutchinson",
                         "ms": ms, "nll": nll[name]})
    result = {"rows": rows}
    if a.train:
        result["train"] = train(implicit_kit_cnf(funcs, True), optim, data, a.train,
                                a.figure)
    meta = {"device": str(jax.devices()[0]), "platform": platform.platform(),
            "jax": jax.__version__, "diffrax": dfx.__version__,
            "command": " ".join(["python"] + sys.argv), "cpus": os.cpu_count()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, **result}, f, indent=1)
    print(f"# CNF train step ({meta['device']}; {meta['command']})")
    print("| row | trace | ms / step | NLL of the batch |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['trace']} | {r['ms']:.1f} | {r['nll']:.6f} |")
    for tr in ("exact", "hutchinson"):
        ik_ms, dx_ms = (next(r["ms"] for r in rows if r["trace"] == tr and r["row"] == k)
                        for k in ("implicit_kit CNF", "diffrax (its example's CNF)"))
        print(f"\n{tr}: implicit_kit / diffrax = {ik_ms / dx_ms:.3f}x")
    if "train" in result:
        print("\n", result["train"])


def train(model, optim, data, steps, figure):
    """Train on the moons, report held-out NLL (exact trace) against the standard
    normal's, and draw the figure."""
    step = make_step(optim, lambda m, x, k: m.log_prob(x, key=k))
    state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    train_data, test = data[:-2000], data[-2000:]
    t0 = time.perf_counter()
    key = jr.key(1)
    for _ in range(steps):
        key, kb, ks = jr.split(key, 3)
        idx = jr.choice(kb, train_data.shape[0], (500,), replace=False)
        value, model, state = step(model, state, train_data[idx], ks)
    seconds = time.perf_counter() - t0
    test_nll = -float(jnp.mean(jax.jit(jax.vmap(model.log_prob))(test)))
    base_nll = -float(jnp.mean(jax.vmap(normal_log_likelihood)(test)))
    out = {"steps": steps, "seconds": seconds, "test_nll": test_nll,
           "standard_normal_nll": base_nll}
    if figure:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        g = jnp.linspace(-2.5, 2.5, 120)
        xx, yy = jnp.meshgrid(g, g)
        grid = jnp.stack([xx.ravel(), yy.ravel()], 1)
        dens = jnp.exp(jax.jit(jax.vmap(model.log_prob))(grid)).reshape(xx.shape)
        samples = jax.jit(jax.vmap(model.sample))(jr.normal(jr.key(2), (2000, 2)))
        fig, ax = plt.subplots(1, 3, figsize=(11, 3.5))
        ax[0].scatter(test[:, 0], test[:, 1], s=1)
        ax[0].set_title("held-out data")
        ax[1].imshow(dens, origin="lower", extent=(-2.5, 2.5, -2.5, 2.5))
        ax[1].set_title(f"learned density (test NLL {test_nll:.2f})")
        ax[2].scatter(samples[:, 0], samples[:, 1], s=1, c="crimson")
        ax[2].set_title("samples (integrated forwards)")
        for x in ax:
            x.set_xlim(-2.5, 2.5)
            x.set_ylim(-2.5, 2.5)
        fig.tight_layout()
        fig.savefig(figure, dpi=80)
    return out


if __name__ == "__main__":
    main()
