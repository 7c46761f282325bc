"""Backward modes: gradients against finite differences, unrolling and closed forms."""

import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import implicit_kit as ik

from .helpers import PROBLEMS, rel_err, SOLVERS, tiered


EXACT_ADJOINTS = {
    "implicit_picard": ik.ImplicitAdjoint(ik.Picard(rtol=1e-13, atol=1e-14), max_steps=2000),
    "implicit_anderson": ik.ImplicitAdjoint(ik.Anderson(rtol=1e-13, atol=1e-14)),
    "implicit_gmres": ik.ImplicitAdjoint(lx.GMRES(rtol=1e-13, atol=1e-14, restart=20)),
    "implicit_bicgstab": ik.ImplicitAdjoint(lx.BiCGStab(rtol=1e-13, atol=1e-14)),
    "implicit_jvp": ik.ImplicitJVPAdjoint(lx.GMRES(rtol=1e-13, atol=1e-14, restart=20)),
    "unrolled": ik.UnrolledAdjoint(),
}


def _loss(problem, solver, adjoint, max_steps=500):
    c = jax.tree_util.tree_map(
        lambda y: jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)), problem.y0
    )

    def loss(args):
        y = ik.fixed_point(problem.fn, problem.y0, args, solver, adjoint=adjoint,
                           max_steps=max_steps).value
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(c),
                                                   jax.tree_util.tree_leaves(y)))

    return loss


def _fd_directional(loss, args, direction, eps=1e-6):
    plus = jax.tree_util.tree_map(lambda a, d: a + eps * d, args, direction)
    minus = jax.tree_util.tree_map(lambda a, d: a - eps * d, args, direction)
    return (loss(plus) - loss(minus)) / (2 * eps)


def _direction(args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    keys = jax.random.split(jax.random.key(42), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                              jax.tree_util.tree_leaves(b)))


def _solver_for(problem):
    return SOLVERS["newton_krylov"] if not problem.picard_ok else SOLVERS["anderson"]


@functools.cache
def _references(index):
    """Finite differences along a random direction and the unrolled gradient of one
    problem, computed once and shared by every adjoint's test."""
    problem = PROBLEMS[index]
    solver = _solver_for(problem)
    direction = _direction(problem.args)
    fd = _fd_directional(_loss(problem, solver, ik.ImplicitAdjoint()), problem.args,
                         direction)
    unrolled = jax.grad(_loss(problem, solver, ik.UnrolledAdjoint()))(problem.args)
    return direction, fd, unrolled


# The fast tier: every adjoint once and every problem at least once.
FAST_PAIRS = ("implicit_picard-linear", "implicit_anderson-pytree", "implicit_gmres-divergent",
              "implicit_jvp-linear", "unrolled-mlp_deq")


@pytest.mark.parametrize("adjoint_name, index", tiered(
    [(a, i) for a in EXACT_ADJOINTS for i in range(len(PROBLEMS))], FAST_PAIRS,
    ids=[f"{a}-{p.name}" for a in EXACT_ADJOINTS for p in PROBLEMS]))
def test_exact_gradients(adjoint_name, index):
    problem = PROBLEMS[index]
    if not problem.picard_ok and adjoint_name == "implicit_picard":
        pytest.skip("fixed-point iteration on the adjoint diverges like Picard does")
    loss = _loss(problem, _solver_for(problem), EXACT_ADJOINTS[adjoint_name])
    grad = jax.grad(loss)(problem.args)
    direction, fd, unrolled = _references(index)
    assert rel_err(_dot(grad, direction), fd) <= 1e-6
    # Against unrolled differentiation, leaf by leaf.
    for g, u in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(unrolled)):
        assert rel_err(g, u) <= 1e-7


def _linear_map(eig, n=40):
    """T(y) = M y + theta with M = Q diag(eig, uniform(-.5, .5)) Q^T + a small
    non-normal part: spectral radius about |eig|."""
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (n, n)))
    e = jnp.concatenate([jnp.array([eig]), jax.random.uniform(
        jax.random.key(1), (n - 1,), minval=-0.5, maxval=0.5)])
    return (q * e) @ q.T + 0.1 * jax.random.normal(jax.random.key(3), (n, n)) / n**0.5


