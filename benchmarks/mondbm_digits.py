"""The monotone DBM on the digits: joint imputation and classification against simple
baselines, and the plain (non-monotone) DBM.

Every arm sees the same test images with the same observed pixels: a random 40 % of each
image, drawn from the key `fold_in(key(0), i)` of test image i (what `implicit-kit
train` evaluates with). Reported on the unobserved pixels of the 360 test images:
- imputation MSE of the pixel levels in [0, 1] (the DBM: the mean of the marginal over
  the 8 bin centres; the quantisation floor of 8 bins is 0.003);
- classification accuracy from the observed pixels only.

Arms:
- `implicit-kit train configs/digits_mondbm.yaml` (monotone, margin m = 0.01), seeds;
- the same with `model.monotone=false` (the plain symmetric hollow DBM, no margin);
- per-pixel mean of the training images; k-nearest-neighbour imputation (numpy: the
  k training images closest on the observed pixels, averaged), k = 1, 5, 10;
- an MLP classifier on the observed pixels (input: the masked image and the mask, one
  hidden layer of 128, Adam, 3,000 steps of 64 with a new random 40 % mask per image).
For the DBMs: forward solver failures, and fixed points that depend on the start (each
test image solved to 1e-7 from the uniform start and from 4 random starts (softmax of Gaussian
logits of scale 3); the marginals
differ by more than 1e-3).

Run: python benchmarks/mondbm_digits.py [--seeds 0,1,2] [--epochs N] [--out DIR]
     [--json PATH]
"""

import argparse
import json
import pathlib
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import implicit_kit as ik
from implicit_kit.data import load_digits
from implicit_kit.train import fit, load_config


ROOT = pathlib.Path(__file__).resolve().parents[1]
OBSERVED = 0.4


def test_masks(n, shape=(8, 8)):
    return np.stack([np.asarray(jr.bernoulli(jr.fold_in(jr.key(0), i), OBSERVED, shape))
                     for i in range(n)])


def baselines(x, y, xt, yt, masks):
    X, XT = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    m = masks.reshape(len(xt), -1)
    free = ~m
    out = {"pixel_mean_mse": float(((X.mean(0) - XT) ** 2)[free].mean())}
    for k in (1, 5, 10):
        err = []
        for i in range(len(XT)):
            o = m[i]
            d = ((X[:, o] - XT[i, o]) ** 2).sum(1)
            pred = X[np.argsort(d)[:k]].mean(0)
            err.append(((pred - XT[i]) ** 2)[~o])
        out[f"knn{k}_mse"] = float(np.concatenate(err).mean())
    # MLP on the observed pixels
    key = jr.key(0)
    mlp = eqx.nn.MLP(2 * X.shape[1], 10, 128, 1, key=key)
    opt = optax.adam(1e-3)
    state = opt.init(eqx.filter(mlp, eqx.is_array))

    def logits(model, xb, mb):
        inp = jnp.concatenate([xb * mb, mb.astype(xb.dtype)], -1)
        return jax.vmap(model)(inp)

    @eqx.filter_jit
    def step(model, state, xb, yb, k):
        mb = jr.bernoulli(k, OBSERVED, xb.shape)

        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(
                logits(model, xb, mb), yb).mean()

        g = eqx.filter_grad(loss)(model)
        upd, state = opt.update(g, state)
        return eqx.apply_updates(model, upd), state

    rng = np.random.default_rng(0)
    for i in range(3000):
        idx = rng.choice(len(y), 64, replace=False)
        mlp, state = step(mlp, state, jnp.asarray(X[idx]), jnp.asarray(y[idx]),
                          jr.fold_in(key, i))
    pred = np.asarray(jnp.argmax(logits(mlp, jnp.asarray(XT), jnp.asarray(m)), -1))
    out["mlp_observed_acc"] = float((pred == yt).mean())
    return out


