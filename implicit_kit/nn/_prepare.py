"""Per-solve preparation: work done once per solve, not once per solver iteration.

A layer that needs it (a weight normalisation, a dropout mask) subclasses
`AbstractPerSolve`; `prepare(module, key=..., inference=...)` replaces every such layer in
a pytree by the plain layer it stands for. The models call `prepare` on their cell once,
then hand the prepared cell to the solver, so every iteration (and the backward solve)
reuses the same normalised weights and the same dropout mask.
"""

import abc

import equinox as eqx
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray


class AbstractPerSolve(eqx.Module):
    """A layer whose expensive or random part is fixed once per solve."""

    @abc.abstractmethod
    def prepare(self, key: PRNGKeyArray | None, inference: bool) -> eqx.Module:
        """Return the layer to use for every iteration of one solve."""


def _is_per_solve(x) -> bool:
    return isinstance(x, AbstractPerSolve)


def prepare(module, *, key: PRNGKeyArray | None = None, inference: bool = False):
    """Replace every `AbstractPerSolve` layer inside `module` by its per-solve form.

    **Arguments:**

    - `module`: any pytree (usually an `eqx.Module` cell).
    - `key`: randomness for stochastic layers (variational dropout). Needed unless
        `inference=True` or the module has no stochastic layer.
    - `inference`: deterministic mode (dropout off).
    """
    leaves, treedef = jtu.tree_flatten(module, is_leaf=_is_per_solve)
    n = sum(_is_per_solve(x) for x in leaves)
    keys: list[Array | None]
    keys = [None] * n if key is None else list(jr.split(key, max(n, 1)))
    out = []
    i = 0
    for leaf in leaves:
        if _is_per_solve(leaf):
            out.append(leaf.prepare(keys[i], inference))
            i += 1
        else:
            out.append(leaf)
    return jtu.tree_unflatten(treedef, out)
