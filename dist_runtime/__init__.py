"""dist-runtime: plan, build and run sharded LLM engines."""
from dist_runtime.llm import LLM
from dist_runtime.outputs import CompletionOutput, RequestOutput, StreamChunk
from dist_runtime.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StreamChunk"]
