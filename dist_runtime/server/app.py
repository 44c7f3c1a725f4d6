"""The HTTP server: OpenAI-compatible completions and chat (with Server-Sent Events), health,
and Prometheus metrics, over one LLM on rank 0. Thin: every decision is the LLM API's."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from dist_runtime.errors import DistRuntimeError, RequestError
from dist_runtime.llm import LLM
from dist_runtime.outputs import CompletionOutput, RequestOutput
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.server import bridge, kserve_binary
from dist_runtime.server.chat_template import ChatTemplate
from dist_runtime.server.metrics import Metrics
from dist_runtime.server.protocol import ChatRequest, CompletionRequest, GenerateRequest, InferRequest

DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None,
           path: str = ""):
    """OpenAI's error body; on the /v2 routes, Triton's ({"error": message})."""
    body = {"error": message} if path.startswith("/v2/") else {
        "error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(llm: LLM, model_name: str, api_key: str | None = None, max_concurrency: int = 256,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="dist-runtime", docs_url=None, redoc_url=None)
    metrics = Metrics(llm)
    chat_template = ChatTemplate(llm.engine.path)
    in_flight = {"n": 0}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        metrics.requests.labels(status=str(e.status)).inc()
        return _error(e.status, e.message, e.kind, e.param, e.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        metrics.requests.labels(status="400").inc()
        return _error(400, f"{field or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", field,
                      path=request.url.path)

    @app.middleware("http")
    async def limits(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return _error(413, f"request body over {max_body_bytes} bytes", "invalid_request_error")
        return await call_next(request)

    def authorized(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    def admit() -> None:
        if llm.failed:
            raise ApiError(503, f"the engine has stopped: {llm.failed}", "server_error", headers={"Retry-After": "30"})
        if in_flight["n"] >= max_concurrency:
            raise ApiError(429, f"more than {max_concurrency} requests in flight; retry later", "rate_limit_error",
                           headers={"Retry-After": "1"})

    @app.get("/health")
    async def health():
        if llm.failed:
            return _error(503, f"not ready: {llm.failed}", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "dist-runtime",
                                            "max_model_len": llm.coordinator.max_seq_len,
                                            "vocab_size": llm.engine.config.vocab_size}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        admit()
        params = _params(body, body.logprobs)
        prompts = [check(p, params) for p in _prompts(body.prompt)]
        if body.stream:
            if len(prompts) != 1:
                raise ApiError(400, "streaming takes one prompt", param="prompt")
            in_flight["n"] += 1  # counted from here: the stream itself starts later
            return _sse(_stream_completion(prompts[0], params, body))
        outputs = await asyncio.gather(*(_run(p, params) for p in prompts))  # one batch in the engine
        choices = [_completion_choice(len(outputs[0].outputs) * i + c.index, o, c, body, llm)
                   for i, o in enumerate(outputs) for c in o.outputs]
        return _envelope("text_completion", choices, outputs)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest):
        admit()
        if llm.tokenizer is None:
            raise ApiError(400, "this engine has no tokenizer, so it cannot render chat messages", param="messages")
        text = chat_template.render([m.model_dump() for m in body.messages])
        bos = chat_template.special.get("bos_token")
        params = _params(body, (body.top_logprobs or 0) if body.logprobs else None)
        prompt = check(llm.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))), params)
        if body.stream:
            in_flight["n"] += 1
            return _sse(_stream_chat(prompt, params, body))
        output = await _run(prompt, params)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": _chat_logprobs(c, llm) if body.logprobs else None} for c in output.outputs]
        return _envelope("chat.completion", choices, [output])

    def check(prompt, params) -> list[int]:
        """Token ids of a prompt the engine can serve; else a 400 naming the limit."""
        try:
            if isinstance(prompt, str):
                if llm.tokenizer is None:
                    raise RequestError("this engine has no tokenizer; send token ids")
                prompt = llm.tokenizer.encode(prompt)
            llm.coordinator.check_request(list(prompt), params)
        except RequestError as e:
            raise ApiError(400, str(e), param="prompt") from e
        return list(prompt)

    # Triton / KServe v2, with TensorRT-LLM's parameter names
    def model_known(model: str) -> None:
        if model != model_name:
            raise ApiError(404, f"unknown model {model!r}; this server has {model_name!r}", "not_found_error")

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return _error(503, f"not ready: {llm.failed}", "server_error") if llm.failed else {"ready": True}

    @app.get("/v2/models/{model}", dependencies=[Depends(authorized)])
    async def model_metadata(model: str):
        model_known(model)
        return {"name": model_name, "versions": ["1"], "platform": "dist-runtime",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}] + [
                    {"name": name, "datatype": kind, "shape": [1]} for name, kind in TRTLLM_INPUTS.items()],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]}

    @app.get("/v2/models/{model}/ready", dependencies=[Depends(authorized)])
    async def model_ready(model: str):
        model_known(model)
        return _error(503, f"not ready: {llm.failed}", "server_error") if llm.failed else {"ready": True}

    @app.post("/v2/models/{model}/infer", dependencies=[Depends(authorized)])
    async def infer(model: str, request: Request):
        model_known(model)
        admit()
        # Triton's clients send JSON without a JSON content type, and tensors in binary by default
        try:
            header, binary = kserve_binary.split(await request.body(), request.headers.get(kserve_binary.HEADER))
            kserve_binary.fill_inputs(header, binary)
            body = InferRequest.model_validate(header)
        except (ValueError, TypeError) as e:  # bad JSON or binary part
            if isinstance(e, ValidationError):
                raise RequestValidationError(e.errors()) from e
            raise ApiError(400, f"unreadable infer request: {e}") from e
        inputs = {t.name: t.data for t in body.inputs}
        if "text_input" not in inputs:
            raise ApiError(400, "missing input tensor text_input (BYTES)", param="inputs")
        params = _trtllm_params({k: v[0] for k, v in inputs.items() if k != "text_input" and v}
                                | (body.parameters or {}))
        texts = [str(t) for t in inputs["text_input"]]
        outputs = await asyncio.gather(*(_run(check(t, params), params) for t in texts))
        metrics.requests.labels(status="200").inc()
        texts = [o.text for o in outputs]
        output = {"name": "text_output", "datatype": "BYTES", "shape": [len(outputs)]}
        reply = {"model_name": model_name, "model_version": "1", "id": body.id, "outputs": [output]}
        if not kserve_binary.wants_binary(header, "text_output"):
            return reply | {"outputs": [output | {"data": texts}]}
        data = kserve_binary.encode_bytes(texts)
        output["parameters"] = {"binary_data_size": len(data)}
        head = json.dumps(reply).encode()
        return Response(head + data, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    @app.post("/v2/models/{model}/generate", dependencies=[Depends(authorized)])
    async def generate(model: str, body: GenerateRequest):
        model_known(model)
        admit()
        params = _trtllm_params(body.options())
        output = await _run(check(body.text_input, params), params)
        metrics.requests.labels(status="200").inc()
        return {"model_name": model_name, "model_version": "1", "text_output": output.text}

    @app.post("/v2/models/{model}/generate_stream", dependencies=[Depends(authorized)])
    async def generate_stream(model: str, body: GenerateRequest):
        model_known(model)
        admit()
        params = _trtllm_params(body.options())
        prompt = check(body.text_input, params)
        in_flight["n"] += 1

        async def events():
            async for chunk in _chunks(prompt, params, {"prompt": 0, "completion": 0}):
                yield {"model_name": model_name, "model_version": "1", "text_output": chunk.text}

        return _sse(events(), done_marker=False)

    async def _run(prompt, params) -> RequestOutput:
        in_flight["n"] += 1
        try:
            output = await bridge.complete(llm, prompt, params)
        except RequestError as e:
            raise ApiError(400, str(e), param="prompt") from e
        except DistRuntimeError as e:
            raise ApiError(503, str(e), "server_error") from e
        finally:
            in_flight["n"] -= 1
        metrics.observe(output)
        return output

    async def _stream_completion(prompt, params, body: CompletionRequest) -> AsyncIterator[dict]:
        rid, usage = f"cmpl-{uuid.uuid4().hex}", {"prompt": 0, "completion": 0}
        async for chunk in _chunks(prompt, params, usage):
            yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                   "choices": [{"index": chunk.index, "text": chunk.text, "finish_reason": chunk.finish_reason,
                                "logprobs": None}]}
        if body.include_usage:
            yield {"id": rid, "object": "text_completion", "model": model_name, "choices": [], "usage": _usage(usage)}

    async def _stream_chat(prompt, params, body: ChatRequest) -> AsyncIterator[dict]:
        rid, usage = f"chatcmpl-{uuid.uuid4().hex}", {"prompt": 0, "completion": 0}
        first = [True] * params.n
        async for chunk in _chunks(prompt, params, usage):
            delta = {"role": "assistant", "content": chunk.text} if first[chunk.index] else {"content": chunk.text}
            first[chunk.index] = False
            yield {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                   "choices": [{"index": chunk.index, "delta": delta, "finish_reason": chunk.finish_reason}]}
        if body.include_usage:
            yield {"id": rid, "object": "chat.completion.chunk", "model": model_name, "choices": [],
                   "usage": _usage(usage)}

    async def _chunks(prompt, params, usage: dict):
        """A streamed request's chunks (counted in flight by its handler until they end)."""
        last_sent: dict[int, float] = {}  # completion index -> when its last chunk went out
        start = time.perf_counter()
        try:
            usage["prompt"] = len(prompt)
            metrics.prompt_tokens.inc(len(prompt))
            async for chunk in bridge.stream(llm, prompt, params):
                now = time.perf_counter()
                usage["completion"] += len(chunk.token_ids)
                metrics.generation_tokens.inc(len(chunk.token_ids))
                previous = last_sent.get(chunk.index)
                (metrics.ttft if previous is None else metrics.itl).observe(now - (previous or start))
                last_sent[chunk.index] = now
                yield chunk
            metrics.requests.labels(status="200").inc()
        finally:
            in_flight["n"] -= 1

    def _envelope(kind: str, choices: list, outputs: list[RequestOutput]) -> dict:
        usage = {"prompt": sum(len(o.prompt_token_ids) for o in outputs),
                 "completion": sum(len(c.token_ids) for o in outputs for c in o.outputs)}
        metrics.requests.labels(status="200").inc()
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": _usage(usage)}

    def _sse(events: AsyncIterator[dict], done_marker: bool = True) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except DistRuntimeError as e:  # failed after the headers went out: say it in the stream
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            if done_marker:
                yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


