"""Every rank watches the others, whatever launcher started them.

Each rank other than 0 keeps one TCP connection to rank 0 and both sides send a heartbeat
every second. A connection that closes means the process is gone (the kernel closes a killed
process's sockets at once); silence means it hangs; a rank also says how long it has been
inside one step, which catches a process whose heartbeat thread still runs while its main
thread is stuck. Rank 0 turns any of these into one verdict naming the rank, tells the other
ranks to leave, and lets the engine fail its requests. A rank that loses rank 0 exits.

Only a rank that proves the job's secret is heard (comm.auth), so a stranger's connection to
the monitor is dropped and ends nothing. Lines on the wire, after that handshake: rank -> 0
"<rank>" once, then "<seconds busy>"; 0 -> rank "." (alive), "bye" (a planned shutdown
follows), "abort <why>".
"""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from dist_runtime.comm.auth import HANDSHAKE_TIMEOUT_S, Listener, dial
from dist_runtime.errors import DistRuntimeError

HEARTBEAT_S = 1.0


class RankLostError(DistRuntimeError):
    def __init__(self, rank: int, why: str) -> None:
        super().__init__(f"rank {rank} lost: {why}")
        self.rank = rank


class Activity:
    """When this rank began the step it is in (None between steps)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def __enter__(self) -> Activity:
        self.since = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.since = None

    def busy_s(self) -> float:
        since = self.since
        return 0.0 if since is None else time.monotonic() - since


def exit_process(why: str) -> None:
    """A rank that lost its job leaves at once: its main thread may be stuck in a collective."""
    print(f"dist-runtime: {why}; exiting", file=sys.stderr, flush=True)
    os._exit(1)


class _Watch:
    """What both sides share: this rank's Activity, its timeouts, and whether it is leaving."""

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.silence_s = max(3 * HEARTBEAT_S, timeout_s / 3)  # heartbeats come every second
        self.activity = Activity()
        self._leaving = False
        self._thread: threading.Thread | None = None

    def leave(self) -> None:
        """A planned shutdown: from now on ranks going quiet or away is no failure."""
        self._leaving = True

    def close(self) -> None:
        self._leaving = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


class Monitor(_Watch):
    """Rank 0's side: the other ranks check in here, and any of them going quiet, away or
    stuck becomes one verdict, handed to `on_lost` and sent to every rank. With one rank,
    just the Activity."""

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        super().__init__(rank, world_size, timeout_s)
        self.failure: RankLostError | None = None
        self.on_lost: list[Callable[[RankLostError], None]] = []
        self._conns: dict[int, socket.socket] = {}
        self._arrived: queue.SimpleQueue[tuple[int, socket.socket]] = queue.SimpleQueue()
        self._listener: Listener | None = None

    def listen(self, host: str, secret: str) -> tuple[str, int]:
        """Open the port where ranks that prove `secret` check in; returns its address."""
        self._listener = Listener(host, 0, secret, self._admit, "liveness monitor")
        self._thread = threading.Thread(target=self._monitor, name="dist-runtime-liveness", daemon=True)
        self._thread.start()
        return self._listener.address

    def explain(self, error: BaseException, wait_s: float = 2.0) -> BaseException:
        """The verdict behind a failed collective, if one comes: a transport error says only
        that a peer went away; the monitor says which rank and why."""
        if self.world_size == 1 or isinstance(error, (DistRuntimeError, KeyboardInterrupt)):
            return error
        deadline = time.monotonic() + wait_s
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.failure or error

    def _admit(self, conn: socket.socket) -> None:
        """A connection that proved the secret (on its handshake's thread): which rank it is."""
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            line = b""
            while not line.endswith(b"\n"):  # byte by byte: heartbeats may follow at once
                line += conn.recv(1) or b"\n"
            rank = int(line)
        except (OSError, ValueError):
            conn.close()
            return
        conn.settimeout(None)
        self._arrived.put((rank, conn))

    def _monitor(self) -> None:
        seen: dict[int, float] = {}  # rank -> when it last spoke
        busy: dict[int, float] = {}
        started = last_beat = time.monotonic()
        buffers: dict[socket.socket, bytes] = {}
        while not self._leaving:
            now = time.monotonic()
            while not self._arrived.empty():
                self._check_in(*self._arrived.get(), seen, now)
            try:
                readable, _, _ = select.select(list(self._conns.values()), [], [], 0.2)
            except (OSError, ValueError):  # closed under us: close() was called
                continue
            now = time.monotonic()
            for sock in readable:
                rank = next((r for r, c in self._conns.items() if c is sock), None)
                data = _recv(sock)
                if rank is None:
                    continue
                if not data:
                    self._conns.pop(rank).close()
                    self._lost(rank, "its process ended (connection closed)")
                    continue
                lines = (buffers.get(sock, b"") + data).split(b"\n")
                buffers[sock] = lines.pop()
                seen[rank] = now
                if lines:
                    busy[rank] = float(lines[-1])
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                self._send_all(b".\n")
            self._judge(seen, busy, now, started)

    def _check_in(self, rank: int, conn: socket.socket, seen: dict[int, float], now: float) -> None:
        if rank in self._conns or not 0 < rank < self.world_size:
            conn.close()  # a rank's connection stays the first one it made
            return
        self._conns[rank] = conn
        seen[rank] = now

    def _judge(self, seen: dict[int, float], busy: dict[int, float], now: float, started: float) -> None:
        if self.failure or self._leaving:
            return
        for rank in range(1, self.world_size):
            if rank not in seen:
                if now - started > self.timeout_s:
                    self._lost(rank, f"it did not check in within {self.timeout_s:.0f} s")
            elif now - seen[rank] > self.silence_s:
                self._lost(rank, f"no heartbeat for {now - seen[rank]:.0f} s (hung or unreachable)")
            elif busy.get(rank, 0.0) > self.timeout_s:
                self._lost(rank, f"stuck in one step for {busy[rank]:.0f} s")
            if self.failure:
                return
        if self.activity.busy_s() > self.timeout_s:
            self._lost(0, f"stuck in one step for {self.activity.busy_s():.0f} s")

    def _lost(self, rank: int, why: str) -> None:
        if self.failure or self._leaving:
            return
        self.failure = RankLostError(rank, why)
        for fn in self.on_lost:  # requests hear of it first: the others' exit may end this process
            fn(self.failure)
        self._send_all(f"abort {self.failure}\n".encode())

    def _send_all(self, line: bytes) -> None:
        for rank, conn in list(self._conns.items()):
            try:
                conn.sendall(line)
            except OSError:
                self._conns.pop(rank, None)

    def leave(self) -> None:
        self._send_all(b"bye\n")
        super().leave()

    def close(self) -> None:
        self._leaving = True
        if self._listener is not None:
            self._listener.close()
        for sock in list(self._conns.values()):  # the monitor thread may still be adding one
            sock.close()
        super().close()


