"""DEQ model: gradients under every adjoint, per-sample stats, learned and skip inits."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optax
import pytest

import implicit_kit as ik


TIGHT = ik.Picard(rtol=1e-13, atol=1e-14)


def _model(adjoint=None, solver=TIGHT, init="zeros", key=0, **kw):
    k1, k2 = jr.split(jr.key(key))
    cell = ik.nn.MLPCell(4, 3, key=k1)
    cell = eqx.tree_at(lambda c: c.w1.weight, cell, 0.6 * cell.w1.weight)
    return ik.models.DEQ(cell, (4,), solver, adjoint, init=init, max_steps=500,
                         throw=True, input_shape=(3,), key=k2, **kw)


X = jnp.array([0.3, -1.2, 0.8])
C = jnp.array([1.0, -2.0, 0.5, 0.7])


def _loss(model):
    return jnp.dot(C, model(X))


def _params(model):
    return eqx.filter(model, eqx.is_inexact_array)


def _grad(model):
    return jax.grad(lambda p: _loss(eqx.combine(p, _nonparams(model))))(_params(model))


def _nonparams(model):
    return eqx.filter(model, eqx.is_inexact_array, inverse=True)


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])


@functools.cache
def _fd(eps=1e-6):
    """Central differences of the loss in every parameter (the forward solve does not
    depend on the adjoint, so this is computed once; the loss is compiled once)."""
    model = _model(ik.UnrolledAdjoint())
    params, rest = _params(model), _nonparams(model)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    loss = jax.jit(lambda f: _loss(eqx.combine(unravel(f), rest)))
    out = []
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps)
        out.append((loss(flat + e) - loss(flat - e)) / (2 * eps))
    return jnp.stack(out)


EXACT = {
    "implicit_picard": ik.ImplicitAdjoint(ik.Picard(rtol=1e-13, atol=1e-14), max_steps=2000),
    "implicit_anderson": ik.ImplicitAdjoint(ik.Anderson(rtol=1e-13, atol=1e-14)),
    "implicit_gmres": ik.ImplicitAdjoint(lx.GMRES(rtol=1e-13, atol=1e-14, restart=20)),
    "implicit_jvp": ik.ImplicitJVPAdjoint(lx.GMRES(rtol=1e-13, atol=1e-14, restart=20)),
    "unrolled": ik.UnrolledAdjoint(),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_adjoints_match_finite_differences(name):
    model = _model(EXACT[name])
    g = _flat(_grad(model))
    fd = _fd()
    np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-9)


def _dense_pieces(model):
    """z*, J = df/dz at z*, and the parameter VJP of the cell at z*."""
    z = _model(EXACT["implicit_picard"])(X)  # same weights as `model` (same key)
    cell = model.cell
    jac = jax.jacobian(lambda zz: cell(zz, X))(z)

    def param_vjp(u):
        return _flat(jax.grad(lambda c: jnp.dot(u, c(z, X)))(cell))

    return z, jac, param_vjp


def _cell_grad(g_model):
    return _flat(g_model.cell)


@pytest.mark.parametrize("k", [0, 3, 10])
def test_neumann_and_jfb_match_their_series(k):
    adjoint = ik.JFBAdjoint() if k == 0 else ik.NeumannAdjoint(k)
    model = _model(adjoint)
    z, jac, param_vjp = _dense_pieces(model)
    u, term = C, C
    for _ in range(k):
        term = jac.T @ term
        u = u + term
    np.testing.assert_allclose(_cell_grad(_grad(model)), param_vjp(u), rtol=1e-10,
                               atol=1e-12)


def test_neumann_error_falls_with_k():
    exact = _cell_grad(_grad(_model(EXACT["implicit_gmres"])))
    errs = [float(jnp.linalg.norm(_cell_grad(_grad(_model(ik.NeumannAdjoint(k)))) - exact))
            for k in (1, 4, 16, 64)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-9 * float(jnp.linalg.norm(exact))


def test_phantom_matches_damped_unroll_from_the_solution():
    k, lam = 4, 0.6
    model = _model(ik.PhantomAdjoint(k, lam))
    z_star = _model(EXACT["implicit_picard"])(X)

    def unrolled(cell):
        h = z_star
        for _ in range(k):
            h = (1 - lam) * h + lam * cell(h, X)
        return jnp.dot(C, h)

    ref = _flat(jax.grad(unrolled)(model.cell))
    np.testing.assert_allclose(_cell_grad(_grad(model)), ref, rtol=1e-10, atol=1e-12)


def test_vmap_per_sample_stats_and_jit():
    model = _model(solver=ik.Picard(rtol=1e-8, atol=1e-10))
    xs = jnp.stack([X, 0.01 * X, 3 * X, jnp.zeros(3)])

    @eqx.filter_jit
    def batched(m, xs):
        return jax.vmap(lambda x: m(x, return_stats=True))(xs)

    zs, stats = batched(model, xs)
    for i, x in enumerate(xs):
        z_i, s_i = model(x, return_stats=True)
        np.testing.assert_allclose(zs[i], z_i, rtol=1e-12, atol=1e-14)
        assert int(stats.num_steps[i]) == int(s_i.num_steps)
    assert len(set(np.asarray(stats.num_steps).tolist())) > 1
    assert bool(jnp.all(stats.result == ik.RESULTS.successful))
    assert np.all(np.asarray(stats.residual) <= 1e-8 * 10)


@pytest.mark.slow
def test_learned_and_skip_inits_train_and_cut_forward_steps():
    """After training (task loss + init_loss), the learned start points need fewer
    Picard steps than starting from zeros with the same trained cell."""
    key = jr.key(3)
    kx, kw, kc, kh, ks = jr.split(key, 5)
    xs = jr.normal(kx, (64, 3))
    ys = jnp.sin(xs @ jr.normal(kw, (3,)))
    solver = ik.Picard(rtol=1e-6, atol=1e-8)
    cell = ik.nn.MLPCell(8, 3, key=kc)
    cell = eqx.tree_at(lambda c: c.w1.weight, cell, 0.8 * cell.w1.weight)
    cell = eqx.tree_at(lambda c: c.u.bias, cell, cell.u.bias + 1.0)  # equilibria off 0
    head = eqx.nn.Linear(8, 1, key=kh)

    def train(init):
        deq = ik.models.DEQ(cell, (8,), solver, init=init, max_steps=200,
                            input_shape=(3,), key=ks)
        model = (deq, head)
        opt = optax.adam(1e-2)
        state = opt.init(eqx.filter(model, eqx.is_inexact_array))

        def loss(model):
            deq, head = model
            z, st = jax.vmap(lambda x: deq(x, return_stats=True))(xs)
            pred = jax.vmap(head)(z)[:, 0]
            return jnp.mean((pred - ys) ** 2) + ik.models.init_loss(st.z0, z)

        @eqx.filter_jit
        def step(model, state):
            g = eqx.filter_grad(loss)(model)
            updates, state = opt.update(g, state)
            return eqx.apply_updates(model, updates), state, g

        g0 = None
        for i in range(150):
            model, state, g = step(model, state)
            g0 = g if i == 0 else g0
        return model[0], g0[0]

    def mean_steps(deq):
        _, st = jax.vmap(lambda x: deq(x, return_stats=True))(xs)
        return float(jnp.mean(st.num_steps))

    for init in ("learned", "skip"):
        deq, g0 = train(init)
        param = deq.z0 if init == "learned" else deq.skip.weight
        grad0 = g0.z0 if init == "learned" else g0.skip.weight
        assert float(jnp.linalg.norm(grad0)) > 0  # a trainable parameter
        zeros = ik.models.DEQ(deq.cell, (8,), solver, init="zeros", max_steps=200)
        # Linear convergence: steps fall with the log of the start's distance, so a
        # start point on the data's mean equilibrium saves a step or more per sample.
        assert mean_steps(deq) <= mean_steps(zeros) - 1.0, (init, mean_steps(deq),
                                                            mean_steps(zeros))
        assert float(jnp.linalg.norm(param)) > 0
        # Evaluated with other settings (another solver, tolerance and cap), the trained
        # start is kept bit for bit and used: it still saves steps over zeros there.
        settings = dict(solver=ik.Anderson(rtol=1e-10, atol=1e-10), max_steps=300)
        ev, ev_zeros = deq.with_solver(**settings), zeros.with_solver(**settings)
        kept = ev.z0 if init == "learned" else ev.skip.weight
        assert kept is param and np.array_equal(np.asarray(kept), np.asarray(param))
        _, st = jax.vmap(lambda x: ev(x, return_stats=True))(xs)
        assert bool(jnp.all(st.result == ik.RESULTS.successful))
        assert float(jnp.max(st.residual)) < 1e-8  # the new tolerance (trained at 1e-6)
        assert mean_steps(ev) < mean_steps(ev_zeros), (init, mean_steps(ev),
                                                       mean_steps(ev_zeros))


def test_bad_init_and_skip_arguments():
    cell = ik.nn.MLPCell(4, 3, key=jr.key(0))
    with pytest.raises(ValueError, match="`init` must be one of"):
        ik.models.DEQ(cell, (4,), init="random")
    with pytest.raises(ValueError, match="init='skip' needs `skip=`"):
        ik.models.DEQ(cell, (4,), init="skip")
    with pytest.raises(ValueError, match="`skip` is only used"):
        ik.models.DEQ(cell, (4,), init="zeros", skip=eqx.nn.Linear(3, 4, key=jr.key(0)))


def _tuple_cell(key=0):
    """A cell on a tuple state (z_a of 3, z_b of (2, 2)), the two parts coupled, a
    contraction (each weight scaled to norm 0.4)."""
    k = jr.split(jr.key(key), 4)
    a, b, c, d = (0.4 * w / jnp.linalg.norm(w, 2) for w in (
        jr.normal(k[0], (3, 3)), jr.normal(k[1], (3, 4)), jr.normal(k[2], (4, 3)),
        jr.normal(k[3], (4, 4))))

    def cell(z, x):
        za, zb = z
        return (jnp.tanh(a @ za + b @ zb.ravel() + x),
                jnp.tanh(c @ za + d @ zb.ravel()).reshape(2, 2))

    return cell


@pytest.mark.parametrize("adjoint", ["implicit", "unrolled", "phantom"])
def test_a_tuple_state_is_solved_whole_with_its_gradients(adjoint):
    """`DEQ` on a tuple state: the equilibrium of the flattened problem, learned starts of
    the tuple's shapes, the Jacobian regulariser over the whole tuple, and gradients
    against float64 finite differences (the phantom one against its damped unroll from
    the solution, on the flattened problem)."""
    cell = _tuple_cell()
    shape = ((3,), (2, 2))
    adj = {"implicit": ik.ImplicitAdjoint(ik.Picard(rtol=1e-13, atol=1e-14)),
           "unrolled": ik.UnrolledAdjoint(),
           "phantom": ik.PhantomAdjoint(k=3, damping=0.5)}[adjoint]
    deq = ik.models.DEQ(eqx.Partial(cell), shape, TIGHT, adj, init="learned",
                        max_steps=500, throw=True)
    assert jax.tree_util.tree_map(jnp.shape, deq.z0) == ((3,), (2, 2))
    # a trained start (nonzero, as after init_loss): used as it is, both parts
    deq = eqx.tree_at(lambda d: d.z0, deq, (jnp.array([0.2, -0.1, 0.4]),
                                            jnp.array([[0.3, 0.0], [-0.2, 0.1]])))
    x = jnp.array([0.3, -0.7, 0.5])
    z, st = deq(x, return_stats=True)
    assert isinstance(z, tuple) and isinstance(st.z0, tuple)
    for a, b in zip(st.z0, deq.z0):
        np.testing.assert_array_equal(a, b)
    flat0, unravel = jax.flatten_util.ravel_pytree(deq.z0)
    ref = ik.fixed_point(lambda v, x: jax.flatten_util.ravel_pytree(cell(unravel(v), x))[0],
                         flat0, x, ik.Picard(rtol=1e-13, atol=1e-14), max_steps=500)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(z)[0], ref.value, atol=1e-12)
    np.testing.assert_allclose(float(ik.models.init_loss(st.z0, z)), float(
        ik.models.init_loss(flat0, ref.value)), rtol=1e-12)
    c = jnp.linspace(-1.0, 1.0, 7)

    def loss(x):
        return jnp.dot(c, jax.flatten_util.ravel_pytree(deq(x))[0])

    g = jax.grad(loss)(x)
    if adjoint == "phantom":
        flat_cell = lambda v, x: jax.flatten_util.ravel_pytree(cell(unravel(v), x))[0]

        def unroll(x):
            v = ref.value
            for _ in range(3):
                v = 0.5 * v + 0.5 * flat_cell(v, x)
            return jnp.dot(c, v)

        np.testing.assert_allclose(g, jax.grad(unroll)(x), rtol=1e-9, atol=1e-12)
    else:
        eps = 1e-6
        fd = np.array([(loss(x.at[i].add(eps)) - loss(x.at[i].add(-eps))) / (2 * eps)
                       for i in range(3)])
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    # the Hutchinson estimate over the whole tuple, against the dense Jacobian
    jac = jax.jacfwd(lambda v: jax.flatten_util.ravel_pytree(cell(unravel(v), x))[0])(
        ref.value)
    est = jax.vmap(lambda k: ik.regularizers.jacobian_frobenius(cell, z, x, key=k))(
        jr.split(jr.key(0), 4000))
    np.testing.assert_allclose(float(jnp.mean(est)), float(jnp.sum(jac**2)) / 7, rtol=0.05)
    with pytest.raises(ValueError, match=r"cell returned shape \('\(3,\)', '\(2, 2\)'\)"):
        ik.models.DEQ(cell, ((3,), (4,)), init="zeros", throw=True)(x)
