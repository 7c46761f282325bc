"""ik.optimality: optimality conditions differentiated by ik.custom_root, against closed
forms (reference note bilevel.md §7) and float64 central differences; the proximal
operators against their definitions (brute-force minimisation)."""

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


# -- proximal operators by their definition ------------------------------------------------


def _brute_prox_1d(g, x, step):
    """argmin_z ½(z − x)² + step·g(z) on a fine grid, coordinate by coordinate."""
    grid = np.linspace(-6, 6, 240001)
    return np.array([grid[np.argmin(0.5 * (grid - xi) ** 2 + step * g(grid))] for xi in x])


def test_proximal_operators_are_the_argmin_of_their_definition():
    x = np.array([-3.0, -0.4, 0.0, 0.25, 1.1, 4.0])
    for step in (1.0, 0.5):
        got = opt.prox_lasso(jnp.asarray(x), 0.7, step)
        want = _brute_prox_1d(lambda z: 0.7 * np.abs(z), x, step)
        np.testing.assert_allclose(got, want, atol=1e-4)
        got = opt.prox_elastic_net(jnp.asarray(x), (0.7, 0.3), step)
        want = _brute_prox_1d(lambda z: 0.7 * np.abs(z) + 0.15 * z ** 2, x, step)
        np.testing.assert_allclose(got, want, atol=1e-4)
        got = opt.prox_non_negative(jnp.asarray(x), None, step)
        want = _brute_prox_1d(lambda z: np.where(z >= 0, 0.0, np.inf), x, step)
        np.testing.assert_allclose(got, want, atol=1e-4)
    # group lasso on 2-D groups: a brute-force 2-D grid
    g1, g2 = np.meshgrid(np.linspace(-3, 3, 1201), np.linspace(-3, 3, 1201))
    for v in (np.array([1.2, -0.8]), np.array([0.3, 0.2])):
        obj = 0.5 * ((g1 - v[0]) ** 2 + (g2 - v[1]) ** 2) + 0.5 * 0.9 * np.hypot(g1, g2)
        i = np.unravel_index(np.argmin(obj), obj.shape)
        got = opt.prox_group_lasso(jnp.asarray(v), 0.9, 0.5)
        np.testing.assert_allclose(got, [g1[i], g2[i]], atol=6e-3)
    assert float(jnp.abs(opt.prox_group_lasso(jnp.array([0.3, 0.2]), 0.9)).max()) == 0.0


# -- implicit gradients of the conditions against closed forms ------------------------------


