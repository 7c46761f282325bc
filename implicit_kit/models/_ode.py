"""Neural ODE models on diffrax: NeuralODE, AugmentedNeuralODE and HomoODE."""

from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .._adjoint import ReversibleAdjoint
from .._solution import as_results
from ..homotopy import FixedPointHomotopy, homotopy_solve
from ..nn import prepare
from ..regularizers import ErrorEstimatePenalty, local_error_penalty
from ._base import AbstractImplicitModel, with_ode_settings
from ._reversible_ode import ode_nfe, reversible_solve, UReversible
from ._shapes import check_cell, from_leaves, is_shape, leaf_shapes, state_shape_of
from ._stats import ModelStats, no_residual


_DISCRETE = (dfx.RecursiveCheckpointAdjoint, dfx.DirectAdjoint)


def call_field(field, t, z, args):
    """The one rule for the vector field of every ODE model: a diffrax term is evaluated
    as diffrax does (`field.vf(t, z, args)`, time-dependent); any other callable is
    autonomous, `field(z, args)`."""
    if isinstance(field, dfx.AbstractTerm):
        return field.vf(t, z, args)
    return field(z, args)


def _vf(t, z, args):
    # One function object for every call (the field travels in `args`): a model called
    # outside `jit` compiles its `diffeqsolve` once, not once per call.
    return call_field(args[0], t, z, args[1])


