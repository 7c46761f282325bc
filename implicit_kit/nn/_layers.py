"""Well-posed implicit layers from the seed papers: subhomogeneous DEQ cells, the
convergent graph solver, and the modern Hopfield fixed-point layer."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


# --------------------------------------------------------------------------------------
# Subhomogeneous DEQ (Sittoni & Tudisco, ICML 2024)


def subhomogeneity_degree(shift: float) -> float:
    r"""The subhomogeneity degree $\mu(a) = \sup_y |y\,\mathrm{sech}^2 y| / (\tanh y + a)$
    of the shifted activation $\tanh(\cdot) + a$ ($a > 1$). E.g. $\mu(1.2) = 0.9991$,
    $\mu(1.603) = 0.4992$. Computed on a fine grid and refined (to ~1e-12)."""
    if not shift > 1.0:
        raise ValueError(f"`shift` must be > 1 (so that tanh + shift > 0), got {shift}.")

    def mu(y):
        return np.abs(y / np.cosh(y) ** 2) / (np.tanh(y) + shift)

    y = np.linspace(-30.0, 30.0, 600_001)
    i = int(np.argmax(mu(y)))
    lo, hi = y[max(i - 1, 0)], y[min(i + 1, len(y) - 1)]
    g = (np.sqrt(5) - 1) / 2
    for _ in range(100):  # golden section on the bracketing cell
        c, d = hi - g * (hi - lo), lo + g * (hi - lo)
        if mu(c) > mu(d):
            hi = d
        else:
            lo = c
    return float(mu((lo + hi) / 2))


class SubhomogeneousCell(eqx.Module):
    r"""The subhomogeneous DEQ cell $f(z, x) = \tanh(Wz) + \mathrm{ReLU}(Ux + b) + a$,
    optionally followed by $\infty$-normalisation $f / \|f\|_\infty$.

    For positive states this map is order-bounded and $\mu$-subhomogeneous with
    $\mu = $ `subhomogeneity_degree(a)` whatever $W$ (no norm constraint): a contraction
    in the Thompson metric when $\mu < 1$ ($\mu < 1/2$ with normalisation), so the
    positive fixed point is unique. `contraction_bound()` returns the constant ($\mu$,
    or $2\mu$ normalised); the constructor rejects shifts where it is $\ge 1$.
    Uniqueness does not make plain Picard converge: pair it with damping or Anderson.

    **Arguments:**

    - `size`, `input_size`: state and input sizes.
    - `shift`: $a$ (the authors: 1.2 unnormalised, 1.603 normalised).
    - `normalise`: $\infty$-normalise the output.
    - `init_scale`: std of the initial weights (the authors: 0.01).
    - `key`: initialisation.
    """

    w: Array
    u: eqx.nn.Linear
    shift: float = eqx.field(static=True)
    normalise: bool = eqx.field(static=True)

    def __init__(
        self,
        size: int,
        input_size: int,
        shift: float | None = None,
        *,
        normalise: bool = False,
        init_scale: float = 0.01,
        key: PRNGKeyArray,
    ):
        if shift is None:
            shift = 1.603 if normalise else 1.2
        kw, ku = jr.split(key)
        self.w = init_scale * jr.normal(kw, (size, size))
        self.u = eqx.nn.Linear(input_size, size, key=ku)
        self.shift = shift
        self.normalise = normalise
        bound = self.contraction_bound()
        if bound >= 1.0:
            raise ValueError(
                f"`shift`={shift} gives a contraction bound {bound:.4f} >= 1 "
                f"({'2 mu with normalise=True' if normalise else 'mu'}); increase `shift`."
            )

    def contraction_bound(self) -> float:
        """The contraction factor the subhomogeneity degree guarantees (Sittoni & Tudisco):
        the map is a contraction in the Thompson metric when this is below 1."""
        mu = subhomogeneity_degree(self.shift)
        return 2 * mu if self.normalise else mu

    def __call__(self, z: Array, x: Array) -> Array:
        out = jnp.tanh(self.w @ z) + jax.nn.relu(self.u(x)) + self.shift
        if self.normalise:
            out = out / jnp.max(jnp.abs(out))
        return out


# --------------------------------------------------------------------------------------
# Convergent graph solver (Park, Choo & Park, ICLR 2022)


def contracting_graph_map(logits: Array, adjacency: Array) -> Array:
    r"""$A_h[i, j] = \mathrm{clip}(\text{logit}_{h,i,j}, 0, 1)\, \mathbb{1}[j \in N(i)] /
    \mathrm{outdeg}(i)$: every row sums to at most 1, so $\|A_h\|_\infty \le 1$.

    `logits`: `(heads, N, N)`; `adjacency`: `(N, N)` (nonzero where an edge i→j exists).
    """
    mask = (adjacency != 0).astype(logits.dtype)
    deg = jnp.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
    return jnp.clip(logits, 0.0, 1.0) * mask / deg


def graph_fixed_point(
    logits: Float[Array, "heads n n"],
    adjacency: Float[Array, "n n"],
    b: Float[Array, "heads n d"],
    gamma: float = 0.5,
) -> Float[Array, "heads n d"]:
    r"""The fixed point $H^*_h = \gamma A_h H^*_h + b_h$ of the contracting linear graph
    map, by one linear solve $H^* = (I - \gamma A_h)^{-1} b_h$ per head.

    Unique for $\gamma < 1$ (Banach: $\|\gamma A\|_\infty \le \gamma$). The gradient is
    the implicit one, $\bar g = (I - \gamma A)^{-\top}\bar H$, $\bar b = \bar g$,
    $\bar A = \gamma \bar g H^{*\top}$ (JAX's rule for the linear solve; no unrolling).
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"`gamma` must be in [0, 1) for a contraction, got {gamma}.")
    if logits.ndim != 3 or logits.shape[1:] != adjacency.shape:
        raise ValueError(
            f"`logits` must be (heads, N, N) matching `adjacency` {adjacency.shape}, got "
            f"{logits.shape}."
        )
    if b.ndim != 3 or b.shape[:2] != logits.shape[:2]:
        raise ValueError(f"`b` must be (heads, N, d) = {logits.shape[:2]} + (d,), got {b.shape}.")
    a = contracting_graph_map(logits, adjacency)
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return jnp.linalg.solve(eye - gamma * a, b)


