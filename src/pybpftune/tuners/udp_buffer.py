"""udp_buffer tuner: receive buffer limits and udp_mem for datagram traffic.

Watches (udp_buffer_tuner.bpf.c) two observations:

* a receive queue overflowed (udp:udp_fail_queue_rcv_skb with -ENOMEM, or
  sock:sock_rcvqueue_full);
* UDP memory accounting refused datagrams above udp_mem[0] (-ENOBUFS, or
  sock:sock_exceed_buf_limit).

Changes: on an overflow, ``net.core.rmem_default`` when the socket used the
default size, or ``net.core.rmem_max`` when the socket asked for a buffer with
SO_RCVBUF and the kernel capped it at rmem_max.  A socket that locked a size
it chose below the cap is left alone: no global change can help it, and
rmem_default is never changed on its account.  On a refusal,
``net.ipv4.udp_mem`` grows towards 1/16, 1/8 and 1/4 of the buffer-usable
memory (no value ever above 1/4: one beyond it comes down to it), and when
udp_mem[2] can grow no more under exhaustion, rmem_max/rmem_default go back
towards their original values instead.  Every rmem value stays within
8 KiB <= value < 256 MiB.

Why the BPF side keeps a copy of rmem_max/rmem_default (SetGlobal effects):
it reports only sockets whose buffer came near a limit, so it must know the
limits as they are now.  See docs/tuners/udp_buffer.md.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from ..bindings import UdpBufferObs, UdpBufferObservation, UdpBufferScenario, UdpBufferTunable
from ..events import Event
from ..hostmem import HostMemory
from ..procnet import Counters
from ..tuner import NOTHING, Decision, Proposal, Scenario, SetGlobal, Tunable, Tuner, TunerContext
from .common import SayOnce, sample_lines

log = logging.getLogger("pybpftune")

# Ids from the shared header (bpftune_shared.h, "udp_buffer tuner").
UDP_MEM, RMEM_MAX, RMEM_DEFAULT = UdpBufferTunable.UDP_MEM, UdpBufferTunable.RMEM_MAX, UdpBufferTunable.RMEM_DEFAULT
INCREASE, DECREASE = UdpBufferScenario.INCREASE, UdpBufferScenario.DECREASE
MEM_PRESSURE, MEM_EXHAUSTION = UdpBufferScenario.MEM_PRESSURE, UdpBufferScenario.MEM_EXHAUSTION

SOCK_RCVBUF_LOCK = 2  # include/net/sock.h: the socket set SO_RCVBUF itself
# The BPF pre-filter's copy of each limit (a global of the same name).
MIRRORED: dict[int, str] = {RMEM_MAX: "rmem_max", RMEM_DEFAULT: "rmem_default"}
RMEM_LOWER = 8192
RMEM_BOUND = 256 * 1024 * 1024  # values stay strictly below


def udp_mem_cap(memory: HostMemory) -> int:
    """The most any udp_mem value may be: a quarter of the buffer-usable pages."""
    return max(1, memory.buffer_pages // 4)


# --- the declaration ---------------------------------------------------------------------------


class UdpBufferTuner(Tuner):
    name = "udp_buffer"
    description = "grows rmem_default/rmem_max on datagram receive-queue overflow and udp_mem under UDP memory pressure"
    bpf_name = "udp_buffer_tuner"
    tunables = (
        Tunable(UDP_MEM, "net.ipv4.udp_mem", 3, lower=0, labels="min pressure max", ceiling=udp_mem_cap),
        Tunable(RMEM_MAX, "net.core.rmem_max", 1, lower=RMEM_LOWER, upper=RMEM_BOUND - 1),
        Tunable(RMEM_DEFAULT, "net.core.rmem_default", 1, lower=RMEM_LOWER, upper=RMEM_BOUND - 1),
    )
    scenarios = (
        Scenario(INCREASE, "need to increase UDP buffer size(s)", "Need to increase UDP buffer size(s) to avoid drops"),
        Scenario(DECREASE, "need to decrease UDP buffer size(s)", "Need to decrease UDP buffer size(s) to save memory"),
        Scenario(MEM_PRESSURE, "approaching UDP memory pressure", "UDP memory use is nearing the pressure threshold"),
        Scenario(MEM_EXHAUSTION, "approaching UDP memory exhaustion", "UDP memory use is nearing the hard limit"),
    )
    optional_signals = frozenset({"rcvqueue_full", "exceed_buf"})
    # The object's sampled hooks (<name>_sample globals), for the summary.
    sampled = ("fail_queue", "rcvqueue_full", "exceed_buf")

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self._refused = SayOnce(log)

    # --- the BPF pre-filter's copy of the limits ---------------------------------------------------

    def bpf_globals(self) -> dict[str, int]:
        return {"rmem_max": self.current(RMEM_MAX)[0], "rmem_default": self.current(RMEM_DEFAULT)[0]}

    def applied(self, proposal: Proposal) -> None:
        # The framework calls this with what the store wrote: mirror that
        # (no re-read of the sysctl).
        if proposal.tunable in MIRRORED:
            self.carry_out(Decision(effects=(SetGlobal(MIRRORED[proposal.tunable], proposal.new[0]),)))

    # --- the rules ---------------------------------------------------------------------------------

    def decide(self, event: Event) -> Decision:
        # Follow changes made behind our back (the sysctl tuner disables us
        # then, but the BPF pre-filter should still see true values): a raised
        # limit makes the stale pre-filter send events, and each event
        # refreshes it, so no periodic re-read is needed.  Read once per
        # event: the overflow rule judges the same values.
        rmem_max, rmem_default = self.current(RMEM_MAX)[0], self.current(RMEM_DEFAULT)[0]
        mirror = Decision(effects=(SetGlobal("rmem_max", rmem_max), SetGlobal("rmem_default", rmem_default)))
        if event.scenario_id == UdpBufferObservation.OBS_RCVBUF_FULL:
            obs = UdpBufferObs.unpack(event.raw)
            return mirror + self.on_rcvbuf_full(obs, event.netns_cookie, rmem_max, rmem_default)
        if event.scenario_id == UdpBufferObservation.OBS_MEM_LIMIT:
            return mirror + self.on_memory_limit(UdpBufferObs.unpack(event.raw), event.netns_cookie)
        return mirror

    def _within_bound(self, tunable: int, value: int) -> bool:
        if value < RMEM_BOUND:
            return True
        self._refused.info(
            tunable,
            "%s would reach %d bytes, at or above the %d limit; not increasing it further",
            self.tunable(tunable).name,
            value,
            RMEM_BOUND,
        )
        return False

    def on_rcvbuf_full(self, obs: UdpBufferObs, cookie: int, rmem_max: int, rmem_default: int) -> Decision:
        """A receive queue overflowed: grow the limit the socket's buffer came from."""
        steps = self.steps
        out: list[Proposal] = []
        if obs.userlocks & SOCK_RCVBUF_LOCK:
            # SO_RCVBUF doubles the request and caps it at 2 * rmem_max: only a
            # socket that hit the cap can gain from a larger rmem_max.
            if not steps.nearly_full(obs.sk_rcvbuf, 2 * rmem_max):
                return NOTHING
            new_max = max(RMEM_LOWER, steps.grow(rmem_max))
            if not self._within_bound(RMEM_MAX, new_max):
                return NOTHING
            reason = (
                f"receive queue overflow of a socket whose SO_RCVBUF request was capped by rmem_max "
                f"({obs.sk_rcvbuf} bytes)"
            )
            out.append(Proposal(RMEM_MAX, INCREASE, cookie, (new_max,), reason))
        else:
            if not steps.nearly_full(obs.sk_rcvbuf, rmem_default):
                return NOTHING
            new_default = max(RMEM_LOWER, steps.grow(rmem_default))
            if not self._within_bound(RMEM_DEFAULT, new_default):
                return NOTHING
            if new_default > rmem_max:
                out.append(Proposal(RMEM_MAX, INCREASE, cookie, (new_default,), "rmem_default growing beyond it"))
            reason = f"receive queue overflow of a socket using the default buffer size ({obs.sk_rcvbuf} bytes)"
            out.append(Proposal(RMEM_DEFAULT, INCREASE, cookie, (new_default,), reason))
        self._log_drop_rate(cookie, obs.family)
        return Decision.of(out)

    def on_memory_limit(self, obs: UdpBufferObs, cookie: int) -> Decision:
        """UDP memory accounting refused a datagram: grow udp_mem, or at its
        cap, give back receive buffer growth."""
        mem = self.current(UDP_MEM)
        used = obs.mem_allocated
        if self.steps.nearly_full(used, mem[2]):
            scenario, what = MEM_EXHAUSTION, "approaching UDP memory exhaustion"
        elif used > mem[0]:
            # UDP has no memory-pressure state: above udp_mem[0] the kernel
            # refuses any socket holding more than udp_rmem_min, so a refusal
            # there is already pressure (bpftune waits for udp_mem[1]).
            scenario, what = MEM_PRESSURE, "approaching UDP memory pressure"
        else:
            return NOTHING  # refused for another reason (a memory cgroup's limit)
        new = grow_udp_mem(mem, self.free_pages, self.steps.grow)
        if new != mem:
            reason = f"{what} ({used} pages in use)"
            return Decision.of([Proposal(UDP_MEM, scenario, cookie, new, reason)])
        if scenario != MEM_EXHAUSTION:
            return NOTHING
        return self.given_back(cookie, used)

    def given_back(self, cookie: int, used: int) -> Decision:
        """udp_mem[2] is at its cap under exhaustion: rmem_max and
        rmem_default one step back towards their original values."""
        out = []
        for tunable in (RMEM_MAX, RMEM_DEFAULT):
            current = self.current(tunable)[0]
            initial = self.ctx.store.original(self, tunable)
            floor = max(RMEM_LOWER, initial[0] if initial else RMEM_LOWER)
            target = min(self.highest(tunable), max(floor, self.steps.shrink(current)))
            if target < current:
                reason = f"UDP memory exhaustion with udp_mem at its limit ({used} pages in use)"
                out.append(Proposal(tunable, DECREASE, cookie, (target,), reason))
        return Decision.of(out)

    # --- reporting ---------------------------------------------------------------------------

    def _log_drop_rate(self, cookie: int, family: int) -> None:
        counters = self.ctx.namespaces.counters(cookie)
        if not counters:
            return
        received, drops, rate = udp_drop_rate(counters, v6=family == socket.AF_INET6)
        log.info("netns: %d UDP in %d, drops %d drop rate %.1f per mille", cookie, received, drops, rate)

    def summary_lines(self) -> list[str]:
        return sample_lines(self, self.sampled)


