import gc
import os
import pathlib
import subprocess
import sys

import pytest


# XLA:CPU's fusion emitters (its default code generator) compile slowly for the many
# small programs of a test suite: with the older emitters the fast tier took 251 s
# instead of 316 s (CPU time 463 s instead of 592 s, 2 cores, cold compilation cache,
# 2026-12-07), and an epoch of the digits DEQ ran 5-20% slower. The suite is about
# compile time, so it uses them; a library user keeps XLA's default. The flag is tried
# once in a child process (an XLA that does not know it would abort) and handed to every
# process the tests start through IMPLICIT_KIT_TEST_XLA_FLAGS (`helpers.xla_flags`).
_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if "IMPLICIT_KIT_TEST_XLA_FLAGS" not in os.environ:
    _probe = subprocess.run(
        [sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": _COMPILE_FLAGS, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True)
    os.environ["IMPLICIT_KIT_TEST_XLA_FLAGS"] = _COMPILE_FLAGS if _probe.returncode == 0 else ""
if os.environ["IMPLICIT_KIT_TEST_XLA_FLAGS"] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                     os.environ["IMPLICIT_KIT_TEST_XLA_FLAGS"]]))

import jax  # noqa: E402  (after XLA_FLAGS)


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
    "test_vmap_one_failing_sample_among_good_ones": {"implicit"},
    "test_half_precision_gradients_match_float32": {"implicit-f16", "unrolled-bf16"},
    "test_default_backward_is_exact_for_any_invertible_jacobian": {"0.5", "-1.0"},
}

# The heaviest tests of the fast tier (6 s or more each, measured with
# `--durations=0` from a cold compilation cache, 2026-12-07), run by the whole suite
# only, so that the fast tier stays under 5 minutes on 2 cores. Each area keeps a
# lighter representative in the fast tier: the model call contract
# (`test_every_model_follows_the_call_contract`), a pytree ODE state
# (`test_homoode_keeps_a_tuple_state_whole_with_exact_gradients`), half precision
# (`test_half_precision_gradients_match_float32`), the training loop's faults (the lock,
# read-only disks), the optimality layers' closed forms, an ODE model's adjoints (on a
# tuple state), the default backward's GMRES fallback (`-1.0`).
SLOW_TESTS = {
    "test_parallel.py::test_shard_batch_equals_one_device",
    "test_contract.py::test_every_model_returns_the_same_stats_structure",
    "test_contract.py::test_every_entry_point_reports_the_contract",
    "test_contract.py::test_default_adjoint_follows_a_tight_forward_solve",
    "test_contract.py::test_every_solver_inside_optimistix_on_its_own_problems[nn]",
    "test_contract.py::test_custom_root_forward_mode_with_python_scalars",
    "test_docs.py::test_readme_examples_run_and_hold",
    "test_train.py::test_the_config_s_loss_terms_read_the_typed_stats",
    "test_adjoints.py::test_forward_mode",
    "test_adjoints.py::test_minimise_gradient_closed_form",
    "test_ode_models.py::test_every_adjoint_matches_direct_backprop[backsolve-node]",
    "test_ode_models.py::test_direct_backprop_matches_finite_differences_fixed_step[node]",
    "test_ode_models.py::test_a_trajectory_of_a_time_dependent_field_matches_diffrax",
    "test_ode_models.py::test_a_pytree_state_is_returned_whole_with_exact_gradients",
    "test_ode_models.py::test_an_augmented_ode_keeps_a_pytree_state_whole",
    "test_ode_models.py::test_reported_nfe_is_the_number_of_field_calls",
    "test_ode_models.py::test_exact_homoode_on_a_tuple_state_ends_at_the_deq_fixed_point",
    "test_failures.py::test_half_precision_solvers_with_linear_algebra",
    "test_failures.py::test_mixed_dtype_pytree_gradients_match_float32",
    "test_bad_inputs.py::test_a_non_finite_gradient_skips_the_step",
    "test_bad_inputs.py::test_evaluate_pads_without_counting_the_padding",
    "test_faults.py::test_nonfinite_steps_are_skipped_or_raise",
    "test_faults.py::test_sigint_inside_fit_stops_at_the_next_step_with_the_epoch_on_disk",
    "test_faults.py::test_a_disk_that_fills_during_training_keeps_the_log_behind",
    "test_faults.py::test_resume_where_the_run_moved_and_from_the_newest_valid_checkpoint",
    "test_mondbm.py::test_hollow_coupling_is_symmetric_hollow_with_margin_for_any_weights",
    "test_contract.py::test_default_adjoint_uses_the_krylov_fallback_only_where_needed",
    "test_parallel.py::test_the_dependency_patch_is_still_needed",
    "test_ode_models.py::test_every_adjoint_matches_direct_backprop[direct-homoode]",
    "test_optimality.py::test_conditions_vmap_over_hyperparameters",
    "test_solvers.py::test_vr_halpern_implicit_gradient_and_vmap",
    "test_optimality.py::"
    "test_logistic_regression_stationarity_gradient_matches_differences_and_unrolling",
    "test_optimality.py::"
    "test_lasso_gradient_in_the_dictionary_matches_the_closed_form_on_the_support",
}


# `--dist loadfile` hands whole files to the two workers in collection order
# (`--no-loadscope-reorder` in pyproject.toml; xdist's default reorder by number of tests
# put the few-test, heavy files such as the notebooks last, and one worker then ran alone
# for minutes at the end). The heaviest files go first (longest-processing-time-first
# scheduling): worker-seconds of the whole suite by `--durations=0` on 2026-12-07,
# before the emitter flag above and the merged tests made each file lighter.
HEAVY_FIRST = [
    "test_train.py",  # 491 s
    "test_ode_models.py",  # 427 s
    "test_notebooks.py",  # 363 s
    "test_contract.py",  # 192 s
    "test_parallel.py",  # 187 s
    "test_faults.py",  # 142 s
    "test_adjoints.py",  # 136 s
    "test_failures.py",  # 121 s
    "test_references.py",  # 113 s
]
_MISSING = set(HEAVY_FIRST) - {p.name for p in pathlib.Path(__file__).parent.glob("test_*.py")}
if _MISSING:  # a renamed file would lose its place silently
    raise RuntimeError(f"tests/conftest.py HEAVY_FIRST names {sorted(_MISSING)}, which are "
                       "not test files")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
    ids = {}
    found, files = set(), set()
    for item in items:
        path = item.nodeid.split("/")[-1]  # test_x.py::name[case]
        files.add(path.split("::")[0])
        for key in (path, path.split("[")[0]):
            if key in SLOW_TESTS:
                item.add_marker(pytest.mark.slow)
                found.add(key)
        name = getattr(item, "originalname", None)
        keep = FAST_CASES.get(name)
        if keep is None:
            continue
        ids.setdefault(name, set()).add(item.callspec.id)
        if item.callspec.id not in keep:
            item.add_marker(pytest.mark.slow)
    whole_files = not config.getoption("keyword") and not any("::" in a for a in config.args)
    stale = {k for k in SLOW_TESTS - found if k.split("::")[0] in files} if whole_files else ()
    if stale:  # a renamed test would come back to the fast tier silently
        raise pytest.UsageError(f"SLOW_TESTS names {sorted(stale)}, which were not collected")
    for name, seen in ids.items():  # a renamed case would leave the fast tier silently
        if len(seen) > 1 and not FAST_CASES[name] <= seen:
            raise pytest.UsageError(f"FAST_CASES[{name!r}] keeps "
                                    f"{sorted(FAST_CASES[name] - seen)}, which are not "
                                    f"among its cases {sorted(seen)}")
