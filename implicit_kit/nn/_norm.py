"""Weight and spectral normalisation, computed once per solve (see `prepare`)."""

import functools
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray

from ._prepare import AbstractPerSolve


def _get(layer, name):
    return getattr(layer, name)


def _set(layer, name, value):
    return eqx.tree_at(lambda lay: getattr(lay, name), layer, value)


def _norm_axes(ndim: int, dim: int | None) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if dim is None or i != dim % ndim)


class WeightNorm(AbstractPerSolve):
    r"""Weight normalisation $W = g \odot V / \|V\|$ (norm over every axis but `dim`:
    per output unit by default), applied to the `weight` of `layer` once per solve; $g$
    is learned, initialised to $\|V\|$ (so the layer starts as it was).

    Reference: Salimans & Kingma (2016); used by the DEQ and monDEQ papers.

    **Arguments:**

    - `layer`: an Equinox layer with a `weight` (`eqx.nn.Linear`, `eqx.nn.Conv2d`, ...).
    - `weight_name`: the name of the weight field.
    - `dim`: the axis kept (one scale per index along it; 0, the output axis of every
        Equinox layer, `ConvTranspose` included); `None`: one norm over the whole weight.
    """

    layer: eqx.Module
    g: Array
    weight_name: str = eqx.field(static=True)
    dim: int | None = eqx.field(static=True)

    def __init__(self, layer: eqx.Module, weight_name: str = "weight", dim: int | None = 0):
        self.layer = layer
        self.weight_name = weight_name
        self.dim = dim
        w = _get(layer, weight_name)
        self.g = jnp.sqrt(jnp.sum(w**2, axis=_norm_axes(w.ndim, dim), keepdims=True))

    def weight(self) -> Array:
        """The normalised weight `g · v / ‖v‖` (norm over every axis but `dim`)."""
        v = _get(self.layer, self.weight_name)
        norm = jnp.sqrt(jnp.sum(v**2, axis=_norm_axes(v.ndim, self.dim), keepdims=True))
        return self.g * v / norm

    def prepare(self, key, inference):
        return _set(self.layer, self.weight_name, self.weight())

    def __call__(self, *args, **kwargs):
        # Outside a solve, still correct (computed per call).
        return self.prepare(None, True)(*args, **kwargs)


@functools.partial(jax.jit, static_argnums=2)
def _singular_vectors(mat: Array, u0: Array, num_iters: int) -> tuple[Array, Array]:
    """The leading singular vectors of `mat` by `num_iters` power iterations from `u0`
    (jitted: called outside `jit`, compiled once per shape, not once per call)."""

    def body(_, u):
        v = mat.T @ u
        v = v / jnp.linalg.norm(v)
        u = mat @ v
        return u / jnp.linalg.norm(u)

    u = lax.fori_loop(0, num_iters, body, u0 / jnp.linalg.norm(u0))
    v = mat.T @ u
    return u, v / jnp.linalg.norm(v)


class SpectralNorm(AbstractPerSolve):
    r"""Spectral normalisation $W = \gamma\, V / \sigma_{\max}(V)$, once per solve.

    $\sigma_{\max}$ of the weight reshaped to (out, rest) is estimated by `num_iters`
    power iterations from a fixed start vector (no mutable state: the same estimate on
    every call with the same weight); as in Miyato et al. (2018) the singular vectors
    are not differentiated through. `scale` $\gamma$ sets the target norm (e.g. 0.9 to
    make a DEQ cell contractive in that layer).

    **Arguments:**

    - `layer`: an Equinox layer with a `weight`.
    - `scale`: the spectral norm of the normalised weight.
    - `num_iters`: power iterations per solve.
    - `weight_name`: the name of the weight field.
    - `dim`: the axis that indexes the rows of the matrix whose norm is taken (the
        weight is reshaped to `(shape[dim], rest)`; 0, the output axis of every Equinox
        layer).
    - `key`: for the start vector.
    """

    layer: eqx.Module
    u0: Array
    scale: float = eqx.field(static=True)
    num_iters: int = eqx.field(static=True)
    weight_name: str = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(
        self,
        layer: eqx.Module,
        scale: float = 1.0,
        num_iters: int = 20,
        weight_name: str = "weight",
        dim: int = 0,
        *,
        key: PRNGKeyArray,
    ):
        self.layer = layer
        self.scale = scale
        self.num_iters = num_iters
        self.weight_name = weight_name
        self.dim = dim
        w = _get(layer, weight_name)
        self.u0 = jr.normal(key, (w.shape[dim],), w.dtype)

    def sigma(self) -> Array:
        """The spectral norm estimate of the weight (power iteration from the stored
        vector, gradients stopped through the vectors)."""
        w = _get(self.layer, self.weight_name)
        w = jnp.moveaxis(w, self.dim, 0)
        mat = w.reshape(w.shape[0], -1)
        u, v = _singular_vectors(lax.stop_gradient(mat), lax.stop_gradient(self.u0),
                                 self.num_iters)
        return u @ mat @ v

    def weight(self) -> Array:
        """The weight divided by its spectral norm, times `scale`."""
        w = _get(self.layer, self.weight_name)
        return self.scale * w / self.sigma()

    def prepare(self, key, inference):
        return _set(self.layer, self.weight_name, self.weight())

    def __call__(self, *args, **kwargs):
        return self.prepare(None, True)(*args, **kwargs)



