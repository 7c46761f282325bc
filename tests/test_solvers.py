"""Forward solvers: solutions against closed forms or an independent solver."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from jax.flatten_util import ravel_pytree

import implicit_kit as ik

from .helpers import PROBLEMS, ROBUST, SOLVERS, tree_allclose


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_solution(problem, solver_name):
    if not problem.picard_ok and solver_name not in ROBUST:
        pytest.skip("solver is not expected to converge where Picard diverges")
    sol = ik.fixed_point(
        problem.fn, problem.y0, problem.args, SOLVERS[solver_name], max_steps=500
    )
    assert sol.result == ik.RESULTS.successful
    assert tree_allclose(sol.value, problem.exact(problem.args), rtol=1e-9, atol=1e-10)
    assert 0 < int(sol.stats["num_steps"]) <= 500
    assert int(sol.stats["max_steps"]) == 500


@pytest.mark.parametrize("solver_name", ["picard", "anderson", "broyden"])
def test_picard_divergent_problem_fails_without_acceleration(solver_name):
    problem = PROBLEMS[1]
    sol = ik.fixed_point(
        problem.fn, problem.y0, problem.args, SOLVERS[solver_name], max_steps=300,
        throw=False,
    )
    if solver_name == "picard":
        assert sol.result != ik.RESULTS.successful
    else:
        assert sol.result == ik.RESULTS.successful


def test_acceleration_needs_fewer_steps_than_picard():
    # A DEQ near the edge of contraction, rho(J*) ~ 0.93 (reference note C7: 215 vs 70).
    n = 50
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (n, n)))
    W = q @ jnp.diag(jnp.linspace(-0.95, 0.95, n)) @ q.T
    x = 0.1 * jax.random.normal(jax.random.key(1), (n,))
    fn = lambda z, a: jnp.tanh(a[0] @ z + a[1])
    ref = None
    steps = {}
    for name, solver in [
        ("picard", ik.Picard(rtol=1e-8, atol=0)),
        ("anderson", ik.Anderson(m=5, rtol=1e-8, atol=0)),
        ("broyden", ik.Broyden(m=30, rtol=1e-8, atol=0)),
    ]:
        sol = ik.fixed_point(fn, jnp.zeros(n), (W, x), solver, max_steps=2000)
        ref = sol.value if ref is None else ref
        # residual 1e-8 at contraction ~0.93 -> error ~1e-7 relative
        assert float(jnp.linalg.norm(sol.value - ref)) <= 1e-6 * float(
            jnp.linalg.norm(ref))
        steps[name] = int(sol.stats["num_steps"])
    assert 2 * steps["anderson"] <= steps["picard"], steps
    assert 2 * steps["broyden"] <= steps["picard"], steps


def test_anderson_relative_ridge_reaches_tight_tolerance():
    # An absolute ridge of 1e-4 stalls at tight tolerances; the relative one must not.
    problem = PROBLEMS[3]
    solver = ik.Anderson(rtol=1e-13, atol=0.0, ridge=1e-4)
    sol = ik.fixed_point(problem.fn, problem.y0, problem.args, solver, max_steps=200)
    assert sol.result == ik.RESULTS.successful
    assert float(sol.stats["residual"]) <= 1e-13 * float(jnp.linalg.norm(sol.value))


def test_anderson_singular_least_squares_is_safe():
    # A constant map: every residual after the first step is exactly zero -> G G^T = 0.
    c = jnp.array([1.0, -2.0, 3.0])
    sol = ik.fixed_point(lambda y, a: a, jnp.zeros(3), c, ik.Anderson(rtol=0, atol=0),
                         max_steps=10, throw=False)
    np.testing.assert_array_equal(sol.value, c)
    assert bool(jnp.all(jnp.isfinite(sol.value)))


@pytest.mark.parametrize("norm", ["two", "max"])
def test_anderson_reports_the_residual_of_its_norm(norm):
    # The default 2-norm is read off the Gram matrix; another norm is computed. Either
    # way the reported residual is norm(T(y) - y) at the iterate the last step started
    # from, recomputed here from the saved iterates.
    problem = PROBLEMS[3]
    norm_fn = None if norm == "two" else (lambda t: jnp.max(jnp.abs(
        ravel_pytree(t)[0])))
    kw = {} if norm_fn is None else {"norm": norm_fn}
    solver = ik.Anderson(rtol=1e-8, atol=0.0, **kw)
    sol = ik.fixed_point(problem.fn, problem.y0, problem.args, solver, max_steps=100)
    k = int(sol.stats["num_steps"])
    sol_k = ik.fixed_point(problem.fn, problem.y0, problem.args, solver, max_steps=100,
                           save_iterates=(k - 1,))
    y_prev = jax.tree_util.tree_map(lambda a: a[0], sol_k.stats["iterates"])
    t_prev = problem.fn(y_prev, problem.args)
    g = jax.tree_util.tree_map(lambda a, b: a - b, t_prev, y_prev)
    expected = (norm_fn or (lambda t: jnp.linalg.norm(
        ravel_pytree(t)[0])))(g)
    np.testing.assert_allclose(float(sol.stats["residual"]), float(expected), rtol=1e-6)


def test_broyden_memory_does_not_grow_with_max_steps():
    problem = PROBLEMS[3]
    solver = ik.Broyden(m=4, rtol=1e-12, atol=1e-13)
    n = problem.y0.size

    def fn(y, args):
        return problem.fn(y, args) - y, None

    struct = jax.eval_shape(lambda: problem.y0)
    state = jax.eval_shape(
        lambda: solver.init(fn, problem.y0, problem.args, {}, struct, None, frozenset())
    )
    # Two (m, n) histories + previous iterate and residual + 3 scalars: nothing depends
    # on max_steps (TorchDEQ's default keeps one rank-one pair per step).
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == 2 * 4 * n + 2 * n + 4
    sol = ik.fixed_point(problem.fn, problem.y0, problem.args, solver, max_steps=10_000)
    np.testing.assert_allclose(sol.value, problem.exact(problem.args), rtol=1e-9)


def test_halpern_bound_on_rotation():
    # A rotation by 90 degrees is nonexpansive: Picard cycles, Halpern converges with
    # ||y_k - T y_k|| <= 2 ||y_0 - y*|| / (k + 1) at every k (reference note C8).
    n = 10
    R = jnp.kron(jnp.eye(n // 2), jnp.array([[0.0, -1.0], [1.0, 0.0]]))
    ystar = jnp.linspace(-1, 1, n)
    fn = lambda y, a: R @ (y - ystar) + ystar
    y0 = jnp.ones(n) * 2.0
    k = 400
    sol = ik.fixed_point(fn, y0, None, ik.Halpern(rtol=0, atol=0, restart=None), max_steps=k,
                         throw=False, trace=True)
    trace = np.asarray(sol.stats["residual_trace"])
    bound = 2 * float(jnp.linalg.norm(y0 - ystar)) / (np.arange(k) + 1)
    assert np.all(trace <= bound * (1 + 1e-12))
    assert trace[-1] < 0.01 * trace[0]
    picard = ik.fixed_point(fn, y0, None, ik.Picard(rtol=0, atol=0), max_steps=k,
                            throw=False, trace=True)
    assert float(picard.stats["residual_trace"][-1]) > 0.5 * float(
        picard.stats["residual_trace"][0])


def _restarted_halpern_by_hand(T, y0, tol, restart, max_steps):
    """The restarted Halpern iteration written out in numpy: the residual of every step,
    the steps since the anchor was set, and the anchor's distance to use in the bound."""
    a, y, k, anchor_res = y0, y0, 0, None
    residuals, since, anchors = [], [], []
    for _ in range(max_steps):
        ty = T(y)
        r = float(np.linalg.norm(ty - y))
        anchor_res = r if k == 0 else anchor_res
        residuals.append(r), since.append(k), anchors.append(a)
        if r <= tol:
            break
        if k > 0 and r <= restart * anchor_res:
            a, y, k = ty, ty, 0
        else:
            y, k = (a + (k + 1) * ty) / (k + 2), k + 1
    return np.array(residuals), np.array(since), anchors


