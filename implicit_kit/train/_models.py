"""The `model` section of a training config: one frozen dataclass per model kind (a tagged
union on `kind`), each declaring its own keys, their allowed values (`CHOICES`), its
checks (run when it is made, so a section that exists is valid) and what it builds.

Adding a model kind is one class here: subclass `ClassifierConfig` (a block between the
shared stem and head) or `ModelConfig`, set `KIND`, declare the fields, and implement
`_block` (or `build`). The loader, the validation and `build_model` read the class.
"""

import dataclasses
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.random as jr

from .. import models, nn, solvers
from .._adjoint import (
    ImplicitAdjoint,
    JFBAdjoint,
    NeumannAdjoint,
    PhantomAdjoint,
    ReversibleAdjoint,
    UnrolledAdjoint,
)
from ._schema import ConfigError


# The choices of the sections, each defined once: the allowed values are the keys (the
# loader and its messages read them), the values what the section builds from them.
DEQ_SOLVERS = {"anderson": solvers.Anderson, "picard": solvers.Picard,
               "broyden": solvers.Broyden, "reversible": solvers.Reversible}
ODE_SOLVERS = {"dopri5": dfx.Dopri5, "tsit5": dfx.Tsit5, "bosh3": dfx.Bosh3,
               "heun": dfx.Heun, "euler": dfx.Euler}
ODE_ADJOINTS = {"checkpoint": dfx.RecursiveCheckpointAdjoint,
                "backsolve": dfx.BacksolveAdjoint}
# `linear_solver`: `auto` is `ImplicitAdjoint()`'s default, the others its names.
LINEAR_SOLVERS = ("auto", "picard", "gmres")
# each built from the section (a `DEQConfig`)
DEQ_ADJOINTS = {
    "implicit": lambda m: m.implicit_adjoint(),
    "phantom": lambda m: PhantomAdjoint(k=m.adjoint_steps),
    "jfb": lambda m: JFBAdjoint(),
    "neumann": lambda m: NeumannAdjoint(k=m.adjoint_steps),
    "unrolled": lambda m: UnrolledAdjoint(),
    "reversible": lambda m: ReversibleAdjoint(),
}


def _positive(section, *keys) -> None:
    for key in keys:
        if getattr(section, key) < 1:
            raise ConfigError(f"key 'model.{key}' must be positive, got "
                              f"{getattr(section, key)}.")


