"""What the server's routes share: its settings, the served LLM with its requests in flight,
and parsing bodies, making SamplingParams and streaming events, each with its errors as 4xx."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from dist_runtime.errors import DistRuntimeError, EngineError, RequestError
from dist_runtime.llm import LLM, Prompt
from dist_runtime.sampling_params import LIMITS, SamplingParams
from dist_runtime.server.chat_template import ChatTemplate
from dist_runtime.server.jobs import ApiError, Job, Jobs
from dist_runtime.server.metrics import Metrics
from dist_runtime.server.protocol import GENERATION_DEFAULTS, describe


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_concurrency: int = 256  # sequences in flight before 429
    max_request_sequences: int | None = None  # sequences one request may run (default: max_concurrency)
    max_body_bytes: int = 1 << 20
    drain_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    chat_template: str | None = None  # a template file, or a named template of the model's


class Served:
    """What every route works with: the LLM, its requests in flight, metrics, chat template."""

    def __init__(self, llm: LLM, settings: ServerSettings) -> None:
        self.llm, self.model_name = llm, settings.model_name
        self.jobs = Jobs(llm, settings.max_concurrency, settings.max_request_sequences)
        self.metrics = Metrics(llm)
        tokenizer = llm.tokenizer
        self.sampling_defaults = _sampling_defaults(tokenizer.generation_config if tokenizer else {})
        self.chat_template = ChatTemplate(tokenizer.chat_templates if tokenizer else {},
                                          tokenizer.special_tokens if tokenizer else {}, settings.chat_template)

    def token_ids(self, prompt: Prompt, params: SamplingParams, field: str = "prompt") -> list[int]:
        """A prompt's token ids, checked against the engine's limits; else a 400 naming the field."""
        try:
            return self.llm.prompt_ids(prompt, params)
        except RequestError as e:
            raise ApiError(400, str(e), param=field if e.field == "prompt" else e.field or field) from e

    def chat_prompt(self, messages: list[dict], params: SamplingParams) -> list[int]:
        """The token ids of chat messages rendered by the chat template; else a 400."""
        if self.llm.tokenizer is None:
            raise ApiError(400, "messages: this engine has no tokenizer, so it cannot render chat messages",
                           param="messages")
        try:
            text = self.chat_template.render(messages)
        except RequestError as e:
            raise ApiError(400, str(e), param="messages") from e
        try:  # the template writes the special tokens itself, as apply_chat_template assumes
            ids = self.llm.tokenizer.encode(text, add_special_tokens=False)
        except RequestError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from e
        return self.token_ids(ids, params, "messages")

    def known_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {self.model_name!r}",
                           "not_found_error", param="model")


def parse(raw: bytes, model: type[BaseModel]):
    """A request's body as `model`, or a 400 naming the field at fault (any Content-Type: curl sends none)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        message, field = describe(e)
        raise ApiError(400, message, param=field) from e


def sampling(make) -> SamplingParams:
    """SamplingParams from a parsed body's method; a value it refuses is a 400 naming the field."""
    try:
        return make()
    except RequestError as e:
        raise ApiError(400, str(e), param=e.field) from e
    except ValidationError as e:
        message, field = describe(e)
        raise ApiError(400, message, param=field) from e


def sse(job: Job, events: AsyncIterator[dict], done_marker: bool = True) -> StreamingResponse:
    """Server-Sent Events; an error after the headers went out is the stream's last event."""

    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except DistRuntimeError as e:
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        finally:
            job.release()
        if done_marker:
            yield "data: [DONE]\n\n"

    # release() runs again after the response, in case the client left before the body began
    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(job.release))


def _sampling_defaults(generation_config: dict) -> dict:
    """The sampling settings a model's generation_config.json gives, for requests that leave them
    out; one out of LIMITS' range stops the server at start, naming it."""
    defaults = {name: generation_config[name] for name in GENERATION_DEFAULTS if name in generation_config}
    for name, value in defaults.items():
        if problem := LIMITS[name].problem(value):
            raise EngineError(f"generation_config.json: {name} {problem}")
    return defaults
