r"""The monotone deep Boltzmann machine (Feng, Winston & Kolter, arXiv 2307.04990;
locuslab/MonotoneDBM): mean-field inference in a pairwise Boltzmann machine over
categorical variables whose coupling is monotone, so that the mean-field fixed point is
unique, found by the damped forward–backward splitting
$q \leftarrow \mathrm{prox}^\alpha_f((1-\alpha)q + \alpha(Wq + b))$ and differentiated
implicitly.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray

from .._adjoint import ImplicitAdjoint
from .._fixed_point import fixed_point
from ..nn import HollowCoupling, prox_softmax, Tier
from ..solvers import Anderson
from ._base import AbstractImplicitModel, with_fixed_point_settings
from ._stats import ModelStats


class _MeanFieldMap(eqx.Module):
    """The damped mean-field map at step `alpha` (a module with static fields only, so
    that a solve called outside `jit` with the same `alpha` is compiled once)."""

    alpha: float = eqx.field(static=True)

    def __call__(self, q, args):
        alpha = self.alpha
        op, biases, obs, masks = args
        wq = op.W(q)
        out = []
        for t, qi, wi, bi, oi, mi in zip(op.coupling.tiers, q, wq, biases, obs, masks):
            pre = t.grouped((1 - alpha) * qi + alpha * (wi + bi))
            p = prox_softmax(pre, alpha, axis=1).reshape(t.shape)
            if mi is not None:  # clamped variables keep their observed one-hot value
                p = jnp.where(jnp.repeat(mi, t.group, 0), oi, p)
            out.append(p)
        return tuple(out)


def focal_loss(logits: Array, labels: Array, gamma: float = 2.0, axis: int = 0) -> Array:
    r"""The focal loss $-(1 - p_y)^\gamma \log p_y$ (Lin et al., 2017) of `logits` along
    `axis` at the integer `labels` (`gamma = 0`: cross-entropy), elementwise."""
    logp = jax.nn.log_softmax(logits, axis=axis)
    lp = jnp.take_along_axis(logp, jnp.expand_dims(labels, axis), axis=axis).squeeze(axis)
    return -((1 - jnp.exp(lp)) ** gamma) * lp


class MonotoneDBM(AbstractImplicitModel):
    r"""A monotone deep Boltzmann machine: categorical variables in tiers
    (`ik.nn.Tier`), the coupling `ik.nn.HollowCoupling` (symmetric, hollow,
    $I - W \succeq mI$) and a bias per variable and category; mean-field inference
    $q = \mathrm{softmax}(Wq + b)$ (per variable), with any variables clamped to
    observed values, has a unique solution, found by the damped splitting
    $q \leftarrow \mathrm{prox}^\alpha_f((1-\alpha)q + \alpha(Wq + b))$ (its fixed point
    does not depend on $\alpha$) with `ik.fixed_point` and differentiated by the model's
    adjoint (default `ik.ImplicitAdjoint()`).

    `MonotoneDBM.image(...)` builds the image model of the paper: pixels binned into
    `bins` levels, a convolutional hidden tier at half the resolution and a label
    variable; `model(x, key=...)` observes a random fraction of the pixels and returns the
    label logits for classification, with the reconstruction loss of the unobserved
    pixels in the stats (the task the paper trains).

    **Arguments:**

    - `coupling`: the `ik.nn.HollowCoupling`; `biases`: one array per tier (its shape).
    - `alpha`: the damping $\alpha \in (0, 1]$ (the paper's 0.125).
    - `solver`: the fixed-point solver of the damped map (default
        `ik.Anderson(rtol=1e-4, atol=1e-5)`, as the authors' code: Anderson).
    - `adjoint`: the backward mode (default `ik.ImplicitAdjoint()`).
    - `max_steps`, `throw`: as for `ik.fixed_point` (50; `False`, the rule for models).
    - `observed`, `recon_weight`, `gamma`: the image task: the fraction of pixels
        observed (0.4), the weight of the reconstruction loss, its focal exponent.
    """

    coupling: HollowCoupling
    biases: tuple[Array, ...]
    alpha: float = eqx.field(static=True, default=0.125)
    solver: Any = Anderson(rtol=1e-4, atol=1e-5)
    adjoint: Any = None
    max_steps: int = eqx.field(static=True, default=50)
    throw: bool = eqx.field(static=True, default=False)
    observed: float = eqx.field(static=True, default=0.4)
    recon_weight: float = eqx.field(static=True, default=1.0)
    gamma: float = eqx.field(static=True, default=2.0)

    def __check_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be in (0, 1], got {self.alpha}.")
        if not 0.0 <= self.observed < 1.0:
            raise ValueError(f"`observed` must be in [0, 1), got {self.observed}.")
        shapes = tuple(t.shape for t in self.coupling.tiers)
        got = tuple(b.shape for b in self.biases)
        if got != shapes:
            raise ValueError(f"`biases` must have the tiers' shapes {shapes}, got {got}.")

    @classmethod
    def image(cls, shape: tuple[int, int], *, bins: int = 8, hidden: int = 16,
              group: int = 4, classes: int = 10, m: float = 0.01, kernel: int = 3,
              monotone: bool = True, init_scale: float = 1.0, key: PRNGKeyArray,
              **kwargs) -> "MonotoneDBM":
        """The image model: tiers pixels `(bins, H, W)` (one variable per pixel), a
        hidden `(hidden, H/2, W/2)` tier of `group`-way variables, and a `classes`-way
        label; edges pixels→hidden (strided convolution), hidden→label and pixels→label
        (dense).
        `monotone=False`: the plain DBM (no margin) for comparison. `kwargs` go to the
        model (alpha, solver, ...)."""
        h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"`shape` must be even, got {shape}.")
        tiers = (Tier((bins, h, w), bins), Tier((hidden, h // 2, w // 2), group),
                 Tier((classes,), classes))
        coupling = HollowCoupling(tiers, [(0, 1), (1, 2), (0, 2)], m, kernel=kernel,
                                  monotone=monotone, init_scale=init_scale, key=key)
        biases = tuple(jnp.zeros(t.shape) for t in tiers)
        return cls(coupling, biases, **kwargs)

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self.coupling.tiers

    def infer(self, values=None, masks=None, *, y0=None, probe=None):
        """Mean-field marginals with the variables where `masks[i]` (per tier, shape
        `(C // group, *spatial)` booleans, or `None`) is True clamped to `values[i]`
        (one-hot, the tier's shape). Returns `(marginals, pre, solution)`: the marginals
        per tier, the mean-field inputs `Wq + b` (logits: the marginals are their
        softmax at the fixed point) and the `ik.Solution`."""
        tiers = self.tiers
        masks = (None,) * len(tiers) if masks is None else tuple(masks)
        values = (None,) * len(tiers) if values is None else tuple(values)
        dtype = self.biases[0].dtype
        uniform = tuple(jnp.full(t.shape, 1.0 / t.group, dtype) for t in tiers)
        obs = tuple(u if v is None else v.astype(dtype) for u, v in zip(uniform, values))
        if y0 is None:
            y0 = tuple(u if mk is None else jnp.where(jnp.repeat(mk, t.group, 0), o, u)
                       for t, u, o, mk in zip(tiers, uniform, obs, masks))
        adjoint = ImplicitAdjoint() if self.adjoint is None else self.adjoint
        op = self.coupling.operator()
        sol = fixed_point(_MeanFieldMap(self.alpha), y0, (op, self.biases, obs, masks),
                          self.solver, adjoint=adjoint, max_steps=self.max_steps,
                          throw=self.throw, probe=probe)
        q = sol.value
        pre = tuple(a + b for a, b in zip(op.W(q), self.biases))
        return q, pre, sol

    def bin(self, x: Array) -> Array:
        """Pixel levels in [0, 1] `(1, H, W)` (or `(H, W)`) as integer bins `(H, W)`."""
        bins = self.tiers[0].group
        x = x.reshape(self.tiers[0].shape[1:])
        return jnp.clip(jnp.floor(x * bins), 0, bins - 1).astype(jnp.int32)

    def with_solver(self, **settings):
        """A copy with other solver settings (`solver`, `adjoint`, `max_steps`, `throw`,
        `rtol`, `atol`), every array kept: see
        [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        return with_fixed_point_settings(self, settings)

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None,
                 inference: bool = False, return_stats: bool = False, probe=None,
                 observed_mask: Array | None = None):
        """The image task on one image `x` `(1, H, W)` with levels in [0, 1]: observe
        the pixels of `observed_mask` (`(H, W)` booleans; default a random `observed`
        fraction drawn from `key`), infer the rest and the label. Returns the label
        logits and (`return_stats=True`) the `ModelStats`, with `aux_loss` (the weighted
        focal reconstruction loss over the unobserved pixels), `metrics`
        (`imputation_mse`: the squared error of the marginal mean intensity on the
        unobserved pixels; `pixel_acc`) and `extras` `pixels` (the marginal mean image)
        and `observed_mask`."""
        del inference  # no stochastic layers: the key only draws the observed pixels
        pix = self.tiers[0]
        bins = pix.group
        levels = self.bin(x)
        if observed_mask is None:
            if key is None:
                raise ValueError("MonotoneDBM needs `key` (to draw the observed pixels) or "
                                 "`observed_mask`.")
            observed_mask = jr.bernoulli(key, self.observed, pix.shape[1:])
        mask = observed_mask.reshape(1, *pix.shape[1:])
        onehot = jnp.moveaxis(jax.nn.one_hot(levels, bins, dtype=self.biases[0].dtype), -1, 0)
        q, pre, sol = self.infer((onehot, None, None), (mask, None, None), probe=probe)
        logits = pre[-1]
        if not return_stats:
            return logits
        free = 1.0 - mask[0].astype(logits.dtype)
        nfree = jnp.maximum(jnp.sum(free), 1.0)
        recon = jnp.sum(free * focal_loss(pre[0], levels, self.gamma)) / nfree
        centres = (jnp.arange(bins, dtype=logits.dtype) + 0.5) / bins
        mean_img = jnp.einsum("k,khw->hw", centres, q[0])
        truth = x.reshape(mean_img.shape).astype(logits.dtype)
        metrics = {
            "imputation_mse": jnp.sum(free * (mean_img - truth) ** 2) / nfree,
            "pixel_acc": jnp.sum(free * (jnp.argmax(q[0], 0) == levels)) / nfree,
        }
        stats = ModelStats.from_solution(
            sol, aux_loss=self.recon_weight * recon, metrics=metrics,
            extras={"pixels": jax.lax.stop_gradient(mean_img),
                    "observed_mask": observed_mask})
        return logits, stats
