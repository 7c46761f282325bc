"""The configs of the research commands (`implicit-kit tune`, `implicit-kit stn`), read by
the training layer's loader (`ik.train.load_config(path, schema=...)`)."""

import dataclasses
from typing import Any, ClassVar

import jax

from ..train import ConfigError, DataConfig, OptimConfig


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """The model of `implicit-kit tune`: an MLP on the flattened images, `depth` hidden
    layers of `width` units (ReLU)."""

    width: int = 32
    depth: int = 1


@dataclasses.dataclass(frozen=True)
class HyperConfig:
    """`implicit-kit tune`: weight decay tuned by hypergradients against a grid search.

    The training split is cut into a training part and `validation` images (fixed by
    `seed`). The inner loss is full-batch cross-entropy on the training part plus
    `½ Σ λ_i w_i²`, with λ = exp(h) of one value `per` `parameter` (one per weight),
    `tensor` (per weight array) or `shared`, from `init`.
    - Tuning: [`implicit_kit.hyper.tune`][] alternates `inner_steps` steps of the
      `optim` optimiser with one Adam step (`outer_lr`) on h along the hypergradient of
      the validation cross-entropy (`method`: `neumann` with `k` terms and step
      `alpha`, `cg`/`gmres` with `rtol`, `max_steps`), `outer_steps` times.
    - Baseline: `grid_points` shared decays, log-spaced over [`grid_min`, `grid_max`],
      each trained for the same `outer_steps × inner_steps` steps from the same
      initialisation, in one vmapped call ([`implicit_kit.hyper.vmap_hparams`][]); the
      best is chosen by validation loss.
    - `out_dir`: results (`results.json`, `history.jsonl`, `tune.png`); `dtype`.
    """

    CHOICES: ClassVar[dict] = {"per": ("parameter", "tensor", "shared"),
                               "method": ("neumann", "cg", "gmres"),
                               "dtype": ("float32", "float64")}

    per: str = "parameter"
    init: float = 1e-3
    method: str = "neumann"
    k: int = 20
    alpha: float = 0.1
    rtol: float = 1e-4
    max_steps: int = 50
    inner_steps: int = 20
    outer_steps: int = 100
    outer_lr: float = 0.03
    grid_points: int = 16
    grid_min: float = 1e-6
    grid_max: float = 1.0
    validation: int = 360
    seed: int = 0
    out_dir: str = "runs/tune"
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """The config of `implicit-kit tune` (see `HyperConfig`); `optim` is the inner
    optimiser (its `weight_decay` must be 0: the decay is what is tuned)."""

    name: str
    tune: HyperConfig = dataclasses.field(default_factory=HyperConfig)
    model: MLPConfig = dataclasses.field(default_factory=MLPConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (what checkpoints and logs record)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StnSettings:
    """`implicit-kit stn`: dropout on the input and on the hidden units, and weight decay,
    tuned by Self-Tuning Networks against a vmapped grid and hypergradient tuning.

    The training split is cut as in `tune` (`validation` images, fixed by `seed`); every
    arm trains an MLP (`model`) full-batch with `optim` for the same number of steps,
    `outer_steps × train_steps`, once per seed `seed, seed + 1, ...` (`seeds` of them).
    - STN: the MLP built of [`implicit_kit.hyper.StnLinear`][] layers, trained by
      [`implicit_kit.hyper.stn`][] from `dropout_in`, `dropout_hidden`, `weight_decay`
      (rates through a sigmoid, the decay through exp), `train_steps` weight steps and
      `val_steps` Adam steps (`hparam_lr`) on the hyperparameters per round, after
      `warmup` rounds of weights only; perturbation `scale`, `tune_scales`,
      `entropy_weight` as `stn`'s.
    - Grid: `grid_points` values of each hyperparameter (rates evenly in [0,
      `dropout_max`], decays log-spaced over [`wd_min`, `wd_max`]), every combination
      trained in one vmapped call; the best by validation loss.
    - Hypergradient: [`implicit_kit.hyper.tune`][] on one weight decay per weight matrix
      (dropout is random: the implicit function theorem needs a deterministic inner
      problem), `tune_inner_steps` steps between Neumann hypergradient steps (`tune_k`
      terms, `tune_alpha`, Adam `tune_lr`), from `weight_decay`.
    - Retrained: a fresh MLP trained with STN's discovered schedule, and one with its
      final values held fixed.
    - `out_dir`: `results.json`, `stn.png`; `dtype`.
    """

    CHOICES: ClassVar[dict] = {"dtype": ("float32", "float64")}

    dropout_in: float = 0.05
    dropout_hidden: float = 0.05
    weight_decay: float = 1e-4
    outer_steps: int = 1000
    train_steps: int = 2
    val_steps: int = 1
    warmup: int = 100
    hparam_lr: float = 3e-3
    scale: float = 0.5
    tune_scales: bool = True
    entropy_weight: float = 1e-3
    grid_points: int = 3
    dropout_max: float = 0.6
    wd_min: float = 1e-5
    wd_max: float = 1e-2
    tune_inner_steps: int = 20
    tune_k: int = 20
    tune_alpha: float = 0.1
    tune_lr: float = 0.03
    seeds: int = 3
    validation: int = 360
    seed: int = 0
    out_dir: str = "runs/stn"
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class StnConfig:
    """The config of `implicit-kit stn` (see `StnSettings`); `optim` trains the weights of
    every arm (its `weight_decay` must be 0: the decay is tuned)."""

    name: str
    stn: StnSettings = dataclasses.field(default_factory=StnSettings)
    model: MLPConfig = dataclasses.field(default_factory=lambda: MLPConfig(width=128))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (what the results record)."""
        return dataclasses.asdict(self)


def check_tune_config(cfg: TuneConfig) -> None:
    """Raise `ConfigError` (naming the key) for settings that cannot run."""
    t = cfg.tune
    problems = []
    if cfg.optim.weight_decay != 0:
        problems.append("key 'optim.weight_decay' must be 0: the weight decay is what "
                        "`tune` tunes")
    for key in ("inner_steps", "outer_steps", "grid_points", "validation", "k",
                "max_steps"):
        if getattr(t, key) < 1:
            problems.append(f"key 'tune.{key}' must be >= 1, got {getattr(t, key)}")
    for key in ("init", "grid_min", "grid_max", "alpha", "outer_lr", "rtol"):
        if not getattr(t, key) > 0:
            problems.append(f"key 'tune.{key}' must be > 0, got {getattr(t, key)}")
    if not t.grid_max > t.grid_min:
        problems.append(f"key 'tune.grid_max' ({t.grid_max}) must exceed 'tune.grid_min' "
                        f"({t.grid_min})")
    if cfg.model.width < 1 or cfg.model.depth < 0:
        problems.append("keys 'model.width' >= 1 and 'model.depth' >= 0 are required")
    if t.dtype == "float64" and not jax.config.jax_enable_x64:
        problems.append("key 'tune.dtype' is float64 but JAX runs without "
                        "`jax_enable_x64`; set JAX_ENABLE_X64=1")
    if problems:
        raise ConfigError(f"config {cfg.name!r}: " + "; ".join(problems) + ".")


def check_stn_config(cfg: StnConfig) -> None:
    """Raise `ConfigError` (naming the key) for settings that cannot run."""
    t = cfg.stn
    problems = []
    if cfg.optim.weight_decay != 0:
        problems.append("key 'optim.weight_decay' must be 0: the weight decay is what "
                        "`stn` tunes")
    for key in ("outer_steps", "train_steps", "grid_points", "tune_inner_steps", "tune_k",
                "seeds", "validation"):
        if getattr(t, key) < 1:
            problems.append(f"key 'stn.{key}' must be >= 1, got {getattr(t, key)}")
    for key in ("val_steps", "warmup"):
        if getattr(t, key) < 0:
            problems.append(f"key 'stn.{key}' must be >= 0, got {getattr(t, key)}")
    for key in ("dropout_in", "dropout_hidden"):
        if not 0 < getattr(t, key) < 1:
            problems.append(f"key 'stn.{key}' must be in (0, 1), got {getattr(t, key)}")
    if not 0 < t.dropout_max < 1:
        problems.append(f"key 'stn.dropout_max' must be in (0, 1), got {t.dropout_max}")
    for key in ("weight_decay", "wd_min", "wd_max", "hparam_lr", "scale", "tune_alpha",
                "tune_lr"):
        if not getattr(t, key) > 0:
            problems.append(f"key 'stn.{key}' must be > 0, got {getattr(t, key)}")
    if t.entropy_weight < 0:
        problems.append(f"key 'stn.entropy_weight' must be >= 0, got {t.entropy_weight}")
    if not t.wd_max > t.wd_min:
        problems.append(f"key 'stn.wd_max' ({t.wd_max}) must exceed 'stn.wd_min' "
                        f"({t.wd_min})")
    total = t.outer_steps * t.train_steps
    if total % t.tune_inner_steps:
        problems.append(f"key 'stn.tune_inner_steps' ({t.tune_inner_steps}) must divide the "
                        f"training budget outer_steps × train_steps = {total}")
    if cfg.model.width < 1 or cfg.model.depth < 1:
        problems.append("keys 'model.width' >= 1 and 'model.depth' >= 1 are required")
    if t.dtype == "float64" and not jax.config.jax_enable_x64:
        problems.append("key 'stn.dtype' is float64 but JAX runs without "
                        "`jax_enable_x64`; set JAX_ENABLE_X64=1")
    if problems:
        raise ConfigError(f"config {cfg.name!r}: " + "; ".join(problems) + ".")
