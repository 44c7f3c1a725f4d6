"""dist-runtime: plan, build and run sharded LLM engines."""
import importlib
import os

# CUDA loads a kernel at its first launch unless told otherwise (PyTorch asks for LAZY), and
# that load waits for all the work queued on the device: an eager step whose row count cuBLAS
# has not met picks a kernel not loaded yet, and its launch stalls until the step before it
# has run. Loading every kernel at start-up costs an H200 about 7 s and 1 GB, and buys 2% of
# Llama-3-8B fp8 throughput; CUDA_MODULE_LOADING=LAZY in the environment keeps the lazy way.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

# The API's names load on first use: importing any module of the package runs this file first,
# and launch.rank_info (which sbatch's preflight imports alone) must not pull in the engine, and
# the launchers the engine imports, this way.
_API = {"LLM": "dist_runtime.llm", "CompletionOutput": "dist_runtime.outputs", "RequestOutput": "dist_runtime.outputs",
        "StreamChunk": "dist_runtime.outputs", "SamplingParams": "dist_runtime.sampling_params"}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
