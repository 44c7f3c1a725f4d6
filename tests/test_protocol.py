"""Request bodies to SamplingParams: the model's generation_config fills what a request leaves out."""

from __future__ import annotations

from dist_runtime.server.protocol import ChatRequest, CompletionRequest


def test_the_models_sampling_defaults_fill_only_the_fields_a_request_leaves_out():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    left_out = CompletionRequest.model_validate_json(b'{"prompt": "x"}').sampling_params(None, defaults)
    assert (left_out.temperature, left_out.top_p, left_out.top_k) == (0.6, 0.9, 20)
    given = ChatRequest.model_validate_json(
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": 0, "top_k": 0}').sampling_params(None,
                                                                                                            defaults)
    assert (given.temperature, given.top_p, given.top_k) == (0.0, 0.9, 0)
    plain = CompletionRequest.model_validate_json(b'{"prompt": "x"}').sampling_params(None)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)
