"""Property: whatever body arrives at whatever route, the server answers within 10 s with no
5xx, stays up, and a fixed greedy request gets the same tokens before and after. Hypothesis
generates the bodies: the routes' own fields with values of every JSON type and range,
nested junk, raw bytes, and lying binary headers."""

from __future__ import annotations

import collections
import json

import httpx
import pytest
from conftest import Server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROUTES = ["/v1/completions", "/v1/chat/completions", "/v2/models/tiny/infer", "/v2/models/tiny/generate",
          "/v2/models/tiny/generate_stream"]
SAMPLING = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop",
            "stream", "stream_options", "logprobs", "top_logprobs", "echo", "logit_bias", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids", "model", "tools",
            "response_format", "random_seed", "stop_words", "end_id", "beam_width", "timeout", "priority",
            "binary_data_output", "sequence_id"]
EDGES = [0, 1, -1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30]
STATUSES: collections.Counter = collections.Counter()

scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(EDGES), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["", "\u0000", "\ud800", "tiny", "text_input", "user", "<|user|>"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
prompts = st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 600), max_size=6),
                    st.lists(st.text(max_size=8), max_size=3), values)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot", 1])},
                                optional={"content": st.one_of(st.text(max_size=20), values, st.lists(
                                    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                           "text": values}), max_size=2))})
tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["text_input", "max_tokens", "temperature", "random_seed", "stop_words", "bogus"]),
     "datatype": st.sampled_from(["BYTES", "INT32", "FP32", "UINT64", "BOOL", "XX"]),
     "shape": st.one_of(st.lists(st.integers(-2, 3), max_size=2), values)},
    optional={"data": st.one_of(st.lists(scalars, max_size=3), values),
              "parameters": st.one_of(values, st.fixed_dictionaries({"binary_data_size": values}))})
sampling = st.dictionaries(st.sampled_from(SAMPLING), values, max_size=4)
bodies = {
    "/v1/completions": st.fixed_dictionaries({}, optional={"prompt": prompts}).flatmap(
        lambda b: sampling.map(lambda s: s | b)),
    "/v1/chat/completions": st.fixed_dictionaries({}, optional={"messages": st.one_of(
        st.lists(message, max_size=3), values)}).flatmap(lambda b: sampling.map(lambda s: s | b)),
    "/v2/models/tiny/infer": st.fixed_dictionaries({}, optional={
        "inputs": st.one_of(st.lists(tensor, max_size=3), values), "id": values,
        "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": values, "parameters": values})), values),
        "parameters": st.one_of(sampling, values)}),
    "/v2/models/tiny/generate": st.fixed_dictionaries({}, optional={"text_input": prompts, "parameters": st.one_of(
        sampling, values)}).flatmap(lambda b: sampling.map(lambda s: s | b)),
}
bodies["/v2/models/tiny/generate_stream"] = bodies["/v2/models/tiny/generate"]
request = st.sampled_from(ROUTES).flatmap(lambda route: st.tuples(st.just(route), st.one_of(
    bodies[route].map(lambda b: json.dumps(b).encode("utf-8", "surrogatepass")),  # NaN, Infinity, lone surrogates
    st.binary(max_size=40))))
binary_header = st.one_of(st.none(), st.sampled_from(["-1", "0", "3", "14", "999", "x"]))

GREEDY = {"prompt": "Hello, world!", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(engines):
    s = Server(engines("llama", 2, 1, max_batch_size=16, max_seq_len=32), "--max-concurrency", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:  # a hang past 10 s fails the test
        yield client


@pytest.fixture(scope="module")
def greedy_before(http):
    return http.post("/v1/completions", json=GREEDY).json()["choices"][0]["text"]


# no shrinking: each example is a request to a live server, and the failure message shows the body
@pytest.mark.slow
@settings(max_examples=1000, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=request, header=binary_header)
def test_no_body_gets_a_5xx_or_a_hang(http, greedy_before, request, header):
    route, body = request
    headers = {"Inference-Header-Content-Length": header} if header and route.endswith("infer") else {}
    with http.stream("POST", route, content=body, headers=headers) as r:
        r.read()
    STATUSES[r.status_code // 100 * 100] += 1
    assert r.status_code < 500, (route, body[:300], r.text[:300])


@pytest.mark.slow
def test_the_server_lives_and_answers_the_same_after_the_fuzz(http, greedy_before):
    assert sum(STATUSES.values()) >= 1000, STATUSES
    print(f"fuzz: {sum(STATUSES.values())} bodies, statuses {dict(STATUSES)}")
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json=GREEDY).json()["choices"][0]["text"] == greedy_before
