"""A QP layer trained end to end through its KKT gradients: OptNet's signal denoising
(Amos & Kolter 2017, §5.2) at this machine's scale (float64).

Piecewise-constant signals of length 30 (3 to 6 jumps) with Gaussian noise (sd 0.3).
The layer is a generalised total-variation denoiser, z(y) = argmin_z 1/2 ||z - y||^2 +
lam ||D z||_1, computed through its dual, a box-constrained QP in u (n - 1 variables):
min_u 1/2 u^T (D D^T + 1e-6 I) u - (D y)^T u s.t. -lam <= u <= lam, z = y - D^T u
(`ik.qp.solve`, OSQP, vmapped over the batch). Trained by Adam on the MSE to the clean
signal (learning rate 1e-2 with cosine decay, batches of 32), the gradient flowing
through the QP's Q, c, l and u into D and log lam.

Arms (test MSE, 3 seeds of data and initialisation):
- the noisy input itself;
- total variation (D the finite differences) with lam chosen on the training set (grid);
- the QP layer with D learned from a random start, and from the differences.

Run: python benchmarks/qp_layer.py [--steps 300] [--seeds 0,1,2] [--json PATH]
"""

import argparse
import json
import pathlib
import time

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import implicit_kit as ik  # noqa: E402


N, NOISE = 30, 0.3


def signals(rng, count):
    clean = np.zeros((count, N))
    for i in range(count):
        cuts = np.sort(rng.choice(np.arange(1, N), rng.integers(3, 7), replace=False))
        levels = rng.normal(size=len(cuts) + 1)
        clean[i] = np.repeat(levels, np.diff(np.concatenate([[0], cuts, [N]])))
    return jnp.asarray(clean), jnp.asarray(clean + NOISE * rng.normal(size=clean.shape))


def differences():
    return jnp.eye(N - 1, N, 1) - jnp.eye(N - 1, N)


def denoise(params, y):
    """The QP layer on one signal."""
    D, log_lam = params
    lam = jnp.exp(log_lam)
    Q = D @ D.T + 1e-6 * jnp.eye(N - 1)
    sol = ik.qp.solve(Q, -(D @ y), l=-lam, u=lam)
    return y - D.T @ sol.value.x


def mse(params, clean, noisy):
    return jnp.mean((jax.vmap(denoise, (None, 0))(params, noisy) - clean) ** 2)


def train(params, data, steps, lr=1e-2, batch=32, seed=0):
    clean, noisy = data
    adam = optax.adam(optax.cosine_decay_schedule(lr, steps))
    state = adam.init(params)

    @jax.jit
    def step(params, state, idx):
        loss, g = jax.value_and_grad(mse)(params, clean[idx], noisy[idx])
        upd, state = adam.update(g, state)
        return optax.apply_updates(params, upd), state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        params, state, _ = step(params, state, rng.choice(len(clean), batch, replace=False))
    return params


def run_seed(seed, steps):
    rng = np.random.default_rng(seed)
    train_data, test_data = signals(rng, 4096), signals(rng, 512)
    evaluate = jax.jit(mse)
    out = dict(seed=seed, noisy=float(jnp.mean((test_data[1] - test_data[0]) ** 2)))
    grid = np.exp(np.linspace(np.log(0.05), np.log(2.0), 15))
    train_mse = [float(evaluate((differences(), jnp.log(g)), *train_data)) for g in grid]
    best = grid[int(np.argmin(train_mse))]
    out["tv_lam"] = float(best)
    out["tv"] = float(evaluate((differences(), jnp.log(best)), *test_data))
    key = jax.random.PRNGKey(seed)
    starts = {"learned_from_random": jax.random.normal(key, (N - 1, N)) / np.sqrt(N),
              "learned_from_differences": differences()}
    for name, D0 in starts.items():
        t0 = time.perf_counter()
        params = train((D0, jnp.log(0.3)), train_data, steps, seed=seed)
        out[name] = float(evaluate(params, *test_data))
        out[name + "_start"] = float(evaluate((D0, jnp.log(0.3)), *test_data))
        out[name + "_seconds"] = time.perf_counter() - t0
        if name == "learned_from_random":
            D = np.asarray(params[0])
            # how much of the learned D is a difference operator: each row's mass on
            # two adjacent entries of opposite sign
            out["rows_like_differences"] = float(np.mean(
                [np.sort(np.abs(r))[-2:].sum() / np.abs(r).sum() for r in D]))
    print(out, flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", type=pathlib.Path)
    a = parser.parse_args()
    t0 = time.perf_counter()
    rows = [run_seed(int(s), a.steps) for s in a.seeds.split(",")]
    out = dict(steps=a.steps, n=N, noise=NOISE, seeds=rows, seconds=time.perf_counter() - t0)
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
