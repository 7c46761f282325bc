"""Reversible DEQs: the drift of the published reversal, memory, accuracy at loose
tolerances and time per train step, side by side with the unrolled and implicit
backward passes.

Sections (all in one run):
- `drift`: the issue's table reproduced with implicit_kit: `tanh(Wz + x)`, 32 units,
  ||W||_2 = 0.9 (Gaussian, not symmetric), `Reversible(beta=0.8)` run for exactly N
  steps; the relative error of the gradient in W against `UnrolledAdjoint` through the
  same iterations, for the published reversal (`anchor_every=None`), the default
  (anchors every `auto_anchor_every` steps) and anchors every 8 steps, float64 and
  float32, with the largest anchor gap the backward probe reports.
- `memory`: XLA's compiled temporary memory of `jax.grad` through 32 vmapped solves of
  the DEQ benchmark's cell (256 units), 10 / 50 / 200 forward steps: ReversibleAdjoint
  (default anchors, anchors every 8, none), UnrolledAdjoint(checkpoints=N) (every step
  stored: backpropagation through the loop) and UnrolledAdjoint() (binomial
  checkpointing with log N checkpoints, as diffrax's RecursiveCheckpointAdjoint), all
  through the same `Reversible` forward; ImplicitAdjoint as the floor.
- `loose`: at the training tolerances rtol 1e-3 / 1e-4, the relative error of the
  gradient of the DEQ benchmark's loss (batch 64) against the exact gradient of the
  computed forward pass (UnrolledAdjoint through it): ImplicitAdjoint (exact only at
  the equilibrium) vs ReversibleAdjoint.
- `step`: ms per train step on the DEQ benchmark workload (batch 256, 256 units, rtol
  1e-4, at most 50 steps; `benchmarks/deq_train_step.py`), rows interleaved.
- `ode_drift`: `UReversible(Dopri5())` on the Neural ODE benchmark's field (64 states,
  MLP 64-128-64), N fixed steps over [0, 1]: the largest relative error of the
  states reconstructed backwards against the stored forward states, and the gradient's
  relative error against RecursiveCheckpointAdjoint through the same steps.
- `ode_memory`: compiled temporary memory of `jax.grad` through 32 vmapped solves of
  that field, 10 / 50 / 200 fixed steps: ReversibleAdjoint, RecursiveCheckpointAdjoint
  with a checkpoint at every step and with diffrax's default (log N), through the same
  reversible steps; plain Dopri5 with RecursiveCheckpointAdjoint and BacksolveAdjoint.
- `ode_step`: ms per train step on the Neural ODE benchmark workload (batch 256, Dopri5
  at rtol = atol = 1e-3, one Adam step; `benchmarks/node_train_step.py`), rows
  interleaved, with each gradient's error against the exact gradient of its own computed
  steps (BacksolveAdjoint's: against RecursiveCheckpointAdjoint through plain Dopri5).

Run: python benchmarks/reversible.py [--json PATH] [--repeats R]
"""

import argparse
import json
import sys

import jax


jax.config.update("jax_enable_x64", True)

import diffrax as dfx  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import interleaved  # noqa: E402
from deq_train_step import (  # noqa: E402
    cell,
    head_loss,
    injection,
    jax_train_step,
    make_problem,
    MAX_STEPS,
    RTOL,
)

import implicit_kit as ik  # noqa: E402
from implicit_kit._adjoint import auto_anchor_every  # noqa: E402


UREV = ik.models.UReversible(dfx.Dopri5())


