"""implicit_kit: a JAX toolkit for implicit deep learning."""

import importlib.metadata

from . import (
    data as data,
    homotopy as homotopy,
    hyper as hyper,
    models as models,
    nn as nn,
    objective as objective,
    optimality as optimality,
    projection as projection,
    qp as qp,
    regularizers as regularizers,
    solvers as solvers,
)
from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    ImplicitJVPAdjoint as ImplicitJVPAdjoint,
    JFBAdjoint as JFBAdjoint,
    NeumannAdjoint as NeumannAdjoint,
    PhantomAdjoint as PhantomAdjoint,
    ReversibleAdjoint as ReversibleAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
)
from ._block_cd import block_coordinate_descent as block_coordinate_descent
from ._diagnostics import check_grad as check_grad, spectral_radius as spectral_radius
from ._fixed_point import fixed_point as fixed_point
from ._parallel import shard_batch as shard_batch
from ._root import (
    custom_root as custom_root,
    minimise as minimise,
    root_find as root_find,
)
from ._solution import (
    backward_probe as backward_probe,
    backward_stats as backward_stats,
    BackwardStats as BackwardStats,
    RESULTS as RESULTS,
    Solution as Solution,
)
from .homotopy import homotopy_solve as homotopy_solve, HomotopySolver as HomotopySolver
from .solvers import (
    Anderson as Anderson,
    BestSoFar as BestSoFar,
    Broyden as Broyden,
    Fallback as Fallback,
    FISTA as FISTA,
    Halpern as Halpern,
    NewtonKrylov as NewtonKrylov,
    Picard as Picard,
    Reversible as Reversible,
    VRHalpern as VRHalpern,
)


try:
    __version__ = importlib.metadata.version("implicit_kit")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"
