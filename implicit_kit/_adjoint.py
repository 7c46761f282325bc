r"""Backward modes: how gradients flow through the solution of an equilibrium problem.

Write the problem as a fixed point $y^* = T(y^*, \theta)$ (for a root problem
$G(y, \theta) = 0$, $T = y + G$). The exact gradient is
$\bar\theta = (\partial T/\partial\theta)^\top u$ with $u = \bar y + J_T(y^*)^\top u$
(the adjoint equation). The modes differ in how they get $u$.
"""

import abc
import dataclasses
import math
from typing import ClassVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
import optimistix.internal as optxi

from ._custom_vjp import implicit_vjp, stop_gradient
from ._iterate import check_max_steps, run
from ._misc import gmres, precision_floor, scalars_to_arrays, tree_sub, tree_where
from ._solution import RESULTS
from .solvers import Anderson, Picard, Reversible
from .solvers._base import AbstractFixedPointSolver, check_number, native_fn
from .solvers.reversible import _unrelax


def backward_tolerance(forward: tuple[float, float] | None, dtype) -> tuple[float, float]:
    """The default `(rtol, atol)` of a backward solve: the forward solve's, but never
    tighter than `dtype` can reach (10 machine epsilons, so that float32 training never
    asks for the impossible; one epsilon in float16/bfloat16). Without a forward
    tolerance (`custom_root`), 1e-10 / 1e-12, raised to 100 / 10 epsilons in lower
    precision."""
    if forward is None:
        return precision_floor(dtype)
    # In float16/bfloat16 the solve works in float32 (`working_precision`) while
    # each VJP still rounds in `dtype`: no tighter than one rounding of `dtype` (ten of
    # its epsilons stopped bfloat16 at a 3% error), nor than float32 can reach.
    work = float(jnp.finfo(jnp.promote_types(dtype, jnp.float32)).eps)
    eps = max(float(jnp.finfo(dtype).eps) / 10, work)
    rtol, atol = forward
    # A forward solve told to accept any iterate (`rtol=inf`, e.g. a homotopy end point
    # taken as it is) says nothing about the backward solve: that one still solves to
    # the precision floor, never "accept anything" (which would be a wrong gradient).
    floor_rtol, floor_atol = precision_floor(dtype)
    if all(isinstance(t, (int, float)) for t in (rtol, atol)):
        rtol = float(rtol) if math.isfinite(rtol) else floor_rtol
        atol = float(atol) if math.isfinite(atol) else floor_atol
        return max(rtol, 10 * eps), max(atol, eps)
    # Tolerances given as (possibly traced) arrays, e.g. vmapped over as hyperparameters.
    rtol = jnp.where(jnp.isfinite(rtol), rtol, floor_rtol)
    atol = jnp.where(jnp.isfinite(atol), atol, floor_atol)
    return jnp.maximum(rtol, 10 * eps), jnp.maximum(atol, eps)


class AbstractForward(eqx.Module):
    """The forward solve of a problem as handed to an adjoint (the seam between them).

    - `kind`: `"fixed_point"` or `"root"`, the form of `fn`.
    - `max_steps`: the step cap of the solve, `None` for none (or unknown).
    - `not_unrollable` (class variable): `None` if `UnrolledAdjoint` can differentiate
      through the loop, else what this forward is, for its error message.
    - `tolerance()`: `(rtol, atol)` of the forward solver, or `None` where it has none
      (the backward tolerances follow it).
    - `__call__(fn, y0, args, *, while_kind="lax", checkpoints=None)`: run the solve,
      returning `(y, aux, stats, result)`; the adjoint chooses the loop (`while_kind`:
      `"lax"`, or `"checkpointed"` with `checkpoints` for `UnrolledAdjoint`), as in
      optimistix.
    """

    kind: eqx.AbstractVar[str]
    max_steps: eqx.AbstractVar[int | None]
    not_unrollable: ClassVar[str | None] = None

    @abc.abstractmethod
    def tolerance(self) -> tuple[float, float] | None:
        """`(rtol, atol)` of the forward solver, or `None`."""

    @abc.abstractmethod
    def __call__(self, fn, y0, args, *, while_kind: str = "lax", checkpoints=None):
        """`(y, aux, stats, result)` of the solve."""


class AbstractAdjoint(eqx.Module):
    """How to differentiate through a solve. See the concrete classes."""

    @abc.abstractmethod
    def apply(self, forward, fn, kind, y0, args, *, probe, throw, tags):
        """Return `forward(fn, y0, args)` (`(y, aux, stats, result)`) with this mode's
        derivative attached."""

    def with_defaults(self, tolerance, dtype, kind, tags) -> "AbstractAdjoint":
        """This adjoint with its unset settings filled in from the forward solve's
        `tolerance` (`(rtol, atol)` or `None`), the `dtype`, the problem's `kind` and the
        operator's `tags`. Modes without settings to derive return themselves."""
        del tolerance, dtype, kind, tags
        return self


