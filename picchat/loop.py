"""A small reactor on ``selectors``: readers, writers, timers, signals.

It knows nothing about chat. One thread; the selector (epoll on Linux) waits
until an fd is ready, a timer is due or a signal arrives. Nothing wakes it
while idle: the select timeout is the time to the next due timer, or forever.

- ``call_soon`` callbacks run at the end of the current turn, after every
  ready fd has been served.
- ``call_when_quiet`` callbacks run at the end of the first turn that finds
  no fd ready (a poll that does not wait), or after ``GATHER_TURNS`` turns or
  ``GATHER_SECONDS``: the server flushes its output there, so that input
  arriving back to back (a flood, many talkers) goes out in one send() per
  connection per burst rather than per recv(). An idle server pays one extra
  poll per message. ``hurry`` makes them run at the end of the current turn
  instead (a queue that must not wait for more).
- Signals arrive through ``signal.set_wakeup_fd`` on a socketpair, so a signal
  wakes the selector and its callback runs in the loop like any other event,
  never inside a Python signal handler.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import signal
import socket
import time
from collections.abc import Callable

from . import logs

log = logs.get(__name__)

Callback = Callable[[], object]


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        # A cancelled timer stays in the heap until its time comes: let go of
        # what its callback holds (a closed connection, its TLS state) now.
        self.callback = _nothing


def _nothing() -> None:
    pass


_NO_ARG = object()  # a reader called without an argument


GATHER_TURNS = 8  # turns in which input keeps arriving before output goes out anyway
GATHER_SECONDS = 0.005  # and at most this long


class _Handlers:
    __slots__ = ("reader", "writer", "arg")

    def __init__(self) -> None:
        self.reader: Callable[..., object] | None = None
        self.writer: Callback | None = None
        self.arg: object = _NO_ARG  # passed to the reader, if given

    @property
    def mask(self) -> int:
        return (selectors.EVENT_READ if self.reader else 0) | (
            selectors.EVENT_WRITE if self.writer else 0
        )


class Loop:
    def __init__(self, selector: selectors.BaseSelector | None = None) -> None:
        self._selector = selector or selectors.DefaultSelector()
        self._handlers: dict[int, _Handlers] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._compact_at = 64  # heap size at which cancelled timers are swept out
        self._counter = itertools.count()
        self._soon: list[Callback] = []
        self._quiet: list[Callback] = []
        self._quiet_since = 0.0  # when the first of them was asked for
        self._quiet_turns = 0  # turns they have waited
        self._hurry = False  # run them at the end of this turn
        self._signals: dict[int, Callback] = {}
        self._old_signals: dict[int, object] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._old_wakeup_fd = -1
        self._running = False
        self.turns = 0  # loop iterations, for tests and statistics

    @staticmethod
    def time() -> float:
        return time.monotonic()

    # ---- fds -------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callable[..., object], arg: object = None) -> None:
        """Call ``callback()`` when ``fd`` is readable, or ``callback(arg)``
        with an ``arg``: with 10,000 connections, one bound method and their
        ids cost less than a closure each."""
        self._set(fd, "reader", callback)
        self._handlers[fd].arg = _NO_ARG if arg is None else arg

    def remove_reader(self, fd: int) -> None:
        self._set(fd, "reader", None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set(fd, "writer", callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, "writer", None)

    def has_writer(self, fd: int) -> bool:
        h = self._handlers.get(fd)
        return h is not None and h.writer is not None

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` altogether (call before closing it)."""
        if self._handlers.pop(fd, None) is not None:
            self._selector.unregister(fd)

    def _set(self, fd: int, which: str, callback: Callback | None) -> None:
        h = self._handlers.get(fd)
        if h is None:
            if callback is None:
                return
            h = self._handlers[fd] = _Handlers()
            setattr(h, which, callback)
            self._selector.register(fd, h.mask, h)
            return
        if getattr(h, which) is callback:
            return
        setattr(h, which, callback)
        mask = h.mask
        if mask:
            self._selector.modify(fd, mask, h)
        else:
            del self._handlers[fd]
            self._selector.unregister(fd)

    # ---- timers and deferred calls ----------------------------------------

    def call_at(self, when: float, callback: Callback) -> Timer:
        if len(self._timers) >= self._compact_at:
            # Cancelled timers wait in the heap until their time: under a storm
            # of short connections (each with a login timer) sweep them out
            # whenever the heap has doubled since the last sweep: amortised O(1).
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._compact_at = max(64, 2 * len(self._timers))
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._counter), timer))
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.time() + delay, callback)

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` at the end of this turn (or the next, if idle)."""
        self._soon.append(callback)

    def call_when_quiet(self, callback: Callback) -> None:
        """Run ``callback`` once no fd is ready, within GATHER_TURNS turns and
        GATHER_SECONDS (see the module's docstring)."""
        if not self._quiet:
            self._quiet_since = self.time()
            self._quiet_turns = 0
            self._hurry = False
        self._quiet.append(callback)

    def hurry(self) -> None:
        """Run the pending ``call_when_quiet`` callbacks at the end of this turn."""
        if self._quiet:
            self._hurry = True

    # ---- signals -------------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        if self._wakeup is None:
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._wakeup = (r, w)
            self._old_wakeup_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            self.add_reader(r.fileno(), self._read_signals)
        self._signals[signum] = callback
        # The Python-level handler does nothing: the byte on the wakeup fd is
        # the event, and the callback runs in the loop.
        self._old_signals.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, _ignore_signal)

    def _read_signals(self) -> None:
        assert self._wakeup is not None
        try:
            data = self._wakeup[0].recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            callback = self._signals.get(signum)
            if callback is not None:
                callback()

    # ---- running ---------------------------------------------------------------

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self, timeout: float | None = None) -> None:
        """One turn: wait for events (at most ``timeout``), dispatch them."""
        if self._soon or self._quiet:
            wait: float | None = 0
        else:
            wait = self._next_timeout()
            if timeout is not None:
                wait = timeout if wait is None else min(wait, timeout)
        self.turns += 1
        ready = self._selector.select(wait)
        for key, mask in ready:
            h: _Handlers = key.data
            # An earlier callback of this turn may have closed this fd (and a
            # new connection may even have reused its number): check each time.
            if mask & selectors.EVENT_READ and h.reader is not None:
                if self._handlers.get(key.fd) is h:
                    if h.arg is _NO_ARG:
                        h.reader()
                    else:
                        h.reader(h.arg)
            if mask & selectors.EVENT_WRITE and h.writer is not None:
                if self._handlers.get(key.fd) is h:
                    h.writer()
        self._run_timers()
        self._run_soon()
        if self._quiet:
            self._quiet_turns += 1
            if (
                not ready
                or self._hurry
                or self._quiet_turns > GATHER_TURNS
                or self.time() - self._quiet_since >= GATHER_SECONDS
            ):
                quiet, self._quiet = self._quiet, []
                for callback in quiet:
                    callback()
                self._run_soon()

    def _run_soon(self) -> None:
        while self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                callback()

    def _next_timeout(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if not timers:
            return None
        return max(0.0, timers[0][0] - self.time())

    def _run_timers(self) -> None:
        now = self.time()
        timers = self._timers
        while timers and (timers[0][0] <= now or timers[0][2].cancelled):
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True  # done: cancel() afterwards is harmless
                timer.callback()

    def close(self) -> None:
        for signum, old in self._old_signals.items():
            signal.signal(signum, old)
        self._old_signals.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self.forget(self._wakeup[0].fileno())
            for s in self._wakeup:
                s.close()
            self._wakeup = None
        self._selector.close()


def _ignore_signal(signum: int, frame: object) -> None:
    pass