def grow_udp_mem(mem: tuple[int, ...], free_pages: int, grow: Callable[[int], int]) -> tuple[int, int, int]:
    """One step up for udp_mem: [0] and [1] grow while below 1/16 and 1/8 of
    the buffer-usable pages, [2] grows up to 1/4.  A value that does not grow
    keeps its current value (bpftune sends 0 for it: UPSTREAM BUG), but none
    stays above 1/4, which no memory can back.  Without a known memory size
    nothing changes."""
    lo, pressure, hi = mem[0], mem[1], mem[2]
    if free_pages <= 0:
        return (lo, pressure, hi)
    cap = max(1, free_pages // 4)
    new_lo = min(grow(lo), free_pages // 16) if lo < free_pages // 16 else lo
    new_pressure = min(grow(pressure), free_pages // 8) if pressure < free_pages // 8 else pressure
    new_hi = min(cap, max(hi, min(grow(hi), cap)))
    if lo <= pressure <= hi:  # keep an ordered triple ordered
        new_pressure = min(new_pressure, new_hi)
        new_lo = min(new_lo, new_pressure)
    return (min(new_lo, cap), min(new_pressure, cap), new_hi)


def udp_drop_rate(counters: Counters, v6: bool = False) -> tuple[int, int, float]:
    """Datagrams delivered, receive-buffer drops and drops per mille of all
    arrivals; 0 without traffic (bpftune divides by zero there)."""
    if v6:
        received, drops = counters.get("Udp6InDatagrams", 0), counters.get("Udp6RcvbufErrors", 0)
    else:
        received, drops = counters.get("Udp.InDatagrams", 0), counters.get("Udp.RcvbufErrors", 0)
    total = received + drops
    return received, drops, (1000.0 * drops / total) if total > 0 else 0.0


TUNER = UdpBufferTuner
