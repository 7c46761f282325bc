"""HomoODE and Neural ODE on the embedded digits: accuracy, NFE, learned start point,
solver-heuristic regulariser, and the exact-field toy.

Arms (each over `--seeds` seeds, same stem and head, `ik.models.ImageClassifier`):

- `homoode-alternating`: HomoODE, the authors' ∓1 start;
- `homoode-learned`: HomoODE with the shared learnable start point, trained by
  `ik.models.init_loss` to the detached end points with its own SGD (lr `--init-lr`,
  every `--init-every` steps), as the authors do;
- `node`: Neural ODE (start = stem features);
- `node-errpen`: Neural ODE + the "Opening the Blackbox" error-estimate regulariser
  (weight decaying exponentially from `--pen-start` to `--pen-end`, as Pal et al.).

Settings follow the authors' code where it applies: dopri5 at rtol = atol = 1e-3, Adam
1e-3 with a per-iteration cosine schedule to 1e-6, batch 64, per-channel variational
dropout 0.1 in the HomoODE field; digits 8×8 upsampled ×2 (nearest) to 16×16.

Section `exact`: the exact fixed-point homotopy field of a tanh DEQ map (d = 40,
||W|| = 0.9): NFE from the alternating start vs a start point fitted by smooth-L1 to 256
training equilibria, at tol 1e-6 and 1e-3.

Run: python benchmarks/digits_implicit.py [--arms ...] [--seeds 3] [--epochs 20]
"""

import argparse
import json
import sys
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import implicit_kit as ik


def load(upsample):
    x, y = ik.data.load_digits("train")
    xt, yt = ik.data.load_digits("test")
    if upsample > 1:
        x = x.repeat(upsample, 2).repeat(upsample, 3)
        xt = xt.repeat(upsample, 2).repeat(upsample, 3)
    mean, std = x.mean(), x.std()
    return ((jnp.asarray((x - mean) / std), jnp.asarray(y)),
            (jnp.asarray((xt - mean) / std), jnp.asarray(yt)))


def build(arm, hidden, final, spatial, key):
    k1, k2 = jr.split(key)
    ode = ik.models.ODESolve(error_penalty=arm == "node-errpen")
    if arm.startswith("homoode"):
        field = ik.nn.ConvCell(hidden, groups=min(32, hidden), residual=False, dropout=0.1,
                               key=k1)
        start = "learned" if arm == "homoode-learned" else "alternating"
        block = ik.models.HomoODE(field, (hidden, spatial, spatial), init=start, ode=ode)
    else:
        field = ik.nn.ConvCell(hidden, groups=min(32, hidden), residual=False, inject=False,
                               key=k1)
        block = ik.models.NeuralODE(field, ode)
    return ik.models.ImageClassifier.build(block, in_channels=1, classes=10, hidden=hidden,
                                           final=final, key=k2)


def run_arm(arm, seed, a, train, test):
    (x, y), (xt, yt) = train, test
    spatial = x.shape[-1] // 2
    model = build(arm, a.hidden, a.final, spatial, jr.key(seed))
    steps_per_epoch = x.shape[0] // a.batch
    total = steps_per_epoch * a.epochs
    sched = optax.cosine_decay_schedule(a.lr, total, alpha=1e-6 / a.lr)
    opt = optax.adam(sched)
    is_start = (ik.models.HomoODE.init_params(model.block) if arm == "homoode-learned"
                else None)
    if is_start is not None:
        start_spec = eqx.tree_at(lambda m: m.block, jax.tree_util.tree_map(
            lambda _: False, model), is_start)
        main_spec = jax.tree_util.tree_map(
            lambda p, s: eqx.is_inexact_array(p) and not s, model, start_spec)
    else:
        main_spec = jax.tree_util.tree_map(eqx.is_inexact_array, model)
    state = opt.init(eqx.filter(model, main_spec))
    init_opt = optax.sgd(optax.cosine_decay_schedule(a.init_lr, max(total // a.init_every, 1),
                                                     alpha=1e-6 / a.init_lr))
    init_state = init_opt.init(model.block.z0) if is_start is not None else None

    def pen_weight(step):
        return a.pen_start * (a.pen_end / a.pen_start) ** (step / total)

    @eqx.filter_jit
    def step(model, state, xb, yb, key, it):
        def loss_fn(params):
            m = eqx.combine(params, rest)
            logits, st = jax.vmap(lambda u, k: m(u, key=k, return_stats=True))(
                xb, jr.split(key, xb.shape[0]))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            if "error_penalty" in st:
                loss = loss + pen_weight(it) * jnp.mean(st.error_penalty)
            return loss, st

        params, rest = eqx.partition(model, main_spec)
        (loss, st), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = opt.update(g, state, params)
        return eqx.apply_updates(model, updates), state, loss, st

    @eqx.filter_jit
    def init_step(model, init_state, z_end):
        def obj(z0):
            block = eqx.tree_at(lambda b: b.z0, model.block, z0)
            return ik.models.init_loss(jnp.broadcast_to(block.initial_point(), z_end.shape),
                                       z_end)

        g = jax.grad(obj)(model.block.z0)
        upd, init_state = init_opt.update(g, init_state)
        return eqx.tree_at(lambda m: m.block.z0, model, model.block.z0 + upd), init_state

    @eqx.filter_jit
    def evaluate(model):
        logits, st = jax.vmap(lambda u: model(u, inference=True, return_stats=True))(xt)
        acc = jnp.mean(jnp.argmax(logits, -1) == yt)
        gap = (ik.models.init_loss(jnp.broadcast_to(model.block.initial_point(),
                                                    st.z_end.shape),
                                   st.z_end)
               if arm.startswith("homoode") else jnp.nan)
        return acc, jnp.mean(st.nfe), gap

    key = jr.key(1000 + seed)
    history = []
    it = 0
    t_start = time.perf_counter()
    for epoch in range(a.epochs):
        perm = jr.permutation(jr.fold_in(key, epoch), x.shape[0])
        t0 = time.perf_counter()
        nfe_train = []
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch:(i + 1) * a.batch]
            model, state, loss, st = step(model, state, x[idx], y[idx],
                                          jr.fold_in(key, 10_000 + it), jnp.asarray(it))
            nfe_train.append(st.nfe)
            if is_start is not None and it % a.init_every == 0:
                model, init_state = init_step(model, init_state, st.z_end)
            it += 1
        jax.block_until_ready(loss)
        secs = time.perf_counter() - t0
        acc, nfe, gap = evaluate(model)
        history.append({"epoch": epoch + 1, "loss": float(loss), "test_acc": float(acc),
                        "test_nfe": float(nfe), "train_nfe": float(jnp.mean(jnp.stack(
                            nfe_train))), "gap": float(gap), "seconds": secs})
        if a.verbose:
            print(arm, seed, history[-1], flush=True)
    return {"arm": arm, "seed": seed, "final": history[-1], "best_acc": max(
        h["test_acc"] for h in history), "history": history,
        "total_seconds": time.perf_counter() - t_start}


