"""Porting jaxopt's implicit-differentiation examples: iterations, time and hypergradient
accuracy at jaxopt's own tolerance, side by side in one run (float64, jit-compiled).

1. Dataset distillation (jaxopt's notebook `docs/notebooks/implicit_diff/
   dataset_distillation.md`, on the 8x8 digits instead of MNIST, which is not on this
   machine): the inner problem is l2-regularised multinomial logistic regression
   (`l2_multiclass_logreg`, l2reg 0.1, W from ones) trained on ten images; jaxopt solves
   it with `GradientDescent(tol=1e-3, maxiter=500)`. One outer evaluation: the inner
   solve and the gradient of the training-set cross-entropy in the ten images.
2. The lasso's regularisation (jaxopt's `examples/implicit_diff/lasso_implicit_diff.py`,
   on a synthetic stand-in for the diabetes data, 442 x 10 with unit-norm rows, split
   2:1): the inner lasso solved by `BlockCoordinateDescent(least_squares, prox_lasso,
   maxiter=500)` (tol 1e-4) or `ProximalGradient`; one outer evaluation: the solve and
   d(validation MSE)/d(log lambda).

Rows: jaxopt as the example writes it (its defaults), jaxopt at its best configuration
for the problem, and implicit_kit as the migration table in docs/guide.md translates the
example (the same tolerance), and at its own defaults. "gradient error" is relative to
a reference solved to 1e-12.

Run: python benchmarks/jaxopt_migration.py [--rounds 15] [--json PATH]
"""

import argparse
import json
import pathlib
import sys
import time
import warnings

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optimistix as optx  # noqa: E402
from _common import interleaved  # noqa: E402

import implicit_kit as ik  # noqa: E402
from implicit_kit import objective, optimality  # noqa: E402


def _jaxopt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jaxopt
    return jaxopt


# -- 1. dataset distillation ---------------------------------------------------------------

L2REG = 0.1


def inner_loss(W, args):
    """jaxopt's `objective.l2_multiclass_logreg(W, l2reg, (X, y))`."""
    img, lab = args
    ce = optax.softmax_cross_entropy_with_integer_labels(img @ W, lab).mean()
    return ce + 0.5 * L2REG * jnp.sum(W ** 2)


def distillation_rows():
    x, y = ik.data.load("digits", "train", seed=0)
    X = jnp.asarray(x.reshape(len(x), -1), jnp.float64)
    Y = jnp.asarray(y)
    W0 = jnp.ones((64, 10))
    lab = jnp.arange(10)
    img0 = jax.random.normal(jax.random.PRNGKey(0), (10, 64), jnp.float64) / 64 + \
        jnp.stack([X[Y == k].mean(0) for k in range(10)])

    def outer(W):
        return optax.softmax_cross_entropy_with_integer_labels(X @ W, Y).mean()

    def ik_row(solver):
        def f(img):
            s = ik.minimise(inner_loss, W0, (img, lab), solver, max_steps=500, throw=False)
            return outer(s.value), s.stats["num_steps"]
        return f

    rows = [
        ("implicit_kit ik.minimise(optx.LBFGS(rtol=1e-3, atol=1e-3)) (the table's "
         "translation of tol=1e-3)", ik_row(optx.LBFGS(rtol=1e-3, atol=1e-3))),
        ("implicit_kit ik.minimise default (LBFGS, rtol = atol = 1e-8)", ik_row(None)),
        ("implicit_kit ik.minimise(optx.BFGS(rtol=1e-8, atol=1e-8)) (v0.2's default)",
         ik_row(optx.BFGS(rtol=1e-8, atol=1e-8))),
    ]
    try:
        jaxopt = _jaxopt()

        def jx(solver):
            def f(img):
                out = solver.run(W0, (img, lab))
                return outer(out.params), out.state.iter_num
            return f

        rows += [
            ("jaxopt 0.8 GradientDescent(tol=1e-3, maxiter=500) (the notebook's)",
             jx(jaxopt.GradientDescent(fun=inner_loss, tol=1e-3, maxiter=500))),
            ("jaxopt 0.8 LBFGS(tol=1e-3, maxiter=500)",
             jx(jaxopt.LBFGS(fun=inner_loss, tol=1e-3, maxiter=500))),
        ]
    except ImportError as e:
        print(f"[skip] jaxopt rows: {e} (pip install '.[bench]')", file=sys.stderr)
    ref = jax.grad(lambda i: ik_row(optx.BFGS(rtol=1e-12, atol=1e-12))(i)[0])(img0)
    return rows, img0, ref


