"""Prometheus metrics of one server (a registry of its own): requests by status, tokens,
TTFT and inter-token latency, and the engine's running / waiting sequences, KV-cache usage
and preemptions read at scrape time."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dist_runtime.llm import LLM
from dist_runtime.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dist_runtime_requests", "HTTP requests by status", ["status"], registry=r)
        self.prompt_tokens = Counter("dist_runtime_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dist_runtime_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("dist_runtime_time_to_first_token_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dist_runtime_inter_token_latency_seconds", "time between tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("dist_runtime_running_sequences", "sequences in the running batch", registry=r)
        self.waiting = Gauge("dist_runtime_waiting_sequences", "sequences waiting", registry=r)
        self.kv_usage = Gauge("dist_runtime_kv_cache_usage", "fraction of KV-cache blocks held", registry=r)
        self.preemptions = Gauge("dist_runtime_preemptions", "sequences preempted so far", registry=r)

    def observe(self, output: RequestOutput) -> None:
        """A finished non-streamed request."""
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))
        if output.first_token_time is not None:
            self.ttft.observe(output.first_token_time - output.arrival_time)
        for a, b in zip(output.token_times, output.token_times[1:]):
            self.itl.observe(b - a)

    def render(self) -> tuple[bytes, str]:
        load = self.llm.load()
        self.running.set(load["running"])
        self.waiting.set(load["waiting"])
        self.kv_usage.set(load["kv_blocks_used"] / load["kv_blocks"])
        self.preemptions.set(load["preemptions"])
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
