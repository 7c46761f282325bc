r"""Common smooth objectives as pure functions `f(x, args)` (jaxopt's `jaxopt.objective`,
`jaxopt/_src/objective.py`), so that its examples port with nothing from jaxopt.

Each is a `CompositeLinear`: $f(x) = s(Mx) + \langle x, b\rangle$ with $M$ a data matrix,
which is what `ik.block_coordinate_descent` needs (a block's gradient is a column of
$M$ against $\nabla s$, its step $1/L_j$ with $L_j = \ell\,\|M_{:,j}\|^2$ the exact
curvature bound of block $j$, $\ell$ that of $s$). Each is also an ordinary function of
`x` for `ik.minimise`, `ik.optimality` and `jax.grad`.

- `least_squares(w, (X, y))` $= \frac1{2n}\|Xw - y\|^2$;
- `binary_logreg(w, (X, y))`, labels in {0, 1}: the mean logistic loss of $Xw$;
- `multiclass_logreg(W, (X, y))`, integer labels: the mean softmax cross-entropy of
  $XW$;
- `multiclass_linear_svm_dual(beta, (l2reg, (X, Y)))`, `Y` one-hot (n, k): the dual of
  the multiclass linear SVM (Crammer–Singer), $\frac1{2\lambda}\|X^\top(Y - \beta)\|^2 +
  \langle\beta, Y - 1\rangle$, minimised over rows of $\beta$ in the simplex; the primal
  weights are $X^\top(Y - \beta)/\lambda$.

(jaxopt computes its steps from $\|M_{:,j}\|^2$ without the $1/n$ of the mean or the
$1/\lambda$ of the SVM dual: steps up to $n$ times shorter than these.)
"""

import abc

import equinox as eqx
import jax.numpy as jnp
import optax
from jaxtyping import Array


__all__ = ["binary_logreg", "CompositeLinear", "least_squares", "multiclass_linear_svm_dual",
           "multiclass_logreg"]


class CompositeLinear(eqx.Module):
    r"""$f(x, \text{args}) = s(Mx, \text{args}) + \langle x, b(\text{args})\rangle$.

    - `matrix(args)`: $M$, (n_out, p); `x` is (p,) or (p, k), its blocks are its rows.
    - `subfun(pred, args)`: $s$, a scalar.
    - `linear(args)`: $b$ like `x`, or `None`.
    - `curvature(args)`: $\ell$, a bound on $s$'s curvature along any one column (so
      $L_j = \ell\|M_{:,j}\|^2$).
    """

    @abc.abstractmethod
    def matrix(self, args) -> Array: ...

    @abc.abstractmethod
    def subfun(self, pred, args) -> Array: ...

    @abc.abstractmethod
    def curvature(self, args) -> Array: ...

    def linear(self, args) -> Array | None:
        del args
        return None

    def __call__(self, x, args):
        value = self.subfun(self.matrix(args) @ x, args)
        b = self.linear(args)
        return value if b is None else value + jnp.vdot(x, b)


class _LeastSquares(CompositeLinear):
    def matrix(self, args):
        return args[0]

    def subfun(self, pred, args):
        return 0.5 * jnp.mean((pred - args[1]) ** 2)

    def curvature(self, args):
        return 1.0 / args[0].shape[0]


class _BinaryLogreg(CompositeLinear):
    def matrix(self, args):
        return args[0]

    def subfun(self, pred, args):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(pred, args[1]))

    def curvature(self, args):
        return 0.25 / args[0].shape[0]


class _MulticlassLogreg(CompositeLinear):
    def matrix(self, args):
        return args[0]

    def subfun(self, pred, args):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(pred, args[1]))

    def curvature(self, args):
        return 0.5 / args[0].shape[0]


class _MulticlassSvmDual(CompositeLinear):
    def matrix(self, args):
        return args[1][0].T

    def subfun(self, pred, args):
        l2reg, (X, Y) = args
        v = X.T @ Y - pred
        return 0.5 / l2reg * jnp.vdot(v, v)

    def curvature(self, args):
        return 1.0 / args[0]

    def linear(self, args):
        return args[1][1] - 1.0


least_squares = _LeastSquares()
binary_logreg = _BinaryLogreg()
multiclass_logreg = _MulticlassLogreg()
multiclass_linear_svm_dual = _MulticlassSvmDual()
