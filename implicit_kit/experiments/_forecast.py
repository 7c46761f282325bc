"""`implicit-kit forecast`: forecasting Lorenz-63 with a Neural ODE trained on short
windows, scored by the valid prediction time against a persistence forecast and an MLP
one-step map rolled out, over seeds."""

import dataclasses
import json
import pathlib
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from .. import models
from ..data import lorenz63, LORENZ63_LYAPUNOV, valid_prediction_time
from ..regularizers import kinetic_jacobian_field
from ..train import ConfigError


@dataclasses.dataclass(frozen=True)
class ForecastSettings:
    """`implicit-kit forecast`: Lorenz-63 (σ=10, ρ=28, β=8/3) generated locally.

    - Data: `train_trajectories` of `train_length` states `dt` apart and
      `test_trajectories` held-out starts (another seed), each run onto the attractor
      first; states normalised by the training data's mean and standard deviation.
    - Neural ODE: an MLP field (`width`, `depth`, tanh) on the normalised state, Tsit5 at
      `rtol`/`atol`, trained on random windows of `window` steps from their first state
      (MSE over the window), `steps` Adam steps of batch `batch` at `lr` (cosine decay);
      `kinetic` and `jacobian` > 0 add the RNODE regularisers along each window (the
      kinetic energy and a Hutchinson estimate of the squared Jacobian Frobenius norm,
      [`implicit_kit.regularizers.kinetic_jacobian_field`][], Finlay et al. 2020).
    - Baselines on the same data: persistence (the start state held), and an MLP one-step
      map `y ← y + MLP(y)` (the same size) trained on one-step pairs for as many steps,
      rolled out.
    - Score: the valid prediction time (Lyapunov times, λ = 0.906) of each test start over
      `horizon` steps at NRMSE `threshold`; mean over starts, then mean ± std over
      `seeds` (each seed: new weights and batches on the same data).
    - `out_dir`: `results.json` and `forecast.png`.
    """

    seeds: int = 3
    train_trajectories: int = 8
    train_length: int = 2500
    test_trajectories: int = 16
    dt: float = 0.02
    window: int = 10
    width: int = 64
    depth: int = 2
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    rtol: float = 1e-5
    atol: float = 1e-5
    kinetic: float = 0.0
    jacobian: float = 0.0
    horizon: int = 750
    threshold: float = 0.5
    data_seed: int = 0
    out_dir: str = "runs/forecast"


@dataclasses.dataclass(frozen=True)
class ForecastConfig:
    """The config of `implicit-kit forecast` (see `ForecastSettings`)."""

    name: str
    forecast: ForecastSettings = dataclasses.field(default_factory=ForecastSettings)

    def to_dict(self) -> dict:
        """The config as nested plain dicts."""
        return dataclasses.asdict(self)


def check_forecast_config(cfg: ForecastConfig) -> None:
    """Name the first out-of-range setting."""
    f = cfg.forecast
    positive = ("seeds", "train_trajectories", "test_trajectories", "width", "depth",
                "steps", "batch", "horizon")
    for key in positive:
        if getattr(f, key) < 1:
            raise ConfigError(f"forecast.{key} must be ≥ 1, got {getattr(f, key)}.")
    if f.window < 2 or f.window >= f.train_length:
        raise ConfigError(f"forecast.window must be in [2, train_length), got {f.window}.")
    for key in ("dt", "lr", "rtol", "atol", "threshold"):
        if not getattr(f, key) > 0:
            raise ConfigError(f"forecast.{key} must be > 0, got {getattr(f, key)}.")
    for key in ("kinetic", "jacobian"):
        if getattr(f, key) < 0:
            raise ConfigError(f"forecast.{key} must be ≥ 0, got {getattr(f, key)}.")


class _Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, z, args):
        return self.mlp(z)


def _mlp(width, depth, key):
    return eqx.nn.MLP(3, 3, width, depth, activation=jnp.tanh, key=key)


