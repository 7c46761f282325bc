"""Multiclass SVM: the regularisation strength tuned by hypergradient through the dual.

The jaxopt paper's first experiment at this machine's scale, in float64. The
Crammer-Singer multiclass linear SVM on the digits (400 training, 200 validation, 360
test images), solved in the dual, beta* = argmin_{rows of beta in the simplex}
1/(2 lam) ||X^T (Y - beta)||^2 + <beta, Y - 1> (jaxopt's `multiclass_linear_svm_dual`),
with primal weights W = X^T (Y - beta*) / lam; the outer loss is the validation
cross-entropy of X_val W. The dual is solved by accelerated projected gradient (FISTA
at step 1/L on `projected_gradient_map`, rows projected onto the simplex by optax) and
differentiated implicitly from the projected-gradient fixed point.

Sections:
- `hypergradient`: d(validation loss)/d(log lam) at lam = 1: implicit_kit against jaxopt's
  `ProjectedGradient` (default normal-CG backward, and GMRES) and against a float64
  central difference of tight solves; time for value + hypergradient.
- `features`: implicit vs unrolled differentiation (implicit_kit's `UnrolledAdjoint`,
  reverse mode through the solver's steps with checkpoints) as the number of features
  grows (centred random Fourier features of the pixels), solves to 1e-6, time and
  agreement.
- `tuning`: 15 Adam steps on log lam (rate 0.3) from lam = 1 against the best of a
  9-point grid, validation and test accuracy.

Run: python benchmarks/svm_hyper.py [--rounds 5] [--json PATH]
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
import optax  # noqa: E402

import implicit_kit as ik  # noqa: E402
from implicit_kit import optimality as opt  # noqa: E402


ATOL = 1e-9
MAX_STEPS = 20000
N_TRAIN, N_VAL = 400, 200


def data(features=None, seed=0):
    x, y = ik.data.load("digits", "train", seed=0)
    xt, yt = ik.data.load("digits", "test", seed=0)
    x = x.reshape(x.shape[0], -1).astype(np.float64) / 16.0
    xt = xt.reshape(xt.shape[0], -1).astype(np.float64) / 16.0
    if features is not None:  # random Fourier features of the pixels
        rng = np.random.default_rng(seed)
        r = rng.normal(size=(64, features)) / 4.0
        b = rng.uniform(0, 2 * np.pi, size=features)
        x = np.sqrt(2.0 / features) * np.cos(x @ r + b)
        xt = np.sqrt(2.0 / features) * np.cos(xt @ r + b)
        mean = x[:N_TRAIN].mean(0)  # centred: the shared component would dominate L
        x, xt = x - mean, xt - mean
    onehot = np.eye(10)
    tr, va = slice(0, N_TRAIN), slice(N_TRAIN, N_TRAIN + N_VAL)
    return dict(x=jnp.asarray(x[tr]), y=jnp.asarray(onehot[y[tr]]),
                xv=jnp.asarray(x[va]), yv=jnp.asarray(y[va]),
                xt=jnp.asarray(xt), yt=jnp.asarray(yt))


def dual(beta, args):
    lam, x, y = args
    v = x.T @ (y - beta)
    return 0.5 / lam * jnp.vdot(v, v) + jnp.vdot(beta, y - 1.0)


def rows_simplex(beta, _):
    return jax.vmap(optax.projections.projection_simplex)(beta)


def weights(beta, lam, x, y):
    return x.T @ (y - beta) / lam


def step_size(x, lam):
    return lam / float(jnp.linalg.norm(x, 2) ** 2)


def ik_solve(adjoint=None, atol=ATOL):
    def solve(lam, d, step):
        t = opt.projected_gradient_map(dual, rows_simplex, step)
        kw = {} if adjoint is None else {"adjoint": adjoint}
        sol = ik.fixed_point(t, jnp.zeros_like(d["y"]), ((lam, d["x"], d["y"]), None),
                             ik.FISTA(rtol=0.0, atol=atol), max_steps=MAX_STEPS, **kw)
        return sol.value, sol.stats["num_steps"]

    return solve


def jaxopt_solve(backward):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jaxopt

    kw = {} if backward is None else {"implicit_diff_solve": backward}

    def solve(lam, d, step):
        pg = jaxopt.ProjectedGradient(
            fun=lambda beta, lam, x, y: dual(beta, (lam, x, y)),
            projection=lambda beta, _: rows_simplex(beta, None), stepsize=step,
            maxiter=MAX_STEPS, tol=ATOL / step, implicit_diff=True, **kw)
        out = pg.run(jnp.zeros_like(d["y"]), None, lam, d["x"], d["y"])
        return out.params, out.state.iter_num

    return solve


def val_loss(solve, d, step):
    def loss(log_lam):
        lam = jnp.exp(log_lam)
        beta, n = solve(lam, d, step)
        scores = d["xv"] @ weights(beta, lam, d["x"], d["y"])
        return optax.softmax_cross_entropy_with_integer_labels(scores, d["yv"]).mean(), n

    return loss


def accuracy(beta, lam, d, split):
    x, y = (d["xv"], d["yv"]) if split == "val" else (d["xt"], d["yt"])
    return float(jnp.mean(jnp.argmax(x @ weights(beta, lam, d["x"], d["y"]), 1) == y))


def timed(fns, rounds):
    out = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            jax.block_until_ready(f())
            out[i].append(1e3 * (time.perf_counter() - t))
    return [statistics.median(t) for t in out]


def hypergradient_section(rounds):
    d = data()
    step = step_size(d["x"], 1.0)
    rows = [("implicit_kit FISTA + ImplicitAdjoint (default)", ik_solve())]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import jaxopt
        rows += [("jaxopt 0.8 ProjectedGradient + normal-CG backward (default)",
                  jaxopt_solve(None)),
                 ("jaxopt 0.8 ProjectedGradient + GMRES backward",
                  jaxopt_solve(jaxopt.linear_solve.solve_gmres))]
    except ImportError as e:
        print(f"[skip] jaxopt rows: {e} (pip install '.[bench]')", file=sys.stderr)
    tight = val_loss(ik_solve(atol=1e-12), d, step)
    h = 1e-5
    fd = (tight(h)[0] - tight(-h)[0]) / (2 * h)
    out, fns = [], []
    for name, solve in rows:
        f = jax.jit(jax.value_and_grad(val_loss(solve, d, step), has_aux=True))
        (value, n), g = f(0.0)
        out.append(dict(name=name, value=float(value), hypergradient=float(g),
                        rel_err_vs_fd=abs(float(g) - float(fd)) / abs(float(fd)),
                        steps=int(n)))
        fns.append(lambda f=f: f(0.0))
        print(out[-1], flush=True)
    assert out[0]["rel_err_vs_fd"] < 1e-6, out[0]
    for r, ms in zip(out, timed(fns, rounds)):
        r["ms"] = ms
    return dict(fd=float(fd), rows=out)


def features_section(sizes, rounds):
    out = []
    for p in sizes:
        d = data(features=p)
        step = step_size(d["x"], 1.0)
        implicit = jax.jit(jax.value_and_grad(val_loss(ik_solve(atol=1e-6), d, step),
                                              has_aux=True))
        unrolled = jax.jit(jax.value_and_grad(val_loss(ik_solve(ik.UnrolledAdjoint(), 1e-6),
                                                       d, step), has_aux=True))
        (_, n), gi = implicit(0.0)
        (_, _), gu = unrolled(0.0)
        ti, tu = timed([lambda: implicit(0.0), lambda: unrolled(0.0)], rounds)
        out.append(dict(features=p, steps=int(n), implicit_ms=ti, unrolled_ms=tu,
                        rel_diff=abs(float(gi) - float(gu)) / abs(float(gi))))
        print(out[-1], flush=True)
    return out


def tuning_section():
    d = data()
    solve = ik_solve()
    grid = []
    for log_lam in np.linspace(-4, 4, 9):
        lam = float(np.exp(log_lam))
        beta, _ = jax.jit(solve, static_argnums=())(lam, d, step_size(d["x"], lam))
        grid.append(dict(lam=lam, val_acc=accuracy(beta, lam, d, "val"),
                         test_acc=accuracy(beta, lam, d, "test"),
                         val_loss=float(val_loss(solve, d, step_size(d["x"], lam))(
                             jnp.log(lam))[0])))
    best = min(grid, key=lambda r: r["val_loss"])
    # the step follows lam (1/L scales with it): recomputed outside the traced function
    log_lam, adam = jnp.asarray(0.0), optax.adam(0.3)
    state = adam.init(log_lam)
    path = []
    for _ in range(15):
        lam = float(jnp.exp(log_lam))
        (v, _), g = jax.value_and_grad(val_loss(solve, d, step_size(d["x"], lam)),
                                       has_aux=True)(log_lam)
        path.append(dict(lam=lam, val_loss=float(v)))
        upd, state = adam.update(g, state)
        log_lam = optax.apply_updates(log_lam, upd)
    lam = float(jnp.exp(log_lam))
    beta, _ = solve(lam, d, step_size(d["x"], lam))
    tuned = dict(lam=lam, val_loss=float(val_loss(solve, d, step_size(d["x"], lam))(
        log_lam)[0]), val_acc=accuracy(beta, lam, d, "val"),
        test_acc=accuracy(beta, lam, d, "test"))
    print("grid best", best, "tuned", tuned, flush=True)
    return dict(grid=grid, grid_best=best, tuned=tuned, path=path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--features", default="64,256,1024")
    p.add_argument("--json")
    a = p.parse_args()
    result = dict(hypergradient=hypergradient_section(a.rounds),
                  features=features_section([int(v) for v in a.features.split(",")],
                                            a.rounds),
                  tuning=tuning_section())
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
