"""Shape checks at model entry: a wrong input shape (most often a batch passed where one
sample is expected) is named with the expected shape, instead of failing deep inside a
layer (`dot_general requires contracting dimensions...`, `Input to Conv needs rank 3`)."""

import jax
import numpy as np


ONE_SAMPLE = ("models are called on one sample; for a batch, use `jax.vmap(model)(xs)` "
              "(and `jax.vmap` over the keys)")


def _spell(expected) -> str:
    return "(" + ", ".join("*" if e is None else str(e) for e in expected) + \
        ("," if len(expected) == 1 else "") + ")"


def check_input(model: str, x, expected: tuple) -> None:
    """Raise a `ValueError` unless `x`'s shape matches `expected` (`None`: any size)."""
    shape = tuple(np.shape(x))
    if len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, shape)
    ):
        return
    batch = len(shape) == len(expected) + 1 and all(
        e is None or e == s for e, s in zip(expected, shape[1:]))
    hint = f" (a batch of {shape[0]}?)" if batch else ""
    raise ValueError(f"`{model}` expects one input of shape {_spell(expected)}, got "
                     f"{shape}{hint}: {ONE_SAMPLE}.")


def _shapes(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shapes = [tuple(np.shape(x)) for x in leaves]
    return treedef, shapes


def _spell_tree(tree) -> str:
    treedef, shapes = _shapes(tree)
    if treedef.num_leaves == 1 and treedef == jax.tree_util.tree_structure(0):
        return str(shapes[0])
    return str(jax.tree_util.tree_unflatten(treedef, [str(s) for s in shapes]))


def check_cell(model: str, what: str, fn, z, x) -> None:
    """Raise a `ValueError` naming the shapes if `fn(z, x)` cannot be evaluated or does
    not return a state of `z`'s structure and shapes (traced abstractly: nothing is
    computed)."""
    try:
        out = jax.eval_shape(fn, z, x)
    except (TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"`{model}`: its {what} failed on the state of shape {_spell_tree(z)} and "
            f"the input of shape {_spell_tree(x)} ({first}). If the input is a batch: "
            f"{ONE_SAMPLE}."
        ) from e
    if _shapes(out) != _shapes(z):
        raise ValueError(
            f"`{model}`: its {what} returned shape {_spell_tree(out)}, expected the "
            f"state's {_spell_tree(z)}. If the input is a batch: {ONE_SAMPLE}."
        )


def is_shape(shape) -> bool:
    """Whether `shape` is one array's shape (a tuple of ints)."""
    return isinstance(shape, (tuple, list)) and all(
        isinstance(d, (int, np.integer)) for d in shape)


def state_shape_of(state_shape, model: str) -> tuple:
    """`state_shape` normalised: one array's shape (a tuple of ints) or a tuple of such
    shapes (a tuple state, e.g. the resolutions of a multiscale DEQ); else a
    `ValueError` naming `model`."""
    if is_shape(state_shape):
        return tuple(int(d) for d in state_shape)
    if isinstance(state_shape, (tuple, list)) and state_shape and all(
            is_shape(s) for s in state_shape):
        return tuple(tuple(int(d) for d in s) for s in state_shape)
    raise ValueError(f"`{model}`: `state_shape` must be a tuple of ints (one array) or a "
                     f"tuple of such tuples (a tuple state), got {state_shape!r}.")


def leaf_shapes(state_shape) -> list:
    """The shapes of the state's leaves: one array (`state_shape` a tuple of ints) or a
    tuple of arrays (a tuple of such shapes)."""
    return [state_shape] if is_shape(state_shape) else list(state_shape)


def from_leaves(state_shape, leaves):
    """The state of `state_shape` from its leaves."""
    return leaves[0] if is_shape(state_shape) else tuple(leaves)
