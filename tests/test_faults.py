"""Fault injection for the training layer: two runs on one directory, SIGINT, kills
during checkpoint writes, a full or read-only disk (tmpfs, as root), corrupt checkpoints,
failure policies, bad configs, and one of two processes killed. Every failure is loud:
one line naming the cause and what to do, never lost work, never a silent overwrite."""

import contextlib
import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

import implicit_kit as ik
from implicit_kit._cli import main
from implicit_kit.train import (
    _checkpoint,
    _loop,
    CheckpointError,
    config_from_dict,
    ConfigError,
    fit,
    load_config,
    RunDirError,
    TrainingError,
    TrainingInterrupted,
)
from implicit_kit.train._rundir import LOCK_NAME, run_lock

from .helpers import xla_flags
from .test_train import _cfg, _leaves


ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
       "XLA_FLAGS": xla_flags()}


class _Stop(Exception):
    pass


def _stop_after_first_step(epoch, step):
    raise _Stop


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _yaml_config(tmp_path, run_dir, epochs=2, name="tiny"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "model": {"kind": "deq", "adjoint": "phantom", "max_steps": 8, "hidden": 8,
                  "final": 16, "residual": False},
        "train": {"epochs": epochs, "batch": 64, "progress": False,
                  "checkpoint_dir": str(run_dir)}}))
    return path


def _history(run_dir):
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------ one run per directory
def test_a_directory_in_use_is_refused_a_stale_lock_taken_over(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    with run_lock(run_dir):  # a live owner: this very process
        with pytest.raises(RunDirError, match=rf"in use by process {os.getpid()} on .*"
                           r"--force"):
            fit(cfg)
        assert not list(run_dir.glob("*.ckpt"))
    assert not (run_dir / LOCK_NAME).exists()  # released
    # A lock left by a process that died, and a temporary file of a write it did not
    # finish: the next run takes the lock over and removes the temporary.
    (run_dir / LOCK_NAME).write_text(json.dumps(
        {"host": os.uname().nodename, "pid": _dead_pid(), "started": "then"}))
    stale = run_dir / "epoch-0001.ckpt.abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    with pytest.raises(_Stop):
        fit(cfg, step_callback=_stop_after_first_step)
    assert not stale.exists() and not (run_dir / LOCK_NAME).exists()
    # A lock of another host cannot be checked: refused, unless forced.
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunDirError, match="process 1 on elsewhere"):
        fit(cfg)
    with pytest.raises(_Stop):
        fit(cfg, force=True, step_callback=_stop_after_first_step)


