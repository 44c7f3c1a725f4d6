"""The HTTP app: the edge (API key, body limits), health and metrics, and the OpenAI and
Triton/KServe routers over one LLM on rank 0. Thin: every decision is the LLM API's."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dist_runtime.errors import DistRuntimeError
from dist_runtime.llm import LLM
from dist_runtime.server import openai_routes, triton_routes
from dist_runtime.server.edge import Edge, error_body
from dist_runtime.server.jobs import ApiError
from dist_runtime.server.served import Served, ServerSettings


def create_app(llm: LLM, settings: ServerSettings) -> tuple[Edge, Served]:
    served = Served(llm, settings)
    app = FastAPI(title="dist-runtime", docs_url="/docs", redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.status, e.message, request.url.path, e.kind, e.param), e.status,
                            headers=e.headers)

    @app.exception_handler(DistRuntimeError)
    async def runtime_error(request: Request, e: DistRuntimeError):
        return await api_error(request, ApiError.of(e))

    @app.get("/health")
    async def health():
        if llm.failed or served.jobs.draining:
            raise ApiError(503, f"not ready: {llm.failed or 'draining'}", "server_error",
                           headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = served.metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(openai_routes.router(served))
    app.include_router(triton_routes.router(served))
    edge = Edge(app, settings.api_key, settings.max_body_bytes,
                on_status=lambda status: served.metrics.requests.labels(status=str(status)).inc())
    return edge, served
