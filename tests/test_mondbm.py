"""The monotone deep Boltzmann machine: the proximal softmax, the hollow monotone
coupling, mean-field inference and its implicit gradient (reference note
seed_methods.md §1b, check C2). float64 where the checks need it."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import implicit_kit as ik
from implicit_kit.nn import HollowCoupling, prox_softmax, Tier


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _f64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


# -- the proximal softmax ---------------------------------------------------------------


def test_prox_softmax_solves_its_kkt_system_and_tends_to_softmax():
    y = 6.0 * jr.normal(jr.key(0), (500, 7), jnp.float64)
    for alpha in (0.1, 0.125, 0.5, 0.9):
        z = prox_softmax(y, alpha)
        assert float(jnp.min(z)) > 0.0
        np.testing.assert_allclose(z.sum(-1), 1.0, atol=1e-13)
        # KKT: (1 - a) z_i + a log z_i - y_i + a = -nu, the same for every i of a row.
        r = (1 - alpha) * z + alpha * jnp.log(z) - y + alpha
        assert float(jnp.max(jnp.abs(r - r.mean(-1, keepdims=True)))) <= 1e-12
        # ... and it is the argmin: no simplex point nearby has a smaller objective.
        y1 = jnp.linspace(-1.0, 1.0, 7)  # moderate entries: feasible moves exist
        z1 = prox_softmax(y1, alpha)

        def objective(v):
            return 0.5 * jnp.sum((v - y1) ** 2) + alpha * (
                jnp.sum(v * jnp.log(v)) - 0.5 * jnp.sum(v * v))

        for k in range(20):  # sum-preserving moves that stay positive
            d = jr.normal(jr.key(k), (7,), jnp.float64)
            v = z1 + 1e-2 * float(jnp.min(z1)) * (d - d.mean())
            assert objective(v) > objective(z1)
    gap = float(jnp.max(jnp.abs(prox_softmax(y, 1 - 1e-6) - jax.nn.softmax(y))))
    assert gap < 1e-5  # the reference note: 3e-7 at alpha = 1 - 1e-6
    assert float(jnp.max(jnp.abs(prox_softmax(y, 0.5) - jax.nn.softmax(y)))) > 0.05
    np.testing.assert_array_equal(prox_softmax(y, 1.0), jax.nn.softmax(y))
    # any axis
    np.testing.assert_allclose(prox_softmax(y.T, 0.3, axis=0), prox_softmax(y, 0.3).T)


def test_prox_softmax_derivative_matches_central_differences():
    y = 3.0 * jr.normal(jr.key(1), (3, 5), jnp.float64)
    v = jr.normal(jr.key(2), y.shape, jnp.float64)
    eps = 1e-6
    for alpha in (0.125, 0.7):
        _, t = jax.jvp(lambda y: prox_softmax(y, alpha), (y,), (v,))
        fd = (prox_softmax(y + eps * v, alpha) - prox_softmax(y - eps * v, alpha)) / (2 * eps)
        np.testing.assert_allclose(t, fd, atol=1e-8)
        # in alpha (a traced scalar) too, and reverse mode
        _, ta = jax.jvp(lambda a: prox_softmax(y, a), (jnp.asarray(alpha),),
                        (jnp.asarray(1.0),))
        fda = (prox_softmax(y, alpha + eps) - prox_softmax(y, alpha - eps)) / (2 * eps)
        np.testing.assert_allclose(ta, fda, atol=1e-8)
        g = jax.grad(lambda y: jnp.sum(jnp.sin(3 * prox_softmax(y, alpha))))(y)
        assert float(jnp.sum(g * v)) == pytest.approx(float(jnp.sum(
            3 * jnp.cos(3 * prox_softmax(y, alpha)) * t)), abs=1e-10)


# -- the coupling -----------------------------------------------------------------------


TIERS = (Tier((3, 4, 4), 3), Tier((4, 2, 2), 2), Tier((5,), 5))


def _blocks(tiers):
    """Index sets of the categories of every variable in the flattened state."""
    out, off = [], 0
    for t in tiers:
        ids = np.arange(math.prod(t.shape)).reshape(t.shape) + off
        g = ids.reshape(t.shape[0] // t.group, t.group, -1)
        out += [g[v, :, p] for v in range(g.shape[0]) for p in range(g.shape[2])]
        off += ids.size
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hollow_coupling_is_symmetric_hollow_with_margin_for_any_weights(seed):
    m = 0.05
    for scale in (0.3, 3.0):
        c = _f64(HollowCoupling(TIERS, [(0, 1), (1, 2)], m, init_scale=scale,
                                key=jr.key(seed)))
        w = c.operator().dense()
        np.testing.assert_allclose(w, w.T, atol=1e-14)
        for ids in _blocks(TIERS):  # no coupling inside a categorical variable
            assert float(jnp.max(jnp.abs(w[np.ix_(ids, ids)]))) <= 1e-14
        lam = float(jnp.min(jnp.linalg.eigvalsh(jnp.eye(w.shape[0]) - w)))
        assert lam >= m - 1e-12
    # without the per-variable scale the same weights are not monotone
    plain = _f64(HollowCoupling(TIERS, [(0, 1), (1, 2)], m, init_scale=3.0,
                                monotone=False, key=jr.key(seed)))
    w = plain.operator().dense()
    assert float(jnp.min(jnp.linalg.eigvalsh(jnp.eye(w.shape[0]) - w))) < 0.0


def test_hollow_coupling_diagonal_blocks_are_those_of_the_dense_gram():
    """The exact per-variable blocks D (from the kernels, border taps included) against
    the Gram matrix of A built column by column."""
    c = _f64(HollowCoupling(TIERS, [(0, 1), (1, 2), (0, 2)], 0.1, key=jr.key(3)))
    sizes = [math.prod(t.shape) for t in TIERS]

    def flat_a(v):
        zs, i = [], 0
        for t, n in zip(TIERS, sizes):
            zs.append(v[i:i + n].reshape(t.shape))
            i += n
        return jnp.concatenate([f.reshape(-1) for f in c._apply_a(tuple(zs))])

    n = sum(sizes)
    a = jax.vmap(flat_a, out_axes=1)(jnp.eye(n))
    gram = a.T @ a
    got = []
    for t, b in zip(TIERS, c._diag_blocks()):
        got += list(b.reshape(-1, t.group, t.group)) if len(t.shape) == 1 else [
            b[v, h, w] for v in range(b.shape[0]) for h in range(t.shape[1])
            for w in range(t.shape[2])]
    for ids, blk in zip(_blocks(TIERS), got):
        np.testing.assert_allclose(blk, gram[np.ix_(ids, ids)], atol=1e-12)
    # the HollowOperator's matrix-free W is -(S AᵀA S - S² blkdiag(AᵀA)), S from the blocks
    op = c.operator()
    assert isinstance(op, ik.nn.HollowOperator)
    s = np.ones(n)
    d = np.zeros((n, n))
    for ids in _blocks(TIERS):
        blk = np.asarray(gram[np.ix_(ids, ids)])
        s[ids] = min(1.0, np.sqrt(0.9 / np.linalg.eigvalsh(blk)[-1]))
        d[np.ix_(ids, ids)] = blk
    want = -(s[:, None] * np.asarray(gram) * s[None]) + (s[:, None] * d * s[None])
    np.testing.assert_allclose(op.dense(), want, atol=1e-12)
    assert s.min() < 1.0  # the scale is active for some variables


# -- mean-field inference -----------------------------------------------------------------


def _model(alpha=0.5, monotone=True, solver=None, scale=2.0, key=0, **kw):
    c = HollowCoupling(TIERS, [(0, 1), (1, 2)], 0.05, init_scale=scale, monotone=monotone,
                       key=jr.key(key))
    biases = tuple(jr.normal(k, t.shape) for k, t in zip(jr.split(jr.key(key + 7), 3), TIERS))
    solver = ik.Anderson(rtol=1e-13, atol=1e-13) if solver is None else solver
    return _f64(ik.models.MonotoneDBM(c, biases, alpha=alpha, solver=solver, max_steps=500,
                                      throw=True, **kw))


@pytest.mark.slow
def test_fixed_point_is_independent_of_alpha_and_is_the_mean_field_equation():
    mask = jnp.zeros((1, 4, 4), bool).at[0, :2].set(True)
    onehot = jax.nn.one_hot(jr.randint(jr.key(4), (4, 4), 0, 3), 3, axis=0)
    qs = []
    for alpha in (0.1, 0.3, 0.6, 1.0):
        model = _model(alpha)
        q, pre, sol = eqx.filter_jit(lambda m: m.infer((onehot, None, None),
                                                       (mask, None, None)))(model)
        assert sol.result == ik.RESULTS.successful
        qs.append(jnp.concatenate([a.reshape(-1) for a in q]))
        # q = softmax(W q + b) per variable, the clamped pixels at their values
        for t, qi, pi in zip(model.tiers, q, pre):
            want = jax.nn.softmax(t.grouped(pi), axis=1).reshape(t.shape)
            if t is model.tiers[0]:
                want = jnp.where(jnp.repeat(mask, 3, 0), onehot, want)
            np.testing.assert_allclose(qi, want, atol=1e-12)
        np.testing.assert_allclose(q[0][:, :2], onehot[:, :2])  # clamped
    spread = max(float(jnp.max(jnp.abs(a - qs[0]))) for a in qs)
    assert spread < 1e-11


def _two_binary_variables(c, monotone):
    """Two binary variables with the agreement coupling W_12 = c I (reference check C2,
    3): A = [sqrt(c) I, -sqrt(c) I]."""
    tiers = (Tier((2,), 2), Tier((2,), 2))
    coup = HollowCoupling(tiers, [(0, 1)], 0.01, monotone=monotone, key=jr.key(0))
    r = math.sqrt(c) * jnp.eye(2)
    coup = eqx.tree_at(lambda k: (k.edges[0].src_w, k.edges[0].dst_w), coup, (r, -r))
    model = ik.models.MonotoneDBM(coup, (jnp.zeros(2), jnp.zeros(2)), alpha=0.5,
                                  solver=ik.Picard(rtol=1e-12, atol=1e-12), max_steps=2000)
    return _f64(model)


def test_two_starts_agree_when_monotone_and_disagree_otherwise():
    starts = [(jnp.array([0.9, 0.1]), jnp.array([0.9, 0.1])),
              (jnp.array([0.1, 0.9]), jnp.array([0.1, 0.9]))]

    def ends(model):
        out = []
        for y0 in starts:
            q, _, sol = model.infer(y0=y0)
            assert sol.result == ik.RESULTS.successful
            out.append(jnp.concatenate(q))
        return float(jnp.max(jnp.abs(out[0] - out[1])))

    w = _two_binary_variables(6.0, False).coupling.operator().dense()
    assert float(jnp.min(jnp.linalg.eigvalsh(jnp.eye(4) - w))) == pytest.approx(-5.0)
    assert ends(_two_binary_variables(6.0, False)) > 0.9  # two fixed points
    assert ends(_two_binary_variables(0.9, False)) < 1e-10  # 1 - c > 0: unique
    assert ends(_two_binary_variables(6.0, True)) < 1e-10  # scaled to the margin


@pytest.mark.slow
def test_marginals_gradient_matches_central_differences_and_unrolling():
    mask = jnp.zeros((1, 4, 4), bool).at[0, ::2].set(True)
    onehot = jax.nn.one_hot(jr.randint(jr.key(5), (4, 4), 0, 3), 3, axis=0)
    model = _model(0.125)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    probe = [jr.normal(k, t.shape, jnp.float64)
             for k, t in zip(jr.split(jr.key(6), 3), TIERS)]

    def loss(p, adjoint=None):
        mm = eqx.combine(p, static)
        if adjoint is not None:
            mm = eqx.tree_at(lambda x: x.adjoint, mm, adjoint, is_leaf=lambda v: v is None)
        q, pre, _ = mm.infer((onehot, None, None), (mask, None, None))
        return sum(jnp.sum(jnp.sin(2 * a) * b) for a, b in zip(q, probe)) + jnp.sum(
            pre[-1] ** 2)

    g = jax.jit(jax.grad(loss))(params)
    unrolled = jax.jit(jax.grad(lambda p: loss(p, ik.UnrolledAdjoint())))(params)
    value = jax.jit(loss)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(unrolled)):
        np.testing.assert_allclose(a, b, atol=1e-9)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    eps = 1e-6
    for k in jr.split(jr.key(8), 3):
        d = [jr.normal(kk, a.shape, jnp.float64) for kk, a in
             zip(jr.split(k, len(leaves)), leaves)]
        shift = lambda s: jax.tree_util.tree_unflatten(  # noqa: E731
            treedef, [a + s * b for a, b in zip(leaves, d)])
        fd = (value(shift(eps)) - value(shift(-eps))) / (2 * eps)
        ad = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree_util.tree_leaves(g), d))
        assert ad == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


@pytest.mark.slow
def test_image_task_clamps_the_observed_pixels_and_reports_the_imputation():
    model = ik.models.MonotoneDBM.image((4, 4), bins=3, hidden=4, group=2, key=jr.key(0))
    model = _f64(eqx.tree_at(lambda m: m.solver, model, ik.Anderson(rtol=1e-12, atol=1e-12)))
    x = jr.uniform(jr.key(1), (1, 4, 4), jnp.float64)
    mask = jnp.zeros((4, 4), bool).at[1:3].set(True)
    logits, st = eqx.filter_jit(lambda m, x: m(x, observed_mask=mask, return_stats=True))(
        model, x)
    levels = model.bin(x)
    np.testing.assert_array_equal(levels, jnp.clip(jnp.floor(x[0] * 3), 0, 2))
    q, pre, _ = model.infer((jax.nn.one_hot(levels, 3, axis=0), None, None),
                            (mask[None], None, None))
    np.testing.assert_allclose(logits, pre[-1])
    centres = (jnp.arange(3) + 0.5) / 3
    mean_img = jnp.einsum("k,khw->hw", centres, q[0])
    np.testing.assert_allclose(st.extras["pixels"], mean_img)
    # observed pixels sit at their bin centre; the error counts only the others
    np.testing.assert_allclose(mean_img[1:3], centres[levels[1:3]])
    free = ~mask
    want = float(jnp.sum(jnp.where(free, (mean_img - x[0]) ** 2, 0)) / free.sum())
    assert float(st.metrics["imputation_mse"]) == pytest.approx(want)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(pre[0], 0), levels[None], 0)[0]
    p = jnp.exp(-ce)
    focal = float(jnp.sum(jnp.where(free, (1 - p) ** 2 * ce, 0)) / free.sum())
    assert float(st.aux_loss) == pytest.approx(focal)
    np.testing.assert_allclose(ik.models.focal_loss(pre[0], levels, 2.0), (1 - p) ** 2 * ce)
    np.testing.assert_allclose(ik.models.focal_loss(pre[0], levels, 0.0), ce)
    # a key draws about the observed fraction
    masks = jax.vmap(lambda k: model(x, key=k, return_stats=True)[1].extras["observed_mask"])(
        jr.split(jr.key(2), 200))
    assert float(masks.mean()) == pytest.approx(0.4, abs=0.03)


def test_mondbm_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="alpha"):
        prox_softmax(jnp.zeros(3), 0.0)
    with pytest.raises(ValueError, match="group"):
        Tier((6, 2, 2), 4)
    with pytest.raises(ValueError, match="`m`"):
        HollowCoupling(TIERS, [(0, 1)], 1.5, key=jr.key(0))
    with pytest.raises(ValueError, match="edges"):
        HollowCoupling(TIERS, [(0, 0)], 0.1, key=jr.key(0))
    with pytest.raises(ValueError, match="biases"):
        ik.models.MonotoneDBM(HollowCoupling(TIERS, [(0, 1)], 0.1, key=jr.key(0)),
                              (jnp.zeros(3),) * 3)
    model = ik.models.MonotoneDBM.image((4, 4), bins=3, hidden=4, group=2, key=jr.key(0))
    with pytest.raises(ValueError, match="key"):
        model(jnp.zeros((1, 4, 4)))
