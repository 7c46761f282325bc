"""`fit`: the training loop (epochs, metrics, checkpoints, exact resume, data
parallelism over all visible devices), and the evaluation of a checkpoint."""

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
from ._config import check_config, Config, config_from_dict, ConfigError
from ._data import load_data, pad_eval
from ._report import host_tree, peak_memory_mb, plot_history, Progress, to_host
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
    train, test = load_data(cfg.data, t.dtype)
    x = train[0]
    model = make_model(cfg, x.shape[1], x.shape[-1])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    steps_per_epoch = ik_data.num_batches(x.shape[0], t.batch)
    optimiser = make_optimiser(cfg.optim, steps_per_epoch * t.epochs, params)
    mesh = Mesh(np.array(devices), ("data",))
    return _Setup(train, test, params, static, optimiser,
                  Steps(cfg, static, optimiser, mesh), steps_per_epoch, count_params(model),
                  mesh)


def evaluate(steps: Steps, params, test, eval_batch: int, shard) -> dict:
    """Mean test metrics over the whole test split (padded eval batches, masked)."""
    x, y, mask = pad_eval(*test, eval_batch)
    sums = None
    for i in range(0, x.shape[0], eval_batch):
        part = steps.eval(params, shard(x[i:i + eval_batch]), shard(y[i:i + eval_batch]),
                          shard(mask[i:i + eval_batch]),
                          shard(np.arange(i, i + eval_batch, dtype=np.int32)))
        part = host_tree(part)  # summed on the host: no eager op on global arrays
        sums = part if sums is None else jax.tree_util.tree_map(np.add, sums, part)
    n = int(mask.sum())
    return {f"test_{k}": (None if v is None else v / n) for k, v in to_host(sums).items()}


def _write_log(path, history):
    atomic_write(path, "".join(json.dumps(h) + "\n" for h in history).encode())


def fit(cfg: Config, *, resume: bool = False, devices=None,
        callback: Callable[[dict], None] | None = None,
        step_callback: Callable[[int, int], None] | None = None) -> FitResult:
    """Train `cfg`; log, checkpoints and plots go to `cfg.train.checkpoint_dir`.

    - `resume`: continue from the newest checkpoint there (same config required, apart
      from `train.progress`); the result equals an uninterrupted run's.
    - `devices`: the devices to spread each batch over (default: all visible ones);
      the model is replicated, the batch axis sharded (`jax.sharding`).
    - `callback(row)` after each epoch; `step_callback(epoch, step)` after each step
      (e.g. to stop a run).
    """
    check_config(cfg)  # before the checkpoint directory is looked at
    t = cfg.train
    run_dir = pathlib.Path(t.checkpoint_dir)
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
        header, (params, opt_state, base_key) = load_checkpoint(existing[-1], like)
        diff = config_diff(header["config"], cfg_dict)
        if diff:
            raise ConfigError(
                f"cannot resume from {str(existing[-1])!r}: the config differs at "
                f"{', '.join(diff)}."
            )
        history = header["history"]
        start_epoch = header["epoch"]
    params, opt_state = st.replicate((params, opt_state))
    main = _is_main()
    log_path = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_log(log_path, history)
        (run_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2))

    x, y = st.train
    key = jr.wrap_key_data(base_key)
    compiled = None
    progress = Progress(t.progress and main, cfg.name, t.epochs, st.steps_per_epoch)
    for epoch in range(start_epoch + 1, t.epochs + 1):
        progress.start()
        acc_metrics, prev_loss = [], None
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(ik_data.batches(x, y, t.batch, seed=t.seed,
                                                     epoch=epoch)):
            step = (epoch - 1) * st.steps_per_epoch + i
            args = (params, opt_state, st.shard(xb), st.shard(yb), key, jnp.asarray(step))
            if compiled is None:  # compiled once; also gives the step's memory analysis
                compiled = steps.train.lower(*args).compile()
            params, opt_state, m = compiled(*args)
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
        history.append(row)
        state = host_tree((params, opt_state, base_key))
        if main:  # one process writes; every process resumes from it
            _write_log(log_path, history)
            save_checkpoint(run_dir, epoch, state,
                            {"config": cfg_dict, "history": history,
                             "num_params": st.num_params},
                            keep=t.keep_checkpoints)
        _barrier(f"checkpoint {epoch}")
        progress.end(row)
        if row.get("skipped_steps", 0) > 0:
            warnings.warn(
                f"{cfg.name}, epoch {row['epoch']}: {row['skipped_steps']:.0%} of the train "
                "steps were skipped because their gradient was not finite (a failed "
                "backward solve, or a NaN in the loss); see `skipped_steps` in the metrics.",
                RuntimeWarning, stacklevel=2)
        if callback is not None:
            callback(row)
    plots = plot_history(history, run_dir, cfg.name) if history and main else []
    if jax.process_count() > 1:  # the trained model as host arrays in every process
        params = jax.tree_util.tree_map(jnp.asarray, host_tree(params))
    return FitResult(eqx.combine(params, st.static), history, run_dir, dict(steps.traces),
                     st.num_params, plots)


def evaluate_checkpoint(path, *, devices=None) -> dict:
    """Rebuild the model from a checkpoint's own config (the same setup as `fit`) and
    evaluate it on the test split."""
    header, _ = read_header(path)
    cfg = config_from_dict(header["config"], source=str(path))
    check_config(cfg)
    st = _setup(cfg, devices)
    like = (st.params, st.optimiser.init(st.params), jr.key_data(jr.key(0)))
    header, (params, _, _) = load_checkpoint(path, like)
    out = evaluate(st.steps, params, st.test, cfg.train.eval_batch, st.shard)
    return {"name": cfg.name, "epoch": header["epoch"], **out}
