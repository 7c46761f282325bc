"""DEQ train step, side by side: implicit_kit vs TorchDEQ, optimistix and jaxopt.

Workload (issue "Core"): x in R^64, z in R^256, f(z, x) = tanh(W z + U x + b) with
||W||_2 = 0.9 at init, a linear readout to 10 classes, cross-entropy, batch 256, Anderson
(m=5) to relative residual 1e-4 (max 50), implicit backward to 1e-4 (max 50), one SGD step.

Sections (all in one run):
- `main`: ms per train step (with `--rounds R`, the median over R separate processes),
  forward/backward steps, memory, ratio to the floor (a jit-compiled chain of the same
  number of bare matmul+tanh ops at the same shapes). Each peer appears out of the box
  (its defaults, vmapped per sample and on the batch as one problem) and configured as
  its users would for this problem (a fixed-point backward solve: `PicardLinearSolver`
  for optimistix, `jaxopt_picard_backward` for jaxopt; Picard and Anderson forward for
  TorchDEQ), with the configuration named in each row; the like-for-like targets compare
  implicit_kit with each peer's fastest exact-gradient row.
- `hard`: ||W||_2 = 0.99 with a spectral radius equal to the norm and small inputs, so
  that tanh stays near linear: Picard vs Anderson vs Broyden forward steps.
- `scaling`: hidden sizes 128-1024 (implicit_kit, TorchDEQ, floor).
- `memory`: compiled peak temporary memory of `jax.grad` through ImplicitAdjoint vs
  UnrolledAdjoint, for 10 vs 200 forward steps.

Optional peers are skipped with a message when not installed
(`pip install ".[bench]"`).

Run: python benchmarks/deq_train_step.py [--quick] [--rounds R] [--json PATH]
(the tables are printed; `benchmarks/report.py` stores and renders them in RESULTS.md)
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optax
import optimistix as optx
from _common import IK_DEFAULT, IK_PICARD, interleaved, timeit
from renderers import deq_tables

import implicit_kit as ik


# Like for like across backends and with torch (whose CUDA matmuls do not use TF32 by
# default): full float32 precision for every matmul.
jax.config.update("jax_default_matmul_precision", "highest")


D_IN, N_CLASSES, BATCH, LR = 64, 10, 256, 0.1
RTOL, MAX_STEPS = 1e-4, 50


# --------------------------------------------------------------------------- data/params
def make_problem(hidden, w_norm=0.9, x_scale=1.0, symmetric=False, seed=0):
    k = jr.split(jr.key(seed), 6)
    if symmetric:  # spectral radius = norm: close to non-contractive
        q, _ = jnp.linalg.qr(jr.normal(k[0], (hidden, hidden)))
        W = q @ jnp.diag(jnp.linspace(-w_norm, w_norm, hidden)) @ q.T
    else:
        W = jr.normal(k[0], (hidden, hidden))
        W = w_norm * W / jnp.linalg.norm(W, 2)
    U = jr.normal(k[1], (hidden, D_IN)) / jnp.sqrt(D_IN)
    b = jnp.zeros(hidden)
    Wo = jr.normal(k[2], (N_CLASSES, hidden)) / jnp.sqrt(hidden)
    bo = jnp.zeros(N_CLASSES)
    x = x_scale * jr.normal(k[3], (BATCH, D_IN))
    y = jr.randint(k[4], (BATCH,), 0, N_CLASSES)
    params = dict(W=W, U=U, b=b, Wo=Wo, bo=bo)
    return jax.tree_util.tree_map(np.asarray, params), np.asarray(x), np.asarray(y)


def cell(z, args):
    W, inj = args  # the input injection U x + b is computed once per solve, outside
    return jnp.tanh(W @ z + inj)


def injection(params, x):
    return x @ params["U"].T + params["b"]


def head_loss(params, z, y):
    logits = z @ params["Wo"].T + params["bo"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def jax_peak_bytes(compiled):
    """XLA's compile-time memory of the step: temporaries + arguments + outputs (the same
    measure on every backend; the allocator's running peak cannot be reset per row)."""
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes, "xla"