# TensorRT-LLM ensemble inputs we honour (name -> KServe datatype)
TRTLLM_INPUTS = {"max_tokens": "INT32", "temperature": "FP32", "top_k": "INT32", "top_p": "FP32",
                 "repetition_penalty": "FP32", "presence_penalty": "FP32", "frequency_penalty": "FP32",
                 "random_seed": "UINT64", "stop_words": "BYTES", "end_id": "INT32"}


def _trtllm_params(options: dict) -> SamplingParams:
    """TensorRT-LLM's names to ours; TRT-LLM samples greedily unless told otherwise."""
    unknown = sorted(set(options) - set(TRTLLM_INPUTS) - {"stream", "beam_width", "return_log_probs"})
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}; known: {', '.join(TRTLLM_INPUTS)}", param=unknown[0])
    stop = options.get("stop_words") or []
    try:
        return SamplingParams(
            max_tokens=int(options.get("max_tokens", DEFAULT_MAX_TOKENS)),
            temperature=float(options.get("temperature", 0.0)), top_k=int(options.get("top_k", 0)),
            top_p=float(options.get("top_p", 1.0)) or 1.0,
            repetition_penalty=float(options.get("repetition_penalty", 1.0)),
            presence_penalty=float(options.get("presence_penalty", 0.0)),
            frequency_penalty=float(options.get("frequency_penalty", 0.0)),
            seed=None if options.get("random_seed") is None else int(options["random_seed"]),
            stop=tuple([stop] if isinstance(stop, str) else stop),
            stop_token_ids=(int(options["end_id"]),) if options.get("end_id") is not None else ())
    except (TypeError, ValueError, RequestError) as e:
        raise ApiError(400, f"bad parameter: {e}") from e


