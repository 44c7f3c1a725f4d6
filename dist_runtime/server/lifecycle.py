"""The server's life: bind at once and answer "not ready" while every rank loads, serve, and
leave with a status that says how it ended (0 after SIGINT/SIGTERM, 1 after a lost rank)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import uvicorn

from dist_runtime.llm import LLM
from dist_runtime.server.app import create_app
from launch.rank_info import from_environment

LINGER_S = 3.0  # after a rank is lost: clients read their errors and /health's 503 before the exit
GRACEFUL_S = 5  # on SIGTERM: streams in flight get this long to finish


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
    """SIGINT and SIGTERM start a graceful stop (while loading they still interrupt, as in the CLI)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def serve(engine_dir: str, model_name: str, host: str, port: int, api_key: str | None, max_concurrency: int,
          max_body_bytes: int, **llm_options) -> int:
    info = from_environment()
    if info is not None and info.rank != 0:  # under a launcher: serve steps until rank 0 stops
        LLM(engine_dir, **llm_options)
        return 0
    gate = LoadingGate()
    server = uvicorn.Server(uvicorn.Config(gate, host=host, port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=GRACEFUL_S))
    http = threading.Thread(target=server.run, name="dist-runtime-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            return 1  # could not bind: uvicorn said why
        time.sleep(0.02)
    try:
        with LLM(engine_dir, **llm_options) as llm:
            stop = _stop_on_signals()  # set once loaded: a launcher's library (Ray) installs its own
            gate.app = create_app(llm, model_name, api_key, max_concurrency, max_body_bytes)
            print(f"serving {model_name} on http://{host}:{port}", file=sys.stderr, flush=True)
            while not stop.wait(0.2) and not llm.failed:
                pass
            if llm.failed:
                print(f"dist-runtime: {llm.failed}; stopping", file=sys.stderr, flush=True)
                time.sleep(LINGER_S)
                return 1
            return 0
    finally:
        server.should_exit = True
        http.join(GRACEFUL_S + 2)
