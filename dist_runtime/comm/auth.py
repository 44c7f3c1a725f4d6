"""Rank-to-rank sockets admit only peers that know the job's secret.

Before either side reads anything else, both prove they hold the secret without sending it: the
dialling side sends a random nonce, the listening side answers with its own, the dialler sends
HMAC-SHA256(secret, "dial" + both nonces), and only once that checks out does the listener send
HMAC-SHA256(secret, "listen" + both nonces) back. Fixed-size fields, so a stranger's bytes are
counted, never parsed; the listener proves nothing to a peer that has not proved itself first.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable

from dist_runtime.errors import DistRuntimeError

log = logging.getLogger(__name__)

NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
# Long enough for a rank on a loaded host, short enough that a silent stranger holds up nothing.
HANDSHAKE_TIMEOUT_S = 10.0


class AuthError(DistRuntimeError):
    """A rank link cannot be trusted: this rank has no job secret, or the peer did not prove it."""


def _mac(secret: str, role: bytes, dial_nonce: bytes, listen_nonce: bytes) -> bytes:
    return hmac.new(secret.encode(), role + dial_nonce + listen_nonce, hashlib.sha256).digest()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AuthError("the peer closed the connection during the handshake")
        data += chunk
    return data


def _handshake(steps: Callable[[socket.socket, str], None], sock: socket.socket, secret: str) -> None:
    """Run one side's `steps` under HANDSHAKE_TIMEOUT_S, then give the socket back its own timeout."""
    before = sock.gettimeout()
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        steps(sock, secret)
    except TimeoutError as e:
        raise AuthError(f"no handshake within {HANDSHAKE_TIMEOUT_S:.0f} s") from e
    except OSError as e:
        raise AuthError(f"handshake failed: {e}") from e
    sock.settimeout(before)


def _dial(sock: socket.socket, secret: str) -> None:
    my_nonce = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(my_nonce)
    their_nonce = _recv_exactly(sock, NONCE_BYTES)
    sock.sendall(_mac(secret, b"dial", my_nonce, their_nonce))
    try:
        proof = _recv_exactly(sock, MAC_BYTES)
    except AuthError:
        raise AuthError("the listener refused our proof: its job secret is another") from None
    if not hmac.compare_digest(proof, _mac(secret, b"listen", my_nonce, their_nonce)):
        raise AuthError("the listener does not know the job's secret")


def _listen(sock: socket.socket, secret: str) -> None:
    their_nonce = _recv_exactly(sock, NONCE_BYTES)
    my_nonce = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(my_nonce)
    if not hmac.compare_digest(_recv_exactly(sock, MAC_BYTES), _mac(secret, b"dial", their_nonce, my_nonce)):
        raise AuthError("wrong proof of the job's secret")
    sock.sendall(_mac(secret, b"listen", their_nonce, my_nonce))


def dial(address: tuple[str, int], secret: str, wait_s: float = 0.0) -> socket.socket:
    """A connection to `address` whose listener has proved the secret and heard our proof;
    a listener not up yet is tried again for up to `wait_s`. Raises AuthError or OSError."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            sock = socket.create_connection(address, timeout=HANDSHAKE_TIMEOUT_S)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        _handshake(_dial, sock, secret)
    except AuthError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


class Listener:
    """A listening socket that hands `admit` only connections whose peer proved the secret.

    Each handshake runs on its own thread, so a silent stranger holds up neither the accept
    loop nor a real rank; a stranger is logged and dropped. `admit` runs on that thread."""

    def __init__(self, host: str, port: int, secret: str, admit: Callable[[socket.socket], None], what: str) -> None:
        self.secret, self.admit, self.what = secret, admit, what
        self.server = socket.create_server((host, port), backlog=64)
        self.server.settimeout(0.2)  # the accept loop looks at `closed` this often
        self.address = (host, self.server.getsockname()[1])
        self.closed = False
        self._thread = threading.Thread(target=self._accept, name=f"dist-runtime-{what}", daemon=True)
        self._thread.start()
        log.info("the %s listens at %s:%d", what, *self.address)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed under us
                return
            threading.Thread(target=self._handshake, args=(conn, peer), name=f"dist-runtime-{self.what}-peer",
                             daemon=True).start()

    def _handshake(self, conn: socket.socket, peer: tuple) -> None:
        try:
            _handshake(_listen, conn, self.secret)
        except AuthError as e:
            log.warning("dropped a connection to the %s from %s:%s: %s", self.what, peer[0], peer[1], e)
            conn.close()
            return
        if self.closed:
            conn.close()
            return
        self.admit(conn)

    def close(self) -> None:
        self.closed = True  # the accept loop ends within its poll
        self.server.close()
