"""tcp_conn tuner: the congestion control of each TCP connection.

A sockops program on the root cgroup v2 (src/bpf/tcp_conn_tuner.bpf.c)
chooses per connection with bpf_setsockopt(TCP_CONGESTION):

* loss rule: a connection whose retransmits exceed 1/64 of the segments it
  sent (``loss_exceeded``) is switched to BBR, once;
* reinforcement learning: for a remote host (namespace + address) seen at
  least ``MIN_INSTANCES`` times, the algorithm with the lowest learned cost
  is chosen (``pick``), a random one with probability 1/``EPSILON``; each
  connection is scored when it closes (``cost``, folded in by ``rl_update``).

The arithmetic below is the Python twin of src/bpf/tcp_conn_cost.h; a kernel
test runs the BPF code on the same inputs and compares.  User space makes the
algorithms choosable (modprobe, tcp_allowed_congestion_control, restored on
exit), logs the changes the BPF side reports (at most one line per namespace,
reason and algorithm a second), and prints a table of the choices at exit.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..bindings import (
    TcpConnAlg,
    TcpConnConst,
    TcpConnCounts,
    TcpConnEvent,
    TcpConnHost,
    TcpConnHostKey,
    TcpConnNsKey,
    TcpConnReason,
    TcpConnScenario,
    TcpConnTunable,
)
from ..errors import PybpftuneError
from ..events import Event
from ..sysctl import SysctlMissing
from ..tuner import Decision, MapUpdate, Noted, Scenario, TextProposal, Tunable, Tuner, TunerContext

log = logging.getLogger("pybpftune.tuner.tcp_conn")

# The algorithms the tuner may choose, by their kernel names; index = enum tcp_conn_alg.
ALGS: tuple[str, ...] = tuple(a.name.lower() for a in TcpConnAlg if a != TcpConnAlg.OTHER)
# The kernel module of each (modprobe'd when not yet available).
MODULES = {alg: f"tcp_{alg}" for alg in ALGS}
# Where modprobe lives (looked up directly: shutil.which would import shutil, bz2 and lzma).
MODPROBE = ("/usr/sbin/modprobe", "/sbin/modprobe", "/usr/bin/modprobe", "/bin/modprobe")
REASONS: tuple[str, ...] = tuple(r.name.lower() for r in TcpConnReason)  # index = enum tcp_conn_reason

MIN_INSTANCES: int = TcpConnConst.MIN_INSTANCES
EPSILON: int = TcpConnConst.EPSILON
LOSS_SHIFT: int = TcpConnConst.LOSS_SHIFT
MIN_RETRANS: int = TcpConnConst.MIN_RETRANS
COST_SCALE = 1_000_000
RTT_TERM_MAX = 100 * COST_SCALE
U64 = (1 << 64) - 1


# --- the rules, as pure functions (twins of tcp_conn_cost.h) ----------------------------


def loss_exceeded(total_retrans: int, segs_out: int) -> bool:
    """The loss rule: more retransmits than 1/64 (~1.6 %) of the segments sent,
    and at least two (one tail-loss probe or spurious timeout is not a rate)."""
    return total_retrans >= MIN_RETRANS and total_retrans > (segs_out >> LOSS_SHIFT)


def cost(rtt_us: int, host_min_rtt_us: int, rate: int, host_max_rate: int) -> int:
    """Cost of one connection to a host, in millionths (lower is better).

    ``rtt_us`` is the connection's minimum RTT, ``rate`` its delivery rate
    (bytes/s) at close; the host's minimum RTT and maximum rate already
    include this connection.  Two terms, each relative to the host's best:

        (rtt - host_min_rtt) / host_min_rtt      (capped at 100)
      + (host_max_rate - rate) / host_max_rate   (0..1)

    A connection as fast as the host's best and as close costs 0.  The rate
    term uses the connection's own rate, not the best rate its algorithm ever
    reached (bpftune PR #139): a per-algorithm maximum only grows, so one lucky
    connection would hide every later slow one.
    """
    total = 0
    if host_min_rtt_us and rtt_us > host_min_rtt_us:
        total += min((rtt_us - host_min_rtt_us) * COST_SCALE // host_min_rtt_us, RTT_TERM_MAX)
    if host_max_rate and rate < host_max_rate:
        total += (host_max_rate - rate) * COST_SCALE // host_max_rate
    return total & U64


def rl_update(metric: int, samples: int, new_cost: int, shift: int) -> int:
    """Move the metric a 2^-shift step towards the new cost (first sample: take it)."""
    if not samples:
        return new_cost
    if new_cost >= metric:
        return metric + ((new_cost - metric) >> shift)
    return metric - ((metric - new_cost) >> shift)


def delivery_rate(delivered: int, mss: int, interval_us: int) -> int:
    """Bytes per second of a rate sample: ``delivered`` segments in ``interval_us``."""
    if not interval_us:
        return 0
    return (delivered * mss * 1_000_000 // interval_us) & U64


def pick(metrics: Sequence[int], samples: Sequence[int], mask: int, start: int) -> int | None:
    """Lowest-cost available algorithm; never-measured ones count as 0 (so each
    is tried once); ties go to the first from ``start``.  None if none is available."""
    best, best_cost = None, U64 + 1
    for i in range(len(ALGS)):
        a = (start + i) % len(ALGS)
        if not mask & (1 << a):
            continue
        m = metrics[a] if samples[a] else 0
        if m < best_cost:
            best, best_cost = a, m
    return best


def allowed_with(allowed: str, wanted: Sequence[str]) -> str:
    """tcp_allowed_congestion_control with every wanted algorithm appended."""
    names = allowed.split()
    return " ".join(names + [w for w in wanted if w not in names])


def algorithm_mask(available: Sequence[str]) -> int:
    return sum(1 << i for i, name in enumerate(ALGS) if name in available)


# --- reading the BPF side's tables ----------------------------------------------------


@dataclass(frozen=True)
class HostStats:
    netns_cookie: int
    address: str
    instances: int
    min_rtt_us: int
    max_rate: int
    metric: tuple[int, ...]
    samples: tuple[int, ...]
    chosen: tuple[int, ...]
    greedy: tuple[int, ...]


def format_address(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(bytes(raw[:16]))
    return str(addr.ipv4_mapped or addr)


def ns_off(netns_cookie: int) -> MapUpdate:
    """The sockops program's "leave this namespace alone" entry."""
    return MapUpdate("bpftune_ns_off", TcpConnNsKey(netns_cookie).pack(), bytes([1]))


def choice_table(chosen: Sequence[Sequence[int]]) -> list[str]:
    """The exit table: per algorithm, connections switched by each rule."""
    lines = [f"# {'CongAlg':<10}{'Loss':>8}{'Greedy':>8}{'Explore':>8}{'Total':>8}"]
    for a, name in enumerate(ALGS):
        row = [chosen[r][a] for r in range(len(REASONS))]
        if any(row):
            lines.append(f"# {name:<10}{row[0]:>8}{row[1]:>8}{row[2]:>8}{sum(row):>8}")
    return lines


def _modprobe(module: str) -> None:
    """Load a kernel module if modprobe is here (failures are not errors:
    the algorithm then stays unavailable)."""
    modprobe = next((p for p in MODPROBE if os.access(p, os.X_OK)), None)
    if modprobe is None:
        return
    import subprocess  # only here: most start-ups need no module loaded

    try:
        subprocess.run([modprobe, "-q", module], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass


class TcpConnTuner(Tuner):
    name = "tcp_conn"
    description = "chooses the congestion control of each TCP connection (BBR on loss, RL per remote host)"
    bpf_name = "tcp_conn_tuner"
    cgroup_programs = ("bpftune_conn_tuner",)
    tunables = (
        Tunable(TcpConnTunable.CONG, "net.persock.tcp.congestion_control", namespaced=True, kind="other"),
        # Extended at start for the per-connection choice; put back whenever the tuner stops.
        Tunable(TcpConnTunable.ALLOWED, "net.ipv4.tcp_allowed_congestion_control", kind="string", restore_on_stop=True),
        Tunable(TcpConnTunable.AVAILABLE, "net.ipv4.tcp_available_congestion_control", kind="string"),
        Tunable(TcpConnTunable.DEFAULT, "net.ipv4.tcp_congestion_control", namespaced=True, kind="string"),
        Tunable(TcpConnTunable.THIN_LTO, "net.ipv4.tcp_thin_linear_timeouts", namespaced=True, lower=0, upper=1),
    )
    scenarios = (
        Scenario(TcpConnScenario.SPECIFY, "specify TCP congestion control algorithm", "Choose a congestion control."),
        Scenario(
            TcpConnScenario.LOSS,
            "loss rate exceeded threshold",
            "Retransmits exceeded 1/64 of the segments sent: BBR copes with loss better.",
        ),
    )

    def __init__(self, ctx: TunerContext, tuner_id: int, *, load_module: Callable[[str], None] | None = None) -> None:
        """``load_module``: how a congestion control's module is loaded
        (modprobe; tests give a stand-in)."""
        super().__init__(ctx, tuner_id)
        self.load_module = load_module if load_module is not None else _modprobe
        self.available: list[str] = []
        self.events = 0
        self._prepared = False

    # --- set-up ------------------------------------------------------------------------

    def _read_text(self, tunable_id: int) -> str:
        try:
            return self.ctx.store.current_text(self, tunable_id)
        except SysctlMissing:
            return ""

    def _prepare(self) -> None:
        """Load the modules of the algorithms we may choose (once)."""
        if self._prepared:
            return
        self._prepared = True
        available = self._read_text(TcpConnTunable.AVAILABLE).split()
        missing = [alg for alg in ALGS if alg not in available]
        # Advice mode changes nothing, kernel modules included: only the
        # algorithms already loaded are considered.
        if not self.ctx.store.advice:
            for alg in missing:
                self.load_module(MODULES[alg])
        self.available = [a for a in ALGS if a in self._read_text(TcpConnTunable.AVAILABLE).split()]

    def bpf_globals(self) -> Mapping[str, int]:
        self._prepare()
        try:
            thin = self.current(TcpConnTunable.THIN_LTO)[0]
        except (PybpftuneError, IndexError):
            thin = 0
        return {
            "conn_algs_available": algorithm_mask(self.available),
            "conn_thin_lto_sysctl": thin,
            "conn_advise_only": int(self.ctx.store.advice),
        }

    def advice_changed(self, advice: bool) -> None:
        self.set_bpf_global("conn_advise_only", int(advice))

    def start(self) -> None:
        self._prepare()
        allowed = self._read_text(TcpConnTunable.ALLOWED)
        wanted = allowed_with(allowed, self.available)
        if wanted != " ".join(allowed.split()):
            missing = [a for a in self.available if a not in allowed.split()]
            reason = (
                f"tcp_conn choosing among {', '.join(self.available)} per connection "
                f"({', '.join(missing)} not yet allowed)"
            )
            glob = self.ctx.namespaces.global_cookie
            self.carry_out(
                Decision(texts=(TextProposal(TcpConnTunable.ALLOWED, TcpConnScenario.SPECIFY, glob, wanted, reason),))
            )
        self.log.info(
            "tcp_conn: choosing among %s; BBR on loss %s",
            ", ".join(self.available) or "nothing",
            "on" if "bbr" in self.available else "off (bbr is not available)",
        )

    # --- per-namespace policy -------------------------------------------------------------

    def netns_disabled(self, netns_cookie: int) -> None:
        """An administrator took over congestion control in a namespace: the
        sockops program leaves its new connections alone from now on.  (The
        store calls this as it backs off; the map write is carried out then.)"""
        self.carry_out(Decision(effects=(ns_off(netns_cookie),)))

    # --- events ---------------------------------------------------------------------------

    def decide(self, event: Event) -> Decision:
        e = TcpConnEvent.unpack(event.raw)
        self.events += 1
        old = ALGS[e.old_alg] if e.old_alg < len(ALGS) else "other"
        new = ALGS[e.new_alg] if e.new_alg < len(ALGS) else "other"
        host = f"{format_address(e.addr)} (netns cookie {event.netns_cookie})"
        if e.reason == TcpConnReason.LOSS:
            why = (
                f"loss rate exceeding 1/64 of segments sent ({e.total_retrans} retransmits of "
                f"{e.segs_out} segments) on a connection to {host}"
            )
        elif e.reason == TcpConnReason.GREEDY:
            why = f"the lowest learned cost ({e.cost}) among congestion controls for {host}"
        else:
            why = f"exploring congestion controls for {host} (1 connection in {EPSILON})"
        scenario = TcpConnScenario.LOSS if event.scenario_id == TcpConnScenario.LOSS else TcpConnScenario.SPECIFY
        # The BPF side already switched the connection: the store only tells.
        return Decision(effects=(Noted(TcpConnTunable.CONG, scenario, event.netns_cookie, old, new, why),))

    # --- summary --------------------------------------------------------------------------

    def counts(self) -> TcpConnCounts | None:
        if self.loaded is None:
            return None
        raw = self.loaded.map("bpftune_counts").get(bytes(4))  # an array of one: key 0
        return None if raw is None else TcpConnCounts.unpack(raw)

    def hosts(self) -> list[HostStats]:
        if self.loaded is None:
            return []
        out = []
        table = self.loaded.map("bpftune_hosts", TcpConnHostKey, TcpConnHost)
        for k in list(table):
            h = table.get(k)
            if h is None:
                continue
            out.append(
                HostStats(
                    k.netns_cookie,
                    format_address(k.addr),
                    h.instances,
                    h.min_rtt_us,
                    h.max_rate,
                    tuple(a.metric for a in h.alg),
                    tuple(a.samples for a in h.alg),
                    tuple(a.chosen for a in h.alg),
                    tuple(a.greedy for a in h.alg),
                )
            )
        return out

    def summary_lines(self) -> list[str]:
        c = self.counts()
        if c is None:
            return []
        chosen = [list(row) for row in c.chosen]
        total = sum(map(sum, chosen))
        lines = [
            f"# Summary: tcp_conn_tuner: {total} congestion control choices over {c.connections} "
            f"connections ({c.measured} scored at close, {c.skipped_netns} left alone in "
            f"namespaces an administrator took over, {c.setsockopt_failed} setsockopt failures)",
            f"# Summary: tcp_conn_tuner: set 'net.ipv4.tcp_thin_linear_timeouts' for {c.thin_lto} connections",
        ]
        if total:
            lines += choice_table(chosen)
        for h in sorted(self.hosts(), key=lambda h: -h.instances)[:16]:
            where = f"{self.ctx.namespaces.describe(h.netns_cookie)}, cookie {h.netns_cookie}"
            per_alg = ", ".join(
                f"{name} metric {h.metric[i]} n {h.samples[i]} chosen {h.chosen[i]} greedy {h.greedy[i]}"
                for i, name in enumerate(ALGS)
                if h.samples[i] or h.chosen[i]
            )
            lines.append(
                f"# Host {h.address} ({where}): {h.instances} connections, min rtt {h.min_rtt_us} us, "
                f"max rate {h.max_rate} B/s; {per_alg or 'nothing scored yet'}"
            )
        return lines


TUNER = TcpConnTuner
