"""ik.block_coordinate_descent and ik.objective: jaxopt's tests/block_cd_test.py problems
against an independent solver (proximal gradient in a Python loop, ik.qp for the SVM dual) and
closed forms, and the implicit gradients against float64 central differences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_kit as ik
from implicit_kit import objective as obj, optimality as opt


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _regression(n=10, p=3, k=None, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, p)
    W = rng.randn(p) if k is None else rng.randn(p, k)
    noise = rng.randn(n) if k is None else rng.randn(n, k)
    return jnp.asarray(X), jnp.asarray(X @ W + 0.5 * noise)


def _prox_gradient_numpy(f, prox, x0, args, hyper, steps=20000):
    """The reference: proximal gradient at step 1/L in NumPy (gradients by jax.grad,
    evaluated eagerly), run to rounding; independent of the sweep."""
    X = np.asarray(args[0])
    lip = np.linalg.norm(X, 2) ** 2 / X.shape[0] * (0.5 if f is obj.multiclass_logreg
                                                     else 0.25 if f is obj.binary_logreg
                                                     else 1.0)
    grad = jax.jit(jax.grad(f))
    step = jax.jit(lambda x: prox(x - grad(x, args) / lip, hyper, 1 / lip))
    x = jnp.asarray(x0)
    for _ in range(steps):
        new = step(x)
        if float(jnp.max(jnp.abs(new - x))) < 1e-14:
            break
        x = new
    return np.asarray(x)


CASES = {  # name: (objective, prox, hyper, data, x0)
    "lasso": (obj.least_squares, opt.prox_lasso, 0.5, _regression(), np.zeros(3)),
    "elastic_net": (obj.least_squares, opt.prox_elastic_net, (0.5, 0.8), _regression(),
                    np.zeros(3)),
    "group_lasso_multitask": (obj.least_squares, opt.prox_group_lasso, 0.3,
                              _regression(50, 10, 3), np.zeros((10, 3))),
    "nnls": (obj.least_squares, opt.prox_non_negative, None, _regression(20, 5),
             np.zeros(5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bcd_matches_proximal_gradient_and_the_implicit_gradient_matches_differences(name):
    f, prox, hyper, (X, y), x0 = CASES[name]
    sol = ik.block_coordinate_descent(f, prox, x0, (X, y), hyper, rtol=0, atol=1e-12,
                                      max_steps=20000)
    ref = _prox_gradient_numpy(f, prox, x0, (X, y), hyper)
    np.testing.assert_allclose(sol.value, ref, atol=1e-9)
    if name == "nnls":
        assert np.any(sol.value == 0) and np.any(sol.value > 0)

    def loss(y):
        w = ik.block_coordinate_descent(f, prox, x0, (X, y), hyper, rtol=0, atol=1e-12,
                                        max_steps=20000).value
        return jnp.sum(jnp.sin(w))

    g = jax.grad(loss)(y)
    for d in np.random.RandomState(1).randn(2, *y.shape):  # directional differences
        fd = (float(loss(y + 1e-6 * d)) - float(loss(y - 1e-6 * d))) / 2e-6
        np.testing.assert_allclose(np.vdot(g, d), fd, rtol=1e-6, atol=1e-8)


def test_lasso_gradient_in_lambda_matches_the_support_closed_form():
    X, y = _regression(20, 6, seed=1)
    lam = 0.3
    solve = lambda lam: ik.block_coordinate_descent(  # noqa: E731
        obj.least_squares, opt.prox_lasso, jnp.zeros(6), (X, y), lam, rtol=0,
        atol=1e-12, max_steps=20000).value
    w = np.asarray(solve(lam))
    S = np.abs(w) > 0
    assert 0 < S.sum() < 6
    n = X.shape[0]
    XS = np.asarray(X)[:, S]
    closed = -np.linalg.solve(XS.T @ XS / n, np.sign(w[S]))
    np.testing.assert_allclose(jax.jacrev(solve)(lam)[S], closed, atol=1e-8)


@pytest.mark.parametrize("multiclass", [False, True], ids=["binary", "multiclass"])
def test_logreg_with_l1_and_l2_matches_proximal_gradient(multiclass):
    rng = np.random.RandomState(0)
    X = jnp.asarray(rng.randn(20, 5))
    y = jnp.asarray(rng.randint(0, 3 if multiclass else 2, 20))
    f = obj.multiclass_logreg if multiclass else obj.binary_logreg
    x0 = np.zeros((5, 3)) if multiclass else np.zeros(5)
    for prox, hyper in ((opt.prox_lasso, 0.02), (opt.prox_ridge, 0.01)):
        sol = ik.block_coordinate_descent(f, prox, x0, (X, y), hyper, rtol=0, atol=1e-11,
                                          max_steps=20000)
        np.testing.assert_allclose(sol.value, _prox_gradient_numpy(f, prox, x0, (X, y),
                                                                   hyper), atol=1e-8)


def test_multiclass_svm_dual_by_bcd_matches_the_qp_and_gives_the_primal():
    rng = np.random.RandomState(0)
    n, k, l2reg = 20, 3, 10.0
    X = jnp.asarray(rng.randn(n, 5))
    Y = jax.nn.one_hot(rng.randint(0, k, n), k, dtype=jnp.float64)
    prox = opt.make_prox_from_projection(lambda b, _: optax.projections.projection_simplex(b))
    sol = ik.block_coordinate_descent(obj.multiclass_linear_svm_dual, prox,
                                      jnp.ones((n, k)) / k, (l2reg, (X, Y)), rtol=0,
                                      atol=1e-12, max_steps=20000)
    # the same dual as a QP over vec(beta): rows on the simplex
    XXT = np.asarray(X @ X.T)
    Q = np.kron(XXT, np.eye(k)) / l2reg
    c = (-(XXT @ np.asarray(Y)) / l2reg + np.asarray(Y) - 1).ravel()
    A = np.kron(np.eye(n), np.ones((1, k)))
    qp = ik.qp.solve(Q, c, A=A, b=np.ones(n), l=0.0, u=1.0,
                     solver=ik.qp.OSQP(rtol=1e-10, atol=1e-10, max_steps=20000))
    # the dual is not strictly convex (rank XX^T < n): compare its value and the primal
    # weights X^T (Y - beta) / l2reg, which are unique
    value = lambda b: obj.multiclass_linear_svm_dual(b, (l2reg, (X, Y)))  # noqa: E731
    beta_qp = qp.value.x.reshape(n, k)
    assert abs(float(value(sol.value)) - float(value(beta_qp))) < 1e-8
    np.testing.assert_allclose(X.T @ (Y - sol.value) / l2reg, X.T @ (Y - beta_qp) / l2reg,
                               atol=1e-6)


def test_objectives_equal_their_formulas():
    rng = np.random.RandomState(0)
    X, w = jnp.asarray(rng.randn(8, 3)), jnp.asarray(rng.randn(3))
    y = jnp.asarray(rng.randn(8))
    np.testing.assert_allclose(obj.least_squares(w, (X, y)),
                               0.5 * np.mean((X @ w - y) ** 2))
    yb = jnp.asarray(rng.randint(0, 2, 8))
    z = np.asarray(X @ w)
    np.testing.assert_allclose(obj.binary_logreg(w, (X, yb)),
                               np.mean(np.log1p(np.exp(z)) - yb * z))
    W = jnp.asarray(rng.randn(3, 4))
    yc = rng.randint(0, 4, 8)
    Z = np.asarray(X @ W)
    lse = np.log(np.exp(Z).sum(1))
    np.testing.assert_allclose(obj.multiclass_logreg(W, (X, jnp.asarray(yc))),
                               np.mean(lse - Z[np.arange(8), yc]))


def test_a_non_composite_objective_is_refused_by_name():
    assert isinstance(obj.least_squares, obj.CompositeLinear)
    with pytest.raises(TypeError, match="objective"):
        ik.block_coordinate_descent(lambda w, a: jnp.sum(w ** 2), opt.prox_lasso,
                                    jnp.zeros(3), None, 1.0)
