"""ik.qp: QPs with equality and inequality constraints (OSQP's ADMM, box coordinate
descent) against an exact active-set reference, jaxopt's own test problems
(`tests/osqp_test.py`, `tests/cd_qp_test.py` at 2de13bf), infeasibility certificates,
and their KKT gradients against float64 central differences and closed forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_kit as ik
from implicit_kit import optimality as opt


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def active_set_qp(Q, c, A=None, b=None, G=None, l=None, u=None):
    """The exact solution of a small strictly convex QP by enumerating active sets: the
    equality QP of each pattern (lower / upper / inactive per row of G) solved directly,
    kept if primal feasible and dual sign-feasible. Independent of ik.qp."""
    Q, c = np.asarray(Q), np.asarray(c)
    n = len(c)
    A = np.zeros((0, n)) if A is None else np.asarray(A)
    b = np.zeros(0) if b is None else np.asarray(b)
    G = np.zeros((0, n)) if G is None else np.asarray(G)
    l = np.zeros(0) if l is None else np.asarray(l)
    u = np.zeros(0) if u is None else np.asarray(u)
    m = G.shape[0]
    for pattern in itertools.product((0, -1, 1), repeat=m):
        act = [i for i in range(m) if pattern[i]]
        rhs = [u[i] if pattern[i] > 0 else l[i] for i in act]
        if not np.all(np.isfinite(rhs)):
            continue
        K = np.concatenate([A, G[act]])
        k = K.shape[0]
        M = np.block([[Q, K.T], [K, np.zeros((k, k))]])
        try:
            z = np.linalg.solve(M, np.concatenate([-c, b, rhs]))
        except np.linalg.LinAlgError:
            continue
        x, mult = z[:n], z[n:]
        if np.any(G @ x < l - 1e-9) or np.any(G @ x > u + 1e-9):
            continue
        lam = np.zeros(m)
        lam[act] = mult[A.shape[0]:]
        if np.any(lam * np.array(pattern) < -1e-9):
            continue
        return x, mult[:A.shape[0]], lam
    raise AssertionError("no active set fits: the problem is infeasible")


def random_problem(seed, n=4, me=1, m=5):
    """A strictly convex QP with a known feasible point; one row one-sided (l = -inf)."""
    rng = np.random.default_rng(seed)
    B = rng.normal(size=(n, n))
    Q, c = B @ B.T + 0.1 * np.eye(n), rng.normal(size=n)
    A, x_feas = rng.normal(size=(me, n)), rng.normal(size=n)
    G = rng.normal(size=(m, n))
    g = G @ x_feas
    l, u = g - rng.uniform(0.1, 1, m), g + rng.uniform(0.1, 1, m)
    l[0] = -np.inf
    return dict(Q=Q, c=c, A=A, b=A @ x_feas, G=G, l=l, u=u)


@pytest.mark.parametrize("seed", range(6))
def test_osqp_matches_the_active_set_reference_primal_and_dual(seed):
    p = random_problem(seed)
    x_ref, nu_ref, lam_ref = active_set_qp(**p)
    sol = ik.qp.solve(p["Q"], p["c"], A=p["A"], b=p["b"], G=p["G"], l=p["l"], u=p["u"])
    x, nu, lam = sol.value
    assert sol.result == ik.RESULTS.successful
    np.testing.assert_allclose(x, x_ref, atol=1e-9)
    np.testing.assert_allclose(nu, nu_ref, atol=1e-8)
    np.testing.assert_allclose(lam, lam_ref, atol=1e-8)
    assert sol.stats["residual"] < 1e-9


def test_unpolished_admm_meets_its_own_tolerance_and_polishing_reaches_rounding():
    p = random_problem(1)
    x_ref, _, _ = active_set_qp(**p)
    kw = dict(A=p["A"], b=p["b"], G=p["G"], l=p["l"], u=p["u"])
    raw = ik.qp.solve(p["Q"], p["c"], solver=ik.qp.OSQP(polish=False, rtol=0, atol=1e-4),
                      **kw)
    err = np.abs(raw.value.x - x_ref).max()
    assert 1e-12 < err < 1e-2
    polished = ik.qp.solve(p["Q"], p["c"], solver=ik.qp.OSQP(rtol=0, atol=1e-4), **kw)
    assert np.abs(polished.value.x - x_ref).max() < 1e-12


def _fd_grad(f, x, eps=1e-6):
    x = np.asarray(x, float)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


@pytest.mark.parametrize("dense", [True, False], ids=["matrices", "matvecs"])
def test_kkt_gradient_in_every_input_matches_central_differences(dense):
    p = random_problem(3)
    B0 = np.linalg.cholesky(p["Q"] - 0.1 * np.eye(4))
    w = np.random.default_rng(7).normal(size=4)
    mv = None if dense else (lambda M, v: M @ v)

    def loss(B, c, A, b, G, l, u):
        Q = B @ B.T + 0.1 * jnp.eye(4)
        sol = ik.qp.solve(Q, c, A=A, b=b, G=G, l=l, u=u, matvec_Q=mv, matvec_A=mv,
                          matvec_G=mv)
        x, nu, lam = sol.value
        return jnp.vdot(w, x) + jnp.sum(nu ** 2) + jnp.sum(jnp.sin(lam))

    args = [B0, p["c"], p["A"], p["b"], p["G"], p["l"], p["u"]]
    grads = jax.jit(jax.grad(loss, argnums=range(7)))(*args)
    for i, g in enumerate(grads):
        def f(v, i=i):
            a = list(args)
            a[i] = v
            return float(loss(*a))
        x = np.where(np.isfinite(args[i]), args[i], 0.0)
        fd = _fd_grad(lambda v: f(np.where(np.isfinite(args[i]), v, args[i])), x)
        fd = np.where(np.isfinite(args[i]), fd, 0.0)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6, err_msg=f"input {i}")


def test_gradient_closed_forms_of_optnet():
    """Without constraints dx/dc = -Q^-1; with equalities only dx/dc = -Z (Z^T Q Z)^-1
    Z^T (columns of Z spanning null(A)); an inactive bound gets a zero gradient."""
    p = random_problem(2)
    Q, c, A = p["Q"], p["c"], p["A"]
    J = jax.jacrev(lambda c: ik.qp.solve(Q, c).value.x)(c)
    np.testing.assert_allclose(J, -np.linalg.inv(Q), atol=1e-9)
    J = jax.jacrev(lambda c: ik.qp.solve(Q, c, A=A, b=p["b"]).value.x)(c)
    Z = np.linalg.svd(A)[2][A.shape[0]:].T
    np.testing.assert_allclose(J, -Z @ np.linalg.inv(Z.T @ Q @ Z) @ Z.T, atol=1e-9)
    sol = ik.qp.solve(Q, c, A=A, b=p["b"], G=p["G"], l=p["l"], u=p["u"])
    inactive = np.abs(sol.value.lam) < 1e-12
    gu = jax.grad(lambda u: jnp.sum(ik.qp.solve(
        Q, c, A=A, b=p["b"], G=p["G"], l=p["l"], u=u).value.x))(p["u"])
    assert inactive.any() and np.all(gu[inactive] == 0)


# -- jaxopt's test problems (tests/osqp_test.py) ---------------------------------------------


def jaxopt_random_problem(problem_size, eq_constraints, ineq_constraints):
    """`get_random_osqp_problem` of jaxopt's osqp_test.py, in the BoxOSQP form."""
    np.random.seed(problem_size + eq_constraints + ineq_constraints)
    Q = np.random.randn(problem_size, problem_size)
    Q = Q.T.dot(Q)
    c = np.random.randn(problem_size)
    A = np.random.randn(ineq_constraints + eq_constraints, problem_size)
    l = np.random.randn(ineq_constraints)
    u = l + np.abs(np.random.randn(ineq_constraints))
    b = np.random.randn(eq_constraints)
    return Q, c, A, np.concatenate([l, b]), np.concatenate([u, b])


