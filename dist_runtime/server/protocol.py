"""Request bodies of the OpenAI-compatible routes, validated by pydantic (a wrong type is a
400 naming the field), and their mapping to SamplingParams."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dist_runtime.sampling_params import SamplingParams


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False

    def sampling_params(self, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, seed=self.seed, stop=tuple(stop),
                              ignore_eos=self.ignore_eos, n=self.n, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class InferTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[str | int | float | bool]  # filled from the binary part when sent that way
    parameters: dict | None = None


class InferRequest(BaseModel):
    """KServe v2 `infer` (JSON tensors; BYTES as strings)."""

    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[dict] | None = None
    parameters: dict[str, str | int | float | bool | list[str]] | None = None


class GenerateRequest(BaseModel):
    """Triton's `generate` extension: `text_input`, options at the top level or in `parameters`."""

    model_config = ConfigDict(extra="allow")

    text_input: str = Field(min_length=1)
    parameters: dict[str, str | int | float | bool | list[str]] | None = None

    def options(self) -> dict:
        return dict(self.model_extra or {}) | (self.parameters or {})
