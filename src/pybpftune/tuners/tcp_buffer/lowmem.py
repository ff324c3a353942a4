"""The low-memory state: near TCP memory exhaustion, optional memory
consumers are switched off (``tcp_no_metrics_save``,
``tcp_no_ssthresh_metrics_save``, ``high_order_alloc_disable``, a smaller
``tcp_max_syn_backlog``) in the host's namespace and the one that hit the
limit, and switched back once TCP's allocated memory has stayed clear of
the pressure threshold."""

from __future__ import annotations

from ...bindings import TcpBufferScenario, TcpBufferTunable
from ...declarations import Proposal, Steps, Values
from ...errors import PybpftuneError
from .base import TcpBufferBase

SYN_BACKLOG_MIN = 128
# While in the low-memory state, how often to check whether it can be left.
LOW_MEMORY_CHECK_S = 1.0
# The low-memory state is left once TCP's allocated memory has stayed out of
# reach of the pressure threshold (not nearly full of tcp_mem[1]) this long:
# entered near tcp_mem[2] and left well below tcp_mem[1], it cannot flap.
RECOVERY_S = 3.0
# TCP's allocated pages in /proc/net/sockstat ("TCP: ... mem N"): the
# kernel's memory_allocated, one count for the whole host whatever the
# namespace it is read in.
SOCKSTAT_TCP_PAGES = "TCP.mem"


def memory_recovered(allocated: int, tcp_mem: Values, steps: Steps) -> bool:
    """TCP memory is no longer short: its allocated pages are not nearly
    full of the pressure threshold tcp_mem[1]."""
    return not steps.nearly_full(allocated, tcp_mem[1])


class LowMemory:
    def __init__(self, tuner: TcpBufferBase) -> None:
        self.tuner = tuner
        # Switches we set: cookie -> tunable id -> value before.
        self.saved: dict[int, dict[int, int]] = {}
        # Since when memory has looked recovered while in the state.
        self._recovered_since: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.saved)

    def enter(self, cookie: int) -> list[Proposal]:
        """Switch off optional memory consumers in ``cookie``'s namespace and
        in the host's.  TCP memory is one pool for the whole host (tcp_mem
        and the allocated count are global), so the host always enters; the
        namespace whose socket hit the limit does too.  Other namespaces enter
        when their own sockets report exhaustion."""
        out: list[Proposal] = []
        glob = self.tuner.ctx.namespaces.global_cookie
        for c in dict.fromkeys((cookie, glob)):
            if c not in self.saved:
                out.extend(self._enter_in(c, c == glob))
        return out

    def _enter_in(self, cookie: int, host: bool) -> list[Proposal]:
        t = self.tuner
        saved: dict[int, int] = {}
        out: list[Proposal] = []
        for tid in (
            TcpBufferTunable.TCP_NO_METRICS_SAVE,
            TcpBufferTunable.TCP_NO_SSTHRESH_METRICS_SAVE,
            TcpBufferTunable.HIGH_ORDER_ALLOC_DISABLE,
        ):
            if not host and not t.tunable(tid).namespaced:
                continue  # a global switch: the host's entry sets it
            values = t.read(tid, cookie)
            if values is not None and values[0] != 1:
                saved[tid] = values[0]
                out.append(Proposal(tid, TcpBufferScenario.LOW_MEM_ENTER, cookie, (1,), "TCP memory near exhaustion"))
        backlog = t.read(TcpBufferTunable.TCP_MAX_SYN_BACKLOG, cookie)
        if backlog is not None:
            shrunk = min(
                t.highest(TcpBufferTunable.TCP_MAX_SYN_BACKLOG), max(SYN_BACKLOG_MIN, t.steps.shrink(backlog[0]))
            )
            if shrunk < backlog[0]:
                saved[TcpBufferTunable.TCP_MAX_SYN_BACKLOG] = backlog[0]
                out.append(
                    Proposal(
                        TcpBufferTunable.TCP_MAX_SYN_BACKLOG,
                        TcpBufferScenario.LOW_MEM_ENTER,
                        cookie,
                        (shrunk,),
                        "TCP memory near exhaustion",
                    )
                )
        self.saved[cookie] = saved
        return out

    def leave(self) -> list[Proposal]:
        """Undo every low-memory switch we set (a value that was beyond its
        memory cap comes back only as far as the cap)."""
        out = []
        for cookie, saved in self.saved.items():
            for tid, value in saved.items():
                back = min(value, self.tuner.highest(tid))
                out.append(
                    Proposal(tid, TcpBufferScenario.LOW_MEM_LEAVE, cookie, (back,), "TCP memory no longer short")
                )
        self.saved.clear()
        return out

    def check_recovery(self) -> list[Proposal]:
        """Leave the state once TCP's allocated pages have stayed clear of
        the pressure threshold for RECOVERY_S.  Measured by the tuner's tick,
        once a second: the BPF side looks only when a socket gives it a
        reason, so its flags can stay "short" long after the last connection
        is gone."""
        t = self.tuner
        if not self.saved:
            self._recovered_since = None
            return []
        allocated = self._allocated_pages()
        mem = t.tcp_mem()
        if allocated is None or mem is None or not memory_recovered(allocated, mem, t.steps):
            self._recovered_since = None
            return []
        now = t.clock()
        if self._recovered_since is None:
            self._recovered_since = now
        if now - self._recovered_since < RECOVERY_S:
            return []
        self._recovered_since = None
        t.log.debug("tcp_buffer: TCP memory recovered: %d pages allocated, tcp_mem %s", allocated, mem)
        return self.leave()

    def _allocated_pages(self) -> int | None:
        """TCP's allocated pages now; None: unknown."""
        namespaces = self.tuner.ctx.namespaces
        try:
            counters = namespaces.counters(namespaces.global_cookie, ("sockstat",))
        except (OSError, PybpftuneError):
            return None
        return None if counters is None else counters.get(SOCKSTAT_TCP_PAGES)
