"""Implicit models (all `eqx.Module`, called on one sample; `jax.vmap` over a batch)."""

from ._deq import DEQ as DEQ
from ._init import init_loss as init_loss
from ._mondeq import MonotoneDEQ as MonotoneDEQ
