"""The call contract of implicit_kit's models."""

import abc
import dataclasses
import inspect

import equinox as eqx

from .._iterate import check_max_steps
from ..solvers._base import check_number


# The keyword arguments every model takes, with their defaults.
CALL_KEYWORDS = {"key": None, "inference": False, "return_stats": False, "probe": None}


class AbstractImplicitModel(eqx.Module):
    """The base of implicit_kit's models: how every model is called, so that a training
    loop, a benchmark or a notebook calls any of them the same way.

    `model(x, *, key=None, inference=False, return_stats=False, probe=None)`, on one
    sample (a batch is `jax.vmap`; a model given a batch says so):

    - `key`: the randomness of the call (dropout masks, drawn once per solve; the
      observed pixels of `MonotoneDBM`), needed when the model has any, unless
      `inference`;
    - `inference`: no dropout;
    - `return_stats`: return `(output, stats)`, `stats` a
      [`implicit_kit.models.ModelStats`][] (failures of the solve are reported in
      `stats.result`: the solves inside a model run with `throw=False`);
    - `probe`: an `ik.backward_probe()`, whose cotangent receives the statistics of the
      implicit backward solve (see [`implicit_kit.backward_stats`][]).

    A model may take more keyword arguments (`NeuralODE`'s `ts`, `t0`, `t1`, `args`).
    A subclass's `__call__` must take these four with these defaults: checked when the
    class is defined.

    Every model's solver settings can be changed after training, every parameter kept:
    [`implicit_kit.models.AbstractImplicitModel.with_solver`][].
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls.__call__, "__isabstractmethod__", False):
            return
        params = inspect.signature(cls.__call__).parameters
        wrong = [f"{name}={default!r}" for name, default in CALL_KEYWORDS.items()
                 if name not in params or params[name].kind is not inspect.Parameter.KEYWORD_ONLY
                 or params[name].default != default]
        if wrong:
            raise TypeError(
                f"{cls.__name__}.__call__ must take the keyword-only arguments "
                f"{', '.join(wrong)} (the model call contract, `AbstractImplicitModel`)."
            )

    @abc.abstractmethod
    def __call__(self, x, *, key=None, inference=False, return_stats=False, probe=None):
        """The model on one sample `x`: the output, or `(output, stats)`."""

    def with_solver(self, **settings) -> "AbstractImplicitModel":
        """A copy of this model with other solver settings and every array the same
        object (trained weights and learned start points kept bit for bit): to
        evaluate a trained model with more steps, another tolerance or another solver
        (TorchDEQ's `eval_f_max_iter` / `eval_f_thres`).

        Every model takes `rtol`, `atol` and `max_steps`. The fixed-point models
        (`DEQ`, `MonotoneDEQ`, `MonotoneDBM`, `HopfieldLayer`) also take `solver`,
        `adjoint` and `throw` (`rtol`/`atol` set the tolerances of the model's solver,
        or of the `solver` given with them); the ODE models (`NeuralODE`,
        `AugmentedNeuralODE`, `HomoODE`, `CNF`) take any field of their
        [`implicit_kit.models.ODESolve`][] (`solver`, `stepsize_controller`, `dt0`,
        `adjoint`, ...); an `ImageClassifier` passes them to its block.

        ```python
        deq_eval = deq.with_solver(max_steps=80, rtol=1e-5)
        ```
        """
        raise TypeError(f"{type(self).__name__} has no solver settings.")


FIXED_POINT_SETTINGS = ("solver", "adjoint", "max_steps", "throw", "rtol", "atol")


def replace_fields(module: eqx.Module, **changes) -> eqx.Module:
    """A copy of `module` with the dataclass fields `changes` replaced (static ones
    included) and every other field the same object; `__init__` is not run (a model's
    `__init__` builds parameters, which must be kept)."""
    names = [f.name for f in dataclasses.fields(module)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise TypeError(f"{type(module).__name__} has no field(s) {unknown}.")
    new = object.__new__(type(module))
    for name in names:
        object.__setattr__(new, name, changes.get(name, getattr(module, name)))
    return new


def with_tolerances(solver, rtol=None, atol=None, *, owner: str):
    """`solver` with its `rtol`/`atol` replaced (those given), and those of the solvers
    it wraps or iterates with (a `solver` field, as `BestSoFar` or a splitting's; a
    `solvers` tuple, as `Fallback`'s, whose solvers each stop by their own test)."""
    changes = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
    if not changes:
        return solver
    for name, value in changes.items():
        check_number(f"{owner}.with_solver({name}=...)", value, low=0.0, allow_inf=True)
    fields = {f.name for f in dataclasses.fields(solver)} if dataclasses.is_dataclass(
        solver) else set()
    inner = {}
    if "solver" in fields and solver.solver is not None:
        inner["solver"] = with_tolerances(solver.solver, rtol, atol, owner=owner)
    if "solvers" in fields:
        inner["solvers"] = tuple(with_tolerances(s, rtol, atol, owner=owner)
                                 for s in solver.solvers)
    if not set(changes) <= fields and not inner:
        raise TypeError(
            f"{owner}.with_solver: the solver {type(solver).__name__} has no `rtol`/`atol` "
            "to set; pass `solver=` a solver built with the tolerances wanted."
        )
    return replace_fields(solver, **{k: v for k, v in changes.items() if k in fields},
                          **inner)


def with_fixed_point_settings(model, settings: dict):
    """`with_solver` of a model with the fields `solver`, `adjoint`, `max_steps` and
    `throw`."""
    name = type(model).__name__
    unknown = sorted(set(settings) - set(FIXED_POINT_SETTINGS))
    if unknown:
        raise TypeError(f"{name}.with_solver takes {FIXED_POINT_SETTINGS}, got {unknown}.")
    settings = dict(settings)
    rtol, atol = settings.pop("rtol", None), settings.pop("atol", None)
    if "max_steps" in settings:
        check_max_steps(settings["max_steps"])
    if "throw" in settings and not isinstance(settings["throw"], bool):
        raise TypeError(f"`throw` must be a bool, got {settings['throw']!r}.")
    solver = settings.get("solver", model.solver)
    if solver is None and (rtol is not None or atol is not None):
        raise TypeError(f"{name}.with_solver: `rtol`/`atol` need a solver; pass `solver=`.")
    if solver is not None:
        settings["solver"] = with_tolerances(solver, rtol, atol, owner=name)
    return replace_fields(model, **settings)


def with_ode_settings(model, settings: dict):
    """`with_solver` of an ODE model: the fields of its `ode` (an `ODESolve`) replaced
    (`dataclasses.replace`: its checks run)."""
    fields = [f.name for f in dataclasses.fields(model.ode)]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise TypeError(f"{type(model).__name__}.with_solver takes the fields of its "
                        f"ODESolve {tuple(fields)}, got {unknown}.")
    if "max_steps" in settings:
        check_max_steps(settings["max_steps"])
    for name in ("rtol", "atol"):
        if name in settings:
            check_number(f"{type(model).__name__}.with_solver({name}=...)", settings[name],
                         low=0.0, allow_inf=True)
    return replace_fields(model, ode=dataclasses.replace(model.ode, **settings))
