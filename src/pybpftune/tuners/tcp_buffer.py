"""tcp_buffer tuner: TCP buffer limits, TCP memory, the SYN backlog.

What it does (bpftune's tcp_buffer, docs/tuners/tcp_buffer.md):

* grows ``tcp_rmem[2]`` when a connection's receive buffer presses against it
  (or its window is capped by the window scale fixed at its handshake), and
  ``tcp_wmem[2]`` when a sender is limited by its send buffer at
  ``tcp_wmem[2]``, and turns ``tcp_moderate_rcvbuf`` on with the first
  ``tcp_rmem`` change;
* raises ``tcp_mem`` when TCP nears memory pressure or exhaustion, never
  beyond fractions of the free buffer pages F (1/16, 1/8, 1/4; F estimated
  from MemTotal when /proc/zoneinfo gives none, see hostmem); a
  ``tcp_mem[2]`` above F/4, which no memory can back, is brought down to it
  the first time the tuner acts on tcp_mem; when ``tcp_mem[2]`` cannot grow
  any more it shrinks the buffer maxima instead;
  near exhaustion it turns on the low-memory switches
  (``tcp_no_metrics_save``, ``tcp_no_ssthresh_metrics_save``,
  ``high_order_alloc_disable``, a smaller ``tcp_max_syn_backlog``) in the
  host's namespace and the one that hit the limit, and undoes them once
  TCP's allocated memory has stayed clear of the pressure threshold;
* on SYN floods grows ``tcp_max_syn_backlog`` (never beyond what 1/256 of
  memory holds in request sockets) while floods correlate with
  connections being established, shrinks it when they do not (an attack),
  and switches ``tcp_syncookies`` on under memory pressure or off when
  cookies only ever fail;
* backs a buffer maximum off when its growth correlates with latency.

Beyond bpftune, buffer maxima grow toward what the pressing connection
needs, not by fixed 25 % steps: its goodput times its smallest RTT (the
bandwidth-delay product), converted to buffer bytes with the connection's own
buffer-per-window ratio.  While a connection is window-limited and its RTT
shows no queue, the path has room: the window it needs is taken as the
largest step the learning rate allows beyond the one it has (x4 at rate 4;
each new connection probes further, as slow start does within one).  Once a queue forms, the need is twice
the BDP (enough to stay full through a halving of the window), so growth
stops near what connections use.  The learning rate bounds every step (at
most 1 + 12 reference steps: x4 at the default rate); a need within one
reference step of the current maximum changes nothing.

The rules are plain functions on plain values (unit-tested with synthetic
events); :class:`TcpBufferTuner` wires them to events, the tunable store and
time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import libbpf
from ..corr import CorrSums, corr_key, read_corr
from ..errors import PybpftuneError
from ..events import Event
from ..hostmem import PAGE_SIZE, HostMemory
from ..sysctl import SysctlMissing
from ..tuner import INT_MAX, Decision, Proposal, Scenario, Steps, Tunable, Tuner, TunerContext
from .common import SayOnce

Values = tuple[int, ...]

# Tunable ids (bpftune_shared.h enum tcp_buffer_tunable).
TCP_WMEM = 0
TCP_RMEM = 1
TCP_MEM = 2
TCP_MODERATE_RCVBUF = 3
TCP_NO_METRICS_SAVE = 4
TCP_NO_SSTHRESH_METRICS_SAVE = 5
HIGH_ORDER_ALLOC_DISABLE = 6
TCP_SYNCOOKIES = 7
TCP_MAX_SYN_BACKLOG = 8
TCP_MAX_ORPHANS = 9

# Scenario ids (enum tcp_buffer_scenario).
BUFFER_INCREASE = 0
BUFFER_DECREASE = 1
BUFFER_DECREASE_LATENCY = 2
MEM_PRESSURE = 3
MEM_EXHAUSTION = 4
MODERATE_RCVBUF = 5
LOW_MEM_ENTER = 6
LOW_MEM_LEAVE = 7
SYN_BACKLOG_INCREASE = 8
SYN_BACKLOG_DECREASE = 9
SYNCOOKIES_ENABLE = 10
SYNCOOKIES_DISABLE = 11
MAX_ORPHANS_INCREASE = 12

# struct tcp_buffer_conn flags (enum tcp_buffer_conn_flag).
F_RCV = 0x1
F_SND = 0x2
F_LIMIT = 0x4
F_WSCALE = 0x8

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
# One socket's buffer maximum may use at most this share of tcp_mem[2].
MEM_CAP_SHARE = 8
# Spacing of changes to one tunable in one namespace: a few RTTs, so the
# connections can grow into the new limit before they are judged again.
COOLDOWN_RTTS = 3
COOLDOWN_MIN_S = 0.1
COOLDOWN_MAX_S = 1.0
MEM_COOLDOWN_S = 0.5
# While in the low-memory state, how often to check whether it can be left.
LOW_MEMORY_CHECK_S = 1.0
SYN_COOLDOWN_S = 1.0
SYN_BACKLOG_MIN = 128
# tcp_max_syn_backlog's memory cap: a listener's full SYN queue of request
# sockets (a few hundred bytes each; 512 with slab overhead) holds at most
# 1/256 of memory.
REQUEST_SOCK_BYTES = 512
SYN_BACKLOG_MEM_SHARE = 256
# How long a connection's full-pipe need protects a limit from latency
# back-offs.
RECENT_NEED_S = 30.0
# Connections whose smallest RTT and goodput are remembered (the kernel's
# own minimum is from the handshake on a receiver, often above what data
# samples show; its per-RTT rate estimates are noisy).
CONN_MEMORY = 4096
# Goodput is measured over at least this long (and two RTTs); an older
# anchor is dropped.
RATE_MIN_NS = 100_000_000
RATE_MAX_NS = 5_000_000_000
SYNCOOKIES_FAILED_MIN = 1024
# The low-memory state is left once TCP's allocated memory has stayed out of
# reach of the pressure threshold (not nearly full of tcp_mem[1]) this long:
# entered near tcp_mem[2] and left well below tcp_mem[1], it cannot flap.
RECOVERY_S = 3.0
# Hold-offs: once a limit suffices for a connection, the BPF side stops
# sending that connection's events for this tunable (while the limit stays
# and the connection shows no more than it did, plus one reference step)
# for HOLD_MIN_S, doubling with every further "enough" verdict on it up to
# HOLD_MAX_S.  Other connections are judged on their own evidence.
# Handling an event costs the daemon about a millisecond on a real CPU
# (namespace switch, sysctl reads) and tens of milliseconds in an emulated
# one: without this, a busy path kept it ~40 % busy to conclude
# "enough" a dozen times a second, taking CPU from the traffic.
HOLD_MIN_S = 0.25
HOLD_MAX_S = 2.0
HOLD_KEY_SIZE = 16  # sizeof(struct tcp_buffer_hold_key)
HOLD_SIZE = 24  # sizeof(struct tcp_buffer_hold)

SAMPLES = ("rcv_space", "snd_buf", "conn_state", "mem_limit", "syn_flood")


def max_step_factor(steps: Steps) -> float:
    """Largest multiplicative step one change may take: 1 + 12 reference
    steps (x4 at learning rate 4, x1.1875 at rate 0)."""
    return 1.0 + 12 * steps.fraction


def explore_factor(steps: Steps) -> float:
    """How far a window-limited connection on a path with room is probed:
    the largest step the learning rate allows (x4 at rate 4)."""
    return min(EXPLORE, max_step_factor(steps))


# --- connections -----------------------------------------------------------------------


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
        c = event.payload("struct tcp_buffer_event").conn
        return cls(
            int(c.flags),
            int(c.rtt_us),
            int(c.min_rtt_us),
            int(c.mss),
            int(c.buf),
            int(c.queued),
            int(c.window),
            int(c.window_cap),
            int(c.delivered),
            int(c.interval_us),
            int(c.cwnd),
            int(c.conn),
            int(c.bytes),
            int(c.ts_ns),
            int(c.unsent),
        )

    @property
    def receive(self) -> bool:
        return bool(self.flags & F_RCV)

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
        if not self.receive or not self.flags & F_LIMIT or self.measured_rate > 0:
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
        if self.flags & F_WSCALE:
            text += f", window capped at {self.window_cap} by its window scale"
        elif self.flags & F_LIMIT:
            text += f", buffer {self.buf} at the limit"
        return text


def _ms(us: int) -> str:
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us} us"


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


@dataclass
class ConnTrack:
    """What the tuner remembers of one connection between its samples."""

    min_rtt_us: int
    anchor_ts: int
    anchor_bytes: int
    rate: float = 0.0


# --- rules (plain functions) ---------------------------------------------------------------


def grow_max(old_max: int, need: int, steps: Steps, cap: int = INT_MAX) -> int | None:
    """New maximum toward ``need``, at most ``max_step_factor`` times the old
    one and never above ``cap``; None when no growth is due.  A need less
    than one reference step above the old maximum changes nothing (a dead
    band that keeps measurement noise from moving the limit)."""
    if need < steps.grow(old_max) or old_max >= cap:
        return None
    target = min(need, int(old_max * max_step_factor(steps)))
    target = max(target, steps.grow(old_max))
    target = min(target, cap, INT_MAX)
    return target if target > old_max else None


def buffer_cap(tcp_mem: Values | None, page_size: int = PAGE_SIZE) -> int:
    """Hard cap of a buffer maximum: INT_MAX and 1/8 of tcp_mem[2]."""
    if not tcp_mem:
        return INT_MAX
    return min(INT_MAX, tcp_mem[2] * page_size // MEM_CAP_SHARE)


def latency_backoff(old_max: int, floor: int, steps: Steps) -> int | None:
    """One step down when buffer growth correlates with latency, never
    below ``floor`` (the namespace's value before we grew it)."""
    new = max(steps.shrink(old_max), floor)
    return new if new < old_max else None


def tcp_mem_cap(memory: HostMemory) -> int:
    """The most any tcp_mem value may be: a quarter of the buffer-usable
    pages F (the kernel's own default for tcp_mem[2] is 3/32 of F)."""
    return max(1, memory.buffer_pages // 4)


def tcp_mem_pressure(mem: Values, free_pages: int, steps: Steps) -> Values | None:
    """tcp_mem when nearing pressure: grow [0] below F/16, [1] below F/8,
    [2] up to F/4 (F: free buffer pages), every value at most F/4 and the
    order kept: a value beyond F/4, which no memory can back, comes down to
    it.  None when nothing changes (or F is not positive)."""
    if free_pages <= 0:
        return None
    lo, pressure, hi = mem
    if lo < free_pages // 16:
        lo = steps.grow(lo)
    if pressure < free_pages // 8:
        pressure = steps.grow(pressure)
    return _ordered(lo, pressure, _grow_high(hi, free_pages, steps), mem)


def _grow_high(hi: int, free_pages: int, steps: Steps) -> int:
    """tcp_mem[2] one step up, at most F/4 (also when it was above)."""
    return max(1, min(steps.grow(hi), free_pages // 4, INT_MAX))


def _ordered(lo: int, pressure: int, hi: int, mem: Values) -> Values | None:
    """(lo, pressure, hi) with lo <= pressure <= hi, or None if that is ``mem``."""
    pressure = min(pressure, hi)
    new = (max(0, min(lo, pressure)), max(0, pressure), hi)
    return new if new != tuple(mem) else None


def tcp_mem_exhaustion(mem: Values, free_pages: int, steps: Steps) -> Values | None:
    """tcp_mem nearing exhaustion: grow [2] up to F/4 (bring it down to F/4
    from above); None if it is at F/4 already (or F is not positive)."""
    if free_pages <= 0:
        return None
    return _ordered(mem[0], mem[1], _grow_high(mem[2], free_pages, steps), mem)


def exhaustion_shrink(values: Values, steps: Steps) -> Values | None:
    """tcp_[rw]mem when tcp_mem[2] cannot grow: one step down, not below the
    default value (upstream meant to do this but its guard was always true)."""
    new_max = max(steps.shrink(values[2]), values[1])
    return (values[0], values[1], new_max) if new_max < values[2] else None


def tcp_allocated_pages(sockstat: str) -> int | None:
    """TCP's allocated pages from /proc/net/sockstat ("TCP: ... mem N"): the
    kernel's memory_allocated, one count for the whole host whatever the
    namespace it is read in."""
    for line in sockstat.splitlines():
        words = line.split()
        if words[:1] == ["TCP:"]:
            fields = dict(zip(words[1::2], words[2::2], strict=False))
            value = fields.get("mem", "")
            return int(value) if value.isdigit() else None
    return None


def memory_recovered(allocated: int, tcp_mem: Values, steps: Steps) -> bool:
    """TCP memory is no longer short: its allocated pages are not nearly
    full of the pressure threshold tcp_mem[1]."""
    return not steps.nearly_full(allocated, tcp_mem[1])


def syncookies_rule(syncookies: int, netstat: dict[str, int], low_memory: bool) -> int | None:
    """New tcp_syncookies, or None.  Off when cookies are on but only ever
    fail; on when memory is short."""
    if syncookies and netstat.get("SyncookiesFailed", 0) >= SYNCOOKIES_FAILED_MIN and not netstat.get("SyncookiesRecv"):
        return 0
    if not syncookies and low_memory:
        return 1
    return None


def syn_backlog_cap(memory: HostMemory) -> int:
    """The most tcp_max_syn_backlog may be: as many request sockets as fit
    in 1/256 of memory (8192 per GiB), never below the 128 floor."""
    return max(SYN_BACKLOG_MIN, min(INT_MAX, memory.total_bytes // SYN_BACKLOG_MEM_SHARE // REQUEST_SOCK_BYTES))


def syn_backlog_rule(backlog: int, corr: CorrSums, steps: Steps, cap: int = INT_MAX) -> tuple[int, int] | None:
    """(scenario, new tcp_max_syn_backlog) for a SYN flood, or None.

    Floods that come with established connections (correlated) are load:
    grow, never beyond ``cap``.  Floods that do not are an attack: shrink,
    not below 128.  A backlog already beyond the cap only shrinks.
    """
    if corr.n > 10 and corr.coefficient() < 0.75:
        new = min(cap, max(SYN_BACKLOG_MIN, steps.shrink(backlog)))
        return (SYN_BACKLOG_DECREASE, new) if new < backlog else None
    new = min(INT_MAX, cap, steps.grow(backlog))
    return (SYN_BACKLOG_INCREASE, new) if new > backlog else None


def parse_netstat(text: str) -> dict[str, int]:
    """TcpExt counters of /proc/net/netstat."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        names, values = head.split(), vals.split()
        if names and names[0] == "TcpExt:":
            out.update({n: int(v) for n, v in zip(names[1:], values[1:], strict=False)})
    return out


# --- the tuner ----------------------------------------------------------------------------


class TcpBufferTuner(Tuner):
    name = "tcp_buffer"
    description = "grows TCP buffer limits toward what connections need; TCP memory and SYN backlog"
    bpf_name = "tcp_buffer_tuner"
    tunables = (
        Tunable(TCP_WMEM, "net.ipv4.tcp_wmem", 3, namespaced=True, labels="min default max"),
        Tunable(TCP_RMEM, "net.ipv4.tcp_rmem", 3, namespaced=True, labels="min default max"),
        Tunable(TCP_MEM, "net.ipv4.tcp_mem", 3, lower=0, labels="min pressure max", ceiling=tcp_mem_cap),
        Tunable(TCP_MODERATE_RCVBUF, "net.ipv4.tcp_moderate_rcvbuf", 1, namespaced=True),
        Tunable(TCP_NO_METRICS_SAVE, "net.ipv4.tcp_no_metrics_save", 1, namespaced=True),
        Tunable(
            TCP_NO_SSTHRESH_METRICS_SAVE, "net.ipv4.tcp_no_ssthresh_metrics_save", 1, namespaced=True, optional=True
        ),
        # Global: the kernel keeps it in init_net's table only.
        Tunable(HIGH_ORDER_ALLOC_DISABLE, "net.core.high_order_alloc_disable", 1, optional=True),
        # A sysctl like any other (upstream OR-ed "optional" into its type,
        # so it was never read and its rules could not fire).
        Tunable(TCP_SYNCOOKIES, "net.ipv4.tcp_syncookies", 1, namespaced=True, optional=True),
        Tunable(TCP_MAX_SYN_BACKLOG, "net.ipv4.tcp_max_syn_backlog", 1, namespaced=True, ceiling=syn_backlog_cap),
        Tunable(TCP_MAX_ORPHANS, "net.ipv4.tcp_max_orphans", 1),
    )
    scenarios = (
        Scenario(
            BUFFER_INCREASE,
            "need to increase TCP buffer size(s)",
            "Need to increase buffer size(s) to maximize throughput",
        ),
        Scenario(
            BUFFER_DECREASE,
            "need to decrease TCP buffer size(s)",
            "Need to decrease buffer size(s) to reduce memory utilization",
        ),
        Scenario(
            BUFFER_DECREASE_LATENCY,
            "need to decrease TCP buffer size due to latency",
            "Latency is starting to correlate with buffer size increases, so decrease buffer size to avoid this effect",
        ),
        Scenario(
            MEM_PRESSURE,
            "approaching TCP memory pressure",
            "Since memory pressure/exhaustion are unstable system states, adjust tcp memory-related tunables",
        ),
        Scenario(
            MEM_EXHAUSTION,
            "approaching TCP memory exhaustion",
            "Since memory exhaustion is a highly unstable state, adjust TCP memory-related tunables "
            "to avoid exhaustion",
        ),
        Scenario(
            MODERATE_RCVBUF,
            "match receive buffer size with throughput needs",
            "Since we are tuning rcvbuf max size, ensure auto-tuning of rcvbuf size for the connection is "
            "enabled to pick optimal rcvbuf size",
        ),
        Scenario(
            LOW_MEM_ENTER,
            "set tunable on entering low-memory state",
            "To reduce memory use when TCP memory is short, switch off optional TCP memory consumers",
        ),
        Scenario(
            LOW_MEM_LEAVE,
            "unset tunable set earlier in low-memory state",
            "TCP memory is no longer short, so restore the tunables changed on entering the low-memory state",
        ),
        Scenario(
            SYN_BACKLOG_INCREASE,
            "increase maximum syn backlog",
            "SYN floods coincide with connections being established, so allow more pending connections",
        ),
        Scenario(
            SYN_BACKLOG_DECREASE,
            "decrease maximum syn backlog",
            "SYN floods do not coincide with connections being established, suggesting an attack; "
            "limit pending connections",
        ),
        Scenario(
            SYNCOOKIES_ENABLE,
            "enable syncookies",
            "TCP memory is short during a SYN flood, so answer SYNs with cookies",
        ),
        Scenario(
            SYNCOOKIES_DISABLE,
            "disable syncookies",
            "SYN cookies are sent but never returned valid, so they only cost work; disable them",
        ),
        Scenario(MAX_ORPHANS_INCREASE, "increase max number of orphaned sockets", ""),
    )
    optional_signals = frozenset({"mem_pressure", "syn_flood"})

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self.page_size = PAGE_SIZE
        self._capped = SayOnce(self.log)
        # Where the memory flags come from when no BPF object is loaded (tests).
        self.near_pressure_flag = False
        self.near_exhaustion_flag = False
        self.netstat_reader: Callable[[int], dict[str, int]] = self._read_netstat
        self.corr_reader: Callable[[int, int], CorrSums] = self._read_corr
        self._last_change: dict[tuple[int, int], float] = {}
        self._written_max: dict[tuple[int, int], int] = {}
        self._needs: dict[tuple[int, int], tuple[int, float]] = {}
        self._cooldown: dict[tuple[int, int], float] = {}
        self._tcp_mem_cache: tuple[float, Values | None] | None = None
        self._conns: OrderedDict[tuple[int, int, int], ConnTrack] = OrderedDict()
        # Low-memory switches we set: cookie -> tunable id -> value before.
        self._low_mem: dict[int, dict[int, int]] = {}
        # TCP's allocated pages now (None: unknown), and since when memory
        # has looked recovered while in the low-memory state.
        self.allocated_reader: Callable[[], int | None] = _read_tcp_allocated
        self._recovered_since: float | None = None
        # Buffer events by outcome, and the time spent handling events.
        self.outcomes: Counter[str] = Counter()
        self.handler_s = 0.0
        # Hold-offs in force and "enough" verdicts in a row, per (cookie,
        # tunable, connection); connection 0: the whole namespace.
        self.holds: OrderedDict[tuple[int, int, int], Hold] = OrderedDict()
        self._enough: OrderedDict[tuple[int, int, int], int] = OrderedDict()

    # --- hooks --------------------------------------------------------------------------

    def bpf_globals(self) -> dict[str, int]:
        return {"nr_free_buffer_pages": self.free_pages}

    def start(self) -> None:
        self.log.debug("tcp_buffer: %s (page size %d)", self.host_memory.describe(), self.page_size)

    def applied(self, proposal: Proposal) -> None:
        key = (proposal.netns_cookie, proposal.tunable)
        self._last_change[key] = self.clock()
        if proposal.tunable == TCP_MEM:
            self._tcp_mem_cache = None
        if proposal.tunable in (TCP_RMEM, TCP_WMEM):
            self._written_max[key] = proposal.new[2]
            # A new limit: every connection is judged afresh (the BPF side
            # ignores holds for another limit anyway).
            for k in [k for k in self._enough if k[:2] == key]:
                del self._enough[k]
            if proposal.scenario == BUFFER_INCREASE:
                # The connections grow into the new limit for a cooldown's
                # while before they are judged again: nothing to send until then.
                until = self.clock() + self._cooldown.get(key, COOLDOWN_MIN_S)
                self._hold((*key, 0), Hold(until, proposal.new[2], 2**64 - 1))
        if proposal.tunable == TCP_RMEM and proposal.scenario == BUFFER_INCREASE:
            self._ensure_moderate_rcvbuf(proposal.netns_cookie)

    def tick(self, now: float) -> float | None:
        self._check_recovery()
        # Only the low-memory state needs watching over time (ticks are off
        # outside it; entering it asks for one, see handle_event).
        return now + LOW_MEMORY_CHECK_S if self._low_mem else math.inf

    def summary_lines(self) -> list[str]:
        lines: list[str] = []
        if self.outcomes:
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
            lines.append(f"Buffer events: {outcomes}; {self.handler_s:.2f} s handling events")
        if self.loaded is None:
            return lines
        for name in SAMPLES:
            gname = f"{name}_sample"
            if not self.loaded.has_global(gname):
                continue
            count, rate = self._sample(gname)
            if count:
                lines.append(
                    f"Sample '{name}': associated program was called {count} times, "
                    f"collected data every {rate} of these."
                )
        return lines

    # --- inputs --------------------------------------------------------------------------

    @property
    def near_pressure(self) -> bool:
        if self.loaded is not None:
            return bool(self.loaded.get_global("near_memory_pressure"))
        return self.near_pressure_flag

    @property
    def near_exhaustion(self) -> bool:
        if self.loaded is not None:
            return bool(self.loaded.get_global("near_memory_exhaustion"))
        return self.near_exhaustion_flag

    def _sample(self, gname: str) -> tuple[int, int]:
        """(count, rate) of a struct bpftune_sample global: three u64s."""
        assert self.loaded is not None
        raw = self.loaded.get_global(gname)
        mask = (1 << 64) - 1
        return raw & mask, max((raw >> 128) & mask, 1)

    def _read_corr(self, tunable_id: int, cookie: int) -> CorrSums:
        if self.loaded is None:
            return CorrSums()
        return read_corr(self.loaded.map("bpftune_corr"), self.id, tunable_id, cookie)

    def _reset_corr(self, tunable_id: int, cookie: int) -> None:
        if self.loaded is None:
            return
        try:
            del self.loaded.map("bpftune_corr")[corr_key(self.id, tunable_id, cookie)]
        except (KeyError, PybpftuneError):
            pass

    def _read_netstat(self, cookie: int) -> dict[str, int]:
        try:
            with self.ctx.namespaces.enter(cookie):
                return parse_netstat(Path("/proc/net/netstat").read_text())
        except (OSError, PybpftuneError):
            return {}

    def _read(self, tunable_id: int, cookie: int) -> Values | None:
        try:
            return self.current(tunable_id, cookie)
        except (SysctlMissing, PybpftuneError, OSError):
            return None

    def _tcp_mem(self) -> Values | None:
        """tcp_mem (global), read at most once a second for the buffer cap."""
        now = self.clock()
        if self._tcp_mem_cache is None or now - self._tcp_mem_cache[0] >= 1.0:
            self._tcp_mem_cache = (now, self._read(TCP_MEM, self.ctx.namespaces.global_cookie))
        return self._tcp_mem_cache[1]

    def _cooling(self, cookie: int, tunable_id: int, seconds: float) -> bool:
        last = self._last_change.get((cookie, tunable_id))
        return last is not None and self.clock() - last < seconds

    def _initial(self, tunable_id: int, cookie: int, current: Values) -> Values:
        """The namespace's value before we first changed it."""
        original = self.ctx.store.original(self, tunable_id, cookie, initial=False)
        return current if original is None else original

    # --- decisions ------------------------------------------------------------------------

    def decide(self, event: Event) -> Decision:
        t0 = time.perf_counter()
        decision = Decision(tuple(self._rules(event)))
        if self._low_mem:
            # Ticks are off outside the low-memory state.
            decision = Decision(decision.proposals, decision.effects, time.monotonic() + LOW_MEMORY_CHECK_S)
        self.handler_s += time.perf_counter() - t0
        return decision

    def _rules(self, event: Event) -> list[Proposal]:
        update = event.update(0)
        if event.scenario_id in (MEM_PRESSURE, MEM_EXHAUSTION) and update.id == TCP_MEM:
            return self._decide_memory(event)
        if update.id in (TCP_RMEM, TCP_WMEM) and event.scenario_id == BUFFER_INCREASE:
            return self._decide_buffer(event)
        if update.id == TCP_MAX_SYN_BACKLOG and event.scenario_id == SYN_BACKLOG_INCREASE:
            return self._decide_syn_flood(event)
        self.log.debug("tcp_buffer: ignoring event %r (tunable %d)", event, update.id)
        return []

    def _decide_buffer(self, event: Event) -> list[Proposal]:
        update = event.update(0)
        tid, cookie = update.id, event.netns_cookie
        conn = self.remember(cookie, Conn.from_event(event))
        written = self._written_max.get((cookie, tid))
        debug = self.log.isEnabledFor(logging.DEBUG)
        if debug:
            self.log.debug(
                "tcp_buffer: %s max %d in netns %d: %s, window %d, needs %d",
                self.tunable(tid).name,
                update.old[2],
                cookie,
                conn.describe(),
                conn.effective_window(),
                conn.need(self.steps, first_limit=written is None),
            )
        if written is not None and update.old[2] != written:
            self.outcomes["stale"] += 1
            return []  # seen before our last change: stale
        cooldown = min(COOLDOWN_MAX_S, max(COOLDOWN_MIN_S, COOLDOWN_RTTS * conn.rtt_us / 1e6))
        self._cooldown[(cookie, tid)] = cooldown
        if self._cooling(cookie, tid, cooldown):
            self.outcomes["cooling"] += 1
            return []
        if self.near_pressure or self.near_exhaustion or self._low_mem:
            # Also for the whole low-memory state (the host is always in it
            # when any namespace is): the BPF flags change only when a socket
            # gives the BPF side a reason to look, and a namespace's first
            # growth would ask for room up to its window-scale cap.
            if debug:
                self.log.debug("tcp_buffer: no buffer growth while TCP memory is short")
            self.outcomes["memory short"] += 1
            return []
        # The event carries the values the kernel had a moment ago; once they
        # are what we last wrote, no sysctl read is needed (a namespace
        # switch and a /proc read per event cost the daemon CPU the
        # traffic wants; an emulated guest pays tens of milliseconds).
        current = tuple(int(v) for v in update.old[:3]) if written is not None else self._read(tid, cookie)
        if current is None:
            return []
        need = conn.need(self.steps, first_limit=written is None)
        recent = self._recent_need(cookie, tid, conn.full_need())
        if conn.queueing() and self.corr_reader(tid, cookie).significant():
            # Latency rose with buffer size and this connection sits in a
            # queue: one step down, never below what keeps the pipe full for
            # the connections seen lately, nor below the value before we
            # first grew it.
            self._reset_corr(tid, cookie)
            floor = max(self._initial(tid, cookie, current)[2], min(current[2], recent))
            backoff = latency_backoff(current[2], floor, self.steps)
            if backoff is None:
                self.outcomes["back-off floored"] += 1
                self._sufficient(cookie, tid, current[2], conn)
                return []
            self.outcomes["back-off"] += 1
            return [
                Proposal(
                    tid,
                    BUFFER_DECREASE_LATENCY,
                    cookie,
                    (current[0], current[1], backoff),
                    f"need to decrease max buffer size as latency rose with buffer size increases ({conn.describe()})",
                )
            ]
        target = grow_max(current[2], need, self.steps, buffer_cap(self._tcp_mem(), self.page_size))
        if target is None:
            self.outcomes["enough"] += 1
            self._sufficient(cookie, tid, current[2], conn)
            return []
        self.outcomes["growth"] += 1
        reason = (
            f"need to increase max buffer size to maximize throughput ({conn.describe()}; needs about {need} bytes)"
        )
        return [Proposal(tid, BUFFER_INCREASE, cookie, (current[0], current[1], target), reason)]

    def _sufficient(self, cookie: int, tunable_id: int, limit: int, conn: Conn) -> None:
        """The limit suffices for this connection: hold off its events while
        it shows no more than now (one reference step of margin), longer with
        every verdict on it in a row.  Connections the BPF side cannot tell
        apart (no hash) are not held."""
        if not conn.conn:
            return
        key = (cookie, tunable_id, conn.conn)
        n = self._enough.pop(key, 0) + 1
        self._enough[key] = n
        while len(self._enough) > CONN_MEMORY:
            self._enough.popitem(last=False)
        metric = self.steps.grow(hold_metric(conn))
        self._hold(key, Hold(self.clock() + hold_seconds(n), limit, metric))

    def _hold(self, key: tuple[int, int, int], hold: Hold) -> None:
        self.holds.pop(key, None)
        self.holds[key] = hold
        while len(self.holds) > CONN_MEMORY:
            self.holds.popitem(last=False)
        if self.loaded is None:
            return
        cookie, tunable_id, conn_id = key
        k = libbpf.struct_view("struct tcp_buffer_hold_key", bytearray(HOLD_KEY_SIZE))
        k.netns_cookie, k.tunable, k.conn = cookie, tunable_id, conn_id
        v = libbpf.struct_view("struct tcp_buffer_hold", bytearray(HOLD_SIZE))
        v.until_ns = int(hold.until * 1e9)
        v.limit = hold.limit
        v.metric = min(hold.metric, 2**64 - 1)
        try:
            hold_map = self.loaded.map("bpftune_hold")
            hold_map[libbpf.struct_bytes(k, HOLD_KEY_SIZE)] = libbpf.struct_bytes(v, HOLD_SIZE)
        except (KeyError, PybpftuneError):
            pass

    def _recent_need(self, cookie: int, tunable_id: int, full_need: int) -> int:
        """The largest full-pipe need reported in this namespace within
        RECENT_NEED_S (latency back-offs never go below it)."""
        now = self.clock()
        key = (cookie, tunable_id)
        best, when = self._needs.get(key, (0, now))
        if full_need >= best or now - when > RECENT_NEED_S:
            best, when = full_need, now
        self._needs[key] = (best, when)
        return best

    def remember(self, cookie: int, conn: Conn) -> Conn:
        """The connection with the smallest RTT it has shown so far and its
        goodput since an earlier sample (bytes over kernel time)."""
        if not conn.conn:
            return conn
        key = (cookie, conn.flags & (F_RCV | F_SND), conn.conn)
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

    def _decide_memory(self, event: Event) -> list[Proposal]:
        cookie = event.netns_cookie
        glob = self.ctx.namespaces.global_cookie
        # Exhaustion enters the low-memory state whatever the tcp_mem
        # cooldown: growing tcp_mem a moment ago does not end the shortage.
        low = self.enter_low_memory(cookie) if event.scenario_id == MEM_EXHAUSTION else []
        if self._cooling(glob, TCP_MEM, MEM_COOLDOWN_S):
            return low
        mem = self._read(TCP_MEM, glob)
        if mem is None:
            return low
        out: list[Proposal] = []
        f = self.free_pages
        if event.scenario_id == MEM_EXHAUSTION:
            new = tcp_mem_exhaustion(mem, f, self.steps)
            if new is not None:
                out.append(Proposal(TCP_MEM, MEM_EXHAUSTION, glob, new, self._mem_reason("exhaustion", mem, new)))
            else:
                # tcp_mem[2] is at F/4: make the buffers smaller instead.
                for tid in (TCP_RMEM, TCP_WMEM):
                    values = self._read(tid, cookie)
                    shrunk = exhaustion_shrink(values, self.steps) if values else None
                    if values is not None and shrunk is not None:
                        out.append(
                            Proposal(
                                tid,
                                BUFFER_DECREASE,
                                cookie,
                                shrunk,
                                f"near memory exhaustion with tcp_mem max at a quarter of free buffer pages ({f // 4})",
                            )
                        )
        else:
            new = tcp_mem_pressure(mem, f, self.steps)
            if new is not None:
                out.append(Proposal(TCP_MEM, MEM_PRESSURE, glob, new, self._mem_reason("pressure", mem, new)))
        return out + low

    def _mem_reason(self, what: str, mem: Values, new: Values) -> str:
        reason = f"near memory {what}"
        if new[2] < mem[2]:
            estimated = " (estimated from MemTotal)" if self.host_memory.buffer_estimated else ""
            reason += (
                f", with the tcp_mem max brought down to a quarter of the {self.free_pages} buffer-usable "
                f"pages{estimated}: no more memory can back it"
            )
        return reason

    def _decide_syn_flood(self, event: Event) -> list[Proposal]:
        cookie = event.netns_cookie
        if self._cooling(cookie, TCP_MAX_SYN_BACKLOG, SYN_COOLDOWN_S):
            return []
        out: list[Proposal] = []
        low_memory = self.near_pressure or self.near_exhaustion
        cookies = self._read(TCP_SYNCOOKIES, cookie)
        if cookies is not None:
            new_cookies = syncookies_rule(cookies[0], self.netstat_reader(cookie), low_memory)
            if new_cookies == 0:
                out.append(
                    Proposal(TCP_SYNCOOKIES, SYNCOOKIES_DISABLE, cookie, (0,), "SYN cookies failing and never valid")
                )
            elif new_cookies == 1:
                out.append(
                    Proposal(TCP_SYNCOOKIES, SYNCOOKIES_ENABLE, cookie, (1,), "SYN flood while TCP memory is short")
                )
        if self.near_exhaustion:
            out.extend(self.enter_low_memory(cookie))
            return out
        backlog = self._read(TCP_MAX_SYN_BACKLOG, cookie)
        if backlog is None:
            return out
        cap = self.highest(TCP_MAX_SYN_BACKLOG)
        decision = syn_backlog_rule(backlog[0], self.corr_reader(TCP_MAX_SYN_BACKLOG, cookie), self.steps, cap)
        if decision is None and backlog[0] >= cap:
            self._capped.info(
                (TCP_MAX_SYN_BACKLOG, cookie),
                "tcp_max_syn_backlog in netns %d is at %d, its memory cap %d; not increasing it further",
                cookie,
                backlog[0],
                cap,
            )
        if decision is not None:
            scenario, new = decision
            why = (
                "SYN flood with connections established"
                if scenario == SYN_BACKLOG_INCREASE
                else ("SYN flood without connections established, suggesting an attack")
            )
            out.append(Proposal(TCP_MAX_SYN_BACKLOG, scenario, cookie, (new,), why))
        return out

    # --- low-memory state ---------------------------------------------------------------

    def enter_low_memory(self, cookie: int) -> list[Proposal]:
        """Switch off optional memory consumers in ``cookie``'s namespace and
        in the host's.  TCP memory is one pool for the whole host (tcp_mem
        and the allocated count are global), so the host always enters; the
        namespace whose socket hit the limit does too.  Other namespaces enter
        when their own sockets report exhaustion."""
        out: list[Proposal] = []
        glob = self.ctx.namespaces.global_cookie
        for c in dict.fromkeys((cookie, glob)):
            if c not in self._low_mem:
                out.extend(self._enter_low_memory_in(c, c == glob))
        return out

    def _enter_low_memory_in(self, cookie: int, host: bool) -> list[Proposal]:
        saved: dict[int, int] = {}
        out: list[Proposal] = []
        for tid in (TCP_NO_METRICS_SAVE, TCP_NO_SSTHRESH_METRICS_SAVE, HIGH_ORDER_ALLOC_DISABLE):
            if not host and not self.tunable(tid).namespaced:
                continue  # a global switch: the host's entry sets it
            values = self._read(tid, cookie)
            if values is not None and values[0] != 1:
                saved[tid] = values[0]
                out.append(Proposal(tid, LOW_MEM_ENTER, cookie, (1,), "TCP memory near exhaustion"))
        backlog = self._read(TCP_MAX_SYN_BACKLOG, cookie)
        if backlog is not None:
            shrunk = min(self.highest(TCP_MAX_SYN_BACKLOG), max(SYN_BACKLOG_MIN, self.steps.shrink(backlog[0])))
            if shrunk < backlog[0]:
                saved[TCP_MAX_SYN_BACKLOG] = backlog[0]
                out.append(
                    Proposal(TCP_MAX_SYN_BACKLOG, LOW_MEM_ENTER, cookie, (shrunk,), "TCP memory near exhaustion")
                )
        self._low_mem[cookie] = saved
        return out

    def leave_low_memory(self) -> list[Proposal]:
        """Undo every low-memory switch we set (a value that was beyond its
        memory cap comes back only as far as the cap)."""
        out = []
        for cookie, saved in self._low_mem.items():
            for tid, value in saved.items():
                back = min(value, self.highest(tid))
                out.append(Proposal(tid, LOW_MEM_LEAVE, cookie, (back,), "TCP memory no longer short"))
        self._low_mem.clear()
        return out

    def _check_recovery(self) -> None:
        """Leave the low-memory state once TCP's allocated pages have stayed
        clear of the pressure threshold for RECOVERY_S.  Measured here, once
        a second: the BPF side looks only when a socket gives it a reason,
        so its flags can stay "short" long after the last connection is gone."""
        if not self._low_mem:
            self._recovered_since = None
            return
        allocated = self.allocated_reader()
        mem = self._tcp_mem()
        if allocated is None or mem is None or not memory_recovered(allocated, mem, self.steps):
            self._recovered_since = None
            return
        now = self.clock()
        if self._recovered_since is None:
            self._recovered_since = now
        if now - self._recovered_since >= RECOVERY_S:
            self._recovered_since = None
            self.log.debug("tcp_buffer: TCP memory recovered: %d pages allocated, tcp_mem %s", allocated, mem)
            for proposal in self.leave_low_memory():
                self.apply(proposal)

    def _ensure_moderate_rcvbuf(self, cookie: int) -> None:
        values = self._read(TCP_MODERATE_RCVBUF, cookie)
        if values is not None and values[0] != 1:
            self.apply(
                Proposal(
                    TCP_MODERATE_RCVBUF,
                    MODERATE_RCVBUF,
                    cookie,
                    (1,),
                    "need to auto-tune receive buffers up to the new tcp_rmem max",
                )
            )


def _read_tcp_allocated() -> int | None:
    try:
        return tcp_allocated_pages(Path("/proc/net/sockstat").read_text())
    except OSError:
        return None


TUNER = TcpBufferTuner
