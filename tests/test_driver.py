"""The shared driver: transforms, per-sample semantics under vmap, results and errors."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import implicit_kit as ik

from .helpers import MLPDEQ, rel_err, tiered


PROBLEM = MLPDEQ()
SOLVER = ik.Anderson(rtol=1e-10, atol=1e-12)
ADJOINT = ik.ImplicitAdjoint(ik.Picard(rtol=1e-12, atol=1e-13))


def _solve_x(x, solver=SOLVER, **kw):
    W, U, b, _ = PROBLEM.args
    return ik.fixed_point(PROBLEM.fn, PROBLEM.y0, (W, U, b, x), solver, adjoint=ADJOINT,
                          **kw)


def _loss(x):
    return jnp.sum(jnp.sin(_solve_x(x).value))


def _fd_grad(f, x, eps=1e-6):
    return jnp.stack([(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in jnp.eye(x.size)])


XS = jnp.stack([PROBLEM.args[3] * s for s in (0.1, 1.0, 3.0)])


def test_jit_and_grad():
    x = PROBLEM.args[3]
    np.testing.assert_allclose(jax.jit(_loss)(x), _loss(x), rtol=1e-12)
    g = jax.grad(_loss)(x)
    assert rel_err(g, _fd_grad(_loss, x)) < 1e-7
    np.testing.assert_allclose(jax.jit(jax.grad(_loss))(x), g, rtol=1e-12)


def test_vmap_grad_and_grad_vmap():
    per_sample = jnp.stack([jax.grad(_loss)(x) for x in XS])
    np.testing.assert_allclose(jax.vmap(jax.grad(_loss))(XS), per_sample, rtol=1e-10)
    total = jax.grad(lambda xs: jnp.sum(jax.vmap(_loss)(xs)))(XS)
    np.testing.assert_allclose(total, per_sample, rtol=1e-10)


def test_vmap_vmap():
    grid = jnp.stack([XS, -XS])  # (2, 3, d)
    vals = jax.vmap(jax.vmap(lambda x: _solve_x(x).value))(grid)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(vals[i, j], _solve_x(grid[i, j]).value, rtol=1e-12)


def test_per_sample_semantics_under_vmap():
    sols = jax.vmap(lambda x: _solve_x(x, throw=False))(XS)
    steps = sols.stats["num_steps"]
    assert len(set(steps.tolist())) > 1  # the samples do need different numbers of steps
    for i, x in enumerate(XS):
        single = _solve_x(x)
        assert int(steps[i]) == int(single.stats["num_steps"])
        # Equal up to the rounding of batched vs unbatched matmuls.
        np.testing.assert_allclose(sols.value[i], single.value, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(sols.stats["residual"][i], single.stats["residual"],
                                   rtol=1e-3)


def test_no_retrace_on_new_values():
    traces = []

    def fn(z, args):
        traces.append(None)  # runs only while tracing
        return PROBLEM.fn(z, args)

    @eqx.filter_jit
    def step(args):
        loss = lambda a: jnp.sum(ik.fixed_point(fn, PROBLEM.y0, a, SOLVER).value ** 2)
        return jax.value_and_grad(loss)(args)

    step(PROBLEM.args)
    n = len(traces)
    assert n > 0
    new_args = jax.tree_util.tree_map(lambda a: a * 0.9, PROBLEM.args)
    step(new_args)
    step(jax.tree_util.tree_map(lambda a: a * 0.8, PROBLEM.args))
    assert len(traces) == n



_COMPILES: list = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _COMPILES.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None)


@pytest.mark.parametrize("solver, adjoint", [
    (ik.Anderson(rtol=1e-6, atol=1e-8), ik.ImplicitAdjoint("picard")),
    (ik.Picard(rtol=1e-6, atol=1e-8), ik.UnrolledAdjoint()),
], ids=["anderson-implicit", "picard-unrolled"])
def test_tracing_a_solve_compiles_nothing_eagerly(solver, adjoint):
    """Tracing a vmapped solve and its gradient runs no XLA compilation of its own (a
    constant computed with jnp at trace time, as promoting a dependency's result code
    did, compiles and runs eagerly: 16 compilations, 0.2 s of a DEQ train step's 0.5 s
    trace in a fresh process). (The default backward's GMRES fallback is left out: lineax
    compiles one small function while tracing its `linear_solve`.)"""
    y0, args = PROBLEM.y0, PROBLEM.args

    def loss(args, scale):
        def one(s):
            a = jax.tree_util.tree_map(lambda v: s * v, args)
            return ik.fixed_point(PROBLEM.fn, y0, a, solver, adjoint=adjoint,
                                  max_steps=30, throw=False).value
        return jnp.sum(jax.vmap(one)(scale) ** 2)

    scale = jnp.linspace(0.5, 1.0, 3)
    jax.block_until_ready(scale)
    jax.clear_caches()  # (an eager op compiled by an earlier test would not compile again)
    before = len(_COMPILES)
    jax.jit(jax.grad(loss)).lower(args, scale)
    assert len(_COMPILES) == before
    jax.jit(jax.grad(loss)).lower(args, scale).compile()
    assert len(_COMPILES) == before + 1  # (the listener sees compilations)

def test_residual_trace():
    sol = _solve_x(PROBLEM.args[3], max_steps=64, trace=True)
    trace = np.asarray(sol.stats["residual_trace"])
    k = int(sol.stats["num_steps"])
    assert np.all(np.isfinite(trace[:k])) and np.all(np.isnan(trace[k:]))
    assert trace[k - 1] == float(sol.stats["residual"])
    assert trace[k - 1] < 1e-6 * trace[0]


def test_max_steps_result_and_throw():
    sol = _solve_x(PROBLEM.args[3], solver=ik.Picard(rtol=1e-12, atol=0), max_steps=3,
                   throw=False)
    assert sol.result == ik.RESULTS.nonlinear_max_steps_reached
    assert int(sol.stats["num_steps"]) == 3
    with pytest.raises(Exception, match="maximum number of steps"):
        jax.block_until_ready(
            _solve_x(PROBLEM.args[3], solver=ik.Picard(rtol=1e-12, atol=0), max_steps=3))


@pytest.mark.parametrize("solver", [ik.Picard(), ik.Anderson(), ik.Broyden()],
                         ids=lambda s: type(s).__name__)
def test_nonfinite_detected_inside_loop(solver):
    # Finite at the start, overflows after a few steps.
    fn = lambda y, a: y * a + 1.0
    sol = ik.fixed_point(fn, jnp.ones(2), 1e100, solver, max_steps=100, throw=False)
    assert sol.result == ik.RESULTS.nonfinite
    assert int(sol.stats["num_steps"]) < 10
    assert bool(jnp.all(jnp.isfinite(sol.value)))  # the last finite iterate is kept
    with pytest.raises(Exception, match="Nonfinite"):
        jax.block_until_ready(ik.fixed_point(fn, jnp.ones(2), 1e100, solver, max_steps=100))


def test_failed_backward_solve_is_never_silent():
    # rho(J) = 0.99: 3 adjoint fixed-point steps cannot reach 1e-10.
    A = 0.99 * jnp.eye(3)
    fn = lambda y, a: A @ y + a
    weak = ik.ImplicitAdjoint(ik.Picard(rtol=1e-10, atol=1e-12), max_steps=3)

    def loss(a, probe, throw):
        sol = ik.fixed_point(fn, jnp.zeros(3), a, ik.NewtonKrylov(), adjoint=weak,
                             throw=throw, probe=probe)
        return jnp.sum(sol.value)

    probe = ik.backward_probe()
    g, pg = jax.grad(loss, argnums=(0, 1))(jnp.ones(3), probe, False)
    assert bool(jnp.all(jnp.isnan(g)))
    stats = ik.backward_stats(pg)
    assert float(stats.num_failed) == 1.0 and float(stats.num_steps) == 3.0
    with pytest.raises(Exception, match="backward"):  # (raised asynchronously on GPU)
        jax.block_until_ready(jax.grad(loss)(jnp.ones(3), None, True))
    # Under vmap: one failure per failing sample, the others are exact.
    As = jnp.stack([1e-4 * jnp.eye(3), 0.99 * jnp.eye(3)])

    def loss2(A, a, probe):
        sol = ik.fixed_point(lambda y, a: A @ y + a, jnp.zeros(3), a, ik.NewtonKrylov(),
                             adjoint=weak, throw=False, probe=probe)
        return jnp.sum(sol.value)

    g, pg = jax.vmap(jax.grad(loss2, argnums=(1, 2)), in_axes=(0, None, None))(
        As, jnp.ones(3), probe)
    assert bool(jnp.all(jnp.isfinite(g[0]))) and bool(jnp.all(jnp.isnan(g[1])))
    np.testing.assert_allclose(g[0], jnp.full(3, 1 / (1 - 1e-4)), rtol=1e-9)
    assert pg[:, 2].tolist() == [0.0, 1.0]


def test_backward_stats_of_a_converged_solve():
    probe = ik.backward_probe()

    def loss(x, probe):
        W, U, b, _ = PROBLEM.args
        return jnp.sum(ik.fixed_point(PROBLEM.fn, PROBLEM.y0, (W, U, b, x), SOLVER,
                                      adjoint=ADJOINT, probe=probe).value)

    _, pg = jax.grad(loss, argnums=(0, 1))(PROBLEM.args[3], probe)
    stats = ik.backward_stats(pg)
    assert 5 <= float(stats.num_steps) < 200
    assert float(stats.num_failed) == 0.0
    assert 0 < float(stats.residual) < 1e-10


def test_lineax_backward_failure():
    fn = lambda y, a: 0.99 * y + a
    adjoint = ik.ImplicitAdjoint(lx.GMRES(rtol=1e-12, atol=1e-14, max_steps=1, restart=1))
    g = jax.grad(lambda a: jnp.sum(ik.fixed_point(
        fn, jnp.zeros(4), a, ik.NewtonKrylov(), adjoint=adjoint, throw=False).value))(
        jnp.linspace(0, 1, 4) * jnp.array([1.0, -2.0, 3.0, 0.5]))
    assert bool(jnp.all(jnp.isnan(g)))


def test_structure_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"float64\[3\].*float64\[2\]"):
        ik.fixed_point(lambda y, a: jnp.zeros(3), jnp.zeros(2), None)
    with pytest.raises(ValueError, match="same structure"):
        ik.root_find(lambda y, a: (y, y), jnp.zeros(2), None)
    with pytest.raises(TypeError, match="solver"):
        ik.fixed_point(lambda y, a: y, jnp.zeros(2), None, solver="anderson")
    with pytest.raises(TypeError, match="adjoint"):
        ik.fixed_point(lambda y, a: y, jnp.zeros(2), None, adjoint="implicit")
    with pytest.raises(ValueError, match="m"):
        ik.Anderson(m=0)


@pytest.mark.parametrize("k", tiered([2, 8], fast=set()))
def test_check_every_k_gives_the_results_and_stats_of_k_1(k):
    """k solver steps per loop test: values, step counts, nfe, residuals, traces, results
    and solver stats equal those of k = 1 (alone and per sample under vmap), also where
    max_steps is not a multiple of k and some samples run out of steps; gradients too."""
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))[0]  # orthogonal
    a, b = jnp.asarray(0.9 * q), jnp.arange(6.0)
    fn = lambda y, args: args[0] @ jnp.tanh(y) + args[1]  # noqa: E731
    scales = jnp.array([0.2, 0.6, 1.0, 1.3])  # Anderson: 12, 14, 16, 17 steps to converge
    for solver in (ik.Anderson(rtol=1e-10, atol=1e-10), ik.Picard(rtol=1e-10, atol=1e-10),
                   ik.NewtonKrylov(rtol=1e-10, atol=1e-10), ik.Halpern(rtol=1e-8, atol=1e-8)):
        # (jitted: one compilation per `every`, not one per call)
        @functools.partial(jax.jit, static_argnums=1)
        def solve(s, every, solver=solver):
            return ik.fixed_point(fn, jnp.zeros(6), (s * a, b), solver, max_steps=15,
                                  throw=False, trace=True, check_every=every)

        ref = jax.vmap(lambda s: solve(s, 1))(scales)
        got = jax.vmap(lambda s: solve(s, k))(scales)
        assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(got)
        for x, y in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
            if jnp.issubdtype(x.dtype, jnp.inexact):  # the same steps, fused differently
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
            else:  # step counts, nfe, result codes, solver stats: exact
                np.testing.assert_array_equal(x, y)
        assert len(set(ref.stats["num_steps"].tolist())) > 1  # the samples differ
        if isinstance(solver, ik.Anderson):  # some run out of steps (15, not a multiple)
            assert bool(jnp.any(ref.result != ik.RESULTS.successful))
            assert int(ref.stats["num_steps"].max()) == 15
        for i, s in enumerate(scales):  # unbatched: the loop itself stops every k steps
            one = solve(s, k)
            for key, v in one.stats.items():  # incl. solver stats: NewtonKrylov's
                if not jnp.issubdtype(v.dtype, jnp.inexact):  # linear_steps
                    assert int(v) == int(ref.stats[key][i]), key
            assert int(one.result._value) == int(ref.result._value[i])
            np.testing.assert_allclose(one.value, ref.value[i], rtol=1e-12)
    # the implicit gradient and the unrolled one (checkpointed loop of k-step bodies)
    for adjoint in (ik.ImplicitAdjoint(), ik.UnrolledAdjoint()):
        def loss(s, every, adjoint=adjoint):
            return jnp.sum(ik.fixed_point(fn, jnp.zeros(6), (s * a, b),
                                          ik.Anderson(rtol=1e-10, atol=1e-10),
                                          adjoint=adjoint, max_steps=40,
                                          check_every=every).value ** 2)

        np.testing.assert_allclose(jax.grad(loss)(0.5, k), jax.grad(loss)(0.5, 1),
                                   rtol=1e-12)
    with pytest.raises(ValueError, match="check_every"):
        ik.fixed_point(fn, jnp.zeros(6), (a, b), check_every=0)


class _PlainState(eqx.Module):  # not an AbstractSolverState: no residual / scale declared
    value: jax.Array


def _picard_with(state_cls, counts_nfe):
    class Custom(ik.solvers.AbstractFixedPointSolver):
        rtol: float = 1e-6
        atol: float = 1e-6
        norm: object = staticmethod(jnp.linalg.norm)

        def init(self, fn, y, args, options, f_struct, aux_struct, tags):
            start = dict(residual=jnp.asarray(jnp.inf), scale=jnp.asarray(jnp.inf),
                         value=jnp.asarray(0.0), nfe=jnp.asarray(0))
            return state_cls(**{k: start[k] for k in state_cls.__dataclass_fields__})

        def step(self, fn, y, args, options, state, tags):
            fy, aux = fn(y, args)
            fields = dict(residual=jnp.linalg.norm(fy - y), scale=jnp.linalg.norm(y),
                          value=jnp.linalg.norm(y))
            if "nfe" in state_cls.__dataclass_fields__:
                fields["nfe"] = state.nfe + 1
            return fy, state_cls(**{k: fields[k] for k in state_cls.__dataclass_fields__}), aux

    Custom.counts_nfe = counts_nfe
    return Custom()


class _Counting(ik.solvers.AbstractSolverState):
    residual: jax.Array
    scale: jax.Array
    nfe: jax.Array


class _NotCounting(ik.solvers.AbstractSolverState):
    residual: jax.Array
    scale: jax.Array


def test_solver_protocol_is_checked_with_a_clear_error():
    fn = lambda y, x: 0.5 * y + x  # noqa: E731
    x = jnp.ones(3)
    with pytest.raises(TypeError, match="Custom.init` must return an `implicit_kit.solvers"
                                        ".AbstractSolverState"):
        ik.fixed_point(fn, jnp.zeros(3), x, _picard_with(_PlainState, False))
    with pytest.raises(TypeError, match="carries `nfe` but the solver declares `counts_nfe "
                                        "= False`"):
        ik.fixed_point(fn, jnp.zeros(3), x, _picard_with(_Counting, False))
    with pytest.raises(TypeError, match="has no `nfe` but the solver declares `counts_nfe "
                                        "= True`"):
        ik.fixed_point(fn, jnp.zeros(3), x, _picard_with(_NotCounting, True))
    # the declared forms run, and the nfe the driver reports follows the declaration
    for state_cls, counts in ((_Counting, True), (_NotCounting, False)):
        sol = ik.fixed_point(fn, jnp.zeros(3), x, _picard_with(state_cls, counts),
                             max_steps=200)
        np.testing.assert_allclose(sol.value, 2 * x, rtol=1e-5)
        assert int(sol.stats["nfe"]) == int(sol.stats["num_steps"]) > 5
    # overriding postprocess without saying whether it reads the final state
    with pytest.raises(TypeError, match="overrides `postprocess`: set the class variable "
                                        "`stats_from_state`"):
        class _Bad(ik.Picard):
            def postprocess(self, *args):
                return super().postprocess(*args)

    class _Good(ik.Picard):  # declared: accepted
        stats_from_state = False

        def postprocess(self, *args):
            return super().postprocess(*args)
