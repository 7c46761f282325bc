"""monDEQ: the monotonicity margin, splitting convergence and exact gradients."""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import implicit_kit as ik
import implicit_kit.train  # noqa: F401

from .helpers import tiered


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sym_min_eig(w):
    i_w = jnp.eye(w.shape[0]) - w
    return float(jnp.linalg.eigvalsh(0.5 * (i_w + i_w.T))[0])


@pytest.mark.parametrize("m", [0.1, 1.0])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_margin_holds_for_random_weights(m, scale):
    for seed in range(3):
        layer = ik.nn.MonotoneLinear(20, 3, m, key=jr.key(seed))
        layer = eqx.tree_at(lambda l: (l.a, l.b), layer, (scale * layer.a, scale * layer.b))
        assert _sym_min_eig(layer.operator().dense()) >= m - 1e-9 * scale**2


def _circular_conv_matrix(k, c, h, w):
    """Dense matrix of a circular cross-correlation, built with jnp.roll (independent of
    the FFT path)."""

    def apply(z):
        out = jnp.zeros((k.shape[0], h, w))
        kh, kw = k.shape[2:]
        for dy in range(kh):
            for dx in range(kw):
                shifted = jnp.roll(z, (-(dy - kh // 2), -(dx - kw // 2)), axis=(1, 2))
                out = out + jnp.einsum("oi,ihw->ohw", k[:, :, dy, dx], shifted)
        return out

    eye = jnp.eye(c * h * w).reshape(-1, c, h, w)
    return jax.vmap(apply)(eye).reshape(c * h * w, -1).T


@pytest.mark.parametrize("m", [0.1, 1.0])
def test_conv_operator_is_the_circular_parametrisation(m):
    c, h, w = 2, 5, 4
    layer = ik.nn.MonotoneConv(c, 1, (h, w), m, key=jr.key(0))
    layer = eqx.tree_at(lambda l: (l.a, l.b), layer, (3 * layer.a, 3 * layer.b))
    a = _circular_conv_matrix(layer.a, c, h, w)
    b = _circular_conv_matrix(layer.b, c, h, w)
    n = c * h * w
    ref = (1 - m) * jnp.eye(n) - a.T @ a + b - b.T
    op = layer.operator(alpha=0.7)
    np.testing.assert_allclose(op.dense(), ref, atol=1e-12)
    assert _sym_min_eig(op.dense()) >= m - 1e-9
    z = jr.normal(jr.key(1), (c, h, w))
    np.testing.assert_allclose(op.WT(z).ravel(), ref.T @ z.ravel(), atol=1e-12)
    v = jnp.linalg.inv(1.7 * jnp.eye(n) - 0.7 * ref)
    np.testing.assert_allclose(op.V(z).ravel(), v @ z.ravel(), atol=1e-12)


def _hard_layer(n=30, seed=0):
    layer = ik.nn.MonotoneLinear(n, 4, m=1.0, key=jr.key(seed))
    return eqx.tree_at(lambda l: (l.a, l.b), layer, (3 * layer.a, 3 * layer.b))


def _fixed_point_residual(layer, x, z):
    w = layer.operator().dense()
    return float(jnp.linalg.norm(z - jax.nn.relu(w @ z + layer.bias(x))))


def test_peaceman_rachford_converges_where_plain_iteration_diverges():
    layer = _hard_layer()
    x = jnp.array([1.0, -0.4, 0.3, 2.0])
    assert float(jnp.linalg.norm(jnp.eye(30) - layer.operator().dense(), 2)) > 10
    plain = ik.fixed_point(
        lambda z, xx: jax.nn.relu(layer.operator().W(z) + layer.bias(xx)), jnp.zeros(30), x,
        ik.Picard(rtol=1e-10, atol=1e-12), max_steps=300, throw=False,
    )
    assert plain.result != ik.RESULTS.successful
    assert _fixed_point_residual(layer, x, plain.value) > 1.0
    model = ik.models.MonotoneDEQ(layer, ik.models.PeacemanRachford(1.0, 1e-12, 1e-13),
                                  max_steps=2000, throw=True)
    z, st = model(x, return_stats=True)
    assert _fixed_point_residual(layer, x, z) < 1e-9
    # Forward-backward converges too at a small enough step (alpha <= 2m/L^2) ...
    lip = float(jnp.linalg.norm(jnp.eye(30) - layer.operator().dense(), 2))
    fb = ik.models.MonotoneDEQ(
        layer, ik.models.ForwardBackward(1.0 / lip**2, 1e-12, 1e-13), max_steps=100_000,
        throw=True,
    )
    np.testing.assert_allclose(fb(x), z, atol=1e-8)
    # ... and one equilibrium whatever the start (uniqueness).
    for seed in range(3):
        z0 = 5 * jr.normal(jr.key(seed), (30,))
        sol = ik.models.PeacemanRachford(1.0, 1e-12, 1e-13).solve(layer, x, y0=z0,
                                                                  max_steps=2000)
        np.testing.assert_allclose(sol.value, z, atol=1e-9)


def _dense_reference_grad(layer, x, z_star, c):
    """Gradient of c.z* with the activation pattern frozen at z*: z* = (I - DW)^-1 D(Ux+b),
    differentiated by JAX through a dense solve (the dense implicit gradient)."""
    w = layer.operator().dense()
    d = (w @ z_star + layer.bias(x).ravel() > 0).astype(float)

    def loss(layer):
        w = layer.operator().dense()
        n = w.shape[0]
        z = jnp.linalg.solve(jnp.eye(n) - d[:, None] * w, d * layer.bias(x).ravel())
        return jnp.dot(c, z)

    return eqx.filter_grad(loss)(layer)


@pytest.mark.parametrize("splitting", ["pr", "fb"])
def test_gradient_matches_dense_implicit_gradient(splitting):
    layer = _hard_layer(n=12, seed=1) if splitting == "pr" else ik.nn.MonotoneLinear(
        12, 4, m=1.0, key=jr.key(1))
    x = jnp.array([0.5, -1.0, 0.3, 1.5])
    adjoint = ik.ImplicitAdjoint(ik.Picard(rtol=1e-14, atol=1e-15), max_steps=100_000)
    if splitting == "pr":
        solver = ik.models.PeacemanRachford(1.0, 1e-14, 1e-15)
    else:
        lip = float(jnp.linalg.norm(jnp.eye(12) - layer.operator().dense(), 2))
        solver = ik.models.ForwardBackward(1.0 / lip**2, 1e-14, 1e-15)
    model = ik.models.MonotoneDEQ(layer, solver, adjoint, max_steps=100_000, throw=True)
    c = jr.normal(jr.key(9), (12,))
    z = model(x)
    g = eqx.filter_grad(lambda m: jnp.dot(c, m(x)))(model).layer
    ref = _dense_reference_grad(layer, x, z, c)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(b))))