def rel(a, b):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
            for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def drift_section():
    d = 32
    W = jax.random.normal(jax.random.key(0), (d, d))
    W = 0.9 * W / jnp.linalg.norm(W, 2)
    x = jax.random.normal(jax.random.key(1), (d,))
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        args = (W.astype(dtype), x.astype(dtype))

        def loss(args, probe, steps, adjoint):
            sol = ik.fixed_point(lambda z, a: jnp.tanh(a[0] @ z + a[1]),
                                 jnp.zeros(d, dtype), args,
                                 ik.Reversible(beta=0.8, rtol=0.0, atol=0.0),
                                 adjoint=adjoint, max_steps=steps, throw=False,
                                 probe=probe)
            return jnp.sum(sol.value * jnp.cos(jnp.arange(d)))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 3))
        for steps in (5, 10, 20, 40, 80, 200):
            ref, _ = grad(args, ik.backward_probe(), steps, ik.UnrolledAdjoint())
            row = dict(dtype=jnp.dtype(dtype).name, steps=steps,
                       auto_k=auto_anchor_every(0.8, dtype))
            for name, adj in (("naive", ik.ReversibleAdjoint(anchor_every=None)),
                              ("anchored", ik.ReversibleAdjoint()),
                              ("every8", ik.ReversibleAdjoint(anchor_every=8))):
                g, p = grad(args, ik.backward_probe(), steps, adj)
                row[name] = rel(g[0], ref[0])
                row[name + "_gap"] = float(ik.backward_stats(p).residual)
            rows.append(row)
            print(row, flush=True)
    return rows


def memory_section():
    params, x, _ = make_problem(256)
    x = x[:32]
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
        xd = jnp.asarray(x, dtype)
        for steps in (10, 50, 200):
            for name, adj in [
                ("ReversibleAdjoint() (anchors every "
                 f"{auto_anchor_every(0.8, dtype)})", ik.ReversibleAdjoint()),
                ("ReversibleAdjoint(anchor_every=8)", ik.ReversibleAdjoint(anchor_every=8)),
                ("ReversibleAdjoint(anchor_every=None) (published)",
                 ik.ReversibleAdjoint(anchor_every=None)),
                ("UnrolledAdjoint(checkpoints=N) (every step)",
                 ik.UnrolledAdjoint(checkpoints=steps)),
                ("UnrolledAdjoint() (log N checkpoints)", ik.UnrolledAdjoint()),
                ("ImplicitAdjoint() (not exact at N steps)", ik.ImplicitAdjoint()),
            ]:
                def loss(p, adj=adj, steps=steps):
                    def one(inj):
                        return ik.fixed_point(
                            cell, jnp.zeros(256, dtype), (p["W"], inj),
                            ik.Reversible(rtol=0.0, atol=0.0), adjoint=adj,
                            max_steps=steps, throw=False).value
                    return jnp.sum(jax.vmap(one)(injection(p, xd)) ** 2)

                m = jax.jit(jax.grad(loss)).lower(p).compile().memory_analysis()
                rows.append(dict(dtype=jnp.dtype(dtype).name, steps=steps, adjoint=name,
                                 temp_bytes=int(m.temp_size_in_bytes)))
                print(rows[-1], flush=True)
    return rows


def loose_section():
    params, x, y = make_problem(256)
    x, y = x[:64], y[:64]
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
        xd = jnp.asarray(x, dtype)
        for rtol in (1e-3, 1e-4):
            solver = ik.Reversible(rtol=rtol, atol=0.0)

            def loss(p, adj):
                def one(inj):
                    sol = ik.fixed_point(cell, jnp.zeros(256, dtype), (p["W"], inj),
                                         solver, adjoint=adj, max_steps=MAX_STEPS,
                                         throw=False)
                    return sol.value, sol.stats["num_steps"]
                z, steps = jax.vmap(one)(injection(p, xd))
                return head_loss(p, z, y), steps

            grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
            ref, steps = grad(p, ik.UnrolledAdjoint())
            row = dict(dtype=jnp.dtype(dtype).name, rtol=rtol,
                       steps=float(np.mean(steps)))
            for name, adj in (("implicit", ik.ImplicitAdjoint()),
                              ("reversible", ik.ReversibleAdjoint())):
                g, _ = grad(p, adj)
                row[name] = rel(g["W"], ref["W"])
            rows.append(row)
            print(row, flush=True)
    return rows


