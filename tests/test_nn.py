"""Layers: per-solve normalisation and dropout, subhomogeneous, graph and Hopfield layers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import implicit_kit as ik


class _CountingSpectralNorm(ik.nn.SpectralNorm):
    def weight(self):
        jax.debug.callback(lambda: _COUNT.append(1))
        return super().weight()


_COUNT: list[int] = []


def _counting_cell(key):
    cell = ik.nn.MLPCell(6, 3, key=key)
    wrapped = _CountingSpectralNorm(cell.w1, scale=0.7, key=jr.key(1))
    return eqx.tree_at(lambda c: c.w1, cell, wrapped)


def test_normalisation_once_per_solve():
    cell = _counting_cell(jr.key(0))
    x = jnp.array([1.0, -0.5, 2.0])
    solver = ik.Picard(rtol=1e-10, atol=1e-12)
    deq = ik.models.DEQ(cell, (6,), solver)
    _COUNT.clear()
    z, st = jax.block_until_ready(deq(x, return_stats=True))
    assert int(st.num_steps) > 5
    assert len(_COUNT) == 1
    # Also once in the backward pass's forward: a gradient costs one more evaluation.
    _COUNT.clear()
    jax.block_until_ready(eqx.filter_grad(lambda m: jnp.sum(m(x)))(deq))
    assert len(_COUNT) == 1
    # Contrast (this is what the test would catch): an unprepared cell normalises
    # at every iteration of the solver.
    _COUNT.clear()
    sol = ik.fixed_point(lambda zz, a: cell(zz, a), jnp.zeros(6), x, solver)
    jax.block_until_ready(sol.value)
    assert len(_COUNT) >= int(sol.stats["num_steps"]) > 5


@pytest.mark.parametrize("norm", ["weight", "spectral"])
def test_normalised_weights(norm):
    lin = eqx.nn.Linear(5, 4, key=jr.key(0))
    if norm == "weight":
        layer = ik.nn.WeightNorm(lin)
        layer = eqx.tree_at(lambda l: l.g, layer, jnp.arange(1.0, 5.0)[:, None])
        w = ik.nn.prepare(layer).weight
        np.testing.assert_allclose(jnp.linalg.norm(w, axis=1), jnp.arange(1.0, 5.0))
        np.testing.assert_allclose(w / jnp.linalg.norm(w, axis=1, keepdims=True),
                                   lin.weight / jnp.linalg.norm(lin.weight, axis=1,
                                                                keepdims=True))
    else:
        layer = ik.nn.SpectralNorm(lin, scale=0.9, num_iters=100, key=jr.key(1))
        w = ik.nn.prepare(layer).weight
        np.testing.assert_allclose(jnp.linalg.svd(w, compute_uv=False)[0], 0.9, rtol=1e-8)
    x = jnp.arange(5.0)
    np.testing.assert_allclose(layer(x), ik.nn.prepare(layer)(x))


class _Net(eqx.Module):
    """An arbitrary Equinox module: a conv, a list of linears, an embedding, a norm."""

    conv1: eqx.nn.Conv2d
    layers: list
    embedding: eqx.nn.Linear
    gn: eqx.nn.GroupNorm

    def __init__(self, key):
        k = jr.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(2, 3, 3, padding=1, key=k[0])
        self.layers = [eqx.nn.Linear(12, 6, key=k[1]), eqx.nn.Linear(6, 4, key=k[2])]
        self.embedding = eqx.nn.Linear(4, 4, key=k[3])
        self.gn = eqx.nn.GroupNorm(1, 3)

    def __call__(self, x):
        h = jnp.tanh(self.gn(self.conv1(x))).mean(axis=(1, 2))
        h = jnp.concatenate([h, h, h, h])
        return self.embedding(self.layers[1](jnp.tanh(self.layers[0](h))))


def _normed(net):
    return {name for name, layer in (("conv1", net.conv1), ("layers.0", net.layers[0]),
                                     ("layers.1", net.layers[1]),
                                     ("embedding", net.embedding))
            if isinstance(layer, (ik.nn.WeightNorm, ik.nn.SpectralNorm))}


def test_apply_norm_reparametrises_the_chosen_layers_of_any_module():
    net = _Net(jr.key(0))
    x = jr.normal(jr.key(1), (2, 4, 4))
    normed = ik.nn.apply_norm(net, "weight", filter_out="embed")
    assert _normed(normed) == {"conv1", "layers.0", "layers.1"}
    np.testing.assert_allclose(normed(x), net(x), rtol=1e-12)  # g starts at ‖v‖
    # against the hand-normalised weights, for scales g set by hand
    normed = eqx.tree_at(lambda n: (n.conv1.g, n.layers[0].g), normed,
                         replace_fn=lambda g: g * jnp.linspace(0.5, 2.0, g.size).reshape(
                             g.shape))
    prepared = ik.nn.prepare(normed)
    for got, layer, g in ((prepared.conv1.weight, net.conv1, normed.conv1.g),
                          (prepared.layers[0].weight, net.layers[0], normed.layers[0].g)):
        v = np.asarray(layer.weight)
        rows = v.reshape(v.shape[0], -1)
        want = (np.asarray(g).reshape(-1, 1) * rows / np.linalg.norm(rows, axis=1,
                                                                      keepdims=True))
        np.testing.assert_allclose(np.asarray(got).reshape(v.shape[0], -1), want,
                                   rtol=1e-12)
    assert prepared.embedding.weight is net.embedding.weight  # filtered out: untouched
    # TorchDEQ's filters, and a predicate
    assert _normed(ik.nn.apply_norm(net, prefix_filter_out=["layers", "embed"])) == {"conv1"}
    assert _normed(ik.nn.apply_norm(net, where=lambda name, layer: isinstance(
        layer, eqx.nn.Linear) and name != "layers.1")) == {"layers.0", "embedding"}
    # dims: one scale per input column of a linear layer (dim=1), or one in all (None):
    # with every scale g set to 1, those norms of the weight are 1
    for dim, axis, count in ((1, 0, 12), (None, None, 1)):
        one = ik.nn.apply_norm(net, dim=dim, where=lambda n, _: n == "layers.0")
        assert one.layers[0].g.size == count
        one = eqx.tree_at(lambda n: n.layers[0].g, one, replace_fn=jnp.ones_like)
        w = np.asarray(ik.nn.prepare(one).layers[0].weight)
        np.testing.assert_allclose(np.linalg.norm(w, axis=axis), 1.0, rtol=1e-12)
    # spectral: every chosen weight (as an (out, rest) matrix) has norm `scale`
    spec = ik.nn.apply_norm(net, "spectral", scale=0.9, num_iters=200, key=jr.key(2))
    assert _normed(spec) == {"conv1", "layers.0", "layers.1", "embedding"}
    for layer in jax.tree_util.tree_leaves(ik.nn.prepare(spec), is_leaf=lambda l: isinstance(
            l, (eqx.nn.Linear, eqx.nn.Conv))):
        if isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv)):
            mat = np.asarray(layer.weight).reshape(layer.weight.shape[0], -1)
            np.testing.assert_allclose(np.linalg.norm(mat, 2), 0.9, rtol=1e-8)
    # already normalised layers are kept; remove_norm gives plain layers, same outputs
    again = ik.nn.apply_norm(normed, "spectral", key=jr.key(3))
    assert again.conv1 is normed.conv1 and isinstance(again.embedding, ik.nn.SpectralNorm)
    plain = ik.nn.remove_norm(normed)
    assert type(plain.conv1) is eqx.nn.Conv2d and _normed(plain) == set()
    np.testing.assert_allclose(plain(x), normed(x), rtol=1e-12)
    with pytest.raises(ValueError, match="no Linear, Conv or ConvTranspose layer left"):
        ik.nn.apply_norm(net, filter_out=["conv", "layers", "embed"])
    with pytest.raises(ValueError, match="needs `key=`"):
        ik.nn.apply_norm(net, "spectral")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        ik.nn.apply_norm(net, "batch")


def test_variational_dropout_one_mask_per_solve():
    cell = ik.nn.MLPCell(5, 2, hidden=16, dropout=0.5, key=jr.key(0))
    cell = eqx.tree_at(lambda c: c.w1.weight, cell, 0.3 * cell.w1.weight)
    cell = eqx.tree_at(lambda c: c.w2.weight, cell, 0.3 * cell.w2.weight)
    x = jnp.array([0.7, -1.1])
    solver = ik.Picard(rtol=1e-12, atol=1e-13)
    deq = ik.models.DEQ(cell, (5,), solver, max_steps=300)
    key = jr.key(7)
    z = deq(x, key=key)
    prepared = ik.nn.prepare(cell, key=key)
    mask = prepared.drop.mask
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0.0, 2.0}
    assert 0 < int(jnp.sum(mask == 0)) < 16
    # The solution is the fixed point of the map with that one mask.
    np.testing.assert_allclose(prepared(z, x), z, atol=1e-11)
    assert float(jnp.max(jnp.abs(deq(x, key=jr.key(8)) - z))) > 1e-3
    z_inf = deq(x, inference=True)
    np.testing.assert_allclose(ik.nn.prepare(cell, inference=True)(z_inf, x), z_inf,
                               atol=1e-11)
    with pytest.raises(ValueError, match="needs a `key`"):
        deq(x)
    with pytest.raises(RuntimeError, match="prepared once per solve"):
        cell(z, x)


def test_conv_cell_deq_runs_under_vmap_with_dropout():
    cell = ik.nn.ConvCell(8, groups=4, dropout=0.1, key=jr.key(0))
    deq = ik.models.DEQ(cell, (8, 6, 6), ik.Picard(rtol=1e-4, atol=1e-6), max_steps=300)
    xs = jr.normal(jr.key(1), (3, 8, 6, 6))
    keys = jr.split(jr.key(2), 3)
    zs, st = eqx.filter_jit(jax.vmap(lambda x, k: deq(x, key=k, return_stats=True)))(xs, keys)
    for i in range(3):
        prepared = ik.nn.prepare(cell, key=keys[i])
        res = jnp.linalg.norm(prepared(zs[i], xs[i]) - zs[i])
        assert float(res) <= float(st.residual[i]) * 10 + 1e-5
    assert bool(jnp.all(st.result == ik.RESULTS.successful))
    with pytest.raises(ValueError, match="must divide"):
        ik.nn.ConvCell(6, groups=4, key=jr.key(0))


# ---------------------------------------------------------------- subhomogeneous DEQ


def test_subhomogeneity_degrees():
    assert abs(ik.nn.subhomogeneity_degree(1.2) - 0.9991) < 1e-4
    assert abs(ik.nn.subhomogeneity_degree(1.603) - 0.4992) < 1e-4
    with pytest.raises(ValueError, match="contraction bound"):
        ik.nn.SubhomogeneousCell(4, 2, shift=1.5, normalise=True, key=jr.key(0))
    with pytest.raises(ValueError, match="must be > 1"):
        ik.nn.subhomogeneity_degree(0.5)


@pytest.mark.parametrize("normalise", [False, True])
def test_subhomogeneous_unique_fixed_point_for_a_large_signed_w(normalise):
    n = 24
    cell = ik.nn.SubhomogeneousCell(n, 3, normalise=normalise, key=jr.key(0))
    w = jr.normal(jr.key(1), (n, n))
    cell = eqx.tree_at(lambda c: c.w, cell, 20.0 * w / jnp.linalg.norm(w, 2))
    x = jnp.array([0.5, -0.2, 1.0])
    starts = jr.uniform(jr.key(2), (10, n), minval=0.1, maxval=3.0)
    solver = ik.Anderson(rtol=1e-12, atol=1e-13, damping=0.5)

    def solve(z0):
        return ik.fixed_point(cell, z0, x, solver, max_steps=2000, throw=False)

    sols = jax.vmap(solve)(starts)
    assert bool(jnp.all(sols.result == ik.RESULTS.successful))
    spread = float(jnp.max(jnp.abs(sols.value - sols.value[0])))
    assert spread < 1e-10
    assert float(jnp.min(sols.value)) > 0


# ---------------------------------------------------------------- graph solver


def _graph(seed=0, n=12, heads=3, d=2):
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    adj = (jr.uniform(k1, (n, n)) < 0.35).astype(float)
    logits = jr.uniform(k2, (heads, n, n), minval=0.05, maxval=0.95)
    b = jr.normal(k3, (heads, n, d))
    return logits, adj, b


def test_graph_solver_linear_solve_unroll_ift_and_fd_agree():
    logits, adj, b = _graph()
    gamma = 0.5
    a = ik.nn.contracting_graph_map(logits, adj)
    assert float(jnp.max(jnp.sum(jnp.abs(a), -1))) <= 1.0
    h = ik.nn.graph_fixed_point(logits, adj, b, gamma)

    def unrolled(logits, b, steps=200):
        a = ik.nn.contracting_graph_map(logits, adj)
        hh = jnp.zeros_like(b)
        for _ in range(steps):
            hh = gamma * a @ hh + b
        return hh

    np.testing.assert_allclose(h, unrolled(logits, b), atol=1e-14)
    c = jr.normal(jr.key(5), h.shape)

    def loss_solve(logits, b):
        return jnp.sum(c * ik.nn.graph_fixed_point(logits, adj, b, gamma))

    def loss_unroll(logits, b):
        return jnp.sum(c * unrolled(logits, b))

    g_solve = jax.grad(loss_solve, (0, 1))(logits, b)
    g_unroll = jax.grad(loss_unroll, (0, 1))(logits, b)
    # The implicit formula by hand: gbar = (I - gamma A)^-T Hbar, bbar = gbar,
    # Abar = gamma gbar H*^T, chained through the clip-and-degree map.
    eye = jnp.eye(adj.shape[0])
    gbar = jnp.linalg.solve(jnp.swapaxes(eye - gamma * a, -1, -2), c)
    abar = gamma * gbar @ jnp.swapaxes(h, -1, -2)
    _, vjp = jax.vjp(lambda lg: ik.nn.contracting_graph_map(lg, adj), logits)
    g_ift = (vjp(abar)[0], gbar)
    for gs, gu, gi in zip(g_solve, g_unroll, g_ift):
        np.testing.assert_allclose(gs, gu, atol=1e-13)
        np.testing.assert_allclose(gs, gi, atol=1e-13)
    eps = 1e-6
    direction = jr.normal(jr.key(6), b.shape)
    fd = (loss_solve(logits, b + eps * direction) - loss_solve(logits, b - eps * direction))
    fd = fd / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g_solve[1], direction), fd, rtol=1e-9)
    dl = jr.normal(jr.key(7), logits.shape)
    fd = (loss_solve(logits + eps * dl, b) - loss_solve(logits - eps * dl, b)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g_solve[0], dl), fd, rtol=1e-7)


def test_graph_layer_and_errors():
    layer = ik.nn.ConvergentGraphLayer(3, 4, heads=2, key=jr.key(0))
    nodes = jr.normal(jr.key(1), (7, 3))
    adj = (jr.uniform(jr.key(2), (7, 7)) < 0.4).astype(float)
    out = layer(nodes, adj)
    assert out.shape == (7, 8)
    with pytest.raises(ValueError, match="`gamma` must be in"):
        ik.nn.graph_fixed_point(*_graph(), gamma=1.0)
    logits, adj, b = _graph()
    with pytest.raises(ValueError, match="`b` must be"):
        ik.nn.graph_fixed_point(logits, adj, b[:, :5])


# ---------------------------------------------------------------- Hopfield


def _patterns(d=32, n=200, seed=0):
    x = jr.normal(jr.key(seed), (d, n))
    return x / jnp.linalg.norm(x, axis=0)


@pytest.mark.parametrize("beta", [8.0, 1.0, 0.05])
def test_hopfield_energy_never_increases(beta):
    x = _patterns()
    xi = x[:, 3] + 0.5 * jr.normal(jr.key(1), (32,)) / jnp.sqrt(32.0)
    energies = [ik.nn.hopfield_energy(xi, x, beta)]
    for _ in range(10):
        xi = ik.nn.hopfield_update(xi, x, beta)
        energies.append(ik.nn.hopfield_energy(xi, x, beta))
    e = np.asarray(energies)
    assert np.all(np.diff(e) <= 1e-12), e


def test_hopfield_update_is_attention_and_layer_retrieves():
    x = _patterns()
    beta = 0.37
    xi = jr.normal(jr.key(2), (32,))
    att = jax.nn.dot_product_attention(xi[None, None, :], x.T[:, None, :], x.T[:, None, :],
                                       scale=beta)
    # (jax.nn.dot_product_attention computes its softmax in float32: 1e-5 relative.)
    np.testing.assert_allclose(ik.nn.hopfield_update(xi, x, beta), att[0, 0], rtol=3e-5,
                               atol=1e-8)
    # Well separated at beta = 32: retrieval of the stored pattern from a noisy query.
    layer = ik.models.HopfieldLayer(beta=32.0)
    query = x[:, 5] + 0.3 * jr.normal(jr.key(3), (32,)) / jnp.sqrt(32.0)
    np.testing.assert_allclose(layer(query, x), x[:, 5], atol=1e-6)
    # A model's rule: failures reported in its stats (throw=False), not raised.
    _, st = layer(query, x, return_stats=True)
    assert bool(st.result == ik.RESULTS.successful) and float(st.residual) < 1e-5
    _, st = ik.models.HopfieldLayer(beta=2.0, max_steps=1)(query, x, return_stats=True)
    assert bool(st.result == ik.RESULTS.nonlinear_max_steps_reached)
    # Implicit gradient at a metastable point matches finite differences.
    layer = ik.models.HopfieldLayer(beta=2.0, solver=ik.Picard(rtol=1e-13, atol=1e-14),
                                max_steps=500)
    c = jr.normal(jr.key(4), (32,))

    def loss(p):
        return jnp.dot(c, layer(query, p))

    g = jax.grad(loss)(x)
    direction = jr.normal(jr.key(5), x.shape)
    eps = 1e-6
    fd = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, direction), fd, rtol=1e-6)


def test_multiscale_cell_exchanges_information_between_resolutions():
    """MDEQ's cell: each resolution's output depends on every resolution's state (the
    fusion), the input enters at the highest only (its branch), the state shapes halve;
    in a DEQ its equilibrium is a fixed point of the whole tuple and its implicit
    gradient matches float64 finite differences."""
    cell = ik.nn.MultiscaleCell((2, 4), (5, 4), groups=2, key=jr.key(0))
    assert cell.state_shape == ((2, 5, 4), (4, 3, 2))
    z = tuple(jr.normal(k, s) for k, s in zip(jr.split(jr.key(1)), cell.state_shape))
    x = jr.normal(jr.key(2), (2, 5, 4))
    apply = eqx.filter_jit(lambda c, z, x: c(z, x))
    base = apply(cell, z, x)

    def moved(c, z, x):  # how much each output moved from `base`
        return [float(jnp.max(jnp.abs(a - b))) for a, b in zip(apply(c, z, x), base)]

    for r in range(2):  # a change of resolution r reaches both outputs
        bumped = tuple(zs + 0.5 * (i == r) for i, zs in enumerate(z))
        assert min(moved(cell, bumped, x)) > 1e-3, r
    assert min(moved(cell, z, x + 0.5)) > 1e-3  # x reaches resolution 1 by the fusion...
    no_fuse = eqx.tree_at(lambda c: c.fuse[1][0][0][0].weight, cell,
                          replace_fn=jnp.zeros_like)
    base = apply(no_fuse, z, x)
    assert moved(no_fuse, z, x + 0.5)[1] == 0.0  # ...and only by it
    deq = ik.models.DEQ(cell, cell.state_shape, ik.Anderson(rtol=1e-12, atol=1e-12),
                        max_steps=300, throw=True)
    zs = deq(x)
    res = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(
        lambda a, b: a - b, apply(cell, zs, x), zs))[0]
    assert float(jnp.linalg.norm(res)) < 1e-10
    c = jr.normal(jr.key(3), (2 * 20 + 4 * 6,))

    def loss(x):
        return jnp.dot(c, jax.flatten_util.ravel_pytree(deq(x))[0])

    v = jr.normal(jr.key(4), x.shape)
    eps = 1e-6
    fd = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(jax.grad(loss)(x), v), fd, rtol=1e-6)
    with pytest.raises(ValueError, match="two or more resolutions"):
        ik.nn.MultiscaleCell((4,), (4, 4), key=jr.key(0))
