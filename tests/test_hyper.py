"""ik.hyper: hypergradients against closed forms and finite differences (float64),
Neumann and unrolled convergence, failure reporting, vmap and sharding over
hyperparameters, the online tuning loop."""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import implicit_kit as ik

from .helpers import xla_flags


def _ridge_data(n=40, d=6, m=25, seed=0):
    k = jr.split(jr.key(seed), 5)
    X = jr.normal(k[0], (n, d))
    w_true = jr.normal(k[1], (d,))
    y = X @ w_true + 0.3 * jr.normal(k[2], (n,))
    Xv = jr.normal(k[3], (m, d))
    yv = Xv @ w_true + 0.3 * jr.normal(k[4], (m,))
    return X, y, Xv, yv


def _inner(w, lam, data):
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(lam * w**2)


def _outer(w, lam, data):
    Xv, yv = data
    return 0.5 * jnp.mean((Xv @ w - yv) ** 2)


def _ridge_closed_form(X, y, Xv, yv, lam):
    n, d = X.shape
    A = X.T @ X / n + jnp.diag(jnp.broadcast_to(lam, (d,)))
    w = jnp.linalg.solve(A, X.T @ y / n)
    g_v = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    per_feature = -w * jnp.linalg.solve(A, g_v)  # dL_V/dλ_j = -w_j (A⁻¹ g_v)_j
    return w, per_feature


@pytest.mark.parametrize("vector", [False, True])
def test_ridge_cg_matches_closed_form(vector):
    X, y, Xv, yv = _ridge_data()
    lam = jnp.array([0.1, 0.3, 0.05, 1.0, 0.2, 0.7]) if vector else jnp.array(0.3)
    w, per_feature = _ridge_closed_form(X, y, Xv, yv, lam)
    expected = per_feature if vector else per_feature.sum()
    for method in ("cg", "gmres"):
        g, st = ik.hyper.hypergradient(_inner, _outer, w, lam, inner_args=(X, y),
                                       outer_args=(Xv, yv), method=method,
                                       return_stats=True)
        assert g.shape == lam.shape
        np.testing.assert_allclose(g, expected, rtol=1e-8, atol=1e-14)
        assert st["result"] == ik.RESULTS.successful and float(st["residual"]) < 1e-8


def test_neumann_and_unrolled_converge_to_ift():
    X, y, Xv, yv = _ridge_data()
    lam = jnp.array(0.2)
    w, per_feature = _ridge_closed_form(X, y, Xv, yv, lam)
    exact = per_feature.sum()
    H = X.T @ X / X.shape[0] + lam * jnp.eye(X.shape[1])
    alpha = float(1.0 / jnp.linalg.eigvalsh(H).max())
    kw = dict(inner_args=(X, y), outer_args=(Xv, yv), alpha=alpha)
    errs_n, errs_u = [], []
    for k in (1, 5, 20, 80):
        gn = ik.hyper.hypergradient(_inner, _outer, w, lam, method="neumann", k=k, **kw)
        gu = ik.hyper.hypergradient(_inner, _outer, w, lam, method="unrolled", k=k + 1,
                                    **kw)
        errs_n.append(abs(float(gn - exact)) / abs(float(exact)))
        errs_u.append(abs(float(gu - exact)) / abs(float(exact)))
        # from w*, k+1 unrolled GD steps are exactly the k-term Neumann series
        np.testing.assert_allclose(gu, gn, rtol=1e-9)
    assert all(a > b for a, b in zip(errs_n, errs_n[1:])), errs_n
    assert errs_n[-1] < 1e-6 and errs_n[0] > 1e-2
    # the series: α Σ_{j≤k} (I - αH)^j, checked against the dense formula
    k = 5
    M = jnp.eye(6) - alpha * H
    S = alpha * sum(jnp.linalg.matrix_power(M, j) for j in range(k + 1))
    g_v = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    dense = -jnp.sum(w * (S @ g_v))
    gn = ik.hyper.hypergradient(_inner, _outer, w, lam, method="neumann", k=k, **kw)
    np.testing.assert_allclose(gn, dense, rtol=1e-10)