@pytest.mark.parametrize("eig", [0.5, 0.95, -1.0, 1.05, 3.0])
def test_default_backward_is_exact_for_any_invertible_jacobian(eig):
    """`ImplicitAdjoint()`: Picard where it converges (a contraction's backward is
    Picard's, step for step), its GMRES fallback where Picard alone fails (eigenvalue
    0.95: too slow for the step cap; -1, 1.05, 3: Picard diverges); the gradient
    against the dense solve of (I - M^T) u = w, in float64."""
    m = _linear_map(eig)
    n = m.shape[0]
    w = jnp.cos(jnp.arange(n, dtype=m.dtype))
    exact = jnp.linalg.solve(jnp.eye(n) - m.T, w)
    tol = dict(rtol=1e-12, atol=1e-14)

    def grad(adjoint):
        probe = ik.backward_probe()

        def loss(theta, probe):
            y = ik.fixed_point(lambda y, t: m @ y + t, jnp.zeros(n), theta,
                               ik.NewtonKrylov(**tol), adjoint=adjoint, probe=probe,
                               throw=False).value
            return jnp.vdot(w, y)

        g, pg = jax.grad(loss, argnums=(0, 1))(jnp.ones(n), probe)
        return g, ik.backward_stats(pg)

    g, stats = grad(ik.ImplicitAdjoint(max_steps=200, **tol))
    assert float(stats.num_failed) == 0
    np.testing.assert_allclose(g, exact, rtol=1e-9, atol=1e-11)
    picard, picard_stats = grad(ik.ImplicitAdjoint("picard", max_steps=200, **tol))
    if eig == 0.5:  # a fast contraction: Picard alone, the same steps and values
        assert float(stats.num_steps) == float(picard_stats.num_steps) < 200
        np.testing.assert_array_equal(g, picard)
    else:  # Picard alone is too slow or diverges; the fallback is what solves it
        assert float(picard_stats.num_failed) == 1