class AbstractVJPAdjoint(AbstractAdjoint):
    """A backward mode by custom VJP: reverse mode only (`jax.grad`, `jax.vjp`,
    `jax.jacrev`). Under forward mode (`jax.jvp`, `jax.jacfwd`, Hessian-vector products)
    JAX raises "can't apply forward-mode autodiff (jvp) to a custom_vjp function": use
    [`implicit_kit.ImplicitJVPAdjoint`][] there."""

    def apply(self, forward, fn, kind, y0, args, *, probe, throw, tags):
        return implicit_vjp(forward, fn, kind, y0, args, probe, self, throw, tags)

    @abc.abstractmethod
    def solve_adjoint(self, JT_T, A, ybar, tags):
        """Return `(u, num_steps, residual, result)` for the adjoint equation."""


def _backward_result(result):
    result = RESULTS.where(
        result == RESULTS.nonfinite, RESULTS.backward_nonfinite, result
    )
    return RESULTS.where(
        (result == RESULTS.successful) | (result == RESULTS.backward_nonfinite),
        result,
        RESULTS.backward_max_steps_reached,
    )


_BACKWARD_SOLVERS = ("picard", "anderson", "gmres", "bicgstab", "cg")


class ImplicitAdjoint(AbstractVJPAdjoint):
    r"""Exact gradients by the implicit function theorem (the default).

    A `jax.custom_vjp`: the forward solve is not differentiated through (memory does not
    grow with the number of forward steps), and the backward pass solves the adjoint
    equation $u = \bar y + J_T(y^*)^\top u$ matrix-free, with VJPs only.

    **Arguments:**

    - `linear_solver`: how the adjoint equation is solved:
        - `None` (default): for fixed points, fixed-point iteration on the adjoint
          (`Picard`, as cheap as a backward pass can be on a contraction), and, where it
          fails (it diverges or stalls when $J_T$ has eigenvalues on or outside the unit
          circle although $I - J_T$ is invertible), GMRES(10) on $I - J_T^\top$ (a
          small Krylov basis), so that the gradient is exact wherever the implicit
          function theorem holds (it runs only when some sample needs it). For roots,
          GMRES (CG where the operator is tagged symmetric positive definite, as in
          `ik.minimise`).
        - a name, `"picard"`, `"anderson"` (fixed-point iteration on the adjoint, by the
          same driver as the forward solve), `"gmres"`, `"bicgstab"` or `"cg"` (lineax, on
          the operator $I - J_T^\top$): that solver alone, at the tolerances below;
        - or a solver object, which brings its own tolerances: an implicit_kit
          fixed-point solver (`Picard(rtol=...)`, `Anderson(...)`) or a lineax solver
          (`lx.GMRES(rtol=..., atol=...)`, `lx.BiCGStab(...)`, `lx.CG(...)`, `lx.LU()`).
    - `rtol`, `atol`: the tolerances of the backward solve, for `None` or a named
        `linear_solver`; unset, they follow the forward solver's and the dtype
        (the forward solve's, no tighter than 10 machine epsilons; with no forward
        tolerance, as in `custom_root`, 1e-10 / 1e-12). Giving them with a solver object
        is an error (the object has its own).
    - `max_steps`: the step limit of the backward solve (of a lineax solver given as
        an object: its own `max_steps`).

    The backward solve is never silently wrong: if it does not converge, `throw=True`
    (the entry point's) raises with `RESULTS.backward_max_steps_reached` /
    `backward_nonfinite`, and `throw=False` returns NaN gradients. Its steps, residual
    and failure are observable through the entry point's `probe=` argument (see
    [`implicit_kit.backward_stats`][]).
    """

    linear_solver: str | AbstractFixedPointSolver | lx.AbstractLinearSolver | None = None
    rtol: float | None = None
    atol: float | None = None
    max_steps: int = eqx.field(static=True, default=256)

    def __check_init__(self):
        for field in ("rtol", "atol"):
            check_number(f"ImplicitAdjoint({field}=...)", getattr(self, field), low=0.0)
        check_max_steps(self.max_steps, "ImplicitAdjoint(max_steps=...)")
        solver = self.linear_solver
        if isinstance(solver, str):
            if solver not in _BACKWARD_SOLVERS:
                raise ValueError(
                    "`ImplicitAdjoint(linear_solver=...)` as a name must be one of "
                    f"{', '.join(map(repr, _BACKWARD_SOLVERS))}; got {solver!r}."
                )
        elif solver is not None:
            if not isinstance(solver, (AbstractFixedPointSolver, lx.AbstractLinearSolver)):
                raise TypeError(
                    "`ImplicitAdjoint(linear_solver=...)` must be None, a name "
                    f"({', '.join(map(repr, _BACKWARD_SOLVERS))}), an implicit_kit "
                    "fixed-point solver (Picard, Anderson) or a lineax linear solver "
                    f"(lx.GMRES, lx.BiCGStab, lx.CG); got {type(solver).__name__}."
                )
            if self.rtol is not None or self.atol is not None:
                raise ValueError(
                    "`ImplicitAdjoint(rtol=..., atol=...)` are the tolerances of a default "
                    "or named `linear_solver`; a solver object brings its own (set them on "
                    f"the {type(solver).__name__}, or name the solver, e.g. "
                    "`linear_solver=\"gmres\"`)."
                )

    def with_defaults(self, tolerance, dtype, kind, tags):
        solver = self.linear_solver
        if solver is not None and not isinstance(solver, str):
            return _ResolvedImplicitAdjoint(solver, None, self.max_steps)
        rtol, atol = backward_tolerance(tolerance, dtype)
        rtol = rtol if self.rtol is None else self.rtol
        atol = atol if self.atol is None else self.atol
        spd = {lx.symmetric_tag, lx.positive_semidefinite_tag} <= set(tags)
        if solver is not None:
            return _ResolvedImplicitAdjoint(
                _named_solver(solver, rtol, atol, self.max_steps), None, self.max_steps)
        if kind == "root":
            krylov = _named_solver("cg" if spd else "gmres", rtol, atol, None)
            return _ResolvedImplicitAdjoint(krylov, None, self.max_steps)
        # The fallback's buffers are allocated in every compiled backward pass, used or
        # not: GMRES restarted every 10 steps keeps 11 vectors per sample, not 41.
        # (lineax's BiCGStab, with fewer, returns NaN when it converges in one step.)
        krylov = lx.CG(rtol=rtol, atol=atol) if spd else gmres(rtol=rtol, atol=atol,
                                                                restart=10)
        return _ResolvedImplicitAdjoint(Picard(rtol=rtol, atol=atol), krylov,
                                        self.max_steps)

    def solve_adjoint(self, JT_T, A, ybar, tags):
        raise AssertionError("an `ImplicitAdjoint` is resolved (`with_defaults`) before "
                             "it solves")


