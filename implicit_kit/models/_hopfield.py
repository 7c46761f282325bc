"""Modern Hopfield retrieval as an implicit layer (Ramsauer et al., ICLR 2021)."""

from typing import Any

import equinox as eqx
from jaxtyping import Array, Float

from .._fixed_point import fixed_point
from ..nn import hopfield_update
from ..solvers import Picard
from ._base import with_fixed_point_settings
from ._stats import ModelStats


def _hopfield_map(xi, args):  # one function object: compiled once outside `jit`
    return hopfield_update(xi, args[0], args[1])


class HopfieldLayer(eqx.Module):
    r"""Retrieval to the fixed point $\xi^* = X\,\mathrm{softmax}(\beta X^\top\xi^*)$ of the
    modern Hopfield update, with implicit gradients (at a strict energy minimum
    $I - J \succ 0$, so the backward problem is well posed).

    **Arguments:**

    - `beta`: the inverse temperature (hflayers' default is $1/\sqrt{d}$).
    - `solver`, `adjoint`, `max_steps`, `throw`: as for [`implicit_kit.fixed_point`][]
        (default `Picard(rtol=1e-6, atol=1e-8)`: the update is a CCCP step). As in every
        model, `throw=False` by default: a failed retrieval is reported in the stats
        (`return_stats=True`).
    """

    beta: float
    solver: Any = Picard(rtol=1e-6, atol=1e-8)
    adjoint: Any = None
    max_steps: int = eqx.field(static=True, default=256)
    throw: bool = eqx.field(static=True, default=False)

    def with_solver(self, **settings):
        """A copy with other solver settings (`solver`, `adjoint`, `max_steps`, `throw`,
        `rtol`, `atol`), every array kept: see
        [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        return with_fixed_point_settings(self, settings)

    def __call__(self, query: Float[Array, " d"], patterns: Float[Array, "d n"], *,
                 return_stats: bool = False, probe: Array | None = None):
        """The retrieved pattern for `query` from the columns of `patterns`; with
        `return_stats=True`, `(pattern, stats)` (a `ModelStats`)."""
        sol = fixed_point(
            _hopfield_map, query, (patterns, self.beta),
            self.solver, adjoint=self.adjoint, max_steps=self.max_steps, throw=self.throw,
            probe=probe,
        )
        if not return_stats:
            return sol.value
        return sol.value, ModelStats.from_solution(sol)