def _data(n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ np.array([1.5, -2.0, 0.0, 0.0, 0.7, 0.0]) + 0.1 * rng.normal(size=n)
    return jnp.asarray(x), jnp.asarray(y)


def _ls(w, data):
    x, y = data
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def test_lasso_gradient_on_its_support_matches_the_closed_form():
    """(1/2n)‖Xw − y‖² + λ‖w‖₁: on the support S, dw_S/dλ = −n (X_SᵀX_S)⁻¹ sign(w_S) and 0
    off it, whatever the prox step (bilevel.md §7.6)."""
    data = _data()
    n = data[0].shape[0]
    lip = float(jnp.linalg.eigvalsh(data[0].T @ data[0] / n)[-1])

    def ista(w0, data, lam):  # the forward solver: a plain loop, not differentiated
        def body(_, w):
            return opt.prox_lasso(w - jax.grad(_ls)(w, data) / lip, lam, 1 / lip)
        return jax.lax.fori_loop(0, 5000, body, w0)

    lam = 0.2
    for step in (1.0, 1 / lip):
        lasso = ik.custom_root(opt.prox_gradient(_ls, opt.prox_lasso, step))(ista)
        w = lasso(jnp.zeros(6), data, lam)
        s = np.abs(np.asarray(w)) > 1e-8
        assert 0 < s.sum() < 6  # a proper support
        dw = jax.jacobian(lambda lam: lasso(jnp.zeros(6), data, lam))(lam)
        xs = np.asarray(data[0])[:, s]
        want = -n * np.linalg.solve(xs.T @ xs, np.sign(np.asarray(w)[s]))
        np.testing.assert_allclose(np.asarray(dw)[s], want, rtol=1e-7)
        np.testing.assert_allclose(np.asarray(dw)[~s], 0.0, atol=1e-10)


def test_ridge_stationarity_gradient_matches_the_closed_form():
    data = _data(seed=1)
    n = data[0].shape[0]

    def ridge_obj(w, theta):
        data, lam = theta
        return _ls(w, data) + 0.5 * lam * jnp.sum(w ** 2)

    def exact(w0, theta):
        (x, y), lam = theta
        return jnp.linalg.solve(x.T @ x / n + lam * jnp.eye(6), x.T @ y / n)

    ridge = ik.custom_root(opt.stationarity(ridge_obj))(exact)
    lam = 0.3
    w = ridge(jnp.zeros(6), (data, lam))
    a = np.asarray(data[0].T @ data[0] / n + lam * jnp.eye(6))
    dw = jax.jacobian(lambda lam: ridge(jnp.zeros(6), (data, lam)))(lam)
    np.testing.assert_allclose(dw, -np.linalg.solve(a, np.asarray(w)), rtol=1e-9)


def test_logistic_regression_stationarity_gradient_matches_differences_and_unrolling():
    """ℓ2-regularised logistic regression, solved by Newton's method and differentiated
    from its stationarity condition: the gradient of a validation loss in λ and in the
    training inputs equals float64 central differences and differentiation through the
    unrolled Newton iterations."""
    rng = np.random.default_rng(5)
    x, xv = jnp.asarray(rng.normal(size=(40, 4))), jnp.asarray(rng.normal(size=(30, 4)))
    w_true = jnp.asarray([1.5, -1.0, 0.5, 0.0])
    y = jnp.asarray((rng.uniform(size=40) < jax.nn.sigmoid(x @ w_true)).astype(float))
    yv = jnp.asarray((rng.uniform(size=30) < jax.nn.sigmoid(xv @ w_true)).astype(float))

    def nll(w, x, y):
        z = x @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    def obj(w, theta):
        x, lam = theta
        return nll(w, x, y) + 0.5 * lam * jnp.sum(w ** 2)

    def newton(w0, theta):
        def step(w, _):
            g, h = jax.grad(obj)(w, theta), jax.hessian(obj)(w, theta)
            return w - jnp.linalg.solve(h, g), None
        return jax.lax.scan(step, w0, None, length=30)[0]

    implicit = ik.custom_root(opt.stationarity(obj))(newton)

    def outer(solver, x, lam):
        return nll(solver(jnp.zeros(4), (x, lam)), xv, yv)

    lam = 0.05
    g_lam, g_x = jax.grad(lambda lam, x: outer(implicit, x, lam), argnums=(0, 1))(lam, x)
    u_lam, u_x = jax.grad(lambda lam, x: outer(newton, x, lam), argnums=(0, 1))(lam, x)
    eps = 1e-6
    fd_lam = (outer(newton, x, lam + eps) - outer(newton, x, lam - eps)) / (2 * eps)
    e = jnp.zeros_like(x).at[3, 2].set(eps)
    fd_x = (outer(newton, x + e, lam) - outer(newton, x - e, lam)) / (2 * eps)
    np.testing.assert_allclose(g_lam, fd_lam, rtol=1e-6)
    np.testing.assert_allclose(g_x[3, 2], fd_x, rtol=1e-6)
    np.testing.assert_allclose(g_lam, u_lam, rtol=1e-9)
    np.testing.assert_allclose(g_x, u_x, rtol=1e-8, atol=1e-12)
    assert abs(float(g_lam)) > 1e-3  # λ matters here: the test compares something


def test_projection_onto_the_simplex_jacobian_is_sparsemax():
    """argmin_{p∈Δ} ½‖p − θ‖²: the Jacobian is diag(s) − ssᵀ/|S| on the support
    (bilevel.md §7.7), through the projected-gradient condition (optax's projection)."""
    theta = jnp.array([1.2, 0.9, -0.5, 0.1, 1.0])
    f = lambda p, th: 0.5 * jnp.sum((p - th) ** 2)  # noqa: E731
    proj = lambda y, _: optax.projections.projection_simplex(y)  # noqa: E731
    solve = ik.custom_root(opt.projected_gradient(f, proj, step=0.5))(
        lambda p0, th, _: optax.projections.projection_simplex(th))
    jac = jax.jacobian(lambda th: solve(jnp.full(5, 0.2), th, None))(theta)
    p = optax.projections.projection_simplex(theta)
    s = (np.asarray(p) > 0).astype(float)
    np.testing.assert_allclose(jac, np.diag(s) - np.outer(s, s) / s.sum(), atol=1e-9)


def test_mirror_descent_on_the_simplex_gives_the_softmax_jacobian():
    """argmin_{p∈Δ} −⟨θ, p⟩ + τ Σ p log p = softmax(θ/τ), J = (diag p − ppᵀ)/τ, through the
    mirror-descent condition with the entropy geometry (log map, KL projection)."""
    tau = 0.7
    theta = jnp.array([0.3, -1.0, 2.0, 0.5])
    f = lambda p, th: -jnp.dot(th, p) + tau * jnp.sum(p * jnp.log(p))  # noqa: E731
    cond = opt.mirror_descent(f, lambda y, _: jax.nn.softmax(y), jnp.log, step=0.5)

    def md(p0, th, _):  # entropic mirror descent, the forward solver
        def body(_, p):
            return jax.nn.softmax(jnp.log(p) - 0.5 * jax.grad(f)(p, th))
        return jax.lax.fori_loop(0, 400, body, p0)

    solve = ik.custom_root(cond)(md)
    p = solve(jnp.full(4, 0.25), theta, None)
    np.testing.assert_allclose(p, jax.nn.softmax(theta / tau), atol=1e-12)
    jac = jax.jacobian(lambda th: solve(jnp.full(4, 0.25), th, None))(theta)
    pe = np.asarray(jax.nn.softmax(theta / tau))
    np.testing.assert_allclose(jac, (np.diag(pe) - np.outer(pe, pe)) / tau, atol=1e-9)


def test_kkt_equality_qp_gradient_matches_the_closed_form_and_inequalities():
    """min ½xᵀQx + cᵀx s.t. Ax = b: the KKT system's solution and its derivatives in b and c
    against the dense KKT matrix; an active inequality as a second check (finite
    differences)."""
    rng = np.random.default_rng(2)
    m = rng.normal(size=(5, 5))
    q = jnp.asarray(m @ m.T + np.eye(5))
    a = jnp.asarray(rng.normal(size=(2, 5)))
    b, c = jnp.array([1.0, -0.5]), jnp.asarray(rng.normal(size=5))
    objective = lambda x, c: 0.5 * x @ q @ x + c @ x  # noqa: E731
    eq = lambda x, b: a @ x - b  # noqa: E731
    kkt_matrix = jnp.block([[q, a.T], [a, jnp.zeros((2, 2))]])

    def direct(init, c, b, _):
        z = jnp.linalg.solve(kkt_matrix, jnp.concatenate([-c, b]))
        return z[:5], z[5:], None

    qp = ik.custom_root(opt.kkt(objective, eq))(direct)
    x_of = lambda c, b: qp((jnp.zeros(5), jnp.zeros(2), None), c, b, None)[0]  # noqa: E731
    inv = np.linalg.inv(np.asarray(kkt_matrix))
    np.testing.assert_allclose(jax.jacobian(x_of, 1)(c, b), inv[:5, 5:], rtol=1e-9)
    np.testing.assert_allclose(jax.jacobian(x_of, 0)(c, b), -inv[:5, :5], rtol=1e-9,
                               atol=1e-12)
    # one active inequality x_0 <= t (t below the unconstrained x_0): an equality in
    # disguise; compare with central differences of a direct solve of that system
    x_free = np.asarray(x_of(c, b))
    t = float(x_free[0]) - 0.5
    ineq = lambda x, t: x[:1] - t  # noqa: E731
    big = jnp.block([[q, a.T, jnp.eye(5)[:, :1]], [a, jnp.zeros((2, 3))],
                     [jnp.eye(5)[:1], jnp.zeros((1, 3))]])

    def active(init, c, b, t):
        z = jnp.linalg.solve(big, jnp.concatenate([-c, b, jnp.atleast_1d(t)]))
        return z[:5], z[5:7], z[7:]

    qp2 = ik.custom_root(opt.kkt(objective, eq, ineq))(active)
    sol = qp2((jnp.zeros(5), jnp.zeros(2), jnp.zeros(1)), c, b, t)
    assert float(sol[2][0]) > 0  # a positive multiplier: strictly active
    g = jax.grad(lambda t: jnp.sum(qp2((jnp.zeros(5), jnp.zeros(2), jnp.zeros(1)), c, b,
                                       t)[0] ** 2))(t)
    eps = 1e-6
    fd = (jnp.sum(active(None, c, b, t + eps)[0] ** 2)
          - jnp.sum(active(None, c, b, t - eps)[0] ** 2)) / (2 * eps)
    assert float(g) == pytest.approx(float(fd), rel=1e-6)


def test_a_failing_backward_solve_is_loud_not_a_silent_zero():
    """jaxopt #466: CG silently returned its zero start. Here the optimality Jacobian in w
    is singular at the solution (F(w, θ) = (θ − 1) w at θ = 1, w = 1, while ∂F/∂θ = w is
    not zero): the backward solve cannot converge; it raises with throw=True and gives
    NaN with throw=False, never a zero gradient."""
    cond = lambda w, th: (th - 1.0) * w  # noqa: E731

    def solver(w0, th):
        return jnp.ones_like(th)

    def loss(th, throw):
        return jnp.sum(ik.custom_root(cond, throw=throw)(solver)(jnp.zeros(3), th))

    grad = jax.grad(loss)(jnp.ones(3), False)
    assert bool(jnp.all(jnp.isnan(grad)))
    with pytest.raises(Exception, match="backward .adjoint. solve"):
        jax.block_until_ready(jax.grad(loss)(jnp.ones(3), True))


def test_conditions_vmap_over_hyperparameters():
    """The lasso's path over λ in one vmapped call equals the separate calls."""
    data = _data(seed=3)
    n = data[0].shape[0]
    lip = float(jnp.linalg.eigvalsh(data[0].T @ data[0] / n)[-1])

    def ista(w0, data, lam):
        def body(_, w):
            return opt.prox_lasso(w - jax.grad(_ls)(w, data) / lip, lam, 1 / lip)
        return jax.lax.fori_loop(0, 3000, body, w0)

    lasso = ik.custom_root(opt.prox_gradient(_ls, opt.prox_lasso))(ista)
    lams = jnp.array([0.05, 0.2, 0.6])
    grad = lambda lam: jax.grad(lambda l: jnp.sum(lasso(jnp.zeros(6), data, l) ** 2))(lam)  # noqa: E731,E741
    batched = jax.vmap(grad)(lams)
    for i, lam in enumerate(lams):
        np.testing.assert_allclose(batched[i], grad(lam), rtol=1e-10)
    assert len(set(np.round(np.asarray(batched), 6).tolist())) == 3


def test_fixed_point_condition_gradient_matches_the_linear_closed_form():
    """z* = θ A z* + b: dz*/db = (I − θA)⁻¹ and dz*/dθ = (I − θA)⁻¹ A z* (bilevel.md §7.8)."""
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.normal(size=(4, 4)) / 4)
    b = jnp.asarray(rng.normal(size=4))
    t = lambda z, th: th[0] * a @ z + th[1]  # noqa: E731
    solve = ik.custom_root(opt.fixed_point_condition(t))(
        lambda z0, th: jnp.linalg.solve(jnp.eye(4) - th[0] * a, th[1]))
    theta = 0.8
    z = solve(jnp.zeros(4), (theta, b))
    inv = np.linalg.inv(np.eye(4) - theta * np.asarray(a))
    np.testing.assert_allclose(jax.jacobian(lambda b: solve(jnp.zeros(4), (theta, b)))(b),
                               inv, rtol=1e-9)
    np.testing.assert_allclose(jax.jacobian(lambda th: solve(jnp.zeros(4), (th, b)))(theta),
                               inv @ np.asarray(a) @ np.asarray(z), rtol=1e-9)


