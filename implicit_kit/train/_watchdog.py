"""A watchdog between the processes of a multi-process run: the death of one ends the
others within a bounded, configurable time, with one line naming the lost process.

Without it, a surviving process waits inside a collective until JAX's coordination
service gives up (`heartbeat_timeout_seconds`, 100 s by default), then aborts with
SIGABRT and a C++ check-failure dump. Here every process holds a TCP connection to
process 0 (a port beside the coordinator's) and both ends send a heartbeat byte every
`timeout / 4` seconds: a connection closed by the kernel (the peer was killed) is seen
at once, a silent one (its host froze) after `timeout` seconds. A process that finishes
says goodbye first, so a normal end is never reported as a loss.
"""

import os
import socket
import sys
import threading
import time


_HEARTBEAT, _BYE = b"H", b"B"


class PeerWatchdog:
    """Start with `start()` after `jax.distributed.initialize`, `stop()` at a normal
    end. `on_lost(message)` (default: print the message to stderr and `os._exit(1)`)
    is called once, from a watchdog thread, when a peer is lost."""

    def __init__(self, host: str, port: int, num_processes: int, process_id: int, *,
                 timeout: float = 30.0, connect_timeout: float = 300.0, on_lost=None):
        if not timeout > 0:
            raise ValueError(f"`timeout` must be > 0 seconds, got {timeout!r}.")
        self.host, self.port = host, port
        self.n, self.me = num_processes, process_id
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.on_lost = on_lost or _exit_with
        self._conns: dict[int, socket.socket] = {}
        self._finished: set[int] = set()
        self._stopping = threading.Event()
        self._fired = threading.Lock()
        self._reported = threading.Event()
        self.lost_message: str | None = None
        self._server = None

    # -- lifecycle
    def start(self) -> "PeerWatchdog":
        if self.me == 0:
            self._server = socket.create_server(("", self.port), reuse_port=False)
            self._server.settimeout(1.0)
            threading.Thread(target=self._accept, daemon=True).start()
        else:
            conn = self._connect()
            conn.sendall(f"P{self.me}\n".encode())
            self._watch(0, conn)
        threading.Thread(target=self._beat, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for conn in list(self._conns.values()):
            try:
                conn.sendall(_BYE)
                conn.close()
            except OSError:
                pass
        if self._server is not None:
            self._server.close()

    def wait_for_loss(self, timeout: float) -> str | None:
        """Wait up to `timeout` seconds for a peer's loss to be reported; its message,
        or None. With the default `on_lost` the process ends before this returns: for a
        collective that failed because a peer died (gloo sees the reset connection
        first), the watchdog's line is then the only one printed."""
        self._reported.wait(timeout)
        return self.lost_message

    # -- internals
    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                return socket.create_connection((self.host, self.port), timeout=5.0)
            except OSError:
                if time.monotonic() > deadline:
                    self._lost(0, f"its watchdog at {self.host}:{self.port} could not be "
                               f"reached for {self.connect_timeout:.0f} s")
                    raise
                time.sleep(0.2)

    def _accept(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        while len(self._conns) < self.n - 1 and not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, self.n)) - set(self._conns))
                    self._lost(missing[0], "it never joined the watchdog (within "
                               f"{self.connect_timeout:.0f} s)")
                    return
                continue
            except OSError:
                return
            conn.settimeout(self.connect_timeout)
            hello = b""
            while not hello.endswith(b"\n"):
                chunk = conn.recv(16)
                if not chunk:
                    break
                hello += chunk
            try:
                peer = int(hello.strip()[1:])
            except ValueError:
                conn.close()
                continue
            self._watch(peer, conn)

    def _watch(self, peer: int, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        self._conns[peer] = conn
        threading.Thread(target=self._listen, args=(peer, conn), daemon=True).start()

    def _listen(self, peer: int, conn: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                data = conn.recv(64)
            except TimeoutError:
                self._lost(peer, f"no heartbeat for {self.timeout:g} s")
                return
            except ConnectionResetError:
                # A peer killed with bytes unread in its socket resets the connection
                # (RST) instead of closing it (EOF): the same event.
                if not self._stopping.is_set() and peer not in self._finished:
                    self._lost(peer, "it exited or was killed")
                return
            except OSError as err:
                if self._stopping.is_set():
                    return
                self._lost(peer, f"its connection failed: {err}")
                return
            if not data:
                if not self._stopping.is_set() and peer not in self._finished:
                    self._lost(peer, "it exited or was killed")
                return
            if _BYE in data:
                self._finished.add(peer)
                return

    def _beat(self) -> None:
        interval = min(self.timeout / 4, 1.0)
        while not self._stopping.wait(interval):
            for peer, conn in list(self._conns.items()):
                if peer in self._finished:
                    continue
                try:
                    conn.sendall(_HEARTBEAT)
                except OSError:
                    pass  # the listener reports it

    def _lost(self, peer: int, why: str) -> None:
        if self._stopping.is_set() or not self._fired.acquire(blocking=False):
            return
        message = (f"process {peer} of {self.n} was lost ({why}); process {self.me} "
                   "stops too. Restart every process with --resume to continue from the "
                   "last checkpoint.")
        self.on_lost(message)  # the default ends the process here
        self.lost_message = message
        self._reported.set()


def _exit_with(message: str) -> None:
    print(f"implicit-kit train: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)
