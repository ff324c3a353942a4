"""ip_frag tuner: fragment reassembly thresholds, per network namespace.

The BPF side (ip_frag_tuner.bpf.c) reports when the memory a namespace's
IPv4 or IPv6 fragment queues hold nears ``high_thresh``, above which the
kernel drops every new fragment.  The rule raises
``net.ipv4.ipfrag_high_thresh`` / ``net.ipv6.ip6frag_high_thresh`` in that
namespace by one step, and backs off (one step down, never below the value
it started from) once raising it correlates with a rising share of failed
reassemblies: more memory is then feeding loss or an attack, not helping.

Memory caps: one threshold never goes above 1/32 of RAM, and the thresholds
this tuner raised, added up over every namespace and both families, stay
within 1/16 of RAM (fragment memory is accounted per namespace: without a
total, a thousand namespaces could each hold 1/32 of RAM in fragments).

See docs/tuners/ip_frag.md.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .. import hostmem, libbpf
from ..events import Event
from ..hostmem import HostMemory
from ..procnet import Counters, ratio
from ..tuner import INT_MAX, NOTHING, Decision, Proposal, Scenario, Tunable, Tuner, TunerContext
from .common import SayOnce, sample_lines, significant_correlation

log = logging.getLogger("pybpftune")

# Ids shared with the BPF side (bpftune_shared.h, "ip_frag tuner").
IPV4_HIGH_THRESH, IPV6_HIGH_THRESH = 0, 1
INCREASE, DECREASE = 0, 1
OBS_NEAR_THRESH = 1

AF_INET, AF_INET6 = 2, 10
CORR_WINDOW = 32
# One threshold: at most 1/32 of RAM; all thresholds raised, in total: 1/16.
THRESH_SHARE = 32
TOTAL_SHARE = 16
COUNTERS = {
    IPV4_HIGH_THRESH: ("Ip.ReasmReqds", "Ip.ReasmFails"),
    IPV6_HIGH_THRESH: ("Ip6ReasmReqds", "Ip6ReasmFails"),
}


@dataclass(frozen=True)
class FragObservation:
    """What the BPF side saw (struct ip_frag_obs)."""

    family: int
    mem: int
    high_thresh: int
    low_thresh: int

    @property
    def tunable(self) -> int:
        return IPV6_HIGH_THRESH if self.family == AF_INET6 else IPV4_HIGH_THRESH

    @classmethod
    def from_event(cls, event: Event) -> FragObservation:
        o = event.payload("struct ip_frag_obs")
        return cls(int(o.family), int(o.mem), int(o.high_thresh), int(o.low_thresh))

    def event(self, tuner_id: int, netns_cookie: int) -> Event:
        """The ring-buffer event carrying this observation (tests, replays)."""
        size = libbpf.struct_size("struct ip_frag_obs")
        view = libbpf.struct_view("struct ip_frag_obs", bytearray(size))
        view.family, view.mem, view.high_thresh, view.low_thresh = (
            self.family,
            self.mem,
            self.high_thresh,
            self.low_thresh,
        )
        return Event.build(tuner_id, OBS_NEAR_THRESH, netns_cookie, raw=libbpf.struct_bytes(view, size))


def mem_total_bytes(meminfo: str | None = None) -> int:
    """MemTotal from /proc/meminfo, in bytes (0 if unknown); without
    ``meminfo``, the host's (see hostmem)."""
    if meminfo is None:
        return hostmem.host_memory().total_bytes
    return hostmem.parse_mem_total(meminfo)