def test_hyper_cleaning_closed_form_and_fd():
    """Per-example weights σ(λ_i) on a squared loss: closed form and finite differences."""
    k = jr.split(jr.key(3), 4)
    n, d, gamma = 30, 5, 0.1
    X = jr.normal(k[0], (n, d))
    y = X @ jr.normal(k[1], (d,)) + jnp.where(jnp.arange(n) < 6, 3.0, 0.0)  # corrupted
    Xv = jr.normal(k[2], (20, d))
    yv = Xv @ jr.normal(k[1], (d,))
    lam = 0.5 * jr.normal(k[3], (n,))

    def inner(w, lam, data):
        X, y = data
        return 0.5 * jnp.sum(jax.nn.sigmoid(lam) * (X @ w - y) ** 2) + 0.5 * gamma * w @ w

    def solve(lam):
        D = jax.nn.sigmoid(lam)
        return jnp.linalg.solve(X.T @ (D[:, None] * X) + gamma * jnp.eye(d), X.T @ (D * y))

    def val(lam):
        return _outer(solve(lam), lam, (Xv, yv))

    w = solve(lam)
    g = ik.hyper.hypergradient(inner, _outer, w, lam, inner_args=(X, y),
                               outer_args=(Xv, yv))
    A = X.T @ (jax.nn.sigmoid(lam)[:, None] * X) + gamma * jnp.eye(d)
    g_v = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    s = jax.nn.sigmoid(lam)
    closed = -s * (1 - s) * (X @ w - y) * (X @ jnp.linalg.solve(A, g_v))
    np.testing.assert_allclose(g, closed, rtol=1e-8, atol=1e-14)
    eps = 1e-6
    fd = jnp.stack([(val(lam.at[i].add(eps)) - val(lam.at[i].add(-eps))) / (2 * eps)
                    for i in range(n)])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-10)


@pytest.mark.slow
def test_logistic_on_digits_matches_fd():
    """L2-regularised multinomial logistic regression on the digits (64 features, 10
    classes, 650 weights), inner problem by Newton in float64; the IFT hypergradient of
    the validation loss w.r.t. log λ matches central finite differences of re-solves."""
    x, y = ik.data.load_digits("train")
    x = jnp.asarray(x.reshape(len(y), -1)[:300], jnp.float64)
    y = jnp.asarray(y[:300])
    xtr, ytr, xv, yv = x[:200], y[:200], x[200:], y[200:]

    def unpack(w):
        return w[:640].reshape(64, 10), w[640:]

    def nll(w, data):
        X, Y = data
        W, b = unpack(w)
        return optax.softmax_cross_entropy_with_integer_labels(X @ W + b, Y).mean()

    def inner(w, log_lam, data):
        return nll(w, data) + 0.5 * jnp.exp(log_lam) * jnp.sum(unpack(w)[0] ** 2)

    def outer(w, log_lam, data):
        return nll(w, data)

    grad = jax.jit(jax.grad(inner))
    hess = jax.hessian(inner)

    @jax.jit
    def newton(w, log_lam):  # (compiled once: eager, the 90 steps took 20 s)
        H = hess(w, log_lam, (xtr, ytr)) + 1e-12 * jnp.eye(650)
        return w - jnp.linalg.solve(H, grad(w, log_lam, (xtr, ytr)))

    def solve(log_lam):
        w = jnp.zeros(650)
        for _ in range(30):
            w = newton(w, log_lam)
        assert float(jnp.linalg.norm(grad(w, log_lam, (xtr, ytr)))) < 1e-11
        return w

    log_lam = jnp.log(jnp.array(0.01))
    w = solve(log_lam)
    g = ik.hyper.hypergradient(inner, outer, w, log_lam, inner_args=(xtr, ytr),
                               outer_args=(xv, yv), rtol=1e-11, atol=1e-14,
                               max_steps=3000)
    eps = 1e-4
    fd = (outer(solve(log_lam + eps), None, (xv, yv))
          - outer(solve(log_lam - eps), None, (xv, yv))) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-5)


