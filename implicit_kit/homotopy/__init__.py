"""Homotopy continuation: path ODEs integrated with diffrax, a forward solver, and
`homotopy_solve`."""

from ._homotopy import (
    AbstractHomotopy as AbstractHomotopy,
    count_nfe as count_nfe,
    FixedPointHomotopy as FixedPointHomotopy,
    integrate_path as integrate_path,
    NewtonCorrector as NewtonCorrector,
    NewtonHomotopy as NewtonHomotopy,
)
from ._solver import homotopy_solve as homotopy_solve, HomotopySolver as HomotopySolver
