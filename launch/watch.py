"""What every launcher that starts ranks 1..N-1 from rank 0 (spawned processes, Ray actors)
does until every rank has joined: watch for a rank that ends early and for Ctrl-C or SIGTERM.
Rank 0 may then be stuck inside a collective, where Python runs no signal handler, so signals
are seen through a wakeup fd, and the other ranks are ended so that the collective fails.
Once every rank has joined (`handed_over`), the runtime's liveness watch takes over."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from abc import ABC, abstractmethod

GRACE_S = 5.0  # after a failure, time for rank 0 to unwind by itself before it is ended
POLL_S = 0.1


class StartupWatch(ABC):
    """Subclasses say how to find a rank that ended (`_ended`) and how to end them all (`_end_all`)."""

    stopping = False
    handed_over = False
    _old_wakeup_fd = None

    def _start_watch(self, name: str) -> None:
        self._signal_r, signal_w = os.pipe()
        os.set_blocking(signal_w, False)
        if threading.current_thread() is threading.main_thread():  # the only thread allowed to set it
            self._old_wakeup_fd = signal.set_wakeup_fd(signal_w)
        self._watcher = threading.Thread(target=self._watch, name=name, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._done():
            ready, _, _ = select.select([self._signal_r], [], [], POLL_S)
            interrupted = ready and {signal.SIGINT, signal.SIGTERM} & set(os.read(self._signal_r, 64))
            if interrupted and not self._done():  # checked again: the wait may have outlasted the hand-over
                return self._fail("interrupted", 130)
            ended = self._ended()
            if ended and not self._done():
                return self._fail(ended, 1)

    def _done(self) -> bool:
        return self.stopping or self.handed_over

    @abstractmethod
    def _ended(self) -> str | None:
        """Why a rank has ended (naming it), if one has."""

    @abstractmethod
    def _end_all(self) -> None:
        """End every rank this launcher started."""

    def _fail(self, why: str, code: int) -> None:
        """End the other ranks; if rank 0 is still stuck after the grace period, end it too."""
        self.stopping = True
        self._end_all()
        timer = threading.Timer(GRACE_S, _hard_exit, args=(why, code))
        timer.daemon = True  # a rank 0 that unwinds by itself exits without waiting for it
        timer.start()

    def hand_over(self) -> None:
        """Every rank has joined: the runtime watches them now, and signals go to rank 0's main
        thread alone, which no collective blocks any more."""
        self.handed_over = True
        if self._watcher is not threading.current_thread():
            self._watcher.join()
        if threading.current_thread() is threading.main_thread():
            self._restore_signals()

    def _restore_signals(self) -> None:
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None


def _hard_exit(why: str, code: int) -> None:
    print(f"dist-runtime: {why}; stopping all ranks", file=sys.stderr, flush=True)
    os._exit(code)
