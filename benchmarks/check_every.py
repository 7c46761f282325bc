"""The DEQ train step with `check_every = k` solver steps per convergence test.

The W1 workload of `deq_train_step.py` (x in R^64, z in R^256, ||W||_2 = 0.9, batch 256,
Anderson to 1e-4, max 50 steps, implicit backward, one SGD step), implicit_kit with the
forward solve's `check_every` = 1, 2, 4, 8 (the backward solve keeps 1). On an
accelerator each convergence test of the data-dependent loop is a device-to-host round
trip; on the CPU there is none, so k > 1 only adds the frozen steps of converged
samples. Median ms per step over interleaved rounds (every k once per round, so that
drift on a noisy machine hits all alike).

Run: python benchmarks/check_every.py [--rounds 7] [--json PATH]
"""

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from deq_train_step import ik_solve, jax_train_step, make_problem, RTOL

import implicit_kit as ik


def solve_with(k):
    return ik_solve(ik.Anderson(rtol=RTOL, atol=1e-5), None, check_every=k)


def run(ks=(1, 2, 4, 8), rounds=7, calls=20, json_path=None):
    params, x, y = make_problem(256)
    probe = ik.backward_probe(jnp.float32)
    steps, out = {}, {}
    for k in ks:
        step = jax_train_step(solve_with(k))
        _, loss, fwd, _ = step(params, probe, x, y)
        steps[k] = step
        out[k] = {"k": k, "loss": float(loss), "fwd_mean": float(jnp.mean(fwd)),
                  "fwd_max": int(jnp.max(fwd)), "ms": []}
    for _ in range(rounds):
        for k in ks:
            jax.block_until_ready(steps[k](params, probe, x, y))
            t = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(steps[k](params, probe, x, y))
            out[k]["ms"].append(1e3 * (time.perf_counter() - t) / calls)
    rows = []
    for k in ks:
        r = out[k]
        r["median_ms"] = statistics.median(r["ms"])
        rows.append(r)
        print(k, f"{r['median_ms']:.2f} ms", r["fwd_mean"], r["loss"], flush=True)
    base = rows[0]
    for r in rows:
        assert r["fwd_mean"] == base["fwd_mean"] and abs(r["loss"] - base["loss"]) < 1e-6
    result = {"device": str(jax.devices()[0]), "rows": rows}
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    a = p.parse_args()
    run(rounds=a.rounds, json_path=a.json)
