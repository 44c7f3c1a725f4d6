"""The server against hostile and careless clients: every bad body is a 4xx naming its field,
limits hold before the engine sees a byte, one request's failure or departure harms no
other, and the engine answers the same afterwards. A real `dist-runtime serve` of a TP=2
engine on 127.0.0.1, driven by httpx, raw sockets, openai and tritonclient."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import socket
import time
import zlib

import httpx
import openai
import pytest
from conftest import Server, checkpoint_with_template, metrics_showing

from sharding.builder import build_engine

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CONCURRENCY = 8
# raise_exception for a tool message, and a {% break %} that ends the loop at "stop here"
TEMPLATE = ("{% for m in messages %}{% if m.role == 'tool' %}"
            "{{ raise_exception('this template takes no tool messages') }}{% endif %}"
            "<|{{ m.role }}|>{{ m.content }}\n{% if m.content == 'stop here' %}{% break %}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREEDY = {"prompt": "Hello, world!", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    ckpt = checkpoint_with_template(checkpoints["llama"], root / "ckpt", TEMPLATE)
    build_engine(ckpt, root / "eng", 2, 1, "fp32", progress=False, max_batch_size=16, max_seq_len=128)
    return root / "eng"


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    s = Server(engine, "--api-key-file", str(key_file), "--max-concurrency", str(MAX_CONCURRENCY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def greedy_text(http: httpx.Client) -> str:
    r = http.post("/v1/completions", json=GREEDY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def error_of(r: httpx.Response) -> str:
    body = r.json()
    return body["error"] if isinstance(body["error"], str) else body["error"]["message"]


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"prompt": "x", "top_k": 9223372036854775808}, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": 1 << 63}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": -(1 << 63) - 1}, "seed"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"7": 1000}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"seven": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": [5, -1]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
     "messages"),
    ("/v2/models/tiny/generate", {"text_input": "hi", "stop_words": [1]}, "stop_words"),
    ("/v2/models/tiny/generate", {"text_input": "hi", "parameters": {"beams": 2}}, "beams"),
    ("/v2/models/tiny/generate", {"text_input": "hi", "random_seed": 1 << 64}, "random_seed"),
])
def test_a_bad_field_gets_a_400_that_names_it(http, route, body, field):
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    assert field in error_of(r)
    if route.startswith("/v1"):
        assert r.json()["error"]["param"].startswith(field)


@pytest.mark.parametrize("route", ["/v2/models/tiny/generate", "/v2/models/tiny/generate_stream",
                                   "/v1/completions"])
@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_infinity_and_nan_get_a_400_naming_the_field(http, route, number):
    text = "text_input" if route.startswith("/v2") else "prompt"
    r = http.post(route, content=f'{{"{text}": "hi", "temperature": {number}}}')
    assert r.status_code == 400 and "temperature" in error_of(r), r.text


def test_infer_bodies_that_crashed_the_server_get_a_400(http):
    nan = ('{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]},'
           '{"name": "temperature", "datatype": "FP32", "shape": [1], "data": [NaN]}]}')
    r = http.post("/v2/models/tiny/infer", content=nan)
    assert r.status_code == 400 and "temperature" in error_of(r)
    deep = http.post("/v2/models/tiny/infer", content=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert deep.status_code == 400 and "recursion" in error_of(deep)
    unnamed = http.post("/v2/models/tiny/infer", json={"inputs": [{"name": "text_input", "datatype": "BYTES",
                                                                    "shape": "one", "data": ["hi"]}]})
    assert unnamed.status_code == 400 and "inputs.0.shape" in error_of(unnamed)
    broken = http.post("/v1/completions", content=b"{not json")
    assert broken.status_code == 400 and "Invalid JSON" in error_of(broken)


def test_a_lone_surrogate_in_a_prompt_is_a_400(http):
    for route, body in (("/v1/completions", b'{"prompt": "a\\ud800b"}'),
                        ("/v2/models/tiny/generate", b'{"text_input": "\\ud800"}'),
                        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}')):
        r = http.post(route, content=body)
        assert r.status_code == 400, (route, r.text)


def test_a_chat_template_that_raises_is_a_400_with_its_message_and_break_works(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and "this template takes no tool messages" in error_of(r)
    assert r.json()["error"]["param"] == "messages"
    body = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    alone = http.post("/v1/chat/completions", json=body | {"messages": [{"role": "user", "content": "stop here"}]})
    broke = http.post("/v1/chat/completions", json=body | {"messages": [
        {"role": "user", "content": "stop here"}, {"role": "user", "content": "never rendered"}]})
    # {% break %} left the loop at "stop here": the second message is not in the prompt
    assert broke.status_code == 200 and broke.json()["usage"] == alone.json()["usage"]


def test_the_engine_answers_the_same_after_the_repros(http):
    before = greedy_text(http)
    for body in ({"prompt": "x", "top_k": 9223372036854775808}, {"prompt": "x", "seed": 1 << 70}):
        assert http.post("/v1/completions", json=body).status_code == 400
    assert http.post("/v2/models/tiny/generate", json={"text_input": "hi", "stop_words": [1]}).status_code == 400
    assert greedy_text(http) == before


def test_tritons_uint64_seed_is_taken_as_the_int64_of_the_same_bits(http):
    sampled = {"max_tokens": 6, "temperature": 1.0}
    r = http.post("/v2/models/tiny/generate", json={"text_input": "hi", "random_seed": (1 << 64) - 1} | sampled)
    assert r.status_code == 200, r.text
    same = http.post("/v1/completions", json={"prompt": "hi", "seed": -1} | sampled).json()["choices"][0]["text"]
    assert r.json()["text_output"] == same


def test_openai_fields_that_users_send(http, server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}],
                                           max_completion_tokens=5, temperature=0)
    parts = client.chat.completions.create(model="tiny", max_completion_tokens=5, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}])
    assert plain.usage.completion_tokens <= 5 and parts.choices[0].message.content == plain.choices[0].message.content
    # a large bias on one token makes every greedy step pick it
    biased = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0,
                                       logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    tokens = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "temperature": 0, "logprobs": 0,
                                                "logit_bias": {"42": 100}, "ignore_eos": True}).json()
    assert len(set(tokens["choices"][0]["logprobs"]["tokens"])) == 1
    assert tokens["choices"][0]["text"] == biased.choices[0].text
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_one_request_cannot_fan_out_past_the_concurrency_limit(http):
    too_many = [f"p{i}" for i in range(MAX_CONCURRENCY + 1)]
    r = http.post("/v1/completions", json={"prompt": too_many, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/completions", json={"prompt": "x", "n": MAX_CONCURRENCY + 1, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    infer = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [MAX_CONCURRENCY + 1],
                         "data": too_many}]}
    r = http.post("/v2/models/tiny/infer", json=infer)
    assert r.status_code == 400 and "text_input" in error_of(r)
    exactly = http.post("/v1/completions", json={"prompt": too_many[:4], "n": 2, "max_tokens": 1})
    assert exactly.status_code == 200 and len(exactly.json()["choices"]) == MAX_CONCURRENCY


def test_a_client_that_leaves_a_non_streamed_request_frees_its_slots_and_blocks(server, http):
    body = {"prompt": "x", "n": MAX_CONCURRENCY, "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        data = json.dumps(body).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        time.sleep(0.5)  # generating
    metrics = metrics_showing(server.url, "dist_runtime_running_sequences 0.0", "dist_runtime_kv_cache_usage 0.0")
    assert "dist_runtime_kv_cache_usage 0.0" in metrics
    # every slot is free again: a request of the whole limit is admitted
    whole = http.post("/v1/completions", json={"prompt": "x", "n": MAX_CONCURRENCY, "max_tokens": 1})
    assert whole.status_code == 200


def _raw_exchange(port: int, head: bytes, body_chunks=(), timeout: float = 10.0) -> bytes:
    """Send a request's head and then chunks until the server answers; its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed while we were still sending
                break
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_an_unauthenticated_body_is_refused_before_it_is_read(server):
    started = time.monotonic()
    answer = _raw_exchange(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: 80000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and time.monotonic() - started < 5


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(server):
    chunk = b"x" * 65536
    many = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(1000))  # 64 MB if all were read
    answer = _raw_exchange(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                           + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n", many)
    assert answer.startswith(b"HTTP/1.1 413")
    rss_kb = int(next(line for line in open(f"/proc/{server.proc.pid}/status") if line.startswith("VmRSS")).split()[1])
    assert rss_kb < 2_000_000


def test_a_gzip_bomb_is_refused_and_gzip_and_deflate_bodies_are_read(http):
    bomb = gzip.compress(b" " * (50 << 20))  # 50 MB of spaces in 50 KB
    assert http.post("/v1/completions", content=bomb, headers={"Content-Encoding": "gzip"}).status_code == 413
    body = json.dumps(GREEDY).encode()
    plain = greedy_text(http)
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        r = http.post("/v1/completions", content=packed, headers={"Content-Encoding": encoding})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain
    assert http.post("/v1/completions", content=b"garbage", headers={"Content-Encoding": "gzip"}).status_code == 400
    assert http.post("/v1/completions", content=body, headers={"Content-Encoding": "br"}).status_code == 415


@pytest.mark.slow
def test_a_connection_that_never_finishes_its_headers_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 15


def test_the_key_guards_every_route_but_health_and_metrics(server):
    for path in ("/v1/models", "/openapi.json", "/docs", "/v2/models/tiny", "/v2", "/v2/models/tiny/config"):
        assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(server.url + path, headers={"Authorization": "bearer " + KEY}).status_code == 200, path
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer sesamf"}).status_code == 401
    for path in ("/health", "/v2/health/live", "/v2/health/ready", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200, path


@pytest.mark.slow
def test_the_key_can_come_from_the_environment(engine):
    s = Server(engine, env={"DIST_RUNTIME_API_KEY": "from-env"})
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    finally:
        s.stop()


def test_tritonclient_with_its_defaults(server, http):
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array(["Hello, world!"], dtype=object))
    tokens = triton.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([8], dtype=np.int32))
    ignore = {"text_input": "Hello, world!", "max_tokens": 8}
    expected = http.post("/v2/models/tiny/generate", json=ignore).json()["text_output"]
    # tritonclient writes its own headers into the dict it is given: a fresh one each time
    result = client.infer("tiny", [text, tokens], headers=dict(AUTH))  # default outputs: binary_data_output
    assert result.as_numpy("text_output")[0].decode() == expected
    for compression in ("gzip", "deflate"):
        packed = client.infer("tiny", [text, tokens], headers=dict(AUTH), request_compression_algorithm=compression)
        assert packed.as_numpy("text_output")[0].decode() == expected
    timed = client.infer("tiny", [text, tokens], headers=dict(AUTH), priority=1, timeout=60_000_000,
                         request_id="r1", sequence_id=0)
    assert timed.get_response()["id"] == "r1"
    assert client.get_server_metadata(headers=dict(AUTH))["name"] == "dist-runtime"
    config = client.get_model_config("tiny", headers=dict(AUTH))
    assert config["input"][0]["name"] == "text_input" and config["output"][0]["data_type"] == "TYPE_STRING"
    stats = client.get_inference_statistics("tiny", headers=dict(AUTH))["model_stats"][0]
    assert stats["name"] == "tiny" and stats["inference_stats"]["success"]["count"] >= 4
    assert client.get_model_repository_index(headers=dict(AUTH))[0] == {"name": "tiny", "version": "1",
                                                                    "state": "READY", "reason": ""}


def test_the_readme_curl_examples_work_as_written(server):
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    import pathlib
    import subprocess

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text().replace("\\\n", "")
    commands = [line.split(" # ")[0].strip() for line in readme.splitlines() if line.startswith("curl ")]
    assert len(commands) >= 4
    for command in commands:
        command = command.replace("localhost:8000", f"127.0.0.1:{server.port}").replace("/eng/", "/tiny/")
        command = re.sub(r'"model": ?"[^"]+"', '"model": "tiny"', command)
        out = subprocess.run(f"{command} -sS -H 'Authorization: Bearer {KEY}' -w '\\n%{{http_code}}'",
                             shell=True, capture_output=True, text=True, timeout=60)
        assert out.stdout.rstrip().endswith("200"), (command, out.stdout, out.stderr)
