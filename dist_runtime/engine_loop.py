"""The loop on rank 0 that turns requests into steps, on a thread of its own, so that callers
(the Python API, the CLI, the HTTP server) submit and stream from any thread while one thread
alone talks to the other ranks."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator

import torch

from dist_runtime.coordinator import Coordinator, TokenUpdate
from dist_runtime.detokenizer import IncrementalDetokenizer
from dist_runtime.errors import DistRuntimeError, RequestFailed
from dist_runtime.liveness import Monitor
from dist_runtime.outputs import CompletionOutput, RequestOutput, StreamChunk
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.sequence import Sequence
from dist_runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STREAM_END = object()  # follows a streamed request's last chunk
IDLE_PING_S = 60.0  # an idle loop pings the other ranks this often (see Ping)


class RequestHandle:
    """A submitted request: iterate it for StreamChunks as tokens come, or wait for `result()`."""

    def __init__(self, request_id: int, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None, stream: bool, sink=None) -> None:
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.stream = stream  # chunks are made only for a streamed request
        self.chunks: queue.Queue = queue.Queue()
        self.sink = sink or self.chunks.put  # where chunks and STREAM_END go, on the engine thread
        self.seqs: list[Sequence] = []
        self.detokenizers = [IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer and params.detokenize
                             else None for _ in range(params.n)]
        self._callbacks: list = []  # run once when the request ends (see add_done_callback)
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.emitted = [0] * params.n  # characters of each completion's text already streamed
        self.error: BaseException | None = None
        self.aborted = False

    def __iter__(self) -> Iterator[StreamChunk]:
        if not self.stream:
            raise RuntimeError("this request was submitted with stream=False; call result()")
        while (chunk := self.chunks.get()) is not STREAM_END:
            yield chunk
        self._raise()

    def result(self, timeout: float | None = None) -> RequestOutput:
        # In slices: a signal that lands on another thread wakes no one blocked for good, and
        # the main thread runs Python's handlers (Ctrl-C) only when it wakes.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done.wait(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self.request_id} still running after {timeout} s")
        self._raise()
        return self.output()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def output(self) -> RequestOutput:
        outputs = [CompletionOutput(s.index, s.output_ids, d.text if d else "", s.finish_reason,
                                    s.logprobs if self.params.logprobs is not None else None,
                                    _stack(s.logits)) for s, d in zip(self.seqs, self.detokenizers)]
        first = self.seqs[0]
        cached = max(s.cached_prompt_tokens for s in self.seqs)
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outputs, cached,
                             first.arrival_time, first.token_times[0] if first.token_times else None,
                             first.token_times[-1] if first.token_times else None, list(first.token_times))

    def abort(self) -> None:
        """Stop generating (the caller lost interest); its KV blocks are freed at the next step."""
        self.aborted = True

    def add_done_callback(self, fn) -> None:
        """Call fn(handle) when the request ends (on the engine thread), or now if it already has."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, error: BaseException | None = None) -> None:
        """The last word on this request (from the engine thread, or the liveness watch when a
        rank is lost): end the stream, wake every waiter. Only the first call counts. A sink or
        callback that raises here is only logged: the request has ended either way, and the
        thread that ends it serves other requests."""
        with self._lock:
            if self.done.is_set():
                return
            self.error = error
            try:
                self.sink(STREAM_END)
            except Exception:
                log.exception("request %d: its sink failed on the end of its stream", self.request_id)
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("request %d: a done callback failed", self.request_id)


class _Call:
    def __init__(self, fn) -> None:
        self.fn, self.done, self.value, self.error = fn, threading.Event(), None, None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:
            self.error = e
        self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def _stack(logits: list) -> torch.Tensor | None:
    return torch.stack(logits) if logits else None


