"""The `implicit-kit` command line: `train`, `eval`, `compare`, `demo`, `tune`, `stn`."""

import argparse
import json
import pathlib
import sys
import time

import jax

from .experiments import ForecastConfig, run_forecast, run_stn, run_tune, StnConfig, TuneConfig
from .hyper import format_table
from .train import (
    check_config,
    Config,
    config_dir,
    ConfigError,
    evaluate_checkpoint,
    fit,
    load_config,
)
from .train._checkpoint import atomic_write, CheckpointError
from .train._loop import TrainingError
from .train._report import plot_comparison, SUMMARY_FORMATS, summary_row
from .train._rundir import TrainingInterrupted
from .train._watchdog import PeerWatchdog


DEMO = ("digits_node", "digits_anode", "digits_deq", "digits_mondeq",
        "digits_homoode", "digits_homoode_learned",
        "digits_homoode_conditioned_task_bosh3_errpen")
DEMO_TITLES = {
    "digits_node": "Neural ODE", "digits_anode": "Augmented Neural ODE",
    "digits_deq": "DEQ", "digits_mondeq": "monotone DEQ",
    "digits_homoode": "HomoODE", "digits_homoode_learned": "HomoODE + learned start",
    "digits_homoode_conditioned_task_bosh3_errpen": "HomoODE, accelerated",
}


def _run_flags(a) -> dict:
    return {"resume": a.resume, "resume_valid": a.resume_valid, "force": a.force}


def _fit_many(configs: list[tuple[str, Config]], a) -> list[dict]:
    rows = []
    for name, cfg in configs:
        print(f"== {name}: {cfg.model.kind}, {cfg.train.epochs} epochs -> "
              f"{cfg.train.checkpoint_dir}", flush=True)
        result = fit(cfg, **_run_flags(a))
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
        return None
    if not a.peer_timeout > 0:
        raise ConfigError(f"--peer-timeout must be > 0 seconds, got {a.peer_timeout}.")
    # Collectives between CPU processes (a no-op for accelerators' own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if a.coordinator is None:
        jax.distributed.initialize()
        from jax._src import distributed

        address = getattr(distributed.global_state, "coordinator_address", None)
    else:
        if not 0 <= a.process_id < a.num_processes:
            raise ConfigError(f"--process-id must be in [0, {a.num_processes}), got "
                              f"{a.process_id}.")
        jax.distributed.initialize(coordinator_address=a.coordinator,
                                   num_processes=a.num_processes, process_id=a.process_id)
        address = a.coordinator
    if jax.process_count() < 2 or not address:
        return None
    host, _, port = address.rpartition(":")
    port = a.watchdog_port or int(port) + 1
    return PeerWatchdog(host, port, jax.process_count(), jax.process_index(),
                        timeout=a.peer_timeout).start()


def _cmd_train(a) -> int:
    watchdog = _init_distributed(a)
    cfg = load_config(a.config, a.overrides)
    try:
        result = fit(cfg, **_run_flags(a))
    except jax.errors.JaxRuntimeError as err:
        if watchdog is None:
            raise
        # A collective can fail (gloo: "connection reset by peer") before the watchdog
        # has reported the lost peer: give it its timeout to name the process.
        message = watchdog.wait_for_loss(a.peer_timeout)
        first = (str(err).strip() or repr(err)).splitlines()[0]
        first = first.replace("Error dispatching computation: ", "")[:300]
        raise TrainingError(message or "a collective between processes failed and no "
                            f"peer was reported lost: {first}") from None
    if watchdog is not None:  # a normal end: the peers are told, not alarmed
        watchdog.stop()
    if jax.process_index() == 0:
        print(format_table([summary_row(cfg.name, result)], SUMMARY_FORMATS))
        print(f"log, checkpoints and plots: {result.run_dir}")
    return 0


def _cmd_eval(a) -> int:
    out = evaluate_checkpoint(a.checkpoint, overrides=a.overrides)
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
    rows = _fit_many(configs, a)
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
    rows = _fit_many(configs, a)
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


def _cmd_forecast(a) -> int:
    run_forecast(load_config(a.config, a.overrides, schema=ForecastConfig))
    return 0


def _add_run_flags(p) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--resume-valid", action="store_true",
                   help="with --resume: if the newest checkpoint is corrupt, resume from "
                        "the newest valid one (the corrupt files are renamed *.corrupt)")
    p.add_argument("--force", action="store_true",
                   help="take over a run directory locked by another run (run.lock) that "
                        "is known to be gone")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="implicit-kit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key.sub=value")
    _add_run_flags(t)
    t.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process training: process 0's address (jax.distributed)")
    t.add_argument("--num-processes", type=int, default=None, metavar="N")
    t.add_argument("--process-id", type=int, default=None, metavar="I")
    t.add_argument("--distributed", action="store_true",
                   help="multi-process training on a cluster that "
                        "jax.distributed.initialize() detects (Slurm, Open MPI, TPU)")
    t.add_argument("--peer-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="multi-process: a process whose peer died (or stayed silent this "
                        "long) stops with one line naming it (default 30)")
    t.add_argument("--watchdog-port", type=int, default=None, metavar="PORT",
                   help="multi-process: process 0's watchdog port (default: the "
                        "coordinator's port + 1)")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint on its test split")
    e.add_argument("checkpoint")
    e.add_argument("--set", dest="overrides", action="append", default=[],
                   help="how to evaluate: model.eval_max_steps=N, model.eval_rtol=X, "
                        "model.eval_atol=X (the forward solver's step cap and tolerances; "
                        "default: the training ones) or train.eval_batch=N")
    e.set_defaults(fn=_cmd_eval)
    c = sub.add_parser("compare", help="train each config and print one table")
    c.add_argument("configs", nargs="+")
    c.add_argument("--set", dest="overrides", action="append", default=[],
                   help="key.sub=value applied to every config")
    _add_run_flags(c)
    c.set_defaults(fn=_cmd_compare)
    d = sub.add_parser("demo", help="the main job: every implicit model on the digits")
    d.add_argument("--out", default="runs/demo", help="where logs, checkpoints, plots go")
    d.add_argument("--set", dest="overrides", action="append", default=[],
                   help="key.sub=value applied to every config (e.g. train.epochs=2)")
    _add_run_flags(d)
    d.set_defaults(fn=_cmd_demo)
    for name, fn, text in (
        ("tune", _cmd_tune, "tune weight decay by hypergradients against a vmapped grid "
                            "search (a tune config)"),
        ("stn", _cmd_stn, "tune dropout and weight decay by Self-Tuning Networks against a "
                          "vmapped grid and hypergradients (an stn config)"),
        ("forecast", _cmd_forecast, "forecast Lorenz-63 with a Neural ODE against a "
                                    "persistence forecast and an MLP one-step map (a "
                                    "forecast config)")):
        e = sub.add_parser(name, help=text)  # the research commands of `experiments`
        e.add_argument("config")
        e.add_argument("overrides", nargs="*", help="key.sub=value")
        e.set_defaults(fn=fn)
    # Overrides after an option (`train CONFIG --resume key=value`) are overrides too.
    a, extra = p.parse_known_args(argv)
    if extra:
        if hasattr(a, "overrides") and a.command in ("train", "tune", "stn", "forecast") and all(
                "=" in e and not e.startswith("-") for e in extra):
            a.overrides = list(a.overrides) + extra
        else:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return a.fn(a)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"implicit-kit {a.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"implicit-kit {a.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # `TrainingInterrupted` names the checkpoint
        why = str(err) if isinstance(err, TrainingInterrupted) else "interrupted."
        print(f"implicit-kit {a.command}: {why}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
