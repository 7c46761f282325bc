"""K trainings that differ only in hyperparameters: one vmapped, compiled call
(`ik.hyper.vmap_hparams`) against K sequential calls of the same compiled
single-setting function, on CPU.

The task: a 64-`--width`-10 MLP on the embedded digits, AdamW for `--steps` steps on
minibatches of `--batch` (0 = full batch; the same batch order for every setting), with
the weight decay and the learning rate as per-setting arrays. Compile time is excluded
from both (each function is called once first); timings are medians of `--repeats`
interleaved runs.

Run: python benchmarks/hyper_vmap.py [--ks 4,16,64] [--steps 1000] [--batch 64]
[--width 32] [--repeats 3] [--json PATH]
"""

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import implicit_kit as ik


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ks", default="4,16,64")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    a = p.parse_args()
    x, y = ik.data.load_digits("train")
    xt, yt = ik.data.load_digits("test")
    x, xt = jnp.asarray(x.reshape(len(y), -1)), jnp.asarray(xt.reshape(len(yt), -1))
    y, yt = jnp.asarray(y), jnp.asarray(yt)
    model0 = eqx.nn.MLP(64, 10, a.width, 1, key=jr.key(0))
    n = len(y)
    b = a.batch or n
    order = jnp.asarray(np.concatenate([np.random.default_rng(e).permutation(n)
                                        for e in range(a.steps * b // n + 1)]))
    params0, static = eqx.partition(model0, eqx.is_inexact_array)

    def train(h, x, y, xt, yt):
        opt = optax.inject_hyperparams(optax.adamw)(learning_rate=h["lr"],
                                                    weight_decay=h["wd"])

        def loss(p, xb, yb):
            m = eqx.combine(p, static)
            return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(xb), yb).mean()

        def step(c, i):
            p, s = c
            idx = jax.lax.dynamic_slice_in_dim(order, i * b, b)
            g = jax.grad(loss)(p, x[idx], y[idx])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (params0, opt.init(params0)), jnp.arange(a.steps))
        m = eqx.combine(p, static)
        return {"test_acc": jnp.mean(jnp.argmax(jax.vmap(m)(xt), -1) == yt)}

    single = eqx.filter_jit(train)
    rows = []
    for k in [int(v) for v in a.ks.split(",")]:
        hs = {"lr": jnp.logspace(-3, -1.5, k), "wd": jnp.logspace(-5, -1, k)[::-1]}
        batched = jax.block_until_ready(ik.hyper.vmap_hparams(train, hs, x, y, xt, yt))
        for i in range(min(k, 2)):  # same numbers as the separate calls
            sep = single({"lr": hs["lr"][i], "wd": hs["wd"][i]}, x, y, xt, yt)
            assert abs(float(sep["test_acc"]) - float(batched["test_acc"][i])) < 1e-6
        tv, ts = [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(ik.hyper.vmap_hparams(train, hs, x, y, xt, yt))
            tv.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(k):
                out = single({"lr": hs["lr"][i], "wd": hs["wd"][i]}, x, y, xt, yt)
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t0)
        row = {"K": k, "vmapped_s": float(np.median(tv)), "sequential_s": float(np.median(ts))}
        row["ratio_seq_over_vmap"] = row["sequential_s"] / row["vmapped_s"]
        row["best_test_acc"] = float(jnp.max(batched["test_acc"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(ik.hyper.format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
