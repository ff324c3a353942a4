"""What the daemon changed (or, in advice mode, would change), for queries.

The store hands every logged change to :meth:`History.record`; the query
server reads ``changes`` (in order, bounded) and ``advice`` (the latest
advice per tunable and namespace).  Nothing here touches the system.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

# Changes kept for `-q changes`; older ones are counted, not kept, so a
# daemon running for months holds bounded memory.
MAX_CHANGES = 10_000
# Distinct (tunable, namespace) advice entries kept (namespaces come and go).
MAX_ADVICE = 4096

Value = int | str


@dataclass(frozen=True)
class Change:
    """One change (or piece of advice) as it was logged."""

    time: float  # seconds since the epoch
    tuner: str
    tunable: str
    scenario: str
    netns_cookie: int
    global_ns: bool
    old: tuple[Value, ...]
    new: tuple[Value, ...]
    reason: str
    advice: bool
    # The shell command that makes (or would make) the change; None where no
    # command can (a per-connection setting, a namespace with no path).
    command: str | None

    @property
    def where(self) -> str:
        return "global ns" if self.global_ns else f"non-global ns (cookie {self.netns_cookie})"


@dataclass(frozen=True)
class Advice:
    """The latest advice for one tunable in one namespace."""

    latest: Change
    count: int  # how often the tuners decided so (any value)
    first: float  # when first advised


class History:
    def __init__(self, max_changes: int = MAX_CHANGES, max_advice: int = MAX_ADVICE) -> None:
        self.changes: deque[Change] = deque(maxlen=max_changes)
        self.forgotten = 0  # changes dropped from the front of ``changes``
        self._advice: dict[tuple[str, int], Advice] = {}
        self._max_advice = max_advice

    def record(self, change: Change) -> bool:
        """Keep one change; True if it is news.  The same advice again (in
        advice mode nothing changes, so tuners keep deciding the same) is
        counted in its advice entry, not listed as another change."""
        news = True
        if change.advice:
            key = (change.tunable, change.netns_cookie)
            previous = self._advice.pop(key, None)
            if previous is None:
                self._advice[key] = Advice(change, 1, change.time)
                while len(self._advice) > self._max_advice:
                    del self._advice[next(iter(self._advice))]
            else:
                self._advice[key] = replace(previous, latest=change, count=previous.count + 1)
                news = previous.latest.new != change.new
        if news:
            if self.changes.maxlen is not None and len(self.changes) == self.changes.maxlen:
                self.forgotten += 1
            self.changes.append(change)
        return news

    def advice(self) -> list[Advice]:
        """Current advice, oldest first (by when it was first given)."""
        return sorted(self._advice.values(), key=lambda a: a.first)

    def forget_namespace(self, netns_cookie: int) -> None:
        """A namespace is gone: its advice can no longer be followed."""
        for key in [k for k in self._advice if k[1] == netns_cookie]:
            del self._advice[key]


def now() -> float:
    return time.time()