def test_failure_raises_or_is_flagged():
    X, y, Xv, yv = _ridge_data(d=6)
    lam = jnp.array(1e-3)
    w, _ = _ridge_closed_form(X, y, Xv, yv, lam)
    kw = dict(inner_args=(X, y), outer_args=(Xv, yv), method="cg", max_steps=1)
    with pytest.raises(Exception, match="without converging"):
        jax.block_until_ready(ik.hyper.hypergradient(_inner, _outer, w, lam, **kw))
    g, st = ik.hyper.hypergradient(_inner, _outer, w, lam, throw=False, return_stats=True,
                                   **kw)
    assert st["result"] == ik.RESULTS.backward_max_steps_reached and float(st["residual"]) > 1e-6
    with pytest.raises(TypeError, match="floating arrays"):
        ik.hyper.hypergradient(_inner, _outer, w, jnp.array(1), **kw)
    with pytest.raises(ValueError, match="`method`"):
        ik.hyper.hypergradient(_inner, _outer, w, lam, method="lu")
    with pytest.raises(ValueError, match="scalar"):
        ik.hyper.hypergradient(lambda w, h, a: w, _outer, w, lam, inner_args=(X, y),
                               outer_args=(Xv, yv))


def _hg_at(lam, X, y, Xv, yv):
    n, d = X.shape
    w = jnp.linalg.solve(X.T @ X / n + lam * jnp.eye(d), X.T @ y / n)
    return ik.hyper.hypergradient(_inner, _outer, w, lam, inner_args=(X, y),
                                  outer_args=(Xv, yv))


@pytest.mark.slow
def test_vmap_over_lambdas_equals_separate_calls():
    X, y, Xv, yv = _ridge_data()
    lams = jnp.logspace(-3, 1, 16)
    batched = ik.hyper.vmap_hparams(_hg_at, lams, X, y, Xv, yv)
    separate = jnp.stack([_hg_at(lam, X, y, Xv, yv) for lam in lams])
    np.testing.assert_allclose(batched, separate, rtol=1e-10)
    for lam, g in zip(lams, batched):
        np.testing.assert_allclose(g, _ridge_closed_form(X, y, Xv, yv, lam)[1].sum(),
                                   rtol=1e-8)
    rows = ik.hyper.metrics_table({"lam": lams}, {"hypergrad": batched})
    assert len(rows) == 16 and rows[3]["lam"] == pytest.approx(float(lams[3]))
    assert "hypergrad" in ik.hyper.format_table(rows)
    with pytest.raises(ValueError, match="leading"):
        ik.hyper.vmap_hparams(_hg_at, {"a": lams, "b": lams[:3]}, X, y, Xv, yv)


def test_vmap_over_solver_tolerance_and_damping():
    """Solver settings given as arrays are hyperparameters like any other: one vmapped
    call equals the separate solves, and each setting meets its own tolerance."""
    W = 0.9 * jnp.eye(3)[::-1]

    def solve(h, x):
        sol = ik.fixed_point(lambda z, a: jnp.tanh(W @ z + a), jnp.zeros(3), x,
                             ik.Picard(rtol=h["rtol"], atol=0.0, damping=h["damping"]),
                             max_steps=500)
        res = jnp.linalg.norm(jnp.tanh(W @ sol.value + x) - sol.value)
        return {"steps": sol.stats["num_steps"], "res": res,
                "bound": h["rtol"] * jnp.linalg.norm(sol.value)}

    hs = {"rtol": jnp.logspace(-2, -10, 4), "damping": jnp.array([1.0, 0.7, 0.5, 1.0])}
    x = jnp.array([1.0, -0.5, 0.3])
    batched = ik.hyper.vmap_hparams(solve, hs, x)
    for i in range(4):
        one = solve({k: v[i] for k, v in hs.items()}, x)
        assert int(one["steps"]) == int(batched["steps"][i])
        np.testing.assert_allclose(batched["res"][i], one["res"], rtol=1e-8, atol=1e-15)
    assert bool(jnp.all(batched["res"] <= batched["bound"]))
    assert int(batched["steps"][3]) > int(batched["steps"][0])  # tighter tolerance


