"""The stats and results contract (docs/design.md), interoperability with optimistix, and the
default backward solve."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import implicit_kit as ik
from implicit_kit._solution import STATS_KEYS

from .optx_problems import problems


def _contraction(n=5, rho=0.6, seed=0):
    W = jr.normal(jr.key(seed), (n, n))
    W = rho * W / jnp.linalg.norm(W, 2)
    return lambda y, a: jnp.tanh(W @ y + a), jnp.linspace(-1.0, 1.0, n)


def _counting(fn, calls):
    """`fn` that counts its evaluations at run time, JVPs included (each one)."""

    @jax.custom_jvp
    def f(y, a):
        jax.debug.callback(lambda: calls.append(1))
        return fn(y, a)

    @f.defjvp
    def f_jvp(primals, tangents):
        (y, a), (ty, ta) = primals, tangents
        jax.debug.callback(lambda: calls.append(1))
        return jax.jvp(fn, (y, a), (ty, ta))

    return f


# NewtonKrylov's JVPs inside its Krylov solve cannot be counted by a callback (they are
# the linearised function); its `nfe` is checked as steps + Krylov steps below.
ENTRY_SOLVERS = {
    "picard": ik.Picard(rtol=1e-10, atol=1e-12),
    "anderson": ik.Anderson(rtol=1e-10, atol=1e-12),
    "broyden": ik.Broyden(rtol=1e-10, atol=1e-12),
    "halpern": ik.Halpern(rtol=1e-3, atol=1e-4),
    "fallback": ik.Fallback(ik.Picard(rtol=1e-10, atol=1e-12), ik.Anderson(rtol=1e-10,
                                                                           atol=1e-12)),
    "optx_fpi": optx.FixedPointIteration(rtol=1e-10, atol=1e-12),
}


@pytest.mark.parametrize("name", list(ENTRY_SOLVERS))
def test_fixed_point_stats_and_nfe_against_a_runtime_counter(name):
    fn0, a = _contraction()
    calls = []
    fn = _counting(fn0, calls)
    sol = ik.fixed_point(fn, jnp.zeros(5), a, ENTRY_SOLVERS[name], max_steps=20_000)
    jax.block_until_ready(sol.value)
    assert set(STATS_KEYS) <= set(sol.stats)
    # One evaluation of the map is spent by the implicit adjoint's re-attachment of the
    # solution to the parameters (not part of the solve).
    assert len(calls) - 1 == int(sol.stats["nfe"]) >= int(sol.stats["num_steps"]) > 0
    assert int(sol.stats["max_steps"]) == 20_000
    res = float(jnp.linalg.norm(fn0(sol.value, a) - sol.value))
    solver = ENTRY_SOLVERS[name]
    if name != "optx_fpi":  # ours report the residual of the last iterate they tested
        assert float(sol.stats["residual"]) <= solver.atol + solver.rtol * float(
            jnp.linalg.norm(sol.value)) * 1.01
        assert res < 10 * (solver.atol + solver.rtol * float(jnp.linalg.norm(sol.value)))
    else:  # the driver evaluates it at the returned point (one more evaluation, counted)
        np.testing.assert_allclose(float(sol.stats["residual"]), res, atol=1e-11)


def test_newton_krylov_counts_its_jacobian_vector_products():
    fn, a = _contraction()
    sol = ik.fixed_point(fn, jnp.zeros(5), a, ik.NewtonKrylov(rtol=1e-10, atol=1e-12))
    steps, linear = int(sol.stats["num_steps"]), int(sol.stats["linear_steps"])
    assert linear > 0 and int(sol.stats["nfe"]) == steps + linear


def test_every_entry_point_reports_the_contract():
    fn, a = _contraction()
    g = lambda y, a: fn(y, a) - y
    loss = lambda y, a: jnp.sum((y - a) ** 2) + jnp.sum(y**4)
    sols = {
        "fixed_point": ik.fixed_point(fn, jnp.zeros(5), a, ik.Picard(rtol=1e-10,
                                                                     atol=1e-12)),
        "root_find": ik.root_find(g, jnp.zeros(5), a),
        "minimise(optx)": ik.minimise(loss, jnp.zeros(5), a),
        "minimise(ik)": ik.minimise(loss, jnp.zeros(5), a, ik.NewtonKrylov(rtol=1e-10,
                                                                           atol=1e-12)),
        "homotopy(ift)": ik.homotopy_solve(fn, jnp.zeros(5), a, max_steps=500),
        "homotopy(path)": ik.homotopy_solve(fn, jnp.zeros(5), a, max_steps=500,
                                            adjoint=dfx.RecursiveCheckpointAdjoint()),
    }
    for name, sol in sols.items():
        assert set(STATS_KEYS) <= set(sol.stats), name
        assert sol.result == ik.RESULTS.successful, name
        assert int(sol.stats["nfe"]) >= int(sol.stats["num_steps"]) > 0, name
        assert float(sol.stats["residual"]) < 1e-4, name
    # A homotopy path's outer loop is its ODE: num_steps and max_steps say so.
    for name in ("homotopy(ift)", "homotopy(path)"):
        assert int(sols[name].stats["max_steps"]) == 500
        assert "ode_steps" not in sols[name].stats
    assert int(sols["homotopy(ift)"].stats["num_steps"]) == int(
        sols["homotopy(path)"].stats["num_steps"])


def test_results_promote_diffrax_outcomes_without_collapsing():
    assert issubclass(ik.RESULTS, dfx.RESULTS) and issubclass(ik.RESULTS, optx.RESULTS)
    field = ik.nn.MLPField(3, 16, key=jr.key(0))
    ode = ik.models.ODESolve(max_steps=2)
    model = ik.models.NeuralODE(field, ode, t1=5.0)
    _, st = model(jnp.ones(3), return_stats=True)
    assert st.result == ik.RESULTS.max_steps_reached  # diffrax's own code
    assert st.result != ik.RESULTS.nonlinear_max_steps_reached
    assert bool(st.failed())
    assert "diffrax" in ik.RESULTS[st.result] or "maximum" in ik.RESULTS[st.result]
    # success has a message of its own (the dependencies' is ""), whichever library's
    # code it was promoted from
    for lib in (dfx, optx, lx):
        assert ik.RESULTS[ik.RESULTS.promote(lib.RESULTS.successful)] == "The solve succeeded."


def _models():
    k = jr.split(jr.key(1), 6)
    cell = ik.nn.MLPCell(4, 4, norm="spectral", spectral_scale=0.5, key=k[0])
    deq = ik.models.DEQ(cell, (4,), ik.Picard(rtol=1e-8, atol=1e-10))
    mon = ik.models.MonotoneDEQ.dense(4, 4, key=k[1])
    node = ik.models.NeuralODE(ik.nn.MLPField(4, 8, key=k[2]))
    anode = ik.models.AugmentedNeuralODE(ik.nn.MLPField(6, 8, key=k[3]), 2)
    homo = ik.models.HomoODE(ik.nn.MLPField(4, 8, input_size=4, key=k[4]), (4,))
    exact = ik.models.HomoODE(cell, (4,), field="exact")
    return {"deq": deq, "mondeq": mon, "node": node, "anode": anode, "homoode": homo,
            "homoode_exact": exact}


def test_every_model_returns_the_same_stats_structure():
    x = jnp.linspace(-0.5, 0.5, 4)
    for name, model in _models().items():
        _, st = jax.vmap(lambda x: model(x, return_stats=True))(jnp.stack([x, -x]))
        assert isinstance(st, ik.models.ModelStats), name
        assert st.num_steps.shape == st.nfe.shape == st.residual.shape == (2,), name
        assert bool(jnp.all(st.result == ik.RESULTS.successful)), name
        assert bool(jnp.all(st.nfe >= st.num_steps)) and bool(jnp.all(st.num_steps > 0))
        ode = name in ("node", "anode", "homoode")
        assert bool(jnp.all(jnp.isnan(st.residual))) == ode, name
        if not ode:
            assert float(jnp.max(st.residual)) < 1e-3, name


def test_every_model_follows_the_call_contract():
    """`AbstractImplicitModel`: every model is called as `model(x, *, key, inference,
    return_stats, probe)`, returns its output alone by default and `(output, stats)`
    with `return_stats=True` (the same output); a subclass that breaks the signature is
    refused when it is defined."""
    models = _models()
    x = jnp.linspace(-0.5, 0.5, 4)
    probe = ik.backward_probe()
    for name, model in models.items():
        assert isinstance(model, ik.models.AbstractImplicitModel), name
        out = model(x, key=jr.key(0), inference=True)
        out2, st = model(x, key=jr.key(0), inference=True, return_stats=True, probe=probe)
        np.testing.assert_allclose(out, out2, err_msg=name)
        assert isinstance(st, ik.models.ModelStats), name
    with pytest.raises(TypeError, match=r"return_stats=False.*call contract"):
        class Bad(ik.models.AbstractImplicitModel):
            def __call__(self, x, *, key=None, inference=False, return_stats=True,
                         probe=None):
                return x
    with pytest.raises(TypeError, match=r"probe=None"):
        class Short(ik.models.AbstractImplicitModel):
            def __call__(self, x, *, key=None, inference=False, return_stats=False):
                return x
    assert issubclass(ik.models.MonotoneDBM, ik.models.AbstractImplicitModel)
    assert issubclass(ik.models.ImageClassifier, ik.models.AbstractImplicitModel)


def test_with_solver_sets_every_model_s_solver_and_keeps_its_arrays():
    """`model.with_solver(...)`: the evaluation-time settings reach the solve (a cap of
    one step stops every model after one step; tighter tolerances take more steps), and
    every array of the model is the same object."""
    x = jnp.linspace(-0.5, 0.5, 4)
    models = _models()
    models["classifier"] = ik.models.ImageClassifier.build(
        ik.models.DEQ(ik.nn.ConvCell(4, groups=2, key=jr.key(5)), (4, 2, 2),
                      ik.Picard(rtol=1e-4, atol=1e-4)),
        in_channels=1, classes=3, hidden=4, final=8, groups=2, key=jr.key(6))
    images = {"classifier": jnp.linspace(-1, 1, 16).reshape(1, 4, 4)}
    for name, model in models.items():
        xin = images.get(name, x)
        steps = int(model(xin, return_stats=True)[1].num_steps)
        capped = model.with_solver(max_steps=1)
        tight = model.with_solver(rtol=1e-12, atol=1e-12)
        for new in (capped, tight):
            old_leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
            new_leaves = jax.tree_util.tree_leaves(eqx.filter(new, eqx.is_array))
            assert len(old_leaves) == len(new_leaves) and all(
                a is b for a, b in zip(old_leaves, new_leaves)), name
        st = capped(xin, return_stats=True)[1]
        assert int(st.num_steps) == 1 and st.result != ik.RESULTS.successful, name
        assert int(tight(xin, return_stats=True)[1].num_steps) > steps, name
    hop = ik.models.HopfieldLayer(beta=2.0)
    patterns = jnp.eye(4)[:, :3]
    assert int(hop.with_solver(max_steps=1)(x, patterns, return_stats=True)[1].num_steps) == 1
    assert hop.with_solver(rtol=1e-3).solver == ik.Picard(rtol=1e-3, atol=1e-8)
    cnf = ik.models.CNF(ik.nn.MLPField(2, 8, key=jr.key(7)))
    assert cnf.with_solver(rtol=1e-7).ode.rtol == 1e-7
    cell = ik.nn.MLPCell(4, 4, key=jr.key(0))
    # tolerances reach a wrapped solver (BestSoFar) and a splitting's own solver
    wrapped = ik.models.DEQ(cell, (4,), ik.BestSoFar(ik.Anderson())).with_solver(rtol=1e-3)
    assert wrapped.solver == ik.BestSoFar(ik.Anderson(rtol=1e-3))
    split = ik.models.MonotoneDEQ.dense(4, 4, key=jr.key(0), solver=ik.models.PeacemanRachford(
        solver=ik.Halpern())).with_solver(atol=1e-9)
    assert split.solver.atol == 1e-9 and split.solver.solver.atol == 1e-9
    # and each solver of a Fallback (each stops by its own test)
    fb = ik.models.DEQ(cell, (4,), ik.Fallback(ik.Picard(), ik.Anderson())).with_solver(
        rtol=1e-3, atol=1e-4)
    assert [(s.rtol, s.atol) for s in fb.solver.solvers] == [(1e-3, 1e-4)] * 2
    assert (fb.solver.rtol, fb.solver.atol) == (1e-3, 1e-4)
    # bad tolerances are refused, not stored
    with pytest.raises(ValueError, match=r"with_solver\(rtol=...\)"):
        ik.models.DEQ(cell, (4,)).with_solver(rtol=-1.0)
    with pytest.raises(ValueError, match=r"with_solver\(atol=...\)"):
        models["node"].with_solver(atol=float("nan"))
    with pytest.raises(TypeError, match=r"DEQ.with_solver takes .*'foo'"):
        ik.models.DEQ(cell, (4,)).with_solver(foo=1)
    with pytest.raises(TypeError, match=r"NeuralODE.with_solver takes the fields"):
        models["node"].with_solver(throw=True)
    with pytest.raises(ValueError, match="max_steps"):
        ik.models.DEQ(cell, (4,)).with_solver(max_steps=0)
    with pytest.raises(ValueError, match="ode.adjoint"):  # refused as at construction
        models["homoode_exact"].with_solver(adjoint=dfx.BacksolveAdjoint())
    with pytest.raises(TypeError, match="has no `rtol`/`atol`"):
        ik.models.DEQ(cell, (4,), _NoTol()).with_solver(rtol=1e-3)


def test_a_model_called_outside_jit_compiles_its_solve_once(caplog):
    """Called eagerly (a notebook, an evaluation loop without `jit`), a model compiles
    its solve on the first call only: the function handed to the solve is the same
    object every call (a fresh lambda per call was a new static argument of the jitted
    solve, recompiled on every call)."""
    import logging

    # (the augmented and learned-field ODE models call the Neural ODE's `ODESolve`)
    models = {k: v for k, v in _models().items() if k not in ("anode", "homoode")}
    models["hopfield"] = ik.models.HopfieldLayer(beta=2.0)
    models["mondbm"] = ik.models.MonotoneDBM.image((4, 4), bins=3, hidden=4, group=2,
                                                   key=jr.key(0))
    inputs = {"hopfield": lambda i: (jnp.linspace(-1, 1, 4) * i, jnp.eye(4)[:, :3]),
              "mondbm": lambda i: (jnp.full((4, 4), 0.1 * i),)}
    for name, model in models.items():
        args = inputs.get(name, lambda i: (jnp.linspace(-0.5, 0.5, 4) * i,))
        key = jr.key(0) if name == "mondbm" else None
        call = (lambda a: model(*a, key=key)) if name == "mondbm" else (lambda a: model(*a))
        jax.block_until_ready(call(args(1.0)))
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            for i in (2.0, 3.0):
                jax.block_until_ready(call(args(i)))
        compiled = [r.getMessage()[:60] for r in caplog.records
                    if r.getMessage().startswith("Compiling")]
        assert not compiled, (name, compiled)


class _NoTol(eqx.Module):
    """A stand-in solver without tolerances."""


def test_homoode_exact_honours_its_ode_or_refuses_it():
    cell = ik.nn.MLPCell(4, 4, norm="spectral", spectral_scale=0.5, key=jr.key(0))
    x = jnp.linspace(-0.5, 0.5, 4)
    loose = ik.models.HomoODE(cell, (4,), field="exact", ode=ik.models.ODESolve(
        rtol=1e-2, atol=1e-2))
    tight = ik.models.HomoODE(cell, (4,), field="exact", ode=ik.models.ODESolve(
        rtol=1e-8, atol=1e-8))
    euler = ik.models.HomoODE(cell, (4,), field="exact", ode=ik.models.ODESolve(
        solver=dfx.Euler(), stepsize_controller=dfx.ConstantStepSize(), dt0=0.1))
    st_l, st_t, st_e = (m(x, return_stats=True)[1] for m in (loose, tight, euler))
    assert int(st_t.num_steps) > int(st_l.num_steps)  # the tolerances are used
    # Euler with dt = 0.1 takes 10 steps of one evaluation each, plus fn at the end point.
    assert int(st_e.num_steps) == 10 and int(st_e.nfe) == 11
    with pytest.raises(ValueError, match="ode.adjoint"):
        ik.models.HomoODE(cell, (4,), field="exact", ode=ik.models.ODESolve(
            adjoint=dfx.BacksolveAdjoint()))
    with pytest.raises(ValueError, match="error_penalty"):
        ik.models.HomoODE(cell, (4,), field="exact", ode=ik.models.ODESolve(
            error_penalty=True))


def test_backward_stats_are_named():
    fn, a = _contraction()
    probe = ik.backward_probe()

    def loss(a, probe):
        return jnp.sum(ik.fixed_point(fn, jnp.zeros(5), a, probe=probe).value)

    pg = jax.grad(loss, argnums=1)(a, probe)
    bs = ik.backward_stats(pg)
    assert isinstance(bs, ik.BackwardStats)
    assert float(bs.num_steps) > 0 and float(bs.num_failed) == 0
    with pytest.raises(ValueError, match="probe_grad"):
        ik.backward_stats(jnp.zeros(2))


# ---------------------------------------------------------------------------------------
# The default backward solve


def _pytree_problem():
    """A non-symmetric contraction (rate 0.8) on a pytree of 15 numbers."""
    k = jr.split(jr.key(3), 4)
    n = 15
    M = jr.normal(k[0], (n, n))
    M = 0.8 * M / jnp.max(jnp.abs(jnp.linalg.eigvals(M)))  # non-symmetric, rho = 0.8
    U = jr.normal(k[1], (n, 3))

    def fn(y, theta):
        flat = jnp.concatenate([y["a"].ravel(), y["b"]])
        out = M @ jnp.tanh(flat) + U @ theta
        return {"a": out[:10].reshape(2, 5), "b": out[10:]}

    y0 = {"a": jnp.zeros((2, 5)), "b": jnp.zeros(5)}
    return fn, y0, jr.normal(k[2], (3,)), jr.normal(k[3], (n,))


def test_default_adjoint_follows_a_tight_forward_solve():
    fn, y0, theta, w = _pytree_problem()
    solver = ik.Anderson(rtol=1e-10, atol=1e-12)

    def loss(theta):
        y = ik.fixed_point(fn, y0, theta, solver, max_steps=2000).value
        return jnp.vdot(w, jnp.concatenate([y["a"].ravel(), y["b"]]))

    g = jax.grad(loss)(theta)
    # Against the dense IFT gradient at a tight equilibrium: as accurate as the forward
    # solve (measured 1.6e-11 relative; 3.8e-7 with the solver at 1e-6).
    ys = ik.fixed_point(fn, y0, theta, ik.NewtonKrylov(rtol=1e-14, atol=1e-15)).value
    flat, unravel = jax.flatten_util.ravel_pytree(ys)
    F = lambda f, t: jax.flatten_util.ravel_pytree(fn(unravel(f), t))[0]
    J, Jt = jax.jacfwd(F, argnums=(0, 1))(flat, theta)
    exact = w @ jnp.linalg.solve(jnp.eye(J.shape[0]) - J, Jt)
    assert float(jnp.max(jnp.abs(g - exact)) / jnp.max(jnp.abs(exact))) < 1e-9
    eps = 1e-5
    fd = jnp.array([(loss(theta + eps * e) - loss(theta - eps * e)) / (2 * eps)
                    for e in jnp.eye(3)])
    assert float(jnp.max(jnp.abs(g - fd))) < 1e-6 * max(1.0, float(jnp.max(jnp.abs(fd))))
    # The adjoint's tolerances came from the solver's: a fixed 1e-6 would miss this.
    resolved = ik.ImplicitAdjoint().with_defaults((1e-10, 1e-12), jnp.float64,
                                                  "fixed_point", frozenset())
    assert resolved.linear_solver.rtol == 1e-10
    f32 = ik.ImplicitAdjoint().with_defaults((1e-10, 1e-12), jnp.float32, "fixed_point",
                                             frozenset())
    assert f32.linear_solver.rtol >= 10 * float(jnp.finfo(jnp.float32).eps)


@pytest.mark.parametrize("name", ["picard", "anderson", "gmres", "bicgstab"])
def test_a_named_backward_solver_follows_the_forward_tolerance(name):
    # `ImplicitAdjoint("gmres")` etc.: the tolerances follow the forward solve's (and
    # the dtype) whatever the solver, unless given on the adjoint; exact gradients.
    resolved = ik.ImplicitAdjoint(name).with_defaults((1e-10, 1e-12), jnp.float64,
                                                      "fixed_point", frozenset())
    assert (resolved.linear_solver.rtol, resolved.linear_solver.atol) == (1e-10, 1e-12)
    given = ik.ImplicitAdjoint(name, rtol=1e-7, atol=1e-9).with_defaults(
        (1e-10, 1e-12), jnp.float64, "fixed_point", frozenset())
    assert (given.linear_solver.rtol, given.linear_solver.atol) == (1e-7, 1e-9)
    f32 = ik.ImplicitAdjoint(name).with_defaults((1e-10, 1e-12), jnp.float32,
                                                 "fixed_point", frozenset())
    assert f32.linear_solver.rtol >= 10 * float(jnp.finfo(jnp.float32).eps)
    # z = A z + x: dL/dx = (I - A)^{-T} w, at the forward solve's tolerance 1e-11.
    A = 0.4 * jr.normal(jr.key(3), (5, 5)) / jnp.sqrt(5.0)
    w = jnp.arange(1.0, 6.0)
    solver = ik.Anderson(rtol=1e-11, atol=1e-13)
    g = jax.grad(lambda x: jnp.vdot(w, ik.fixed_point(
        lambda z, x: A @ z + x, jnp.zeros(5), x, solver, max_steps=500,
        adjoint=ik.ImplicitAdjoint(name)).value))(jnp.ones(5))
    exact = jnp.linalg.solve((jnp.eye(5) - A).T, w)
    assert float(jnp.max(jnp.abs(g - exact))) < 1e-9 * float(jnp.max(jnp.abs(exact)))


def test_backward_tolerances_are_given_once():
    with pytest.raises(ValueError, match=r"ImplicitAdjoint\(rtol=..., atol=...\).*GMRES"):
        ik.ImplicitAdjoint(lx.GMRES(rtol=1e-6, atol=1e-6), rtol=1e-8)
    with pytest.raises(ValueError, match="'picard', 'anderson', 'gmres'"):
        ik.ImplicitAdjoint("lu")
    # A solver object keeps its own settings.
    own = ik.Picard(rtol=1e-4, atol=1e-4)
    assert ik.ImplicitAdjoint(own).with_defaults(
        (1e-10, 1e-12), jnp.float64, "fixed_point", frozenset()).linear_solver is own


def test_default_adjoint_solves_where_fixed_point_iteration_cannot():
    # jaxopt's anderson_test problem x = cos(x) + theta at theta = [0, pi/2]: the Jacobian
    # at the solution has the eigenvalue -1 (the second component sits at x = pi/2,
    # where -sin(x) = -1), so iteration on the adjoint oscillates, yet I - J is
    # invertible: the gradient is diag(1 / (1 + sin(x*))).
    theta = jnp.array([0.0, jnp.pi / 2])
    fn = lambda x, t: jnp.cos(x) + t
    x_star = ik.fixed_point(fn, jnp.array([0.7, 1.5]), theta,
                            ik.NewtonKrylov(rtol=1e-12, atol=1e-14)).value
    exact = jnp.diag(1.0 / (1.0 + jnp.sin(x_star)))
    jac = jax.jacrev(lambda t: ik.fixed_point(
        fn, jnp.array([0.7, 1.5]), t, ik.NewtonKrylov(rtol=1e-12, atol=1e-14)).value)(theta)
    np.testing.assert_allclose(jac, exact, rtol=1e-8, atol=1e-10)
    # Fixed-point iteration alone fails loudly there.
    picard_only = ik.ImplicitAdjoint(ik.Picard(rtol=1e-10, atol=1e-12), max_steps=500)
    with pytest.raises(Exception, match="backward"):
        jax.block_until_ready(jax.jacrev(lambda t: ik.fixed_point(
            fn, jnp.array([0.7, 1.5]), t, ik.NewtonKrylov(rtol=1e-12, atol=1e-14),
            adjoint=picard_only).value)(theta))


def test_default_adjoint_uses_the_krylov_fallback_only_where_needed():
    # Under vmap one sample needs GMRES (eigenvalue -1), the other does not; both exact,
    # and the probe shows the contractive sample's backward cost is Picard's alone.
    fn = lambda x, t: jnp.cos(x) + t
    thetas = jnp.array([[0.0, jnp.pi / 2], [0.0, 0.0]])

    def solve(t, probe):
        return ik.fixed_point(fn, jnp.array([0.7, 1.5]), t,
                              ik.NewtonKrylov(rtol=1e-12, atol=1e-14), probe=probe).value

    for t in thetas:
        x = solve(t, None)
        g = jax.grad(lambda t: jnp.sum(solve(t, None)))(t)
        np.testing.assert_allclose(g, 1.0 / (1.0 + jnp.sin(x)), rtol=1e-8)
    g = jax.vmap(jax.grad(lambda t: jnp.sum(solve(t, None))))(thetas)
    xs = jax.vmap(lambda t: solve(t, None))(thetas)
    np.testing.assert_allclose(g, 1.0 / (1.0 + jnp.sin(xs)), rtol=1e-8)


# ---------------------------------------------------------------------------------------
# Interoperability: implicit_kit solvers inside optimistix; Python scalars everywhere

TOL = dict(rtol=1e-6, atol=1e-6)
OPTX_SOLVERS = {
    "picard": ik.Picard(**TOL),
    "anderson": ik.Anderson(**TOL),
    "broyden": ik.Broyden(**TOL),
    "newton_krylov": ik.NewtonKrylov(**TOL),
    "fallback": ik.Fallback(ik.Picard(**TOL), ik.NewtonKrylov(**TOL), max_steps=50),
}
FAST = ("nn",)


def _params():
    out = []
    for name, *_ in problems():
        marks = () if name in FAST else (pytest.mark.slow,)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("problem", _params())
def test_every_solver_inside_optimistix_on_its_own_problems(problem):
    (fn, init, args), = [p[1:] for p in problems() if p[0] == problem]

    def residual(y):
        return float(optx.two_norm(jtu.tree_map(jnp.subtract, fn(y, args), y)))

    for name, solver in OPTX_SOLVERS.items():
        sol = optx.fixed_point(fn, solver, init, args, max_steps=10_000, throw=False)
        assert sol.result == optx.RESULTS.successful, name
        # optimistix's own check (tests/test_fixed_point.py): fn(y*) = y* to 1e-4.
        assert residual(sol.value) < 1e-4, name
    # Root finders in optimistix's root_find too.
    g = lambda y, a: jtu.tree_map(jnp.subtract, fn(y, a), y)
    sol = optx.root_find(g, ik.NewtonKrylov(**TOL), init, args, max_steps=1000,
                         throw=False)
    assert sol.result == optx.RESULTS.successful and residual(sol.value) < 1e-4


def test_halpern_and_homotopy_inside_optimistix():
    (fn, init, args), = [p[1:] for p in problems() if p[0] == "cos"]
    for solver, steps in ((ik.Halpern(rtol=1e-4, atol=1e-5), 100_000),
                          (ik.HomotopySolver(rtol=1e-6, atol=1e-6), 5)):
        sol = optx.fixed_point(fn, solver, init, args, max_steps=steps, throw=False)
        assert sol.result == optx.RESULTS.successful, type(solver).__name__
        r = optx.two_norm(jtu.tree_map(jnp.subtract, fn(sol.value, args), sol.value))
        assert float(r) < 1e-3
    # Failures come back as optimistix's codes there.
    sol = optx.fixed_point(lambda y, a: 2 * y + 1, ik.Picard(), jnp.ones(3), max_steps=10,
                           throw=False)
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached


ADJOINTS = {
    "implicit": ik.ImplicitAdjoint(),
    "implicit_jvp": ik.ImplicitJVPAdjoint(),
    "neumann": ik.NeumannAdjoint(60),
    "phantom": ik.PhantomAdjoint(60, damping=1.0),
    "unrolled": ik.UnrolledAdjoint(),
}


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_every_adjoint_accepts_python_scalars(name):
    fn = lambda y, a: 0.5 * jnp.cos(y) + a  # contraction, dy/da = 1 / (1 + 0.5 sin y)

    def solve(a):
        return ik.fixed_point(fn, jnp.zeros(()), a, ik.Picard(rtol=1e-12, atol=1e-14),
                              adjoint=ADJOINTS[name], max_steps=200).value

    y = solve(0.3)
    exact = 1.0 / (1.0 + 0.5 * jnp.sin(y))
    np.testing.assert_allclose(jax.grad(solve)(0.3), exact, rtol=1e-6)
    np.testing.assert_allclose(jax.jacrev(solve)(0.3), exact, rtol=1e-6)
    if name in ("implicit_jvp", "phantom"):  # the modes that support forward mode
        np.testing.assert_allclose(jax.jvp(solve, (0.3,), (1.0,))[1], exact, rtol=1e-6)


def test_custom_root_forward_mode_with_python_scalars():
    @ik.custom_root(lambda y, a: y**3 - a, adjoint=ik.ImplicitJVPAdjoint())
    def cube_root(y0, a):
        return jnp.cbrt(a) + 0 * y0

    exact = 1.0 / (3 * 5.0 ** (2 / 3))
    for x in (5.0, jnp.asarray(5.0)):
        np.testing.assert_allclose(jax.jvp(lambda a: cube_root(1.0, a), (x,), (1.0,))[1],
                                   exact, rtol=1e-10)
        np.testing.assert_allclose(jax.grad(lambda a: cube_root(1.0, a))(x), exact,
                                   rtol=1e-10)
        np.testing.assert_allclose(jax.jacrev(lambda a: cube_root(1.0, a))(x), exact,
                                   rtol=1e-10)


def test_a_solver_may_return_implicit_kit_or_dependency_codes():
    class Strict(ik.Picard):  # a user's solver of the protocol with a code of ours
        def terminate(self, fn, y, args, options, state, tags):
            done, _ = super().terminate(fn, y, args, options, state, tags)
            return done, ik.RESULTS.where(state.residual > 1e3, ik.RESULTS.nonfinite,
                                          ik.RESULTS.successful)

    fn, a = _contraction()
    sol = ik.fixed_point(fn, jnp.zeros(5), a, Strict(rtol=1e-8, atol=1e-10))
    assert sol.result == ik.RESULTS.successful
    sol = ik.fixed_point(lambda y, a: 3 * y + 1, jnp.ones(2), None, Strict(), throw=False)
    assert sol.result == ik.RESULTS.nonfinite
    assert ik._solution.as_results(lx.RESULTS.breakdown) == ik.RESULTS.breakdown


def test_minimise_with_optimistix_counts_its_evaluations():
    calls = []

    def loss(y, a):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sum((y - a) ** 2) + jnp.sum(y**4)

    sol = ik.minimise(loss, jnp.zeros(5), jnp.linspace(-1.0, 1.0, 5))
    jax.block_until_ready(sol.value)
    # One optimistix step evaluates the loss once; plus the residual at the end; plus the
    # implicit adjoint's re-attachment (not part of the solve).
    assert len(calls) - 1 == int(sol.stats["nfe"]) == int(sol.stats["num_steps"]) + 1
