"""The protocol shared by implicit_kit's forward solvers.

Every solver is an `eqx.Module` holding hyperparameters only and implementing the
optimistix solver protocol (`init`, `step`, `terminate`, `postprocess`), so that it also
works inside `optimistix.fixed_point` / `optimistix.root_find`. A solver works natively
on either a fixed-point map `T(y) = y` (subclass of `AbstractFixedPointSolver`) or a root
function `G(y) = 0` (subclass of `AbstractRootSolver`); the driver converts between the two
with `G(y) = T(y) - y`.

The state of every implicit_kit solver carries `residual`, the norm of `G` at the iterate
the last `step` was taken from, and `scale`, the norm of that iterate: the termination test
is `residual <= atol + rtol * scale`.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from equinox import AbstractClassVar, AbstractVar
from jaxtyping import Array, Float, PyTree, Scalar

from .._solution import RESULTS


class AbstractImplicitSolver(eqx.Module):
    """Mixin for the solvers of implicit_kit: a tolerance test on `state.residual`."""

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Callable[[PyTree], Scalar]]
    native: AbstractClassVar[str]

    def terminate(self, fn, y, args, options, state, tags):
        """`(done, result)`: done when the residual is finite and at most
        `atol + rtol * scale`; a non-finite residual is never convergence (the driver
        reports it)."""
        del fn, y, args, options, tags
        # A non-finite residual is never convergence (even if the scale overflowed too).
        done = jnp.isfinite(state.residual) & (
            state.residual <= self.atol + self.rtol * state.scale
        )
        return done, RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        """`(y, aux, stats)` returned by the solve; these solvers add no extra stats."""
        return y, aux, {}


class AbstractFixedPointSolver(AbstractImplicitSolver, optx.AbstractFixedPointSolver):
    """A solver that iterates a fixed-point map `y <- T(y)`."""

    native: ClassVar[str] = "fixed_point"


class AbstractRootSolver(AbstractImplicitSolver, optx.AbstractRootFinder):
    """A solver that finds a root `G(y) = 0`."""

    native: ClassVar[str] = "root"


def init_residual(y: PyTree) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Residual `inf` and scale `0` in the dtype of `y` (so the state never changes dtype)."""
    import jax.tree_util as jtu

    leaves = jtu.tree_leaves(y)
    dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
    real = jnp.finfo(dtype).dtype
    return jnp.array(jnp.inf, real), jnp.array(0.0, real)
