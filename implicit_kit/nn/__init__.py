"""Layers for implicit models: cells, per-solve normalisation and dropout, monotone
parametrisations and the well-posed layers of the seed papers."""

from ._cells import (
    ConvCell as ConvCell,
    MLPCell as MLPCell,
    MLPField as MLPField,
    MultiscaleCell as MultiscaleCell,
)
from ._dbm import (
    HollowCoupling as HollowCoupling,
    HollowOperator as HollowOperator,
    prox_softmax as prox_softmax,
    Tier as Tier,
)
from ._dropout import FixedMask as FixedMask, VariationalDropout as VariationalDropout
from ._layers import (
    contracting_graph_map as contracting_graph_map,
    ConvergentGraphLayer as ConvergentGraphLayer,
    graph_fixed_point as graph_fixed_point,
    hopfield_energy as hopfield_energy,
    hopfield_update as hopfield_update,
    subhomogeneity_degree as subhomogeneity_degree,
    SubhomogeneousCell as SubhomogeneousCell,
)
from ._monotone import (
    MonotoneConv as MonotoneConv,
    MonotoneLinear as MonotoneLinear,
    MonotoneOperator as MonotoneOperator,
)
from ._norm import (
    apply_norm as apply_norm,
    remove_norm as remove_norm,
    SpectralNorm as SpectralNorm,
    WeightNorm as WeightNorm,
)
from ._prepare import AbstractPerSolve as AbstractPerSolve, prepare as prepare
