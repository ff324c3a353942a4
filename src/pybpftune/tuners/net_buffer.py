"""net_buffer tuner: per-cpu backlog queues and the receive softirq budget.

* Backlog drops (skb:kfree_skb with SKB_DROP_REASON_CPU_BACKLOG, or
  enqueue_to_backlog returning NET_RX_DROP): when a 32nd of
  ``net.core.netdev_max_backlog`` was dropped within a minute, grow it one
  step (never beyond what memory can back: every cpu's backlog full of
  MTU-sized packets within 1/16 of RAM), and set the dropping cpu's bit in
  ``net.core.flow_limit_cpu_bitmap``
  so big flows cannot crowd small ones out of that cpu's backlog.
* Time squeeze (softnet_data.time_squeeze rising: net_rx_action ran out of
  budget or time with work left): grow ``net.core.netdev_budget`` and
  ``net.core.netdev_budget_usecs`` one step, at most once a second and never
  past 50 ms; when increases go with rising scheduler wait (tasks kept off
  the cpu by longer softirq runs), shrink both instead.
* At start, re-enable high-order page allocations for socket buffers
  (``net.core.high_order_alloc_disable`` 1 -> 0) on kernels from 5.14.

All these sysctls are global.  When a signal has no working BPF form (the
squeeze signal needs softnet_data from kernel BTF and kallsyms), the same
counters are read from /proc/net/softnet_stat once a second instead.
See docs/tuners/net_buffer.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from ..bindings import NetBufferObs, NetBufferObservation, NetBufferScenario, NetBufferTunable
from ..events import Event
from ..hostmem import HostMemory
from ..tuner import INT_MAX, NOTHING, Decision, Proposal, Scenario, TextProposal, Tunable, Tuner, TunerContext
from .common import SayOnce, sample_lines, significant_correlation

log = logging.getLogger("pybpftune")

BUDGET_USECS_MAX = 50_000
# The kernel's largest NR_CPUS (CONFIG_MAXSMP): no cpu number reaches it.
MAX_CPUS = 8192
# netdev_max_backlog's memory cap: packets queued on every cpu's backlog
# (truesize of an MTU-sized skb: about 2 KiB) hold at most 1/16 of RAM,
# and never less than the kernel's default of 1000.
BACKLOG_PACKET_BYTES = 2048
BACKLOG_MEM_SHARE = 16
BACKLOG_DEFAULT = 1000
BUDGET_HOLD_S = 1.0
CORR_WINDOW = 32
WINDOW_S = 60.0


# --- text helpers -------------------------------------------------------------------------


def parse_cpumask(text: str) -> int:
    """A cpumask as the kernel prints it ("3", "00000001,00000000") as an int."""
    digits = "".join(text.split()).replace(",", "")
    return int(digits, 16) if digits else 0


def format_cpumask(mask: int) -> str:
    """The kernel's cpumask format: 32-bit hex words, most significant first."""
    words = []
    while True:
        words.append(mask & 0xFFFFFFFF)
        mask >>= 32
        if not mask:
            break
    words.reverse()
    return ",".join([f"{words[0]:x}"] + [f"{w:08x}" for w in words[1:]])


