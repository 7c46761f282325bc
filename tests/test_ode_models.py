"""Neural ODE, ANODE and HomoODE: adjoints, NFE, training on digits, exact field."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import implicit_kit as ik

from .helpers import tiered


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])


def _vector_models(ode):
    k1, k2 = jr.split(jr.key(0))
    node = ik.models.NeuralODE(ik.nn.MLPField(4, 8, key=k1), ode)
    field = ik.nn.MLPField(4, 8, input_size=3, key=k2)
    homo = ik.models.HomoODE(field, (4,), ode=ode)
    return {"node": (node, jnp.array([0.5, -0.3, 0.8, 0.1])),
            "homoode": (homo, jnp.array([0.2, -1.0, 0.4]))}


TIGHT = dict(rtol=1e-10, atol=1e-10, max_steps=10_000)
ADJOINTS = {"backsolve": dfx.BacksolveAdjoint(
                stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10)),
            "direct": dfx.DirectAdjoint()}


def _grad(model, x):
    c = jnp.cos(jnp.arange(4.0))
    return _flat(eqx.filter_grad(lambda m: jnp.dot(c, m(x)))(model))


@pytest.mark.parametrize("adjoint, name", tiered(
    [(a, n) for a in ADJOINTS for n in ("node", "homoode")], ("backsolve-node", "direct-homoode")))
def test_every_adjoint_matches_direct_backprop(adjoint, name):
    ref_model, x = _vector_models(ik.models.ODESolve(**TIGHT))[name]
    model, _ = _vector_models(ik.models.ODESolve(adjoint=ADJOINTS[adjoint], **TIGHT))[name]
    ref = _grad(ref_model, x)
    np.testing.assert_allclose(_grad(model, x), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", tiered(["node", "homoode"], ("node",)))
def test_direct_backprop_matches_finite_differences_fixed_step(name):
    ode = ik.models.ODESolve(solver=dfx.Tsit5(), stepsize_controller=dfx.ConstantStepSize(),
                             dt0=0.05)
    model, x = _vector_models(ode)[name]
    params, rest = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    c = jnp.cos(jnp.arange(4.0))

    def loss(p):
        return jnp.dot(c, eqx.combine(unravel(p), rest)(x))

    g = jax.grad(loss)(flat)
    d = jr.normal(jr.key(1), flat.shape)
    eps = 1e-6
    fd = (loss(flat + eps * d) - loss(flat - eps * d)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-8)


def test_reported_nfe_is_the_number_of_field_calls():
    calls = []

    class Counting(eqx.Module):
        inner: eqx.Module

        def __call__(self, z, x=None):
            jax.debug.callback(lambda: calls.append(1))
            return self.inner(z, x)

    node, z0 = _vector_models(ik.models.ODESolve())["node"]
    homo, x = _vector_models(ik.models.ODESolve())["homoode"]
    for model, inp in ((node, z0), (homo, x)):
        for scale in (1.0, 6.0):  # a stiffer field takes more steps
            where = ((lambda mm: mm.field) if isinstance(model, ik.models.NeuralODE)
                     else (lambda mm: mm.module))
            m = eqx.tree_at(where, model,
                            replace_fn=lambda f: Counting(jax.tree_util.tree_map(
                                lambda a: scale * a if eqx.is_array(a) else a, f)))
            calls.clear()
            _, st = m(inp, return_stats=True)
            jax.block_until_ready(st.nfe)
            assert len(calls) == int(st.nfe) > 0


def _digits(n_train=1024):
    x, y = ik.data.load_digits("train")
    xt, yt = ik.data.load_digits("test")
    return jnp.asarray(x[:n_train]), jnp.asarray(y[:n_train]), jnp.asarray(xt), jnp.asarray(yt)


def _float32(model):
    # Training tests run in float32 (as users do; float64 convolutions are slow on CPU).
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model)


def _block(kind, c, key):
    ode = ik.models.ODESolve()
    if kind == "node":
        return ik.models.NeuralODE(ik.nn.ConvCell(c, groups=2, residual=False, inject=False,
                                                  key=key), ode), c
    if kind == "anode":
        return ik.models.AugmentedNeuralODE(
            ik.nn.ConvCell(c + 2, groups=2, residual=False, inject=False, key=key), 2, ode), c + 2
    field = ik.nn.ConvCell(c, groups=2, residual=False, dropout=0.1, key=key)
    return ik.models.HomoODE(field, (c, 4, 4), init="learned", ode=ode), c


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["node", "anode", "homoode"])
def test_models_train_on_digits(kind):
    x, y, xt, yt = _digits()
    k1, k2 = jr.split(jr.key(0))
    c = 8
    block, out = _block(kind, c, k1)
    model = ik.models.ImageClassifier.build(block, in_channels=1, classes=10, hidden=c,
                                            final=16, block_channels=out, groups=2, key=k2)
    model = _float32(model)
    opt = optax.adam(1e-2)
    params_filter = eqx.is_inexact_array
    state = opt.init(eqx.filter(model, params_filter))

    def loss_fn(model, xb, yb, key):
        keys = jr.split(key, xb.shape[0])
        logits, st = jax.vmap(lambda a, k: model(a, key=k, return_stats=True))(xb, keys)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, st

    @eqx.filter_jit
    def step(model, state, xb, yb, key):
        (loss, st), g = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, xb, yb, key)
        updates, state = opt.update(g, state, eqx.filter(model, params_filter))
        return eqx.apply_updates(model, updates), state, loss, st

    @eqx.filter_jit
    def accuracy(model, xs, ys):
        logits, st = jax.vmap(lambda a: model(a, inference=True, return_stats=True))(xs)
        return jnp.mean(jnp.argmax(logits, -1) == ys), st

    acc0, _ = accuracy(model, xt, yt)
    key = jr.key(1)
    losses = []
    for _epoch in range(6):
        for i in range(0, x.shape[0], 64):
            key, sub = jr.split(key)
            model, state, loss, st = step(model, state, x[i:i + 64], y[i:i + 64], sub)
            losses.append(float(loss))
    acc, st = accuracy(model, xt, yt)
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
    assert float(acc) > 0.4 > float(acc0)  # 4x chance after 6 short epochs
    assert bool(jnp.all(st.result == ik.RESULTS.successful))
    assert 0 < float(jnp.mean(st.nfe)) < 200


@pytest.mark.slow
def test_learned_start_gets_gradient_only_from_its_objective():
    field = ik.nn.ConvCell(4, groups=2, residual=False, key=jr.key(0))
    model = ik.models.HomoODE(field, (4, 3, 3), init="learned")
    x = jr.normal(jr.key(1), (4, 3, 3))
    g_task = eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))(model)
    assert float(jnp.max(jnp.abs(g_task.z0))) == 0.0  # detached in the solve
    z0 = model.initial_point()
    assert np.allclose(z0, z0[:, :1, :1])  # one value per channel, constant over space

    def objective(m):
        z_end, st = m(x, return_stats=True)
        return ik.models.init_loss(st.z0, z_end)

    g_init = eqx.filter_grad(objective)(model)
    assert float(jnp.max(jnp.abs(g_init.z0))) > 0
    spec = ik.models.HomoODE.init_params(model)
    assert [bool(s) for s in jax.tree_util.tree_leaves(spec)].count(True) == 1


@pytest.mark.slow
def test_conditioned_start_is_its_networks_output_and_trained_only_by_its_objective():
    """`init="conditioned"`: the ODE starts at init_net(x) (the solve from that point by
    hand gives the same end point); the task loss gives init_net no gradient and the
    condition x none through it; `init_loss` trains init_net alone; the spec selects
    init_net; a wrong `init_net` shape or a missing one is an error."""
    field = ik.nn.ConvCell(4, groups=2, residual=False, key=jr.key(0))
    net = eqx.nn.Conv2d(4, 4, 1, key=jr.key(2))
    model = ik.models.HomoODE(field, (4, 3, 3), init="conditioned", init_net=net)
    x = jr.normal(jr.key(1), (4, 3, 3))
    z0 = model.initial_point(x=x)
    np.testing.assert_allclose(z0, net(x), rtol=1e-6)
    by_hand, _ = model.ode(field, net(x), x, 1.0, None)
    np.testing.assert_allclose(model(x), by_hand, rtol=1e-6, atol=1e-7)
    g_task = eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))(model)
    assert float(jnp.max(jnp.abs(g_task.init_net.weight))) == 0.0

    def objective(m, x):
        z_end, st = m(x, return_stats=True)
        return ik.models.init_loss(st.z0, z_end)

    g_init, g_x = eqx.filter_grad(objective)(model, x), jax.grad(
        lambda x: objective(model, x))(x)
    assert float(jnp.max(jnp.abs(g_init.init_net.weight))) > 0
    assert float(jnp.max(jnp.abs(_flat(g_init.module)))) == 0.0
    assert float(jnp.max(jnp.abs(g_x))) == 0.0  # the init loss never reaches the stem
    spec = ik.models.HomoODE.init_params(model)
    picked = eqx.filter(model, spec)
    assert [a.shape for a in jax.tree_util.tree_leaves(picked)] == [(4, 4, 1, 1), (4, 1, 1)]
    with pytest.raises(ValueError, match="init_net"):
        ik.models.HomoODE(field, (4, 3, 3), init="conditioned")
    bad = ik.models.HomoODE(field, (4, 3, 3), init="conditioned",
                            init_net=eqx.nn.Conv2d(4, 2, 1, key=jr.key(3)))
    with pytest.raises(ValueError, match="state shape"):
        bad(x)


@pytest.mark.slow
def test_undetached_start_is_trained_by_the_task_loss_with_exact_gradients():
    """`detach_start=False`: the task loss reaches init_net and, through it, the
    condition x; both gradients match central finite differences (float64, fixed-step
    Tsit5 so the solve is smooth in its inputs). Refused without a trained start."""
    field = ik.nn.ConvCell(4, groups=2, residual=False, key=jr.key(0))
    net = eqx.nn.Conv2d(4, 4, 1, key=jr.key(2))
    ode = ik.models.ODESolve(solver=dfx.Tsit5(), stepsize_controller=dfx.ConstantStepSize(),
                             dt0=0.1)
    model = ik.models.HomoODE(field, (4, 3, 3), init="conditioned", init_net=net, ode=ode,
                              detach_start=False)
    x = jr.normal(jr.key(1), (4, 3, 3))
    c = jnp.cos(jnp.arange(36.0)).reshape(4, 3, 3)

    def loss(m, x):
        return jnp.sum(c * m(x))

    g_model, g_x = eqx.filter_grad(loss)(model, x), jax.grad(lambda x: loss(model, x))(x)
    assert float(jnp.max(jnp.abs(g_model.init_net.weight))) > 0
    d = jr.normal(jr.key(3), net.weight.shape)
    eps = 1e-6
    with_w = lambda w: eqx.tree_at(lambda m: m.init_net.weight, model, w)  # noqa: E731
    fd = (loss(with_w(net.weight + eps * d), x) - loss(with_w(net.weight - eps * d), x))
    np.testing.assert_allclose(jnp.vdot(g_model.init_net.weight, d), fd / (2 * eps),
                               rtol=1e-7)
    dx = jr.normal(jr.key(4), x.shape)
    fd_x = (loss(model, x + eps * dx) - loss(model, x - eps * dx)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g_x, dx), fd_x, rtol=1e-7)
    # The detached model's x-gradient misses the path through init_net.
    detached = ik.models.HomoODE(field, (4, 3, 3), init="conditioned", init_net=net,
                                 ode=ode)
    g_x_detached = jax.grad(lambda x: loss(detached, x))(x)
    assert not np.allclose(g_x_detached, g_x, rtol=1e-3)
    with pytest.raises(ValueError, match="detach_start"):
        ik.models.HomoODE(field, (4, 3, 3), init="alternating", detach_start=False)


@pytest.mark.slow
def test_exact_homoode_field_ends_at_the_deq_equilibrium():
    cell = ik.nn.MLPCell(5, 3, key=jr.key(0))
    cell = eqx.tree_at(lambda c: c.w1.weight, cell, 0.7 * cell.w1.weight)
    ode = ik.models.ODESolve(rtol=1e-10, atol=1e-10)
    homo = ik.models.HomoODE(cell, (5,), field="exact", ode=ode)
    deq = ik.models.DEQ(cell, (5,), ik.Picard(rtol=1e-13, atol=1e-14), max_steps=1000)
    x = jnp.array([0.4, -0.7, 1.1])
    np.testing.assert_allclose(homo(x), deq(x), atol=1e-8)
    c = jnp.arange(1.0, 6.0)
    g_homo = _flat(eqx.filter_grad(lambda m: jnp.dot(c, m(x)))(homo).module)
    g_deq = _flat(eqx.filter_grad(lambda m: jnp.dot(c, m(x)))(deq).cell)
    np.testing.assert_allclose(g_homo, g_deq, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_error_penalties_gradients_match_finite_differences():
    """With a fixed step (so that FD does not see step-size changes, which diffrax does
    not differentiate) both penalties are smooth and their gradients match FD."""
    # A large fixed step on a stiff-ish field: local errors well above round-off, so
    # finite differences of the penalties are accurate.
    field = jax.tree_util.tree_map(lambda a: 3 * a if eqx.is_array(a) else a,
                                   ik.nn.MLPField(3, 8, key=jr.key(0)))
    z0 = jnp.array([0.5, -0.2, 0.9])
    for kw, name in ((dict(error_penalty=True), "error_penalty"),
                     (dict(local_penalty=True), "local_error_penalty")):
        ode = ik.models.ODESolve(solver=dfx.Tsit5(), stepsize_controller=dfx.ConstantStepSize(),
                                 dt0=0.5, rtol=1e-6, atol=1e-6, **kw)
        model = ik.models.NeuralODE(field, ode)
        params, rest = eqx.partition(model, eqx.is_inexact_array)
        flat, unravel = jax.flatten_util.ravel_pytree(params)

        def pen(p):
            model = eqx.combine(unravel(p), rest)
            return getattr(model(z0, key=jr.key(3), return_stats=True)[1], name)

        g = jax.grad(pen)(flat)
        assert float(jnp.linalg.norm(g)) > 0
        d = jr.normal(jr.key(2), flat.shape)
        eps = 1e-5
        fd = (pen(flat + eps * d) - pen(flat - eps * d)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-6)
    with pytest.raises(ValueError, match="needs a discrete adjoint"):
        ik.models.ODESolve(error_penalty=True, adjoint=dfx.BacksolveAdjoint())


@pytest.mark.slow
def test_error_penalty_gradient_is_finite_when_an_error_estimate_is_zero():
    """A sample whose field is zero has local error estimates of exactly 0 (the same
    happens to the zero-size steps of samples that finish early under vmap). Its
    penalty is 0 whatever the weights, so the batch's gradient must equal the other
    sample's alone — not NaN, which the square root's infinite slope at 0 gave."""

    class Field(eqx.Module):
        w: jax.Array

        def __call__(self, z, c):
            return c * jnp.tanh(self.w @ z)

    ode = ik.models.ODESolve(error_penalty=True)

    def loss(f, cs):
        pen = jax.vmap(lambda c: ode(f, jnp.ones(3), c, 1.0, None)[1].error_penalty)(cs)
        return jnp.sum(pen)

    f = Field(jr.normal(jr.key(0), (3, 3)))
    both = jax.grad(loss)(f, jnp.array([0.0, 2.0])).w
    alone = jax.grad(loss)(f, jnp.array([2.0])).w
    assert float(jnp.linalg.norm(alone)) > 0
    np.testing.assert_allclose(both, alone, rtol=1e-10)


def test_kinetic_and_jacobian_channels():
    a = jr.normal(jr.key(0), (3, 3)) / 2
    eps = jr.normal(jr.key(1), (3,))
    field = ik.regularizers.kinetic_jacobian_field(lambda t, y, args: a @ y, eps)
    y0 = jnp.array([1.0, -0.5, 0.2])
    zero = jnp.zeros(())
    sol = dfx.diffeqsolve(dfx.ODETerm(field), dfx.Tsit5(), 0.0, 1.0, None, (y0, zero, zero),
                          stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10))
    y1, kinetic, jac = (s[-1] for s in sol.ys)
    np.testing.assert_allclose(y1, jax.scipy.linalg.expm(a) @ y0, rtol=1e-8)
    np.testing.assert_allclose(jac, jnp.mean((a.T @ eps) ** 2), rtol=1e-8)
    ts = jnp.linspace(0.0, 1.0, 20001)
    ys = jax.vmap(lambda t: jax.scipy.linalg.expm(a * t) @ y0)(ts)
    integrand = jnp.mean((ys @ a.T) ** 2, axis=1)
    np.testing.assert_allclose(kinetic, jnp.trapezoid(integrand, ts), rtol=1e-6)


class _PytreeField(eqx.Module):
    """A field on a tuple state of differently shaped arrays (`(3,)` and `(2, 2)`), as a
    CNF's `(y, log p)` or a multi-part physical state."""

    w: jax.Array
    v: jax.Array

    def __call__(self, z, x=None):
        y, m = z
        return (jnp.tanh(self.w @ y) - 0.3 * y, self.v @ m + jnp.sum(y) * jnp.eye(2))


