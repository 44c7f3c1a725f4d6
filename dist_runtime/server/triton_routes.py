"""Triton / KServe v2 routes, in Triton's JSON shapes, with TensorRT-LLM's input names: server
and model metadata, health, model config, statistics, the repository index, `infer` (JSON or
binary tensors) and the `generate` extension."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from dist_runtime.server import kserve_binary
from dist_runtime.server.jobs import ApiError, unless_disconnected
from dist_runtime.server.protocol import GenerateRequest, InferRequest, TritonOptions
from dist_runtime.server.served import Served, parse, sampling, sse

VERSION = "1"
# TensorRT-LLM's ensemble inputs we honour (name -> KServe datatype, Triton config type)
INPUTS = {"max_tokens": ("INT32", "TYPE_INT32"), "temperature": ("FP32", "TYPE_FP32"),
          "top_k": ("INT32", "TYPE_INT32"), "top_p": ("FP32", "TYPE_FP32"),
          "repetition_penalty": ("FP32", "TYPE_FP32"), "presence_penalty": ("FP32", "TYPE_FP32"),
          "frequency_penalty": ("FP32", "TYPE_FP32"), "random_seed": ("UINT64", "TYPE_UINT64"),
          "stop_words": ("BYTES", "TYPE_STRING"), "end_id": ("INT32", "TYPE_INT32")}


class Statistics:
    """Triton's per-model counters: successes and failures, with their total time."""

    def __init__(self) -> None:
        self.counts = {"success": [0, 0], "fail": [0, 0]}  # [count, ns]
        self.last_inference_ms = 0

    def add(self, ok: bool, started_ns: int) -> None:
        entry = self.counts["success" if ok else "fail"]
        entry[0] += 1
        entry[1] += time.perf_counter_ns() - started_ns
        self.last_inference_ms = int(time.time() * 1000)

    def as_triton(self, name: str) -> dict:
        ok = self.counts["success"]
        timed = {k: {"count": c, "ns": ns} for k, (c, ns) in self.counts.items()}
        zero = {"count": 0, "ns": 0}
        return {"name": name, "version": VERSION, "last_inference": self.last_inference_ms,
                "inference_count": ok[0], "execution_count": ok[0],
                "inference_stats": timed | {"queue": zero, "compute_input": zero, "compute_output": zero,
                                            "compute_infer": dict(timed["success"]), "cache_hit": zero,
                                            "cache_miss": zero},
                "batch_stats": []}