def test_jaxopt_small_qp_and_its_jacobian_against_the_reference():
    Q, c, K, l, u = jaxopt_random_problem(16, 2, 4)
    sol = ik.qp.solve(Q, c, G=K, l=l, u=u, solver=ik.qp.OSQP(atol=1e-5, rtol=0))
    eq = l == u
    x_ref = active_set_qp(Q, c, K[eq], l[eq], K[~eq], l[~eq], u[~eq])[0]
    np.testing.assert_allclose(sol.value.x, x_ref, atol=1e-4)  # upstream's atol

    def ref(c):  # the reference's Jacobian in c: the equality QP of the active set
        x, _, lam = active_set_qp(Q, c, K[eq], l[eq], K[~eq], l[~eq], u[~eq])
        act = np.abs(lam) > 1e-9
        KA = np.concatenate([K[eq], K[~eq][act]])
        k = KA.shape[0]
        M = np.block([[Q, KA.T], [KA, np.zeros((k, k))]])
        return -np.linalg.inv(M)[:16, :16]

    J = jax.jacrev(lambda c: ik.qp.solve(Q, c, G=K, l=l, u=u).value.x)(c)
    np.testing.assert_allclose(J, ref(c), atol=5e-2)  # upstream's atol
    np.testing.assert_allclose(J, ref(c), atol=1e-7)  # ours


