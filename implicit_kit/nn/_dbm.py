r"""Layers of the monotone deep Boltzmann machine (Feng, Winston & Kolter, "Monotone deep
Boltzmann machines", arXiv 2307.04990; the authors' code is locuslab/MonotoneDBM).

- `prox_softmax`: the proximal operator of
  $f(z) = \sum_i z_i \log z_i - \tfrac12\|z\|^2 + \mathbb 1_\Delta(z)$ with step
  $\alpha$, the mean-field nonlinearity of the damped splitting (softmax at
  $\alpha = 1$), with its own implicit derivative.
- `HollowCoupling`: the symmetric, hollow (no coupling inside a categorical variable)
  pairwise coupling $W = -(SA^\top A S - S^2 D)$ between tiers of categorical
  variables, $D = \mathrm{blkdiag}(A^\top A)$ over variables and $S$ one scale per
  variable, chosen so that $I - W \succeq mI$ for every $A$.
"""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, PRNGKeyArray


# ---------------------------------------------------------------------------------------
# The proximal softmax
# ---------------------------------------------------------------------------------------

_INIT_NEWTON = 30  # Newton steps for log z from the upper bracket (first multiplier)
_STEPS = 30  # Newton steps on the multiplier, each with 3 warm-started steps on log z


def _log_z(t, alpha, w, steps):
    r"""Solve $(1-\alpha)e^w + \alpha w = t$ for $w = \log z$ by Newton's method from a
    point right of the root: the left side is convex and increasing in $w$, so the
    iterates decrease monotonically to the root (no overshoot, no overflow)."""
    def newton(_, w):
        e = jnp.exp(w)
        return w - ((1 - alpha) * e + alpha * w - t) / ((1 - alpha) * e + alpha)

    return lax.fori_loop(0, steps, newton, w)


def _upper_bracket(t, alpha):
    r"""A point right of the root of $(1-\alpha)e^w + \alpha w = t$: $w \le t/\alpha$
    always; $w \le \log(t/(1-\alpha))$ when $t > 1 - \alpha$, and $w \le 0$ otherwise."""
    big = t > 1 - alpha
    safe = jnp.where(big, t, 1.0)
    return jnp.where(big, jnp.minimum(t / alpha, jnp.log(safe / (1 - alpha))),
                     jnp.minimum(t / alpha, 0.0))


def _prox_forward(y, alpha):
    r"""The KKT system of the prox, per coordinate $(1-\alpha)z_i + \alpha\log z_i =
    y_i - \alpha - \nu$, with $\sum_i z_i = 1$ (last axis). The multiplier $\nu$ is
    found by Newton's method from the left ($\nu = \max y - 1$, where the largest
    coordinate alone is 1): $\sum_i z_i(\nu) - 1$ is convex and decreasing in $\nu$, so
    Newton increases $\nu$ monotonically to the root. (The authors solve the same
    equations with Halley's method for $\log z$ and Newton for $\nu$,
    locuslab/MonotoneDBM `proxsoftmax.py`.)"""
    nu = jnp.max(y, axis=-1, keepdims=True) - 1.0
    t = y - alpha - nu
    w = _log_z(t, alpha, _upper_bracket(t, alpha), _INIT_NEWTON)

    def body(_, carry):
        nu, w = carry
        t = y - alpha - nu
        w = _log_z(t, alpha, w, 3)  # nu only grows: the old w is right of the root
        z = jnp.exp(w)
        d = z / ((1 - alpha) * z + alpha)
        nu = nu + (jnp.sum(z, -1, keepdims=True) - 1) / jnp.sum(d, -1, keepdims=True)
        return nu, w

    nu, w = lax.fori_loop(0, _STEPS, body, (nu, w))
    w = _log_z(y - alpha - nu, alpha, w, 3)
    return jnp.exp(w)


@jax.custom_jvp
def _prox(y, alpha):
    return _prox_forward(y, alpha)


@_prox.defjvp
def _prox_jvp(primals, tangents):
    # Implicit derivative of the KKT system: with d_i = z_i / ((1-a) z_i + a) and
    # r_i = z_i - 1 - log z_i, dz = d*u - d (d.u) / sum(d), u = dy + r da.
    y, alpha = primals
    dy, dalpha = tangents
    z = _prox(y, alpha)
    d = z / ((1 - alpha) * z + alpha)
    u = dy + (z - 1 - jnp.log(z)) * dalpha
    u = jnp.where(z > 0, u, 0.0)  # z = 0 (underflow): d = 0, keep log z out of it
    du = d * u
    return z, du - d * jnp.sum(du, -1, keepdims=True) / jnp.sum(d, -1, keepdims=True)