def run_forecast(cfg: ForecastConfig, *, log=print) -> dict:
    """Run the experiment of a `ForecastConfig`; write `results.json` and
    `forecast.png` to `cfg.forecast.out_dir` and return the results."""
    check_forecast_config(cfg)
    f = cfg.forecast
    t_start = time.perf_counter()
    _, train = lorenz63(f.train_trajectories, f.train_length, f.dt, seed=f.data_seed)
    _, test = lorenz63(f.test_trajectories, f.horizon, f.dt, seed=f.data_seed + 1)
    mean, std = train.reshape(-1, 3).mean(0), train.reshape(-1, 3).std(0)
    dtype = jnp.result_type(float)  # the weights' dtype (float64 under x64)
    norm = jnp.asarray((train - mean) / std, dtype)
    test_n = np.asarray((test - mean) / std, dtype)
    ts_window = f.dt * jnp.arange(f.window, dtype=norm.dtype)
    ts_test = f.dt * jnp.arange(f.horizon, dtype=norm.dtype)
    ode = models.ODESolve(dfx.Tsit5(), rtol=f.rtol, atol=f.atol)
    schedule = optax.cosine_decay_schedule(f.lr, f.steps)
    opt = optax.adam(schedule)
    log(f"== {cfg.name}: Lorenz-63, {f.train_trajectories}×{f.train_length} training "
        f"states (dt {f.dt}), windows of {f.window}, {f.steps} steps, {f.seeds} seeds, "
        f"{f.test_trajectories} held-out starts over {f.horizon} steps")

    def windows(key):
        k1, k2 = jr.split(key)
        i = jr.randint(k1, (f.batch,), 0, f.train_trajectories)
        j = jr.randint(k2, (f.batch,), 0, f.train_length - f.window)
        idx = j[:, None] + jnp.arange(f.window)
        return norm[i[:, None], idx]

    regularised = f.kinetic > 0 or f.jacobian > 0

    def node_loss(model, w, key):
        def one(y, k):
            if not regularised:
                return jnp.mean((model(y[0], ts_window) - y) ** 2)
            eps = jr.normal(k, y[0].shape, y.dtype) if f.jacobian > 0 else None
            field = kinetic_jacobian_field(lambda t, z, a: model.field(z, a), eps)
            node = models.NeuralODE(dfx.ODETerm(field), model.ode)
            zero = jnp.zeros((), y.dtype)
            pred, kin, jac = node((y[0], zero, zero), ts_window)
            return (jnp.mean((pred - y) ** 2) + f.kinetic * kin[-1]
                    + f.jacobian * jac[-1])
        return jnp.mean(jax.vmap(one)(w, jr.split(key, w.shape[0])))

    def map_loss(mlp, w, key):
        pred = jax.vmap(lambda z: z + mlp(z))(w[:, :-1].reshape(-1, 3))
        return jnp.mean((pred - w[:, 1:].reshape(-1, 3)) ** 2)

    def train_model(model, loss, key):
        params = eqx.filter(model, eqx.is_inexact_array)

        @eqx.filter_jit
        def step(model, state, key):
            value, g = eqx.filter_value_and_grad(loss)(model, windows(key),
                                                       jr.fold_in(key, 1))
            updates, state = opt.update(g, state, eqx.filter(model, eqx.is_inexact_array))
            return eqx.apply_updates(model, updates), state, value

        state = opt.init(params)
        for k in jr.split(key, f.steps):
            model, state, value = step(model, state, k)
        return model, float(value)

    def scores(pred_n):
        return [valid_prediction_time(p * std + mean, t, std, f.dt, threshold=f.threshold)
                for p, t in zip(np.asarray(pred_n), test)]

    per_seed, example = [], None
    for seed in range(f.seeds):
        k_node, k_map, k_train, k_map_train = jr.split(jr.key(seed), 4)
        node = models.NeuralODE(_Field(_mlp(f.width, f.depth, k_node)), ode)
        node, node_final = train_model(node, node_loss, k_train)
        mlp, map_final = train_model(_mlp(f.width, f.depth, k_map), map_loss, k_map_train)
        starts = jnp.asarray(test_n[:, 0])
        node_pred, stats = jax.jit(jax.vmap(
            lambda y0: node(y0, ts_test, return_stats=True)))(starts)

        def rollout(z):
            def body(z, _):
                return z + mlp(z), z
            return jax.lax.scan(body, z, None, length=f.horizon)[1]

        map_pred = jax.jit(jax.vmap(rollout))(starts)
        persist = np.repeat(test_n[:, :1], f.horizon, axis=1)
        # The trained field's kinetic energy mean ‖f(z)‖²/3 over the training states
        # (what `kinetic` penalises).
        kinetic = float(jnp.mean(jax.vmap(lambda z: node.field(z, None))(
            norm.reshape(-1, 3)) ** 2))
        row = {"seed": seed, "node_train_loss": node_final, "map_train_loss": map_final,
               "field_kinetic": kinetic,
               "node_forecast_failures": int(jnp.sum(stats.failed()))}
        for name, pred in (("neural_ode", node_pred), ("mlp_map", map_pred),
                           ("persistence", persist)):
            v = scores(pred)
            row[name] = float(np.mean(v))
        per_seed.append(row)
        log(f"seed {seed}: VPT (Lyapunov times) Neural ODE {row['neural_ode']:.2f}, "
            f"MLP map {row['mlp_map']:.2f}, persistence {row['persistence']:.2f}")
        if seed == 0:
            example = (np.asarray(node_pred[0]) * std + mean,
                       np.asarray(map_pred[0]) * std + mean, test[0])
    summary = {name: {"mean": float(np.mean([r[name] for r in per_seed])),
                      "std": float(np.std([r[name] for r in per_seed]))}
               for name in ("neural_ode", "mlp_map", "persistence")}
    out = {"config": cfg.to_dict(), "lyapunov": LORENZ63_LYAPUNOV, "seeds": per_seed,
           "summary": summary, "seconds": time.perf_counter() - t_start}
    d = pathlib.Path(f.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "results.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(d / "results.json")
    _plot(example, f, d / "forecast.png")
    log(" | ".join(f"{k} {v['mean']:.2f} ± {v['std']:.2f}" for k, v in summary.items())
        + f" Lyapunov times; results in {d.resolve()}")
    return out


def _plot(example, f: ForecastSettings, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    node, mlp, truth = example
    lt = LORENZ63_LYAPUNOV * f.dt * np.arange(f.horizon)
    fig, axes = plt.subplots(3, 1, figsize=(8, 6), sharex=True)
    for i, (ax, name) in enumerate(zip(axes, "xyz")):
        ax.plot(lt, truth[:, i], c="k", label="truth")
        ax.plot(lt, node[:, i], c="crimson", ls="--", label="Neural ODE")
        ax.plot(lt, mlp[:, i], c="dodgerblue", ls=":", label="MLP one-step map")
        ax.set_ylabel(name)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("Lyapunov times")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
