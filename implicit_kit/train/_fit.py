"""The training loop: jit-compiled train and eval steps, metrics, checkpoints, resume,
plots, data parallelism over all visible devices."""

import dataclasses
import json
import math
import pathlib
import sys
import time
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .. import data as ik_data
from .._fixed_point import backward_probe
from ..models import init_loss
from ..nn import prepare
from ..regularizers import jacobian_frobenius
from ._build import build_model, check_model_config
from ._checkpoint import (
    atomic_write,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from ._config import Config, ConfigError, DataConfig, OptimConfig


_ODE_KINDS = ("node", "anode", "homoode")
_RESUME_FREE = ("train.progress",)


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


def check_config(cfg: Config) -> None:
    """Every check that can fail before training starts (raises `ConfigError`,
    `DatasetNotFoundError`)."""
    check_model_config(cfg.model)
    kind = cfg.model.kind
    if cfg.regularizers.jacobian > 0 and kind != "deq":
        raise ConfigError("key 'regularizers.jacobian' is only used by model.kind 'deq'.")
    if cfg.regularizers.error_penalty > 0 and kind not in _ODE_KINDS:
        raise ConfigError(
            "key 'regularizers.error_penalty' is only used by the ODE kinds "
            f"{_ODE_KINDS}."
        )
    if cfg.regularizers.error_penalty > 0 and cfg.model.adjoint == "backsolve":
        raise ConfigError(
            "key 'regularizers.error_penalty' needs model.adjoint 'checkpoint' (its gradient "
            "through a backsolve adjoint would be silently zero)."
        )
    opt = getattr(optax, cfg.optim.name, None)
    if cfg.optim.name.startswith("_") or not callable(opt):
        raise ConfigError(f"key 'optim.name': {cfg.optim.name!r} is not an optax optimiser.")
    for key in ("epochs", "batch", "eval_batch", "eval_every", "keep_checkpoints"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"key 'train.{key}' must be positive, got "
                              f"{getattr(cfg.train, key)}.")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"key 'optim.lr' must be positive, got {cfg.optim.lr}.")
    if cfg.data.upsample < 1:
        raise ConfigError(f"key 'data.upsample' must be positive, got {cfg.data.upsample}.")
    if cfg.train.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("key 'train.dtype' is float64 but JAX runs without "
                          "`jax_enable_x64`; set JAX_ENABLE_X64=1.")
    if cfg.data.name != "digits" and cfg.data.dir is None:
        raise ConfigError(f"key 'data.dir' is required for dataset {cfg.data.name!r}.")
    if cfg.data.name != "digits" and not pathlib.Path(cfg.data.dir).expanduser().is_dir():
        raise ik_data.DatasetNotFoundError(
            f"key 'data.dir': the directory {cfg.data.dir!r} for dataset "
            f"{cfg.data.name!r} does not exist."
        )


def load_data(d: DataConfig, dtype: str = "float32"):
    """`(train, test)` of the config's `data` section as normalised numpy arrays of
    `dtype` (statistics of the training split)."""
    kw = {"root": d.dir, "seed": d.split_seed, "test_size": d.test_size}
    x, y = ik_data.load(d.name, "train", **kw)
    xt, yt = ik_data.load(d.name, "test", **kw)
    if d.upsample > 1:
        x = x.repeat(d.upsample, 2).repeat(d.upsample, 3)
        xt = xt.repeat(d.upsample, 2).repeat(d.upsample, 3)
    mean, std = ik_data.normalisation(x)
    dtype = np.dtype(dtype)
    return ((ik_data.normalise(x, mean, std).astype(dtype), y),
            (ik_data.normalise(xt, mean, std).astype(dtype), yt))


def make_model(cfg: Config, in_channels: int, spatial: int, classes: int = 10):
    model = build_model(cfg.model, in_channels=in_channels, classes=classes,
                        spatial=spatial, key=jr.key(cfg.train.seed),
                        error_penalty=cfg.regularizers.error_penalty > 0)
    dtype = jnp.dtype(cfg.train.dtype)
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


def make_optimiser(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The config's `optim` section as an optax optimiser over `total_steps` steps."""
    total = max(total_steps, 1)
    if o.schedule == "constant":
        lr = o.lr
    elif o.schedule == "cosine":
        lr = optax.cosine_decay_schedule(o.lr, total, alpha=o.final_lr_factor)
    else:
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, total,
                                                end_value=o.lr * o.final_lr_factor)
    parts = []
    if o.clip > 0:
        parts.append(optax.clip_by_global_norm(o.clip))
    if o.weight_decay > 0:
        parts.append(optax.add_decayed_weights(o.weight_decay))
    parts.append(getattr(optax, o.name)(learning_rate=lr))
    return optax.chain(*parts)


