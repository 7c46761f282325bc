"""Data parallelism: `ik.shard_batch` (each device loops over its own samples) and
`train.parallel: shard_map` against one device; training across two processes
(`jax.distributed`, CPU collectives over gloo) against one process with two devices,
and its resume after a kill."""

import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import implicit_kit as ik

from .helpers import xla_flags


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_with_devices(script: str, n: int, timeout=600) -> str:
    env = {**os.environ, "XLA_FLAGS": xla_flags(n),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_shard_batch_equals_one_device():
    """A vmapped solve (Anderson, the default implicit adjoint with its lineax GMRES
    fallback traced) and a diffrax ODE solve (checkpointed adjoint), each under
    `ik.shard_batch` on 4 devices: the same values, per-sample step counts and float64
    gradients as on one device, the outputs sharded over the 4 devices; bad `in_axes`
    and a batch that does not divide are errors naming the argument."""
    out = _run_with_devices("""
        import jax
        jax.config.update("jax_enable_x64", True)
        import diffrax as dfx, jax.numpy as jnp, jax.random as jr, numpy as np
        import implicit_kit as ik
        assert len(jax.devices()) == 4
        H, B = 16, 12
        k = jr.split(jr.key(0), 2)
        W = jr.normal(k[0], (H, H)); W = 0.9 * W / jnp.linalg.norm(W, 2)
        x = jr.normal(k[1], (B, H)) * jnp.linspace(0.1, 3.0, B)[:, None]

        def solve(W, x):
            def one(x):
                s = ik.fixed_point(lambda z, a: jnp.tanh(a[0] @ z + a[1]), jnp.zeros(H),
                                   (W, x), ik.Anderson(rtol=1e-10, atol=0.0), throw=False)
                return s.value, s.stats["num_steps"]
            return jax.vmap(one)(x)

        def ode(W, x):
            def one(x):
                term = dfx.ODETerm(lambda t, y, W: jnp.tanh(W @ y))
                s = dfx.diffeqsolve(term, dfx.Dopri5(), 0.0, 1.0, 0.1, x, W,
                                    stepsize_controller=dfx.PIDController(1e-8, 1e-8))
                return s.ys[-1], s.stats["num_steps"]
            return jax.vmap(one)(x)

        for fn in (solve, ode):
            loss = lambda W, f: jnp.sum(f(W, x)[0] ** 2)
            z1, n1 = jax.jit(fn)(W, x)
            z4, n4 = jax.jit(ik.shard_batch(fn, (None, 0)))(W, x)
            assert len(z4.sharding.device_set) == 4, z4.sharding
            g1 = jax.jit(jax.grad(loss), static_argnums=1)(W, fn)
            g4 = jax.jit(jax.grad(loss), static_argnums=1)(W, ik.shard_batch(fn, (None, 0)))
            assert np.array_equal(np.asarray(n1), np.asarray(n4)), (n1, n4)
            assert len(set(np.asarray(n1).tolist())) > 1  # the samples stop apart
            print(fn.__name__, "VALUE", float(jnp.max(jnp.abs(z1 - z4))),
                  "GRAD", float(jnp.linalg.norm(g1 - g4) / jnp.linalg.norm(g1)))

        for bad, needle in [(dict(in_axes=(None, 1)), "in_axes"),
                            (dict(in_axes=(None, 0, 0)), "entries for 2 arguments")]:
            try:
                ik.shard_batch(solve, **bad)(W, x)
            except ValueError as e:
                assert needle in str(e), e
            else:
                raise AssertionError(bad)
        try:
            ik.shard_batch(solve, (None, 0))(W, x[:10])
        except ValueError as e:
            assert "divide evenly over the 4 devices" in str(e), e
        else:
            raise AssertionError("indivisible batch")
        print("ERRORS OK")
    """, 4)
    assert "ERRORS OK" in out
    for line in out.splitlines():
        if "VALUE" in line:
            _, _, value, _, grad = line.split()
            assert float(value) < 1e-12 and float(grad) < 1e-10, line



def test_the_dependency_patch_is_still_needed():
    """The workaround for lineax issue #185 in `_parallel.py`. Before any `shard_batch`,
    a lineax LU solve and diffrax's checkpointed adjoint under a plain `jax.shard_map`
    still fail with the structure mismatch (when this fails, an installed release no
    longer needs the patch: remove it from `_STRUCTURE_HELPERS`); after the first
    `shard_batch` they run, and a structure on a non-manual mesh keeps its sharding
    (nothing changes outside `shard_map` bodies)."""
    out = _run_with_devices("""
        import diffrax as dfx, jax, jax.numpy as jnp, lineax as lx, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import implicit_kit as ik
        from implicit_kit import _parallel
        mesh = Mesh(np.array(jax.devices()), ("data",))
        A = 2.0 * jnp.eye(3)

        def lin(W, b):
            op = lx.MatrixLinearOperator(W)
            return jax.vmap(lambda b: lx.linear_solve(op, b, lx.LU()).value)(b)

        def ode(W, y):
            term = dfx.ODETerm(lambda t, y, W: -W @ y)
            return jax.vmap(lambda y: dfx.diffeqsolve(
                term, dfx.Dopri5(), 0.0, 1.0, 0.1, y, W,
                stepsize_controller=dfx.PIDController(1e-6, 1e-6)).ys[-1])(y)

        b = jnp.ones((2, 3))
        for f in (lin, ode):
            plain = jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=P("data"), check_vma=False)
            try:
                jax.jit(jax.grad(lambda b: plain(A, b).sum()))(b)
            except ValueError as e:
                print(f.__name__, "STILL NEEDED", "out_structure" in str(e)
                      or "structures do not match" in str(e) or "Closure" in str(e))
            else:
                print(f.__name__, "UPSTREAM FIXED")
        assert not _parallel._PATCHED
        for f, want in ((lin, 0.5), (ode, np.exp(-2.0))):
            g = jax.jit(jax.grad(lambda b: ik.shard_batch(f, (None, 0))(A, b).sum()))(b)
            print(f.__name__, "PATCHED ERR", float(jnp.max(jnp.abs(g - want))))
        assert len(_parallel._PATCHED) == 5
        kept = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(mesh, P()))
        assert lx._misc.strip_weak_dtype(kept).sharding == kept.sharding
        print("OUTSIDE KEPT")
    """, 2, timeout=300)
    for name in ("lin", "ode"):
        assert f"{name} STILL NEEDED True" in out, (
            f"{name}: a plain shard_map no longer fails; the installed equinox/lineax may "
            f"not need the patch of `_parallel._STRUCTURE_HELPERS` any more:\n{out}")
    errs = [float(ln.split()[-1]) for ln in out.splitlines() if "PATCHED ERR" in ln]
    assert len(errs) == 2 and max(errs) < 1e-5, out
    assert "OUTSIDE KEPT" in out


def test_the_dependency_patch_is_gated_on_versions(monkeypatch):
    """A release newer than the newest known to need the patch is left alone; a helper
    missing from a release that should have it is a loud error naming it."""
    from implicit_kit import _parallel

    assert _parallel._release("0.13.8") == (0, 13, 8) < _parallel._release("0.13.10rc1")
    assert len(_parallel._helpers_to_patch()) == 5
    monkeypatch.setattr(_parallel.importlib.metadata, "version", lambda dist: "99.0")
    assert _parallel._helpers_to_patch() == []
    monkeypatch.undo()
    monkeypatch.setitem(_parallel._STRUCTURE_HELPERS, "lineax",
                        ("0.1.1", (("lineax._misc", "no_such_helper"),)))
    with pytest.raises(RuntimeError, match="lineax._misc.no_such_helper"):
        _parallel._helpers_to_patch()


@pytest.mark.slow
def test_train_parallel_shard_map_step_equals_one_device():
    """One train step of a DEQ (implicit adjoint with the default backward, GMRES
    fallback included), a HomoODE and a monotone DEQ with `train.parallel: auto` (so
    `shard_map`) on 2 devices gives the metrics and updated parameters of the step on
    one device (to float32 rounding). The step is plain SGD, whose update is linear in
    the gradient: Adam's first step, g / (|g| + eps), turns the rounding of a nearly
    cancelling gradient entry into a change of up to 1e-5 (measured on the DEQ).
    (`jit` on 2 CPU devices fails to run the monotone DEQ's FFTs: an XLA CPU layout
    check, `fft_thunk.cc`; `shard_map` does not.)"""
    out = _run_with_devices("""
        import jax, jax.numpy as jnp, jax.random as jr, numpy as np
        from implicit_kit import data as ik_data
        from implicit_kit.train import load_config
        from implicit_kit.train._loop import _setup
        for name, extra in [("digits_deq", ["model.adjoint=implicit"]),
                            ("digits_homoode", []), ("digits_mondeq", [])]:
            out = {}
            for devices in (jax.devices()[:1], jax.devices()):
                cfg = load_config(f"configs/{name}.yaml", extra + [
                    "train.progress=false", "optim.name=sgd"])
                st = _setup(cfg, devices)
                assert (st.steps.mesh is not None) == (len(devices) > 1)
                params, opt = st.replicate((st.params, st.optimiser.init(st.params)))
                xb, yb = next(iter(ik_data.batches(*st.train, cfg.train.batch, seed=0,
                                                   epoch=1)))
                new, _, m = st.steps.train(params, opt, st.shard(xb), st.shard(yb),
                                           jr.key(1), jnp.asarray(0))
                out[len(devices)] = (jax.tree_util.tree_leaves(new),
                                     {k: float(v) for k, v in m.items()})
            (p0, m0), (p1, m1) = out[1], out[2]
            dp = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(p0, p1))
            dm = max(abs(m0[k] - m1[k]) for k in m0 if m0[k] == m0[k])
            print(name, "PARAMS", dp, "METRICS", dm, "STEPS", m0["num_steps"])
    """, 2)
    lines = [ln for ln in out.splitlines() if "PARAMS" in ln]
    assert len(lines) == 3, out
    for line in lines:
        parts = line.split()
        assert float(parts[2]) < 1e-6 and float(parts[4]) < 1e-5, line
        assert float(parts[6]) > 1, line  # the solves iterate


# ------------------------------------------------------------------ several processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_argv(config, run_dir, *extra, epochs=2):
    return [sys.executable, "-m", "implicit_kit", "train", str(ROOT / "configs" / config),
            f"train.epochs={epochs}", "train.progress=false",
            f"train.checkpoint_dir={run_dir}", *extra]


def _launch_two(config, run_dir, *extra, resume=False, epochs=2):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    return [subprocess.Popen(
        _train_argv(config, run_dir, *extra, epochs=epochs)
        + (["--resume"] if resume else []) + [
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", str(i)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in (0, 1)]


def _wait(procs, timeout=600):
    deadline = time.monotonic() + timeout
    try:
        outs = [p.communicate(timeout=max(1, deadline - time.monotonic()))[0]
                for p in procs]
    finally:
        _kill(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _one_process_two_devices(config, run_dir, epochs=2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(2)}
    proc = subprocess.run(_train_argv(config, run_dir, epochs=epochs), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_leaves(path):
    """The arrays of a checkpoint's payload, in order (`eqx.tree_serialise_leaves`
    writes each leaf with `np.save`)."""
    payload = path.read_bytes().split(b"\n", 2)[2]
    f, leaves = io.BytesIO(payload), []
    while f.tell() < len(payload):
        leaves.append(np.load(f))
    return leaves


def _assert_same_run(a, b, epochs=2):
    ha, hb = _history(a), _history(b)
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb] == list(range(1, epochs + 1))
    for ra, rb in zip(ha, hb):
        for k, v in ra.items():
            if k.startswith("test_") and v is not None:
                assert abs(v - rb[k]) <= 1e-5, (k, v, rb[k])
    la = _checkpoint_leaves(a / f"epoch-{epochs:04d}.ckpt")
    lb = _checkpoint_leaves(b / f"epoch-{epochs:04d}.ckpt")
    assert len(la) == len(lb) > 10
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_after_a_kill(tmp_path):
    """`implicit-kit train --coordinator ... --num-processes 2 --process-id I`: two
    processes (one CPU device each, gloo collectives), each feeding its half of every
    batch, are killed once the epoch-1 checkpoint exists and relaunched with `--resume`.
    The run ends as one process on two devices does, uninterrupted: epoch 1 (written by
    the first launch) and epoch 2 (by the resumed one) have its test metrics (1e-5) and
    its parameters (float32 rounding); only process 0 writes the log, checkpoints and
    plots. (The processes' data feeding and collectives do not depend on the model; a
    HomoODE and a monotone DEQ on two devices are
    `test_train_parallel_shard_map_step_equals_one_device`'s.)"""
    _one_process_two_devices("digits_deq.yaml", tmp_path / "one")
    run = tmp_path / "two"
    procs = _launch_two("digits_deq.yaml", run)
    deadline = time.monotonic() + 600
    try:
        while not (run / "epoch-0001.ckpt").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate()[0][-2000:] for p in procs if p.poll() is not None]
            time.sleep(0.02)
    finally:
        _kill(procs)
    assert not (run / "epoch-0002.ckpt").exists()  # killed during epoch 2
    outs = _wait(_launch_two("digits_deq.yaml", run, resume=True))
    _assert_same_run(tmp_path / "one", run)
    assert "log, checkpoints and plots" in outs[0]
    assert "log, checkpoints and plots" not in outs[1]


def test_distributed_flags_go_together(tmp_path, capsys):
    from implicit_kit._cli import main

    code = main(["train", str(ROOT / "configs" / "digits_deq.yaml"), "--coordinator",
                 "127.0.0.1:1234"])
    assert code == 2
    assert "--coordinator, --num-processes and --process-id go together" in \
        capsys.readouterr().err
    assert ik.shard_batch  # (the public name this file tests)
