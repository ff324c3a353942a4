"""What the tuner remembers of a connection between its samples: its
smallest RTT and its goodput (the kernel's own minimum is from the handshake
on a receiver, often above what data samples show; its per-RTT rate
estimates are noisy)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

from ...bindings import TcpBufferConnFlag
from .conn import Conn

# Connections remembered (and hold-off verdicts kept, see holds.py).
CONN_MEMORY = 4096
# Goodput is measured over at least this long (and two RTTs); an older
# anchor is dropped.
RATE_MIN_NS = 100_000_000
RATE_MAX_NS = 5_000_000_000


@dataclass
class ConnTrack:
    """What the tuner remembers of one connection between its samples."""

    min_rtt_us: int
    anchor_ts: int
    anchor_bytes: int
    rate: float = 0.0


class ConnTracker:
    """The connections seen lately, least recently seen dropped first."""

    def __init__(self) -> None:
        self._conns: OrderedDict[tuple[int, int, int], ConnTrack] = OrderedDict()

    def remember(self, cookie: int, conn: Conn) -> Conn:
        """The connection with the smallest RTT it has shown so far and its
        goodput since an earlier sample (bytes over kernel time)."""
        if not conn.conn:
            return conn
        key = (cookie, conn.flags & (TcpBufferConnFlag.F_RCV | TcpBufferConnFlag.F_SND), conn.conn)
        track = self._conns.pop(key, None) or ConnTrack(0, conn.ts_ns, conn.bytes)
        self._conns[key] = track
        while len(self._conns) > CONN_MEMORY:
            self._conns.popitem(last=False)
        seen = [v for v in (conn.min_rtt_us, conn.rtt_us, track.min_rtt_us) if v > 0]
        if seen:
            track.min_rtt_us = min(seen)
        elapsed = conn.ts_ns - track.anchor_ts
        if elapsed > RATE_MAX_NS or elapsed < 0 or conn.bytes < track.anchor_bytes:
            track.anchor_ts, track.anchor_bytes, track.rate = conn.ts_ns, conn.bytes, 0.0
        elif elapsed >= max(RATE_MIN_NS, 2000 * conn.rtt_us):
            track.rate = (conn.bytes - track.anchor_bytes) * 1e9 / elapsed
            track.anchor_ts, track.anchor_bytes = conn.ts_ns, conn.bytes
        return dataclasses.replace(conn, min_rtt_us=track.min_rtt_us or conn.min_rtt_us, measured_rate=track.rate)
