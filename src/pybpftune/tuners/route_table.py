"""route_table tuner: grow net.ipv6.route.max_size before the IPv6 table fills.

Watches: a namespace's IPv6 route count (the kernel's rt6_stats: routes plus
cached exception routes) against its max_size, at two signals, because a table
can fill where only one of them fires: route lookups (``dst_table``, a
tracepoint: wherever traffic flows) and the IPv6 garbage collector (``dst_gc``,
fentry or kprobe on fib6_run_gc: also when links come and go without a single
lookup).  Either one suffices to run.  The BPF side proposes a step up when the
count nears the limit; the count rides along in ``update[0].old[1]``.

Changes: ``net.ipv6.route.max_size`` of that namespace.  The sysctl exists
only with IPv6: without it the tuner runs idle.

Why: the rule re-checks the proposal against the value current when the event
is handled, and grows in learning-rate steps until the table is no longer
nearly full, so one event settles a burst of new routes and a stale event
changes nothing.  See docs/tuners/route_table.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..bindings import NETNS_UNKNOWN, RouteTableScenario, RouteTableTunable
from ..errors import NotSupported
from ..events import Event
from ..netns import NetnsGone
from ..sysctl import SysctlMissing
from ..tuner import INT_MAX, NOTHING, Decision, Proposal, Scenario, Steps, Tunable, Tuner

if TYPE_CHECKING:
    from ..objects import SignalChoice

# Ids from the shared header (bpftune_shared.h, "route_table tuner").
MAX_SIZE = RouteTableTunable.IPV6_MAX_SIZE
FULL = RouteTableScenario.FULL
REASON = "dst table filling up,"  # bpftune's line: "Due to dst table filling up, change ..."


# --- the declaration ---------------------------------------------------------------------------


class RouteTableTuner(Tuner):
    name = "route_table"
    description = "grows net.ipv6.route.max_size when a namespace's IPv6 route table nears it"
    bpf_name = "route_table_tuner"
    tunables = (Tunable(MAX_SIZE, "net.ipv6.route.max_size", 1, namespaced=True, optional=True, lower=1),)
    scenarios = (
        Scenario(FULL, "destination table nearly full", "Need to increase the IPv6 route table size (max_size)"),
    )
    # Either signal suffices (start() refuses when neither has a form).
    optional_signals = frozenset({"dst_table", "dst_gc"})

    def start(self) -> None:
        # Two checks no declaration can make: a signal chosen, and IPv6 on.
        if self.loaded is not None:
            require_a_signal(self.loaded.choices)
        try:
            self.current(MAX_SIZE)
        except SysctlMissing:
            self.log.info("tuner %s: net.ipv6.route.max_size is absent (IPv6 is off): nothing to tune", self.name)

    # --- the rule ---------------------------------------------------------------------------

    def decide(self, event: Event) -> Decision:
        if event.scenario_id != FULL or event.netns_cookie == NETNS_UNKNOWN:
            return NOTHING
        update = event.update(0)
        if update.id != MAX_SIZE:
            return NOTHING
        count = update.old[1]
        try:
            (current,) = self.current(MAX_SIZE, event.netns_cookie)
        except (SysctlMissing, NetnsGone):
            return NOTHING  # IPv6 off there, or the namespace is already gone
        new = grown_max_size(count, current, self.steps)
        if new is None:
            return NOTHING
        return Decision.of([Proposal(MAX_SIZE, FULL, event.netns_cookie, (new,), REASON)])


def require_a_signal(choices: Mapping[str, SignalChoice]) -> None:
    """Either signal suffices, but a kernel where neither has a form cannot
    see the table: refuse, naming both and why."""
    if not any(c.chosen for c in choices.values()):
        why = "; ".join(c.describe() for c in choices.values())
        raise NotSupported(RouteTableTuner.name, f"no signal can see the IPv6 route table: {why}")


def grown_max_size(count: int, current: int, steps: Steps) -> int | None:
    """The max_size that leaves ``count`` routes no longer nearly full, or None
    when ``current`` already does (or cannot grow)."""
    if current <= 0 or current >= INT_MAX or not steps.nearly_full(count, current):
        return None
    new = current
    while steps.nearly_full(count, new) and new < INT_MAX:
        step = steps.grow(new)
        new = min(INT_MAX, step if step > new else new + 1)
    return new


TUNER = RouteTableTuner
