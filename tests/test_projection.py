"""ik.projection and the pytree proximal operators of ik.optimality: the projections
against closed forms, ik.qp, an independent Sinkhorn and float64 central differences
(jaxopt's tests/projection_test.py and prox_test.py ported where they have a counterpart)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from implicit_kit import optimality as opt, projection as proj


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _fd_jac(f, x, eps=1e-6):
    x = np.asarray(x, float)
    cols = []
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = eps
        cols.append((np.asarray(f(x + e.reshape(x.shape))) -
                     np.asarray(f(x - e.reshape(x.shape)))).ravel() / (2 * eps))
    return np.stack(cols, axis=-1)


def test_l2_ball_has_jaxopts_derivative_on_the_sphere_and_takes_pytrees():
    x = jnp.array([0.6, 0.8])  # on the unit sphere
    np.testing.assert_allclose(jax.jacrev(proj.l2_ball)(x), np.eye(2), atol=0)
    optax_jac = jax.jacrev(optax.projections.projection_l2_ball)(x)
    assert np.abs(optax_jac - np.eye(2)).max() > 0.1  # the convention differs there
    y = jnp.array([3.0, 4.0])
    yh = np.asarray(y) / 5
    np.testing.assert_allclose(jax.jacrev(proj.l2_ball)(y, 2.0),
                               2 / 5 * (np.eye(2) - np.outer(yh, yh)), atol=1e-12)
    tree = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    out = proj.l2_ball(tree, 1.0)
    np.testing.assert_allclose([out["a"][0], out["b"][0]], [0.6, 0.8], atol=1e-12)


def test_box_takes_shared_and_per_leaf_bounds():
    x = {"a": jnp.array([-2.0, 0.5]), "b": jnp.array([3.0])}
    out = proj.box(x, 0.0, 1.0)
    np.testing.assert_allclose(out["a"], [0.0, 0.5])
    np.testing.assert_allclose(out["b"], [1.0])
    out = proj.box(x, {"a": -5.0, "b": 0.0}, {"a": 0.0, "b": 2.0})
    np.testing.assert_allclose(out["a"], [-2.0, 0.0])
    np.testing.assert_allclose(out["b"], [2.0])


def test_affine_set_and_polyhedron_against_closed_forms_and_differences():
    rng = np.random.RandomState(0)
    x, A, b = rng.randn(5), rng.randn(3, 5), rng.randn(3)
    p = proj.affine_set(x, A, b)
    closed = x - A.T @ np.linalg.solve(A @ A.T, A @ x - b)
    np.testing.assert_allclose(p, closed, atol=1e-12)
    np.testing.assert_allclose(jax.jacrev(proj.affine_set)(x, A, b),
                               np.eye(5) - A.T @ np.linalg.solve(A @ A.T, A), atol=1e-10)
    G, h = rng.randn(2, 5), rng.randn(2)
    p = proj.polyhedron(x, A, b, G, h)
    np.testing.assert_allclose(A @ p, b, atol=1e-10)
    assert np.all(G @ p <= h + 1e-10)
    # against the QP's own active-set closed form
    act = G @ p > h - 1e-9
    K = np.concatenate([A, G[act]])
    P = np.eye(5) - K.T @ np.linalg.solve(K @ K.T, K)
    np.testing.assert_allclose(jax.jacrev(proj.polyhedron)(x, A, b, G, h), P, atol=1e-8)
    fd = _fd_jac(lambda h: proj.polyhedron(x, A, b, G, h), h)
    np.testing.assert_allclose(jax.jacrev(proj.polyhedron, argnums=4)(x, A, b, G, h), fd,
                               atol=1e-7)


def test_polyhedron_infeasible_raises_under_jit_and_is_nan_without_throw():
    A = jnp.array([[1.0, 1.0], [0.0, 1.0], [-1.0, 1.0]])
    b = jnp.array([1.0, 1.0, -1.0])
    G, h = -jnp.eye(2), jnp.zeros(2)
    with pytest.raises(Exception, match="infeasible"):
        jax.jit(proj.polyhedron)(jnp.zeros(2), A, b, G, h)
    assert np.all(np.isnan(proj.polyhedron(jnp.zeros(2), A, b, G, h, throw=False)))


def test_box_section_against_the_qp_the_simplex_and_differences():
    x, w = jnp.array([1.2, 3.0, 0.7]), jnp.array([1.0, 2.0, 3.0])
    alpha, beta, c = jnp.zeros(3), 0.8 * jnp.ones(3), 1.0
    p = proj.box_section(x, alpha, beta, w, c)
    assert abs(float(w @ p) - c) < 1e-12
    import scipy.optimize

    ref = scipy.optimize.minimize(
        lambda q: 0.5 * np.sum((q - np.asarray(x)) ** 2), np.full(3, 0.2),
        jac=lambda q: q - np.asarray(x), bounds=[(0.0, 0.8)] * 3, method="SLSQP",
        constraints=[{"type": "eq", "fun": lambda q: np.asarray(w) @ q - c}],
        options={"ftol": 1e-15, "maxiter": 500})
    assert ref.success
    np.testing.assert_allclose(p, ref.x, atol=1e-7)
    fd = _fd_jac(lambda x: proj.box_section(x, alpha, beta, w, c), x)
    np.testing.assert_allclose(jax.jacrev(proj.box_section)(x, alpha, beta, w, c), fd,
                               atol=1e-7)
    fd_w = _fd_jac(lambda w: proj.box_section(x, alpha, beta, w, c), w)
    np.testing.assert_allclose(jax.jacrev(proj.box_section, argnums=3)(
        x, alpha, beta, w, c), fd_w, atol=1e-7)
    # the simplex (jaxopt's test_projection_box_section_simplex)
    y = jnp.asarray(np.random.RandomState(0).rand(5))
    one = jnp.ones(5)
    np.testing.assert_allclose(proj.box_section(y, 0 * one, one, one, 1.0),
                               optax.projections.projection_simplex(y), atol=1e-12)
    np.testing.assert_allclose(
        jax.jacrev(proj.box_section)(y, 0 * one, one, one, 1.0),
        jax.jacrev(optax.projections.projection_simplex)(y), atol=1e-10)
    with pytest.raises(Exception, match="empty"):
        proj.box_section(x, alpha + 1.5, beta + 1.5, w, 1.0)
    with pytest.raises(Exception, match="empty"):
        proj.box_section(x, alpha, beta - 1.5, w, 1.0)


def test_sparse_simplex_is_the_simplex_of_the_top_k_with_sparsemax_jacobian():
    x = jax.random.normal(jax.random.PRNGKey(0), (100,), jnp.float64)
    for value in (1.0, 2.0):
        p = proj.sparse_simplex(x, 10, value)
        np.testing.assert_allclose(proj.sparse_simplex(x, 10, value, approximate=True), p)
        idx = np.argsort(-np.asarray(x))[:10]
        ref = np.zeros(100)
        ref[idx] = optax.projections.projection_simplex(x[idx], value)
        np.testing.assert_allclose(p, ref, atol=1e-12)
        assert np.count_nonzero(p) <= 10 and abs(float(p.sum()) - value) < 1e-12
    J = jax.jacrev(lambda x: proj.sparse_simplex(x, 10))(x)
    s = (np.asarray(proj.sparse_simplex(x, 10)) > 0).astype(float)
    np.testing.assert_allclose(J, np.diag(s) - np.outer(s, s) / s.sum(), atol=1e-12)


def _sinkhorn_numpy(S, a, b, iters=5000):
    """jaxopt's test reference (tests/projection_test.py::_sinkhorn), eps = 1."""
    K = np.exp(S)
    f = np.zeros_like(a)
    for _ in range(iters):
        g = np.log(b) - np.log(K.T @ np.exp(f))
        f = np.log(a) - np.log(K @ np.exp(g))
    return np.exp(f)[:, None] * K * np.exp(g)


