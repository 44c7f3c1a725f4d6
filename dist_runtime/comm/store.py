"""The rendezvous store for ranks that meet over TCP: a torch.distributed Store (what gloo's
process groups and PrefixStore take) served by rank 0 over sockets that only admit a peer
that proved the job's secret (comm.auth). torch's TCPStore admits anyone who connects."""

from __future__ import annotations

import datetime
import socket
import struct
import threading

import torch.distributed as dist

from dist_runtime.comm.auth import Listener, dial
from dist_runtime.comm.channel import recv_message, send_message
from dist_runtime.errors import DistRuntimeError

_LENGTH = struct.Struct("!Q")


def _send(sock: socket.socket, parts: list[bytes]) -> None:
    send_message(sock, b"".join(_LENGTH.pack(len(part)) + part for part in parts))


def _recv(sock: socket.socket) -> list[bytes]:
    data, parts, at = recv_message(sock), [], 0
    while at < len(data):
        (size,) = _LENGTH.unpack_from(data, at)
        parts.append(bytes(data[at + _LENGTH.size:at + _LENGTH.size + size]))
        at += _LENGTH.size + size
    return parts


class _Keys:
    """Rank 0's keys and the requests that change or wait for them; one thread per rank's socket."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.changed = threading.Condition()

    def serve(self, conn: socket.socket) -> None:
        ops = {b"set": self._set, b"get": self._get, b"add": self._add, b"compare_set": self._compare_set,
               b"delete_key": self._delete_key, b"num_keys": self._num_keys, b"check": self._check,
               b"wait": self._wait}
        with conn:
            while True:
                try:
                    op, *args = _recv(conn)
                except (OSError, ValueError):  # the rank closed its store, or left
                    return
                with self.changed:
                    try:
                        reply = [b"ok", *ops[op](*args)]
                    except (KeyError, TypeError, ValueError, TimeoutError) as e:
                        reply = [b"error", f"{op.decode(errors='replace')}: {e}".encode()]
                    self.changed.notify_all()
                try:
                    _send(conn, reply)
                except OSError:
                    return

    def _await(self, keys: tuple[bytes, ...], timeout_ms: bytes) -> None:
        if not self.changed.wait_for(lambda: all(k in self.data for k in keys), int(timeout_ms) / 1000):
            raise TimeoutError(f"keys {[k.decode() for k in keys]} did not appear within {int(timeout_ms) / 1000} s")

    def _set(self, key: bytes, value: bytes) -> list[bytes]:
        self.data[key] = value
        return []

    def _get(self, key: bytes, timeout_ms: bytes) -> list[bytes]:
        self._await((key,), timeout_ms)
        return [self.data[key]]

    def _add(self, key: bytes, amount: bytes) -> list[bytes]:
        self.data[key] = str(int(self.data.get(key, b"0")) + int(amount)).encode()
        return [self.data[key]]

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> list[bytes]:
        # as TCPStore: an absent key counts as holding b""
        if self.data.get(key, b"") == expected:
            self.data[key] = desired
        return [self.data.get(key, expected)]

    def _delete_key(self, key: bytes) -> list[bytes]:
        return [b"1" if self.data.pop(key, None) is not None else b""]

    def _num_keys(self) -> list[bytes]:
        return [str(len(self.data)).encode()]

    def _check(self, *keys: bytes) -> list[bytes]:
        return [b"1" if all(k in self.data for k in keys) else b""]

    def _wait(self, timeout_ms: bytes, *keys: bytes) -> list[bytes]:
        self._await(keys, timeout_ms)
        return []


class RendezvousStore(dist.Store):
    """Rank 0 (`serve`) listens at `host:port` and every rank, rank 0 too, is a client; a rank
    whose rank 0 is not up yet keeps trying for `timeout`."""

    def __init__(self, host: str, port: int, secret: str, serve: bool, timeout: datetime.timedelta) -> None:
        super().__init__()
        self.set_timeout(timeout)
        self._listener = self._sock = None
        try:
            if serve:
                self._listener = Listener(host, port, secret, _Keys().serve, "rendezvous store")
            self._sock = dial((host, port), secret, wait_s=timeout.total_seconds())
        except (OSError, DistRuntimeError) as e:
            self.close()
            raise DistRuntimeError(f"{'cannot serve' if serve else 'cannot join'} the rendezvous store at "
                                   f"{host}:{port}: {e}") from e
        self._lock = threading.Lock()  # one request at a time on the socket

    def _request(self, op: str, *args: bytes | str) -> list[bytes]:
        parts = [op.encode(), *(a.encode() if isinstance(a, str) else bytes(a) for a in args)]
        with self._lock:
            _send(self._sock, parts)
            status, *reply = _recv(self._sock)
        if status != b"ok":
            raise dist.DistStoreError(reply[0].decode())
        return reply

    def _timeout_ms(self) -> str:
        return str(int(self.timeout.total_seconds() * 1000))

    def set(self, key: str, value: bytes | str) -> None:
        self._request("set", key, value)

    def get(self, key: str) -> bytes:
        return self._request("get", key, self._timeout_ms())[0]

    def add(self, key: str, amount: int) -> int:
        return int(self._request("add", key, str(amount))[0])

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        return self._request("compare_set", key, expected, desired)[0]

    def delete_key(self, key: str) -> bool:
        return self._request("delete_key", key)[0] == b"1"

    def num_keys(self) -> int:
        return int(self._request("num_keys")[0])

    def check(self, keys: list[str]) -> bool:
        return self._request("check", *keys)[0] == b"1"

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        timeout_ms = self._timeout_ms() if timeout is None else str(int(timeout.total_seconds() * 1000))
        self._request("wait", timeout_ms, *keys)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
