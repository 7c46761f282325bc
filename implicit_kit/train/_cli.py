"""The `implicit-kit` command line: `train`, `eval`, `compare`, `demo`, `tune`, `stn`."""

import argparse
import importlib.resources
import json
import pathlib
import sys
import time

import jax

from ..hyper import format_table
from ._checkpoint import atomic_write, CheckpointError
from ._config import check_config, Config, ConfigError, load_config, StnConfig, TuneConfig
from ._loop import evaluate_checkpoint, fit
from ._report import plot_comparison, SUMMARY_FORMATS, summary_row
from ._self_tuning import run_stn
from ._tuning import run_tune


DEMO = ("digits_node", "digits_anode", "digits_deq", "digits_mondeq",
        "digits_homoode", "digits_homoode_learned",
        "digits_homoode_conditioned_task_bosh3_errpen")
DEMO_TITLES = {
    "digits_node": "Neural ODE", "digits_anode": "Augmented Neural ODE",
    "digits_deq": "DEQ", "digits_mondeq": "monotone DEQ",
    "digits_homoode": "HomoODE", "digits_homoode_learned": "HomoODE + learned start",
    "digits_homoode_conditioned_task_bosh3_errpen": "HomoODE, accelerated",
}


def config_dir() -> pathlib.Path:
    """The shipped configs: `implicit_kit/configs` in an installed wheel, the
    repository's `configs/` in a source checkout."""
    packaged = pathlib.Path(str(importlib.resources.files("implicit_kit"))) / "configs"
    if packaged.is_dir():
        return packaged
    return pathlib.Path(__file__).resolve().parents[2] / "configs"


def _fit_many(configs: list[tuple[str, Config]], resume: bool) -> list[dict]:
    rows = []
    for name, cfg in configs:
        print(f"== {name}: {cfg.model.kind}, {cfg.train.epochs} epochs -> "
              f"{cfg.train.checkpoint_dir}", flush=True)
        result = fit(cfg, resume=resume)
        rows.append(summary_row(name, result))
    return rows


def _init_distributed(a) -> None:
    """Join a multi-process run (`jax.distributed`) before JAX touches a device:
    `--coordinator HOST:PORT --num-processes N --process-id I`, or `--distributed` to
    let `jax.distributed.initialize()` read a cluster's environment (Slurm, Open MPI,
    TPU pods)."""
    given = [a.coordinator, a.num_processes, a.process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together "
                          "(or pass --distributed on a cluster that JAX auto-detects).")
    if a.coordinator is None and not a.distributed:
        return
    # Collectives between CPU processes (a no-op for accelerators' own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if a.coordinator is None:
        jax.distributed.initialize()
    else:
        if not 0 <= a.process_id < a.num_processes:
            raise ConfigError(f"--process-id must be in [0, {a.num_processes}), got "
                              f"{a.process_id}.")
        jax.distributed.initialize(coordinator_address=a.coordinator,
                                   num_processes=a.num_processes, process_id=a.process_id)


def _cmd_train(a) -> int:
    _init_distributed(a)
    cfg = load_config(a.config, a.overrides)
    result = fit(cfg, resume=a.resume)
    if jax.process_index() == 0:
        print(format_table([summary_row(cfg.name, result)], SUMMARY_FORMATS))
        print(f"log, checkpoints and plots: {result.run_dir}")
    return 0


def _cmd_eval(a) -> int:
    out = evaluate_checkpoint(a.checkpoint)
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0


def _cmd_compare(a) -> int:
    configs = [(pathlib.Path(p).stem, load_config(p, a.overrides)) for p in a.configs]
    dirs = [pathlib.Path(c.train.checkpoint_dir).resolve() for _, c in configs]
    if len(set(dirs)) < len(dirs):
        raise ConfigError(
            "the configs share a train.checkpoint_dir; each run needs its own "
            f"({', '.join(map(str, dirs))})."
        )
    for _, cfg in configs:  # every config is checked before anything trains
        check_config(cfg)
    rows = _fit_many(configs, a.resume)
    print(format_table(rows, SUMMARY_FORMATS))
    return 0


