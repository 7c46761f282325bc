"""The reversible fixed-point iteration of Reversible DEQs (McCallum, Arora, Foster 2025).

Ported from `sammccallum/reversible-deq`, `reversible_deq/_solver/reversible.py` (the
forward update) and `reversible_deq/_adjoint.py` (its reversal, in
`implicit_kit.ReversibleAdjoint`), written for implicit_kit's solver protocol.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._misc import tree_sub, tree_where
from ._base import (
    AbstractFixedPointSolver,
    AbstractSolverState,
    check_number,
    init_residual,
)


def _relax(beta, a, b):
    """`(1 - beta) a + beta b`, leaf by leaf, in `a`'s dtype: the one update of the
    reversible iteration (the forward pass and its reversal must round alike)."""
    return jtu.tree_map(lambda u, v: ((1 - beta) * u + beta * v).astype(u.dtype), a, b)


def _unrelax(beta, c, b):
    """The inverse of `relax` in its first argument: `(c - beta b) / (1 - beta)`."""
    return jtu.tree_map(lambda w, v: ((w - beta * v) / (1 - beta)).astype(w.dtype), c, b)


class _ReversibleState(AbstractSolverState):
    residual: Float[Array, ""]
    scale: Float[Array, ""]
    partner: PyTree  # the second sequence `y_n` (the driver's iterate is `z_n`)
    step: Int[Array, ""]
    # Exact copies of `(z_n, y_n)` every `anchor_every` steps (`ReversibleAdjoint`
    # re-anchors its reversal on them); empty unless the adjoint asks for them.
    anchors: PyTree


class Reversible(AbstractFixedPointSolver):
    r"""The reversible coupled iteration of Reversible DEQs.

    Two sequences started at $z_0 = y_0$ and relaxed in turn,

    $$y_{n+1} = (1-\beta)\,y_n + \beta\,T(z_n), \qquad
      z_{n+1} = (1-\beta)\,z_n + \beta\,T(y_{n+1}),$$

    two evaluations of `T` per step; the iterate (the solution returned) is $z_n$. The
    update can be run backwards exactly in exact arithmetic,
    $z_n = (z_{n+1} - \beta T(y_{n+1}))/(1-\beta)$ and then
    $y_n = (y_{n+1} - \beta T(z_n))/(1-\beta)$, which
    [`implicit_kit.ReversibleAdjoint`][] uses to return the exact gradient of the
    computed iterations with memory that does not grow with each step. With any other
    adjoint it is an ordinary (relaxed, two-sequence) fixed-point solver.

    Reference: McCallum, Arora, Foster, "Reversible Deep Equilibrium Models" (2025),
    arXiv 2509.12917; code `sammccallum/reversible-deq`.

    **Arguments:**

    - `beta`: the relaxation $\beta \in (0, 2)$, $\beta \neq 1$ (default 0.8, the
        paper's). The reversal divides by $1-\beta$: the closer $\beta$ is to 1 the
        more each reversed step amplifies rounding errors (about $1/|1-\beta|$ per step).
    - `rtol`, `atol`: stop when `norm(T(z) - z) <= atol + rtol * norm(z)`.
    - `norm`: the norm of the residual (default the 2-norm over all leaves).
    """

    beta: float = 0.8
    rtol: float = 1e-5
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.two_norm
    # Set by `ReversibleAdjoint` (not by users): report the partner sequence
    # (`anchor_slots` not None) and keep `(z_n, y_n)` every `anchor_every` steps.
    anchor_every: int | None = eqx.field(static=True, default=None)
    anchor_slots: int | None = eqx.field(static=True, default=None)
    # The partner sequence must stop with its sample: `step` freezes it itself once the
    # sample has met the tolerance (under vmap the driver steps on for the others), so
    # the driver need not copy the whole state (the anchors) at every step.
    stats_from_state: ClassVar[bool] = False

    def __check_init__(self):
        check_number("Reversible(beta=...)", self.beta, low=0.0, low_open=True, high=2.0)
        if isinstance(self.beta, (int, float)) and (self.beta == 1 or self.beta == 2):
            raise ValueError(
                "`Reversible(beta=...)` must be in (0, 2) and not 1 (the reversal divides "
                f"by 1 - beta), got {self.beta!r}."
            )

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        residual, scale = init_residual(y)
        anchors = ()
        if self.anchor_every is not None and self.anchor_slots:
            anchors = jtu.tree_map(
                lambda x: jnp.zeros((self.anchor_slots,) + x.shape, x.dtype), (y, y)
            )
        return _ReversibleState(residual, scale, y, jnp.array(0), anchors)

    def step(self, fn, y, args, options, state, tags):
        z, partner = y, state.partner
        anchors = state.anchors
        # (a sample that stopped is stepped on under vmap: its partner and count stay;
        # its anchor writes go to slots past its own steps, which are never read)
        stopped, _ = self.terminate(fn, y, args, options, state, tags)
        if self.anchor_every is not None and self.anchor_slots:
            every, n = self.anchor_every, state.step
            # (step 0's pair is `(y0, y0)`, which the adjoint has: slots hold the
            # pairs of steps every, 2 every, ...)
            slot = jnp.clip(n // every - 1, 0, self.anchor_slots - 1)
            keep = ((n % every) == 0) & (n > 0)
            anchors = jtu.tree_map(
                lambda buf, x: buf.at[slot].set(jnp.where(keep, x, buf[slot])),
                anchors, (z, partner),
            )
        fz, _ = fn(z, args)
        partner = _relax(self.beta, partner, fz)
        fy, aux = fn(partner, args)
        new_z = _relax(self.beta, z, fy)
        new_state = _ReversibleState(
            self.norm(tree_sub(fz, z)), self.norm(z), partner, state.step + 1, anchors
        )
        keep = _ReversibleState(state.residual, state.scale, state.partner, state.step,
                                anchors)
        return new_z, tree_where(stopped, keep, new_state), aux

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        """`(z, aux, stats)`; for `ReversibleAdjoint`, `stats["reversible"]` holds the
        partner sequence's last value and the anchors (it removes them)."""
        if self.anchor_slots is None:
            return y, aux, {}
        return y, aux, {"reversible": (state.partner, state.anchors)}
