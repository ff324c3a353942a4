"""tcp_rmem / tcp_wmem: grow a maximum toward what a pressing connection
needs, hold off connections it suffices for, back off when growth
correlates with latency."""

from __future__ import annotations

import logging
from collections import Counter

from ...bindings import TcpBufferScenario
from ...declarations import INT_MAX, Decision, Proposal, Steps, Values
from ...events import Event
from ...hostmem import PAGE_SIZE
from .base import TcpBufferBase
from .conn import Conn, max_step_factor
from .holds import HoldOffs
from .rates import ConnTracker

# One socket's buffer maximum may use at most this share of tcp_mem[2].
MEM_CAP_SHARE = 8
# Spacing of changes to one tunable in one namespace: a few RTTs, so the
# connections can grow into the new limit before they are judged again.
COOLDOWN_RTTS = 3
COOLDOWN_MIN_S = 0.1
COOLDOWN_MAX_S = 1.0
# How long a connection's full-pipe need protects a limit from latency
# back-offs.
RECENT_NEED_S = 30.0


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


class BufferRules:
    """The buffer rules and what they remember: connections, the maxima the
    tuner wrote, recent needs, cooldowns and hold-offs."""

    def __init__(self, tuner: TcpBufferBase) -> None:
        self.tuner = tuner
        self.conns = ConnTracker()
        self.holds = HoldOffs()
        self.written_max: dict[tuple[int, int], int] = {}
        self._needs: dict[tuple[int, int], tuple[int, float]] = {}
        self._cooldown: dict[tuple[int, int], float] = {}
        # Buffer events by outcome.
        self.outcomes: Counter[str] = Counter()

    def decide(self, event: Event, memory_short: bool) -> Decision:
        t = self.tuner
        update = event.update(0)
        tid, cookie = update.id, event.netns_cookie
        conn = self.conns.remember(cookie, Conn.from_event(event))
        written = self.written_max.get((cookie, tid))
        debug = t.log.isEnabledFor(logging.DEBUG)
        if debug:
            t.log.debug(
                "tcp_buffer: %s max %d in netns %d: %s, window %d, needs %d",
                t.tunable(tid).name,
                update.old[2],
                cookie,
                conn.describe(),
                conn.effective_window(),
                conn.need(t.steps, first_limit=written is None),
            )
        if written is not None and update.old[2] != written:
            self.outcomes["stale"] += 1
            return Decision()  # seen before our last change: stale
        cooldown = min(COOLDOWN_MAX_S, max(COOLDOWN_MIN_S, COOLDOWN_RTTS * conn.rtt_us / 1e6))
        self._cooldown[(cookie, tid)] = cooldown
        if t.cooling(cookie, tid, cooldown):
            self.outcomes["cooling"] += 1
            return Decision()
        if memory_short:
            # Also for the whole low-memory state (the host is always in it
            # when any namespace is): the BPF flags change only when a socket
            # gives the BPF side a reason to look, and a namespace's first
            # growth would ask for room up to its window-scale cap.
            if debug:
                t.log.debug("tcp_buffer: no buffer growth while TCP memory is short")
            self.outcomes["memory short"] += 1
            return Decision()
        # The event carries the values the kernel had a moment ago; once they
        # are what we last wrote, no sysctl read is needed (a namespace
        # switch and a /proc read per event cost the daemon CPU the
        # traffic wants; an emulated guest pays tens of milliseconds).
        current = tuple(int(v) for v in update.old[:3]) if written is not None else t.read(tid, cookie)
        if current is None:
            return Decision()
        need = conn.need(t.steps, first_limit=written is None)
        recent = self._recent_need(cookie, tid, conn.full_need())
        if conn.queueing() and t.corr(tid, cookie).significant():
            return self._latency_backoff(conn, tid, cookie, current, recent)
        target = grow_max(current[2], need, t.steps, buffer_cap(t.tcp_mem(), t.page_size))
        if target is None:
            self.outcomes["enough"] += 1
            return Decision(effects=self.holds.sufficient(cookie, tid, current[2], conn, t.clock(), t.steps))
        self.outcomes["growth"] += 1
        reason = (
            f"need to increase max buffer size to maximize throughput ({conn.describe()}; needs about {need} bytes)"
        )
        return Decision((Proposal(tid, TcpBufferScenario.INCREASE, cookie, (current[0], current[1], target), reason),))

    def _latency_backoff(self, conn: Conn, tid: int, cookie: int, current: Values, recent: int) -> Decision:
        """Latency rose with buffer size and this connection sits in a
        queue: one step down, never below what keeps the pipe full for the
        connections seen lately, nor below the value before we first grew it."""
        t = self.tuner
        reset = t.reset_corr(tid, cookie)
        floor = max(t.initial(tid, cookie, current)[2], min(current[2], recent))
        backoff = latency_backoff(current[2], floor, t.steps)
        if backoff is None:
            self.outcomes["back-off floored"] += 1
            return Decision(effects=(reset, *self.holds.sufficient(cookie, tid, current[2], conn, t.clock(), t.steps)))
        self.outcomes["back-off"] += 1
        reason = f"need to decrease max buffer size as latency rose with buffer size increases ({conn.describe()})"
        proposal = Proposal(tid, TcpBufferScenario.DECREASE_LATENCY, cookie, (current[0], current[1], backoff), reason)
        return Decision((proposal,), (reset,))

    def applied(self, proposal: Proposal) -> Decision:
        """A new tcp_rmem/tcp_wmem maximum took effect."""
        key = (proposal.netns_cookie, proposal.tunable)
        self.written_max[key] = proposal.new[2]
        grown_until = None
        if proposal.scenario == TcpBufferScenario.INCREASE:
            grown_until = self.tuner.clock() + self._cooldown.get(key, COOLDOWN_MIN_S)
        return Decision(effects=self.holds.new_limit(*key, proposal.new[2], grown_until))

    def _recent_need(self, cookie: int, tunable_id: int, full_need: int) -> int:
        """The largest full-pipe need reported in this namespace within
        RECENT_NEED_S (latency back-offs never go below it)."""
        now = self.tuner.clock()
        key = (cookie, tunable_id)
        best, when = self._needs.get(key, (0, now))
        if full_need >= best or now - when > RECENT_NEED_S:
            best, when = full_need, now
        self._needs[key] = (best, when)
        return best