@pytest.mark.slow
def test_conv_mondeq_gradient_matches_dense():
    layer = ik.nn.MonotoneConv(2, 1, (4, 4), m=0.5, key=jr.key(3))
    layer = eqx.tree_at(lambda l: (l.a, l.b), layer, (2 * layer.a, 2 * layer.b))
    x = jr.normal(jr.key(4), (1, 4, 4))
    adjoint = ik.ImplicitAdjoint(ik.Picard(rtol=1e-14, atol=1e-15), max_steps=100_000)
    model = ik.models.MonotoneDEQ(layer, ik.models.PeacemanRachford(1.0, 1e-14, 1e-15),
                                  adjoint, max_steps=100_000, throw=True)
    z = model(x)
    c = jr.normal(jr.key(5), z.shape)
    g = eqx.filter_grad(lambda m: jnp.sum(c * m(x)))(model).layer
    ref = _dense_reference_grad(layer, x, z.ravel(), c.ravel())
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("splitting", tiered(["forward_backward", "peaceman_rachford"],
                                             ("forward_backward",)))
def test_halpern_solves_the_splitting_maps(splitting):
    """Halpern (restarted, and with a fixed anchor) iterating the forward-backward map at
    alpha = m/L^2 (averaged) or the Peaceman-Rachford map (nonexpansive) reaches the
    equilibrium that plain Peaceman-Rachford finds, with the same implicit gradient."""
    layer = ik.nn.MonotoneLinear(12, 4, 0.5, key=jr.key(3))
    x = jnp.array([0.7, -1.2, 0.4, 1.5])
    ref = ik.models.MonotoneDEQ(layer, ik.models.PeacemanRachford(1.0, 1e-13, 1e-14),
                                max_steps=5000, throw=True)
    z_ref = ref(x)
    lip = float(jnp.linalg.norm(jnp.eye(12) - layer.operator().dense(), 2))

    def make(solver):
        split = (ik.models.ForwardBackward(0.5 / lip**2, solver=solver)
                 if splitting == "forward_backward"
                 else ik.models.PeacemanRachford(1.0, solver=solver))
        return ik.models.MonotoneDEQ(layer, split, max_steps=100_000, throw=True)

    c = jnp.cos(jnp.arange(12.0))
    g_ref = jax.grad(lambda xx: c @ ref(xx))(x)
    for solver, tol in ((ik.Halpern(rtol=0, atol=1e-11), 1e-8),
                        (ik.Halpern(rtol=0, atol=1e-4, restart=None), 5e-3)):  # O(1/k)
        model = make(solver)
        z, st = model(x, return_stats=True)
        np.testing.assert_allclose(z, z_ref, atol=tol)
        assert bool(st.result == ik.RESULTS.successful)
        if solver.restart is not None:
            np.testing.assert_allclose(jax.grad(lambda xx: c @ model(xx))(x), g_ref,
                                       rtol=1e-6, atol=1e-9)
        else:  # the fixed anchor's O(1/k) steps: the given solver ran, not Picard (< 100)
            assert int(st.num_steps) > 1000


