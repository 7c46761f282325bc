"""Train step on several devices: `train.parallel: jit` against `shard_map`.

With `jit` the batch is sharded and one program runs over all of it: a solver loop's
condition ("any sample still running") is a reduction over every device, each
iteration, and every device iterates until the slowest sample of the whole batch has
stopped. With `shard_map` (`ik.shard_batch`) each device loops over its own samples.
Both compute the same thing (tests/test_parallel.py); this measures the time per train
step of the digits configs on N forced host devices (`--xla_force_host_platform_
device_count`; on a CPU they share its cores, so this measures the synchronisation and
the wasted iterations, not a speed-up from more hardware). Median ms per step over
interleaved rounds, every mode once per round, on the same batches.

Run: python benchmarks/parallel_step.py [--devices 4] [--rounds 7] [--json PATH]
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="train steps per timed call")
    p.add_argument("--configs",
                   default="digits_deq,digits_deq_implicit,digits_homoode,digits_mondeq")
    p.add_argument("--json")
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.devices}")
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    from implicit_kit import data as ik_data
    from implicit_kit.train import load_config
    from implicit_kit.train._loop import _setup

    root = pathlib.Path(__file__).resolve().parents[1]
    assert len(jax.devices()) == a.devices, jax.devices()
    variants = {  # name: (config file, overrides)
        "digits_deq": ("digits_deq", ["model.adjoint=phantom", "model.adjoint_steps=5"]),
        "digits_deq_implicit": ("digits_deq", ["model.adjoint=implicit"]),
        "digits_homoode": ("digits_homoode", []),
        "digits_mondeq": ("digits_mondeq", []),
    }
    rows = []
    for name in a.configs.split(","):
        file, extra = variants[name]
        runs = {}
        for mode in ("jit", "shard_map"):
            cfg = load_config(root / "configs" / f"{file}.yaml",
                              extra + [f"train.parallel={mode}", "train.progress=false"])
            st = _setup(cfg, None)
            params, opt = st.replicate((st.params, st.optimiser.init(st.params)))
            batches = [(st.shard(x), st.shard(y)) for x, y in
                       list(ik_data.batches(*st.train, cfg.train.batch, seed=0,
                                            epoch=1))[:a.steps]]
            key = jr.key(1)
            step = st.steps.train.lower(params, opt, *batches[0], key,
                                        jnp.asarray(0)).compile()

            def run(params=params, opt=opt, batches=batches, step=step, key=key):
                # The same parameters every call (the steps are not chained), so every
                # round times the same solves.
                out = []
                for i, (x, y) in enumerate(batches):
                    _, _, m = step(jax.tree_util.tree_map(jnp.copy, params),
                                   jax.tree_util.tree_map(jnp.copy, opt), x, y, key,
                                   jnp.asarray(i))
                    out.append(m)
                jax.block_until_ready(out)
                return out

            try:
                metrics = run()
            except jax.errors.JaxRuntimeError as err:  # recorded, not hidden
                print(f"{name:22s} {mode:9s} fails: {err}", flush=True)
                rows.append(dict(config=name, parallel=mode, devices=a.devices, ms=None,
                                 error=str(err).splitlines()[0][:200]))
                continue
            runs[mode] = dict(run=run, num_steps=statistics.mean(
                float(m["num_steps"]) for m in metrics), loss=[float(m["loss"])
                                                               for m in metrics])
        if len(runs) == 2:
            assert all(abs(u - v) < 1e-5 for u, v in zip(runs["jit"]["loss"],
                                                          runs["shard_map"]["loss"]))
        times = {m: [] for m in runs}
        for _ in range(a.rounds):
            for mode, r in runs.items():
                t = time.perf_counter()
                r["run"]()
                times[mode].append(1e3 * (time.perf_counter() - t) / a.steps)
        for mode, r in runs.items():
            rows.append(dict(config=name, parallel=mode, devices=a.devices,
                             ms=statistics.median(times[mode]), ms_rounds=times[mode],
                             num_steps=r["num_steps"]))
            print(f"{name:22s} {mode:9s} {rows[-1]['ms']:8.2f} ms/step  "
                  f"(forward steps {r['num_steps']:.1f})", flush=True)
    result = {"devices": a.devices, "rounds": a.rounds, "steps": a.steps, "rows": rows}
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
