"""DEQ cells `f(z, x)`: an MLP cell and a convolutional cell with input injection."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray

from ._dropout import VariationalDropout
from ._norm import SpectralNorm, WeightNorm


def _normed(layer, norm: str | None, scale: float, key):
    if norm is None:
        return layer
    if norm == "weight":
        return WeightNorm(layer)
    if norm == "spectral":
        return SpectralNorm(layer, scale=scale, key=key)
    raise ValueError(f"`norm` must be None, 'weight' or 'spectral', got {norm!r}.")


class MLPCell(eqx.Module):
    r"""The MLP DEQ cell $f(z, x) = \sigma(W_2\, \mathrm{drop}(\sigma(W_1 z + U x + b_1))
    + b_2)$, or with `hidden=None` the one-layer cell $\sigma(W z + U x + b)$.

    **Arguments:**

    - `size`: the state size; `input_size`: the size of the injected input `x`.
    - `hidden`: the hidden width (`None`: one layer).
    - `activation`: $\sigma$ (default `tanh`).
    - `norm`: `None`, `"weight"` or `"spectral"` on the state weights (computed once per
        solve); `spectral_scale`: the spectral norm of each normalised weight.
    - `dropout`: variational dropout on the hidden layer (one mask per solve).
    - `key`: initialisation.
    """

    w1: eqx.Module
    u: eqx.nn.Linear
    w2: eqx.Module | None
    drop: VariationalDropout | None
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        size: int,
        input_size: int,
        hidden: int | None = None,
        *,
        activation: Callable = jax.nn.tanh,
        norm: str | None = None,
        spectral_scale: float = 0.9,
        dropout: float = 0.0,
        key: PRNGKeyArray,
    ):
        k1, k2, k3, k4, k5 = jr.split(key, 5)
        width = size if hidden is None else hidden
        self.w1 = _normed(eqx.nn.Linear(size, width, use_bias=False, key=k1), norm,
                          spectral_scale, k4)
        self.u = eqx.nn.Linear(input_size, width, key=k2)
        self.w2 = (
            None
            if hidden is None
            else _normed(eqx.nn.Linear(hidden, size, key=k3), norm, spectral_scale, k5)
        )
        self.drop = VariationalDropout(dropout, (width,)) if dropout > 0 else None
        self.activation = activation

    def __call__(self, z: Array, x: Array) -> Array:
        h = self.activation(self.w1(z) + self.u(x))
        if self.w2 is None:
            return h
        if self.drop is not None:
            h = self.drop(h)
        return self.activation(self.w2(h))


class ConvCell(eqx.Module):
    r"""A convolutional cell on `(C, H, W)` feature maps with input injection:

    $h = \mathrm{ReLU}(\mathrm{GN}(\mathrm{conv}_1 z)) + x$,
    $h = \mathrm{GN}(\mathrm{drop}(\mathrm{conv}_2 h))$, and
    $f(z, x) = \mathrm{GN}(\mathrm{ReLU}(z + h))$ (`residual=True`, the MDEQ-style DEQ
    cell) or $f = h$ (`residual=False`, the HomoODE vector field: Conv3×3 → GroupNorm →
    ReLU → (+x) → Conv3×3 → dropout → GroupNorm).

    **Arguments:**

    - `channels`: channels of the state and of the injected `x`.
    - `groups`: GroupNorm groups (must divide the channel counts).
    - `norm`: `None` | `"weight"` | `"spectral"` on the convolutions (once per solve).
    - `dropout`: per-channel variational dropout (one mask per solve).
    - `residual`: see above.
    - `inject`: add the input `x` (`False`: a plain Neural ODE field, `x` unused).
    - `key`: initialisation.
    """

    conv1: eqx.Module
    conv2: eqx.Module
    gn1: eqx.nn.GroupNorm
    gn2: eqx.nn.GroupNorm
    gn3: eqx.nn.GroupNorm | None
    drop: VariationalDropout | None
    inject: bool = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        *,
        groups: int = 4,
        norm: str | None = "weight",
        dropout: float = 0.0,
        residual: bool = True,
        inject: bool = True,
        key: PRNGKeyArray,
    ):
        self.inject = inject
        if channels % groups:
            raise ValueError(f"`groups`={groups} must divide `channels`={channels}.")
        k1, k2, k3, k4 = jr.split(key, 4)
        conv1 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k1)
        conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k2)
        self.conv1 = _normed(conv1, norm, 1.0, k3)
        self.conv2 = _normed(conv2, norm, 1.0, k4)
        self.gn1 = eqx.nn.GroupNorm(groups, channels)
        self.gn2 = eqx.nn.GroupNorm(groups, channels)
        self.gn3 = eqx.nn.GroupNorm(groups, channels) if residual else None
        self.drop = VariationalDropout(dropout, (channels, 1, 1)) if dropout > 0 else None

    def __call__(self, z: Array, x: Array | None = None) -> Array:
        h = jax.nn.relu(self.gn1(self.conv1(z)))
        if self.inject:
            if x is None or x.shape != z.shape:
                raise ValueError(
                    f"ConvCell: `x` must have the state's shape {z.shape}, got "
                    f"{None if x is None else x.shape}."
                )
            h = h + x
        h = self.conv2(h)
        if self.drop is not None:
            h = self.drop(h)
        h = self.gn2(h)
        if self.gn3 is None:
            return h
        return self.gn3(jax.nn.relu(z + h))



class MLPField(eqx.Module):
    r"""An MLP vector field $g(z, x)$ for Neural ODEs: `depth` hidden layers of `width`
    on $z$ (concatenated with the condition $x$ when `input_size > 0`), output the size
    of $z$.

    **Arguments:**

    - `size`: the state size; `width`, `depth`: the hidden layers.
    - `input_size`: size of the injected condition (0: none, a plain Neural ODE field).
    - `activation`: default `tanh`.
    - `key`: initialisation.
    """

    mlp: eqx.nn.MLP
    input_size: int = eqx.field(static=True)

    def __init__(self, size: int, width: int, depth: int = 1, input_size: int = 0, *,
                 activation: Callable = jax.nn.tanh, key: PRNGKeyArray):
        self.mlp = eqx.nn.MLP(size + input_size, size, width, depth, activation=activation,
                              key=key)
        self.input_size = input_size

    def __call__(self, z: Array, x: Array | None = None) -> Array:
        if self.input_size:
            if x is None or x.shape != (self.input_size,):
                raise ValueError(
                    f"MLPField: `x` must have shape ({self.input_size},), got "
                    f"{None if x is None else x.shape}."
                )
            z = jax.numpy.concatenate([z, x])
        return self.mlp(z)


def group_count(c: int, groups: int) -> int:
    """The largest number of GroupNorm groups `<= groups` that divides `c` channels."""
    g = min(groups, c)
    while c % g:
        g -= 1
    return g


class MultiscaleCell(eqx.Module):
    r"""A multiscale DEQ cell in the manner of MDEQ (Bai, Koltun & Kolter, "Multiscale
    Deep Equilibrium Models", NeurIPS 2020) on a tuple state $(z_0, \dots, z_{S-1})$:
    $z_s$ has `channels[s]` channels at about $H/2^s \times W/2^s$ (`state_shape`).
    One evaluation:

    1. per resolution, the block of `ConvCell` (plain form, `residual=False`):
       $h_s = \mathrm{GN}(\mathrm{conv}(\mathrm{ReLU}(\mathrm{GN}(\mathrm{conv}\,z_s)) +
       x_s))$, the input $x$ injected at the highest resolution only ($x_s = 0$ for
       $s > 0$, as MDEQ);
    2. multi-resolution fusion: each resolution $s$ sums every $h_r$ brought to it,
       by stride-2 3×3 convolutions + GroupNorm (one per halving, ReLU between) from a
       higher resolution, by a 1×1 convolution + GroupNorm and nearest upsampling from
       a lower one;
    3. $z_s' = \mathrm{GN}(\mathrm{ReLU}(\cdot))$.

    So the resolutions exchange information at every step of the solve. Call it as
    `cell(z, x)` with `z` a tuple and `x` of shape `(channels[0], H, W)`; use it in
    `ik.models.DEQ(cell, cell.state_shape, ...)`. The MDEQ paper's classification head
    reads every resolution; `ik.models.ImageClassifier` reads the highest, $z_0$, into
    which all the others are fused at every step.

    **Arguments:**

    - `channels`: the channels of each resolution, highest first (e.g. `(16, 32)`).
    - `shape`: the spatial size `(H, W)` of the highest resolution.
    - `groups`: GroupNorm groups (the largest divisor of each channel count up to it).
    - `norm`: `None` | `"weight"` | `"spectral"` on the branch convolutions.
    - `dropout`: per-channel variational dropout in the branches (one mask per solve).
    - `key`: initialisation.
    """

    branches: tuple
    fuse: tuple  # fuse[s][r]: resolution r brought to s (None on the diagonal)
    post: tuple
    shapes: tuple = eqx.field(static=True)

    def __init__(self, channels: tuple[int, ...], shape: tuple[int, int], *,
                 groups: int = 4, norm: str | None = "weight", dropout: float = 0.0,
                 key: PRNGKeyArray):
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"`channels` must list two or more resolutions, got {channels}.")
        h, w = (int(d) for d in shape)
        shapes = []
        for c in channels:
            shapes.append((c, h, w))
            h, w = (h + 1) // 2, (w + 1) // 2  # a stride-2 3x3 conv with padding 1
        self.shapes = tuple(shapes)
        n = len(channels)
        keys = iter(jr.split(key, 3 * n * n + n))
        self.branches = tuple(
            ConvCell(c, groups=group_count(c, groups), norm=norm, dropout=dropout,
                     residual=False, inject=(s == 0), key=next(keys))
            for s, c in enumerate(channels))
        fuse = []
        for s, cs in enumerate(channels):
            row = []
            for r, cr in enumerate(channels):
                if r == s:
                    row.append(None)
                elif r > s:  # lower resolution: 1x1 conv + GN, then upsampling
                    row.append((eqx.nn.Conv2d(cr, cs, 1, use_bias=False, key=next(keys)),
                                eqx.nn.GroupNorm(group_count(cs, groups), cs)))
                else:  # higher resolution: s - r stride-2 convs
                    steps = []
                    for i in range(s - r):
                        out = cs if i == s - r - 1 else cr
                        steps.append((eqx.nn.Conv2d(cr, out, 3, stride=2, padding=1,
                                                    use_bias=False, key=next(keys)),
                                      eqx.nn.GroupNorm(group_count(out, groups), out)))
                    row.append(tuple(steps))
            fuse.append(tuple(row))
        self.fuse = tuple(fuse)
        self.post = tuple(eqx.nn.GroupNorm(group_count(c, groups), c) for c in channels)

    @property
    def state_shape(self) -> tuple[tuple[int, ...], ...]:
        """The shapes of the state's resolutions, highest first."""
        return self.shapes

    def _bring(self, s: int, r: int, h: Array) -> Array:
        f = self.fuse[s][r]
        if r > s:
            conv, gn = f
            out = gn(conv(h))
            return jax.image.resize(out, self.shapes[s], "nearest")
        for i, (conv, gn) in enumerate(f):
            h = gn(conv(h))
            if i < len(f) - 1:
                h = jax.nn.relu(h)
        return h

    def __call__(self, z: tuple, x: Array) -> tuple:
        if not isinstance(z, tuple) or len(z) != len(self.shapes):
            raise ValueError(f"MultiscaleCell: `z` must be a tuple of {len(self.shapes)} "
                             f"arrays of shapes {self.shapes}.")
        hs = [branch(zs, x if s == 0 else None) for s, (branch, zs) in
              enumerate(zip(self.branches, z))]
        out = []
        for s in range(len(hs)):
            total = hs[s]
            for r in range(len(hs)):
                if r != s:
                    total = total + self._bring(s, r, hs[r])
            out.append(self.post[s](jax.nn.relu(total)))
        return tuple(out)
