"""Public pieces that had no independent reference: each checked against a closed form,
a hand-written loop or its defining equation (float64 unless a test says otherwise)."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.linalg as jsl
import lineax as lx
import numpy as np
import pytest

import implicit_kit as ik
import implicit_kit.train  # the training layer is imported explicitly

from .helpers import PROBLEMS, rel_err, tiered


# ------------------------------------------------------------------ Neural ODE


class _LinearField(eqx.Module):
    a: jax.Array

    def __call__(self, z, condition):
        del condition
        return self.a @ z


def test_neural_ode_is_the_matrix_exponential_on_a_linear_field():
    a = jr.normal(jr.key(0), (4, 4)) / 2
    z0 = jnp.array([1.0, -0.5, 0.25, 2.0])
    c = jnp.arange(1.0, 5.0)
    ode = ik.models.ODESolve(rtol=1e-11, atol=1e-12)
    model = ik.models.NeuralODE(_LinearField(a), ode, t1=0.7)
    z1, st = model(z0, return_stats=True)
    expm = jsl.expm(0.7 * a)
    np.testing.assert_allclose(z1, expm @ z0, rtol=1e-9)
    assert st.result == ik.RESULTS.successful
    # d<c, z(t1)>/dz0 = expm(t1 A)^T c.
    g = jax.grad(lambda z: c @ model(z))(z0)
    np.testing.assert_allclose(g, expm.T @ c, rtol=1e-8)


# ------------------------------------------------------------ error penalties

# Dormand-Prince 5(4) (Dormand & Prince 1980), written out by hand: the Butcher tableau,
# the fifth-order weights b and the embedded fourth-order weights b_hat of Shampine
# (1986), the pair diffrax's `Dopri5` and torchdiffeq's dopri5 estimate the local error
# with (Hairer's DOPRI5 uses another embedded pair, whose estimate is 3/2 of this one).
_DP_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_DP_B = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
_DP_B_HAT = [1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300,
             1 / 60]


def _dopri5_step(f, y, h):
    k = []
    for row in _DP_A:
        k.append(f(y + h * sum((a * ki for a, ki in zip(row, k)), np.zeros_like(y))))
    y1 = y + h * sum(b * ki for b, ki in zip(_DP_B, k))
    err = h * sum((b - bh) * ki for b, bh, ki in zip(_DP_B, _DP_B_HAT, k))
    return y1, err


def _scaled(y0, y1, err, rtol, atol):
    scale = atol + rtol * np.maximum(np.abs(y0), np.abs(y1))
    return float(np.sqrt(np.mean((err / scale) ** 2)))


def _tanh_field(seed=0):
    w = np.asarray(jr.normal(jr.key(seed), (3, 3)))
    return w, (lambda z: np.tanh(3 * w @ z))


class _TanhField(eqx.Module):
    w: jax.Array

    def __call__(self, z, condition):
        del condition
        return jnp.tanh(3 * self.w @ z)


def test_error_penalty_is_the_sum_of_scaled_error_times_step():
    """Opening the Blackbox's R_E = sum_j E_j h_j against a hand-written Dopri5 loop
    (fixed step h = 0.25 over [0, 1]: four accepted steps)."""
    w, f = _tanh_field()
    z0 = np.array([0.5, -0.2, 0.9])
    rtol, atol, h = 1e-4, 1e-5, 0.25
    ode = ik.models.ODESolve(stepsize_controller=dfx.ConstantStepSize(), dt0=h, rtol=rtol,
                             atol=atol, error_penalty=True)
    z1, st = ik.models.NeuralODE(_TanhField(jnp.asarray(w)), ode)(jnp.asarray(z0),
                                                                 return_stats=True)
    y, total = z0, 0.0
    for _ in range(4):
        y1, err = _dopri5_step(f, y, h)
        total += _scaled(y, y1, err, rtol, atol) * h
        y = y1
    np.testing.assert_allclose(z1, y, rtol=1e-12)
    np.testing.assert_allclose(st.error_penalty, total, rtol=1e-10)
    # The public solver wrapper on its own, in a plain diffrax solve.
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, z, w: jnp.tanh(3 * w @ z)),
        ik.regularizers.ErrorEstimatePenalty(dfx.Dopri5(), rtol, atol), 0.0, 1.0, h,
        jnp.asarray(z0), jnp.asarray(w), stepsize_controller=dfx.ConstantStepSize(),
        saveat=dfx.SaveAt(t1=True, solver_state=True))
    np.testing.assert_allclose(sol.solver_state[1], total, rtol=1e-10)
    assert total > 1e-4  # far above round-off: a missing h (x4) or a wrong scale shows


def test_local_error_penalty_is_one_scaled_step():
    """Locally regularised NDEs: E h of one Dopri5 step from y(t_s), by hand."""
    w, f = _tanh_field(seed=1)
    y_s = np.array([0.3, 0.1, -0.7])
    rtol, atol, h, t_s = 1e-4, 1e-6, 0.1, 0.35
    value = ik.regularizers.local_error_penalty(
        lambda t, y, a: jnp.tanh(3 * a @ y), dfx.Dopri5(), t_s, jnp.asarray(y_s),
        jnp.asarray(w), rtol=rtol, atol=atol, t_end=1.0, dt=h)
    y1, err = _dopri5_step(f, y_s, h)
    np.testing.assert_allclose(value, _scaled(y_s, y1, err, rtol, atol) * h, rtol=1e-10)
    # Clipped at t_end: the step is 1.0 - 0.95, not h.
    clipped = ik.regularizers.local_error_penalty(
        lambda t, y, a: jnp.tanh(3 * a @ y), dfx.Dopri5(), 0.95, jnp.asarray(y_s),
        jnp.asarray(w), rtol=rtol, atol=atol, t_end=1.0, dt=h)
    y1, err = _dopri5_step(f, y_s, 0.05)
    np.testing.assert_allclose(clipped, _scaled(y_s, y1, err, rtol, atol) * 0.05,
                               rtol=1e-8)


# ------------------------------------------------------------------ init_loss


def test_init_loss_is_the_huber_formula_and_trains_only_the_start():
    rng = np.random.default_rng(0)
    z0 = {"a": rng.normal(size=(3, 4)), "b": 3 * rng.normal(size=5)}
    zs = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    for beta in (1.0, 0.3):
        d = np.concatenate([np.abs(z0[k] - zs[k]).ravel() for k in ("a", "b")])
        ref = np.mean([0.5 * x * x / beta if x < beta else x - 0.5 * beta for x in d])
        assert (d < beta).any() and (d >= beta).any()  # both branches are exercised
        val = ik.models.init_loss(z0, zs, beta=beta)
        np.testing.assert_allclose(val, ref, rtol=1e-13)
    g0, gs = jax.grad(lambda a, b: ik.models.init_loss(a, b, beta=0.3), argnums=(0, 1))(
        z0, zs)
    for k in ("a", "b"):
        diff = z0[k] - zs[k]
        np.testing.assert_allclose(g0[k], np.clip(diff / 0.3, -1, 1) / 17, rtol=1e-12)
        assert not np.any(gs[k])  # the end point is detached


# ------------------------------------------------------------------ graph layer


def test_graph_layer_output_is_the_fixed_point_of_its_map():
    layer = ik.nn.ConvergentGraphLayer(3, 4, heads=2, gamma=0.5, key=jr.key(0))
    # Shift the edge logits into (0, 1) where the clip is not saturated.
    last = layer.edge.layers[-1]
    layer = eqx.tree_at(lambda l: l.edge.layers[-1].bias, layer, last.bias + 0.5)
    nodes = jr.normal(jr.key(1), (6, 3))
    adj = np.asarray(jr.uniform(jr.key(2), (6, 6)) < 0.5, dtype=float)
    adj[0] = 0.0  # a node without out-edges
    out = np.asarray(layer(nodes, jnp.asarray(adj)))
    n = nodes.shape[0]
    x = np.asarray(nodes)
    for h in range(2):
        # By hand: logits from the edge MLP on (x_i, x_j), the row-normalised clipped
        # map, and H = gamma A H + b for this head's slice of the output.
        logits = np.array([[np.asarray(layer.edge(jnp.concatenate([nodes[i], nodes[j]])))[h]
                            for j in range(n)] for i in range(n)])
        a = np.zeros((n, n))
        for i in range(n):
            deg = max(adj[i].sum(), 1.0)
            for j in range(n):
                if adj[i, j]:
                    a[i, j] = min(max(logits[i, j], 0.0), 1.0) / deg
        b = (x @ np.asarray(layer.node.weight).T + np.asarray(layer.node.bias))
        b = b.reshape(n, 2, 4)[:, h]
        hh = out[:, 4 * h:4 * (h + 1)]
        np.testing.assert_allclose(hh, 0.5 * a @ hh + b, atol=1e-12)
        np.testing.assert_allclose(hh, np.linalg.solve(np.eye(n) - 0.5 * a, b), atol=1e-12)
        assert np.abs(a).sum() > 0.5  # the map is not trivially zero


# ------------------------------------------------------------------ Halpern


@pytest.mark.parametrize("restart, tol", [(0.9, 1e-8), (None, 1e-4)],
                         ids=["restarted", "fixed_anchor"])
def test_halpern_value_is_the_fixed_point(restart, tol):
    problem = PROBLEMS[0]  # a contraction: y* in closed form
    ystar = problem.exact(problem.args)
    # (The fixed anchor's O(1/k) rate: ~25,000 steps to 1e-4 here.)
    sol = ik.fixed_point(problem.fn, problem.y0, problem.args,
                         ik.Halpern(rtol=0.0, atol=tol, restart=restart), max_steps=100_000)
    residual = float(jnp.linalg.norm(problem.fn(sol.value, problem.args) - sol.value))
    rho = float(jnp.linalg.norm(problem.args[0], 2))  # T is a contraction of factor rho
    assert rho < 1
    # The solve stops at an iterate y whose residual passed the test and returns T(y),
    # whose residual is at most rho times that (the anchored next iterate's is not).
    assert residual <= rho * float(sol.stats["residual"])
    assert float(sol.stats["residual"]) <= tol
    # ||y - y*|| <= ||y - T y|| / (1 - rho).
    assert float(jnp.linalg.norm(sol.value - ystar)) <= tol / (1 - rho)


def test_halpern_reaches_the_nearest_fixed_point_of_a_nonexpansive_map():
    # A projection onto a line is nonexpansive with many fixed points: Halpern with a
    # fixed anchor converges to the one nearest the anchor y0, the projection of y0.
    u = jnp.array([3.0, 4.0]) / 5
    fn = lambda y, a: u * (u @ y)
    y0 = jnp.array([2.0, -1.0])
    sol = ik.fixed_point(fn, y0, None, ik.Halpern(rtol=0, atol=1e-4, restart=None),
                         max_steps=100_000)
    np.testing.assert_allclose(sol.value, u * (u @ y0), atol=1e-4)
    # Another start: its own projection.
    y1 = jnp.array([-1.0, 3.0])
    sol = ik.fixed_point(fn, y1, None, ik.Halpern(rtol=0, atol=1e-4, restart=None),
                         max_steps=100_000)
    np.testing.assert_allclose(sol.value, u * (u @ y1), atol=1e-4)


# ---------------------------------------------------------- spectral radius


def _nonnormal(eigs, seed):
    """A non-symmetric, non-normal matrix with the given (real) spectrum."""
    p = jr.normal(jr.key(seed), (len(eigs), len(eigs))) + 2 * jnp.eye(len(eigs))
    return p @ jnp.diag(jnp.asarray(eigs)) @ jnp.linalg.inv(p)


@pytest.mark.parametrize("radius_fn", [ik.spectral_radius, ik.regularizers.spectral_radius],
                         ids=["ik", "regularizers"])
def test_spectral_radius_on_a_rotation_and_a_plus_minus_pair(radius_fn):
    # A scaled rotation (complex pair 0.8 e^{+-i 0.9}) dominating a non-normal part.
    th = 0.9
    rot = 0.8 * jnp.array([[jnp.cos(th), -jnp.sin(th)], [jnp.sin(th), jnp.cos(th)]])
    rest = _nonnormal([0.5, -0.3, 0.1, 0.05], seed=1)
    q = jnp.linalg.qr(jr.normal(jr.key(2), (6, 6)))[0]
    m = q @ jsl.block_diag(rot, rest) @ q.T
    assert abs(float(jnp.max(jnp.abs(jnp.linalg.eigvals(m)))) - 0.8) < 1e-12
    rho = radius_fn(lambda z, a: a @ z, jnp.zeros(6), m, num_iters=200)
    np.testing.assert_allclose(rho, 0.8, rtol=1e-6)
    # +-0.9 (plain power iteration alternates between two vectors and never settles).
    m = _nonnormal([0.9, -0.9, 0.4, -0.2, 0.1], seed=3)
    rho = radius_fn(lambda z, a: a @ z, jnp.zeros(5), m, num_iters=200)
    np.testing.assert_allclose(rho, 0.9, rtol=1e-6)
    # One dominant real eigenvalue of a non-normal matrix.
    m = _nonnormal([-0.7, 0.5, 0.3, 0.1], seed=4)
    rho = radius_fn(lambda z, a: a @ z, jnp.zeros(4), m, num_iters=200)
    np.testing.assert_allclose(rho, 0.7, rtol=1e-6)


def test_spectral_radius_in_float32_near_and_above_one():
    """float32, where a DEQ user checks stability: a dominant real eigenvalue 1.057 (the
    trained cell of issue 31; the normal equations of the old two-eigenvalue fit were
    singular there and gave inf), a complex pair and a +-lambda pair of modulus 1.02,
    each against the dense eigenvalues."""
    q, _ = jnp.linalg.qr(jr.normal(jr.key(0), (512, 512), jnp.float32))
    e = jnp.concatenate([jnp.array([1.057], jnp.float32),
                         jr.uniform(jr.key(1), (511,), jnp.float32, -0.5, 0.5)])
    a = (q * e) @ q.T
    for iters in (20, 100):
        rho = ik.spectral_radius(lambda y, m: m @ y, jnp.ones(512, jnp.float32), a,
                                 num_iters=iters)
        assert rho.dtype == jnp.float32
        np.testing.assert_allclose(rho, 1.057, rtol=1e-5)
    th = 0.9
    rot = 1.02 * jnp.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    for top in (rot, jnp.diag(jnp.array([1.02, -1.02]))):
        m = jsl.block_diag(top, jnp.diag(jnp.linspace(-0.6, 0.6, 62)))
        qq, _ = jnp.linalg.qr(jr.normal(jr.key(2), (64, 64)))
        m = (qq @ m @ qq.T).astype(jnp.float32)
        exact = float(jnp.max(jnp.abs(jnp.linalg.eigvals(m.astype(jnp.float64)))))
        rho = ik.spectral_radius(lambda y, mm: mm @ y, jnp.ones(64, jnp.float32), m,
                                 num_iters=60)
        np.testing.assert_allclose(rho, exact, rtol=1e-4)


def test_spectral_radius_of_a_digits_deq_cell_in_float32():
    """A real DEQ cell in float32: the digits DEQ's conv cell (as configured, and with the
    MDEQ-style residual connection, whose radius is near 1), built in float32 at its
    initialisation, at the equilibrium of a test digit, against the eigenvalues of its
    dense Jacobian in float64. Before the Rayleigh-Ritz step the residual cell (true
    0.974) gave inf, nan, 1.44 or 4.2 at some of these step counts, which ones depending
    on XLA's rounding; the plain cell's slow convergence (clustered eigenvalues) is the
    power iteration's, not rounding."""
    from implicit_kit.train import config_dir, load_config
    from implicit_kit.train._build import make_model

    x = jnp.asarray(ik.data.load_digits("test")[0][:1], jnp.float32)
    built = {}
    cases = [("true", n, 1e-3) for n in range(100, 420, 40)]
    for residual, iters, rtol in cases + [("true", 1000, 1e-5), ("false", 1000, 1e-5)]:
        if residual not in built:
            cfg = load_config(config_dir() / "digits_deq.yaml",
                              [f"model.residual={residual}"])
            model = make_model(cfg, 1, 8)
            feats = model.stem(x[0])
            z = model.block(feats, inference=True)
            assert z.dtype == jnp.float32
            jac = jax.jacfwd(lambda v: model.block.cell(v, feats).ravel())(z)
            exact = np.max(np.abs(np.linalg.eigvals(np.asarray(jac, np.float64).reshape(
                z.size, z.size))))
            built[residual] = model, feats, z, exact
        model, feats, z, exact = built[residual]
        rho = ik.spectral_radius(model.block.cell, z, feats, num_iters=iters)
        np.testing.assert_allclose(rho, exact, rtol=rtol, err_msg=(residual, iters))