def exact_section():
    """The exact-field toy: NFE from the alternating start vs a fitted shared start."""
    jax.config.update("jax_enable_x64", True)
    d, n_train, n_test = 40, 256, 32
    k = jr.split(jr.key(0), 4)
    w = jr.normal(k[0], (d, d))
    w = 0.9 * w / jnp.linalg.norm(w, 2)
    u = jr.normal(k[1], (d, d)) / jnp.sqrt(d)
    b = 0.5 * jr.normal(k[2], (d,))
    xs = jr.normal(k[3], (n_train + n_test, d))

    def fn(z, x):
        return jnp.tanh(w @ z + u @ x + b)

    eq = jax.vmap(lambda x: ik.fixed_point(fn, jnp.zeros(d), x, ik.Picard(rtol=1e-12,
                                                                           atol=1e-12),
                                           max_steps=2000).value)(xs)
    # Fit the shared start by smooth-L1 (Adam on the robust centre of the equilibria).
    z0 = jnp.zeros(d)
    opt = optax.adam(0.05)
    s = opt.init(z0)
    for _ in range(500):
        g = jax.grad(lambda z: ik.models.init_loss(jnp.broadcast_to(z, eq[:n_train].shape),
                                                   eq[:n_train]))(z0)
        upd, s = opt.update(g, s)
        z0 = z0 + upd
    alternating = ik.models.alternating_start((d,), jnp.float64)
    rows = []
    for tol in (1e-6, 1e-3):
        for name, start in (("alternating", alternating), ("fitted", z0)):
            sol = jax.vmap(lambda x, start=start, tol=tol: ik.homotopy_solve(
                fn, start, x, ode_solver=dfx.Dopri5(),
                stepsize_controller=dfx.PIDController(rtol=tol, atol=tol), rtol=jnp.inf,
                throw=False))(xs[n_train:])
            err = jnp.mean(jnp.linalg.norm(sol.value - eq[n_train:], axis=1))
            rows.append({"tol": tol, "start": name, "nfe": float(jnp.mean(sol.stats["nfe"])),
                         "end_error": float(err)})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arms", default="homoode-alternating,homoode-learned")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--final", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-lr", type=float, default=0.02)
    p.add_argument("--init-every", type=int, default=5)
    p.add_argument("--pen-start", type=float, default=1.0)
    p.add_argument("--pen-end", type=float, default=0.1)
    p.add_argument("--upsample", type=int, default=2)
    p.add_argument("--exact", action="store_true", help="also run the exact-field toy")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON results here")
    a = p.parse_args()
    train, test = load(a.upsample)
    results = {"meta": {"device": str(jax.devices()[0]), "jax": jax.__version__,
                        "command": " ".join(["python"] + sys.argv), "args": vars(a)},
               "runs": []}
    for arm in [s for s in a.arms.split(",") if s]:
        for seed in range(a.seeds):
            results["runs"].append(run_arm(arm, seed, a, train, test))
            r = results["runs"][-1]
            print(f"{arm} seed {seed}: acc {r['final']['test_acc']:.4f} (best "
                  f"{r['best_acc']:.4f}), test NFE {r['final']['test_nfe']:.1f}, gap "
                  f"{r['final']['gap']:.4f}, {r['total_seconds']:.0f}s", flush=True)
    if a.exact:
        results["exact"] = exact_section()
        for r in results["exact"]:
            print("exact", r, flush=True)
    print("\n| arm | seeds | test acc (final) | best | test NFE | train NFE | smooth-L1 gap |"
          " s/epoch |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in dict.fromkeys(r["arm"] for r in results["runs"]):
        rs = [r for r in results["runs"] if r["arm"] == arm]

        def ms(vals):
            v = np.asarray(vals, float)
            return f"{v.mean():.4g} ± {v.std():.2g}"

        print(f"| {arm} | {len(rs)} | {ms([r['final']['test_acc'] for r in rs])} | "
              f"{ms([r['best_acc'] for r in rs])} | {ms([r['final']['test_nfe'] for r in rs])} | "
              f"{ms([r['final']['train_nfe'] for r in rs])} | "
              f"{ms([r['final']['gap'] for r in rs])} | "
              f"{ms([np.median([h['seconds'] for h in r['history']]) for r in rs])} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