def test_jaxopt_qp_eq_and_ineq_gradients():
    """osqp_test.py::test_qp_eq_and_ineq (its derivative checks in Q, c, A_eq, b, G, h),
    against central differences along random directions."""
    Q = 2 * np.array([[2.0, 0.5], [0.5, 1.0]])
    args = [Q, np.array([1.0, 1.0]), np.array([[1.0, 1.0]]), np.array([1.0]),
            np.array([[-1.0, 0.0], [0.0, -1.0]]), np.array([0.0, 0.0])]

    def run(Q, c, A, b, G, h):
        x, nu, lam = ik.qp.solve(0.5 * (Q + Q.T), c, A=A, b=b, G=G, u=h).value
        return jnp.sum(x) + jnp.sum(nu) + jnp.sum(lam ** 2)

    grads = jax.grad(run, argnums=range(6))(*args)
    rng = np.random.default_rng(0)
    for i, g in enumerate(grads):
        d = rng.normal(size=np.shape(args[i]))
        up, down = list(args), list(args)
        up[i], down[i] = args[i] + 1e-6 * d, args[i] - 1e-6 * d
        fd = (float(run(*up)) - float(run(*down))) / 2e-6
        np.testing.assert_allclose(np.vdot(g, d), fd, atol=1e-6, err_msg=f"input {i}")


def test_jaxopt_projection_hyperplane_with_matvecs():
    x, a, b = np.array([1.0, 2.0]), np.array([-0.5, 1.5]), 0.3
    sol = ik.qp.solve(None, -x, matvec_Q=lambda _, v: v, A=a,
                      matvec_A=lambda a, v: jnp.dot(a, v).reshape(1), b=np.array([b]))
    np.testing.assert_allclose(sol.value.x, x - (a @ x - b) / (a @ a) * a, atol=1e-12)