def step_section(repeats):
    params, x, y = make_problem(256)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    arms = [
        ("Reversible(0.8) + ReversibleAdjoint()", ik.Reversible(rtol=RTOL, atol=0.0),
         ik.ReversibleAdjoint()),
        ("Reversible(0.8) + UnrolledAdjoint()", ik.Reversible(rtol=RTOL, atol=0.0),
         ik.UnrolledAdjoint()),
        ("Reversible(0.8) + ImplicitAdjoint()", ik.Reversible(rtol=RTOL, atol=0.0),
         ik.ImplicitAdjoint()),
        ("Anderson(m=5) + ImplicitAdjoint() (the default)", ik.Anderson(rtol=RTOL,
                                                                        atol=0.0),
         ik.ImplicitAdjoint()),
        ("Anderson(m=5) + UnrolledAdjoint()", ik.Anderson(rtol=RTOL, atol=0.0),
         ik.UnrolledAdjoint()),
    ]
    calls, rows = [], []
    for name, solver, adj in arms:
        def solve(p, probe, x, solver=solver, adj=adj):
            def one(inj):
                sol = ik.fixed_point(cell, jnp.zeros(256, jnp.float32), (p["W"], inj),
                                     solver, adjoint=adj, max_steps=MAX_STEPS,
                                     throw=False)
                return sol.value, sol.stats["nfe"]
            return jax.vmap(one)(injection(p, x))

        step = jax_train_step(solve)
        probe = ik.backward_probe(jnp.float32)
        compiled = step.lower(params, probe, x, y).compile()
        _, loss, nfe, _ = step(params, probe, x, y)
        rows.append(dict(arm=name, nfe=float(np.mean(nfe)), loss=float(loss),
                         temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes)))
        calls.append(lambda step=step: jax.block_until_ready(step(params, probe, x, y)))
    for row, t in zip(rows, interleaved(calls, repeats)):
        row["ms"] = t
        print(row, flush=True)
    return rows


def node_field(dtype, seed=1):
    f = ik.nn.MLPField(64, 128, depth=1, key=jax.random.key(seed))
    return jax.tree_util.tree_map(
        lambda v: v.astype(dtype) if eqx.is_inexact_array(v) else v, f)


def ode_drift_section():
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        f = node_field(dtype)
        z0 = jax.random.normal(jax.random.key(0), (64,)).astype(dtype)
        term = dfx.ODETerm(lambda t, y, args: args(y))
        for steps in (10, 100, 1000):
            dt = 1.0 / steps
            # (times in the state's dtype: float64 times would promote a float32 state)
            sol = dfx.diffeqsolve(term, UREV, jnp.asarray(0.0, dtype),
                                  jnp.asarray(1.0, dtype), jnp.asarray(dt, dtype), z0, f,
                                  max_steps=steps,
                                  saveat=dfx.SaveAt(t0=True, steps=True, solver_state=True))
            ys = sol.ys
            y, z = ys[-1], sol.solver_state
            worst = 0.0

            @jax.jit
            def back(n, y, z):
                t1 = jnp.asarray((n + 1) * dt, dtype)
                return UREV.reverse_step(term, t1 - jnp.asarray(dt, dtype), t1, y, z, f)

            for n in reversed(range(steps)):
                y, z = back(n, y, z)
                worst = max(worst, float(jnp.linalg.norm(y - ys[n]) /
                                         jnp.linalg.norm(ys[n])))

            def loss(f, adj):
                ode = ik.models.ODESolve(UREV, adjoint=adj, dt0=dt, max_steps=steps,
                                         stepsize_controller=dfx.ConstantStepSize())
                out, _ = ode(f, z0, None, 1.0, None)
                return jnp.sum(jnp.sin(out))

            g = eqx.filter_grad(loss)(f, ik.ReversibleAdjoint())
            ref = eqx.filter_grad(loss)(f, dfx.RecursiveCheckpointAdjoint())
            rows.append(dict(dtype=jnp.dtype(dtype).name, steps=steps,
                             reconstruction=worst,
                             gradient=rel(eqx.filter(g, eqx.is_array),
                                          eqx.filter(ref, eqx.is_array))))
            print(rows[-1], flush=True)
    return rows


