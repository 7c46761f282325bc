"""The fixed-point problems of optimistix's own test suite, ported.

From `tests/helpers.py` of patrick-kidger/optimistix (commit 6415ab1):
`fixed_point_fn_init_args` with `_cos`, `_exponential`, `_nn`, `_nonlinear_heat_pde`, the
linear midpoint problems (`_midpoint_{y,f,k}_linear`) and the nonlinear (Robertson)
midpoint problems. The pytree arithmetic (`ω`) is written with `jtu.tree_map`; the
functions, constants and initial values are optimistix's.
"""

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu


def _getsize(y):
    return jtu.tree_reduce(lambda x, y: x + y, jtu.tree_map(jnp.size, y))


def _laplacian(y, dx):
    # (optimistix's helper returns `y` itself: kept as it is, it defines the problem)
    (y, unflatten) = jfu.ravel_pytree(y)
    return unflatten(y)


def get_weights(model):
    return model.layers[0].weight, model.layers[0].bias, model.layers[1].weight, \
        model.layers[1].bias


def _nonlinear_heat_pde_general(y0, f0, dx, t0, t1, y, args):
    const = args
    stepsize = t1 - t0
    f_val = (1 - y) * _laplacian(y, dx)
    return const * (y0 + 0.5 * stepsize * (f_val + f0))


def _midpoint_y_general(f, y0, dt, y, args):
    f_new = f(jtu.tree_map(lambda a, b: 0.5 * (a + b), y0, y), args)
    return jtu.tree_map(lambda a, b: a + dt * b, y0, f_new)


def _midpoint_f_general(f, y0, dt, y, args):
    return f(jtu.tree_map(lambda a, b: a + dt * b, y0, y), args)


def _midpoint_k_general(f, y0, dt, y, args):
    return jtu.tree_map(lambda a: a * dt, f(jtu.tree_map(jnp.add, y0, y), args))


class Robertson(eqx.Module):
    k1: float
    k2: float
    k3: float

    def __call__(self, y, args):
        (y, unflatten) = jfu.ravel_pytree(y)
        f0 = -self.k1 * y[0] + self.k3 * y[1] * y[2]
        f1 = self.k1 * y[0] - self.k2 * y[1] ** 2 - self.k3 * y[1] * y[2]
        f2 = self.k2 * y[1] ** 2
        return unflatten(jnp.stack([f0, f1, f2]))


def _exponential(tree, args):
    return jtu.tree_map(lambda x: jnp.exp(-args * x), tree)


def _cos(tree, args):
    return jtu.tree_map(lambda x: jnp.cos(args * x), tree)


def _nn(tree, args):
    (y, unflatten) = jfu.ravel_pytree(tree)
    size = _getsize(y)
    model = eqx.nn.MLP(in_size=size, out_size=size, width_size=8, depth=1,
                       activation=jax.nn.softplus, key=jr.PRNGKey(42))
    model = eqx.tree_at(get_weights, model, tuple(args))
    return unflatten(0.1 * model(y))


def _nonlinear_heat_pde(y, args):
    x = jnp.linspace(-1, 1, 100)
    dx = x[1] - x[0]
    y0 = x**2
    f0 = (1 - y0) * _laplacian(y0, dx)
    return _nonlinear_heat_pde_general(y0, f0, dx, jnp.array(0.0), jnp.array(1.0), y, args)


def _midpoint_y_linear(tree, args):
    (y, unflatten) = jfu.ravel_pytree(tree)
    f = lambda x, _: args @ x
    return unflatten(_midpoint_y_general(f, jnp.zeros_like(y), jnp.array(1 / 2**4), y,
                                         args))


def _midpoint_f_linear(tree, args):
    (y, unflatten) = jfu.ravel_pytree(tree)
    f = lambda x, a: jnp.dot(a, x)
    out = _midpoint_f_general(f, jnp.zeros_like(y), jnp.array(1 / 2**4), y, args)
    return unflatten(out.reshape(1) if out.size == 1 else out)


def _midpoint_k_linear(tree, args):
    (y, unflatten) = jfu.ravel_pytree(tree)
    f = lambda x, a: jnp.dot(a, x)
    out = _midpoint_k_general(f, jnp.zeros_like(y), jnp.array(1 / 2**4), y, args)
    return unflatten(out.reshape(1) if out.size == 1 else out)


def _midpoint_nonlinear(general):
    def fn(y, args):
        f = Robertson(*args)
        return general(f, jtu.tree_map(jnp.zeros_like, y), jnp.array(1e-8), y, args)

    fn.__name__ = general.__name__.replace("_general", "_nonlinear")
    return fn


def problems():
    """`(name, fn, init, args)` for every fixed-point problem of optimistix's suite
    (built on call: the arrays take the dtype of the x64 setting in force)."""
    ones_pytree = ({"a": 0.5 * jnp.ones((3, 2, 4))}, 0.5 * jnp.ones(4))
    flat_ones, _ = jfu.ravel_pytree(ones_pytree)
    size = flat_ones.size
    matrix = jr.normal(jr.PRNGKey(19), (size, size))
    nn_model = eqx.nn.MLP(in_size=size, out_size=size, width_size=8, depth=1,
                          activation=jax.nn.softplus, key=jr.PRNGKey(42))
    nn_args = get_weights(nn_model)
    robertson_args = (jnp.array(0.04), jnp.array(3e7), jnp.array(1e4))
    ones_robertson = (jnp.ones(2), {"b": jnp.array(1.0)})
    return [
        ("cos", _cos, ones_pytree, jnp.array(1.0)),
        ("exponential", _exponential, ones_pytree, jnp.array(1.0)),
        ("nn", _nn, ones_pytree, nn_args),
        ("nonlinear_heat_pde", _nonlinear_heat_pde, jnp.ones(100), jnp.array(1.0)),
        ("midpoint_y_linear", _midpoint_y_linear, ones_pytree, matrix),
        ("midpoint_f_linear", _midpoint_f_linear, ones_pytree, matrix),
        ("midpoint_k_linear", _midpoint_k_linear, ones_pytree, matrix),
        ("midpoint_y_nonlinear", _midpoint_nonlinear(_midpoint_y_general), ones_robertson,
         robertson_args),
        ("midpoint_f_nonlinear", _midpoint_nonlinear(_midpoint_f_general), ones_robertson,
         robertson_args),
        ("midpoint_k_nonlinear", _midpoint_nonlinear(_midpoint_k_general), ones_robertson,
         robertson_args),
    ]