def count_params(model) -> int:
    """The number of trainable (floating-point) parameters of `model`."""
    return int(sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(model,
                                                                        eqx.is_inexact_array))))


def _uses_probe(cfg: Config) -> bool:
    return cfg.model.kind == "mondeq" or (cfg.model.kind == "deq" and cfg.model.adjoint in (
        None, "implicit"))


def _learned_init(cfg: Config) -> bool:
    return cfg.model.kind in ("deq", "homoode") and cfg.model.init in ("learned", "skip")


def _forward_steps(stats):
    return stats["nfe"] if "nfe" in stats else stats["num_steps"]


class _Steps:
    """The jitted train and eval steps for one config (traces counted)."""

    def __init__(self, cfg: Config, static, optimiser):
        self.cfg, self.static, self.optimiser = cfg, static, optimiser
        self.traces = {"train": 0, "eval": 0}
        self.train = jax.jit(self._train, donate_argnums=(0, 1))
        self.eval = jax.jit(self._eval)

    def _loss(self, params, probe, xb, yb, key):
        cfg = self.cfg
        model = eqx.combine(params, self.static)
        keys = jr.split(key, xb.shape[0] + 1)
        extra = {"probe": probe} if probe is not None else {}

        def one(x, k):
            return model(x, key=k, **extra)

        logits, st = jax.vmap(one)(xb, keys[1:])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        total = loss
        reg = cfg.regularizers
        if _learned_init(cfg) and reg.init_loss > 0:
            total = total + reg.init_loss * init_loss(st["z0"], st["z_end"])
        if reg.error_penalty > 0:
            total = total + reg.error_penalty * jnp.mean(st["error_penalty"])
        if reg.jacobian > 0:
            cell = prepare(model.block.cell, key=None, inference=True)
            feats = jax.vmap(model.stem)(xb)
            jac = jax.vmap(lambda z, f, k: jacobian_frobenius(cell, z, f, key=k))(
                st["z_end"], feats, jr.split(keys[0], xb.shape[0]))
            total = total + reg.jacobian * jnp.mean(jac)
        metrics = {
            "loss": loss,
            "acc": jnp.mean(jnp.argmax(logits, -1) == yb),
            "fwd_steps": jnp.mean(_forward_steps(st)),
            "failure_rate": jnp.mean(st["result"] != 0),
        }
        if "residual" in st:
            metrics["residual"] = jnp.mean(st["residual"])
        return total, metrics

    def _train(self, params, opt_state, xb, yb, key, step):
        self.traces["train"] += 1  # runs only while tracing
        key = jr.fold_in(key, step)
        probe = backward_probe(xb.dtype) if _uses_probe(self.cfg) else None
        grad_fn = jax.value_and_grad(self._loss, argnums=(0, 1), has_aux=True)
        (_, metrics), (grads, probe_grad) = grad_fn(params, probe, xb, yb, key)
        if probe is not None:
            metrics["bwd_steps"] = probe_grad[0] / xb.shape[0]
            metrics["bwd_failure_rate"] = probe_grad[2] / xb.shape[0]
        # A step whose gradient is not finite (e.g. a failed backward solve, which
        # `ImplicitAdjoint` reports as NaN rather than a silently wrong gradient) is
        # skipped, not applied, and counted in the metrics.
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                    for g in jax.tree_util.tree_leaves(grads)]))
        grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, 0), grads)
        updates, new_state = self.optimiser.update(grads, opt_state, params)
        new_params = eqx.apply_updates(params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(
            lambda a, b: jnp.where(finite, a, b) if eqx.is_array(a) else a, new, old)
        metrics["skipped_steps"] = 1.0 - finite.astype(jnp.float32)
        return keep(new_params, params), keep(new_state, opt_state), metrics

    def _eval(self, params, xb, yb, mask):
        self.traces["eval"] += 1
        model = eqx.combine(params, self.static)
        logits, st = jax.vmap(lambda x: model(x, inference=True))(xb)
        w = mask.astype(logits.dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        sums = {
            "loss": jnp.sum(w * ce),
            "acc": jnp.sum(w * (jnp.argmax(logits, -1) == yb)),
            "fwd_steps": jnp.sum(w * _forward_steps(st)),
            "failure_rate": jnp.sum(w * (st["result"] != 0)),
        }
        if "residual" in st:
            sums["residual"] = jnp.sum(w * st["residual"])
        return sums


def _peak_memory_mb(compiled) -> tuple[float, str]:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak"
    try:
        m = compiled.memory_analysis()
        total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes)
        return total / 2**20, "compiled train step"
    except Exception:  # pragma: no cover - backends without memory analysis
        return math.nan, "unavailable"


class _Progress:
    """A per-step bar on an interactive stderr; one summary line per epoch always."""

    def __init__(self, enabled: bool, name: str, epochs: int, steps: int):
        self.enabled, self.name, self.epochs, self.steps = enabled, name, epochs, steps
        self.bar = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, epoch: int, i: int, loss: float | None):
        if not self.bar:
            return
        width = 24
        done = int(width * i / self.steps)
        bar = "#" * done + "." * (width - done)
        rate = i / max(time.perf_counter() - self.t0, 1e-9)
        text = f"\r{self.name} epoch {epoch}/{self.epochs} [{bar}] {i}/{self.steps}"
        if loss is not None:
            text += f" loss {loss:.4f}"
        sys.stderr.write(text + f" {rate:.1f} it/s ")
        sys.stderr.flush()

    def start(self):
        self.t0 = time.perf_counter()

    def end(self, row: dict):
        if not self.enabled:
            return
        test = f" test acc {row['test_acc']:.4f}" if "test_acc" in row else ""
        sys.stderr.write(
            f"\r{self.name} epoch {row['epoch']}/{self.epochs} loss {row['loss']:.4f} "
            f"acc {row['acc']:.4f}{test} fwd {row['fwd_steps']:.1f} "
            f"{row['seconds']:.1f}s{' ' * 20}\n"
        )
        sys.stderr.flush()


