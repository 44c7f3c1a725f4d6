"""The server's life: bind at once and answer "not ready" while every rank loads, serve, drain
on SIGINT/SIGTERM, and leave with a status that says how it ended (0 after a drain, 1 after a
lost rank)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import uvicorn

from dist_runtime.llm import LLM
from dist_runtime.runtime_config import RuntimeConfig
from dist_runtime.server.app import create_app
from dist_runtime.server.edge import HeaderTimeoutH11
from dist_runtime.server.served import Served, ServerSettings

LINGER_S = 3.0  # after a rank is lost: clients read their errors and /health's 503 before the exit
CUT_GRACE_S = 5.0  # after the drain's deadline: requests cut short get this long to send their last words


class LoadingGate:
    """The ASGI app the socket serves: 503 with Retry-After until the engine's app is ready."""

    def __init__(self) -> None:
        self.app = None

    async def __call__(self, scope, receive, send) -> None:
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return None
        live = scope["path"] == "/v2/health/live"  # the process is up, whatever the engine does
        body = {"live": True} if live else {"error": "not ready: the engine is loading on every rank"}
        await send({"type": "http.response.start", "status": 200 if live else 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        return None


def _stop_on_signals() -> threading.Event:
    """SIGINT and SIGTERM start a drain (while loading they still interrupt, as in the CLI)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def drain(served: Served, timeout_s: float) -> None:
    """Refuse new requests (503 with Retry-After), give those in flight `timeout_s` to finish,
    then cut short the rest: each still gets its last event or an error status."""
    jobs = served.jobs
    jobs.draining = True
    started = time.monotonic()
    print(f"dist-runtime: draining {len(jobs.running)} requests (up to {timeout_s:.0f} s)", file=sys.stderr,
          flush=True)
    while jobs.running and time.monotonic() - started < timeout_s and not served.llm.failed:
        time.sleep(0.05)
    if jobs.running:
        print(f"dist-runtime: cutting short {len(jobs.running)} requests", file=sys.stderr, flush=True)
        jobs.cut_all()
        deadline = time.monotonic() + CUT_GRACE_S
        while jobs.running and time.monotonic() < deadline:
            time.sleep(0.05)


def serve(config: RuntimeConfig, settings: ServerSettings, host: str, port: int) -> int:
    """Rank 0's server (the CLI has the other ranks of an SPMD launch serve rank 0's calls)."""
    gate = LoadingGate()
    server = uvicorn.Server(uvicorn.Config(gate, host=host, port=port, log_level="warning", lifespan="off",
                                           http=HeaderTimeoutH11, timeout_graceful_shutdown=CUT_GRACE_S))
    http = threading.Thread(target=server.run, name="dist-runtime-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            return 1  # could not bind: uvicorn said why
        time.sleep(0.02)
    try:
        with LLM(config=config) as llm:
            stop = _stop_on_signals()  # set once loaded: a launcher's library (Ray) installs its own
            gate.app, served = create_app(llm, settings)
            print(f"serving {settings.model_name} on http://{host}:{port}", file=sys.stderr, flush=True)
            while not stop.wait(0.2) and not llm.failed:
                pass
            if llm.failed:
                print(f"dist-runtime: {llm.failed}; stopping", file=sys.stderr, flush=True)
                time.sleep(LINGER_S)
                return 1
            drain(served, settings.drain_timeout_s)
            return 0
    finally:
        server.should_exit = True
        http.join(CUT_GRACE_S + 2)