class ODESolve(eqx.Module):
    """How an ODE model integrates (shared by every ODE model).

    **Arguments:**

    - `solver`: a diffrax solver (default `Dopri5()`, the HomoODE authors').
    - `rtol`, `atol`: of the default `PIDController` (1e-3 as the authors), and the
        scale of the error penalties.
    - `stepsize_controller`: overrides the PID controller (e.g.
        `dfx.ConstantStepSize()` with `dt0` for a fixed step).
    - `adjoint`: `dfx.RecursiveCheckpointAdjoint()` (default: exact backprop through
        the solver, checkpointed), `dfx.BacksolveAdjoint()` (continuous adjoint, O(1)
        memory, approximate to the ODE tolerance), `dfx.DirectAdjoint()`, or
        `ik.ReversibleAdjoint()` with `solver=ik.models.UReversible(base)` (exact
        gradient of the computed steps, by running them backwards: memory that does not
        grow with the steps).
    - `dt0`, `max_steps`: as diffrax.
    - `error_penalty`: accumulate the "Opening the Blackbox" regulariser (needs a
        discrete adjoint); `local_penalty`: compute the local one at a sampled time
        (any adjoint; needs a `key`). Returned in the stats.
    """

    solver: dfx.AbstractSolver = eqx.field(default_factory=dfx.Dopri5)
    rtol: float = 1e-3
    atol: float = 1e-3
    stepsize_controller: dfx.AbstractStepSizeController | None = None
    adjoint: dfx.AbstractAdjoint | ReversibleAdjoint = eqx.field(
        default_factory=dfx.RecursiveCheckpointAdjoint)
    dt0: float | None = None
    max_steps: int = eqx.field(static=True, default=4096)
    error_penalty: bool = eqx.field(static=True, default=False)
    local_penalty: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if isinstance(self.adjoint, ReversibleAdjoint):
            if not isinstance(self.solver, UReversible):
                raise ValueError(
                    "`ODESolve(adjoint=ik.ReversibleAdjoint())` runs the steps of a "
                    "reversible solver backwards: pass `solver=ik.models.UReversible("
                    f"dfx.Tsit5())` (or another explicit base); got "
                    f"{type(self.solver).__name__}.")
            if self.error_penalty or self.local_penalty:
                raise ValueError("`ODESolve(adjoint=ik.ReversibleAdjoint())` does not "
                                 "take `error_penalty` or `local_penalty`.")
            if self.adjoint.anchor_every != "auto":
                raise ValueError("`ReversibleAdjoint(anchor_every=...)` is for fixed-point "
                                 "solves; an ODE's reversal has no anchors.")
        if self.error_penalty and not isinstance(self.adjoint, _DISCRETE):
            raise ValueError(
                "`error_penalty=True` needs a discrete adjoint "
                "(dfx.RecursiveCheckpointAdjoint or dfx.DirectAdjoint): with "
                f"{type(self.adjoint).__name__} its gradient would be silently zero. Use "
                "`local_penalty=True` instead, which works with any adjoint."
            )

    def __call__(self, field, z0, condition, t1, key, *, t0=0.0, ts=None):
        """Integrate the field from `z0` at `t0` to `t1`. Returns `(z(t1), stats)`, or
        with `ts` (times in `[t0, t1]`, increasing) `(z(ts), stats)`: every leaf of the
        state with a leading time axis, as diffrax's `SaveAt(ts=ts)`. `stats` is a
        [`implicit_kit.models.ModelStats`][] (`residual` NaN) with the penalties in its
        extras.

        **The one rule for fields.** A diffrax term (`dfx.ODETerm(f)`, `f(t, y, args)`:
        time-dependent, diffrax's convention) is integrated as it is, with `condition`
        as its `args`; any other callable `g` is the autonomous shorthand
        `dfx.ODETerm(lambda t, z, args: g(z, args))` (the classifier blocks' cells,
        `g(z, condition)`)."""
        # The field travels in `args` (not closed over): BacksolveAdjoint differentiates
        # only with respect to `y0`, `args` and the terms.

        # Times in the state's dtype (float64 times would promote a float32 state).
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(z0))
        t0 = jnp.asarray(t0, dtype)
        t1 = jnp.asarray(t1, dtype)
        solver = self.solver
        if self.error_penalty:
            solver = ErrorEstimatePenalty(self.solver, self.rtol, self.atol)
        if ts is not None:
            ts = jnp.asarray(ts, dtype)
            if ts.ndim != 1 or ts.shape[0] == 0:
                raise ValueError(f"`ts` must be a non-empty 1-D array of times, got shape "
                                 f"{ts.shape}.")
        main = dfx.SubSaveAt(t1=ts is None, ts=ts)
        if self.local_penalty:
            if key is None:
                raise ValueError("`local_penalty=True` needs a `key` to sample the time.")
            t_s = jr.uniform(key, (), minval=t0, maxval=t1).astype(dtype)
            saveat = dfx.SaveAt(subs=[main, dfx.SubSaveAt(ts=t_s[None])],
                                solver_state=self.error_penalty)
        else:
            saveat = dfx.SaveAt(subs=main, solver_state=self.error_penalty)
        controller = self.stepsize_controller
        if controller is None:
            controller = dfx.PIDController(rtol=self.rtol, atol=self.atol)
        if isinstance(self.adjoint, ReversibleAdjoint):
            out, num_steps, result = reversible_solve(
                _vf, solver, t0, t1, self.dt0, z0, (field, condition), ts=ts,
                controller=controller, max_steps=self.max_steps)
            num_steps = lax.stop_gradient(num_steps)
            return out, ModelStats(num_steps, ode_nfe(solver, num_steps),
                                   no_residual(out), result)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_vf), solver, t0, t1, self.dt0, z0, (field, condition),
            saveat=saveat, stepsize_controller=controller,
            adjoint=self.adjoint, max_steps=self.max_steps, throw=False,
        )
        ys = sol.ys[0] if self.local_penalty else sol.ys
        # Every leaf of `ys` has a leading time axis (of a pytree state, `ys[-1]` would
        # be its last leaf, silently).
        out = ys if ts is not None else jax.tree_util.tree_map(lambda y: y[-1], ys)
        num_steps = lax.stop_gradient(sol.stats["num_steps"])
        penalties = {}
        if self.error_penalty:
            penalties["error_penalty"] = sol.solver_state[1]
        if self.local_penalty:
            penalties["local_error_penalty"] = local_error_penalty(
                _vf, self.solver, t_s, jax.tree_util.tree_map(lambda y: y[0], sol.ys[1]),
                (field, condition), rtol=self.rtol,
                atol=self.atol, t_end=t1, dt=self.dt0,
            )
        # diffrax's outcome promoted (max_steps_reached stays max_steps_reached).
        stats = ModelStats(num_steps, ode_nfe(self.solver, num_steps), no_residual(out),
                           as_results(sol.result), **penalties)
        return out, stats


