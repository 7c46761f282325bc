"""One training config over several seeds: final and best test accuracy, forward
steps / NFE per test sample, seconds per epoch, as mean ± std and per seed.

Each seed is a full `ik.train.fit` run (the same code path as `implicit-kit train`), the
seed setting the initialisation, the data order and the dropout masks (the digits split
is fixed). Several configs are run one after the other and summarised together.

Run: python benchmarks/digits_seeds.py CONFIG [CONFIG ...] [--seeds 0,1,2]
     [--set train.epochs=20 ...] [--out runs/seeds] [--json PATH]
"""

import argparse
import json
import pathlib
import sys

import numpy as np

import implicit_kit as ik
import implicit_kit.train  # noqa: F401  (not imported by `implicit_kit` itself)


def summarise(history: list[dict]) -> dict:
    evals = [h for h in history if "test_acc" in h]
    timed = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    return {"final_acc": evals[-1]["test_acc"], "best_acc": max(h["test_acc"] for h in evals),
            "test_nfe": evals[-1]["test_nfe"], "train_nfe": history[-1]["nfe"],
            "s_per_epoch": float(np.mean(timed)),
            "test_steps": evals[-1].get("test_num_steps"),
            "test_failure_rate": evals[-1].get("test_failure_rate"),
            "peak_memory_mb": max(h.get("peak_memory_mb") or 0.0 for h in history),
            "skipped_steps": sum(h.get("skipped_steps", 0) for h in history)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("configs", nargs="+")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default="runs/seeds")
    p.add_argument("--json", default=None, help="write per-seed rows and summaries here")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    table, per_seed = [], []
    for path in a.configs:
        name = pathlib.Path(path).stem
        rows = []
        for seed in seeds:
            run_dir = pathlib.Path(a.out) / name / f"seed{seed}"
            cfg = ik.train.load_config(path, a.overrides + [
                f"train.seed={seed}", f"train.checkpoint_dir={run_dir}",
                "train.progress=false"])
            res = ik.train.fit(cfg)
            row = {"config": name, "seed": seed, **summarise(res.history),
                   "params": res.num_params}
            rows.append(row)
            per_seed.append(row)
            print(json.dumps(row), flush=True)
        summary = {"config": name, "seeds": len(rows)}
        for key in ("final_acc", "best_acc", "test_nfe", "train_nfe", "s_per_epoch"):
            v = np.array([r[key] for r in rows])
            summary[key] = f"{v.mean():.4f} ± {v.std():.4f}"
        summary["per-seed final"] = " / ".join(f"{r['final_acc']:.4f}" for r in rows)
        table.append(summary)
    print(" ".join(sys.argv))
    print(ik.hyper.format_table(table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"seeds": seeds, "overrides": a.overrides, "rows": per_seed}, f, indent=1)


if __name__ == "__main__":
    main()
