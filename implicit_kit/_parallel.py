"""Data parallelism without a global reduction per solver iteration: `shard_batch`."""

import functools
import importlib
import importlib.metadata
import itertools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec as P


# lineax issue #185. Inside `jax.shard_map` (jax >= 0.7), `jax.eval_shape` gives traced
# arrays the manual mesh's sharding, while structures recorded elsewhere (a matrix
# operator's, a closure-converted function's) have none. equinox and lineax compare
# structures *with* their shardings, so any lineax solve on a matrix operator (LU, QR,
# GMRES's inner least squares) and any closure-converted call (diffrax's checkpointed
# adjoint) raise a spurious mismatch under `shard_map`.
#
# The workaround: their comparison helpers drop a sharding on a *manual* mesh axis (the
# sharding a structure has only inside a `shard_map` body) and leave every other
# structure as it is, so nothing changes outside `shard_map` bodies. It cannot be a
# context around `shard_batch`'s call: equinox's primitives (lineax's solves) are traced
# again when XLA lowers the program, at the caller's `jax.jit` compile, after
# `shard_batch` has returned (measured: a context restoring the originals on exit fails
# at lowering with "pytree does not match out_structure"). So it is installed by the
# first `shard_batch` call, for the process, and only for the releases listed here.
#
# The (module, name) of each helper, per distribution, and the newest release of each
# known to need it: `tests/test_parallel.py::test_the_dependency_patch_is_still_needed`
# fails once an installed release no longer does (then drop it here); a newer release is
# left unpatched, and that test tells whether it still needs the patch (then raise the
# bound).
_STRUCTURE_HELPERS = {
    "equinox": ("0.13.8", (("equinox._ad", "_strip_weak_dtype"),)),  # closure conversion
    "lineax": ("0.1.1", (("lineax._misc", "strip_weak_dtype"),
                         ("lineax._solve", "strip_weak_dtype"),
                         ("lineax._operator", "strip_weak_dtype"),
                         ("lineax._solver.misc", "strip_weak_dtype"))),
}
_PATCHED = []  # (module, name, original) of the installed patches


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _helpers_to_patch() -> list[tuple[object, str]]:
    """The (module, name) pairs to patch for the installed releases: those of each
    distribution whose installed version is at most the newest known to need it. A name
    missing there is an error (the workaround would silently stop working)."""
    found = []
    for dist, (newest, names) in _STRUCTURE_HELPERS.items():
        installed = importlib.metadata.version(dist)
        if _release(installed) > _release(newest):
            continue
        for module_name, name in names:
            module = importlib.import_module(module_name)
            if not callable(getattr(module, name, None)):
                raise RuntimeError(
                    f"implicit_kit.shard_batch works around lineax issue #185 by patching "
                    f"`{module_name}.{name}`, which {dist} {installed} does not have; "
                    "please report this with your versions of equinox and lineax."
                )
            found.append((module, name))
    return found


def _on_manual_mesh(sharding) -> bool:
    axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    return any(t == AxisType.Manual for t in axis_types)


def _drop_manual_sharding(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        if type(x) is jax.ShapeDtypeStruct and _on_manual_mesh(x.sharding) else x, tree)


def _compare_structures_without_manual_sharding() -> None:
    """Install the workaround for lineax issue #185 (see `_STRUCTURE_HELPERS`), once."""
    if _PATCHED:
        return
    for module, name in _helpers_to_patch():
        original = getattr(module, name)
        patched = functools.wraps(original)(
            lambda tree, f=original: f(_drop_manual_sharding(tree)))
        _PATCHED.append((module, name, original))
        setattr(module, name, patched)


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
    breaks lineax solves and diffrax's adjoints under `shard_map`, lineax issue #185:
    from the first call on, those comparisons ignore a sharding on a manual mesh axis,
    which only a structure inside a `shard_map` body has; see `_STRUCTURE_HELPERS`.)

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
        _compare_structures_without_manual_sharding()
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
        sharded = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(axis_name),
                                check_vma=False)
        return sharded(*args)

    return wrapped