def _cmd_demo(a) -> int:
    out = pathlib.Path(a.out)
    overrides = list(a.overrides)
    configs = []
    for name in DEMO:
        path = config_dir() / f"{name}.yaml"
        cfg = load_config(path, overrides + [f"train.checkpoint_dir={out / name}"])
        configs.append((DEMO_TITLES[name], cfg))
    if not a.resume:
        for _, cfg in configs:
            if pathlib.Path(cfg.train.checkpoint_dir).is_dir() and any(
                    pathlib.Path(cfg.train.checkpoint_dir).glob("epoch-*.ckpt")):
                raise CheckpointError(
                    f"{cfg.train.checkpoint_dir!r} already holds a run; pass --out DIR for a "
                    "fresh one or --resume to continue it."
                )
    t0 = time.perf_counter()
    rows = _fit_many(configs, a.resume)
    print()
    print("implicit models on the embedded 8x8 digits (same stem and head; test split of "
          "360 images; NFE = evaluations of the cell or vector field per test sample)")
    print(format_table(rows, SUMMARY_FORMATS))
    total = time.perf_counter() - t0
    atomic_write(out / "table.json", json.dumps(
        {"rows": rows, "total_seconds": total, "overrides": overrides}, indent=1).encode())
    figure = plot_comparison(rows, out / "comparison.png")
    print(f"\ntotal {total:.0f} s. The table is in {out.resolve()}/table.json and the "
          f"comparison figure in {figure.resolve()}; per-run metrics log (metrics.jsonl), "
          f"checkpoints (epoch-*.ckpt) and plots (curves.png, forward_steps.png) are in "
          f"{out.resolve()}/<run>/.")
    return 0


def _cmd_tune(a) -> int:
    cfg = load_config(a.config, a.overrides, schema=TuneConfig)
    run_tune(cfg)
    return 0


def _cmd_stn(a) -> int:
    cfg = load_config(a.config, a.overrides, schema=StnConfig)
    run_stn(cfg)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="implicit-kit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key.sub=value")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process training: process 0's address (jax.distributed)")
    t.add_argument("--num-processes", type=int, default=None, metavar="N")
    t.add_argument("--process-id", type=int, default=None, metavar="I")
    t.add_argument("--distributed", action="store_true",
                   help="multi-process training on a cluster that "
                        "jax.distributed.initialize() detects (Slurm, Open MPI, TPU)")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint on its test split")
    e.add_argument("checkpoint")
    e.set_defaults(fn=_cmd_eval)
    c = sub.add_parser("compare", help="train each config and print one table")
    c.add_argument("configs", nargs="+")
    c.add_argument("--set", dest="overrides", action="append", default=[],
                   help="key.sub=value applied to every config")
    c.add_argument("--resume", action="store_true")
    c.set_defaults(fn=_cmd_compare)
    d = sub.add_parser("demo", help="the main job: every implicit model on the digits")
    d.add_argument("--out", default="runs/demo", help="where logs, checkpoints, plots go")
    d.add_argument("--set", dest="overrides", action="append", default=[],
                   help="key.sub=value applied to every config (e.g. train.epochs=2)")
    d.add_argument("--resume", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    u = sub.add_parser("tune", help="tune weight decay by hypergradients against a "
                       "vmapped grid search (a tune config)")
    u.add_argument("config")
    u.add_argument("overrides", nargs="*", help="key.sub=value")
    u.set_defaults(fn=_cmd_tune)
    n = sub.add_parser("stn", help="tune dropout and weight decay by Self-Tuning Networks "
                       "against a vmapped grid and hypergradients (an stn config)")
    n.add_argument("config")
    n.add_argument("overrides", nargs="*", help="key.sub=value")
    n.set_defaults(fn=_cmd_stn)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"implicit-kit {a.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
