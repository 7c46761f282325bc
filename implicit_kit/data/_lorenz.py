"""Lorenz-63 trajectories, generated locally with diffrax (nothing downloaded)."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


# Sprott, "Chaos and Time-Series Analysis" (2003): the largest Lyapunov exponent of
# Lorenz-63 at the classic parameters (its Lyapunov time is 1/0.906 ≈ 1.104).
LORENZ63_LYAPUNOV = 0.906


def lorenz63_field(t, y, args):
    """`(σ(y − x), x(ρ − z) − y, xy − βz)` with `args = (σ, ρ, β)`, diffrax's
    convention."""
    sigma, rho, beta = args
    x, yy, z = y[0], y[1], y[2]
    return jnp.stack([sigma * (yy - x), x * (rho - z) - yy, x * yy - beta * z])


def lorenz63(num: int, length: int, dt: float = 0.02, *, seed: int = 0,
             burn_in: float = 10.0, sigma: float = 10.0, rho: float = 28.0,
             beta: float = 8.0 / 3.0) -> tuple[np.ndarray, np.ndarray]:
    """`num` trajectories of Lorenz-63, `length` states each `dt` apart, starting on the
    attractor: random starts in `[-15, 15]² × [5, 40]` (from `seed`) run for `burn_in`
    time units first. Returns `(ts (length,), ys (num, length, 3))` as float32 numpy
    arrays. Integrated by Tsit5 at rtol = atol = 1e-9 in float64 where x64 is enabled,
    else at 1e-6 (float32): chaotic, so either is the truth only for a few Lyapunov
    times beyond its rounding — the same for every model scored on it."""
    if num < 1 or length < 2 or not dt > 0:
        raise ValueError(f"`num` ≥ 1, `length` ≥ 2 and `dt` > 0 expected, got {num}, "
                         f"{length}, {dt}.")
    dtype = jnp.result_type(float)
    tol = 1e-9 if dtype == jnp.float64 else 1e-6
    lo, hi = jnp.array([-15.0, -15.0, 5.0]), jnp.array([15.0, 15.0, 40.0])
    y0s = jr.uniform(jr.key(seed), (num, 3), dtype, lo, hi)
    ts = burn_in + dt * jnp.arange(length, dtype=dtype)

    def one(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(lorenz63_field), dfx.Tsit5(), 0.0, ts[-1], dt / 4, y0,
            (sigma, rho, beta), saveat=dfx.SaveAt(ts=ts), max_steps=1_000_000,
            stepsize_controller=dfx.PIDController(rtol=tol, atol=tol)).ys

    ys = jax.jit(jax.vmap(one))(y0s)
    return np.asarray(ts - burn_in, np.float32), np.asarray(ys, np.float32)


def valid_prediction_time(pred, truth, scale, dt: float, *, threshold: float = 0.5,
                          lyapunov: float = LORENZ63_LYAPUNOV) -> float:
    """The valid prediction time in Lyapunov times: `λ · t*`, `t*` the first time at
    which `NRMSE(t) = sqrt(mean_i (ŷ_i(t) − y_i(t))² / σ_i²)` exceeds `threshold`
    (0.5, Vlachas et al. 2020), `σ` = `scale` (the attractor's per-dimension standard
    deviation). `pred`, `truth`: `(length, dim)` from the same start at `t = 0`; a
    forecast that never crosses gets the whole horizon, `λ · dt · length`."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"`pred` and `truth` must have the same (length, dim) shape, got "
                         f"{pred.shape} and {truth.shape}.")
    nrmse = np.sqrt(np.mean((pred - truth) ** 2 / np.asarray(scale) ** 2, axis=1))
    bad = np.flatnonzero(~(nrmse <= threshold))  # NaN counts as a crossing
    steps = len(nrmse) if bad.size == 0 else int(bad[0])
    return float(lyapunov * dt * steps)
