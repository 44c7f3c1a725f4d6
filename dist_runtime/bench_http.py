"""`dist-runtime bench --url`: the synthetic workload of `bench`, sent to a running server as
streamed OpenAI completions, timed at the client (so the server's own overhead shows)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from dist_runtime.bench import percentiles


async def _one(http: httpx.AsyncClient, model: str, prompt: list[int], osl: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": osl, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, times, tokens = time.perf_counter(), [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                times.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"start": start, "times": times, "tokens": tokens}


async def _drive(url: str, isl: int, osl: int, num_requests: int, concurrency: int | None,
                 request_rate: float | None, seed: int, api_key: str | None) -> tuple[list[dict], float, str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=None, headers=headers,
                                 limits=httpx.Limits(max_connections=None)) as http:
        card = (await http.get("/v1/models")).json()["data"][0]
        rng = random.Random(seed)
        prompts = [[rng.randrange(card["vocab_size"]) for _ in range(isl)] for _ in range(num_requests)]
        gate = asyncio.Semaphore(concurrency or num_requests)

        async def gated(prompt: list[int]) -> dict:
            async with gate:
                return await _one(http, card["id"], prompt, osl)

        start, tasks = time.perf_counter(), []
        for prompt in prompts:
            tasks.append(asyncio.create_task(gated(prompt)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start, card["id"]


def run_http_bench(url: str, isl: int, osl: int, num_requests: int, concurrency: int | None = None,
                   request_rate: float | None = None, seed: int = 0, api_key: str | None = None) -> dict:
    results, elapsed, model = asyncio.run(_drive(url, isl, osl, num_requests, concurrency, request_rate, seed,
                                                 api_key))
    ok = [r for r in results if "error" not in r]
    generated = sum(r["tokens"] for r in ok)
    return {
        "url": url, "model": model, "isl": isl, "osl": osl, "num_requests": len(results),
        "errors": len(results) - len(ok),
        "concurrency": concurrency, "request_rate": request_rate, "duration_s": elapsed,
        "output_tokens_per_s": generated / elapsed, "requests_per_s": len(ok) / elapsed,
        "ttft_ms": percentiles([r["times"][0] - r["start"] for r in ok if r["times"]], 1e3),
        "tpot_ms": percentiles([(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1)
                                for r in ok if len(r["times"]) > 1], 1e3),
    }
