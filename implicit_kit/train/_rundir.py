"""The run directory as a resource: one run at a time (a lock naming its owner), a
write test before anything trains, stale temporary files removed, and SIGINT deferred
while a checkpoint is being written.

The lock is a file `run.lock` holding the owner's host, process id and start time,
created with `O_EXCL` (atomic on local and NFSv3+ file systems). A lock whose owner is a
process of this host that no longer exists is stale and is taken over; a lock of another
host cannot be checked and is reported with the way to break it (`train --force`).
"""

import contextlib
import errno
import json
import os
import pathlib
import signal
import socket
import threading
import time

from ._checkpoint import atomic_write, CheckpointError


LOCK_NAME = "run.lock"


class RunDirError(CheckpointError):
    """The run directory is in use by another run, or cannot be written (the message
    names the directory and the cause)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped `fit` between two steps or after a checkpoint: `epoch`
    is the last completed epoch (its checkpoint is on disk; 0 if none), `run_dir` where
    it lives. A `KeyboardInterrupt`, so that code catching those still does."""

    def __init__(self, epoch: int, run_dir: pathlib.Path):
        self.epoch, self.run_dir = epoch, run_dir
        where = (f"the checkpoint of epoch {epoch} is in {str(run_dir)!r}: continue with "
                 "`--resume`" if epoch else f"no epoch completed in {str(run_dir)!r}: "
                 "nothing to resume, run again to start")
        super().__init__(f"interrupted; {where}.")


def _describe_os_error(err: OSError) -> str:
    name = errno.errorcode.get(err.errno, "")
    cause = err.strerror or str(err)
    return f"{cause} ({name})" if name else cause


def write_error(run_dir, action: str, err: OSError) -> RunDirError:
    """A one-line `RunDirError` for an `OSError` raised while `action` in `run_dir`."""
    return RunDirError(f"cannot {action} in run directory {str(run_dir)!r}: "
                       f"{_describe_os_error(err)}.")


def check_writable(run_dir, nbytes: int = 1) -> None:
    """Create `run_dir` and write (then remove) a file of `nbytes` bytes there, so that
    a read-only or full disk is reported before training starts."""
    run_dir = pathlib.Path(run_dir)
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(probe, b"\0" * max(int(nbytes), 1))
        probe.unlink()
    except OSError as err:
        raise write_error(run_dir, f"write {max(int(nbytes), 1)} bytes", err) from None


def remove_stale_temporaries(run_dir) -> list[pathlib.Path]:
    """Remove the temporary files of interrupted atomic writes (`NAME.XXXX.tmp`), which
    only a killed process leaves behind. Call with the lock held."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.name.endswith(".tmp") and p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir, *, force: bool = False):
    """Hold `run_dir/run.lock` for the duration: a second run on the same directory is
    refused with a `RunDirError` naming the owner, unless `force` (which takes the lock
    over). A stale lock (its process on this host has died) is taken over."""
    run_dir = pathlib.Path(run_dir)
    path = run_dir / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(run_dir, "create the directory", err) from None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            same_host = owner.get("host") == me["host"]
            pid = owner.get("pid")
            stale = same_host and isinstance(pid, int) and not _alive(pid)
            if not (stale or force):
                who = (f"process {pid} on {owner.get('host')} (started "
                       f"{owner.get('started')})" if pid else "another run")
                raise RunDirError(
                    f"run directory {str(run_dir)!r} is in use by {who}: wait for it to "
                    "finish, choose another train.checkpoint_dir, or, if that run is "
                    f"gone (e.g. on another host), pass --force (removes {LOCK_NAME})."
                ) from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except OSError as err:
            raise write_error(run_dir, f"create {LOCK_NAME}", err) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - another process took it in between
        raise RunDirError(f"run directory {str(run_dir)!r}: could not take {LOCK_NAME}.")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()


class Interrupts:
    """SIGINT turned into a request that the loop reads at safe points (between steps,
    after a checkpoint): a checkpoint write is never cut in half. A second SIGINT while
    a request is pending interrupts at once (`KeyboardInterrupt`). Outside the main
    thread (where signal handlers cannot be installed) SIGINT keeps its default."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
