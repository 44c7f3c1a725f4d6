"""SIGTERM on a serving job: new requests get 503 with Retry-After, requests in flight finish
(or, past --drain-timeout, end with a last event or an error status), then every rank stops
and the server exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from conftest import Server, metrics_showing

LONG = dict(max_batch_size=8, max_seq_len=512)


@pytest.fixture(scope="module")
def engine(engines):
    return engines("llama", 2, 1, **LONG)


class InFlight:
    """A streamed and a non-streamed request running in the background."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.events: list[str] = []
        self.reply: httpx.Response | None = None
        self.first = threading.Event()
        body = {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        self.threads = [threading.Thread(target=self._stream, args=(url, body), daemon=True),
                        threading.Thread(target=self._whole, args=(url, body), daemon=True)]
        for t in self.threads:
            t.start()
        assert self.first.wait(60)
        both_admitted = "dist_runtime_running_sequences 2.0"
        assert both_admitted in metrics_showing(url, both_admitted, timeout=30)

    def _stream(self, url: str, body: dict) -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.first.set()

    def _whole(self, url: str, body: dict) -> None:
        self.reply = httpx.post(url + "/v1/completions", json=body, timeout=120)

    def join(self) -> None:
        for t in self.threads:
            t.join(60)


def refused_while_draining(url: str) -> httpx.Response:
    """The first answer to a new request once the drain has begun."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
        if r.status_code == 503:
            return r
        time.sleep(0.05)
    raise AssertionError("no 503 while draining")


@pytest.mark.slow
def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(engine):
    server = Server(engine, "--drain-timeout", "60")
    work = InFlight(server.url, max_tokens=200)
    server.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    refused = refused_while_draining(server.url)
    assert refused.headers["retry-after"] and "shutting down" in refused.json()["error"]["message"]
    assert server.proc.wait(60) == 0
    drained_s = time.monotonic() - started
    work.join()
    assert work.events[-1] == "[DONE]"
    finish = json.loads(work.events[-2])["choices"][0]["finish_reason"]
    assert finish == "length", work.events[-3:]
    assert work.reply.status_code == 200 and work.reply.json()["usage"]["completion_tokens"] == 200
    print(f"drained 2 requests of 200 tokens in {drained_s:.1f} s")


@pytest.mark.slow
def test_past_the_drain_timeout_requests_end_with_a_last_event_or_503(engine):
    server = Server(engine, "--drain-timeout", "0.5")
    work = InFlight(server.url, max_tokens=490)
    server.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert server.proc.wait(30) == 0
    stopped_s = time.monotonic() - started
    work.join()
    assert work.events[-1] == "[DONE]"
    last = json.loads(work.events[-2])
    assert "shutting down" in last["error"]["message"], work.events[-3:]
    assert work.reply.status_code == 503 and "shutting down" in work.reply.json()["error"]["message"]
    assert stopped_s < 15
    print(f"cut 2 requests short and stopped in {stopped_s:.1f} s")
