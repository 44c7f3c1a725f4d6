"""From the engine's thread to the server's event loop: a request's chunks and its end arrive
as asyncio events, without a thread per request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dist_runtime.engine_loop import STREAM_END, RequestHandle
from dist_runtime.llm import LLM, Prompt
from dist_runtime.outputs import RequestOutput, StreamChunk
from dist_runtime.sampling_params import SamplingParams


async def complete(llm: LLM, prompt: Prompt, params: SamplingParams) -> RequestOutput:
    """Run a request to its end; if the caller is cancelled (client gone), abort it."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()
    handle = llm.submit(prompt, params)
    handle.add_done_callback(lambda h: loop.call_soon_threadsafe(_settle, finished, h))
    try:
        return await finished
    finally:
        if not handle.done.is_set():
            handle.abort()


def _settle(future: asyncio.Future, handle: RequestHandle) -> None:
    if future.done():
        return
    try:
        future.set_result(handle.result(timeout=0))
    except BaseException as e:
        future.set_exception(e)


async def stream(llm: LLM, prompt: Prompt, params: SamplingParams) -> AsyncIterator[StreamChunk]:
    """Chunks as they come; leaving early (client gone) aborts the request and frees its blocks."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    handle = llm.submit(prompt, params, stream=True, sink=lambda item: loop.call_soon_threadsafe(queue.put_nowait,
                                                                                                 item))
    try:
        while (item := await queue.get()) is not STREAM_END:
            yield item
        if handle.error is not None:
            raise handle.error
    finally:
        if not handle.done.is_set():
            handle.abort()
