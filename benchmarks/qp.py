"""Quadratic programs: implicit_kit's `ik.qp.solve` (OSQP's ADMM) against jaxopt's
`BoxOSQP` and `OSQP`, on the same problems in one run (float64, jit-compiled).

Problems (jaxopt's `tests/osqp_test.py::get_random_osqp_problem`, Q = MᵀM + 1e-2 I so
that the solution is unique and the reference exact):
- `random 50`: 50 variables, 10 equalities, 30 two-sided inequalities;
- `random 200`: 200 variables, 30 equalities, 70 inequalities (jaxopt's `lu` test);
- `simplex layer`: a batch of 64 projections of 30-vectors onto {0 <= p <= 0.2,
  sum p = 1} under vmap (a QP layer's workload), forward and gradient.

The reference solution is certified in NumPy: an ik.qp solve at 1e-12 whose KKT residual
(stationarity, feasibility, complementarity, dual signs) is below 1e-9, and whose
gradient is the closed form of its active set, dx/dc = -[Q K_A^T; K_A 0]^-1[:n, :n].
Reported per row: ms for the solve, ms for the solve and the gradient of a loss of x
in c (implicit differentiation), the ADMM iterations (the largest over the batch), the
error of x and the relative error of the gradient against the reference. jaxopt appears
at its defaults (tol 1e-3, CG inner solves, normal-equation CG backward) and at its best
configuration for these problems (tol 1e-6, LU inner solves, GMRES backward at 1e-10).

Run: python benchmarks/qp.py [--rounds 7] [--json PATH]
"""

import argparse
import json
import pathlib
import sys
import time
import warnings
from functools import partial

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import interleaved  # noqa: E402

import implicit_kit as ik  # noqa: E402


EQ_ROWS = {}  # K's shape -> its equality rows (static, for jaxopt's OSQP form)


def random_problem(n, me, mi):
    """jaxopt's generator (BoxOSQP form: lo <= K x <= hi, equalities as lo = hi rows),
    with 1e-2 I added to Q."""
    np.random.seed(n + me + mi)
    EQ_ROWS[(mi + me, n)] = np.arange(mi + me) >= mi
    M = np.random.randn(n, n)
    Q = M.T @ M + 1e-2 * np.eye(n)
    c = np.random.randn(n)
    K = np.random.randn(mi + me, n)
    lo = np.random.randn(mi)
    hi = lo + np.abs(np.random.randn(mi))
    b = np.random.randn(me)
    return Q, c, K, np.concatenate([lo, b]), np.concatenate([hi, b])


def kkt_residual(Q, c, K, lo, hi, x, lam):
    """The largest violation of the KKT conditions, in NumPy (lam > 0 at hi)."""
    kx = K @ x
    stat = Q @ x + c + K.T @ lam
    feas = np.maximum(np.maximum(lo - kx, kx - hi), 0)
    comp = np.where(lam > 0, np.abs(lam * (kx - hi)), np.abs(lam * (kx - lo)))
    comp = np.where(lo == hi, 0.0, comp)
    return max(np.abs(stat).max(), feas.max(), comp.max())


def reference(Q, c, K, lo, hi):
    sol = ik.qp.solve(Q, c, G=K, l=lo, u=hi, solver=ik.qp.OSQP(rtol=1e-12, atol=1e-12,
                                                                max_steps=100_000))
    x, _, lam = (np.asarray(v) for v in sol.value)
    res = kkt_residual(Q, c, K, lo, hi, x, lam)
    assert res < 1e-9, res
    act = (np.abs(lam) > 1e-9) | (lo == hi)
    KA = K[act]
    k, n = KA.shape[0], len(c)
    kkt = np.block([[Q, KA.T], [KA, np.zeros((k, k))]])
    jac_c = -np.linalg.inv(kkt)[:n, :n]  # dx/dc
    return x, jac_c, res


def ik_rows():
    return [
        ("implicit_kit ik.qp.solve, OSQP() (default: rtol = atol = 1e-6, polished)",
         ik.qp.OSQP()),
        ("implicit_kit ik.qp.solve, OSQP(rtol=0, atol=1e-3, polish=False) (jaxopt's "
         "default tolerance)", ik.qp.OSQP(rtol=0.0, atol=1e-3, polish=False)),
    ]


def ik_solve(solver):
    def run(Q, c, K, lo, hi):
        sol = ik.qp.solve(Q, c, G=K, l=lo, u=hi, solver=solver, throw=False)
        return sol.value.x, sol.stats["num_steps"]
    return run


