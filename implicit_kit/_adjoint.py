r"""Backward modes: how gradients flow through the solution of an equilibrium problem.

Write the problem as a fixed point $y^* = T(y^*, \theta)$ (for a root problem
$G(y, \theta) = 0$, $T = y + G$). The exact gradient is
$\bar\theta = (\partial T/\partial\theta)^\top u$ with $u = \bar y + J_T(y^*)^\top u$
(the adjoint equation). The modes differ in how they get $u$.
"""

import abc
import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
import optimistix.internal as optxi
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from ._custom_vjp import implicit_vjp, stop_gradient
from ._iterate import check_max_steps, run
from ._misc import gmres, precision_floor, scalars_to_arrays, tree_add, tree_sub, tree_where
from ._solution import RESULTS
from .solvers import Anderson, Picard
from .solvers._base import (
    AbstractFixedPointSolver,
    AbstractSolverState,
    check_number,
    init_residual,
    native_fn,
)


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


class _PicardGMRESState(AbstractSolverState):
    residual: Float[Array, ""]
    scale: Float[Array, ""]
    last: Float[Array, ""]  # the previous Picard residual (`inf` before the first)
    k: Int[Array, ""]  # the steps taken
    gmres: Bool[Array, ""]  # past the switch
    j: Int[Array, ""]  # the next Arnoldi column (0: the next step starts a cycle)
    basis: Float[Array, "m+1 n"]
    hess: Float[Array, "m+1 m"]
    beta: Float[Array, ""]  # the norm of the cycle's first residual


_GMRES_STEPS = 110  # the default backward's GMRES budget: ten cycles of GMRES(10)


class _PicardGMRES(AbstractFixedPointSolver):
    r"""The default solve of the adjoint equation $u = b + M u$ ($M = J_T^\top$): Picard
    iteration while it contracts, then restarted GMRES on $(I - M) u = b$ from where it
    stopped, in one loop of the shared driver with one evaluation of the map per step
    (so the map's VJP is compiled once, not once per solver: in a DEQ train step a
    separate lineax GMRES fallback compiled three more copies of the cell's VJP).

    The map must be `fn(u, b) = b + M u` with `b = args` (the adjoint's, affine in `u`):
    a cycle's Arnoldi steps evaluate `fn(v, 0) = M v`. A step of Picard that reduces the
    residual by less than `1 - switch` (it diverges, stalls, or contracts too slowly for
    a backward pass), or the `picard_steps`-th, starts GMRES. GMRES(`restart`):
    classical Gram–Schmidt applied twice, the small least-squares problem by QR at every
    step; a cycle ends when its
    estimated residual meets the tolerance, on breakdown, or after `restart` steps, and
    the next step measures the true residual, on which alone the driver stops.
    (Saad & Schultz 1986; the fixed-point/Krylov pairing as in `ImplicitAdjoint`.)"""

    rtol: float
    atol: float
    picard_steps: int = eqx.field(static=True, default=256)
    restart: int = eqx.field(static=True, default=10)
    switch: float = 0.9
    norm: Callable[[PyTree], Scalar] = optx.two_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        flat, _ = ravel_pytree(y)
        m, real = self.restart, flat.dtype
        residual, scale = init_residual(y)
        return _PicardGMRESState(
            residual, scale, jnp.array(jnp.inf, real), jnp.array(0), jnp.array(False),
            jnp.array(0),
            jnp.zeros((m + 1, flat.size), real), jnp.zeros((m + 1, m), real),
            jnp.array(0.0, real))

    def step(self, fn, y, args, options, state, tags):
        m = self.restart
        flat_y, unravel = ravel_pytree(y)
        index = jnp.arange(m + 1)
        arnoldi = state.gmres & (state.j > 0)
        v = jnp.einsum("k,kn->n", (index == state.j - 1).astype(flat_y.dtype), state.basis,
                       precision=lax.Precision.HIGHEST)
        # One evaluation: T(y) = b + M y (Picard, or a cycle's first residual) or M v.
        b = tree_where(arnoldi, jtu.tree_map(jnp.zeros_like, args), args)
        fy, aux = fn(unravel(jnp.where(arnoldi, v, flat_y)), b)
        w, _ = ravel_pytree(fy)
        g = w - flat_y  # the residual at y (where not an Arnoldi step)
        res = self.norm(unravel(g))
        scale = self.norm(y)
        start = (state.gmres | (res > self.switch * state.last)  # a cycle starts here
                 | (state.k + 1 >= self.picard_steps))
        # -- a cycle's start: the basis begins at the residual
        safe = jnp.where(res > 0, res, 1.0)
        first = jnp.zeros_like(state.basis).at[0].set(g / safe)
        # -- an Arnoldi step: A v = v - M v, orthogonalised against the basis so far
        av = v - w
        used = (index < state.j).astype(av.dtype)
        h = used * (state.basis @ av)
        av = av - h @ state.basis
        h2 = used * (state.basis @ av)
        av, h = av - h2 @ state.basis, h + h2
        hn = jnp.linalg.norm(av)
        breakdown = hn <= jnp.finfo(av.dtype).eps * jnp.maximum(jnp.linalg.norm(h), 1.0)
        col = jnp.where(index == state.j, hn, h)
        basis = jnp.where((index == state.j)[:, None],
                          jnp.where(breakdown, 0.0, av / jnp.where(breakdown, 1.0, hn)),
                          state.basis)
        hess = jnp.where((jnp.arange(m) == state.j - 1)[None, :], col[:, None], state.hess)
        # the small least-squares problem min |beta e1 - H z| over the columns so far
        # (the columns not yet used are unit vectors below them: their z is zero)
        cols = jnp.arange(m)[None, :] < state.j
        filler = jnp.eye(m + 1, m, k=-1, dtype=hess.dtype)
        hm = jnp.where(cols, hess, filler)
        rhs = jnp.where(index == 0, state.beta, 0.0).astype(hess.dtype)
        q, r = jnp.linalg.qr(hm)
        z = jax.scipy.linalg.solve_triangular(r, q.T @ rhs, lower=False)
        z = jnp.where(cols[0], z, 0.0)
        estimate = jnp.linalg.norm(rhs - hm @ z)
        end = (state.j == m) | breakdown | (estimate <= self.atol + self.rtol * scale)
        moved = flat_y + jnp.einsum("k,kn->n", z, basis[:m], precision=lax.Precision.HIGHEST)
        # -- the three cases
        new_y = jnp.where(arnoldi, jnp.where(end, moved, flat_y),
                          jnp.where(start, flat_y, w))
        new_state = _PicardGMRESState(
            residual=jnp.where(arnoldi, state.residual, res),
            scale=jnp.where(arnoldi, state.scale, scale),
            last=jnp.where(state.gmres, state.last, res),
            k=state.k + 1,
            gmres=state.gmres | start,
            j=jnp.where(arnoldi, jnp.where(end, 0, state.j + 1), jnp.where(start, 1, 0)),
            basis=jnp.where(arnoldi, basis, first),
            hess=jnp.where(arnoldi, hess, 0.0),
            beta=jnp.where(arnoldi, state.beta, res),
        )
        return unravel(new_y), new_state, aux


