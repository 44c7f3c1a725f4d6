"""dist-runtime: plan, build and run sharded LLM engines."""
import os

# CUDA loads a kernel at its first launch unless told otherwise (PyTorch asks for LAZY), and
# that load waits for all the work queued on the device. An eager step whose row count cuBLAS
# had not met picked a kernel not loaded yet, and its launch stalled until the step before it
# had run. Loading every kernel at start-up costs an H200 about 7 s and 1 GB, and gave 2% more
# Llama-3-8B fp8 throughput; CUDA_MODULE_LOADING=LAZY in the environment keeps the lazy way.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

from dist_runtime.llm import LLM
from dist_runtime.outputs import CompletionOutput, RequestOutput, StreamChunk
from dist_runtime.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StreamChunk"]
