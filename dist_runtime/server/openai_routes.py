"""OpenAI's routes: models, completions and chat completions, streamed as Server-Sent Events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from dist_runtime.outputs import CompletionOutput, RequestOutput
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.server.jobs import ApiError, Job, unless_disconnected
from dist_runtime.server.protocol import ChatRequest, CompletionRequest
from dist_runtime.server.served import Served, parse, sampling, sse


def router(served: Served) -> APIRouter:
    r = APIRouter()
    llm, name = served.llm, served.model_name

    def card() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "dist-runtime",
                "max_model_len": llm.max_seq_len, "vocab_size": llm.vocab_size}

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @r.get("/v1/models/{model:path}")
    async def model(model: str):
        served.known_model(model)
        return card()

    @r.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = parse(await request.body(), CompletionRequest)
        served.known_model(body.model)
        params = sampling(lambda: body.sampling_params(body.logprobs, served.sampling_defaults))
        prompts = body.prompts()
        if body.stream and len(prompts) != 1:
            raise ApiError(400, "prompt: streaming takes one prompt", param="prompt")
        prompts = [served.token_ids(p, params) for p in prompts]
        job = served.jobs.admit(len(prompts) * params.n, "prompt" if len(prompts) > 1 else "n")
        if body.stream:
            return sse(job, _stream_completion(served, job, prompts[0], params, body))
        try:
            outputs = await unless_disconnected(request.receive, asyncio.gather(
                *(job.complete(p, params) for p in prompts)))
        finally:
            job.release()
        choices = [_completion_choice(len(outputs[0].outputs) * i + c.index, o, c, body, served)
                   for i, o in enumerate(outputs) for c in o.outputs]
        return _envelope(served, "text_completion", choices, outputs)

    @r.post("/v1/chat/completions")
    async def chat(request: Request):
        body: ChatRequest = parse(await request.body(), ChatRequest)
        served.known_model(body.model)
        params = sampling(lambda: body.sampling_params((body.top_logprobs or 0) if body.logprobs else None,
                                                         served.sampling_defaults))
        prompt = served.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages], params)
        job = served.jobs.admit(params.n, "n")
        if body.stream:
            return sse(job, _stream_chat(served, job, prompt, params, body))
        try:
            output = await unless_disconnected(request.receive, job.complete(prompt, params))
        finally:
            job.release()
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": _chat_logprobs(c, served) if body.logprobs else None} for c in output.outputs]
        return _envelope(served, "chat.completion", choices, [output])

    return r


async def _stream_completion(served: Served, job: Job, prompt: list[int], params: SamplingParams,
                             body: CompletionRequest) -> AsyncIterator[dict]:
    rid, usage = f"cmpl-{uuid.uuid4().hex}", {"prompt": len(prompt), "completion": 0}
    async for chunk in _chunks(served, job, prompt, params, usage):
        yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": served.model_name,
               "choices": [{"index": chunk.index, "text": chunk.text, "finish_reason": chunk.finish_reason,
                            "logprobs": None}]}
    if body.include_usage:
        yield {"id": rid, "object": "text_completion", "model": served.model_name, "choices": [],
               "usage": _usage(usage)}


async def _stream_chat(served: Served, job: Job, prompt: list[int], params: SamplingParams,
                       body: ChatRequest) -> AsyncIterator[dict]:
    rid, usage = f"chatcmpl-{uuid.uuid4().hex}", {"prompt": len(prompt), "completion": 0}
    first = [True] * params.n
    async for chunk in _chunks(served, job, prompt, params, usage):
        delta = {"role": "assistant", "content": chunk.text} if first[chunk.index] else {"content": chunk.text}
        first[chunk.index] = False
        yield {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": served.model_name,
               "choices": [{"index": chunk.index, "delta": delta, "finish_reason": chunk.finish_reason}]}
    if body.include_usage:
        yield {"id": rid, "object": "chat.completion.chunk", "model": served.model_name, "choices": [],
               "usage": _usage(usage)}


async def _chunks(served: Served, job: Job, prompt: list[int], params: SamplingParams, usage: dict):
    """A streamed request's chunks, with their tokens and latencies counted in the metrics."""
    metrics = served.metrics
    last_sent: dict[int, float] = {}  # completion index -> when its last chunk went out
    start = time.perf_counter()
    metrics.prompt_tokens.inc(len(prompt))
    async for chunk in job.stream(prompt, params):
        now = time.perf_counter()
        usage["completion"] += len(chunk.token_ids)
        metrics.generation_tokens.inc(len(chunk.token_ids))
        previous = last_sent.get(chunk.index)
        (metrics.ttft if previous is None else metrics.itl).observe(now - (previous or start))
        last_sent[chunk.index] = now
        yield chunk


def _envelope(served: Served, kind: str, choices: list, outputs: list[RequestOutput]) -> dict:
    for output in outputs:
        served.metrics.observe(output)
    usage = {"prompt": sum(len(o.prompt_token_ids) for o in outputs),
             "completion": sum(len(c.token_ids) for o in outputs for c in o.outputs)}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": served.model_name, "choices": choices, "usage": _usage(usage)}


def _usage(counts: dict) -> dict:
    return {"prompt_tokens": counts["prompt"], "completion_tokens": counts["completion"],
            "total_tokens": counts["prompt"] + counts["completion"]}


def _token_text(served: Served, token_id: int) -> str:
    tokenizer = served.llm.tokenizer
    return tokenizer.decode([token_id]) if tokenizer else str(token_id)


def _completion_choice(index: int, output: RequestOutput, c: CompletionOutput, body: CompletionRequest,
                       served: Served) -> dict:
    prefix = ""
    if body.echo:
        tokenizer = served.llm.tokenizer
        prefix = output.prompt or (tokenizer.decode(output.prompt_token_ids) if tokenizer else "")
    logprobs = None
    if c.logprobs is not None:
        logprobs = {"tokens": [_token_text(served, t.token_id) for t in c.logprobs],
                    "token_logprobs": [t.logprob for t in c.logprobs],
                    "top_logprobs": [{_token_text(served, i): v for i, v in t.top} for t in c.logprobs]}
    return {"index": index, "text": prefix + c.text, "finish_reason": c.finish_reason, "logprobs": logprobs}


def _chat_logprobs(c: CompletionOutput, served: Served) -> dict:
    return {"content": [{"token": _token_text(served, t.token_id), "logprob": t.logprob,
                         "top_logprobs": [{"token": _token_text(served, i), "logprob": v} for i, v in t.top]}
                        for t in c.logprobs or []]}