# --------------------------------------------------------------------------- JAX rows
def jax_train_step(solve):
    """`solve(params, x) -> (z, fwd_steps, bwd_probe_or_None)`; returns a jitted step."""

    @jax.jit
    def step(params, probe, x, y):
        def loss_fn(params, probe):
            z, fwd = solve(params, probe, x)
            return head_loss(params, z, y), fwd

        (loss, fwd), (g, probe_g) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(params, probe)
        params = jax.tree_util.tree_map(lambda p, gp: p - LR * gp, params, g)
        return params, loss, fwd, probe_g

    return step


def ik_solve(solver, adjoint, max_steps=MAX_STEPS, check_every=1):
    def solve(params, probe, x):
        def one(inj):
            z0 = jnp.zeros(params["W"].shape[0], inj.dtype)
            sol = ik.fixed_point(cell, z0, (params["W"], inj), solver, adjoint=adjoint,
                                 max_steps=max_steps, throw=False, probe=probe,
                                 check_every=check_every)
            return sol.value, sol.stats["num_steps"]

        return jax.vmap(one)(injection(params, x))

    return solve


def ik_batch_solve(solver, adjoint, max_steps=MAX_STEPS):
    """implicit_kit on the batch as one problem: one state (batch x hidden), one
    relative-residual test on the whole batch, one backward solve."""

    def solve(params, probe, x):
        z0 = jnp.zeros((x.shape[0], params["W"].shape[0]), x.dtype)
        sol = ik.fixed_point(cell_batch, z0, (params["W"], injection(params, x)), solver,
                             adjoint=adjoint, max_steps=max_steps, throw=False,
                             probe=probe)
        return sol.value, jnp.full(x.shape[0], sol.stats["num_steps"])

    return solve


def picard_linear_solve(matvec, b, rtol=RTOL, max_steps=MAX_STEPS):
    """Solve `A u = b` for `A = J - I` with J a contraction (the linear system of a
    fixed point's implicit derivative, in either direction) by the fixed-point
    iteration `u <- u + (A u - b) = J u - b`, to `|A u - b| <= rtol |u|` (the relative
    residual implicit_kit's backward Picard stops on). This is what a user of optimistix
    or jaxopt writes to give either library a fixed-point backward solve."""

    def cond(c):
        u, res, i = c
        return (i == 0) | ((res > rtol * jnp.linalg.norm(u)) & (i < max_steps))

    def body(c):
        u, _, i = c
        r = matvec(u) - b
        return u + r, jnp.linalg.norm(r), i + 1

    u, _, i = jax.lax.while_loop(cond, body, (jnp.zeros_like(b), jnp.inf, 0))
    return u, i


class PicardLinearSolver(lx.AbstractLinearSolver):
    """`picard_linear_solve` as a lineax solver, for optimistix's
    `ImplicitAdjoint(linear_solver=...)`: its fixed points' implicit derivative solves
    with `A = J_f - I` and, in reverse mode, with its transpose (lineax's `GMRES` is the
    model: `lineax/_solver/gmres.py`)."""

    def init(self, operator, options):
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        u, steps = picard_linear_solve(state.mv, vector)
        return u, lx.RESULTS.successful, {"num_steps": steps}

    def transpose(self, state, options):
        return state.transpose(), {}

    def conj(self, state, options):
        return lx.conj(state), {}

    def assume_full_rank(self):
        return True


def optx_solve(adjoint, batch=False):
    """optimistix's fixed-point iteration: per sample under vmap, or (`batch=True`) on
    the batch as one problem (elementwise stopping test over the whole batch)."""
    solver = optx.FixedPointIteration(rtol=RTOL, atol=1e-5)

    def run(fn, z0, args):
        sol = optx.fixed_point(fn, solver, z0, args, max_steps=MAX_STEPS,
                               adjoint=adjoint, throw=False)
        return sol.value, sol.stats["num_steps"]

    def solve(params, probe, x):
        inj = injection(params, x)
        z0 = jnp.zeros((x.shape[0], params["W"].shape[0]), x.dtype)
        if batch:
            z, n = run(cell_batch, z0, (params["W"], inj))
            return z, jnp.full(x.shape[0], n)
        return jax.vmap(lambda z0, inj: run(cell, z0, (params["W"], inj)))(z0, inj)

    return solve


