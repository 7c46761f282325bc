"""The deep equilibrium model over any cell `f(z, x)`."""

from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray

from .._fixed_point import fixed_point
from ..nn import prepare
from ..regularizers import jacobian_frobenius
from ..solvers import Anderson
from ._base import AbstractImplicitModel, with_fixed_point_settings
from ._shapes import check_cell, from_leaves, is_shape, leaf_shapes, ONE_SAMPLE, state_shape_of
from ._stats import ModelStats


DEQ_INITS = ("zeros", "learned", "skip")


def _cell_map(z, args):
    # One function object for every call (the cell travels in `args`): a solve called
    # outside `jit` is compiled once, not once per call.
    cell, x = args
    return cell(z, x)


class DEQ(AbstractImplicitModel):
    r"""A deep equilibrium model: returns $z^* = f(z^*, x)$ for a cell $f$.

    Call it on one sample (`jax.vmap` it over a batch: each sample stops on its own and
    reports its own stats). The cell is prepared once per call (`ik.nn.prepare`: weight
    and spectral normalisation computed once, one variational-dropout mask per solve),
    then solved by [`implicit_kit.fixed_point`][].

    **Arguments:**

    - `cell`: any callable module `cell(z, x) -> z'`.
    - `state_shape`: the shape of $z$, or a tuple of shapes for a tuple state (several
        arrays, e.g. the resolutions of `ik.nn.MultiscaleCell`: each init, stat,
        regulariser and backward mode works on the whole tuple).
    - `solver`: a forward solver (default `Anderson()`).
    - `adjoint`: the backward mode (default `ImplicitAdjoint()`).
    - `init`: the initial point $z_0$:
        - `"zeros"`;
        - `"learned"`: one learnable point shared by all samples;
        - `"skip"`: a learned explicit first guess $z_0 = g(x)$ (Skip DEQ; `skip` is
          the module $g$, by default a linear map when $x$ and $z$ are vectors).

        $z_0$ is detached inside the solve; train it with
        [`implicit_kit.models.init_loss`][] on the `z0` returned with the stats.
    - `max_steps`, `throw`: as for `fixed_point` (256 steps; `throw=False`, the rule for
        every model: failures are reported in the stats, as a training loop wants).
    - `save_iterates`: step numbers whose iterates are returned in the stats (for
        [`implicit_kit.regularizers.fixed_point_correction`][]).
    - `input_shape`, `key`: needed to build the default `skip` map.
    """

    cell: Any
    z0: Array | None
    skip: Any
    solver: Any
    adjoint: Any
    state_shape: tuple = eqx.field(static=True)
    init: str = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    save_iterates: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        cell,
        state_shape: tuple[int, ...],
        solver=None,
        adjoint=None,
        *,
        init: str = "zeros",
        skip=None,
        input_shape: tuple[int, ...] | None = None,
        max_steps: int = 256,
        throw: bool = False,
        save_iterates: tuple[int, ...] = (),
        key: PRNGKeyArray | None = None,
    ):
        if init not in DEQ_INITS:
            raise ValueError(f"`init` must be one of {DEQ_INITS}, got {init!r}.")
        if not callable(cell):
            raise TypeError(f"`cell` must be callable, got {type(cell).__name__}.")
        self.cell = cell
        self.state_shape = state_shape_of(state_shape, "DEQ")
        self.solver = Anderson() if solver is None else solver
        self.adjoint = adjoint
        self.init = init
        self.max_steps = max_steps
        self.throw = throw
        self.save_iterates = tuple(save_iterates)
        self.z0 = from_leaves(self.state_shape, [
            jnp.zeros(s) for s in leaf_shapes(self.state_shape)]) if init == "learned" else None
        if init == "skip" and skip is None:
            if input_shape is None or key is None or len(input_shape) != 1 or not is_shape(
                    self.state_shape) or len(self.state_shape) != 1:
                raise ValueError(
                    "init='skip' needs `skip=` (a module x -> z0), or vector states with "
                    "`input_shape=(n,)` and `key=` to build a linear one."
                )
            skip = eqx.nn.Linear(input_shape[0], self.state_shape[0], key=key)
        if init != "skip" and skip is not None:
            raise ValueError("`skip` is only used with init='skip'.")
        self.skip = skip

    def initial_point(self, x: Array) -> Array:
        """The (not detached) initial point for input `x`."""
        floats = [a for a in jtu.tree_leaves(x) if eqx.is_inexact_array(a)]
        dtype = jnp.result_type(*floats) if floats else jnp.result_type(float)
        if self.init == "zeros":
            return from_leaves(self.state_shape, [
                jnp.zeros(s, dtype) for s in leaf_shapes(self.state_shape)])
        if self.init == "learned":
            return jtu.tree_map(lambda z: z.astype(dtype), self.z0)
        return self.skip(x)

    def __call__(
        self,
        x: Array,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        return_stats: bool = False,
        probe: Array | None = None,
    ):
        """Solve for the equilibrium at input `x`.

        `key` draws the dropout masks (needed when the cell has dropout, unless
        `inference`). With `return_stats=True` returns `(z*, stats)`, a
        [`implicit_kit.models.ModelStats`][] with `z0` (the initial point, with its
        gradient) and `iterates` if requested.
        """
        cell = prepare(self.cell, key=key, inference=inference)
        z0 = self.initial_point(x)
        shapes = [tuple(jnp.shape(z)) for z in jtu.tree_leaves(z0)]
        if shapes != leaf_shapes(self.state_shape) or (
                not is_shape(self.state_shape) and not isinstance(z0, tuple)):
            got = shapes[0] if isinstance(z0, jnp.ndarray) else jtu.tree_map(jnp.shape, z0)
            raise ValueError(
                f"the initial point has shape {got}, expected `state_shape` "
                f"{self.state_shape}. If the input is a batch: {ONE_SAMPLE}."
            )
        check_cell("DEQ", "cell", lambda z, a: cell(z, a), z0, x)
        sol = fixed_point(
            _cell_map, lax.stop_gradient(z0), (cell, x), self.solver,
            adjoint=self.adjoint, max_steps=self.max_steps, throw=self.throw,
            save_iterates=self.save_iterates, probe=probe,
        )
        if not return_stats:
            return sol.value
        iterates = sol.stats["iterates"] if self.save_iterates else None
        return sol.value, ModelStats.from_solution(sol, z0=z0, iterates=iterates)

    def with_solver(self, **settings):
        """A copy with other solver settings (`solver`, `adjoint`, `max_steps`, `throw`,
        `rtol`, `atol`), every array kept: see
        [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        return with_fixed_point_settings(self, settings)

    def jacobian_frobenius(self, z: Array, x: Array, *, key: PRNGKeyArray) -> Array:
        """The Hutchinson estimate of the squared Frobenius norm of the cell's Jacobian
        in `z` at `(z, x)` (the Jacobian regulariser of Bai et al. 2021; see
        `ik.regularizers.jacobian_frobenius`), with the cell in inference mode."""
        cell = prepare(self.cell, key=None, inference=True)
        return jacobian_frobenius(cell, z, x, key=key)