def jaxopt_rows():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jaxopt

    def box(**kw):
        solver = jaxopt.BoxOSQP(**kw)

        def run(Q, c, K, lo, hi):
            out = solver.run(None, params_obj=(Q, c), params_eq=K, params_ineq=(lo, hi))
            return out.params.primal[0], out.state.iter_num
        return run

    def general(**kw):
        solver = jaxopt.OSQP(**kw)

        def run(Q, c, K, lo, hi):  # equalities apart, l <= Kx <= u as two one-sided rows
            eq = EQ_ROWS[K.shape]
            A, b = K[eq], lo[eq]
            G = jnp.concatenate([K[~eq], -K[~eq]])
            h = jnp.concatenate([hi[~eq], -lo[~eq]])
            out = solver.run(None, params_obj=(Q, c), params_eq=(A, b), params_ineq=(G, h))
            return out.params.primal, out.state.iter_num
        return run

    best = dict(tol=1e-6, eq_qp_solve="lu",
                implicit_diff_solve=partial(jaxopt.linear_solve.solve_gmres, tol=1e-10))
    return [
        ("jaxopt 0.8 BoxOSQP() (default: tol 1e-3, CG, normal-CG backward)", box(), "box"),
        ("jaxopt 0.8 BoxOSQP(tol=1e-6, eq_qp_solve='lu', GMRES 1e-10 backward)",
         box(**best), "box"),
        ("jaxopt 0.8 OSQP() (default: tol 1e-3, CG, normal-CG backward)", general(),
         "general"),
        ("jaxopt 0.8 OSQP(tol=1e-6, eq_qp_solve='lu', GMRES 1e-10 backward)",
         general(**best), "general"),
    ]


def all_rows():
    rows = [(name, ik_solve(s)) for name, s in ik_rows()]
    try:
        rows += [(name, run) for name, run, _ in jaxopt_rows()]
    except ImportError as e:
        print(f"[skip] jaxopt rows: {e} (pip install '.[bench]')", file=sys.stderr)
    return rows


def single_problem(name, problem, rounds):
    Q, c, K, lo, hi = (jnp.asarray(v) for v in problem)
    x_ref, jac_ref, certificate = reference(*problem)
    w = jnp.asarray(np.random.default_rng(0).normal(size=len(c)))
    out, fns = [], []
    for row, run in all_rows():
        fwd = jax.jit(lambda c, run=run: run(Q, c, K, lo, hi))
        grad = jax.jit(jax.grad(lambda c, run=run: jnp.vdot(w, run(Q, c, K, lo, hi)[0])))
        x, steps = fwd(c)
        g = grad(c)
        out.append(dict(name=row, steps=int(steps),
                        x_err=float(np.abs(np.asarray(x) - x_ref).max()),
                        grad_err=float(np.abs(np.asarray(g) - jac_ref.T @ np.asarray(w)).max()
                                       / np.abs(jac_ref.T @ np.asarray(w)).max())))
        fns += [lambda f=fwd: jax.block_until_ready(f(c)),
                lambda f=grad: jax.block_until_ready(f(c))]
        print(name, out[-1], flush=True)
    times = interleaved(fns, rounds)
    for i, r in enumerate(out):
        r["ms"], r["grad_ms"] = times[2 * i], times[2 * i + 1]
    return dict(problem=name, n=int(len(c)), rows=out, certificate=float(certificate))


def layer_problem(rounds, batch=64, n=30, cap=0.2):
    """A batch of projections onto {0 <= p <= cap, sum p = 1}, under vmap."""
    X = jnp.asarray(np.random.default_rng(1).normal(size=(batch, n)))
    EQ_ROWS[(n + 1, n)] = np.arange(n + 1) == 0
    K = jnp.concatenate([jnp.ones((1, n)), jnp.eye(n)])
    lo = jnp.concatenate([jnp.ones(1), jnp.zeros(n)])
    hi = jnp.concatenate([jnp.ones(1), jnp.full(n, cap)])
    Q = jnp.eye(n)
    refs = [reference(np.eye(n), -np.asarray(x), np.asarray(K), np.asarray(lo),
                      np.asarray(hi)) for x in X]
    x_ref = np.stack([r[0] for r in refs])
    w = jnp.asarray(np.random.default_rng(2).normal(size=(batch, n)))
    g_ref = np.stack([-(r[1].T @ np.asarray(wi)) for r, wi in zip(refs, w)])  # d/dx = -d/dc
    out, fns = [], []
    for row, run in all_rows():
        def proj(x, run=run):
            return run(Q, -x, K, lo, hi)
        fwd = jax.jit(jax.vmap(proj))
        grad = jax.jit(jax.grad(lambda X, proj=proj: jnp.vdot(w, jax.vmap(proj)(X)[0])))
        p, steps = fwd(X)
        g = grad(X)
        out.append(dict(name=row, steps=int(np.max(steps)),
                        x_err=float(np.abs(np.asarray(p) - x_ref).max()),
                        grad_err=float(np.abs(np.asarray(g) - g_ref).max()
                                       / np.abs(g_ref).max())))
        fns += [lambda f=fwd: jax.block_until_ready(f(X)),
                lambda f=grad: jax.block_until_ready(f(X))]
        print("layer", out[-1], flush=True)
    times = interleaved(fns, rounds)
    for i, r in enumerate(out):
        r["ms"], r["grad_ms"] = times[2 * i], times[2 * i + 1]
    return dict(problem=f"simplex layer ({batch} x {n}, vmap)", n=n, rows=out,
                certificate=float(max(r[2] for r in refs)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=pathlib.Path)
    a = parser.parse_args()
    t0 = time.perf_counter()
    problems = [single_problem("random 50", random_problem(50, 10, 30), a.rounds),
                single_problem("random 200", random_problem(200, 30, 70), a.rounds),
                layer_problem(a.rounds)]
    out = dict(problems=problems, seconds=time.perf_counter() - t0)
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