@pytest.mark.slow
def test_vmap_sharded_over_forced_host_devices(tmp_path):
    script = textwrap.dedent("""
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np
        from tests.test_hyper import _hg_at, _ridge_data
        import implicit_kit as ik
        assert len(jax.devices()) == 4
        X, y, Xv, yv = _ridge_data()
        lams = jnp.logspace(-3, 1, 16)
        out = ik.hyper.vmap_hparams(_hg_at, lams, X, y, Xv, yv)
        assert len(out.sharding.device_set) == 4, out.sharding
        one = ik.hyper.vmap_hparams(_hg_at, lams, X, y, Xv, yv, devices=jax.devices()[:1])
        print("MAXREL", float(np.max(np.abs(np.asarray(out) - np.asarray(one))
                                     / np.abs(np.asarray(one)))))
    """)
    env = {**os.environ, "XLA_FLAGS": xla_flags(4),
           "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("MAXREL")[1]) < 1e-10


def test_tune_lowers_validation_loss_per_feature_decay():
    """Per-feature log weight decay on a ridge problem whose validation set prefers
    different penalties per feature: tuning lowers the validation loss, and the exact
    optimum of the tuned λ (closed form re-solve) agrees with the loop's value."""
    X, y, Xv, yv = _ridge_data(n=30, d=6, seed=5)

    def inner(w, log_lam, data):
        return _inner(w, jnp.exp(log_lam), data)

    w0 = jnp.zeros(6)
    h0 = jnp.zeros(6)  # λ = 1 for every feature
    res = ik.hyper.tune(inner, _outer, w0, h0, inner_optimizer=optax.sgd(0.3),
                        outer_optimizer=optax.adam(0.05), num_outer=150, inner_steps=20,
                        inner_args=(X, y), outer_args=(Xv, yv), method="cg")
    hist = res.history
    assert hist["outer_loss"].shape == (150,)
    assert not bool(jnp.any(hist["solve_failed"]))
    w_start, _ = _ridge_closed_form(X, y, Xv, yv, jnp.exp(h0))
    w_end, _ = _ridge_closed_form(X, y, Xv, yv, jnp.exp(res.hparams))
    start, end = _outer(w_start, None, (Xv, yv)), _outer(w_end, None, (Xv, yv))
    assert float(end) < 0.8 * float(start)
    np.testing.assert_allclose(hist["outer_loss"][-1], end, rtol=1e-3)


def test_tune_skips_failed_hypergradient_steps():
    """A CG solve that does not converge (one step allowed for a 6-dimensional
    system) is flagged and its hyperparameter step is not applied; with enough steps
    every step is applied."""
    X, y, Xv, yv = _ridge_data(n=30, d=6, seed=2)
    h0 = jnp.full(6, 0.5)

    def run(max_steps):
        return ik.hyper.tune(_inner, _outer, jnp.zeros(6), h0,
                             inner_optimizer=optax.sgd(0.05),
                             outer_optimizer=optax.sgd(0.1), num_outer=4, inner_steps=3,
                             inner_args=(X, y), outer_args=(Xv, yv), method="cg",
                             rtol=1e-10, max_steps=max_steps)

    bad = run(1)
    assert bool(jnp.all(bad.history["skipped"])) and bool(jnp.all(bad.history["solve_failed"]))
    np.testing.assert_array_equal(bad.hparams, h0)
    good = run(50)
    assert not bool(jnp.any(good.history["skipped"]))
    assert not bool(jnp.any(good.history["solve_failed"]))
    assert float(jnp.max(jnp.abs(good.hparams - h0))) > 1e-4


def test_tune_with_equinox_model():
    """`params` may be an Equinox model with non-array leaves (activation functions)."""
    mlp = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a)
                                 else a, eqx.nn.MLP(3, 1, 8, 1, key=jr.key(0)))
    xs = jr.normal(jr.key(1), (64, 3))
    ys = jnp.sin(xs).sum(1, keepdims=True)

    def inner(m, log_wd, data):
        x, y = data
        pred = jax.vmap(m)(x)
        leaves = jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))
        return jnp.mean((pred - y) ** 2) + jnp.exp(log_wd) * sum(jnp.sum(p**2)
                                                                  for p in leaves)

    def outer(m, log_wd, data):
        x, y = data
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    res = ik.hyper.tune(inner, outer, mlp, jnp.array(-2.0),
                        inner_optimizer=optax.adam(1e-2), outer_optimizer=optax.sgd(0.5),
                        num_outer=5, inner_steps=10, inner_args=(xs, ys),
                        outer_args=(xs[:32], ys[:32]), method="neumann", k=5, alpha=1e-2)
    assert isinstance(res.params, eqx.nn.MLP) and res.hparams.shape == ()
    assert float(res.history["outer_loss"][-1]) < float(res.history["outer_loss"][0])


