r"""Hypergradients of bilevel problems by implicit differentiation.

For $w^*(\lambda) = \arg\min_w L_T(w, \lambda)$ and $F(\lambda) = L_V(w^*(\lambda),
\lambda)$, the implicit function theorem at $\nabla_w L_T = 0$ gives

$$\nabla F = \partial_\lambda L_V - \partial_\lambda\big(\nabla_w L_T(w^*, \lambda)^\top
u\big), \qquad H u = \nabla_w L_V,\quad H = \nabla^2_{ww} L_T(w^*, \lambda),$$

with $u$ from Hessian-vector products only (no Hessian is formed).
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, PyTree


def tree_dot(a: PyTree, b: PyTree) -> Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b)))


METHODS = ("cg", "gmres", "neumann", "unrolled")


def _tree_axpy(a, x, y):
    return jtu.tree_map(lambda xi, yi: a * xi + yi, x, y)


def _check_float_tree(tree, name: str) -> None:
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` has no arrays to differentiate.")
    for leaf in leaves:
        if not eqx.is_inexact_array(leaf) and not isinstance(leaf, float):
            raise TypeError(
                f"`{name}` must be a pytree of floating arrays; found "
                f"{type(leaf).__name__} {getattr(leaf, 'dtype', '')}. Pass hyperparameters "
                "as arrays (explicit arguments, never captured by closure)."
            )


def hypergradient(
    inner_loss,
    outer_loss,
    params: PyTree,
    hparams: PyTree[Array],
    *,
    inner_args: PyTree = None,
    outer_args: PyTree = None,
    method: str = "cg",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    max_steps: int = 1000,
    k: int = 20,
    alpha: float = 0.1,
    throw: bool = True,
    return_stats: bool = False,
):
    r"""The gradient of `outer_loss(params*(hparams), hparams, outer_args)` with respect
    to `hparams`, where `params*` minimises `inner_loss(params, hparams, inner_args)`.

    `params` is the (approximate) inner minimiser already computed: the call does not
    re-solve the inner problem. Any pytree for `params` (e.g. an Equinox model: only its
    floating arrays are differentiated) and for `hparams` (a scalar, one value per weight,
    ...). Hyperparameters and data are explicit arguments, never closed over.

    **Methods** (the inverse-Hessian-vector product $u = H^{-1}\nabla_w L_V$):

    - `"cg"`: lineax conjugate gradients on Hessian-vector products (`rtol`, `atol`,
      `max_steps`); $H$ must be symmetric positive definite (a minimum).
    - `"gmres"`: lineax GMRES (for an indefinite or ill-conditioned $H$).
    - `"neumann"`: Lorraine, Vicol & Duvenaud (2020): $H^{-1} \approx \alpha
      \sum_{j=0}^{k}(I-\alpha H)^j$ — $k$ Hessian-vector products, converging as $k$
      grows when $\|I-\alpha H\| < 1$ (the arXiv listing's `p ← p − v` should read
      `p ← p + v`, and the result is scaled by $\alpha$, as in the authors' code).
    - `"unrolled"`: the baseline: differentiate through `k` gradient-descent steps of
      size `alpha` on the inner loss started from `params` (from $w^*$ this equals the
      $k$-term Neumann series).

    **Failure:** the residual $\|Hu - \nabla_w L_V\|$ and the number of steps are
    reported (`return_stats=True`: `(grad, stats)` with `residual`, `num_steps`,
    `converged`). A `cg`/`gmres` solve that does not reach its tolerance raises with
    `throw=True` (default); with `throw=False` the stats flag it (`converged=False`) —
    the hypergradient is never silently wrong. Neumann and unrolled are approximations
    by design: they report the residual of the $u$ they imply (Neumann) and never raise.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if k < 0:
        raise ValueError(f"`k` must be >= 0, got {k}.")
    _check_float_tree(hparams, "hparams")
    hparams = jtu.tree_map(jnp.asarray, hparams)
    w, w_static = eqx.partition(params, eqx.is_inexact_array)
    if not jtu.tree_leaves(w):
        raise ValueError("`params` has no floating arrays to differentiate.")

    def lt(w_, h_):
        return inner_loss(eqx.combine(w_, w_static), h_, inner_args)

    def lv(w_, h_):
        return outer_loss(eqx.combine(w_, w_static), h_, outer_args)

    for name, fn in (("inner_loss", lt), ("outer_loss", lv)):
        out = jax.eval_shape(fn, w, hparams)
        if out.shape != ():
            raise ValueError(f"`{name}` must return a scalar, got shape {out.shape}.")

    if method == "unrolled":
        def unrolled(h_):
            def body(w_, _):
                g = jax.grad(lt)(w_, h_)
                return _tree_axpy(-alpha, g, w_), None

            w_k, _ = lax.scan(body, w, None, length=k)
            return lv(w_k, h_)

        grad = jax.grad(unrolled)(hparams)
        stats = {"residual": jnp.array(jnp.nan), "num_steps": jnp.array(k),
                 "converged": jnp.array(True)}
        return (grad, stats) if return_stats else grad

    gv_w, gv_h = jax.grad(lv, argnums=(0, 1))(w, hparams)
    grad_w = jax.grad(lt)

    def hvp(v):
        return jax.jvp(lambda w_: grad_w(w_, hparams), (w,), (v,))[1]

    if method == "neumann":
        def body(carry, _):
            v, p = carry
            v = _tree_axpy(-alpha, hvp(v), v)
            return (v, jtu.tree_map(jnp.add, p, v)), None

        (_, p), _ = lax.scan(body, (gv_w, gv_w), None, length=k)
        u = jtu.tree_map(lambda a: alpha * a, p)
        steps = jnp.array(k)
        converged = jnp.array(True)
    else:
        struct = jax.eval_shape(lambda: gv_w)
        if method == "cg":
            solver = lx.CG(rtol=rtol, atol=atol, max_steps=max_steps)
            tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
        else:
            solver = lx.GMRES(rtol=rtol, atol=atol, max_steps=max_steps,
                              restart=min(max_steps, 50))
            tags = ()
        op = lx.FunctionLinearOperator(hvp, struct, tags)
        sol = lx.linear_solve(op, gv_w, solver, throw=False)
        u = sol.value
        steps = sol.stats.get("num_steps", jnp.array(0))
        converged = sol.result == lx.RESULTS.successful
    r = jtu.tree_map(jnp.subtract, hvp(u), gv_w)
    residual = optx.two_norm(r)
    if method in ("cg", "gmres"):
        scale = atol + rtol * optx.two_norm(gv_w)
        converged = converged & jnp.isfinite(residual) & (residual <= 10 * scale)
        if throw:
            u = eqx.error_if(
                u, ~converged,
                f"hypergradient: the {method} solve of H u = dL_V/dw did not converge "
                "(raise `max_steps`, loosen `rtol`/`atol`, or check that `params` is a "
                "minimiser with a positive definite Hessian).",
            )
    u = lax.stop_gradient(u)
    mixed = jax.grad(lambda h_: tree_dot(grad_w(w, h_), u))(hparams)
    grad = jtu.tree_map(jnp.subtract, gv_h, mixed)
    stats = {"residual": residual, "num_steps": steps, "converged": converged}
    return (grad, stats) if return_stats else grad
