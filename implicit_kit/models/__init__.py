"""Implicit models (all `eqx.Module`, called on one sample; `jax.vmap` over a batch)."""

from ._base import AbstractImplicitModel as AbstractImplicitModel
from ._classifier import (
    group_count as group_count,
    Head as Head,
    ImageClassifier as ImageClassifier,
    Stem as Stem,
)
from ._cnf import CNF as CNF, CNF_TRACES as CNF_TRACES
from ._deq import DEQ as DEQ, DEQ_INITS as DEQ_INITS
from ._hopfield import HopfieldLayer as HopfieldLayer
from ._mondbm import focal_loss as focal_loss, MonotoneDBM as MonotoneDBM
from ._mondeq import (
    ForwardBackward as ForwardBackward,
    MonotoneDEQ as MonotoneDEQ,
    PeacemanRachford as PeacemanRachford,
)
from ._ode import (
    alternating_start as alternating_start,
    AugmentedNeuralODE as AugmentedNeuralODE,
    HomoODE as HomoODE,
    HOMOODE_INITS as HOMOODE_INITS,
    NeuralODE as NeuralODE,
    ODESolve as ODESolve,
)
from ._reversible_ode import UReversible as UReversible
from ._start_loss import init_loss as init_loss
from ._stats import ModelStats as ModelStats