def test_stn_linear_layer_algebra_against_its_formula():
    """`StnLinear`: y = s(W_e x + b_e) + (Vλ)⊙(W_h x) + (V'λ)⊙b_h, checked against the
    effective weights formed by hand in numpy (per example under vmap), the elementary
    layer alone without hyperparameters, and the authors' initialisation."""
    layer = ik.hyper.StnLinear(6, 4, 3, key=jax.random.key(0))
    layer = eqx.tree_at(lambda m: m.elem_scalar, layer, jnp.asarray(1.7))
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(5, 6)))
    hs = jnp.asarray(rng.normal(size=(5, 3)))
    ys = jax.vmap(layer)(xs, hs)
    we, wh = np.asarray(layer.elem_weight), np.asarray(layer.hyper_weight)
    be, bh = np.asarray(layer.elem_bias), np.asarray(layer.hyper_bias)
    v = np.asarray(layer.to_scalars)
    for x, h, y in zip(np.asarray(xs), np.asarray(hs), np.asarray(ys)):
        a, c = (v @ h)[:4], (v @ h)[4:]
        w_eff = 1.7 * we + a[:, None] * wh
        b_eff = 1.7 * be + c * bh
        np.testing.assert_allclose(y, w_eff @ x + b_eff, rtol=1e-5, atol=1e-6)
        w2, b2 = layer.weights(jnp.asarray(h))
        np.testing.assert_allclose(w2, w_eff, rtol=1e-6)
        np.testing.assert_allclose(b2, b_eff, rtol=1e-6)
    np.testing.assert_allclose(layer(xs[0], None), 1.7 * (we @ np.asarray(xs[0]) + be),
                               rtol=1e-5)
    assert np.abs(we).max() <= 1 / np.sqrt(6) and float(np.std(v)) < 0.03
    no_bias = ik.hyper.StnLinear(6, 4, 3, use_bias=False, key=jax.random.key(1))
    np.testing.assert_allclose(
        no_bias(xs[0], hs[0]), no_bias.weights(hs[0])[0] @ xs[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hparams must have shape"):
        layer(xs[0], hs[0, :2])
    with pytest.raises(ValueError, match="num_hparams"):
        ik.hyper.StnLinear(6, 4, 0, key=jax.random.key(0))


def test_stn_conv_is_the_convolution_with_the_effective_kernel():
    """`StnConv2d` equals one convolution with the kernel s K_e + (Vλ)⊙_out K_h and bias
    s b_e + (V'λ)⊙b_h (the convolution is linear in its kernel), per example."""
    layer = ik.hyper.StnConv2d(3, 5, 3, 2, padding=1, key=jax.random.key(2))
    layer = eqx.tree_at(lambda m: m.elem_scalar, layer, jnp.asarray(0.8))
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(4, 3, 6, 6)))
    hs = jnp.asarray(rng.normal(size=(4, 2)))
    ys = jax.vmap(layer)(xs, hs)
    for x, h, y in zip(xs, hs, ys):
        sc = layer.to_scalars @ h
        kernel = 0.8 * layer.elem.weight + sc[:5, None, None, None] * layer.hyper.weight
        bias = 0.8 * layer.elem_bias + sc[5:] * layer.hyper_bias
        ref = jax.lax.conv_general_dilated(x[None], kernel, (1, 1), [(1, 1), (1, 1)])[0]
        np.testing.assert_allclose(y, ref + bias[:, None, None], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        layer(xs[0], None),
        0.8 * (layer.elem(xs[0]) + layer.elem_bias[:, None, None]), rtol=1e-5)


