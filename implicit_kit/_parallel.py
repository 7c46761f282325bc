"""Data parallelism without a global reduction per solver iteration: `shard_batch`."""

import importlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P


# (module, name) of the helpers with which equinox and lineax compare array structures.
_STRUCTURE_HELPERS = (
    ("equinox._ad", "_strip_weak_dtype"),  # closure conversion (diffrax's adjoints)
    ("lineax._misc", "strip_weak_dtype"),
    ("lineax._solve", "strip_weak_dtype"),
    ("lineax._operator", "strip_weak_dtype"),
    ("lineax._solver.misc", "strip_weak_dtype"),
)
_PATCHED = set()


def _compare_structures_without_sharding() -> None:
    """Inside `jax.shard_map` (jax >= 0.7), `jax.eval_shape` gives traced arrays the
    manual mesh's sharding, while structures recorded elsewhere (a matrix operator's, a
    closure-converted function's) have none. equinox (0.13) and lineax (0.1) compare
    structures *with* their shardings, so any lineax solve on a matrix operator (LU, QR,
    GMRES's inner least squares) and any closure-converted call (diffrax's checkpointed
    adjoint) raise a spurious mismatch under `shard_map` (lineax issue #185). Their
    helpers are made to compare shapes and dtypes only, as they did before arrays had
    shardings; nothing else reads the sharding of these structures. Applied once, the
    first time `shard_batch` runs; helpers that are gone (a later, fixed release) are
    left alone."""

    def drop(tree):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
            if type(x) is jax.ShapeDtypeStruct else x, tree)

    for module_name, name in _STRUCTURE_HELPERS:
        if (module_name, name) in _PATCHED:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - a layout this shim does not know
            continue
        original = getattr(module, name, None)
        if original is None:  # pragma: no cover
            continue
        setattr(module, name, lambda tree, original=original: original(drop(tree)))
        _PATCHED.add((module_name, name))


def shard_batch(fn: Callable, in_axes: int | None | Sequence[int | None] = 0, *,
                devices=None, mesh: Mesh | None = None,
                axis_name: str = "data") -> Callable:
    """`fn`, a function of batched arrays (typically a `jax.vmap` of a solve or of a
    model), run on each device's shard of the batch separately.

    Under `jax.jit` with the batch sharded over devices, a vmapped solve's loop condition,
    "any sample still running", is a reduction over the whole batch: every device waits
    for every other at each iteration, and keeps iterating until the slowest sample *of
    the whole batch* has stopped. `shard_batch(fn)` runs `fn` under `jax.shard_map`
    instead: each device loops over its own samples and stops when they have. Each
    sample is still solved on its own (implicit_kit freezes converged samples), so the
    values, step counts and gradients equal those of `fn` on one device.

    **Arguments:**

    - `fn`: a function whose batched arguments and every output have the batch on their
      leading axis. Its outputs must be per-sample (reduce over the batch outside `fn`).
    - `in_axes`: as `jax.vmap`'s, one entry per positional argument (or one for all):
      `0` for an argument split over the devices along its leading axis, `None` for one
      every device receives whole (parameters).
    - `devices`: the devices (default: all of them, `jax.devices()`, across processes
      too), or `mesh`: a one-axis `Mesh` whose axis is `axis_name`.

    The batch must divide evenly over the devices. Gradients flow through (the
    cotangents of `None` arguments are summed over the devices), including the implicit
    backward solves, which then also run per device.

    (equinox and lineax compare array structures including their shardings, which
    breaks lineax solves and diffrax's adjoints under `shard_map`, lineax issue #185;
    the first call makes those comparisons ignore shardings, see
    `_compare_structures_without_sharding`.)

    ```python
    solve = jax.vmap(lambda x: ik.fixed_point(f, z0, x, ik.Anderson()).value)
    z = jax.jit(ik.shard_batch(solve))(x)      # each device on its own samples
    ```
    """
    if mesh is None:
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise ValueError("`shard_batch(devices=...)` got no devices.")
        mesh = Mesh(np.array(devices), (axis_name,))
    elif mesh.axis_names != (axis_name,):
        raise ValueError(
            f"`shard_batch(mesh=...)` needs a one-axis mesh named {axis_name!r} "
            f"(`axis_name`), got axes {mesh.axis_names}."
        )
    size = mesh.devices.size

    def spec(axis):
        if axis == 0:
            return P(axis_name)
        if axis is None:
            return P()
        raise ValueError(
            f"`shard_batch(in_axes=...)` entries must be 0 (batched) or None "
            f"(replicated), got {axis!r}."
        )

    def wrapped(*args):
        _compare_structures_without_sharding()
        axes = in_axes if isinstance(in_axes, (list, tuple)) else (in_axes,) * len(args)
        if len(axes) != len(args):
            raise ValueError(
                f"`shard_batch(in_axes=...)` has {len(axes)} entries for {len(args)} "
                "arguments."
            )
        for i, (a, axis) in enumerate(zip(args, axes)):
            if axis == 0:
                for leaf in jax.tree_util.tree_leaves(a):
                    n = np.shape(leaf)[0] if np.ndim(leaf) else None
                    if n is None or n % size:
                        raise ValueError(
                            f"`shard_batch`: argument {i} has a leading (batch) axis of "
                            f"{n}, which must divide evenly over the {size} devices."
                        )
        in_specs = tuple(spec(axis) for axis in axes)
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(axis_name),
                             check_vma=False)(*args)

    return wrapped