@pytest.mark.parametrize("form", ["BoxOSQP", "OSQP"])
def test_jaxopt_projection_simplex_and_its_jacobian(form):
    def qp_simplex(x):
        n = len(x)
        if form == "OSQP":  # equalities and one-sided inequalities apart
            return ik.qp.solve(jnp.eye(n), -x, A=jnp.ones((1, n)), b=jnp.ones(1),
                               G=-jnp.eye(n), u=jnp.zeros(n)).value.x
        K = jnp.concatenate([jnp.ones((1, n)), -jnp.eye(n)])
        lo = jnp.concatenate([jnp.ones(1), jnp.full(n, -jnp.inf)])
        hi = jnp.concatenate([jnp.ones(1), jnp.zeros(n)])
        return ik.qp.solve(jnp.eye(n), -x, G=K, l=lo, u=hi).value.x

    x = np.random.RandomState(0).randn(10)
    p = optax.projections.projection_simplex(x)
    np.testing.assert_allclose(qp_simplex(jnp.asarray(x)), p, atol=1e-10)
    if form == "OSQP":  # (the other form's Jacobian: test_kkt_gradient_in_every_input)
        s = (p > 0).astype(float)
        sparsemax_jac = np.diag(s) - np.outer(s, s) / s.sum()
        np.testing.assert_allclose(jax.jacrev(qp_simplex)(jnp.asarray(x)), sparsemax_jac,
                                   atol=1e-8)


def test_jaxopt_eq_constrained_qp_with_pytrees():
    rng = np.random.RandomState(0)
    Q = rng.randn(7, 7)
    Q = Q @ Q.T
    A = rng.randn(4, 7)
    tmp = rng.randn(7)
    c = {"foo": tmp[:3], "bar": tmp[3:]}
    b = [[rng.randn(1)] for _ in range(4)]

    def cat(d):
        return jnp.concatenate([d["foo"], d["bar"]])

    def matvec_Q(Q, d):
        r = Q @ cat(d)
        return {"foo": r[:3], "bar": r[3:]}

    def matvec_A(A, d):
        return [[z] for z in jnp.split(A @ cat(d), 4)]

    tree = ik.qp.solve(Q, c, A=A, b=b, matvec_Q=matvec_Q, matvec_A=matvec_A)
    flat_b = np.concatenate([v[0] for v in b])
    x_ref, nu_ref, _ = active_set_qp(Q, cat(c), A, flat_b)
    np.testing.assert_allclose(cat(tree.value.x), x_ref, atol=1e-10)
    np.testing.assert_allclose(np.concatenate([v[0] for v in tree.value.nu]), nu_ref,
                               atol=1e-9)


def test_jaxopt_infeasible_polyhedron_primal_only_and_unbounded():
    A = np.array([[1.0, 1.0], [0.0, 1.0], [-1.0, 1.0]])
    b = np.array([1.0, 1.0, -1.0])
    sol = ik.qp.solve(np.eye(2), np.zeros(2), A=A, b=b, G=-np.eye(2), u=np.zeros(2),
                      throw=False)
    assert sol.result in (ik.RESULTS.qp_primal_infeasible, ik.RESULTS.qp_dual_infeasible)
    # x1 >= 6, x2 >= 6, x1 + x2 <= 11
    sol = ik.qp.solve(np.zeros((2, 2)), np.ones(2), G=np.array([[1, 0], [0, 1], [1, 1.0]]),
                      l=np.array([6, 6, -np.inf]), u=np.array([np.inf, np.inf, 11]),
                      throw=False)
    assert sol.result == ik.RESULTS.qp_primal_infeasible
    # min x1 - 2 x2 + x3 s.t. x1 + x2 >= 0, x3 = 1: unbounded below
    sol = ik.qp.solve(np.zeros((3, 3)), np.array([-1.0, -2.0, 1.0]),
                      G=np.array([[1.0, 1, 0], [0, 0, 1]]), l=np.array([0.0, 1.0]),
                      u=np.array([np.inf, 1.0]), init=np.array([5.0, -3.0, 0.02]),
                      throw=False)
    assert sol.result == ik.RESULTS.qp_dual_infeasible
    with pytest.raises(Exception, match="primal infeasible"):
        ik.qp.solve(np.zeros((2, 2)), np.ones(2), G=np.array([[1, 0], [0, 1], [1, 1.0]]),
                    l=np.array([6, 6, -np.inf]), u=np.array([np.inf, np.inf, 11]))