class Heartbeat(_Watch):
    """Another rank's side: one connection to rank 0's monitor, a heartbeat each second that
    says how long this rank has been inside its step, and `on_exit` once rank 0 is gone or
    gives its verdict."""

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        super().__init__(rank, world_size, timeout_s)
        self.on_exit: Callable[[str], None] = exit_process
        self._upstream: socket.socket | None = None

    def check_in(self, address: tuple[str, int], secret: str) -> None:
        """Connect to rank 0's monitor, prove `secret`, keep the heartbeat going."""
        try:
            self._upstream = dial(address, secret, wait_s=self.timeout_s)
        except (OSError, DistRuntimeError) as e:
            raise DistRuntimeError(f"rank {self.rank}: cannot check in with rank 0 at {address}: {e}") from e
        self._upstream.settimeout(5.0)  # a heartbeat that cannot be sent for this long means rank 0 is gone
        self._upstream.sendall(f"{self.rank}\n".encode())
        self._thread = threading.Thread(target=self._heartbeat, name="dist-runtime-liveness", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        sock, buffer = self._upstream, b""
        last_heard = last_beat = time.monotonic()
        while True:
            try:
                readable, _, _ = select.select([sock], [], [], 0.2)
            except (OSError, ValueError):  # closed under us: close() was called
                return None
            now = time.monotonic()
            if readable:
                data = _recv(sock)
                if not data:
                    return None if self._leaving else self.on_exit("rank 0 lost (connection closed)")
                last_heard = now
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    if line == b"bye":
                        self._leaving = True
                    elif line.startswith(b"abort "):
                        return self.on_exit(line[6:].decode())
            if self._leaving:
                continue  # rank 0 is shutting down: its silence or close is expected
            if now - last_heard > self.silence_s:
                return self.on_exit(f"rank 0 lost (no heartbeat for {now - last_heard:.0f} s)")
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                try:
                    sock.sendall(f"{self.activity.busy_s():.1f}\n".encode())
                except OSError:
                    return self.on_exit("rank 0 lost (connection closed)")

    def defer_signals(self, grace_s: float = 8.0) -> None:
        """A rank other than 0, on SIGINT or SIGTERM (launchers send them to every rank at once):
        leave the stop to rank 0, which ends every rank cleanly; exit after `grace_s` if it does not."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame) -> None:
            why = f"got signal {signum} and rank 0 did not stop the job within {grace_s:.0f} s"
            timer = threading.Timer(grace_s, self.on_exit, args=(why,))
            timer.daemon = True
            timer.start()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def close(self) -> None:
        self._leaving = True
        if self._upstream is not None:
            self._upstream.close()
        super().close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except OSError:
        return b""