def test_stn_alternating_step_matches_a_hand_computed_step():
    """One round of `ik.hyper.stn` (one SGD step on the weights along the training loss at
    the perturbed hyperparameters, then one on λ along the validation loss through the
    updated weights), with a negligible perturbation and full batches, equals the two
    steps computed by hand; the losses in `history` are the ones those steps saw."""
    rng = np.random.default_rng(4)
    x, y = jnp.asarray(rng.normal(size=(20, 3))), jnp.asarray(rng.normal(size=20))
    xv, yv = jnp.asarray(rng.normal(size=(15, 3))), jnp.asarray(rng.normal(size=15))
    w0, lam0 = jnp.asarray([0.3, -0.2, 0.5]), jnp.asarray([0.1, -1.0])

    def train_loss(w, h, x, y, key):  # weight decay exp(h0), a feature scale from h1
        return jnp.mean((x @ w * (1 + 0.1 * h[:, 1]) - y) ** 2) + \
            jnp.mean(jnp.exp(h[:, 0])) * jnp.sum(w ** 2)

    def val_loss(w, h, x, y):  # the best response's dependence on h, no regulariser
        return jnp.mean((x @ w * (1 + 0.1 * h[:, 1]) - y) ** 2)

    res = ik.hyper.stn(train_loss, val_loss, w0, lam0, key=jax.random.key(0),
                       train_data=(x, y), val_data=(xv, yv), optimizer=optax.sgd(0.1),
                       hparam_optimizer=optax.sgd(0.5), num_outer=1, train_steps=1,
                       val_steps=1, scale=1e-30, tune_scales=False)
    assert isinstance(res, ik.hyper.StnResult)
    h_tr, h_va = jnp.tile(lam0, (20, 1)), jnp.tile(lam0, (15, 1))
    w1 = w0 - 0.1 * jax.grad(train_loss)(w0, h_tr, x, y, None)
    lam1 = lam0 - 0.5 * jax.grad(lambda lam: val_loss(
        w1, jnp.tile(lam, (15, 1)), xv, yv))(lam0)
    np.testing.assert_allclose(res.params, w1, rtol=1e-12)
    np.testing.assert_allclose(res.hparams, lam1, rtol=1e-12)
    np.testing.assert_allclose(res.history["train_loss"][0],
                               train_loss(w0, h_tr, x, y, None), rtol=1e-12)
    np.testing.assert_allclose(res.history["val_loss"][0], val_loss(w1, h_va, xv, yv),
                               rtol=1e-12)
    np.testing.assert_allclose(jax.nn.softplus(res.scale_param), 1e-30, rtol=1e-6)
    # a warm-up round trains the weights alike and leaves λ where it was
    warm = ik.hyper.stn(train_loss, val_loss, w0, lam0, key=jax.random.key(0),
                        train_data=(x, y), val_data=(xv, yv), optimizer=optax.sgd(0.1),
                        hparam_optimizer=optax.sgd(0.5), num_outer=1, train_steps=1,
                        val_steps=1, scale=1e-30, tune_scales=False, warmup=1)
    np.testing.assert_allclose(warm.params, w1, rtol=1e-12)
    np.testing.assert_array_equal(warm.hparams, lam0)


def test_stn_perturbs_each_example_and_tunes_the_scale_by_the_entropy():
    """Each example's hyperparameters are λ + softplus(σ)·N(0, 1): one SGD step of rate 1 on
    weights whose gradients are the mean of h and of h² recovers λ and λ² + scale² (n =
    20,000 examples, 5 standard errors); with a validation loss that ignores h, σ moves
    by exactly the entropy bonus's gradient, τ·sigmoid(σ)/softplus(σ)."""
    n, lam, scale = 20000, jnp.asarray([0.7]), 0.3
    x, y = jnp.zeros((n, 1)), jnp.zeros(n)

    def train_loss(w, h, x, y, key):
        return w["a"] * jnp.mean(h[:, 0]) + w["b"] * jnp.mean(h[:, 0] ** 2)

    res = ik.hyper.stn(train_loss, lambda w, h, x, y: jnp.zeros(()),
                       {"a": jnp.zeros(()), "b": jnp.zeros(())}, lam, key=jax.random.key(3),
                       train_data=(x, y), val_data=(x[:4], y[:4]), optimizer=optax.sgd(1.0),
                       hparam_optimizer=optax.sgd(0.5), num_outer=1, train_steps=1,
                       val_steps=1, scale=scale, entropy_weight=0.01)
    se = scale / np.sqrt(n)
    assert abs(-float(res.params["a"]) - 0.7) < 5 * se
    assert abs(-float(res.params["b"]) - (0.49 + scale ** 2)) < 5 * 2 * 0.7 * se + 0.005
    s0 = np.log(np.expm1(scale))
    expected = s0 + 0.5 * 0.01 / (1 + np.exp(-s0)) / scale
    np.testing.assert_allclose(res.scale_param, [expected], rtol=1e-10)
    np.testing.assert_allclose(res.hparams, lam, rtol=1e-12)  # no gradient in λ
    with pytest.raises(ValueError, match="hparams must be a vector"):
        ik.hyper.stn(train_loss, None, {}, jnp.zeros((2, 2)), key=jax.random.key(0),
                     train_data=(x, y), val_data=(x, y), optimizer=optax.sgd(1.0),
                     hparam_optimizer=optax.sgd(1.0), num_outer=1)