def _named_solver(name, rtol, atol, max_steps):
    """The backward solver called `name` (`ImplicitAdjoint(linear_solver=name)`)."""
    if name == "picard":
        return Picard(rtol=rtol, atol=atol)
    if name == "anderson":
        return Anderson(rtol=rtol, atol=atol)
    if name == "gmres":
        return gmres(rtol=rtol, atol=atol, max_steps=max_steps)
    if name == "bicgstab":
        return lx.BiCGStab(rtol=rtol, atol=atol, max_steps=max_steps)
    return lx.CG(rtol=rtol, atol=atol, max_steps=max_steps)


class _ResolvedImplicitAdjoint(AbstractVJPAdjoint):
    """An `ImplicitAdjoint` with its settings filled in for one solve (`with_defaults`):
    the solver of the adjoint equation, the Krylov solve tried where a fixed-point
    `linear_solver` fails (`fallback`, or `None`), and the driver's step limit."""

    linear_solver: AbstractFixedPointSolver | lx.AbstractLinearSolver
    fallback: lx.AbstractLinearSolver | None
    max_steps: int = eqx.field(static=True)

    def solve_adjoint(self, JT_T, A, ybar, tags):
        linear_solver = self.linear_solver
        if isinstance(linear_solver, lx.AbstractLinearSolver):
            return _krylov_adjoint(linear_solver, A, ybar, tags)
        out = run(
            lambda u, _: (jtu.tree_map(jnp.add, ybar, JT_T(u)), None),
            "fixed_point",
            linear_solver,
            ybar,
            None,
            max_steps=self.max_steps,
        )
        u, _, stats, result = out
        out = (u, stats["num_steps"], stats["residual"], _backward_result(result))
        if self.fallback is None:
            return out
        # Where fixed-point iteration on the adjoint failed, a Krylov solve on I - J^T
        # (run only if some sample needs it: the predicate is unbatched under vmap).
        failed = out[3] != RESULTS.successful

        def krylov(out):
            u2, steps2, residual2, result2 = _krylov_adjoint(self.fallback, A, ybar, tags)
            return (
                tree_where(failed, u2, out[0]),
                jnp.where(failed, out[1] + steps2, out[1]),
                jnp.where(failed, residual2.astype(out[2].dtype), out[2]),
                RESULTS.where(failed, result2, out[3]),
            )

        return lax.cond(eqxi.unvmap_any(failed), krylov, lambda o: o, out)


