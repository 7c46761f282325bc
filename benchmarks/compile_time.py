"""Compile time of the train steps, side by side: what a user waits for at the first call.

Each row is measured in a fresh process (nothing compiled before it but a one-op warm-up
that starts the backend, the same for every row): the seconds to trace and lower the
jitted train step, XLA's compile, and the first step; a row's numbers are the medians
over `--rounds` processes. No persistent compilation cache.

- DEQ: the workload of `deq_train_step.py` (z ∈ R^256, batch 256, Anderson or Picard to
  1e-4, implicit backward), implicit_kit's rows (the library's default `ImplicitAdjoint()`
  with its GMRES fallback, and the fixed-point backward of the benchmark's rows) against
  the peers' rows of that benchmark.
- Neural ODE: the workload of `node_train_step.py` (vmapped per-sample dopri5 solves,
  `RecursiveCheckpointAdjoint`), implicit_kit's `NeuralODE` against plain diffrax.
- HomoODE: the learned homotopy field g(z, x) on the same workload, implicit_kit's
  `HomoODE` against the same ODE written with plain diffrax.

Run: python benchmarks/compile_time.py [--rounds 3] [--only deq] [--json PATH]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time


def deq_rows():
    """{row name: () -> (step, args)}; `deq_train_step`'s peers are optional."""
    import jax.numpy as jnp
    import optimistix as optx
    from _common import IK_DEFAULT, IK_PICARD
    from deq_train_step import (
        hand_picard_solve,
        ik_batch_solve,
        ik_solve,
        jax_train_step,
        jaxopt_picard_backward,
        jaxopt_solve,
        make_problem,
        MAX_STEPS,
        optx_solve,
        PicardLinearSolver,
        RTOL,
    )

    import implicit_kit as ik

    def row(solve):
        def build():
            params, x, y = make_problem(256)
            return jax_train_step(solve()), (params, ik.backward_probe(jnp.float32), x, y)

        return build

    picard = ik.Picard(rtol=RTOL, atol=0.0)
    anderson = ik.Anderson(m=5, rtol=RTOL, atol=0.0)
    fp = ik.ImplicitAdjoint(picard, max_steps=MAX_STEPS)
    rows = {
        "implicit_kit Anderson(m=5) + ImplicitAdjoint() (the library's defaults: Picard, "
        "GMRES where it fails), vmap": row(lambda: ik_solve(
            anderson, ik.ImplicitAdjoint(max_steps=MAX_STEPS))),
        IK_DEFAULT: row(lambda: ik_solve(anderson, fp)),
        IK_PICARD: row(lambda: ik_solve(picard, fp)),
        # the same algorithm and batching as the hand-written row: like for like
        "implicit_kit Picard + ImplicitAdjoint(Picard), batch as one problem":
            row(lambda: ik_batch_solve(picard, fp)),
        "hand-written JAX Picard + custom_vjp (fixed-point backward), batch as one problem":
            row(hand_picard_solve),
        "optimistix FixedPointIteration + ImplicitAdjoint() (dense LU), vmap":
            row(lambda: optx_solve(optx.ImplicitAdjoint())),
        "optimistix FixedPointIteration + ImplicitAdjoint(fixed-point lineax solver), vmap":
            row(lambda: optx_solve(optx.ImplicitAdjoint(linear_solver=PicardLinearSolver()))),
    }
    try:
        import jaxopt  # noqa: F401
    except ImportError:
        return rows
    tol = RTOL * 16.0  # the scale of ‖z‖; tolerances do not change what is compiled
    rows["jaxopt AndersonAcceleration(m=5) + fixed-point backward, vmap"] = row(
        lambda: jaxopt_solve(tol, jaxopt_picard_backward))
    rows["jaxopt AndersonAcceleration(m=5) (normal-CG backward), vmap"] = row(
        lambda: jaxopt_solve(tol))
    return rows


def ode_rows():
    import diffrax as dfx
    from node_train_step import homoode_train_steps, train_steps

    def pick(steps, i, workload):
        def build():
            _, step, args = steps()[i]
            return step, args

        return workload, build

    rows = {}
    for i, name in enumerate(["implicit_kit NeuralODE", "diffrax diffeqsolve"]):
        rows[f"{name} (RecursiveCheckpoint)"] = pick(
            lambda: train_steps(dfx.RecursiveCheckpointAdjoint()), i, "node")
    for i, name in enumerate(["implicit_kit HomoODE", "diffrax diffeqsolve (the same ODE)"]):
        rows[name] = pick(homoode_train_steps, i, "homoode")
    return rows


def workloads():
    out = {name: ("deq", build) for name, build in deq_rows().items()}
    out.update(ode_rows())
    return out


def measure(name):
    """(trace + lower s, compile s, first step s) of the row `name`, in this process."""
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jax.jit(lambda a: a + 1)(jnp.ones(3)))  # start the backend
    _, build = workloads()[name]
    step, args = build()
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated workloads: deq,node,homoode")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in this process
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.row is not None:
        print(json.dumps(measure(a.row)))
        return
    names = {n: w for n, (w, _) in workloads().items()
             if a.only is None or w in a.only.split(",")}
    per = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names:  # every row once per round, so that drift hits all alike
            out = subprocess.run([sys.executable, __file__, "--row", n], check=True,
                                 capture_output=True, text=True).stdout
            per[n].append(json.loads(out.strip().splitlines()[-1]))
        print(f"[round {r + 1}/{a.rounds} done]", file=sys.stderr, flush=True)
    rows = []
    for n, w in names.items():
        trace, comp, first = (statistics.median(v) for v in zip(*per[n]))
        total = [sum(t) for t in per[n]]
        rows.append(dict(workload=w, row=n, trace_s=trace, compile_s=comp, first_step_s=first,
                         total_s=statistics.median(total), total_rounds=total))
    for r in rows:
        print(f"{r['workload']:8s} {r['total_s']:6.2f} s (trace {r['trace_s']:.2f}, compile "
              f"{r['compile_s']:.2f}, step {r['first_step_s']:.2f})  {r['row']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rounds": a.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
