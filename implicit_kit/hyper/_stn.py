"""Self-Tuning Networks' layers (MacKay, Vicol, Lorraine, Duvenaud & Grosse, ICLR 2019):
a structured best-response approximation w(λ) whose weights depend on the
hyperparameters through per-output scalings."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from .._misc import keep_if


def _stn_output(layer, name, elem_out, hyper_out, hparams, spatial):
    r"""$s\,(\text{elem\_out} + b_e) + (V\lambda) \odot \text{hyper\_out}() +
    (V'\lambda) \odot b_h$ for either layer, the per-output scalings broadcast over the
    `spatial` trailing axes (none for a linear layer, two for a convolution)."""
    expand = (slice(None),) + spatial
    if layer.elem_bias is not None:
        elem_out = elem_out + layer.elem_bias[expand]
    out = layer.elem_scalar * elem_out
    if hparams is None:
        return out
    if hparams.shape != layer.to_scalars.shape[1:]:
        raise ValueError(f"`{name}`: hparams must have shape {layer.to_scalars.shape[1:]}, "
                         f"got {hparams.shape}.")
    scalars = layer.to_scalars @ hparams
    n = out.shape[0]
    out = out + scalars[:n][expand] * hyper_out()
    if layer.hyper_bias is not None:
        out = out + (scalars[n:] * layer.hyper_bias)[expand]
    return out


class StnLinear(eqx.Module):
    r"""A linear layer whose weights are an affine function of the hyperparameters:
    $W(\lambda) = s\,W_\text{elem} + (V\lambda) \odot_\text{row} W_\text{hyper}$ and
    $b(\lambda) = s\,b_\text{elem} + (V'\lambda) \odot b_\text{hyper}$, applied as

    $y = s\,(W_\text{elem}x + b_\text{elem}) + (V\lambda) \odot (W_\text{hyper}x) +
    (V'\lambda) \odot b_\text{hyper}$ — two matrix-vector products, never forming
    $W(\lambda)$. $\odot_\text{row}$ scales row $i$ by $(V\lambda)_i$; `to_scalars`
    $= [V; V']$ and the scalar $s$ (`elem_scalar`) are learned with the weights.
    The hyperparameter input $\lambda$ is per example (`jax.vmap` both arguments): the
    STN algorithm perturbs it per example. Initialisation as the authors' code
    (`cnn/hypermodels/hyperlinear.py`): weights and biases uniform in
    $\pm 1/\sqrt{\text{in}}$, `to_scalars` normal with standard deviation 0.01, $s = 1$.

    **Arguments:** `in_features`, `out_features`, `num_hparams` (the length of the
    hyperparameter input), `use_bias` (default True), `key`.

    **Call:** `layer(x, hparams)` with `x` of shape `(in_features,)` and `hparams` of
    shape `(num_hparams,)` (the hypernetwork's input: transformed hyperparameters);
    `hparams=None` gives the elementary layer alone.
    """

    elem_weight: Float[Array, "out inp"]
    hyper_weight: Float[Array, "out inp"]
    elem_bias: Float[Array, " out"] | None
    hyper_bias: Float[Array, " out"] | None
    to_scalars: Float[Array, "twice_out hparams"]
    elem_scalar: Float[Array, ""]

    def __init__(self, in_features: int, out_features: int, num_hparams: int, *,
                 use_bias: bool = True, key: PRNGKeyArray):
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_hparams", num_hparams)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`StnLinear({name}=...)` must be a positive int, got "
                                 f"{value!r}.")
        k = jr.split(key, 5)
        bound = 1.0 / math.sqrt(in_features)

        def uniform(key, shape):
            return jr.uniform(key, shape, minval=-bound, maxval=bound)

        self.elem_weight = uniform(k[0], (out_features, in_features))
        self.hyper_weight = uniform(k[1], (out_features, in_features))
        self.elem_bias = uniform(k[2], (out_features,)) if use_bias else None
        self.hyper_bias = uniform(k[3], (out_features,)) if use_bias else None
        self.to_scalars = 0.01 * jr.normal(k[4], (2 * out_features, num_hparams))
        self.elem_scalar = jnp.ones(())

    def __call__(self, x: Float[Array, " inp"], hparams: Float[Array, " hparams"] | None
                 ) -> Float[Array, " out"]:
        if x.shape != self.elem_weight.shape[1:]:
            raise ValueError(f"`StnLinear`: x must have shape {self.elem_weight.shape[1:]}, "
                             f"got {x.shape} (vmap over a batch).")
        return _stn_output(self, "StnLinear", self.elem_weight @ x,
                           lambda: self.hyper_weight @ x, hparams, ())

    def weights(self, hparams: Float[Array, " hparams"]):
        r"""The effective `(W(λ), b(λ))` for one hyperparameter input (for inspection;
        the call never forms them)."""
        scalars = self.to_scalars @ hparams
        n = self.elem_weight.shape[0]
        w = self.elem_scalar * self.elem_weight + scalars[:n, None] * self.hyper_weight
        if self.elem_bias is None:
            return w, None
        return w, self.elem_scalar * self.elem_bias + scalars[n:] * self.hyper_bias


class StnConv2d(eqx.Module):
    r"""The Self-Tuning Networks convolution (`cnn/hypermodels/hyperconv2d.py`): as
    [`implicit_kit.hyper.StnLinear`][] with the output channels in place of the rows,
    $y = s\,(K_\text{elem} * x + b_\text{elem}) + (V\lambda) \odot_\text{channel}
    (K_\text{hyper} * x) + (V'\lambda) \odot b_\text{hyper}$, so the effective kernel is
    $s K_\text{elem} + (V\lambda) \odot_\text{out} K_\text{hyper}$. Two convolutions, the
    kernel never formed.

    **Arguments:** `in_channels`, `out_channels`, `kernel_size`, `num_hparams`, and
    `stride`, `padding` as `equinox.nn.Conv2d`'s; `use_bias` (default True); `key`.

    **Call:** `layer(x, hparams)`, `x` of shape `(in_channels, H, W)`, `hparams` of
    shape `(num_hparams,)` or None (the elementary layer alone).
    """

    elem: eqx.nn.Conv2d
    hyper: eqx.nn.Conv2d
    elem_bias: Float[Array, " out"] | None
    hyper_bias: Float[Array, " out"] | None
    to_scalars: Float[Array, "twice_out hparams"]
    elem_scalar: Float[Array, ""]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 num_hparams: int, *, stride: int = 1, padding: int | str = 0,
                 use_bias: bool = True, key: PRNGKeyArray):
        if not (isinstance(num_hparams, int) and num_hparams >= 1):
            raise ValueError(f"`StnConv2d(num_hparams=...)` must be a positive int, got "
                             f"{num_hparams!r}.")
        k = jr.split(key, 5)
        conv = dict(in_channels=in_channels, out_channels=out_channels,
                    kernel_size=kernel_size, stride=stride, padding=padding, use_bias=False)
        self.elem = eqx.nn.Conv2d(**conv, key=k[0])
        self.hyper = eqx.nn.Conv2d(**conv, key=k[1])
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.elem_bias = jr.uniform(k[2], (out_channels,), minval=-bound, maxval=bound) \
            if use_bias else None
        self.hyper_bias = jr.uniform(k[3], (out_channels,), minval=-bound, maxval=bound) \
            if use_bias else None
        self.to_scalars = 0.01 * jr.normal(k[4], (2 * out_channels, num_hparams))
        self.elem_scalar = jnp.ones(())

    def __call__(self, x: Float[Array, "c h w"], hparams: Float[Array, " hparams"] | None
                 ) -> Float[Array, "o h2 w2"]:
        return _stn_output(self, "StnConv2d", self.elem(x), lambda: self.hyper(x),
                           hparams, (None, None))


class StnResult(eqx.Module):
    """What [`implicit_kit.hyper.stn`][] returns: the trained `params`, the tuned
    unconstrained `hparams` and perturbation `scale_param` (the scale is its softplus),
    and `history`, per outer step: `train_loss`, `val_loss`, `hparams`, `scale`."""

    params: object
    hparams: Array
    scale_param: Array
    history: dict


def _entropy(scale_param):
    """The entropy of N(0, softplus(scale_param)²), summed over the hyperparameters."""
    return jnp.sum(jnp.log(jax.nn.softplus(scale_param) * jnp.sqrt(2 * jnp.pi * jnp.e)))


def stn(train_loss, val_loss, params, hparams, *, key: PRNGKeyArray, train_data, val_data,
        optimizer, hparam_optimizer, num_outer: int, train_steps: int = 2,
        val_steps: int = 1, batch_size: int | None = None, scale: float = 0.5,
        tune_scales: bool = True, entropy_weight: float = 1e-3,
        warmup: int = 0) -> StnResult:
    r"""Self-Tuning Networks' alternating algorithm (MacKay et al. 2019, Algorithm 1;
    the authors' `cnn/hypertrain.py`), `num_outer` rounds in one compiled `lax.scan`:

    1. `train_steps` steps of `optimizer` on the weights (the hypernetwork's
       parameters: a model built from [`implicit_kit.hyper.StnLinear`][] and
       [`implicit_kit.hyper.StnConv2d`][] layers) along
       `train_loss(params, h, x, y, key)`, where each example's hyperparameters are
       perturbed, $h_i = \lambda + \epsilon_i$, $\epsilon_i \sim N(0,
       \mathrm{softplus}(\sigma)^2)$, and the loss applies the regularisers at $h_i$;
    2. `val_steps` steps of `hparam_optimizer` on $\lambda$ (and on $\sigma$ if
       `tune_scales`, with the entropy bonus `entropy_weight` $\cdot H$ that keeps it
       from collapsing) along `val_loss(params, h, x, y)` through the best-response
       approximation, with the regularisers off, $h_i$ perturbed alike
       (reparameterised, so $\sigma$ gets a gradient).

    `hparams` ($\lambda$) is a vector in unconstrained space (map it to valid values,
    e.g. a sigmoid for a dropout rate, inside the losses); `h` is `(batch, len(λ))`.
    `train_data`/`val_data` are `(x, y)` arrays; each step draws `batch_size` examples
    with replacement (`None`: the whole split, in order). `scale` is the initial
    perturbation scale $\mathrm{softplus}(\sigma)$. The first `warmup` rounds train the
    weights only (λ and σ stay; the authors' `warmup_epochs`). Returns a `StnResult`.
    """
    if num_outer < 1 or train_steps < 0 or val_steps < 0 or warmup < 0:
        raise ValueError(f"`stn` needs num_outer >= 1 and train_steps, val_steps, warmup >= "
                         f"0; got {num_outer}, {train_steps}, {val_steps}, {warmup}.")
    if not scale > 0:
        raise ValueError(f"`stn(scale=...)` must be positive, got {scale!r}.")
    hparams = jnp.asarray(hparams)
    if hparams.ndim != 1:
        raise ValueError(f"`stn`: hparams must be a vector, got shape {hparams.shape}.")
    w, static = eqx.partition(params, eqx.is_inexact_array)
    # softplus^-1(scale), so that softplus(scale_param) = scale
    scale_param = jnp.full(hparams.shape, jnp.log(jnp.expm1(scale)), hparams.dtype)

    def draw(key, data):
        x, y = data
        if batch_size is None:
            return x, y
        idx = jr.randint(key, (batch_size,), 0, x.shape[0])
        return x[idx], y[idx]

    def perturbed(key, lam, s, n):
        return lam + jax.nn.softplus(s) * jr.normal(key, (n, lam.shape[0]), lam.dtype)

    @eqx.filter_jit
    def run(w, lam, s, key, train_data, val_data):
        def outer(carry, inputs):
            w_, w_state, lam_, s_, h_state = carry
            i, key = inputs
            k_train, k_val = jr.split(key)

            def train_step(c, key):
                w2, st = c
                kb, ke, kl = jr.split(key, 3)
                x, y = draw(kb, train_data)
                h = perturbed(ke, lam_, s_, x.shape[0])
                loss, g = jax.value_and_grad(
                    lambda w3: train_loss(eqx.combine(w3, static), h, x, y, kl))(w2)
                upd, st = optimizer.update(g, st, w2)
                return (optax.apply_updates(w2, upd), st), loss

            (w_, w_state), train_losses = lax.scan(
                train_step, (w_, w_state), jr.split(k_train, train_steps))

            def val_step(c, key):
                lam2, s2, st = c
                kb, ke = jr.split(key)
                x, y = draw(kb, val_data)

                def objective(lam_s):
                    lam3, s3 = lam_s
                    h = perturbed(ke, lam3, s3, x.shape[0])
                    value = val_loss(eqx.combine(w_, static), h, x, y)
                    return value - entropy_weight * _entropy(s3), value

                (_, value), (g_lam, g_s) = jax.value_and_grad(
                    objective, has_aux=True)((lam2, s2))
                if not tune_scales:
                    g_s = jnp.zeros_like(g_s)
                upd, st = hparam_optimizer.update((g_lam, g_s), st, (lam2, s2))
                lam2, s2 = optax.apply_updates((lam2, s2), upd)
                return (lam2, s2, st), value

            old = (lam_, s_, h_state)
            new, val_losses = lax.scan(val_step, old, jr.split(k_val, val_steps))
            lam_, s_, h_state = keep_if(i >= warmup, new, old)
            row = {"train_loss": jnp.mean(train_losses) if train_steps else jnp.nan,
                   "val_loss": jnp.mean(val_losses) if val_steps else jnp.nan,
                   "hparams": lam_, "scale": jax.nn.softplus(s_)}
            return (w_, w_state, lam_, s_, h_state), row

        carry = (w, optimizer.init(w), lam, s, hparam_optimizer.init((lam, s)))
        (w, _, lam, s, _), history = lax.scan(
            outer, carry, (jnp.arange(num_outer), jr.split(key, num_outer)))
        return w, lam, s, history

    w, lam, s, history = run(w, hparams, scale_param, key, train_data, val_data)
    return StnResult(eqx.combine(w, static), lam, s, history)
