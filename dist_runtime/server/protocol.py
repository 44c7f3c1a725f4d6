"""The typed request body of every route. Bodies are parsed and checked here, in one step
(pydantic's own JSON parser: no NaN or Infinity, no lone surrogates, nesting depth capped),
with the sampling bounds of dist_runtime/sampling_params.LIMITS, so a body that passes holds
only values the engine can take."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from dist_runtime.errors import RequestError
from dist_runtime.sampling_params import INT32_MAX, LIMITS, MAX_STOP_STRINGS, SamplingParams

DEFAULT_MAX_TOKENS = 16
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # a model may set these


def _bounded(name: str):
    limit = LIMITS[name]
    low = {"gt" if limit.low_open else "ge": limit.low}
    return Annotated[limit.kind, Field(le=limit.high, **low)]


def _unsupported(value):
    if value is not None:
        raise ValueError("is not supported by this server")
    return value


Unsupported = Annotated[Any, BeforeValidator(_unsupported)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]], Field(min_length=1)]
# one stop string, or a list of them: read as a list, so an error names the field and the item
Stop = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
                 Field(max_length=MAX_STOP_STRINGS)]


class Body(BaseModel):
    """Strict JSON types (a string is no number), finite floats."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class OpenAISampling(Body):
    """What the OpenAI completion and chat routes share. Fields we do not implement are
    refused by name rather than silently ignored."""

    model: str | None = None
    max_tokens: _bounded("max_tokens") | None = None
    max_completion_tokens: _bounded("max_tokens") | None = None
    temperature: _bounded("temperature") = 1.0
    top_p: _bounded("top_p") = 1.0
    top_k: _bounded("top_k") = 0
    min_p: _bounded("min_p") = 0.0
    presence_penalty: _bounded("presence_penalty") = 0.0
    frequency_penalty: _bounded("frequency_penalty") = 0.0
    repetition_penalty: _bounded("repetition_penalty") = 1.0
    n: _bounded("n") = 1
    seed: Annotated[int, Field(ge=-(1 << 63), lt=1 << 63)] | None = None
    stop: Stop | None = None
    stop_token_ids: list[_bounded("stop_token_id")] = []
    logit_bias: dict[str, _bounded("logit_bias")] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    response_format: Unsupported = None

    def sampling_params(self, logprobs: int | None, defaults: dict | None = None) -> SamplingParams:
        """`defaults` (the model's generation_config.json) stand in for the sampling fields the
        request leaves out."""
        given = self.model_fields_set
        sampled = {name: getattr(self, name) if name in given or name not in (defaults or {}) else defaults[name]
                   for name in GENERATION_DEFAULTS}
        bias = {}
        for token, value in (self.logit_bias or {}).items():
            if not token.isdigit():
                raise RequestError(f"logit_bias: keys are token ids, got {token!r}", "logit_bias")
            bias[int(token)] = value
        return SamplingParams(max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
                              **sampled, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, seed=self.seed,
                              stop=tuple(self.stop or ()),
                              stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos, n=self.n,
                              logprobs=logprobs, logit_bias=bias)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAISampling):
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: _bounded("logprobs") | None = None
    echo: bool = False
    suffix: Unsupported = None

    def prompts(self) -> list[str | list[int]]:
        """OpenAI's prompt forms: a string, token ids, or a list of either."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """Content given as a list of text parts reads as their concatenation."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: _bounded("logprobs") | None = None


class TritonOptions(Body):
    """TensorRT-LLM's generation inputs, and Triton's request-level parameters (accepted with
    no effect where they mean nothing here: one priority level, no stateful sequences). Any
    other name is refused."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: _bounded("max_tokens") = DEFAULT_MAX_TOKENS
    temperature: _bounded("temperature") = 0.0  # TensorRT-LLM samples greedily unless told otherwise
    top_k: _bounded("top_k") = 0
    top_p: _bounded("top_p") = 1.0
    repetition_penalty: _bounded("repetition_penalty") = 1.0
    presence_penalty: _bounded("presence_penalty") = 0.0
    frequency_penalty: _bounded("frequency_penalty") = 0.0
    random_seed: _bounded("seed") | None = None
    stop_words: Stop | None = None
    end_id: _bounded("stop_token_id") | None = None
    stream: bool = False
    beam_width: Literal[1] = 1
    return_log_probs: bool = False
    binary_data_output: bool = False
    priority: Annotated[int, Field(ge=0)] = 0
    timeout: Annotated[int, Field(ge=0)] | None = None  # microseconds, as Triton counts it
    sequence_id: int | str | None = None
    sequence_start: bool = False
    sequence_end: bool = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              seed=self.random_seed,
                              stop=tuple(self.stop_words or ()),
                              stop_token_ids=() if self.end_id is None else (self.end_id,))

    @property
    def timeout_s(self) -> float | None:
        return None if not self.timeout else self.timeout / 1e6


class GenerateRequest(BaseModel):
    """Triton's `generate` extension: `text_input`, options at the top level or in `parameters`."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    text_input: Annotated[str, Field(min_length=1)]
    parameters: dict[str, Any] | None = None

    def options(self) -> TritonOptions:
        return TritonOptions.model_validate(dict(self.model_extra or {}) | (self.parameters or {}))


DATATYPES = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                    "FP32", "FP64", "BYTES"]


class TensorParameters(Body):
    binary_data_size: Annotated[int, Field(ge=0)] | None = None
    binary_data: bool = False


class InferTensor(Body):
    name: str
    datatype: DATATYPES
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=8)]
    # filled from the binary part when sent that way; each input's own rule checks its values
    data: list[Any] | None = None
    parameters: TensorParameters | None = None


class RequestedOutput(Body):
    name: str
    parameters: TensorParameters | None = None


class InferRequest(Body):
    """KServe v2 `infer`: `text_input` (BYTES) and TensorRT-LLM's inputs as tensors of one value."""

    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None

    def texts(self) -> list[str]:
        tensor = next((t for t in self.inputs if t.name == "text_input"), None)
        if tensor is None or not tensor.data or not all(isinstance(v, str) and v for v in tensor.data):
            raise RequestError("inputs: a BYTES tensor text_input of non-empty strings is required", "inputs")
        return list(tensor.data)

    def options(self) -> TritonOptions:
        values = {}
        for t in self.inputs:
            if t.name != "text_input":
                if not t.data or len(t.data) != 1:
                    raise RequestError(f"inputs.{t.name}: one value is expected, got {len(t.data or [])}",
                                       f"inputs.{t.name}")
                values[t.name] = t.data[0]
        return TritonOptions.model_validate(values | (self.parameters or {}))

    def wants_binary(self, name: str) -> bool:
        """Whether the client asked for output `name` as binary data (Triton's default for its clients)."""
        for output in self.outputs or []:
            if output.name == name and output.parameters is not None:
                return output.parameters.binary_data
        return bool((self.parameters or {}).get("binary_data_output", False))


def describe(error: ValidationError) -> tuple[str, str | None]:
    """(a message naming the field and what it allows, the field) from pydantic's first error;
    the path leaves out the union member pydantic tried ("prompt", not "prompt.list[int]")."""
    first = error.errors(include_url=False)[0]
    path = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    field = ".".join(path) or None
    return f"{field or 'body'}: {first['msg']}", field


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}