class ConvergentGraphLayer(eqx.Module):
    r"""A convergent graph solver layer: edge logits and node biases from node features,
    then the unique fixed point of the contracting map per head (see
    [`implicit_kit.nn.graph_fixed_point`][]); heads concatenated.

    **Arguments:**

    - `in_features`: node feature size; `hidden`: output size per head; `heads`.
    - `gamma`: the contraction factor (the paper: 0.5).
    - `key`: initialisation.
    """

    edge: eqx.nn.MLP
    node: eqx.nn.Linear
    heads: int = eqx.field(static=True)
    hidden: int = eqx.field(static=True)
    gamma: float = eqx.field(static=True)

    def __init__(self, in_features, hidden, heads=4, gamma=0.5, *, key):
        ke, kn = jr.split(key)
        self.edge = eqx.nn.MLP(2 * in_features, heads, 32, 1, activation=jax.nn.silu, key=ke)
        self.node = eqx.nn.Linear(in_features, heads * hidden, key=kn)
        self.heads, self.hidden, self.gamma = heads, hidden, gamma

    def __call__(self, nodes: Float[Array, "n f"], adjacency: Float[Array, "n n"]) -> Array:
        n = nodes.shape[0]
        pairs = jnp.concatenate(
            [jnp.repeat(nodes[:, None], n, 1), jnp.repeat(nodes[None], n, 0)], axis=-1
        )
        logits = jnp.moveaxis(jax.vmap(jax.vmap(self.edge))(pairs), -1, 0)
        b = jax.vmap(self.node)(nodes).reshape(n, self.heads, self.hidden)
        h = graph_fixed_point(logits, adjacency, jnp.swapaxes(b, 0, 1), self.gamma)
        return jnp.swapaxes(h, 0, 1).reshape(n, self.heads * self.hidden)


# --------------------------------------------------------------------------------------
# Modern Hopfield networks (Ramsauer et al., ICLR 2021)


def hopfield_update(xi: Float[Array, " d"], patterns: Float[Array, "d n"], beta) -> Array:
    r"""One update $\xi^+ = X\,\mathrm{softmax}(\beta X^\top \xi)$ (= dot-product attention
    of the query $\xi$ over keys and values $X$ with scale $\beta$)."""
    return patterns @ jax.nn.softmax(beta * (patterns.T @ xi))


def hopfield_energy(xi: Float[Array, " d"], patterns: Float[Array, "d n"], beta) -> Array:
    r"""$E(\xi) = -\beta^{-1}\log\sum_i e^{\beta x_i^\top\xi} + \tfrac12\xi^\top\xi +
    \beta^{-1}\log N + \tfrac12 M^2$, $M = \max_i\|x_i\|$; non-increasing along
    `hopfield_update` (a concave–convex procedure)."""
    n = patterns.shape[1]
    m = jnp.max(jnp.linalg.norm(patterns, axis=0))
    return (
        -jax.nn.logsumexp(beta * (patterns.T @ xi)) / beta
        + 0.5 * xi @ xi
        + jnp.log(n) / beta
        + 0.5 * m**2
    )
