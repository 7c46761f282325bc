"""`fit`: the training loop (epochs, metrics, checkpoints, exact resume, data
parallelism over all visible devices), and the evaluation of a checkpoint."""

import contextlib
import dataclasses
import json
import pathlib
import time
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .. import data as ik_data
from ._build import count_params, make_model
from ._checkpoint import (
    atomic_write,
    CheckpointError,
    config_diff,
    list_checkpoints,
    load_checkpoint,
    read_header,
    save_checkpoint,
)
from ._config import check_config, Config, config_from_dict, ConfigError, migrate_config
from ._data import load_splits, pad_eval
from ._report import host_tree, peak_memory_mb, plot_history, Progress, to_host
from ._rundir import (
    check_writable,
    Interrupts,
    remove_stale_temporaries,
    run_lock,
    TrainingInterrupted,
    write_error,
)
from ._schema import parse_overrides
from ._step import make_optimiser, Steps


@dataclasses.dataclass
class FitResult:
    """What `fit` returns: the trained `model`, the per-epoch `history` (the JSONL
    rows), the `run_dir` (log, checkpoints, plots), the number of `traces` of each
    jitted step (1 each: no retracing), and `num_params`."""

    model: eqx.Module
    history: list[dict]
    run_dir: pathlib.Path
    traces: dict
    num_params: int
    plots: list[pathlib.Path]


@dataclasses.dataclass
class _Setup:
    """What `fit` and `evaluate_checkpoint` share: data, model, optimiser, steps, and the
    sharding of batches over the devices."""

    train: tuple
    val: tuple | None
    test: tuple
    params: eqx.Module
    static: eqx.Module
    optimiser: object
    steps: Steps
    steps_per_epoch: int
    num_params: int
    mesh: Mesh

    def shard(self, a):
        """`a` (a host array, the same in every process) split along its first (batch)
        axis over the devices; each process transfers only its own devices' rows."""
        return _global_array(a, NamedSharding(self.mesh, P("data")))

    def replicate(self, tree):
        """`tree` (the same in every process) on every device."""
        sharding = NamedSharding(self.mesh, P())
        return jax.tree_util.tree_map(lambda a: _global_array(a, sharding), tree)