def _lasso_cd(x, y, lam, sweeps=3000):
    """Coordinate descent for (1/2n)‖Xw − y‖² + λ‖w‖₁ in numpy: an independent reference."""
    x, y = np.asarray(x), np.asarray(y)
    n, d = x.shape
    w = np.zeros(d)
    col = (x ** 2).sum(0) / n
    for _ in range(sweeps):
        for j in range(d):
            r = y - x @ w + x[:, j] * w[j]
            rho = x[:, j] @ r / n
            w[j] = np.sign(rho) * max(abs(rho) - lam, 0.0) / col[j]
    return w


def test_fista_solves_the_lasso_faster_than_ista_and_differentiates_implicitly():
    rng = np.random.default_rng(5)
    n, d = 60, 12
    x = jnp.asarray(rng.normal(size=(n, d)) + 1.5 * rng.normal(size=(1, d)))
    y = jnp.asarray(x[:, :3] @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=n))
    lip = float(jnp.linalg.eigvalsh(x.T @ x / n)[-1])
    t = opt.prox_gradient_map(_ls, opt.prox_lasso, 1 / lip)
    lam = 0.05

    def solve(lam, solver):
        return ik.fixed_point(t, jnp.zeros(d), ((x, y), lam), solver, max_steps=50000)

    fista = solve(lam, ik.FISTA(rtol=0.0, atol=1e-12))
    ista = solve(lam, ik.Picard(rtol=0.0, atol=1e-12))
    np.testing.assert_allclose(fista.value, _lasso_cd(x, y, lam), atol=1e-9)
    # measured: 164 against 760 steps
    assert int(fista.stats["num_steps"]) < 0.3 * int(ista.stats["num_steps"])
    assert float(jnp.linalg.norm(t(fista.value, ((x, y), lam)) - fista.value)) <= float(
        fista.stats["residual"])
    # the implicit gradient in λ: the closed form on the support
    dw = jax.jacobian(lambda lam: solve(lam, ik.FISTA(rtol=0.0, atol=1e-12)).value)(lam)
    w = np.asarray(fista.value)
    s = np.abs(w) > 1e-9
    xs = np.asarray(x)[:, s]
    np.testing.assert_allclose(np.asarray(dw)[s], -n * np.linalg.solve(xs.T @ xs, np.sign(
        w[s])), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dw)[~s], 0.0, atol=1e-9)