class ImplicitAdjoint(AbstractVJPAdjoint):
    r"""Exact gradients by the implicit function theorem (the default).

    A `jax.custom_vjp`: the forward solve is not differentiated through (memory does not
    grow with the number of forward steps), and the backward pass solves the adjoint
    equation $u = \bar y + J_T(y^*)^\top u$ matrix-free, with VJPs only.

    **Arguments:**

    - `linear_solver`: how the adjoint equation is solved:
        - `None` (default): for fixed points, fixed-point iteration on the adjoint
          (Picard, as cheap as a backward pass can be on a contraction) while each step
          reduces the residual by at least 10 %, and from the first step that does not
          (it diverges, stalls or crawls when $J_T$ has eigenvalues near, on or outside
          the unit circle although $I - J_T$ is invertible) restarted GMRES(10) on
          $I - J_T^\top$ from where it stopped, so that the gradient is exact wherever
          the implicit function theorem holds. Both run in one loop with one VJP per
          step: the VJP is compiled once. For roots,
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
        an object: its own `max_steps`; of the default, the limit of its fixed-point
        iteration, after which GMRES has 110 steps of its own).

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
            return _ResolvedImplicitAdjoint(solver, self.max_steps)
        rtol, atol = backward_tolerance(tolerance, dtype)
        rtol = rtol if self.rtol is None else self.rtol
        atol = atol if self.atol is None else self.atol
        spd = {lx.symmetric_tag, lx.positive_semidefinite_tag} <= set(tags)
        if solver is not None:
            return _ResolvedImplicitAdjoint(
                _named_solver(solver, rtol, atol, self.max_steps), self.max_steps)
        if kind == "root":
            krylov = _named_solver("cg" if spd else "gmres", rtol, atol, None)
            return _ResolvedImplicitAdjoint(krylov, self.max_steps)
        # Picard for at most `max_steps`, then GMRES(10) in the same loop with a budget of
        # its own (ten restart cycles): 11 basis vectors per sample
        solver = _PicardGMRES(rtol=rtol, atol=atol, picard_steps=self.max_steps)
        return _ResolvedImplicitAdjoint(solver, self.max_steps + _GMRES_STEPS)

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
    the solver of the adjoint equation and the driver's step limit."""

    linear_solver: AbstractFixedPointSolver | lx.AbstractLinearSolver
    max_steps: int = eqx.field(static=True)

    def solve_adjoint(self, JT_T, A, ybar, tags):
        linear_solver = self.linear_solver
        if isinstance(linear_solver, lx.AbstractLinearSolver):
            return _krylov_adjoint(linear_solver, A, ybar, tags)
        # the adjoint map u -> b + J^T u with b = ybar passed as its argument (the form
        # `_PicardGMRES` needs: an evaluation at b = 0 is the product J^T v alone)
        u, _, stats, result = run(
            lambda u, b: (tree_add(b, JT_T(u)), None),
            "fixed_point",
            linear_solver,
            ybar,
            ybar,
            max_steps=self.max_steps,
        )
        return u, stats["num_steps"], stats["residual"], _backward_result(result)


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
        for _ in range(self.k):
            ty, _ = T(y, args)
            y = jtu.tree_map(
                lambda h, t: (1 - self.damping) * h + self.damping * t, y, ty
            )
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