def _global_array(a, sharding):
    """A global array from a host value that every process holds (`jax.distributed`:
    each process supplies only the shards of its own devices)."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def _is_main() -> bool:
    """Whether this is the process that writes logs, checkpoints and plots (process 0
    of a multi-process run; always true in one process)."""
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    """All processes wait here (a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _setup(cfg: Config, devices) -> _Setup:
    """(`cfg` already checked by the caller.)"""
    t = cfg.train
    devices = list(jax.devices() if devices is None else devices)
    for key, value in (("train.batch", t.batch), ("train.eval_batch", t.eval_batch)):
        if value % len(devices):
            raise ConfigError(
                f"key '{key}'={value} must be divisible by the {len(devices)} devices."
            )
    train, val, test = load_splits(cfg.data, t.dtype)
    x = train[0]
    model = make_model(cfg, x.shape[1], x.shape[-1])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    steps_per_epoch = ik_data.num_batches(x.shape[0], t.batch)
    optimiser = make_optimiser(cfg.optim, steps_per_epoch * t.epochs, params)
    mesh = Mesh(np.array(devices), ("data",))
    return _Setup(train, val, test, params, static, optimiser,
                  Steps(cfg, static, optimiser, mesh), steps_per_epoch, count_params(model),
                  mesh)


def evaluate(steps: Steps, params, test, eval_batch: int, shard, prefix="test") -> dict:
    """Mean metrics over a whole split (padded eval batches, masked), named
    `<prefix>_<metric>` (the test split's, or `val_` of the validation split's)."""
    x, y, mask = pad_eval(*test, eval_batch)
    sums = None
    for i in range(0, x.shape[0], eval_batch):
        part = steps.eval(params, shard(x[i:i + eval_batch]), shard(y[i:i + eval_batch]),
                          shard(mask[i:i + eval_batch]),
                          shard(np.arange(i, i + eval_batch, dtype=np.int32)))
        part = host_tree(part)  # summed on the host: no eager op on global arrays
        sums = part if sums is None else jax.tree_util.tree_map(np.add, sums, part)
    n = int(mask.sum())
    return {f"{prefix}_{k}": (None if v is None else v / n) for k, v in to_host(sums).items()}


def _write_log(path, history):
    atomic_write(path, "".join(json.dumps(h) + "\n" for h in history).encode())


class TrainingError(RuntimeError):
    """A train step broke the run's failure policy (`train.on_nonfinite: raise`,
    `train.on_unconverged: raise`); the message names the epoch and step."""


def _load_resumable(existing, like, resume_valid: bool, main: bool):
    """`(path, header, state)` of the newest checkpoint, or, where it is corrupt and
    `resume_valid`, of the newest valid one (the newer corrupt files are renamed
    `*.corrupt` by the main process)."""
    try:
        return (existing[-1], *load_checkpoint(existing[-1], like))
    except CheckpointError as err:
        newest_error = err
    for i in range(len(existing) - 2, -1, -1):
        try:
            header, state = load_checkpoint(existing[i], like)
        except CheckpointError:
            continue
        if not resume_valid:
            raise CheckpointError(
                f"{newest_error} The older checkpoint {existing[i].name} beside it is "
                "valid: pass --resume-valid (`fit(..., resume_valid=True)`) to resume from "
                "it; the corrupt files are then renamed *.corrupt."
            ) from None
        if main:
            for bad in existing[i + 1:]:
                bad.replace(bad.with_name(bad.name + ".corrupt"))
        warnings.warn(f"resuming from {str(existing[i])!r}: {newest_error}",
                      RuntimeWarning, stacklevel=3)
        return existing[i], header, state
    raise newest_error


def fit(cfg: Config, *, resume: bool = False, resume_valid: bool = False,
        force: bool = False, devices=None,
        callback: Callable[[dict], None] | None = None,
        step_callback: Callable[[int, int], None] | None = None) -> FitResult:
    """Train `cfg`; log, checkpoints and plots go to `cfg.train.checkpoint_dir`.

    - `resume`: continue from the newest checkpoint there (same config required, apart
      from `train.progress`, `train.checkpoint_dir` and `train.keep_checkpoints`: the
      directory may be spelled otherwise, moved or copied); the result equals an
      uninterrupted run's. If the newest checkpoint is corrupt, the error names the
      newest valid one; `resume_valid=True` resumes from it.
    - `force`: take over the run directory's lock (`run.lock`) although another run
      holds it (only when that run is known to be gone, e.g. on another host). A lock
      left by a dead process of this host is taken over without it.
    - `devices`: the devices to spread each batch over (default: all visible ones);
      the model is replicated, the batch axis sharded (`jax.sharding`).
    - `callback(row)` after each epoch; `step_callback(epoch, step)` after each step
      (e.g. to stop a run).

    Failures are loud: a second run on a directory in use raises `RunDirError`; a
    read-only or full disk raises `RunDirError` before training starts (a write test of
    one checkpoint's size) or, if it fills later, when a checkpoint cannot be written
    (the metrics log never lists an epoch without its checkpoint); SIGINT raises
    `TrainingInterrupted` (a `KeyboardInterrupt`) at the next step, naming the last
    checkpointed epoch; `train.on_nonfinite` / `train.on_unconverged: raise` raise
    `TrainingError`.
    """
    check_config(cfg)  # before the checkpoint directory is looked at
    run_dir = pathlib.Path(cfg.train.checkpoint_dir)
    main = _is_main()
    lock = run_lock(run_dir, force=force) if main else contextlib.nullcontext()
    with lock, Interrupts() as interrupts:
        return _fit(cfg, run_dir, main, interrupts, resume, resume_valid, devices,
                    callback, step_callback)


def _fit(cfg, run_dir, main, interrupts, resume, resume_valid, devices, callback,
         step_callback):
    t = cfg.train
    if main:  # (the lock is held: no other run's temporary files are in flight)
        remove_stale_temporaries(run_dir)
        check_writable(run_dir)
    existing = list_checkpoints(run_dir)
    if existing and not resume:
        raise CheckpointError(
            f"{str(run_dir)!r} already holds checkpoints ({existing[-1].name}); resume with "
            "`--resume` or choose another train.checkpoint_dir."
        )
    if resume and not existing:
        raise CheckpointError(
            f"nothing to resume: {str(run_dir)!r} holds no checkpoint (epoch-*.ckpt); "
            "run without `--resume` to start."
        )
    st = _setup(cfg, devices)
    params, optimiser, steps = st.params, st.optimiser, st.steps
    opt_state = optimiser.init(params)
    base_key = jr.key_data(jr.key(t.seed + 1))
    history: list[dict] = []
    start_epoch = 0
    cfg_dict = cfg.to_dict()
    if resume:
        like = (params, opt_state, base_key)
        path, header, (params, opt_state, base_key) = _load_resumable(
            existing, like, resume_valid, main)
        diff = config_diff(migrate_config(header["config"]), cfg_dict)
        if diff:
            raise ConfigError(
                f"cannot resume from {str(path)!r}: the config differs at "
                f"{', '.join(diff)}."
            )
        history = header["history"]
        start_epoch = header["epoch"]
    log_path = run_dir / "metrics.jsonl"
    if main:
        # A full disk is found here, before the first step: a write of one checkpoint's
        # size (the state's bytes).
        state_bytes = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(
            (params, opt_state, base_key)) if eqx.is_array(a))
        check_writable(run_dir, state_bytes + 4096)
        try:
            _write_log(log_path, history)
            atomic_write(run_dir / "config.json", json.dumps(cfg_dict, indent=2).encode())
        except OSError as err:
            raise write_error(run_dir, "write metrics.jsonl and config.json", err) from None
    params, opt_state = st.replicate((params, opt_state))

    x, y = st.train
    key = jr.wrap_key_data(base_key)
    compiled = None
    done_epoch = start_epoch
    progress = Progress(t.progress and main, cfg.name, t.epochs, st.steps_per_epoch)
    for epoch in range(start_epoch + 1, t.epochs + 1):
        progress.start()
        acc_metrics, prev_loss = [], None
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(ik_data.batches(x, y, t.batch, seed=t.seed,
                                                     epoch=epoch)):
            if interrupts.requested:
                raise TrainingInterrupted(done_epoch, run_dir)
            step = (epoch - 1) * st.steps_per_epoch + i
            args = (params, opt_state, st.shard(xb), st.shard(yb), key, jnp.asarray(step))
            if compiled is None:  # compiled once; also gives the step's memory analysis
                compiled = steps.train.lower(*args).compile()
            params, opt_state, m = compiled(*args)
            _check_policy(cfg, m, epoch, i + 1, done_epoch, run_dir)
            acc_metrics.append(m)
            if progress.bar:
                progress.update(epoch, i + 1,
                                None if prev_loss is None else float(prev_loss))
            prev_loss = m["loss"]
            if step_callback is not None:
                step_callback(epoch, i + 1)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - t0
        mean = to_host(jax.tree_util.tree_map(lambda *v: np.mean(np.stack(v)),
                                              *map(host_tree, acc_metrics)))
        peak, source = peak_memory_mb(compiled)
        row = {"epoch": epoch, "step": epoch * st.steps_per_epoch, **mean,
               "seconds": seconds, "peak_memory_mb": peak, "memory_source": source}
        if epoch % t.eval_every == 0 or epoch == t.epochs:
            row.update(evaluate(steps, params, st.test, t.eval_batch, st.shard))
            if st.val is not None:
                row.update(evaluate(steps, params, st.val, t.eval_batch, st.shard, "val"))
        history.append(row)
        state = host_tree((params, opt_state, base_key))
        if main:  # one process writes; every process resumes from it
            # The checkpoint first: the log never lists an epoch that has none.
            try:
                save_checkpoint(run_dir, epoch, state,
                                {"config": cfg_dict, "history": history,
                                 "num_params": st.num_params},
                                keep=t.keep_checkpoints)
                _write_log(log_path, history)
            except OSError as err:
                last = f"epoch {done_epoch}'s" if done_epoch else "no"
                raise write_error(
                    run_dir, f"write the checkpoint of epoch {epoch} ({last} checkpoint "
                    "is the newest there; free space and continue with --resume)", err
                ) from None
        done_epoch = epoch
        _barrier(f"checkpoint {epoch}")
        progress.end(row)
        if row.get("skipped_steps", 0) > 0:  # (unconverged steps applied: in the metrics)
            warnings.warn(
                f"{cfg.name}, epoch {row['epoch']}: {row['skipped_steps']:.0%} of the train "
                f"steps were skipped (not applied): {row.get('nonfinite_steps', 0):.0%} had "
                "a non-finite gradient (a forward solve that went non-finite or diverged, a "
                "failed backward solve, or a NaN in the loss) and "
                f"{row.get('unconverged_steps', 0):.0%} an unconverged forward solve "
                f"(train.on_unconverged: {t.on_unconverged}). See `skipped_steps`, "
                "`nonfinite_steps`, `unconverged_steps` in the metrics.",
                RuntimeWarning, stacklevel=3)
        if callback is not None:
            callback(row)
        if interrupts.requested:
            raise TrainingInterrupted(done_epoch, run_dir)
    plots = plot_history(history, run_dir, cfg.name) if history and main else []
    if jax.process_count() > 1:  # the trained model as host arrays in every process
        params = jax.tree_util.tree_map(jnp.asarray, host_tree(params))
    return FitResult(eqx.combine(params, st.static), history, run_dir, dict(steps.traces),
                     st.num_params, plots)