class EngineLoop:
    def __init__(self, coordinator: Coordinator, tokenizer: Tokenizer | None, liveness: Monitor | None = None) -> None:
        self.coordinator, self.tokenizer, self.liveness = coordinator, tokenizer, liveness
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._active: dict[int, RequestHandle] = {}  # seq_id -> handle
        self._lock = threading.Lock()  # between queueing and fail() emptying the inbox
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dist-runtime-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
               stream: bool = False, sink=None) -> RequestHandle:
        """Queue a request (checked here, in the caller's thread, so a bad one raises at once)."""
        self.coordinator.check_request(prompt_ids, params)
        handle = RequestHandle(next(self._ids), prompt, prompt_ids, params, self.tokenizer, stream, sink)
        self._queue(handle)
        return handle

    def _queue(self, item: RequestHandle | _Call) -> None:
        # fail() empties the inbox under the same lock: an item is queued before it, and
        # answered there, or refused here.
        with self._lock:
            if self.error is not None or self._stopping:
                raise DistRuntimeError(f"the engine has stopped{f': {self.error}' if self.error else ''}")
            self._inbox.put(item)

    def _run(self) -> None:
        try:
            while True:
                if not self._take_requests(block=not self.coordinator.has_work()):
                    break
                self._drop_aborted()
                if self.coordinator.has_work():
                    self._deliver(self.coordinator.step())
            self.coordinator.shutdown()
        except BaseException as e:  # a rank failed: every waiting caller hears of it
            self.fail(self.liveness.explain(e) if self.liveness else e)

    def _take_requests(self, block: bool) -> bool:
        """Move submitted requests into the coordinator; False once stop() was called."""
        while True:
            try:
                handle = self._inbox.get(block=block, timeout=IDLE_PING_S if block else None)
            except queue.Empty:
                if block:
                    self.coordinator.ping()
                return True
            block = False
            if handle is None:
                return False
            if isinstance(handle, _Call):
                handle.run()
                continue
            try:
                handle.seqs = self.coordinator.add_request(handle.prompt_ids, handle.params)
            except Exception as e:
                self._fail_request(handle, "joining the scheduler", e)
                continue
            for seq in handle.seqs:
                self._active[seq.seq_id] = handle

    def _drop_aborted(self) -> None:
        for seq_id, handle in list(self._active.items()):
            if handle.aborted:
                seq = next(s for s in handle.seqs if s.seq_id == seq_id)
                self.coordinator.abort(seq)
                self._finish_seq(handle, seq)

    def _deliver(self, updates: list[TokenUpdate]) -> None:
        """Hand each new token to its request. What raises here fails that request alone."""
        for u in updates:
            handle, seq = self._active.get(u.seq.seq_id), u.seq
            if handle is None:  # the request failed on another of its sequences' tokens
                continue
            try:
                text = self._text(handle, seq, u.token_id)
            except Exception as e:
                self._fail_request(handle, "turning its tokens into text", e)
                continue
            if handle.stream:
                try:
                    handle.sink(StreamChunk(handle.request_id, seq.index, [u.token_id], text, seq.finish_reason,
                                            [u.logprobs] if u.logprobs else None))
                except Exception as e:
                    self._fail_request(handle, "handing a chunk to its sink", e)
                    continue
            if seq.is_finished:
                self._finish_seq(handle, seq)

    def _text(self, handle: RequestHandle, seq: Sequence, token_id: int) -> str:
        """The new text `token_id` completes for the stream; stop strings end the sequence here."""
        detok = handle.detokenizers[seq.index]
        if detok is None:
            return ""
        delta = detok.add(token_id)
        stopped = bool(seq.params.stop) and not seq.is_finished and self._check_stop(seq, detok, delta)
        if seq.is_finished and not stopped:
            detok.flush()
        return self._new_text(handle, seq, detok)

    def _check_stop(self, seq: Sequence, detok: IncrementalDetokenizer, delta: str) -> bool:
        """End the sequence if its text now contains a stop string; the text ends before it."""
        # A match must involve the new text: search from where a stop string could overlap it.
        window = max(0, len(detok.text) - len(delta) - max(map(len, seq.params.stop)) + 1)
        hits = [i for stop in seq.params.stop if (i := detok.text.find(stop, window)) >= 0]
        if not hits:
            return False
        detok.text = detok.text[: min(hits)]
        self.coordinator.abort(seq, "stop")
        return True

    @staticmethod
    def _new_text(handle: RequestHandle, seq: Sequence, detok: IncrementalDetokenizer) -> str:
        """Text not streamed yet. While a stop string could still be completing, its possible
        beginning is held back, so a streamed chunk never has to be taken back."""
        held_back = 0 if seq.is_finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        start = handle.emitted[seq.index]
        text = detok.text[start: max(start, len(detok.text) - held_back)]
        handle.emitted[seq.index] += len(text)
        return text

    def _finish_seq(self, handle: RequestHandle, seq: Sequence) -> None:
        self._active.pop(seq.seq_id, None)
        if all(s.is_finished for s in handle.seqs):
            handle._finish()

    def _fail_request(self, handle: RequestHandle, doing: str, error: Exception) -> None:
        """End one request with the error that its own handling raised; its sequences give back
        their KV blocks, and every other request goes on."""
        log.error("request %d failed while %s", handle.request_id, doing, exc_info=error)
        for seq in handle.seqs:
            self.coordinator.abort(seq)
            self._active.pop(seq.seq_id, None)
        handle._finish(RequestFailed(f"request {handle.request_id} failed on rank 0 while {doing}: "
                                     f"{type(error).__name__}: {error}"))

    def fail(self, error: BaseException) -> None:
        """End every request with `error`, those still queued too; from any thread (the
        engine's may be stuck in a step, and never come back to the inbox)."""
        with self._lock:
            if self.error is None:
                self.error = error
            queued = []
            while True:  # get_nowait: the engine thread may take the last item first
                try:
                    queued.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
        for item in queued:
            if isinstance(item, _Call):
                item.error = DistRuntimeError(f"the engine has stopped: {self.error}")
                item.done.set()
            elif item is not None:
                item._finish(self.error)
        for handle in set(self._active.copy().values()):  # copy() is atomic: the engine thread may be adding
            handle._finish(self.error)

    def call(self, fn):
        """Run `fn` on the loop's thread between steps (it may talk to the other ranks); its result."""
        job = _Call(fn)
        self._queue(job)
        while not job.done.wait(0.1):
            if self.error is not None:  # the thread may never come back to the inbox
                raise DistRuntimeError(f"the engine has stopped: {self.error}")
        return job.wait()

    def stop(self) -> None:
        """Let the loop finish its step, tell the other ranks to stop, and end the thread; after
        a failure, do not wait for a thread that may be stuck talking to a lost rank."""
        self._stopping = True
        self._inbox.put(None)
        while self._thread.is_alive() and self.error is None:
            self._thread.join(0.1)