def test_box_qp_by_projected_gradient_matches_scipy_and_its_gradient():
    """min ½xᵀQx + cᵀx on [0, 1]^d by FISTA on the projected-gradient map (optax's box
    projection), against scipy's L-BFGS-B; dx_F/dc_F = −Q_FF⁻¹ on the free set, 0 on the
    bound coordinates."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(6)
    d = 8
    m = rng.normal(size=(d, d))
    q = m @ m.T / d + 0.5 * np.eye(d)
    c = rng.normal(size=d) * 1.5
    f = lambda x, c: 0.5 * x @ jnp.asarray(q) @ x + c @ x  # noqa: E731
    box = lambda y, th, step: optax.projections.projection_box(y, 0.0, 1.0)  # noqa: E731
    t = opt.prox_gradient_map(f, box, 1 / float(np.linalg.eigvalsh(q)[-1]))

    def solve(c):
        return ik.fixed_point(t, jnp.full(d, 0.5), (c, None), ik.FISTA(rtol=0.0, atol=1e-13),
                              max_steps=20000).value

    x = np.asarray(solve(jnp.asarray(c)))
    ref = minimize(lambda v: 0.5 * v @ q @ v + c @ v, np.full(d, 0.5), jac=lambda v: q @ v + c,
                   bounds=[(0, 1)] * d, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12})
    np.testing.assert_allclose(x, ref.x, atol=1e-6)
    free = (x > 1e-9) & (x < 1 - 1e-9)
    assert 0 < free.sum() < d  # some coordinates at the bounds
    jac = np.asarray(jax.jacobian(solve)(jnp.asarray(c)))
    np.testing.assert_allclose(jac[np.ix_(free, free)], -np.linalg.inv(q[np.ix_(free, free)]),
                               rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(jac[~free], 0.0, atol=1e-10)
    # the same QP by accelerated projected gradient with backtracking (no L given)
    t_bt = opt.projected_gradient_map(
        f, lambda y, th: optax.projections.projection_box(y, 0.0, 1.0), initial_step=4.0)
    x_bt = ik.fixed_point(t_bt, jnp.full(d, 0.5), (jnp.asarray(c), None),
                          ik.FISTA(rtol=0.0, atol=1e-13), max_steps=20000).value
    np.testing.assert_allclose(x_bt, ref.x, atol=1e-6)


def test_backtracking_finds_the_step_fista_needs_without_lipschitz_constant():
    """`prox_gradient_map(step=None)`: Beck & Teboulle's backtracking from a step 10× too
    large for the lasso (where the fixed step diverges) converges to the coordinate-descent
    solution, and the implicit gradient in λ is the closed form on the support."""
    rng = np.random.default_rng(7)
    n, d = 50, 10
    x = jnp.asarray(rng.normal(size=(n, d)))
    y = jnp.asarray(x[:, :3] @ np.array([1.5, -1.0, 0.7]) + 0.2 * rng.normal(size=n))
    lip = float(jnp.linalg.eigvalsh(x.T @ x / n)[-1])
    lam = 0.08
    big = 10.0 / lip

    def solve(lam, t):
        return ik.fixed_point(t, jnp.zeros(d), ((x, y), lam), ik.FISTA(rtol=0.0, atol=1e-12),
                              max_steps=5000, throw=False)

    fixed = solve(lam, opt.prox_gradient_map(_ls, opt.prox_lasso, big))
    assert fixed.result != ik.RESULTS.successful  # a step of 10/L diverges
    t = opt.prox_gradient_map(_ls, opt.prox_lasso, initial_step=big)
    sol = solve(lam, t)
    assert sol.result == ik.RESULTS.successful
    np.testing.assert_allclose(sol.value, _lasso_cd(x, y, lam), atol=1e-9)
    dw = np.asarray(jax.jacobian(lambda lam: solve(lam, t).value)(lam))
    w = np.asarray(sol.value)
    s = np.abs(w) > 1e-9
    assert 0 < s.sum() < d
    xs = np.asarray(x)[:, s]
    np.testing.assert_allclose(dw[s], -n * np.linalg.solve(xs.T @ xs, np.sign(w[s])),
                               rtol=1e-6)
    np.testing.assert_allclose(dw[~s], 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="step"):
        opt.prox_gradient_map(_ls, opt.prox_lasso, -1.0)


def test_mirror_descent_map_solved_by_the_driver_gives_softmax_and_its_jacobian():
    """Entropic mirror descent as a fixed-point solve (`mirror_descent_map` + Picard, the
    shared driver's stats): argmin_{p∈Δ} −⟨θ, p⟩ + τ Σ p log p = softmax(θ/τ) with
    Jacobian (diag p − ppᵀ)/τ, and vmapped over θ."""
    tau = 0.5
    f = lambda p, th: -jnp.dot(th, p) + tau * jnp.sum(p * jnp.log(p))  # noqa: E731
    t = opt.mirror_descent_map(f, lambda y, _: jax.nn.softmax(y), jnp.log, step=0.8)

    def solve(th):
        return ik.fixed_point(t, jnp.full(4, 0.25), (th, None), ik.Picard(rtol=0.0,
                                                                           atol=1e-13))

    theta = jnp.array([0.3, -1.0, 2.0, 0.5])
    sol = solve(theta)
    assert 1 < int(sol.stats["num_steps"]) < 200 and sol.result == ik.RESULTS.successful
    p = np.asarray(jax.nn.softmax(theta / tau))
    np.testing.assert_allclose(sol.value, p, atol=1e-12)
    jac = jax.jacobian(lambda th: solve(th).value)(theta)
    np.testing.assert_allclose(jac, (np.diag(p) - np.outer(p, p)) / tau, atol=1e-9)
    thetas = jnp.stack([theta, -theta, 0.5 * theta])
    batch = jax.vmap(lambda th: solve(th).value)(thetas)
    np.testing.assert_allclose(batch, jax.nn.softmax(thetas / tau, axis=-1), atol=1e-12)


def test_eq_qp_solves_the_kkt_system_and_differentiates_it_and_fails_loudly():
    """`eq_qp` against the dense KKT inverse (solution, d/db, d/dc) and a float64 central
    difference in Q; an inconsistent system (a repeated constraint with another b) is an
    error with throw=True and NaN with throw=False; wrong shapes name the arguments."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=(6, 6))
    q = jnp.asarray(m @ m.T + np.eye(6))
    a = jnp.asarray(rng.normal(size=(2, 6)))
    b, c = jnp.array([0.5, -1.0]), jnp.asarray(rng.normal(size=6))
    inv = np.linalg.inv(np.block([[np.asarray(q), np.asarray(a).T],
                                  [np.asarray(a), np.zeros((2, 2))]]))
    x, nu = opt.eq_qp(q, c, a, b)
    np.testing.assert_allclose(np.concatenate([x, nu]),
                               inv @ np.concatenate([-np.asarray(c), np.asarray(b)]),
                               rtol=1e-10)
    np.testing.assert_allclose(jax.jacobian(lambda b: opt.eq_qp(q, c, a, b)[0])(b),
                               inv[:6, 6:], rtol=1e-9)
    np.testing.assert_allclose(jax.jacobian(lambda c: opt.eq_qp(q, c, a, b)[0])(c),
                               -inv[:6, :6], rtol=1e-9, atol=1e-12)
    e = jnp.zeros((6, 6)).at[0, 1].set(1.0).at[1, 0].set(1.0)
    g = jax.grad(lambda s: jnp.sum(opt.eq_qp(q + s * e, c, a, b)[0] ** 2))(0.0)
    h = 1e-6
    fd = (jnp.sum(opt.eq_qp(q + h * e, c, a, b)[0] ** 2)
          - jnp.sum(opt.eq_qp(q - h * e, c, a, b)[0] ** 2)) / (2 * h)
    assert float(g) == pytest.approx(float(fd), rel=1e-7)
    a2, b2 = jnp.concatenate([a, a[:1]]), jnp.array([0.5, -1.0, 2.0])
    assert np.all(np.isnan(opt.eq_qp(q, c, a2, b2, throw=False)[0]))
    with pytest.raises(Exception, match="singular or inconsistent"):
        opt.eq_qp(q, c, a2, b2)
    with pytest.raises(ValueError, match=r"Q \(n, n\), c \(n,\), A \(m, n\), b \(m,\)"):
        opt.eq_qp(q, c, a.T, b)


def test_lasso_gradient_in_the_dictionary_matches_the_closed_form_on_the_support():
    """Sparse coding: the implicit gradient of a loss of the lasso code w(D, x, λ) in the
    dictionary D equals the gradient of the closed form w_S = (D_SᵀD_S)⁻¹(D_Sᵀx − λ s)
    with the support S and signs s held fixed (float64)."""
    rng = np.random.default_rng(11)
    m, k = 20, 12
    d = jnp.asarray(rng.normal(size=(m, k)) / np.sqrt(m))
    x = jnp.asarray(d[:, :3] @ np.array([1.0, -0.8, 0.6]) + 0.05 * rng.normal(size=m))
    lam = 0.05
    f = lambda w, args: 0.5 * jnp.sum((args[1] - args[0] @ w) ** 2)  # noqa: E731
    t = opt.prox_gradient_map(f, opt.prox_lasso)  # backtracking: no L needed

    def code(d):
        return ik.fixed_point(t, jnp.zeros(k), ((d, x), lam), ik.FISTA(rtol=0.0, atol=1e-13),
                              max_steps=20000).value

    w = np.asarray(code(d))
    s = np.abs(w) > 1e-9
    assert 0 < s.sum() < k
    sign = np.sign(w[s])

    def closed(d):
        ds = d[:, s]
        return jnp.zeros(k).at[np.flatnonzero(s)].set(
            jnp.linalg.solve(ds.T @ ds, ds.T @ x - lam * sign))

    np.testing.assert_allclose(w, closed(d), atol=1e-10)
    target = jnp.asarray(rng.normal(size=m))
    loss = lambda code_fn: lambda d: jnp.sum((d @ code_fn(d) - target) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss(code))(d), jax.grad(loss(closed))(d),
                               rtol=1e-7, atol=1e-10)