def test_transport_exact_and_entropic_against_references_and_differences():
    rng = np.random.RandomState(0)
    S = rng.rand(3, 4)
    a, b = rng.rand(3), rng.rand(4)
    a, b = a / a.sum(), b / b.sum()
    for P in (proj.transport(S, a, b), proj.kl_transport(S, a, b)):
        np.testing.assert_allclose(P.sum(1), a, atol=1e-9)
        np.testing.assert_allclose(P.sum(0), b, atol=1e-9)
        assert np.all(np.asarray(P) >= -1e-12)
    np.testing.assert_allclose(proj.kl_transport(S, a, b), _sinkhorn_numpy(S, a, b),
                               atol=1e-10)
    # the exact one is the minimiser of ||P - S||^2 on the polytope: against scipy
    import scipy.optimize

    ref = scipy.optimize.minimize(
        lambda p: 0.5 * np.sum((p - S.ravel()) ** 2), np.full(12, 1 / 12),
        jac=lambda p: p - S.ravel(), bounds=[(0, None)] * 12, method="SLSQP",
        constraints=[{"type": "eq", "fun": lambda p: p.reshape(3, 4).sum(1) - a},
                     {"type": "eq", "fun": lambda p: p.reshape(3, 4).sum(0)[:-1] - b[:-1]}],
        options={"ftol": 1e-15, "maxiter": 1000})
    assert ref.success
    np.testing.assert_allclose(proj.transport(S, a, b), ref.x.reshape(3, 4), atol=1e-7)
    W = rng.normal(size=S.shape)
    dS = rng.normal(size=S.shape)
    da = np.array([1.0, -1.0, 0.0])  # keeps sum a = sum b
    for f in (proj.transport, proj.kl_transport):
        def loss(S, a, f=f):
            return jnp.sum(W * f(S, a, b) ** 2)
        gS, ga = jax.grad(loss, argnums=(0, 1))(jnp.asarray(S), jnp.asarray(a))
        fd = (loss(S + 1e-6 * dS, a) - loss(S - 1e-6 * dS, a)) / 2e-6
        np.testing.assert_allclose(np.vdot(gS, dS), fd, rtol=1e-6, err_msg=f.__name__)
        fd = (loss(S, a + 1e-6 * da) - loss(S, a - 1e-6 * da)) / 2e-6
        np.testing.assert_allclose(np.vdot(ga, da), fd, rtol=1e-6, atol=1e-9,
                                   err_msg=f.__name__)