def jaxopt_solve(tol, backward=None, batch=False, anderson=True):
    """jaxopt's Anderson acceleration (m = 5; or its fixed-point iteration when
    `anderson=False`), with its default implicit backward
    (`backward=None`: normal-equation CG) or the given `implicit_diff_solve`; per
    sample under vmap or on the batch as one problem. jaxopt's tolerance is absolute on
    the l2 norm of f(z) - z over its whole state."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jaxopt

    fp = (lambda z, W, inj: jnp.tanh(z @ W.T + inj)) if batch else \
        (lambda z, W, inj: jnp.tanh(W @ z + inj))
    kw = {} if backward is None else {"implicit_diff_solve": backward}
    if anderson:
        solver = jaxopt.AndersonAcceleration(fp, history_size=5, ridge=1e-5,
                                             maxiter=MAX_STEPS, tol=tol, implicit_diff=True,
                                             **kw)
    else:
        solver = jaxopt.FixedPointIteration(fp, maxiter=MAX_STEPS, tol=tol,
                                            implicit_diff=True, **kw)

    def run(z0, W, inj):
        out = solver.run(z0, W, inj)
        return out.params, out.state.iter_num

    def solve(params, probe, x):
        inj = injection(params, x)
        z0 = jnp.zeros((x.shape[0], params["W"].shape[0]), x.dtype)
        if batch:
            z, n = run(z0, params["W"], inj)
            return z, jnp.full(x.shape[0], n)
        return jax.vmap(run, in_axes=(0, None, 0))(z0, params["W"], inj)

    return solve


def jaxopt_picard_backward(matvec, b, **kwargs):
    """A fixed-point backward for jaxopt's `implicit_diff_solve(matvec, b)`, which
    solves `A^T u = b` with `A = J_f - I` given as `matvec`."""
    return picard_linear_solve(matvec, b)[0]


def hand_picard_solve():
    """Hand-written JAX: Picard on the batch as one problem and a `custom_vjp` whose
    backward is the fixed-point iteration `u <- J^T u + ybar` (stopping on the same
    relative residual): what a JAX user writes without a library."""

    def forward(args):
        W, inj = args

        def cond(c):
            z, res, i = c
            return (i == 0) | ((res > RTOL * jnp.linalg.norm(z)) & (i < MAX_STEPS))

        def body(c):
            z, _, i = c
            fz = cell_batch(z, args)
            return fz, jnp.linalg.norm(fz - z), i + 1

        z0 = jnp.zeros((inj.shape[0], W.shape[0]), inj.dtype)
        z, _, i = jax.lax.while_loop(cond, body, (z0, jnp.inf, 0))
        return z, i

    @jax.custom_vjp
    def fixed_point(args):
        return forward(args)

    def fwd(args):
        z, i = forward(args)
        return (z, i), (z, args)

    def bwd(res, cot):
        z, args = res
        _, vjp_z = jax.vjp(lambda z: cell_batch(z, args), z)
        u, _ = picard_linear_solve(lambda u: vjp_z(u)[0] - u, -cot[0])
        _, vjp_a = jax.vjp(lambda a: cell_batch(z, a), args)
        return vjp_a(u)

    fixed_point.defvjp(fwd, bwd)

    def solve(params, probe, x):
        z, n = fixed_point((params["W"], injection(params, x)))
        return z, jnp.full(x.shape[0], n)

    return solve


def prepare_jax_row(name, solve, params, x, y, stop_rule, solves=BATCH):
    """`(row, call)`: the row's statistics from one compiled step, and the timed call.
    `solves`: how many solves the backward probe's count is over (the batch, or one for
    the batch as one problem)."""
    step = jax_train_step(solve)
    probe = ik.backward_probe(jnp.float32)
    compiled = step.lower(params, probe, x, y).compile()
    mem, mem_kind = jax_peak_bytes(compiled)
    new, loss, fwd, probe_g = step(params, probe, x, y)
    bwd = float(probe_g[0]) / solves if float(probe_g[0]) > 0 else None
    fwd = np.asarray(fwd)
    row = dict(name=name, fwd_mean=float(fwd.mean()), fwd_max=int(fwd.max()),
               bwd_mean=bwd, mem=mem, mem_kind=mem_kind, loss=float(loss), stop=stop_rule,
               grad_W=np.asarray((params["W"] - new["W"]) / LR))
    return row, lambda: jax.block_until_ready(step(params, probe, x, y))


def run_jax_row(name, solve, params, x, y, repeats, stop_rule):
    row, call = prepare_jax_row(name, solve, params, x, y, stop_rule)
    return {**row, "ms": timeit(call, repeats)}


def floor_call(hidden, n_ops):
    """A jit-compiled chain of n_ops bare (batch x hidden) matmul + tanh ops."""
    k = jr.split(jr.key(1), 3)
    W = jr.normal(k[0], (hidden, hidden)) / jnp.sqrt(hidden)
    z = jr.normal(k[1], (BATCH, hidden))
    c = jr.normal(k[2], (BATCH, hidden))

    @jax.jit
    def chain(z):
        return jax.lax.fori_loop(0, n_ops, lambda i, z: jnp.tanh(z @ W.T + c), z)

    return lambda: jax.block_until_ready(chain(z))


def fixed_count_step(params, x, y, n_fwd, n_bwd):
    """The same train step with fixed trip counts and nothing else: `n_fwd` map
    applications forward, the map applied once more with the parameters traced (which
    also linearises it at the solution), `n_bwd` adjoint steps `u <- ybar + J^T u`, the
    parameter cotangents, injection, readout and SGD update. No convergence tests, norms,
    masking or result codes: the least any exact implicit-gradient train step with these
    step counts can cost."""

    @jax.custom_vjp
    def hook(z, z_star, args):
        return z

    def hook_fwd(z, z_star, args):
        return z, (z_star, args)

    def hook_bwd(res, ybar):
        z_star, args = res
        _, vjp = jax.vjp(lambda z: cell_batch(z, args), z_star)
        u = jax.lax.fori_loop(0, n_bwd, lambda i, u: ybar + vjp(u)[0], ybar)
        return u, None, None

    hook.defvjp(hook_fwd, hook_bwd)

    @jax.jit
    def step(params, x, y):
        def loss_fn(params):
            inj = injection(params, x)
            args = (params["W"], inj)
            s_args = jax.lax.stop_gradient(args)
            z0 = jnp.zeros((x.shape[0], params["W"].shape[0]), x.dtype)
            z = jax.lax.fori_loop(0, n_fwd, lambda i, z: cell_batch(z, s_args), z0)
            z = jax.lax.stop_gradient(z)
            tz = cell_batch(z, args)
            z_out = z + tz - jax.lax.stop_gradient(tz)
            return head_loss(params, hook(z_out, z, s_args), y)

        loss, g = jax.value_and_grad(loss_fn)(params)
        return jax.tree_util.tree_map(lambda p, gp: p - LR * gp, params, g), loss

    return lambda: jax.block_until_ready(step(params, x, y))


def stop_cost(hidden, repeats):
    """What per-sample stopping costs by itself: the forward chain `z <- f(z)` as a
    `fori_loop` with a fixed trip count vs a `while_loop` that tests each sample's
    relative residual (two row norms), freezes converged samples and stops when all have
    (the least an adaptive per-sample loop does), timed interleaved."""
    params, x, _ = make_problem(hidden)
    args = (jnp.asarray(params["W"]), jnp.asarray(injection(params, x)))
    z0 = jnp.zeros((BATCH, hidden))

    def body(carry):
        z, i, done = carry
        fz = cell_batch(z, args)
        r = jnp.sqrt(jnp.sum((fz - z) ** 2, axis=1))
        done_now = r <= RTOL * jnp.sqrt(jnp.sum(z**2, axis=1))
        return jnp.where(done[:, None], z, fz), i + 1, done | done_now

    adaptive = jax.jit(lambda z: jax.lax.while_loop(
        lambda c: jnp.any(~c[2]) & (c[1] < MAX_STEPS), body,
        (z, 0, jnp.zeros(BATCH, bool))))
    n = int(adaptive(z0)[1])
    fixed = jax.jit(lambda z: jax.lax.fori_loop(
        0, n, lambda i, z: cell_batch(z, args), z))
    fixed_ms, adaptive_ms = interleaved(
        [lambda: jax.block_until_ready(fixed(z0)),
         lambda: jax.block_until_ready(adaptive(z0))], 3 * repeats)
    return dict(steps=n, fixed_ms=fixed_ms, adaptive_ms=adaptive_ms)


def cell_batch(z, args):
    """`cell` on a batch of states (rows of `z`)."""
    W, inj = args
    return jnp.tanh(z @ W.T + inj)


# --------------------------------------------------------------------------- TorchDEQ
TORCHDEQ_CONFIGS = {
    "anderson": ("TorchDEQ 0.1.0: anderson m=5, IFT fixed-point backward",
                 dict(ift=True, f_solver="anderson")),
    "picard": ("TorchDEQ 0.1.0: fixed_point_iter, IFT fixed-point backward",
               dict(ift=True, f_solver="fixed_point_iter")),
    "defaults": ("TorchDEQ 0.1.0 out of the box: fixed_point_iter, 1-step phantom gradient "
                 "(an inexact gradient)", dict()),
}


def torchdeq_row(params, x, y, config="anderson"):
    """`(row, call)` for TorchDEQ in one of `TORCHDEQ_CONFIGS`, or None when it is not
    installed. Every configuration runs at the workload's tolerances (relative, 1e-4,
    max 50 steps); "defaults" keeps `get_deq()`'s solver and its inexact gradient."""
    try:
        import torch
        from torchdeq import get_deq
    except ImportError as e:
        print(f"[skip] TorchDEQ row: {e} (pip install '.[bench]')", file=sys.stderr)
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    P = {k: torch.tensor(np.asarray(v), device=dev, requires_grad=True)
         for k, v in params.items()}
    X = torch.tensor(np.asarray(x), device=dev)
    Y = torch.tensor(np.asarray(y), device=dev, dtype=torch.long)
    name, kw = TORCHDEQ_CONFIGS[config]
    deq = get_deq(f_max_iter=MAX_STEPS, f_tol=RTOL, f_stop_mode="rel",
                  b_solver="fixed_point_iter", b_max_iter=MAX_STEPS, b_tol=RTOL,
                  b_stop_mode="rel", **kw)
    opt = torch.optim.SGD(list(P.values()), lr=LR)
    bwd_steps = []

    def writer(info):
        bwd_steps.append(float(info["nstep"].float().mean()))

    info_box = {}

    def step():
        opt.zero_grad()
        inj = X @ P["U"].T + P["b"]
        f = lambda z: torch.tanh(z @ P["W"].T + inj)
        z0 = torch.zeros(BATCH, P["W"].shape[0], device=dev)
        z_out, info = deq(f, z0, solver_kwargs={"m": 5} if config == "anderson" else {},
                          backward_writer=writer)
        logits = z_out[-1] @ P["Wo"].T + P["bo"]
        loss = torch.nn.functional.cross_entropy(logits, Y)
        loss.backward()
        opt.step()
        info_box["info"] = info
        if dev == "cuda":
            torch.cuda.synchronize()
        return loss

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    W0 = P["W"].detach().clone()
    loss = step()
    grad_W = ((W0 - P["W"].detach()) / LR).cpu().numpy()
    with torch.no_grad():
        P["W"].copy_(W0)  # the timed calls keep stepping; the gradient is from the start
    mem = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    nstep = info_box["info"]["nstep"].float()
    return dict(name=name, fwd_mean=float(nstep.mean()), fwd_max=int(nstep.max()),
                bwd_mean=bwd_steps[-1] if bwd_steps else None, mem=mem,
                mem_kind="cuda max allocated" if mem else "n/a on CPU",
                loss=loss.item(), stop="whole batch (max residual)", grad_W=grad_W), step


