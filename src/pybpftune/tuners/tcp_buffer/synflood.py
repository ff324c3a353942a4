"""SYN floods: grow ``tcp_max_syn_backlog`` (never beyond what 1/256 of
memory holds in request sockets) while floods correlate with connections
being established, shrink it when they do not (an attack), and switch
``tcp_syncookies`` on under memory pressure or off when cookies only ever
fail."""

from __future__ import annotations

from ...bindings import TcpBufferScenario, TcpBufferTunable
from ...corr import CorrSums
from ...declarations import INT_MAX, Proposal, Steps
from ...errors import PybpftuneError
from ...events import Event
from ...hostmem import HostMemory
from ...procnet import Counters
from ..common import SayOnce
from .base import TcpBufferBase
from .lowmem import SYN_BACKLOG_MIN, LowMemory

SYN_COOLDOWN_S = 1.0
# tcp_max_syn_backlog's memory cap: a listener's full SYN queue of request
# sockets (a few hundred bytes each; 512 with slab overhead) holds at most
# 1/256 of memory.
REQUEST_SOCK_BYTES = 512
SYN_BACKLOG_MEM_SHARE = 256
SYNCOOKIES_FAILED_MIN = 1024
# /proc/net/netstat counters, as procnet names them.
SYNCOOKIES_FAILED = "TcpExt.SyncookiesFailed"
SYNCOOKIES_RECV = "TcpExt.SyncookiesRecv"


def syncookies_rule(syncookies: int, netstat: Counters, low_memory: bool) -> int | None:
    """New tcp_syncookies, or None.  Off when cookies are on but only ever
    fail; on when memory is short."""
    if syncookies and netstat.get(SYNCOOKIES_FAILED, 0) >= SYNCOOKIES_FAILED_MIN and not netstat.get(SYNCOOKIES_RECV):
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
        return (TcpBufferScenario.SYN_BACKLOG_DECREASE, new) if new < backlog else None
    new = min(INT_MAX, cap, steps.grow(backlog))
    return (TcpBufferScenario.SYN_BACKLOG_INCREASE, new) if new > backlog else None


class SynFloodRules:
    def __init__(self, tuner: TcpBufferBase, low_memory: LowMemory) -> None:
        self.tuner = tuner
        self.low_memory = low_memory
        self._capped = SayOnce(tuner.log)

    def decide(self, event: Event) -> list[Proposal]:
        t = self.tuner
        cookie = event.netns_cookie
        if t.cooling(cookie, TcpBufferTunable.TCP_MAX_SYN_BACKLOG, SYN_COOLDOWN_S):
            return []
        out: list[Proposal] = []
        cookies = t.read(TcpBufferTunable.TCP_SYNCOOKIES, cookie)
        if cookies is not None:
            new_cookies = syncookies_rule(cookies[0], self._netstat(cookie), t.near_pressure or t.near_exhaustion)
            if new_cookies == 0:
                out.append(
                    Proposal(
                        TcpBufferTunable.TCP_SYNCOOKIES,
                        TcpBufferScenario.SYNCOOKIES_DISABLE,
                        cookie,
                        (0,),
                        "SYN cookies failing and never valid",
                    )
                )
            elif new_cookies == 1:
                out.append(
                    Proposal(
                        TcpBufferTunable.TCP_SYNCOOKIES,
                        TcpBufferScenario.SYNCOOKIES_ENABLE,
                        cookie,
                        (1,),
                        "SYN flood while TCP memory is short",
                    )
                )
        if t.near_exhaustion:
            out.extend(self.low_memory.enter(cookie))
            return out
        backlog = t.read(TcpBufferTunable.TCP_MAX_SYN_BACKLOG, cookie)
        if backlog is None:
            return out
        cap = t.highest(TcpBufferTunable.TCP_MAX_SYN_BACKLOG)
        decision = syn_backlog_rule(backlog[0], t.corr(TcpBufferTunable.TCP_MAX_SYN_BACKLOG, cookie), t.steps, cap)
        if decision is None and backlog[0] >= cap:
            self._capped.info(
                (TcpBufferTunable.TCP_MAX_SYN_BACKLOG, cookie),
                "tcp_max_syn_backlog in netns %d is at %d, its memory cap %d; not increasing it further",
                cookie,
                backlog[0],
                cap,
            )
        if decision is not None:
            scenario, new = decision
            why = (
                "SYN flood with connections established"
                if scenario == TcpBufferScenario.SYN_BACKLOG_INCREASE
                else ("SYN flood without connections established, suggesting an attack")
            )
            out.append(Proposal(TcpBufferTunable.TCP_MAX_SYN_BACKLOG, scenario, cookie, (new,), why))
        return out

    def _netstat(self, cookie: int) -> Counters:
        """The namespace's /proc/net/netstat counters; none when it cannot be read."""
        try:
            return self.tuner.ctx.namespaces.counters(cookie, ("netstat",)) or {}
        except (OSError, PybpftuneError):
            return {}