@pytest.mark.slow
def test_two_cli_runs_sigint_and_resume_with_overrides(tmp_path):
    """Run A holds the directory; run B on it is refused by name (exit 2, A untouched);
    SIGINT stops A cleanly (exit 130, one line saying how to resume, the checkpoint of
    the last completed epoch on disk); `--resume` followed by an override continues."""
    run_dir = tmp_path / "run"
    config = _yaml_config(tmp_path, run_dir, epochs=20)
    a = subprocess.Popen([sys.executable, "-m", "implicit_kit", "train", str(config)],
                         env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "epoch-0001.ckpt").exists():
            assert a.poll() is None, a.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        b = subprocess.run([sys.executable, "-m", "implicit_kit", "train", str(config)],
                           env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2
        assert f"is in use by process {a.pid}" in b.stderr, b.stderr
        assert "Traceback" not in b.stderr
        a.send_signal(signal.SIGINT)
        out, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "interrupted; the checkpoint of epoch" in last and "--resume" in last, err
    done = len(_history(run_dir))
    assert [p.name for p in ik.train.list_checkpoints(run_dir)][-1] == f"epoch-{done:04d}.ckpt"
    assert not (run_dir / LOCK_NAME).exists() and not list(run_dir.glob("*.tmp"))
    # the override after --resume is taken (argparse once refused it); one that would
    # change the training (the schedule's length) is refused by name
    r = subprocess.run([sys.executable, "-m", "implicit_kit", "train", str(config),
                        "--resume", "train.epochs=30"], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "the config differs at train.epochs" in r.stderr
    r = subprocess.run([sys.executable, "-m", "implicit_kit", "train", str(config),
                        "--resume", "train.keep_checkpoints=1"], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["epoch"] for row in _history(run_dir)] == list(range(1, 21))
    assert [p.name for p in ik.train.list_checkpoints(run_dir)] == ["epoch-0020.ckpt"]


def test_sigint_inside_fit_stops_at_the_next_step_with_the_epoch_on_disk(tmp_path):
    cfg = _cfg(tmp_path, "deq", "int", train={"epochs": 3})

    def interrupt(epoch, step):
        if epoch == 2 and step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next step boundary

    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN when pytest runs in the background)
    with pytest.raises(TrainingInterrupted) as info:
        fit(cfg, step_callback=interrupt)
    assert info.value.epoch == 1 and info.value.run_dir == tmp_path / "int"
    assert [p.name for p in ik.train.list_checkpoints(tmp_path / "int")] == [
        "epoch-0001.ckpt"]
    assert len(_history(tmp_path / "int")) == 1
    assert not (tmp_path / "int" / LOCK_NAME).exists()
    # the caller's SIGINT handler is back: nothing of the run is left installed
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------ checkpoints
_KILL_IN_WRITE = """
import os, signal, sys
import implicit_kit as ik
from implicit_kit.train import _checkpoint
real = os.replace
def replace(src, dst):
    # the epoch-2 checkpoint is complete in its temporary file: killed before the rename
    if str(dst).endswith("epoch-0002.ckpt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
_checkpoint.os.replace = replace
cfg = ik.train.load_config(sys.argv[1])
ik.train.fit(cfg)
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_then_resume_is_exact(tmp_path):
    run_dir = tmp_path / "cut"
    config = _yaml_config(tmp_path, run_dir, epochs=3, name="cut")
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_WRITE, str(config)], env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in ik.train.list_checkpoints(run_dir)] == ["epoch-0001.ckpt"]
    assert len(list(run_dir.glob("*.tmp"))) == 1  # the killed write's temporary
    assert len(_history(run_dir)) == 1  # the log is never ahead of the checkpoints
    # resumed, and an uninterrupted run, both as the CLI runs them (float32 and no x64,
    # unlike this test process): the final checkpoints hold the same bytes
    full_config = _yaml_config(tmp_path, tmp_path / "full", epochs=3, name="full")
    runs = [subprocess.Popen([sys.executable, "-m", "implicit_kit", "train", str(c), *extra],
                             env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for c, extra in ((config, ["--resume"]), (full_config, []))]
    for r in runs:
        _, err = r.communicate(timeout=600)
        assert r.returncode == 0, err[-3000:]
    assert not list(run_dir.glob("*.tmp"))
    resumed, _ = ik.train.read_header(run_dir / "epoch-0003.ckpt")
    full, _ = ik.train.read_header(tmp_path / "full" / "epoch-0003.ckpt")
    assert resumed["sha256"] == full["sha256"]
    assert [r["loss"] for r in _history(run_dir)] == [
        r["loss"] for r in _history(tmp_path / "full")]


def test_resume_where_the_run_moved_and_from_the_newest_valid_checkpoint(tmp_path,
                                                                           monkeypatch):
    cfg = _cfg(tmp_path, "deq", "a", train={"epochs": 2, "keep_checkpoints": 2})
    fit(cfg)
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    (tmp_path / "a").rename(moved)
    old, new = ik.train.list_checkpoints(moved)
    raw = bytearray(new.read_bytes())
    raw[-10] ^= 0xFF
    new.write_bytes(bytes(raw))
    # spelled otherwise (relative, trailing slash), keeping another number of checkpoints
    monkeypatch.chdir(tmp_path)
    spelled = _cfg(tmp_path, "deq", "a", train={"epochs": 2, "keep_checkpoints": 3,
                                                "checkpoint_dir": "elsewhere/b/"})
    with pytest.raises(CheckpointError, match=r"epoch-0002\.ckpt.*corrupt.*"
                       r"epoch-0001\.ckpt beside it is valid: pass --resume-valid"):
        fit(spelled, resume=True)
    with pytest.warns(RuntimeWarning, match="resuming from .*epoch-0001.ckpt"):
        result = fit(spelled, resume=True, resume_valid=True)
    assert [r["epoch"] for r in result.history] == [1, 2]
    # the corrupt file is set aside (kept for inspection), not deleted or overwritten
    assert (moved / "epoch-0002.ckpt.corrupt").read_bytes() == bytes(raw)
    assert sorted(p.name for p in moved.glob("epoch-*.ckpt")) == [
        "epoch-0001.ckpt", "epoch-0002.ckpt"]
    # the stored config still names the old directory: only where it lives differs
    header, _ = ik.train.read_header(moved / "epoch-0002.ckpt")
    assert header["config"]["train"]["checkpoint_dir"] == "elsewhere/b/"


# ----------------------------------------------------------------------------- disks
@contextlib.contextmanager
def _tmpfs(path, options):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _no_setup(*args, **kwargs):
    raise AssertionError("data and model were set up before the disk was checked")


def test_read_only_and_full_disks_fail_before_training(tmp_path, monkeypatch, capsys):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        config = _yaml_config(tmp_path, ro / "run")
        monkeypatch.setattr(_loop, "_setup", _no_setup)
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(ro / "run") in err[0] and "EROFS" in err[0], err
    monkeypatch.undo()
    with _tmpfs(tmp_path / "full", "size=16k") as full:  # smaller than one checkpoint
        config = _yaml_config(tmp_path, full / "run", name="full")
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "No space left on device (ENOSPC)" in err[0], err
        assert not list((full / "run").glob("*.tmp"))


def test_a_disk_that_fills_during_training_keeps_the_log_behind(tmp_path, monkeypatch,
                                                                 capsys):
    real = _checkpoint.save_checkpoint

    def save(directory, epoch, *args, **kwargs):
        if epoch == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(directory, epoch, *args, **kwargs)

    monkeypatch.setattr(_loop, "save_checkpoint", save)
    run_dir = tmp_path / "run"
    assert main(["train", str(_yaml_config(tmp_path, run_dir, epochs=3))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint of epoch 2" in err[0] and "ENOSPC" in err[0], err
    assert "--resume" in err[0] and str(run_dir) in err[0]
    assert len(_history(run_dir)) == 1  # the log lists only the checkpointed epoch
    assert [p.name for p in ik.train.list_checkpoints(run_dir)] == ["epoch-0001.ckpt"]
    assert not (run_dir / LOCK_NAME).exists()


# ------------------------------------------------------------------ failure policies
def _poisoned_load_splits(real):
    def load(d, dtype):
        (x, y), val, test = real(d, dtype)
        x = x.copy()
        x[0] = np.nan  # one training image: the step whose batch holds it is non-finite
        return (x, y), val, test

    return load


def test_nonfinite_steps_are_skipped_or_raise(tmp_path, monkeypatch):
    monkeypatch.setattr(_loop, "load_splits", _poisoned_load_splits(_loop.load_splits))
    cfg = _cfg(tmp_path, "deq", "skip", train={"epochs": 1})
    result = fit(cfg)
    row = result.history[0]
    steps = 1437 // 64  # full batches only (seed 0 keeps the NaN image in one)
    # exactly the one step holding the NaN image was skipped; the rest were applied
    assert row["nonfinite_steps"] * steps == pytest.approx(1)
    assert row["skipped_steps"] * steps == pytest.approx(1)
    # (had the NaN step been applied, every parameter would be NaN)
    assert all(np.isfinite(a).all() for a in _leaves(result.model))
    assert np.isfinite(row["loss"])
    raising = _cfg(tmp_path, "deq", "raise", train={"epochs": 1, "on_nonfinite": "raise"})
    with pytest.raises(TrainingError, match=r"epoch 1, step \d+: its gradient was not "
                       r"finite.*not applied.*on_nonfinite: raise"):
        fit(raising)


@pytest.mark.slow
def test_unconverged_steps_follow_their_policy(tmp_path):
    # one Picard-like step per solve: no sample converges
    base = {"model": {"max_steps": 1, "solver": "picard"}, "train": {"epochs": 1}}
    with pytest.raises(TrainingError, match=r"epoch 1, step 1: a forward solve stopped "
                       r"without converging .*on_unconverged: raise"):
        fit(_cfg(tmp_path, "deq", "r", model=base["model"],
                 train={"epochs": 1, "on_unconverged": "raise"}))
    skipped = fit(_cfg(tmp_path, "deq", "s", model=base["model"],
                       train={"epochs": 1, "on_unconverged": "skip"}))
    applied = fit(_cfg(tmp_path, "deq", "a", model=base["model"], train={"epochs": 1}))
    assert skipped.history[0]["skipped_steps"] == 1.0
    assert applied.history[0]["skipped_steps"] == 0.0
    assert applied.history[0]["unconverged_steps"] == 1.0
    init = _loop._setup(_cfg(tmp_path, "deq", "s", model=base["model"]), None).params
    for x, y in zip(_leaves(init), _leaves(skipped.model)):  # nothing applied
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(_leaves(init),
                                                        _leaves(applied.model)))


# ------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("text, overrides, match", [
    ("name: x\nmodel:\n  kind: deq\n  kind: node\n", [],
     r"duplicate key 'kind' \(lines 3 and 4\)"),
    ("- a\n- b\n", ["train.epochs=2"], r"must be a mapping of sections"),
    ("name: x\nmodel:\n  kind: deq\n", ["optim.lr=.nan"],
     r"key 'optim\.lr' must be a finite number, got nan"),
    ("name: x\nmodel:\n  kind: deq\n", ["model.atol=.inf"],
     r"key 'model\.atol' must be a finite number"),
])
def test_bad_yaml_and_values_are_refused_by_name(tmp_path, text, overrides, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


@pytest.mark.parametrize("override, match", [
    ("model.max_steps=-3", r"'model\.max_steps' must be a positive integer"),
    ("model.max_steps=0", r"'model\.max_steps' must be a positive integer"),
    ("model.rtol=-1e-3", r"'model\.rtol' must be a finite number >= 0"),
    ("model.adjoint_rtol=-1.0", r"'model\.adjoint_rtol' must be a finite number >= 0"),
    ("optim.weight_decay=-0.1", r"'optim\.weight_decay' must be >= 0"),
    ("regularizers.jacobian=-1.0", r"'regularizers\.jacobian' must be >= 0"),
    ("train.on_nonfinite=ignore", r"'train\.on_nonfinite' must be one of"),
])
def test_out_of_range_numbers_are_refused_by_name(override, match):
    # (refused when the config is loaded: each section checks its values when made)
    with pytest.raises(ConfigError, match=match):
        ik.train.check_config(
            config_from_dict({"name": "x", "model": {"kind": "deq"}}, [override]))


# --------------------------------------------------------------------- two processes
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_one_of_two_processes_killed_ends_the_other_with_one_line(tmp_path, victim):
    """Without the watchdog the survivor waited ~77 s inside a collective, then aborted
    with SIGABRT and a C++ check-failure dump."""
    run_dir = tmp_path / "run"
    config = _yaml_config(tmp_path, run_dir, epochs=50)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "implicit_kit", "train", str(config), "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
         "--watchdog-port", str(port + 1),
         "--peer-timeout", "20"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True) for i in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "epoch-0001.ckpt").exists():
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(procs[victim].pid, signal.SIGKILL)
        t0 = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert survivor.returncode == 1, err[-3000:]
    assert elapsed < 20, elapsed
    assert "Check failure" not in err and "Traceback" not in err, err[-3000:]
    # (XLA's C++ logger may still report the lost coordination service after that line,
    # racing with the exit: its lines, `E1207 07:16:52.426219 ...`, are not ours.)
    ours = [ln for ln in err.strip().splitlines() if not re.match(r"[EWIF]\d{4} ", ln)]
    assert ours[-1] == (
        f"implicit-kit train: error: process {victim} of 2 was lost (it exited or was "
        f"killed); process {1 - victim} stops too. Restart every process with --resume "
        "to continue from the last checkpoint.")


def test_peer_watchdog_reports_a_silent_peer_within_its_timeout():
    import socket

    from implicit_kit.train._watchdog import PeerWatchdog

    port = _free_port()
    lost = []
    dog = PeerWatchdog("127.0.0.1", port, 2, 0, timeout=0.5, on_lost=lost.append).start()
    # a peer that joins and then goes silent (a frozen host): no heartbeat, no close
    conn = None
    for _ in range(50):
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.05)
    conn.sendall(b"P1\n")
    t0 = time.monotonic()
    while not lost and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    assert lost and "process 1 of 2 was lost (no heartbeat for 0.5 s)" in lost[0]
    assert time.monotonic() - t0 > 0.4  # not before its timeout (the loop gives up at 5 s)
    conn.close()
    dog.stop()
    # a peer that says goodbye is not lost
    port = _free_port()
    lost = []
    dog0 = PeerWatchdog("127.0.0.1", port, 2, 0, timeout=0.5, on_lost=lost.append).start()
    dog1 = PeerWatchdog("127.0.0.1", port, 2, 1, timeout=0.5, on_lost=lost.append).start()
    time.sleep(1.0)  # heartbeats keep both alive beyond the timeout
    dog1.stop()
    time.sleep(1.0)
    dog0.stop()
    assert lost == []


def test_a_collective_that_fails_before_the_watchdog_reports_gives_its_one_line(
        tmp_path, monkeypatch, capsys):
    """On 2 cores gloo can see the dead peer's reset connection before the watchdog
    does: the CLI then waits for the watchdog's verdict instead of printing the
    traceback of the failed all-reduce."""
    import socket

    import jax

    from implicit_kit import _cli
    from implicit_kit.train._watchdog import PeerWatchdog

    port = _free_port()
    lost = []
    dog = PeerWatchdog("127.0.0.1", port, 2, 0, timeout=5.0, on_lost=lost.append).start()
    for _ in range(50):
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.05)
    conn.sendall(b"P1\n")
    time.sleep(0.2)

    def failing_fit(cfg, **kwargs):
        conn.close()  # the peer dies; the collective fails at once, the report follows
        raise jax.errors.JaxRuntimeError("INTERNAL: Gloo all-reduce failed: Connection "
                                         "reset by peer")

    monkeypatch.setattr(_cli, "_init_distributed", lambda a: dog)
    monkeypatch.setattr(_cli, "fit", failing_fit)
    rc = _cli.main(["train", str(_yaml_config(tmp_path, tmp_path / "run", epochs=1))])
    dog.stop()
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines() == [
        "implicit-kit train: error: process 1 of 2 was lost (it exited or was killed); "
        "process 0 stops too. Restart every process with --resume to continue from the "
        "last checkpoint."], err
