"""Block coordinate descent: `ik.block_coordinate_descent`."""

from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint
from ._fixed_point import fixed_point
from ._solution import Solution
from .objective import CompositeLinear
from .solvers import Picard


def block_coordinate_descent(
    objective: CompositeLinear,
    block_prox: Callable,
    x0: Array,
    args: PyTree = None,
    prox_args: PyTree = None,
    *,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    max_steps: int = 500,
    adjoint: AbstractAdjoint | None = None,
    throw: bool = True,
) -> Solution:
    r"""Minimise $f(x, \text{args}) + \sum_j g(x_j, \text{prox\_args})$ by cyclic
    proximal block coordinate descent (jaxopt's `BlockCoordinateDescent`,
    `jaxopt/_src/block_cd.py`): the lasso, elastic net, group lasso, non-negative least
    squares, the multiclass SVM dual.

    One step is a sweep over the blocks (the rows of `x`):
    $x_j \leftarrow \mathrm{prox}_{\eta_j g}(x_j - \eta_j\nabla_j f)$ with
    $\eta_j = 1/L_j$, the predictions $Mx$ updated in place. The sweep is run as a
    fixed-point map by the shared driver (`ik.Picard`: `rtol`, `atol` bound the change
    of a sweep, $\|T(x) - x\| \le$ `atol` $+$ `rtol` $\|x\|$; jaxopt's `tol` is the
    same change with `rtol=0`, its default 1e-4), and its fixed point, the minimiser,
    is differentiated implicitly through the sweep (in `args` and `prox_args`).

    **Arguments:**

    - `objective`: a [`implicit_kit.objective.CompositeLinear`][] (`ik.objective.*`).
    - `block_prox(x_j, prox_args, step)`: the prox of one block (`ik.optimality.prox_*`,
      or `make_prox_from_projection(...)`).
    - `x0`: (p,) or (p, k), blocks on the first axis.
    - the rest: as [`implicit_kit.fixed_point`][].

    **Returns:** a [`implicit_kit.Solution`][] (`num_steps` the sweeps).
    """
    if not isinstance(objective, CompositeLinear):
        raise TypeError("`objective` must be an `ik.objective.CompositeLinear` (e.g. "
                        "`ik.objective.least_squares`): block coordinate descent needs "
                        f"f(x) = s(Mx) + <x, b>; got {type(objective).__name__}.")
    x0 = jnp.asarray(x0)
    if x0.ndim not in (1, 2):
        raise ValueError(f"`x0` must be (p,) or (p, k), got shape {x0.shape}.")

    def sweep(x, a):
        data, hp = a
        M = objective.matrix(data)
        steps = 1.0 / (objective.curvature(data) * jnp.sum(M * M, axis=0))
        b = objective.linear(data)
        grad_s = jax.grad(objective.subfun)

        def block(j, carry):
            x, pred = carry
            g = M[:, j] @ grad_s(pred, data)
            if b is not None:
                g = g + b[j]
            eta = steps[j]
            new = block_prox(x[j] - eta * g, hp, eta)
            new = jnp.where(jnp.isfinite(eta), new, x[j])  # an all-zero column
            delta = new - x[j]
            pred = pred + (jnp.outer(M[:, j], delta) if x.ndim == 2 else M[:, j] * delta)
            return x.at[j].set(new), pred

        x, _ = lax.fori_loop(0, x.shape[0], block, (x, M @ x))
        return x

    return fixed_point(sweep, x0, (args, prox_args), Picard(rtol=rtol, atol=atol),
                       max_steps=max_steps, adjoint=adjoint, throw=throw)
