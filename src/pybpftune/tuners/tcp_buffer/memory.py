"""tcp_mem: raised when TCP nears memory pressure or exhaustion, never beyond
fractions of the free buffer pages F (1/16, 1/8, 1/4; F estimated from
MemTotal when /proc/zoneinfo gives none, see hostmem).  A ``tcp_mem[2]``
above F/4, which no memory can back, is brought down to it the first time
the tuner acts on tcp_mem; when ``tcp_mem[2]`` cannot grow any more the
buffer maxima shrink instead.  Exhaustion also enters the low-memory state
(lowmem.py)."""

from __future__ import annotations

from ...bindings import TcpBufferScenario, TcpBufferTunable
from ...declarations import INT_MAX, Proposal, Steps, Values
from ...events import Event
from ...hostmem import HostMemory
from .base import TcpBufferBase
from .lowmem import LowMemory

MEM_COOLDOWN_S = 0.5


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


class MemoryRules:
    def __init__(self, tuner: TcpBufferBase, low_memory: LowMemory) -> None:
        self.tuner = tuner
        self.low_memory = low_memory

    def decide(self, event: Event) -> list[Proposal]:
        t = self.tuner
        cookie = event.netns_cookie
        glob = t.ctx.namespaces.global_cookie
        # Exhaustion enters the low-memory state whatever the tcp_mem
        # cooldown: growing tcp_mem a moment ago does not end the shortage.
        low = self.low_memory.enter(cookie) if event.scenario_id == TcpBufferScenario.MEM_EXHAUSTION else []
        if t.cooling(glob, TcpBufferTunable.TCP_MEM, MEM_COOLDOWN_S):
            return low
        mem = t.read(TcpBufferTunable.TCP_MEM, glob)
        if mem is None:
            return low
        out: list[Proposal] = []
        f = t.free_pages
        if event.scenario_id == TcpBufferScenario.MEM_EXHAUSTION:
            new = tcp_mem_exhaustion(mem, f, t.steps)
            if new is not None:
                out.append(self._tcp_mem(TcpBufferScenario.MEM_EXHAUSTION, "exhaustion", glob, mem, new))
            else:
                # tcp_mem[2] is at F/4: make the buffers smaller instead.
                for tid in (TcpBufferTunable.TCP_RMEM, TcpBufferTunable.TCP_WMEM):
                    values = t.read(tid, cookie)
                    shrunk = exhaustion_shrink(values, t.steps) if values else None
                    if values is not None and shrunk is not None:
                        out.append(
                            Proposal(
                                tid,
                                TcpBufferScenario.DECREASE,
                                cookie,
                                shrunk,
                                f"near memory exhaustion with tcp_mem max at a quarter of free buffer pages ({f // 4})",
                            )
                        )
        else:
            new = tcp_mem_pressure(mem, f, t.steps)
            if new is not None:
                out.append(self._tcp_mem(TcpBufferScenario.MEM_PRESSURE, "pressure", glob, mem, new))
        return out + low

    def _tcp_mem(self, scenario: int, what: str, glob: int, mem: Values, new: Values) -> Proposal:
        return Proposal(TcpBufferTunable.TCP_MEM, scenario, glob, new, self._reason(what, mem, new))

    def _reason(self, what: str, mem: Values, new: Values) -> str:
        t = self.tuner
        reason = f"near memory {what}"
        if new[2] < mem[2]:
            estimated = " (estimated from MemTotal)" if t.host_memory.buffer_estimated else ""
            reason += (
                f", with the tcp_mem max brought down to a quarter of the {t.free_pages} buffer-usable "
                f"pages{estimated}: no more memory can back it"
            )
        return reason
