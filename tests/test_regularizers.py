"""Regularisers: Hutchinson Jacobian estimate, fixed-point correction, saved iterates."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import implicit_kit as ik


def _layer(d=6, seed=0):
    k1, k2 = jr.split(jr.key(seed))
    w = jr.normal(k1, (d, d)) / jnp.sqrt(d)
    x = jr.normal(k2, (d,))
    return (lambda z, args: jnp.tanh(args[0] @ z + args[1])), (w, x)


def test_hutchinson_is_unbiased_per_element():
    fn, args = _layer()
    z = jnp.linspace(-1.0, 1.0, 6)
    exact = float(jnp.sum(jax.jacfwd(lambda y: fn(y, args))(z) ** 2) / z.size)
    keys = jr.split(jr.key(1), 4000)
    samples = jax.vmap(lambda k: ik.regularizers.jacobian_frobenius(fn, z, args, key=k))(keys)
    mean, se = float(jnp.mean(samples)), float(jnp.std(samples) / jnp.sqrt(samples.size))
    assert abs(mean - exact) <= 3 * se, (mean, exact, se)
    assert se < 0.05 * exact  # the test has power: 3 SE is a tight band
    many = ik.regularizers.jacobian_frobenius(fn, z, args, key=jr.key(2), num_probes=20000)
    assert abs(float(many) - exact) < 0.05 * exact


def test_hutchinson_is_differentiable_and_exact_for_fixed_probes():
    fn, args = _layer()
    z = jnp.linspace(-1.0, 1.0, 6)
    key, p = jr.key(3), 5
    eps = jr.normal(key, (p, 6))

    def dense(args):
        jac = jax.jacfwd(lambda y: fn(y, args))(z)
        return jnp.sum((eps @ jac) ** 2) / (p * z.size)

    def est(args):
        return ik.regularizers.jacobian_frobenius(fn, z, args, key=key, num_probes=p)

    np.testing.assert_allclose(est(args), dense(args), rtol=1e-12)
    for a, b in zip(jax.grad(est)(args), jax.grad(dense)(args)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_spectral_radius_monitor_bounds_frobenius():
    fn, args = _layer(seed=4)
    z = jnp.zeros(6)
    jac = jax.jacfwd(lambda y: fn(y, args))(z)
    rho = float(ik.regularizers.spectral_radius(fn, z, args))
    assert abs(rho - float(jnp.max(jnp.abs(jnp.linalg.eigvals(jac))))) < 1e-8
    assert rho <= float(jnp.linalg.norm(jac))


def test_saved_iterates_are_the_solver_iterates():
    fn, args = _layer()
    solver = ik.Picard(rtol=1e-9, atol=1e-11)
    sol = ik.fixed_point(fn, jnp.zeros(6), args, solver, save_iterates=(0, 1, 3, 500))
    z, ref = jnp.zeros(6), {0: jnp.zeros(6)}
    for k in range(1, 4):
        z = fn(z, args)
        ref[k] = z
    it = sol.stats["iterates"]
    assert it.shape == (4, 6)
    for row, k in enumerate((0, 1, 3)):
        np.testing.assert_allclose(it[row], ref[k], atol=1e-15)
    np.testing.assert_allclose(it[3], sol.value)  # stopped before step 500: the final one


def test_fixed_point_correction_value_and_gradient():
    fn, (w, x) = _layer()
    target = jnp.ones(6)
    deq = ik.models.DEQ(fn, (6,), ik.Picard(rtol=1e-9, atol=1e-11), save_iterates=(1, 2, 4))

    def loss_fn(z):
        return jnp.mean((z - target) ** 2)

    def correction(w):
        _, st = deq((w, x), return_stats=True)
        its = st.iterates
        return ik.regularizers.fixed_point_correction(fn, its, (w, x), loss_fn, 0.5)

    _, st = deq((w, x), return_stats=True)
    its = st.iterates
    weights = jnp.array([0.25, 0.5, 1.0])
    manual = lambda w: sum(wt * loss_fn(fn(its[i], (w, x))) for i, wt in enumerate(weights))
    np.testing.assert_allclose(correction(w), manual(w) / weights.sum(), rtol=1e-13)
    # Gradients flow through the one step only (iterates detached).
    np.testing.assert_allclose(jax.grad(correction)(w), jax.grad(manual)(w) / weights.sum(),
                               rtol=1e-10, atol=1e-13)
    assert eqx.is_array(its)


def test_spectral_radius_single_real_dominant():
    d = jnp.array([0.9, -0.5, 0.3, 0.1])
    q, _ = jnp.linalg.qr(jr.normal(jr.key(0), (4, 4)))
    m = q @ jnp.diag(d) @ q.T
    rho = ik.regularizers.spectral_radius(lambda z, a: a @ z, jnp.zeros(4), m, num_iters=200)
    np.testing.assert_allclose(rho, 0.9, rtol=1e-8)
