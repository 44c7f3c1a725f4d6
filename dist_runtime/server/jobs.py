"""HTTP requests in flight, between the server's event loop and the engine's thread.

Each request reserves one slot per sequence it will run (prompts x n) before it is queued, so
no request gets past the concurrency limit by fanning out. Its chunks and its end arrive as
asyncio events, without a thread per request. A request whose client goes away is aborted
(its KV blocks freed at the next step); on drain, the server cuts short the requests still
running at its deadline, and each ends with an error its client can read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

from dist_runtime.engine_loop import STREAM_END, RequestHandle
from dist_runtime.errors import DistRuntimeError, RequestError, RequestFailed
from dist_runtime.llm import LLM, Prompt
from dist_runtime.outputs import RequestOutput, StreamChunk
from dist_runtime.sampling_params import SamplingParams

SHUTTING_DOWN = "the server is shutting down"


class ApiError(Exception):
    """An HTTP error answer: status, message, OpenAI error type, the field at fault."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    @classmethod
    def of(cls, error: DistRuntimeError) -> ApiError:
        """A request's own fault is a 400 naming its field; rank 0 failing one request alone a 500;
        anything else means the engine stopped."""
        if isinstance(error, RequestError):
            return cls(400, str(error), param=error.field)
        if isinstance(error, RequestFailed):
            return cls(500, str(error), "server_error")
        return cls(503, str(error), "server_error", headers={"Retry-After": "30"})


class Jobs:
    """The server's requests in flight, counted in sequences against `max_sequences`; a
    request of more than `max_request_sequences` sequences is refused whole."""

    def __init__(self, llm: LLM, max_sequences: int, max_request_sequences: int | None = None) -> None:
        self.llm, self.max_sequences = llm, max_sequences
        self.max_request_sequences = min(max_request_sequences or max_sequences, max_sequences)
        self.running: set[Job] = set()
        self.draining = False

    @property
    def sequences(self) -> int:
        return sum(job.sequences for job in self.running)

    def admit(self, sequences: int, field: str) -> Job:
        if self.llm.failed:
            raise ApiError(503, f"the engine has stopped: {self.llm.failed}", "server_error",
                           headers={"Retry-After": "30"})
        if self.draining:
            raise ApiError(503, f"{SHUTTING_DOWN}; retry on another replica", "server_error",
                           headers={"Retry-After": "5"})
        if sequences > self.max_request_sequences:
            raise ApiError(400, f"{field}: this request would run {sequences} sequences (prompts x n); the limit "
                                f"is {self.max_request_sequences} a request", param=field)
        if self.sequences + sequences > self.max_sequences:
            raise ApiError(429, f"more than {self.max_sequences} sequences in flight; retry later",
                           "rate_limit_error", headers={"Retry-After": "1"})
        job = Job(self, sequences)
        self.running.add(job)
        return job

    def cut_all(self) -> None:
        """Drain's deadline: abort every request still running."""
        for job in list(self.running):
            job.cut(SHUTTING_DOWN)


class Job:
    """One HTTP request's reservation and the engine requests it runs; release() frees it."""

    def __init__(self, jobs: Jobs, sequences: int) -> None:
        self.jobs, self.sequences = jobs, sequences
        self.handles: list[RequestHandle] = []
        self.cut_short: str | None = None  # why the server ended it early

    def release(self) -> None:
        for handle in self.handles:
            if not handle.done.is_set():
                handle.abort()
        self.jobs.running.discard(self)

    def cut(self, why: str) -> None:
        self.cut_short = why
        for handle in self.handles:
            handle.abort()

    def _submit(self, prompt: Prompt, params: SamplingParams, **kwargs) -> RequestHandle:
        try:
            handle = self.jobs.llm.submit(prompt, params, **kwargs)
        except DistRuntimeError as e:
            raise ApiError.of(e) from e
        self.handles.append(handle)
        if self.cut_short:
            handle.abort()
        return handle

    async def complete(self, prompt: Prompt, params: SamplingParams) -> RequestOutput:
        """Run one engine request to its end (the caller's cancellation aborts it)."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future = loop.create_future()
        handle = self._submit(prompt, params)
        handle.add_done_callback(lambda h: loop.call_soon_threadsafe(_settle, finished, h))
        try:
            output = await finished
        except DistRuntimeError as e:
            raise ApiError.of(e) from e
        finally:
            if not handle.done.is_set():
                handle.abort()
        if self.cut_short:
            raise ApiError(503, f"{self.cut_short}; the request was cut short", "server_error",
                           headers={"Retry-After": "5"})
        return output

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[StreamChunk]:
        """Chunks as they come; leaving early (client gone) aborts the request. Errors after the
        first chunk arrive as DistRuntimeError, for the stream to report in its own format."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = self._submit(prompt, params, stream=True,
                              sink=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        try:
            while (item := await queue.get()) is not STREAM_END:
                yield item
            if handle.error is not None:
                raise handle.error
            if self.cut_short:
                raise DistRuntimeError(f"{self.cut_short}; the request was cut short")
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


async def unless_disconnected(receive, work: Awaitable):
    """`work`'s result, or its cancellation (which aborts its engine requests) if the client
    disconnects first. `receive` is the request's ASGI receive, its body already read."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    gone = True
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        gone = not task.done()
    finally:
        watch.cancel()
        if gone:
            task.cancel()
    if gone:
        raise ApiError(499, "the client closed the request")
    return task.result()
