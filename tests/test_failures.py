"""Failures are loud: a gradient through a solve that went non-finite or diverged is NaN
(per sample under vmap, for every adjoint), never zero and never a finite wrong number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_kit as ik


ADJOINTS = {
    "implicit": ik.ImplicitAdjoint(),
    "implicit_jvp": ik.ImplicitJVPAdjoint(),
    "unrolled": ik.UnrolledAdjoint(),
    "phantom": ik.PhantomAdjoint(k=3),
    "jfb": ik.JFBAdjoint(),
    "neumann": ik.NeumannAdjoint(k=4),
}


def _nan_after(z, x):
    # The reproducer: the map is NaN once the iterate leaves a ball, with a zero
    # derivative in that branch (a `jnp.where` masks the derivative there).
    return jnp.where(jnp.abs(z).sum() > 0.25, jnp.nan, 0.9 * z + x)


def _overflow(z, x):
    return 2 * z + x  # Picard diverges to inf


@pytest.mark.parametrize("name", ADJOINTS)
@pytest.mark.parametrize("fn", [_nan_after, _overflow], ids=["nan_after", "overflow"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_reproducers_give_nan_gradients(name, fn, jit):
    x = jnp.array([0.1, -0.2, 0.3])

    def loss(x):
        sol = ik.fixed_point(fn, jnp.zeros(3), x, ik.Picard(), adjoint=ADJOINTS[name],
                             throw=False)
        return sol.value.sum(), sol.result

    grad = jax.grad(loss, has_aux=True)
    if jit:
        grad = jax.jit(grad)
    g, result = grad(x)
    # (float64 reaches max_steps at |z| ~ 1e77 before overflowing: a divergence)
    expected = ik.RESULTS.nonfinite if fn is _nan_after else ik.RESULTS.nonlinear_divergence
    assert result == expected, ik.RESULTS[result]
    assert np.all(np.isnan(np.asarray(g))), g


@pytest.mark.parametrize("name", ADJOINTS)
def test_throw_true_raises_on_the_reproducer(name):
    x = jnp.array([0.1, -0.2, 0.3])
    with pytest.raises(Exception, match="[Nn]on-?finite"):
        jax.grad(lambda x: ik.fixed_point(_nan_after, jnp.zeros(3), x, ik.Picard(),
                                          adjoint=ADJOINTS[name]).value.sum())(x)


def _sample_loss(adjoint):
    # z = w z + x, while |z|_1 <= 3: the fixed point x / (1 - w); a sample whose fixed
    # point lies outside the ball fails with a non-finite value.
    def fn(z, args):
        x, w = args
        return jnp.where(jnp.abs(z).sum() > 3.0, jnp.nan, w * z + x)

    def loss(x, w):
        sol = ik.fixed_point(fn, jnp.zeros_like(x), (x, w), ik.Picard(rtol=1e-12,
                             atol=1e-12), adjoint=adjoint, max_steps=400, throw=False)
        return jnp.sum(sol.value), sol.result

    return loss


@pytest.mark.parametrize("name", ADJOINTS)
def test_vmap_one_failing_sample_among_good_ones(name):
    adjoint = ADJOINTS[name]
    loss = _sample_loss(adjoint)
    xs = jnp.array([[0.1, 0.2], [2.0, 2.0], [-0.3, 0.1]])  # the middle sample fails
    w = jnp.array(0.5)
    grads, results = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1), has_aux=True),
                                      in_axes=(0, None)))(xs, w)
    failed = np.asarray(results != ik.RESULTS.successful)
    assert failed.tolist() == [False, True, False]
    gx, gw = map(np.asarray, grads)
    assert np.all(np.isnan(gx[1])) and np.isnan(gw[1])
    # The good samples' gradients are what they are without the failing sample beside
    # them (the same adjoint on the sample alone).
    for i in (0, 2):
        (ex, ew), _ = jax.grad(loss, argnums=(0, 1), has_aux=True)(xs[i], w)
        np.testing.assert_allclose(gx[i], ex, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(gw[i], ew, rtol=1e-12, atol=1e-14)
    if name in ("implicit", "implicit_jvp", "unrolled"):
        # exact: d sum(x / (1 - w)) / dx = 1 / (1 - w), / dw = sum(x) / (1 - w)^2
        for i in (0, 2):
            np.testing.assert_allclose(gx[i], 1 / (1 - w), rtol=1e-9)
            np.testing.assert_allclose(gw[i], np.sum(xs[i]) / (1 - w) ** 2, rtol=1e-9)
    # The batch's gradient (the mean over the samples) is NaN: a train step skips it.
    batch = jax.grad(lambda xs, w: jnp.mean(jax.vmap(lambda x: loss(x, w)[0])(xs)),
                     argnums=1)(xs, w)
    assert np.isnan(batch)


@pytest.mark.parametrize("name", ["implicit", "unrolled"])
def test_overflow_in_float32_is_nonfinite_with_nan_gradient(name):
    x = jnp.array([0.1, -0.2, 0.3], jnp.float32)
    g, result = jax.grad(lambda x: (lambda s: (s.value.sum(), s.result))(ik.fixed_point(
        _overflow, jnp.zeros(3, jnp.float32), x, ik.Picard(), adjoint=ADJOINTS[name],
        throw=False)), has_aux=True)(x)
    assert result == ik.RESULTS.nonfinite
    assert np.all(np.isnan(np.asarray(g)))


def test_max_steps_reached_gradient_is_finite_and_flagged():
    # The documented policy: a solve that stops at `max_steps` (a usable approximation)
    # keeps its finite implicit gradient and reports the stop in `result`.
    x = jnp.array([0.1, -0.2, 0.3])
    f = lambda z, x: 0.9 * z + x

    def loss(x):
        sol = ik.fixed_point(f, jnp.zeros(3), x, ik.Picard(), max_steps=5, throw=False)
        return sol.value.sum(), sol.result

    g, result = jax.grad(loss, has_aux=True)(x)
    assert result == ik.RESULTS.nonlinear_max_steps_reached
    # the IFT gradient at the iterate, 1/(1 - 0.9), to the backward solve's tolerance
    np.testing.assert_allclose(g, 10.0, rtol=1e-3)


def test_root_find_and_homotopy_failures_give_nan_gradients():
    x = jnp.array([0.1, -0.2, 0.3])
    g = jax.grad(lambda x: ik.root_find(lambda z, x: jnp.where(
        jnp.abs(z).sum() > 0.25, jnp.nan, x - 0.1 * z), jnp.zeros(3), x,
        ik.Picard(), throw=False).value.sum())(x)
    assert np.all(np.isnan(np.asarray(g)))


@pytest.mark.parametrize("make, match", [
    (lambda: ik.Picard(damping=0), r"Picard\(damping=...\)` must be a finite number in \(0, 1\]"),
    (lambda: ik.Picard(damping=1.5), r"Picard\(damping=...\)"),
    (lambda: ik.Anderson(rtol=-1e-3), r"Anderson\(rtol=...\)` must be a number in \[0, inf\]"),
    (lambda: ik.Broyden(atol=float("nan")), r"Broyden\(atol=...\)"),
    (lambda: ik.Picard(rtol=-float("inf")), r"Picard\(rtol=...\)"),
    (lambda: ik.PhantomAdjoint(damping=0.0), r"PhantomAdjoint\(damping=...\)"),
    (lambda: ik.NeumannAdjoint(k=-1), r"NeumannAdjoint\(k=...\)"),
    (lambda: ik.ImplicitAdjoint(atol=-1.0), r"ImplicitAdjoint\(atol=...\)"),
    (lambda: ik.ImplicitAdjoint(max_steps=0), r"ImplicitAdjoint\(max_steps=...\)"),
])
def test_solver_and_adjoint_hyperparameters_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_infinite_tolerance_means_accept_any_iterate():
    # `rtol=inf` is a legitimate setting (take the first iterate), not an error.
    # The backward solve does not inherit "accept anything": it still solves
    # (I - 0.5)^T u = 1 to the precision floor, so d(sum z*)/dx = 2 (an accept-anything
    # backward solve would stop at its first iterate, 1).
    def f(x):
        sol = ik.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros(2), x,
                             ik.Picard(rtol=float("inf")), max_steps=50)
        return sol.value.sum(), sol

    (_, sol), g = jax.value_and_grad(f, has_aux=True)(jnp.ones(2))
    assert int(sol.stats["num_steps"]) <= 2 and sol.result == ik.RESULTS.successful
    np.testing.assert_allclose(g, 2.0, rtol=1e-6)


@pytest.mark.parametrize("max_steps", [0, -5, 2.5, 2**31, True])
def test_max_steps_is_validated(max_steps):
    with pytest.raises(ValueError, match=r"`max_steps` must be None or an integer in "
                       r"\[1, 2\*\*31 - 1\]"):
        ik.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros(2), jnp.ones(2), ik.Picard(),
                       max_steps=max_steps)


# ------------------------------------------------------------------- low precision
# float16 and bfloat16: the solve works in float32 (solver state, its linear algebra and
# the backward solve; LAPACK has no half-precision kernels), `fn` still runs in the
# input's dtype. Gradients are compared with the same problem solved in float32, to a
# tolerance of the dtype's rounding (measured errors: float16 <= 1.1e-3, bfloat16 <=
# 9e-3 of the largest entry, as unrolling gets).
_W = 0.15 * jax.random.normal(jax.random.key(0), (6, 6), jnp.float32)
_X = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32)
_RTOL = {"float16": 5e-3, "bfloat16": 3e-2}


def _tanh_map(z, x):
    return jnp.tanh(_W.astype(z.dtype) @ z + x)


def _close(g, ref, dtype):
    g, ref = np.asarray(g, np.float32), np.asarray(ref, np.float32)
    err = np.abs(g - ref).max() / np.abs(ref).max()
    assert err < _RTOL[jnp.dtype(dtype).name], err


def _grad(solve, dtype):
    return jax.grad(lambda x: solve(x).value.astype(jnp.float32).sum())(_X.astype(dtype))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", ADJOINTS)
def test_half_precision_gradients_match_float32(name, dtype):
    """The default adjoint crashed inside jaxlib (`Unsupported dtype float16`, LAPACK)."""
    adjoint = ADJOINTS[name]

    def solve(dt):
        return lambda x: ik.fixed_point(_tanh_map, jnp.zeros(6, dt), x, ik.Picard(),
                                        adjoint=adjoint, throw=False)

    g = _grad(solve(dtype), dtype)
    assert g.dtype == dtype
    _close(g, _grad(solve(jnp.float32), jnp.float32), dtype)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
def test_half_precision_solvers_with_linear_algebra(dtype):
    """Newton-Krylov, optimistix's Newton, `root_find` and `minimise` (BFGS, CG on the
    Hessian) solve and differentiate in half precision (they crashed in LAPACK)."""
    import optimistix as optx

    ref = _grad(lambda x: ik.fixed_point(_tanh_map, jnp.zeros(6), x, ik.Picard()),
                jnp.float32)
    for solver in (ik.NewtonKrylov(), optx.Newton(rtol=1e-3, atol=1e-3)):
        sol = ik.fixed_point(_tanh_map, jnp.zeros(6, dtype), _X.astype(dtype), solver)
        assert sol.result == ik.RESULTS.successful and sol.value.dtype == dtype
        _close(_grad(lambda x: ik.fixed_point(_tanh_map, jnp.zeros(6, dtype), x, solver),
                     dtype), ref, dtype)
    _close(_grad(lambda x: ik.root_find(lambda z, x: _tanh_map(z, x) - z,
                                        jnp.zeros(6, dtype), x), dtype), ref, dtype)
    # a strictly convex, coupled loss: argmin solves (I + W^T W) y = x
    H = jnp.eye(6) + _W.T @ _W

    def loss(y, x):
        return 0.5 * y @ (H.astype(y.dtype) @ y) - x @ y

    def argmin(dt):
        return lambda x: ik.minimise(loss, jnp.zeros(6, dt), x)

    _close(_grad(argmin(dtype), dtype), jnp.linalg.solve(H, jnp.ones(6)), dtype)


def test_mixed_dtype_pytree_gradients_match_float32():
    """A `y0` mixing float32 and float16 failed the default and `ImplicitJVPAdjoint`
    gradients (`Closure-converted function called with different dynamic arguments`)."""
    def f(z, x):
        return {"a": jnp.tanh(0.5 * z["a"] + 0.2 * z["b"].astype(jnp.float32) + x),
                "b": jnp.tanh(0.5 * z["b"] + x.astype(z["b"].dtype))}

    def grad(adjoint, low):
        y0 = {"a": jnp.zeros(6, jnp.float32), "b": jnp.zeros(6, low)}
        return jax.grad(lambda x: sum(
            v.astype(jnp.float32).sum() for v in ik.fixed_point(
                f, y0, x, ik.Picard(), adjoint=adjoint).value.values()))(_X)

    ref = grad(ik.ImplicitAdjoint(), jnp.float32)
    for adjoint in (ik.ImplicitAdjoint(), ik.ImplicitJVPAdjoint(), ik.UnrolledAdjoint()):
        _close(grad(adjoint, jnp.float16), ref, jnp.float16)


def test_homotopy_in_half_precision_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"`homotopy_solve` needs `z0` in float32 or "
                       r"float64, got bfloat16.*Cast `z0`"):
        ik.homotopy_solve(_tanh_map, jnp.zeros(6, jnp.bfloat16), _X.astype(jnp.bfloat16))