def thresh_cap(memory: HostMemory) -> int:
    """The most one fragment threshold may be: 1/32 of RAM (and INT_MAX)."""
    return min(INT_MAX, memory.total_bytes // THRESH_SHARE)


class IpFragTuner(Tuner):
    name = "ip_frag"
    description = "raises IPv4/IPv6 fragment reassembly thresholds per namespace when fragment memory nears them"
    bpf_name = "ip_frag_tuner"
    # The defrag path (ip_defrag, ipv6_frag_rcv) runs for fragments only; the
    # tracepoint form runs for every received packet, which costs a
    # request/response workload measurably under emulation.
    preferred_forms = ("fentry", "kprobe")
    tunables = (
        Tunable(IPV4_HIGH_THRESH, "net.ipv4.ipfrag_high_thresh", 1, namespaced=True, ceiling=thresh_cap),
        Tunable(
            IPV6_HIGH_THRESH, "net.ipv6.ip6frag_high_thresh", 1, namespaced=True, optional=True, ceiling=thresh_cap
        ),
    )
    scenarios = (
        Scenario(
            INCREASE,
            "need to increase fragmentation high threshold",
            "Fragment reassembly memory is nearing the high threshold, above which fragments are dropped",
        ),
        Scenario(
            DECREASE,
            "need to decrease fragmentation high threshold",
            "Raising the threshold went with more failed reassemblies, so the extra memory is not helping",
        ),
    )

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        # Seams for unit tests: a namespace's counters (and mem_total below).
        self.counters: Callable[[int], Counters | None] = ctx.namespaces.counters
        self._last: dict[tuple[int, int], tuple[int, int]] = {}  # (cookie, tunable) -> (reqds, fails)
        self._samples: dict[tuple[int, int], deque[tuple[float, float]]] = {}
        self._capped = SayOnce(log)

    @property
    def mem_total(self) -> int:
        return self.host_memory.total_bytes

    @mem_total.setter
    def mem_total(self, total: int) -> None:
        """Pretend the host has ``total`` bytes (tests)."""
        mem = self.host_memory
        self.memory = HostMemory(total, 0, mem.page_size, mem.cpus)

    @property
    def total_budget(self) -> int:
        """What the thresholds raised in all namespaces may add up to: 1/16 of RAM."""
        return self.mem_total // TOTAL_SHARE

    def raised_elsewhere(self, tunable: int, cookie: int) -> int:
        """The thresholds this tuner set, added up over every namespace and
        family but ``tunable`` in ``cookie`` (namespaces that are gone are
        forgotten by the store)."""
        return sum(
            values[0]
            for name, t, c, values in self.ctx.store.namespace_values()
            if name == self.name and (t.id, c) != (tunable, cookie) and values
        )

    def decide(self, event: Event) -> Decision:
        if event.scenario_id != OBS_NEAR_THRESH:
            return NOTHING
        return Decision(tuple(self.near_threshold(FragObservation.from_event(event), event.netns_cookie)))

    def failure_percent(self, cookie: int, tunable: int) -> float | None:
        """Failed reassemblies as a percentage of those requested since the
        last look in this namespace (all-time on the first); 0 when there were
        none (UPSTREAM BUG: bpftune divides by ReasmReqds unchecked)."""
        counters = self.counters(cookie)
        if counters is None:
            return None
        reqds_name, fails_name = COUNTERS[tunable]
        reqds, fails = counters.get(reqds_name, 0), counters.get(fails_name, 0)
        prev_reqds, prev_fails = self._last.get((cookie, tunable), (0, 0))
        self._last[(cookie, tunable)] = (reqds, fails)
        return 100.0 * ratio(max(0, fails - prev_fails), max(0, reqds - prev_reqds))

    def near_threshold(self, obs: FragObservation, cookie: int) -> list[Proposal]:
        tunable = obs.tunable
        try:
            current = self.current(tunable, cookie)[0]
        except Exception as exc:  # namespace gone, IPv6 disabled there
            log.debug("ip_frag: cannot read %s in netns %d: %s", self.tunable(tunable).name, cookie, exc)
            return []
        steps = self.steps
        if not steps.nearly_full(obs.mem, current):
            return []  # an older observation; the threshold has moved on since
        key = (cookie, tunable)
        fail_pct = self.failure_percent(cookie, tunable)
        samples = self._samples.setdefault(key, deque(maxlen=CORR_WINDOW))
        r = significant_correlation(samples)
        if r is not None:
            floor = max(self._floor(tunable, cookie), obs.low_thresh)
            target = min(self.highest(tunable), max(floor, steps.shrink(current)))
            samples.clear()  # judge the lower setting afresh
            if target >= current:
                return []
            reason = (
                f"reassembly failures rising with the fragmentation threshold (correlation {r:.2f}, "
                f"{fail_pct or 0.0:.1f}% failed)"
            )
            return [Proposal(tunable, DECREASE, cookie, (target,), reason)]
        new = steps.grow(current)
        ceiling = self.highest(tunable)
        if new > ceiling:
            new = ceiling
            if new <= current:
                self._capped.info(
                    key,
                    "%s in netns %d is at %d, 1/32 of memory; not increasing it further",
                    self.tunable(tunable).name,
                    cookie,
                    current,
                )
                return []
        room = self.total_budget - self.raised_elsewhere(tunable, cookie)
        if new > room:
            new = room
            if new <= current:
                self._capped.info(
                    ("total", key),
                    "%s in netns %d stays at %d: the fragment thresholds raised in all namespaces add up to "
                    "1/16 of memory (%d bytes)",
                    self.tunable(tunable).name,
                    cookie,
                    current,
                    self.total_budget,
                )
                return []
        if fail_pct is not None:
            samples.append((float(new), fail_pct))
        return [Proposal(tunable, INCREASE, cookie, (new,), "approaching fragmentation maximum threshold")]

    def summary_lines(self) -> list[str]:
        return sample_lines(self, ("rx", "defrag"))

    def _floor(self, tunable: int, cookie: int) -> int:
        """The value this namespace had before we first changed it."""
        store = self.ctx.store
        original = store.original(self, tunable, cookie) or store.original(self, tunable)
        return original[0] if original else 0


TUNER = IpFragTuner