def _krylov_adjoint(linear_solver, A, ybar, tags):
    struct = jax.eval_shape(lambda: ybar)
    operator = lx.FunctionLinearOperator(A, struct, tags)
    sol = lx.linear_solve(operator, ybar, linear_solver, throw=False)
    u = sol.value
    residual = optx.two_norm(tree_sub(A(u), ybar))
    steps = jnp.asarray(sol.stats.get("num_steps", 0))
    # (only success matters to `_backward_result`: no promotion of lineax's code, which
    # compiles eagerly at trace time)
    result = RESULTS.where(sol.result == lx.RESULTS.successful, RESULTS.successful,
                           RESULTS.backward_max_steps_reached)
    result = RESULTS.where(jnp.isfinite(residual), result, RESULTS.nonfinite)
    return u, steps, residual, _backward_result(result)


class NeumannAdjoint(AbstractVJPAdjoint):
    r"""The truncated Neumann series $u \approx \sum_{i=0}^{k} (J_T^\top)^i \bar y$.

    Equals `k` steps of fixed-point iteration on the adjoint equation from $u_0 = \bar y$;
    exact as $k \to \infty$ when $\rho(J_T) < 1$. `k = 0` is the Jacobian-free gradient
    (see [`implicit_kit.JFBAdjoint`][]). `stats`: `num_steps = k`, `residual` = the norm
    of the last term of the series.

    Reference: Geng et al., "On Training Implicit Models" (NeurIPS 2021) (NPG);
    Lorraine et al. (AISTATS 2020).

    **Arguments:**

    - `k`: the number of terms after the first.
    """

    k: int = eqx.field(static=True, default=5)

    def __check_init__(self):
        if not (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 0):
            raise ValueError(f"`{type(self).__name__}(k=...)` must be an integer >= 0, got "
                             f"{self.k!r}.")

    def solve_adjoint(self, JT_T, A, ybar, tags):
        del A, tags

        def body(_, carry):
            u, last = carry
            term = JT_T(last)
            return jtu.tree_map(jnp.add, u, term), term

        u, last = lax.fori_loop(0, self.k, body, (ybar, ybar))
        return u, jnp.array(self.k), optx.two_norm(last), RESULTS.successful


class JFBAdjoint(NeumannAdjoint):
    r"""Jacobian-free backpropagation: $u = \bar y$, i.e. the gradient of one application
    of the map at the (constant) solution, $\bar\theta = (\partial T/\partial\theta)^\top
    \bar y$.

    A descent direction for contractive maps (Fung et al., "JFB: Jacobian-Free
    Backpropagation for Implicit Networks", AAAI 2022); the cheapest backward mode.
    """

    k: int = eqx.field(static=True, default=0, init=False)