def ode_memory_section():
    f = node_field(jnp.float32)
    z0 = jax.random.normal(jax.random.key(0), (32, 64)).astype(jnp.float32)
    rows = []
    for steps in (10, 50, 200):
        arms = [
            ("UReversible(Dopri5) + ReversibleAdjoint()", UREV, ik.ReversibleAdjoint()),
            ("UReversible(Dopri5) + RecursiveCheckpointAdjoint(checkpoints=N) (every "
             "step)", UREV, dfx.RecursiveCheckpointAdjoint(checkpoints=steps)),
            ("UReversible(Dopri5) + RecursiveCheckpointAdjoint() (log N)", UREV,
             dfx.RecursiveCheckpointAdjoint()),
            ("Dopri5 + RecursiveCheckpointAdjoint() (log N)", dfx.Dopri5(),
             dfx.RecursiveCheckpointAdjoint()),
            ("Dopri5 + BacksolveAdjoint() (approximate)", dfx.Dopri5(),
             dfx.BacksolveAdjoint()),
        ]
        for name, solver, adj in arms:
            ode = ik.models.ODESolve(solver, adjoint=adj, dt0=1.0 / steps,
                                     max_steps=steps,
                                     stepsize_controller=dfx.ConstantStepSize())
            model = ik.models.NeuralODE(f, ode)

            def loss(m):
                return jnp.sum(jax.vmap(m)(z0) ** 2)

            m = eqx.filter_jit(eqx.filter_grad(loss)).lower(model).compile()
            rows.append(dict(steps=steps, arm=name,
                             temp_bytes=int(m.compiled.memory_analysis().temp_size_in_bytes)
                             if hasattr(m, "compiled") else
                             int(m.memory_analysis().temp_size_in_bytes)))
            print(rows[-1], flush=True)
    return rows


def ode_step_section(repeats):
    f = node_field(jnp.float32)
    k1, k2 = jax.random.split(jax.random.key(0))
    z0 = jax.random.normal(k1, (256, 64))
    target = jnp.tanh(jax.random.normal(k2, (256, 64)))
    opt = optax.adam(1e-3)
    arms = [
        ("Dopri5 + RecursiveCheckpointAdjoint() (default)", dfx.Dopri5(),
         dfx.RecursiveCheckpointAdjoint(), None),
        ("Dopri5 + BacksolveAdjoint()", dfx.Dopri5(), dfx.BacksolveAdjoint(),
         dfx.RecursiveCheckpointAdjoint()),
        ("UReversible(Dopri5) + ReversibleAdjoint()", UREV, ik.ReversibleAdjoint(),
         dfx.RecursiveCheckpointAdjoint()),
        ("UReversible(Dopri5) + RecursiveCheckpointAdjoint()", UREV,
         dfx.RecursiveCheckpointAdjoint(), None),
    ]
    rows, calls = [], []
    for name, solver, adj, exact in arms:
        def model_with(adj, solver=solver):
            return ik.models.NeuralODE(f, ik.models.ODESolve(solver, rtol=1e-3, atol=1e-3,
                                                             adjoint=adj))

        def loss(m):
            z1, st = jax.vmap(lambda z: m(z, return_stats=True))(z0)
            return jnp.mean((z1 - target) ** 2), st.nfe

        @eqx.filter_jit
        def step(m, s):
            (value, nfe), g = eqx.filter_value_and_grad(loss, has_aux=True)(m)
            updates, s = opt.update(g, s)
            return eqx.apply_updates(m, updates), s, value, nfe

        model = model_with(adj)
        state = opt.init(eqx.filter(model, eqx.is_inexact_array))
        _, _, value, nfe = step(model, state)
        error = 0.0
        if exact is not None:
            g = eqx.filter_grad(lambda m: loss(m)[0])(model)
            ref = eqx.filter_grad(lambda m: loss(m)[0])(model_with(exact))
            error = rel(eqx.filter(g, eqx.is_array), eqx.filter(ref, eqx.is_array))
        rows.append(dict(arm=name, nfe=float(np.mean(nfe)), gradient_error=error,
                         exact=name.startswith(("UReversible", "Dopri5 + Recursive"))))
        calls.append(lambda step=step, model=model, state=state: jax.block_until_ready(
            step(model, state)))
    for row, t in zip(rows, interleaved(calls, repeats)):
        row["ms"] = t
        print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sections",
                    default="drift,memory,loose,step,ode_drift,ode_memory,ode_step")
    a = ap.parse_args()
    out = {}
    for s in a.sections.split(","):
        fn = globals()[f"{s}_section"]
        out[s] = fn(a.repeats) if s.endswith("step") else fn()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