# -- 2. the lasso's regularisation ---------------------------------------------------------


def lasso_data():
    """A stand-in for `load_diabetes` + `normalize` + `train_test_split(test_size=0.33)`:
    442 x 10 correlated features with unit-norm rows, targets of the same scale."""
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(442, 10)) @ (np.eye(10) + 0.3 * rng.normal(size=(10, 10)))
    X = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    w = rng.normal(size=10) * 300 * (rng.random(10) < 0.6)
    y = 150 + X @ w + 50 * rng.normal(size=442)
    idx = rng.permutation(442)
    tr, va = idx[:296], idx[296:]
    return tuple(jnp.asarray(v) for v in (X[tr], X[va], y[tr], y[va]))


def lasso_rows():
    X_tr, X_val, y_tr, y_val = lasso_data()
    w0 = jnp.zeros(10)

    def val(w):
        return jnp.mean((X_val @ w - y_val) ** 2)

    def ik_bcd(**kw):
        def f(theta):
            s = ik.block_coordinate_descent(objective.least_squares,
                                            optimality.prox_lasso, w0, (X_tr, y_tr),
                                            jnp.exp(theta), max_steps=500, throw=False,
                                            **kw)
            return val(s.value), s.stats["num_steps"]
        return f

    lip = float(jnp.linalg.norm(X_tr, 2) ** 2 / X_tr.shape[0])

    def ik_fista(atol, step=None):
        t = optimality.prox_gradient_map(objective.least_squares, optimality.prox_lasso,
                                         step)

        def f(theta):
            s = ik.fixed_point(t, w0, ((X_tr, y_tr), jnp.exp(theta)),
                               ik.FISTA(rtol=0.0, atol=atol), max_steps=500, throw=False)
            return val(s.value), s.stats["num_steps"]
        return f

    rows = [
        ("implicit_kit block_coordinate_descent(rtol=0, atol=1e-4) (the table's "
         "translation of tol=1e-4)", ik_bcd(rtol=0.0, atol=1e-4)),
        ("implicit_kit block_coordinate_descent (default: rtol = atol = 1e-6)", ik_bcd()),
        ("implicit_kit FISTA on prox_gradient_map(step=1/L), atol=1e-3/L (the table's "
         "translation of ProximalGradient(tol=1e-3) with its step)",
         ik_fista(1e-3 / lip, 1 / lip)),
        ("implicit_kit FISTA on prox_gradient_map (backtracking, default), atol=1e-3/L",
         ik_fista(1e-3 / lip)),
    ]
    try:
        jaxopt = _jaxopt()

        def jx(solver):
            def f(theta):
                out = solver.run(w0, jnp.exp(theta), (X_tr, y_tr))
                return val(out.params), out.state.iter_num
            return f

        rows += [
            ("jaxopt 0.8 BlockCoordinateDescent(maxiter=500) (the example's, tol 1e-4)",
             jx(jaxopt.BlockCoordinateDescent(fun=jaxopt.objective.least_squares,
                                              block_prox=jaxopt.prox.prox_lasso,
                                              maxiter=500))),
            ("jaxopt 0.8 ProximalGradient(maxiter=500) (the example's --solver pg)",
             jx(jaxopt.ProximalGradient(fun=jaxopt.objective.least_squares,
                                        prox=jaxopt.prox.prox_lasso, maxiter=500))),
        ]
    except ImportError as e:
        print(f"[skip] jaxopt rows: {e} (pip install '.[bench]')", file=sys.stderr)
    ref = jax.grad(lambda t: ik_bcd(rtol=0.0, atol=1e-13)(t)[0])(1.0)
    return rows, jnp.asarray(1.0), ref


def measure(rows, arg, ref, rounds):
    out, fns = [], []
    for name, f in rows:
        g = jax.jit(jax.value_and_grad(f, has_aux=True))
        (_, steps), grad = g(arg)
        err = float(jnp.max(jnp.abs(grad - ref)) / jnp.max(jnp.abs(ref)))
        out.append(dict(name=name, steps=int(steps), grad_err=err))
        fns.append(lambda g=g: jax.block_until_ready(g(arg)))
        print(out[-1], flush=True)
    for r, t in zip(out, interleaved(fns, rounds)):
        r["ms"] = t
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=pathlib.Path)
    a = parser.parse_args()
    t0 = time.perf_counter()
    out = dict(distillation=measure(*distillation_rows(), a.rounds),
               lasso=measure(*lasso_rows(), a.rounds), seconds=time.perf_counter() - t0)
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