def test_an_infeasible_problem_has_a_nan_gradient_never_a_silent_one():
    def loss(l):
        sol = ik.qp.solve(np.eye(2), np.ones(2), G=np.array([[1, 0], [0, 1], [1, 1.0]]),
                          l=l, u=np.array([np.inf, np.inf, 11]), throw=False)
        return jnp.sum(sol.value.x)

    assert np.all(np.isnan(jax.grad(loss)(np.array([6.0, 6.0, -np.inf]))))
    assert np.all(np.isfinite(jax.grad(loss)(np.array([5.0, 5.0, -np.inf]))))


def test_jaxopt_lasso_as_a_qp_on_a_pytree_matches_the_support_closed_form():
    rng = np.random.default_rng(0)
    n, d, lam = 10, 3, 0.2
    X, y = rng.normal(size=(n, d)), rng.normal(size=n)

    def qp_lasso(X):  # min ||Xw - y||^2 + 2 n lam 1^T t, r = Xw - y, -t <= w <= t
        c = (jnp.zeros(d), jnp.zeros(n), 2 * n * lam * jnp.ones(d))
        sol = ik.qp.solve(
            None, c, matvec_Q=lambda _, v: (jnp.zeros(d), 2 * v[1], jnp.zeros(d)),
            A=X, matvec_A=lambda X, v: X @ v[0] - v[1], b=y,
            G=None, matvec_G=lambda _, v: (v[0] + v[2], v[0] - v[2]),
            l=(jnp.zeros(d), jnp.full(d, -jnp.inf)), u=(jnp.full(d, jnp.inf), jnp.zeros(d)))
        return sol.value.x[0]

    def closed(X, support, sign):  # the lasso on its support, in NumPy
        XS = X[:, support]
        w = np.zeros(d)
        w[support] = np.linalg.solve(XS.T @ XS / n, XS.T @ y / n - lam * sign)
        return w

    w = np.asarray(qp_lasso(jnp.asarray(X)))
    support = np.abs(w) > 1e-8
    assert 1 <= support.sum() < d  # a sparse solution
    sign = np.sign(w[support])
    np.testing.assert_allclose(w, closed(X, support, sign), atol=1e-9)
    v = np.random.default_rng(1).normal(size=d)
    g = jax.grad(lambda X: jnp.vdot(v, qp_lasso(X)))(jnp.asarray(X))
    D = np.random.default_rng(2).normal(size=X.shape)
    fd = (v @ closed(X + 1e-6 * D, support, sign) - v @ closed(X - 1e-6 * D, support, sign)
          ) / 2e-6
    np.testing.assert_allclose(np.vdot(g, D), fd, rtol=1e-6)


def test_vmap_jit_per_sample_and_warm_start():
    p = random_problem(4)
    cs = p["c"] + np.random.default_rng(1).normal(size=(5, 4))
    kw = dict(A=p["A"], b=p["b"], G=p["G"], l=p["l"], u=p["u"])
    run = jax.jit(jax.vmap(lambda c: ik.qp.solve(p["Q"], c, **kw)))
    sols = run(cs)
    for i in range(5):
        np.testing.assert_allclose(sols.value.x[i], active_set_qp(p["Q"], cs[i], **kw)[0],
                                   atol=1e-9)
    assert len(set(np.asarray(sols.stats["num_steps"]).tolist())) > 1
    cold = ik.qp.solve(p["Q"], cs[0] + 1e-3, **kw)
    x, nu, lam = sols.value
    warm = ik.qp.solve(p["Q"], cs[0] + 1e-3, init=ik.qp.KKTPoint(x[0], nu[0], lam[0]),
                       **kw)
    assert warm.stats["num_steps"] < cold.stats["num_steps"]
    np.testing.assert_allclose(warm.value.x, cold.value.x, atol=1e-10)


def test_matrix_free_cg_path_equals_the_factorised_path():
    Q, c, K, l, u = jaxopt_random_problem(12, 2, 6)
    dense = ik.qp.solve(Q, c, G=K, l=l, u=u)
    free = ik.qp.solve(Q, c, G=K, l=l, u=u, matvec_Q=lambda M, v: M @ v,
                       matvec_G=lambda M, v: M @ v)
    assert free.result == ik.RESULTS.successful
    np.testing.assert_allclose(free.value.x, dense.value.x, atol=1e-8)


