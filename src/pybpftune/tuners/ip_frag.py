"""ip_frag tuner: fragment reassembly thresholds, per network namespace.

Watches: the memory a namespace's IPv4 or IPv6 fragment queues hold
(ip_frag_tuner.bpf.c reports it when it nears ``high_thresh``, above which the
kernel drops every new fragment), and the namespace's reassembly counters.

Changes: ``net.ipv4.ipfrag_high_thresh`` / ``net.ipv6.ip6frag_high_thresh``
in that namespace: one step up, or one step down (never below the value it
started from) once raising it correlates with a rising share of failed
reassemblies: more memory is then feeding loss or an attack, not helping.

Why the caps: one threshold never goes above 1/32 of RAM, and the thresholds
this tuner raised, added up over every namespace and both families, stay
within 1/16 of RAM (fragment memory is accounted per namespace: without a
total, a thousand namespaces could each hold 1/32 of RAM in fragments).

See docs/tuners/ip_frag.md.
"""

from __future__ import annotations

import logging
import socket
from collections import deque

from ..bindings import IpFragObs, IpFragObservation, IpFragScenario, IpFragTunable
from ..events import Event
from ..hostmem import HostMemory
from ..procnet import ratio
from ..tuner import INT_MAX, NOTHING, Decision, Proposal, Scenario, Tunable, Tuner, TunerContext
from .common import SayOnce, sample_lines, significant_correlation

log = logging.getLogger("pybpftune")

# Ids from the shared header (bpftune_shared.h, "ip_frag tuner").
IPV4, IPV6 = IpFragTunable.IPV4_HIGH_THRESH, IpFragTunable.IPV6_HIGH_THRESH
INCREASE, DECREASE = IpFragScenario.INCREASE, IpFragScenario.DECREASE
# Reassemblies requested and failed, per family (snmp and snmp6).
COUNTERS: dict[int, tuple[str, str]] = {
    IPV4: ("Ip.ReasmReqds", "Ip.ReasmFails"),
    IPV6: ("Ip6ReasmReqds", "Ip6ReasmFails"),
}
CORR_WINDOW = 32
# One threshold: at most 1/32 of RAM; all thresholds raised, in total: 1/16.
THRESH_SHARE = 32
TOTAL_SHARE = 16


