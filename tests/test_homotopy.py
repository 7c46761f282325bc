"""Homotopy continuation: end points, divergent maps, lost paths, gradients, NFE."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import implicit_kit as ik

from .helpers import Divergent, tiered


TIGHT = dfx.PIDController(rtol=1e-10, atol=1e-12)
HOMOTOPIES = {"fixed_point": ik.homotopy.FixedPointHomotopy(),
              "newton": ik.homotopy.NewtonHomotopy()}


def _tanh_map(n, seed=0, contraction=0.9):
    k1, k2 = jr.split(jr.key(seed))
    w = jr.normal(k1, (n, n))
    w = contraction * w / jnp.linalg.norm(w, 2)
    return (lambda z, a: jnp.tanh(a[0] @ z + a[1])), (w, jr.normal(k2, (n,)))


@pytest.mark.parametrize("n", [2, 20])
@pytest.mark.parametrize("name", list(HOMOTOPIES))
def test_end_point_is_the_equilibrium(n, name):
    fn, args = _tanh_map(n)
    ref = ik.fixed_point(fn, jnp.zeros(n), args, ik.Picard(rtol=1e-14, atol=1e-15),
                         max_steps=5000).value
    z0 = jnp.where(jnp.arange(n) % 2 == 0, -1.0, 1.0)  # HomoODE's alternating start
    sol = ik.homotopy_solve(fn, z0, args, HOMOTOPIES[name], stepsize_controller=TIGHT,
                            rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(sol.value, ref, atol=1e-6)
    assert float(sol.stats["residual"]) < 1e-8
    assert int(sol.stats["nfe"]) > 0 and int(sol.stats["num_steps"]) > 0


def _divergent_nonlinear():
    # z = A tanh(z) + b with an eigenvalue -3 of A: Picard oscillates and diverges.
    q, _ = jnp.linalg.qr(jr.normal(jr.key(5), (3, 3)))
    a = q @ jnp.diag(jnp.array([-3.0, 0.4, 0.2])) @ q.T
    return (lambda z, args: args[0] @ jnp.tanh(z) + args[1]), (a, jnp.array([0.3, -0.2, 0.5]))


@pytest.mark.parametrize("name", list(HOMOTOPIES))
def test_reaches_the_root_where_picard_diverges(name):
    for fn, args, y0 in [(Divergent.fn, Divergent().args, Divergent().y0),
                         (*_divergent_nonlinear(), jnp.zeros(3))]:
        picard = ik.fixed_point(fn, y0, args, ik.Picard(), max_steps=500, throw=False)
        assert picard.result != ik.RESULTS.successful
        sol = ik.homotopy_solve(fn, y0, args, HOMOTOPIES[name], stepsize_controller=TIGHT,
                                rtol=1e-8, atol=1e-9)
        assert float(jnp.linalg.norm(fn(sol.value, args) - sol.value)) < 1e-8


def test_homotopy_solver_in_fallback_and_fixed_point():
    fn, args = _divergent_nonlinear()
    solver = ik.Fallback(ik.Picard(), ik.HomotopySolver(stepsize_controller=TIGHT, rtol=1e-9,
                                                       atol=1e-10), max_steps=50)
    sol = ik.fixed_point(fn, jnp.zeros(3), args, solver, max_steps=100)
    assert int(sol.stats["solver_index"]) == 1
    assert float(jnp.linalg.norm(fn(sol.value, args) - sol.value)) < 1e-8
    sol = ik.fixed_point(fn, jnp.zeros(3), args, ik.HomotopySolver(stepsize_controller=TIGHT))
    assert float(sol.stats["residual"]) < 1e-5


def _fold():
    # G(z) = z^3 - 3z - 3 from z0 = -2: the Newton path G(z) = (1 - lam) G(z0) climbs to
    # the local maximum G(-1) = -1 at lam = 0.8 (G' = 0: a turning point) and is lost.
    return (lambda z, a: z + (z**3 - 3 * z - a)), jnp.array(3.0)


def test_lost_path_returns_its_code():
    fn, args = _fold()
    sol = ik.homotopy_solve(fn, jnp.array([-2.0]), args, HOMOTOPIES["newton"],
                            max_steps=500, throw=False)
    assert sol.result == ik.RESULTS.homotopy_path_lost
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    with pytest.raises(Exception, match="homotopy path was lost"):
        jax.block_until_ready(ik.homotopy_solve(fn, jnp.array([-2.0]), args,
                                                HOMOTOPIES["newton"], max_steps=500).value)
    # From the other side of the fold the path reaches the root (z ~ 2.1).
    sol = ik.homotopy_solve(fn, jnp.array([3.0]), args, HOMOTOPIES["newton"],
                            stepsize_controller=TIGHT, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(sol.value**3 - 3 * sol.value - 3, 0.0, atol=1e-8)


@pytest.mark.parametrize("mode", ["ift", pytest.param("path", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(HOMOTOPIES))
def test_gradient_matches_finite_differences(mode, name):
    fn, args = _tanh_map(6, seed=2)
    adjoint = None if mode == "ift" else dfx.RecursiveCheckpointAdjoint()
    c = jr.normal(jr.key(3), (6,))

    def loss(a):
        sol = ik.homotopy_solve(fn, jnp.ones(6), a, HOMOTOPIES[name],
                                stepsize_controller=TIGHT, adjoint=adjoint, rtol=1e-8,
                                atol=1e-9)
        return c @ sol.value

    loss = jax.jit(loss)  # compiled once for the gradient, once for the 4 FD values
    g = jax.jit(jax.grad(loss))(args)
    eps = 1e-6
    for i, d in enumerate([jr.normal(jr.key(4), (6, 6)), jr.normal(jr.key(5), (6,))]):
        plus = tuple(a + eps * d if j == i else a for j, a in enumerate(args))
        minus = tuple(a - eps * d if j == i else a for j, a in enumerate(args))
        fd = (loss(plus) - loss(minus)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(g[i], d), fd, rtol=1e-6)


def test_saved_path_lies_on_the_homotopy():
    fn, args = _tanh_map(4, seed=1)
    z0 = jnp.ones(4)
    sol = ik.homotopy_solve(fn, z0, args, stepsize_controller=TIGHT, save_path=True,
                            max_steps=256, rtol=1e-8, atol=1e-9)
    lam, path = sol.stats["path_lambda"], sol.stats["path_z"]
    valid = jnp.isfinite(lam)
    assert int(valid.sum()) == int(sol.stats["num_steps"]) - int(
        sol.stats.get("ode_rejected_steps", 0))
    for l_, z in zip(lam[valid], path[valid]):
        h = l_ * (z - fn(z, args)) + (1 - l_) * (z - z0)  # H(z, lambda) = 0 on the path
        assert float(jnp.linalg.norm(h)) < 1e-8


def test_nfe_is_the_number_of_vector_field_calls():
    calls = []
    fn0, args = _tanh_map(5)

    def fn(z, a):
        jax.debug.callback(lambda: calls.append(1))
        return fn0(z, a)

    for solver in (dfx.Tsit5(), dfx.Dopri5()):
        calls.clear()
        sol = ik.homotopy_solve(fn, jnp.ones(5), args, ik.homotopy.NewtonHomotopy(),
                                ode_solver=solver, stepsize_controller=TIGHT, rtol=1e-8,
                                atol=1e-9, adjoint=dfx.RecursiveCheckpointAdjoint())
        jax.block_until_ready(sol.value)
        # Each vector-field call evaluates f once (linearize); plus the constant G(z0)
        # and the residual check at the end: all counted.
        assert len(calls) == int(sol.stats["nfe"]), (type(solver), len(calls),
                                                     sol.stats["nfe"])


@pytest.mark.parametrize("name", tiered(list(HOMOTOPIES), ("newton",)))
def test_float32_with_default_tolerances(name):
    """The default linear solves follow the data's precision: in float32 they used to
    ask GMRES for 1e-10, fail at every step and report the path lost."""
    fn, (a, b) = _divergent_nonlinear()
    a, b, z0 = a.astype(jnp.float32), b.astype(jnp.float32), jnp.full(3, 1.5, jnp.float32)
    sol = ik.homotopy_solve(fn, z0, (a, b), HOMOTOPIES[name], throw=False)
    assert sol.result == ik.RESULTS.successful and sol.value.dtype == jnp.float32
    assert float(jnp.linalg.norm(fn(sol.value, (a, b)) - sol.value)) < 1e-4
    g = jax.grad(lambda b: ik.homotopy_solve(fn, z0, (a, b), HOMOTOPIES[name]).value.sum())(b)
    jac = jax.jacobian(lambda z: fn(z, (a, b)) - z)(sol.value)  # IFT in closed form
    np.testing.assert_allclose(g, -jnp.linalg.solve(jac.T, jnp.ones(3)), rtol=1e-3, atol=1e-4)
