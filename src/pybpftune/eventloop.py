"""The daemon's one event loop: file descriptors to read and timers that are due.

Everything the daemon waits for goes through one ``epoll`` (``selectors``):
the ring buffer's epoll fd, and whatever else registers a reader (a query
socket, an inotify fd, ...).  The loop sleeps until an fd is readable or the
earliest timer is due, so an idle daemon makes no fixed-rate wake-ups.
Signals wake it at once through a self-pipe (``signal.set_wakeup_fd``):
without it, PEP 475 would resume the wait after a handler ran and a stop
request could sit unnoticed until the next timer.

Callbacks run on the loop's thread, one at a time; one that raises is
reported to ``on_error`` (the daemon disables the tuner behind it) and the
loop goes on.  Another thread hands work to the loop with
``call_soon_threadsafe`` (the daemon's object-loading thread reports each
loaded tuner that way).  Signals given to ``on_signal`` (SIGHUP: reload) run
their callback on the loop's thread too, never inside the signal handler, so
the callback may do anything a reader may.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable, Iterable
from types import FrameType

from .resource import Resource

log = logging.getLogger("pybpftune.loop")

Callback = Callable[[], None]
ErrorHandler = Callable[[str, BaseException], None]


class Timer:
    """A scheduled call, once or every ``interval`` seconds; ``cancel()`` stops it."""

    __slots__ = ("callback", "cancelled", "interval", "name", "when")

    def __init__(self, when: float, callback: Callback, name: str, interval: float | None = None) -> None:
        self.when = when
        self.callback = callback
        self.name = name
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop(Resource):
    """One thread, one epoll; ``run()`` until ``stop()``."""

    def __init__(self, on_error: ErrorHandler | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._on_error = on_error
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wakeup", self._drain_wakeup))
        self._previous_handlers: dict[int, object] = {}
        self._previous_wakeup: int | None = None
        # Calls handed over by other threads (deque appends and pops are atomic).
        self._soon: collections.deque[tuple[str, Callback]] = collections.deque()
        self._signal_callbacks: dict[int, Callable[[int], None]] = {}
        self.wakeups = 0  # how often the loop woke up: the idle-cost figure benches read

    # --- registration -------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback, name: str = "") -> None:
        """Call ``callback()`` whenever ``fd`` is readable (level-triggered)."""
        self._selector.register(fd, selectors.EVENT_READ, (name or f"fd {fd}", callback))

    def remove_reader(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def add_writer(self, fd: int, callback: Callback, name: str = "") -> None:
        """Call ``callback()`` whenever ``fd`` is writable (level-triggered).
        An fd is either a reader or a writer: remove one before adding the other."""
        self._selector.register(fd, selectors.EVENT_WRITE, (name or f"fd {fd}", callback))

    remove_writer = remove_reader

    def call_at(self, when: float, callback: Callback, name: str = "", interval: float | None = None) -> Timer:
        timer = Timer(when, callback, name or getattr(callback, "__qualname__", "timer"), interval)
        self._schedule(timer)
        return timer

    def call_later(self, delay: float, callback: Callback, name: str = "") -> Timer:
        return self.call_at(self.clock() + delay, callback, name)

    def call_every(self, interval: float, callback: Callback, name: str = "") -> Timer:
        """Call ``callback`` every ``interval`` seconds (measured from each run's end)."""
        return self.call_at(self.clock() + interval, callback, name, interval)

    def call_soon_threadsafe(self, callback: Callback, name: str = "") -> None:
        """From any thread: run ``callback`` on the loop's thread as soon as it
        next wakes (it is woken now)."""
        self._soon.append((name or getattr(callback, "__qualname__", "call"), callback))
        self._wake()

    def _schedule(self, timer: Timer) -> None:
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))

    # --- signals ------------------------------------------------------------------

    def stop_on(self, signals: Iterable[int], callback: Callable[[int], None] | None = None) -> None:
        """Install handlers that stop the loop (after ``callback(signum)``) for ``signals``.
        Restored by ``close()``."""

        def handler(signum: int, frame: FrameType | None) -> None:
            if callback is not None:
                callback(signum)
            self.stop()

        for s in signals:
            self._install(s, handler)

    def on_signal(self, signum: int, callback: Callable[[int], None]) -> None:
        """Run ``callback(signum)`` on the loop's thread after ``signum`` arrives
        (the loop keeps running).  Restored by ``close()``."""

        def handler(signum: int, frame: FrameType | None) -> None:
            # Nothing here: the wake-up fd carries the signal number to
            # _drain_wakeup, which runs the callback outside the handler.
            pass

        self._signal_callbacks[signum] = callback
        self._install(signum, handler)

    def _install(self, signum: int, handler: Callable[[int, FrameType | None], None]) -> None:
        previous = signal.signal(signum, handler)
        self._previous_handlers.setdefault(signum, previous)
        if self._previous_wakeup is None:
            self._previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _drain_wakeup(self) -> None:
        # set_wakeup_fd writes each arriving signal's number as one byte;
        # stop() and call_soon_threadsafe write 0.  A signal that arrives twice before we read runs
        # its callback once: a reload is idempotent.
        seen: set[int] = set()
        try:
            while data := os.read(self._wake_r, 512):
                seen.update(data)
        except BlockingIOError:
            pass
        for signum in sorted(seen):
            callback = self._signal_callbacks.get(signum)
            if callback is not None:
                self._call(f"signal {signum}", functools.partial(callback, signum))

    # --- running ------------------------------------------------------------------

    def stop(self) -> None:
        """Make ``run()`` return after the current callback (safe from signal handlers)."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        if self._closed:
            return  # the pipe's fd number may belong to something else by now
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe wakes the loop anyway

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _next_timeout(self, max_wait: float | None) -> float | None:
        if self._soon:
            return 0.0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return max_wait
        wait = max(0.0, self._timers[0][0] - self.clock())
        return wait if max_wait is None else min(wait, max_wait)

    def run_once(self, max_wait: float | None = None) -> None:
        """Wait for one batch of ready fds or due timers (at most ``max_wait``
        seconds; None: until something happens), and run their callbacks."""
        timeout = self._next_timeout(max_wait)
        ready = self._selector.select(timeout)
        self.wakeups += 1
        for key, _mask in ready:
            name, callback = key.data
            self._call(name, callback)
        while self._soon:
            name, callback = self._soon.popleft()
            self._call(name, callback)
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _when, _seq, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._call(timer.name, timer.callback)
            if timer.interval is not None and not timer.cancelled:
                timer.when = self.clock() + timer.interval
                self._schedule(timer)

    def run(self) -> None:
        """Run until ``stop()``."""
        while not self._stopping:
            self.run_once()

    def _call(self, name: str, callback: Callback) -> None:
        try:
            callback()
        except Exception as exc:
            if self._on_error is None:
                raise
            self._on_error(name, exc)

    # --- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        """Restore signal handlers and close the selector and pipe.  Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        if self._previous_wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._previous_wakeup = None
        for s, previous in self._previous_handlers.items():
            signal.signal(s, previous)  # type: ignore[arg-type]
        self._previous_handlers.clear()
        self._signal_callbacks.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