def test_exact_gradient_closed_form_linear():
    # y* = (I - A)^-1 b; d<c, y*>/db = (I - A)^-T c; d/dA = (I - A)^-T c y*^T.
    problem = PROBLEMS[0]
    A, b = problem.args
    c = jnp.cos(jnp.arange(b.size, dtype=b.dtype))
    gA, gb = jax.grad(_loss(problem, SOLVERS["anderson"], EXACT_ADJOINTS["implicit_picard"]))(
        problem.args)
    u = jnp.linalg.solve((jnp.eye(b.size) - A).T, c)
    ystar = problem.exact(problem.args)
    np.testing.assert_allclose(gb, u, rtol=1e-10)
    np.testing.assert_allclose(gA, jnp.outer(u, ystar), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("family", tiered(["neumann", "phantom"], ("neumann",)))
def test_inexact_gradients_converge(family):
    problem = PROBLEMS[3]
    solver = SOLVERS["anderson"]
    exact = jax.grad(_loss(problem, solver, EXACT_ADJOINTS["implicit_gmres"]))(problem.args)
    errors = []
    for k in (1, 4, 16, 64):
        adjoint = ik.NeumannAdjoint(k) if family == "neumann" else ik.PhantomAdjoint(k, 0.5)
        g = jax.grad(_loss(problem, solver, adjoint))(problem.args)
        errors.append(rel_err(g[0], exact[0]))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8, errors


def test_phantom_equals_damped_neumann_at_exact_fixed_point():
    # UPG(k, lambda) = lambda * sum_{t<k} (lambda J + (1 - lambda) I)^t at y* (note C6).
    problem = PROBLEMS[3]
    W, U, b, x = problem.args
    ystar = problem.exact(problem.args)
    J = jnp.diag(1 - jnp.tanh(W @ ystar + U @ x + b) ** 2) @ W
    k, lam = 5, 0.5
    Ahat = lam * J + (1 - lam) * jnp.eye(J.shape[0])
    c = jnp.cos(jnp.arange(ystar.size, dtype=ystar.dtype))
    series = lam * sum(jnp.linalg.matrix_power(Ahat, t) for t in range(k))
    u = series.T @ c
    df_dx = jnp.diag(1 - jnp.tanh(W @ ystar + U @ x + b) ** 2) @ U
    g = jax.grad(_loss(problem, SOLVERS["anderson"], ik.PhantomAdjoint(k, lam)))(
        problem.args)
    np.testing.assert_allclose(g[3], df_dx.T @ u, rtol=1e-9)


def test_jfb_is_the_one_step_gradient_a_descent_direction_but_inexact():
    problem = PROBLEMS[3]
    solver = SOLVERS["anderson"]
    exact = jax.grad(_loss(problem, solver, EXACT_ADJOINTS["implicit_gmres"]))(problem.args)
    jfb = jax.grad(_loss(problem, solver, ik.JFBAdjoint()))(problem.args)
    # JFB (Fung et al.): the gradient of <c, f(y*, args)> with y* held constant.
    ystar = problem.exact(problem.args)
    c = jnp.cos(jnp.arange(ystar.size, dtype=ystar.dtype))
    one_step = jax.grad(lambda a: c @ problem.fn(ystar, a))(problem.args)
    for g, ref in zip(jfb, one_step):
        np.testing.assert_allclose(g, ref, rtol=1e-9, atol=1e-12)
    cos = float(jnp.vdot(exact[0], jfb[0]) / (jnp.linalg.norm(exact[0])
                                              * jnp.linalg.norm(jfb[0])))
    assert cos > 0
    assert rel_err(jfb[0], exact[0]) > 1e-3


@pytest.mark.slow
def test_check_grad_reports():
    problem = PROBLEMS[3]
    solver = SOLVERS["anderson"]
    good = ik.check_grad(problem.fn, problem.y0, problem.args, solver,
                         adjoint=EXACT_ADJOINTS["implicit_anderson"])
    assert good["implicit_vs_unrolled"] < 1e-8
    assert good["implicit_vs_fd"] < 1e-6
    bad = ik.check_grad(problem.fn, problem.y0, problem.args, solver,
                        adjoint=ik.JFBAdjoint())
    assert bad["implicit_vs_fd"] > 1e-3
    assert bad["unrolled_vs_fd"] < 1e-6


def test_spectral_radius():
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (12, 12)))
    eig = jnp.linspace(-0.3, 0.7, 12).at[0].set(-0.9)
    A = q @ jnp.diag(eig) @ q.T
    rho = ik.spectral_radius(lambda y, a: a @ y, jnp.zeros(12), A, num_iters=300)
    np.testing.assert_allclose(rho, 0.9, rtol=1e-6)


@pytest.mark.slow
def test_python_scalars_as_args_give_correct_gradients():
    # A custom-VJP boundary can silently drop gradients of non-array inputs.
    fn = lambda y, a: a[0] * jnp.tanh(y) + a[1] * a[2]

    def loss(s, t):
        args = (s, 2, t)  # a traced scalar, a Python int, a traced scalar
        return ik.fixed_point(fn, jnp.array(0.0), args, SOLVERS["anderson"],
                              adjoint=EXACT_ADJOINTS["implicit_anderson"]).value

    gs, gt = jax.grad(loss, argnums=(0, 1))(0.5, 0.3)
    eps = 1e-6
    fd_s = (loss(0.5 + eps, 0.3) - loss(0.5 - eps, 0.3)) / (2 * eps)
    fd_t = (loss(0.5, 0.3 + eps) - loss(0.5, 0.3 - eps)) / (2 * eps)
    assert rel_err(gs, fd_s) < 1e-7 and rel_err(gt, fd_t) < 1e-7
    assert abs(float(gs)) > 1e-3 and abs(float(gt)) > 1e-3

    # A scale captured by closure is differentiated too (it is hoisted into `fn`).
    def closure_loss(s):
        f = lambda y, a: s * jnp.tanh(y) + a
        return ik.fixed_point(f, jnp.array(0.0), 0.6, SOLVERS["anderson"],
                              adjoint=EXACT_ADJOINTS["implicit_anderson"]).value

    g = jax.grad(closure_loss)(0.5)
    fd = (closure_loss(0.5 + eps) - closure_loss(0.5 - eps)) / (2 * eps)
    assert rel_err(g, fd) < 1e-7 and abs(float(g)) > 1e-3


