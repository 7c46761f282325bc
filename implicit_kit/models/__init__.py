"""Implicit models (all `eqx.Module`, called on one sample; `jax.vmap` over a batch)."""

from ._classifier import Head as Head, ImageClassifier as ImageClassifier, Stem as Stem
from ._deq import DEQ as DEQ
from ._init import init_loss as init_loss
from ._mondeq import MonotoneDEQ as MonotoneDEQ
from ._ode import (
    alternating_start as alternating_start,
    AugmentedNeuralODE as AugmentedNeuralODE,
    HomoODE as HomoODE,
    NeuralODE as NeuralODE,
    ODESolve as ODESolve,
)