class PhantomAdjoint(AbstractAdjoint):
    r"""Unrolling-based phantom gradient: `k` damped steps
    $h_{t+1} = (1-\lambda) h_t + \lambda T(h_t)$ from $h_0 = $ `stop_gradient`$(y^*)$,
    differentiated by ordinary autodiff. The returned value is $h_k$.

    At an exact fixed point this equals the damped Neumann series
    $\lambda\sum_{t<k} (\lambda J + (1-\lambda)I)^t$; its error falls like
    $\rho(\lambda J + (1-\lambda) I)^k$. The paper's defaults for MDEQ are k=5, λ=0.5.

    Reference: Geng, Zhang, Bai, Wang & Lin, "On Training Implicit Models" (NeurIPS 2021).

    **Arguments:**

    - `k`: the number of unrolled steps.
    - `damping`: $\lambda$.
    """

    k: int = eqx.field(static=True, default=5)
    damping: float = 0.5

    def __check_init__(self):
        check_number("PhantomAdjoint(damping=...)", self.damping, low=0.0, low_open=True,
                     high=1.0)
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"`PhantomAdjoint(k=...)` must be a positive integer, got "
                             f"{self.k!r}.")

    def apply(self, forward, fn, kind, y0, args, *, probe, throw, tags):
        del probe, throw, tags
        y, aux, stats, result = forward(*stop_gradient((fn, y0, args)))
        T = native_fn(fn, kind, "fixed_point")

        # A scan, not a Python loop: the map is compiled once (and its transpose once)
        # instead of `k` times. On the digits DEQ's train step (k = 5) this halved the
        # optimised HLO and cut XLA's compile from 4.9 s to about 4 s, at the same
        # run time per step.
        def step(h, _):
            th, _ = T(h, args)
            return jtu.tree_map(
                lambda a, t: ((1 - self.damping) * a + self.damping * t).astype(a.dtype),
                h, th), None

        y, _ = lax.scan(step, y, None, length=self.k)
        return y, aux, stats, result


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagation through every step of the solver loop (the baseline).

    Exact for the iterate the loop returns, but memory grows with the number of steps
    (bounded by `checkpoints` through online binomial checkpointing) and the gradient can
    explode for maps that are not contractive. Needs an integer `max_steps`.

    **Arguments:**

    - `checkpoints`: the number of checkpoints of the loop; `None` picks `log(max_steps)`.
    """

    checkpoints: int | None = eqx.field(static=True, default=None)

    def apply(self, forward, fn, kind, y0, args, *, probe, throw, tags):
        del kind, probe, throw, tags
        if forward.not_unrollable is not None:
            raise ValueError(f"`UnrolledAdjoint` cannot unroll {forward.not_unrollable}.")
        if forward.max_steps is None:
            raise ValueError("`UnrolledAdjoint` needs an integer `max_steps`.")
        return forward(fn, y0, args, while_kind="checkpointed",
                       checkpoints=self.checkpoints)


def _jvp_primal(inputs):
    # JAX may hand a custom-JVP rule a traced Python scalar back as a float literal: the
    # closure-converted `fn` needs arrays where it was converted with arrays.
    forward, fn, y0, args = scalars_to_arrays(inputs)
    y, aux, stats, result = forward(fn, y0, args)
    return y, (aux, stats, result)


def _jvp_rewrite(root, residual, inputs):
    forward, fn, y0, args = scalars_to_arrays(inputs)
    del residual, y0
    g = native_fn(fn, forward.kind, "root")
    return g(root, args)[0]


class ImplicitJVPAdjoint(AbstractAdjoint):
    """Exact implicit gradients in forward mode (and reverse mode by transposition).

    Built on `optimistix.implicit_jvp`: a custom JVP solving `J_G δ = -∂G/∂θ · θ̇` with a
    matrix-free lineax solver; reverse mode transposes that solve. Use it for `jax.jvp`,
    `jax.jacfwd` and Hessian-vector products (forward-over-reverse), which the custom-VJP
    adjoints cannot do. A failed linear solve raises (lineax's `throw`).

    **Arguments:**

    - `linear_solver`: a lineax solver for the Jacobian of the residual; default GMRES
        at the forward solve's tolerances (`backward_tolerance`).
    """

    linear_solver: lx.AbstractLinearSolver | None = None

    def with_defaults(self, tolerance, dtype, kind, tags):
        if self.linear_solver is not None:
            return self
        rtol, atol = backward_tolerance(tolerance, dtype)
        return ImplicitJVPAdjoint(gmres(rtol=rtol, atol=atol))

    def apply(self, forward, fn, kind, y0, args, *, probe, throw, tags):
        del probe, throw, kind
        # `tags` describe the adjoint operator A = -J_G^T; implicit_jvp wants J_G's.
        if lx.positive_semidefinite_tag in tags:
            tags = (tags - {lx.positive_semidefinite_tag}) | {
                lx.negative_semidefinite_tag
            }
        inputs = (forward, fn, y0, args)
        y, (aux, stats, result) = optxi.implicit_jvp(
            _jvp_primal, _jvp_rewrite, inputs, tags, self.linear_solver
        )
        return y, aux, stats, result


def _relative_gap(a, b, size):
    """`norm(a - b) / max(norm(b), size)` over a pytree (0 where `a == b`): the gap
    relative to the iterate, or to `size` (the last iterate's norm) where the iterate is
    smaller (a zero initial guess)."""
    gap = optx.two_norm(tree_sub(a, b))
    size = jnp.maximum(jnp.maximum(optx.two_norm(b), size), jnp.finfo(gap.dtype).tiny)
    return jnp.where(gap == 0, 0.0, gap / size)


def auto_anchor_every(beta, dtype) -> int:
    """The default `ReversibleAdjoint(anchor_every=...)` for `Reversible(beta)` in `dtype`.

    A reversed step amplifies the rounding errors of the forward pass by the inverse of
    the forward step's smallest eigenvalue. Linearised on an eigenvector of `T`'s
    Jacobian with eigenvalue `lam`, one step is `[[1-b, b lam], [b lam (1-b),
    1-b+b**2 lam**2]]` (determinant `(1-b)**2`): for `|lam| -> 0` both eigenvalues are
    `1 - b`, for `|lam| = 1` they are 1 and `(1-b)**2`. So for a nonexpansive `T` a
    reversed step amplifies errors by at most about `a = 1 / (1 - beta)**2`, and
    re-anchoring every `k` steps bounds the reconstruction error by about `eps * a**k`:
    `k` is the largest with `eps * a**k <= sqrt(eps)` (at least 1): 5 steps in float64
    and 2 in float32 at `beta = 0.8`. Measured (`benchmarks/reversible.py`): the
    rate is about 6 per step on a random non-symmetric contraction at `beta = 0.8`.
    """
    eps = float(jnp.finfo(dtype).eps)
    a = 1.0 / (1.0 - float(beta)) ** 2
    return max(1, int(math.floor(math.log(eps ** -0.5) / math.log(a))))


class ReversibleAdjoint(AbstractAdjoint):
    r"""The exact gradient of the computed iterations of a `Reversible` solve, by running
    them backwards (Reversible DEQs), at a memory that does not grow with each step.

    The backward pass starts from the final pair $(z_N, y_N)$ and reconstructs every
    earlier pair with the inverse update
    $z_n = (z_{n+1} - \beta T(y_{n+1}))/(1-\beta)$,
    $y_n = (y_{n+1} - \beta T(z_n))/(1-\beta)$, accumulating the cotangents of both
    sequences and of the parameters with one VJP of `T` per evaluation of the forward pass
    (ported from `sammccallum/reversible-deq`, `reversible_deq/_adjoint.py`; unlike it, the
    initial guess `y0` gets its gradient too).

    **Drift control.** The inverse update divides by $1-\beta$: in floating point it
    amplifies the forward pass's rounding errors by up to $1/(1-\beta)^2$ per step, so a
    naive reversal of many steps reconstructs iterates (and a gradient) that are far from
    the computed ones (measured on `tanh(Wz + x)` at the paper's $\beta = 0.8$: NaN from
    40 steps in float32, reconstructed iterates off by 1e127 after 200 steps in float64;
    `benchmarks/reversible.py`). This adjoint
    re-anchors the reversal every `anchor_every` steps on an exact copy of $(z_n, y_n)$
    kept by the forward pass, which bounds the error to that of `anchor_every` reversed
    steps: memory $2\lceil M/k \rceil$ iterates, $M$ the solve's `max_steps` (the buffer
    is allocated for the step cap, not for the steps a solve takes), instead of the
    unrolled loop's activations at every step.

    **Arguments:**

    - `anchor_every`: `k`, the steps between exact anchors; `"auto"` (default) picks the
        largest `k` whose reversal error stays below about `sqrt(eps)` of the dtype
        (`auto_anchor_every`: 5 in float64 and 2 in float32 at $\beta = 0.8$; 13 and 5
        at $\beta = 0.5$); `None` reverses without anchors (the published scheme: exact only
        for a few steps; for measuring the drift).

    Needs `solver=ik.solvers.Reversible(...)` and an integer `max_steps`. The backward
    statistics (`ik.backward_stats`, through the entry point's `probe=`): `num_steps` is
    the number of reversed steps, `residual` the largest relative gap found between a
    reconstructed iterate and its anchor (the drift the anchors removed; with
    `anchor_every=None`, the gap at $z_0 = $ `y0`), `failed` a non-finite reconstruction
    (its gradient is NaN, or raises under `throw=True`).
    """

    anchor_every: int | str | None = eqx.field(static=True, default="auto")

    def __check_init__(self):
        k = self.anchor_every
        if k is None or k == "auto":
            return
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ValueError(
                '`ReversibleAdjoint(anchor_every=...)` must be "auto", None or a positive '
                f"integer, got {k!r}."
            )

    def apply(self, forward, fn, kind, y0, args, *, probe, throw, tags):
        del tags
        solver = getattr(forward, "solver", None)
        if not isinstance(solver, Reversible):
            raise ValueError(
                "`ReversibleAdjoint` runs the iterations of `ik.solvers.Reversible` "
                "backwards: pass `solver=ik.solvers.Reversible(...)`; got "
                f"{type(solver).__name__}."
            )
        if forward.max_steps is None:
            raise ValueError("`ReversibleAdjoint` needs an integer `max_steps`.")
        every = self.anchor_every
        if every == "auto":
            dtype = jnp.result_type(*jtu.tree_leaves(y0))
            every = auto_anchor_every(solver.beta, dtype)
        slots = 0 if every is None else (forward.max_steps - 1) // every
        solver = dataclasses.replace(solver, anchor_every=every, anchor_slots=slots)
        forward = eqx.tree_at(lambda f: f.solver, forward, solver)
        out = _reversible_solve((fn, y0, args, probe), forward, kind, throw)
        return out


@eqx.filter_custom_vjp
def _reversible_solve(inputs, forward, kind, throw):
    fn, y0, args, _ = inputs
    y, aux, stats, result = forward(fn, y0, args)
    stats = {k: v for k, v in stats.items() if k != "reversible"}
    return y, aux, stats, result


@_reversible_solve.def_fwd
def _reversible_solve_fwd(perturbed, inputs, forward, kind, throw):
    del perturbed
    fn, y0, args, _ = inputs
    y, aux, stats, result = forward(fn, y0, args)
    stats = dict(stats)
    partner, anchors = stats.pop("reversible")
    return (y, aux, stats, result), (y, partner, anchors, stats["num_steps"])


@_reversible_solve.def_bwd
def _reversible_solve_bwd(residuals, grad_obj, perturbed, inputs, forward, kind, throw):
    fn, y0, args, probe = scalars_to_arrays(inputs)
    z_end, y_end, anchors, num_steps = residuals
    zbar = jtu.tree_map(lambda g, x: jnp.zeros_like(x) if g is None else g, grad_obj[0],
                        z_end, is_leaf=lambda v: v is None)
    dynamic, static = eqx.partition((fn, args), eqx.is_array)
    reverse = _reverse_fn(static, kind, forward.solver)
    gtheta, y0_bar, num_steps, drift = reverse(dynamic, z_end, y_end, anchors, num_steps,
                                               zbar, y0)
    fn_bar, args_bar = gtheta
    failed = jnp.invert(jnp.isfinite(drift))
    if throw:  # (the cotangents are NaN already where it failed)
        result = RESULTS.where(failed, RESULTS.backward_nonfinite, RESULTS.successful)
        y0_bar = result.error_if(y0_bar, failed)
    grads = (fn_bar, y0_bar, args_bar)
    probe_bar = None
    if probe is not None:
        probe_bar = jnp.stack([jnp.asarray(num_steps, probe.dtype),
                               jnp.asarray(drift, probe.dtype),
                               failed.astype(probe.dtype)])
    return jtu.tree_map(
        lambda c, p: c if p else None, (*grads, probe_bar), perturbed,
        is_leaf=lambda v: v is None,
    )


def _reverse_fn(static, kind, solver):
    """The reversal of one fixed-point solve (see `batch_reversal`)."""
    return batch_reversal(
        lambda axes, dynamic, *state: _reverse_batch(static, kind, solver, axes, dynamic,
                                                     *state))


def batch_reversal(run):
    """A reversal `(dynamic, *state) -> (parameter cotangents, y0 cotangent, num_steps,
    drift)` of one solve, from `run(params_axes, dynamic, *state)`, which reverses a
    batch of solves (every `state` leaf with a leading batch axis; `params_axes` the
    `jax.vmap` axes of `dynamic`'s leaves: 0 per sample, None shared). Under `jax.vmap`
    it runs one loop over the batch, so the shared parameters' cotangents are summed
    over the samples at every step (one batched VJP) and never kept per sample (batch x
    parameters of memory)."""

    @jax.custom_batching.custom_vmap
    def reverse(dynamic, *state):
        one = jtu.tree_map(lambda x: x[None], state)
        out = run(jtu.tree_map(lambda _: None, dynamic), dynamic, *one)
        return (out[0], *jtu.tree_map(lambda x: x[0], out[1:]))

    @reverse.def_vmap
    def rule(axis_size, in_batched, dynamic, *state):
        def to_batch(x, b):
            return x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)

        # Per-sample parameters (an input injection, a vmapped hyperparameter) keep their
        # axis and get per-sample cotangents; shared ones get the batch's sum.
        params_axes = jtu.tree_map(lambda b: 0 if b else None, in_batched[0])
        state = jtu.tree_map(to_batch, state, tuple(in_batched[1:]))
        out = run(params_axes, dynamic, *state)
        inexact = jtu.tree_map(eqx.is_inexact_array, dynamic)
        gtheta_batched = eqx.filter(in_batched[0], inexact)
        return out, (gtheta_batched, jtu.tree_map(lambda _: True, out[1]), True, True)

    return reverse


def _reverse_batch(static, kind, solver, params_axes, dynamic, z_end, y_end, anchors,
                   num_steps, zbar, y0):
    """The backward loop on a batch (leading axis) of solves, each reversed over its own
    `num_steps` (a finished sample is frozen and contributes nothing)."""
    beta, every, slots = solver.beta, solver.anchor_every, solver.anchor_slots
    real = jnp.finfo(jnp.result_type(*jtu.tree_leaves(y0))).dtype
    size = jax.vmap(optx.two_norm)(z_end)

    def T(dynamic, state):
        f, a = eqx.combine(dynamic, static)
        return native_fn(f, kind, "fixed_point")(state, a)[0]

    TB = jax.vmap(T, in_axes=(params_axes, 0))

    def vjp_at(state, cot):
        out, vjp = eqx.filter_vjp(TB, dynamic, state)
        ptheta, pstate = vjp(cot)
        return out, ptheta, pstate

    def where(mask, a, b):
        return jtu.tree_map(
            lambda u, v: jnp.where(mask.reshape(mask.shape + (1,) * (u.ndim - 1)), u, v),
            a, b)

    def scale(c, tree):
        return jtu.tree_map(lambda t: (c * t).astype(t.dtype), tree)

    def add(a, b):
        return jtu.tree_map(jnp.add, a, b)

    def gap(a, b):
        return jax.vmap(_relative_gap)(a, b, size).astype(real)

    def anchor(n, reconstructed, which):
        """The exact iterate `which` (0: z, 1: y) of step `n` where one is kept."""
        if every is None:
            return reconstructed, jnp.zeros(n.shape, bool)
        is_anchor = n % every == 0
        exact = y0
        if slots:
            slot = jnp.clip(n // every - 1, 0, slots - 1)
            stored = jtu.tree_map(lambda buf: jax.vmap(lambda b, i: b[i])(buf, slot),
                                  anchors[which])
            exact = where(n == 0, y0, stored)
        return where(is_anchor, exact, reconstructed), is_anchor

    def body(carry):
        i, z, y, gz, gy, gtheta, drift = carry
        active = i > 0
        n = i - 1
        zero = jnp.zeros((), real)
        # Reverse z_{n+1} = (1 - beta) z_n + beta T(y_{n+1}) ... (a finished sample's
        # cotangent is 0: it adds nothing to the parameters')
        fy, ptheta, py = vjp_at(y, where(active, gz, scale(zero, gz)))
        z_prev = _unrelax(beta, z, fy)
        z_exact, hit = anchor(n, z_prev, 0)
        g = jnp.where(hit & active, gap(z_prev, z_exact), 0.0).astype(real)
        if every is None:  # naive: the gap at z_0 = y0, never corrected
            g = jnp.where((n == 0) & active, gap(z_prev, y0), 0.0).astype(real)
        z_prev = where(active, z_exact, z)
        gy_new = where(active, add(gy, scale(beta, py)), gy)
        gtheta = add(gtheta, scale(beta, ptheta))
        # ... then y_{n+1} = (1 - beta) y_n + beta T(z_n).
        fz, ptheta, pz = vjp_at(z_prev, where(active, gy_new, scale(zero, gy_new)))
        y_prev, _ = anchor(n, _unrelax(beta, y, fz), 1)
        y_prev = where(active, y_prev, y)
        gz = where(active, add(scale(1 - beta, gz), scale(beta, pz)), gz)
        gtheta = add(gtheta, scale(beta, ptheta))
        gy = where(active, scale(1 - beta, gy_new), gy)
        return (jnp.where(active, i - 1, i), z_prev, y_prev, gz, gy, gtheta,
                jnp.maximum(drift, g))

    gtheta0 = jtu.tree_map(jnp.zeros_like, eqx.filter(dynamic, eqx.is_inexact_array))
    init = (num_steps, z_end, y_end, zbar, jtu.tree_map(jnp.zeros_like, zbar), gtheta0,
            jnp.zeros(num_steps.shape, real))
    _, _, _, gz, gy, gtheta, drift = lax.while_loop(lambda c: jnp.any(c[0] > 0), body, init)
    # A non-finite reconstruction gives NaN cotangents: its sample's own, and the shared
    # parameters' (a sum over the samples), never a silently wrong number.
    failed = jnp.invert(jnp.isfinite(drift))
    axes = eqx.filter(params_axes, jtu.tree_map(eqx.is_inexact_array, dynamic),
                      is_leaf=lambda a: a is None)
    gtheta = jtu.tree_map(
        lambda g, ax: None if g is None else (
            where(failed, jnp.full_like(g, jnp.nan), g) if ax == 0
            else jnp.where(jnp.any(failed), jnp.nan, g)), gtheta, axes,
        is_leaf=lambda a: a is None)
    y0_bar = where(failed, jtu.tree_map(lambda g: jnp.full_like(g, jnp.nan), y0), add(gz, gy))
    return gtheta, y0_bar, num_steps, drift
