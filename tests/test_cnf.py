"""Continuous normalising flows: the change of variables against closed forms, the
Hutchinson estimate against the exact trace, gradients against finite differences."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import implicit_kit as ik


class _Linear(eqx.Module):
    a: jax.Array

    def __call__(self, t, y, args):
        return self.a @ y


class _Tanh(eqx.Module):
    """A time-dependent nonlinear field (diffrax's convention)."""

    w: jax.Array
    b: jax.Array

    def __call__(self, t, y, args):
        return jnp.tanh(self.w @ y + self.b * t)


_A = jnp.array([[0.3, -0.8, 0.1], [0.5, -0.2, 0.0], [0.2, 0.4, 0.6]])
_ODE = ik.models.ODESolve(dfx.Tsit5(), rtol=1e-10, atol=1e-10)


def _normal_logp(z):
    return -0.5 * (z.size * jnp.log(2 * jnp.pi) + jnp.sum(z ** 2))


@pytest.mark.parametrize("blocks", [1, 2])
def test_exact_log_density_of_a_linear_flow_is_the_change_of_variables(blocks):
    """On `dz/dt = Az` over each block of length T, `x = e^{AT·blocks} z` and
    `log p(x) = log N(e^{-AT·blocks} x) − blocks·T·tr A`; sampling inverts it."""
    model = ik.models.CNF([dfx.ODETerm(_Linear(_A))] * blocks, _ODE, t0=0.25, t1=0.75)
    x = jnp.array([0.7, -0.4, 1.1])
    T = 0.5 * blocks
    z = jax.scipy.linalg.expm(-_A * T) @ x
    expected = _normal_logp(z) - T * jnp.trace(_A)
    logp, stats = model.log_prob(x, return_stats=True)
    np.testing.assert_allclose(logp, expected, rtol=1e-9)
    np.testing.assert_allclose(model.sample(z), x, rtol=1e-9)
    one = ik.models.CNF(dfx.ODETerm(_Linear(_A)), _ODE, t0=0.25, t1=0.75)
    assert int(stats.num_steps) == blocks * int(one.log_prob(x, return_stats=True)[1].num_steps)


def test_hutchinson_on_a_linear_flow_is_its_probe_s_closed_form():
    """With the probe ε fixed for the solve, the estimate of a linear field is exactly
    `−T εᵀAε` (unbiased: E εᵀAε = tr A)."""
    model = ik.models.CNF(dfx.ODETerm(_Linear(_A)), _ODE, trace="hutchinson")
    x = jnp.array([0.7, -0.4, 1.1])
    key = jr.key(3)
    eps = jr.normal(jr.split(key)[0], (3,))
    z = jax.scipy.linalg.expm(-_A * 0.5) @ x
    np.testing.assert_allclose(model.log_prob(x, key=key),
                               _normal_logp(z) - 0.5 * eps @ _A @ eps, rtol=1e-9)
    with pytest.raises(ValueError, match="needs a `key`"):
        model.log_prob(x)


@pytest.mark.slow
def test_hutchinson_averages_to_the_exact_trace_and_both_have_exact_gradients():
    """On a nonlinear time-dependent field, the mean of the Hutchinson log-density over
    many probes matches the float64 exact-trace run within 4 standard errors; the
    exact run's gradient matches central differences, and so does one fixed probe's."""
    k1, k2 = jr.split(jr.key(0))
    field = _Tanh(0.8 * jr.normal(k1, (3, 3)), jr.normal(k2, (3,)))
    x = jnp.array([0.3, -1.0, 0.5])
    exact = ik.models.CNF(dfx.ODETerm(field), _ODE)
    hutch = ik.models.CNF(dfx.ODETerm(field), _ODE, trace="hutchinson")
    ref = exact.log_prob(x)
    est = jax.jit(jax.vmap(lambda k: hutch.log_prob(x, key=k)))(jr.split(jr.key(1), 2000))
    se = jnp.std(est) / jnp.sqrt(est.size)
    assert float(jnp.std(est)) > 1e-3  # a real estimate, not the exact trace
    assert abs(float(jnp.mean(est) - ref)) < 4 * float(se), (float(jnp.mean(est)), float(ref))

    for model, key in ((exact, None), (hutch, jr.key(7))):
        def loss(w, model=model, key=key):
            m = eqx.tree_at(lambda m: m.field.vector_field.w, model, w)
            return m.log_prob(x, key=key)

        g = jax.jit(jax.grad(loss))(field.w)
        eps = 1e-6
        for d in jr.normal(jr.key(2), (2, 3, 3)):
            fd = (loss(field.w + eps * d) - loss(field.w - eps * d)) / (2 * eps)
            np.testing.assert_allclose(jnp.sum(g * d), fd, rtol=1e-6)


def test_a_bad_cnf_configuration_is_named():
    with pytest.raises(ValueError, match="`trace` must be one of"):
        ik.models.CNF(dfx.ODETerm(_Linear(_A)), trace="exakt")
    with pytest.raises(ValueError, match="`ode.dt0` must be positive"):
        ik.models.CNF(dfx.ODETerm(_Linear(_A)), ik.models.ODESolve(dt0=-0.1))
