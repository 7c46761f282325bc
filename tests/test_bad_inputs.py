"""Bad input gets an error that names the argument and what was expected; the train
loop's edges (eval padding, skipped non-finite steps) behave as documented."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import implicit_kit as ik
from implicit_kit.train import config_from_dict, ConfigError, load_config
from implicit_kit.train._data import pad_eval
from implicit_kit.train._loop import _setup, evaluate

from .helpers import PROBLEMS


P = PROBLEMS[3]
PICARD = ik.Picard(rtol=1e-8, atol=1e-9)


def test_negative_save_iterates():
    with pytest.raises(ValueError, match=r"`save_iterates` must list step numbers >= 0"):
        ik.fixed_point(P.fn, P.y0, P.args, PICARD, save_iterates=(1, -2))


def test_trace_needs_an_integer_max_steps():
    with pytest.raises(ValueError, match=r"`trace=True` needs an integer `max_steps`"):
        ik.fixed_point(P.fn, P.y0, P.args, PICARD, trace=True, max_steps=None)


def test_unrolled_adjoint_names_what_it_cannot_unroll():
    # The forward protocol's `not_unrollable` / `max_steps`, checked by `UnrolledAdjoint`.
    unrolled = ik.UnrolledAdjoint()
    with pytest.raises(ValueError, match=r"`UnrolledAdjoint` needs an integer `max_steps`"):
        ik.fixed_point(P.fn, P.y0, P.args, PICARD, adjoint=unrolled, max_steps=None)
    cube_root = ik.custom_root(lambda y, a: y**3 - a, adjoint=unrolled)(
        lambda y0, a: jnp.cbrt(a))
    with pytest.raises(ValueError, match=r"cannot unroll a given solution"):
        cube_root(jnp.ones(2), jnp.array([8.0, 27.0]))
    import optimistix as optx
    with pytest.raises(ValueError, match=r"cannot unroll an optimistix minimiser"):
        ik.minimise(lambda y, a: jnp.sum((y - a) ** 2), jnp.zeros(2), jnp.ones(2),
                    optx.BFGS(rtol=1e-6, atol=1e-6), adjoint=unrolled)


def test_fallback_needs_two_solvers_and_a_positive_limit():
    with pytest.raises(ValueError, match=r"`Fallback\(...\)` needs at least two solvers, got 1"):
        ik.Fallback(PICARD)
    with pytest.raises(ValueError, match=r"`Fallback\(max_steps=...\)` must be >= 1, got 0"):
        ik.Fallback(PICARD, ik.Anderson(), max_steps=0)


@pytest.mark.parametrize("probe", [jnp.zeros(2), jnp.zeros((3, 1)), jnp.zeros(3, int)],
                         ids=["short", "2d", "int"])
def test_wrong_probe(probe):
    with pytest.raises(ValueError, match=r"`probe` must be a float array of shape \(3,\)"):
        ik.fixed_point(P.fn, P.y0, P.args, PICARD, probe=probe)


def test_homoode_bad_field_and_init():
    cell = ik.nn.MLPCell(4, 3, key=jr.key(0))
    with pytest.raises(ValueError, match=r"`field` must be 'learned' or 'exact', got 'exakt'"):
        ik.models.HomoODE(cell, (4,), field="exakt")
    with pytest.raises(ValueError, match=r"`init` must be one of .*'zeros'.*got 'ones'"):
        ik.models.HomoODE(cell, (4,), init="ones")
    with pytest.raises(ValueError, match=r"`init` must be one of .*got 'ones'"):
        ik.models.DEQ(cell, (4,), PICARD, init="ones")


@pytest.mark.parametrize("where", ["y0", "args"])
def test_nonfinite_input_is_named(where):
    y0 = P.y0.at[0].set(jnp.nan) if where == "y0" else P.y0
    W, U, b, x = P.args
    args = (W, U, b, x.at[1].set(jnp.nan)) if where == "args" else P.args
    sol = ik.fixed_point(P.fn, y0, args, PICARD, throw=False)
    assert sol.result == getattr(ik.RESULTS, f"nonfinite_{where}")
    with pytest.raises(Exception, match=f"`{where}` contain"):
        jax.block_until_ready(ik.fixed_point(P.fn, y0, args, PICARD).value)
    # Per sample under vmap: the finite sample is solved, the other named.
    xs = jnp.stack([x, x.at[0].set(jnp.nan)])
    sols = jax.vmap(lambda xi: ik.fixed_point(P.fn, P.y0, (W, U, b, xi), PICARD,
                                              throw=False))(xs)
    assert (sols.result == ik.RESULTS.successful).tolist() == [True, False]
    assert (sols.result == ik.RESULTS.nonfinite_args).tolist() == [False, True]
    np.testing.assert_allclose(sols.value[0], P.exact(P.args), rtol=1e-7)



def test_an_unused_non_finite_argument_is_not_an_error():
    # A -inf attention-style mask: the map never computes with the -inf itself.
    W, U, b, x = P.args
    fn = lambda z, a: jnp.where(a[1] > -1, P.fn(z, a[0]), 0.0)
    masks = [jnp.where(jnp.arange(8) < 6, 0.0, v) for v in (-jnp.inf, -2.0)]
    sol, ref = (ik.fixed_point(fn, P.y0, (P.args, m), PICARD) for m in masks)
    assert sol.result == ik.RESULTS.successful
    np.testing.assert_array_equal(sol.value, ref.value)


def test_config_yaml_syntax_error_and_nonpositive_values(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel:\n  kind: deq\n   hidden: [8\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)
    good = {"name": "x", "model": {"kind": "deq"}}
    for override, message in (("train.epochs=0", r"'train\.epochs' must be positive, got 0"),
                              ("train.batch=-4", r"'train\.batch' must be positive, got -4"),
                              ("optim.lr=0.0", r"'optim\.lr' must be positive, got 0\.0"),
                              ("optim.lr=-1e-3", r"'optim\.lr' must be positive")):
        with pytest.raises(ConfigError, match=message):
            ik.train.check_config(config_from_dict(good, [override]))
    dbm = {"name": "x", "model": {"kind": "mondbm", "monotone_m": 0.01},
           "data": {"normalise": False}}
    for raw, overrides, message in (
        (dbm, ["data.normalise=true"], r"'data\.normalise' must be false for model\.kind "
                                       "'mondbm'"),
        (good, ["data.normalise=false"], r"'data\.normalise' must be false for model\.kind "
                                         "'mondbm' .* true for the other kinds"),
        (dbm, ["model.monotone_m=1.0"], r"'model\.monotone_m' must be in \(0, 1\)"),
        ({"name": "x", "model": {"kind": "mondeq"}}, ["model.monotone_m=0.0"],
         r"'model\.monotone_m' must be > 0 for kind 'mondeq'"),
        (dbm, ["model.group=3"], r"'model\.group' \(3\) must divide 'model\.hidden'"),
        (dbm, ["model.alpha=0.0"], r"'model\.alpha' must be in \(0, 1\]"),
        (dbm, ["model.observed=1.0"], r"'model\.observed' must be in \[0, 1\)"),
        (good, ["model.detach_start=false"], r"unknown key 'model\.detach_start' for kind "
                                             "'deq'"),
        ({"name": "x", "model": {"kind": "homoode"}}, ["model.detach_start=false"],
         r"'model\.detach_start' false .* init 'alternating'"),
    ):
        with pytest.raises(ConfigError, match=message):
            ik.train.check_config(config_from_dict(raw, overrides))
    ik.train.check_config(config_from_dict(dbm))  # the valid one passes
    # the layers themselves refuse a margin that is not strong monotonicity's
    for make, name in ((lambda m: ik.nn.MonotoneLinear(4, 3, m, key=jax.random.key(0)),
                        "MonotoneLinear"),
                       (lambda m: ik.nn.MonotoneConv(2, 1, (4, 4), m, key=jax.random.key(0)),
                        "MonotoneConv")):
        for m in (0.0, -1.0):
            with pytest.raises(ValueError, match=rf"`{name}\(m=\.\.\.\)` must be a finite "
                                                 r"number in \(0, inf\)"):
                make(m)


def test_pad_eval_masks_the_padding():
    x = np.arange(10.0)[:, None]
    y = np.arange(10)
    xp, yp, mask = pad_eval(x, y, 4)
    assert xp.shape == (12, 1) and mask.tolist() == [True] * 10 + [False] * 2
    np.testing.assert_array_equal(xp[:10], x)
    np.testing.assert_array_equal(yp[10:], [y[0], y[0]])
    xp, _, mask = pad_eval(x, y, 5)  # a multiple: no padding
    assert xp.shape == (10, 1) and mask.all()


def _small_cfg(tmp_path, **train):
    return config_from_dict({
        "name": "edge", "model": {"kind": "deq", "hidden": 8, "final": 16,
                                  "adjoint": "phantom", "max_steps": 8, "residual": False},
        "train": {"epochs": 1, "batch": 32, "eval_batch": 64, "progress": False,
                  "checkpoint_dir": str(tmp_path / "edge"), **train}})


def test_evaluate_pads_without_counting_the_padding(tmp_path):
    cfg = _small_cfg(tmp_path)
    s = _setup(cfg, None)
    x, y = s.test
    n = 100  # not a multiple of the eval batch (64): 28 padded samples
    test = (x[:n], y[:n])
    shard = lambda a: a
    padded = evaluate(s.steps, s.params, test, 64, shard)
    # Reference: one unpadded batch of exactly the n samples.
    ones = np.ones(n, bool)
    sums = s.steps.eval(s.params, jnp.asarray(test[0]), jnp.asarray(test[1]), ones,
                        jnp.arange(len(ones)))
    for k in ("loss", "acc", "num_steps", "nfe"):
        np.testing.assert_allclose(padded[f"test_{k}"], float(sums[k]) / n, rtol=1e-5)
    # A wrong mask would count the padding (repeats of the first sample) in the mean.
    assert padded["test_acc"] == pytest.approx(float(sums["acc"]) / n)


def test_a_non_finite_gradient_skips_the_step(tmp_path):
    cfg = _small_cfg(tmp_path)
    s = _setup(cfg, None)
    x, y = (jnp.asarray(a[:32]) for a in s.train)
    opt_state = s.optimiser.init(s.params)
    params = jax.tree_util.tree_map(jnp.copy, s.params)
    new, _, m = s.steps.train(params, opt_state, x, y, jr.key(0), 0)
    assert float(m["skipped_steps"]) == 0.0
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(new),
                                                         jax.tree_util.tree_leaves(s.params))]
    assert any(changed)
    # A NaN in one input makes the loss and the gradient NaN: the step is not applied.
    bad = x.at[3].set(jnp.nan)
    params = jax.tree_util.tree_map(jnp.copy, s.params)
    opt_state = s.optimiser.init(params)
    new, new_state, m = s.steps.train(params, opt_state, bad, y, jr.key(0), 0)
    assert float(m["skipped_steps"]) == 1.0
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(s.params)):
        np.testing.assert_array_equal(a, b)
    ref_state = s.optimiser.init(s.params)
    for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(ref_state)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ shapes at model entry
def _models():
    k = jr.key(0)
    deq = ik.models.DEQ(ik.nn.MLPCell(8, 5, key=k), (8,))
    mon = ik.models.MonotoneDEQ.conv(4, 2, (6, 6), key=k)
    mon_dense = ik.models.MonotoneDEQ.dense(8, 5, key=k)
    block = ik.models.DEQ(ik.nn.ConvCell(16, key=k), (16, 4, 4))
    clf = ik.models.ImageClassifier.build(block, in_channels=1, classes=3, hidden=16,
                                          final=8, groups=4, key=k)
    node = ik.models.NeuralODE(ik.nn.MLPField(4, 8, key=k))
    return {"deq": deq, "mondeq": mon, "mondeq_dense": mon_dense, "classifier": clf,
            "node": node}


@pytest.mark.parametrize("name, x, match", [
    # the messages were `dot_general requires contracting dimensions...`,
    # `Size of label 'h' for operand 1 (4) does not match...` and ``Input to `Conv`
    # needs to have rank 3``: none said what to do
    ("deq", jnp.ones((3, 5)), r"`DEQ`: its cell failed on the state of shape \(8,\) and "
     r"the input of shape \(3, 5\) \(.*\)\. If the input is a batch: models are called "
     r"on one sample; for a batch, use `jax.vmap\(model\)\(xs\)`"),
    ("mondeq", jnp.ones((2, 4, 4)), r"`MonotoneDEQ` expects one input of shape "
     r"\(2, 6, 6\), got \(2, 4, 4\): models are called on one sample"),
    ("mondeq", jnp.ones((7, 2, 6, 6)), r"got \(7, 2, 6, 6\) \(a batch of 7\?\)"),
    ("mondeq_dense", jnp.ones((5, 5)), r"expects one input of shape \(5,\), got "
     r"\(5, 5\) \(a batch of 5\?\)"),
    ("classifier", jnp.ones((2, 1, 8, 8)), r"`ImageClassifier` expects one input of "
     r"shape \(1, \*, \*\), got \(2, 1, 8, 8\) \(a batch of 2\?\): models are called"),
    ("node", jnp.ones((3, 4)), r"`NeuralODE`: its field .*state of shape \(3, 4\).*"
     r"use `jax.vmap\(model\)\(xs\)`"),
])
def test_shape_errors_at_model_entry_say_models_take_one_sample(name, x, match):
    model = _models()[name]
    with pytest.raises(ValueError, match=match):
        model(x)
    # and the same model, vmapped over that batch where it is one, runs
    if name in ("mondeq", "mondeq_dense", "classifier") and "batch" in match:
        out = jax.vmap(model)(x)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape[0] == x.shape[0]