@pytest.mark.parametrize("adjoint", [dfx.RecursiveCheckpointAdjoint(),
                                     dfx.BacksolveAdjoint(), dfx.DirectAdjoint()],
                         ids=["checkpoint", "backsolve", "direct"])
def test_a_pytree_state_is_returned_whole_with_exact_gradients(adjoint):
    """`sol.ys[-1]` returned the last leaf of a pytree state (its whole time axis), not
    the state at t1: the state's structure comes back, equal to a direct diffrax solve,
    and its gradients match float64 central differences."""
    k1, k2 = jr.split(jr.key(3))
    field = _PytreeField(0.5 * jr.normal(k1, (3, 3)), 0.4 * jr.normal(k2, (2, 2)))
    z0 = (jnp.array([0.3, -0.5, 0.8]), jnp.array([[0.1, 0.2], [-0.3, 0.4]]))
    ode = ik.models.ODESolve(dfx.Tsit5(), rtol=1e-10, atol=1e-10, adjoint=adjoint,
                             max_steps=10_000)
    model = ik.models.NeuralODE(field, ode, t1=0.7)
    out = model(z0)
    direct = dfx.diffeqsolve(dfx.ODETerm(lambda t, z, a: field(z)), dfx.Tsit5(), 0.0, 0.7,
                             None, z0, stepsize_controller=dfx.PIDController(
                                 rtol=1e-10, atol=1e-10), max_steps=10_000).ys
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(z0)
    for a, b in zip(out, direct):
        assert a.shape == b.shape[1:]
        np.testing.assert_allclose(a, b[-1], rtol=1e-8, atol=1e-10)

    @jax.jit
    def loss(w):
        y, m = eqx.tree_at(lambda mo: mo.field.w, model, w)(z0)
        return jnp.sum(y ** 2) + jnp.sum(jnp.sin(m))

    g = jax.grad(loss)(field.w)
    eps = 1e-6
    for d in jr.normal(jr.key(4), (2, 3, 3)):  # two directional derivatives
        fd = (loss(field.w + eps * d) - loss(field.w - eps * d)) / (2 * eps)
        np.testing.assert_allclose(jnp.sum(g * d), fd, rtol=1e-6)


