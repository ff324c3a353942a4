"""Events lost before a tuner saw them: counted in one place, and said.

An event is lost three ways:

* the BPF side found the shared ring buffer full (each object counts its own
  drops in its ``bpftune_ringbuf_drops`` global);
* a record too short to be an event (malformed);
* an event for a tuner id no tuner has had (unknown).  An event still queued
  for a tuner that was stopped is no loss: it is dropped on purpose.

A lost event may be an administrator's write to a sysctl a tuner manages:
then the tuner keeps tuning a value it should have left alone.  So losses are
logged, at most once per interval and only when something new was lost, and
kept for the query ``status`` answer and the metrics.

The daemon owns one :class:`EventLoss`; the ring buffer feeds the malformed
and unknown counts as it dispatches, and the daemon reads each object's drop
counter (:meth:`EventLoss.bpf_count`) while events flow and once more before
the object is closed.  A metrics scrape reads from another thread: the
counts are guarded by a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("pybpftune.loss")

# At most one line per this many seconds.
LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class LossCounts:
    ring_full: int = 0
    malformed: int = 0
    unknown: int = 0

    @property
    def total(self) -> int:
        return self.ring_full + self.malformed + self.unknown


class EventLoss:
    """Counts of lost events, and when they were last said."""

    def __init__(self, interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._ring_full = 0
        self._malformed = 0
        self._unknown = 0
        self._bpf: dict[int, int] = {}  # object key (a tuner id) -> its counter when last read
        self._said = 0  # the total when the last line was logged
        self._said_at: float | None = None

    # --- fed by the ring buffer and the daemon -----------------------------------

    def malformed_event(self) -> None:
        with self._lock:
            self._malformed += 1

    def unknown_event(self) -> None:
        with self._lock:
            self._unknown += 1

    def bpf_count(self, key: int, value: int) -> None:
        """One object's drop counter as read now (it only grows while the
        object lives; ``key`` names the object: tuner ids are never reused)."""
        with self._lock:
            last = self._bpf.get(key, 0)
            if value > last:
                self._ring_full += value - last
            self._bpf[key] = max(value, last)

    def forget(self, key: int) -> None:
        """The object is closed (after a last :meth:`bpf_count`): its drops stay counted."""
        with self._lock:
            self._bpf.pop(key, None)

    # --- read -----------------------------------------------------------------------

    def counts(self) -> LossCounts:
        with self._lock:
            return LossCounts(self._ring_full, self._malformed, self._unknown)

    @property
    def ring_full(self) -> int:
        return self.counts().ring_full

    @property
    def malformed(self) -> int:
        return self.counts().malformed

    @property
    def unknown(self) -> int:
        return self.counts().unknown

    def due(self) -> float | None:
        """When a line about losses not yet said may be logged (``clock``
        time, possibly now); None when nothing new was lost."""
        with self._lock:
            if self._ring_full + self._malformed + self._unknown <= self._said:
                return None
            return self.clock() if self._said_at is None else self._said_at + self.interval

    def report(self) -> bool:
        """Log one line if something was lost since the last line and the
        interval has passed since it; True if a line was logged."""
        due = self.due()
        now = self.clock()
        if due is None or now < due:
            return False
        counts = self.counts()
        new = counts.total - self._said
        self._said, self._said_at = counts.total, now
        log.warning(
            "lost %d event%s before a tuner saw %s (since start: %d because the ring buffer was full, "
            "%d malformed, %d for an unknown tuner); an administrator's change to a tuned sysctl may have "
            "been missed",
            new,
            "" if new == 1 else "s",
            "it" if new == 1 else "them",
            counts.ring_full,
            counts.malformed,
            counts.unknown,
        )
        return True