# ------------------------------------------------------------------ has_aux


@pytest.mark.slow
def _torchdeq_fixed_point_iter(f, x0, max_iter, tol):
    """TorchDEQ's `fixed_point_iter` (torchdeq/solver/fp_iter.py, abs stop mode, tau 1,
    one sample) in numpy: it returns `f(x_k)` of the step whose residual
    `|f(x_k) - x_k|` was the lowest, with that residual, and stops once it is < tol."""
    fx = x = np.asarray(x0)
    lowest, lowest_x, nstep = np.inf, fx, 0
    for k in range(max_iter):
        x = fx
        fx = np.asarray(f(x))
        r = float(np.linalg.norm(fx - x))
        if r < lowest:
            lowest, lowest_x, nstep = r, fx, k + 1
        if r < tol:
            break
    return lowest_x, lowest, nstep


@pytest.mark.parametrize("scale", [1.4, 0.6])
def test_best_so_far_picard_is_torchdeq_s_fixed_point_iter(scale):
    """TorchDEQ's default forward solver ported (benchmarks/torchdeq_recipe.py):
    `BestSoFar(Picard(rtol=0, atol=tol))` selects the step TorchDEQ selects, with the
    same residual, on an oscillating map (scale 1.4, capped) and a contraction
    (converged). TorchDEQ returns that step's output f(x_k), implicit_kit its input x_k,
    whose residual the number is."""
    q, _ = jnp.linalg.qr(jr.normal(jr.key(2), (6, 6)))
    x = jr.normal(jr.key(1), (6,))

    def f(y):
        return jnp.tanh(scale * q @ y + x)

    want_x, want_r, want_k = _torchdeq_fixed_point_iter(f, jnp.zeros(6), 25, 1e-6)
    sol = ik.fixed_point(lambda y, _: f(y), jnp.zeros(6), None,
                         ik.BestSoFar(ik.Picard(rtol=0.0, atol=1e-6)), max_steps=25,
                         throw=False)
    np.testing.assert_allclose(f(sol.value), want_x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(float(sol.stats["residual"]), want_r, rtol=1e-12)
    if scale < 1:
        assert want_r < 1e-6 and int(sol.stats["num_steps"]) == want_k
    else:
        assert want_r > 1e-6 and 1 < want_k < 25


def test_has_aux_returns_the_aux_at_the_solution_in_every_entry_point():
    problem = PROBLEMS[3]
    aux_of = lambda y: {"norm": jnp.sum(y**2), "first": y[0]}
    with_aux = lambda y, a: (problem.fn(y, a), aux_of(y))
    c = jnp.cos(jnp.arange(problem.y0.size, dtype=problem.y0.dtype))
    solver = ik.Anderson(m=6, rtol=1e-12, atol=1e-13)

    def loss(args, aux):
        fn = with_aux if aux else problem.fn
        return c @ ik.fixed_point(fn, problem.y0, args, solver, has_aux=aux).value

    sol = ik.fixed_point(with_aux, problem.y0, problem.args, solver, has_aux=True)
    np.testing.assert_allclose(sol.aux["norm"], jnp.sum(sol.value**2), rtol=1e-10)
    np.testing.assert_allclose(sol.aux["first"], sol.value[0], rtol=1e-10)
    assert ik.fixed_point(problem.fn, problem.y0, problem.args, solver).aux is None
    g_aux = jax.grad(loss)(problem.args, True)
    g_plain = jax.grad(loss)(problem.args, False)
    for a, b in zip(g_aux, g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # root_find: y^3 = a with aux y^2; minimise: (y - a)^2 with aux the loss.
    a = jnp.array([8.0, 27.0])
    r = ik.root_find(lambda y, a: (y**3 - a, y**2), jnp.ones(2), a,
                     ik.NewtonKrylov(rtol=1e-12, atol=1e-12), has_aux=True)
    np.testing.assert_allclose(r.value, [2.0, 3.0], rtol=1e-10)
    np.testing.assert_allclose(r.aux, [4.0, 9.0], rtol=1e-10)
    m = ik.minimise(lambda y, a: (jnp.sum((y - a) ** 2), 2 * y), jnp.zeros(2), a,
                    has_aux=True)
    np.testing.assert_allclose(m.value, a, rtol=1e-7)
    np.testing.assert_allclose(m.aux, 2 * a, rtol=1e-7)
    gm = jax.grad(lambda a: jnp.sum(ik.minimise(
        lambda y, a: (jnp.sum((y - a) ** 2), y), jnp.zeros(2), a, has_aux=True).value))(a)
    np.testing.assert_allclose(gm, jnp.ones(2), rtol=1e-7)


# ------------------------------------------------------------------ float32


def _f32(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


F32_SOLVERS = {
    "picard": ik.Picard(rtol=1e-5, atol=1e-6),
    "anderson": ik.Anderson(rtol=1e-5, atol=1e-6),
    "broyden": ik.Broyden(rtol=1e-5, atol=1e-6),
    "newton_krylov": ik.NewtonKrylov(rtol=1e-5, atol=1e-6),
    "halpern": ik.Halpern(rtol=1e-3, atol=1e-4),
    "fallback": ik.Fallback(ik.Picard(rtol=1e-5, atol=1e-6),
                            ik.Anderson(rtol=1e-5, atol=1e-6), max_steps=100),
    "homotopy": ik.HomotopySolver(),
}
F32_ADJOINTS = {
    "implicit": ik.ImplicitAdjoint(),
    "implicit_gmres": ik.ImplicitAdjoint(lx.GMRES(rtol=1e-5, atol=1e-6)),
    "implicit_jvp": ik.ImplicitJVPAdjoint(),
    "neumann": ik.NeumannAdjoint(5),
    "phantom": ik.PhantomAdjoint(5, 0.5),
    "jfb": ik.JFBAdjoint(),
    "unrolled": ik.UnrolledAdjoint(),
}


@pytest.mark.parametrize("solver_name", tiered(list(F32_SOLVERS), ("anderson", "fallback")))
def test_float32_is_preserved_by_every_solver(solver_name):
    problem = PROBLEMS[3]
    args, y0 = _f32(problem.args), _f32(problem.y0)
    c = jnp.ones(y0.shape, jnp.float32)
    loss = lambda a: c @ ik.fixed_point(problem.fn, y0, a, F32_SOLVERS[solver_name],
                                        max_steps=20_000).value
    sol = ik.fixed_point(problem.fn, y0, args, F32_SOLVERS[solver_name], max_steps=20_000)
    assert sol.value.dtype == jnp.float32
    assert sol.stats["residual"].dtype == jnp.float32
    assert rel_err(sol.value, problem.exact(problem.args)) < 1e-3
    g = jax.grad(loss)(args)
    assert all(x.dtype == jnp.float32 for x in g)


@pytest.mark.parametrize("adjoint_name", tiered(list(F32_ADJOINTS), ("implicit", "phantom")))
def test_float32_is_preserved_by_every_adjoint(adjoint_name):
    problem = PROBLEMS[3]
    args, y0 = _f32(problem.args), _f32(problem.y0)
    c = jnp.ones(y0.shape, jnp.float32)
    adjoint = F32_ADJOINTS[adjoint_name]
    loss = lambda a: c @ ik.fixed_point(problem.fn, y0, a, ik.Picard(rtol=1e-6, atol=1e-6),
                                        adjoint=adjoint, max_steps=200).value
    g = jax.grad(loss)(args)
    assert all(x.dtype == jnp.float32 for x in g)
    if adjoint_name == "implicit_jvp":  # forward mode too
        t = jax.jvp(loss, (args,), (_f32(jax.tree_util.tree_map(jnp.ones_like, args)),))[1]
        assert t.dtype == jnp.float32
    if adjoint_name in ("implicit", "implicit_gmres", "implicit_jvp", "unrolled"):
        ref = jax.grad(lambda a: c @ problem.exact(a))(problem.args)  # float64, exact
        assert rel_err(g[0], ref[0]) < 1e-3


# ------------------------------------------------- smaller public pieces


def test_augmented_neural_ode_is_a_neural_ode_on_the_zero_padded_state():
    a = jr.normal(jr.key(5), (5, 5)) / 2  # a field on 3 + 2 augmented dimensions
    x = jnp.array([0.3, -1.0, 0.5])
    ode = ik.models.ODESolve(rtol=1e-11, atol=1e-12)
    anode = ik.models.AugmentedNeuralODE(_LinearField(a), 2, ode, t1=0.5)
    out = anode(x)
    np.testing.assert_allclose(out, jsl.expm(0.5 * a) @ jnp.concatenate([x, jnp.zeros(2)]),
                               rtol=1e-9)


def test_alternating_start_group_count_and_count_params():
    z = ik.models.alternating_start((4, 2, 3), jnp.float32)
    ref = np.ones((4, 2, 3), np.float32)
    ref[0::2] = -1.0  # channels 0, 2 are -1 (the authors' default start)
    np.testing.assert_array_equal(z, ref)
    assert z.dtype == jnp.float32
    assert [ik.models.group_count(c, 8) for c in (16, 12, 7, 3, 30)] == [8, 6, 7, 3, 6]
    model = ik.nn.MLPCell(4, 3, key=jr.key(0))
    manual = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model)
                 if eqx.is_inexact_array(x))
    assert ik.train.count_params(model) == manual > 0
    assert ik.train.count_params((model, jnp.arange(3))) == manual  # integers do not count


def test_variational_dropout_mask_is_inverted_bernoulli():
    drop = ik.nn.VariationalDropout(0.25, (4000,))
    mask = ik.nn.prepare(drop, key=jr.key(0))
    assert isinstance(mask, ik.nn.FixedMask)
    m = np.asarray(mask.mask)
    assert set(np.unique(m).round(12)) == {0.0, round(1 / 0.75, 12)}
    assert abs((m == 0).mean() - 0.25) < 0.03  # 4000 Bernoulli(0.25) draws: sd 0.007
    x = jnp.arange(4000.0)
    np.testing.assert_array_equal(mask(x), x * m)
    assert ik.nn.prepare(drop, key=None, inference=True).mask is None  # identity
    np.testing.assert_array_equal(ik.nn.FixedMask(None)(x), x)
    with pytest.raises(ValueError, match=r"`p` must be in \[0, 1\), got 1.0"):
        ik.nn.VariationalDropout(1.0, (3,))


def test_newton_corrector_converges_quadratically_to_the_fixed_point():
    problem = PROBLEMS[3]
    ystar = problem.exact(problem.args)
    f = lambda z: problem.fn(z, problem.args)
    z = ystar + 0.05 * jnp.cos(jnp.arange(ystar.size))
    errors = [float(jnp.linalg.norm(z - ystar))]
    total = 0
    for _ in range(3):
        z, nfe = ik.homotopy.NewtonCorrector(1, lx.GMRES(rtol=1e-13, atol=1e-15))(f, z)
        errors.append(float(jnp.linalg.norm(z - ystar)))
        total += int(nfe)
    assert errors[-1] < 1e-12
    # Quadratic: e_{k+1} <= C e_k^2 with one C for both steps.
    assert errors[2] <= 10 * errors[1] ** 2 and errors[1] <= 10 * errors[0] ** 2
    assert total > 3  # one linearisation per step plus its Krylov products


def test_count_nfe_is_the_number_of_field_calls_of_diffrax():
    calls = []

    def field(t, y, args):
        jax.debug.callback(lambda: calls.append(1))
        return -3.0 * y * jnp.sin(t)

    for solver in (dfx.Dopri5(), dfx.Tsit5(), dfx.Heun(), dfx.Euler()):
        calls.clear()
        controller = (dfx.ConstantStepSize() if isinstance(solver, dfx.Euler)
                      else dfx.PIDController(rtol=1e-6, atol=1e-6))
        sol = dfx.diffeqsolve(dfx.ODETerm(field), solver, 0.0, 3.0, 0.1, jnp.ones(2),
                              stepsize_controller=controller)
        jax.block_until_ready(sol.ys)
        assert len(calls) == int(ik.homotopy.count_nfe(solver, sol.stats["num_steps"]))


def test_checkpoint_roundtrip_is_bit_exact(tmp_path):
    state = {"w": jr.normal(jr.key(0), (3, 4)), "step": jnp.array(7),
             "f32": jnp.arange(5, dtype=jnp.float32) / 3}
    path = ik.train.save_checkpoint(tmp_path, 3, state, {"name": "x"}, keep=2)
    header, back = ik.train.load_checkpoint(path, jax.tree_util.tree_map(jnp.zeros_like, state))
    assert header["epoch"] == 3 and header["name"] == "x"
    for k in state:
        assert back[k].dtype == state[k].dtype
        np.testing.assert_array_equal(back[k], state[k])
    for epoch in (4, 5):
        ik.train.save_checkpoint(tmp_path, epoch, state, {}, keep=2)
    assert [p.name for p in ik.train.list_checkpoints(tmp_path)] == ["epoch-0004.ckpt",
                                                                     "epoch-0005.ckpt"]
    with pytest.raises(ik.train.CheckpointError, match="does not match the model"):
        ik.train.load_checkpoint(ik.train.list_checkpoints(tmp_path)[-1], {"w": jnp.zeros(2)})


RETURN_SOLVERS = {
    "picard": ik.Picard(rtol=0, atol=1e-6),
    "anderson": ik.Anderson(rtol=0, atol=1e-6),
    "broyden": ik.Broyden(rtol=0, atol=1e-6),
    "newton_krylov": ik.NewtonKrylov(rtol=0, atol=1e-6),
    "halpern": ik.Halpern(rtol=0, atol=1e-6),
    "fallback": ik.Fallback(ik.Picard(rtol=0, atol=1e-6), ik.Anderson(rtol=0, atol=1e-6),
                            max_steps=200),
    "homotopy": ik.HomotopySolver(),
    "fista": ik.FISTA(rtol=0, atol=1e-6),
}


@pytest.mark.parametrize("solver_name", tiered(list(RETURN_SOLVERS), ("halpern", "anderson")))
def test_the_returned_value_has_at_most_the_reported_residual(solver_name):
    """`sol.value` is the point whose residual is reported, or a better one: recompute
    ||T(value) - value|| for every solver on every problem it solves."""
    for problem in PROBLEMS:
        if solver_name in ("picard", "fista") and not problem.picard_ok:
            continue  # FISTA accelerates a map that Picard already converges on
        sol = ik.fixed_point(problem.fn, problem.y0, problem.args,
                             RETURN_SOLVERS[solver_name], max_steps=2000)
        g = jax.tree_util.tree_map(lambda a, b: a - b, problem.fn(sol.value, problem.args),
                                   sol.value)
        recomputed = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(g))))
        assert recomputed <= float(sol.stats["residual"]) * (1 + 1e-9) + 1e-15, (
            problem.name, recomputed, float(sol.stats["residual"]))