class NeuralODE(AbstractImplicitModel):
    r"""A Neural ODE $dz/dt = g(t, z)$ from $z(t_0)$ = the input; returns $z(t_1)$, or
    the trajectory $z(t)$ at the times `ts`.

    **Arguments:**

    - `field`: the vector field, under the one rule of
        [`implicit_kit.models.ODESolve`][]: a diffrax term, `dfx.ODETerm(f)` with
        `f(t, y, args)` (time-dependent, diffrax's convention: trajectory models), or a
        module called `field(z, args)` (autonomous: the classifier blocks, e.g.
        `ik.nn.MLPField(...)`, `ik.nn.ConvCell(..., residual=False, inject=False)`).
    - `ode`: an [`implicit_kit.models.ODESolve`][] (solver, tolerances, adjoint:
        `dfx.RecursiveCheckpointAdjoint()` (default, exact backprop through the solver)
        or `dfx.BacksolveAdjoint()` (continuous adjoint), penalties).
    - `t0`, `t1`: the default interval (0 and 1).

    Called on one sample (`jax.vmap` over a batch of initial states):
    `model(z0, ts=None, *, t0=None, t1=None, args=None, key=..., return_stats=False)`.
    The state `z0` may be any pytree of arrays; the output has its structure. With
    `ts` (increasing times), every leaf gets a leading time axis, as diffrax's
    `SaveAt(ts=ts)`. The interval is `t0`/`t1` if given in the call, else the span of
    `ts` (`ts[0]`, `ts[-1]`), else the model's. `args` is passed to the field (`None`
    by default). With `return_stats=True`: `(out, stats)`, a
    [`implicit_kit.models.ModelStats`][] of this trajectory (`num_steps`, `nfe`:
    vector-field evaluations; `residual`: NaN).
    """

    field: Any
    ode: ODESolve = eqx.field(default_factory=ODESolve)
    t1: float = 1.0
    t0: float = 0.0

    def with_solver(self, **settings):
        """A copy with other `ode` settings (any field of its `ODESolve`), every array
        kept: see [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        return with_ode_settings(self, settings)

    def __call__(self, z0, ts: Array | None = None, *, t0=None, t1=None, args=None,
                 key: PRNGKeyArray | None = None, inference: bool = False,
                 return_stats: bool = False, probe: Array | None = None):
        """`probe` is accepted as by every model and unused: a Neural ODE has no implicit
        backward solve (its `ik.backward_stats` stay zero)."""
        del probe
        if t0 is None:
            t0 = self.t0 if ts is None else ts[0]
        if t1 is None:
            t1 = self.t1 if ts is None else ts[-1]
        kd, kp = (None, None) if key is None else jr.split(key)
        field = prepare(self.field, key=kd, inference=inference)
        check_cell("NeuralODE", "field", lambda z, a: call_field(field, t0, z, a), z0, args)
        out, stats = self.ode(field, z0, args, t1, kp, t0=t0, ts=ts)
        return (out, stats) if return_stats else out


def _augment(x, augment: int):
    def one(leaf):
        if jnp.ndim(leaf) == 0:
            raise ValueError("`AugmentedNeuralODE` appends zeros along the first axis of "
                             "each leaf of the state; got a scalar leaf.")
        zeros = jnp.zeros((augment,) + jnp.shape(leaf)[1:], jnp.result_type(leaf))
        return jnp.concatenate([leaf, zeros], axis=0)
    return jax.tree_util.tree_map(one, x)


class AugmentedNeuralODE(AbstractImplicitModel):
    r"""ANODE (Dupont, Doucet & Teh, 2019): the state is the input with `augment`
    zeros appended along the first axis (extra entries of a vector, extra channels of a
    `(C, H, W)` map; of every leaf of a pytree input); returns the whole final state
    (input and augmented parts, with the input's structure).

    **Arguments:** `field` (on the augmented state, under the rule of
    [`implicit_kit.models.NeuralODE`][]), `augment`, `ode`, `t1`, `t0`.
    """

    field: Any
    augment: int = eqx.field(static=True)
    ode: ODESolve = eqx.field(default_factory=ODESolve)
    t1: float = 1.0
    t0: float = 0.0

    def with_solver(self, **settings):
        """A copy with other `ode` settings (any field of its `ODESolve`), every array
        kept: see [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        return with_ode_settings(self, settings)

    def __call__(self, x, ts: Array | None = None, *, t0=None, t1=None, args=None,
                 key: PRNGKeyArray | None = None, inference: bool = False,
                 return_stats: bool = False, probe: Array | None = None):
        """As [`implicit_kit.models.NeuralODE`][] on the augmented input (the same
        keywords)."""
        node = NeuralODE(self.field, self.ode, self.t1, self.t0)
        return node(_augment(x, self.augment), ts, t0=t0, t1=t1, args=args, key=key,
                    inference=inference, return_stats=return_stats, probe=probe)


HOMOODE_INITS = ("alternating", "zeros", "learned", "conditioned")


def alternating_start(shape: tuple[int, ...], dtype=None) -> Array:
    """The HomoODE authors' default start: +1, with channels (first axis) 0, 2, 4, ...
    set to -1."""
    # (numpy: a constant, built without eager XLA compilations at trace time)
    sign = np.where(np.arange(shape[0]) % 2 == 0, -1.0, 1.0)
    out = np.broadcast_to(sign.reshape((-1,) + (1,) * (len(shape) - 1)), shape)
    return jnp.asarray(out) if dtype is None else jnp.asarray(out, dtype)


def _module_map(z, args):  # one function object: compiled once outside `jit`
    module, x = args
    return module(z, x)


def _check_exact_ode(ode: ODESolve) -> None:
    adjoint = ode.adjoint
    if not (type(adjoint) is dfx.RecursiveCheckpointAdjoint
            and adjoint.checkpoints is None):
        raise ValueError(
            "HomoODE(field='exact') differentiates by the implicit function "
            "theorem at the end point; `ode.adjoint` "
            f"({type(adjoint).__name__}) would be ignored: leave it unset."
        )
    if ode.error_penalty or ode.local_penalty:
        raise ValueError(
            "HomoODE(field='exact') does not support `ode.error_penalty` / "
            "`ode.local_penalty` (its path is a homotopy, not the model's ODE)."
        )


class HomoODE(AbstractImplicitModel):
    r"""HomoODE (Ding, Cui, Wang & Shi, NeurIPS 2023): an equilibrium found by a
    homotopy-continuation ODE from a start point $z_0$ that does not depend on the input,
    with the input $x$ as the condition injected at every evaluation.

    - `field="learned"` (the paper): $dz/d\lambda = g_\theta(z, x)$, $\lambda\in[0, 1]$,
      $g$ learned (e.g. `ik.nn.ConvCell(C, residual=False, dropout=0.1)`, the authors'
      Conv-GN-ReLU-(+x)-Conv-dropout-GN field); output $z(1)$.
    - `field="exact"`: the true fixed-point homotopy of the DEQ cell $f$ = `cell`,
      $dz/d\lambda = (I - \lambda J_f)^{-1}(f(z, x) - z_0)$, integrated by
      `ik.homotopy_solve` (gradients by the implicit function theorem at the end point).

    Initial (start) points, `init=` as for [`implicit_kit.models.DEQ`][]:
    `"alternating"` (the authors' default, ∓1 over channels), `"zeros"`, or `"learned"`:
    one shared learnable point, per channel and constant over space for `(C, H, W)`
    states (the authors' GN(Conv1×1(ones))), detached in the solve and trained only by
    [`implicit_kit.models.init_loss`] to the detached end points — with its own
    optimiser, every few steps (`HomoODE.init_params` selects it); or `"conditioned"`:
    a start point predicted from the condition, $z_0 = h_\phi(x)$ by the module
    `init_net` (a learned initialiser, Bai, Koltun & Kolter, "Neural Deep Equilibrium
    Solvers", ICLR 2022), detached and trained by `init_loss` alike.
    `detach_start=False` lets the task loss train the start point too, through the solve
    (for `"conditioned"`, also the stem through `init_net`'s input); `init_loss` may
    still be added. The default `True` is the authors' (the start point is a target of
    `init_loss` only).

    **Arguments:** `module` (the learned field, or the DEQ cell for `"exact"`),
    `state_shape`, `field`, `init`, `ode` (default dopri5 at rtol = atol = 1e-3),
    `init_net` (`init="conditioned"` only: maps `x` to a point of `state_shape`),
    `detach_start` (only with a trained start, `"learned"` or `"conditioned"`). With
    `field="exact"` the ODE's `solver`, tolerances (or `stepsize_controller`), `dt0` and
    `max_steps` drive the homotopy path; its `adjoint` and penalties do not apply
    (gradients come from the implicit function theorem at the end point) and are refused.
    """

    module: Any
    z0: Array | None
    init_net: Any
    ode: ODESolve
    state_shape: tuple[int, ...] = eqx.field(static=True)
    field: str = eqx.field(static=True)
    init: str = eqx.field(static=True)
    detach_start: bool = eqx.field(static=True)

    def __init__(self, module, state_shape, *, field: str = "learned",
                 init: str = "alternating", ode: ODESolve | None = None,
                 init_net: Any = None, detach_start: bool = True):
        if field not in ("learned", "exact"):
            raise ValueError(f"`field` must be 'learned' or 'exact', got {field!r}.")
        if init not in HOMOODE_INITS:
            raise ValueError(f"`init` must be one of {HOMOODE_INITS}, got {init!r}.")
        if (init == "conditioned") != (init_net is not None):
            raise ValueError("`init_net` (a module mapping the condition x to a start "
                             "point) is required with init='conditioned' and only then; "
                             f"got init={init!r}, init_net={type(init_net).__name__}.")
        if not detach_start and init not in ("learned", "conditioned"):
            raise ValueError("`detach_start=False` needs a trained start point "
                             f"(init='learned' or 'conditioned'), got init={init!r}.")
        ode = ODESolve() if ode is None else ode
        if field == "exact":
            _check_exact_ode(ode)
        self.module = module
        self.state_shape = state_shape_of(state_shape, "HomoODE")
        self.field = field
        self.init = init
        self.ode = ode
        self.init_net = init_net
        self.detach_start = detach_start
        if init == "learned":
            def point(shape):
                base = alternating_start(shape)
                return base[(slice(None),) + (slice(0, 1),) * (len(shape) - 1)]
            self.z0 = from_leaves(self.state_shape,
                                   [point(s) for s in leaf_shapes(self.state_shape)])
        else:
            self.z0 = None

    def initial_point(self, dtype=None, x: Array | None = None) -> Array:
        """The start point $z_0$ (with its gradient, for `init_loss`); `x`, the
        condition, is needed by `init="conditioned"`."""
        if self.init == "conditioned":
            if x is None:
                raise ValueError("init='conditioned' predicts the start point from the "
                                 "condition: pass `x`.")
            # Detached, init_loss trains init_net alone; else the stem trains through it.
            z0 = self.init_net(lax.stop_gradient(x) if self.detach_start else x)
            got = [jnp.shape(leaf) for leaf in jtu.tree_leaves(z0)]
            if got != [tuple(s) for s in leaf_shapes(self.state_shape)] or (
                    not is_shape(self.state_shape) and not isinstance(z0, tuple)):
                raise ValueError(f"`init_net` must return the state shape "
                                 f"{self.state_shape}, got {jtu.tree_map(jnp.shape, z0)}.")
            return z0 if dtype is None else jtu.tree_map(lambda z: z.astype(dtype), z0)
        shapes = leaf_shapes(self.state_shape)
        if self.init == "alternating":
            leaves = [alternating_start(s, dtype) for s in shapes]
        elif self.init == "zeros":
            leaves = [jnp.zeros(s, dtype) for s in shapes]
        else:
            learned = [self.z0] if is_shape(self.state_shape) else list(self.z0)
            leaves = [jnp.broadcast_to(z, s) for z, s in zip(learned, shapes)]
            if dtype is not None:
                leaves = [z.astype(dtype) for z in leaves]
        return from_leaves(self.state_shape, leaves)

    @staticmethod
    def init_params(model) -> Any:
        """A filter spec selecting the learned start point, or the conditioned start's
        `init_net` (for its own optimiser)."""
        spec = jtu.tree_map(lambda _: False, model)
        if model.init_net is not None:
            return eqx.tree_at(lambda m: m.init_net, spec,
                               jtu.tree_map(lambda _: True, model.init_net))
        return eqx.tree_at(lambda m: m.z0, spec, True, is_leaf=lambda x: x is None)

    def with_solver(self, **settings):
        """A copy with other `ode` settings (any field of its `ODESolve`: for
        `field="exact"`, those that drive the homotopy path), every array kept: see
        [`implicit_kit.models.AbstractImplicitModel.with_solver`][]."""
        new = with_ode_settings(self, settings)
        if self.field == "exact":
            _check_exact_ode(new.ode)
        return new

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None,
                 inference: bool = False, return_stats: bool = False,
                 probe: Array | None = None):
        """The end point for input `x` (and its `ModelStats` with `return_stats=True`).
        `probe` reads the implicit backward solve of `field="exact"` (the learned field
        has none)."""
        kd, kp = (None, None) if key is None else jr.split(key)
        module = prepare(self.module, key=kd, inference=inference)
        z0 = self.initial_point(x.dtype, x)
        z0_solve = lax.stop_gradient(z0) if self.detach_start else z0
        if self.field == "learned":
            z1, stats = self.ode(module, z0_solve, x, 1.0, kp)
        else:
            ode = self.ode
            controller = ode.stepsize_controller
            if controller is None:
                controller = dfx.PIDController(rtol=ode.rtol, atol=ode.atol)
            sol = homotopy_solve(
                _module_map, z0_solve, (module, x), FixedPointHomotopy(),
                ode_solver=ode.solver, stepsize_controller=controller, dt0=ode.dt0,
                # (the end point is not held to a tolerance: the largest finite one)
                max_steps=ode.max_steps, rtol=float(jnp.finfo(x.dtype).max), throw=False,
                probe=probe,
            )
            z1 = sol.value
            stats = ModelStats.from_solution(sol)
        if not return_stats:
            return z1
        return z1, stats.replace(z0=z0)