# --------------------------------------------------------------------------- sections
def main_section(hidden, repeats, include_peers=True):
    """Every row is compiled and run once for its statistics, then the JAX rows are timed
    interleaved (one call of each per round; the minimum over `repeats` rounds), so that
    the shared machine's slow spells hit every row alike and the ratios hold.

    Each peer appears out of the box (its defaults, both vmapped per sample and on the
    batch as one problem, the natural use of those libraries) and at its best for this
    problem (a fixed-point backward solve, the batch as one problem)."""
    params, x, y = make_problem(hidden)
    rows = []  # (row, call)
    torch_rows = []
    picard = ik.Picard(rtol=RTOL, atol=0.0)
    anderson = ik.Anderson(m=5, rtol=RTOL, atol=0.0)
    adj = ik.ImplicitAdjoint(picard, max_steps=MAX_STEPS)
    vmap_stop = "per sample"
    batch_stop = "whole batch (one residual norm)"
    for name, solve, stop, solves in [
        (IK_DEFAULT, ik_solve(anderson, adj), vmap_stop, BATCH),
        (IK_PICARD, ik_solve(picard, adj), vmap_stop, BATCH),
        ("implicit_kit Anderson(m=5) + ImplicitAdjoint(Picard), batch as one problem",
         ik_batch_solve(anderson, adj), batch_stop, 1),
        ("implicit_kit Picard + ImplicitAdjoint(Picard), batch as one problem",
         ik_batch_solve(picard, adj), batch_stop, 1),
    ]:
        rows.append(prepare_jax_row(name, solve, params, x, y, stop, solves))
    if include_peers:
        keep = "per sample (vmap; converged samples keep iterating)"
        rows.append(prepare_jax_row(
            "hand-written JAX Picard + custom_vjp (fixed-point backward), batch as one "
            "problem", hand_picard_solve(), params, x, y, batch_stop))
        rows.append(prepare_jax_row(
            "optimistix 0.1.0 out of the box: FixedPointIteration + ImplicitAdjoint() "
            "(dense LU), vmap", optx_solve(optx.ImplicitAdjoint()), params, x, y, keep))
        n = BATCH * hidden
        rows.append((dict(
            name="optimistix 0.1.0 out of the box, batch as one problem: not run (its "
                 f"dense LU would materialise the {n:,} × {n:,} Jacobian, "
                 f"{4 * n * n / 2**30:.0f} GiB in float32)", stop="—", ms=None,
            **EMPTY), None))
        fp_adj = optx.ImplicitAdjoint(linear_solver=PicardLinearSolver())
        rows.append(prepare_jax_row(
            "optimistix 0.1.0 FixedPointIteration + ImplicitAdjoint(fixed-point lineax "
            "solver), vmap", optx_solve(fp_adj), params, x, y, keep))
        rows.append(prepare_jax_row(
            "optimistix 0.1.0 FixedPointIteration + ImplicitAdjoint(fixed-point lineax "
            "solver), batch as one problem", optx_solve(fp_adj, batch=True), params, x, y,
            "whole batch (elementwise test)"))
        try:
            h = np.tanh(x @ params["U"].T)
            tol_one = RTOL * float(np.mean(np.linalg.norm(h, axis=1)))
            tol_batch = RTOL * float(np.linalg.norm(h))
            for name, solve, stop in [
                ("jaxopt 0.8 out of the box: AndersonAcceleration(m=5) (normal-CG "
                 "backward), vmap", jaxopt_solve(tol_one), keep),
                ("jaxopt 0.8 out of the box: AndersonAcceleration(m=5) (normal-CG "
                 "backward), batch as one problem", jaxopt_solve(tol_batch, batch=True),
                 batch_stop),
                ("jaxopt 0.8 AndersonAcceleration(m=5) + fixed-point backward, vmap",
                 jaxopt_solve(tol_one, jaxopt_picard_backward), keep),
                ("jaxopt 0.8 AndersonAcceleration(m=5) + fixed-point backward, batch as one "
                 "problem", jaxopt_solve(tol_batch, jaxopt_picard_backward, batch=True),
                 batch_stop),
                ("jaxopt 0.8 FixedPointIteration + fixed-point backward, batch as one "
                 "problem", jaxopt_solve(tol_batch, jaxopt_picard_backward, batch=True,
                                         anderson=False), batch_stop),
            ]:
                rows.append(prepare_jax_row(name, solve, params, x, y, stop))
        except ImportError as e:
            print(f"[skip] jaxopt rows: {e} (pip install '.[bench]')", file=sys.stderr)
        torch_rows = [r for r in (torchdeq_row(params, x, y, c) for c in TORCHDEQ_CONFIGS)
                      if r]
    ref = rows[0][0]
    n_ops = int(round(ref["fwd_mean"] + (ref["bwd_mean"] or 0)))
    rows.append((dict(name=f"floor: {n_ops} bare matmul+tanh ops (jit, fori_loop)",
                      stop="", **EMPTY), floor_call(hidden, n_ops)))
    # The floor counts only the solver loops' map applications. A train step must also
    # apply the map once at the solution (to attach and linearise), form the parameter
    # cotangents and run the injection and readout; and a vmapped loop with per-sample
    # stops runs until its slowest sample stops (the max, not the mean, of the steps).
    # The backward count is the floor's (the rounded mean: the probe reports only the
    # batch's total), not the backward loop's max, so this row is a lower bound.
    n_fwd = ref["fwd_max"]
    n_bwd = n_ops - int(round(ref["fwd_mean"]))
    rows.append((dict(
        name=f"fixed-count train step: {n_fwd} fwd + {n_bwd} bwd map applications and the "
             "work outside the loops, no stopping tests (jit)", stop="fixed", **EMPTY),
        fixed_count_step(params, x, y, n_fwd, n_bwd)))
    # Every exact-gradient row must compute the same gradient (to the tolerances): its
    # relative difference from the default row's gradient of W.
    g0 = rows[0][0]["grad_W"]
    for row, _ in rows:
        g = row.pop("grad_W", None)
        row["grad_rel_diff"] = None if g is None else \
            float(np.linalg.norm(g - g0) / np.linalg.norm(g0))
    timed = [i for i, (_, call) in enumerate(rows) if call is not None]
    times = dict(zip(timed, interleaved([rows[i][1] for i in timed], repeats)))
    out = [{**row, "ms": times.get(i)} for i, (row, _) in enumerate(rows)]
    for row, call in torch_rows:
        g = row.pop("grad_W")
        row["grad_rel_diff"] = float(np.linalg.norm(g - g0) / np.linalg.norm(g0))
        # Timed on its own: torch's worker threads keep spinning after a call and would
        # slow whichever row ran next in an interleaved round.
        out.insert(-2, {**row, "ms": timeit(call, repeats)})
    return out