@pytest.mark.slow
def test_jaxopt_lu_factorization_problem_200_variables():
    Q, c, K, l, u = jaxopt_random_problem(200, 30, 70)
    sol = ik.qp.solve(Q, c, G=K, l=l, u=u, solver=ik.qp.OSQP(atol=1e-4, rtol=0))
    assert sol.result == ik.RESULTS.successful
    x, _, lam = sol.value
    assert np.abs(Q @ x + c + K.T @ lam).max() < 1e-8
    assert np.all(K @ x >= l - 1e-8) and np.all(K @ x <= u + 1e-8)


# -- BoxCD (jaxopt's cd_qp_test.py) --------------------------------------------------------


def _cd_qp_numpy(Q, c, l, u, tol, maxiter):
    """jaxopt's pure-NumPy reference of cd_qp_test.py."""
    x = np.zeros(Q.shape[0])
    for _ in range(maxiter):
        error = 0
        for i in range(len(x)):
            if Q[i, i] == 0:
                continue
            new = np.clip(x[i] - (Q[i] @ x + c[i]) / Q[i, i], l[i], u[i])
            error += abs(new - x[i])
            x[i] = new
        if error <= tol:
            break
    return x


def test_box_cd_matches_jaxopts_reference_osqp_and_its_jacobian():
    rng = np.random.RandomState(0)
    M = rng.randn(5, 5)
    Q, c = M @ M.T, rng.randn(5)
    l = rng.randn(5)
    u = l + 5 * rng.rand(5)
    sol = ik.qp.solve(Q, c, l=l, u=u, solver=ik.qp.BoxCD())
    np.testing.assert_allclose(sol.value.x, _cd_qp_numpy(Q, c, l, u, 1e-3, 100),
                               atol=1e-3)
    np.testing.assert_allclose(sol.value.x, active_set_qp(Q, c, G=np.eye(5), l=l, u=u)[0],
                               atol=1e-7)
    J = jax.jacrev(lambda c: ik.qp.solve(Q, c, l=l, u=u, solver=ik.qp.BoxCD()).value.x)(c)
    J_osqp = jax.jacrev(lambda c: ik.qp.solve(Q, c, l=l, u=u).value.x)(c)
    np.testing.assert_allclose(J, J_osqp, atol=1e-6)
    free = ~np.isclose(sol.value.x, l) & ~np.isclose(sol.value.x, u)
    closed = np.zeros((5, 5))
    closed[np.ix_(free, free)] = -np.linalg.inv(Q[np.ix_(free, free)])
    np.testing.assert_allclose(J, closed, atol=1e-6)


def test_bad_inputs_are_named():
    Q, c = np.eye(3), np.ones(3)
    with pytest.raises(ValueError, match=r"`A` \(or `matvec_A`\) and `b`"):
        ik.qp.solve(Q, c, A=np.ones((1, 3)))
    with pytest.raises(ValueError, match="Q"):
        ik.qp.solve(np.eye(2), c)
    with pytest.raises(ValueError, match="`l`"):
        ik.qp.solve(Q, c, G=np.ones((2, 3)), l=np.zeros(3))
    with pytest.raises(ValueError, match="BoxCD"):
        ik.qp.solve(Q, c, A=np.ones((1, 3)), b=np.ones(1), solver=ik.qp.BoxCD())
    with pytest.raises(ValueError, match="alpha"):
        ik.qp.OSQP(alpha=2.5)
    with pytest.raises(TypeError, match="solver"):
        ik.qp.solve(Q, c, solver=ik.FISTA())


# -- more of jaxopt's problems: osqp_test.py's SVM, portfolio, NNLS; eq_qp_test.py -------------


