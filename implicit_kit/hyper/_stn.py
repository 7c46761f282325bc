"""Self-Tuning Networks' layers (MacKay, Vicol, Lorraine, Duvenaud & Grosse, ICLR 2019):
a structured best-response approximation w(λ) whose weights depend on the
hyperparameters through per-output scalings."""

import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray


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
        out = self.elem_weight @ x
        if self.elem_bias is not None:
            out = out + self.elem_bias
        out = self.elem_scalar * out
        if hparams is None:
            return out
        if hparams.shape != self.to_scalars.shape[1:]:
            raise ValueError(f"`StnLinear`: hparams must have shape "
                             f"{self.to_scalars.shape[1:]}, got {hparams.shape}.")
        scalars = self.to_scalars @ hparams
        n = self.elem_weight.shape[0]
        out = out + scalars[:n] * (self.hyper_weight @ x)
        if self.hyper_bias is not None:
            out = out + scalars[n:] * self.hyper_bias
        return out

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
        out = self.elem(x)
        if self.elem_bias is not None:
            out = out + self.elem_bias[:, None, None]
        out = self.elem_scalar * out
        if hparams is None:
            return out
        if hparams.shape != self.to_scalars.shape[1:]:
            raise ValueError(f"`StnConv2d`: hparams must have shape "
                             f"{self.to_scalars.shape[1:]}, got {hparams.shape}.")
        scalars = self.to_scalars @ hparams
        n = out.shape[0]
        out = out + scalars[:n, None, None] * self.hyper(x)
        if self.hyper_bias is not None:
            out = out + (scalars[n:] * self.hyper_bias)[:, None, None]
        return out
