"""Bilevel optimisation and hyperparameters: hypergradients by implicit
differentiation (CG/GMRES on Hessian-vector products, the Neumann series, or unrolled),
online tuning, and training over a batch of hyperparameters in one compiled call."""

from ._hypergradient import hypergradient as hypergradient, METHODS as METHODS
from ._stn import (
    stn as stn,
    StnConv2d as StnConv2d,
    StnLinear as StnLinear,
    StnResult as StnResult,
)
from ._tune import (
    format_table as format_table,
    metrics_table as metrics_table,
    tune as tune,
    TuneResult as TuneResult,
    vmap_hparams as vmap_hparams,
)
