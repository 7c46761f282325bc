"""The optimiser of a config and the jit-compiled train and eval steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from .._misc import keep_if, tree_allfinite
from .._parallel import shard_batch
from .._solution import backward_probe, backward_stats
from ..models import init_loss, ModelStats
from ._config import Config, ConfigError, OptimConfig


def make_optimiser(o: OptimConfig, total_steps: int, params=None
                   ) -> optax.GradientTransformation:
    """The config's `optim` section as an optax optimiser over `total_steps` steps; with
    `optim.separate`, the parameters of that part of `params` (the model's floating
    arrays) get their own optimiser, stepped every `separate_every` steps."""
    main = _optimiser(o, total_steps)
    if not o.separate:
        return main
    labels = group_labels(params, o.separate)
    lr = o.separate_lr
    if o.separate_schedule == "cosine":
        lr = optax.cosine_decay_schedule(
            o.separate_lr, max(-(-total_steps // o.separate_every), 1), alpha=o.final_lr_factor)
    # applied on steps 0, k, 2k, ... from that step's gradient (not accumulated: the
    # HomoODE authors step their start point so), a zero update in between
    group = optax.conditionally_mask(getattr(optax, o.separate_optimiser)(learning_rate=lr),
                                     lambda count: count % o.separate_every == 0)
    # labels as a function: a model's label tree is itself a callable Module, which
    # `multi_transform` would otherwise call on the parameters
    return optax.multi_transform({"main": main, "group": group}, lambda _: labels)


def group_labels(params, path: str):
    """`"group"` on the leaves of `params` under the dotted attribute `path`, `"main"`
    elsewhere (raises `ConfigError` naming `optim.separate` if the path does not exist)."""
    def where(tree):
        for name in path.split("."):
            tree = getattr(tree, name)
        return tree

    labels = jax.tree_util.tree_map(lambda _: "main", params)
    try:
        sub = where(labels)
    except AttributeError as err:
        raise ConfigError(f"key 'optim.separate': the model has no part {path!r} ({err}).") \
            from None
    if not jax.tree_util.tree_leaves(sub):
        raise ConfigError(f"key 'optim.separate': the model's {path!r} has no trainable "
                          "arrays (for HomoODE's start point use model.init: learned).")
    return eqx.tree_at(where, labels, jax.tree_util.tree_map(lambda _: "group", sub))


def _optimiser(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    total = max(total_steps, 1)
    if o.schedule == "constant":
        lr = o.lr
    elif o.schedule == "cosine":
        lr = optax.cosine_decay_schedule(o.lr, total, alpha=o.final_lr_factor)
    else:
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, total,
                                                end_value=o.lr * o.final_lr_factor)
    parts = []
    if o.clip > 0:
        parts.append(optax.clip_by_global_norm(o.clip))
    if o.weight_decay > 0:
        parts.append(optax.add_decayed_weights(o.weight_decay))
    parts.append(getattr(optax, o.name)(learning_rate=lr))
    return optax.chain(*parts)


def loss_terms(cfg: Config) -> list:
    """The terms the config adds to the task loss, chosen once from the config (outside
    `jit`): each `term(model, stats, xb, key)` returns a scalar read off the typed
    fields of the batch's `ModelStats`."""
    reg = cfg.regularizers
    terms = []
    # a model's own loss term, wherever the model has one (MonotoneDBM: the imputation)
    terms.append(lambda model, st, xb, key: 0.0 if st.aux_loss is None
                 else jnp.mean(st.aux_loss))
    if cfg.model.learned_start and reg.init_loss > 0:
        terms.append(lambda model, st, xb, key: reg.init_loss * init_loss(st.z0, st.z_end))
    if reg.error_penalty > 0:
        terms.append(lambda model, st, xb, key: reg.error_penalty
                     * jnp.mean(st.error_penalty))
    if reg.jacobian > 0:
        def jacobian(model, st, xb, key):
            keys = jr.split(key, xb.shape[0])
            return reg.jacobian * jnp.mean(jax.vmap(
                lambda x, z, k: model.jacobian_frobenius(x, z, key=k))(xb, st.z_end, keys))
        terms.append(jacobian)
    return terms


def _contract_metrics(st: ModelStats) -> dict:
    """Per-sample metrics read off the stats contract (no branching on the model kind):
    forward steps, NFE, residual (NaN for the ODE models), failures."""
    return {
        "num_steps": st.num_steps.astype(jnp.float32),
        "nfe": st.nfe.astype(jnp.float32),
        "residual": st.residual.astype(jnp.float32),
        "failure_rate": st.failed().astype(jnp.float32),
    }


