"""Dataset distillation: ten learned 8x8 images that train a classifier for the digits.

The jaxopt paper's dataset-distillation experiment on the 8x8 digits, in float64. The
inner problem is l2-regularised multinomial logistic regression trained on ten images,
one per class: W*(S) = argmin_W mean CE(S W + b, 0..9) + l2/2 (||W||^2 + ||b||^2), by
`ik.minimise` (BFGS) and differentiated implicitly (CG on the Hessian). The outer
problem learns the images S by Adam on the cross-entropy of W*(S) on the 1,437 real
training images. Reported: test accuracy of the classifier trained on the ten distilled
images, against training the same classifier on ten random real images (one per class,
10 draws), on the ten class means, and on the whole training split; the images as a PNG.

Run: python benchmarks/distillation.py [--steps 200] [--png PATH] [--json PATH]
"""

import argparse
import json
import pathlib
import time

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optimistix as optx  # noqa: E402

import implicit_kit as ik  # noqa: E402


L2 = 1e-2


def data():
    x, y = ik.data.load("digits", "train", seed=0)
    xt, yt = ik.data.load("digits", "test", seed=0)
    # pixels in [0, 1], in float64 (the loader's float32 would put the whole inner
    # problem in float32, where BFGS's 1e-8 and the backward CG do not hold)
    return (jnp.asarray(x.reshape(len(x), -1), jnp.float64), jnp.asarray(y),
            jnp.asarray(xt.reshape(len(xt), -1), jnp.float64), jnp.asarray(yt))


def inner_loss(params, args):
    w, b = params
    x, y = args
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()
    # b regularised too: softmax is invariant to a shift of all logits, so an
    # unregularised bias leaves the Hessian singular and the backward CG fails (loudly)
    return ce + 0.5 * L2 * (jnp.sum(w * w) + jnp.sum(b * b))


def train(x, y):
    """The classifier trained on (x, y), implicitly differentiable in x. `throw=False`:
    a failed backward solve gives a NaN gradient, and the outer loop skips that step
    and counts it (as `ik.train.fit` does) rather than stopping."""
    params0 = (jnp.zeros((64, 10), x.dtype), jnp.zeros(10, x.dtype))
    # BFGS as when the stored results were measured (v0.2's default; ik.minimise's is now
    # LBFGS, see benchmarks/jaxopt_migration.py)
    return ik.minimise(inner_loss, params0, (x, y), optx.BFGS(rtol=1e-8, atol=1e-8),
                       max_steps=1000, throw=False).value


def ce(params, x, y):
    w, b = params
    return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()


def accuracy(params, x, y):
    w, b = params
    return float(jnp.mean(jnp.argmax(x @ w + b, 1) == y))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--png", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    x, y, xt, yt = data()
    labels = jnp.arange(10)

    @jax.jit
    def outer(s):
        return ce(train(s, labels), x, y)

    grad = jax.jit(jax.value_and_grad(outer))
    # start from the class means (a strong start; random noise also works, slower)
    means = jnp.stack([x[y == k].mean(0) for k in range(10)])
    s, adam = means, optax.adam(a.lr)
    state = adam.init(s)
    path = []
    t0 = time.perf_counter()
    skipped = 0
    for _ in range(a.steps):
        v, g = grad(s)
        path.append(float(v))
        if not bool(jnp.all(jnp.isfinite(g))):
            skipped += 1
            continue
        upd, state = adam.update(g, state)
        s = optax.apply_updates(s, upd)
    seconds = time.perf_counter() - t0
    distilled = train(s, labels)
    rng = np.random.default_rng(0)
    random_accs = []
    for _ in range(10):
        idx = np.array([rng.choice(np.flatnonzero(np.asarray(y) == k)) for k in range(10)])
        random_accs.append(accuracy(train(x[idx], labels), xt, yt))
    full = train(x, y)
    result = dict(
        steps=a.steps, lr=a.lr, l2=L2, seconds=seconds, skipped_steps=skipped,
        outer_loss_start=path[0], outer_loss_end=float(outer(s)),
        distilled_test_acc=accuracy(distilled, xt, yt),
        class_means_test_acc=accuracy(train(means, labels), xt, yt),
        random_real_test_acc_mean=float(np.mean(random_accs)),
        random_real_test_acc_sd=float(np.std(random_accs)),
        full_train_test_acc=accuracy(full, xt, yt), path=path)
    print({k: v for k, v in result.items() if k != "path"}, flush=True)
    if a.png:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 2.4))
        axes = fig.subplots(2, 10)
        for k in range(10):
            for row, img in enumerate((means, s)):
                ax = axes[row, k]
                ax.imshow(np.asarray(img[k]).reshape(8, 8), cmap="gray_r")
                ax.set_xticks([])
                ax.set_yticks([])
            axes[0, k].set_title(str(k))
        axes[0, 0].set_ylabel("class mean")
        axes[1, 0].set_ylabel("distilled")
        fig.tight_layout()
        fig.savefig(a.png, dpi=100)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