def test_halpern_bound_on_the_forward_backward_operator():
    """Reference note C8, check 2: the monDEQ forward-backward map at alpha = 2m/L^2 is
    nonexpansive, and fixed-anchor Halpern's residual stays below 2||z0 - z*||/(k+1) at
    every step k (z* from plain Peaceman-Rachford at 1e-13)."""
    m = 0.5
    layer = ik.nn.MonotoneLinear(12, 4, m, key=jr.key(4))
    x = jnp.array([0.2, 1.1, -0.8, 0.5])
    w = layer.operator().dense()
    c = layer.bias(x)
    lip = float(jnp.linalg.norm(jnp.eye(12) - w, 2))
    alpha = 2 * m / lip**2
    fb = lambda z, _: jax.nn.relu((1 - alpha) * z + alpha * (w @ z + c))  # written out
    z_star = ik.models.MonotoneDEQ(layer, ik.models.PeacemanRachford(1.0, 1e-13, 1e-14),
                                   max_steps=5000, throw=True)(x)
    np.testing.assert_allclose(fb(z_star, None), z_star, atol=1e-11)
    z0 = jnp.full(12, 3.0)
    k = 2000
    sol = ik.fixed_point(fb, z0, None, ik.Halpern(rtol=0, atol=0, restart=None),
                         max_steps=k, throw=False, trace=True)
    trace = np.asarray(sol.stats["residual_trace"])
    bound = 2 * float(jnp.linalg.norm(z0 - z_star)) / (np.arange(k) + 1)
    assert np.all(trace <= bound * (1 + 1e-9) + 1e-13)
    assert trace[-1] < 1e-2 * trace[0]
    # The iteration is Halpern's: its first residuals against the loop written out.
    z, hand = np.asarray(z0), []
    for i in range(50):
        tz = np.asarray(fb(z, None))
        hand.append(np.linalg.norm(tz - z))
        z = (np.asarray(z0) + (i + 1) * tz) / (i + 2)
    np.testing.assert_allclose(trace[:50], hand, rtol=1e-10)


