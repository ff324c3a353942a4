"""The tcp_buffer tuner's declaration (tunables, scenarios) and how it wires
its rules (buffers.py, memory.py, lowmem.py, synflood.py) to events, the
tunable store and time."""

from __future__ import annotations

import math
from collections import Counter

from ...bindings import TcpBufferScenario, TcpBufferTunable
from ...declarations import Decision, Proposal, Scenario, Tunable
from ...events import Event
from ...tuner import TunerContext
from ..common import sample_lines
from .base import TcpBufferBase
from .buffers import BufferRules
from .conn import Conn
from .holds import HoldOffs
from .lowmem import LOW_MEMORY_CHECK_S, LowMemory
from .memory import MemoryRules, tcp_mem_cap
from .synflood import SynFloodRules, syn_backlog_cap

# The struct bpftune_sample globals the summary reports on.
SAMPLES = ("rcv_space", "snd_buf", "conn_state", "mem_limit", "syn_flood")


class TcpBufferTuner(TcpBufferBase):
    name = "tcp_buffer"
    description = "grows TCP buffer limits toward what connections need; TCP memory and SYN backlog"
    bpf_name = "tcp_buffer_tuner"
    tunables = (
        Tunable(TcpBufferTunable.TCP_WMEM, "net.ipv4.tcp_wmem", 3, namespaced=True, labels="min default max"),
        Tunable(TcpBufferTunable.TCP_RMEM, "net.ipv4.tcp_rmem", 3, namespaced=True, labels="min default max"),
        Tunable(
            TcpBufferTunable.TCP_MEM, "net.ipv4.tcp_mem", 3, lower=0, labels="min pressure max", ceiling=tcp_mem_cap
        ),
        Tunable(TcpBufferTunable.TCP_MODERATE_RCVBUF, "net.ipv4.tcp_moderate_rcvbuf", 1, namespaced=True),
        Tunable(TcpBufferTunable.TCP_NO_METRICS_SAVE, "net.ipv4.tcp_no_metrics_save", 1, namespaced=True),
        Tunable(
            TcpBufferTunable.TCP_NO_SSTHRESH_METRICS_SAVE,
            "net.ipv4.tcp_no_ssthresh_metrics_save",
            1,
            namespaced=True,
            optional=True,
        ),
        # Global: the kernel keeps it in init_net's table only.
        Tunable(TcpBufferTunable.HIGH_ORDER_ALLOC_DISABLE, "net.core.high_order_alloc_disable", 1, optional=True),
        # A sysctl like any other (upstream OR-ed "optional" into its type,
        # so it was never read and its rules could not fire).
        Tunable(TcpBufferTunable.TCP_SYNCOOKIES, "net.ipv4.tcp_syncookies", 1, namespaced=True, optional=True),
        Tunable(
            TcpBufferTunable.TCP_MAX_SYN_BACKLOG,
            "net.ipv4.tcp_max_syn_backlog",
            1,
            namespaced=True,
            ceiling=syn_backlog_cap,
        ),
        Tunable(TcpBufferTunable.TCP_MAX_ORPHANS, "net.ipv4.tcp_max_orphans", 1),
    )
    scenarios = (
        Scenario(
            TcpBufferScenario.INCREASE,
            "need to increase TCP buffer size(s)",
            "Need to increase buffer size(s) to maximize throughput",
        ),
        Scenario(
            TcpBufferScenario.DECREASE,
            "need to decrease TCP buffer size(s)",
            "Need to decrease buffer size(s) to reduce memory utilization",
        ),
        Scenario(
            TcpBufferScenario.DECREASE_LATENCY,
            "need to decrease TCP buffer size due to latency",
            "Latency is starting to correlate with buffer size increases, so decrease buffer size to avoid this effect",
        ),
        Scenario(
            TcpBufferScenario.MEM_PRESSURE,
            "approaching TCP memory pressure",
            "Since memory pressure/exhaustion are unstable system states, adjust tcp memory-related tunables",
        ),
        Scenario(
            TcpBufferScenario.MEM_EXHAUSTION,
            "approaching TCP memory exhaustion",
            "Since memory exhaustion is a highly unstable state, adjust TCP memory-related tunables "
            "to avoid exhaustion",
        ),
        Scenario(
            TcpBufferScenario.MODERATE_RCVBUF,
            "match receive buffer size with throughput needs",
            "Since we are tuning rcvbuf max size, ensure auto-tuning of rcvbuf size for the connection is "
            "enabled to pick optimal rcvbuf size",
        ),
        Scenario(
            TcpBufferScenario.LOW_MEM_ENTER,
            "set tunable on entering low-memory state",
            "To reduce memory use when TCP memory is short, switch off optional TCP memory consumers",
        ),
        Scenario(
            TcpBufferScenario.LOW_MEM_LEAVE,
            "unset tunable set earlier in low-memory state",
            "TCP memory is no longer short, so restore the tunables changed on entering the low-memory state",
        ),
        Scenario(
            TcpBufferScenario.SYN_BACKLOG_INCREASE,
            "increase maximum syn backlog",
            "SYN floods coincide with connections being established, so allow more pending connections",
        ),
        Scenario(
            TcpBufferScenario.SYN_BACKLOG_DECREASE,
            "decrease maximum syn backlog",
            "SYN floods do not coincide with connections being established, suggesting an attack; "
            "limit pending connections",
        ),
        Scenario(
            TcpBufferScenario.SYNCOOKIES_ENABLE,
            "enable syncookies",
            "TCP memory is short during a SYN flood, so answer SYNs with cookies",
        ),
        Scenario(
            TcpBufferScenario.SYNCOOKIES_DISABLE,
            "disable syncookies",
            "SYN cookies are sent but never returned valid, so they only cost work; disable them",
        ),
        Scenario(TcpBufferScenario.MAX_ORPHANS_INCREASE, "increase max number of orphaned sockets", ""),
    )
    optional_signals = frozenset({"mem_pressure", "syn_flood"})

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self.buffers = BufferRules(self)
        self.low_memory = LowMemory(self)
        self.memory_rules = MemoryRules(self, self.low_memory)
        self.syn_flood = SynFloodRules(self, self.low_memory)
        # Time spent deciding on events (the summary reports it).

    @property
    def outcomes(self) -> Counter[str]:
        """Buffer events by outcome."""
        return self.buffers.outcomes

    @property
    def holds(self) -> HoldOffs:
        """Hold-offs in force, per (cookie, tunable, connection); connection 0: the whole namespace."""
        return self.buffers.holds

    def remember(self, cookie: int, conn: Conn) -> Conn:
        return self.buffers.conns.remember(cookie, conn)

    # --- the rules ---------------------------------------------------------------------

    def decide(self, event: Event) -> Decision:
        decision = self._rules(event)
        if self.low_memory.active:
            # Ticks are off outside the low-memory state.
            decision = decision + Decision(check_at=self.clock() + LOW_MEMORY_CHECK_S)
        return decision

    def _rules(self, event: Event) -> Decision:
        update = event.update(0)
        if (
            event.scenario_id in (TcpBufferScenario.MEM_PRESSURE, TcpBufferScenario.MEM_EXHAUSTION)
            and update.id == TcpBufferTunable.TCP_MEM
        ):
            return Decision(tuple(self.memory_rules.decide(event)))
        if (
            update.id in (TcpBufferTunable.TCP_RMEM, TcpBufferTunable.TCP_WMEM)
            and event.scenario_id == TcpBufferScenario.INCREASE
        ):
            short = self.near_pressure or self.near_exhaustion or self.low_memory.active
            return self.buffers.decide(event, short)
        if (
            update.id == TcpBufferTunable.TCP_MAX_SYN_BACKLOG
            and event.scenario_id == TcpBufferScenario.SYN_BACKLOG_INCREASE
        ):
            return Decision(tuple(self.syn_flood.decide(event)))
        self.log.debug("tcp_buffer: ignoring event %r (tunable %d)", event, update.id)
        return Decision()

    # --- hooks -------------------------------------------------------------------------

    def bpf_globals(self) -> dict[str, int]:
        return {"nr_free_buffer_pages": self.free_pages}

    def start(self) -> None:
        self.log.debug("tcp_buffer: %s (page size %d)", self.host_memory.describe(), self.page_size)

    def applied(self, proposal: Proposal) -> None:
        self.last_change[(proposal.netns_cookie, proposal.tunable)] = self.clock()
        if proposal.tunable == TcpBufferTunable.TCP_MEM:
            self.tcp_mem_cache = None
        if proposal.tunable in (TcpBufferTunable.TCP_RMEM, TcpBufferTunable.TCP_WMEM):
            self.carry_out(self.buffers.applied(proposal))
        if proposal.tunable == TcpBufferTunable.TCP_RMEM and proposal.scenario == TcpBufferScenario.INCREASE:
            # Receive autotuning up to the new maximum.
            values = self.read(TcpBufferTunable.TCP_MODERATE_RCVBUF, proposal.netns_cookie)
            if values is not None and values[0] != 1:
                reason = "need to auto-tune receive buffers up to the new tcp_rmem max"
                self.apply(
                    Proposal(
                        TcpBufferTunable.TCP_MODERATE_RCVBUF,
                        TcpBufferScenario.MODERATE_RCVBUF,
                        proposal.netns_cookie,
                        (1,),
                        reason,
                    )
                )

    def tick(self, now: float) -> float | None:
        self.carry_out(Decision(tuple(self.low_memory.check_recovery())))
        # Only the low-memory state needs watching over time (ticks are off
        # outside it; entering it asks for one, see decide).
        return now + LOW_MEMORY_CHECK_S if self.low_memory.active else math.inf

    def summary_lines(self) -> list[str]:
        lines: list[str] = []
        if self.outcomes:
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
            lines.append(f"Buffer events: {outcomes}; {self.handling_s:.2f} s handling events")
        lines += sample_lines(self, SAMPLES)
        return lines
