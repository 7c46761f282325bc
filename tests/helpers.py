"""Problems and solvers shared by the tests (parametrised over, never copied)."""

import functools
import os

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import implicit_kit as ik


TOL = dict(rtol=1e-12, atol=1e-13)


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process a test starts: the suite's compile flags (conftest.py),
    and `devices` host CPU devices if given."""
    flags = [os.environ.get("IMPLICIT_KIT_TEST_XLA_FLAGS", "")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(filter(None, flags))


def _orthogonal(key, n):
    q, _ = jnp.linalg.qr(jr.normal(key, (n, n)))
    return q


class Linear:
    """y = A y + b, A non-symmetric with ||A||_2 < 1: closed form (I - A)^-1 b (a
    symmetric A would hide a missing transpose in a backward solve)."""

    name = "linear"
    picard_ok = True

    def __init__(self, n=5, rho=0.6, seed=0):
        k1, k2, k3 = jr.split(jr.key(seed), 3)
        q = _orthogonal(k1, n)
        eig = jnp.linspace(-rho, rho, n)
        self.args = (q @ jnp.diag(eig) @ q.T + 0.15 * jr.normal(k3, (n, n)),
                     jr.normal(k2, (n,)))
        self.y0 = jnp.zeros(n)

    @staticmethod
    def fn(y, args):
        A, b = args
        return A @ y + b

    def exact(self, args):
        A, b = args
        return jnp.linalg.solve(jnp.eye(A.shape[0]) - A, b)


class Divergent(Linear):
    """y = A y + b with an eigenvalue -1.5 (Picard diverges) and I - A invertible."""

    name = "divergent"
    picard_ok = False

    def __init__(self, n=4, seed=1):
        k1, k2 = jr.split(jr.key(seed))
        q = _orthogonal(k1, n)
        eig = jnp.array([-1.5, 0.3, -0.2, 0.5])[:n]
        self.args = (q @ jnp.diag(eig) @ q.T, jr.normal(k2, (n,)))
        self.y0 = jnp.zeros(n)


class PyTreeMap:
    """A contraction on a dict of arrays; reference: optimistix Newton."""

    name = "pytree"
    picard_ok = True

    def __init__(self, seed=2):
        k1, k2, k3 = jr.split(jr.key(seed), 3)
        self.args = {
            "W": 0.4 * _orthogonal(k1, 6),
            "c": jr.normal(k2, (2, 3)),
            "s": jnp.array(0.7),
        }
        self.y0 = {"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}
        del k3

    @staticmethod
    def fn(y, args):
        flat = jnp.concatenate([y["a"], y["b"].reshape(-1)])
        z = jnp.tanh(args["W"] @ flat + args["c"].reshape(-1))
        return {"a": args["s"] * z[:2], "b": jnp.cos(z[2:]).reshape(2, 2) * 0.5}

    def exact(self, args):
        return reference(self.fn, self.y0, args)


class MLPDEQ:
    """A small DEQ cell z = tanh(W z + U x + b), ||W||_2 = 0.8."""

    name = "mlp_deq"
    picard_ok = True

    def __init__(self, n=8, d=3, seed=3):
        k1, k2, k3, k4 = jr.split(jr.key(seed), 4)
        W = jr.normal(k1, (n, n))
        W = 0.8 * W / jnp.linalg.norm(W, 2)
        self.args = (W, jr.normal(k2, (n, d)), 0.1 * jr.normal(k3, (n,)),
                     jr.normal(k4, (d,)))
        self.y0 = jnp.zeros(n)

    @staticmethod
    def fn(z, args):
        W, U, b, x = args
        return jnp.tanh(W @ z + U @ x + b)

    def exact(self, args):
        return reference(self.fn, self.y0, args)


@functools.cache
def _residual(fn):
    """`fn(y) - y`, one function object per `fn`: optimistix's compiled solve is reused
    across calls (a new lambda per call would recompile it every time)."""
    return lambda y, a: jax.tree_util.tree_map(lambda p, q: p - q, fn(y, a), y)


def reference(fn, y0, args):
    """An independent solver: optimistix Newton on fn(y) - y with a dense Jacobian."""
    sol = optx.root_find(_residual(fn), optx.Newton(rtol=1e-13, atol=1e-14), y0, args,
                         max_steps=100)
    return sol.value


PROBLEMS = [Linear(), Divergent(), PyTreeMap(), MLPDEQ()]

SOLVERS = {
    "picard": ik.Picard(**TOL),
    "anderson": ik.Anderson(m=6, **TOL),
    "broyden": ik.Broyden(**TOL),
    "newton_krylov": ik.NewtonKrylov(
        **TOL, linear_solver=lx.GMRES(rtol=1e-12, atol=1e-14, restart=20)
    ),
    "optx_fixed_point": optx.FixedPointIteration(**TOL),
    "optx_newton": optx.Newton(**TOL),
}
# Which solvers converge where Picard diverges.
ROBUST = {"anderson", "broyden", "newton_krylov", "optx_newton"}


def tiered(cases, fast, ids=None):
    """`pytest.param`s of `cases` (tuples or values); those whose id is not in `fast` are
    marked `slow`: the whole suite runs every case, the fast tier a representative few."""
    out = []
    for i, case in enumerate(cases):
        id_ = ids[i] if ids is not None else (
            "-".join(map(str, case)) if isinstance(case, tuple) else str(case))
        values = case if isinstance(case, tuple) else (case,)
        marks = () if id_ in fast else (pytest.mark.slow,)
        out.append(pytest.param(*values, marks=marks, id=id_))
    return out


def tree_allclose(a, b, rtol, atol=0.0):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(leaves_a, leaves_b)
    )


def rel_err(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
