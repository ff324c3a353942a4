"""The BPF hold-off protocol (map bpftune_hold, struct tcp_buffer_hold).

Once a limit suffices for a connection, the BPF side stops sending that
connection's events for this tunable (while the limit stays and the
connection shows no more than it did, plus one reference step) for
HOLD_MIN_S, doubling with every further "enough" verdict on it up to
HOLD_MAX_S.  Other connections are judged on their own evidence.  Handling
an event costs the daemon about a millisecond on a real CPU (namespace
switch, sysctl reads) and tens of milliseconds in an emulated one: without
this, a busy path kept it ~40 % busy to conclude "enough" a dozen times a
second, taking CPU from the traffic.

The model here is the tuner's own; the map is written only through the
:class:`MapUpdate` effects its methods return.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ...bindings import TcpBufferHold, TcpBufferHoldKey
from ...declarations import MapUpdate, Steps
from .conn import Conn
from .rates import CONN_MEMORY

HOLD_MIN_S = 0.25
HOLD_MAX_S = 2.0
HOLD_MAP = "bpftune_hold"
U64_MAX = 2**64 - 1
# (netns cookie, tunable id, connection hash); connection 0: the whole namespace.
HoldKey = tuple[int, int, int]


@dataclass(frozen=True)
class Hold:
    """A hold-off of one connection's (or, keyed by connection 0, a whole
    namespace's) tcp_rmem/tcp_wmem events (struct tcp_buffer_hold): until
    ``until`` (clock seconds), while the limit is ``limit``, events whose
    metric is at most ``metric``."""

    until: float
    limit: int
    metric: int


def hold_metric(conn: Conn) -> int:
    """What the BPF side compares with a hold's metric: a receiver's bytes
    read per RTT (rcvq_space.space), a sender's bytes in flight and unsent."""
    return conn.delivered if conn.receive else conn.window + conn.unsent


def hold_seconds(verdicts: int) -> float:
    """Hold-off after the ``verdicts``-th "enough" in a row (1-based)."""
    return min(HOLD_MAX_S, HOLD_MIN_S * float(2 ** max(0, verdicts - 1)))


def hold_update(key: HoldKey, hold: Hold) -> MapUpdate:
    """The bpftune_hold element for a hold (struct tcp_buffer_hold_key ->
    struct tcp_buffer_hold); the clock is monotonic seconds and the BPF side
    compares bpf_ktime_get_ns."""
    cookie, tunable, conn = key
    k = TcpBufferHoldKey(netns_cookie=cookie, tunable=tunable, conn=conn)
    v = TcpBufferHold(until_ns=int(hold.until * 1e9), limit=hold.limit, metric=min(hold.metric, U64_MAX))
    return MapUpdate(HOLD_MAP, k.pack(), v.pack())


class HoldOffs(Mapping[HoldKey, Hold]):
    """Hold-offs in force and "enough" verdicts in a row, per key; the
    least recently set are forgotten first (the map is an LRU hash of the
    same size)."""

    def __init__(self) -> None:
        self._holds: OrderedDict[HoldKey, Hold] = OrderedDict()
        self._enough: OrderedDict[HoldKey, int] = OrderedDict()

    def __getitem__(self, key: HoldKey) -> Hold:
        return self._holds[key]

    def __iter__(self) -> Iterator[HoldKey]:
        return iter(self._holds)

    def __len__(self) -> int:
        return len(self._holds)

    def hold(self, key: HoldKey, hold: Hold) -> MapUpdate:
        self._holds.pop(key, None)
        self._holds[key] = hold
        while len(self._holds) > CONN_MEMORY:
            self._holds.popitem(last=False)
        return hold_update(key, hold)

    def sufficient(
        self, cookie: int, tunable_id: int, limit: int, conn: Conn, now: float, steps: Steps
    ) -> tuple[MapUpdate, ...]:
        """The limit suffices for this connection: hold off its events while
        it shows no more than now (one reference step of margin), longer with
        every verdict on it in a row.  Connections the BPF side cannot tell
        apart (no hash) are not held."""
        if not conn.conn:
            return ()
        key = (cookie, tunable_id, conn.conn)
        n = self._enough.pop(key, 0) + 1
        self._enough[key] = n
        while len(self._enough) > CONN_MEMORY:
            self._enough.popitem(last=False)
        metric = steps.grow(hold_metric(conn))
        return (self.hold(key, Hold(now + hold_seconds(n), limit, metric)),)

    def new_limit(self, cookie: int, tunable_id: int, limit: int, grown_until: float | None) -> tuple[MapUpdate, ...]:
        """A new limit in a namespace: every connection is judged afresh (the
        BPF side ignores holds for another limit anyway).  After a growth
        (``grown_until``) the connections grow into it for a cooldown's while
        before they are judged again: the whole namespace is held till then."""
        for k in [k for k in self._enough if k[:2] == (cookie, tunable_id)]:
            del self._enough[k]
        if grown_until is None:
            return ()
        return (self.hold((cookie, tunable_id, 0), Hold(grown_until, limit, U64_MAX)),)