def test_jaxopt_binary_kernel_svm_against_scipy():
    """osqp_test.py::test_binary_kernel_svm (sklearn's SVC replaced by scipy's SLSQP on
    the same dual): min 1/2 b^T K b - b^T y s.t. sum b = 0, box by the labels' signs."""
    import scipy.optimize

    rng = np.random.RandomState(0)
    X = rng.randn(30, 8)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.sign(X @ rng.randn(8) + 0.3 * rng.randn(30))
    C = 0.1
    K = X @ X.T
    lo, hi = -np.maximum(-y * C, 0), np.maximum(y * C, 0)
    sol = ik.qp.solve(K, -y, matvec_G=lambda _, b: jnp.concatenate([b, jnp.sum(b)[None]]),
                      l=np.concatenate([lo, [0.0]]), u=np.concatenate([hi, [0.0]]))
    ref = scipy.optimize.minimize(
        lambda b: 0.5 * b @ K @ b - b @ y, np.zeros(30), jac=lambda b: K @ b - y,
        bounds=list(zip(lo, hi)), constraints=[{"type": "eq", "fun": np.sum}],
        method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    assert ref.success
    f = lambda b: 0.5 * b @ K @ b - b @ y  # noqa: E731
    assert f(np.asarray(sol.value.x)) <= f(ref.x) + 1e-10
    np.testing.assert_allclose(sol.value.x, ref.x, atol=1e-5)


def test_jaxopt_portfolio_problem():
    """osqp_test.py::test_jacobi_preconditioner's portfolio (its preconditioner is
    jaxopt-internal; the solve is checked): max mu^T x - x^T Cov x on the simplex."""
    np.random.seed(0)
    F = np.random.randn(10, 3)
    D = np.diag(np.random.uniform(0.0, 3 ** 0.5, 10))
    Cov, mu = 2 * (F @ F.T + D), np.random.randn(10)
    K = np.concatenate([np.ones((1, 10)), np.eye(10)])
    lo = np.concatenate([[1.0], np.zeros(10)])
    hi = np.concatenate([[1.0], np.full(10, np.inf)])
    x = ik.qp.solve(Cov, mu, G=K, l=lo, u=hi).value.x
    np.testing.assert_allclose(x, active_set_qp(Cov, mu, np.ones((1, 10)), np.ones(1),
                                                np.eye(10), np.zeros(10),
                                                np.full(10, np.inf))[0], atol=1e-10)


def test_jaxopt_nnls_on_a_matrix_variable():
    """osqp_test.py::test_NNLS (its `fun` API as matvecs): min ||Y - U W^T||_F^2, W >= 0."""
    np.random.seed(654)
    U = np.maximum(np.random.randn(20, 3), 0)
    W0 = np.maximum(np.random.randn(10, 3), 0)
    Y = U @ W0.T
    sol = ik.qp.solve(None, -2 * Y.T @ U, matvec_Q=lambda _, W: 2 * W @ (U.T @ U), l=0.0)
    np.testing.assert_allclose(sol.value.x, W0, atol=1e-6)  # upstream: 1e-2


def test_jaxopt_eq_qp_matvec_and_pytree_problems():
    """eq_qp_test.py::test_matvec_api, by ik.qp.solve's matvecs on a tuple `x`."""
    rng = np.random.RandomState(0)
    Q = rng.randn(7, 7)
    Q = Q @ Q.T
    A, b, tmp = rng.randn(4, 7), rng.randn(4), rng.randn(7)
    sol = ik.qp.solve(Q, (tmp[:3], tmp[3:]), A=A, b=b,
                      matvec_Q=lambda Q, t: tuple(jnp.split(Q @ jnp.concatenate(t), [3])),
                      matvec_A=lambda A, t: A @ jnp.concatenate(t))
    x, nu = opt.eq_qp(Q, tmp, A, b)
    np.testing.assert_allclose(jnp.concatenate(sol.value.x), x, atol=1e-8)
    np.testing.assert_allclose(sol.value.nu, nu, atol=1e-7)
    # (test_pytree_api, a dict of two problems, is the same path with a dict `x`:
    # test_jaxopt_eq_constrained_qp_with_pytrees)


def test_jaxopt_challenging_eq_qp_is_solved_directly():
    """eq_qp_test.py::test_challenging_problem: 100 variables, 98 equalities, a huge
    condition number (jaxopt needs iterative refinement to reach 1e-1)."""
    np.random.seed(511)
    X = np.random.rand(100, 100)
    Q, c = X @ X.T, np.random.rand(100)
    A, b = np.random.rand(98, 100), np.random.rand(98)
    x, nu = opt.eq_qp(Q, c, A, b)
    assert np.abs(Q @ x + c + A.T @ nu).max() < 1e-1  # upstream's tolerance
    assert np.abs(A @ x - b).max() < 1e-8


def test_a_vmapped_qp_layer_gradient_matches_differences():
    """The QP layer of benchmarks/qp_layer.py (a generalised TV denoiser through its box
    dual, vmapped over a batch): the gradient of the batch loss in D and log lam, which
    reach Q = D D^T, c = -D y and the bounds +-lam, against central differences."""
    n, rng = 8, np.random.default_rng(0)
    Y = jnp.asarray(rng.normal(size=(4, n)))
    target = jnp.asarray(rng.normal(size=(4, n)))

    def loss(D, log_lam):
        def denoise(y):
            u = ik.qp.solve(D @ D.T + 1e-6 * jnp.eye(n - 1), -(D @ y), l=-jnp.exp(log_lam),
                            u=jnp.exp(log_lam)).value.x
            return y - D.T @ u
        return jnp.mean((jax.vmap(denoise)(Y) - target) ** 2)

    D0 = jnp.eye(n - 1, n, 1) - jnp.eye(n - 1, n) + 0.1 * jnp.asarray(rng.normal(size=(n - 1, n)))
    gD, gl = jax.jit(jax.grad(loss, argnums=(0, 1)))(D0, jnp.log(0.3))
    d = rng.normal(size=D0.shape)
    fd = (loss(D0 + 1e-6 * d, jnp.log(0.3)) - loss(D0 - 1e-6 * d, jnp.log(0.3))) / 2e-6
    np.testing.assert_allclose(np.vdot(gD, d), fd, rtol=1e-6)
    fd = (loss(D0, jnp.log(0.3) + 1e-6) - loss(D0, jnp.log(0.3) - 1e-6)) / 2e-6
    np.testing.assert_allclose(gl, fd, rtol=1e-6)


def test_a_non_symmetric_q_is_its_symmetric_part_and_a_broken_q_is_not_silent():
    """Only Q's symmetric part enters 1/2 x^T Q x: a non-symmetric Q gives the solution
    and the gradient of its symmetric part (the factorisation reads one triangle and
    would otherwise disagree with the KKT conditions). A negative definite Q (the
    factorisation fails) ends with RESULTS.nonfinite, not a step cap."""
    p = random_problem(5)
    kw = dict(A=p["A"], b=p["b"], G=p["G"], l=p["l"], u=p["u"])
    skew = np.triu(np.ones((4, 4)), 1)
    x_ref = active_set_qp(p["Q"], p["c"], **kw)[0]
    sol = ik.qp.solve(p["Q"] + skew - skew.T, p["c"], **kw)
    np.testing.assert_allclose(sol.value.x, x_ref, atol=1e-9)
    g = jax.grad(lambda Q: jnp.sum(ik.qp.solve(Q, p["c"], **kw).value.x ** 2))(p["Q"])
    np.testing.assert_allclose(g, g.T, atol=1e-12)  # symmetric, as OptNet's
    bad = ik.qp.solve(-np.eye(3), np.ones(3), throw=False)
    assert bad.result == ik.RESULTS.nonfinite
    with pytest.raises(ValueError, match="`Q` is needed"):
        ik.qp.solve(None, np.ones(3))