def _diff_keys(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        where = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff_keys(a[k], b[k], where + ".")
        elif a.get(k) != b.get(k) and where not in _RESUME_FREE:
            out.append(where)
    return out


def _to_host(tree) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def plot_history(history: list[dict], run_dir, name: str) -> list[pathlib.Path]:
    """Loss/accuracy curves and forward steps per epoch as PNG files in `run_dir`."""
    # The object-oriented API: no pyplot state and no backend switch (a notebook keeps
    # its inline backend).
    from matplotlib.figure import Figure

    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    paths = []
    fig = Figure(figsize=(9, 3.5))
    a1, a2 = fig.subplots(1, 2)
    a1.plot(epochs, [h["loss"] for h in history], label="train")
    a2.plot(epochs, [h["acc"] for h in history], label="train")
    ev = [h for h in history if "test_acc" in h]
    if ev:
        a1.plot([h["epoch"] for h in ev], [h["test_loss"] for h in ev], label="test")
        a2.plot([h["epoch"] for h in ev], [h["test_acc"] for h in ev], label="test")
    a1.set(xlabel="epoch", ylabel="cross-entropy", title=f"{name}: loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title=f"{name}: accuracy")
    a1.legend()
    a2.legend()
    fig.tight_layout()
    paths.append(run_dir / "curves.png")
    fig.savefig(paths[-1], dpi=100)
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    ax.plot(epochs, [h["fwd_steps"] for h in history], marker="o", label="train forward")
    if any("bwd_steps" in h for h in history):
        ax.plot(epochs, [h.get("bwd_steps", math.nan) for h in history], marker="s",
                label="train backward")
    if ev:
        ax.plot([h["epoch"] for h in ev], [h["test_fwd_steps"] for h in ev], marker="^",
                label="test forward")
    ax.set(xlabel="epoch", ylabel="steps / NFE per sample", title=f"{name}: solver steps")
    ax.legend()
    fig.tight_layout()
    paths.append(run_dir / "forward_steps.png")
    fig.savefig(paths[-1], dpi=100)
    return paths


def _pad_eval(x, y, size):
    n = x.shape[0]
    pad = (-n) % size
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    if pad:
        x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
        y = np.concatenate([y, np.repeat(y[:1], pad, 0)])
    return x, y, mask


def evaluate(steps: _Steps, params, test, eval_batch: int, shard) -> dict:
    x, y, mask = _pad_eval(*test, eval_batch)
    sums = None
    for i in range(0, x.shape[0], eval_batch):
        part = steps.eval(params, shard(x[i:i + eval_batch]), shard(y[i:i + eval_batch]),
                          shard(mask[i:i + eval_batch]))
        sums = part if sums is None else jax.tree_util.tree_map(jnp.add, sums, part)
    n = int(mask.sum())
    return {f"test_{k}": float(v) / n for k, v in jax.device_get(sums).items()}


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
    check_config(cfg)
    t = cfg.train
    run_dir = pathlib.Path(t.checkpoint_dir)
    existing = list_checkpoints(run_dir)
    if existing and not resume:
        raise CheckpointError(
            f"{str(run_dir)!r} already holds checkpoints ({existing[-1].name}); resume with "
            "`--resume` or choose another train.checkpoint_dir."
        )
    train, test = load_data(cfg.data, cfg.train.dtype)
    devices = list(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    for key, value in (("train.batch", t.batch), ("train.eval_batch", t.eval_batch)):
        if value % n_dev:
            raise ConfigError(f"key '{key}'={value} must be divisible by the {n_dev} devices.")
    mesh = Mesh(np.array(devices), ("data",))
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def shard(a):
        return jax.device_put(a, data_sharding)

    x, y = train
    model = make_model(cfg, x.shape[1], x.shape[-1])
    num_params = count_params(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    steps_per_epoch = ik_data.num_batches(x.shape[0], t.batch)
    optimiser = make_optimiser(cfg.optim, steps_per_epoch * t.epochs)
    opt_state = optimiser.init(params)
    base_key = jr.key_data(jr.key(t.seed + 1))
    history: list[dict] = []
    start_epoch = 0
    cfg_dict = cfg.to_dict()
    if resume and existing:
        like = (params, opt_state, base_key)
        header, (params, opt_state, base_key) = load_checkpoint(existing[-1], like)
        diff = _diff_keys(header["config"], cfg_dict)
        if diff:
            raise ConfigError(
                f"cannot resume from {str(existing[-1])!r}: the config differs at "
                f"{', '.join(diff)}."
            )
        history = header["history"]
        start_epoch = header["epoch"]
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(opt_state, replicated)
    steps = _Steps(cfg, static, optimiser)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "metrics.jsonl"
    atomic_write(log_path, "".join(json.dumps(h) + "\n" for h in history).encode())
    (run_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2))

    key = jr.wrap_key_data(base_key)
    compiled = None
    progress = _Progress(t.progress, cfg.name, t.epochs, steps_per_epoch)
    for epoch in range(start_epoch + 1, t.epochs + 1):
        progress.start()
        acc_metrics, prev_loss = [], None
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(ik_data.batches(x, y, t.batch, seed=t.seed,
                                                     epoch=epoch)):
            step = (epoch - 1) * steps_per_epoch + i
            args = (params, opt_state, shard(xb), shard(yb), key, jnp.asarray(step))
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
        mean = _to_host(jax.tree_util.tree_map(lambda *v: jnp.mean(jnp.stack(v)),
                                               *acc_metrics))
        peak, source = _peak_memory_mb(compiled)
        row = {"epoch": epoch, "step": epoch * steps_per_epoch, **mean, "seconds": seconds,
               "peak_memory_mb": peak, "memory_source": source}
        if epoch % t.eval_every == 0 or epoch == t.epochs:
            row.update(evaluate(steps, params, test, t.eval_batch, shard))
        history.append(row)
        atomic_write(log_path, "".join(json.dumps(h) + "\n" for h in history).encode())
        save_checkpoint(run_dir, epoch, (params, opt_state, base_key),
                        {"config": cfg_dict, "history": history, "num_params": num_params},
                        keep=t.keep_checkpoints)
        progress.end(row)
        if row.get("skipped_steps", 0) > 0:
            warnings.warn(
                f"{cfg.name}, epoch {row['epoch']}: {row['skipped_steps']:.0%} of the train "
                "steps were skipped because their gradient was not finite (a failed "
                "backward solve, or a NaN in the loss); see `skipped_steps` in the metrics.",
                RuntimeWarning, stacklevel=2)
        if callback is not None:
            callback(row)
    plots = plot_history(history, run_dir, cfg.name) if history else []
    return FitResult(eqx.combine(params, static), history, run_dir, dict(steps.traces),
                     num_params, plots)


def evaluate_checkpoint(path, *, devices=None) -> dict:
    """Rebuild the model from a checkpoint's own config and evaluate it on the test split."""
    from ._checkpoint import read_header
    from ._config import config_from_dict

    header, _ = read_header(path)
    cfg = config_from_dict(header["config"], source=str(path))
    check_config(cfg)
    train, test = load_data(cfg.data, cfg.train.dtype)
    model = make_model(cfg, train[0].shape[1], train[0].shape[-1])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    steps_per_epoch = ik_data.num_batches(train[0].shape[0], cfg.train.batch)
    optimiser = make_optimiser(cfg.optim, steps_per_epoch * cfg.train.epochs)
    like = (params, optimiser.init(params), jr.key_data(jr.key(0)))
    header, (params, _, _) = load_checkpoint(path, like)
    devices = list(jax.devices() if devices is None else devices)
    mesh = Mesh(np.array(devices), ("data",))
    steps = _Steps(cfg, static, optimiser)
    out = evaluate(steps, params, test, cfg.train.eval_batch,
                   lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))))
    return {"name": cfg.name, "epoch": header["epoch"], **out}