def _check_policy(cfg, m, epoch, step, done_epoch, run_dir) -> None:
    """Raise `TrainingError` for a step that broke a `raise` policy (one device-to-host
    read per step, only when such a policy is set; the step was not applied)."""
    t = cfg.train
    checks = []
    if t.on_nonfinite == "raise":
        checks.append(("nonfinite_steps", "its gradient was not finite (a forward solve "
                       "that went non-finite or diverged, a failed backward solve, or a "
                       "NaN in the loss)", "train.on_nonfinite"))
    if t.on_unconverged == "raise":
        checks.append(("unconverged_steps", "a forward solve stopped without converging "
                       f"(failure rate {float(m['failure_rate']):.3f})",
                       "train.on_unconverged"))
    for name, why, key in checks:
        if float(m[name]) > 0:
            raise TrainingError(
                f"{cfg.name}: epoch {epoch}, step {step}: {why}; the step was not applied "
                f"and the run stops ({key}: raise). The newest checkpoint is epoch "
                f"{done_epoch}'s in {str(run_dir)!r}."
            )


# The keys `evaluate_checkpoint` may change: how the trained model is evaluated.
EVAL_KEYS = ("model.eval_rtol", "model.eval_atol", "model.eval_max_steps",
             "train.eval_batch")


def evaluate_checkpoint(path, *, overrides=(), devices=None) -> dict:
    """Rebuild the model from a checkpoint's own config (the same setup as `fit`) and
    evaluate it on the test split. `overrides` (`["model.eval_max_steps=80", ...]`)
    change how it is evaluated, one of `EVAL_KEYS` each (the forward solver's step cap
    and tolerances at evaluation, the eval batch); every trained parameter is kept."""
    for key, _ in parse_overrides(overrides):
        if key not in EVAL_KEYS:
            raise ConfigError(f"evaluating a checkpoint can change only {EVAL_KEYS}, got "
                              f"key {key!r} (the others define the trained model).")
    header, _ = read_header(path)
    cfg = config_from_dict(migrate_config(header["config"]), overrides, source=str(path))
    check_config(cfg)
    st = _setup(cfg, devices)
    like = (st.params, st.optimiser.init(st.params), jr.key_data(jr.key(0)))
    header, (params, _, _) = load_checkpoint(path, like)
    out = evaluate(st.steps, params, st.test, cfg.train.eval_batch, st.shard)
    return {"name": cfg.name, "epoch": header["epoch"], **out}
