"""Where a trained HomoODE start point ends up, and how straight its path is: after
`ik.train.fit` of each config, the root-mean-square of the stem features, the start point
z0, the end point z(1) and the path's displacement z(1) - z0 over the test images, the
gap between z(1) and one Euler step z0 + g(z0, x) relative to the displacement (0 when
the field is constant along the path, which every Runge-Kutta pair integrates exactly in
its fewest steps), with the test accuracy and NFE.

With a learned field the end point moves with the start point (z(1) = z0 + the
integral of the field), so an `init_loss` that pulls z0 towards the detached z(1) chases
a target that moves with it. This measures whether the start drifts.

Run: python benchmarks/homoode_start_drift.py CONFIG [CONFIG ...] [--seed 0]
     [--out runs/drift] [--json PATH]
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

import implicit_kit.train as ik_train
from implicit_kit.nn import prepare


def rms(a):
    return jnp.sqrt(jnp.mean(a**2))


def measure(model, x):
    def one(image):
        h = model.stem(image)
        z1, st = model.block(h, inference=True, return_stats=True)
        z0 = st.z0
        euler = z0 + prepare(model.block.module, key=None, inference=True)(z0, h)
        return rms(h), rms(z0), rms(z1), rms(z1 - z0), rms(z1 - euler) / rms(z1 - z0)

    out = jax.jit(jax.vmap(one))(jnp.asarray(x))
    return {k: float(jnp.mean(v)) for k, v in zip(
        ("rms_stem", "rms_z0", "rms_z1", "rms_displacement", "euler_gap"), out)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("configs", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/drift")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for path in a.configs:
        name = pathlib.Path(path).stem
        cfg = ik_train.load_config(path, [
            f"train.seed={a.seed}", f"train.checkpoint_dir={pathlib.Path(a.out) / name}",
            "train.progress=false"])
        res = ik_train.fit(cfg)
        (_, _), (xt, _) = ik_train.load_data(cfg.data, cfg.train.dtype)
        last = [h for h in res.history if "test_acc" in h][-1]
        row = {"config": name, "seed": a.seed, "test_acc": last["test_acc"],
               "test_nfe": last["test_nfe"], **measure(res.model, xt)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
