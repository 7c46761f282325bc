"""One training config over several seeds: final and best test accuracy, forward
steps / NFE per test sample, seconds per epoch, as mean ± std and per seed.

Each seed is a full `ik.train.fit` run (the same code path as `implicit-kit train`), the
seed setting the initialisation, the data order and the dropout masks (the digits split
is fixed). Several configs are run one after the other and summarised together.

With `--select KEY=V1,V2,...` (configs with a validation split, `data.val_size > 0`),
each config is first run with every candidate value on the selection seeds
(`--select-seeds`, default the first seed), the value with the best mean final
validation accuracy is kept (ties: the first), and the seeds are run with it: every
choice is made on validation data, never on the test split. The selection runs are
reported with the rows.

Run: python benchmarks/digits_seeds.py CONFIG [CONFIG ...] [--seeds 0,1,2]
     [--set train.epochs=20 ...] [--select model.beta=0.5,0.8] [--out runs/seeds]
     [--json PATH]
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
            "val_acc": evals[-1].get("val_acc"),
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
    p.add_argument("--select", default=None,
                   help="KEY=V1,V2,...: choose the value on the validation split first")
    p.add_argument("--select-seeds", default=None,
                   help="the seeds of the selection runs (default: the first seed)")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    table, per_seed, selection = [], [], []

    def run(path, name, seed, overrides, tag=""):
        run_dir = pathlib.Path(a.out) / name / f"{tag}seed{seed}"
        cfg = ik.train.load_config(path, overrides + [
            f"train.seed={seed}", f"train.checkpoint_dir={run_dir}",
            "train.progress=false"])
        if a.select and not cfg.data.val_size:
            raise SystemExit(f"--select chooses on the validation split: {path} needs "
                             "data.val_size > 0.")
        res = ik.train.fit(cfg)
        return {"config": name, "seed": seed, **summarise(res.history),
                "params": res.num_params}

    for path in a.configs:
        name = pathlib.Path(path).stem
        overrides = list(a.overrides)
        if a.select:
            key, values = a.select.split("=", 1)
            sel_seeds = ([int(s) for s in a.select_seeds.split(",")] if a.select_seeds
                         else seeds[:1])
            scores = []
            for value in values.split(","):
                runs = [run(path, name, s, overrides + [f"{key}={value}"],
                            tag=f"select-{key}={value}-") for s in sel_seeds]
                score = float(np.mean([r["val_acc"] for r in runs]))
                scores.append((score, value))
                selection.append({"config": name, "key": key, "value": value,
                                  "val_acc": score, "seeds": sel_seeds})
                print(json.dumps(selection[-1]), flush=True)
            best = max(scores, key=lambda sv: sv[0])[1]  # (max keeps the first of ties)
            selection.append({"config": name, "key": key, "chosen": best})
            overrides.append(f"{key}={best}")
        rows = []
        for seed in seeds:
            row = run(path, name, seed, overrides)
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
            json.dump({"seeds": seeds, "overrides": a.overrides, "rows": per_seed,
                       "selection": selection}, f, indent=1)


if __name__ == "__main__":
    main()
