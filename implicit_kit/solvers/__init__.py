"""Forward solvers for equilibrium problems."""

from ._base import (
    AbstractFixedPointSolver as AbstractFixedPointSolver,
    AbstractImplicitSolver as AbstractImplicitSolver,
    AbstractRootSolver as AbstractRootSolver,
    AbstractSolverState as AbstractSolverState,
)
from .anderson import Anderson as Anderson
from .best_so_far import BestSoFar as BestSoFar
from .broyden import Broyden as Broyden
from .fallback import Fallback as Fallback
from .fista import FISTA as FISTA
from .halpern import Halpern as Halpern
from .newton_krylov import NewtonKrylov as NewtonKrylov
from .picard import Picard as Picard
from .reversible import Reversible as Reversible
from .vr_halpern import finite_sum as finite_sum, VRHalpern as VRHalpern
