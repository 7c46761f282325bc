import gc

import jax
import pytest


# Gradients are checked in float64 throughout (finite differences need the digits).
jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Free each module's compiled executables once the module is done.

    Every XLA:CPU executable holds memory mappings until it is freed, and the
    jit caches keep them alive. The whole suite compiles thousands of functions:
    without this the process passes Linux's `vm.max_map_count` (65530) and XLA
    segfaults inside a later compilation (seen at ~63,600 mappings).
    """
    yield
    jax.clear_caches()
    gc.collect()
