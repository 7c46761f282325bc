"""TorchDEQ's own recipe, built in implicit_kit and run by TorchDEQ on the same data.

The recipe is TorchDEQ's get-started DEQ with `add_deq_args` defaults (torchdeq
`docs/get_started.md`, `torchdeq/utils/arg_utils.py`): a convolutional injection, a
weight-normed cell (`apply_norm`, learned scale), `get_deq()`: fixed-point iteration to
an absolute residual of 1e-3 with at most 40 steps, returning each sample's
lowest-residual iterate (`torchdeq/solver/fp_iter.py`), and the phantom gradient of one
undamped step (`grad=1`, `tau=1.0`). The same network on both sides, on the digits
(8x8, the configs' 1,437 / 360 split, normalised): injection Conv3x3(1->16); cell
`GN(conv2(ReLU(GN(conv1 z)) + u))` with weight-normed 3x3 convolutions (implicit_kit's
`ik.nn.ConvCell(residual=False)`); head: mean over space, Linear(16->10). Adam 1e-3,
batch 64, zeros start.

In implicit_kit: `ik.models.DEQ(cell, (16, 8, 8), ik.BestSoFar(ik.Picard(rtol=0,
atol=1e-3)), ik.PhantomAdjoint(k=1, damping=1.0), max_steps=40)`. Per sample stopping
(TorchDEQ stops a batch when its largest residual is below the tolerance).

Reported per library and seed: test accuracy, forward steps per test sample, the share
of test samples whose returned iterate reaches the tolerance, seconds per epoch. The
TorchDEQ rows need `pip install ".[bench]"` (torch, torchdeq); without them only the
implicit_kit rows are run.

Run: python benchmarks/torchdeq_recipe.py [--epochs 10] [--seeds 0,1,2] [--json PATH]
"""

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import implicit_kit as ik
import implicit_kit.train  # noqa: F401
from implicit_kit.train._config import DataConfig
from implicit_kit.train._data import load_data


C, TOL, MAX_STEPS, BATCH, LR = 16, 1e-3, 40, 64, 1e-3


def data():
    (xtr, ytr), (xte, yte) = load_data(DataConfig(), "float32")
    return np.asarray(xtr), np.asarray(ytr), np.asarray(xte), np.asarray(yte)


class IKNet(eqx.Module):
    inject: eqx.nn.Conv2d
    deq: ik.models.DEQ
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jr.split(key, 3)
        self.inject = eqx.nn.Conv2d(1, C, 3, padding=1, key=k1)
        cell = ik.nn.ConvCell(C, groups=4, norm="weight", residual=False, key=k2)
        self.deq = ik.models.DEQ(
            cell, (C, 8, 8), ik.BestSoFar(ik.Picard(rtol=0.0, atol=TOL)),
            ik.PhantomAdjoint(k=1, damping=1.0), max_steps=MAX_STEPS)
        self.head = eqx.nn.Linear(C, 10, key=k3)

    def __call__(self, x):
        z, st = self.deq(self.inject(x), return_stats=True)
        return self.head(jnp.mean(z, axis=(1, 2))), st


def run_ik(seed, epochs, xtr, ytr, xte, yte):
    model = IKNet(jr.key(seed))
    opt = optax.adam(LR)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, xb, yb):
        def loss(m):
            logits, _ = jax.vmap(m)(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        g = eqx.filter_grad(loss)(model)
        updates, state = opt.update(g, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state

    @eqx.filter_jit
    def evaluate(model, x):
        logits, st = jax.vmap(model)(x)
        return jnp.argmax(logits, -1), st.num_steps, st.residual

    rng = np.random.default_rng(seed)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(xtr))
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            model, state = step(model, state, xtr[idx], ytr[idx])
        jax.block_until_ready(eqx.filter(model, eqx.is_array))
        times.append(time.perf_counter() - t0)
    pred, steps, res = evaluate(model, xte)
    return {"acc": float(np.mean(np.asarray(pred) == yte)),
            "steps": float(np.mean(steps)),
            "reached": float(np.mean(np.asarray(res) <= TOL)),
            "s_per_epoch": float(np.mean(times[1:] or times))}


def run_torchdeq(seed, epochs, xtr, ytr, xte, yte):
    import torch
    from torchdeq import apply_norm, get_deq, reset_norm

    torch.manual_seed(seed)
    torch.set_num_threads(2)

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(C, C, 3, padding=1, bias=False)
            self.conv2 = torch.nn.Conv2d(C, C, 3, padding=1, bias=False)
            self.gn1 = torch.nn.GroupNorm(4, C)
            self.gn2 = torch.nn.GroupNorm(4, C)

        def forward(self, z, u):
            return self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(z))) + u))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inject = torch.nn.Conv2d(1, C, 3, padding=1)
            self.cell = Cell()
            apply_norm(self.cell)          # weight norm, learned scale (the defaults)
            self.deq = get_deq(f_max_iter=MAX_STEPS, f_tol=TOL)  # fixed_point_iter, grad=1
            self.head = torch.nn.Linear(C, 10)

        def forward(self, x):
            u = self.inject(x)
            reset_norm(self.cell)
            z0 = torch.zeros_like(u)
            z_out, info = self.deq(lambda z: self.cell(z, u), z0)
            return self.head(z_out[-1].mean(dim=(2, 3))), info

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    rng = np.random.default_rng(seed)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr).long()
    times = []
    for _ in range(epochs):
        net.train()
        t0 = time.perf_counter()
        order = rng.permutation(len(xtr))
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = torch.from_numpy(order[i:i + BATCH])
            logits, _ = net(xtr_t[idx])
            loss = torch.nn.functional.cross_entropy(logits, ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    net.eval()
    with torch.no_grad():
        logits, info = net(torch.from_numpy(xte))
    return {"acc": float((logits.argmax(-1).numpy() == yte).mean()),
            "steps": float(info["nstep"].float().mean()),
            "reached": float((info["abs_lowest"] <= TOL).float().mean()),
            "s_per_epoch": float(np.mean(times[1:] or times))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    xtr, ytr, xte, yte = data()
    runners = {"implicit_kit (TorchDEQ's recipe ported)": run_ik}
    try:
        import torch  # noqa: F401
        import torchdeq  # noqa: F401
        runners["TorchDEQ (its get-started defaults)"] = run_torchdeq
    except ImportError:
        print("torch / torchdeq not installed: implicit_kit rows only")
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for name, run in runners.items():
            row = {"library": name, "seed": seed, **run(seed, a.epochs, xtr, ytr, xte, yte)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"epochs": a.epochs, "tol": TOL, "max_steps": MAX_STEPS, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