def main_rounds(rounds, repeats, include_peers):
    """`main_section` in `rounds` separate processes; each row's time is the median of
    the processes' minima (single runs on the shared machines vary by +-15 %), and its
    ratio to the floor the median of the per-process ratios."""
    import subprocess
    import tempfile

    per = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "main.json")
            argv = [sys.executable, __file__, "--section", "main", "--repeats",
                    str(repeats), "--json", path] + ([] if include_peers else ["--quick"])
            subprocess.run(argv, check=True)
            with open(path) as f:
                per.append(json.load(f)["main"])
            print(f"[round {r + 1}/{rounds} done]", file=sys.stderr, flush=True)
    out = []
    for i, row in enumerate(per[0]):
        ms = [p[i]["ms"] for p in per]
        floor = [next(x["ms"] for x in p if x["name"].startswith("floor")) for p in per]
        if row["ms"] is None:
            out.append({**row, "ms_rounds": None, "vs_floor": None})
            continue
        out.append({**row, "ms": float(np.median(ms)), "ms_rounds": ms,
                    "vs_floor": float(np.median([m / f for m, f in zip(ms, floor)]))})
    return out


EMPTY = dict(fwd_mean=None, fwd_max=None, bwd_mean=None, mem=None, mem_kind="", loss=None)
PEERS = ("hand-written JAX", "optimistix", "jaxopt", "TorchDEQ")