def prox_softmax(y: Array, alpha=1.0, axis: int = -1) -> Array:
    r"""The proximal softmax $\mathrm{prox}^\alpha_f(y) = \arg\min_z \tfrac12\|z - y\|^2 +
    \alpha f(z)$ with $f(z) = \sum_i z_i\log z_i - \tfrac12\|z\|^2 + \mathbb 1_\Delta(z)$
    (negative entropy minus half the squared norm, on the probability simplex) along
    `axis`.

    At $\alpha = 1$ it is `jax.nn.softmax(y - 1)` = `softmax(y)`, so parallel mean-field
    inference is forward–backward splitting with step 1; for $\alpha \in (0, 1)$ it is the
    resolvent of the damped splitting $q \leftarrow \mathrm{prox}^\alpha_f((1-\alpha)q +
    \alpha(Wq + b))$ of the monotone DBM, whose fixed point does not depend on
    $\alpha$. Computed by Newton's method on the KKT system (to the dtype's precision)
    and differentiated implicitly from it (forward and reverse mode, also in `alpha`).

    **Arguments:**

    - `y`: the input; `axis`: the axis of the categories.
    - `alpha`: the step in (0, 1] (a Python float or a traced scalar).
    """
    if isinstance(alpha, (int, float)) and not 0.0 < alpha <= 1.0:
        raise ValueError(f"`alpha` must be in (0, 1], got {alpha}.")
    if isinstance(alpha, (int, float)) and alpha == 1.0:
        return jax.nn.softmax(y, axis=axis)
    y = jnp.moveaxis(jnp.asarray(y), axis, -1)
    alpha = jnp.asarray(alpha, y.dtype)
    out = _prox(y, jnp.broadcast_to(alpha, (*y.shape[:-1], 1)))
    return jnp.moveaxis(out, -1, axis)


# ---------------------------------------------------------------------------------------
# The hollow monotone coupling
# ---------------------------------------------------------------------------------------


