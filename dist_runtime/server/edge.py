"""What every HTTP request meets before any route: the API key, then the body read whole
under a byte limit (chunked bodies too, and gzip or deflate bodies after inflating), within a
time limit; and, below ASGI, a connection that never finishes its headers is closed. A
request that fails here is answered at once and never reaches the engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import zlib

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADERS_TIMEOUT_S = 10.0  # a client has this long to send a request's headers
BODY_TIMEOUT_S = 30.0  # and this long for its body
OPEN_PATHS = ("/health", "/v2/health/", "/metrics")  # answered without the API key (probes, scrapers)


def error_body(status: int, message: str, path: str, kind: str = "invalid_request_error",
               param: str | None = None) -> dict:
    """OpenAI's error body; on the /v2 routes, Triton's ({"error": message})."""
    if path.startswith("/v2"):
        return {"error": message}
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class EdgeError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Edge:
    """ASGI middleware: authenticate, then read and inflate the body under `max_body_bytes`,
    then hand the app a body it can read at once. `on_status` sees every response's status."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, on_status=None) -> None:
        self.app, self.max_body_bytes, self.on_status = app, max_body_bytes, on_status
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start" and self.on_status:
                self.on_status(message["status"])
            await send(message)

        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        try:
            self._authenticate(scope["path"], headers)
            body = await asyncio.wait_for(self._read_body(headers, receive), BODY_TIMEOUT_S)
        except EdgeError as e:
            return await _answer(counted_send, e.status, error_body(e.status, e.message, scope["path"], e.kind),
                                 {"www-authenticate": "Bearer"} if e.status == 401 else {})
        except asyncio.TimeoutError:
            return await _answer(counted_send, 408, error_body(408, f"the body did not arrive within "
                                                                     f"{BODY_TIMEOUT_S:.0f} s", scope["path"]))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        return await self.app(scope, replay, counted_send)

    def _authenticate(self, path: str, headers: dict[str, bytes]) -> None:
        if self.api_key is None or path.startswith(OPEN_PATHS):
            return
        scheme, _, key = headers.get("authorization", b"").partition(b" ")
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key)):
            raise EdgeError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    async def _read_body(self, headers: dict[str, bytes], receive) -> bytes:
        limit = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise EdgeError(413, f"the request body is over {limit} bytes")
        encoding = headers.get("content-encoding", b"identity").strip().lower()
        if encoding not in (b"identity", b"gzip", b"deflate"):
            raise EdgeError(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; "
                                 "send identity, gzip or deflate")
        # deflate as HTTP means it: zlib-wrapped (wbits 15); gzip: wbits 31
        inflater = None if encoding == b"identity" else zlib.decompressobj(31 if encoding == b"gzip" else 15)
        parts, size, received = [], 0, 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise EdgeError(400, "the client went away while sending the body")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise EdgeError(413, f"the request body is over {limit} bytes")
            if inflater is not None and chunk:
                try:
                    chunk = inflater.decompress(chunk, limit + 1 - size)
                except zlib.error as e:
                    raise EdgeError(400, f"the {encoding.decode()} body is corrupt: {e}") from e
                if inflater.unconsumed_tail:
                    raise EdgeError(413, f"the request body is over {limit} bytes once inflated")
            size += len(chunk)
            if size > limit:
                raise EdgeError(413, f"the request body is over {limit} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


async def _answer(send, status: int, body: dict, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
           (b"connection", b"close")] + [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than
    HEADERS_TIMEOUT_S to arrive (uvicorn times out idle keep-alive connections, not these)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_timer = self.loop.call_later(HEADERS_TIMEOUT_S, self._headers_late)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request on this connection gets its own time
            self._headers_timer.cancel()
            self._headers_timer = self.loop.call_later(HEADERS_TIMEOUT_S + self.timeout_keep_alive,
                                                       self._headers_late)

    def connection_lost(self, exc) -> None:
        self._headers_timer.cancel()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        # IDLE: no request line and headers yet (h11 leaves IDLE once the headers are complete)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