def hard_section(hidden, repeats):
    params, x, y = make_problem(hidden, w_norm=0.99, x_scale=0.01, symmetric=True)
    rows = []
    adj = ik.ImplicitAdjoint(ik.Anderson(m=5, rtol=RTOL, atol=0.0), max_steps=500)
    for name, solver in [
        ("Picard", ik.Picard(rtol=RTOL, atol=0.0)),
        ("Anderson(m=5)", ik.Anderson(m=5, rtol=RTOL, atol=0.0)),
        ("Broyden(m=30)", ik.Broyden(m=30, rtol=RTOL, atol=0.0)),
    ]:
        rows.append(run_jax_row(f"implicit_kit {name}", ik_solve(solver, adj, 2000),
                                params, x, y, repeats, "per sample"))
    return rows


def scaling_section(sizes, repeats):
    rows = []
    for h in sizes:
        params, x, y = make_problem(h)
        adj = ik.ImplicitAdjoint(ik.Picard(rtol=RTOL, atol=0.0), max_steps=MAX_STEPS)
        r, call = prepare_jax_row(
            "implicit_kit", ik_solve(ik.Anderson(m=5, rtol=RTOL, atol=0.0), adj),
            params, x, y, "")
        n_ops = int(round(r["fwd_mean"] + (r["bwd_mean"] or 0)))
        times = interleaved([call, floor_call(h, n_ops)], repeats)
        torch_ms = {}
        for c in ("anderson", "picard"):  # timed on their own (see main_section)
            t = torchdeq_row(params, x, y, c)
            torch_ms[c] = timeit(t[1], repeats) if t else None
        rows.append(dict(hidden=h, ik_ms=times[0], floor_ms=times[1],
                         torchdeq_ms=torch_ms["anderson"],
                         torchdeq_picard_ms=torch_ms["picard"], fwd=r["fwd_mean"],
                         bwd=r["bwd_mean"]))
    return rows


