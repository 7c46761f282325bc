"""Sparse coding (the lasso) with its implicit gradient: implicit_kit vs jaxopt.

The jaxopt paper's sparse-coding experiment at this machine's scale, in float64: the
codes of B = 256 test digits (8x8, unit norm) over a dictionary D of 64 unit-norm
training digits, w(x) = argmin_w 1/2 ||x - D w||^2 + lam ||w||_1, and the gradient of
the reconstruction loss 1/2 sum_x ||x - D w(x)||^2 with respect to D and lam, the
quantities task-driven dictionary learning follows.

Every row solves to the same accuracy with accelerated proximal gradient (FISTA, step
1/L) and differentiates the proximal-gradient fixed point implicitly:
- implicit_kit: `ik.fixed_point(prox_gradient_map(...), ..., ik.FISTA())` with its
  default implicit adjoint, per sample under vmap (each code stops on its own) and on
  the batch as one problem (one matrix of codes);
- jaxopt 0.8: `ProximalGradient(acceleration=True)` with its default backward
  (normal-equation CG) and with GMRES, per sample and batch as one.
The gradients are checked against the closed form on each code's support, w_S =
(D_S^T D_S)^-1 (D_S^T x - lam sign(w_S)), differentiated with the support held fixed.
Time: value and gradient, jit-compiled, median over interleaved rounds.

Run: python benchmarks/sparse_coding.py [--rounds 7] [--json PATH]
"""

import argparse
import json
import pathlib
import statistics
import sys
import time
import warnings

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import implicit_kit as ik  # noqa: E402
from implicit_kit import optimality as opt  # noqa: E402


B, K, LAM = 256, 64, 0.05
ATOL = 1e-10
MAX_STEPS = 20000


def problem():
    x, _ = ik.data.load("digits", "train", seed=0)
    xt, _ = ik.data.load("digits", "test", seed=0)
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    xt = xt.reshape(xt.shape[0], -1).astype(np.float64)[:B]
    d = x[:K].T / np.linalg.norm(x[:K], axis=1)
    xt = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    return jnp.asarray(d), jnp.asarray(xt)


def lsq(w, args):
    d, x = args
    return 0.5 * jnp.sum((x - d @ w) ** 2)


def lsq_batch(w, args):  # codes as columns: W is (K, B)
    d, x = args
    return 0.5 * jnp.sum((x.T - d @ w) ** 2)


def recon_loss(d, w, x):
    return 0.5 * jnp.sum((x - w @ d.T) ** 2)


def ik_codes(batch):
    def codes(d, lam, x, step):
        if batch:
            t = opt.prox_gradient_map(lsq_batch, opt.prox_lasso, step)
            sol = ik.fixed_point(t, jnp.zeros((K, x.shape[0])), ((d, x), lam),
                                 ik.FISTA(rtol=0.0, atol=ATOL), max_steps=MAX_STEPS)
            return sol.value.T, sol.stats["num_steps"]
        t = opt.prox_gradient_map(lsq, opt.prox_lasso, step)

        def one(xi):
            sol = ik.fixed_point(t, jnp.zeros(K), ((d, xi), lam),
                                 ik.FISTA(rtol=0.0, atol=ATOL), max_steps=MAX_STEPS)
            return sol.value, sol.stats["num_steps"]

        return jax.vmap(one)(x)

    return codes


def jaxopt_codes(batch, backward):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jaxopt

    solve = {"normal-CG (default)": None,
             "GMRES": jaxopt.linear_solve.solve_gmres}[backward]

    def codes(d, lam, x, step):
        fun = lsq_batch if batch else lsq
        kw = {} if solve is None else {"implicit_diff_solve": solve}
        # jaxopt's error is ||x_{k+1} - x_k|| / step: the same ATOL on the move.
        pg = jaxopt.ProximalGradient(fun=fun, prox=jaxopt.prox.prox_lasso, stepsize=step,
                                     acceleration=True, maxiter=MAX_STEPS,
                                     tol=ATOL / step, implicit_diff=True, **kw)
        if batch:
            out = pg.run(jnp.zeros((K, x.shape[0])), lam, (d, x))
            return out.params.T, out.state.iter_num
        out = jax.vmap(lambda xi: pg.run(jnp.zeros(K), lam, (d, xi)))(x)
        return out.params, out.state.iter_num

    return codes


