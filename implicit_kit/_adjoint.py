r"""Backward modes: how gradients flow through the solution of an equilibrium problem.

Write the problem as a fixed point $y^* = T(y^*, \theta)$ (for a root problem
$G(y, \theta) = 0$, $T = y + G$). The exact gradient is
$\bar\theta = (\partial T/\partial\theta)^\top u$ with $u = \bar y + J_T(y^*)^\top u$
(the adjoint equation). The modes differ in how they get $u$.
"""

import abc

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
import optimistix.internal as optxi

from ._ad import implicit_vjp, stop_gradient
from ._iterate import native_fn, run
from ._misc import tree_sub
from ._solution import RESULTS
from .solvers import Picard
from .solvers._base import AbstractFixedPointSolver


class AbstractAdjoint(eqx.Module):
    """How to differentiate through a solve. See the concrete classes."""

    @abc.abstractmethod
    def apply(self, forward, fn, kind, y0, args, *, probe, throw, tags):
        """Return `forward(fn, y0, args)` (`(y, aux, stats, result)`) with this mode's
        derivative attached."""


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


class ImplicitAdjoint(AbstractVJPAdjoint):
    r"""Exact gradients by the implicit function theorem (the default).

    A `jax.custom_vjp`: the forward solve is not differentiated through (memory does not
    grow with the number of forward steps), and the backward pass solves the adjoint
    equation $u = \bar y + J_T(y^*)^\top u$ matrix-free, with VJPs only.

    **Arguments:**

    - `linear_solver`: how the adjoint equation is solved:
        - an implicit_kit fixed-point solver (default `Picard(rtol=1e-6, atol=1e-8)`,
          i.e. fixed-point iteration on the adjoint; or `Anderson(...)`), run by the
          same driver as the forward solve, with its own `rtol`/`atol`;
        - or a lineax solver on the operator $I - J_T^\top$ (`lx.GMRES(...)`,
          `lx.BiCGStab(...)`; `lx.CG` for symmetric positive definite problems such
          as `ik.minimise`).
    - `max_steps`: the step limit of the backward solve (implicit_kit solvers; a lineax
        solver has its own `max_steps`).

    The backward solve is never silently wrong: if it does not converge, `throw=True`
    (the entry point's) raises with `RESULTS.backward_max_steps_reached` /
    `backward_nonfinite`, and `throw=False` returns NaN gradients. Its steps, residual
    and failure are observable through the entry point's `probe=` argument (see
    [`implicit_kit.backward_stats`][]).
    """

    linear_solver: AbstractFixedPointSolver | lx.AbstractLinearSolver = Picard(
        rtol=1e-6, atol=1e-8
    )
    max_steps: int = eqx.field(static=True, default=200)

    def __check_init__(self):
        if not isinstance(
            self.linear_solver, (AbstractFixedPointSolver, lx.AbstractLinearSolver)
        ):
            raise TypeError(
                "`ImplicitAdjoint(linear_solver=...)` must be an implicit_kit fixed-point "
                "solver (Picard, Anderson) or a lineax linear solver (lx.GMRES, "
                f"lx.BiCGStab, lx.CG); got {type(self.linear_solver).__name__}."
            )

    def solve_adjoint(self, JT_T, A, ybar, tags):
        if isinstance(self.linear_solver, lx.AbstractLinearSolver):
            struct = jax.eval_shape(lambda: ybar)
            operator = lx.FunctionLinearOperator(A, struct, tags)
            sol = lx.linear_solve(operator, ybar, self.linear_solver, throw=False)
            u = sol.value
            residual = optx.two_norm(tree_sub(A(u), ybar))
            steps = sol.stats.get("num_steps", jnp.array(0))
            result = RESULTS.promote(sol.result)
            finite = jnp.isfinite(residual)
            result = RESULTS.where(finite, result, RESULTS.nonfinite)
            return u, steps, residual, _backward_result(result)
        u, _, stats, result = run(
            lambda u, _: (jtu.tree_map(jnp.add, ybar, JT_T(u)), None),
            "fixed_point",
            self.linear_solver,
            ybar,
            None,
            max_steps=self.max_steps,
        )
        return u, stats["num_steps"], stats["residual"], _backward_result(result)


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
        return forward(fn, y0, args, while_kind="checkpointed",
                       checkpoints=self.checkpoints)


def _jvp_primal(inputs):
    forward, fn, y0, args = inputs
    y, aux, stats, result = forward(fn, y0, args)
    return y, (aux, stats, result)


def _jvp_rewrite(root, residual, inputs):
    forward, fn, y0, args = inputs
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

    - `linear_solver`: a lineax solver for the Jacobian of the residual; default
        `lx.GMRES(rtol=1e-8, atol=1e-10, restart=40)`.
    """

    linear_solver: lx.AbstractLinearSolver = lx.GMRES(rtol=1e-8, atol=1e-10, restart=40)

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


def default_adjoint(kind: str) -> AbstractAdjoint:
    """`ImplicitAdjoint()` for fixed points; GMRES on the adjoint for roots."""
    if kind == "fixed_point":
        return ImplicitAdjoint()
    return ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-8, atol=1e-10, restart=40))

