"""The call contract of implicit_kit's models."""

import abc
import inspect

import equinox as eqx


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