def closed_form_codes(d, lam, x, w_ref):
    """w_S = (D_S^T D_S)^-1 (D_S^T x - lam s) on each code's support (from `w_ref`, held
    fixed): an independent reference for the codes and, by autodiff, their gradient."""
    support = np.abs(np.asarray(w_ref)) > 1e-9
    sign = np.sign(np.asarray(w_ref))
    rows = []
    for i in range(x.shape[0]):
        s = support[i]
        ds = d[:, s]
        ws = jnp.linalg.solve(ds.T @ ds, ds.T @ x[i] - lam * sign[i, s])
        rows.append(jnp.zeros(K, x.dtype).at[np.flatnonzero(s)].set(ws))
    return jnp.stack(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    a = p.parse_args()
    d, x = problem()
    step = 1.0 / float(jnp.linalg.eigvalsh(d.T @ d)[-1])
    rows_def = [("implicit_kit FISTA + ImplicitAdjoint (default), vmap per sample",
                 ik_codes(False)),
                ("implicit_kit FISTA + ImplicitAdjoint (default), batch as one problem",
                 ik_codes(True))]
    try:
        for backward in ("normal-CG (default)", "GMRES"):
            for batch in (False, True):
                mode = "batch as one problem" if batch else "vmap per sample"
                rows_def.append((f"jaxopt 0.8 ProximalGradient(acceleration=True) + "
                                 f"{backward} backward, {mode}",
                                 jaxopt_codes(batch, backward)))
    except ImportError as e:
        print(f"[skip] jaxopt rows: {e} (pip install '.[bench]')", file=sys.stderr)

    # the reference: the closed form on the support of a tight solve
    w0, _ = jax.jit(ik_codes(True), static_argnums=())(d, LAM, x, step)
    ref_codes = closed_form_codes(d, LAM, x, w0)
    ref_grad = jax.grad(lambda d, lam: recon_loss(d, closed_form_codes(d, lam, x, w0), x),
                        argnums=(0, 1))(d, LAM)

    rows, calls = [], []
    for name, codes in rows_def:
        def value_and_grad(d, lam, codes=codes):
            def loss(d, lam):
                w, n = codes(d, lam, x, step)
                return recon_loss(d, w, x), (w, n)
            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(d, lam)

        f = jax.jit(value_and_grad)
        (_, (w, n)), (gd, glam) = f(d, LAM)
        err_w = float(jnp.max(jnp.abs(w - ref_codes)))
        err_g = max(float(jnp.linalg.norm(gd - ref_grad[0]) / jnp.linalg.norm(ref_grad[0])),
                    float(abs(glam - ref_grad[1]) / abs(ref_grad[1])))
        n = np.asarray(n)
        rows.append(dict(name=name, steps_mean=float(n.mean()), steps_max=int(n.max()),
                         code_err=err_w, grad_rel_err=err_g))
        calls.append(lambda f=f: jax.block_until_ready(f(d, LAM)))
        if name.startswith("implicit_kit"):  # the claim this benchmark stands on
            assert err_g < 1e-6, (name, err_g)
        print(f"{name}: code error {err_w:.1e}, gradient error {err_g:.1e}, steps "
              f"{n.mean():.0f} (max {n.max()})", flush=True)
    times = [[] for _ in calls]
    for _ in range(a.rounds):
        for i, call in enumerate(calls):
            t = time.perf_counter()
            call()
            times[i].append(1e3 * (time.perf_counter() - t))
    for r, t in zip(rows, times):
        r["ms"] = statistics.median(t)
        r["ms_rounds"] = t
        print(f"{r['ms']:9.1f} ms  {r['name']}", flush=True)
    result = dict(batch=B, atoms=K, lam=LAM, atol=ATOL, step=step,
                  support_mean=float(np.mean(np.sum(np.abs(np.asarray(w0)) > 1e-9, 1))),
                  rows=rows)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