class Steps:
    """The jitted train and eval steps for one config (traces counted)."""

    def __init__(self, cfg: Config, static, optimiser, mesh=None):
        self.cfg, self.static, self.optimiser = cfg, static, optimiser
        self.terms = loss_terms(cfg)
        self.traces = {"train": 0, "eval": 0}
        self.train = jax.jit(self._train, donate_argnums=(0, 1))
        self.eval = jax.jit(self._eval)
        # `train.parallel`: with `shard_map` (`auto` on several devices) each device runs
        # the model on its own samples.
        per_device = cfg.train.parallel == "shard_map" or (
            cfg.train.parallel == "auto" and mesh is not None and mesh.devices.size > 1)
        self.mesh = mesh if per_device else None

    def _apply(self, params, probe, xb, keys):
        """The model on every sample of the batch: `(logits, stats)`, per sample. With a
        `probe` (training) the backward statistics flow into its cotangent; without,
        the model runs in inference mode, with the evaluation solver settings."""

        def batch(params, probe, xb, keys):
            if probe is None:  # the config's `model.eval_*` settings (`with_solver`)
                model = self.cfg.model.eval_model(eqx.combine(params, self.static))
                return jax.vmap(lambda x, k: model(x, key=k, inference=True,
                                                   return_stats=True))(xb, keys)
            model = eqx.combine(params, self.static)
            return jax.vmap(lambda x, k: model(x, key=k, return_stats=True,
                                               probe=probe))(xb, keys)

        if self.mesh is not None:  # the probe's cotangent is summed over the devices
            batch = shard_batch(batch, (None, None, 0, 0), mesh=self.mesh)
        return batch(params, probe, xb, keys)

    def _loss(self, params, probe, xb, yb, key):
        model = eqx.combine(params, self.static)
        keys = jr.split(key, xb.shape[0] + 1)
        logits, st = self._apply(params, probe, xb, keys[1:])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        total = loss
        for term in self.terms:
            total = total + term(model, st, xb, keys[0])
        metrics = {
            "loss": loss,
            "acc": jnp.mean(jnp.argmax(logits, -1) == yb),
            **{k: jnp.mean(v) for k, v in _contract_metrics(st).items()},
            **{k: jnp.mean(v) for k, v in st.metrics.items()},
        }
        return total, metrics

    def _train(self, params, opt_state, xb, yb, key, step):
        self.traces["train"] += 1  # runs only while tracing
        key = jr.fold_in(key, step)
        # Every model takes the probe; one without an implicit backward solve (a Neural
        # ODE, an inexact adjoint) leaves it untouched: its backward metrics are NaN.
        probe = backward_probe(xb.dtype)
        grad_fn = jax.value_and_grad(self._loss, argnums=(0, 1), has_aux=True)
        (_, metrics), (grads, probe_grad) = grad_fn(params, probe, xb, yb, key)
        bwd = backward_stats(probe_grad)
        none = jnp.all(probe_grad == 0)
        metrics["bwd_steps"] = jnp.where(none, jnp.nan, bwd.num_steps / xb.shape[0])
        metrics["bwd_failure_rate"] = jnp.where(none, jnp.nan,
                                                bwd.num_failed / xb.shape[0])
        # A step whose gradient is not finite (a forward solve that went non-finite or
        # diverged, whose gradient is NaN; a failed backward solve; a NaN in the loss)
        # is never applied: `train.on_nonfinite` skips it (counted) or has the loop
        # raise. A step with an unconverged but finite forward solve follows
        # `train.on_unconverged` (apply, skip, raise). (Not `optax.apply_if_finite`: it
        # tests the updates, not the gradient, applies non-finite updates after
        # `max_consecutive_errors`, and cannot skip the unconverged steps; one gate,
        # `keep_if`, serves both policies.)
        finite = tree_allfinite(grads)
        unconverged = finite & (metrics["failure_rate"] > 0)
        apply = finite
        if self.cfg.train.on_unconverged != "apply":
            apply = apply & jnp.invert(unconverged)
        grads = jax.tree_util.tree_map(lambda g: jnp.where(apply, g, 0), grads)
        updates, new_state = self.optimiser.update(grads, opt_state, params)
        new_params = eqx.apply_updates(params, updates)
        metrics["skipped_steps"] = 1.0 - apply.astype(jnp.float32)
        metrics["nonfinite_steps"] = 1.0 - finite.astype(jnp.float32)
        metrics["unconverged_steps"] = unconverged.astype(jnp.float32)
        new_params, new_state = keep_if(apply, (new_params, new_state),
                                        (params, opt_state))
        return new_params, new_state, metrics

    def _eval(self, params, xb, yb, mask, index):
        """Masked sums of the metrics of one eval batch; `index`: the samples' positions
        in the test split, from which each sample's key is derived (a model that draws
        at evaluation, as MonotoneDBM's observed pixels, sees the same draw in every
        evaluation, whatever the batching)."""
        self.traces["eval"] += 1
        keys = jax.vmap(lambda i: jr.fold_in(jr.key(0), i))(index)
        logits, st = self._apply(params, None, xb, keys)
        w = mask.astype(logits.dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        sums = {
            "loss": jnp.sum(w * ce),
            "acc": jnp.sum(w * (jnp.argmax(logits, -1) == yb)),
            **{k: jnp.sum(w * v) for k, v in _contract_metrics(st).items()},
            **{k: jnp.sum(w * v) for k, v in st.metrics.items()},
        }
        return sums