# The layers `apply_norm` reparametrises, each by its `weight` (output axis 0).
NORMED_LAYERS = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)
_NORMS = {"weight": WeightNorm, "spectral": SpectralNorm}


def _name(path) -> str:
    parts = []
    for k in path:
        for attr in ("name", "idx", "key"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def apply_norm(
    module,
    kind: str = "weight",
    *,
    filter_out: str | Sequence[str] = (),
    prefix_filter_out: str | Sequence[str] = (),
    where: Callable[[str, eqx.Module], bool] | None = None,
    key: PRNGKeyArray | None = None,
    **norm_kwargs,
):
    """`module` (any pytree of Equinox modules) with every `eqx.nn.Linear`, `Conv` and
    `ConvTranspose` layer reparametrised by `WeightNorm` (`kind="weight"`) or
    `SpectralNorm` (`kind="spectral"`): TorchDEQ's `apply_norm` for Equinox. The norms
    are computed once per solve by the models (`ik.nn.prepare`), which replaces
    TorchDEQ's `reset_norm`; `remove_norm` turns them back into plain layers.

    A layer is named by its dotted path in `module` (`"conv1"`, `"layers.0"`, ...):

    - `filter_out`: skip the layers whose name contains any of these strings;
    - `prefix_filter_out`: skip those whose name starts with any of these;
    - `where(name, layer) -> bool`: normalise only where it is true.

    `norm_kwargs` go to the norm (`dim`; `scale`, `num_iters` for spectral norm);
    `key` (spectral norm: the power iterations' start vectors) is needed for
    `kind="spectral"`. Layers already normalised are left as they are. Raises
    `ValueError` if no layer is left to normalise (a filter that matches everything
    would otherwise leave the model silently unnormalised).
    """
    if kind not in _NORMS:
        raise ValueError(f"`kind` must be one of {tuple(_NORMS)}, got {kind!r}.")
    if kind == "spectral" and key is None:
        raise ValueError("apply_norm(kind='spectral') needs `key=` (the start vectors of "
                         "the power iterations).")
    filter_out = (filter_out,) if isinstance(filter_out, str) else tuple(filter_out)
    prefixes = ((prefix_filter_out,) if isinstance(prefix_filter_out, str)
                else tuple(prefix_filter_out))

    def is_layer(x):
        return isinstance(x, (*NORMED_LAYERS, *_NORMS.values()))

    leaves, treedef = jtu.tree_flatten_with_path(module, is_leaf=is_layer)
    chosen = [
        i for i, (path, leaf) in enumerate(leaves)
        if isinstance(leaf, NORMED_LAYERS) and not any(s in _name(path) for s in filter_out)
        and not any(_name(path).startswith(p) for p in prefixes)
        and (where is None or where(_name(path), leaf))
    ]
    if not chosen:
        raise ValueError(
            "apply_norm: no Linear, Conv or ConvTranspose layer left to normalise in "
            f"{type(module).__name__} (after `filter_out`, `prefix_filter_out`, `where`)."
        )
    keys = iter(jr.split(key, len(chosen))) if key is not None else None
    out = [leaf for _, leaf in leaves]
    for i in chosen:
        extra = {"key": next(keys)} if kind == "spectral" else {}
        out[i] = _NORMS[kind](out[i], **norm_kwargs, **extra)
    return jtu.tree_unflatten(treedef, out)


def remove_norm(module):
    """`module` with every `WeightNorm` / `SpectralNorm` replaced by the plain layer it
    stands for, its weight the normalised one (TorchDEQ's `remove_norm`)."""
    def is_norm(x):
        return isinstance(x, tuple(_NORMS.values()))

    return jtu.tree_map(lambda x: x.prepare(None, True) if is_norm(x) else x, module,
                        is_leaf=is_norm)
