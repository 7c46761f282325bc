"""Neural ODE train step, side by side: implicit_kit vs plain diffrax vs torchdiffeq.

Workload (issue "Homotopy continuation, Neural ODE models and HomoODE"): state 64, batch
256, vector field MLP 64→128→64 with tanh, dopri5 at rtol = atol = 1e-3 over [0, 1], MSE
to a target, one Adam step. Rows:

- `implicit_kit NeuralODE (RecursiveCheckpoint)` vs `diffrax (RecursiveCheckpoint)`: the
  same vmapped per-sample solve (each sample its own steps), implicit_kit's model vs a
  hand-written `diffeqsolve` — the overhead of the toolkit (target: at most 10%);
- the same pair with `BacksolveAdjoint`;
- torchdiffeq `odeint` (backprop through the solver) and `odeint_adjoint`, which solve
  the batch as one ODE (all samples share the steps): a peer, not like for like.

Reported: milliseconds per train step (minimum over repeats after warm-up; each
implicit_kit/diffrax pair is timed interleaved), forward NFE per sample (torchdiffeq: of
the one batched solve). Run: python benchmarks/node_train_step.py [--repeats N] [--json PATH]
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
import jax.numpy as jnp
import jax.random as jr
import optax
from _common import timeit

import implicit_kit as ik


jax.config.update("jax_default_matmul_precision", "highest")

STATE, WIDTH, BATCH, TOL, LR = 64, 128, 256, 1e-3, 1e-3


def data(seed=0):
    k1, k2 = jr.split(jr.key(seed))
    z0 = jr.normal(k1, (BATCH, STATE))
    target = jnp.tanh(jr.normal(k2, (BATCH, STATE)))
    return z0, target


def field(key):
    return ik.nn.MLPField(STATE, WIDTH, depth=1, key=key)


class BatchField(eqx.Module):
    """The field applied to every row of a (batch, state) array: the batch as one ODE."""

    inner: ik.nn.MLPField

    def __call__(self, z, x=None):
        return jax.vmap(self.inner)(z)


def train_steps(adjoint, one_ode=False):
    """`[(name, step, args)]`: implicit_kit's Neural ODE and the same solve written with
    plain diffrax, each a jitted Adam train step `step(*args) -> (model, state, loss,
    nfe)` (vmapped per-sample solves, or the batch as one ODE)."""
    z0, target = data()
    f = field(jr.key(1))
    # Per-sample solves under vmap (each sample its own steps), or the batch as one ODE.
    batch_map = (lambda fn: fn) if one_ode else jax.vmap

    ode = ik.models.ODESolve(rtol=TOL, atol=TOL, adjoint=adjoint)
    ik_model = ik.models.NeuralODE(BatchField(f) if one_ode else f, ode)

    def ik_loss(model):
        z1, st = batch_map(lambda z: model(z, return_stats=True))(z0)
        return jnp.mean((z1 - target) ** 2), st.nfe

    class Plain(eqx.Module):
        mlp: eqx.nn.MLP

        def __call__(self, z):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, args: args(y)), dfx.Dopri5(), 0.0, 1.0, None, z,
                self.mlp, stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL),
                adjoint=adjoint, max_steps=4096, saveat=dfx.SaveAt(t1=True),
            )
            return sol.ys[-1], 6 * sol.stats["num_steps"] + 1

    plain_model = Plain(f.mlp)

    def plain_loss(model):
        if one_ode:
            model = eqx.tree_at(lambda m: m.mlp, model, replace_fn=lambda mlp: _Rows(mlp))
        z1, nfe = batch_map(model)(z0)
        return jnp.mean((z1 - target) ** 2), nfe

    return _adam_steps([("implicit_kit NeuralODE", ik_model, ik_loss),
                        ("diffrax diffeqsolve", plain_model, plain_loss)])


def _adam_steps(rows):
    """`[(name, step, (model, state))]` for `rows` of `(name, model, loss)`, `loss(model)
    -> (value, nfe)`: a jitted Adam train step `step(model, state) -> (model, state,
    value, nfe)` each."""
    opt = optax.adam(LR)
    out = []
    for name, model, loss in rows:
        state = opt.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(model, state, loss=loss):
            (val, nfe), g = eqx.filter_value_and_grad(loss, has_aux=True)(model)
            updates, state = opt.update(g, state, eqx.filter(model, eqx.is_inexact_array))
            return eqx.apply_updates(model, updates), state, val, nfe

        out.append((name, step, (model, state)))
    return out


def homoode_train_steps():
    """`[(name, step, args)]` as `train_steps`, for HomoODE (`field="learned"`: the
    field g(z, x) integrated over λ ∈ [0, 1] from the alternating start, the input as
    the condition) against the same ODE written with plain diffrax."""
    z0, target = data()
    x = z0  # the condition
    f = ik.nn.MLPField(STATE, WIDTH, depth=1, input_size=STATE, key=jr.key(1))
    ode = ik.models.ODESolve(rtol=TOL, atol=TOL)
    ik_model = ik.models.HomoODE(f, (STATE,), ode=ode)

    def ik_loss(model):
        z1, st = jax.vmap(lambda a: model(a, return_stats=True))(x)
        return jnp.mean((z1 - target) ** 2), st.nfe

    start = ik.models.alternating_start((STATE,), jnp.float32)

    def plain_loss(field):
        def one(xi):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, z, args: field(z, args)), dfx.Dopri5(), 0.0, 1.0,
                None, start, xi, stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL),
                max_steps=4096, saveat=dfx.SaveAt(t1=True))
            return sol.ys[-1], 6 * sol.stats["num_steps"] + 1

        z1, nfe = jax.vmap(one)(x)
        return jnp.mean((z1 - target) ** 2), nfe

    return _adam_steps([("implicit_kit HomoODE", ik_model, ik_loss),
                        ("diffrax diffeqsolve (the same ODE)", f, plain_loss)])


def jax_rows(adjoint_name, adjoint, repeats, one_ode=False):
    suffix = ", batch as one ODE" if one_ode else ""
    runs = []
    for name, step, (model, state) in train_steps(adjoint, one_ode):
        out = step(model, state)
        nfe = float(jnp.mean(out[3]))

        def run(model=model, state=state, step=step):
            jax.block_until_ready(step(model, state))

        runs.append((name, run, nfe))
    # Interleaved (ABAB...) so that both rows see the same machine load; min per row.
    times = {name: [] for name, _, _ in runs}
    for _, run, _ in runs:
        for _ in range(3):
            run()
    for _ in range(repeats):
        for name, run, _ in runs:
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    rows = [{"row": f"{name} ({adjoint_name}{suffix})", "ms": 1e3 * min(times[name]),
             "nfe": nfe} for name, _, nfe in runs]
    return rows


class _Rows(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, z):
        return jax.vmap(self.mlp)(z)


def torch_rows(repeats):
    try:
        import torch
        from torchdiffeq import odeint, odeint_adjoint
    except ImportError:
        return [{"row": "torchdiffeq", "skipped": "torch/torchdiffeq not installed "
                 "(pip install torch==2.13.0 torchdiffeq)"}]
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    z0, target = (torch.tensor(jax.device_get(a)).to(dev) for a in data())

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(STATE, WIDTH), torch.nn.Tanh(),
                                           torch.nn.Linear(WIDTH, STATE))
            self.nfe = 0

        def forward(self, t, z):
            self.nfe += 1
            return self.net(z)

    rows = []
    t = torch.tensor([0.0, 1.0], device=dev)
    for name, integ in (("odeint", odeint), ("odeint_adjoint", odeint_adjoint)):
        f = F().to(dev)
        opt = torch.optim.Adam(f.parameters(), lr=LR)

        def step(f=f, opt=opt, integ=integ):
            opt.zero_grad()
            z1 = integ(f, z0, t, rtol=TOL, atol=TOL, method="dopri5")[-1]
            loss = ((z1 - target) ** 2).mean()
            loss.backward()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()

        f.nfe = 0
        with torch.no_grad():
            integ(f, z0, t, rtol=TOL, atol=TOL, method="dopri5")
        nfe = f.nfe
        step()
        rows.append({"row": f"torchdiffeq {name} (batch as one ODE)",
                     "ms": timeit(step, repeats), "nfe": nfe})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    a = p.parse_args()
    rows = []
    rows += jax_rows("RecursiveCheckpoint", dfx.RecursiveCheckpointAdjoint(), a.repeats)
    rows += jax_rows("Backsolve", dfx.BacksolveAdjoint(
        stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL)), a.repeats)
    rows += jax_rows("RecursiveCheckpoint", dfx.RecursiveCheckpointAdjoint(), a.repeats,
                     one_ode=True)
    rows += torch_rows(a.repeats)
    meta = {"device": str(jax.devices()[0]), "platform": platform.platform(),
            "jax": jax.__version__, "command": " ".join(["python"] + sys.argv),
            "cpus": os.cpu_count()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"# Neural ODE train step ({meta['device']}; {meta['command']})")
    print("| row | ms / step | forward NFE per sample |")
    print("|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['row']} | skipped: {r['skipped']} | |")
        else:
            print(f"| {r['row']} | {r['ms']:.1f} | {r['nfe']:.1f} |")
    for adj in ("RecursiveCheckpoint", "Backsolve", "RecursiveCheckpoint, batch as one ODE"):
        ik_ms = next(r["ms"] for r in rows if r["row"] == f"implicit_kit NeuralODE ({adj})")
        dx_ms = next(r["ms"] for r in rows if r["row"] == f"diffrax diffeqsolve ({adj})")
        print(f"\noverhead over plain diffrax ({adj}): {ik_ms / dx_ms:.3f}x")


if __name__ == "__main__":
    main()