def test_a_step_size_schedule_runs_through_optax_and_differentiates_implicitly():
    """jaxopt's `OptaxSolver(opt=optax.sgd(schedule))` / a `stepsize` callable on a smooth
    problem: `ik.minimise(..., optx.OptaxMinimiser(optax.sgd(schedule), rtol, atol))`.
    Ridge regression: w* = (X^T X / n + lam I)^-1 X^T y / n, dw*/dlam = -(H)^-1 w*."""
    import optimistix as optx

    rng = np.random.default_rng(0)
    X, y = jnp.asarray(rng.normal(size=(30, 4))), jnp.asarray(rng.normal(size=30))

    def loss(w, lam):
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w ** 2)

    # (a plain function: optimistix cannot convert the closures of optax's schedule
    # builders such as `optax.exponential_decay`, "Cell is empty", optimistix 0.1.0)
    def schedule(k):
        return 0.5 * 0.5 ** (k / 200)

    solver = optx.OptaxMinimiser(optax.sgd(schedule), rtol=1e-10, atol=1e-10)

    def solve(lam):
        return ik.minimise(loss, jnp.zeros(4), lam, solver, max_steps=20000).value

    lam = 0.1
    H = np.asarray(X.T @ X) / 30 + lam * np.eye(4)
    w = np.linalg.solve(H, np.asarray(X.T @ y) / 30)
    np.testing.assert_allclose(solve(lam), w, atol=1e-8)
    np.testing.assert_allclose(jax.jacrev(solve)(lam), -np.linalg.solve(H, w), atol=1e-7)


