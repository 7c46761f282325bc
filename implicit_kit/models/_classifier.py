"""The shared image backbone: every implicit model between the same stem and head."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray

from ..nn._cells import group_count
from ._base import AbstractImplicitModel, replace_fields
from ._shapes import check_input


class Stem(eqx.Module):
    """Conv3×3 (stride 1) → GN → ReLU → Conv3×3 (stride 2) → GN → ReLU: the HomoODE
    authors' downsampling stem, with GroupNorm in place of BatchNorm (stateless)."""

    conv1: eqx.nn.Conv2d
    gn1: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    gn2: eqx.nn.GroupNorm

    def __init__(self, in_channels: int, hidden: int, groups: int = 32, *,
                 key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        g = group_count(hidden, groups)
        self.conv1 = eqx.nn.Conv2d(in_channels, hidden, 3, padding=1, key=k1)
        self.gn1 = eqx.nn.GroupNorm(g, hidden)
        self.conv2 = eqx.nn.Conv2d(hidden, hidden, 3, stride=2, padding=1, key=k2)
        self.gn2 = eqx.nn.GroupNorm(g, hidden)

    def __call__(self, x: Array) -> Array:
        x = jax.nn.relu(self.gn1(self.conv1(x)))
        return jax.nn.relu(self.gn2(self.conv2(x)))


class Head(eqx.Module):
    """GN → ReLU → Conv1×1 (C→F) → GN → ReLU → global average pool → Linear(F→classes)."""

    gn1: eqx.nn.GroupNorm
    conv: eqx.nn.Conv2d
    gn2: eqx.nn.GroupNorm
    linear: eqx.nn.Linear

    def __init__(self, channels: int, final: int, classes: int, groups: int = 32, *,
                 key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.gn1 = eqx.nn.GroupNorm(group_count(channels, groups), channels)
        self.conv = eqx.nn.Conv2d(channels, final, 1, key=k1)
        self.gn2 = eqx.nn.GroupNorm(group_count(final, groups), final)
        self.linear = eqx.nn.Linear(final, classes, key=k2)

    def __call__(self, z: Array) -> Array:
        h = jax.nn.relu(self.gn2(self.conv(jax.nn.relu(self.gn1(z)))))
        return self.linear(jnp.mean(h, axis=(1, 2)))


class ImageClassifier(AbstractImplicitModel):
    """`head(block(stem(x)))`: the backbone shared by every implicit model so that they
    are compared on equal terms (as the HomoODE paper does). `block` is any implicit
    model called as `block(features, key=..., inference=..., return_stats=True)`:
    `DEQ`, `MonotoneDEQ`, `NeuralODE`, `AugmentedNeuralODE`, `HomoODE`.

    A block with a tuple state (`ik.nn.MultiscaleCell`) gives the head its first
    element, the highest resolution.

    Returns the logits, or with `return_stats=True` `(logits, stats)`: the block's
    per-sample
    [`implicit_kit.models.ModelStats`][], with `z_end` (the detached block output, for a
    learned initial point's `init_loss`) set.

    Build with `ImageClassifier.build(block_factory, in_channels, classes, hidden,
    final, key=...)`: the paper's sizes are hidden 64, final 256 (CIFAR-10); the digits
    default is hidden 16, final 32.
    """

    stem: Stem
    block: Any
    head: Head

    @classmethod
    def build(cls, block, *, in_channels: int, classes: int, hidden: int = 64,
              final: int = 256, block_channels: int | None = None, groups: int = 32,
              key: PRNGKeyArray):
        """`block`: the implicit model (its state has `hidden` channels, or
        `block_channels` for an augmented one)."""
        k1, k2 = jr.split(key)
        out = hidden if block_channels is None else block_channels
        return cls(Stem(in_channels, hidden, groups, key=k1), block,
                   Head(out, final, classes, groups, key=k2))

    def with_solver(self, **settings):
        """A copy whose block has other solver settings, every array kept: see
        [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        return replace_fields(self, block=self.block.with_solver(**settings))

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None,
                 inference: bool = False, return_stats: bool = False,
                 probe: Array | None = None):
        """`probe`: an `ik.backward_probe()`, passed on to the block (every model takes
        one) to read its implicit backward solve's statistics."""
        check_input("ImageClassifier", x, (self.stem.conv1.in_channels, None, None))
        z, stats = self.block(self.stem(x), key=key, inference=inference, return_stats=True,
                              probe=probe)
        # a tuple state (a multiscale DEQ): the head reads its highest resolution
        logits = self.head(z[0] if isinstance(z, tuple) else z)
        if not return_stats:
            return logits
        return logits, stats.replace(z_end=jax.lax.stop_gradient(z))

    def jacobian_frobenius(self, x: Array, z: Array, *, key: PRNGKeyArray) -> Array:
        """The block's Jacobian regulariser at its output `z` for the image `x` (a `DEQ`
        block: `DEQ.jacobian_frobenius` on the stem's features)."""
        return self.block.jacobian_frobenius(z, self.stem(x), key=key)
