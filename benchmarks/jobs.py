"""The benchmark jobs that `benchmarks/report.py` runs: each one command, whose raw
results are stored in `benchmarks/results/<device>/<job>.json`."""

import dataclasses


@dataclasses.dataclass
class Job:
    """One benchmark run. `argv` is passed to the Python interpreter; `{json}` is the
    results file and `{tmp}` a scratch directory. `produces` names a file the command
    writes in `{tmp}` that is copied to the results file (the CLI commands); `keeps`,
    files it writes in `{tmp}` that are copied beside it as `<job>.<suffix>` (figures)."""

    argv: list
    produces: str | None = None
    keeps: tuple = ()


TUNE = ["-m", "implicit_kit", "tune", "configs/digits_tune_wd.yaml",
        "tune.out_dir={tmp}/tune"]
JOBS = {
    "deq": Job(["benchmarks/deq_train_step.py", "--rounds", "5", "--repeats", "20", "--json",
                "{json}"]),
    "node": Job(["benchmarks/node_train_step.py", "--repeats", "20", "--json", "{json}"]),
    "compile_time": Job(["benchmarks/compile_time.py", "--rounds", "3", "--json", "{json}"]),
    "node_timeseries": Job(["benchmarks/node_timeseries.py", "--rounds", "200", "--json",
                            "{json}"]),
    "cnf": Job(["benchmarks/cnf.py", "--rounds", "6", "--train", "600", "--figure",
                "{out_dir}/cnf.png", "--json", "{json}"]),
    "lorenz": Job(["-m", "implicit_kit", "forecast", "configs/lorenz63_forecast.yaml",
                   "forecast.out_dir={tmp}/fc"], produces="fc/results.json",
                  keeps=("fc/forecast.png",)),
    "demo": Job(["-m", "implicit_kit", "demo", "--out", "{tmp}/demo"],
                produces="demo/table.json"),
    "homoode_seeds": Job(["benchmarks/digits_seeds.py", "configs/digits_homoode.yaml",
                          "configs/digits_homoode_learned.yaml", "--seeds", "0,1,2",
                          "--set", "train.epochs=20", "--out", "{tmp}/seeds",
                          "--json", "{json}"]),
    "node_errpen": Job(["benchmarks/digits_seeds.py", "configs/digits_node.yaml",
                        "configs/digits_node_errpen.yaml", "--seeds", "0,1,2",
                        "--out", "{tmp}/seeds", "--json", "{json}"]),
    "mnist_sample": Job(["benchmarks/digits_seeds.py"] + [
        f"configs/mnist_sample_{m}.yaml" for m in ("node", "anode", "deq", "mondeq", "homoode")]
        + ["--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json", "{json}"]),
    "torchdeq_recipe": Job(["benchmarks/torchdeq_recipe.py", "--epochs", "10", "--seeds",
                            "0,1,2", "--json", "{json}"]),
    "deq_multiscale": Job(["benchmarks/digits_seeds.py", "configs/digits_deq.yaml",
                           "configs/digits_deq_multiscale.yaml", "--seeds", "0,1,2",
                           "--out", "{tmp}/seeds", "--json", "{json}"]),
    "homoode_accel": Job(["benchmarks/digits_seeds.py"] + [
        f"configs/digits_{c}.yaml" for c in (
            "homoode", "homoode_authors", "homoode_errpen", "homoode_conditioned",
            "homoode_bosh3")]
        + ["--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json", "{json}"]),
    "homoode_accel_more": Job(["benchmarks/digits_seeds.py"] + [
        f"configs/digits_{c}.yaml" for c in (
            "homoode_bosh3_errpen", "node_bosh3_errpen", "homoode_conditioned_task",
            "homoode_conditioned_both")]
        + ["--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json", "{json}"]),
    "homoode_accel_seeds": Job(["benchmarks/digits_seeds.py", "configs/digits_node.yaml",
                                "configs/digits_homoode_bosh3_errpen.yaml", "--seeds",
                                "0,1,2,3,4,5,6,7,8,9", "--out", "{tmp}/seeds", "--json",
                                "{json}"]),
    **{f"homoode_accel_mnist_{c}": Job([
        "benchmarks/digits_seeds.py", f"configs/mnist_sample_homoode_{c}.yaml", "--seeds",
        "0,1,2", "--out", "{tmp}/seeds", "--json", "{json}"])
       for c in ("conditioned", "errpen", "authors")},
    "start_drift": Job(["benchmarks/homoode_start_drift.py"] + [
        f"configs/digits_homoode{c}.yaml" for c in (
            "", "_learned", "_conditioned", "_conditioned_task", "_conditioned_both",
            "_bosh3_errpen")]
        + ["--out", "{tmp}/drift", "--json", "{json}"]),
    # The combined arm, each beside its Neural ODE rerun in the same job.
    **{f"homoode_accel_combo{s}": Job([
        "benchmarks/digits_seeds.py", f"configs/{d}_node.yaml",
        f"configs/{d}_homoode_conditioned_task_bosh3_errpen.yaml", "--seeds", seeds,
        "--out", "{tmp}/seeds", "--json", "{json}"])
       for s, d, seeds in (("", "digits", "0,1,2"), ("_mnist", "mnist_sample", "0,1,2"),
                           ("_seeds", "digits", "0,1,2,3,4,5,6,7,8,9"))},
    "start_drift_combo": Job(["benchmarks/homoode_start_drift.py",
                              "configs/digits_homoode_conditioned_task_bosh3_errpen.yaml",
                              "--out", "{tmp}/drift", "--json", "{json}"]),
    "homoode_accel_mnist": Job(["benchmarks/digits_seeds.py"] + [
        f"configs/mnist_sample_{c}.yaml" for c in (
            "homoode_bosh3", "homoode_bosh3_errpen", "node_bosh3_errpen")]
        + ["--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json", "{json}"]),
    "homotopy_start": Job(["benchmarks/digits_implicit.py", "--arms", "", "--exact",
                           "--out", "{json}"]),
    "hyper_vmap": Job(["benchmarks/hyper_vmap.py", "--ks", "4,16,64", "--steps", "1000",
                       "--batch", "64", "--repeats", "3", "--json", "{json}"]),
    "hyper_vmap_full": Job(["benchmarks/hyper_vmap.py", "--ks", "4,16,64", "--steps",
                            "100", "--batch", "0", "--repeats", "3", "--json", "{json}"]),
    "halpern": Job(["benchmarks/halpern_steps.py", "--json", "{json}"]),
    "vr_halpern": Job(["benchmarks/vr_halpern.py", "--json", "{json}"]),
    "check_every": Job(["benchmarks/check_every.py", "--rounds", "9", "--json", "{json}"]),
    "sparse_coding": Job(["benchmarks/sparse_coding.py", "--rounds", "7", "--json", "{json}"]),
    "svm_hyper": Job(["benchmarks/svm_hyper.py", "--rounds", "5", "--json", "{json}"]),
    "distillation": Job(["benchmarks/distillation.py", "--steps", "300", "--png",
                         "{out_dir}/distillation.png", "--json", "{json}"]),
    "parallel": Job(["benchmarks/parallel_step.py", "--devices", "4", "--rounds", "7",
                     "--json", "{json}"]),
    "mondbm": Job(["benchmarks/mondbm_digits.py", "--seeds", "0,1,2", "--out",
                   "{tmp}/mondbm", "--json", "{json}"]),
    "stn": Job(["-m", "implicit_kit", "stn", "configs/digits_stn.yaml",
                "stn.out_dir={tmp}/stn"], produces="stn/results.json", keeps=("stn/stn.png",)),
    "reversible": Job(["benchmarks/reversible.py", "--json", "{json}"]),
    "qp": Job(["benchmarks/qp.py", "--rounds", "3", "--json", "{json}"]),
    "jaxopt_migration": Job(["benchmarks/jaxopt_migration.py", "--rounds", "15", "--json",
                             "{json}"]),
    "qp_layer": Job(["benchmarks/qp_layer.py", "--steps", "3000", "--seeds", "0,1,2",
                     "--json", "{json}"]),
    # The paper's comparison at our scale: the same DEQ with the implicit gradient (on the
    # same training samples: the validation split held out) and as a Reversible DEQ, its
    # beta chosen on the validation split.
    "deq_reversible_base": Job([
        "benchmarks/digits_seeds.py", "configs/digits_deq.yaml", "--set",
        "data.val_size=287", "--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json", "{json}"]),
    "deq_reversible": Job([
        "benchmarks/digits_seeds.py", "configs/digits_deq_reversible.yaml", "--select",
        "model.beta=0.5,0.8", "--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json",
        "{json}"]),
    "deq_reversible_mnist_base": Job([
        "benchmarks/digits_seeds.py", "configs/mnist_sample_deq.yaml", "--set",
        "data.val_size=800", "--set", "model.adjoint=implicit", "--seeds", "0,1,2",
        "--out", "{tmp}/seeds", "--json", "{json}"]),
    # (beta as chosen on the digits' validation split: nothing is chosen on the MNIST
    # sample, whose reversible runs cost 5x the implicit ones here)
    "deq_reversible_mnist": Job([
        "benchmarks/digits_seeds.py", "configs/mnist_sample_deq_reversible.yaml",
        "--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json", "{json}"]),
    # The error-penalty weight of the HomoODE acceleration arms chosen again, on the
    # validation split (it was picked on one seed's test accuracy), with the Neural ODE
    # on the same training samples.
    "homoode_validated_node": Job([
        "benchmarks/digits_seeds.py", "configs/digits_node.yaml", "--set",
        "data.val_size=287", "--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json",
        "{json}"]),
    "homoode_validated": Job([
        "benchmarks/digits_seeds.py", "configs/digits_homoode_bosh3_errpen.yaml",
        "configs/digits_homoode_conditioned_task_bosh3_errpen.yaml", "--set",
        "data.val_size=287", "--select", "regularizers.error_penalty=1,0.3,0.1,0.03,0.01",
        "--seeds", "0,1,2", "--out", "{tmp}/seeds", "--json", "{json}"]),
    "tune_param": Job(TUNE + ["tune.per=parameter"], produces="tune/results.json"),
    "tune_tensor": Job(TUNE + ["tune.per=tensor"], produces="tune/results.json"),
    "tune_shared": Job(TUNE + ["tune.per=shared"], produces="tune/results.json"),
    "tune_cg": Job(TUNE + ["tune.per=parameter", "tune.method=cg"],
                   produces="tune/results.json"),
}