class Tier(eqx.Module):
    """A tier of categorical variables: a state of `shape` (`(C,)` or `(C, H, W)`), its
    `C` channels split into variables of `group` categories each (a one-hot group at
    every position): `Tier((K, 8, 8), K)` is an 8×8 image of K-level pixels,
    `Tier((10,), 10)` a 10-way label."""

    shape: tuple[int, ...] = eqx.field(static=True)
    group: int = eqx.field(static=True)

    def __check_init__(self):
        if len(self.shape) not in (1, 3):
            raise ValueError(f"`shape` must be (C,) or (C, H, W), got {self.shape}.")
        if self.group < 2 or self.shape[0] % self.group:
            raise ValueError(
                f"`group` must be >= 2 and divide the {self.shape[0]} channels, got "
                f"{self.group}.")

    @property
    def variables(self) -> int:
        return (self.shape[0] // self.group) * math.prod(self.shape[1:])

    def grouped(self, z: Array) -> Array:
        """`z` as `(C // group, group, *spatial)`: the categories of each variable on
        axis 1."""
        return z.reshape(self.shape[0] // self.group, self.group, *self.shape[1:])


def _conv(z, k, stride):
    pad = k.shape[-1] // 2
    return lax.conv_general_dilated(z[None], k, (stride, stride), [(pad, pad)] * 2)[0]


def _conv_tap_counts(in_hw, out_hw, kernel, stride):
    """`(kernel*kernel, H, W)` 0/1 masks: tap `t` of the zero-padded strided convolution
    reads input position `(h, w)` for some output position (static numpy)."""
    pad = kernel // 2
    masks = np.zeros((kernel * kernel, *in_hw), np.float32)
    for dy in range(kernel):
        for dx in range(kernel):
            for oy in range(out_hw[0]):
                for ox in range(out_hw[1]):
                    py, px = oy * stride + dy - pad, ox * stride + dx - pad
                    if 0 <= py < in_hw[0] and 0 <= px < in_hw[1]:
                        masks[dy * kernel + dx, py, px] = 1.0
    return masks


class _Edge(eqx.Module):
    """One factor of $A$: `src_map(z[src]) + dst_map(z[dst])`, in the dst tier's layout
    with `features` channels (a strided convolution from a spatial src, a dense map
    from any src into a vector dst; a 1×1 convolution or dense map from dst)."""

    src_w: Array
    dst_w: Array
    src: int = eqx.field(static=True)
    dst: int = eqx.field(static=True)
    kind: str = eqx.field(static=True)  # "conv" or "dense"
    stride: int = eqx.field(static=True)


class HollowCoupling(eqx.Module):
    r"""The monotone DBM's pairwise coupling between tiers of categorical variables:

    $$W = -\left(S A^\top A S - S^2 D\right), \qquad D = \mathrm{blkdiag}_j(A_j^\top A_j),$$

    where $A$ stacks one factor per edge $(s, d)$ of the tier graph, $A_e z =
    L_e z_s + R_e z_d$ ($L_e$ a strided `kernel`×`kernel` convolution between spatial
    tiers, dense into a vector tier; $R_e$ a 1×1 convolution or dense map), $A_j$ the
    columns of variable $j$ and $S = \mathrm{diag}(s_j)$ with
    $s_j = \min(1, \sqrt{(1-m)/\|A_j^\top A_j\|_2})$. So $W$ is symmetric (as Boltzmann
    potentials must be), hollow (no coupling between the categories of one variable)
    and $I - W \succeq I - S^2 D \succeq mI$ for every $A$: the mean-field fixed point is
    unique. $W$ is applied matrix-free (convolutions and their transposes); $D$ is
    computed exactly, per variable, from the kernels.

    `monotone=False` leaves out the scale ($S = I$): a plain symmetric hollow coupling
    with no margin, for comparison.

    **Arguments:**

    - `tiers`: the `ik.nn.Tier`s; `edges`: `(src, dst)` index pairs (a spatial dst
        needs a spatial src whose size it divides).
    - `m`: the margin in (0, 1).
    - `kernel`: the convolution size; `features`: channels of each edge's factor (default
        the dst tier's channels).
    - `key`: initialisation.
    """

    tiers: tuple[Tier, ...]
    edges: tuple[_Edge, ...]
    m: float = eqx.field(static=True)
    monotone: bool = eqx.field(static=True)

    def __init__(self, tiers: Sequence[Tier], edges: Sequence[tuple[int, int]],
                 m: float = 0.01, *, kernel: int = 3, features: int | None = None,
                 monotone: bool = True, init_scale: float = 1.0, key: PRNGKeyArray):
        if not 0.0 < m < 1.0:
            raise ValueError(f"`m` must be in (0, 1), got {m}.")
        self.tiers = tuple(tiers)
        self.m, self.monotone = m, monotone
        built = []
        for e, (s, d) in enumerate(edges):
            if not (0 <= s < len(tiers) and 0 <= d < len(tiers)) or s == d:
                raise ValueError(f"`edges[{e}]` = {(s, d)} must join two different tiers "
                                 f"among {len(tiers)}.")
            ts, td = self.tiers[s], self.tiers[d]
            f = td.shape[0] if features is None else features
            k1, k2, key = jr.split(key, 3)
            if len(td.shape) == 3:
                if len(ts.shape) != 3 or ts.shape[1] % td.shape[1] or ts.shape[2] % td.shape[2]:
                    raise ValueError(
                        f"`edges[{e}]`: a spatial tier {td.shape} needs a spatial source "
                        f"whose size it divides, got {ts.shape}.")
                stride = ts.shape[1] // td.shape[1]
                fan = ts.shape[0] * kernel * kernel
                src_w = init_scale * jr.normal(k1, (f, ts.shape[0], kernel, kernel))
                src_w = src_w / math.sqrt(fan)
                dst_w = init_scale * jr.normal(k2, (f, td.shape[0], 1, 1)) / math.sqrt(td.shape[0])
                built.append(_Edge(src_w, dst_w, s, d, "conv", stride))
            else:
                n_s = math.prod(ts.shape)
                src_w = init_scale * jr.normal(k1, (f, n_s)) / math.sqrt(n_s)
                dst_w = init_scale * jr.normal(k2, (f, td.shape[0])) / math.sqrt(td.shape[0])
                built.append(_Edge(src_w, dst_w, s, d, "dense", 1))
        self.edges = tuple(built)

    # -- A, and the per-variable blocks of AᵀA ------------------------------------------

    def _apply_a(self, zs):
        out = []
        for e in self.edges:
            zs_, zd = zs[e.src], zs[e.dst]
            if e.kind == "conv":
                out.append(_conv(zs_, e.src_w, e.stride) + _conv(zd, e.dst_w, 1))
            else:
                out.append(e.src_w @ zs_.reshape(-1) + e.dst_w @ zd)
        return tuple(out)

    def _diag_blocks(self):
        """$A_j^\\top A_j$ for every variable: per tier, `(C // g, *spatial, g, g)`."""
        blocks = []
        for i, t in enumerate(self.tiers):
            g, c, spatial = t.group, t.shape[0], t.shape[1:]
            acc = jnp.zeros((c // g, *spatial, g, g), self.edges[0].src_w.dtype)
            for e in self.edges:
                if e.src == i and e.kind == "conv":
                    k = e.src_w.reshape(e.src_w.shape[0], c // g, g, -1)  # (F, V, g, taps)
                    gram = jnp.einsum("fvat,fvbt->tvab", k, k)  # per tap
                    masks = _conv_tap_counts(spatial, self.tiers[e.dst].shape[1:],
                                             e.src_w.shape[-1], e.stride)
                    acc = acc + jnp.einsum("thw,tvab->vhwab", masks.astype(gram.dtype), gram)
                elif e.src == i:  # dense from this tier
                    cols = e.src_w.reshape(e.src_w.shape[0], c // g, g, *spatial)
                    gram = jnp.einsum("fva...,fvb...->v...ab", cols, cols)
                    acc = acc + gram
                if e.dst == i:
                    r = e.dst_w.reshape(e.dst_w.shape[0], c // g, g)
                    gram = jnp.einsum("fva,fvb->vab", r, r)
                    acc = acc + gram.reshape(c // g, *([1] * len(spatial)), g, g)
            blocks.append(acc)
        return blocks

    def operator(self) -> "HollowOperator":
        """$W$ as a `HollowOperator`, its scales and diagonal blocks computed once per
        solve."""
        blocks = self._diag_blocks()
        if self.monotone:
            scales = []
            for b in blocks:
                lam = jnp.linalg.eigvalsh(b)[..., -1]
                scales.append(jnp.minimum(1.0, jnp.sqrt((1 - self.m) / jnp.maximum(
                    lam, jnp.finfo(lam.dtype).tiny))))
        else:
            scales = [jnp.ones(b.shape[:-2], b.dtype) for b in blocks]
        return HollowOperator(self, tuple(blocks), tuple(scales))


def _scale(t: Tier, z, s):
    """Multiply every variable of tier `t` in `z` by its scale `s` `(C // g, *spatial)`."""
    return (t.grouped(z) * jnp.expand_dims(s, 1)).reshape(t.shape)


class HollowOperator(eqx.Module):
    """$W$ of a `HollowCoupling` for one solve: `W(z)` on a tuple of tier states."""

    coupling: HollowCoupling
    blocks: tuple[Array, ...]
    scales: tuple[Array, ...]

    def W(self, zs):
        """$Wz$ for `zs`, a tuple with one array per tier (the tiers' shapes)."""
        c = self.coupling
        sz = tuple(_scale(t, z, s) for t, z, s in zip(c.tiers, zs, self.scales))
        (ataz,) = jax.linear_transpose(c._apply_a, sz)(c._apply_a(sz))
        out = []
        for t, z, s, b, a in zip(c.tiers, sz, self.scales, self.blocks, ataz):
            zg = jnp.moveaxis(t.grouped(z), 1, -1)  # (V, *spatial, g)
            dz = jnp.moveaxis(jnp.einsum("...ab,...b->...a", b, zg), -1, 1).reshape(t.shape)
            out.append(_scale(t, dz - a, s))
        return tuple(out)

    def dense(self) -> Array:
        """The matrix of $W$ on the flattened concatenated state (tests, small models)."""
        sizes = [math.prod(t.shape) for t in self.coupling.tiers]

        def flat_w(v):
            zs, i = [], 0
            for t, n in zip(self.coupling.tiers, sizes):
                zs.append(v[i:i + n].reshape(t.shape))
                i += n
            return jnp.concatenate([o.reshape(-1) for o in self.W(tuple(zs))])

        n = sum(sizes)
        return jax.vmap(flat_w, out_axes=1)(jnp.eye(n, dtype=self.blocks[0].dtype))