def test_a_scheduled_loop_is_differentiated_through_its_optimality_condition():
    """jaxopt's `MirrorDescent(stepsize=callable)` / `ProximalGradient(stepsize=callable)`:
    the loop with its schedule is the user's (any code), `ik.custom_root` on the
    condition differentiates it (the condition holds for any step). Entropic mirror
    descent on the simplex with steps 1/sqrt(k+1): min <x, c> + 1/2 x^T Q x; against the
    active-set closed form dx/dc = -(Z (Z^T Q Z)^-1 Z^T) on the support (all of it here)."""
    rng = np.random.default_rng(0)
    B = rng.normal(size=(4, 4))
    Q = jnp.asarray(B @ B.T / 4 + np.eye(4))
    c = jnp.asarray(0.1 * rng.normal(size=4))

    def f(x, c):
        return jnp.vdot(c, x) + 0.5 * x @ Q @ x

    def mirror_descent(x0, c, _):
        def step(k, x):
            eta = 1.0 / jnp.sqrt(k + 1.0)  # the schedule
            return jax.nn.softmax(jnp.log(x) - eta * jax.grad(f)(x, c))
        return jax.lax.fori_loop(0, 3000, step, x0)

    condition = opt.mirror_descent(f, lambda y, _: jax.nn.softmax(y), jnp.log)
    solve = ik.custom_root(condition)(mirror_descent)
    x = solve(jnp.ones(4) / 4, c, None)
    assert np.all(np.asarray(x) > 1e-3)  # an interior solution: every coordinate free
    Z = np.linalg.svd(np.ones((1, 4)))[2][1:].T
    closed = -Z @ np.linalg.inv(Z.T @ np.asarray(Q) @ Z) @ Z.T
    np.testing.assert_allclose(jax.jacrev(lambda c: solve(jnp.ones(4) / 4, c, None))(c),
                               closed, atol=1e-6)


def test_optimistix_lbfgs_still_fails_below_float64_under_x64():
    """`ik.minimise` defaults to LBFGS but takes BFGS for float32 parameters under x64,
    because optimistix's LBFGS keeps a float64 history there and its scan fails. When this
    test fails, upstream is fixed: remove the fallback in `_root.minimise`."""
    import optimistix as optx

    def f(w, a):
        return jnp.sum((w - a) ** 2) + jnp.sum(w ** 4)

    y0, a = jnp.zeros(3, jnp.float32), jnp.ones(3, jnp.float32)
    with pytest.raises(TypeError, match="carry"):
        optx.minimise(f, optx.LBFGS(1e-6, 1e-6), y0, a)
    w = ik.minimise(f, y0, a).value  # the fallback
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(2 * (w - 1) + 4 * w ** 3, 0.0, atol=1e-4)  # float32