def test_birkhoff_projections_are_doubly_stochastic_and_fix_doubly_stochastic_inputs():
    S = np.random.RandomState(0).rand(3, 3)
    S = 0.5 * (S + S.T)
    for P in (proj.birkhoff(S), proj.kl_birkhoff(S)):
        np.testing.assert_allclose(P.sum(0), np.ones(3), atol=1e-9)
        np.testing.assert_allclose(P.sum(1), np.ones(3), atol=1e-9)
    D = jnp.array([[0.6, 0.4, 0.0], [0.4, 0.6, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(proj.birkhoff(D), D, atol=1e-10)
    np.testing.assert_allclose(proj.kl_birkhoff(jnp.log(D)), D, atol=1e-10)
    np.testing.assert_allclose(proj.birkhoff(20.0 * jnp.eye(3)), np.eye(3), atol=1e-10)


# -- proximal operators on pytrees (jaxopt's prox_test.py) ----------------------------------


PROXES = [opt.prox_none, opt.prox_lasso, opt.prox_non_negative_lasso, opt.prox_ridge,
          opt.prox_non_negative_ridge, opt.prox_elastic_net, opt.prox_group_lasso,
          opt.prox_non_negative]


@pytest.mark.parametrize("prox", PROXES, ids=lambda p: p.__name__)
def test_proxes_take_pytrees_with_shared_or_per_leaf_hyperparameters(prox):
    rng = np.random.RandomState(0)
    x = dict(a=jnp.asarray(rng.randn(4, 3)), b=jnp.asarray(rng.randn(3)))
    got = prox(x, None, 0.7)
    for k in x:
        np.testing.assert_allclose(got[k], prox(x[k], None, 0.7), atol=0)
    if prox is opt.prox_elastic_net:
        hyper = ({"a": 0.3, "b": 0.1}, {"a": 2.0, "b": 1.0})
        got = prox(x, hyper, 0.7)
        np.testing.assert_allclose(got["a"], prox(x["a"], (0.3, 2.0), 0.7))
        np.testing.assert_allclose(got["b"], prox(x["b"], (0.1, 1.0), 0.7))
    elif prox not in (opt.prox_none, opt.prox_non_negative):
        got = prox(x, {"a": 0.3, "b": 2.0}, 0.7)
        np.testing.assert_allclose(got["a"], prox(x["a"], 0.3, 0.7))
        np.testing.assert_allclose(got["b"], prox(x["b"], 2.0, 0.7))


def _brute(g, x, step):
    grid = np.linspace(-4, 4, 80001)
    return np.array([grid[np.argmin(0.5 * (grid - v) ** 2 + step * g(grid))] for v in x])


def test_new_proxes_are_the_argmin_of_their_definitions():
    x, s, lam = np.array([-2.0, -0.3, 0.1, 0.9, 2.5]), 0.7, 0.6
    big = np.inf
    cases = [
        (opt.prox_none, None, lambda z: 0 * z),
        (opt.prox_ridge, lam, lambda z: 0.5 * lam * z ** 2),
        (opt.prox_non_negative_ridge, lam, lambda z: np.where(z >= 0, 0.5 * lam * z ** 2,
                                                              big)),
        (opt.prox_non_negative_lasso, lam, lambda z: np.where(z >= 0, lam * z, big)),
    ]
    for prox, hyper, g in cases:
        np.testing.assert_allclose(prox(jnp.asarray(x), hyper, s), _brute(g, x, s),
                                   atol=2e-4, err_msg=prox.__name__)
    np.testing.assert_allclose(opt.prox_ridge(jnp.asarray(x), 1.0, 1.0), x / 2)
    simplex = opt.make_prox_from_projection(
        lambda y, _: optax.projections.projection_simplex(y))
    np.testing.assert_allclose(simplex(jnp.asarray(x), None, 3.0),
                               optax.projections.projection_simplex(jnp.asarray(x)))
