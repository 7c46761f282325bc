"""Reversible DEQs: `ik.solvers.Reversible` and `ik.ReversibleAdjoint` give the exact
gradient of the computed iterations (against differentiating the same loop, and finite
differences), at any number of steps (drift control), under vmap and jit."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import implicit_kit as ik
from implicit_kit._adjoint import auto_anchor_every

from .helpers import tiered


def _problem(dtype, key=0):
    """A non-symmetric contraction on a pytree state `(a: (3,), b: (2, 2))`."""
    k = jax.random.split(jax.random.key(key), 5)

    def unit(key, shape, norm):
        w = jax.random.normal(key, shape)
        return (norm * w / jnp.linalg.norm(w, 2)).astype(dtype)

    params = {"W": unit(k[0], (3, 3), 0.6), "U": unit(k[1], (3, 4), 0.3),
              "V": unit(k[2], (4, 4), 0.5), "x": jax.random.normal(k[3], (3,)).astype(dtype)}
    y0 = (0.3 * jax.random.normal(k[4], (3,)).astype(dtype), jnp.full((2, 2), 0.1, dtype))

    def fn(state, p):
        a, b = state
        bb = b.reshape(-1)
        new_a = jnp.tanh(p["W"] @ a + p["U"] @ bb + p["x"])
        new_b = jnp.sin(p["V"] @ bb + 0.5 * jnp.sum(a)).reshape(2, 2)
        return new_a, new_b

    return fn, y0, params


def _loss(fn, adjoint, steps, tol=0.0, beta=0.8):
    solver = ik.Reversible(beta=beta, rtol=tol, atol=tol)

    def loss(params, y0):
        sol = ik.fixed_point(fn, y0, params, solver, adjoint=adjoint, max_steps=steps,
                             throw=False)
        a, b = sol.value
        return jnp.sum(a * jnp.arange(1.0, 4.0, dtype=a.dtype)) + jnp.sum(jnp.cos(b))

    return loss


def _rel(a, b):
    fa, fb = (jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(t)]) for t in (a, b))
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


@pytest.mark.parametrize("dtype,steps,tol", [
    (jnp.float64, 10, 1e-8), (jnp.float64, 200, 1e-8),
    (jnp.float32, 10, 1e-4), (jnp.float32, 200, 1e-4),
])
def test_reversible_gradient_is_the_gradient_of_the_computed_iterations(dtype, steps, tol):
    fn, y0, params = _problem(dtype)
    grad = jax.jit(jax.grad(_loss(fn, ik.ReversibleAdjoint(), steps), argnums=(0, 1)))
    unrolled = jax.jit(jax.grad(_loss(fn, ik.UnrolledAdjoint(), steps), argnums=(0, 1)))
    g, ref = grad(params, y0), unrolled(params, y0)
    assert _rel(g, ref) <= tol
    if steps == 10:  # the initial guess's gradient too (the authors' code drops it;
        # after 200 contracting steps it underflows to 0 in both)
        assert _rel(g[1], ref[1]) <= tol


def test_reversible_gradient_matches_finite_differences():
    fn, y0, params = _problem(jnp.float64)
    loss = _loss(fn, ik.ReversibleAdjoint(), 30)
    g = jax.grad(loss)(params, y0)
    direction = jtu.tree_map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape) + 1.0),
                             params)
    eps = 1e-6
    plus = jtu.tree_map(lambda p, d: p + eps * d, params, direction)
    minus = jtu.tree_map(lambda p, d: p - eps * d, params, direction)
    fd = (loss(plus, y0) - loss(minus, y0)) / (2 * eps)
    ad = sum(jnp.vdot(a, b) for a, b in zip(jtu.tree_leaves(g), jtu.tree_leaves(direction)))
    assert abs(float(ad - fd)) <= 1e-7 * abs(float(fd))


def test_reversible_under_vmap_with_per_sample_steps():
    fn, y0, params = _problem(jnp.float64)
    xs = params["x"][None] * jnp.array([0.1, 1.0, 3.0])[:, None]

    def batched(adjoint):
        loss = _loss(fn, adjoint, 200, tol=1e-9)

        def total(params, xs):
            per = jax.vmap(lambda x: loss({**params, "x": x}, y0))(xs)
            return jnp.sum(per * jnp.array([1.0, -2.0, 0.5]))

        return jax.jit(jax.grad(total, argnums=(0, 1)))

    steps = jax.vmap(lambda x: ik.fixed_point(
        fn, y0, {**params, "x": x}, ik.Reversible(rtol=1e-9, atol=1e-9), max_steps=200,
    ).stats["num_steps"])(xs)
    assert len(set(np.asarray(steps).tolist())) == 3  # every sample stops at its own step
    g = batched(ik.ReversibleAdjoint())(params, xs)
    ref = batched(ik.UnrolledAdjoint())(params, xs)
    assert _rel(g, ref) <= 1e-8


def test_drift_control_is_what_makes_many_steps_exact():
    """The published reversal (no anchors) drifts at many steps in float32; the
    anchored one does not, and the probe reports the drift it removed."""
    fn, y0, params = _problem(jnp.float32)
    ref = jax.grad(_loss(fn, ik.UnrolledAdjoint(), 200))(params, y0)
    naive = jax.grad(_loss(fn, ik.ReversibleAdjoint(anchor_every=None), 200))(params, y0)
    assert not _rel(naive, ref) <= 1e-2  # (NaN counts as drifted)

    def probed(adjoint):
        def loss(params, probe):
            sol = ik.fixed_point(fn, y0, params, ik.Reversible(rtol=0.0, atol=0.0),
                                 adjoint=adjoint, max_steps=200, throw=False, probe=probe)
            return jnp.sum(sol.value[0])
        return ik.backward_stats(jax.grad(loss, argnums=1)(params, ik.backward_probe()))

    stats = probed(ik.ReversibleAdjoint())
    assert int(stats.num_steps) == 200 and int(stats.num_failed) == 0
    assert 0 < float(stats.residual) < 1e-5  # the gaps the anchors closed: small, not zero
    assert not float(probed(ik.ReversibleAdjoint(anchor_every=None)).residual) < 1e-2


def test_auto_anchor_spacing():
    assert auto_anchor_every(0.8, jnp.float64) == 5
    assert auto_anchor_every(0.8, jnp.float32) == 2
    assert auto_anchor_every(0.5, jnp.float64) == 13
    assert auto_anchor_every(1.5, jnp.float32) == 5
    assert auto_anchor_every(0.999, jnp.float32) == 1


def test_reversible_solver_converges_to_the_fixed_point():
    fn, y0, params = _problem(jnp.float64)
    sol = ik.fixed_point(fn, y0, params, ik.Reversible(rtol=1e-10, atol=1e-10),
                         max_steps=500)
    ref = ik.fixed_point(fn, y0, params, ik.Picard(rtol=1e-12, atol=1e-12), max_steps=500)
    assert _rel(sol.value, ref.value) < 1e-9
    assert int(sol.stats["nfe"]) == 2 * int(sol.stats["num_steps"])


def test_deq_and_monotone_deq_train_with_the_reversible_adjoint():
    key = jax.random.key(0)
    x = jax.random.normal(key, (4,), jnp.float64)
    solver = ik.Reversible(rtol=1e-6, atol=1e-6)
    models = [
        ik.models.DEQ(ik.nn.MLPCell(6, 4, key=key), (6,), solver, ik.ReversibleAdjoint(),
                      max_steps=40),
        ik.models.MonotoneDEQ.dense(
            6, 4, key=key, solver=ik.models.PeacemanRachford(solver=solver),
            adjoint=ik.ReversibleAdjoint(), max_steps=40),
    ]
    for model in models:
        model = jtu.tree_map(lambda v: v.astype(jnp.float64) if eqx.is_inexact_array(v)
                             else v, model)

        def loss(m):
            return jnp.sum(jnp.sin(m(x, key=key)))

        g = eqx.filter_grad(loss)(model)
        unrolled = eqx.tree_at(lambda m: m.adjoint, model, ik.UnrolledAdjoint())
        ref = eqx.filter_grad(loss)(unrolled)
        assert _rel(eqx.filter(g, eqx.is_array), eqx.filter(ref, eqx.is_array)) < 1e-8


def test_bad_input_is_named():
    fn, y0, params = _problem(jnp.float64)
    with pytest.raises(ValueError, match="Reversible"):
        ik.fixed_point(fn, y0, params, ik.Picard(), adjoint=ik.ReversibleAdjoint())
    with pytest.raises(ValueError, match="max_steps"):
        ik.fixed_point(fn, y0, params, ik.Reversible(), adjoint=ik.ReversibleAdjoint(),
                       max_steps=None)
    with pytest.raises(ValueError, match="beta"):
        ik.Reversible(beta=1.0)
    with pytest.raises(ValueError, match="anchor_every"):
        ik.ReversibleAdjoint(anchor_every=0)


# ------------------------------------------------------------------ reversible ODE solving
def _ode_problem(dtype):
    k = jax.random.split(jax.random.key(3), 3)
    c = {"W": (0.8 * jax.random.normal(k[0], (3, 3))).astype(dtype),
         "U": (0.5 * jax.random.normal(k[1], (2, 3))).astype(dtype),
         "b": jax.random.normal(k[2], (3,)).astype(dtype)}

    def field(t, state, c):  # time-dependent, on a pytree state
        a, v = state
        da = jnp.tanh(c["W"] @ a + c["b"] * jnp.cos(t)) - 0.3 * a + 0.1 * jnp.sum(v)
        dv = jnp.sin(c["U"] @ a) - v
        return da, dv

    z0 = (jnp.array([0.3, -0.2, 0.5], dtype), jnp.array([0.1, -0.4], dtype))
    return dfx.ODETerm(field), z0, c


def _ode_loss(field, adjoint, base, *, steps=None, ts=None, rtol=1e-6):
    controller = None if steps is None else dfx.ConstantStepSize()
    ode = ik.models.ODESolve(solver=ik.models.UReversible(base), adjoint=adjoint,
                             rtol=rtol, atol=rtol, stepsize_controller=controller,
                             dt0=None if steps is None else 2.0 / steps)

    def loss(c, z0):
        out, stats = ode(field, z0, c, 2.0, None, ts=ts)
        a, v = out
        return jnp.sum(jnp.cos(a) * jnp.arange(1.0, a.size + 1).reshape(a.shape)) + \
            jnp.sum(v ** 2), stats

    return loss


@pytest.mark.parametrize("dtype,steps,tol", tiered(
    [(jnp.float64, 10, 1e-8), (jnp.float64, 200, 1e-8), (jnp.float32, 10, 1e-4),
     (jnp.float32, 200, 1e-4)], fast=("float64-200", "float32-200"),
    ids=["float64-10", "float64-200", "float32-10", "float32-200"]))
def test_reversible_ode_gradient_is_the_gradient_of_the_computed_steps(dtype, steps, tol):
    field, z0, c = _ode_problem(dtype)
    grads = [jax.jit(jax.grad(_ode_loss(field, adj, dfx.Tsit5(), steps=steps),
                              argnums=(0, 1), has_aux=True))(c, z0)
             for adj in (ik.ReversibleAdjoint(), dfx.RecursiveCheckpointAdjoint())]
    (g, stats), (ref, _) = grads
    assert int(stats.num_steps) == steps
    assert _rel(g, ref) <= tol


@pytest.mark.parametrize("base", tiered([dfx.Tsit5(), dfx.Dopri5(), dfx.Bosh3()],
                                        fast=("Tsit5",), ids=["Tsit5", "Dopri5", "Bosh3"]))
def test_reversible_ode_adaptive_steps_and_saved_times(base):
    """Adaptive steps (rejected ones included) are replayed backwards; a trajectory
    saved at times between the steps (linear interpolation) gets its gradient too."""
    field, z0, c = _ode_problem(jnp.float64)
    ts = jnp.linspace(0.0, 2.0, 7)
    for kw in (dict(), dict(ts=ts)):
        runs = [jax.grad(_ode_loss(field, adj, base, rtol=1e-7, **kw), argnums=(0, 1),
                         has_aux=True)(c, z0)
                for adj in (ik.ReversibleAdjoint(), dfx.RecursiveCheckpointAdjoint())]
        (g, stats), (ref, ref_stats) = runs
        assert int(stats.num_steps) == int(ref_stats.num_steps) > 10
        assert _rel(g, ref) <= 1e-8
    # the NFE counts two fresh base steps per step
    per = {dfx.Tsit5: 7, dfx.Dopri5: 7, dfx.Bosh3: 4}[type(base)]
    assert int(stats.nfe) == 2 * per * int(stats.num_steps)
    assert int(ref_stats.nfe) == int(stats.nfe)  # the same solver, any adjoint


def test_reversible_ode_matches_finite_differences_and_vmap():
    field, z0, c = _ode_problem(jnp.float64)
    loss = _ode_loss(field, ik.ReversibleAdjoint(), dfx.Tsit5(), steps=40)
    g = jax.grad(lambda c: loss(c, z0)[0])(c)
    d = jtu.tree_map(lambda x: jnp.sin(jnp.arange(x.size).reshape(x.shape) + 2.0), c)
    eps = 1e-6
    fd = (loss(jtu.tree_map(lambda p, q: p + eps * q, c, d), z0)[0]
          - loss(jtu.tree_map(lambda p, q: p - eps * q, c, d), z0)[0]) / (2 * eps)
    ad = sum(jnp.vdot(a, b) for a, b in zip(jtu.tree_leaves(g), jtu.tree_leaves(d)))
    assert abs(float(ad - fd)) <= 1e-7 * abs(float(fd))
    # a batch of initial states, each with its own adaptive steps
    z0s = jtu.tree_map(lambda x: x[None] * jnp.array([0.5, 1.0, 3.0]).reshape(
        (3,) + (1,) * x.ndim), z0)

    def batched(adjoint):
        one = _ode_loss(field, adjoint, dfx.Tsit5(), rtol=1e-7)

        def total(c, z0s):
            losses, stats = jax.vmap(lambda z: one(c, z))(z0s)
            return jnp.sum(losses * jnp.array([1.0, -2.0, 0.5])), stats.num_steps

        return jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))

    (g, steps), (ref, _) = (batched(a)(c, z0s) for a in (
        ik.ReversibleAdjoint(), dfx.RecursiveCheckpointAdjoint()))
    assert len(set(np.asarray(steps).tolist())) > 1
    assert _rel(g, ref) <= 1e-8


def test_ureversible_step_runs_backwards_and_keeps_the_base_order():
    field, z0, c = _ode_problem(jnp.float64)
    solver = ik.models.UReversible(dfx.Bosh3())
    z1 = jtu.tree_map(lambda x: x + 0.01, z0)
    y1, _, _, z2, _ = solver.step(field, 0.0, 0.1, z0, c, z1, False)
    y0, z1_back = solver.reverse_step(field, 0.0, 0.1, y1, z2, c)
    assert _rel(y0, z0) < 1e-14 and _rel(z1_back, z1) < 1e-14
    # global order 3 (Bosh3's): the error falls 8x when the step halves
    exact = dfx.diffeqsolve(field, dfx.Tsit5(), 0.0, 1.0, 1e-3, z0, c,
                            stepsize_controller=dfx.PIDController(rtol=1e-12, atol=1e-12),
                            max_steps=100_000).ys
    errs = []
    for n in (20, 40):
        ys = dfx.diffeqsolve(field, solver, 0.0, 1.0, 1.0 / n, z0, c).ys
        errs.append(_rel(ys, exact))
    assert 6 < errs[0] / errs[1] < 10


@pytest.mark.parametrize("kind", tiered(["plain", "augmented", "homoode"], fast=("plain",)))
def test_reversible_ode_models_and_bad_input(kind):
    """NeuralODE (end point and trajectory), ANODE and HomoODE's learned field take the
    reversible solve as their `ODESolve`, with the checkpointed gradient."""
    key = jax.random.key(0)
    ode = ik.models.ODESolve(solver=ik.models.UReversible(dfx.Tsit5()),
                             adjoint=ik.ReversibleAdjoint(), rtol=1e-7, atol=1e-7)

    def f64(m):
        return jtu.tree_map(lambda v: v.astype(jnp.float64) if eqx.is_inexact_array(v)
                            else v, m)

    x = jnp.array([0.2, -0.1, 0.4])
    calls = [dict()]
    if kind == "augmented":
        model = ik.models.AugmentedNeuralODE(f64(ik.nn.MLPField(5, 8, key=key)), augment=2,
                                             ode=ode)
    elif kind == "homoode":
        model = ik.models.HomoODE(f64(ik.nn.MLPField(4, 8, input_size=3, key=key)), (4,),
                                  ode=ode)
    else:
        model = ik.models.NeuralODE(f64(ik.nn.MLPField(3, 8, key=key)), ode)
        calls.append(dict(ts=jnp.linspace(0.0, 1.0, 5)))  # a trajectory
    for kw in calls:
        def loss(m):
            return jnp.sum(jnp.sin(m(x, **kw)))

        g = eqx.filter_grad(loss)(model)
        ref = eqx.filter_grad(loss)(model.with_solver(
            adjoint=dfx.RecursiveCheckpointAdjoint()))
        assert _rel(eqx.filter(g, eqx.is_array), eqx.filter(ref, eqx.is_array)) < 1e-8
    with pytest.raises(ValueError, match="UReversible"):
        ik.models.ODESolve(adjoint=ik.ReversibleAdjoint())
    with pytest.raises(ValueError, match="explicit"):
        ik.models.UReversible(dfx.Kvaerno5())
    with pytest.raises(ValueError, match="coupling"):
        ik.models.UReversible(dfx.Tsit5(), coupling=0.0)