def parse_softnet_stat(text: str) -> list[tuple[int, int, int]]:
    """(processed, dropped, time_squeeze) per cpu line of /proc/net/softnet_stat."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out.append((int(fields[0], 16), int(fields[1], 16), int(fields[2], 16)))
    return out


def parse_schedstat(text: str) -> tuple[int, int] | None:
    """Total (run, wait) nanoseconds over all cpus from /proc/schedstat."""
    run = wait = 0
    found = False
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0].startswith("cpu") and len(fields) >= 9:
            run += int(fields[7])
            wait += int(fields[8])
            found = True
    return (run, wait) if found else None


def parse_psi_some_total(text: str) -> int | None:
    """Microseconds some task waited for a cpu, from /proc/pressure/cpu."""
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split():
                if field.startswith("total="):
                    return int(field[6:])
    return None


def kernel_at_least(release: str, major: int, minor: int) -> bool:
    parts = release.split(".")
    try:
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (major, minor)
    except (IndexError, ValueError):
        return False


class WaitSource(Protocol):
    def sample(self) -> float | None:
        """Scheduler wait (percent) since the last call; None: not known."""
        ...


class SchedWait:
    """Scheduler wait as a percentage, between one call and the next.

    /proc/schedstat gives run and wait (run_delay) time per cpu: wait is
    reported as a percentage of run.  Without schedstats the cpu pressure
    stall information (/proc/pressure/cpu "some") gives the share of wall
    time some task waited.  None until two readings exist, or without either
    source.
    """

    def __init__(
        self, read: Callable[[str], str | None] | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.read = read or _read_text
        self.clock = clock
        self._last: tuple[str, float, int, int] | None = None

    def sample(self) -> float | None:
        text = self.read("/proc/schedstat")
        if text is not None and (pair := parse_schedstat(text)) is not None:
            source, a, b = "schedstat", pair[0], pair[1]
        else:
            text = self.read("/proc/pressure/cpu")
            total = parse_psi_some_total(text) if text is not None else None
            if total is None:
                return None
            source, a, b = "psi", int(self.clock() * 1_000_000), total
        last, self._last = self._last, (source, 0.0, a, b)
        if last is None or last[0] != source:
            return None
        da, db = a - last[2], b - last[3]
        if da <= 0:
            return None
        return 100.0 * db / da


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _read_softnet() -> str | None:
    return _read_text("/proc/net/softnet_stat")


def backlog_cap(memory: HostMemory) -> int:
    """The most netdev_max_backlog (a per-cpu queue length) may be."""
    per_cpu = memory.total_bytes // BACKLOG_MEM_SHARE // (max(1, memory.cpus) * BACKLOG_PACKET_BYTES)
    return max(BACKLOG_DEFAULT, min(INT_MAX, per_cpu))


class NetBufferTuner(Tuner):
    name = "net_buffer"
    description = "grows netdev_max_backlog on backlog drops and netdev_budget(_usecs) on softirq time squeeze"
    bpf_name = "net_buffer_tuner"
    tunables = (
        Tunable(NetBufferTunable.MAX_BACKLOG, "net.core.netdev_max_backlog", 1, lower=1, ceiling=backlog_cap),
        Tunable(
            NetBufferTunable.FLOW_LIMIT_CPU_BITMAP, "net.core.flow_limit_cpu_bitmap", 1, kind="string", optional=True
        ),
        Tunable(NetBufferTunable.BUDGET, "net.core.netdev_budget", 1, lower=1),
        Tunable(NetBufferTunable.BUDGET_USECS, "net.core.netdev_budget_usecs", 1, lower=1, upper=BUDGET_USECS_MAX),
        Tunable(
            NetBufferTunable.HIGH_ORDER_ALLOC_DISABLE,
            "net.core.high_order_alloc_disable",
            1,
            lower=0,
            upper=1,
            optional=True,
        ),
    )
    scenarios = (
        Scenario(
            NetBufferScenario.INCREASE_BACKLOG,
            "need to increase max backlog",
            "Need to increase backlog size to avoid drops",
        ),
        Scenario(
            NetBufferScenario.SET_FLOW_LIMIT,
            "need to set per-cpu bitmap value",
            "Need to set flow limit per-cpu to prioritize small flows",
        ),
        Scenario(
            NetBufferScenario.INCREASE_BUDGET,
            "need to increase # of packets processed per NAPI poll",
            "Need to increase number of packets processed across network devices during NAPI poll to use all of "
            "netdev_budget_usecs",
        ),
        Scenario(
            NetBufferScenario.DECREASE_BUDGET,
            "need to decrease # of packets processed per NAPI poll",
            "Need to decrease netdev_budget[_usecs] since the ratio of time spent waiting to run versus time "
            "spent running for tasks has increased as we have increased netdev budget",
        ),
        Scenario(
            NetBufferScenario.ENABLE_HIGH_ORDER_ALLOC,
            "need to enable high-order allocations",
            "Enable high-order allocations for socket buffers: since Linux 5.14 they no longer hurt",
        ),
    )
    optional_signals = frozenset({"backlog", "squeeze"})
    kernel_dependent_forms = MappingProxyType(
        {
            "bpftune_backlog__tp_btf": "skb drop reasons (SKB_DROP_REASON_CPU_BACKLOG, Linux 5.17+)",
            "bpftune_backlog__raw_tp": "skb drop reasons (SKB_DROP_REASON_CPU_BACKLOG, Linux 5.17+)",
            **{
                f"bpftune_squeeze__{form}": "softnet_data in kernel BTF and its address in kallsyms"
                for form in ("tp_btf", "raw_tp", "fentry", "kprobe")
            },
        }
    )

    def __init__(
        self,
        ctx: TunerContext,
        tuner_id: int,
        *,
        sched_wait: WaitSource | None = None,
        read_softnet: Callable[[], str | None] | None = None,
        kernel_release: str | None = None,
    ) -> None:
        """The keyword arguments stand in for what the tuner reads of the
        host (tests): scheduler wait, /proc/net/softnet_stat, the kernel release."""
        super().__init__(ctx, tuner_id)
        self.sched_wait: WaitSource = sched_wait if sched_wait is not None else SchedWait()
        self.read_softnet = read_softnet if read_softnet is not None else _read_softnet
        self.kernel_release = kernel_release if kernel_release is not None else os.uname().release
        self.poll_backlog = False
        self.poll_squeeze = False
        self._last_budget_change = -1e9
        self._budget_samples: deque[tuple[float, float]] = deque(maxlen=CORR_WINDOW)
        self._usecs_capped = SayOnce(log)
        self._backlog_capped = SayOnce(log)
        self._softnet_last: list[tuple[int, int, int]] | None = None
        self._poll_drops: deque[tuple[float, int]] = deque()

    # --- setup ------------------------------------------------------------------------------

    def bpf_globals(self) -> dict[str, int]:
        return {"max_backlog": self.current(NetBufferTunable.MAX_BACKLOG)[0]}

    def start(self) -> None:
        if self.loaded is not None:
            choices = self.loaded.choices
            self.poll_backlog = "backlog" in choices and choices["backlog"].chosen is None
            self.poll_squeeze = "squeeze" in choices and choices["squeeze"].chosen is None
        for what, on in (("backlog drops", self.poll_backlog), ("time squeeze", self.poll_squeeze)):
            if on:
                log.info("tuner %s: watching %s in /proc/net/softnet_stat once a second instead", self.name, what)
        self.enable_high_order_alloc()

    def enable_high_order_alloc(self) -> bool:
        try:
            current = self.current(NetBufferTunable.HIGH_ORDER_ALLOC_DISABLE)[0]
        except Exception:  # sysctl missing on this kernel
            return False
        if current != 1 or not kernel_at_least(self.kernel_release, 5, 14):
            return False
        return self.apply(
            Proposal(
                NetBufferTunable.HIGH_ORDER_ALLOC_DISABLE,
                NetBufferScenario.ENABLE_HIGH_ORDER_ALLOC,
                self.ctx.namespaces.global_cookie,
                (0,),
                f"high-order allocations being safe on kernel {self.kernel_release}",
            )
        )

    def applied(self, proposal: Proposal) -> None:
        """The BPF side counts drops against the value written (known only
        once the store wrote it), and the budget hold-off starts then."""
        if proposal.tunable == NetBufferTunable.MAX_BACKLOG:
            # A new setting: count its drops from scratch.
            self.set_bpf_global("max_backlog", proposal.new[0])
            self.set_bpf_global("backlog_drops", 0)
            self.set_bpf_global("backlog_window_start", 0)
            self._poll_drops.clear()
        elif proposal.tunable in (NetBufferTunable.BUDGET, NetBufferTunable.BUDGET_USECS):
            self._last_budget_change = self.clock()

    # --- events -------------------------------------------------------------------------------

    def decide(self, event: Event) -> Decision:
        return self.observe(event.scenario_id, NetBufferObs.unpack(event.raw), event.netns_cookie)

    def observe(self, kind: int, obs: NetBufferObs, cookie: int) -> Decision:
        """One observation (``kind``: enum net_buffer_observation), from an
        event or from polling /proc/net/softnet_stat."""
        if kind == NetBufferObservation.OBS_BACKLOG_DROPS:
            proposals = self.on_backlog_drops(obs, cookie)
            flow_limit = self.flow_limit(obs.cpu, cookie) if proposals else None
            return Decision(tuple(proposals), texts=(flow_limit,) if flow_limit is not None else ())
        if kind == NetBufferObservation.OBS_TIME_SQUEEZE:
            return Decision(tuple(self.on_time_squeeze(obs, cookie)))
        return NOTHING

    # --- rules ----------------------------------------------------------------------------------

    def on_backlog_drops(self, obs: NetBufferObs, cookie: int) -> list[Proposal]:
        backlog = self.current(NetBufferTunable.MAX_BACKLOG)[0]
        if obs.max_backlog and obs.max_backlog < backlog:
            return []  # counted against an older, smaller setting
        if obs.drops < max(1, backlog >> 5):
            return []
        cap = self.highest(NetBufferTunable.MAX_BACKLOG)
        new = min(cap, max(self.steps.grow(backlog), backlog + 1))
        if new <= backlog:
            self._backlog_capped.info(
                NetBufferTunable.MAX_BACKLOG,
                "tuner %s: netdev_max_backlog is at %d, its memory cap %d (%s); not increasing it further",
                self.name,
                backlog,
                cap,
                self.host_memory.describe(),
            )
            return []
        reason = f"{obs.drops} packet(s) dropped from full per-cpu backlog queues"
        return [Proposal(NetBufferTunable.MAX_BACKLOG, NetBufferScenario.INCREASE_BACKLOG, cookie, (new,), reason)]

    def flow_limit(self, cpu: int, cookie: int) -> TextProposal | None:
        """Flow limits on for the cpu that dropped (None: on already, or none here)."""
        if not 0 <= cpu < MAX_CPUS:
            return None  # no such cpu: a garbled event (1 << cpu would be a 4-billion-bit mask)
        try:
            text = self.ctx.store.current_text(self, NetBufferTunable.FLOW_LIMIT_CPU_BITMAP)
        except Exception:  # no CONFIG_NET_FLOW_LIMIT
            return None
        mask = parse_cpumask(text)
        if mask & (1 << cpu):
            return None
        return TextProposal(
            NetBufferTunable.FLOW_LIMIT_CPU_BITMAP,
            NetBufferScenario.SET_FLOW_LIMIT,
            cookie,
            format_cpumask(mask | (1 << cpu)),
            f"backlog drops on cpu {cpu}",
        )

    def on_time_squeeze(self, obs: NetBufferObs, cookie: int) -> list[Proposal]:
        now = self.clock()
        if now - self._last_budget_change < BUDGET_HOLD_S:
            return []
        budget = self.current(NetBufferTunable.BUDGET)[0]
        usecs = self.current(NetBufferTunable.BUDGET_USECS)[0]
        if budget >= self.highest(NetBufferTunable.BUDGET):
            return []
        # One step up, at least by one (a value below the lower bound of 1,
        # which the kernel refuses anyway, comes up to it).
        new_budget = min(self.highest(NetBufferTunable.BUDGET), max(1, budget + 1, self.steps.grow(budget)))
        new_usecs = max(1, usecs + 1, self.steps.grow(usecs))
        wait = self.sched_wait.sample()
        if wait is not None:
            self._budget_samples.append((float(budget), wait))
        r = significant_correlation(self._budget_samples)
        if r is not None:
            self._budget_samples.clear()
            out = []
            for tunable, current in ((NetBufferTunable.BUDGET, budget), (NetBufferTunable.BUDGET_USECS, usecs)):
                floor = self._original(tunable)
                target = min(self.highest(tunable), max(floor, 1, self.steps.shrink(current)))
                if target < current:
                    reason = f"scheduler wait rising with the budget (correlation {r:.2f}, wait {wait or 0:.1f}%)"
                    out.append(Proposal(tunable, NetBufferScenario.DECREASE_BUDGET, cookie, (target,), reason))
            return out
        if new_usecs > BUDGET_USECS_MAX:
            self._usecs_capped.info(
                NetBufferTunable.BUDGET_USECS,
                "tuner %s: netdev_budget_usecs would exceed %d us; not increasing the budget further",
                self.name,
                BUDGET_USECS_MAX,
            )
            return []
        squeezes = obs.time_squeeze - obs.prev_time_squeeze
        reason = f"{squeezes} time squeeze(s) on cpu {obs.cpu} (softirq ran out of budget with work left)"
        return [
            Proposal(NetBufferTunable.BUDGET, NetBufferScenario.INCREASE_BUDGET, cookie, (new_budget,), reason),
            Proposal(NetBufferTunable.BUDGET_USECS, NetBufferScenario.INCREASE_BUDGET, cookie, (new_usecs,), reason),
        ]

    def _original(self, tunable: int) -> int:
        original = self.ctx.store.original(self, tunable)
        return original[0] if original else 1

    # --- /proc/net/softnet_stat fallback ----------------------------------------------------------

    def tick(self, now: float) -> float | None:
        if not (self.poll_backlog or self.poll_squeeze):
            return math.inf  # the BPF signals cover both: nothing to poll
        self._poll_softnet()
        return None  # once a second while polling

    def _poll_softnet(self) -> None:
        text = self.read_softnet()
        if text is None:
            return
        stats = parse_softnet_stat(text)
        last, self._softnet_last = self._softnet_last, stats
        if last is None or len(last) != len(stats):
            return
        glob = self.ctx.namespaces.global_cookie
        if self.poll_backlog:
            drops = [(cpu, s[1] - p[1]) for cpu, (s, p) in enumerate(zip(stats, last, strict=True)) if s[1] > p[1]]
            if drops:
                t = self.clock()
                self._poll_drops.extend((t, n) for _cpu, n in drops)
                while self._poll_drops and t - self._poll_drops[0][0] > WINDOW_S:
                    self._poll_drops.popleft()
                total = sum(n for _t, n in self._poll_drops)
                window = int((t - self._poll_drops[0][0]) * 1e9)
                cpu = max(drops, key=lambda d: d[1])[0]
                obs = NetBufferObs(cpu=cpu, drops=total, window_ns=window)
                self.carry_out(self.observe(NetBufferObservation.OBS_BACKLOG_DROPS, obs, glob))
        if self.poll_squeeze:
            for cpu, (s, p) in enumerate(zip(stats, last, strict=True)):
                if s[2] > p[2]:
                    obs = NetBufferObs(cpu=cpu, time_squeeze=s[2], prev_time_squeeze=p[2])
                    self.carry_out(self.observe(NetBufferObservation.OBS_TIME_SQUEEZE, obs, glob))
                    break

    # --- reporting ----------------------------------------------------------------------------------

    def summary_lines(self) -> list[str]:
        return sample_lines(self, ("backlog", "squeeze"))


TUNER = NetBufferTuner