def _in_range(value, lo, hi, key: str, closed_hi: bool = False, closed_lo: bool = False):
    ok = (lo <= value if closed_lo else lo < value) and (value <= hi if closed_hi
                                                         else value < hi)
    if not ok:
        raise ConfigError(f"key 'model.{key}' must be in {'[' if closed_lo else '('}{lo}, "
                          f"{hi}{']' if closed_hi else ')'}, got {value}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model` section: the base of one class per model kind, picked by the
    section's `kind` key (`ModelConfig.KINDS` maps each kind to its class); a key that
    is not one of that kind's is an unknown key.

    - `kind`: `deq` ([`DEQConfig`][implicit_kit.train.DEQConfig]), `mondeq`
      ([`MonotoneDEQConfig`][implicit_kit.train.MonotoneDEQConfig]), `node`
      ([`NeuralODEConfig`][implicit_kit.train.NeuralODEConfig]), `anode`
      ([`AugmentedNeuralODEConfig`][implicit_kit.train.AugmentedNeuralODEConfig]),
      `homoode` ([`HomoODEConfig`][implicit_kit.train.HomoODEConfig]): image
      classifiers between the shared stem and head; `mondbm`
      ([`MonotoneDBMConfig`][implicit_kit.train.MonotoneDBMConfig]): joint imputation
      and classification of the pixels, no stem or head.
    - Every kind: `hidden` (channels of the block's state), `rtol`, `atol`, `max_steps`
      (forward tolerances and step cap; null: the model's own default, 256 solver steps
      or 4096 ODE steps).
    - Every kind: `eval_rtol`, `eval_atol`, `eval_max_steps`: the forward tolerances and
      step cap at evaluation (null: the training ones), applied to the trained model by
      `model.with_solver` (every parameter kept); also set when evaluating a checkpoint,
      `implicit-kit eval CHECKPOINT --set model.eval_max_steps=80`.

    In Python, make the kind's class (`DEQConfig(hidden=8)`); `kind` is set from it."""

    KINDS: ClassVar[dict[str, type["ModelConfig"]]] = {}
    KIND: ClassVar[str]
    CHOICES: ClassVar[dict] = {}

    kind: str = dataclasses.field(init=False)
    hidden: int = 16
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int | None = None
    eval_rtol: float | None = None
    eval_atol: float | None = None
    eval_max_steps: int | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "KIND" in cls.__dict__:
            taken = ModelConfig.KINDS.get(cls.KIND)
            if taken is not None and taken.__qualname__ != cls.__qualname__:
                raise TypeError(f"model kind {cls.KIND!r} is taken by {taken.__name__}; "
                                f"give {cls.__name__} a `KIND` of its own.")
            ModelConfig.KINDS[cls.KIND] = cls

    def __post_init__(self):
        if "KIND" not in type(self).__dict__:
            raise TypeError(f"{type(self).__name__} is not a model kind; make one of "
                            f"{[c.__name__ for c in ModelConfig.KINDS.values()]}.")
        object.__setattr__(self, "kind", self.KIND)
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"key 'model.{key}' must be one of {tuple(allowed)} for "
                                  f"kind {self.kind!r}, got {getattr(self, key)!r}.")
        self.check()

    def check(self) -> None:
        """Raise `ConfigError` naming the key of a value this kind cannot use (called
        when the section is made; subclasses extend it)."""
        _positive(self, "hidden")
        for key in ("max_steps", "eval_max_steps"):
            value = getattr(self, key)
            if value is not None and not 1 <= value <= 2**31 - 1:
                raise ConfigError(f"key 'model.{key}' must be a positive integer (at most "
                                  f"2**31 - 1) or null, got {value}.")
        for key in ("rtol", "atol", "eval_rtol", "eval_atol"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ConfigError(f"key 'model.{key}' must be a finite number >= 0, got "
                                  f"{value}.")

    @property
    def learned_start(self) -> bool:
        """Whether the model has a trained start point (the `init_loss` regulariser's
        input)."""
        return False

    def eval_model(self, model):
        """`model` (built from this section) with the evaluation settings `eval_rtol`,
        `eval_atol`, `eval_max_steps` (those set) through `model.with_solver`."""
        settings = {k: v for k, v in (("rtol", self.eval_rtol), ("atol", self.eval_atol),
                                      ("max_steps", self.eval_max_steps)) if v is not None}
        return model.with_solver(**settings) if settings else model

    def steps(self) -> dict:
        """`max_steps` as a keyword for the model (none: the model's default)."""
        return {} if self.max_steps is None else {"max_steps": self.max_steps}

    def build(self, *, in_channels: int, classes: int, spatial: int, key,
              error_penalty: bool = False):
        """The model of this section on `(in_channels, spatial, spatial)` images."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _ImplicitBackward(ModelConfig):
    """The keys of the implicit backward pass (`ik.ImplicitAdjoint`), shared by the
    kinds that have one (a base, not a kind).

    - `linear_solver`: `auto` (default, `ik.ImplicitAdjoint()`'s: fixed-point
      iteration on the adjoint, GMRES where that fails), `picard` (fixed-point iteration
      only, converges when the Jacobian's spectral radius is below 1) or `gmres` (lineax
      GMRES on `I - Jᵀ`);
    - `adjoint_rtol`: its tolerance (also of the monDEQ's backward splitting), by
      default the forward `rtol`/`atol`, no tighter than the dtype can reach."""

    linear_solver: str = "auto"
    adjoint_rtol: float | None = None

    def implicit_adjoint(self) -> ImplicitAdjoint:
        # the `linear_solver` at `adjoint_rtol`, or else at the forward tolerance (the
        # rule of `ImplicitAdjoint` itself); the step cap `max_steps` when set
        return ImplicitAdjoint(None if self.linear_solver == "auto" else self.linear_solver,
                               rtol=self.adjoint_rtol, atol=self.adjoint_rtol,
                               **self.steps())

    def check(self) -> None:
        super().check()
        if self.adjoint_rtol is not None and self.adjoint_rtol < 0:
            raise ConfigError(f"key 'model.adjoint_rtol' must be a finite number >= 0, "
                              f"got {self.adjoint_rtol}.")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(ModelConfig):
    """A block between the shared stem and head (`ik.models.ImageClassifier`): `hidden`
    stem/block channels, `final` head width, `norm_groups` GroupNorm groups."""

    final: int = 32
    norm_groups: int = 8

    def check(self) -> None:
        super().check()
        _positive(self, "final", "norm_groups")

    def _block(self, spatial: int, key, error_penalty: bool):
        """(the implicit block on `(hidden, spatial, spatial)` features, its channels)."""
        raise NotImplementedError

    def build(self, *, in_channels: int, classes: int, spatial: int, key,
              error_penalty: bool = False):
        kb, kc = jr.split(key)
        block, channels = self._block((spatial + 1) // 2, kb, error_penalty)  # the stem
        return models.ImageClassifier.build(                                # halves it
            block, in_channels=in_channels, classes=classes, hidden=self.hidden,
            final=self.final, block_channels=channels, groups=self.norm_groups, key=kc)

    def _groups(self, channels: int) -> int:
        return models.group_count(channels, self.norm_groups)


@dataclasses.dataclass(frozen=True)
class DEQConfig(ClassifierConfig, _ImplicitBackward):
    """`kind: deq`, an `ik.models.DEQ` of a conv cell.

    - `solver`: `anderson`, `picard`, `broyden`, `reversible` (`ik.Reversible(beta)`,
      `beta` 0.8 by default); `adjoint`: `implicit` (with `linear_solver`,
      `adjoint_rtol`), `phantom`, `jfb`, `neumann` (`adjoint_steps`: the k of
      phantom/neumann), `unrolled`, `reversible` (`ik.ReversibleAdjoint()`, for
      `solver: reversible` only).
    - `init`: the start point, `zeros`, `learned` or `skip`.
    - `best_so_far`: return the lowest-residual iterate of each solve
      (`ik.BestSoFar(solver)`, TorchDEQ's default) instead of the last.
    - `cell`: `conv` (`ik.nn.ConvCell` on the stem's features) or `multiscale`
      (`ik.nn.MultiscaleCell`, MDEQ's: `scales` resolutions of `hidden`, 2·`hidden`, ...
      channels, each half the size of the previous, fused at every step; the head reads
      the highest).
    - `residual` (`conv` only): the cell's form, MDEQ's residual block `GN(ReLU(z + h))`
      (True) or the plain `h` (False; the HomoODE field's form, closer to a contraction
      at initialisation); `dropout`: variational dropout in the cell."""

    KIND: ClassVar[str] = "deq"
    CHOICES: ClassVar[dict] = {"solver": DEQ_SOLVERS, "adjoint": DEQ_ADJOINTS,
                               "linear_solver": LINEAR_SOLVERS, "init": models.DEQ_INITS,
                               "cell": ("conv", "multiscale")}

    solver: str = "anderson"
    beta: float = 0.8
    adjoint: str = "implicit"
    adjoint_steps: int = 5
    init: str = "zeros"
    best_so_far: bool = False
    cell: str = "conv"
    scales: int = 2
    residual: bool = True
    dropout: float = 0.0

    def check(self) -> None:
        super().check()
        _positive(self, "adjoint_steps")
        _in_range(self.dropout, 0, 1, "dropout", closed_lo=True)
        _in_range(self.beta, 0, 2, "beta")
        if self.beta == 1:
            raise ConfigError("key 'model.beta' must not be 1 (the reversal divides by "
                              "1 - beta).")
        if self.adjoint == "reversible" and (self.solver != "reversible" or self.best_so_far):
            raise ConfigError("key 'model.adjoint': 'reversible' runs the iterations of "
                              "'model.solver: reversible' backwards (without best_so_far); "
                              f"got solver {self.solver!r}"
                              + (" with best_so_far" if self.best_so_far else "") + ".")
        if self.cell == "multiscale":
            if self.scales < 2:
                raise ConfigError(f"key 'model.scales' must be >= 2 for cell 'multiscale', "
                                  f"got {self.scales}.")
            if self.init == "skip":
                raise ConfigError("key 'model.init': 'skip' has no default map to the "
                                  "multiscale cell's tuple state; use 'zeros' or 'learned'.")

    @property
    def learned_start(self) -> bool:
        return self.init in ("learned", "skip")

    def _block(self, spatial, key, error_penalty):
        h = self.hidden
        if self.cell == "multiscale":
            cell = nn.MultiscaleCell(tuple(h * 2**s for s in range(self.scales)),
                                     (spatial, spatial), groups=self.norm_groups,
                                     dropout=self.dropout, key=key)
            state_shape = cell.state_shape
        else:
            cell = nn.ConvCell(h, groups=self._groups(h), dropout=self.dropout,
                               residual=self.residual, key=key)
            state_shape = (h, spatial, spatial)
        kw = {"beta": self.beta} if self.solver == "reversible" else {}
        solver = DEQ_SOLVERS[self.solver](rtol=self.rtol, atol=self.atol, **kw)
        if self.best_so_far:
            solver = solvers.BestSoFar(solver)
        return models.DEQ(cell, state_shape, solver,
                          DEQ_ADJOINTS[self.adjoint](self), init=self.init,
                          **self.steps()), h


@dataclasses.dataclass(frozen=True)
class MonotoneDEQConfig(ClassifierConfig, _ImplicitBackward):
    """`kind: mondeq`, an `ik.models.MonotoneDEQ.conv` solved by Peaceman–Rachford
    splitting, with the implicit backward (`linear_solver`: `auto` or `picard`);
    `monotone_m`: the strong-monotonicity margin."""

    KIND: ClassVar[str] = "mondeq"
    CHOICES: ClassVar[dict] = {"linear_solver": ("auto", "picard")}

    monotone_m: float = 1.0

    def check(self) -> None:
        super().check()
        if not self.monotone_m > 0:  # (0: monotone, not strongly: no unique fixed point)
            raise ConfigError(f"key 'model.monotone_m' must be > 0 for kind 'mondeq', got "
                              f"{self.monotone_m}.")

    def _block(self, spatial, key, error_penalty):
        h = self.hidden
        return models.MonotoneDEQ.conv(
            h, h, (spatial, spatial), self.monotone_m, key=key,
            solver=models.PeacemanRachford(rtol=self.rtol, atol=self.atol),
            adjoint=self.implicit_adjoint(), **self.steps()), h


@dataclasses.dataclass(frozen=True)
class NeuralODEConfig(ClassifierConfig):
    """`kind: node`, an `ik.models.NeuralODE` of a conv field.

    - `solver`: a diffrax solver (`dopri5`, `tsit5`, `bosh3`, `heun`, `euler`);
      `adjoint`: `checkpoint` (exact backpropagation through the solver) or
      `backsolve`; `dropout`: variational dropout in the field."""

    KIND: ClassVar[str] = "node"
    CHOICES: ClassVar[dict] = {"solver": ODE_SOLVERS, "adjoint": ODE_ADJOINTS}

    solver: str = "dopri5"
    adjoint: str = "checkpoint"
    dropout: float = 0.0

    def check(self) -> None:
        super().check()
        _in_range(self.dropout, 0, 1, "dropout", closed_lo=True)

    def _ode(self, error_penalty: bool) -> models.ODESolve:
        return models.ODESolve(solver=ODE_SOLVERS[self.solver](), rtol=self.rtol,
                               atol=self.atol, adjoint=ODE_ADJOINTS[self.adjoint](),
                               error_penalty=error_penalty, **self.steps())

    def _block(self, spatial, key, error_penalty):
        h = self.hidden
        field = nn.ConvCell(h, groups=self._groups(h), residual=False, inject=False,
                            dropout=self.dropout, key=key)
        return models.NeuralODE(field, self._ode(error_penalty)), h


@dataclasses.dataclass(frozen=True)
class AugmentedNeuralODEConfig(NeuralODEConfig):
    """`kind: anode`, an `ik.models.AugmentedNeuralODE`: the Neural ODE's keys and
    `augment`, the extra channels."""

    KIND: ClassVar[str] = "anode"

    augment: int = 8

    def check(self) -> None:
        super().check()
        _positive(self, "augment")

    def _block(self, spatial, key, error_penalty):
        channels = self.hidden + self.augment
        field = nn.ConvCell(channels, groups=self._groups(channels), residual=False,
                            inject=False, dropout=self.dropout, key=key)
        return models.AugmentedNeuralODE(field, self.augment,
                                         self._ode(error_penalty)), channels


@dataclasses.dataclass(frozen=True)
class HomoODEConfig(NeuralODEConfig):
    """`kind: homoode`, an `ik.models.HomoODE`: the Neural ODE's keys and
    - `init`: the start, `alternating`, `zeros`, `learned` or `conditioned` (a small conv
      net from the stem features, trained by `regularizers.init_loss`);
    - `detach_start`: with a trained start (`init: learned|conditioned`) only: false lets
      the task loss train the start point through the solve (default true, the
      authors': only `regularizers.init_loss` trains it)."""

    KIND: ClassVar[str] = "homoode"
    CHOICES: ClassVar[dict] = {**NeuralODEConfig.CHOICES, "init": models.HOMOODE_INITS}

    init: str = "alternating"
    detach_start: bool = True

    def check(self) -> None:
        super().check()
        if not self.detach_start and not self.learned_start:
            raise ConfigError("key 'model.detach_start' false needs init 'learned' or "
                              f"'conditioned', got init {self.init!r}.")

    @property
    def learned_start(self) -> bool:
        return self.init in ("learned", "conditioned")

    def _block(self, spatial, key, error_penalty):
        h = self.hidden
        field = nn.ConvCell(h, groups=self._groups(h), residual=False, dropout=self.dropout,
                            key=key)
        init_net = None
        if self.init == "conditioned":  # a small conv net from the stem features
            ki1, ki2 = jr.split(jr.fold_in(key, 1))
            init_net = eqx.nn.Sequential([
                eqx.nn.Conv2d(h, h, 3, padding=1, key=ki1),
                eqx.nn.Lambda(jax.nn.relu), eqx.nn.Conv2d(h, h, 1, key=ki2)])
        return models.HomoODE(field, (h, spatial, spatial), init=self.init,
                              ode=self._ode(error_penalty), init_net=init_net,
                              detach_start=self.detach_start), h


@dataclasses.dataclass(frozen=True)
class MonotoneDBMConfig(_ImplicitBackward):
    """`kind: mondbm`, the monotone deep Boltzmann machine `ik.models.MonotoneDBM.image`
    (pixels, a hidden tier and the label as categorical variables; joint imputation and
    classification, no stem or head).

    - `solver`: `anderson`, `picard`, `broyden` (the mean-field fixed point), with the
      implicit backward (`linear_solver`, `adjoint_rtol`);
    - `bins` (pixel levels), `group` (categories of each hidden variable; `hidden` is
      the hidden tier's channels), `alpha` (the damping of the mean-field splitting),
      `observed` (fraction of pixels observed), `recon_weight` and `focal_gamma` (the
      reconstruction loss); `monotone_m` the margin in (0, 1), `monotone` false drops it
      (the plain DBM, for comparison)."""

    KIND: ClassVar[str] = "mondbm"
    CHOICES: ClassVar[dict] = {"solver": DEQ_SOLVERS, "linear_solver": LINEAR_SOLVERS}

    solver: str = "anderson"
    monotone_m: float = 0.01
    monotone: bool = True
    bins: int = 8
    group: int = 4
    alpha: float = 0.125
    observed: float = 0.4
    recon_weight: float = 1.0
    focal_gamma: float = 2.0

    def check(self) -> None:
        super().check()
        _in_range(self.monotone_m, 0, 1, "monotone_m")
        _in_range(self.alpha, 0, 1, "alpha", closed_hi=True)
        _in_range(self.observed, 0, 1, "observed", closed_lo=True)
        for key in ("bins", "group"):
            if getattr(self, key) < 2:
                raise ConfigError(f"key 'model.{key}' must be >= 2, got "
                                  f"{getattr(self, key)}.")
        if self.hidden % self.group:
            raise ConfigError(f"key 'model.group' ({self.group}) must divide "
                              f"'model.hidden' ({self.hidden}).")

    def build(self, *, in_channels: int, classes: int, spatial: int, key,
              error_penalty: bool = False):
        solver = DEQ_SOLVERS[self.solver](rtol=self.rtol, atol=self.atol)
        return models.MonotoneDBM.image(
            (spatial, spatial), bins=self.bins, hidden=self.hidden, group=self.group,
            classes=classes, m=self.monotone_m, monotone=self.monotone, key=key,
            alpha=self.alpha, solver=solver, adjoint=self.implicit_adjoint(),
            observed=self.observed, recon_weight=self.recon_weight, gamma=self.focal_gamma,
            **self.steps())

