"""The HTTP server, started as users start it (`dist-runtime serve`), on 127.0.0.1, driven by
real clients: the `openai` package and plain httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import Server, cli, json_lines, metrics_showing


@pytest.fixture(scope="module")
def server(engines):
    s = Server(engines("llama", 2, 2, max_batch_size=64, max_seq_len=128))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


@pytest.mark.slow
def test_greedy_completion_equals_the_generate_command(server, client, engines):
    reply = client.completions.create(model="tiny", prompt="Hello, world!", max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    expected = json_lines(cli("generate", str(engines("llama", 2, 2, max_batch_size=64, max_seq_len=128)),
                              "--prompt", "Hello, world!", "--max-tokens", "10", "--temperature", "0",
                              "--ignore-eos", "--json"))[0]
    assert reply.choices[0].text == expected["text"]
    assert reply.usage.completion_tokens == 10 and reply.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_completion_and_chat_give_the_same_text_as_without(client):
    kwargs = dict(model="tiny", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt="The quick brown fox", **kwargs).choices[0].text
    parts = client.completions.create(prompt="The quick brown fox", stream=True,
                                      stream_options={"include_usage": True}, **kwargs)
    chunks = list(parts)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 8
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=messages, **kwargs).choices[0].message.content
    streamed = client.chat.completions.create(messages=messages, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat


def test_n_completions_and_logprobs(client):
    reply = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=4, n=2, seed=3, logprobs=2,
                                      extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    lp = reply.choices[0].logprobs
    # keys are token texts, as in OpenAI's format: partial UTF-8 tokens may share one ("\ufffd")
    assert len(lp.token_logprobs) == 4 and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, temperature=0)
    assert len(chat.choices[0].logprobs.content) == 3


def test_errors_are_openai_shaped_4xx_naming_the_field_or_limit(server, client):
    with pytest.raises(openai.BadRequestError, match="limit is 128 tokens"):
        client.completions.create(model="tiny", prompt="hello " * 300, max_tokens=4)
    bad = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": "many"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    broken = httpx.post(server.url + "/v1/completions", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "error" in broken.json()
    huge = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20))
    assert huge.status_code == 413


def test_200_concurrent_streams_each_get_their_own_tokens(server, client):
    prompts = [f"request {i}:" for i in range(200)]
    batch = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    expected = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]

    async def one(http: httpx.AsyncClient, prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True}
        text = ""
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    texts = asyncio.run(run())
    assert texts == expected  # every stream got its own prompt's greedy tokens


def test_a_client_that_disconnects_frees_its_kv_blocks(server):
    body = {"prompt": "hello", "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
    metrics = metrics_showing(server.url, "dist_runtime_running_sequences 0.0", "dist_runtime_kv_cache_usage 0.0")
    assert "dist_runtime_kv_cache_usage 0.0" in metrics
    for name in ("dist_runtime_requests_total", "dist_runtime_time_to_first_token_seconds_bucket",
                 "dist_runtime_inter_token_latency_seconds_bucket", "dist_runtime_generation_tokens_total",
                 "dist_runtime_preemptions"):
        assert name in metrics


@pytest.mark.slow
def test_api_key_guards_every_route_but_health_and_metrics(engines):
    s = Server(engines("llama", 1, 1, max_seq_len=512), "--api-key", "sesame", "--max-concurrency", "1")
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200 and httpx.get(s.url + "/metrics").status_code == 200
        key = {"Authorization": "Bearer sesame"}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60, headers=key) as http:
                body = {"prompt": "hi", "max_tokens": 50, "temperature": 0, "ignore_eos": True}
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(10)))

        statuses = [r.status_code for r in asyncio.run(burst())]
        assert 200 in statuses and 429 in statuses and set(statuses) == {200, 429}
        assert all(r.headers["retry-after"] == "1" for r in asyncio.run(burst()) if r.status_code == 429)
    finally:
        s.stop()


def test_triton_kserve_v2_routes_with_tritonclient_and_generate(server):
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.get_model_metadata("tiny")["outputs"][0]["name"] == "text_output"
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array(["Hello, world!"], dtype=object), binary_data=False)
    max_tokens = triton.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([6], dtype=np.int32), binary_data=False)
    result = client.infer("tiny", [text, max_tokens],
                          outputs=[triton.InferRequestedOutput("text_output", binary_data=False)])
    via_triton = result.as_numpy("text_output")[0]
    via_triton = via_triton.decode() if isinstance(via_triton, bytes) else via_triton
    text.set_data_from_numpy(np.array(["Hello, world!"], dtype=object))  # the client's default: binary tensors
    max_tokens.set_data_from_numpy(np.array([6], dtype=np.int32))
    binary = client.infer("tiny", [text, max_tokens], outputs=[triton.InferRequestedOutput("text_output")])
    assert binary.as_numpy("text_output")[0].decode() == via_triton
    body = {"text_input": "Hello, world!", "parameters": {"max_tokens": 6}}
    generated = httpx.post(server.url + "/v2/models/tiny/generate", json=body).json()["text_output"]
    assert via_triton == generated
    openai_text = httpx.post(server.url + "/v1/completions",
                             json={"prompt": "Hello, world!", "max_tokens": 6, "temperature": 0}).json()
    assert openai_text["choices"][0]["text"] == generated
    streamed = ""
    with httpx.stream("POST", server.url + "/v2/models/tiny/generate_stream", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                streamed += json.loads(line[6:])["text_output"]
    assert streamed == generated
    assert httpx.post(server.url + "/v2/models/other/generate", json=body).status_code == 404
    bad = httpx.post(server.url + "/v2/models/tiny/generate", json={"text_input": "x", "parameters": {"beams": 2}})
    assert bad.status_code == 400 and "beams" in bad.json()["error"]  # Triton's error body


@pytest.mark.slow
def test_bench_url_drives_the_server_over_http(server):
    proc = cli("bench", "--url", server.url, "--isl", "12", "--osl", "5", "--num-requests", "16",
               "--concurrency", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["errors"] == 0 and report["num_requests"] == 16
    assert report["output_tokens_per_s"] == pytest.approx(16 * 5 / report["duration_s"])
    assert 0 < report["ttft_ms"]["p50"] <= report["ttft_ms"]["p99"]
