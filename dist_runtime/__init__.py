"""dist-runtime: plan, build and run sharded LLM engines."""
from dist_runtime.llm import LLM, RequestOutput
from dist_runtime.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
