"""A pressing connection as the BPF side reports it, and what it needs.

Buffer maxima grow toward what the pressing connection needs, not by fixed
25 % steps: its goodput times its smallest RTT (the bandwidth-delay
product), converted to buffer bytes with the connection's own
buffer-per-window ratio (see the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...bindings import TcpBufferConn, TcpBufferConnFlag, TcpBufferEvent, field_names
from ...declarations import Steps
from ...events import Event

# A queue is forming (the path is full) once the RTT exceeds the minimum by
# 15 % and by at least a millisecond (below that it is scheduling noise).
QUEUE_FACTOR = 1.15
QUEUE_MIN_US = 1000
# Window wanted once the path is full: twice the BDP, so the pipe stays full
# through a multiplicative decrease (Reno/CUBIC halve their window on loss;
# BBR keeps up to twice the BDP in flight).
HEADROOM = 2.0
# Window wanted while the path still has room: a multiple of the current
# one, as large as the learning rate allows a step to be (x4 at rate 4).
EXPLORE = 4.0


def max_step_factor(steps: Steps) -> float:
    """Largest multiplicative step one change may take: 1 + 12 reference
    steps (x4 at learning rate 4, x1.1875 at rate 0)."""
    return 1.0 + 12 * steps.fraction


def explore_factor(steps: Steps) -> float:
    """How far a window-limited connection on a path with room is probed:
    the largest step the learning rate allows (x4 at rate 4)."""
    return min(EXPLORE, max_step_factor(steps))


@dataclass(frozen=True)
class Conn:
    """One pressing connection, as struct tcp_buffer_conn reports it."""

    flags: int
    rtt_us: int
    min_rtt_us: int = 0
    mss: int = 1448
    buf: int = 0
    queued: int = 0
    window: int = 0
    window_cap: int = 0
    delivered: int = 0
    interval_us: int = 0
    cwnd: int = 0
    conn: int = 0
    bytes: int = 0
    ts_ns: int = 0
    unsent: int = 0
    # Goodput measured across this connection's samples (bytes/s; 0: none yet).
    measured_rate: float = 0.0

    @classmethod
    def from_event(cls, event: Event) -> Conn:
        c = TcpBufferConn.from_view(event.payload(TcpBufferEvent.C_TYPE).conn)
        return cls(**{name: getattr(c, name) for name in STRUCT_FIELDS})

    @property
    def receive(self) -> bool:
        return bool(self.flags & TcpBufferConnFlag.F_RCV)

    @property
    def base_rtt_us(self) -> int:
        return self.min_rtt_us or self.rtt_us

    def rate(self) -> float:
        """Bytes per second the connection moves now: its goodput between
        samples when known, else the kernel's own per-RTT estimate."""
        if self.measured_rate > 0:
            return self.measured_rate
        if self.receive:
            return self.delivered * 1e6 / self.rtt_us if self.rtt_us else 0.0
        if self.delivered and self.interval_us:
            return self.delivered * self.mss * 1e6 / self.interval_us
        return self.window * 1e6 / self.rtt_us if self.rtt_us else 0.0

    def bdp(self) -> float:
        """Bandwidth-delay product: the rate times the RTT without a queue."""
        return self.rate() * self.base_rtt_us / 1e6

    def queueing(self) -> bool:
        """The RTT shows a standing queue: the path is full."""
        if not self.min_rtt_us or not self.rtt_us:
            return False
        return self.rtt_us > QUEUE_FACTOR * self.min_rtt_us and self.rtt_us - self.min_rtt_us >= QUEUE_MIN_US

    def effective_window(self) -> int:
        """The window the connection can use now."""
        if self.receive:
            return min(self.window, self.window_cap) if self.window_cap else self.window
        return self.window

    def window_limited(self) -> bool:
        """The limit, not the application, sets the pace."""
        if self.receive:
            # The reader consumes at least 3/4 of the usable window per RTT
            # (the kernel's per-RTT count only ever grows: prefer goodput).
            per_rtt = self.measured_rate * self.rtt_us / 1e6 if self.measured_rate > 0 else self.delivered
            return per_rtt * 4 >= 3 * self.effective_window() > 0
        # Waiting for buffer space with (almost) everything written already
        # in flight: nothing else holds the data back.
        return self.window > 0 and self.unsent <= max(4 * self.mss, self.window // 4)

    def buffer_per_window(self) -> float:
        """Buffer bytes per window byte for this connection.

        Receive: the kernel's space-to-window ratio, as this socket shows it
        (rcvbuf over the window it allows).  Send: the buffer holds the
        flight plus as much again unsent, at the measured truesize overhead.
        """
        if self.receive:
            if self.window <= 0 or self.buf <= 0:
                return 2.0
            return min(4.0, max(1.0, self.buf / self.window))
        held = self.window + self.unsent
        overhead = self.queued / held if held > 0 and self.queued > 0 else 1.0
        return 2.0 * min(4.0, max(1.0, overhead))

    def need(self, steps: Steps, first_limit: bool = False) -> int:
        """Buffer bytes this connection needs (see the module docstring).
        ``first_limit``: the limit is still the one the tuner found (it has
        not grown it in this namespace yet); see first_press_need."""
        if self.queueing():
            return self.full_need()
        first = self.first_press_need() if first_limit else 0
        return max(self._need_with_room(steps), first)

    def _need_with_room(self, steps: Steps) -> int:
        if self.window_limited():
            return int(explore_factor(steps) * self.effective_window() * self.buffer_per_window())
        if not self.receive and self.cwnd:
            # A sender its congestion window holds back on a path with room
            # (slow start) will use that window soon: room for it and as
            # much unsent again, as the kernel sizes send buffers (with the
            # measured truesize overhead rather than 4 KiB a segment).  Not
            # once a queue forms: a window inflated by a queue needs nothing.
            return max(self.full_need(), int(self.cwnd * self.mss * self.buffer_per_window()))
        return self.full_need()

    def first_press_need(self) -> int:
        """A receiver whose buffer reached the limit the tuner found, before
        any goodput could be measured (its first samples: slow start), on a
        path with no queue: room for the most its window can be, the cap its
        window scale set at the handshake.  Its rate says nothing yet, and
        only while it is still ramping up can the kernel's receive autotuning
        follow a raised limit (on 6.1 a buffer clamped at the old limit stays
        there); the cap bounds what it asks.  Only for the first growth in a
        namespace: once the tuner has grown the limit, each new connection's
        window scale follows the grown limit, its cap says nothing about
        need, and every later growth is need-based (the memory discipline).
        (A sender's send buffer follows a raised limit whenever its
        congestion window grows, so senders need no such rule.)"""
        if not self.receive or not self.flags & TcpBufferConnFlag.F_LIMIT or self.measured_rate > 0:
            return 0
        if self.window_cap <= self.effective_window():
            return 0
        return int(self.window_cap * self.buffer_per_window())

    def full_need(self) -> int:
        """Buffer bytes for a window of twice the BDP: what keeps the pipe
        full at the rate measured now."""
        return int(HEADROOM * self.bdp() * self.buffer_per_window())

    def describe(self) -> str:
        side = "receiver" if self.receive else "sender"
        text = f"a {side} at {self.rate() * 8 / 1e6:.1f} Mbit/s, RTT {_ms(self.rtt_us)}"
        if self.min_rtt_us:
            text += f" (min {_ms(self.min_rtt_us)})"
        if not self.receive and self.cwnd:
            text += f", cwnd {self.cwnd}, {self.window} in flight, {self.unsent} unsent"
        if self.flags & TcpBufferConnFlag.F_WSCALE:
            text += f", window capped at {self.window_cap} by its window scale"
        elif self.flags & TcpBufferConnFlag.F_LIMIT:
            text += f", buffer {self.buf} at the limit"
        return text


# The fields of struct tcp_buffer_conn a Conn keeps (measured_rate is ours).
STRUCT_FIELDS = tuple(f.name for f in fields(Conn) if f.name in field_names(TcpBufferConn))


def _ms(us: int) -> str:
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us} us"