def test_forward_mode():
    problem = PROBLEMS[3]
    adjoint = EXACT_ADJOINTS["implicit_jvp"]
    solver = SOLVERS["anderson"]
    W, U, b, x = problem.args

    def solve_x(x):
        return ik.fixed_point(problem.fn, problem.y0, (W, U, b, x), solver,
                              adjoint=adjoint).value

    ystar = solve_x(x)
    D = jnp.diag(1 - jnp.tanh(W @ ystar + U @ x + b) ** 2)
    exact = jnp.linalg.solve(jnp.eye(W.shape[0]) - D @ W, D @ U)
    np.testing.assert_allclose(jax.jacfwd(solve_x)(x), exact, rtol=1e-9)
    np.testing.assert_allclose(jax.jacrev(solve_x)(x), exact, rtol=1e-9)
    _, tangent = jax.jvp(solve_x, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, exact.sum(1), rtol=1e-9)
    # Hessian-vector product (forward over reverse) against a finite difference.
    loss = lambda x: jnp.sum(solve_x(x) ** 2)
    v = jnp.array([1.0, -0.5, 0.25])
    hvp = jax.jvp(jax.grad(loss), (x,), (v,))[1]
    eps = 1e-5
    fd = (jax.grad(loss)(x + eps * v) - jax.grad(loss)(x - eps * v)) / (2 * eps)
    assert rel_err(hvp, fd) < 1e-6


def test_custom_vjp_adjoint_under_forward_mode_raises():
    # Never a silently wrong forward-mode derivative: JAX refuses jvp of a custom VJP.
    problem = PROBLEMS[3]
    W, U, b, x = problem.args
    f = lambda x: ik.fixed_point(problem.fn, problem.y0, (W, U, b, x)).value
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(f, (x,), (x,))
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jit(jax.jacfwd(f))(x)


def test_custom_root_with_non_jax_solver():
    def bisection(lo_hi, a):
        # A plain NumPy loop on the host: not differentiable by JAX at all.
        def host(a):
            lo, hi = 0.0, max(1.0, float(a))
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if mid**3 < a else (lo, mid)
            return np.asarray(0.5 * (lo + hi), dtype=np.float64)

        return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.float64), a)

    cube_root = ik.custom_root(lambda y, a: y**3 - a)(bisection)
    a = 5.0
    np.testing.assert_allclose(cube_root(jnp.array(1.0), a), a ** (1 / 3), rtol=1e-12)
    g = jax.grad(lambda a: cube_root(jnp.array(1.0), a))(a)
    np.testing.assert_allclose(g, (1 / 3) * a ** (-2 / 3), rtol=1e-9)


def test_minimise_gradient_closed_form():
    X = jax.random.normal(jax.random.key(0), (20, 4))
    t = jax.random.normal(jax.random.key(1), (20,))
    loss = lambda w, lam: 0.5 * jnp.sum((X @ w - t) ** 2) + 0.5 * lam * jnp.sum(w**2)

    def exact(lam):
        return jnp.linalg.solve(X.T @ X + lam * jnp.eye(4), X.T @ t)

    outer = lambda w: jnp.sum(jnp.sin(w))
    g_exact = jax.grad(lambda lam: outer(exact(lam)))(0.3)
    for solver, adjoint in [
        (None, None),
        (ik.NewtonKrylov(rtol=1e-12, atol=1e-12), None),
        (None, ik.ImplicitJVPAdjoint()),
    ]:
        g = jax.grad(lambda lam: outer(ik.minimise(loss, jnp.zeros(4), lam, solver,
                                                   adjoint=adjoint).value))(0.3)
        np.testing.assert_allclose(g, g_exact, rtol=1e-8)
