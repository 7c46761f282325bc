"""From a `ModelConfig` to an `ik.models.ImageClassifier` (shared stem and head)."""

import diffrax as dfx
import jax.random as jr
import lineax as lx

from .. import models, nn, solvers
from .._adjoint import (
    ImplicitAdjoint,
    JFBAdjoint,
    NeumannAdjoint,
    PhantomAdjoint,
    UnrolledAdjoint,
)
from ..models._classifier import _groups
from ._config import ConfigError, ModelConfig


_DEQ_SOLVERS = {"anderson": solvers.Anderson, "picard": solvers.Picard,
                "broyden": solvers.Broyden}
_ODE_SOLVERS = {"dopri5": dfx.Dopri5, "tsit5": dfx.Tsit5, "bosh3": dfx.Bosh3,
                "heun": dfx.Heun, "euler": dfx.Euler}
_DEQ_ADJOINTS = ("implicit", "phantom", "jfb", "neumann", "unrolled")
_ODE_ADJOINTS = {"checkpoint": dfx.RecursiveCheckpointAdjoint, "backsolve": dfx.BacksolveAdjoint}
_INITS = {"deq": ("zeros", "learned", "skip"), "homoode": ("alternating", "zeros", "learned")}


def _choice(value, choices, default, key: str, kind: str):
    value = default if value is None else value
    if value not in choices:
        raise ConfigError(
            f"key 'model.{key}' must be one of {tuple(choices)} for kind {kind!r}, got "
            f"{value!r}."
        )
    return value


def check_model_config(m: ModelConfig) -> None:
    """Validate the kind-dependent choices (raises `ConfigError` naming the key)."""
    ode = m.kind in ("node", "anode", "homoode")
    if m.kind == "deq":
        _choice(m.solver, _DEQ_SOLVERS, "anderson", "solver", m.kind)
        _choice(m.adjoint, _DEQ_ADJOINTS, "implicit", "adjoint", m.kind)
    elif ode:
        _choice(m.solver, _ODE_SOLVERS, "dopri5", "solver", m.kind)
        _choice(m.adjoint, _ODE_ADJOINTS, "checkpoint", "adjoint", m.kind)
    else:
        _choice(m.solver, ("peaceman_rachford",), "peaceman_rachford", "solver", m.kind)
        _choice(m.adjoint, ("implicit",), "implicit", "adjoint", m.kind)
        _choice(m.backward, ("picard",), "picard", "backward", m.kind)
    if m.kind in _INITS:
        _choice(m.init, _INITS[m.kind], _INITS[m.kind][0], "init", m.kind)
    elif m.init is not None:
        raise ConfigError(f"key 'model.init' is not used by kind {m.kind!r}; remove it.")
    for key in ("hidden", "final", "groups", "adjoint_steps"):
        if getattr(m, key) < 1:
            raise ConfigError(f"key 'model.{key}' must be positive, got {getattr(m, key)}.")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"key 'model.dropout' must be in [0, 1), got {m.dropout}.")


def _deq_adjoint(m: ModelConfig):
    name = m.adjoint or "implicit"
    return {
        "implicit": lambda: ImplicitAdjoint(
            solvers.Picard(rtol=m.backward_rtol, atol=m.backward_rtol)
            if m.backward == "picard"
            else lx.GMRES(rtol=m.backward_rtol, atol=m.backward_rtol, restart=20,
                          max_steps=200)),
        "phantom": lambda: PhantomAdjoint(k=m.adjoint_steps),
        "jfb": lambda: JFBAdjoint(),
        "neumann": lambda: NeumannAdjoint(k=m.adjoint_steps),
        "unrolled": lambda: UnrolledAdjoint(),
    }[name]()


def build_model(m: ModelConfig, *, in_channels: int, classes: int, spatial: int, key,
                error_penalty: bool = False):
    """The classifier for config `m` on `(in_channels, spatial, spatial)` images (the
    stem halves the spatial size)."""
    check_model_config(m)
    kb, kc = jr.split(key)
    s = (spatial + 1) // 2
    h = m.hidden
    g = _groups(h, m.groups)
    if m.kind == "deq":
        cell = nn.ConvCell(h, groups=g, dropout=m.dropout, residual=m.residual, key=kb)
        solver = _DEQ_SOLVERS[m.solver or "anderson"](rtol=m.rtol, atol=m.atol)
        block = models.DEQ(cell, (h, s, s), solver, _deq_adjoint(m), init=m.init or "zeros",
                           max_steps=m.max_steps or 30)
        channels = h
    elif m.kind == "mondeq":
        block = models.MonotoneDEQ.conv(
            h, h, (s, s), m.monotone_m, key=kb,
            solver=solvers.PeacemanRachford(rtol=m.rtol, atol=m.atol),
            adjoint=ImplicitAdjoint(solvers.Picard(rtol=m.backward_rtol, atol=m.backward_rtol),
                                    max_steps=m.max_steps or 100),
            max_steps=m.max_steps or 100,
        )
        channels = h
    else:
        ode = models.ODESolve(
            solver=_ODE_SOLVERS[m.solver or "dopri5"](), rtol=m.rtol, atol=m.atol,
            adjoint=_ODE_ADJOINTS[m.adjoint or "checkpoint"](),
            max_steps=m.max_steps or 4096, error_penalty=error_penalty,
        )
        if m.kind == "node":
            field = nn.ConvCell(h, groups=g, residual=False, inject=False, dropout=m.dropout,
                                key=kb)
            block = models.NeuralODE(field, ode)
            channels = h
        elif m.kind == "anode":
            channels = h + m.augment
            field = nn.ConvCell(channels, groups=_groups(channels, m.groups), residual=False,
                                inject=False, dropout=m.dropout, key=kb)
            block = models.AugmentedNeuralODE(field, m.augment, ode)
        else:
            field = nn.ConvCell(h, groups=g, residual=False, dropout=m.dropout, key=kb)
            block = models.HomoODE(field, (h, s, s), start=m.init or "alternating", ode=ode)
            channels = h
    return models.ImageClassifier.build(
        block, in_channels=in_channels, classes=classes, hidden=h, final=m.final,
        block_channels=channels, groups=m.groups, key=kc,
    )