def _contraction(n=15, rho=0.95, seed=0):
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))[0]
    a = q @ np.diag(np.linspace(-rho, rho, n)) @ q.T
    return a, np.random.default_rng(seed + 1).normal(size=n)


def test_restarted_halpern_keeps_the_bound_and_is_linear_on_contractions():
    # A 90-degree rotation in R^100 (nonexpansive, Picard cycles) and a contraction.
    n = 100
    rot = np.kron(np.eye(n // 2), np.array([[0.0, -1.0], [1.0, 0.0]]))
    ystar = np.linspace(-1, 1, n)
    a, b = _contraction()
    cases = [(lambda y: rot @ (y - ystar) + ystar, np.full(n, 2.0), ystar),
             (lambda y: a @ y + b, np.zeros(15), np.linalg.solve(np.eye(15) - a, b))]
    for T, y0, fixed in cases:
        sol = ik.fixed_point(lambda y, _: T(y), jnp.asarray(y0), None,
                             ik.Halpern(rtol=0, atol=1e-8), max_steps=2000, trace=True)
        res, since, anchors = _restarted_halpern_by_hand(T, y0, 1e-8, 0.9, 2000)
        trace = np.asarray(sol.stats["residual_trace"])[:len(res)]
        np.testing.assert_allclose(trace, res, rtol=1e-9, atol=1e-13)
        assert int(sol.stats["num_steps"]) == len(res) and res[-1] <= 1e-8
        assert np.count_nonzero(since == 0) > 2  # it restarted
        # Within every run: ||y_k - T y_k|| <= 2 ||a - y*|| / (k + 1), k = steps since
        # the anchor a was set, and no anchor is farther from y* than y0 is.
        dist = np.array([np.linalg.norm(anc - fixed) for anc in anchors])
        assert np.all(res <= 2 * dist / (since + 1) + 1e-12)  # tight on the rotation
        assert np.all(dist <= np.linalg.norm(y0 - fixed) * (1 + 1e-12))
        np.testing.assert_allclose(sol.value, fixed, atol=1e-7)


@pytest.mark.parametrize("rho", [0.5, 0.8, 0.95, 0.99])
def test_restarted_halpern_within_twice_picards_steps_on_contractions(rho):
    a, b = _contraction(rho=rho, seed=3)
    fn = lambda y, args: args[0] @ y + args[1]
    args = (jnp.asarray(a), jnp.asarray(b))
    steps = {}
    for name, solver in (("picard", ik.Picard(rtol=0, atol=1e-8)),
                         ("halpern", ik.Halpern(rtol=0, atol=1e-8)),
                         ("fixed", ik.Halpern(rtol=0, atol=1e-8, restart=None))):
        sol = ik.fixed_point(fn, jnp.zeros(15), args, solver, max_steps=20_000, throw=False)
        steps[name] = (int(sol.stats["num_steps"]), sol.result == ik.RESULTS.successful)
    assert steps["picard"][1] and steps["halpern"][1]
    assert steps["halpern"][0] <= 2 * steps["picard"][0], steps
    assert not steps["fixed"][1]  # the fixed anchor's O(1/k) does not get there


def test_restarted_halpern_stops_per_sample_under_vmap():
    a, b = _contraction(rho=0.9, seed=5)
    fn = lambda y, args: args[0] @ y + args[1]
    scales = jnp.array([0.3, 1.0])  # contraction factors 0.27 and 0.9
    solver = ik.Halpern(rtol=0, atol=1e-9)
    batch = jax.vmap(lambda s: ik.fixed_point(fn, jnp.zeros(15), (s * a, jnp.asarray(b)),
                                              solver, max_steps=5000))(scales)
    for i, s in enumerate(scales):
        one = ik.fixed_point(fn, jnp.zeros(15), (s * a, jnp.asarray(b)), solver,
                             max_steps=5000)
        assert int(batch.stats["num_steps"][i]) == int(one.stats["num_steps"])
        np.testing.assert_allclose(batch.value[i], one.value, rtol=1e-12)
    assert int(batch.stats["num_steps"][0]) < int(batch.stats["num_steps"][1])


def test_fallback_per_sample():
    problem = PROBLEMS[1]
    # Picard gets 60 steps, then NewtonKrylov the rest of the 100.
    solver = ik.Fallback(ik.Picard(rtol=1e-12, atol=1e-13), SOLVERS["newton_krylov"],
                         max_steps=60)
    sol = ik.fixed_point(problem.fn, problem.y0, problem.args, solver, max_steps=100)
    assert int(sol.stats["solver_index"]) == 1
    np.testing.assert_allclose(sol.value, problem.exact(problem.args), rtol=1e-9)
    # Under vmap a mix: a contractive sample stays with Picard, a divergent one falls back.
    A_good = 0.5 * jnp.eye(4)
    As = jnp.stack([A_good, problem.args[0]])
    bs = jnp.stack([problem.args[1], problem.args[1]])
    sols = jax.vmap(lambda A, b: ik.fixed_point(problem.fn, problem.y0, (A, b), solver,
                                                max_steps=100, throw=False))(As, bs)
    assert sols.stats["solver_index"].tolist() == [0, 1]
    assert bool(jnp.all(sols.result == ik.RESULTS.successful))
    for i in range(2):
        np.testing.assert_allclose(sols.value[i], problem.exact((As[i], bs[i])),
                                   rtol=1e-9)


def test_fallback_exhausted():
    problem = PROBLEMS[1]
    solver = ik.Fallback(ik.Picard(**{"rtol": 1e-12, "atol": 1e-13}),
                         ik.Halpern(rtol=1e-12, atol=1e-13), max_steps=10)
    sol = ik.fixed_point(problem.fn, problem.y0, problem.args, solver, max_steps=20,
                         throw=False)
    assert sol.result == ik.RESULTS.fallback_exhausted


def test_root_find_and_minimise_closed_forms():
    # root: y^3 - a = 0 per component.
    a = jnp.array([8.0, 27.0, 2.0])
    sol = ik.root_find(lambda y, a: y**3 - a, jnp.ones(3), a)
    np.testing.assert_allclose(sol.value, jnp.cbrt(a), rtol=1e-10)
    # minimise: ridge regression.
    X = jax.random.normal(jax.random.key(0), (20, 4))
    t = jax.random.normal(jax.random.key(1), (20,))
    lam = 0.3
    loss = lambda w, lam: 0.5 * jnp.sum((X @ w - t) ** 2) + 0.5 * lam * jnp.sum(w**2)
    exact = jnp.linalg.solve(X.T @ X + lam * jnp.eye(4), X.T @ t)
    for solver in (None, ik.NewtonKrylov(rtol=1e-12, atol=1e-12)):
        sol = ik.minimise(loss, jnp.zeros(4), lam, solver)
        np.testing.assert_allclose(sol.value, exact, rtol=1e-8)


def _ridge_finite_sum(n=300, d=6, seed=0):
    """F_i(x) = a_i (a_i.x - b_i) + lam x with correlated rows (a shared direction), so
    that the full operator's smoothness is close to the components' (where variance
    reduction pays); the root is the ridge solution."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=d) + 0.3 * rng.normal(size=(n, d))
    b = rng.normal(size=n)
    lam = 0.05

    def component(x, args, i):
        a, b = args
        return a[i] * (a[i] @ x - b[i]) + lam * x

    exact = lambda b: np.linalg.solve(a.T @ a / n + lam * np.eye(d), a.T @ b / n)  # noqa: E731
    l_full = np.linalg.eigvalsh(a.T @ a / n)[-1] + lam
    l_avg = np.sqrt(np.mean(((a ** 2).sum(1) + lam) ** 2))
    return component, (jnp.asarray(a), jnp.asarray(b)), exact, l_full, l_avg


def test_vr_halpern_solves_a_finite_sum_with_fewer_component_evaluations():
    n = 1000
    component, args, exact, l_full, l_avg = _ridge_finite_sum(n)
    fn = ik.solvers.finite_sum(component, n)
    tol = 1e-8
    solver = ik.VRHalpern(component, n, step_size=1 / l_avg, rtol=0.0, atol=tol)
    sol = ik.root_find(fn, jnp.zeros(6), args, solver, max_steps=20000)
    np.testing.assert_allclose(sol.value, exact(np.asarray(args[1])), atol=1e-7)
    # it stops on an exact residual, of the point it returns
    exact_residual = float(jnp.linalg.norm(fn(sol.value, args)))
    assert exact_residual == pytest.approx(float(sol.stats["residual"]), rel=1e-9)
    assert exact_residual <= tol
    # nfe counts component evaluations: full passes (n) and recursive steps (2b = 64)
    steps, nfe = int(sol.stats["num_steps"]), int(sol.stats["nfe"])
    refreshes = (nfe - 64 * steps) // (n - 64)
    assert nfe == n * refreshes + 64 * (steps - refreshes) and 2 <= refreshes < steps / 4
    # full-batch gradient steps and restarted Halpern at the full operator's own step 1/L
    # need more (measured: 57,536 against 102,000 and 156,000)
    t = lambda x, a: x - fn(x, a) / l_full  # noqa: E731
    for full in (ik.Picard(rtol=0.0, atol=tol / l_full), ik.Halpern(rtol=0.0, atol=tol / l_full)):
        other = ik.fixed_point(t, jnp.zeros(6), args, full, max_steps=20000)
        assert nfe < 0.7 * int(other.stats["nfe"]) * n


def test_vr_halpern_implicit_gradient_and_vmap():
    n = 200
    component, args, exact, _, l_avg = _ridge_finite_sum(n, seed=1)
    fn = ik.solvers.finite_sum(component, n)
    solver = ik.VRHalpern(component, n, step_size=1 / l_avg, rtol=0.0, atol=1e-10)
    a, b = args

    def value(b, seed=0):
        s = ik.VRHalpern(component, n, step_size=1 / l_avg, rtol=0.0, atol=1e-10,
                         seed=seed)
        return ik.root_find(fn, jnp.zeros(6), (a, b), s, max_steps=50000).value

    w = jnp.arange(6.0)
    g = jax.grad(lambda b: value(b) @ w)(b)
    # x*(b) = M^{-1} A^T b / n: d(w.x*)/db = A M^{-1} w / n
    an = np.asarray(a)
    m = an.T @ an / n + 0.05 * np.eye(6)
    np.testing.assert_allclose(g, an @ np.linalg.solve(m, np.asarray(w)) / n, atol=1e-8)
    # per-sample stopping under vmap: each sample as solved alone
    bs = jnp.stack([b, 3 * b])
    batch = jax.vmap(lambda b: ik.root_find(fn, jnp.zeros(6), (a, b), solver,
                                            max_steps=50000))(bs)
    for i in range(2):
        one = ik.root_find(fn, jnp.zeros(6), (a, bs[i]), solver, max_steps=50000)
        assert int(batch.stats["num_steps"][i]) == int(one.stats["num_steps"])
        assert int(batch.stats["nfe"][i]) == int(one.stats["nfe"])
        np.testing.assert_allclose(batch.value[i], one.value, rtol=1e-12)
    with pytest.raises(ValueError, match="`n`"):
        ik.VRHalpern(component, 0, step_size=1.0)
    with pytest.raises(ValueError, match="`prob`"):
        ik.VRHalpern(component, n, step_size=1.0, prob=1.5)
    with pytest.raises(ValueError, match="`n`"):
        ik.solvers.finite_sum(component, 0)
    with pytest.raises(TypeError, match="step_size"):  # no default can know L
        ik.VRHalpern(component, n)


def _oscillating():
    """Picard on tanh(1.4 Q y + x), Q orthogonal: no contraction; its residual falls to
    a minimum at step 7 of 25 and then rises again (3.5 times higher at the end)."""
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (6, 6)))
    x = jax.random.normal(jax.random.key(1), (6,))
    return (lambda y, x: jnp.tanh(1.4 * q @ y + x)), x


def test_best_so_far_returns_the_lowest_residual_iterate_with_its_residual():
    f, x = _oscillating()
    n = 25
    tight = ik.Picard(rtol=1e-10, atol=1e-10)
    kw = dict(max_steps=n, throw=False, trace=True, save_iterates=tuple(range(n)))
    plain = ik.fixed_point(f, jnp.zeros(6), x, tight, **kw)
    best = ik.fixed_point(f, jnp.zeros(6), x, ik.BestSoFar(tight), **kw)
    trace = np.asarray(plain.stats["residual_trace"])  # trace[k]: |f(y_k) - y_k|
    k = int(np.argmin(trace))
    assert 0 < k < n - 1 and trace[k] < 0.5 * trace[-1]  # the premise
    # the same run (trace, iterates, steps, nfe, code), another iterate returned
    np.testing.assert_array_equal(best.stats["residual_trace"], trace)
    np.testing.assert_array_equal(best.value, plain.stats["iterates"][k])
    assert float(best.stats["residual"]) == trace[k]
    np.testing.assert_allclose(jnp.linalg.norm(f(best.value, x) - best.value), trace[k],
                               rtol=1e-12)
    assert int(best.stats["num_steps"]) == int(best.stats["nfe"]) == n
    assert best.result == plain.result == ik.RESULTS.nonlinear_max_steps_reached
    # converged: the iterate that met the tolerance; per sample under vmap
    xs = jnp.stack([x, 3.0 * jnp.ones(6)])  # the second saturates: a contraction
    sols = jax.vmap(lambda x: ik.fixed_point(f, jnp.zeros(6), x, ik.BestSoFar(tight),
                                             max_steps=n, throw=False))(xs)
    for i in range(2):
        one = ik.fixed_point(f, jnp.zeros(6), xs[i], ik.BestSoFar(tight), max_steps=n,
                             throw=False)
        np.testing.assert_allclose(sols.value[i], one.value, rtol=1e-12)  # (vmap's
        np.testing.assert_allclose(sols.stats["residual"][i], one.stats["residual"],
                                   rtol=1e-9)  # batched matmul rounds otherwise)
    assert int(sols.stats["num_steps"][1]) < n and float(sols.stats["residual"][1]) <= 1e-10 * (
        1 + float(jnp.linalg.norm(sols.value[1])))
    with pytest.raises(TypeError, match="BestSoFarFixedPoint"):
        ik.BestSoFar(optx.FixedPointIteration(rtol=1e-6, atol=1e-6))


@pytest.mark.parametrize("adjoint", ["implicit", "jfb", "neumann", "phantom", "unrolled"])
def test_best_so_far_gradients_are_those_at_the_returned_iterate(adjoint):
    """Every backward mode applies at the iterate returned: its gradient equals that of
    the same mode at that point given as the solution (`GivenForward`), and the unrolled
    one the finite differences of the whole forward run (the selection included)."""
    from implicit_kit._solve import GivenForward, solve

    f, x = _oscillating()
    c = jnp.linspace(-1.0, 1.0, 6)
    solver = ik.BestSoFar(ik.Picard(rtol=1e-10, atol=1e-10))
    adj = {"implicit": ik.ImplicitAdjoint(lx.GMRES(rtol=1e-12, atol=1e-12)),
           "jfb": ik.JFBAdjoint(), "neumann": ik.NeumannAdjoint(k=4),
           "phantom": ik.PhantomAdjoint(k=4, damping=0.5),
           "unrolled": ik.UnrolledAdjoint()}[adjoint]

    def loss(x):
        sol = ik.fixed_point(f, jnp.zeros(6), x, solver, adjoint=adj, max_steps=25,
                             throw=False)
        return jnp.dot(c, sol.value)

    g = jax.grad(loss)(x)
    if adjoint == "unrolled":
        eps = 1e-6
        want = np.array([(loss(x.at[i].add(eps)) - loss(x.at[i].add(-eps))) / (2 * eps)
                         for i in range(6)])
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-8)
        return
    v = ik.fixed_point(f, jnp.zeros(6), x, solver, max_steps=25, throw=False).value

    def at_v(x):
        sol = solve(f, v, x, GivenForward("fixed_point", lambda y0, *_: y0),
                    has_aux=False, adjoint=adj, throw=False, probe=None)
        return jnp.dot(c, sol.value)

    np.testing.assert_allclose(g, jax.grad(at_v)(x), rtol=1e-9, atol=1e-12)
    assert not np.allclose(g, 0)