def thresh_cap(memory: HostMemory) -> int:
    """The most one fragment threshold may be: 1/32 of RAM (and INT_MAX)."""
    return min(INT_MAX, memory.total_bytes // THRESH_SHARE)


# --- the declaration ---------------------------------------------------------------------------


class IpFragTuner(Tuner):
    name = "ip_frag"
    description = "raises IPv4/IPv6 fragment reassembly thresholds per namespace when fragment memory nears them"
    bpf_name = "ip_frag_tuner"
    # The defrag path (ip_defrag, ipv6_frag_rcv) runs for fragments only; the
    # tracepoint form runs for every received packet, which costs a
    # request/response workload measurably under emulation.
    preferred_forms = ("fentry", "kprobe")
    tunables = (
        Tunable(IPV4, "net.ipv4.ipfrag_high_thresh", 1, namespaced=True, ceiling=thresh_cap),
        Tunable(IPV6, "net.ipv6.ip6frag_high_thresh", 1, namespaced=True, optional=True, ceiling=thresh_cap),
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
    # The object's sampled hooks (<name>_sample globals), for the summary.
    sampled = ("rx", "defrag")

    def __init__(self, ctx: TunerContext, tuner_id: int) -> None:
        super().__init__(ctx, tuner_id)
        self._last: dict[tuple[int, int], tuple[int, int]] = {}  # (cookie, tunable) -> (reqds, fails)
        # (threshold set, failure percent) since the last back-off, per (cookie, tunable).
        self._samples: dict[tuple[int, int], deque[tuple[float, float]]] = {}
        self._capped = SayOnce(log)

    # --- the rules ------------------------------------------------------------------------------

    def decide(self, event: Event) -> Decision:
        if event.scenario_id != IpFragObservation.OBS_NEAR_THRESH:
            return NOTHING
        return self.near_threshold(IpFragObs.unpack(event.raw), event.netns_cookie)

    def near_threshold(self, obs: IpFragObs, cookie: int) -> Decision:
        """Memory nears the threshold: back off if raising it has gone with
        more failures, else raise it by a step within the caps."""
        tunable = IPV6 if obs.family == socket.AF_INET6 else IPV4
        try:
            current = self.current(tunable, cookie)[0]
        except Exception as exc:  # namespace gone, IPv6 disabled there
            log.debug("ip_frag: cannot read %s in netns %d: %s", self.tunable(tunable).name, cookie, exc)
            return NOTHING
        if not self.steps.nearly_full(obs.mem, current):
            return NOTHING  # an older observation; the threshold has moved on since
        fail_pct = self.failure_percent(cookie, tunable)
        samples = self.trend(cookie, tunable)
        r = significant_correlation(samples)
        if r is not None:
            samples.clear()  # judge the lower setting afresh
            return self.lowered(tunable, cookie, current, obs.low_thresh, r, fail_pct)
        new = self.raised(tunable, cookie, current)
        if new is None:
            return NOTHING
        if fail_pct is not None:
            samples.append((float(new), fail_pct))
        return Decision.of([Proposal(tunable, INCREASE, cookie, (new,), "approaching fragmentation maximum threshold")])

    def lowered(
        self, tunable: int, cookie: int, current: int, low_thresh: int, r: float, fail_pct: float | None
    ) -> Decision:
        """One step down, never below the original value nor low_thresh."""
        floor = max(self._floor(tunable, cookie), low_thresh)
        target = min(self.highest(tunable), max(floor, self.steps.shrink(current)))
        if target >= current:
            return NOTHING
        reason = (
            f"reassembly failures rising with the fragmentation threshold (correlation {r:.2f}, "
            f"{fail_pct or 0.0:.1f}% failed)"
        )
        return Decision.of([Proposal(tunable, DECREASE, cookie, (target,), reason)])

    def raised(self, tunable: int, cookie: int, current: int) -> int | None:
        """One step up, held to 1/32 of RAM and to what is left of the 1/16
        all namespaces share; None (said once) when that leaves no room."""
        key = (cookie, tunable)
        new = self.steps.grow(current)
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
                return None
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
                return None
        return new

    # --- what the rules read ---------------------------------------------------------------------

    @property
    def total_budget(self) -> int:
        """What the thresholds raised in all namespaces may add up to: 1/16 of RAM."""
        return self.host_memory.total_bytes // TOTAL_SHARE

    def raised_elsewhere(self, tunable: int, cookie: int) -> int:
        """The thresholds this tuner set, added up over every namespace and
        family but ``tunable`` in ``cookie`` (namespaces that are gone are
        forgotten by the store)."""
        return sum(
            values[0]
            for name, t, c, values in self.ctx.store.namespace_values()
            if name == self.name and (t.id, c) != (tunable, cookie) and values
        )

    def trend(self, cookie: int, tunable: int) -> deque[tuple[float, float]]:
        """The (threshold set, failure percent) pairs since the last back-off
        in a namespace: what the back-off rule correlates (tests seed it)."""
        return self._samples.setdefault((cookie, tunable), deque(maxlen=CORR_WINDOW))

    def failure_percent(self, cookie: int, tunable: int) -> float | None:
        """Failed reassemblies as a percentage of those requested since the
        last look in this namespace (all-time on the first); 0 when there were
        none (UPSTREAM BUG: bpftune divides by ReasmReqds unchecked)."""
        counters = self.ctx.namespaces.counters(cookie)
        if counters is None:
            return None
        reqds_name, fails_name = COUNTERS[tunable]
        reqds, fails = counters.get(reqds_name, 0), counters.get(fails_name, 0)
        prev_reqds, prev_fails = self._last.get((cookie, tunable), (0, 0))
        self._last[(cookie, tunable)] = (reqds, fails)
        return 100.0 * ratio(max(0, fails - prev_fails), max(0, reqds - prev_reqds))

    def _floor(self, tunable: int, cookie: int) -> int:
        """The value this namespace had before we first changed it."""
        store = self.ctx.store
        original = store.original(self, tunable, cookie) or store.original(self, tunable)
        return original[0] if original else 0

    def summary_lines(self) -> list[str]:
        return sample_lines(self, self.sampled)


TUNER = IpFragTuner
