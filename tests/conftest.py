import gc
import os
import pathlib

import jax
import pytest


# Gradients are checked in float64 throughout (finite differences need the digits).
jax.config.update("jax_enable_x64", True)

# JAX's persistent compilation cache: compilation dominates the suite's time. A rerun of
# the fast tier finds most executables on disk (test_adjoints + test_contract: 144 s
# without the cache, 129 s with a cold one, 97 s warm). Set IMPLICIT_KIT_TEST_JAX_CACHE
# to another directory, or to an empty string to turn it off.
_CACHE = os.environ.get("IMPLICIT_KIT_TEST_JAX_CACHE",
                        str(pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"))
if _CACHE:
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # The same for the processes the tests start (CLI runs, multi-process training,
    # notebook kernels): they compile the same train steps again and again.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


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


# The fast tier (`-m "not slow"`) keeps one representative case of these parametrized
# tests (by test name: the case ids kept); the whole suite runs every case. The cases
# left out differ only in a dependency's adjoint (diffrax's), a half-precision dtype or
# a second failing adjoint, each of which another fast case already covers.
FAST_CASES = {
    "test_homoode_keeps_a_tuple_state_whole_with_exact_gradients": {"learned-checkpoint"},
    "test_a_pytree_state_is_returned_whole_with_exact_gradients": {"checkpoint"},
    "test_an_augmented_ode_keeps_a_pytree_state_whole": {"direct"},
    "test_a_trajectory_of_a_time_dependent_field_matches_diffrax": {"checkpoint"},
    "test_vmap_one_failing_sample_among_good_ones": {"implicit"},
    "test_half_precision_gradients_match_float32": {"implicit-f16", "unrolled-bf16"},
    "test_half_precision_solvers_with_linear_algebra": {"bf16"},
}


def pytest_collection_modifyitems(config, items):
    ids = {}
    for item in items:
        name = getattr(item, "originalname", None)
        keep = FAST_CASES.get(name)
        if keep is None:
            continue
        ids.setdefault(name, set()).add(item.callspec.id)
        if item.callspec.id not in keep:
            item.add_marker(pytest.mark.slow)
    for name, seen in ids.items():  # a renamed case would leave the fast tier silently
        if len(seen) > 1 and not FAST_CASES[name] <= seen:
            raise pytest.UsageError(f"FAST_CASES[{name!r}] keeps "
                                    f"{sorted(FAST_CASES[name] - seen)}, which are not "
                                    f"among its cases {sorted(seen)}")
