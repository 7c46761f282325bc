"""From a config to an `ik.models.ImageClassifier` (shared stem and head)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from .. import models, nn
from ._config import (
    check_model_config,
    Config,
    DEQ_ADJOINTS,
    DEQ_SOLVERS,
    ModelConfig,
    ODE_ADJOINTS,
    ODE_SOLVERS,
)


def build_model(m: ModelConfig, *, in_channels: int, classes: int, spatial: int, key,
                error_penalty: bool = False):
    """The classifier for config `m` on `(in_channels, spatial, spatial)` images (the
    stem halves the spatial size); for kind `mondbm`, the
    `ik.models.MonotoneDBM` of the images."""
    check_model_config(m)
    steps = {} if m.max_steps is None else {"max_steps": m.max_steps}
    kb, kc = jr.split(key)
    s = (spatial + 1) // 2
    h = m.hidden
    g = models.group_count(h, m.norm_groups)
    if m.kind == "mondbm":
        solver = DEQ_SOLVERS[m.solver or "anderson"](rtol=m.rtol, atol=m.atol)
        return models.MonotoneDBM.image(
            (spatial, spatial), bins=m.bins, hidden=m.hidden, group=m.group,
            classes=classes, m=m.monotone_m, monotone=m.monotone, key=key,
            alpha=m.alpha, solver=solver, adjoint=DEQ_ADJOINTS["implicit"](m),
            observed=m.observed, recon_weight=m.recon_weight, gamma=m.focal_gamma,
            **steps)
    if m.kind == "deq":
        cell = nn.ConvCell(h, groups=g, dropout=m.dropout, residual=m.residual, key=kb)
        solver = DEQ_SOLVERS[m.solver or "anderson"](rtol=m.rtol, atol=m.atol)
        block = models.DEQ(cell, (h, s, s), solver, DEQ_ADJOINTS[m.adjoint or "implicit"](m),
                           init=m.init or "zeros", **steps)
        channels = h
    elif m.kind == "mondeq":
        block = models.MonotoneDEQ.conv(
            h, h, (s, s), m.monotone_m, key=kb,
            solver=models.PeacemanRachford(rtol=m.rtol, atol=m.atol),
            adjoint=DEQ_ADJOINTS["implicit"](m), **steps,
        )
        channels = h
    else:
        ode = models.ODESolve(
            solver=ODE_SOLVERS[m.solver or "dopri5"](), rtol=m.rtol, atol=m.atol,
            adjoint=ODE_ADJOINTS[m.adjoint or "checkpoint"](),
            error_penalty=error_penalty, **steps,
        )
        if m.kind == "node":
            field = nn.ConvCell(h, groups=g, residual=False, inject=False, dropout=m.dropout,
                                key=kb)
            block = models.NeuralODE(field, ode)
            channels = h
        elif m.kind == "anode":
            channels = h + m.augment
            field = nn.ConvCell(channels, groups=models.group_count(channels, m.norm_groups),
                                residual=False, inject=False, dropout=m.dropout, key=kb)
            block = models.AugmentedNeuralODE(field, m.augment, ode)
        else:
            field = nn.ConvCell(h, groups=g, residual=False, dropout=m.dropout, key=kb)
            init_net = None
            if m.init == "conditioned":  # a small conv net from the stem features
                ki1, ki2 = jr.split(jr.fold_in(kb, 1))
                init_net = eqx.nn.Sequential([
                    eqx.nn.Conv2d(h, h, 3, padding=1, key=ki1),
                    eqx.nn.Lambda(jax.nn.relu), eqx.nn.Conv2d(h, h, 1, key=ki2)])
            block = models.HomoODE(field, (h, s, s), init=m.init or "alternating", ode=ode,
                                   init_net=init_net, detach_start=m.detach_start)
            channels = h
    return models.ImageClassifier.build(
        block, in_channels=in_channels, classes=classes, hidden=h, final=m.final,
        block_channels=channels, groups=m.norm_groups, key=kc,
    )


def make_model(cfg: Config, in_channels: int, spatial: int, classes: int = 10):
    model = build_model(cfg.model, in_channels=in_channels, classes=classes,
                        spatial=spatial, key=jr.key(cfg.train.seed),
                        error_penalty=cfg.regularizers.error_penalty > 0)
    dtype = jnp.dtype(cfg.train.dtype)
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


def count_params(model) -> int:
    """The number of trainable (floating-point) parameters of `model`."""
    return int(sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(model,
                                                                        eqx.is_inexact_array))))