class _TimeField(eqx.Module):
    """A time-dependent field in diffrax's convention, `f(t, y, args)`."""

    w: jax.Array

    def __call__(self, t, y, args):
        return jnp.tanh(self.w @ y) * jnp.cos(2.0 * t) + args * y


@pytest.mark.parametrize("adjoint", [dfx.RecursiveCheckpointAdjoint(),
                                     dfx.BacksolveAdjoint()],
                         ids=["checkpoint", "backsolve"])
def test_a_trajectory_of_a_time_dependent_field_matches_diffrax(adjoint):
    """`ts`, a `t0` that is not 0, per-call `args` and a `(t, y, args)` field: the saved
    states equal diffrax's `SaveAt(ts=ts)`, each trajectory reports its own step count
    under vmap, and the gradient matches float64 central differences."""
    w = 0.8 * jr.normal(jr.key(0), (3, 3))
    ts = jnp.linspace(0.5, 3.0, 9)
    ode = ik.models.ODESolve(dfx.Tsit5(), rtol=1e-10, atol=1e-10, adjoint=adjoint,
                             max_steps=10_000)
    model = ik.models.NeuralODE(dfx.ODETerm(_TimeField(w)), ode)
    y0s = jnp.array([[0.3, -0.2, 0.5], [2.0, 1.0, -1.5]])
    ys, stats = jax.vmap(lambda y: model(y, ts, args=-0.1, return_stats=True))(y0s)

    def direct(y0):
        return dfx.diffeqsolve(dfx.ODETerm(_TimeField(w)), dfx.Tsit5(), ts[0], ts[-1], None,
                               y0, -0.1, saveat=dfx.SaveAt(ts=ts), max_steps=10_000,
                               stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10))

    sols = jax.vmap(direct)(y0s)
    assert ys.shape == (2, 9, 3)
    np.testing.assert_allclose(ys, sols.ys, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(stats.num_steps, sols.stats["num_steps"])
    assert stats.num_steps[0] != stats.num_steps[1]  # one count per trajectory

    @jax.jit
    def loss(w, a):
        m = eqx.tree_at(lambda mo: mo.field.vector_field.w, model, w)
        return jnp.sum(jnp.sin(m(y0s[0], ts, args=a)))

    gw, ga = jax.grad(loss, argnums=(0, 1))(w, -0.1)
    eps = 1e-6
    for d in jr.normal(jr.key(1), (2, 3, 3)):
        fd = (loss(w + eps * d, -0.1) - loss(w - eps * d, -0.1)) / (2 * eps)
        np.testing.assert_allclose(jnp.sum(gw * d), fd, rtol=1e-6)
    fd = (loss(w, -0.1 + eps) - loss(w, -0.1 - eps)) / (2 * eps)
    np.testing.assert_allclose(ga, fd, rtol=1e-6)


def test_the_interval_is_the_call_s_else_the_saved_times_else_the_model_s():
    """One rule for `t0`/`t1`: given in the call, else the span of `ts`, else the
    model's. On `dz/dt = -z` every end state is a closed form."""

    class Decay(eqx.Module):
        def __call__(self, z, args):
            return -z

    ode = ik.models.ODESolve(dfx.Tsit5(), rtol=1e-10, atol=1e-10)
    model = ik.models.NeuralODE(Decay(), ode, t1=2.0, t0=0.5)
    z0 = jnp.array([1.0, -2.0])
    np.testing.assert_allclose(model(z0), z0 * jnp.exp(-1.5), rtol=1e-8)
    np.testing.assert_allclose(model(z0, t0=1.0, t1=1.25), z0 * jnp.exp(-0.25), rtol=1e-8)
    ts = jnp.array([1.0, 1.5, 3.0])
    np.testing.assert_allclose(model(z0, ts), z0 * jnp.exp(-(ts - 1.0))[:, None], rtol=1e-8)
    np.testing.assert_allclose(model(z0, ts, t0=0.0),
                               z0 * jnp.exp(-ts)[:, None], rtol=1e-8)
    with pytest.raises(ValueError, match="`ts` must be a non-empty 1-D"):
        model(z0, jnp.ones((2, 2)))


@pytest.mark.parametrize("adjoint", [dfx.RecursiveCheckpointAdjoint(),
                                     dfx.BacksolveAdjoint(), dfx.DirectAdjoint()],
                         ids=["checkpoint", "backsolve", "direct"])
def test_an_augmented_ode_keeps_a_pytree_state_whole(adjoint):
    """ANODE appends its zeros to every leaf of a pytree input and returns the input's
    structure, equal to a direct diffrax solve of the augmented state."""
    k1, k2 = jr.split(jr.key(5))

    class Field(eqx.Module):
        w: jax.Array
        v: jax.Array

        def __call__(self, z, args=None):
            y, m = z
            return jnp.tanh(self.w @ y) - 0.3 * y, self.v @ m + jnp.sum(y)

    field = Field(0.5 * jr.normal(k1, (4, 4)), 0.4 * jr.normal(k2, (4, 4)))
    x = (jnp.array([0.3, -0.5]), jnp.array([[0.1, 0.2], [-0.3, 0.4]]))
    ode = ik.models.ODESolve(dfx.Tsit5(), rtol=1e-10, atol=1e-10, adjoint=adjoint)
    anode = ik.models.AugmentedNeuralODE(field, 2, ode, t1=0.6)
    out = anode(x)
    z0 = (jnp.array([0.3, -0.5, 0.0, 0.0]),
          jnp.array([[0.1, 0.2], [-0.3, 0.4], [0.0, 0.0], [0.0, 0.0]]))
    direct = dfx.diffeqsolve(dfx.ODETerm(lambda t, z, a: field(z)), dfx.Tsit5(), 0.0, 0.6,
                             None, z0, stepsize_controller=dfx.PIDController(
                                 rtol=1e-10, atol=1e-10)).ys
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(x)
    for a, b in zip(out, direct):
        np.testing.assert_allclose(a, b[-1], rtol=1e-8, atol=1e-10)

    def loss(w):
        y, m = eqx.tree_at(lambda a: a.field.w, anode, w)(x)
        return jnp.sum(jnp.sin(y)) + jnp.sum(m ** 2)

    g = jax.jit(jax.grad(loss))(field.w)
    eps = 1e-6
    d = jr.normal(jr.key(6), (4, 4))
    fd = (loss(field.w + eps * d) - loss(field.w - eps * d)) / (2 * eps)
    np.testing.assert_allclose(jnp.sum(g * d), fd, rtol=1e-6)


class _PairCell(eqx.Module):
    """A field / DEQ cell on a tuple state `((3,), (2,))` with the condition `x` (3,)."""

    w: jax.Array
    v: jax.Array

    def __call__(self, z, x):
        y, m = z
        return (0.5 * jnp.tanh(self.w @ y + x) + 0.1 * jnp.sum(m),
                0.4 * jnp.tanh(self.v @ m) + 0.2 * jnp.mean(y))


@pytest.mark.parametrize("adjoint", [dfx.RecursiveCheckpointAdjoint(),
                                     dfx.BacksolveAdjoint(), dfx.DirectAdjoint()],
                         ids=["checkpoint", "backsolve", "direct"])
@pytest.mark.parametrize("init", ["alternating", "learned"])
def test_homoode_keeps_a_tuple_state_whole_with_exact_gradients(adjoint, init):
    """HomoODE with `state_shape=((3,), (2,))`: the learned field's end point equals a
    direct diffrax solve from the same start, with the tuple structure, and its gradient
    matches float64 central differences, for each adjoint and start."""
    k1, k2 = jr.split(jr.key(8))
    cell = _PairCell(jr.normal(k1, (3, 3)), jr.normal(k2, (2, 2)))
    ode = ik.models.ODESolve(dfx.Tsit5(), rtol=1e-10, atol=1e-10, adjoint=adjoint,
                             max_steps=10_000)
    model = ik.models.HomoODE(cell, ((3,), (2,)), init=init, ode=ode)
    x = jnp.array([0.2, -0.4, 0.6])
    out = model(x)
    z0 = model.initial_point(x.dtype, x)
    assert [a.shape for a in z0] == [(3,), (2,)]
    direct = dfx.diffeqsolve(dfx.ODETerm(lambda t, z, a: cell(z, a)), dfx.Tsit5(), 0.0, 1.0,
                             None, z0, x, stepsize_controller=dfx.PIDController(
                                 rtol=1e-10, atol=1e-10), max_steps=10_000).ys
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, direct):
        np.testing.assert_allclose(a, b[-1], rtol=1e-8, atol=1e-10)

    def loss(w):
        y, m = eqx.tree_at(lambda mo: mo.module.w, model, w)(x)
        return jnp.sum(jnp.sin(y)) + jnp.sum(m ** 2)

    g = jax.jit(jax.grad(loss))(cell.w)
    eps = 1e-6
    d = jr.normal(jr.key(9), (3, 3))
    fd = (loss(cell.w + eps * d) - loss(cell.w - eps * d)) / (2 * eps)
    np.testing.assert_allclose(jnp.sum(g * d), fd, rtol=1e-6)


def test_exact_homoode_on_a_tuple_state_ends_at_the_deq_fixed_point():
    """`field="exact"` on a tuple state ends at the DEQ cell's fixed point (checked by
    the residual of both leaves), with the tuple structure."""
    k1, k2 = jr.split(jr.key(10))
    cell = _PairCell(0.5 * jr.normal(k1, (3, 3)), 0.5 * jr.normal(k2, (2, 2)))
    ode = ik.models.ODESolve(dfx.Tsit5(), rtol=1e-8, atol=1e-8)
    model = ik.models.HomoODE(cell, ((3,), (2,)), field="exact", init="zeros", ode=ode)
    x = jnp.array([0.2, -0.4, 0.6])
    y, m = model(x)
    fy, fm = cell((y, m), x)
    np.testing.assert_allclose(fy, y, atol=1e-6)
    np.testing.assert_allclose(fm, m, atol=1e-6)
    with pytest.raises(ValueError, match="`state_shape` must be a tuple of ints"):
        ik.models.HomoODE(cell, ((3,), "2"))