def router(served: Served) -> APIRouter:
    r = APIRouter()
    llm, name = served.llm, served.model_name
    stats = Statistics()

    def known(model: str) -> None:
        if model != name:
            raise ApiError(404, f"unknown model {model!r}; this server has {name!r}", "not_found_error")

    def ready() -> dict:
        if llm.failed or served.jobs.draining:
            raise ApiError(503, f"not ready: {llm.failed or 'draining'}", "server_error")
        return {"ready": True}

    @r.get("/v2")
    async def server_metadata():
        return {"name": "dist-runtime", "version": "0.1.0",
                "extensions": ["binary_tensor_data", "statistics", "model_configuration", "generate"]}

    @r.get("/v2/health/live")
    async def live():
        return {"live": True}

    @r.get("/v2/health/ready")
    async def server_ready():
        return ready()

    @r.get("/v2/models/stats")
    async def all_statistics():
        return {"model_stats": [stats.as_triton(name)]}

    @r.post("/v2/repository/index")
    async def repository_index():
        return [{"name": name, "version": VERSION, "state": "UNAVAILABLE" if llm.failed else "READY", "reason": ""}]

    @r.get("/v2/models/{model}")
    async def model_metadata(model: str):
        known(model)
        return {"name": name, "versions": [VERSION], "platform": "dist-runtime",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}] + [
                    {"name": k, "datatype": kind, "shape": [1]} for k, (kind, _) in INPUTS.items()],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]}

    @r.get("/v2/models/{model}/ready")
    async def model_ready(model: str):
        known(model)
        return ready()

    @r.get("/v2/models/{model}/config")
    async def model_config(model: str):
        known(model)
        return {"name": name, "platform": "dist-runtime", "backend": "dist-runtime",
                "max_batch_size": served.jobs.max_request_sequences,
                "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [-1]}] + [
                    {"name": k, "data_type": kind, "dims": [1], "optional": True}
                    for k, (_, kind) in INPUTS.items()],
                "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]}],
                "model_transaction_policy": {"decoupled": False}}

    @r.get("/v2/models/{model}/stats")
    async def model_statistics(model: str):
        known(model)
        return {"model_stats": [stats.as_triton(name)]}

    @r.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request):
        known(model)
        started = time.perf_counter_ns()
        try:
            header, binary = kserve_binary.split(await request.body(), request.headers.get(kserve_binary.HEADER))
            body: InferRequest = parse(header, InferRequest)
            kserve_binary.fill_inputs(body.inputs, binary)
            texts, options = body.texts(), sampling(body.options)
            output = await _run_infer(request, body, texts, options)
        except kserve_binary.BinaryError as e:
            stats.add(False, started)
            raise ApiError(400, f"unreadable infer request: {e}") from e
        except Exception:
            stats.add(False, started)
            raise
        stats.add(True, started)
        return output

    async def _run_infer(request: Request, body: InferRequest, texts: list[str], options: TritonOptions):
        params = sampling(options.sampling_params)
        prompts = [served.token_ids(t, params, "inputs.text_input") for t in texts]
        job = served.jobs.admit(len(prompts), "inputs.text_input")
        try:
            work = asyncio.gather(*(job.complete(p, params) for p in prompts))
            outputs = await unless_disconnected(request.receive, _within(work, options))
        finally:
            job.release()
        texts = [o.text for o in outputs]
        output = {"name": "text_output", "datatype": "BYTES", "shape": [len(outputs)]}
        reply = {"model_name": name, "model_version": VERSION, "id": body.id, "outputs": [output]}
        if not body.wants_binary("text_output"):
            return reply | {"outputs": [output | {"data": texts}]}
        data = kserve_binary.encode_bytes(texts)
        output["parameters"] = {"binary_data_size": len(data)}
        head = json.dumps(reply).encode()
        return Response(head + data, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    @r.post("/v2/models/{model}/generate")
    async def generate(model: str, request: Request):
        known(model)
        body: GenerateRequest = parse(await request.body(), GenerateRequest)
        options = sampling(body.options)
        params = sampling(options.sampling_params)
        prompt = served.token_ids(body.text_input, params, "text_input")
        job = served.jobs.admit(1, "text_input")
        try:
            output = await unless_disconnected(request.receive, _within(job.complete(prompt, params), options))
        finally:
            job.release()
        served.metrics.observe(output)
        return {"model_name": name, "model_version": VERSION, "text_output": output.text}

    @r.post("/v2/models/{model}/generate_stream")
    async def generate_stream(model: str, request: Request):
        known(model)
        body: GenerateRequest = parse(await request.body(), GenerateRequest)
        params = sampling(sampling(body.options).sampling_params)
        prompt = served.token_ids(body.text_input, params, "text_input")
        job = served.jobs.admit(1, "text_input")

        async def events():
            async for chunk in job.stream(prompt, params):
                yield {"model_name": name, "model_version": VERSION, "text_output": chunk.text}

        return sse(job, events(), done_marker=False)

    return r


async def _within(work, options: TritonOptions):
    """`work`, under the request's own `timeout` parameter where it gives one (Triton's meaning)."""
    if options.timeout_s is None:
        return await work
    try:
        return await asyncio.wait_for(work, options.timeout_s)
    except asyncio.TimeoutError as e:
        raise ApiError(400, f"timeout: the request's timeout of {options.timeout} us expired",
                       param="timeout") from e