def dbm_checks(model, xt, masks, starts=4):
    """Failures from the uniform start and start dependence over random starts, each
    solve to a tight tolerance (Anderson, 1e-7, at most 300 steps), so that a spread
    between starts is not the tolerance."""
    model = ik.models.MonotoneDBM(
        model.coupling, model.biases, alpha=model.alpha, max_steps=300,
        solver=ik.Anderson(rtol=1e-7, atol=1e-8), observed=model.observed)

    @eqx.filter_jit
    def solve(model, x, mask, key):
        levels = model.bin(x)
        onehot = jnp.moveaxis(jax.nn.one_hot(levels, model.tiers[0].group), -1, 0)
        vals, msk = (onehot, None, None), (mask[None], None, None)
        q0, _, sol0 = model.infer(vals, msk)
        diffs, fails = [], [sol0.result != ik.RESULTS.successful]
        for k in jr.split(key, starts):
            ks = jr.split(k, len(model.tiers))
            y0 = tuple(jax.nn.softmax(3 * jr.normal(kk, t.grouped(a).shape), axis=1).reshape(
                t.shape) for kk, t, a in zip(ks, model.tiers, q0))
            y0 = (jnp.where(jnp.repeat(mask[None], model.tiers[0].group, 0), onehot, y0[0]),
                  *y0[1:])
            q, _, sol = model.infer(vals, msk, y0=y0)
            fails.append(sol.result != ik.RESULTS.successful)
            diffs.append(jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in zip(q, q0)])))
        return jnp.stack(fails), jnp.max(jnp.stack(diffs)), sol0.stats["num_steps"]

    fails, spread, steps = [], [], []
    for i in range(len(xt)):
        f, s, n = solve(model, jnp.asarray(xt[i]), jnp.asarray(masks[i]), jr.key(100 + i))
        fails.append(np.asarray(f))
        spread.append(float(s))
        steps.append(int(n))
    fails = np.stack(fails)
    spread = np.asarray(spread)
    return {"uniform_start_failures": int(fails[:, 0].sum()),
            "any_start_failures": int(fails.any(1).sum()),
            "start_dependent": int((spread > 1e-3).sum()),
            "max_start_spread": float(spread.max()), "mean_steps": float(np.mean(steps))}


def run(seeds, epochs, out_dir, json_path=None):
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    masks = test_masks(len(xt))
    t0 = time.perf_counter()
    result = {"baselines": baselines(x, y, xt, yt, masks)}
    result["baselines"]["seconds"] = time.perf_counter() - t0
    print(result["baselines"], flush=True)
    arms = []
    for arm, overrides in (("monotone DBM (m = 0.01)", []),
                           ("plain DBM (no margin)", ["model.monotone=false"])):
        for seed in seeds:
            run_dir = pathlib.Path(out_dir) / f"{arm.split()[0]}_{seed}"
            ov = [f"train.seed={seed}", f"train.checkpoint_dir={run_dir}",
                  "train.progress=false", *overrides]
            if epochs is not None:
                ov.append(f"train.epochs={epochs}")
            cfg = load_config(ROOT / "configs" / "digits_mondbm.yaml", ov)
            t = time.perf_counter()
            res = fit(cfg)
            seconds = time.perf_counter() - t
            h = res.history
            checks = dbm_checks(res.model, xt, masks)
            row = {"arm": arm, "seed": seed, "test_acc": h[-1]["test_acc"],
                   "imputation_mse": h[-1]["test_imputation_mse"],
                   "pixel_acc": h[-1]["test_pixel_acc"],
                   "test_failure_rate": h[-1]["test_failure_rate"],
                   "skipped_steps": float(sum(r["skipped_steps"] for r in h)),
                   "train_failure_rate": float(np.mean([r["failure_rate"] for r in h])),
                   "s_per_epoch": float(np.mean([r["seconds"] for r in h[1:]] or [0])),
                   "fit_seconds": seconds, "epochs": len(h), **checks}
            print(row, flush=True)
            arms.append(row)
    result["dbm"] = arms
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--json")
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="mondbm_")
    run([int(s) for s in a.seeds.split(",")], a.epochs, out, a.json)