def memory_section():
    params, x, y = make_problem(256)
    x = x[:32]
    out = []
    for steps in (10, 200):
        for name, adj in [
            ("ImplicitAdjoint", ik.ImplicitAdjoint(ik.Picard(rtol=RTOL, atol=0.0))),
            ("UnrolledAdjoint(checkpoints=max_steps)",
             ik.UnrolledAdjoint(checkpoints=steps)),
            ("UnrolledAdjoint() (log checkpoints)", ik.UnrolledAdjoint()),
        ]:
            solver = ik.Picard(rtol=0.0, atol=0.0)  # exactly `steps` forward steps

            def loss(params, steps=steps, adj=adj, solver=solver):
                def one(inj):
                    return ik.fixed_point(cell, jnp.zeros(256), (params["W"], inj),
                                          solver, adjoint=adj, max_steps=steps,
                                          throw=False).value

                return jnp.sum(jax.vmap(one)(injection(params, x)) ** 2)

            compiled = jax.jit(jax.grad(loss)).lower(params).compile()
            m = compiled.memory_analysis()
            out.append(dict(adjoint=name, forward_steps=steps,
                            temp_bytes=m.temp_size_in_bytes))
    return out


def with_floor_ratio(rows):
    floor = next(r["ms"] for r in rows if r["name"].startswith("floor"))
    return [{**r, "vs_floor": None if r["ms"] is None else r["ms"] / floor} for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="main table only, few repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the main table in this many separate processes and report "
                        "each row's median")
    p.add_argument("--section", choices=["main"], default=None,
                   help="run one section only (used by --rounds)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    repeats = a.repeats or (5 if a.quick else 20)
    if a.section == "main":
        with open(a.json, "w") as f:
            json.dump({"main": main_section(256, repeats, not a.quick)}, f, default=str)
        return
    command = "python benchmarks/deq_train_step.py " + " ".join(sys.argv[1:])
    if a.rounds > 1:
        results = {"main": main_rounds(a.rounds, repeats, not a.quick), "rounds": a.rounds}
    else:
        results = {"main": with_floor_ratio(main_section(256, repeats, not a.quick))}
    results["stop_cost"] = stop_cost(256, repeats)
    if not a.quick:
        results["hard"] = hard_section(256, max(3, repeats // 4))
        results["scaling"] = scaling_section([128, 256, 512, 1024], max(3, repeats // 2))
        results["memory"] = memory_section()
    print(f"Command: `{command}`\n\n" + deq_tables(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
