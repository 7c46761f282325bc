"""Steps to a residual of 1e-8: Picard, Anderson, Halpern with restarts (the default) and
Halpern with a fixed anchor, on a contraction and on a nonexpansive rotation.

- contraction: y = A y + b, A symmetric 15 x 15 with eigenvalues evenly spread over
  [-0.95, 0.95] (seed 3), from y = 0;
- rotation: a 90-degree rotation of R^100 about a point y* (nonexpansive, one fixed
  point; Picard cycles forever), from y = 2.

Stopping rule for every solver: ||T(y) - y|| <= 1e-8 (absolute), at most 100,000 steps.
The value's error against the closed-form fixed point is reported too.

Run: python benchmarks/halpern_steps.py [--json PATH]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import implicit_kit as ik


jax.config.update("jax_enable_x64", True)


def problems():
    n = 15
    q = np.linalg.qr(np.random.default_rng(3).normal(size=(n, n)))[0]
    a = q @ np.diag(np.linspace(-0.95, 0.95, n)) @ q.T
    b = np.random.default_rng(4).normal(size=n)
    yield ("contraction (rho 0.95, n 15)", lambda y, args: args[0] @ y + args[1],
           jnp.zeros(n), (jnp.asarray(a), jnp.asarray(b)), np.linalg.solve(np.eye(n) - a, b))
    n = 100
    rot = np.kron(np.eye(n // 2), np.array([[0.0, -1.0], [1.0, 0.0]]))
    ystar = np.linspace(-1, 1, n)
    yield ("rotation by 90 degrees (n 100)",
           lambda y, args: args[0] @ (y - args[1]) + args[1], jnp.full(n, 2.0),
           (jnp.asarray(rot), jnp.asarray(ystar)), ystar)


SOLVERS = {
    "Picard": ik.Picard(rtol=0.0, atol=1e-8),
    "Anderson (m=5)": ik.Anderson(rtol=0.0, atol=1e-8),
    "Halpern (restarted, default)": ik.Halpern(rtol=0.0, atol=1e-8),
    "Halpern (fixed anchor)": ik.Halpern(rtol=0.0, atol=1e-8, restart=None),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for problem, fn, y0, args, exact in problems():
        for name, solver in SOLVERS.items():
            sol = ik.fixed_point(fn, y0, args, solver, max_steps=100_000, throw=False)
            row = {"problem": problem, "solver": name,
                   "steps": int(sol.stats["num_steps"]),
                   "converged": bool(sol.result == ik.RESULTS.successful),
                   "residual": float(jnp.linalg.norm(fn(sol.value, args) - sol.value)),
                   "error": float(np.linalg.norm(np.asarray(sol.value) - exact))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