def test_lipschitz_is_the_norm_of_i_minus_w():
    for layer in (_hard_layer(), eqx.tree_at(
            lambda l: (l.a, l.b), ik.nn.MonotoneConv(3, 1, (5, 4), key=jr.key(2)),
            replace_fn=lambda a: 3 * a)):
        op = layer.operator()
        n = op.dense().shape[0]
        want = float(jnp.linalg.norm(jnp.eye(n) - op.dense(), 2))
        assert want > 5
        np.testing.assert_allclose(float(op.lipschitz()), want, rtol=1e-5)  # a step size
        np.testing.assert_allclose(float(op.lipschitz(300)), want, rtol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_the_default_step_size_converges_fast_where_a_fixed_one_is_slow(kind):
    """`alpha=None` (the default): Peaceman–Rachford at 1/sqrt(mL) takes about the steps
    of the best power-of-two step size and far fewer than α = 1 on an operator with a
    large L (as training makes it); forward–backward at m/L² converges where a fixed
    0.1 (its old default) diverges; the gradient does not depend on the step size."""
    if kind == "dense":
        layer, x = _hard_layer(), jnp.array([1.0, -0.4, 0.3, 2.0])
    else:
        layer = eqx.tree_at(lambda l: (l.a, l.b), ik.nn.MonotoneConv(
            4, 2, (6, 6), key=jr.key(3)), replace_fn=lambda a: 4 * a)
        x = jr.normal(jr.key(4), (2, 6, 6))
    lip = float(layer.operator().lipschitz())
    assert lip > 20

    def steps(splitting):
        model = ik.models.MonotoneDEQ(layer, splitting, max_steps=5000)
        _, st = model(x, return_stats=True)
        assert st.result == ik.RESULTS.successful
        return int(st.num_steps)

    tol = dict(rtol=1e-8, atol=1e-10)
    fixed = {a: steps(ik.models.PeacemanRachford(a, **tol)) for a in 2.0 ** -np.arange(7)}
    auto = steps(ik.models.PeacemanRachford(**tol))
    assert auto <= 1.25 * min(fixed.values()) and 2 * auto < fixed[1.0], (auto, fixed)
    _, st = ik.models.MonotoneDEQ(layer, ik.models.ForwardBackward(0.1, **tol),
                                  max_steps=5000)(x, return_stats=True)
    assert st.result != ik.RESULTS.successful
    if kind == "dense":  # (its rate, sqrt(1 - m²/L²), needs ~L² steps: L = 73 for conv)
        assert steps(ik.models.ForwardBackward(**tol)) < 5000
    grads = [eqx.filter_grad(lambda lay: jnp.sum(ik.models.MonotoneDEQ(
        lay, ik.models.PeacemanRachford(a, rtol=1e-13, atol=1e-14), max_steps=5000)(x)))(
        layer).a for a in (1.0, None)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_the_digits_mondeq_trains_with_every_solve_within_its_step_cap(tmp_path):
    """configs/digits_mondeq.yaml (the demo's row): with α = 1 its splitting needed 145
    steps after 5 epochs (‖I − W‖ grew from 5 to 95) and failed on every sample at its
    cap of 100; with the default step size every train and test solve converges."""
    cfg = ik.train.load_config(ROOT / "configs" / "digits_mondeq.yaml", [
        "train.epochs=5", "train.progress=false", f"train.checkpoint_dir={tmp_path}"])
    assert cfg.model.max_steps == 100
    history = ik.train.fit(cfg).history
    for row in history:
        assert row["failure_rate"] == 0 and row["test_failure_rate"] == 0, row
        assert row["test_num_steps"] < 50, row
    assert history[-1]["test_acc"] > 0.6  # it learns (0.98 after the config's 10 epochs)