def _params(body, logprobs):
    try:
        return body.sampling_params(DEFAULT_MAX_TOKENS, logprobs)
    except RequestError as e:
        raise ApiError(400, str(e)) from e


def _prompts(prompt) -> list:
    """OpenAI's prompt forms: a string, a list of strings, token ids, or a list of those."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    return list(prompt)


def _usage(counts: dict) -> dict:
    return {"prompt_tokens": counts["prompt"], "completion_tokens": counts["completion"],
            "total_tokens": counts["prompt"] + counts["completion"]}


def _completion_choice(index: int, output: RequestOutput, c: CompletionOutput, body: CompletionRequest,
                       llm: LLM) -> dict:
    prefix = (output.prompt or llm.tokenizer.decode(output.prompt_token_ids)) if body.echo else ""
    logprobs = None
    if c.logprobs is not None:
        tokens = [llm.tokenizer.decode([t.token_id]) if llm.tokenizer else str(t.token_id) for t in c.logprobs]
        logprobs = {"tokens": tokens, "token_logprobs": [t.logprob for t in c.logprobs],
                    "top_logprobs": [{(llm.tokenizer.decode([i]) if llm.tokenizer else str(i)): v for i, v in t.top}
                                     for t in c.logprobs]}
    return {"index": index, "text": prefix + c.text, "finish_reason": c.finish_reason, "logprobs": logprobs}


def _chat_logprobs(c: CompletionOutput, llm: LLM) -> dict:
    def token(i: int) -> str:
        return llm.tokenizer.decode([i])

    return {"content": [{"token": token(t.token_id), "logprob": t.logprob,
                         "top_logprobs": [{"token": token(i), "logprob": v} for i, v in t.top]}
                        for t in c.logprobs or []]}
