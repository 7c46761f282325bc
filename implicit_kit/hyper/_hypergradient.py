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
from jaxtyping import Array, PyTree

from .._adjoint import ImplicitAdjoint, NeumannAdjoint
from .._misc import dtype_of, gmres, tree_add
from .._solution import backward_probe, backward_stats, RESULTS
from .._solve import GivenForward, solve


METHODS = ("cg", "gmres", "neumann", "unrolled")


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

    The IFT methods run on the library's shared implicit machinery (`ik.ImplicitAdjoint`
    with lineax CG/GMRES, `ik.NeumannAdjoint`) applied to the stationarity condition
    $\nabla_w L_T = 0$ at the given `params`.

    **Failure:** the residual $\|Hu - \nabla_w L_V\|$ (Neumann: the norm of the series'
    last term) and the number of steps are reported (`return_stats=True`: `(grad, stats)`
    with `residual`, `num_steps` and `result`, an `ik.RESULTS` member as in every
    solve). A `cg`/`gmres` solve that does not reach its tolerance raises with
    `throw=True` (default); with `throw=False` the stats flag it
    (`result == RESULTS.backward_max_steps_reached`) and the gradient is NaN —
    the hypergradient is never silently wrong. Neumann and unrolled are approximations
    by design and never raise.
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
                return tree_add(w_, g, -alpha), None

            w_k, _ = lax.scan(body, w, None, length=k)
            return lv(w_k, h_)

        grad = jax.grad(unrolled)(hparams)
        stats = {"residual": jnp.array(jnp.nan), "num_steps": jnp.array(k),
                 "result": RESULTS.successful}
        return (grad, stats) if return_stats else grad

    # The inner minimiser as an implicit function of the hyperparameters, through the
    # library's shared machinery (`_solve.solve`, the adjoints): the stationarity
    # condition G(w, h) = -scale * grad_w inner = 0 at the given `w`, so that the fixed-
    # point form w + G is a gradient step and the adjoint operator is scale * H (symmetric
    # positive definite at a minimum: CG applies).
    scale = alpha if method == "neumann" else 1.0
    grad_w = jax.grad(lt)

    def stationarity(w_, a):
        return jtu.tree_map(lambda g: -scale * g, grad_w(w_, a[0]))

    if method == "neumann":  # alpha * sum_{j<=k} (I - alpha H)^j
        adjoint, tags = NeumannAdjoint(k), frozenset()
    elif method == "cg":
        adjoint = ImplicitAdjoint(lx.CG(rtol=rtol, atol=atol, max_steps=max_steps))
        tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
    else:
        adjoint = ImplicitAdjoint(gmres(rtol=rtol, atol=atol, max_steps=max_steps,
                                        restart=min(max_steps, 50)))
        tags = frozenset()

    def outer(h_, probe):
        sol = solve(stationarity, w, (h_,), GivenForward("root", lambda y0, *_: y0),
                    has_aux=False, adjoint=adjoint, throw=throw,
            probe=probe, tags=tags, name="grad(inner_loss)")
        return lv(sol.value, h_)

    grad, probe_grad = jax.grad(outer, argnums=(0, 1))(hparams,
                                                        backward_probe(dtype_of(w)))
    bs = backward_stats(probe_grad)
    result = RESULTS.where(bs.num_failed > 0, RESULTS.backward_max_steps_reached,
                           RESULTS.successful)
    stats = {"residual": bs.residual, "num_steps": bs.num_steps.astype(int),
             "result": result}
    return (grad, stats) if return_stats else grad
